//! x86-64 SIMD kernels, instantiated twice from one body: `avx2` (AVX2 + FMA + F16C) and
//! `avx512` (the same code compiled with AVX-512VL/BW enabled, so it has 32 vector registers for
//! larger tiles). One weight row is streamed once from memory and then reused from L1 for every
//! tile of activation rows (up to 4 with AVX2, 8 with AVX-512); each tile keeps its accumulators in
//! registers. q8_0, stored in groups of 16 rows, has its own kernels (`q8_0x16`: 16 rows per
//! vector, `vpdpbusd` with AVX-512 VNNI).
//!
//! - f32 / bf16 / FP8: weights converted to f32 in registers (bf16: a 16-bit shift; FP8: the f16
//!   bit trick of `format::fp8_via_f16`, then `vcvtph2ps`, or on AMD with AVX-512 an integer
//!   shift into the f32 fields, see `simd::fp8_512`), FMA with f32 activations; FP8 block scales
//!   are applied once per column block.
//! - bf16 and FP8 with activations that are exactly bf16 (a `--dtype bf16` model), AVX-512 BF16:
//!   `vdpbf16ps` on the stored weights (`simd::bf16_512`) or on FP8 bytes decoded to bf16 by
//!   byte tables (`simd::fp8_bf16`), twice the multiply rate of the FMAs; from 16 activation
//!   rows on, 8 activation rows per vector against broadcast weights (`simd::batch_bf16`).
//! - q4_K / q6_K: integer dot products against 8-bit activations (`vpmaddubsw`, `vpmaddwd`),
//!   block scales applied in f32 once per block.

