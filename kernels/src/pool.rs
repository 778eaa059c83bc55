//! A small persistent thread pool with static partitioning.
//!
//! Why not rayon: the kernels split output columns statically (thread `t` always streams the
//! same contiguous column panels, which is what the hardware prefetcher and the memory
//! controller like), so work stealing buys nothing, and a decode GEMV on a 576-wide matrix
//! lasts a few microseconds: one broadcast wake-up and one completion count is all the
//! machinery needed. The caller thread always takes part (task 0), so a pool of `n` threads
//! spawns `n - 1` workers.
//!
//! Decode calls the pool hundreds of times per token with a few microseconds of other work in
//! between, and a futex wake-up costs tens of microseconds: so a worker that finished a round
//! spins (for at most [`SPIN`]) watching for the next one before it sleeps, and the caller
//! spins the same way for the round to complete.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle thread busy-waits for the next event before blocking.
pub const SPIN: Duration = Duration::from_micros(300);

/// Busy-waits until `ready()` or [`SPIN`] has passed; returns `ready()`.
fn spin_until(ready: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= SPIN {
            return ready();
        }
    }
}

type Job = dyn Fn(usize) + Sync;

/// Lifetime-erased pointer to the job of the current round.
#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointee is `Sync` (shared across threads by reference only) and `run` keeps it
// alive until every worker has finished with it.
unsafe impl Send for JobPtr {}

struct State {
    generation: u64,
    job: Option<JobPtr>,
    remaining: usize,
    panic: Option<Box<dyn Any + Send>>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    done: Condvar,
    /// Mirrors of `State::generation` and `State::remaining` for spinning without the lock.
    generation: AtomicU64,
    remaining: AtomicUsize,
}

/// Persistent pool of `threads()` threads (the caller included).
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises concurrent `run` calls on the same pool.
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `threads` threads in all (at least 1).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generation: 0,
                job: None,
                remaining: 0,
                panic: None,
                shutdown: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            generation: AtomicU64::new(0),
            remaining: AtomicUsize::new(0),
        });
        let workers = (1..threads)
            .map(|idx| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("patch-kernels-{idx}"))
                    .spawn(move || worker(shared, idx))
                    .expect("spawn kernel worker thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0) .. f(threads() - 1)` concurrently, `f(0)` on the calling thread, and
    /// returns when all are done. A panic in any task is re-raised here.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            f(0);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: erases the lifetime of `f`. Workers only call the job between the
        // generation bump below and their decrement of `remaining`, and this function does
        // not return (or unwind) before `remaining` is back to zero, so `f` outlives every use.
        let job: JobPtr =
            JobPtr(unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(f) });
        {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.job = Some(job);
            st.remaining = self.workers.len();
            st.generation += 1;
            self.shared
                .remaining
                .store(self.workers.len(), Ordering::Release);
            self.shared
                .generation
                .store(st.generation, Ordering::Release);
            self.shared.work.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        spin_until(|| self.shared.remaining.load(Ordering::Acquire) == 0);
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.remaining > 0 {
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.job = None;
        let theirs = st.panic.take();
        drop(st);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if let Some(p) = theirs {
            std::panic::resume_unwind(p);
        }
    }
}

fn worker(shared: Arc<Shared>, idx: usize) {
    let mut seen = 0u64;
    loop {
        spin_until(|| shared.generation.load(Ordering::Acquire) != seen);
        let job = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            while st.generation == seen && !st.shutdown {
                st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.shutdown {
                return;
            }
            seen = st.generation;
            st.job.expect("a job is published with every generation")
        };
        // SAFETY: `run` keeps the job alive until `remaining` reaches zero, which happens
        // only after this call returns and we decrement it below.
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)(idx) }));
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(p) = result {
            st.panic.get_or_insert(p);
        }
        st.remaining -= 1;
        shared.remaining.store(st.remaining, Ordering::Release);
        if st.remaining == 0 {
            shared.done.notify_all();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.shutdown = true;
            self.shared.work.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_task_runs_once_per_round() {
        let pool = ThreadPool::new(3);
        assert_eq!(pool.threads(), 3);
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..50 {
            pool.run(&|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 50);
        }
    }

    #[test]
    fn worker_panic_is_reraised_and_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|t| {
                if t == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
