//! Element-wise steps between the products of a layer, vectorized where the plain loop is not.

/// SwiGLU's `g = silu(g) · u = g / (1 + e^-g) · u`, in place. The plain loop calls the scalar
/// `expf` per value (about a tenth of a q4_K prefill before this); AVX-512 takes 16 at a time.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "silu_mul operands");
    #[cfg(target_arch = "x86_64")]
    if crate::matmul::available(crate::Backend::Avx512) {
        // SAFETY: AVX-512 (F, BW, VL) checked just above.
        unsafe { silu_mul_avx512(g, u) };
        return;
    }
    silu_mul_reference(g, u);
}

/// The plain loop [`silu_mul`] is tested against.
pub fn silu_mul_reference(g: &mut [f32], u: &[f32]) {
    for (g, u) in g.iter_mut().zip(u) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `e^((x − shift) · scale)` of every value: a sampler's unnormalized weights over a vocabulary
/// (`shift` the largest logit, `scale` 1 / temperature). The scalar `expf` takes about 1.5 ms
/// for 129k logits, a sixth of a decode step; AVX-512 takes 16 at a time. Values that are not
/// finite give unspecified weights (the caller skips them).
pub fn exp_shifted(x: &[f32], shift: f32, scale: f32) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if crate::matmul::available(crate::Backend::Avx512) {
        // SAFETY: AVX-512 (F, BW, VL) checked just above.
        return unsafe { exp_shifted_avx512(x, shift, scale) };
    }
    exp_shifted_reference(x, shift, scale)
}

/// The plain loop [`exp_shifted`] is tested against.
pub fn exp_shifted_reference(x: &[f32], shift: f32, scale: f32) -> Vec<f32> {
    x.iter().map(|&v| ((v - shift) * scale).exp()).collect()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn exp_shifted_avx512(x: &[f32], shift: f32, scale: f32) -> Vec<f32> {
    use std::arch::x86_64::*;
    let (shift, scale) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
    let mut out = vec![0f32; x.len()];
    for (o, x) in out.chunks_mut(16).zip(x.chunks(16)) {
        let m = crate::simd::lane_mask(x.len());
        let v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x.as_ptr()), shift), scale);
        _mm512_mask_storeu_ps(o.as_mut_ptr(), m, crate::simd::exp16(v));
    }
    out
}

/// RMSNorm of each `w.len()`-wide row of `x`: `w · x / sqrt(mean(x²) + eps)`, the statistics in
/// f32. One pass over the row for the sum of squares (in 16 independent lanes, so it vectorizes)
/// and one for the output, where candle's tensor ops take about ten allocating passes: a decode
/// step runs fifty of these on single rows.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    assert!(dim > 0 && x.len().is_multiple_of(dim), "rms_norm: {} values in rows of {dim}", x.len());
    let mut out = vec![0f32; x.len()];
    for (y, x) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        let inv = 1.0 / (mean_square(x) + eps).sqrt();
        y.iter_mut().zip(x).zip(w).for_each(|((y, x), w)| *y = x * inv * w);
    }
    out
}

/// `mean(x²)` of a row, summed in 16 independent lanes (so that it vectorizes).
fn mean_square(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for i in 0..16 {
            lanes[i] += c[i] * c[i];
        }
    }
    (lanes.iter().sum::<f32>() + tail) / x.len() as f32
}

/// [`rms_norm`] for a bf16 model, as its tensor ops compute it (HF's order): each row divided
/// by `sqrt(mean(x²) + eps)` in f32, rounded to bf16, then times the bf16 weight `w` (its values)
/// and rounded again. One pass for the statistics and one for the output, against candle's
/// seven allocating ops on bf16 tensors.
pub fn rms_norm_bf16(x: &[f32], w: &[f32], eps: f32) -> Vec<half::bf16> {
    let dim = w.len();
    assert!(dim > 0 && x.len().is_multiple_of(dim), "rms_norm_bf16: {} values in rows of {dim}", x.len());
    let mut out = vec![half::bf16::ZERO; x.len()];
    for (y, x) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        let rms = (mean_square(x) + eps).sqrt();
        let round = half::bf16::from_f32;
        y.iter_mut().zip(x).zip(w).for_each(|((y, x), w)| *y = round(round(x / rms).to_f32() * w));
    }
    out
}