macro_rules! x86_kernels {
    ($features:literal, [$($detect:tt),*], $max_tile:literal, $vnni:literal) => {
// Register-blocked loops index several accumulator arrays by the same counters.
#[allow(clippy::missing_safety_doc, clippy::needless_range_loop)]
mod kernels {
use std::arch::x86_64::*;

use crate::act::Activations;
use crate::format::{Format, PackedMatrix, Q6K_BLOCK};
use crate::simd::f16_at;

const F32: u8 = 0;
const BF16: u8 = 1;
const FP8: u8 = 2;

/// Whether this CPU runs these kernels.
pub fn available() -> bool {
    $(is_x86_feature_detected!($detect))&&*
}

/// `y[r] = W[r] · x[b]` for the rows `r0..r1` of a grouped (q8_0, q4_K) matrix and the one
/// activation row `b` (MLA's absorption products: each head's rows against its own queries).
///
/// # Safety
/// `available()` must be true, `w` grouped, `b < a.batch`, and `y` valid for those writes.
pub unsafe fn grouped_rows_of(w: &PackedMatrix, a: &Activations, b: usize, r0: usize, r1: usize, y: *mut f32) {
    crate::simd::grouped::rows(w, a, b..b + 1, r0, r1, y, 0, $vnni)
}

/// `y[b * y_stride + r] = W[r] · x[b]` for rows `r0..r1` and every activation row.
///
/// # Safety
/// `available()` must be true, and `y` must be valid for those writes.
pub unsafe fn rows(w: &PackedMatrix, a: &Activations, r0: usize, r1: usize, y: *mut f32, y_stride: usize) {
    if w.grouped {
        // groups of 16 rows, at every batch size (integer tiles beat the f32 panels)
        return crate::simd::grouped::rows(w, a, 0..a.batch, r0, r1, y, y_stride, $vnni);
    }
    if $max_tile == 8 && a.bf16_exact.is_some() {
        // exact bf16 activations, prepared only for bf16 and FP8 weights where their
        // `vdpbf16ps` kernel runs (FP8 decoded to bf16 first); eight activation rows a vector
        // from `batch_bf16::MIN_BATCH` rows on
        if crate::simd::batch_bf16::applies(w, a) {
            return crate::simd::batch_bf16::rows(w, a, r0, r1, y, y_stride);
        }
        return match w.format {
            Format::Fp8 { .. } => crate::simd::fp8_bf16::rows(w, a, r0, r1, y, y_stride),
            _ => crate::simd::bf16_512::rows(w, a, r0, r1, y, y_stride),
        };
    }
    if a.batch >= gemm_min_batch(w.format, $max_tile) {
        return rows_gemm(w, a, r0, r1, y, y_stride);
    }
    // several rows at a time, each from its own part of the range: independent memory streams
    // per thread read more per second than one (two streams about a third more than one), and
    // the float formats' single accumulator per output needs independent chains. Eight streams
    // for one activation row of the float formats, four for one or two rows otherwise (AVX2's
    // q6_K tiles would spill)
    let float = matches!(w.format, Format::F32 | Format::Bf16 | Format::Fp8 { .. });
    if ($max_tile == 8 || float) && a.batch <= 2 {
        if a.batch == 1 && w.format != Format::Q6K {
            return streams::<8>(w, a, r0, r1, y, y_stride);
        }
        return streams::<4>(w, a, r0, r1, y, y_stride);
    }
    // AVX-512 q6_K keeps four streams up to 4 rows, where it is still memory-bound (Zen 4,
    // 8192 × 4096, interleaved: batch 4 1350–1400 → 1118–1132 µs, batch 3 920–960 → 874–892;
    // batch 6 no faster, batch 8 slower: 1960 → 2240)
    if $max_tile == 8 && w.format == Format::Q6K && a.batch <= 4 {
        return streams::<4>(w, a, r0, r1, y, y_stride);
    }
    streams::<2>(w, a, r0, r1, y, y_stride)
}

/// Rows `r0..r1` as `R` interleaved streams, one from each `R`-th part of the range.
unsafe fn streams<const R: usize>(w: &PackedMatrix, a: &Activations, r0: usize, r1: usize, y: *mut f32, y_stride: usize) {
    let part = (r1 - r0) / R;
    for i in 0..part {
        tiles::<R>(w, a, std::array::from_fn(|k| r0 + k * part + i), y, y_stride);
    }
    for r in r0 + R * part..r1 {
        tiles::<1>(w, a, [r], y, y_stride);
    }
}

unsafe fn tiles<const R: usize>(w: &PackedMatrix, a: &Activations, rr: [usize; R], y: *mut f32, y_stride: usize) {
    let mut b0 = 0;
    while b0 < a.batch {
        // AVX2's q6_K keeps per-tile integer sums beside the float ones, and the AVX-512 FP8
        // kernel its block sums beside the totals: at most 4 rows a tile
        let cap = if (w.format == Format::Q6K && $max_tile != 8) || fp8_512_applies(w) { 4 } else { $max_tile };
        let bt = (a.batch - b0).min(cap);
        let mut out = [[0f32; 8]; R];
        match bt {
            1 => tile::<R, 1>(w, a, rr, b0, &mut out),
            2 => tile::<R, 2>(w, a, rr, b0, &mut out),
            3 => tile::<R, 3>(w, a, rr, b0, &mut out),
            4 => tile::<R, 4>(w, a, rr, b0, &mut out),
            5 => tile::<R, 5>(w, a, rr, b0, &mut out),
            6 => tile::<R, 6>(w, a, rr, b0, &mut out),
            7 => tile::<R, 7>(w, a, rr, b0, &mut out),
            _ => tile::<R, 8>(w, a, rr, b0, &mut out),
        }
        for (o, &r) in out.iter().zip(&rr) {
            for (i, v) in o.iter().take(bt).enumerate() {
                *y.add((b0 + i) * y_stride + r) = *v;
            }
        }
        b0 += bt;
    }
}

/// From this many activation rows on, products are compute-bound: panels of weight rows are
/// decoded to f32 once and multiplied by a register-blocked GEMM (the `gemm` crate).
pub const GEMM_MIN_BATCH: usize = 64;

/// From how many activation rows products decode each weight once into f32 panels
/// and run the GEMM. Measured: below 64 rows the tiles win for every format, even though the
/// block formats re-decode their blocks every 4 rows (the f32 panels cost 4x the weight bytes in
/// memory traffic). q6_K's tiles win further: its panels decode slowly (Zen 4, 8192 × 4096,
/// AVX-512: 64 rows 51 → 17 ms, 128 rows 72 → 32, 512 rows 194 → 137 ms with its tiles; AVX2
/// tiles: 64 rows 52 → 35 ms, 128 rows 72 → 79, so from 128 rows the panels). `max_tile`: the
/// kernels' widest tile of activation rows (8: AVX-512). `MOESERVE_GEMM_MIN_BATCH` overrides it
/// (experiments).
fn gemm_min_batch(format: Format, max_tile: usize) -> usize {
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let over = *OVERRIDE.get_or_init(|| std::env::var("MOESERVE_GEMM_MIN_BATCH").ok().and_then(|v| v.parse().ok()));
    over.unwrap_or(match format {
        Format::Q6K if max_tile == 8 => usize::MAX,
        Format::Q6K => 2 * GEMM_MIN_BATCH,
        _ => GEMM_MIN_BATCH,
    })
}
const PANEL_ROWS: usize = 64;

thread_local! {
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

unsafe fn rows_gemm(w: &PackedMatrix, a: &Activations, r0: usize, r1: usize, y: *mut f32, y_stride: usize) {
    let pc = w.padded_cols;
    PANEL.with(|panel| {
        let mut panel = panel.borrow_mut();
        panel.resize(PANEL_ROWS * pc, 0.0);
        let mut p0 = r0;
        while p0 < r1 {
            let n = (r1 - p0).min(PANEL_ROWS);
            for i in 0..n {
                decode_row(w, p0 + i, &mut panel[i * pc..(i + 1) * pc]);
            }
            // y[b, p0 + j] = Σ_k x[b, k] · panel[j, k]
            gemm::gemm(
                a.batch,
                n,
                pc,
                y.add(p0),
                1,
                y_stride as isize,
                false,
                a.f32.as_ptr(),
                1,
                pc as isize,
                panel.as_ptr(),
                pc as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            p0 += n;
        }
    });
}

/// Row `r` as f32 (`padded_cols` values).
#[target_feature(enable = $features)]
unsafe fn decode_row(w: &PackedMatrix, r: usize, out: &mut [f32]) {
    if w.grouped {
        return w.decode_grouped_row(r, out);
    }
    let row = w.row(r).as_ptr();
    let pc = w.padded_cols;
    let o = out.as_mut_ptr();
    match w.format {
        Format::F32 => std::ptr::copy_nonoverlapping(row as *const f32, o, pc),
        Format::Bf16 => {
            for k in (0..pc).step_by(8) {
                _mm256_storeu_ps(o.add(k), load8::<BF16>(row, k));
            }
        }
        Format::Fp8 { block } => {
            let scales = w.fp8_row_scales(r);
            for k in (0..pc).step_by(8) {
                let s = _mm256_set1_ps(scales[k / block[1]]);
                _mm256_storeu_ps(o.add(k), _mm256_mul_ps(load8::<FP8>(row, k), s));
            }
        }
        Format::Q8_0 | Format::Q4K => {} // read from its group above
        Format::Q6K => out.copy_from_slice(&w.dequantize_row(r)),
    }
}

static ONE: [f32; 1] = [1.0];

/// Whether FP8 products take `simd::fp8_512` (AVX-512, scale blocks of whole 32 columns).
fn fp8_512_applies(w: &PackedMatrix) -> bool {
    $max_tile == 8 && matches!(w.format, Format::Fp8 { block } if block[1] % 32 == 0)
}

#[target_feature(enable = $features)]
unsafe fn tile<const R: usize, const BT: usize>(
    w: &PackedMatrix,
    a: &Activations,
    rr: [usize; R],
    b0: usize,
    out: &mut [[f32; 8]; R],
) {
    if w.grouped {
        debug_assert!(false, "grouped products go to simd::grouped");
        return;
    }
    let rows = rr.map(|r| w.row(r).as_ptr());
    let pc = w.padded_cols;
    let x = a.f32.as_ptr().add(b0 * pc);
    match w.format {
        Format::F32 => float_rows::<F32, R, BT>(rows, [&ONE[..]; R], pc, pc, x, out),
        Format::Bf16 => float_rows::<BF16, R, BT>(rows, [&ONE[..]; R], pc, pc, x, out),
        Format::Fp8 { block } if BT <= 4 && fp8_512_applies(w) => {
            let decode = crate::simd::fp8_512::decode();
            crate::simd::fp8_512::rows::<R, BT>(decode, rows, rr.map(|r| w.fp8_row_scales(r)), block[1], pc, x, out)
        }
        Format::Fp8 { block } if a.has_fp8_order() => {
            fp8_rows::<R, BT>(rows, rr.map(|r| w.fp8_row_scales(r)), block[1], pc, a.fp8_order().as_ptr().add(b0 * pc), out)
        }
        Format::Fp8 { block } => float_rows::<FP8, R, BT>(rows, rr.map(|r| w.fp8_row_scales(r)), block[1], pc, x, out),
        Format::Q8_0 | Format::Q4K => {} // never here (above)
        Format::Q6K if $max_tile == 8 => crate::simd::q6k_512::rows::<R, BT>(rows, pc / Q6K_BLOCK.1, a, b0, out),
        Format::Q6K => q6k_rows::<R, BT>(rows, pc / Q6K_BLOCK.1, a, b0, out),
    }
}

#[inline]
#[target_feature(enable = $features)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `out[j][b] = Σ lanes of acc[j][b] − minus[j][b]`.
#[inline]
#[target_feature(enable = $features)]
unsafe fn store_sums<const R: usize, const BT: usize>(acc: &[[__m256; BT]; R], minus: &[[f32; BT]; R], out: &mut [[f32; 8]; R]) {
    for j in 0..R {
        for b in 0..BT {
            out[j][b] = hsum(acc[j][b]) - minus[j][b];
        }
    }
}

/// Eight weights of row `row` at column `k`, as f32.
#[inline]
#[target_feature(enable = $features)]
unsafe fn load8<const F: u8>(row: *const u8, k: usize) -> __m256 {
    match F {
        F32 => _mm256_loadu_ps((row as *const f32).add(k)),
        BF16 => {
            let h = _mm_loadu_si128((row as *const u16).add(k) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
        _ => {
            let b = _mm_loadl_epi64(row.add(k) as *const __m128i);
            let h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16(0xbf80u16 as i16));
            _mm256_cvtph_ps(h)
        }
    }
}

/// FP8 (AVX2): 32 weights per load, converted to f16 bits with 16-bit shifts and masks on both
/// bytes of each lane (no byte shuffles), stored, and widened by `vcvtph2ps` from memory, which
/// needs no shuffle port; the activations come pre-ordered to match (`Activations::fp8_order`).
/// Scale blocks are whole multiples of 32 columns. One accumulator per output, as
/// [`float_rows`], whatever the tile.
#[inline]
#[target_feature(enable = $features)]
unsafe fn fp8_rows<const R: usize, const BT: usize>(
    rows: [*const u8; R],
    scales: [&[f32]; R],
    seg: usize,
    pc: usize,
    x: *const f32,
    out: &mut [[f32; 8]; R],
) {
    let (m_lo7, m_sign) = (_mm256_set1_epi16(0x3f80), _mm256_set1_epi16(0x8000u16 as i16));
    let mut halves = [0u16; 32];
    let hp = halves.as_mut_ptr();
    let mut tot = [[_mm256_setzero_ps(); BT]; R];
    let mut k0 = 0;
    let mut si = 0;
    while k0 < pc {
        let k1 = (k0 + seg).min(pc);
        let mut acc = [[_mm256_setzero_ps(); BT]; R];
        let mut k = k0;
        while k < k1 {
            for j in 0..R {
                let v = _mm256_loadu_si256(rows[j].add(k) as *const __m256i);
                // low byte of each lane -> even weights, high byte -> odd weights, as f16 bits
                let even = _mm256_or_si256(
                    _mm256_and_si256(_mm256_slli_epi16(v, 7), m_lo7),
                    _mm256_and_si256(_mm256_slli_epi16(v, 8), m_sign),
                );
                let odd = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 1), m_lo7), _mm256_and_si256(v, m_sign));
                _mm256_storeu_si256(hp as *mut __m256i, even);
                _mm256_storeu_si256(hp.add(16) as *mut __m256i, odd);
                for u in 0..4 {
                    let wv = _mm256_cvtph_ps(_mm_loadu_si128(hp.add(8 * u) as *const __m128i));
                    for b in 0..BT {
                        acc[j][b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(b * pc + k + 8 * u)), acc[j][b]);
                    }
                }
            }
            k += 32;
        }
        for j in 0..R {
            for b in 0..BT {
                tot[j][b] = _mm256_fmadd_ps(acc[j][b], _mm256_set1_ps(scales[j][si]), tot[j][b]);
            }
        }
        k0 = k1;
        si += 1;
    }
    store_sums(&tot, &[[0.0; BT]; R], out);
}

/// Float formats: one accumulator per output, whatever the tile, so that an output's bits do not
/// depend on the batch it is computed in (lossless MTP verification: a verification step's rows
/// get the bits of the plain decode steps'). The FMA latency is hidden by the tile's outputs:
/// tiles of one and two activation rows take 8 and 4 weight rows (`rows`). Column segments of
/// `seg` share one scale per row (FP8 blocks; the whole row otherwise).
#[inline]
#[target_feature(enable = $features)]
unsafe fn float_rows<const F: u8, const R: usize, const BT: usize>(
    rows: [*const u8; R],
    scales: [&[f32]; R],
    seg: usize,
    pc: usize,
    x: *const f32,
    out: &mut [[f32; 8]; R],
) {
    // weight bytes per column
    let bpw = match F {
        F32 => 4,
        BF16 => 2,
        _ => 1,
    };
    let mut tot = [[_mm256_setzero_ps(); BT]; R];
    let mut k0 = 0;
    let mut si = 0;
    while k0 < pc {
        // segments are whole multiples of 8 columns
        let k1 = (k0 + seg).min(pc);
        let mut acc = [[_mm256_setzero_ps(); BT]; R];
        for k in (k0..k1).step_by(8) {
            // each cache line of the weights, once
            if (k * bpw).is_multiple_of(64) {
                for j in 0..R {
                    crate::simd::prefetch_row(rows[j].add(k * bpw));
                }
            }
            let xv: [__m256; BT] = std::array::from_fn(|b| _mm256_loadu_ps(x.add(b * pc + k)));
            for j in 0..R {
                let wv = load8::<F>(rows[j], k);
                for b in 0..BT {
                    acc[j][b] = _mm256_fmadd_ps(wv, xv[b], acc[j][b]);
                }
            }
        }
        for j in 0..R {
            for b in 0..BT {
                tot[j][b] = if F == FP8 {
                    _mm256_fmadd_ps(acc[j][b], _mm256_set1_ps(scales[j][si]), tot[j][b])
                } else {
                    _mm256_add_ps(tot[j][b], acc[j][b])
                };
            }
        }
        k0 = k1;
        si += 1;
    }
    store_sums(&tot, &[[0.0; BT]; R], out);
}

/// Horizontal sums of the correction accumulators (`store_sums`' `minus`).
#[inline]
#[target_feature(enable = $features)]
unsafe fn hsums<const R: usize, const BT: usize>(v: &[[__m256; BT]; R]) -> [[f32; BT]; R] {
    let mut out = [[0f32; BT]; R];
    for j in 0..R {
        for b in 0..BT {
            out[j][b] = hsum(v[j][b]);
        }
    }
    out
}

#[target_feature(enable = $features)]
unsafe fn q6k_rows<const R: usize, const BT: usize>(
    rows: [*const u8; R],
    nsb: usize,
    a: &Activations,
    b0: usize,
    out: &mut [[f32; 8]; R],
) {
    let pc = a.padded_cols;
    let low4 = _mm256_set1_epi8(0x0f);
    let low2 = _mm256_set1_epi8(0x03);
    let mut acc = [[_mm256_setzero_ps(); BT]; R];
    // Σ 32 · scale · activations (the values are stored + 32), in vectors
    let mut offs = [[_mm256_setzero_ps(); BT]; R];
    for sb in 0..nsb {
        let mut sumi = [[_mm256_setzero_si256(); BT]; R];
        for h in 0..2 {
            for k in 0..4 {
                // 32 weights of each row: group k of half h (four groups share the loads; the
                // compiler hoists them)
                let mut q = [_mm256_setzero_si256(); R];
                let mut scale = [_mm256_setzero_si256(); R];
                for j in 0..R {
                    let bp = rows[j].add(sb * Q6K_BLOCK.0);
                    let ql = _mm256_loadu_si256(bp.add(64 * h + 32 * (k & 1)) as *const __m256i);
                    let qh = _mm256_loadu_si256(bp.add(128 + 32 * h) as *const __m256i);
                    let lo = if k < 2 { _mm256_and_si256(ql, low4) } else { _mm256_and_si256(_mm256_srli_epi16(ql, 4), low4) };
                    let hb = match k {
                        0 => qh,
                        1 => _mm256_srli_epi16(qh, 2),
                        2 => _mm256_srli_epi16(qh, 4),
                        _ => _mm256_srli_epi16(qh, 6),
                    };
                    q[j] = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, low2), 4));
                    let sc = bp.add(192) as *const i8;
                    let s = 8 * h + 2 * k;
                    scale[j] = _mm256_set_m128i(_mm_set1_epi16(*sc.add(s + 1) as i16), _mm_set1_epi16(*sc.add(s) as i16));
                }
                for b in 0..BT {
                    let xp = a.qs.as_ptr().add((b0 + b) * pc + sb * 256 + 128 * h + 32 * k);
                    let xv = _mm256_loadu_si256(xp as *const __m256i);
                    for j in 0..R {
                        let p = _mm256_maddubs_epi16(q[j], xv);
                        sumi[j][b] = _mm256_add_epi32(sumi[j][b], _mm256_madd_epi16(p, scale[j]));
                    }
                }
            }
        }
        for b in 0..BT {
            let dx = *a.d.get_unchecked((b0 + b) * (pc / 256) + sb);
            let s16 = _mm256_loadu_si256(a.sums16.as_ptr().add((b0 + b) * (pc / 16) + sb * 16) as *const __m256i);
            for j in 0..R {
                let bp = rows[j].add(sb * Q6K_BLOCK.0);
                let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(192) as *const __m128i));
                let d = f16_at(bp.add(208));
                let corr = _mm256_cvtepi32_ps(_mm256_madd_epi16(sc, s16));
                acc[j][b] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sumi[j][b]), acc[j][b]);
                offs[j][b] = _mm256_fmadd_ps(_mm256_set1_ps(32.0 * d * dx), corr, offs[j][b]);
            }
        }
    }
    store_sums(&acc, &hsums(&offs), out);
}
}
pub use kernels::*;
    };
}

