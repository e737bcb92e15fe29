//! q8_0, q4_K and q6_K products on their grouped layouts ([`Q8_0_GROUP`], [`Q4K_GROUP_RECORD`],
//! [`Q6K_GROUP_RECORD`]): 16 weight rows at a time.
//!
//! A 64-byte vector of a group holds 4 consecutive columns of its 16 rows (q4_K: after masking
//! its low or high nibbles). `vpdpbusd` against the same 4 columns of one activation row (4
//! signed bytes broadcast to every lane) adds to the 16 rows' dot products in 16 int32 lanes;
//! eight such steps are a 32-column block. The block's sums are exact (q8_0: started from the
//! activations' `q8_offset`, as its weights are stored offset by 128), and one `fma` scales them
//! by the 16 rows' block scales times the activation block's scale (q4_K: `d · sc`, then the
//! mins `dmin · m` times the activations' scaled block sums). A group gives 16 consecutive
//! outputs per activation row: no horizontal sums, and each weight vector is loaded once for all
//! the activation rows of a tile. q6_K: each 16-column block's sums (4 `vpdpbusd`, from the
//! stored values' offset of 32 times the activations' block sum) times the rows' block scales,
//! summed over the superblock as exact integers, then one `fma` by `d` times the activations'
//! scale. Measured on 8192 × 4096 q8_0 (AMD Zen 4, with the streams
//! prefetched into L2, see [`Q8_AHEAD_L2`]): 2 and 4 activation rows cost what one does (0.96–1.08×),
//! 8 rows 1.1–1.4×. q4_K's packed 6-bit scales decode 16 rows at a time, as vectors.
//!
//! The AVX2 kernels (no VNNI) multiply with `vpmaddubsw` / `vpmaddwd` (q8_0: the weights turned
//! back into signed bytes), 8 rows per vector.

// Register-blocked loops index several accumulator arrays by the same counters.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use crate::act::Activations;
use crate::format::{
    Format, PackedMatrix, Q4K_GROUP_HEADER, Q4K_GROUP_RECORD, Q6K_GROUP_HALF, Q6K_GROUP_HEADER, Q6K_GROUP_RECORD, Q8_0_GROUP,
    Q8_0_GROUP_QUANTS,
};

/// How far ahead of its loads a q4_K kernel asks for its stream's bytes, into L2: the hardware
/// prefetchers take a while to pick up each new stream, and a unit of work reads only a few
/// kilobytes per stream. Measured on AMD Zen 4 (8192 × 4096, batch 1): into L2 two records ahead
/// 0.95–1.0 of the read bandwidth, against 0.80–0.90 with the same distance into L1.
const Q4K_PREFETCH: usize = 2 * Q4K_GROUP_RECORD;
/// The same for q6_K streams.
const Q6K_PREFETCH: usize = 2 * Q6K_GROUP_RECORD;
/// The same for q8_0 streams, in 32-column blocks of a group: into L2 eight blocks (4 KiB) ahead,
/// and, where the kernel is memory-bound (1–2 activation rows), into L1 one block ahead as well.
/// Zen 4, interleaved runs against two blocks ahead into L1: batch 1 of 8192 × 4096 1300–1420 →
/// 1040–1100 µs, of 32768 × 1024 (short rows) 1330–1410 → 1070–1120 µs, batch 8 1480–1540 →
/// 1110–1210 µs; one thread alone 17 → 22–25 GB/s. Prefetching into L1 only, farther ahead was
/// slower: the L1's few miss buffers fill up and the loads wait behind the prefetches.
const Q8_AHEAD_L2: usize = 8;

/// Where block `blk + ahead` of a q8_0 stream is: in the group at `q` (`nb` blocks), or in the
/// next group of the stream, which the next tile reads. Returns the block's quants and its
/// scales (past the matrix's end for its last blocks: a prefetch does not fault).
#[inline(always)]
fn q8_block_ahead(q: *const u8, nb: usize, blk: usize, ahead: usize) -> (*const u8, *const u8) {
    let (base, at) =
        if blk + ahead < nb { (q, blk + ahead) } else { (q.wrapping_add(nb * (Q8_0_GROUP_QUANTS + 32)), blk + ahead - nb) };
    (base.wrapping_add(at * Q8_0_GROUP_QUANTS), base.wrapping_add(nb * Q8_0_GROUP_QUANTS + at * 32))
}

