//! Attention for decode steps over shared rows (MLA's absorbed form, at most
//! `DECODE_MAX_QUERIES` queries per head: decode and MTP verification), AVX-512: the (head,
//! query) rows in the lanes of a vector ([`heads_in_lanes`]), the cached rows in fixed chunks
//! merged in order ([`decode_in_chunks`]).

use std::arch::x86_64::*;
use std::ops::Range;

use rayon::prelude::*;

use super::Attention;
use crate::simd::{exp16, lane_mask};

/// Cached rows per partial softmax of a decode call: chunk `c` holds rows `c·128..(c + 1)·128`
/// whatever the call's length, so that a query's result has the same bits in any call that
/// holds its rows (`decode_in_chunks`).
const DECODE_CHUNK: usize = 128;

/// Chunks per span: a decode call merges its chunks' partials left to right within each span of
/// 16 chunks (2048 cached rows, again at absolute positions), then the spans' partials left to
/// right. A thread keeps one partial per span it begins, and one per chunk only of the span it
/// begins within: at most `SPAN - 1` besides, not one per chunk (DeepSeek-R1's 128 heads hold
/// 256 KiB per partial, and a 32K context has 256 chunks).
const SPAN: usize = 16;

/// A decode call ([`heads_in_lanes`]): the cached rows in fixed chunks of [`DECODE_CHUNK`],
/// each chunk's partial softmax merged in a fixed order (chunks left to right within each
/// [`SPAN`], then the spans left to right). The result of a query then depends neither on how
/// many rows the call holds nor on how the chunks are shared out over the threads: an MTP
/// verification step of 2 tokens gives each of its queries the bits of the plain decode step
/// of that token (a chunk or span of rows a query does not see merges as exact zeros), so
/// speculative decoding stays lossless.
pub(super) fn decode_in_chunks(a: &Attention, threads: usize) -> Vec<f32> {
    let (rows, dv) = (a.heads * a.queries, a.values.width);
    let chunks = a.tokens.min(a.start + a.queries).div_ceil(DECODE_CHUNK).max(1);
    let per = chunks.div_ceil(threads);
    let lanes = Lanes::new(a);
    // (`p.o` zeroed)
    let chunk = |c: usize, p: &mut Partial| {
        let keys = c * DECODE_CHUNK..(c + 1) * DECODE_CHUNK;
        // SAFETY: `wide` (the caller) means the CPU has AVX-512F; `check` bounded every row.
        unsafe { heads_in_lanes(a, &lanes, keys, &mut p.o, &mut p.stats) };
    };
    // each thread's chunks in order, as (span, whether it begins at the span's first chunk,
    // partial): a chunk merges into the partial before it when that one began its span
    let shares: Vec<Vec<(usize, bool, Partial)>> = (0..chunks.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let mut out: Vec<(usize, bool, Partial)> = Vec::new();
            let mut scratch: Option<Partial> = None;
            for c in t * per..((t + 1) * per).min(chunks) {
                let span = c / SPAN;
                match out.last_mut() {
                    Some((s, true, running)) if *s == span => {
                        let p = match scratch.as_mut() {
                            Some(p) => {
                                p.o.fill(0.0);
                                p
                            }
                            None => scratch.insert(Partial::new(rows, dv)),
                        };
                        chunk(c, p);
                        running.merge(p, dv);
                    }
                    _ => {
                        let mut p = Partial::new(rows, dv);
                        chunk(c, &mut p);
                        out.push((span, c % SPAN == 0, p));
                    }
                }
            }
            out
        })
        .collect();
    let mut spans: Vec<(usize, Partial)> = Vec::new();
    for (span, _, p) in shares.into_iter().flatten() {
        match spans.last_mut() {
            Some((s, running)) if *s == span => running.merge(&p, dv),
            _ => spans.push((span, p)),
        }
    }
    let mut spans = spans.into_iter().map(|(_, p)| p);
    let Some(mut total) = spans.next() else { return vec![0f32; rows * dv] };
    spans.for_each(|p| total.merge(&p, dv));
    for (o, &(_, sum)) in total.o.chunks_exact_mut(dv).zip(&total.stats) {
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        o.iter_mut().for_each(|v| *v *= inv);
    }
    total.o
}

/// Unnormalized outputs of some key rows and each row's softmax `(max, sum)` over them
/// (`(-inf, 0)`: none).
struct Partial {
    o: Vec<f32>,
    stats: Vec<(f32, f32)>,
}

impl Partial {
    fn new(rows: usize, dv: usize) -> Partial {
        Partial { o: vec![0f32; rows * dv], stats: vec![(f32::NEG_INFINITY, 0f32); rows] }
    }

