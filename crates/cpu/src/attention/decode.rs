//! Attention for decode steps over shared rows (MLA's absorbed form, at most
//! `DECODE_MAX_QUERIES` queries per head: decode and MTP verification), AVX-512: the (head,
//! query) rows in the lanes of a vector ([`heads_in_lanes`]), the cached rows in fixed chunks
//! merged in order ([`decode_in_chunks`]).

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Attention, MlaShape, Pages};
use crate::simd::{exp16, lane_mask};

/// Cached rows per partial softmax of a decode call: chunk `c` holds rows `c·128..(c + 1)·128`
/// whatever the call's length, so that a query's result has the same bits in any call that
/// holds its rows (`decode_in_chunks`). (32 or 64 for bench-small's 16 heads × 256: no faster.)
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
    in_chunks(
        a.heads * a.queries,
        a.values.width,
        a.tokens.min(a.start + a.queries),
        threads,
        |groups| Lanes::new(a, groups),
        |keys, lanes, p| {
            // SAFETY: `wide` (the caller) means the CPU has AVX-512F; `check` bounded every row.
            unsafe { heads_in_lanes(a, lanes, keys, &mut p.o, &mut p.stats) }
        },
    )
}

/// The chunks, spans and merges of [`decode_in_chunks`] for `rows` (head, query) rows of `dv`
/// values over the first `seen` key rows: `prepare(groups)` lays out the queries of some lane
/// groups (16 rows each), and `chunk(keys, prepared, p)` computes a chunk's partial for their
/// rows into `p` (its `o` zeroed). Returns the normalized outputs, `[rows, dv]`.
///
/// The threads share out the chunks, or, where the rows make several lane groups and the
/// chunks are few ([`split_groups`]), the groups, each thread preparing its own and taking
/// every chunk: a group's rows get the same bits either way (the same chunks, merged in the same
/// order), and the threads neither wait on the one with the extra chunk nor on one laying out
/// every query (DeepSeek-R1's 128 heads, 64 cached rows: 240 → 135 µs a call in f32, 218 → 142
/// in bf16; 2 queries over 1024 rows 3600 → 2800 and 3300 → 2300).
fn in_chunks<L: Sync>(
    rows: usize,
    dv: usize,
    seen: usize,
    threads: usize,
    prepare: impl Fn(Range<usize>) -> L + Sync,
    chunk: impl Fn(Range<usize>, &L, &mut Partial) + Sync,
) -> Vec<f32> {
    let (groups, chunks) = (rows.div_ceil(16), seen.div_ceil(DECODE_CHUNK).max(1));
    let chunk = |c: usize, l: &L, p: &mut Partial| chunk(c * DECODE_CHUNK..(c + 1) * DECODE_CHUNK, l, p);
    if split_groups(groups, chunks, threads) {
        let parts = threads.min(groups);
        let outs = crate::pool::map_indices(parts, |t| {
            let g = t * groups / parts..(t + 1) * groups / parts;
            let rows_g = (16 * g.end).min(rows) - 16 * g.start;
            let l = prepare(g);
            merged(run_of_chunks(0..chunks, rows_g, dv, |c, p| chunk(c, &l, p)), rows_g, dv)
        });
        return outs.concat();
    }
    let l = prepare(0..groups);
    let bounds = thread_runs(seen, chunks, threads);
    let shares =
        crate::pool::map_indices(bounds.len() - 1, |t| run_of_chunks(bounds[t]..bounds[t + 1], rows, dv, |c, p| chunk(c, &l, p)));
    merged(shares.into_iter().flatten(), rows, dv)
}

/// Whether [`in_chunks`] shares out lane groups rather than chunks: where they divide evenly
/// over the threads (each thread then lays out only its own queries and merges nothing with the
/// others': 1.1–1.7× faster at DeepSeek-R1's 8 groups up to ~1000 cached rows, the same from
/// 8K), or where the chunks are fewer than the threads (which would leave some idle).
fn split_groups(groups: usize, chunks: usize, threads: usize) -> bool {
    threads > 1 && groups >= threads && (groups.is_multiple_of(threads) || chunks < threads)
}

