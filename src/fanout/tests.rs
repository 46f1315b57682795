//! The fan-out over a real [`MemoryStore`], served through a shared tail as a networked store's
//! would be (the wrapper below only counts, and fails a read when asked).

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::session::Outcome;
use crate::store::memory::tests::running;
use crate::store::test_blocks::block;
use crate::store::{Appended, Claim, ResponseHead, SessionInfo};
use crate::MemoryStore;

const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counts {
    reads: AtomicUsize,
    subscribes: AtomicUsize,
    live_subscriptions: AtomicUsize,
    fail_reads: AtomicUsize,
    /// A sequence number from which every read leaves the events out, while reporting them
    /// (0: none), as a store that breaks its contract would.
    lose: std::sync::atomic::AtomicU64,
}

/// A [`MemoryStore`] read through the shared tail, counting its reads and subscriptions.
#[derive(Clone)]
struct Shared {
    store: MemoryStore,
    counts: Arc<Counts>,
}

struct CountedSub {
    inner: <MemoryStore as Store>::Subscription,
    counts: Arc<Counts>,
}

impl Drop for CountedSub {
    fn drop(&mut self) {
        self.counts.live_subscriptions.fetch_sub(1, SeqCst);
    }
}

impl Subscription for CountedSub {
    async fn changed(&mut self) {
        self.inner.changed().await;
    }
    fn reached(&mut self, seq: u64) {
        self.inner.reached(seq);
    }
}

impl Store for Shared {
    type Subscription = CountedSub;
    const SHARED_TAIL: bool = true;

    async fn claim(&self, key: &SessionKey, lifetime: Duration) -> Result<Claim, StoreError> {
        self.store.claim(key, lifetime).await
    }
    async fn start(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        head: ResponseHead,
    ) -> Result<bool, StoreError> {
        self.store.start(key, epoch, head).await
    }
    async fn release(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        self.store.release(key, epoch).await
    }
    async fn append(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        blocks: &[EventBlock],
    ) -> Result<Appended, StoreError> {
        self.store.append(key, epoch, blocks).await
    }
    async fn finish(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        outcome: Outcome,
    ) -> Result<(), StoreError> {
        self.store.finish(key, epoch, outcome).await
    }
    async fn lookup(&self, key: &SessionKey) -> Result<Option<SessionInfo>, StoreError> {
        self.store.lookup(key).await
    }
    async fn read(
        &self,
        key: &SessionKey,
        epoch: Epoch,
        after: u64,
        max: usize,
    ) -> Result<Option<ReadBatch>, StoreError> {
        self.counts.reads.fetch_add(1, SeqCst);
        let fail = self
            .counts
            .fail_reads
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(StoreError::unavailable("read failed on purpose"));
        }
        let lose = self.counts.lose.load(SeqCst);
        let mut batch = self.store.read(key, epoch, after, max).await?;
        if let Some(batch) = batch.as_mut().filter(|_| lose > 0) {
            batch.blocks = std::mem::take(&mut batch.blocks)
                .into_iter()
                .filter_map(|b| b.slice(..lose))
                .collect();
        }
        Ok(batch)
    }
    async fn subscribe(&self, key: &SessionKey, epoch: Epoch) -> Result<CountedSub, StoreError> {
        self.counts.subscribes.fetch_add(1, SeqCst);
        let inner = self.store.subscribe(key, epoch).await?;
        self.counts.live_subscriptions.fetch_add(1, SeqCst);
        Ok(CountedSub {
            inner,
            counts: self.counts.clone(),
        })
    }
    async fn cancelled(&self, key: &SessionKey, epoch: Epoch) -> Result<(), StoreError> {
        self.store.cancelled(key, epoch).await
    }
    async fn cancel(&self, key: &SessionKey) -> Result<bool, StoreError> {
        self.store.cancel(key).await
    }
}

fn shared(store: MemoryStore) -> Shared {
    Shared {
        store,
        counts: Arc::default(),
    }
}

