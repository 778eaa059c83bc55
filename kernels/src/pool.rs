//! A small persistent thread pool with static partitioning.
//!
//! Why not rayon: the kernels split output columns statically (thread `t` always streams the
//! same contiguous column panels, which is what the hardware prefetcher and the memory
//! controller like), so work stealing buys nothing, and a decode GEMV on a 576-wide matrix
//! lasts a few microseconds: one broadcast and one completion count is all the machinery
//! needed. The caller thread always takes part (task 0), so a pool of `n` threads spawns
//! `n - 1` workers.
//!
//! Decode calls the pool hundreds of times per token with a few microseconds of other work in
//! between, and a futex wake-up costs tens of microseconds. So a round is published and
//! completed through atomics only: a worker that finished a round spins (for at most
//! [`SPIN`]) watching the generation before it sleeps, the caller spins the same way for the
//! completion count, and the mutex and condition variables are touched only when someone is
//! actually asleep (counted in `sleepers` / flagged in `caller_asleep`).
//!
//! Wake-up protocol (no lost wake-ups): a sleeper registers itself under the mutex and then
//! re-checks its condition before waiting; the publisher changes the condition first and then
//! reads the registration, both sequentially consistent, so either the sleeper sees the change
//! or the publisher sees the sleeper and notifies under the same mutex.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
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

/// A value alone on its cache line, so that the generation the workers poll and the count
/// the caller polls do not share one.
#[repr(align(128))]
struct Padded<T>(T);

struct Shared {
    /// Bumped once per round, after `job` and `remaining` are set.
    generation: Padded<AtomicU64>,
    /// Workers still running the current round.
    remaining: Padded<AtomicUsize>,
    /// The current round's job. Written by `run` only while no worker reads it (before the
    /// generation bump, after `remaining` reached zero); read by workers in between.
    job: UnsafeCell<Option<JobPtr>>,
    /// Workers registered as asleep on `work` (under `lock`).
    sleepers: AtomicUsize,
    /// The caller is registered as asleep on `done` (under `lock`).
    caller_asleep: AtomicBool,
    shutdown: AtomicBool,
    /// The first panic of a worker in the current round.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    lock: Mutex<()>,
    work: Condvar,
    done: Condvar,
}

// SAFETY: `job` is the only non-`Sync` field; its accesses are ordered by the generation and
// `remaining` atomics as documented on the field, and the pointee is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw job pointer is only dereferenced while `run` keeps it alive.
unsafe impl Send for Shared {}

impl Shared {
    /// Notifies `cv` if someone registered as asleep on it, under the lock the sleeper holds
    /// while re-checking its condition.
    fn wake(&self, asleep: bool, cv: &Condvar) {
        if asleep {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            cv.notify_all();
        }
    }
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
            generation: Padded(AtomicU64::new(0)),
            remaining: Padded(AtomicUsize::new(0)),
            job: UnsafeCell::new(None),
            sleepers: AtomicUsize::new(0),
            caller_asleep: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            panic: Mutex::new(None),
            lock: Mutex::new(()),
            work: Condvar::new(),
            done: Condvar::new(),
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
        let s = &*self.shared;
        // SAFETY: erases the lifetime of `f`. Workers only call the job between the
        // generation bump below and their decrement of `remaining`, and this function does
        // not return (or unwind) before `remaining` is back to zero, so `f` outlives every use.
        let job: JobPtr =
            JobPtr(unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(f) });
        // SAFETY: no worker reads `job` now: the previous round ended with `remaining == 0`
        // and the next one starts with the generation bump below (`run_lock` is held).
        unsafe { *s.job.get() = Some(job) };
        s.remaining.0.store(self.workers.len(), SeqCst);
        s.generation.0.fetch_add(1, SeqCst);
        s.wake(s.sleepers.load(SeqCst) > 0, &s.work);
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let finished = || s.remaining.0.load(SeqCst) == 0;
        if !spin_until(finished) {
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.caller_asleep.store(true, SeqCst);
            while !finished() {
                g = s.done.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.caller_asleep.store(false, SeqCst);
        }
        // SAFETY: every worker is done with this round.
        unsafe { *s.job.get() = None };
        let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if let Some(p) = theirs {
            std::panic::resume_unwind(p);
        }
    }
}

fn worker(shared: Arc<Shared>, idx: usize) {
    let s = &*shared;
    let mut seen = 0u64;
    loop {
        let published = || s.generation.0.load(SeqCst) != seen || s.shutdown.load(SeqCst);
        if !spin_until(published) {
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            while !published() {
                g = s.work.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
        }
        if s.shutdown.load(SeqCst) {
            return;
        }
        seen = s.generation.0.load(SeqCst);
        // SAFETY: the generation bump published `job` (written before it), and `run` keeps
        // it alive and unchanged until this worker decrements `remaining` below.
        let job = unsafe { (*s.job.get()).expect("a job is published with every generation") };
        // SAFETY: as above.
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)(idx) }));
        if let Err(p) = result {
            s.panic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(p);
        }
        if s.remaining.0.fetch_sub(1, SeqCst) == 1 {
            s.wake(s.caller_asleep.load(SeqCst), &s.done);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        self.shared.wake(true, &self.shared.work);
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
    fn rounds_survive_sleeping_workers_and_a_sleeping_caller() {
        // Gaps longer than SPIN put the workers to sleep between rounds; a task longer than
        // SPIN puts the caller to sleep; both must be woken, every round counted once.
        let pool = ThreadPool::new(3);
        let hits = AtomicUsize::new(0);
        for round in 0..6 {
            if round % 2 == 0 {
                std::thread::sleep(SPIN * 3);
            }
            pool.run(&|t| {
                if t == 2 && round % 3 == 0 {
                    std::thread::sleep(SPIN * 3);
                }
                hits.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 3 * (round + 1));
        }
    }

    #[test]
    fn many_short_rounds_from_two_callers() {
        let pool = std::sync::Arc::new(ThreadPool::new(2));
        let total = std::sync::Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..2)
            .map(|_| {
                let (pool, total) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        pool.run(&|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 2 * 2000 * 2);
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
