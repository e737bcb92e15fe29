//! FP8 (E4M3, block-scaled) weights × activations that are exactly bf16 (`Activations::bf16_exact`,
//! a `--dtype bf16` model's) with `vdpbf16ps`: each E4M3 byte becomes the bf16 of the same
//! value, exactly (every E4M3 value, subnormals included, is a normal bf16), by two byte-table
//! look-ups (`vpermi2b`: the high and the low byte of the bf16, indexed by the byte's 7 value
//! bits) and the sign copied in. The products are then exact and summed in f32, as the FMA
//! kernel's, at 32 products an instruction instead of 16; the decoding (5 instructions per 64
//! weights) is shared by the tile's activation rows. Batched decode and MTP verification of an
//! FP8 model are bound by the multiplies, not by the weight stream, so this is what makes them
//! cheaper.
//!
//! The bytes interleave into bf16 words per 128-bit lane (`vpunpcklbw` / `vpunpckhbw`): of each
//! 64 columns, the first vector holds columns `16L..16L + 8` of lanes `L = 0..4`, the second
//! `16L + 8..16L + 16`. The activations are stored in that order ([`interleave`]).

use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::act::Activations;
use crate::format::{fp8_via_f16, Format, PackedMatrix, FP8_VIA_F16_FACTOR};
use crate::simd::bf16_512::{in_batch_tiles, TILE_ROWS};

/// Weight rows a tile (memory streams per thread), against up to `TILE_ROWS` (4) activation
/// rows, for which each weight is decoded once: R × 4 block sums and as many totals fill 16 of
/// the 32 registers, the tables and operands most of the rest (1 × 8, 3 × 4, 4 × 2 and 2 × 8
/// measured slower at batch 8).
const R: usize = 2;

/// Whether an FP8 matrix of this block width and row length can take the kernel (its scale
/// blocks and rows whole 64-column steps).
pub(crate) fn applies(format: Format, padded_cols: usize) -> bool {
    matches!(format, Format::Fp8 { block } if block[1] % 64 == 0) && padded_cols.is_multiple_of(64)
}

/// bf16 activation bits `[batch, pc]` (`pc` a multiple of 64) in the kernel's column order.
pub(crate) fn interleave(x: &[u16], pc: usize) -> Vec<u16> {
    let mut out = vec![0u16; x.len()];
    for (o, x) in out.chunks_exact_mut(64).zip(x.chunks_exact(64)) {
        for lane in 0..4 {
            for i in 0..8 {
                o[8 * lane + i] = x[16 * lane + i];
                o[32 + 8 * lane + i] = x[16 * lane + 8 + i];
            }
        }
    }
    debug_assert!(pc.is_multiple_of(64) && x.len().is_multiple_of(pc));
    out
}

/// The high and low bytes of the bf16 of each E4M3 value `0..128` (sign clear), as the four
/// 64-byte tables of `vpermi2b`: high bytes of `0..64`, of `64..128`, then the low bytes'.
pub(crate) fn tables() -> &'static [[u8; 64]; 4] {
    static T: OnceLock<[[u8; 64]; 4]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [[0u8; 64]; 4];
        for v in 0..128usize {
            let bits = half::bf16::from_f32(fp8_via_f16(v as u8) * FP8_VIA_F16_FACTOR).to_bits();
            t[v / 64][v % 64] = (bits >> 8) as u8;
            t[2 + v / 64][v % 64] = bits as u8;
        }
        t
    })
}

/// 64 E4M3 bytes as the bf16 bits of their values, in the module's column order (the words of
/// `vpunpcklbw`, then of `vpunpckhbw`), by the byte tables `[hi0, hi1, lo0, lo1]` of [`tables`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) unsafe fn decode64(bytes: __m512i, [hi0, hi1, lo0, lo1]: [__m512i; 4]) -> [__m512i; 2] {
    let sign = _mm512_set1_epi8(0x80u8 as i8);
    // the high bytes with the sign (hi | bytes & 0x80), the low bytes
    let hi = _mm512_ternarylogic_epi32::<0xf8>(_mm512_permutex2var_epi8(hi0, bytes, hi1), bytes, sign);
    let lo = _mm512_permutex2var_epi8(lo0, bytes, lo1);
    [_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi)]
}