/// `y[b * y_stride + r] = W[r] · x[b]` for the rows `r0..r1` and the activation rows `batch`,
/// through the groups that hold those rows. `wide`: the AVX-512 VNNI kernels, else AVX2.
///
/// # Safety
/// The CPU must have the kernel's features (AVX-512 F/BW/VL/VNNI, or AVX2/FMA/F16C), `w` is
/// q8_0, q4_K or q6_K, `a` was prepared for it, and `y` must be valid for the writes.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows(
    w: &PackedMatrix,
    a: &Activations,
    batch: Range<usize>,
    r0: usize,
    r1: usize,
    y: *mut f32,
    y_stride: usize,
    wide: bool,
) {
    let (g0, g1) = (r0 / Q8_0_GROUP, r1.div_ceil(Q8_0_GROUP));
    let out = Out { y, y_stride, r0, r1 };
    // four groups at a time from four parts of the range, so that each thread keeps four memory
    // streams going (one stream reads about half the bandwidth); with AVX-512 up to 4 activation
    // rows, with AVX2 (16 registers) at one or two rows. From 5 rows AVX-512 takes 8 rows a
    // tile, of two groups for q8_0: one pass over the weights instead of re-reading 4 groups
    // from L2 per 4 rows (batch 8 of 8192 × 4096: 1.7 → 1.4–1.5× batch 1). q4_K, whose tiles
    // keep a superblock's sums apart from the running ones, takes one group × 8 rows (two groups
    // would not fit the registers: batch 8 1.6–1.8× batch 1 with two groups, 1.45–1.47× with one),
    // and so does q6_K
    let n = batch.len();
    if wide && n > 4 && matches!(w.format, Format::Q4K | Format::Q6K) {
        for g in g0..g1 {
            tiles::<1>(w, a, [g], batch.clone(), out, wide);
        }
    } else if wide && n > 4 && g1 - g0 >= 2 {
        let part = (g1 - g0) / 2;
        for i in 0..part {
            tiles::<2>(w, a, std::array::from_fn(|k| g0 + k * part + i), batch.clone(), out, wide);
        }
        for g in g0 + 2 * part..g1 {
            tiles::<1>(w, a, [g], batch.clone(), out, wide);
        }
    } else if (wide || n <= 2) && g1 - g0 >= 4 {
        let part = (g1 - g0) / 4;
        for i in 0..part {
            tiles::<4>(w, a, std::array::from_fn(|k| g0 + k * part + i), batch.clone(), out, wide);
        }
        for g in g0 + 4 * part..g1 {
            tiles::<1>(w, a, [g], batch.clone(), out, wide);
        }
    } else {
        for g in g0..g1 {
            tiles::<1>(w, a, [g], batch.clone(), out, wide);
        }
    }
}

#[derive(Clone, Copy)]
struct Out {
    y: *mut f32,
    y_stride: usize,
    r0: usize,
    r1: usize,
}

/// Groups `gs` against the activation rows `batch`, a tile of rows at a time.
#[inline(always)]
unsafe fn tiles<const G: usize>(w: &PackedMatrix, a: &Activations, gs: [usize; G], batch: Range<usize>, out: Out, wide: bool) {
    // 4 groups × 4 rows of accumulators, or 1–2 groups × 8 rows (AVX-512's 32 registers)
    let cap = if wide && G <= 2 { 8 } else { 4 };
    let mut b0 = batch.start;
    while b0 < batch.end {
        let bt = (batch.end - b0).min(cap);
        macro_rules! by_rows {
            ($k:ident) => {
                match bt {
                    1 => $k!(1),
                    2 => $k!(2),
                    3 => $k!(3),
                    4 => $k!(4),
                    5 => $k!(5),
                    6 => $k!(6),
                    7 => $k!(7),
                    _ => $k!(8),
                }
            };
        }
        if wide {
            // the AVX-512 kernels store their outputs themselves
            macro_rules! go {
                ($bt:literal) => {
                    match w.format {
                        Format::Q4K => q4k_512::<G, $bt>(w, gs, a, b0, out),
                        Format::Q6K => q6k_512::<G, $bt>(w, gs, a, b0, out),
                        _ => q8_0_512::<G, $bt>(w, gs, a, b0, out),
                    }
                };
            }
            by_rows!(go);
            b0 += bt;
            continue;
        }
        let mut sums = [[[0f32; Q8_0_GROUP]; 8]; G];
        macro_rules! go {
            ($bt:literal) => {
                match w.format {
                    Format::Q4K => q4k_256::<G, $bt>(w, gs, a, b0, &mut sums),
                    Format::Q6K => q6k_256::<G, $bt>(w, gs, a, b0, &mut sums),
                    _ => q8_0_256::<G, $bt>(w, gs, a, b0, &mut sums),
                }
            };
        }
        by_rows!(go);
        for (j, &g) in gs.iter().enumerate() {
            for (b, s) in sums[j].iter().enumerate().take(bt) {
                let yb = out.y.add((b0 + b) * out.y_stride);
                for (n, &v) in s.iter().enumerate() {
                    let r = g * Q8_0_GROUP + n;
                    if (out.r0..out.r1).contains(&r) {
                        *yb.add(r) = v;
                    }
                }
            }
        }
        b0 += bt;
    }
}

/// Group `g`'s 16 outputs for activation row `b`: the lanes of the rows in `out.r0..out.r1`
/// (masked lanes are neither written nor faulted on).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_group(out: Out, g: usize, b: usize, v: __m512) {
    let base = g * Q8_0_GROUP;
    let (lo, hi) = (out.r0.saturating_sub(base).min(16), out.r1.saturating_sub(base).min(16));
    let mask = (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16;
    let p = out.y.add(b * out.y_stride + base);
    if mask == u16::MAX {
        _mm512_storeu_ps(p, v);
    } else {
        _mm512_mask_storeu_ps(p, mask, v);
    }
}

/// A tile's outputs, `acc: [G][BT]` (group `gs[j]`, activation row `b0 + b`), stored.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_tile<const G: usize, const BT: usize>(out: Out, gs: [usize; G], b0: usize, acc: *const __m512) {
    for j in 0..G {
        for b in 0..BT {
            store_group(out, gs[j], b0 + b, acc.add(j * BT + b).read());
        }
    }
}