    /// `self` then `next` (rows of `dv` values): a row `next` has no key rows for keeps its bits.
    fn merge(&mut self, next: &Partial, dv: usize) {
        for (r, (st, &(m2, l2))) in self.stats.iter_mut().zip(&next.stats).enumerate() {
            let (m1, l1) = *st;
            let m = m1.max(m2);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let weight = |mi: f32| if mi == f32::NEG_INFINITY { 0.0 } else { (mi - m).exp() };
            let (w1, w2) = (weight(m1), weight(m2));
            let (o, o2) = (&mut self.o[r * dv..(r + 1) * dv], &next.o[r * dv..(r + 1) * dv]);
            o.iter_mut().zip(o2).for_each(|(a, b)| *a = *a * w1 + *b * w2);
            *st = (m, l1 * w1 + l2 * w2);
        }
    }
}

/// Key rows per block of [`heads_in_lanes`]: their scores and weights stay in L1.
const DECODE_BLOCK: usize = 32;
/// Key rows scored at a time: independent FMA chains, each of a broadcast key value.
const SCORE_TILE: usize = 8;
/// (Head, query) rows per value tile of [`heads_in_lanes`], and 16-value vectors per row: 16
/// sums in registers, each loaded value vector used by 4 rows.
const VALUE_HEADS: usize = 4;
const VALUE_VECTORS: usize = 4;

/// A decode call's queries as [`heads_in_lanes`] reads them, prepared once per call.
struct Lanes {
    /// Per group of 16 (head, query) rows, the queries transposed (`[g][d][lane]`) and
    /// times the scale.
    qt: Vec<f32>,
    /// Per group, the key rows each lane sees (causal; lanes past the last row see none).
    seen: Vec<[i32; 16]>,
    /// The query parts' widths summed.
    width: usize,
}

impl Lanes {
    fn new(a: &Attention) -> Lanes {
        let rows = a.heads * a.queries;
        let groups = rows.div_ceil(16);
        let width: usize = a.parts.iter().map(|(_, k)| k.width).sum();
        let mut qt = vec![0f32; groups * width * 16];
        let mut d0 = 0;
        for (q, k) in a.parts {
            for hq in 0..rows {
                let (g, lane) = (hq / 16, hq % 16);
                for d in 0..k.width {
                    qt[(g * width + d0 + d) * 16 + lane] = q[hq * k.width + d] * a.scale;
                }
            }
            d0 += k.width;
        }
        let seen = (0..groups)
            .map(|g| std::array::from_fn(|l| if 16 * g + l < rows { a.query(16 * g + l).seen as i32 } else { 0 }))
            .collect();
        Lanes { qt, seen, width }
    }
}

