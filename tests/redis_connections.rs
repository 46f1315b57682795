//! What a [`RedisStore`] connects, and what each connection carries: lease renewals on a
//! connection of their own, which no read can hold back; a few connections whatever the number
//! of sessions; and nothing kept per session once nobody uses it.
#![cfg(feature = "redis")]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::redis::*;
use common::*;
use common::{event_stream_head as head, one_event as event};
use resumable_sse::limits::{REDIS_COMMAND_CONNECTION_NAME, REDIS_LEASE_CONNECTION_NAME};
use resumable_sse::store::{Claim, Status, Store};
use resumable_sse::testing::wait::{eventually, within, TIMEOUT};
use resumable_sse::{RedisStore, SessionKey};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

async fn probe(url: &str) -> ::redis::aio::MultiplexedConnection {
    let client = ::redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("test-probe")
        .query_async(&mut c)
        .await
        .unwrap();
    c
}

/// `CLIENT LIST`, as (address, name, flags) per connection.
async fn client_list(c: &mut ::redis::aio::MultiplexedConnection) -> Vec<(String, String, String)> {
    let list: String = ::redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(c)
        .await
        .unwrap();
    list.lines()
        .map(|l| {
            let field = |k: &str| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix(k))
                    .unwrap_or_default()
                    .to_owned()
            };
            (field("addr="), field("name="), field("cmd="))
        })
        .collect()
}

/// The SHA1 under which the store calls a script: Redis computes it.
async fn sha(c: &mut ::redis::aio::MultiplexedConnection, script: &str) -> String {
    ::redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(script)
        .query_async(c)
        .await
        .unwrap()
}

/// Every `EVALSHA` the server runs, as (client address, script SHA1), from `MONITOR`.
async fn monitor(port: u16) -> Arc<Mutex<Vec<(String, String)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"CLIENT SETNAME test-monitor\r\nMONITOR\r\n")
        .await
        .unwrap();
    let mut lines = BufReader::new(s).lines();
    // +OK twice: named, then monitoring.
    for _ in 0..2 {
        let line = tokio::time::timeout(TIMEOUT, lines.next_line()).await;
        assert!(matches!(line, Ok(Ok(Some(l))) if l == "+OK"));
    }
    tokio::spawn({
        let seen = seen.clone();
        async move {
            // +1700000000.123456 [0 127.0.0.1:54321] "EVALSHA" "<sha>" "3" ...
            while let Ok(Some(line)) = lines.next_line().await {
                let Some((_, rest)) = line.split_once(" [") else {
                    continue;
                };
                let Some((client, command)) = rest.split_once("] ") else {
                    continue;
                };
                let addr = client.split(' ').nth(1).unwrap_or_default().to_owned();
                let words: Vec<&str> = command.split('"').collect();
                if words
                    .get(1)
                    .is_some_and(|w| w.eq_ignore_ascii_case("evalsha"))
                {
                    if let Some(sha) = words.get(3) {
                        seen.lock().unwrap().push((addr, (*sha).to_owned()));
                    }
                }
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_use_a_connection_no_read_uses_and_a_thousand_sessions_use_three() {
    if shared_url().is_none() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let mut c = probe(&url).await;
    let renew = sha(&mut c, include_str!("../src/store/redis/lua/renew.lua")).await;
    let read = sha(
        &mut c,
        &format!(
            "{}\n{}",
            include_str!("../src/store/redis/lua/check_lease.lua"),
            include_str!("../src/store/redis/lua/read.lua")
        ),
    )
    .await;
    let seen = monitor(server.port).await;
    let store = RedisStore::builder(&url)
        .prefix(unique_prefix())
        .lease(Duration::from_millis(300))
        .connect()
        .await
        .expect("connect");
    // A thousand sessions produced here, each with a subscriber, and reads of them.
    let mut subs = Vec::new();
    for chunk in (0..1000).collect::<Vec<_>>().chunks(100) {
        let started = futures_util::future::join_all(chunk.iter().map(|i| {
            let store = store.clone();
            async move {
                let key = SessionKey::new(format!("s{i}")).unwrap();
                let Claim::Claimed(epoch) = store.claim(&key, TIMEOUT * 10).await.unwrap() else {
                    panic!("a fresh key is claimable");
                };
                store.start(&key, epoch, head()).await.unwrap();
                store.append(&key, epoch, &[event(1)]).await.unwrap();
                let sub = store.subscribe(&key, epoch).await.unwrap();
                let batch = store.read(&key, epoch, 0, 10).await.unwrap().unwrap();
                assert_eq!(batch.last_seq, 1);
                sub
            }
        }))
        .await;
        subs.extend(started);
    }
    // Two renewal rounds at least (every 100 ms) for all of them.
    let renewals = |seen: &Arc<Mutex<Vec<(String, String)>>>| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s == renew)
            .count()
    };
    eventually("renewals", || renewals(&seen) >= 2000).await;
    let by_script = |script: &str| -> HashSet<String> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s == script)
            .map(|(a, _)| a.clone())
            .collect()
    };
    let (renewing, reading) = (by_script(&renew), by_script(&read));
    assert!(!reading.is_empty(), "no read seen");
    assert!(
        renewing.is_disjoint(&reading),
        "renewals on {renewing:?}, reads on {reading:?}"
    );
    let clients = client_list(&mut c).await;
    let names: HashMap<&str, &str> = clients
        .iter()
        .map(|(a, n, _)| (a.as_str(), n.as_str()))
        .collect();
    assert_eq!(renewing.len(), 1, "renewals on {renewing:?}");
    assert_eq!(reading.len(), 1, "reads on {reading:?}");
    for a in &renewing {
        assert_eq!(names.get(a.as_str()), Some(&REDIS_LEASE_CONNECTION_NAME));
    }
    for a in &reading {
        assert_eq!(names.get(a.as_str()), Some(&REDIS_COMMAND_CONNECTION_NAME));
    }
    // The store's: the command, lease and pub/sub connections (never more than four).
    let ours: Vec<_> = clients
        .iter()
        .filter(|(_, n, _)| !n.starts_with("test-"))
        .collect();
    assert_eq!(ours.len(), 3, "{ours:?}");
    assert!(
        ours.iter().any(|(_, _, cmd)| cmd == "subscribe"),
        "{ours:?}"
    );
    drop(subs);
}

