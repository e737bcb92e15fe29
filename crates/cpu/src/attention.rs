//! MLA attention in the absorbed form over the latent cache, fused: scores against the latent
//! rows and the rotated keys, the causal mask, the softmax and the weighted sum of latents in one
//! pass per (head, query), threaded over heads. Every cached row is one `[latent | rope]` entry.

use rayon::prelude::*;

use crate::Backend;

/// Shapes of one call.
#[derive(Debug, Clone, Copy)]
pub struct MlaShape {
    pub heads: usize,
    /// Query rows (positions `start..start + queries`).
    pub queries: usize,
    /// Cached rows (positions `0..tokens`).
    pub tokens: usize,
    pub latent: usize,
    pub rope: usize,
    /// Position of the first query: query i sees keys `0..=start + i`.
    pub start: usize,
}

/// `q_lat: [H, S, L]`, `q_pe: [H, S, R]`, `entries: [T, L + R]` -> `o_lat: [H, S, L]` with
/// `o = softmax(scale · (q_lat·c_kvᵀ + q_pe·k_peᵀ) + mask) · c_kv`.
pub fn mla_attention(q_lat: &[f32], q_pe: &[f32], entries: &[f32], shape: MlaShape, scale: f32) -> Vec<f32> {
    mla_attention_with(crate::backend(), q_lat, q_pe, entries, shape, scale)
}

/// [`mla_attention`] on a chosen backend: the AVX-512 loops for [`Backend::Avx512`] and
/// [`Backend::Amx`], the portable ones otherwise (tests compare them).
pub fn mla_attention_with(
    backend: Backend,
    q_lat: &[f32],
    q_pe: &[f32],
    entries: &[f32],
    shape: MlaShape,
    scale: f32,
) -> Vec<f32> {
    let MlaShape { heads, queries, tokens, latent, rope, start } = shape;
    let row = latent + rope;
    assert_eq!(q_lat.len(), heads * queries * latent, "q_lat");
    assert_eq!(q_pe.len(), heads * queries * rope, "q_pe");
    assert_eq!(entries.len(), tokens * row, "entries");
    let mut out = vec![0f32; heads * queries * latent];
    let wide = matches!(backend, Backend::Avx512 | Backend::Amx) && crate::matmul::available(backend);
    let query = |hq: usize| OneQuery {
        q_lat: &q_lat[hq * latent..(hq + 1) * latent],
        q_pe: &q_pe[hq * rope..(hq + 1) * rope],
        entries,
        seen: (start + hq % queries + 1).min(tokens),
        latent,
        scale,
    };
    #[cfg(target_arch = "x86_64")]
    if wide {
        // one group of query rows per thread: each block of cached rows is read from L2 once
        // for the whole group
        let per = (heads * queries).div_ceil(rayon::current_num_threads().max(1)).max(1);
        out.par_chunks_mut(per * latent).enumerate().for_each(|(g, o)| {
            let group: Vec<OneQuery> = (g * per..g * per + o.len() / latent).map(query).collect();
            // SAFETY: the CPU has AVX-512F (`available`).
            unsafe { wide::group(&group, o) }
        });
        return out;
    }
    let _ = wide;
    out.par_chunks_mut(latent)
        .enumerate()
        .for_each_init(|| Vec::with_capacity(tokens), |scores, (hq, o)| query(hq).run(scores, o));
    out
}

/// One (head, query) row of the attention.
struct OneQuery<'a> {
    q_lat: &'a [f32],
    q_pe: &'a [f32],
    entries: &'a [f32],
    /// Cached rows this query sees (causal).
    seen: usize,
    latent: usize,
    scale: f32,
}

impl OneQuery<'_> {
    /// Scores against every seen row, softmax, weighted sum of the latents into `o`.
    #[inline(always)]
    fn run(&self, scores: &mut Vec<f32>, o: &mut [f32]) {
        let (latent, row) = (self.latent, self.latent + self.q_pe.len());
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for e in self.entries.chunks_exact(row).take(self.seen) {
            let s = self.scale * (dot(self.q_lat, &e[..latent]) + dot(self.q_pe, &e[latent..]));
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        // the weighted sum 64 latents at a time, in registers across the rows
        let mut chunks = o.chunks_exact_mut(64);
        let mut c0 = 0;
        for oc in &mut chunks {
            let mut acc = [0f32; 64];
            for (p, e) in scores.iter().zip(self.entries.chunks_exact(row)) {
                let e: &[f32; 64] = e[c0..c0 + 64].try_into().expect("64 latents");
                for i in 0..64 {
                    acc[i] += p * e[i];
                }
            }
            oc.iter_mut().zip(acc).for_each(|(o, a)| *o = a * inv);
            c0 += 64;
        }
        let tail = chunks.into_remainder();
        for (p, e) in scores.iter().zip(self.entries.chunks_exact(row)) {
            tail.iter_mut().zip(&e[c0..latent]).for_each(|(o, c)| *o += p * c);
        }
        tail.iter_mut().for_each(|o| *o *= inv);
    }
}

