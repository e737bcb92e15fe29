//! Streaming read bandwidth: the denominator of every "fraction of the roofline" figure.

use std::time::Instant;

use rayon::prelude::*;

/// Best of `reps` passes summing a `bytes`-sized buffer on rayon's pool, for 2, 4 and 8
/// interleaved streams per thread; bytes per second.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    read_bandwidth_of(&probe_buffer(bytes), reps)
}

/// A buffer of `bytes` for [`read_bandwidth_of`] (its pages written once).
pub fn probe_buffer(bytes: usize) -> Vec<u64> {
    (0..(bytes / 8) as u64).collect()
}

/// [`read_bandwidth`] over `buf`: repeated probes without allocating (and faulting in) a
/// buffer each time.
pub fn read_bandwidth_of(buf: &[u64], reps: usize) -> f64 {
    let n = buf.len();
    let threads = rayon::current_num_threads().max(1);
    let chunk = n.div_ceil(threads * 4).max(1);
    let mut best = f64::INFINITY;
    let mut sink = 0u64;
    for _ in 0..reps.max(1) {
        for pass in [sum_chunk::<2> as fn(&[u64]) -> u64, sum_chunk::<4>, sum_chunk::<8>] {
            let t = Instant::now();
            sink ^= buf.par_chunks(chunk).map(pass).reduce(|| 0, |a, b| a.wrapping_add(b));
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(sink);
    (n * 8) as f64 / best
}

/// `S` interleaved sequential streams per thread (the parts of its chunk). One stream leaves
/// memory-level parallelism unused and measures a third less than the kernels read; the
/// kernels read up to 8 rows at once, so the probe tries as many.
fn sum_chunk<const S: usize>(c: &[u64]) -> u64 {
    let part = c.len() / S / 8 * 8;
    let mut acc = [[0u64; 8]; S];
    for i in (0..part).step_by(8) {
        for (s, a) in acc.iter_mut().enumerate() {
            let v = &c[s * part + i..s * part + i + 8];
            for k in 0..8 {
                a[k] = a[k].wrapping_add(v[k]);
            }
        }
    }
    let tail = c[S * part..].iter().fold(0u64, |x, &y| x.wrapping_add(y));
    acc.iter().flatten().fold(tail, |x, &y| x.wrapping_add(y))
}