/// A TCP relay to one server whose connections can be stalled: a stalled connection forwards
/// nothing either way until resumed.
struct Relay {
    addr: std::net::SocketAddr,
    conns: Arc<Mutex<Vec<RelayConn>>>,
}

struct RelayConn {
    /// What the client sent, up to 64 KiB.
    sent: Arc<Mutex<Vec<u8>>>,
    stalled: watch::Sender<bool>,
}

impl Relay {
    async fn start(port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<RelayConn>>> = Arc::default();
        tokio::spawn({
            let conns = conns.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
                        continue;
                    };
                    let sent = Arc::new(Mutex::new(Vec::new()));
                    let (stalled, rx) = watch::channel(false);
                    conns.lock().unwrap().push(RelayConn {
                        sent: sent.clone(),
                        stalled,
                    });
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, Some(sent), rx.clone()));
                    tokio::spawn(pump(sr, cw, None, rx));
                }
            }
        });
        Self { addr, conns }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Stalls (or resumes) the connections whose client sent something `pick` selects; returns
    /// how many it picked.
    fn stall(&self, pick: impl Fn(&[u8]) -> bool, stalled: bool) -> usize {
        let conns = self.conns.lock().unwrap();
        let mut n = 0;
        for c in conns.iter() {
            if pick(&c.sent.lock().unwrap()) {
                c.stalled.send_replace(stalled);
                n += 1;
            }
        }
        n
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    log: Option<Arc<Mutex<Vec<u8>>>>,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        if let Some(log) = &log {
            let mut log = log.lock().unwrap();
            let room = (64usize << 10).saturating_sub(log.len()).min(n);
            log.extend_from_slice(&buf[..room]);
        }
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_while_the_command_connection_is_stalled() {
    let Some(url) = shared_url() else { return };
    let port = url::Url::parse(&url)
        .ok()
        .and_then(|u| u.port())
        .expect("a port");
    let relay = Relay::start(port).await;
    let prefix = unique_prefix();
    let lease = Duration::from_millis(300);
    let producer = RedisStore::builder(relay.url())
        .prefix(&prefix)
        .lease(lease)
        .connect()
        .await
        .expect("connect through the relay");
    let other = RedisStore::builder(&url)
        .prefix(&prefix)
        .lease(lease)
        .connect()
        .await
        .expect("connect");
    let key = SessionKey::new("stalled").unwrap();
    let Claim::Claimed(epoch) = producer.claim(&key, TIMEOUT * 10).await.unwrap() else {
        panic!("a fresh key is claimable");
    };
    producer.start(&key, epoch, head()).await.unwrap();
    producer.append(&key, epoch, &[event(1)]).await.unwrap();
    // The connection that carried the calls above (and no renewal of its own) stalls, as it
    // would behind a queue of large replies.
    let commands = |sent: &[u8]| {
        contains(sent, b"EVALSHA") && !contains(sent, REDIS_LEASE_CONNECTION_NAME.as_bytes())
    };
    assert_eq!(relay.stall(commands, true), 1);
    // Five leases later, the session still runs: its lease was renewed all along.
    let stalled_at = tokio::time::Instant::now();
    while stalled_at.elapsed() < lease * 5 {
        let info = other
            .lookup(&key)
            .await
            .unwrap()
            .expect("the session exists");
        assert_eq!(
            info.status,
            Status::Running,
            "after {:?} of stalled commands",
            stalled_at.elapsed()
        );
        tokio::time::sleep(lease / 3).await;
    }
    relay.stall(commands, false);
    producer.append(&key, epoch, &[event(2)]).await.unwrap();
    let info = other
        .lookup(&key)
        .await
        .unwrap()
        .expect("the session exists");
    assert_eq!((info.status, info.last_seq), (Status::Running, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_nobody_uses_any_more_are_forgotten() {
    let Some(url) = shared_url() else { return };
    let store = RedisStore::builder(&url)
        .prefix(unique_prefix())
        .connect()
        .await
        .expect("connect");
    let app = serve_with(store.clone(), |l| l).await;
    // Around the number at which subscribing sweeps (64) and well past it.
    let mut n = 0;
    for sessions in [1usize, 63, 64, 65, 128] {
        let runs = (0..sessions).map(|_| {
            n += 1;
            let path = format!("/tokens?session_id=gone{n}&n=3");
            async move {
                let evs = get(app.addr, &path, None).await.collect().await;
                assert_eq!(datas(&evs), expected_tokens(0..3));
            }
        });
        futures_util::future::join_all(runs.collect::<Vec<_>>()).await;
        within(TIMEOUT, &format!("{sessions} sessions forgotten"), || {
            store.local_session_entries() == 0
        })
        .await;
    }
}
