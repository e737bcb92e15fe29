//! bf16 and FP8 weights × [`MIN_BATCH`] or more activation rows that are exactly bf16 (a
//! `--dtype bf16` model's batched decode, prefill chunks) with `vdpbf16ps`, eight activation rows
//! per vector.
//!
//! The row kernels (`simd::bf16_512`, `simd::fp8_bf16`) multiply a 32-column vector of a weight
//! row by the same columns of one activation row: each product step loads a weight vector and an
//! activation vector, and with many activation rows the loads, not the multiplies, set the pace
//! (measured on AMD Zen 4: about half of `vdpbf16ps`'s rate). Here a vector holds 4 columns of 8
//! activation rows instead (`[x_m[4q], x_m[4q+1]]` in lane `2m`, `[x_m[4q+2], x_m[4q+3]]` in lane
//! `2m + 1`, [`Activations::bf16_quads`]), and the weight operand is the same 4 columns of one
//! weight row broadcast to every lane (one 8-byte load): one vector load per 8 weight rows and
//! one narrow load per product step. FP8 rows are decoded 64 columns at a time by the byte tables
//! of `simd::fp8_bf16` into a small buffer that the broadcasts read.
//!
//! An output's two lanes are summed at the end, so its bits differ from the row kernels'
//! (16 partial sums): products of fewer rows keep the row kernels, and a row of an MTP
//! verification step (2–5 rows) or of a small batched decode step has the bits it has alone.

// Register-blocked loops index several accumulator arrays by the same counters.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::act::Activations;
use crate::format::{Format, PackedMatrix, FP8_VIA_F16_FACTOR};

/// From this many activation rows on: two tiles of 8 per weight broadcast. Below it the row
/// kernels, whose bits do not depend on the batch (and which were faster up to 12 rows). Zen 4,
/// 8192 × 4096, against the row kernels, interleaved: 16 rows FP8 3.12 against 3.88–4.02 ms, bf16
/// 3.02–3.41 against 3.43–3.53; 32 rows FP8 6.1 against 7.96, bf16 5.73–5.87 against 6.2–6.3; 128
/// rows FP8 23.7 against 35.4, bf16 20.9–21.5 against 24.6 (about 0.9 of `vdpbf16ps`'s rate).
pub(crate) const MIN_BATCH: usize = 16;

/// Activation rows a vector.
pub(crate) const TILE: usize = 8;

/// Whether a product of `w` with these activations takes this kernel (compiled with VBMI for the
/// FP8 decoding: a CPU with AVX-512 BF16 but without VBMI, such as Cooper Lake, keeps the row
/// kernels for bf16 weights too).
pub(crate) fn applies(w: &PackedMatrix, a: &Activations) -> bool {
    a.batch >= MIN_BATCH
        && a.bf16_exact.is_some()
        && crate::simd::fp8_bf16::available()
        && match w.format {
            Format::Bf16 => a.padded_cols.is_multiple_of(32),
            Format::Fp8 { .. } => crate::simd::fp8_bf16::applies(w.format, a.padded_cols),
            _ => false,
        }
}

/// Where the 4 columns `4q..4q + 4` of a 64-column step are in the FP8 decoding's buffer: the
/// two vectors of `vpunpcklbw` / `vpunpckhbw` hold columns `16L..16L + 8` and `16L + 8..16L + 16`
/// of each 128-bit lane `L` (see `simd::fp8_bf16`).
const fn quad_at(q: usize) -> usize {
    let (lane, within) = (q / 4, 4 * (q % 4));
    if within < 8 {
        8 * lane + within
    } else {
        32 + 8 * lane + within - 8
    }
}

