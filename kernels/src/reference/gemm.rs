//! Reference of `gemm.cu`: `y = x · Wᵀ` for dense and FP8 block-scaled weights, single and
//! grouped (one weight per active expert over its rows of an expert-sorted list).

/// E4M3FN byte -> f32, exactly (the kernels' decode; `moeserve-quant` re-exports it).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man * 2f32.powi(-9)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// A weight `[n, k]` as the kernels read it.
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    Dense(&'a [f32]),
    /// Bytes `[n, k]` and `scale_inv` `[ceil(n / block[0]), ceil(k / block[1])]`.
    Fp8 {
        data: &'a [u8],
        scale: &'a [f32],
        block: [usize; 2],
    },
}

impl WeightRef<'_> {
    fn at(&self, r: usize, c: usize, k: usize) -> f32 {
        match *self {
            WeightRef::Dense(w) => w[r * k + c],
            WeightRef::Fp8 { data, scale, block } => {
                e4m3_to_f32(data[r * k + c]) * scale[(r / block[0]) * k.div_ceil(block[1]) + c / block[1]]
            }
        }
    }
}

/// `x: [m, k]` -> `[m, n]`, f32 accumulation (f64 here, the tighter reference).
pub fn gemm(x: &[f32], m: usize, w: WeightRef, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|c| x[i * k + c] as f64 * w.at(j, c, k) as f64).sum::<f64>() as f32;
        }
    }
    y
}

/// Grouped: rows `offsets[g]..offsets[g + 1]` of the sorted list use `weights[g]`; list row `p`
/// reads `x[row_idx[p]]` (identity without `row_idx`); returns `[offsets.last(), n]`.
pub fn grouped_gemm(x: &[f32], row_idx: Option<&[i32]>, offsets: &[i32], weights: &[WeightRef], n: usize, k: usize) -> Vec<f32> {
    let total = offsets.last().copied().unwrap_or(0) as usize;
    let mut y = vec![0f32; total * n];
    for (g, w) in weights.iter().enumerate() {
        for p in offsets[g] as usize..offsets[g + 1] as usize {
            let r = row_idx.map_or(p, |idx| idx[p] as usize);
            let out = gemm(&x[r * k..(r + 1) * k], 1, *w, n, k);
            y[p * n..(p + 1) * n].copy_from_slice(&out);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_blocks_scale_their_own_tile() {
        // 2 x 3 weight of 1.0 (0x38), block [1, 2]: scales per row [1, 2] and [3, 4]
        let data = [0x38u8; 6];
        let scale = [1.0, 2.0, 3.0, 4.0];
        let w = WeightRef::Fp8 { data: &data, scale: &scale, block: [1, 2] };
        let y = gemm(&[1.0, 10.0, 100.0], 1, w, 2, 3);
        assert_eq!(y, vec![1.0 + 10.0 + 200.0, 3.0 + 30.0 + 400.0]);
    }

    #[test]
    fn grouped_rows_use_their_group_weight() {
        let (a, b) = ([1.0f32, 0.0], [0.0f32, 1.0]); // [1, 2] weights: pick x[0] / pick x[1]
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 3 rows of 2
        let y = grouped_gemm(&x, Some(&[2, 0, 1]), &[0, 1, 3], &[WeightRef::Dense(&a), WeightRef::Dense(&b)], 1, 2);
        assert_eq!(y, vec![5.0, 2.0, 4.0]);
    }

    #[test]
    fn e4m3_decodes_the_grid() {
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
    }
}
