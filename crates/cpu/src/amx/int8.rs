//! q8_0 and q4_K weights on AMX int8 tiles (`tdpbsud`, `tdpbusd`).
//!
//! q8_0 is stored in groups of 16 rows whose 512-byte blocks (4 columns × 16 rows side by side,
//! offset to unsigned bytes; see `format::Q8_0_GROUP`) are, as stored, the right-hand operand of
//! a tile product over 32 columns. The left-hand operand is the same 32 columns of 16 activation
//! rows, loaded in place from the 8-bit activations. One `tdpbsud` gives the 16 × 16 exact int32
//! dot products of the block; the vector units add the offset correction, scale each sum by its
//! weight block's scale times the activation block's scale, and add it to f32 sums held in 16
//! registers.
//!
//! q4_K rows are unpacked first, 16 rows at a time, into a copy that stays in cache: one byte per
//! weight (0–15, multiplied as unsigned by `tdpbusd` against the activations laid out by
//! [`Activations::int8_tiles`]), the scale `d · sc` and the min `dmin · m` of each 32 weights as
//! f32. The mins are applied with the activations' per-32 sums.
//!
//! The arithmetic is the vector kernels' (exact integer block sums, scaled in f32), but the
//! integer work of 16 activation rows is one instruction. What remains per 32 columns is storing
//! the sum tile and scaling it (the block scales rule out accumulating in the tiles, as the bf16
//! tiles do), and on this VM the two vCPUs share one tile unit: so the vector kernels keep the
//! products with few activation rows (see `amx::min_batch`).

use std::arch::asm;
use std::arch::x86_64::*;

use crate::act::Activations;
use crate::format::{Format, PackedMatrix, Q4K_BLOCK};

/// Weight rows (and activation rows) per tile.
const ROWS: usize = 16;
/// Bytes of one 32-column block of 16 rows in a right-hand tile operand (`Int8Tiles::quads` for
/// q4_K, a q8_0 group's block).
const BLOCK_BYTES: usize = 512;