/// Pointers to the quantized blocks and the scales of each q8_0 group.
#[inline(always)]
unsafe fn group_ptrs<const G: usize>(w: &PackedMatrix, gs: [usize; G], nb: usize) -> ([*const u8; G], [*const u8; G]) {
    let q = gs.map(|g| w.group(g).as_ptr());
    (q, q.map(|p| p.add(nb * Q8_0_GROUP_QUANTS)))
}

/// q8_0, AVX-512 VNNI: `sums[j][b] = W[group gs[j]] · x[b0 + b]` for `BT` activation rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
unsafe fn q8_0_512<const G: usize, const BT: usize>(w: &PackedMatrix, gs: [usize; G], a: &Activations, b0: usize, out: Out) {
    let (pc, nb) = (w.padded_cols, w.padded_cols / 32);
    let (qp, sp) = group_ptrs(w, gs, nb);
    let xq = a.qs.as_ptr().add(b0 * pc) as *const u8;
    let (dx, off) = (a.d.as_ptr().add(b0 * nb), a.q8_offset.as_ptr().add(b0 * nb));
    let mut acc = [[_mm512_setzero_ps(); BT]; G];
    for blk in 0..nb {
        for j in 0..G {
            let q = qp[j].add(blk * Q8_0_GROUP_QUANTS);
            let (far, far_scales) = q8_block_ahead(qp[j], nb, blk, Q8_AHEAD_L2);
            for l in 0..Q8_0_GROUP_QUANTS / 64 {
                _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(64 * l) as *const i8);
            }
            // one line of scales holds two blocks'
            if (blk + Q8_AHEAD_L2).is_multiple_of(2) {
                _mm_prefetch::<_MM_HINT_T1>(far_scales as *const i8);
            }
            if BT <= 2 {
                let (near, _) = q8_block_ahead(qp[j], nb, blk, 1);
                for l in 0..Q8_0_GROUP_QUANTS / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(near.wrapping_add(64 * l) as *const i8);
                }
            }
            let wv: [__m512i; 8] = std::array::from_fn(|i| _mm512_loadu_si512(q.add(64 * i) as *const _));
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(sp[j].add(blk * 32) as *const __m256i));
            for b in 0..BT {
                let s = dot_block(wv, xq.add(b * pc + blk * 32), *off.add(b * nb + blk));
                let s = _mm512_cvtepi32_ps(s);
                acc[j][b] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, _mm512_set1_ps(*dx.add(b * nb + blk))), acc[j][b]);
            }
        }
    }
    for j in 0..G {
        for b in 0..BT {
            store_group(out, gs[j], b0 + b, acc[j][b]);
        }
    }
}

/// The 16 rows' integer dot products of one 32-column block (`w`: 8 vectors of 4 columns × 16
/// rows, unsigned) with the 32 signed bytes at `x`, started from `start`. Written out so that each
/// 4 activation bytes are a broadcast memory operand of `vpdpbusd`: left to itself the compiler
/// hoisted the broadcasts of every activation row out of the loops and spilled them to the stack.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_block(w: [__m512i; 8], x: *const u8, start: i32) -> __m512i {
    let mut s0 = _mm512_set1_epi32(start);
    let mut s1 = _mm512_setzero_si512();
    std::arch::asm!(
        "vpdpbusd {s0}, {w0}, dword ptr [{x}]{{1to16}}",
        "vpdpbusd {s1}, {w1}, dword ptr [{x} + 4]{{1to16}}",
        "vpdpbusd {s0}, {w2}, dword ptr [{x} + 8]{{1to16}}",
        "vpdpbusd {s1}, {w3}, dword ptr [{x} + 12]{{1to16}}",
        "vpdpbusd {s0}, {w4}, dword ptr [{x} + 16]{{1to16}}",
        "vpdpbusd {s1}, {w5}, dword ptr [{x} + 20]{{1to16}}",
        "vpdpbusd {s0}, {w6}, dword ptr [{x} + 24]{{1to16}}",
        "vpdpbusd {s1}, {w7}, dword ptr [{x} + 28]{{1to16}}",
        s0 = inout(zmm_reg) s0, s1 = inout(zmm_reg) s1,
        w0 = in(zmm_reg) w[0], w1 = in(zmm_reg) w[1], w2 = in(zmm_reg) w[2], w3 = in(zmm_reg) w[3],
        w4 = in(zmm_reg) w[4], w5 = in(zmm_reg) w[5], w6 = in(zmm_reg) w[6], w7 = in(zmm_reg) w[7],
        x = in(reg) x,
        options(pure, readonly, nostack, preserves_flags)
    );
    _mm512_add_epi32(s0, s1)
}