/// Rotary embedding on interleaved pairs, in place: `x: [n, heads, 2·half]`, `cos, sin: [n, half]`;
/// each pair `(a, b)` of token t becomes `(a·cos − b·sin, a·sin + b·cos)` (candle's `rope_i`).
pub fn rope_interleaved(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, half: usize) {
    assert!(half > 0 && cos.len() == sin.len() && x.len() == cos.len() * heads * 2, "rope operands");
    for ((token, cos), sin) in x.chunks_exact_mut(heads * 2 * half).zip(cos.chunks_exact(half)).zip(sin.chunks_exact(half)) {
        for head in token.chunks_exact_mut(2 * half) {
            for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn silu_mul_avx512(g: &mut [f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    for (gc, uc) in g.chunks_mut(16).zip(u.chunks(16)) {
        let m: __mmask16 = if gc.len() == 16 { u16::MAX } else { (1u16 << gc.len()) - 1 };
        let x = _mm512_maskz_loadu_ps(m, gc.as_ptr());
        let e = crate::simd::exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        let y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(m, uc.as_ptr()));
        _mm512_mask_storeu_ps(gc.as_mut_ptr(), m, y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_each_pair_by_its_tokens_angle() {
        let (n, heads, half) = (3, 2, 4);
        let x: Vec<f32> = (0..n * heads * 2 * half).map(|i| (i as f32 * 0.37).sin()).collect();
        let angle = |t: usize, i: usize| (t + 1) as f32 * 0.5f32.powi(i as i32);
        let cos: Vec<f32> = (0..n * half).map(|k| angle(k / half, k % half).cos()).collect();
        let sin: Vec<f32> = (0..n * half).map(|k| angle(k / half, k % half).sin()).collect();
        let mut y = x.clone();
        rope_interleaved(&mut y, &cos, &sin, heads, half);
        for t in 0..n {
            for h in 0..heads {
                for i in 0..half {
                    let at = (t * heads + h) * 2 * half + 2 * i;
                    let (a, b, th) = (x[at], x[at + 1], angle(t, i));
                    assert!((y[at] - (a * th.cos() - b * th.sin())).abs() < 1e-6);
                    assert!((y[at + 1] - (a * th.sin() + b * th.cos())).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn exp_shifted_matches_the_plain_loop() {
        // a vocabulary-like row: ragged length, weights from 1 down to underflow
        let x: Vec<f32> = (0..1037).map(|i| ((i * 7919) % 1000) as f32 * 0.05 - 20.0).collect();
        let (shift, scale) = (29.95, 1.0 / 0.6);
        let want = exp_shifted_reference(&x, shift, scale);
        for ((g, w), v) in exp_shifted(&x, shift, scale).iter().zip(&want).zip(&x) {
            // relative 4e-7, plus the argument's rounding (1e-7 of its size)
            let arg = ((v - shift) * scale).abs();
            assert!((g - w).abs() <= (4e-7 + 1e-7 * arg) * w + 1e-37, "{g} vs {w}");
        }
    }

    #[test]
    fn rms_norm_matches_its_definition() {
        let mut s = 0x2545f4914f6cdd1du64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (rows, dim) in [(1, 1), (3, 7), (2, 1024), (5, 531)] {
            let x: Vec<f32> = (0..rows * dim).map(|_| rnd() * 8.0).collect();
            let w: Vec<f32> = (0..dim).map(|_| rnd() + 1.0).collect();
            let got = rms_norm(&x, &w, 1e-6);
            for (r, x) in x.chunks(dim).enumerate() {
                let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
                for c in 0..dim {
                    let want = w[c] as f64 * x[c] as f64 / (ms + 1e-6).sqrt();
                    let g = got[r * dim + c] as f64;
                    assert!((g - want).abs() <= 1e-6 * want.abs().max(1e-3), "row {r} col {c}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_the_plain_loop() {
        // ragged length, both signs, large magnitudes (overflow of e^-g, flush to zero)
        let mut s = 0x9e3779b97f4a7c15u64;
        let mut g: Vec<f32> = (0..1037)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 10f32.powi((s % 4) as i32)
            })
            .collect();
        g[..6].copy_from_slice(&[-200.0, -90.0, -20.0, 0.0, 20.0, 200.0]);
        let u: Vec<f32> = g.iter().rev().map(|v| v * 0.5 + 1.0).collect();
        let (mut fast, mut slow) = (g.clone(), g.clone());
        silu_mul(&mut fast, &u);
        silu_mul_reference(&mut slow, &u);
        // e^x's relative error grows with |x| through the rounding of x·log2(e) (2^-24 of it)
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            let tol = (4e-7 + 1e-7 * g[i].abs()) * b.abs() + 1e-30;
            assert!((a - b).abs() <= tol, "{i}: g {} u {}: {a} vs {b}", g[i], u[i]);
        }
    }
}
