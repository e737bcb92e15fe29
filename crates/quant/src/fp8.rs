//! FP8 E4M3 ("fn": no infinities, max ±448) decoding and DeepSeek block-scaled dequantization.

use std::ops::Range;

/// Decode one E4M3FN byte exactly (every E4M3 value is representable in f32): the same
/// decode the CUDA kernels' reference uses.
pub use moeserve_kernels::reference::gemm::e4m3_to_f32;

/// All 256 decoded values, for table lookup in the dequantization loops.
pub fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = e4m3_to_f32(i as u8);
    }
    t
}

/// Block-scaled FP8 weight as stored: `data` is `[rows, cols]` row-major, `scale_inv` is
/// `[ceil(rows/block[0]), ceil(cols/block[1])]` row-major.
pub struct Fp8Block<'a> {
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub scale_inv: &'a [f32],
    pub block: [usize; 2],
}

impl Fp8Block<'_> {
    pub fn scale_dims(rows: usize, cols: usize, block: [usize; 2]) -> [usize; 2] {
        [rows.div_ceil(block[0]), cols.div_ceil(block[1])]
    }

    /// `W[r, c] = f32(q[r, c]) × scale_inv[r / bo, c / bi]` over a row and column range, in f32.
    pub fn dequantize(&self, rows: Range<usize>, cols: Range<usize>) -> Vec<f32> {
        let table = e4m3_table();
        let [bo, bi] = self.block;
        let scale_cols = self.cols.div_ceil(bi);
        let mut out = Vec::with_capacity(rows.len() * cols.len());
        for r in rows {
            let row = &self.data[r * self.cols..(r + 1) * self.cols];
            let srow = &self.scale_inv[(r / bo) * scale_cols..(r / bo + 1) * scale_cols];
            out.extend(cols.clone().map(|c| table[row[c] as usize] * srow[c / bi]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // exp 7, mantissa 0
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // max finite
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(e4m3_to_f32(0x3c), 1.5);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn matches_half_crate_f8_conversion_via_f32_grid() {
        // every finite E4M3 value is a multiple of 2^-9 and at most 448
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            assert!(v.abs() <= 448.0);
            assert_eq!((v * 512.0).fract(), 0.0, "byte {b:#x} -> {v}");
        }
    }

    #[test]
    fn the_kernels_decode_every_byte_alike() {
        for b in 0..=255u8 {
            let (a, k) = (e4m3_to_f32(b), moeserve_kernels::reference::gemm::e4m3_to_f32(b));
            assert!(a == k || (a.is_nan() && k.is_nan()), "byte {b:#x}: {a} vs {k}");
        }
        // block-scaled dequantization agrees with the kernels' reference GEMM on a ragged shape
        let (rows, cols, block) = (5, 7, [2, 3]);
        let data: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 120) as u8).collect();
        let scale: Vec<f32> = (0..9).map(|i| 0.5 + i as f32).collect();
        let w = Fp8Block { data: &data, rows, cols, scale_inv: &scale, block };
        let dense = w.dequantize(0..rows, 0..cols);
        let x: Vec<f32> = (0..cols).map(|i| i as f32 - 3.0).collect();
        let want: Vec<f32> = dense.chunks(cols).map(|r| r.iter().zip(&x).map(|(a, b)| a * b).sum()).collect();
        let fp8 = moeserve_kernels::reference::gemm::WeightRef::Fp8 { data: &data, scale: &scale, block };
        let got = moeserve_kernels::reference::gemm::gemm(&x, 1, fp8, rows, cols);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn partial_edge_blocks_use_their_own_scale() {
        // 3x5 weight, block [2, 2] -> scales [2, 3]; every byte 1.0
        let data = vec![0x38u8; 15];
        let scale: Vec<f32> = (0..6).map(|i| (i + 1) as f32).collect();
        let w = Fp8Block { data: &data, rows: 3, cols: 5, scale_inv: &scale, block: [2, 2] };
        let full = w.dequantize(0..3, 0..5);
        assert_eq!(&full[0..5], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&full[10..15], &[4.0, 4.0, 5.0, 5.0, 6.0]);
        // a slice sees the same values as the full matrix
        assert_eq!(w.dequantize(1..3, 3..5), vec![2.0, 3.0, 5.0, 6.0]);
    }
}