/// q8_0, AVX2: as [`q8_0_512`], each half group (8 rows) in 256-bit vectors, signed bytes again.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_256<const G: usize, const BT: usize>(
    w: &PackedMatrix,
    gs: [usize; G],
    a: &Activations,
    b0: usize,
    sums: &mut [[[f32; Q8_0_GROUP]; 8]; G],
) {
    let (pc, nb) = (w.padded_cols, w.padded_cols / 32);
    let (qp, sp) = group_ptrs(w, gs, nb);
    let xq = a.qs.as_ptr().add(b0 * pc) as *const u8;
    let dx = a.d.as_ptr().add(b0 * nb);
    let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
    let mut acc = [[[_mm256_setzero_ps(); 2]; BT]; G];
    for blk in 0..nb {
        for j in 0..G {
            let q = qp[j].add(blk * Q8_0_GROUP_QUANTS);
            let (far, far_scales) = q8_block_ahead(qp[j], nb, blk, Q8_AHEAD_L2);
            for l in 0..Q8_0_GROUP_QUANTS / 64 {
                _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(64 * l) as *const i8);
            }
            if (blk + Q8_AHEAD_L2).is_multiple_of(2) {
                _mm_prefetch::<_MM_HINT_T1>(far_scales as *const i8);
            }
            for h in 0..2 {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(sp[j].add(blk * 32 + 16 * h) as *const __m128i));
                let mut s = [_mm256_setzero_si256(); BT];
                for i in 0..8 {
                    let wv = _mm256_xor_si256(_mm256_loadu_si256(q.add(64 * i + 32 * h) as *const __m256i), flip);
                    let aw = _mm256_sign_epi8(wv, wv);
                    for b in 0..BT {
                        let x = _mm256_set1_epi32((xq.add(b * pc + blk * 32 + 4 * i) as *const i32).read_unaligned());
                        let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, wv));
                        s[b] = _mm256_add_epi32(s[b], _mm256_madd_epi16(p, ones));
                    }
                }
                for b in 0..BT {
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*dx.add(b * nb + blk)));
                    acc[j][b][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[b]), scale, acc[j][b][h]);
                }
            }
        }
    }
    for j in 0..G {
        for b in 0..BT {
            for h in 0..2 {
                _mm256_storeu_ps(sums[j][b].as_mut_ptr().add(8 * h), acc[j][b][h]);
            }
        }
    }
}

/// The 6-bit scales and mins of a q4_K record's 16 rows, each byte of these words one 32-column
/// group's (words 0 and 1: groups 0–3 and 4–7 of the scales; 2 and 3: of the mins), decoded as
/// ggml's `get_scale_min_k4` does with 32-bit masks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn q4k_scale_words(rec: *const u8) -> [__m512i; 4] {
    let (m6, m4, m2) = (_mm512_set1_epi32(0x3f3f_3f3f), _mm512_set1_epi32(0x0f0f_0f0f), _mm512_set1_epi32(0x0303_0303));
    let u = |i: usize| _mm512_loadu_si512(rec.add(64 * (i + 1)) as *const _);
    let (u0, u1, u2) = (u(0), u(1), u(2));
    let hi = |lo4: __m512i, top: __m512i| {
        _mm512_or_si512(lo4, _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(top), m2)))
    };
    [
        _mm512_and_si512(u0, m6),
        hi(_mm512_and_si512(u2, m4), u0),
        _mm512_and_si512(u1, m6),
        hi(_mm512_and_si512(_mm512_srli_epi32::<4>(u2), m4), u1),
    ]
}

/// Group `gi`'s byte of each lane of `words` (as decoded by [`q4k_scale_words`]) as f32, times `by`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn q4k_group_scale(words: &[__m512i; 4], mins: bool, gi: usize, by: __m512) -> __m512 {
    let w = words[2 * mins as usize + gi / 4];
    let b = _mm512_and_si512(_mm512_srlv_epi32(w, _mm512_set1_epi32(8 * (gi % 4) as i32)), _mm512_set1_epi32(0xff));
    _mm512_mul_ps(_mm512_cvtepi32_ps(b), by)
}

/// The 8 vectors of 4 columns × 16 rows of 32-column group `gi` of a q4_K record, as bytes 0–15.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn q4k_nibbles(rec: *const u8, gi: usize) -> [__m512i; 8] {
    let q = rec.add(Q4K_GROUP_HEADER + (gi / 2) * 512);
    let low = _mm512_set1_epi8(0x0f);
    std::array::from_fn(|i| {
        let v = _mm512_loadu_si512(q.add(64 * i) as *const _);
        if gi.is_multiple_of(2) {
            _mm512_and_si512(v, low)
        } else {
            _mm512_and_si512(_mm512_srli_epi16::<4>(v), low)
        }
    })
}

/// [`q4k_nibbles`] with the high nibbles left in place, as 16 times their value (`v & 0xf0`): one
/// instruction a vector instead of two. The dot products of an odd group are then 16 times its
/// own, and its scale is taken / 16 (exact: a power of two; the integer sums stay below 2^24).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q4k_nibbles_x16(rec: *const u8, gi: usize) -> [__m512i; 8] {
    let q = rec.add(Q4K_GROUP_HEADER + (gi / 2) * 512);
    let mask = _mm512_set1_epi8(if gi.is_multiple_of(2) { 0x0f } else { 0xf0u8 as i8 });
    std::array::from_fn(|i| _mm512_and_si512(_mm512_loadu_si512(q.add(64 * i) as *const _), mask))
}

/// Where a q4_K tile reads: each group's records, and from activation row `b0` on the 8-bit
/// values, the superblock scales, the scaled 32-column sums (AVX2) and the sums' pairs (AVX-512).
struct Q4kPtrs<const G: usize> {
    gp: [*const u8; G],
    xq: *const u8,
    dx: *const f32,
    xs: *const f32,
    mp: *const i32,
}

