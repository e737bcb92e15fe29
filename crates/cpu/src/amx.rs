//! Intel AMX tile products (Sapphire Rapids and later) for batches of activation rows.
//!
//! One `tdpbf16ps` multiplies a 16 × 32 bf16 tile of weights by a 32 × 16 bf16 tile of
//! activations into 16 × 16 f32 sums: 8192 multiply-adds per instruction, far beyond what the
//! vector units do. With it, a product with 2–16 activation rows costs little more than one row
//! (the weights are read once and the arithmetic mostly hides behind the memory stream), and a
//! prefill chunk is no longer compute-bound.
//!
//! - bf16 weights are loaded into tiles straight from the packed rows (no copy);
//! - q8_0 and q4_K weights go to int8 tiles instead (the `int8` module), from their groups of 16
//!   rows;
//! - q6_K is decoded, 32 rows at a time, into a bf16 panel that stays in L2;
//! - activations are split once per call into a bf16 high part and a bf16 low part (the rounding
//!   error of the high part), both multiplied: together they carry 16 significant bits, so the
//!   activations lose nothing that matters against bf16 weights (error ≈ 2⁻¹⁷ per term);
//! - f32 and FP8 weights never come here: both would be rounded to bf16 (FP8 times its block
//!   scale is not a bf16 number), and they ask for exact products.
//!
//! So bf16 weights give the f32 kernels' result to about 1e-5, and the ggml formats add a bf16
//! rounding of each dequantized weight (2⁻⁹), below the error of the 8-bit activations their
//! vector kernels use.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::act::Activations;
use crate::format::{Format, PackedMatrix, Q6K_BLOCK};
use crate::simd::f16_at;

mod int8;

/// Tile shape used for every tile: 16 rows of 64 bytes (16 × 32 bf16, or 16 × 16 f32).
const TILE_ROWS: usize = 16;
/// Columns of one tile step (32 bf16 = 64 bytes).
const STEP: usize = 32;

/// Whether this CPU and OS run AMX bf16 tiles (the Linux kernel must grant the tile state to the
/// process; that request is made here, once).
pub fn available() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(detect)
}

#[cfg(target_os = "linux")]
fn detect() -> bool {
    if !crate::simd::avx512::available() || !is_x86_feature_detected!("avx512bf16") || !is_x86_feature_detected!("xsave") {
        return false;
    }
    // CPUID.(EAX=7,ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE
    // (bit 25 = AMX-INT8: every AMX CPU so far has all three, and q8_0 takes the int8 tiles)
    let leaf7 = __cpuid_count(7, 0);
    if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 || leaf7.edx & (1 << 25) == 0 {
        return false;
    }
    // the OS saves the tile configuration and data (XCR0 bits 17 and 18)
    let xcr0 = unsafe { xgetbv0() };
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn detect() -> bool {
    false
}

#[cfg(target_os = "linux")]
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    _xgetbv(0)
}

/// Fewest activation rows for which this path beats the vector kernels (measured with
/// `moeserve bench --kernels`): bf16 and q8_0 tiles read the weights as stored, q4_K pays an
/// unpacking and q6_K a decode into the bf16 panel. The q8_0 and q4_K vector kernels cover 16
/// weight rows per vector and keep the smaller batches (8192 × 4096, three interleaved runs each:
/// q8_0 at 12, 16, 24 rows 2.6–3.3, 3.1–3.8, 4.1–4.6 ms against 3.7–3.8, 3.6–3.9, 5.3–5.5 on
/// tiles, a wash at 48; q4_K at 8, 20, 28 rows 1.5, 2.6–3.2, 3.9–4.5 ms against 2.4–3.7, 5.3–6.8,
/// 4.8–5.0, tiles ahead from 32). `MOESERVE_AMX_MIN_BATCH` overrides it (experiments).
pub fn min_batch(format: Format) -> usize {
    static OVERRIDE: OnceLock<Option<usize>> = OnceLock::new();
    let over = *OVERRIDE.get_or_init(|| std::env::var("MOESERVE_AMX_MIN_BATCH").ok().and_then(|v| v.parse().ok()));
    over.unwrap_or(match format {
        Format::F32 | Format::Fp8 { .. } => usize::MAX,
        Format::Bf16 => 2,
        Format::Q8_0 => 48,
        Format::Q4K => 32,
        Format::Q6K => 12,
    })
}

/// Whether a product of `w` with `a` takes this path.
pub fn applies(w: &PackedMatrix, a: &Activations) -> bool {
    a.batch >= min_batch(w.format) && w.padded_cols.is_multiple_of(STEP) && available()
}

/// The tile configuration: palette 1, every one of the 8 tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row (u16, little endian)
        c[48 + t] = TILE_ROWS as u8;
        t += 1;
    }
    TileConfig(c)
};

