//! q8_0 and q4_K weights on AMX int8 tiles (`tdpbsud`).
//!
//! Both formats are stored in groups of 16 rows whose 32-column blocks are 8 runs of 4 columns ×
//! 16 rows (see `format::Q8_0_GROUP` and `format::Q4K_GROUP_RECORD`): the layout of the
//! right-hand operand of a tile product. q8_0 blocks (offset to unsigned bytes) are that operand
//! as stored; q4_K nibbles are masked to bytes 0–15, a group at a time, into a buffer that stays
//! in cache, with each block's `d · sc` and `dmin · m` as vectors of the 16 rows. The left-hand
//! operand is the same 32 columns of 16 activation rows, loaded in place from the 8-bit
//! activations. One `tdpbsud` gives the 16 × 16 exact int32 dot products of a block; the vector
//! units add the offset correction (q8_0) or subtract the mins (q4_K), scale each sum by its
//! weight block's scale times the activation block's scale, and add it to f32 sums held in 16
//! registers.
//!
//! The arithmetic is the vector kernels' (exact integer block sums, scaled in f32), but the
//! integer work of 16 activation rows is one instruction. What remains per 32 columns is storing
//! the sum tile and scaling it (the block scales rule out accumulating in the tiles, as the bf16
//! tiles do), and on this VM the two vCPUs share one tile unit: so the vector kernels keep the
//! products with few activation rows (see `amx::min_batch`).

use std::arch::asm;
use std::arch::x86_64::*;

use crate::act::Activations;
use crate::format::{Format, PackedMatrix, Q4K_GROUP_RECORD};
use crate::simd::{q4k_group_scale, q4k_nibbles, q4k_scale_words};

/// Weight rows (and activation rows) per tile.
const ROWS: usize = 16;
/// Bytes of one 32-column block of 16 weight rows, the right-hand tile operand.
const BLOCK_BYTES: usize = 512;

#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Palette 1. tmm0–3: 16 × 16 int32 sums; tmm4–5: the left-hand operands, 16 activation rows ×
/// 32 bytes; tmm6–7: the right-hand operands of one block, 8 rows of 4 columns × 16 weight rows.
const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let shapes: [(u8, u8); 8] = [(16, 64), (16, 64), (16, 64), (16, 64), (16, 32), (16, 32), (8, 64), (8, 64)];
    let mut t = 0;
    while t < shapes.len() {
        c[16 + 2 * t] = shapes[t].1; // bytes per row (u16, little endian)
        c[48 + t] = shapes[t].0;
        t += 1;
    }
    TileConfig(c)
};

#[repr(C, align(64))]
struct Sums([[i32; ROWS]; 4 * ROWS]);

thread_local! {
    /// One q4_K group unpacked: the 512-byte right-hand operand of each 32-column block, then
    /// each block's 16 scales `d · sc` and 16 mins `dmin · m` as f32.
    static STAGE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The left-hand operands of the tile products: 16 activation rows of 32-byte blocks, `stride`
/// apart.
#[derive(Clone, Copy)]
struct Acts {
    p: *const u8,
    stride: usize,
}

impl Acts {
    #[inline(always)]
    fn tile(self, blk: usize) -> (*const u8, usize) {
        (self.p.wrapping_add(blk * 32), self.stride)
    }
}

/// Whether the int8 tiles take `format`.
pub(super) fn takes(format: Format) -> bool {
    matches!(format, Format::Q8_0 | Format::Q4K)
}

/// `y[b * y_stride + r] = W[r] · x[b]` for the rows `r0..r1` and every activation row.
///
/// # Safety
/// AMX must be available (`super::available()`), `takes(w.format)`, and `y` valid for the writes.
pub(super) unsafe fn rows(w: &PackedMatrix, a: &Activations, r0: usize, r1: usize, y: *mut f32, y_stride: usize) {
    asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    STAGE.with(|stage| grouped_rows(w, a, r0, r1, y, y_stride, &mut stage.borrow_mut()));
    asm!("tilerelease", options(nostack, nomem));
}

/// Each group of 16 weight rows (q4_K: unpacked into `stage` first) against each group of 16
/// activation rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn grouped_rows(
    w: &PackedMatrix,
    a: &Activations,
    r0: usize,
    r1: usize,
    y: *mut f32,
    y_stride: usize,
    stage: &mut Vec<u8>,
) {
    let (pc, nb) = (w.padded_cols, w.padded_cols / 32);
    let q4k = w.format == Format::Q4K;
    if q4k {
        // 64 bytes of slack to align the buffer to a cache line
        stage.resize(nb * (BLOCK_BYTES + 2 * ROWS * 4) + 64, 0);
    }
    let base = stage.as_mut_ptr();
    let sp = base.add(base.align_offset(64));
    for g in r0 / ROWS..r1.div_ceil(ROWS) {
        let group = w.group(g).as_ptr();
        if q4k {
            stage_q4k(group, pc / 256, sp);
        }
        for xg in 0..a.batch.div_ceil(ROWS) {
            // the activations are padded with zero rows to whole groups of 16
            let acts = Acts { p: a.qs.as_ptr().add(xg * ROWS * pc) as *const u8, stride: pc };
            let sums = if q4k {
                let dx = a.d.as_ptr().add(xg * ROWS * (pc / 256));
                q4k_sums(acts, sp, nb, dx, a.scaled_sums32.as_ptr().add(xg * ROWS * nb))
            } else {
                let at = xg * ROWS * nb;
                q8_0_sums(acts, group, nb, a.d.as_ptr().add(at), a.q8_offset.as_ptr().add(at))
            };
            // sums[activation row][weight row]: consecutive outputs
            for (i, s) in sums.iter().enumerate().take(a.batch - xg * ROWS) {
                let yr = y.add((xg * ROWS + i) * y_stride);
                for (n, &v) in s.iter().enumerate() {
                    let r = g * ROWS + n;
                    if (r0..r1).contains(&r) {
                        *yr.add(r) = v;
                    }
                }
            }
        }
    }
}