#[inline(always)]
unsafe fn q4k_ptrs<const G: usize>(w: &PackedMatrix, gs: [usize; G], a: &Activations, b0: usize) -> Q4kPtrs<G> {
    let (pc, nsb) = (w.padded_cols, w.padded_cols / 256);
    Q4kPtrs {
        gp: gs.map(|g| w.group(g).as_ptr()),
        xq: a.qs.as_ptr().add(b0 * pc) as *const u8,
        dx: a.d.as_ptr().add(b0 * nsb),
        xs: a.scaled_sums32.as_ptr().add(b0 * pc / 32),
        mp: a.min_pairs.as_ptr().wrapping_add(b0 * pc / 64),
    }
}

/// Runs `$body` with `$j` = 0, 1, … `$g - 1` as constants (`$g` at most 4): the accumulators a
/// tile indexes by `$j` then stay in registers (a loop over `$j` that the compiler leaves rolled
/// indexes them in memory).
macro_rules! unrolled {
    ($g:expr, |$j:ident| $body:block) => {{
        if $g > 0 {
            let $j = 0;
            $body
        }
        if $g > 1 {
            let $j = 1;
            $body
        }
        if $g > 2 {
            let $j = 2;
            $body
        }
        if $g > 3 {
            let $j = 3;
            $body
        }
    }};
}

/// q4_K, AVX-512 VNNI: `sums[j][b] = W[group gs[j]] · x[b0 + b]` for `BT` activation rows.
///
/// Per superblock, each 32-column block's integer dot products (8 `vpdpbusd`) are scaled by the
/// block's `d · sc` (one conversion and one `fma`), the 8 mins times the activation blocks' sums
/// come from 4 `vpdpwssd`, and the activations' superblock scale multiplies the superblock's
/// total once. Each output takes the same operations in the same order at any tile shape, so a
/// row's bits do not depend on its batch. Per block and activation row that is 10 vector
/// instructions besides the superblock's few: against 13 when every block's sums were scaled by
/// `d · sc · dx` and had their mins taken apart, which made batch 8 of 8192 × 4096 cost
/// 1.6–1.7× batch 1 (the kernel is bound by its vector instructions from 5 rows on).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
unsafe fn q4k_512<const G: usize, const BT: usize>(w: &PackedMatrix, gs: [usize; G], a: &Activations, b0: usize, out: Out) {
    let (pc, nsb) = (w.padded_cols, w.padded_cols / 256);
    let Q4kPtrs { gp, xq, dx, mp, .. } = q4k_ptrs(w, gs, a, b0);
    // the running sums, and each group's superblock scales (8 blocks' `d · sc`, then `dmin`) and
    // mins (as 16-bit pairs), are read from memory: with the superblock's sums in registers too
    // they would not fit (an opaque pointer keeps the compiler from holding them in registers)
    // (scales and mins are written before they are read: zeroing their 3.3 KiB per call cost
    // 1 % of a bench-small q4_K decode step)
    let mut acc = [[_mm512_setzero_ps(); BT]; G];
    let mut scales = std::mem::MaybeUninit::<[[__m512; 9]; G]>::uninit();
    let mut mins = std::mem::MaybeUninit::<[[__m512i; 4]; G]>::uninit();
    let acc_p: *mut __m512 = std::hint::black_box(acc.as_mut_ptr().cast());
    let scales_p: *mut __m512 = std::hint::black_box(scales.as_mut_ptr().cast());
    let mins_p: *mut __m512i = std::hint::black_box(mins.as_mut_ptr().cast());
    let pairs = _mm512_set1_epi32(0x00ff_00ff);
    for sb in 0..nsb {
        for j in 0..G {
            let rec = gp[j].add(sb * Q4K_GROUP_RECORD);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(32) as *const __m256i));
            // odd groups' nibbles come as 16 times their value (q4k_nibbles_x16)
            let d16 = [d, _mm512_mul_ps(d, _mm512_set1_ps(1.0 / 16.0))];
            let words = q4k_scale_words(rec);
            for gi in 0..8 {
                scales_p.add(9 * j + gi).write(q4k_group_scale(&words, false, gi, d16[gi % 2]));
            }
            scales_p.add(9 * j + 8).write(dmin);
            // words 2 and 3 hold blocks 0–3 and 4–7's mins, a byte each: as pairs (0, 2), (1, 3),
            // (4, 6), (5, 7), the order of `Activations::min_pairs`
            for (k, m) in [words[2], words[3]].into_iter().enumerate() {
                mins_p.add(4 * j + 2 * k).write(_mm512_and_si512(m, pairs));
                mins_p.add(4 * j + 2 * k + 1).write(_mm512_srli_epi16::<8>(m));
            }
        }
        let mut t = [[_mm512_setzero_ps(); BT]; G];
        for gi in 0..8 {
            unrolled!(G, |j| {
                let rec = gp[j].add(sb * Q4K_GROUP_RECORD);
                // (past the matrix's end for its last records: a prefetch does not fault)
                let pf = rec.wrapping_add(Q4K_PREFETCH + gi * (Q4K_GROUP_RECORD / 8));
                for l in 0..Q4K_GROUP_RECORD / 8 / 64 + 1 {
                    _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(64 * l) as *const i8);
                }
                let scale = _mm512_load_ps(scales_p.add(9 * j + gi) as *const f32);
                let wv = q4k_nibbles_x16(rec, gi);
                for b in 0..BT {
                    let s = _mm512_cvtepi32_ps(dot_block(wv, xq.add(b * pc + sb * 256 + 32 * gi), 0));
                    t[j][b] = _mm512_fmadd_ps(s, scale, t[j][b]);
                }
            });
        }
        unrolled!(G, |j| {
            let m: [__m512i; 4] = std::array::from_fn(|k| _mm512_load_si512(mins_p.add(4 * j + k) as *const _));
            let dmin = _mm512_load_ps(scales_p.add(9 * j + 8) as *const f32);
            for b in 0..BT {
                let xp = mp.add((b * nsb + sb) * 4);
                let mut im = _mm512_setzero_si512();
                for k in 0..4 {
                    im = _mm512_dpwssd_epi32(im, m[k], _mm512_set1_epi32(*xp.add(k)));
                }
                let v = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(im), dmin, t[j][b]);
                let at = acc_p.add(j * BT + b);
                at.write(_mm512_fmadd_ps(v, _mm512_set1_ps(*dx.add(b * nsb + sb)), at.read()));
            }
        });
    }
    store_tile::<G, BT>(out, gs, b0, acc_p);
}

