//! q8_0 and q4_K weights on AMX int8 tiles (`tdpbssd`, `tdpbusd`).
//!
//! A q8_0 row is a run of 34-byte blocks (an f16 scale, then 32 signed bytes), so the 32 bytes of
//! one block of 16 consecutive rows are a tile of 16 rows × 32 bytes, `row_bytes` apart: the
//! weights go to the tiles as they are stored, with no decoding. One `tdpbssd` multiplies that
//! tile by the same block of 16 activation rows (8-bit, [`Activations::int8_tiles`]) into 16 × 16
//! exact int32 dot products; the vector units then scale each by its weight block's scale times
//! the activation block's scale and add it to f32 sums held in 16 registers.
//!
//! q4_K rows are unpacked first, 16 rows at a time, into a copy that stays in cache: one byte per
//! weight (0–15, multiplied as unsigned by `tdpbusd`), the scale `d · sc` and the min `dmin · m` of
//! each 32 weights as f32. The mins are applied with the activations' per-32 sums.
//!
//! The arithmetic is the vector kernels' (exact integer block sums, scaled in f32), but the
//! integer work of 16 activation rows is one instruction. What remains per 32 columns is storing
//! the sum tile and scaling it (the block scales rule out accumulating in the tiles, as the bf16
//! tiles do): measured on 8192 × 4096 q8_0, 8 activation rows cost 2.1× one row and 16 rows 1.8×,
//! against 3.7× and 4.8× with the vector kernel.

use std::arch::asm;
use std::arch::x86_64::*;

use crate::act::Activations;
use crate::format::{Format, PackedMatrix, Q4K_BLOCK, Q8_0_BLOCK};

/// Weight rows (and activation rows) per tile.
const ROWS: usize = 16;
/// Bytes of one 32-column block of the 16 activation rows (`Int8Tiles::quads`).
const ACT_BLOCK_BYTES: usize = 512;

#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Palette 1. tmm0–3: 16 × 16 int32 sums; tmm4–5: 16 weight rows × 32 bytes; tmm6–7: the
/// activations of one block, 8 rows of 4 columns × 16 activation rows.
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
    /// Weight rows copied for [`Rows::Staged`]: 16 rows of 32-byte blocks, then their scales.
    static STAGE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where a group of 16 weight rows is read from.
#[derive(Clone, Copy)]
enum Rows {
    /// The q8_0 rows as stored (`row_bytes` apart); tiles load each block's 32 bytes in place and
    /// the 16 block scales are gathered. For one group of activation rows: each weight byte is
    /// read once, and the 16 rows are 16 memory streams.
    InPlace { p: *const u8, row_bytes: usize },
    /// The rows copied without their scales (`stride` apart, 32 bytes a block; the scales as f32
    /// at `d`, 16 a block; q4_K's mins likewise at `m`, else null), read front to back once and
    /// then reused from cache by every group of 16 activation rows (prefill chunks).
    Staged { p: *const u8, stride: usize, d: *const f32, m: *const f32 },
}