/// `y[b * y_stride + r] = W[r] · x[b]` for the rows `r0..r1` and every activation row.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VBMI and BF16, [`applies`] must hold, and `y` must be valid
/// for the writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
pub(crate) unsafe fn rows(w: &PackedMatrix, a: &Activations, r0: usize, r1: usize, y: *mut f32, y_stride: usize) {
    let quads = a.bf16_quads();
    let tiles = a.batch.div_ceil(TILE);
    let out = Out { y, y_stride, batch: a.batch };
    // two tiles of activation rows against 4 weight rows, or a last one against 8: 8
    // accumulators (FP8: and 8 totals). One tile against 8 rows is the slower (one broadcast and,
    // for FP8, twice the decoding per product step; Zen 4, 8192 × 4096, 8 activation rows: FP8
    // 2.33 ms against the row kernel's 1.99, bf16 2.35–2.6 against 2.1–2.35), four against 2 rows
    // no faster than two against 4 (bf16 32 rows 7.0 ms against 5.7)
    let mut t = 0;
    while t < tiles {
        if tiles - t >= 2 {
            pass::<4, 2>(w, quads, a.padded_cols, t, r0, r1, out);
            t += 2;
        } else {
            pass::<8, 1>(w, quads, a.padded_cols, t, r0, r1, out);
            t += 1;
        }
    }
}

#[derive(Clone, Copy)]
struct Out {
    y: *mut f32,
    y_stride: usize,
    batch: usize,
}

