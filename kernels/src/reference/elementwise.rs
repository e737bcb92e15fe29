//! References of `norm_rope.cu`: RMSNorm, interleaved rope, the latent-cache write.

use super::round_bf16;

/// `x: [rows, dim]`, `w: [dim]`: `r(r(x / sqrt(mean(x²) + eps)) · w)` with `r` the compute
/// dtype's rounding (`bf16` true: round to bf16; false: f32).
pub fn rms_norm(x: &[f32], w: &[f32], dim: usize, eps: f32, bf16: bool) -> Vec<f32> {
    let r = |v: f32| if bf16 { round_bf16(v) } else { v };
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let denom = (ss / dim as f32 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, w)| r(r(v / denom) * w)));
    }
    out
}

/// Strided `[n, heads, rope_dim]` input (element (t, h, i) at `t * st + h * sh + i`), `cos`/`sin`
/// `[n, rope_dim / 2]`; returns the contiguous rotated `[n, heads, rope_dim]` (interleaved pairs).
#[allow(clippy::too_many_arguments)]
pub fn rope_interleaved(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    n: usize,
    heads: usize,
    rope_dim: usize,
    st: usize,
    sh: usize,
) -> Vec<f32> {
    let half = rope_dim / 2;
    let mut out = vec![0f32; n * heads * rope_dim];
    for t in 0..n {
        for h in 0..heads {
            for i in 0..half {
                let (x0, x1) = (x[t * st + h * sh + 2 * i], x[t * st + h * sh + 2 * i + 1]);
                let (c, s) = (cos[t * half + i], sin[t * half + i]);
                let o = (t * heads + h) * rope_dim + 2 * i;
                out[o] = x0 * c - x1 * s;
                out[o + 1] = x0 * s + x1 * c;
            }
        }
    }
    out
}

/// `dst[slots[r]] = src[r]` row by row (`row_dim` wide).
pub fn cache_write(dst: &mut [f32], src: &[f32], slots: &[i32], row_dim: usize) {
    for (row, &slot) in src.chunks_exact(row_dim).zip(slots) {
        let at = slot as usize * row_dim;
        dst[at..at + row_dim].copy_from_slice(row);
    }
}

/// Pool rows of positions `start..start + n` for a block table (the engine's page layout).
pub fn slots_for(pages: &[u32], page_size: usize, start: usize, n: usize) -> Vec<i32> {
    (start..start + n).map(|p| (pages[p / page_size] as usize * page_size + p % page_size) as i32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rows() {
        let x = [3.0, 4.0, 0.0, 0.0];
        let y = rms_norm(&x, &[1.0, 2.0, 1.0, 1.0], 4, 0.0, false);
        let d = (25.0f32 / 4.0).sqrt();
        assert_eq!(y, vec![3.0 / d, 8.0 / d, 0.0, 0.0]);
    }

    #[test]
    fn rope_rotates_pairs_of_a_strided_view() {
        // one token, one head, a view starting at element 1 of a row of 5 (like q's rope part)
        let x = [9.0, 1.0, 0.0, 0.0, 1.0];
        let a = 0.5f32;
        let y = rope_interleaved(&x[1..], &[a.cos(), 1.0], &[a.sin(), 0.0], 1, 1, 4, 5, 4);
        assert_eq!(y, vec![a.cos(), a.sin(), 0.0, 1.0]);
    }

    #[test]
    fn cache_write_follows_the_block_table() {
        let slots = slots_for(&[2, 0], 2, 1, 3); // positions 1, 2, 3
        assert_eq!(slots, vec![5, 0, 1]);
        let mut pool = vec![0f32; 6 * 2];
        cache_write(&mut pool, &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0], &slots, 2);
        assert_eq!(pool, vec![2.0, 2.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
    }
}