impl Rows {
    #[inline(always)]
    fn tile(self, blk: usize) -> (*const u8, usize) {
        match self {
            Rows::InPlace { p, row_bytes } => (p.wrapping_add(blk * Q8_0_BLOCK.0 + 2), row_bytes),
            Rows::Staged { p, stride, .. } => (p.wrapping_add(blk * Q8_0_BLOCK.1), stride),
        }
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
    let tiles = a.int8_tiles();
    let q4k = w.format == Format::Q4K;
    // 32-column blocks per row, and per activation scale
    let (nb, per_dx) = (w.padded_cols / 32, a.block / 32);
    let group_bytes = w.padded_cols * ROWS;
    asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    STAGE.with(|stage| {
        let mut stage = stage.borrow_mut();
        // staged rows one cache line longer than their bytes, so that the 16 rows of a tile do
        // not all fall in the same L1 set; then the scales and mins; 64 bytes of slack to align
        // them to a cache line
        let stride = nb * 32 + 64;
        stage.resize(ROWS * stride + 2 * nb * ROWS * 4 + 64, 0);
        let base = stage.as_mut_ptr();
        let qp = base.add(base.align_offset(64));
        let dp = qp.add(ROWS * stride) as *mut f32;
        let mp = dp.add(nb * ROWS);
        let mut r = r0;
        while r < r1 {
            let nr = (r1 - r).min(ROWS);
            let rows = if q4k {
                stage_q4k(w, r, nr, qp, stride, dp, mp);
                Rows::Staged { p: qp, stride, d: dp, m: mp }
            } else if tiles.groups == 1 && nr == ROWS {
                Rows::InPlace { p: w.row(r).as_ptr(), row_bytes: w.row_bytes }
            } else {
                stage_q8_0(w, r, nr, nb, qp, stride, dp);
                Rows::Staged { p: qp, stride, d: dp, m: std::ptr::null() }
            };
            for g in 0..tiles.groups {
                let act = Act {
                    quads: tiles.quads.as_ptr().add(g * group_bytes) as *const u8,
                    d: tiles.d.as_ptr().add(g * (nb / per_dx) * ROWS),
                    per_dx,
                    sums: if q4k { tiles.scaled_sums32.as_ptr().add(g * nb * ROWS) } else { std::ptr::null() },
                };
                let sums = if q4k { block_sums::<true>(rows, nb, act) } else { block_sums::<false>(rows, nb, act) };
                // sums[i][n] to y[g * 16 + n][r + i]: consecutive stores along each output row
                for n in 0..(a.batch - g * ROWS).min(ROWS) {
                    let yr = y.add((g * ROWS + n) * y_stride + r);
                    for (i, s) in sums.iter().enumerate().take(nr) {
                        *yr.add(i) = s[n];
                    }
                }
            }
            r += nr;
        }
    });
    asm!("tilerelease", options(nostack, nomem));
}

/// One group of 16 activation rows (see [`Int8Tiles`](crate::act::Int8Tiles)).
#[derive(Clone, Copy)]
struct Act {
    /// 512 bytes a 32-column block.
    quads: *const u8,
    /// 16 scales per `per_dx` blocks.
    d: *const f32,
    per_dx: usize,
    /// q4_K: 16 scaled sums a block; else null.
    sums: *const f32,
}

/// Rows `r..r + nr` of a q4_K matrix unpacked for [`Rows::Staged`]: one byte per weight (0–15),
/// and per 32 weights the scale `d · sc` and the min `dmin · m`. Rows past `nr` are zero.
#[target_feature(enable = "avx2,f16c")]
unsafe fn stage_q4k(w: &PackedMatrix, r: usize, nr: usize, qp: *mut u8, stride: usize, dp: *mut f32, mp: *mut f32) {
    let nsb = w.padded_cols / Q4K_BLOCK.1;
    let low = _mm256_set1_epi8(0x0f);
    for i in 0..ROWS {
        let q = qp.add(i * stride);
        if i >= nr {
            zero_row(i, nsb * 8, q, dp, mp);
            continue;
        }
        let row = w.row(r + i).as_ptr();
        for sb in 0..nsb {
            let bp = row.add(sb * Q4K_BLOCK.0);
            let (d, dmin) = (crate::simd::f16_at(bp), crate::simd::f16_at(bp.add(2)));
            let (sc, m) = crate::format::q4k_scales(std::slice::from_raw_parts(bp.add(4), 12));
            for j in 0..8 {
                *dp.add((sb * 8 + j) * ROWS + i) = d * sc[j] as f32;
                *mp.add((sb * 8 + j) * ROWS + i) = dmin * m[j] as f32;
            }
            // 32 bytes hold weights 64c..64c+32 (low nibbles) and the next 32 (high nibbles)
            for c in 0..4 {
                let v = _mm256_loadu_si256(bp.add(16 + 32 * c) as *const __m256i);
                let o = q.add(sb * 256 + 64 * c);
                _mm256_store_si256(o as *mut __m256i, _mm256_and_si256(v, low));
                _mm256_store_si256(o.add(32) as *mut __m256i, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
            }
        }
    }
}

/// Rows `r..r + nr` of a q8_0 matrix copied for [`Rows::Staged`], each read front to back. Rows
/// past `nr` are zero.
#[target_feature(enable = "avx2,f16c")]
unsafe fn stage_q8_0(w: &PackedMatrix, r: usize, nr: usize, nb: usize, qp: *mut u8, stride: usize, dp: *mut f32) {
    for i in 0..ROWS {
        let q = qp.add(i * stride);
        if i < nr {
            let row = w.row(r + i).as_ptr();
            for k in 0..nb {
                let bp = row.add(k * Q8_0_BLOCK.0);
                _mm256_store_si256(q.add(32 * k) as *mut __m256i, _mm256_loadu_si256(bp.add(2) as *const __m256i));
                *dp.add(k * ROWS + i) = crate::simd::f16_at(bp);
            }
        } else {
            zero_row(i, nb, q, dp, std::ptr::null_mut());
        }
    }
}

/// Staged row `i` (of `nb` 32-byte blocks at `q`) past the matrix: zero bytes, scales and mins
/// (`mp` may be null).
unsafe fn zero_row(i: usize, nb: usize, q: *mut u8, dp: *mut f32, mp: *mut f32) {
    std::ptr::write_bytes(q, 0, 32 * nb);
    for k in 0..nb {
        *dp.add(k * ROWS + i) = 0.0;
        if !mp.is_null() {
            *mp.add(k * ROWS + i) = 0.0;
        }
    }
}

/// 16 weight rows times one group of 16 activation rows: `[weight row][activation row]` sums.
///
/// The tiles run four blocks a step into four sum tiles, stored to one of two buffers; the
/// vector units scale the sums of the step before (tile registers are not renamed and tile
/// stores do not forward to vector loads, so this keeps the two units from waiting on each other).
/// `UNSIGNED`: the weights are unsigned bytes (q4_K), with mins.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn block_sums<const UNSIGNED: bool>(rows: Rows, nb: usize, act: Act) -> [[f32; ROWS]; ROWS] {
    let mut acc = [_mm512_setzero_ps(); ROWS];
    let mut c = [Sums([[0; ROWS]; 4 * ROWS]), Sums([[0; ROWS]; 4 * ROWS])];
    // byte offsets of the 16 rows, to gather their block scales in place
    let offsets = match rows {
        Rows::InPlace { row_bytes, .. } => _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(row_bytes as i32),
        ),
        Rows::Staged { .. } => _mm512_setzero_si512(),
    };
    let steps = nb.div_ceil(4);
    for step in 0..=steps {
        if step < steps {
            let blk = 4 * step;
            let cp = c[step % 2].0.as_mut_ptr() as *mut u8;
            tile_step::<UNSIGNED>(rows, blk, (nb - blk).min(4), act.quads.add(blk * ACT_BLOCK_BYTES), cp);
        }
        if step > 0 {
            let blk = 4 * (step - 1);
            let sums = &c[(step - 1) % 2].0;
            for k in 0..(nb - blk).min(4) {
                let dw = match rows {
                    // the f16 scale is the first 2 of the 4 bytes gathered from each row's block
                    Rows::InPlace { p, .. } => _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32::<1>(
                        offsets,
                        p.add((blk + k) * Q8_0_BLOCK.0) as *const _,
                    ))),
                    Rows::Staged { d, .. } => _mm512_loadu_ps(d.add((blk + k) * ROWS)),
                };
                let mut dws = [0f32; ROWS];
                _mm512_storeu_ps(dws.as_mut_ptr(), dw);
                let dx = _mm512_loadu_ps(act.d.add((blk + k) / act.per_dx * ROWS));
                for i in 0..ROWS {
                    let s = _mm512_cvtepi32_ps(_mm512_load_si512(sums[k * ROWS + i].as_ptr() as *const _));
                    acc[i] = _mm512_fmadd_ps(s, _mm512_mul_ps(dx, _mm512_set1_ps(dws[i])), acc[i]);
                }
                if let (true, Rows::Staged { m, .. }) = (UNSIGNED, rows) {
                    // − min · Σ x over the 32 columns, for each weight row
                    let xs = _mm512_loadu_ps(act.sums.add((blk + k) * ROWS));
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fnmadd_ps(xs, _mm512_set1_ps(*m.add((blk + k) * ROWS + i)), *a);
                    }
                }
            }
        }
    }
    let mut out = [[0f32; ROWS]; ROWS];
    for i in 0..ROWS {
        _mm512_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
    out
}

macro_rules! tile_step {
    ($dp:literal, $rows:expr, $blk:expr, $n:expr, $xp:expr, $cp:expr) => {{
        let (rows, blk, n, xp, cp): (Rows, usize, usize, *const u8, *mut u8) = ($rows, $blk, $n, $xp, $cp);
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
                    w = in(reg) rows.tile(blk + k).0, ws = in(reg) ws, x = in(reg) xp.add(ACT_BLOCK_BYTES * k),
                    xs = in(reg) 64usize, c = in(reg) cp.add(1024 * k), cs = in(reg) 64usize,
                    options(nostack)
                );
            }
        }
    }};
}

/// Blocks `blk..blk + n` (`n` of 1–4): int32 sums to `cp` (1 KiB a block), activation tiles at
/// `xp` (512 bytes a block). `UNSIGNED`: `tdpbusd` (unsigned weight bytes), else `tdpbssd`.
#[inline(always)]
unsafe fn tile_step<const UNSIGNED: bool>(rows: Rows, blk: usize, n: usize, xp: *const u8, cp: *mut u8) {
    if UNSIGNED {
        tile_step!("tdpbusd", rows, blk, n, xp, cp)
    } else {
        tile_step!("tdpbssd", rows, blk, n, xp, cp)
    }
}
