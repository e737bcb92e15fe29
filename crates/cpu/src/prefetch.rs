//! Weights fetched ahead by waiting threads. Between the parallel products of a decode step the
//! step's thread runs serial glue (norms, rope, quantizing activations, routing, the softmax
//! setup) while the pool's other threads wait for the next loop (`pool::keep_awake`), and the
//! memory bus idles: about a tenth of a bench-small step. A step names the weights of the
//! products it runs next ([`next`]); a waiting thread prefetches their first [`AHEAD_BYTES`]
//! ([`Idle::work`]), so that the next product finds them in the caches (L2, and L3 as L2 evicts
//! into it) instead of memory.
//!
//! A prefetch is a hint: it never faults (even at an address no longer mapped: a hint may
//! outlive its weights), never changes a result, and a hint that is wrong costs only bandwidth.
//! The hint is process-wide: concurrent steps (tensor-parallel ranks) overwrite each other's.
//!
//! (bench-small decode, `bench --ab` with hints only in alternate steps, 2 threads, Zen 4: q4_K
//! steps 1.5 % faster (B/A 0.975–0.995 over 4 runs of 124 steps; about 7 MB a step prefetched),
//! q8_0 1.2 %, bf16 and FP8 0.3 %; a 256 KiB limit instead of 2 MiB 0.1 %, 1 MiB about 1.4 %.
//! Tried as well: prefetches interleaved into the attention kernel's loops, which stalled it
//! more than they saved (they evict its L1 working set); the claims going round the starts of
//! the product's first units, and idle threads stopping when the product starts: no difference.)

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::PackedMatrix;

/// Bytes of a hint fetched ahead at most (the first of the next products').
pub const AHEAD_BYTES: usize = 2 << 20;
/// Bytes a waiting thread claims at a time.
const CLAIM: usize = 4096;
const LINE: usize = 64;
/// Lines prefetched per [`Idle::work`] call, between two looks for pool jobs.
const LINES_PER_WORK: usize = 8;

/// The weight bytes of a hint, in the order the products read them, handed out in claims of
/// [`CLAIM`] bytes to the waiting threads.
struct Ahead {
    /// (address, length) of each byte range, cut to the limit (addresses only: see the
    /// module's note).
    spans: Vec<(usize, usize)>,
    /// Each span's first claim (a span begins a claim), then the number of claims.
    firsts: Vec<usize>,
    next: AtomicUsize,
}

impl Ahead {
    fn new<'a>(spans: impl IntoIterator<Item = &'a [u8]>, limit: usize) -> Ahead {
        let mut left = limit;
        let mut cut = Vec::new();
        for s in spans {
            let len = s.len().min(left);
            if len > 0 {
                cut.push((s.as_ptr() as usize, len));
            }
            left -= len;
        }
        let mut firsts = vec![0];
        for &(_, len) in &cut {
            firsts.push(firsts[firsts.len() - 1] + len.div_ceil(CLAIM));
        }
        Ahead { spans: cut, firsts, next: AtomicUsize::new(0) }
    }

    /// The next claim's addresses (within one span); `None` once all are handed out.
    fn claim(&self) -> Option<Range<usize>> {
        let claims = self.firsts[self.firsts.len() - 1];
        if self.next.load(Ordering::Relaxed) >= claims {
            return None;
        }
        let c = self.next.fetch_add(1, Ordering::Relaxed);
        if c >= claims {
            return None;
        }
        let s = self.firsts.partition_point(|&f| f <= c) - 1;
        let (addr, len) = self.spans[s];
        let off = (c - self.firsts[s]) * CLAIM;
        Some(addr + off..addr + len.min(off + CLAIM))
    }
}

/// The latest hint, and how many hints there have been (waiting threads look at the count
/// before taking the lock).
struct Hints {
    latest: Mutex<Option<Arc<Ahead>>>,
    count: AtomicUsize,
}

impl Hints {
    const fn new() -> Hints {
        Hints { latest: Mutex::new(None), count: AtomicUsize::new(0) }
    }