/// The f16 at `p` as f32 in every lane.
///
/// # Safety
/// `p` must be readable for 2 bytes, and the CPU must have AVX2 and F16C.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn f16_splat(p: *const u8) -> std::arch::x86_64::__m256 {
    // a broadcast load writes the whole register; the compiler's choice for a scalar load
    // (`vpinsrw` into a register) would chain every call to the previous user of that register,
    // which made the q8_0 loops latency-bound
    let h: std::arch::x86_64::__m128i;
    std::arch::asm!("vpbroadcastw {h}, word ptr [{p}]", h = out(xmm_reg) h, p = in(reg) p, options(pure, readonly, nostack, preserves_flags));
    std::arch::x86_64::_mm256_cvtph_ps(h)
}

/// The f16 at `p` as f32.
///
/// # Safety
/// As [`f16_splat`].
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
    std::arch::x86_64::_mm256_cvtss_f32(f16_splat(p))
}

/// How far ahead of its loads a row kernel asks for each weight row's bytes, into L2. The
/// distance crosses into the next row of the stream, the one its next tile reads (rows are
/// contiguous). Measured on AMD Zen 4, 8192 × 4096: batch 4 of bf16 3.6–3.7 → 2.0–2.2 ms and of
/// FP8 2.3 → 1.7 ms (fewer streams per thread there: the hardware prefetchers alone fell short),
/// batch 8 bf16 5.2 → 3.8–4.0 ms; batch 1 unchanged within the noise. (q6_K reads without: its
/// batch 1 took 10 % longer with these prefetches.)
pub(crate) const ROW_PREFETCH: usize = 4096;

