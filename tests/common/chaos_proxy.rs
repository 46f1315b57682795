//! A TCP proxy that cuts connections: it forwards every client connection to a backend (taking
//! the backends in turn, one per new connection) and closes the connection after a random number
//! of bytes from the server. The random numbers come from a seed, printed at start, so that a
//! failing run can be replayed with `CHAOS_SEED=<seed>`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// SplitMix64: small, fast and good enough to pick cut offsets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `range` (which must not be empty).
    pub fn in_range(&mut self, range: &Range<usize>) -> usize {
        let span = (range.end - range.start) as u64;
        range.start + (self.next_u64() % span) as usize
    }
}

/// The seed of this run: `CHAOS_SEED` if set, else one drawn from the clock. Printed either way.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Rng::new(t.as_nanos() as u64 ^ u64::from(std::process::id())).next_u64()
        });
    eprintln!("{test}: CHAOS_SEED={seed}");
    seed
}

#[derive(Debug, Default)]
struct Stats {
    connections: AtomicUsize,
    cuts: AtomicUsize,
    silent_closes: AtomicUsize,
    bytes_down: AtomicU64,
}

/// A running proxy; it stops when dropped.
pub struct ChaosProxy {
    pub addr: SocketAddr,
    pub seed: u64,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl ChaosProxy {
    /// Listens on `127.0.0.1:0`. Connection `i` goes to `backends[i % backends.len()]` and is cut
    /// after a number of server bytes drawn from `cut_after` (a connection whose response is
    /// shorter than that ends normally). Cut offsets are drawn in connection order from `seed`.
    pub async fn start(backends: Vec<SocketAddr>, seed: u64, cut_after: Range<usize>) -> Self {
        assert!(!backends.is_empty() && !cut_after.is_empty());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn({
            let stats = stats.clone();
            async move {
                let mut rng = Rng::new(seed);
                let mut n = 0usize;
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let backend = backends[n % backends.len()];
                    let budget = rng.in_range(&cut_after);
                    n += 1;
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(pipe(client, backend, budget, stats.clone()));
                }
            }
        });
        Self {
            addr,
            seed,
            stats,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::Relaxed)
    }

    /// Connections cut so far (the server had more to send than the connection's budget).
    pub fn cuts(&self) -> usize {
        self.stats.cuts.load(Ordering::Relaxed)
    }

    /// Connections the server closed without sending a single byte (not even a response head).
    pub fn silent_closes(&self) -> usize {
        self.stats.silent_closes.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from the servers to the clients.
    pub fn bytes_down(&self) -> u64 {
        self.stats.bytes_down.load(Ordering::Relaxed)
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards one connection; after `budget` bytes from the server both sides are closed.
async fn pipe(client: TcpStream, backend: SocketAddr, budget: usize, stats: Arc<Stats>) {
    let Ok(server) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    // Client to server: requests are small and never cut.
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
        let _ = server_tx.shutdown().await;
    });
    let mut left = budget;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match server_rx.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if left == budget && !up.is_finished() {
                    stats.silent_closes.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            Ok(n) => n,
        };
        let take = n.min(left);
        if client_tx.write_all(&buf[..take]).await.is_err() {
            break;
        }
        stats.bytes_down.fetch_add(take as u64, Ordering::Relaxed);
        left -= take;
        if take < n || left == 0 {
            stats.cuts.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    // Dropping every half closes both connections: the client sees its body end mid-stream and
    // the server sees its client go away.
    up.abort();
}
