//! The one thread pool our CPU kernels run on.
//!
//! A forward pass is a few hundred short parallel sections (every matmul and attention of every
//! layer), each tens of microseconds to a few milliseconds long. Waking threads through the OS
//! for each would cost more than the sections; so between sections the workers spin for a
//! short while, and park only when the engine goes idle.
//!
//! Why not candle's pool: its caller spins until every worker has *acknowledged* each section.
//! On a loaded machine (a build, another server) a descheduled worker then stalls the caller for
//! a whole scheduler time slice per section: a decode step measured 7x slower. Here the caller
//! and the workers claim chunks of items from one shared cursor and the caller only waits for
//! the *items*: a worker that never got the CPU is simply not waited for. The caller yields
//! while it waits, so it never holds a core a late worker needs.

use std::any::Any;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking: longer than the gaps between the sections of
/// one step (a few microseconds of glue code), shorter than the engine's pauses between steps.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(200);

/// Spins of a waiting caller between two `yield_now` calls.
const SPINS_BEFORE_YIELD: u32 = 256;

type Trampoline = unsafe fn(*const (), std::ops::Range<usize>);

struct Shared {
    /// Bumped for every section: wakes the workers.
    generation: AtomicUsize,
    /// Whether the current section's job may still be entered.
    open: AtomicBool,
    /// Workers inside the current job; the caller waits for zero before its closure dies.
    active: AtomicUsize,
    job_data: AtomicPtr<()>,
    job_call: AtomicUsize,
    num_items: AtomicUsize,
    chunk: AtomicUsize,
    cursor: AtomicUsize,
    done: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    panicked: AtomicBool,
}

impl Shared {
    /// Claims and runs chunks of the current job until none is left.
    ///
    /// # Safety
    /// Only while the job is open and its closure alive (the caller, or a worker counted in
    /// `active` that found `open` set).
    unsafe fn run_items(&self) {
        let n = self.num_items.load(SeqCst);
        let chunk = self.chunk.load(SeqCst);
        let data = self.job_data.load(SeqCst) as *const ();
        let call: Trampoline = std::mem::transmute::<usize, Trampoline>(self.job_call.load(SeqCst));
        loop {
            let start = self.cursor.fetch_add(chunk, SeqCst);
            if start >= n {
                return;
            }
            let end = n.min(start + chunk);
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(data, start..end)));
            if let Err(payload) = outcome {
                self.panic.lock().unwrap().get_or_insert(payload);
                self.panicked.store(true, SeqCst);
            }
            self.done.fetch_add(end - start, SeqCst);
        }
    }
}

pub struct Pool {
    shared: &'static Shared,
    workers: Vec<Thread>,
    /// One section at a time (the engine thread is the only caller in practice).
    call: Mutex<()>,
}

thread_local! {
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// The process-wide pool: one thread per core, the calling thread being one of them.
/// `MINSERVE_NUM_THREADS` overrides the count.
pub fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("MINSERVE_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        Pool::new(threads - 1)
    })
}