/// q4_K, AVX2: as [`q4k_512`], each half group (8 rows) in 256-bit vectors with `vpmaddubsw`
/// (nibbles × signed activations, pairs at most 2 · 15 · 127: no saturation) and `vpmaddwd`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_256<const G: usize, const BT: usize>(
    w: &PackedMatrix,
    gs: [usize; G],
    a: &Activations,
    b0: usize,
    sums: &mut [[[f32; Q8_0_GROUP]; 8]; G],
) {
    let (pc, nsb, nb) = (w.padded_cols, w.padded_cols / 256, w.padded_cols / 32);
    let Q4kPtrs { gp, xq, dx, xs, .. } = q4k_ptrs(w, gs, a, b0);
    let (low, ones, m6, m4, m2, ff) = (
        _mm256_set1_epi8(0x0f),
        _mm256_set1_epi16(1),
        _mm256_set1_epi32(0x3f3f_3f3f),
        _mm256_set1_epi32(0x0f0f_0f0f),
        _mm256_set1_epi32(0x0303_0303),
        _mm256_set1_epi32(0xff),
    );
    let mut acc = [[[_mm256_setzero_ps(); 2]; BT]; G];
    for sb in 0..nsb {
        for j in 0..G {
            let rec = gp[j].add(sb * Q4K_GROUP_RECORD);
            let pf = rec.wrapping_add(Q4K_PREFETCH);
            for l in 0..Q4K_GROUP_RECORD / 64 {
                _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(64 * l) as *const i8);
            }
            for h in 0..2 {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16 * h) as *const __m128i));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(32 + 16 * h) as *const __m128i));
                let u = |i: usize| _mm256_loadu_si256(rec.add(64 * (i + 1) + 32 * h) as *const __m256i);
                let (u0, u1, u2) = (u(0), u(1), u(2));
                let hi = |lo4: __m256i, top: __m256i| {
                    _mm256_or_si256(lo4, _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srli_epi32::<6>(top), m2)))
                };
                let words = [
                    _mm256_and_si256(u0, m6),
                    hi(_mm256_and_si256(u2, m4), u0),
                    _mm256_and_si256(u1, m6),
                    hi(_mm256_and_si256(_mm256_srli_epi32::<4>(u2), m4), u1),
                ];
                for gi in 0..8 {
                    let byte = |w: __m256i| {
                        _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, _mm256_set1_epi32(8 * (gi % 4) as i32)), ff))
                    };
                    let scale = _mm256_mul_ps(byte(words[gi / 4]), d);
                    let min = _mm256_mul_ps(byte(words[2 + gi / 4]), dmin);
                    let q = rec.add(Q4K_GROUP_HEADER + (gi / 2) * 512 + 32 * h);
                    // the block's pair sums in 16 bits (at most 8 · 2 · 15 · 128 = 30720 in
                    // magnitude), widened to 32 once per block
                    let mut s16 = [_mm256_setzero_si256(); BT];
                    for i in 0..8 {
                        let v = _mm256_loadu_si256(q.add(64 * i) as *const __m256i);
                        let nib =
                            if gi % 2 == 0 { _mm256_and_si256(v, low) } else { _mm256_and_si256(_mm256_srli_epi16::<4>(v), low) };
                        for b in 0..BT {
                            let x = (xq.add(b * pc + sb * 256 + 32 * gi + 4 * i) as *const i32).read_unaligned();
                            s16[b] = _mm256_add_epi16(s16[b], _mm256_maddubs_epi16(nib, _mm256_set1_epi32(x)));
                        }
                    }
                    let s = s16.map(|v| _mm256_madd_epi16(v, ones));
                    for b in 0..BT {
                        let sc = _mm256_mul_ps(scale, _mm256_set1_ps(*dx.add(b * nsb + sb)));
                        let acc_b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[b]), sc, acc[j][b][h]);
                        acc[j][b][h] = _mm256_fnmadd_ps(min, _mm256_set1_ps(*xs.add(b * nb + sb * 8 + gi)), acc_b);
                    }
                }
            }
        }
    }
    for j in 0..G {
        for b in 0..BT {
            for h in 0..2 {
                _mm256_storeu_ps(sums[j][b].as_mut_ptr().add(8 * h), acc[j][b][h]);
            }
        }
    }
}