    fn set(&self, ahead: Ahead) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(ahead));
        self.count.fetch_add(1, Ordering::Release);
    }
}

/// The process's hints.
static HINTS: Hints = Hints::new();

/// The products a step runs next are over `weights` (in the order they read them): waiting
/// threads of the pool fetch the first [`AHEAD_BYTES`] of them. Replaces the previous hint.
pub fn next<'a>(weights: impl IntoIterator<Item = &'a PackedMatrix>) {
    next_bytes(weights.into_iter().map(PackedMatrix::bytes));
}

/// [`next`] over byte ranges of weights (a product that reads only some rows of its matrix).
pub fn next_bytes<'a>(spans: impl IntoIterator<Item = &'a [u8]>) {
    if rayon::current_num_threads() < 2 {
        return;
    }
    HINTS.set(Ahead::new(spans, AHEAD_BYTES));
}

/// A waiting thread's view of the hints: the one it works on.
#[derive(Default)]
pub(crate) struct Idle {
    seen: usize,
    ahead: Option<Arc<Ahead>>,
    at: usize,
    end: usize,
}

impl Idle {
    /// Prefetch the next few lines of the latest hint; `false` when it has nothing left.
    pub(crate) fn work(&mut self) -> bool {
        self.work_on(&HINTS)
    }

    fn work_on(&mut self, hints: &Hints) -> bool {
        let count = hints.count.load(Ordering::Acquire);
        if count != self.seen {
            self.seen = count;
            self.ahead = hints.latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
            (self.at, self.end) = (0, 0);
        }
        let Some(ahead) = &self.ahead else { return false };
        for _ in 0..LINES_PER_WORK {
            if self.at >= self.end {
                match ahead.claim() {
                    Some(r) => (self.at, self.end) = (r.start, r.end),
                    None => {
                        self.ahead = None;
                        return false;
                    }
                }
            }
            prefetch(self.at);
            self.at += LINE;
        }
        true
    }
}

#[inline(always)]
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(addr as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims cover the hinted bytes once each, in order, up to the limit, each within a span.
    #[test]
    fn claims_cover_the_first_bytes_once() {
        let (a, b) = (vec![1u8; 10_000], vec![2u8; 5_000]);
        let (a0, b0) = (a.as_ptr() as usize, b.as_ptr() as usize);
        let claims = |limit| {
            let ahead = Ahead::new([&a[..], &[][..], &b[..]], limit);
            std::iter::from_fn(|| ahead.claim()).collect::<Vec<_>>()
        };
        let all = claims(1 << 20);
        assert_eq!(all, vec![a0..a0 + 4096, a0 + 4096..a0 + 8192, a0 + 8192..a0 + 10_000, b0..b0 + 4096, b0 + 4096..b0 + 5000]);
        assert_eq!(claims(4097), vec![a0..a0 + 4096, a0 + 4096..a0 + 4097]);
        assert_eq!(claims(11_000), vec![a0..a0 + 4096, a0 + 4096..a0 + 8192, a0 + 8192..a0 + 10_000, b0..b0 + 1000]);
        assert!(claims(0).is_empty());
    }

    /// A waiting thread takes up the latest hint, and stops when it is fetched. (Its own
    /// `Hints`: the process's are taken up by the pool's threads of concurrent tests.)
    #[test]
    fn idle_threads_fetch_the_latest_hint() {
        let w = vec![0u8; 3 * CLAIM];
        let hints = Hints::new();
        let mut idle = Idle::default();
        assert!(!idle.work_on(&hints), "no hint yet");
        hints.set(Ahead::new([&w[..]], 1 << 20));
        let calls = std::iter::from_fn(|| idle.work_on(&hints).then_some(())).count();
        assert_eq!(calls, 3 * CLAIM / LINE / LINES_PER_WORK);
        assert!(!idle.work_on(&hints));
        hints.set(Ahead::new([&w[..CLAIM]], 1 << 20));
        assert!(idle.work_on(&hints), "a new hint");
    }
}