/// `y[b * y_stride + r] = W[r] · x[b]` for the rows `r0..r1` and every activation row.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VBMI and BF16, `w` is FP8 with [`applies`], `a` was
/// prepared for it with `bf16_exact` set, and `y` must be valid for the writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
pub(crate) unsafe fn rows(w: &PackedMatrix, a: &Activations, r0: usize, r1: usize, y: *mut f32, y_stride: usize) {
    let (Some(x), Format::Fp8 { block }) = (a.bf16_exact.as_deref(), w.format) else {
        debug_assert!(false, "fp8_bf16 without bf16 activations or FP8 weights");
        return;
    };
    let t = tables();
    let tabs = [0, 1, 2, 3].map(|i| _mm512_loadu_si512(t[i].as_ptr() as *const _));
    // a row's bytes and its scales
    let row = |r: usize| (w.row(r).as_ptr(), w.fp8_row_scales(r));
    let part = (r1 - r0) / R;
    for i in 0..part {
        let rr: [usize; R] = std::array::from_fn(|k| r0 + k * part + i);
        tiles::<R>(rr.map(row), rr, tabs, block[1], x, a, y, y_stride);
    }
    for r in r0 + R * part..r1 {
        tiles::<1>([row(r)], [r], tabs, block[1], x, a, y, y_stride);
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles<const N: usize>(
    rows: [(*const u8, &[f32]); N],
    rr: [usize; N],
    tabs: [__m512i; 4],
    seg: usize,
    x: &[u16],
    a: &Activations,
    y: *mut f32,
    y_stride: usize,
) {
    let pc = a.padded_cols;
    in_batch_tiles(rr, x, a, y, y_stride, |bt, xb, out| match bt {
        1 => tile::<N, 1>(rows, tabs, seg, xb, pc, out),
        2 => tile::<N, 2>(rows, tabs, seg, xb, pc, out),
        3 => tile::<N, 3>(rows, tabs, seg, xb, pc, out),
        _ => tile::<N, 4>(rows, tabs, seg, xb, pc, out),
    });
}

/// `out[j][b] = W[rows[j]] · x[b]`: per scale block of `seg` columns, sums of exact products,
/// then times the block's scale into the totals.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
#[allow(clippy::needless_range_loop)] // register-blocked: rows and activation rows index several arrays
unsafe fn tile<const N: usize, const BT: usize>(
    rows: [(*const u8, &[f32]); N],
    tabs: [__m512i; 4],
    seg: usize,
    x: *const u16,
    pc: usize,
    out: &mut [[f32; TILE_ROWS]; N],
) {
    // the stored scales carry the f16 decoding's factor (`format::FP8_VIA_F16_FACTOR`)
    let unit = 1.0 / FP8_VIA_F16_FACTOR;
    let mut tot = [[_mm512_setzero_ps(); BT]; N];
    for (si, k0) in (0..pc).step_by(seg).enumerate() {
        let mut acc = [[_mm512_setzero_ps(); BT]; N];
        for k in (k0..(k0 + seg).min(pc)).step_by(64) {
            let w: [[__m512bh; 2]; N] = std::array::from_fn(|j| {
                let p = rows[j].0.add(k);
                crate::simd::prefetch_row(p);
                decode64(_mm512_loadu_si512(p as *const _), tabs).map(as_bf16)
            });
            for b in 0..BT {
                let xp = x.add(b * pc + k);
                let xv = [as_bf16(_mm512_loadu_si512(xp as *const _)), as_bf16(_mm512_loadu_si512(xp.add(32) as *const _))];
                for j in 0..N {
                    acc[j][b] = _mm512_dpbf16_ps(acc[j][b], w[j][0], xv[0]);
                    acc[j][b] = _mm512_dpbf16_ps(acc[j][b], w[j][1], xv[1]);
                }
            }
        }
        for j in 0..N {
            let s = _mm512_set1_ps(rows[j].1[si] * unit);
            for b in 0..BT {
                tot[j][b] = _mm512_fmadd_ps(acc[j][b], s, tot[j][b]);
            }
        }
    }
    for j in 0..N {
        for b in 0..BT {
            out[j][b] = _mm512_reduce_add_ps(tot[j][b]);
        }
    }
}

/// 32 bf16 values, from their bits.
#[inline(always)]
fn as_bf16(v: __m512i) -> __m512bh {
    // SAFETY: both are 64 plain bytes
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    crate::simd::avx512::available() && is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512vbmi")
}

#[cfg(test)]
mod tests {
    /// The interleaved order is the one `vpunpcklbw` / `vpunpckhbw` give the decoded weights.
    #[test]
    fn interleave_matches_the_unpack_order() {
        let x: Vec<u16> = (0..128).collect();
        let o = super::interleave(&x, 64);
        assert_eq!(&o[..10], &[0, 1, 2, 3, 4, 5, 6, 7, 16, 17]);
        assert_eq!(&o[32..42], &[8, 9, 10, 11, 12, 13, 14, 15, 24, 25]);
        assert_eq!(&o[64..66], &[64, 65]);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, x);
    }
}
