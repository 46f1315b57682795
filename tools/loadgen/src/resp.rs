//! A minimal client of the Redis protocol (RESP), for the tool's own questions to Redis.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

/// A minimal RESP client for the tool's own questions to Redis (`INFO`, `CLIENT LIST`).
pub(crate) struct RedisAdmin {
    reader: BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

/// A reply; integers and arrays are read through and not kept (the tool needs none).
#[derive(Debug)]
pub(crate) enum Resp {
    Simple(String),
    Bulk(Option<Vec<u8>>),
    Other,
}

impl RedisAdmin {
    pub(crate) fn connect(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| format!("not a redis:// URL: {url}"))?;
        let (auth, host) = match rest.rsplit_once('@') {
            Some((auth, host)) => (Some(auth), host),
            None => (None, rest),
        };
        let host = host.split('/').next().unwrap_or_default();
        let host = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:6379")
        };
        let stream =
            std::net::TcpStream::connect(&host).map_err(|e| format!("redis {host}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut admin = Self {
            reader: BufReader::new(stream.try_clone().map_err(|e| e.to_string())?),
            writer: stream,
        };
        if let Some(auth) = auth {
            let (user, pass) = auth.split_once(':').unwrap_or(("", auth));
            if user.is_empty() {
                admin.command(&["AUTH", pass])?;
            } else {
                admin.command(&["AUTH", user, pass])?;
            }
        }
        admin.command(&["CLIENT", "SETNAME", "loadgen"])?;
        Ok(admin)
    }

    pub(crate) fn command(&mut self, args: &[&str]) -> Result<Resp, String> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        self.writer.write_all(&out).map_err(|e| e.to_string())?;
        self.read()
    }

    fn read(&mut self) -> Result<Resp, String> {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let line = line.trim_end();
        let (kind, rest) = line.split_at(1.min(line.len()));
        let number = || rest.parse::<i64>().map_err(|_| format!("bad RESP: {line}"));
        match kind {
            "+" => Ok(Resp::Simple(rest.to_owned())),
            "-" => Err(format!("redis: {rest}")),
            ":" => number().map(|_| Resp::Other),
            "$" => {
                let n = number()?;
                if n < 0 {
                    return Ok(Resp::Bulk(None));
                }
                let mut buf = vec![0; n as usize + 2];
                self.reader
                    .read_exact(&mut buf)
                    .map_err(|e| e.to_string())?;
                buf.truncate(n as usize);
                Ok(Resp::Bulk(Some(buf)))
            }
            "*" => {
                for _ in 0..number()?.max(0) {
                    self.read()?;
                }
                Ok(Resp::Other)
            }
            _ => Err(format!("bad RESP: {line}")),
        }
    }

    fn text(&mut self, args: &[&str]) -> Result<String, String> {
        match self.command(args)? {
            Resp::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Resp::Simple(s) => Ok(s),
            other => Err(format!("unexpected reply to {args:?}: {other:?}")),
        }
    }

    /// Calls per command name, from `INFO commandstats`.
    pub(crate) fn commandstats(&mut self) -> Result<BTreeMap<String, u64>, String> {
        let info = self.text(&["INFO", "commandstats"])?;
        Ok(info
            .lines()
            .filter_map(|l| {
                let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect())
    }

    pub(crate) fn used_memory(&mut self) -> Result<u64, String> {
        let info = self.text(&["INFO", "memory"])?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| "no used_memory".to_owned())
    }

    /// Connected clients, not counting this one.
    pub(crate) fn other_clients(&mut self) -> Result<usize, String> {
        let list = self.text(&["CLIENT", "LIST"])?;
        Ok(list
            .lines()
            .filter(|l| !l.is_empty() && !l.contains(" name=loadgen "))
            .count())
    }
}
