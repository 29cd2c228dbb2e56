//! The live feed: the engine's step and request records for whoever watches a running server
//! (the dashboard, `GET /dashboard`), in the schema of the trace file (`trace.rs`), plus a map
//! of the KV pool.
//!
//! **Free when nobody watches.** The engine asks [`LiveFeed::is_watched`] once per step, one
//! relaxed atomic load; only while a [`LiveWatch`] exists does it build records and publish
//! them. Publishing is a push into a bounded ring under a mutex: the engine thread never waits
//! for a watcher, never serializes anything, and a watcher that falls behind the ring loses
//! the oldest records (it is told how many). Watchers read the ring on their own threads (the
//! server's runtime) at their own pace.
//!
//! **The block map** ([`BlockMap`]) walks the whole pool, so the engine publishes one at most
//! every [`BLOCK_MAP_INTERVAL`], and once more when it goes idle or a watcher arrives (so an
//! idle server still shows its cache).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;

use crate::block_manager::{BlockManager, BlockState};
use crate::scheduler::Scheduler;
use crate::sequence::RELEASED_BLOCK;
use crate::trace::{RecordClock, TraceHeader, TraceRecord};

/// Records the ring keeps for watchers: several seconds of steps of a busy engine between two
/// reads of a watcher that reads ten times a second.
pub const LIVE_RECORDS: usize = 4096;

/// The least time between two block maps published during steps.
pub const BLOCK_MAP_INTERVAL: Duration = Duration::from_millis(100);

/// A block map cell that no sequence holds and that holds no prefix.
pub const BLOCK_FREE: i64 = 0;
/// A free block that still holds a registered prefix (a prefix-cache hit waiting to happen).
pub const BLOCK_CACHED: i64 = -1;
/// A block held by more than one sequence (a shared prefix, or the prompt of forked samples).
pub const BLOCK_SHARED: i64 = -2;

/// The KV pool, block by block, as runs of equal cells: `[cell, count]` with `cell` a
/// sequence id (> 0: the one sequence holding the block) or [`BLOCK_FREE`], [`BLOCK_CACHED`],
/// [`BLOCK_SHARED`]. A fresh pool hands out blocks in order, so runs stay few.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockMap {
    /// Steps the engine had completed when the map was taken.
    pub step: u64,
    /// When, in ms since the feed started.
    pub t_ms: f64,
    pub num_blocks: usize,
    pub runs: Vec<(i64, u32)>,
}

impl BlockMap {
    /// The pool as `scheduler` holds it now.
    pub fn of(scheduler: &Scheduler, step: u64, t_ms: f64) -> Self {
        let blocks = scheduler.blocks();
        let mut holder = vec![BLOCK_FREE; blocks.num_blocks()];
        for seq in scheduler.running() {
            for &block in seq.block_tables.iter().flatten() {
                if block != RELEASED_BLOCK {
                    holder[block as usize] = seq.id as i64;
                }
            }
        }
        Self {
            step,
            t_ms,
            num_blocks: blocks.num_blocks(),
            runs: runs(blocks, &holder),
        }
    }

    /// Blocks in each kind of cell: (free, cached, used), used counting shared ones.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for &(cell, n) in &self.runs {
            let n = n as usize;
            match cell {
                BLOCK_FREE => counts.0 += n,
                BLOCK_CACHED => counts.1 += n,
                _ => counts.2 += n,
            }
        }
        counts
    }
}

/// Each block's cell from its state and the sequence found holding it, run-length encoded.
fn runs(blocks: &BlockManager, holder: &[i64]) -> Vec<(i64, u32)> {
    let mut runs: Vec<(i64, u32)> = Vec::new();
    for (state, &seq) in blocks.block_states().zip(holder) {
        let cell = match state {
            BlockState::Free => BLOCK_FREE,
            BlockState::Cached => BLOCK_CACHED,
            BlockState::Used(1) if seq > 0 => seq,
            BlockState::Used(_) => BLOCK_SHARED,
        };
        match runs.last_mut() {
            Some((last, count)) if *last == cell => *count += 1,
            _ => runs.push((cell, 1)),
        }
    }
    runs
}

/// What the engine publishes and watchers read.
pub struct LiveFeed {
    watchers: AtomicUsize,
    /// The pool's shape and the feed's start (every `t_ms` counts from it).
    header: TraceHeader,
    clock: RecordClock,
    ring: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    records: VecDeque<TraceRecord>,
    /// The index, counted since the feed started, of `records[0]`.
    first: u64,
    block_map: Option<Arc<BlockMap>>,
    /// Bumped with every block map published.
    block_map_version: u64,
}

impl LiveFeed {
    pub fn new(blocks: &BlockManager, host_blocks: usize) -> Self {
        Self {
            watchers: AtomicUsize::new(0),
            header: TraceHeader::starting_now(blocks, host_blocks),
            clock: RecordClock::starting_now(),
            ring: Mutex::new(Ring::default()),
        }
    }

