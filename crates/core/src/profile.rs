//! Wall-clock time per named stage of a model step, for `moeserve bench --profile`. Off unless
//! enabled; a span then costs one relaxed atomic load. Spans nest, and each reports its inclusive
//! time: the caller's stages and their parts (`mla`, `mla/attention`) are told apart by name.
//! Spans of every thread add up (the ranks of a tensor-parallel group record theirs at once).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
/// (stage, total time, calls), in order of first use.
static TOTALS: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

/// Start (or stop) recording spans.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Drop what was recorded so far.
pub fn reset() {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// What was recorded: (stage, total time, calls), in order of first use.
pub fn totals() -> Vec<(&'static str, Duration, u64)> {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Records the time until it is dropped under `name`.
#[must_use]
pub struct Span(Option<(&'static str, Instant)>);

/// Time the rest of the enclosing scope (or until the span is dropped) as stage `name`.
pub fn span(name: &'static str) -> Span {
    Span(ON.load(Ordering::Relaxed).then(|| (name, Instant::now())))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((name, start)) = self.0.take() {
            let d = start.elapsed();
            let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            match t.iter_mut().find(|(n, _, _)| *n == name) {
                Some(e) => {
                    e.1 += d;
                    e.2 += 1;
                }
                None => t.push((name, d, 1)),
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
            std::thread::sleep(Duration::from_millis(1));
        }
        enable(false);
        drop(_off);
        let t = totals();
        let get = |n: &str| t.iter().find(|e| e.0 == n).cloned();
        let (outer, inner) = (get("outer").unwrap(), get("outer/inner").unwrap());
        assert_eq!((outer.2, inner.2), (3, 3));
        assert!(outer.1 >= Duration::from_millis(9) && inner.1 >= Duration::from_millis(3));
        assert!(outer.1 > inner.1);
        assert!(get("off").is_none());
        reset();
        assert!(totals().is_empty());
    }
}