/// The AVX-512 attention: flash-style, over blocks of cached rows with an online softmax, so that
/// a block is loaded into L1 once for every query row of a group.
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::OneQuery;
    use crate::simd::exp16;

    /// Cached rows per block: 32 rows of R1's 576 floats are 72 KiB, mostly in L1 and L2's
    /// nearest lines, and enough to amortize the rescaling of each row's accumulator.
    const BLOCK: usize = 32;

    /// The first `min(n, 16)` lanes.
    fn lane_mask(n: usize) -> u16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    /// `[Σ a[0], Σ a[1], .., Σ a[15]]`: the 16 vectors' sums in one vector, by a transposing tree
    /// (45 instructions for 16 sums, against about 9 for each sum on its own).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum16(a: &[__m512; 16]) -> __m512 {
        // pairs: within each 128-bit lane, a[2j]'s and a[2j+1]'s partial sums interleaved
        let mut b = [_mm512_setzero_ps(); 8];
        for j in 0..8 {
            let (x, y) = (a[2 * j], a[2 * j + 1]);
            b[j] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
        }
        // quads: each 128-bit lane holds one partial sum of each of 4 vectors
        let mut c = [_mm512_setzero_ps(); 4];
        for j in 0..4 {
            let (x, y) = (_mm512_castps_pd(b[2 * j]), _mm512_castps_pd(b[2 * j + 1]));
            c[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
        }
        // add the 128-bit lanes pairwise, twice
        let d0 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(c[0], c[1]), _mm512_shuffle_f32x4::<0xdd>(c[0], c[1]));
        let d1 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(c[2], c[3]), _mm512_shuffle_f32x4::<0xdd>(c[2], c[3]));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(d0, d1), _mm512_shuffle_f32x4::<0xdd>(d0, d1))
    }

    /// `o: [group.len(), latent]` for the query rows of `group` (one sequence's cache).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn group(group: &[OneQuery], o: &mut [f32]) {
        let Some(first) = group.first() else { return };
        let (latent, rope) = (first.latent, first.q_pe.len());
        let row = latent + rope;
        let e = first.entries.as_ptr();
        // each query as masked 16-lane parts of the latent and rope sections: (values, offset, mask)
        let parts = |len: usize| (0..len.div_ceil(16)).map(move |v| (v * 16, lane_mask(len - v * 16)));
        let qs: Vec<Vec<(__m512, usize, __mmask16)>> = group
            .iter()
            .map(|q| {
                parts(latent)
                    .map(|(i, m)| (_mm512_maskz_loadu_ps(m, q.q_lat.as_ptr().add(i)), i, m))
                    .chain(parts(rope).map(|(i, m)| (_mm512_maskz_loadu_ps(m, q.q_pe.as_ptr().add(i)), latent + i, m)))
                    .collect()
            })
            .collect();
        // running max and sum of each row's softmax
        let mut max = vec![f32::NEG_INFINITY; group.len()];
        let mut sum = vec![0f32; group.len()];
        o.fill(0.0);
        let seen = group.iter().map(|q| q.seen).max().unwrap_or(0);
        let mut p = [0f32; BLOCK];
        for t0 in (0..seen).step_by(BLOCK) {
            for (g, q) in group.iter().enumerate() {
                let n = q.seen.saturating_sub(t0).min(BLOCK);
                if n == 0 {
                    continue;
                }
                // scores: 16 rows at a time, their sums transposed into one vector (no
                // horizontal sum per row), then four at a time against one load of the query
                let mut t = 0;
                while n - t >= 16 {
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for &(qv, i, m) in &qs[g] {
                        let er = e.add((t0 + t) * row + i);
                        for (k, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, er.add(k * row)), *acc);
                        }
                    }
                    _mm512_storeu_ps(p.as_mut_ptr().add(t), _mm512_mul_ps(_mm512_set1_ps(q.scale), sum16(&acc)));
                    t += 16;
                }
                while t < n {
                    let k4 = (n - t).min(4);
                    let mut acc = [_mm512_setzero_ps(); 4];
                    for &(qv, i, m) in &qs[g] {
                        let er = e.add((t0 + t) * row + i);
                        acc[0] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, er), acc[0]);
                        if k4 > 1 {
                            acc[1] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, er.add(row)), acc[1]);
                        }
                        if k4 > 2 {
                            acc[2] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, er.add(2 * row)), acc[2]);
                        }
                        if k4 > 3 {
                            acc[3] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, er.add(3 * row)), acc[3]);
                        }
                    }
                    for k in 0..k4 {
                        p[t + k] = q.scale * _mm512_reduce_add_ps(acc[k]);
                    }
                    t += k4;
                }
                let masks = [lane_mask(n), lane_mask(n.saturating_sub(16))];
                let neg = _mm512_set1_ps(f32::NEG_INFINITY);
                let block_max = _mm512_reduce_max_ps(_mm512_max_ps(
                    _mm512_mask_loadu_ps(neg, masks[0], p.as_ptr()),
                    _mm512_mask_loadu_ps(neg, masks[1], p.as_ptr().add(16)),
                ));
                let new_max = max[g].max(block_max);
                let rescale = (max[g] - new_max).exp();
                max[g] = new_max;
                let mut block_sum = _mm512_setzero_ps();
                for (h, &m) in masks.iter().enumerate() {
                    let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.as_ptr().add(16 * h)), _mm512_set1_ps(new_max));
                    let ex = _mm512_maskz_mov_ps(m, exp16(x));
                    _mm512_mask_storeu_ps(p.as_mut_ptr().add(16 * h), m, ex);
                    block_sum = _mm512_add_ps(block_sum, ex);
                }
                sum[g] = sum[g] * rescale + _mm512_reduce_add_ps(block_sum);
                // o = o · rescale + Σ p · latent, 256 latents at a time in registers
                let og = o.as_mut_ptr().add(g * latent);
                let rescale = _mm512_set1_ps(rescale);
                for b0 in (0..latent).step_by(256) {
                    let len = (latent - b0).min(256);
                    let nv = len.div_ceil(16);
                    let last = lane_mask(len - (nv - 1) * 16);
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for (v, acc) in acc.iter_mut().enumerate().take(nv) {
                        let m = if v + 1 == nv { last } else { u16::MAX };
                        *acc = _mm512_mul_ps(rescale, _mm512_maskz_loadu_ps(m, og.add(b0 + 16 * v)));
                    }
                    for (t, &pt) in p[..n].iter().enumerate() {
                        let (pv, er) = (_mm512_set1_ps(pt), e.add((t0 + t) * row + b0));
                        if nv == 16 {
                            for (v, acc) in acc.iter_mut().enumerate() {
                                *acc = _mm512_fmadd_ps(pv, _mm512_loadu_ps(er.add(16 * v)), *acc);
                            }
                        } else {
                            for (v, acc) in acc.iter_mut().enumerate().take(nv) {
                                let m = if v + 1 == nv { last } else { u16::MAX };
                                *acc = _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m, er.add(16 * v)), *acc);
                            }
                        }
                    }
                    for (v, acc) in acc.iter().enumerate().take(nv) {
                        let m = if v + 1 == nv { last } else { u16::MAX };
                        _mm512_mask_storeu_ps(og.add(b0 + 16 * v), m, *acc);
                    }
                }
            }
        }
        for (g, o) in o.chunks_exact_mut(latent).enumerate() {
            let inv = if sum[g] > 0.0 { 1.0 / sum[g] } else { 0.0 };
            o.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // sixteen independent sums so the loop vectorizes
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The plain definition, in f64 (for tests).
pub fn mla_attention_reference(q_lat: &[f32], q_pe: &[f32], entries: &[f32], shape: MlaShape, scale: f32) -> Vec<f32> {
    let MlaShape { heads, queries, tokens, latent, rope, start } = shape;
    let row = latent + rope;
    let mut out = vec![0f32; heads * queries * latent];
    for hq in 0..heads * queries {
        let i = hq % queries;
        let scores: Vec<f64> = (0..tokens)
            .map(|t| {
                if t > start + i {
                    return f64::NEG_INFINITY;
                }
                let e = &entries[t * row..(t + 1) * row];
                let s: f64 = (0..latent).map(|k| q_lat[hq * latent + k] as f64 * e[k] as f64).sum::<f64>()
                    + (0..rope).map(|k| q_pe[hq * rope + k] as f64 * e[latent + k] as f64).sum::<f64>();
                scale as f64 * s
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        for k in 0..latent {
            let v: f64 = (0..tokens).map(|t| (scores[t] - max).exp() / z * entries[t * row + k] as f64).sum();
            out[hq * latent + k] = v as f32;
        }
    }
    out
}
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    unsafe fn sums_of(v: &[f32]) -> [f32; 16] {
        let mut a = [_mm512_setzero_ps(); 16];
        for (k, a) in a.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(v.as_ptr().add(16 * k));
        }
        let mut out = [0f32; 16];
        _mm512_storeu_ps(out.as_mut_ptr(), super::wide::sum16(&a));
        out
    }

    #[test]
    fn sum16_sums_each_vector() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let v: Vec<f32> = (0..256).map(|i| ((i * 7919 % 257) as f32 - 128.0) / 16.0).collect();
        // SAFETY: AVX-512F checked above.
        let got = unsafe { sums_of(&v) };
        for (k, g) in got.iter().enumerate() {
            let want: f32 = v[16 * k..16 * (k + 1)].iter().sum();
            assert!((g - want).abs() <= 1e-5 * want.abs().max(1.0), "vector {k}: {g} vs {want}");
        }
    }
}