/// Rows `r0..r1` against the activation tiles `t0..t0 + T`, `R` consecutive rows at a time.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
unsafe fn pass<const R: usize, const T: usize>(
    w: &PackedMatrix,
    quads: &[u32],
    pc: usize,
    t0: usize,
    r0: usize,
    r1: usize,
    out: Out,
) {
    let x: [*const u32; T] = std::array::from_fn(|t| quads.as_ptr().add((t0 + t) * pc / 4 * 2 * TILE));
    let mut r = r0;
    while r < r1 {
        if r + R <= r1 {
            let sums = tile::<R, T>(w, std::array::from_fn(|j| r + j), x, pc);
            store(out, t0, std::array::from_fn(|j| r + j), &sums);
            r += R;
        } else {
            let sums = tile::<1, T>(w, [r], x, pc);
            store(out, t0, [r], &sums);
            r += 1;
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
unsafe fn tile<const R: usize, const T: usize>(
    w: &PackedMatrix,
    rr: [usize; R],
    x: [*const u32; T],
    pc: usize,
) -> [[__m512; R]; T] {
    match w.format {
        Format::Fp8 { block } => fp8_tile(rr.map(|r| (w.row(r).as_ptr(), w.fp8_row_scales(r))), block[1], x, pc),
        _ => bf16_tile(rr.map(|r| w.row(r).as_ptr() as *const u16), x, pc),
    }
}

/// The 8-byte weight operand: columns `4q..4q + 4` of a row, as bf16, in every 64-bit lane.
#[inline(always)]
unsafe fn broadcast(p: *const u16) -> __m512bh {
    as_bf16(_mm512_set1_epi64((p as *const i64).read_unaligned()))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn bf16_tile<const R: usize, const T: usize>(rows: [*const u16; R], x: [*const u32; T], pc: usize) -> [[__m512; R]; T] {
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    for k in (0..pc).step_by(32) {
        for j in 0..R {
            crate::simd::prefetch_row(rows[j].add(k) as *const u8);
        }
        for q in 0..8 {
            let c = k + 4 * q;
            let xv: [__m512bh; T] = std::array::from_fn(|t| as_bf16(_mm512_loadu_si512(x[t].add(c / 4 * 2 * TILE) as *const _)));
            for j in 0..R {
                let wv = broadcast(rows[j].add(c));
                for t in 0..T {
                    acc[t][j] = _mm512_dpbf16_ps(acc[t][j], wv, xv[t]);
                }
            }
        }
    }
    acc
}

/// Per scale block of `seg` columns, sums of exact products, then times the block's scale into
/// the totals (as `simd::fp8_bf16`). Each 64-column step's rows are decoded into one of two
/// buffers while the products read the other: the broadcasts then load bytes stored a step
/// earlier (Zen 4, 8192 × 4096, 16 activation rows: 3.13 ms against 3.20–3.27 with one buffer).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
unsafe fn fp8_tile<const R: usize, const T: usize>(
    rows: [(*const u8, &[f32]); R],
    seg: usize,
    x: [*const u32; T],
    pc: usize,
) -> [[__m512; R]; T] {
    #[repr(align(64))]
    struct Decoded<const R: usize>([[u16; 64]; R]);
    let tabs = crate::simd::fp8_bf16::tables().map(|t| _mm512_loadu_si512(t.as_ptr() as *const _));
    // the stored scales carry the f16 decoding's factor (`format::FP8_VIA_F16_FACTOR`)
    let unit = 1.0 / FP8_VIA_F16_FACTOR;
    let mut bufs = [Decoded([[0u16; 64]; R]), Decoded([[0u16; 64]; R])];
    // 64 columns of each row at `k`, decoded into `buf`
    let decode = |k: usize, buf: &mut Decoded<R>| {
        for j in 0..R {
            let p = rows[j].0.add(k);
            crate::simd::prefetch_row(p);
            let [first, second] = crate::simd::fp8_bf16::decode64(_mm512_loadu_si512(p as *const _), tabs);
            _mm512_storeu_si512(buf.0[j].as_mut_ptr() as *mut _, first);
            _mm512_storeu_si512(buf.0[j].as_mut_ptr().add(32) as *mut _, second);
        }
    };
    decode(0, &mut bufs[0]);
    let mut tot = [[_mm512_setzero_ps(); R]; T];
    for (si, k0) in (0..pc).step_by(seg).enumerate() {
        let mut acc = [[_mm512_setzero_ps(); R]; T];
        for k in (k0..(k0 + seg).min(pc)).step_by(64) {
            let [now, next] = if (k / 64).is_multiple_of(2) { [0, 1] } else { [1, 0] };
            if k + 64 < pc {
                decode(k + 64, &mut bufs[next]);
            }
            let buf = &bufs[now];
            for q in 0..16 {
                let c = k + 4 * q;
                let xv: [__m512bh; T] =
                    std::array::from_fn(|t| as_bf16(_mm512_loadu_si512(x[t].add(c / 4 * 2 * TILE) as *const _)));
                for j in 0..R {
                    let wv = broadcast(buf.0[j].as_ptr().add(quad_at(q)));
                    for t in 0..T {
                        acc[t][j] = _mm512_dpbf16_ps(acc[t][j], wv, xv[t]);
                    }
                }
            }
        }
        for j in 0..R {
            let s = _mm512_set1_ps(rows[j].1[si] * unit);
            for t in 0..T {
                tot[t][j] = _mm512_fmadd_ps(acc[t][j], s, tot[t][j]);
            }
        }
    }
    tot
}

/// Each output's two lanes summed and stored: activation row `8 (t0 + t) + m` of weight row
/// `rr[j]` from lanes `2m`, `2m + 1` of `sums[t][j]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store<const R: usize, const T: usize>(out: Out, t0: usize, rr: [usize; R], sums: &[[__m512; R]; T]) {
    for t in 0..T {
        let b0 = (t0 + t) * TILE;
        let n = out.batch.saturating_sub(b0).min(TILE);
        for j in 0..R {
            let v = sums[t][j];
            // lane 2m + (2m+1) in lane 2m, then the even lanes
            let pairs = _mm512_add_ps(v, _mm512_permute_ps::<0xb1>(v));
            let mut vals = [0f32; TILE];
            _mm256_storeu_si256(vals.as_mut_ptr() as *mut __m256i, _mm512_cvtepi64_epi32(_mm512_castps_si512(pairs)));
            for (m, v) in vals.iter().take(n).enumerate() {
                *out.y.add((b0 + m) * out.y_stride + rr[j]) = *v;
            }
        }
    }
}

/// 32 bf16 values, from their bits.
#[inline(always)]
fn as_bf16(v: __m512i) -> __m512bh {
    // SAFETY: both are 64 plain bytes
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

#[cfg(test)]
mod tests {
    /// `quad_at` finds each column where the FP8 decoding's unpacks put it (the order of
    /// `fp8_bf16::interleave`).
    #[test]
    fn quads_are_found_in_the_decoded_order() {
        let cols: Vec<u16> = (0..64).collect();
        let decoded = crate::simd::fp8_bf16::interleave(&cols, 64);
        for q in 0..16 {
            assert_eq!(&decoded[super::quad_at(q)..super::quad_at(q) + 4], &cols[4 * q..4 * q + 4], "quad {q}");
        }
    }
}