/// Decode over shared rows (MLA's absorbed form: every head reads the same cache rows), for
/// a few query rows per head (a decode step, MTP verification), the key rows of `keys` only:
/// `o: [H·S, dv]` (zeroed by the caller) unnormalized, each row's softmax `(max, sum)` in
/// `stats` (as `wide::group_over`'s).
///
/// The (head, query) rows are the 16 lanes of a vector: a key row's score for 16 rows is a
/// sum of its values, each broadcast, times the queries' transposed columns (no horizontal
/// sums); the online softmax takes one `exp` per key row for 16 rows, the causal mask being
/// a lane mask; the weighted sum of the values loads each value vector once for 4 rows.
/// `wide::group_over` instead scores each row on its own, reloading every key row per row and
/// transposing its sums.
///
/// # Safety
/// AVX-512F; `a` passed `check`, with shared rows.
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::needless_range_loop)] // register-blocked: rows and vectors index several arrays
unsafe fn heads_in_lanes(a: &Attention, lanes: &Lanes, keys: Range<usize>, o: &mut [f32], stats: &mut [(f32, f32)]) {
    let (rows, dv, v_stride) = (a.heads * a.queries, a.values.width, a.values.stride);
    let (t0, t1) = (keys.start, keys.end.min(a.tokens.min(a.start + a.queries)));
    let (qt, seen, width) = (&lanes.qt, &lanes.seen, lanes.width);
    let groups = rows.div_ceil(16);
    // each group's running max (finite: `exp16` of -inf is NaN) and sum
    let mut max = vec![_mm512_set1_ps(-1e30); groups];
    let mut sum = vec![_mm512_setzero_ps(); groups];
    let mut p = [[0f32; 16]; DECODE_BLOCK];
    let mut scores = [_mm512_setzero_ps(); DECODE_BLOCK];
    for b0 in (t0..t1).step_by(DECODE_BLOCK) {
        let n = (t1 - b0).min(DECODE_BLOCK);
        // physical rows (past the block's end: its last row again, computed and unused)
        let phys: [usize; DECODE_BLOCK] = std::array::from_fn(|i| a.phys(b0 + i.min(n - 1)));
        for g in 0..groups {
            let nh = (rows - 16 * g).min(16);
            let seen_g = _mm512_loadu_si512(seen[g].as_ptr() as *const _);
            let qg = qt.as_ptr().add(g * width * 16);
            for i in (0..n).step_by(SCORE_TILE) {
                let mut acc = [_mm512_setzero_ps(); SCORE_TILE];
                let mut d0 = 0;
                for (_, k) in a.parts {
                    let krows: [*const f32; SCORE_TILE] =
                        std::array::from_fn(|j| k.data.as_ptr().add(k.offset + phys[(i + j).min(DECODE_BLOCK - 1)] * k.stride));
                    for d in 0..k.width {
                        let qv = _mm512_loadu_ps(qg.add((d0 + d) * 16));
                        for j in 0..SCORE_TILE {
                            acc[j] = _mm512_fmadd_ps(qv, _mm512_set1_ps(*krows[j].add(d)), acc[j]);
                        }
                    }
                    d0 += k.width;
                }
                let k = SCORE_TILE.min(n - i);
                scores[i..i + k].copy_from_slice(&acc[..k]);
            }
            // online softmax, 16 rows a vector; the rows a lane does not see weigh 0
            let sees: [__mmask16; DECODE_BLOCK] =
                std::array::from_fn(|j| _mm512_cmpgt_epi32_mask(seen_g, _mm512_set1_epi32((b0 + j) as i32)));
            for j in 0..n {
                scores[j] = _mm512_mask_blend_ps(sees[j], _mm512_set1_ps(-1e30), scores[j]);
            }
            let block_max = scores[1..n].iter().fold(scores[0], |m, &s| _mm512_max_ps(m, s));
            let new_max = _mm512_max_ps(max[g], block_max);
            let rescale = exp16(_mm512_sub_ps(max[g], new_max));
            max[g] = new_max;
            let mut block_sum = _mm512_setzero_ps();
            for j in 0..n {
                let e = _mm512_maskz_mov_ps(sees[j], exp16(_mm512_sub_ps(scores[j], new_max)));
                _mm512_storeu_ps(p[j].as_mut_ptr(), e);
                block_sum = _mm512_add_ps(block_sum, e);
            }
            sum[g] = _mm512_fmadd_ps(sum[g], rescale, block_sum);
            let mut rs = [0f32; 16];
            _mm512_storeu_ps(rs.as_mut_ptr(), rescale);
            // o = o · rescale + Σ p · v, VALUE_HEADS heads × 64 values at a time
            for c0 in (0..dv).step_by(16 * VALUE_VECTORS) {
                let masks: [u16; VALUE_VECTORS] = std::array::from_fn(|i| lane_mask((dv - c0).saturating_sub(16 * i)));
                let vrows: [*const f32; DECODE_BLOCK] =
                    std::array::from_fn(|j| a.values.data.as_ptr().add(a.values.offset + phys[j] * v_stride + c0));
                for h0 in (0..nh).step_by(VALUE_HEADS) {
                    let hn = (nh - h0).min(VALUE_HEADS);
                    let op = o.as_mut_ptr().add((16 * g + h0) * dv + c0);
                    let mut acc = [[_mm512_setzero_ps(); VALUE_VECTORS]; VALUE_HEADS];
                    for hh in 0..hn {
                        let r = _mm512_set1_ps(rs[h0 + hh]);
                        for v in 0..VALUE_VECTORS {
                            let prev = _mm512_maskz_loadu_ps(masks[v], op.add(hh * dv).wrapping_add(16 * v));
                            acc[hh][v] = _mm512_mul_ps(r, prev);
                        }
                    }
                    for j in 0..n {
                        let vv: [__m512; VALUE_VECTORS] =
                            std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], vrows[j].wrapping_add(16 * v)));
                        // (heads past `hn` add to sums that are never stored)
                        for hh in 0..VALUE_HEADS {
                            let pb = _mm512_set1_ps(p[j][(h0 + hh).min(15)]);
                            for v in 0..VALUE_VECTORS {
                                acc[hh][v] = _mm512_fmadd_ps(pb, vv[v], acc[hh][v]);
                            }
                        }
                    }
                    for hh in 0..hn {
                        for v in 0..VALUE_VECTORS {
                            _mm512_mask_storeu_ps(op.add(hh * dv).wrapping_add(16 * v), masks[v], acc[hh][v]);
                        }
                    }
                }
            }
        }
    }
    let mut m = vec![0f32; groups * 16];
    let mut l = vec![0f32; groups * 16];
    for g in 0..groups {
        _mm512_storeu_ps(m.as_mut_ptr().add(16 * g), max[g]);
        _mm512_storeu_ps(l.as_mut_ptr().add(16 * g), sum[g]);
    }
    for (h, st) in stats.iter_mut().enumerate().take(rows) {
        *st = if l[h] > 0.0 { (m[h], l[h]) } else { (f32::NEG_INFINITY, 0.0) };
    }
}
