//! Wall-clock time per named stage of a model step, for `moeserve bench --profile`. Off unless
//! enabled; a span then costs one relaxed atomic load. Spans nest, and each reports its inclusive
//! time: the caller's stages and their parts (`mla`, `mla/attention`) are told apart by name.
//! Spans of every thread add up (the ranks of a tensor-parallel group record theirs at once).
//!
//! Each stage also reports its serial time: the part its thread spent outside the CPU kernels'
//! parallel loops ([`parallel`]), while their other threads wait for the next loop (candle's own
//! multi-threaded ops count as serial).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
/// Stages recorded, in order of first use.
static TOTALS: Mutex<Vec<Stage>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's time inside [`parallel`] loops so far (outermost loops only), and whether
    /// it is inside one now.
    static IN_LOOPS: Cell<(Duration, bool)> = const { Cell::new((Duration::ZERO, false)) };
}

/// One stage's totals.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: &'static str,
    /// Wall-clock time inside the stage.
    pub total: Duration,
    /// The part of `total` outside [`parallel`] loops.
    pub serial: Duration,
    pub calls: u64,
}

/// Start (or stop) recording spans.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Drop what was recorded so far.
pub fn reset() {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// What was recorded, in order of first use.
pub fn totals() -> Vec<Stage> {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Run a parallel loop: its time on this thread counts as parallel in the spans around it.
pub fn parallel<R>(f: impl FnOnce() -> R) -> R {
    let (before, inside) = IN_LOOPS.get();
    if inside || !ON.load(Ordering::Relaxed) {
        return f();
    }
    IN_LOOPS.set((before, true));
    let start = Instant::now();
    let r = f();
    IN_LOOPS.set((before + start.elapsed(), false));
    r
}

/// Records the time until it is dropped under `name`.
#[must_use]
pub struct Span(Option<(&'static str, Instant, Duration)>);

/// Time the rest of the enclosing scope (or until the span is dropped) as stage `name`.
pub fn span(name: &'static str) -> Span {
    Span(ON.load(Ordering::Relaxed).then(|| (name, Instant::now(), IN_LOOPS.get().0)))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((name, start, loops)) = self.0.take() {
            let total = start.elapsed();
            let serial = total.saturating_sub(IN_LOOPS.get().0 - loops);
            let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            match t.iter_mut().find(|s| s.name == name) {
                Some(e) => {
                    e.total += total;
                    e.serial += serial;
                    e.calls += 1;
                }
                None => t.push(Stage { name, total, serial, calls: 1 }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_per_stage_only_while_enabled() {
        let _off = span("off");
        enable(true);
        for _ in 0..3 {
            let _s = span("outer");
            std::thread::sleep(Duration::from_millis(2));
            let _i = span("outer/inner");
            // a loop (with one nested inside) is not serial time
            parallel(|| parallel(|| std::thread::sleep(Duration::from_millis(1))));
        }
        enable(false);
        drop(_off);
        let t = totals();
        let get = |n: &str| t.iter().find(|e| e.name == n).cloned();
        let (outer, inner) = (get("outer").unwrap(), get("outer/inner").unwrap());
        assert_eq!((outer.calls, inner.calls), (3, 3));
        assert!(outer.total >= Duration::from_millis(9) && inner.total >= Duration::from_millis(3));
        assert!(outer.total > inner.total);
        // the loops' 3 ms are out of both stages' serial time, counted once
        assert!(outer.serial >= Duration::from_millis(6) && outer.serial < outer.total - Duration::from_millis(3));
        assert!(inner.serial < Duration::from_millis(1), "{inner:?}");
        assert!(get("off").is_none());
        reset();
        assert!(totals().is_empty());
    }
}