/// The 4 weight vectors of block `8h + 2M + kk` of a q6_K record (columns `16k..16k + 16`), 4
/// columns each, unsigned 6-bit values: `runs` is the record's half `h` (plus the lane offset of
/// an AVX2 half group), `$m` the literal `M` (which nibbles and bit pairs: a constant, so that
/// each quarter's shifts are immediates; a `match` on a variable compiled to per-lane variable
/// shifts, which AVX2 emulates by unpacking). ggml's order: in each half of 128 columns, `ql[l]`
/// holds columns `l` (low nibble) and `64 + l` (high), `ql[32 + l]` columns `32 + l` and
/// `96 + l`, and `qh[l]` the top 2 bits of columns `l`, `32 + l`, `64 + l`, `96 + l`.
macro_rules! q6k_vectors {
    ($load:ident, $and:ident, $or:ident, $srli:ident, $slli:ident, $runs:expr, $m:expr, $kk:expr, $low4:expr, $bits45:expr) => {
        std::array::from_fn(|i| {
            let q = 4 * $kk + i;
            let ql = $load($runs.add(64 * (q + 8 * ($m % 2))) as *const _);
            let qh = $load($runs.add(64 * (16 + q)) as *const _);
            // (bits shifted in from the neighbouring byte are masked off)
            let low = if $m < 2 { $and(ql, $low4) } else { $and($srli::<4>(ql), $low4) };
            let top = match $m {
                0 => $slli::<4>(qh),
                1 => $slli::<2>(qh),
                2 => qh,
                _ => $srli::<2>(qh),
            };
            $or(low, $and(top, $bits45))
        })
    };
}

/// Runs `$body` for each block of a q6_K superblock, with `$h`, `$kk` and `$k = 8h + 2M + kk` as
/// variables and `$m` (`M`) as a literal: quarter by quarter, each its own code (see
/// [`q6k_vectors`]). The blocks' order does not matter: their sums are exact integers.
macro_rules! q6k_blocks {
    (|$h:ident, $m:ident, $kk:ident, $k:ident| $body:block) => {{
        macro_rules! quarter {
            ($mm:literal) => {
                for $h in 0..2 {
                    for $kk in 0..2 {
                        let $k = 8 * $h + 2 * $mm + $kk;
                        macro_rules! $m {
                            () => {
                                $mm
                            };
                        }
                        $body
                    }
                }
            };
        }
        quarter!(0);
        quarter!(1);
        quarter!(2);
        quarter!(3);
    }};
}

/// q6_K, AVX-512 VNNI: `W[group gs[j]] · x[b0 + b]` for `BT` activation rows, stored.
///
/// Per 16-column block and activation row: 4 `vpdpbusd` from `-32 · Σ x` (the stored values'
/// offset), one `vpmulld` by the 16 rows' block scales and one add into the superblock's exact
/// integer total; per superblock one conversion and `fma` by `d` times the activations' scale.
/// Each output takes the same operations in the same order at any tile shape, so a row's bits do
/// not depend on its batch (nor on the backend: the AVX2 kernel's are the same).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
unsafe fn q6k_512<const G: usize, const BT: usize>(w: &PackedMatrix, gs: [usize; G], a: &Activations, b0: usize, out: Out) {
    let (pc, nsb) = (w.padded_cols, w.padded_cols / 256);
    let gp = gs.map(|g| w.group(g).as_ptr());
    let xq = a.qs.as_ptr().add(b0 * pc) as *const u8;
    let sums16 = a.sums16.as_ptr().add(b0 * pc / 16);
    let dx = a.d.as_ptr().add(b0 * nsb);
    let (low4, bits45) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
    // the running sums in memory (read and written once a superblock; the registers hold the
    // superblock's integer totals)
    let mut acc = [[_mm512_setzero_ps(); BT]; G];
    let acc_p: *mut __m512 = std::hint::black_box(acc.as_mut_ptr().cast());
    for sb in 0..nsb {
        let mut total = [[_mm512_setzero_si512(); BT]; G];
        q6k_blocks!(|h, m, kk, k| {
            unrolled!(G, |j| {
                let rec = gp[j].add(sb * Q6K_GROUP_RECORD);
                // (past the matrix's end for its last records: a prefetch does not fault)
                let pf = rec.wrapping_add(Q6K_PREFETCH + k * (Q6K_GROUP_RECORD / 16));
                for l in 0..Q6K_GROUP_RECORD / 16 / 64 + 1 {
                    _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(64 * l) as *const i8);
                }
                let runs = rec.add(Q6K_GROUP_HEADER + h * Q6K_GROUP_HALF);
                let wv: [__m512i; 4] = q6k_vectors!(
                    _mm512_loadu_si512,
                    _mm512_and_si512,
                    _mm512_or_si512,
                    _mm512_srli_epi16,
                    _mm512_slli_epi16,
                    runs,
                    m!(),
                    kk,
                    low4,
                    bits45
                );
                let scale = _mm512_cvtepi8_epi32(_mm_loadu_si128(rec.add(32 + 16 * k) as *const __m128i));
                for b in 0..BT {
                    let x = xq.add(b * pc + sb * 256 + 16 * k) as *const i32;
                    let mut s = _mm512_set1_epi32(-32 * *sums16.add(b * pc / 16 + sb * 16 + k) as i32);
                    for i in 0..4 {
                        s = _mm512_dpbusd_epi32(s, wv[i], _mm512_set1_epi32(x.add(i).read_unaligned()));
                    }
                    total[j][b] = _mm512_add_epi32(total[j][b], _mm512_mullo_epi32(s, scale));
                }
            });
        });
        unrolled!(G, |j| {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(gp[j].add(sb * Q6K_GROUP_RECORD) as *const __m256i));
            for b in 0..BT {
                let at = acc_p.add(j * BT + b);
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*dx.add(b * nsb + sb)));
                at.write(_mm512_fmadd_ps(_mm512_cvtepi32_ps(total[j][b]), scale, at.read()));
            }
        });
    }
    store_tile::<G, BT>(out, gs, b0, acc_p);
}