/// The partials of the chunks `run` (one thread's, in order), as (span, whether it begins at
/// the span's first chunk, partial): a chunk merges into the partial before it when that one
/// began its span.
fn run_of_chunks(run: Range<usize>, rows: usize, dv: usize, chunk: impl Fn(usize, &mut Partial)) -> Vec<(usize, bool, Partial)> {
    let mut out: Vec<(usize, bool, Partial)> = Vec::new();
    let mut scratch: Option<Partial> = None;
    for c in run {
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
}

/// The partials of every chunk, in order ([`run_of_chunks`]' of each thread in turn), merged
/// within spans, then the spans, and normalized: `[rows, dv]`.
fn merged(partials: impl IntoIterator<Item = (usize, bool, Partial)>, rows: usize, dv: usize) -> Vec<f32> {
    let mut spans: Vec<(usize, Partial)> = Vec::new();
    for (span, _, p) in partials {
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

/// Each thread's run of the `chunks` chunks over `seen` rows, as boundaries (`runs + 1` of them):
/// about an equal share of the rows each. The last chunk is usually short: 257 rows are chunks of
/// 128, 128 and 1, split 1 + 2, not 2 + 1 (DeepSeek-R1's shape, Zen 4, 2 threads: a 256-row
/// context's bf16 decode call 630 → 420 µs, its 2-query verify call 1250 → 790; 1024 rows
/// 1430 → 1200).
fn thread_runs(seen: usize, chunks: usize, threads: usize) -> Vec<usize> {
    let parts = threads.clamp(1, chunks);
    (0..=parts)
        .map(|t| if t == parts { chunks } else { (2 * t * seen + parts * DECODE_CHUNK) / (2 * parts * DECODE_CHUNK) })
        .collect()
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
    /// The lane groups laid out (`qt` and `seen` from the first).
    groups: Range<usize>,
}

impl Lanes {
    /// The queries of the lane groups `groups`.
    fn new(a: &Attention, groups: Range<usize>) -> Lanes {
        let rows = a.heads * a.queries;
        let width: usize = a.parts.iter().map(|(_, k)| k.width).sum();
        let mut qt = vec![0f32; groups.len() * width * 16];
        let mut d0 = 0;
        // each group's 16 rows a column at a time: the writes in order, the reads from 16 rows
        // (row by row, every write went to a cache line of its own: 60–120 µs a call at
        // DeepSeek-R1's 128 heads, against ~35 µs, split over the threads with the groups)
        for (q, k) in a.parts {
            for (i, g) in groups.clone().enumerate() {
                let n = (rows - 16 * g).min(16);
                for d in 0..k.width {
                    let out = &mut qt[(i * width + d0 + d) * 16..][..n];
                    out.iter_mut().enumerate().for_each(|(lane, v)| *v = q[(16 * g + lane) * k.width + d] * a.scale);
                }
            }
            d0 += k.width;
        }
        let seen = groups
            .clone()
            .map(|g| std::array::from_fn(|l| if 16 * g + l < rows { a.query(16 * g + l).seen as i32 } else { 0 }))
            .collect();
        Lanes { qt, seen, width, groups }
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
    let (qt, seen, width, groups) = (&lanes.qt, &lanes.seen, lanes.width, lanes.groups.clone());
    let g0 = groups.start;
    // each group's running max (finite: `exp16` of -inf is NaN) and sum
    let mut max = vec![_mm512_set1_ps(-1e30); groups.len()];
    let mut sum = vec![_mm512_setzero_ps(); groups.len()];
    let mut p = [[0f32; 16]; DECODE_BLOCK];
    let mut scores = [_mm512_setzero_ps(); DECODE_BLOCK];
    for b0 in (t0..t1).step_by(DECODE_BLOCK) {
        let n = (t1 - b0).min(DECODE_BLOCK);
        // physical rows (past the block's end: its last row again, computed and unused)
        let phys: [usize; DECODE_BLOCK] = std::array::from_fn(|i| a.phys(b0 + i.min(n - 1)));
        for g in groups.clone() {
            let nh = (rows - 16 * g).min(16);
            let seen_g = _mm512_loadu_si512(seen[g - g0].as_ptr() as *const _);
            let qg = qt.as_ptr().add((g - g0) * width * 16);
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
            // online softmax, 16 rows a vector
            let (sees, new_max, rescale) = block_max(&mut scores, n, b0, seen_g, &mut max[g - g0]);
            let mut block_sum = _mm512_setzero_ps();
            for j in 0..n {
                let e = _mm512_maskz_mov_ps(sees[j], exp16(_mm512_sub_ps(scores[j], new_max)));
                _mm512_storeu_ps(p[j].as_mut_ptr(), e);
                block_sum = _mm512_add_ps(block_sum, e);
            }
            sum[g - g0] = _mm512_fmadd_ps(sum[g - g0], rescale, block_sum);
            let mut rs = [0f32; 16];
            _mm512_storeu_ps(rs.as_mut_ptr(), rescale);
            // o = o · rescale + Σ p · v, VALUE_HEADS heads × 64 values at a time
            for c0 in (0..dv).step_by(16 * VALUE_VECTORS) {
                let masks: [u16; VALUE_VECTORS] = std::array::from_fn(|i| lane_mask((dv - c0).saturating_sub(16 * i)));
                let vrows: [*const f32; DECODE_BLOCK] =
                    std::array::from_fn(|j| a.values.data.as_ptr().add(a.values.offset + phys[j] * v_stride + c0));
                for h0 in (0..nh).step_by(VALUE_HEADS) {
                    let hn = (nh - h0).min(VALUE_HEADS);
                    let op = o.as_mut_ptr().add((16 * (g - g0) + h0) * dv + c0);
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
    write_stats(&max, &sum, stats);
}

/// A block's online-softmax step for one group of 16 rows: each of its `n` scores masked where
/// the lane does not see the key row (block rows from position `b0`, `seen` rows per lane), the
/// group's running `max` raised to the block's. Returns the masks, the new max and the factor
/// that rescales what the group summed before.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_max(
    scores: &mut [__m512; DECODE_BLOCK],
    n: usize,
    b0: usize,
    seen: __m512i,
    max: &mut __m512,
) -> ([__mmask16; DECODE_BLOCK], __m512, __m512) {
    // the rows a lane does not see weigh 0
    let sees: [__mmask16; DECODE_BLOCK] =
        std::array::from_fn(|j| _mm512_cmpgt_epi32_mask(seen, _mm512_set1_epi32((b0 + j) as i32)));
    for j in 0..n {
        scores[j] = _mm512_mask_blend_ps(sees[j], _mm512_set1_ps(-1e30), scores[j]);
    }
    let block_max = scores[1..n].iter().fold(scores[0], |m, &s| _mm512_max_ps(m, s));
    let new_max = _mm512_max_ps(*max, block_max);
    let rescale = exp16(_mm512_sub_ps(*max, new_max));
    *max = new_max;
    (sees, new_max, rescale)
}

/// Each row's `(max, sum)` from its group's vectors (`(-inf, 0)`: it saw no key row).
#[target_feature(enable = "avx512f")]
unsafe fn write_stats(max: &[__m512], sum: &[__m512], stats: &mut [(f32, f32)]) {
    let mut m = vec![0f32; max.len() * 16];
    let mut l = vec![0f32; max.len() * 16];
    for g in 0..max.len() {
        _mm512_storeu_ps(m.as_mut_ptr().add(16 * g), max[g]);
        _mm512_storeu_ps(l.as_mut_ptr().add(16 * g), sum[g]);
    }
    for (h, st) in stats.iter_mut().enumerate() {
        *st = if l[h] > 0.0 { (m[h], l[h]) } else { (f32::NEG_INFINITY, 0.0) };
    }
}

/// MLA's absorbed decode over a bf16 cache (a `--dtype bf16` model's), with `vdpbf16ps` (32
/// products an instruction where the f32 kernel's FMAs do 16), the rows read as stored: no f32
/// copy of the cache per call.
///
/// - Scores: the queries (times the scale) rounded to bf16, as a bf16 model's queries are;
///   exact products summed in f32. Half the f32 kernel's instructions.
/// - Softmax in f32.
/// - Weighted sum of the values: each weight as a bf16 high part plus a bf16 low part (16
///   significant bits), two `vdpbf16ps` per pair of key rows: as many instructions as the f32
///   kernel's FMAs. Weights rounded once to bf16 (as FlashMLA does) moved the tiny-v3 fixture's
///   decoded logits 5 % from the reference where every other path stays within 1.4 %.
///
/// The chunks, spans and merges are [`decode_in_chunks`]' (`in_chunks`), so a query's bits again
/// depend neither on the call's length nor on the threads: MTP verification stays lossless.
pub(super) struct Bf16Decode<'a> {
    /// `[H, S, L]` and `[H, S, R]`.
    pub q_lat: &'a [f32],
    pub q_pe: &'a [f32],
    /// bf16 bits, rows of `L + R` (`[T, L + R]`, or the page pool of `pages`).
    pub cache: &'a [u16],
    pub pages: Option<Pages<'a>>,
    pub shape: MlaShape,
    pub scale: f32,
}

impl Bf16Decode<'_> {
    fn check(&self) {
        let MlaShape { heads, queries, tokens, latent, rope, .. } = self.shape;
        assert_eq!(self.q_lat.len(), heads * queries * latent, "q_lat");
        assert_eq!(self.q_pe.len(), heads * queries * rope, "q_pe");
        let rows = super::touched_rows(self.pages, tokens);
        assert!(rows * (latent + rope) <= self.cache.len(), "cache: {rows} rows out of bounds");
    }

    #[inline(always)]
    fn phys(&self, t: usize) -> usize {
        self.pages.map_or(t, |p| p.row(t))
    }

    /// `o_lat: [H, S, L]`.
    pub(super) fn run(&self, threads: usize) -> Vec<f32> {
        self.check();
        let MlaShape { heads, queries, tokens, latent, start, .. } = self.shape;
        let mut o = in_chunks(
            heads * queries,
            latent,
            tokens.min(start + queries),
            threads,
            |groups| Bf16Lanes::new(self, groups),
            |keys, lanes, p| {
                // SAFETY: `bf16_applies` (the caller's) means AVX-512 F/BW/BF16; `check` bounded
                // every row.
                unsafe { heads_in_lanes_bf16(self, lanes, keys, &mut p.o, &mut p.stats) }
            },
        );
        // each 32 values' accumulators hold them in `vpunpck{l,h}wd`'s order
        let mut block = [0f32; 32];
        for b in o.chunks_exact_mut(32) {
            for (p, &v) in b.iter().enumerate() {
                block[unpacked_column(p)] = v;
            }
            b.copy_from_slice(&block);
        }
        o
    }
}

/// Whether [`Bf16Decode`] takes a call: AVX-512 BF16, at most `DECODE_MAX_QUERIES` queries, even
/// row widths (pairs of values), whole 32-value blocks of the latent (its value tiles), pages of
/// whole 16 rows.
pub(super) fn bf16_applies(shape: MlaShape, page_size: Option<usize>) -> bool {
    bf16_available()
        && shape.queries <= super::DECODE_MAX_QUERIES
        && shape.latent.is_multiple_of(32)
        && shape.rope.is_multiple_of(2)
        && page_size.is_none_or(|p| p.is_multiple_of(16))
}

/// The value column that position `p` of a 32-value block of [`heads_in_lanes_bf16`]'s
/// accumulators holds: `vpunpcklwd` of two rows' 32 values pairs columns 0–3, 8–11, 16–19,
/// 24–27, `vpunpckhwd` the other four of each 8.
fn unpacked_column(p: usize) -> usize {
    let (half, lane) = (p / 16, p % 16);
    8 * (lane / 4) + 4 * half + lane % 4
}

fn bf16_available() -> bool {
    crate::simd::avx512::available() && is_x86_feature_detected!("avx512bf16")
}

/// A bf16 decode call's queries, prepared once per call: per group of 16 (head, query) rows,
/// each pair of columns of `[q_lat | q_pe] · scale` as two bf16 in a 32-bit lane
/// (`[g][pair][lane]`), and the key rows each lane sees.
struct Bf16Lanes {
    qt: Vec<u32>,
    seen: Vec<[i32; 16]>,
    /// The lane groups laid out (`qt` and `seen` from the first).
    groups: Range<usize>,
}

impl Bf16Lanes {
    /// The queries of the lane groups `groups`.
    fn new(c: &Bf16Decode, groups: Range<usize>) -> Bf16Lanes {
        let MlaShape { heads, queries, tokens, latent, rope, start } = c.shape;
        let (rows, pairs) = (heads * queries, (latent + rope) / 2);
        let mut qt = vec![0u32; groups.len() * pairs * 16];
        for hq in 16 * groups.start..(16 * groups.end).min(rows) {
            let (g, lane) = (hq / 16 - groups.start, hq % 16);
            let q = c.q_lat[hq * latent..(hq + 1) * latent].iter().chain(&c.q_pe[hq * rope..(hq + 1) * rope]);
            let bits: Vec<u32> = q.map(|&v| half::bf16::from_f32(v * c.scale).to_bits() as u32).collect();
            for (d, pair) in bits.chunks_exact(2).enumerate() {
                qt[(g * pairs + d) * 16 + lane] = pair[0] | pair[1] << 16;
            }
        }
        let seen = groups
            .clone()
            .map(|g| {
                std::array::from_fn(|l| {
                    let hq = 16 * g + l;
                    if hq < rows {
                        (start + hq % queries + 1).min(tokens) as i32
                    } else {
                        0
                    }
                })
            })
            .collect();
        Bf16Lanes { qt, seen, groups }
    }
}

/// (Head, query) rows per value tile of [`heads_in_lanes_bf16`]: 8 heads × 32 values (two
/// accumulators each), each pair of value vectors (two key rows interleaved) used by 8 rows.
const BF16_VALUE_HEADS: usize = 8;

/// [`heads_in_lanes`] on bf16 rows: scores by `vdpbf16ps` of the queries' column pairs against
/// each key row's pair of values (broadcast), the same online softmax, and the weighted sum of
/// the values by `vdpbf16ps` over pairs of key rows (their values interleaved by `vpunpck*wd`,
/// the pair's weights broadcast, high parts then low parts). `o` holds each 32 values in
/// [`unpacked_column`]'s order.
///
/// # Safety
/// AVX-512 F/BW/BF16; `c` passed `check`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
#[allow(clippy::needless_range_loop)] // register-blocked: rows and vectors index several arrays
unsafe fn heads_in_lanes_bf16(c: &Bf16Decode, lanes: &Bf16Lanes, keys: Range<usize>, o: &mut [f32], stats: &mut [(f32, f32)]) {
    let MlaShape { heads, queries, tokens, latent, rope, start } = c.shape;
    let (rows, dv, width) = (heads * queries, latent, latent + rope);
    let pairs = width / 2;
    let (t0, t1) = (keys.start, keys.end.min(tokens.min(start + queries)));
    let groups = lanes.groups.clone();
    let g0 = groups.start;
    let mut max = vec![_mm512_set1_ps(-1e30); groups.len()];
    let mut sum = vec![_mm512_setzero_ps(); groups.len()];
    // each pair of key rows' weights, as pairs of their bf16 high parts and of their low parts
    // (rows past the block weigh 0)
    let mut p2 = [[0u32; 16]; DECODE_BLOCK / 2];
    let mut p2_low = [[0u32; 16]; DECODE_BLOCK / 2];
    let mut scores = [_mm512_setzero_ps(); DECODE_BLOCK];
    let bf16 = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
    for b0 in (t0..t1).step_by(DECODE_BLOCK) {
        let n = (t1 - b0).min(DECODE_BLOCK);
        // physical rows (past the block's end: its last row again, weighed 0)
        let krow: [*const u16; DECODE_BLOCK] = std::array::from_fn(|i| c.cache.as_ptr().add(c.phys(b0 + i.min(n - 1)) * width));
        for g in groups.clone() {
            let nh = (rows - 16 * g).min(16);
            let seen_g = _mm512_loadu_si512(lanes.seen[g - g0].as_ptr() as *const _);
            let qg = lanes.qt.as_ptr().add((g - g0) * pairs * 16);
            for i in (0..n).step_by(SCORE_TILE) {
                let mut acc = [_mm512_setzero_ps(); SCORE_TILE];
                let kr: [*const u16; SCORE_TILE] = std::array::from_fn(|j| krow[(i + j).min(DECODE_BLOCK - 1)]);
                for d in 0..pairs {
                    let qv = bf16(_mm512_loadu_si512(qg.add(d * 16) as *const _));
                    for j in 0..SCORE_TILE {
                        let kv = bf16(_mm512_set1_epi32((kr[j].add(2 * d) as *const i32).read_unaligned()));
                        acc[j] = _mm512_dpbf16_ps(acc[j], qv, kv);
                    }
                }
                let k = SCORE_TILE.min(n - i);
                scores[i..i + k].copy_from_slice(&acc[..k]);
            }
            let (sees, new_max, rescale) = block_max(&mut scores, n, b0, seen_g, &mut max[g - g0]);
            let mut block_sum = _mm512_setzero_ps();
            // each weight as bf16 high and low parts (their bits in the upper halves), of the
            // block's even rows and then its odd rows, paired
            let mut parts = [[_mm512_setzero_si512(); 2]; 2];
            for j in 0..n.next_multiple_of(2) {
                let e = if j < n {
                    _mm512_maskz_mov_ps(sees[j], exp16(_mm512_sub_ps(scores[j], new_max)))
                } else {
                    _mm512_setzero_ps()
                };
                block_sum = _mm512_add_ps(block_sum, e);
                let hi = bf16_upper(e);
                parts[j % 2] = [hi, bf16_upper(_mm512_sub_ps(e, _mm512_castsi512_ps(hi)))];
                if j % 2 == 1 {
                    _mm512_storeu_si512(p2[j / 2].as_mut_ptr() as *mut _, bf16_pairs(parts[0][0], parts[1][0]));
                    _mm512_storeu_si512(p2_low[j / 2].as_mut_ptr() as *mut _, bf16_pairs(parts[0][1], parts[1][1]));
                }
            }
            sum[g - g0] = _mm512_fmadd_ps(sum[g - g0], rescale, block_sum);
            let mut rs = [0f32; 16];
            _mm512_storeu_ps(rs.as_mut_ptr(), rescale);
            // o = o · rescale + Σ p · v, BF16_VALUE_HEADS heads × 32 values at a time
            for c0 in (0..dv).step_by(32) {
                for h0 in (0..nh).step_by(BF16_VALUE_HEADS) {
                    let hn = (nh - h0).min(BF16_VALUE_HEADS);
                    let op = o.as_mut_ptr().add((16 * (g - g0) + h0) * dv + c0);
                    let mut acc = [[_mm512_setzero_ps(); 2]; BF16_VALUE_HEADS];
                    for hh in 0..hn {
                        let r = _mm512_set1_ps(rs[h0 + hh]);
                        for v in 0..2 {
                            acc[hh][v] = _mm512_mul_ps(r, _mm512_loadu_ps(op.add(hh * dv + 16 * v)));
                        }
                    }
                    for jp in 0..n.div_ceil(2) {
                        let a = _mm512_loadu_si512(krow[2 * jp].add(c0) as *const _);
                        let b = _mm512_loadu_si512(krow[(2 * jp + 1).min(DECODE_BLOCK - 1)].add(c0) as *const _);
                        let vv = [bf16(_mm512_unpacklo_epi16(a, b)), bf16(_mm512_unpackhi_epi16(a, b))];
                        // (heads past `hn` add to sums that are never stored)
                        for hh in 0..BF16_VALUE_HEADS {
                            let pb = bf16(_mm512_set1_epi32(p2[jp][(h0 + hh).min(15)] as i32));
                            let pl = bf16(_mm512_set1_epi32(p2_low[jp][(h0 + hh).min(15)] as i32));
                            for v in 0..2 {
                                acc[hh][v] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[hh][v], vv[v], pb), vv[v], pl);
                            }
                        }
                    }
                    for hh in 0..hn {
                        for v in 0..2 {
                            _mm512_storeu_ps(op.add(hh * dv + 16 * v), acc[hh][v]);
                        }
                    }
                }
            }
        }
    }
    write_stats(&max, &sum, stats);
}

/// `x` rounded to bf16 (nearest even), as f32 bits: the bf16 in the upper half, zeros below.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_upper(x: __m512) -> __m512i {
    let b = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    _mm512_and_si512(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), _mm512_set1_epi32(-65536))
}

/// Two vectors of [`bf16_upper`] as one of bf16 pairs: `even`'s in the low halves, `odd`'s in
/// the high ones (`vdpbf16ps` multiplies a pair's first element by its first).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_pairs(even: __m512i, odd: __m512i) -> __m512i {
    _mm512_or_si512(_mm512_srli_epi32::<16>(even), odd)
}

#[cfg(test)]
mod tests {
    #[test]
    fn threads_take_equal_shares_of_the_rows() {
        assert_eq!(super::thread_runs(257, 3, 2), [0, 1, 3]);
        assert_eq!(super::thread_runs(1025, 9, 2), [0, 4, 9]);
        assert_eq!(super::thread_runs(100, 1, 2), [0, 1]);
        assert_eq!(super::thread_runs(300, 3, 3), [0, 1, 2, 3]);
        assert_eq!(super::thread_runs(200, 2, 8), [0, 1, 2]);
    }
}