    /// Whether anyone watches: the one thing the engine asks of the feed when nobody does.
    pub fn is_watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }

    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    pub fn clock(&self) -> &RecordClock {
        &self.clock
    }

    /// Starts watching: records published from now on are kept for the returned watch, until
    /// it is dropped.
    pub fn watch(self: &Arc<Self>) -> LiveWatch {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        let ring = self.lock();
        LiveWatch {
            feed: self.clone(),
            next: ring.first + ring.records.len() as u64,
            block_map_version: 0,
        }
    }

    /// Appends a record, dropping the oldest when the ring is full.
    pub fn publish(&self, record: TraceRecord) {
        let mut ring = self.lock();
        if ring.records.len() == LIVE_RECORDS {
            ring.records.pop_front();
            ring.first += 1;
        }
        ring.records.push_back(record);
    }

    /// Records and block maps published since the feed started.
    pub fn published(&self) -> (u64, u64) {
        let ring = self.lock();
        (
            ring.first + ring.records.len() as u64,
            ring.block_map_version,
        )
    }

    /// Replaces the block map watchers see.
    pub fn publish_block_map(&self, map: BlockMap) {
        let mut ring = self.lock();
        ring.block_map = Some(Arc::new(map));
        ring.block_map_version += 1;
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One watcher of a [`LiveFeed`]; the engine publishes while at least one exists.
pub struct LiveWatch {
    feed: Arc<LiveFeed>,
    /// The index of the next record to read.
    next: u64,
    block_map_version: u64,
}

/// What a watcher has not seen yet.
#[derive(Debug, Default)]
pub struct LiveUpdate {
    pub records: Vec<TraceRecord>,
    /// Records published since the last read that the ring no longer held.
    pub missed: u64,
    /// The block map, if a new one was published since the last read.
    pub block_map: Option<Arc<BlockMap>>,
}

impl LiveUpdate {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.missed == 0 && self.block_map.is_none()
    }
}

impl LiveWatch {
    pub fn feed(&self) -> &Arc<LiveFeed> {
        &self.feed
    }

    /// Everything published since the last read (the records cloned out under the lock; the
    /// caller serializes them on its own time).
    pub fn read(&mut self) -> LiveUpdate {
        let ring = self.feed.lock();
        let start = self.next.max(ring.first);
        let missed = start - self.next;
        let records = ring
            .records
            .range((start - ring.first) as usize..)
            .cloned()
            .collect();
        self.next = ring.first + ring.records.len() as u64;
        let block_map = (ring.block_map_version != self.block_map_version)
            .then(|| ring.block_map.clone())
            .flatten();
        self.block_map_version = ring.block_map_version;
        LiveUpdate {
            records,
            missed,
            block_map,
        }
    }
}

impl Drop for LiveWatch {
    fn drop(&mut self) {
        self.feed.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{RequestEventKind, RequestRecord};

    fn record(request: u64) -> TraceRecord {
        TraceRecord::Request(RequestRecord::new(RequestEventKind::Arrived, request, None))
    }

    fn feed() -> Arc<LiveFeed> {
        Arc::new(LiveFeed::new(&BlockManager::new(8, 16, true), 0))
    }

    #[test]
    fn watchers_are_counted_while_they_live() {
        let feed = feed();
        assert!(!feed.is_watched());
        let a = feed.watch();
        let b = feed.watch();
        assert_eq!(feed.watchers(), 2);
        drop(a);
        assert!(feed.is_watched());
        drop(b);
        assert!(!feed.is_watched());
    }

    #[test]
    fn a_watcher_reads_what_came_after_it_once() {
        let feed = feed();
        feed.publish(record(1));
        let mut watch = feed.watch();
        feed.publish(record(2));
        feed.publish(record(3));
        let update = watch.read();
        assert_eq!(update.records, vec![record(2), record(3)]);
        assert_eq!(update.missed, 0);
        assert!(update.block_map.is_none());
        assert!(watch.read().is_empty());
    }

    #[test]
    fn a_slow_watcher_is_told_what_it_missed() {
        let feed = feed();
        let mut watch = feed.watch();
        let extra = 10;
        for i in 0..LIVE_RECORDS as u64 + extra {
            feed.publish(record(i));
        }
        let update = watch.read();
        assert_eq!(update.missed, extra);
        assert_eq!(update.records.len(), LIVE_RECORDS);
        assert_eq!(update.records[0], record(extra));
    }

    #[test]
    fn the_latest_block_map_is_read_once() {
        let feed = feed();
        let mut watch = feed.watch();
        let map = |step| BlockMap {
            step,
            t_ms: 0.0,
            num_blocks: 8,
            runs: vec![(BLOCK_FREE, 8)],
        };
        feed.publish_block_map(map(1));
        feed.publish_block_map(map(2));
        assert_eq!(watch.read().block_map.unwrap().step, 2);
        assert!(watch.read().block_map.is_none());
        let mut late = feed.watch();
        assert_eq!(
            late.read().block_map.unwrap().step,
            2,
            "a new watcher sees the map"
        );
    }
}
