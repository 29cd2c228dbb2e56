//! What one request costs in memory, counted by a global allocator: a request's `n` samples
//! share its stop strings instead of holding a copy each.
//!
//! One test only: the allocator counts every thread, so nothing else may run beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use minserve_core::detokenize::TokenDecoder;
use minserve_core::scheduler::SchedulerConfig;
use minserve_core::{CacheGeometry, Engine, EngineConfig, Logits, ModelExecutor, Request};
use minserve_core::{RequestEvent, StepBatch};

/// Bytes currently allocated, over the whole process.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Never run: the test only adds requests.
struct Idle;

impl ModelExecutor for Idle {
    type Error = std::io::Error;
    fn cache_geometry(&self) -> CacheGeometry {
        CacheGeometry {
            block_size: 16,
            num_blocks: 64,
        }
    }
    fn vocab_size(&self) -> usize {
        32
    }
    fn execute(&mut self, _: &StepBatch) -> Result<Logits, Self::Error> {
        Err(std::io::Error::other("not run"))
    }
}

struct Bytes;

impl TokenDecoder for Bytes {
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&t| char::from(b'a' + t as u8)).collect()
    }
}

/// Bytes still allocated after adding a request of `n = 128` with `stops` to a fresh engine.
fn bytes_to_add(stops: Vec<String>) -> usize {
    let config = EngineConfig {
        scheduler: SchedulerConfig::default(),
        prefix_caching: true,
        max_model_len: 1024,
    };
    let mut engine = Engine::new(Idle, config, Arc::new(Bytes), vec![0]);
    let (sink, _events) = std::sync::mpsc::channel::<RequestEvent>();
    let mut request = Request::new(vec![1, 2, 3], 4);
    request.stop = stops;
    request.n = 128;
    let request = engine.limits().validate(request).unwrap();

    let before = ALLOCATED.load(Ordering::Relaxed);
    engine.add_request(request, Box::new(sink));
    ALLOCATED.load(Ordering::Relaxed) - before
}

#[test]
fn the_samples_of_a_request_share_its_stop_strings() {
    // 64 stop strings of 1 KiB: 64 KiB per copy.
    let stops: Vec<String> = (0..64).map(|i| format!("{i:04}").repeat(256)).collect();
    let stop_bytes: usize = stops.iter().map(String::len).sum();
    // What the 128 samples cost without stop strings (their sequences and sampling state)
    // is not what this test is about: only what the stop strings add.
    let without = bytes_to_add(Vec::new());
    let added = bytes_to_add(stops) - without;
    // One copy for the request at most; a copy per sample would be 128 of them.
    assert!(
        added < 2 * stop_bytes,
        "the stop strings of a request with n = 128 ({stop_bytes} bytes) added {added} bytes"
    );
}