/// Reads through `f` until it has every event up to `upto`, or the end; returns the position
/// reached and whether the end was seen. Waits for changes as a reader does.
async fn read_to(
    f: &mut Follower<Shared>,
    store: &Shared,
    key: &SessionKey,
    epoch: Epoch,
    mut at: u64,
    upto: u64,
) -> (u64, bool) {
    let run = async {
        loop {
            let page = f
                .read(store, key, epoch, at, crate::limits::READ_PAGE_EVENTS)
                .await
                .expect("read")
                .expect("the session exists");
            if let Some(first) = page.blocks.first() {
                assert_eq!(first.first_seq(), at + 1, "a gap after {at}");
            }
            for b in &page.blocks {
                at = b.last_seq();
            }
            f.reached(at);
            if page.end {
                return (at, true);
            }
            if at >= upto {
                return (at, false);
            }
            if page.blocks.is_empty() || page.caught_up {
                f.changed().await;
            }
        }
    };
    tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the reader hung")
}

/// Lets the driver of a new entry make its first read (the tests' runtime runs one task at a
/// time, and a reader does not wait for that read).
async fn first_shared_read(store: &Shared) {
    tokio::time::timeout(DEADLINE, async {
        while store.counts.reads.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the driver reads");
}

#[tokio::test]
async fn one_subscription_and_one_read_per_change_serve_every_reader_of_a_process() {
    const READERS: usize = 50;
    const CHANGES: u64 = 20;
    let store = shared(MemoryStore::new());
    let (key, epoch) = running(&store.store).await;
    let fanout = Fanout::default();
    let mut followers = Vec::new();
    for _ in 0..READERS {
        followers.push(fanout.follow(&store, &key, epoch, 0).await.unwrap());
    }
    first_shared_read(&store).await;
    assert_eq!(fanout.entries(), 1);
    for n in 1..=CHANGES {
        store.append(&key, epoch, &[block(n, &[8])]).await.unwrap();
        for f in &mut followers {
            assert_eq!(read_to(f, &store, &key, epoch, n - 1, n).await, (n, false));
        }
        // The first reader joined the entry at its first read: one subscription is left.
        assert_eq!(store.counts.live_subscriptions.load(SeqCst), 1);
    }
    store.finish(&key, epoch, Outcome::Completed).await.unwrap();
    for f in &mut followers {
        assert_eq!(
            read_to(f, &store, &key, epoch, CHANGES, u64::MAX).await,
            (CHANGES, true)
        );
    }
    // The first reader's own, until the second made the entry; then the entry's only.
    assert_eq!(store.counts.subscribes.load(SeqCst), 2);
    let reads = store.counts.reads.load(SeqCst) as u64;
    // One read per change, plus the first and the finish; 50 readers without the tail would
    // have made more than a thousand.
    assert!(reads <= CHANGES + 3, "{reads} reads for {CHANGES} changes");
}

#[tokio::test]
async fn the_entry_and_its_subscription_go_when_the_last_reader_goes() {
    let store = shared(MemoryStore::new());
    let (key, epoch) = running(&store.store).await;
    let fanout = Fanout::default();
    let mut one = fanout.follow(&store, &key, epoch, 0).await.unwrap();
    let two = fanout.follow(&store, &key, epoch, 0).await.unwrap();
    // The first reader joins the entry the second made at its next read.
    store.append(&key, epoch, &[block(1, &[4])]).await.unwrap();
    read_to(&mut one, &store, &key, epoch, 0, 1).await;
    assert!(matches!(one, Follower::Shared(_)));
    assert_eq!(store.counts.live_subscriptions.load(SeqCst), 1);
    drop(one);
    assert_eq!(fanout.entries(), 1);
    drop(two);
    assert_eq!((fanout.entries(), fanout.slots()), (0, 0));
    tokio::time::timeout(DEADLINE, async {
        while store.counts.live_subscriptions.load(SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the driver (and its subscription) outlived the last reader");
    // A new reader follows on its own subscription again.
    let three = fanout.follow(&store, &key, epoch, 0).await.unwrap();
    assert!(matches!(three, Follower::Direct(_, Some(_))));
    assert_eq!(store.counts.subscribes.load(SeqCst), 3);
    assert_eq!(fanout.entries(), 0);
}

#[tokio::test]
async fn a_lone_reader_follows_on_its_own_until_a_second_reader_makes_the_entry() {
    let store = shared(MemoryStore::new());
    let (key, epoch) = running(&store.store).await;
    let fanout = Fanout::default();
    let mut lone = fanout.follow(&store, &key, epoch, 0).await.unwrap();
    assert!(matches!(lone, Follower::Direct(_, Some(_))));
    assert_eq!(fanout.entries(), 0, "no entry, no driver for a lone reader");
    store
        .append(&key, epoch, &[block(1, &[4; 3])])
        .await
        .unwrap();
    assert_eq!(
        read_to(&mut lone, &store, &key, epoch, 0, 3).await,
        (3, false)
    );
    assert_eq!(store.counts.reads.load(SeqCst), 1, "its own read only");
    // A second reader, behind the first, makes the entry; the first joins it at its next read,
    // and drops its own subscription.
    let mut second = fanout.follow(&store, &key, epoch, 1).await.unwrap();
    assert_eq!(fanout.entries(), 1);
    assert_eq!(store.counts.live_subscriptions.load(SeqCst), 2);
    store
        .append(&key, epoch, &[block(4, &[4; 2])])
        .await
        .unwrap();
    assert_eq!(
        read_to(&mut lone, &store, &key, epoch, 3, 5).await,
        (5, false)
    );
    assert!(matches!(lone, Follower::Shared(_)));
    assert_eq!(store.counts.live_subscriptions.load(SeqCst), 1);
    assert_eq!(
        read_to(&mut second, &store, &key, epoch, 1, 5).await,
        (5, false)
    );
    store.finish(&key, epoch, Outcome::Completed).await.unwrap();
    for f in [&mut lone, &mut second] {
        assert_eq!(
            read_to(f, &store, &key, epoch, 5, u64::MAX).await,
            (5, true)
        );
    }
    // What the registry keeps of a session goes with its last reader.
    assert_eq!(fanout.slots(), 1);
    drop(lone);
    assert_eq!(fanout.slots(), 1, "the second reader is still here");
    drop(second);
    assert_eq!(fanout.slots(), 0);
    for n in 0..200 {
        let key = SessionKey::new(format!("other-{n}")).unwrap();
        let one = fanout.follow(&store, &key, epoch, 0).await.unwrap();
        let two = fanout.follow(&store, &key, epoch, 0).await.unwrap();
        assert_eq!(fanout.slots(), 1);
        drop((two, one));
    }
    assert_eq!(fanout.slots(), 0, "{} slots kept", fanout.slots());
}

#[tokio::test]
async fn readers_end_at_the_end_of_a_finished_session_at_every_tail_size() {
    let page = crate::limits::TAIL_PAGE_EVENTS as u64;
    let cap = crate::limits::TAIL_CAPACITY_EVENTS as u64;
    let mut sizes = Vec::new();
    for n in [page, cap] {
        sizes.extend([0, 1, n - 1, n, n + 1, 2 * n]);
    }
    for events in sizes {
        let store = shared(MemoryStore::new());
        let (key, epoch) = running(&store.store).await;
        let fanout = Fanout::default();
        // One reader from the start, following live; one joining at the end of what is stored.
        let mut live = fanout.follow(&store, &key, epoch, 0).await.unwrap();
        let mut next = 1;
        while next <= events {
            let len = (events - next + 1).min(100);
            let b = block(next, &vec![4; len as usize]);
            store.append(&key, epoch, &[b]).await.unwrap();
            next += len;
        }
        store.finish(&key, epoch, Outcome::Completed).await.unwrap();
        assert_eq!(
            read_to(&mut live, &store, &key, epoch, 0, u64::MAX).await,
            (events, true),
            "{events} events, read live"
        );
        for from in [0, events / 2, events] {
            let mut late = fanout.follow(&store, &key, epoch, from).await.unwrap();
            assert_eq!(
                read_to(&mut late, &store, &key, epoch, from, u64::MAX).await,
                (events, true),
                "{events} events, read from {from}"
            );
        }
    }
}

#[tokio::test]
async fn a_reader_joining_behind_keeps_what_it_needs_past_the_soft_limit() {
    let cap = crate::limits::TAIL_CAPACITY_EVENTS as u64;
    let limit = (cap + 1000) as usize;
    let store = shared(MemoryStore::builder().max_events_per_session(limit).build());
    let (key, epoch) = running(&store.store).await;
    let fanout = Fanout::default();
    let mut ahead = fanout.follow(&store, &key, epoch, 0).await.unwrap();
    // A second reader makes the entry, which the first joins; it reads along.
    let mut along = fanout.follow(&store, &key, epoch, 0).await.unwrap();
    let mut next = 1;
    let mut append = |n: u64| {
        let blocks: Vec<_> = (0..n).map(|i| block(next + i, &[4])).collect::<Vec<_>>();
        next += n;
        blocks
    };
    // More than the tail holds, read by the first reader to the end.
    let first = append(cap + 500);
    store.append(&key, epoch, &first).await.unwrap();
    assert_eq!(
        read_to(&mut ahead, &store, &key, epoch, 0, cap + 500)
            .await
            .0,
        cap + 500
    );
    // One more change, so that the store is told where that reader is.
    let one = append(1);
    store.append(&key, epoch, &one).await.unwrap();
    read_to(&mut ahead, &store, &key, epoch, cap + 500, cap + 501).await;
    read_to(&mut along, &store, &key, epoch, 0, cap + 501).await;
    read_to(&mut ahead, &store, &key, epoch, cap + 501, cap + 501).await;
    assert!(matches!(ahead, Follower::Shared(_)));
    // One more change, so that the entry tells the store where both readers are.
    let one = append(1);
    store.append(&key, epoch, &one).await.unwrap();
    read_to(&mut ahead, &store, &key, epoch, cap + 501, cap + 502).await;
    read_to(&mut along, &store, &key, epoch, cap + 501, cap + 502).await;
    // A reader joins at the start, older than the tail; then the session grows past its soft
    // limit. The store keeps what the late reader needs.
    let mut behind = fanout.follow(&store, &key, epoch, 0).await.unwrap();
    let more = append(2 * cap);
    store.append(&key, epoch, &more).await.unwrap();
    let total = next - 1;
    let (at, _) = read_to(&mut behind, &store, &key, epoch, 0, total).await;
    assert_eq!(at, total, "the late reader read every event, with no gap");
}

#[tokio::test]
async fn a_failed_shared_read_sends_readers_to_the_store() {
    let store = shared(MemoryStore::new());
    let (key, epoch) = running(&store.store).await;
    let fanout = Fanout::default();
    let mut f = fanout.follow(&store, &key, epoch, 0).await.unwrap();
    // A second reader makes the entry; the first joins it at its first read.
    let _companion = fanout.follow(&store, &key, epoch, 0).await.unwrap();
    first_shared_read(&store).await;
    store.append(&key, epoch, &[block(1, &[4])]).await.unwrap();
    assert_eq!(read_to(&mut f, &store, &key, epoch, 0, 1).await, (1, false));
    assert!(matches!(f, Follower::Shared(_)));
    // The driver's next read fails; the reader is woken and reads the store itself.
    store.counts.fail_reads.store(1, SeqCst);
    store.append(&key, epoch, &[block(2, &[4])]).await.unwrap();
    assert_eq!(read_to(&mut f, &store, &key, epoch, 1, 2).await, (2, false));
    store.finish(&key, epoch, Outcome::Completed).await.unwrap();
    assert_eq!(
        read_to(&mut f, &store, &key, epoch, 2, u64::MAX).await,
        (2, true)
    );
}

#[test]
fn a_store_that_loses_an_event_it_reports_does_not_make_the_fan_out_spin() {
    // On a runtime of one thread, a driver that read again at once, forever, would starve
    // every other task, timers included: the test's own deadline is therefore a thread's.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = shared(MemoryStore::new());
            store.counts.lose.store(3, SeqCst);
            let (key, epoch) = running(&store.store).await;
            let fanout = Fanout::default();
            let mut f = fanout.follow(&store, &key, epoch, 0).await.unwrap();
            let _companion = fanout.follow(&store, &key, epoch, 0).await.unwrap();
            store
                .append(&key, epoch, &[block(1, &[4; 5])])
                .await
                .unwrap();
            // The reader gets what continues its position, then waits (a timer can fire).
            let page = f.read(&store, &key, epoch, 0, 100).await.unwrap().unwrap();
            let _ = tokio::time::timeout(Duration::from_millis(200), f.changed()).await;
            let reads = store.counts.reads.load(SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let later = store.counts.reads.load(SeqCst);
            let _ = done.send((page.blocks.len(), reads, later));
        });
    });
    let (_, reads, later) = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("the runtime was starved");
    assert!(
        later - reads <= 1,
        "{} reads in 200 ms of quiet",
        later - reads
    );
}

/// Where a reader's stream stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// It has every event up to this one, and waits for more.
    At(u64),
    /// It has every event of the finished session, up to this one.
    End(u64),
    /// Its next event was evicted: at this position, the page it was given starts at `next`.
    Evicted { at: u64, next: u64 },
}

/// Reads through `f` as the layer's reader does, from `at` until it has every event up to
/// `upto`, the end or a page that skips past its position (which the layer answers with the
/// eviction comment and the end of the response). Every event it is given comes once, in order.
async fn read_until(
    f: &mut Follower<Shared>,
    store: &Shared,
    key: &SessionKey,
    epoch: Epoch,
    mut at: u64,
    upto: u64,
) -> Stop {
    let run = async {
        loop {
            let page = f
                .read(store, key, epoch, at, crate::limits::READ_PAGE_EVENTS)
                .await
                .expect("read")
                .expect("the session exists");
            let next = page
                .blocks
                .first()
                .map_or(page.first_seq, |b| b.first_seq());
            if next > at + 1 {
                return Stop::Evicted { at, next };
            }
            for b in &page.blocks {
                assert_eq!(b.first_seq(), at + 1, "a gap or a repeat after {at}");
                at = b.last_seq();
            }
            f.reached(at);
            if page.end {
                return Stop::End(at);
            }
            if at >= upto {
                return Stop::At(at);
            }
            if page.blocks.is_empty() || page.caught_up {
                f.changed().await;
            }
        }
    };
    tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the reader hung")
}

#[tokio::test]
async fn after_trimming_outruns_the_tail_it_restarts_and_serves_the_live_edge_with_one_read_per_change(
) {
    const BEHIND: usize = 10;
    const LIVE: usize = 50;
    const CHANGES: u64 = 20;
    // Events of 10 bytes; the session keeps 100 of them at most, whoever needs them.
    const SIZE: usize = 10;
    const KEPT: u64 = 100;
    let bytes = KEPT as usize * SIZE;
    let store = shared(
        MemoryStore::builder()
            .max_bytes_per_session(bytes)
            .hard_max_bytes_per_session(bytes)
            .build(),
    );
    let (key, epoch) = running(&store.store).await;
    let fanout = Fanout::default();
    let mut behind = Vec::new();
    for _ in 0..BEHIND {
        behind.push(fanout.follow(&store, &key, epoch, 0).await.unwrap());
    }
    first_shared_read(&store).await;
    store
        .append(&key, epoch, &[block(1, &[SIZE; 5])])
        .await
        .unwrap();
    for f in &mut behind {
        assert_eq!(read_until(f, &store, &key, epoch, 0, 5).await, Stop::At(5));
    }
    // A burst past the hard limit before the shared tail reads it: events after 5 are evicted
    // unread, by the tail and by every reader.
    let burst = 3 * KEPT;
    store
        .append(&key, epoch, &[block(6, &vec![SIZE; burst as usize])])
        .await
        .unwrap();
    let head = 5 + burst;
    let oldest = head - KEPT + 1;
    let direct = store.store.read(&key, epoch, 5, 1).await.unwrap().unwrap();
    assert_eq!(
        direct.blocks[0].first_seq(),
        oldest,
        "the store's own answer"
    );
    // Every reader behind the gap gets the store's answer: the page after its position starts
    // at the oldest retained event, and it ends there (the layer then ends its response). One
    // of them stalls before it reads again, and keeps the session's entry.
    let mut stalled = behind.pop().expect("a reader");
    for f in &mut behind {
        assert_eq!(
            read_until(f, &store, &key, epoch, 5, u64::MAX).await,
            Stop::Evicted {
                at: 5,
                next: oldest
            }
        );
    }
    drop(behind);
    // Readers at the live edge, some at the oldest retained event: served from the tail again,
    // one store read per change.
    let mut live = Vec::new();
    for i in 0..LIVE {
        let from = if i % 5 == 0 { oldest - 1 } else { head };
        live.push((
            from,
            fanout.follow(&store, &key, epoch, from).await.unwrap(),
        ));
    }
    assert_eq!(fanout.entries(), 1);
    for (from, f) in &mut live {
        assert_eq!(
            read_until(f, &store, &key, epoch, *from, head).await,
            Stop::At(head)
        );
    }
    let reads = store.counts.reads.load(SeqCst) as u64;
    for n in head + 1..=head + CHANGES {
        store
            .append(&key, epoch, &[block(n, &[SIZE])])
            .await
            .unwrap();
        for (_, f) in &mut live {
            assert_eq!(
                read_until(f, &store, &key, epoch, n - 1, n).await,
                Stop::At(n)
            );
        }
    }
    let per_change = store.counts.reads.load(SeqCst) as u64 - reads;
    assert!(
        per_change <= CHANGES + 2,
        "{per_change} reads for {CHANGES} changes and {LIVE} readers"
    );
    store.finish(&key, epoch, Outcome::Completed).await.unwrap();
    let head = head + CHANGES;
    for (_, f) in &mut live {
        assert_eq!(
            read_until(f, &store, &key, epoch, head, u64::MAX).await,
            Stop::End(head)
        );
    }
    assert_eq!(
        read_until(&mut stalled, &store, &key, epoch, 5, u64::MAX).await,
        Stop::Evicted {
            at: 5,
            next: head - KEPT + 1
        },
        "the stalled reader"
    );
}

#[tokio::test]
async fn readers_inside_and_behind_the_tail_get_what_it_holds_then_the_gap_after_trimming() {
    // Readers at every position of a tail that trimming then outruns, and one that comes back
    // at the oldest retained event after each burst: none skips an event silently, none gets
    // one twice, and the tail recovers every time.
    const SIZE: usize = 10;
    const KEPT: u64 = 50;
    let bytes = KEPT as usize * SIZE;
    let store = shared(
        MemoryStore::builder()
            .max_bytes_per_session(bytes)
            .hard_max_bytes_per_session(bytes)
            .build(),
    );
    let (key, epoch) = running(&store.store).await;
    let fanout = Fanout::default();
    let mut along = fanout.follow(&store, &key, epoch, 0).await.unwrap();
    let mut inside = Vec::new();
    for from in 0..=10 {
        inside.push((
            from,
            fanout.follow(&store, &key, epoch, from).await.unwrap(),
        ));
    }
    first_shared_read(&store).await;
    store
        .append(&key, epoch, &[block(1, &[SIZE; 10])])
        .await
        .unwrap();
    assert_eq!(
        read_until(&mut along, &store, &key, epoch, 0, 10).await,
        Stop::At(10)
    );
    let mut head = 10;
    for burst in 0..3 {
        let events = 2 * KEPT;
        store
            .append(
                &key,
                epoch,
                &[block(head + 1, &vec![SIZE; events as usize])],
            )
            .await
            .unwrap();
        let oldest = head + events - KEPT + 1;
        if burst == 0 {
            // What the tail still holds may be served before the gap; never past it.
            for (from, f) in &mut inside {
                let stop = read_until(f, &store, &key, epoch, *from, u64::MAX).await;
                assert!(
                    matches!(stop, Stop::Evicted { at, next } if (at == *from || at == 10) && next == oldest),
                    "a reader from {from}: {stop:?}"
                );
            }
        }
        assert_eq!(
            read_until(&mut along, &store, &key, epoch, head, u64::MAX).await,
            Stop::Evicted {
                at: head,
                next: oldest
            }
        );
        // The layer ends that reader's response; its client comes back at the oldest event
        // retained, and reads on from the tail.
        along = fanout
            .follow(&store, &key, epoch, oldest - 1)
            .await
            .unwrap();
        head += events;
        assert_eq!(
            read_until(&mut along, &store, &key, epoch, oldest - 1, head).await,
            Stop::At(head)
        );
        assert!(matches!(along, Follower::Shared(_)));
    }
}

/// `total` bytes of events of `size` bytes each, the last one shorter if `size` does not
/// divide `total`.
fn sizes_of(total: usize, size: usize) -> Vec<usize> {
    let mut sizes = vec![size; total / size];
    if !total.is_multiple_of(size) {
        sizes.push(total % size);
    }
    sizes
}

#[tokio::test]
async fn readers_get_every_event_once_around_the_tails_byte_capacity() {
    let n = crate::limits::TAIL_CAPACITY_BYTES;
    // Events of an eighth of the bound, some appended one by one, some in a block of several.
    let size = n / 8;
    for total in [0, 1, n - 1, n, n + 1, 2 * n] {
        let sizes = sizes_of(total, size);
        let events = sizes.len() as u64;
        let store = shared(MemoryStore::new());
        let (key, epoch) = running(&store.store).await;
        let fanout = Fanout::default();
        let mut live = fanout.follow(&store, &key, epoch, 0).await.unwrap();
        let mut along = fanout.follow(&store, &key, epoch, 0).await.unwrap();
        first_shared_read(&store).await;
        let mut next = 1;
        for chunk in sizes.chunks(3) {
            store
                .append(&key, epoch, &[block(next, chunk)])
                .await
                .unwrap();
            next += chunk.len() as u64;
            assert_eq!(
                read_until(
                    &mut live,
                    &store,
                    &key,
                    epoch,
                    next - 1 - chunk.len() as u64,
                    next - 1
                )
                .await,
                Stop::At(next - 1),
                "{total} bytes"
            );
            let (held, bytes) = fanout.tail_held(&key, epoch).expect("an entry");
            assert!(
                held <= 1 || bytes <= n,
                "{held} events of {bytes} bytes held"
            );
        }
        store.finish(&key, epoch, Outcome::Completed).await.unwrap();
        assert_eq!(
            read_until(&mut live, &store, &key, epoch, events, u64::MAX).await,
            Stop::End(events),
            "{total} bytes"
        );
        assert_eq!(
            read_until(&mut along, &store, &key, epoch, 0, u64::MAX).await,
            Stop::End(events),
            "{total} bytes, read after"
        );
        for from in [0, events / 2, events.saturating_sub(1), events] {
            let mut late = fanout.follow(&store, &key, epoch, from).await.unwrap();
            assert_eq!(
                read_until(&mut late, &store, &key, epoch, from, u64::MAX).await,
                Stop::End(events),
                "{total} bytes, read from {from}"
            );
        }
    }
}