/// q6_K, AVX2: as [`q6k_512`], each half group (8 rows) in 256-bit vectors, the products with
/// `vpmaddubsw` (pairs at most 2 · 63 · 127 in magnitude: two vectors' pairs summed stay within
/// 16 bits) and `vpmaddwd` by the rows' block scales (each twice: the pairs of a row come out
/// scaled and summed, no 32-bit multiply), the stored offset likewise (`sc · -16 Σ x`, twice).
/// The same integer totals and float operations as [`q6k_512`]: the same bits. (Without AVX-512
/// q6_K stays in ggml's rows, where the row kernel is faster for 1–2 rows: this kernel takes
/// grouped matrices asked for by `PackedMatrix::with_q6k_layout`, or the AVX2 backend chosen
/// explicitly.)
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_256<const G: usize, const BT: usize>(
    w: &PackedMatrix,
    gs: [usize; G],
    a: &Activations,
    b0: usize,
    sums: &mut [[[f32; Q8_0_GROUP]; 8]; G],
) {
    let (pc, nsb) = (w.padded_cols, w.padded_cols / 256);
    let gp = gs.map(|g| w.group(g).as_ptr());
    let xq = a.qs.as_ptr().add(b0 * pc) as *const u8;
    let sums16 = a.sums16.as_ptr().add(b0 * pc / 16);
    let dx = a.d.as_ptr().add(b0 * nsb);
    let (low4, bits45) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
    let mut acc = [[[_mm256_setzero_ps(); 2]; BT]; G];
    for sb in 0..nsb {
        for j in 0..G {
            let rec = gp[j].add(sb * Q6K_GROUP_RECORD);
            let pf = rec.wrapping_add(Q6K_PREFETCH);
            for l in 0..Q6K_GROUP_RECORD / 64 + 2 {
                _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(64 * l) as *const i8);
            }
            for half in 0..2 {
                let mut total = [_mm256_setzero_si256(); BT];
                q6k_blocks!(|h, m, kk, k| {
                    let runs = rec.add(Q6K_GROUP_HEADER + h * Q6K_GROUP_HALF + 32 * half);
                    let wv: [__m256i; 4] = q6k_vectors!(
                        _mm256_loadu_si256,
                        _mm256_and_si256,
                        _mm256_or_si256,
                        _mm256_srli_epi16,
                        _mm256_slli_epi16,
                        runs,
                        m!(),
                        kk,
                        low4,
                        bits45
                    );
                    // the 8 rows' block scales as 16-bit pairs of the same value
                    let sc = _mm_loadl_epi64(rec.add(32 + 16 * k + 8 * half) as *const __m128i);
                    let scale = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc, sc));
                    for b in 0..BT {
                        let x = xq.add(b * pc + sb * 256 + 16 * k) as *const i32;
                        let p = |i: usize| _mm256_maddubs_epi16(wv[i], _mm256_set1_epi32(x.add(i).read_unaligned()));
                        // (16 · Σ x: at most 16 · 16 · 127 in magnitude)
                        let off = (-16 * *sums16.add(b * pc / 16 + sb * 16 + k) as i32) as u16 as u32 * 0x1_0001;
                        let s = _mm256_add_epi32(
                            _mm256_madd_epi16(_mm256_add_epi16(p(0), p(1)), scale),
                            _mm256_madd_epi16(_mm256_add_epi16(p(2), p(3)), scale),
                        );
                        let s = _mm256_add_epi32(s, _mm256_madd_epi16(scale, _mm256_set1_epi32(off as i32)));
                        total[b] = _mm256_add_epi32(total[b], s);
                    }
                });
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16 * half) as *const __m128i));
                for b in 0..BT {
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(*dx.add(b * nsb + sb)));
                    acc[j][b][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total[b]), scale, acc[j][b][half]);
                }
            }
        }
    }
    for j in 0..G {
        for b in 0..BT {
            for h in 0..2 {
                _mm256_storeu_ps(sums[j][b].as_mut_ptr().add(8 * h), acc[j][b][h]);
            }
        }
    }
}