/// A q4_K group (`nsb` records) unpacked at `sp`: each 32-column block's nibbles as bytes (the
/// right-hand tile operand, 512 bytes), then per block the 16 rows' `d · sc` and `dmin · m`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn stage_q4k(group: *const u8, nsb: usize, sp: *mut u8) {
    let nb = nsb * 8;
    let (dp, mp) = (sp.add(nb * BLOCK_BYTES) as *mut f32, sp.add(nb * BLOCK_BYTES + nb * ROWS * 4) as *mut f32);
    for sb in 0..nsb {
        let rec = group.add(sb * Q4K_GROUP_RECORD);
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(32) as *const __m256i));
        let words = q4k_scale_words(rec);
        for gi in 0..8 {
            let blk = sb * 8 + gi;
            _mm512_storeu_ps(dp.add(blk * ROWS), q4k_group_scale(&words, false, gi, d));
            _mm512_storeu_ps(mp.add(blk * ROWS), q4k_group_scale(&words, true, gi, dmin));
            for (i, v) in q4k_nibbles(rec, gi).into_iter().enumerate() {
                _mm512_store_si512(sp.add(blk * BLOCK_BYTES + 64 * i) as *mut _, v);
            }
        }
    }
}

/// The software pipeline of both formats: the tiles run four blocks a step into four sum tiles
/// (`tiles(blk, n, to)`, 1 KiB a block), stored to one of two buffers, and `scale(blk, sums)`
/// folds the 16 × 16 sums of each block of the step before into f32 sums (tile registers are not
/// renamed and tile stores do not forward to vector loads, so this keeps the tile and vector
/// units from waiting on each other).
#[inline(always)]
unsafe fn pipeline(nb: usize, mut tiles: impl FnMut(usize, usize, *mut u8), mut scale: impl FnMut(usize, &[[i32; ROWS]])) {
    let mut c = [Sums([[0; ROWS]; 4 * ROWS]), Sums([[0; ROWS]; 4 * ROWS])];
    let steps = nb.div_ceil(4);
    for step in 0..=steps {
        if step < steps {
            let blk = 4 * step;
            tiles(blk, (nb - blk).min(4), c[step % 2].0.as_mut_ptr() as *mut u8);
        }
        if step > 0 {
            let blk = 4 * (step - 1);
            let sums = &c[(step - 1) % 2].0;
            for k in 0..(nb - blk).min(4) {
                scale(blk + k, &sums[k * ROWS..(k + 1) * ROWS]);
            }
        }
    }
}

/// The f32 sums held in registers, as rows.
#[inline(always)]
unsafe fn rows_of(acc: [__m512; ROWS]) -> [[f32; ROWS]; ROWS] {
    let mut out = [[0f32; ROWS]; ROWS];
    for i in 0..ROWS {
        _mm512_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
    out
}

/// 16 activation rows (`acts`, with their superblock scales `dx`, `nb / 8` a row, and scaled
/// block sums `xs`, `nb` a row) times one unpacked q4_K group (`sp`, see [`stage_q4k`]):
/// `[activation row][weight row]` sums, mins applied.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn q4k_sums(acts: Acts, sp: *const u8, nb: usize, dx: *const f32, xs: *const f32) -> [[f32; ROWS]; ROWS] {
    let mut acc = [_mm512_setzero_ps(); ROWS];
    let (dp, mp) = (sp.add(nb * BLOCK_BYTES) as *const f32, sp.add(nb * BLOCK_BYTES + nb * ROWS * 4) as *const f32);
    pipeline(
        nb,
        |blk, n, to| tile_step(acts, blk, n, sp.add(blk * BLOCK_BYTES), to),
        |blk, sums| {
            let (dw, mw) = (_mm512_loadu_ps(dp.add(blk * ROWS)), _mm512_loadu_ps(mp.add(blk * ROWS)));
            for i in 0..ROWS {
                let s = _mm512_cvtepi32_ps(_mm512_load_si512(sums[i].as_ptr() as *const _));
                let a = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, _mm512_set1_ps(*dx.add(i * (nb / 8) + blk / 8))), acc[i]);
                acc[i] = _mm512_fnmadd_ps(mw, _mm512_set1_ps(*xs.add(i * nb + blk)), a);
            }
        },
    );
    rows_of(acc)
}

