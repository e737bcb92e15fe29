//! Two versions of a hot path compared in one process, decode step by decode step
//! (`moeserve bench --ab`). This machine class's read bandwidth wanders by tens of percent
//! between runs, so two builds timed one after the other cannot resolve a 1–2 % change; the
//! alternate steps of one generation share every drift (on bench-small, two identical variants
//! come out within 0.5 % of each other). Code under evaluation branches on [`variant`]: with
//! `bench --ab` every second decode step runs variant B, otherwise every step runs A.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

static ON: AtomicBool = AtomicBool::new(false);
/// Steps begun through [`begin_next_step`] since [`enable`].
static STEPS: AtomicU64 = AtomicU64::new(0);
static B: AtomicBool = AtomicBool::new(false);
/// Nanoseconds and steps of variant A, then of variant B.
static TIMES: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Start alternating with no steps counted, or stop (keeping the counts for [`report`]).
pub fn enable(on: bool) {
    if on {
        TIMES.iter().for_each(|t| t.store(0, Relaxed));
        STEPS.store(0, Relaxed);
    }
    B.store(false, Relaxed);
    ON.store(on, Relaxed);
}

/// Whether the running step is one of variant B's.
#[inline]
pub fn variant() -> bool {
    B.load(Relaxed)
}

/// Before decode step `step`: which variant it runs, `None` when not alternating.
pub fn begin_step(step: usize) -> Option<bool> {
    if !ON.load(Relaxed) {
        return None;
    }
    let b = step % 2 == 1;
    B.store(b, Relaxed);
    Some(b)
}

/// [`begin_step`] for a loop that does not count its steps (the engine's decode steps): each
/// call the next step.
pub fn begin_next_step() -> Option<bool> {
    if !ON.load(Relaxed) {
        return None;
    }
    begin_step(STEPS.fetch_add(1, Relaxed) as usize)
}

/// After a step that [`begin_step`] gave variant `b`.
pub fn end_step(b: bool, took: Duration) {
    let i = if b { 2 } else { 0 };
    TIMES[i].fetch_add(took.as_nanos() as u64, Relaxed);
    TIMES[i + 1].fetch_add(1, Relaxed);
}

/// Mean step time of each variant so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub a: Duration,
    pub a_steps: u64,
    pub b: Duration,
    pub b_steps: u64,
}

impl Report {
    /// Variant B's mean step time over variant A's.
    pub fn ratio(&self) -> f64 {
        self.b.as_secs_f64() / self.a.as_secs_f64()
    }
}

/// `None` until each variant has run a step.
pub fn report() -> Option<Report> {
    let t: Vec<u64> = TIMES.iter().map(|t| t.load(Relaxed)).collect();
    let mean = |ns: u64, n: u64| Duration::from_nanos(ns / n);
    (t[1] > 0 && t[3] > 0).then(|| Report { a: mean(t[0], t[1]), a_steps: t[1], b: mean(t[2], t[3]), b_steps: t[3] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_alternate_and_each_variant_keeps_its_own_times() {
        enable(true);
        for step in 0..6 {
            let b = begin_step(step).expect("alternating");
            assert_eq!(b, step % 2 == 1);
            assert_eq!(variant(), b);
            end_step(b, Duration::from_micros(if b { 300 } else { 200 }));
        }
        let r = report().expect("both ran");
        assert_eq!((r.a, r.a_steps, r.b, r.b_steps), (Duration::from_micros(200), 3, Duration::from_micros(300), 3));
        assert!((r.ratio() - 1.5).abs() < 1e-9);
        enable(false);
        assert_eq!(begin_step(1), None);
        assert!(!variant());
        assert_eq!(report(), Some(r));
        enable(true);
        assert_eq!(report(), None);
        // a loop that does not count its steps alternates from the first after `enable`
        let order: Vec<Option<bool>> = (0..4).map(|_| begin_next_step()).collect();
        assert_eq!(order, [Some(false), Some(true), Some(false), Some(true)]);
        enable(false);
        assert_eq!(begin_next_step(), None);
        enable(true);
        assert_eq!(begin_next_step(), Some(false));
        enable(false);
    }
}
