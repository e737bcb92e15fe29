//! The kernels' threads: rayon's pool, one for the whole process (the `moeserve` binary sets
//! `CANDLE_NUM_THREADS=1`, so candle's elementwise ops run on the calling thread rather than
//! on a pool of candle's own), so threads are never oversubscribed. A model step runs on it ([`on_pool`]), and its
//! parallel loops ([`parallel`], [`for_each_index`], [`map_indices`]) count as parallel time in
//! `--profile`'s stages.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// Run `f` on a thread of the kernels' pool while the caller waits. A model step issues dozens
/// of parallel loops ([`for_each_index`]: products, attention); from a pool thread each one runs
/// partly on that thread, with no hand-over to the pool and back per call, and the serial work
/// between them does not compete with idle pool threads for the cores.
///
/// While `f` runs, the pool's other threads stay awake ([`keep_awake`]): between two products
/// of a decode step an idle rayon thread goes to sleep after a few dozen yields, and waking it
/// for the next product costs a futex wake-up and a reschedule (about 5 % of a decode step in
/// perf's profile, 2 vCPUs). `MOESERVE_CPU_SPIN_US` sets how long a thread waits for work
/// before it sleeps after all (default 1000 µs; 0: no spinning).
///
/// (Tried: the loops of a step handed to the awake threads through one polled slot and an atomic
/// index instead of rayon's deques, the caller taking indices from the front, the others from
/// the back: decode on bench-small q8_0 and q4_K within the noise of rayon's, interleaved runs.)
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let done = AtomicBool::new(false);
    let idle = spin_idle();
    rayon::scope(|s| {
        let lead = rayon::current_thread_index();
        if !idle.is_zero() {
            let done = &done;
            for _ in 1..rayon::current_num_threads() {
                s.spawn(move |_| keep_awake(done, lead, idle));
            }
        }
        let r = f();
        done.store(true, Ordering::Release);
        r
    })
}

fn spin_idle() -> Duration {
    static IDLE: OnceLock<Duration> = OnceLock::new();
    *IDLE.get_or_init(|| {
        let us = std::env::var("MOESERVE_CPU_SPIN_US").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
        Duration::from_micros(us)
    })
}

/// On a pool thread other than `lead` (which runs the step), run the pool's jobs as they appear
/// until `done`, or until none came for `idle`; between jobs, fetch the weights the step named
/// as its next ([`crate::prefetch`]). On `lead` itself (which may pick this job up
/// while it waits inside `f`) return at once: it would otherwise spin above `f`'s frame.
fn keep_awake(done: &AtomicBool, lead: Option<usize>, idle: Duration) {
    if rayon::current_thread_index() == lead {
        return;
    }
    let mut since = Instant::now();
    let mut fetch = crate::prefetch::Idle::default();
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => since = Instant::now(),
            Some(rayon::Yield::Idle) if fetch.work() => {}
            Some(rayon::Yield::Idle) if since.elapsed() < idle => std::hint::spin_loop(),
            _ => return,
        }
    }
}

/// Run a parallel loop (rayon's): its time on this thread is parallel time for `--profile`, not
/// serial time (`moeserve_core::profile::parallel`).
pub fn parallel<R>(f: impl FnOnce() -> R) -> R {
    moeserve_core::profile::parallel(f)
}

/// `f(i)` for every `i < n`, on the pool's threads ([`parallel`]).
pub fn for_each_index(n: usize, f: impl Fn(usize) + Sync + Send) {
    parallel(|| match n {
        0 | 1 => (0..n).for_each(f),
        _ => (0..n).into_par_iter().for_each(f),
    })
}

/// `f(i)` for every `i < n` on the pool's threads ([`parallel`]), each thread taking the next
/// index in order when it comes free: the threads finish within one index of each other, where
/// rayon's halving of the range ([`for_each_index`]) hands out runs of indices that cannot be
/// split once begun. For a few coarse units of work.
pub fn for_each_in_order(n: usize, f: impl Fn(usize) + Sync + Send) {
    let threads = rayon::current_num_threads().max(1);
    if n <= 1 || threads == 1 {
        return (0..n).for_each(f);
    }
    let next = AtomicUsize::new(0);
    for_each_index(threads.min(n), |_| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    });
}

/// `[f(0), .., f(n - 1)]`, computed on the pool's threads ([`parallel`]).
pub fn map_indices<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    parallel(|| (0..n).into_par_iter().map(f).collect())
}

#[cfg(test)]
mod tests {
    use std::panic::catch_unwind;
    use std::sync::atomic::{AtomicU64, AtomicUsize};

    use super::*;

    /// Steps from several threads at once, each with parallel work inside, all finish with
    /// their own results: a thread kept awake for one step runs the others' jobs too, and gives
    /// its thread back when its step ends or no job comes.
    #[test]
    fn concurrent_steps_on_the_pool_finish() {
        let sums: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    s.spawn(move || {
                        (0..50)
                            .map(|i| {
                                on_pool(|| {
                                    // a rayon loop, and an index loop with rayon loops inside
                                    let a = (0..10_000u64).into_par_iter().map(|v| v * (t + 1) + i).sum::<u64>();
                                    let b = AtomicU64::new(0);
                                    for_each_index(37, |k| {
                                        let inner = (0..100u64).into_par_iter().map(|v| v + k as u64).sum::<u64>();
                                        b.fetch_add(inner, Ordering::Relaxed);
                                    });
                                    a + b.into_inner()
                                })
                            })
                            .sum()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("step thread")).collect()
        });
        let b: u64 = (0..37u64).map(|k| (0..100u64).map(|v| v + k).sum::<u64>()).sum();
        for (t, &got) in sums.iter().enumerate() {
            let want: u64 = (0..50).map(|i| (0..10_000u64).map(|v| v * (t as u64 + 1) + i).sum::<u64>() + b).sum();
            assert_eq!(got, want, "thread {t}");
        }
        // nested: a step inside a step runs inline
        assert_eq!(on_pool(|| on_pool(|| 7)), 7);
    }

    /// Every index runs exactly once a loop, inside a step and outside one, for any count.
    #[test]
    fn every_index_runs_once() {
        for n in [0, 1, 2, 3, 17, 1000] {
            let check = || {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each_index(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                for_each_in_order(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 2), "{n} indices");
            };
            check();
            on_pool(|| {
                check();
                check();
            });
        }
    }

    /// A panic inside a loop reaches the step's caller, and the pool keeps working.
    #[test]
    fn a_panicking_loop_panics_the_step() {
        let r = catch_unwind(|| {
            on_pool(|| {
                for_each_index(64, |i| {
                    if i == 40 {
                        panic!("index 40");
                    }
                })
            })
        });
        assert!(r.is_err());
        assert_eq!(on_pool(|| (0..1000u64).into_par_iter().sum::<u64>()), 499_500);
    }
}