#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Palette 1. tmm0–3: 16 × 16 int32 sums; tmm4–5: the left-hand operands, 16 rows × 32 bytes
/// (q4_K weight rows, or q8_0 activation rows); tmm6–7: the right-hand operands of one block,
/// 8 rows of 4 columns × 16 rows (q4_K activations, or q8_0 weights).
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
    /// q4_K weight rows unpacked for [`Staged`]: 16 rows of 32-byte blocks, then their scales.
    static STAGE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Left-hand operands of the tile products: 16 rows of 32-byte blocks, `stride` apart (q4_K:
/// the unpacked weight rows, with their scales as f32 at `d` and mins at `m`, 16 a block, read
/// front to back once and reused from cache by every group of 16 activation rows; q8_0: the
/// activation rows, `d` and `m` unused).
#[derive(Clone, Copy)]
struct Staged {
    p: *const u8,
    stride: usize,
    d: *const f32,
    m: *const f32,
}

impl Staged {
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
    if w.format == Format::Q8_0 {
        q8_0_rows(w, a, r0, r1, y, y_stride);
    } else {
        q4k_rows(w, a, r0, r1, y, y_stride);
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// q8_0: each group of 16 weight rows in place against each group of 16 activation rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn q8_0_rows(w: &PackedMatrix, a: &Activations, r0: usize, r1: usize, y: *mut f32, y_stride: usize) {
    let (pc, nb) = (w.padded_cols, w.padded_cols / 32);
    for g in r0 / ROWS..r1.div_ceil(ROWS) {
        let group = w.q8_0_group(g).as_ptr();
        for xg in 0..a.batch.div_ceil(ROWS) {
            // the activations are padded with zero rows to whole groups of 16
            let acts = Staged {
                p: a.qs.as_ptr().add(xg * ROWS * pc) as *const u8,
                stride: pc,
                d: std::ptr::null(),
                m: std::ptr::null(),
            };
            let at = xg * ROWS * nb;
            let sums = q8_0_sums(acts, group, nb, a.d.as_ptr().add(at), a.q8_offset.as_ptr().add(at));
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

/// q4_K: 16 weight rows unpacked once, then against each group of 16 activation rows.
unsafe fn q4k_rows(w: &PackedMatrix, a: &Activations, r0: usize, r1: usize, y: *mut f32, y_stride: usize) {
    let tiles = a.int8_tiles();
    // 32-column blocks per row, and per activation scale
    let (nb, per_dx) = (w.padded_cols / 32, a.block / 32);
    let group_bytes = w.padded_cols * ROWS;
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
            stage_q4k(w, r, nr, qp, stride, dp, mp);
            let rows = Staged { p: qp, stride, d: dp, m: mp };
            for g in 0..tiles.groups {
                let act = Act {
                    quads: tiles.quads.as_ptr().add(g * group_bytes) as *const u8,
                    d: tiles.d.as_ptr().add(g * (nb / per_dx) * ROWS),
                    per_dx,
                    sums: tiles.scaled_sums32.as_ptr().add(g * nb * ROWS),
                };
                let sums = q4k_sums(rows, nb, act);
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
}

/// One group of 16 activation rows for q4_K (see [`Int8Tiles`](crate::act::Int8Tiles)).
#[derive(Clone, Copy)]
struct Act {
    /// 512 bytes a 32-column block.
    quads: *const u8,
    /// 16 scales per `per_dx` blocks.
    d: *const f32,
    per_dx: usize,
    /// 16 scaled sums a block.
    sums: *const f32,
}

/// Rows `r..r + nr` of a q4_K matrix unpacked for [`Staged`]: one byte per weight (0–15),
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

/// 16 staged q4_K weight rows times one group of 16 activation rows: `[weight row][activation
/// row]` sums, mins applied.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn q4k_sums(rows: Staged, nb: usize, act: Act) -> [[f32; ROWS]; ROWS] {
    let mut acc = [_mm512_setzero_ps(); ROWS];
    pipeline(
        nb,
        |blk, n, to| tile_step::<true>(rows, blk, n, act.quads.add(blk * BLOCK_BYTES), to),
        |blk, sums| {
            let mut dws = [0f32; ROWS];
            _mm512_storeu_ps(dws.as_mut_ptr(), _mm512_loadu_ps(rows.d.add(blk * ROWS)));
            let dx = _mm512_loadu_ps(act.d.add(blk / act.per_dx * ROWS));
            for i in 0..ROWS {
                let s = _mm512_cvtepi32_ps(_mm512_load_si512(sums[i].as_ptr() as *const _));
                acc[i] = _mm512_fmadd_ps(s, _mm512_mul_ps(dx, _mm512_set1_ps(dws[i])), acc[i]);
            }
            // − min · Σ x over the 32 columns, for each weight row
            let xs = _mm512_loadu_ps(act.sums.add(blk * ROWS));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fnmadd_ps(xs, _mm512_set1_ps(*rows.m.add(blk * ROWS + i)), *a);
            }
        },
    );
    rows_of(acc)
}

/// 16 activation rows (`acts`, with their block scales `dx` and offsets `off`, `nb` a row) times
/// one q8_0 group (`group`: its blocks, then its scales): `[activation row][weight row]` sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn q8_0_sums(acts: Staged, group: *const u8, nb: usize, dx: *const f32, off: *const i32) -> [[f32; ROWS]; ROWS] {
    let mut acc = [_mm512_setzero_ps(); ROWS];
    let scales = group.add(nb * BLOCK_BYTES);
    pipeline(
        nb,
        |blk, n, to| tile_step::<false>(acts, blk, n, group.add(blk * BLOCK_BYTES), to),
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
        let (rows, blk, n, xp, cp): (Staged, usize, usize, *const u8, *mut u8) = ($rows, $blk, $n, $xp, $cp);
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
/// from `rows`, right-hand ones at `xp` (512 bytes a block). `Q4K`: `tdpbusd` (unsigned q4_K
/// weights × signed activations); else `tdpbsud` (signed activations × q8_0 weights offset to
/// unsigned).
#[inline(always)]
unsafe fn tile_step<const Q4K: bool>(rows: Staged, blk: usize, n: usize, xp: *const u8, cp: *mut u8) {
    if Q4K {
        tile_step!("tdpbusd", rows, blk, n, xp, cp)
    } else {
        tile_step!("tdpbsud", rows, blk, n, xp, cp)
    }
}
