//! MLA attention in the absorbed form over the latent cache, fused: scores against the latent
//! rows and the rotated keys, the causal mask, the softmax and the weighted sum of latents in one
//! pass per (head, query), threaded over heads. Every cached row is one `[latent | rope]` entry.

use rayon::prelude::*;

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
    let MlaShape { heads, queries, tokens, latent, rope, start } = shape;
    let row = latent + rope;
    assert_eq!(q_lat.len(), heads * queries * latent, "q_lat");
    assert_eq!(q_pe.len(), heads * queries * rope, "q_pe");
    assert_eq!(entries.len(), tokens * row, "entries");
    let mut out = vec![0f32; heads * queries * latent];
    out.par_chunks_mut(latent).enumerate().for_each_init(
        || Vec::with_capacity(tokens),
        |scores, (hq, o)| {
            let (ql, qp) = (&q_lat[hq * latent..(hq + 1) * latent], &q_pe[hq * rope..(hq + 1) * rope]);
            let seen = (start + hq % queries + 1).min(tokens);
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for e in entries.chunks_exact(row).take(seen) {
                let s = scale * (dot(ql, &e[..latent]) + dot(qp, &e[latent..]));
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            for (p, e) in scores.iter().zip(entries.chunks_exact(row)) {
                let w = p * inv;
                o.iter_mut().zip(&e[..latent]).for_each(|(o, c)| *o += w * c);
            }
        },
    );
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // eight independent sums so the loop vectorizes
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
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