/// 16 activation rows (`acts`, with their block scales `dx` and offsets `off`, `nb` a row) times
/// one q8_0 group (`group`: its blocks, then its scales): `[activation row][weight row]` sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn q8_0_sums(acts: Acts, group: *const u8, nb: usize, dx: *const f32, off: *const i32) -> [[f32; ROWS]; ROWS] {
    let mut acc = [_mm512_setzero_ps(); ROWS];
    let scales = group.add(nb * BLOCK_BYTES);
    pipeline(
        nb,
        |blk, n, to| tile_step(acts, blk, n, group.add(blk * BLOCK_BYTES), to),
        |blk, sums| {
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(blk * 32) as *const __m256i));
            for i in 0..ROWS {
                let s =
                    _mm512_add_epi32(_mm512_load_si512(sums[i].as_ptr() as *const _), _mm512_set1_epi32(*off.add(i * nb + blk)));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*dx.add(i * nb + blk)));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[i]);
            }
        },
    );
    rows_of(acc)
}

macro_rules! tile_step {
    ($dp:literal, $rows:expr, $blk:expr, $n:expr, $xp:expr, $cp:expr) => {{
        let (rows, blk, n, xp, cp): (Acts, usize, usize, *const u8, *mut u8) = ($rows, $blk, $n, $xp, $cp);
        let (w0, ws) = rows.tile(blk);
        if n == 4 {
            let (w1, w2, w3) = (rows.tile(blk + 1).0, rows.tile(blk + 2).0, rows.tile(blk + 3).0);
            asm!(
                "tileloadd tmm4, [{w0} + {ws}*1]",
                "tileloadd tmm6, [{x} + {xs}*1]",
                "tileloadd tmm5, [{w1} + {ws}*1]",
                "tileloadd tmm7, [{x} + {xs}*1 + 512]",
                "tilezero tmm0",
                "tilezero tmm1",
                concat!($dp, " tmm0, tmm4, tmm6"),
                concat!($dp, " tmm1, tmm5, tmm7"),
                "tileloadd tmm4, [{w2} + {ws}*1]",
                "tileloadd tmm6, [{x} + {xs}*1 + 1024]",
                "tileloadd tmm5, [{w3} + {ws}*1]",
                "tileloadd tmm7, [{x} + {xs}*1 + 1536]",
                "tilezero tmm2",
                "tilezero tmm3",
                concat!($dp, " tmm2, tmm4, tmm6"),
                concat!($dp, " tmm3, tmm5, tmm7"),
                "tilestored [{c} + {cs}*1], tmm0",
                "tilestored [{c} + {cs}*1 + 1024], tmm1",
                "tilestored [{c} + {cs}*1 + 2048], tmm2",
                "tilestored [{c} + {cs}*1 + 3072], tmm3",
                w0 = in(reg) w0, w1 = in(reg) w1, w2 = in(reg) w2, w3 = in(reg) w3, ws = in(reg) ws,
                x = in(reg) xp, xs = in(reg) 64usize, c = in(reg) cp, cs = in(reg) 64usize,
                options(nostack)
            );
        } else {
            for k in 0..n {
                asm!(
                    "tilezero tmm0",
                    "tileloadd tmm4, [{w} + {ws}*1]",
                    "tileloadd tmm6, [{x} + {xs}*1]",
                    concat!($dp, " tmm0, tmm4, tmm6"),
                    "tilestored [{c} + {cs}*1], tmm0",
                    w = in(reg) rows.tile(blk + k).0, ws = in(reg) ws, x = in(reg) xp.add(BLOCK_BYTES * k),
                    xs = in(reg) 64usize, c = in(reg) cp.add(1024 * k), cs = in(reg) 64usize,
                    options(nostack)
                );
            }
        }
    }};
}

/// Blocks `blk..blk + n` (`n` of 1–4): int32 sums to `cp` (1 KiB a block), left-hand operands
/// (signed activations) from `rows`, right-hand ones (unsigned weights) at `xp`, 512 bytes a block.
#[inline(always)]
unsafe fn tile_step(rows: Acts, blk: usize, n: usize, xp: *const u8, cp: *mut u8) {
    tile_step!("tdpbsud", rows, blk, n, xp, cp)
}