/// Ask for the cache line at `p + ROW_PREFETCH` (a row's stream, further on) to be brought into L2.
#[inline(always)]
pub(crate) unsafe fn prefetch_row(p: *const u8) {
    // (past the matrix's end for its last rows: a prefetch does not fault)
    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.wrapping_add(ROW_PREFETCH) as *const i8);
}

/// The first `min(n, 16)` lanes of a 16-lane mask.
#[inline(always)]
pub(crate) fn lane_mask(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// `e^x`: `2^k · 2^f` with `k` the nearest integer to `x·log2(e)` and `2^f` (`|f| <= 1/2`) a
/// degree-6 Taylor polynomial, relative error about 2e-7; below about -87 it flushes to zero and
/// above about 88 it overflows to infinity, both through `vscalefps`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const C: [f32; 6] = [std::f32::consts::LN_2, 0.240_226_5, 0.055_504_11, 0.009_618_129, 0.001_333_355, 0.000_154_035_3];
    let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
    let k = _mm512_roundscale_ps::<0x08>(t);
    let f = _mm512_sub_ps(t, k);
    let mut p = _mm512_set1_ps(C[5]);
    for &c in C[..5].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
    _mm512_scalef_ps(p, k)
}

/// `[Σ a[0], Σ a[1], .., Σ a[15]]`: the 16 vectors' sums in one vector, by a transposing tree
/// (45 instructions for 16 sums, against about 9 for each sum on its own).
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn sum16(a: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
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

pub(crate) mod batch_bf16;
pub(crate) mod fp8_bf16;
mod grouped;
mod row512;
pub(crate) use grouped::{q4k_group_scale, q4k_nibbles, q4k_scale_words};
pub(crate) use row512::{bf16_512, fp8_512, q6k_512};

/// AVX2 + FMA + F16C.
pub mod avx2 {
    x86_kernels!("avx2,fma,f16c", ["avx2", "fma", "f16c"], 4, false);
}

/// The same kernels with AVX-512 (VL, BW, VNNI) enabled: 32 vector registers and `vpdpbusd`.
pub mod avx512 {
    x86_kernels!(
        "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni",
        ["avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512bw", "avx512vnni"],
        8,
        true
    );
}
