//! Streaming read bandwidth: the denominator of every "fraction of the roofline" figure.

use std::time::Instant;

use rayon::prelude::*;

/// Best of `reps` passes summing a `bytes`-sized buffer on rayon's pool; bytes per second.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let threads = rayon::current_num_threads().max(1);
    let chunk = n.div_ceil(threads * 4).max(1);
    let mut best = f64::INFINITY;
    let mut sink = 0u64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        sink ^= buf.par_chunks(chunk).map(sum_chunk).reduce(|| 0, |a, b| a.wrapping_add(b));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (n * 8) as f64 / best
}

/// Two interleaved streams per thread (the halves of its chunk): one sequential stream leaves
/// memory-level parallelism unused and measures a third less than the kernels can read.
fn sum_chunk(c: &[u64]) -> u64 {
    let (a, b) = c.split_at(c.len() / 2);
    let mut acc = [0u64; 16];
    for (va, vb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(va[i]);
            acc[8 + i] = acc[8 + i].wrapping_add(vb[i]);
        }
    }
    acc.iter().fold(0u64, |x, &y| x.wrapping_add(y))
}