thread_local! {
    /// 32 rows of weights decoded to bf16 (formats other than bf16, and a last block of fewer
    /// than 32 rows, zero padded).
    static PANEL: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y[b * y_stride + r] = W[r] · x[b]` for the rows `r0..r1` and every activation row.
///
/// # Safety
/// `applies(w, a)` must be true, and `y` must be valid for those writes.
pub unsafe fn rows(w: &PackedMatrix, a: &Activations, r0: usize, r1: usize, y: *mut f32, y_stride: usize) {
    if int8::takes(w.format) {
        return int8::rows(w, a, r0, r1, y, y_stride);
    }
    let pairs = a.bf16_pairs();
    let pc = w.padded_cols;
    // one cache line more than a row, so that the 16 rows of a tile fall in different L1 sets
    let stride = pc + 32;
    asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    PANEL.with(|panel| {
        let mut panel = panel.borrow_mut();
        let mut r = r0;
        while r < r1 {
            let nr = (r1 - r).min(2 * TILE_ROWS);
            let (wp, ws) = if w.format == Format::Bf16 && nr == 2 * TILE_ROWS {
                // bf16 rows go to the tiles as they are
                (w.row(r).as_ptr(), w.row_bytes)
            } else {
                // decoding a whole row at a time, one memory stream, measured faster than
                // decoding column chunks of the 32 rows just before the tiles use them
                panel.resize(2 * TILE_ROWS * stride, 0);
                for i in 0..nr {
                    decode_bf16(w, r + i, pc, panel[i * stride..].as_mut_ptr());
                }
                panel[nr * stride..].fill(0);
                (panel.as_ptr() as *const u8, 2 * stride)
            };
            let out = Out { y, y_stride, r, rows: nr, batch: a.batch };
            if nr > TILE_ROWS {
                block::<true>(wp, ws, pairs, pc, out);
            } else {
                block::<false>(wp, ws, pairs, pc, out);
            }
            r += nr;
        }
    });
    asm!("tilerelease", options(nostack, nomem));
}

/// Where a block's sums go: rows `r..r + rows` of every activation row `b < batch`.
#[derive(Clone, Copy)]
struct Out {
    y: *mut f32,
    y_stride: usize,
    r: usize,
    rows: usize,
    batch: usize,
}

/// 16 (or 32 with `TWO_ROW_TILES`) weight rows at `wp` (`ws` bytes apart) times every activation
/// row, 16 activation rows per pass over the columns: their bf16 high parts and low parts
/// (`Activations::bf16_pairs`) into separate sums, added in f32. Tiles: 0–1 sums of the high
/// parts, 2–3 of the low parts, 4–5 weights, 6–7 activations.
#[inline]
unsafe fn block<const TWO_ROW_TILES: bool>(wp: *const u8, ws: usize, pairs: &[u16], pc: usize, out: Out) {
    // one part of one group: pc/2 pairs × 16 rows × 2 bf16 = pc · 32 bytes
    let part_bytes = pc * 32;
    let w1 = wp.add(TILE_ROWS * ws);
    for g in 0..out.batch.div_ceil(TILE_ROWS) {
        let hi = (pairs.as_ptr() as *const u8).add(2 * g * part_bytes);
        let lo = hi.add(part_bytes);
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        for s in 0..pc / STEP {
            let (wo, xo) = (s * 64, s * 1024);
            asm!(
                "tileloadd tmm4, [{w} + {ws}*1]",
                "tileloadd tmm6, [{hi} + {xs}*1]",
                "tileloadd tmm7, [{lo} + {xs}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm4, tmm7",
                w = in(reg) wp.add(wo), ws = in(reg) ws, hi = in(reg) hi.add(xo), lo = in(reg) lo.add(xo),
                xs = in(reg) 64usize,
                options(nostack, readonly)
            );
            if TWO_ROW_TILES {
                asm!(
                    "tileloadd tmm5, [{w} + {ws}*1]",
                    "tdpbf16ps tmm1, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    w = in(reg) w1.add(wo), ws = in(reg) ws,
                    options(nostack, readonly)
                );
            }
        }
        let mut sums = Sums([[0f32; 256]; 4]);
        let sp = sums.0.as_mut_ptr() as *mut u8;
        asm!(
            "tilestored [{p} + {s}*1], tmm0",
            "tilestored [{p2} + {s}*1], tmm1",
            "tilestored [{p3} + {s}*1], tmm2",
            "tilestored [{p4} + {s}*1], tmm3",
            p = in(reg) sp, p2 = in(reg) sp.add(1024), p3 = in(reg) sp.add(2048), p4 = in(reg) sp.add(3072),
            s = in(reg) 64usize,
            options(nostack)
        );
        for t in 0..if TWO_ROW_TILES { 2 } else { 1 } {
            let (c_hi, c_lo) = (&sums.0[t], &sums.0[2 + t]);
            for n in 0..TILE_ROWS.min(out.batch - g * TILE_ROWS) {
                let yb = out.y.add((g * TILE_ROWS + n) * out.y_stride + out.r + t * TILE_ROWS);
                for i in 0..TILE_ROWS.min(out.rows - t * TILE_ROWS) {
                    *yb.add(i) = c_hi[i * TILE_ROWS + n] + c_lo[i * TILE_ROWS + n];
                }
            }
        }
    }
}

#[repr(C, align(64))]
struct Sums([[f32; 256]; 4]);

/// Row `r` of `w` (`pc` = its padded columns) as bf16, nearest even, at `o`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
unsafe fn decode_bf16(w: &PackedMatrix, r: usize, pc: usize, o: *mut u16) {
    if w.grouped && w.format != Format::Q6K {
        // (q8_0 and q4_K take the int8 tiles; this keeps the panel path complete)
        let mut f = vec![0f32; pc];
        w.decode_grouped_row(r, &mut f);
        for c in 0..pc / 16 {
            store16(o.add(16 * c), _mm512_loadu_ps(f.as_ptr().add(16 * c)));
        }
        return;
    }
    // (q6_K's superblocks are gathered from its group below)
    let row = if w.grouped { std::ptr::null() } else { w.row(r).as_ptr() };
    match w.format {
        Format::F32 => {
            for c in 0..pc / 16 {
                store16(o.add(16 * c), _mm512_loadu_ps((row as *const f32).add(16 * c)));
            }
        }
        Format::Bf16 => std::ptr::copy_nonoverlapping(row as *const u16, o, pc),
        Format::Fp8 { block } => {
            // E4M3 to f16 bits (the value / 2^8, exactly), widened to f32 and multiplied by the
            // block scale (stored × 2^8)
            let scales = w.fp8_row_scales(r);
            let mask = _mm256_set1_epi16(0xbf80u16 as i16);
            for c in 0..pc / 16 {
                let (s0, s1) = (16 * c / block[1], (16 * c + 15) / block[1]);
                let scale = if s0 == s1 {
                    _mm512_set1_ps(scales[s0])
                } else {
                    // a scale block narrower than 16 columns ends here (not R1's 128)
                    let per: [f32; 16] = std::array::from_fn(|i| scales[(16 * c + i) / block[1]]);
                    _mm512_loadu_ps(per.as_ptr())
                };
                let b = _mm_loadu_si128(row.add(16 * c) as *const __m128i);
                let h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), mask);
                store16(o.add(16 * c), _mm512_mul_ps(_mm512_cvtph_ps(h), scale));
            }
        }
        Format::Q8_0 | Format::Q4K => {} // read from its group above
        Format::Q6K => {
            let (low4, low2, m32) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(0x03), _mm_set1_epi8(32));
            for sb in 0..pc / Q6K_BLOCK.1 {
                // (grouped: the superblock's bytes gathered from its record, in ggml's order)
                let block = if w.grouped { w.q6k_block(r, sb) } else { [0u8; Q6K_BLOCK.0] };
                let bp = if w.grouped { block.as_ptr() } else { row.add(sb * Q6K_BLOCK.0) };
                let sc = bp.add(192) as *const i8;
                let d = f16_at(bp.add(208));
                let ob = o.add(sb * 256);
                for h in 0..2 {
                    // group k of half h: 32 values from the low (k < 2) or high nibbles of
                    // ql[32(k & 1)..], with bits 2k, 2k+1 of qh as the top two bits
                    for k in 0..4 {
                        for part in 0..2 {
                            let ql = _mm_loadu_si128(bp.add(64 * h + 32 * (k & 1) + 16 * part) as *const __m128i);
                            let qh = _mm_loadu_si128(bp.add(128 + 32 * h + 16 * part) as *const __m128i);
                            let lo = if k < 2 { _mm_and_si128(ql, low4) } else { _mm_and_si128(_mm_srli_epi16(ql, 4), low4) };
                            let hb = _mm_and_si128(_mm_srl_epi16(qh, _mm_cvtsi32_si128(2 * k as i32)), low2);
                            let q = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hb, 4)), m32);
                            let scale = _mm512_set1_ps(d * *sc.add(8 * h + 2 * k + part) as f32);
                            let vals = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), scale);
                            store16(ob.add(128 * h + 32 * k + 16 * part), vals);
                        }
                    }
                }
            }
        }
    }
}

/// 16 f32 → 16 bf16 (nearest even) at `o`.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn store16(o: *mut u16, v: __m512) {
    _mm256_storeu_si256(o as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)));
}