impl Pool {
    fn new(num_workers: usize) -> Self {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            generation: AtomicUsize::new(0),
            open: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            job_data: AtomicPtr::new(std::ptr::null_mut()),
            job_call: AtomicUsize::new(0),
            num_items: AtomicUsize::new(0),
            chunk: AtomicUsize::new(1),
            cursor: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
            panicked: AtomicBool::new(false),
        }));
        let workers = (0..num_workers)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("minserve-pool-{i}"))
                    .spawn(move || worker(shared))
                    .expect("spawning a pool thread")
                    .thread()
                    .clone()
            })
            .collect();
        Self {
            shared,
            workers,
            call: Mutex::new(()),
        }
    }

    /// Threads that run a section, the caller included.
    pub fn num_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f` on disjoint ranges covering `0..num_items`, on every thread of the pool, and
    /// returns when all items are done. A panic in `f` is re-raised here once all items ran.
    pub fn execute_chunked<F: Fn(std::ops::Range<usize>) + Sync>(&self, num_items: usize, f: F) {
        if num_items == 0 {
            return;
        }
        // From inside a section (or with no workers), run inline: a nested section would wait
        // for itself.
        if self.workers.is_empty() || IN_POOL.with(Cell::get) {
            f(0..num_items);
            return;
        }
        let _one_at_a_time = self.call.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.shared;
        unsafe fn trampoline<F: Fn(std::ops::Range<usize>)>(
            data: *const (),
            range: std::ops::Range<usize>,
        ) {
            (*(data as *const F))(range)
        }
        s.job_data.store(&f as *const F as *mut (), SeqCst);
        s.job_call
            .store(trampoline::<F> as Trampoline as usize, SeqCst);
        s.num_items.store(num_items, SeqCst);
        // About 8 grabs per thread: few enough for little cursor traffic, many enough that
        // a slow thread's last chunk is short.
        s.chunk
            .store(num_items.div_ceil(8 * self.num_threads()).max(1), SeqCst);
        s.cursor.store(0, SeqCst);
        s.done.store(0, SeqCst);
        s.open.store(true, SeqCst);
        s.generation.fetch_add(1, SeqCst);
        for worker in &self.workers {
            worker.unpark();
        }

        IN_POOL.with(|c| c.set(true));
        // SAFETY: the job is open and `f` lives until this function returns.
        unsafe { s.run_items() };
        IN_POOL.with(|c| c.set(false));

        let mut spins = 0u32;
        while s.done.load(SeqCst) < num_items {
            wait_a_little(&mut spins);
        }
        // Close the job, then wait for workers that entered it to leave: after this no one
        // can touch `f`. A worker either sees `open` false, or is counted in `active` here.
        s.open.store(false, SeqCst);
        while s.active.load(SeqCst) != 0 {
            wait_a_little(&mut spins);
        }
        if s.panicked.swap(false, SeqCst) {
            if let Some(payload) = s.panic.lock().unwrap().take() {
                std::panic::resume_unwind(payload);
            }
        }
    }
}

/// Lets the threads of one section write disjoint parts of one buffer, which a `&mut` borrow
/// cannot express.
pub(crate) struct DisjointWriter<'a> {
    ptr: *mut f32,
    len: usize,
    _buffer: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: callers of `chunk` guarantee that no two live chunks overlap.
unsafe impl Sync for DisjointWriter<'_> {}

impl<'a> DisjointWriter<'a> {
    pub(crate) fn new(buf: &'a mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buffer: std::marker::PhantomData,
        }
    }

    /// # Safety
    /// No other live chunk may overlap `start..start + len`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn chunk(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "chunk out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}

fn wait_a_little(spins: &mut u32) {
    *spins += 1;
    if (*spins).is_multiple_of(SPINS_BEFORE_YIELD) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

fn worker(s: &'static Shared) {
    IN_POOL.with(|c| c.set(true));
    let mut seen = s.generation.load(SeqCst);
    loop {
        let idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let generation = s.generation.load(SeqCst);
            if generation != seen {
                seen = generation;
                break;
            }
            spins += 1;
            if spins.is_multiple_of(64) && idle_since.elapsed() > SPIN_BEFORE_PARK {
                // A section published after the load above unparks us: park returns at once.
                std::thread::park();
            } else {
                std::hint::spin_loop();
            }
        }
        s.active.fetch_add(1, SeqCst);
        if s.open.load(SeqCst) {
            // SAFETY: counted in `active` with the job open: the caller waits for us.
            unsafe { s.run_items() };
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_item_runs_exactly_once() {
        let pool = Pool::new(3);
        for n in [1usize, 2, 7, 64, 1000, 4096] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            pool.execute_chunked(n, |range| {
                for i in range {
                    hits[i].fetch_add(1, SeqCst);
                }
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "n = {n}");
        }
    }

    #[test]
    fn back_to_back_sections_see_their_own_closures() {
        let pool = Pool::new(1);
        for round in 0..2000u64 {
            let sum = AtomicU64::new(0);
            pool.execute_chunked(37, |range| {
                for i in range {
                    sum.fetch_add(round * 100 + i as u64, SeqCst);
                }
            });
            assert_eq!(sum.load(SeqCst), round * 100 * 37 + (0..37).sum::<u64>());
        }
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(1);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.execute_chunked(100, |range| {
                if range.contains(&42) {
                    panic!("item 42");
                }
            })
        }));
        assert!(outcome.is_err());
        let count = AtomicU64::new(0);
        pool.execute_chunked(10, |range| {
            count.fetch_add(range.len() as u64, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 10);
    }

    #[test]
    fn nested_sections_run_inline() {
        let pool = Pool::new(1);
        let count = AtomicU64::new(0);
        pool.execute_chunked(4, |outer| {
            for _ in outer {
                pool.execute_chunked(3, |inner| {
                    count.fetch_add(inner.len() as u64, SeqCst);
                });
            }
        });
        assert_eq!(count.load(SeqCst), 12);
    }
}
