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
    out.par_chunks_mut(latent).enumerate().for_each_init(
        || Vec::with_capacity(tokens),
        |scores, (hq, o)| {
            let one = OneQuery {
                q_lat: &q_lat[hq * latent..(hq + 1) * latent],
                q_pe: &q_pe[hq * rope..(hq + 1) * rope],
                entries,
                seen: (start + hq % queries + 1).min(tokens),
                latent,
                scale,
            };
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: the CPU has the features (`wide_available`).
                return unsafe { one.run_avx512(scores, o) };
            }
            let _ = wide;
            one.run(scores, o)
        },
    );
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

    /// [`Self::run`] with AVX-512: four rows' scores at a time (the query is loaded once for
    /// four rows), and the weighted sum over 256 latents at a time in sixteen registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512(&self, scores: &mut Vec<f32>, o: &mut [f32]) {
        use std::arch::x86_64::*;
        let (latent, rope) = (self.latent, self.q_pe.len());
        let row = latent + rope;
        let e = self.entries.as_ptr();
        // the query as whole and masked 16-lane parts of the latent and rope sections
        let parts = |len: usize| (0..len.div_ceil(16)).map(move |v| (v * 16, lane_mask(len - v * 16)));
        let q: Vec<(__m512, usize, __mmask16)> = parts(latent)
            .map(|(i, m)| (_mm512_maskz_loadu_ps(m, self.q_lat.as_ptr().add(i)), i, m))
            .chain(parts(rope).map(|(i, m)| (_mm512_maskz_loadu_ps(m, self.q_pe.as_ptr().add(i)), latent + i, m)))
            .collect();
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        let mut t = 0;
        while t < self.seen {
            let n = (self.seen - t).min(4);
            let mut acc = [_mm512_setzero_ps(); 4];
            for &(qv, i, m) in &q {
                for (k, acc) in acc.iter_mut().enumerate().take(n) {
                    *acc = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, e.add((t + k) * row + i)), *acc);
                }
            }
            for acc in &acc[..n] {
                let s = self.scale * _mm512_reduce_add_ps(*acc);
                max = max.max(s);
                scores.push(s);
            }
            t += n;
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = _mm512_set1_ps(1.0 / sum);
        for b0 in (0..latent).step_by(256) {
            let len = (latent - b0).min(256);
            let masks: [__mmask16; 16] = std::array::from_fn(|v| lane_mask(len.saturating_sub(v * 16)));
            let mut acc = [_mm512_setzero_ps(); 16];
            for (t, &p) in scores.iter().enumerate() {
                let (p, er) = (_mm512_set1_ps(p), e.add(t * row + b0));
                for (v, acc) in acc.iter_mut().enumerate() {
                    if masks[v] != 0 {
                        *acc = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(masks[v], er.add(v * 16)), *acc);
                    }
                }
            }
            for (v, acc) in acc.iter().enumerate() {
                if masks[v] != 0 {
                    _mm512_mask_storeu_ps(o.as_mut_ptr().add(b0 + v * 16), masks[v], _mm512_mul_ps(*acc, inv));
                }
            }
        }
    }
}

/// The first `min(n, 16)` lanes.
#[cfg(target_arch = "x86_64")]
fn lane_mask(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
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
