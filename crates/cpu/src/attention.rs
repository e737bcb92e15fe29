//! Fused attention on the CPU: scores, the causal mask, the softmax and the weighted sum of
//! values in one pass per (head, query) row, flash-style over blocks of key rows, threaded over
//! groups of query rows that share their keys.
//!
//! The operands are described as strided rows ([`Rows`]) so that both forms of MLA read their
//! keys and values where they already are:
//! - absorbed (decode): every head attends over the same cache rows `[latent | rope]`, the
//!   latent part being both key and value ([`mla_attention`]);
//! - naive (prefill): per-head keys `k_nope` and values `v` decompressed side by side in one
//!   `[T, H·(P+V)]` product, and the shared rotated key `k_pe` read from the cache rows.

use rayon::prelude::*;

use crate::Backend;

#[cfg(target_arch = "x86_64")]
mod decode;

/// Key rows from which a call whose heads share their rows (MLA's absorbed decode) splits the
/// keys over the threads instead of the query rows: each key row is then read by one thread, for
/// every query row, rather than once per thread.
const SPLIT_TOKENS: usize = 256;

/// Query rows per head up to which shared-row calls take the decode kernel: decode steps and
/// MTP verification (1 + draft tokens); prefill chunks keep the per-row kernel.
const DECODE_MAX_QUERIES: usize = 4;

/// Query rows per group at most: a group's outputs and running sums stay in L1/L2 while each
/// block of key rows is reused for every one of them.
const MAX_GROUP: usize = 64;

/// Rows of one operand: row `t` of head `h` is `data[offset + h·head_step + t·stride..][..width]`
/// (`head_step` 0: one set of rows shared by every head).
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub stride: usize,
    pub head_step: usize,
    pub width: usize,
}

impl<'a> Rows<'a> {
    /// Row `t` of head `h`.
    #[inline(always)]
    fn row(&self, h: usize, t: usize) -> &'a [f32] {
        let at = self.offset + h * self.head_step + t * self.stride;
        &self.data[at..at + self.width]
    }

    /// Where head `h`'s rows start.
    fn head(&self, h: usize) -> &'a [f32] {
        &self.data[self.offset + h * self.head_step..]
    }

    /// Whether physical rows `0..rows` of `heads` heads lie inside `data`.
    fn covers(&self, heads: usize, rows: usize) -> bool {
        rows == 0
            || heads == 0
            || self.offset + (heads - 1) * self.head_step + (rows - 1) * self.stride + self.width <= self.data.len()
    }
}

/// A paged cache's block table: logical key row `t` is physical row
/// `ids[t / size] · size + t % size` of every operand.
#[derive(Debug, Clone, Copy)]
pub struct Pages<'a> {
    pub ids: &'a [u32],
    pub size: usize,
}

/// Physical rows a call over `tokens` key rows may touch (asserting that `pages` hold them all).
fn touched_rows(pages: Option<Pages>, tokens: usize) -> usize {
    match pages {
        Some(p) => {
            let used = &p.ids[..tokens.div_ceil(p.size.max(1)).min(p.ids.len())];
            assert!(p.size > 0 && used.len() * p.size >= tokens, "pages: {} of {} rows for {tokens} keys", used.len(), p.size);
            used.iter().map(|&id| (id as usize + 1) * p.size).max().unwrap_or(0)
        }
        None => tokens,
    }
}

impl Pages<'_> {
    #[inline(always)]
    fn row(&self, t: usize) -> usize {
        self.ids[t / self.size] as usize * self.size + t % self.size
    }
}

/// One attention call: queries `[H, S, ·]` in parts, each scored against its own key rows (the
/// scores are the sums over the parts), and the value rows.
#[derive(Debug, Clone, Copy)]
pub struct Attention<'a> {
    /// `(q, keys)`: `q: [H, S, keys.width]`.
    pub parts: &'a [(&'a [f32], Rows<'a>)],
    pub values: Rows<'a>,
    pub heads: usize,
    /// Query rows (positions `start..start + queries`).
    pub queries: usize,
    /// Key rows (positions `0..tokens`).
    pub tokens: usize,
    /// Position of the first query: query i sees keys `0..=start + i`.
    pub start: usize,
    pub scale: f32,
    /// Where the key and value rows are, when paged (`None`: row t is row t).
    pub pages: Option<Pages<'a>>,
}

impl Attention<'_> {
    fn check(&self) {
        let (h, s, t) = (self.heads, self.queries, self.tokens);
        let rows = touched_rows(self.pages, t);
        for (i, (q, k)) in self.parts.iter().enumerate() {
            assert_eq!(q.len(), h * s * k.width, "query part {i}");
            assert!(k.covers(h, rows), "key part {i}: {rows} rows of {h} heads out of bounds");
        }
        assert!(self.values.covers(h, rows), "values: {rows} rows of {h} heads out of bounds");
    }

    /// The physical row of key row `t`.
    #[inline(always)]
    fn phys(&self, t: usize) -> usize {
        self.pages.map_or(t, |p| p.row(t))
    }

    /// Whether every head reads the same key and value rows.
    fn shared(&self) -> bool {
        self.values.head_step == 0 && self.parts.iter().all(|(_, k)| k.head_step == 0)
    }

    /// Query row `hq` (head `hq / S`, query `hq % S`).
    fn query(&self, hq: usize) -> OneQuery<'_> {
        OneQuery { a: self, hq, seen: (self.start + hq % self.queries + 1).min(self.tokens) }
    }
}

/// `[H, S, values.width]`: `softmax(scale · Σ_parts q·kᵀ + mask) · v` per head.
pub fn attention(a: &Attention) -> Vec<f32> {
    attention_with(crate::backend(), a)
}

/// [`attention`] on a chosen backend: the AVX-512 loops for [`Backend::Avx512`] and
/// [`Backend::Amx`], the portable ones otherwise (tests compare them).
pub fn attention_with(backend: Backend, a: &Attention) -> Vec<f32> {
    a.check();
    let (rows, dv) = (a.heads * a.queries, a.values.width);
    let mut out = vec![0f32; rows * dv];
    if rows == 0 || dv == 0 {
        return out;
    }
    let threads = rayon::current_num_threads().max(1);
    // (the AVX-512 loops take 16 contiguous rows at a time)
    let wide = matches!(backend, Backend::Avx512 | Backend::Amx)
        && crate::matmul::available(backend)
        && a.pages.is_none_or(|p| p.size % 16 == 0);
    #[cfg(target_arch = "x86_64")]
    if wide && a.shared() && a.queries <= DECODE_MAX_QUERIES {
        // decode: the (head, query) rows in the lanes (`wide::heads_in_lanes`), the keys over
        // the threads
        return decode::decode_in_chunks(a, threads);
    }
    #[cfg(target_arch = "x86_64")]
    if wide && a.shared() && threads > 1 && a.tokens >= SPLIT_TOKENS {
        return split_over_keys(a, threads, |keys, o, stats| {
            let group: Vec<OneQuery> = (0..rows).map(|hq| a.query(hq)).collect();
            // SAFETY: as above
            unsafe { wide::group_over(&group, o, keys, stats) }
        });
    }
    // groups of query rows, one head's each unless all heads share their rows
    let per = rows.div_ceil(threads).clamp(1, MAX_GROUP);
    let per = if a.shared() { per } else { per.min(a.queries) };
    let groups: Vec<(usize, usize)> = if a.shared() {
        (0..rows).step_by(per).map(|r| (r, (r + per).min(rows))).collect()
    } else {
        (0..a.heads)
            .flat_map(|h| (h * a.queries..(h + 1) * a.queries).step_by(per).map(move |r| (r, (r + per).min((h + 1) * a.queries))))
            .collect()
    };
    let mut slices: Vec<(usize, &mut [f32])> = Vec::with_capacity(groups.len());
    let mut rest = out.as_mut_slice();
    for &(r0, r1) in &groups {
        let (head, tail) = rest.split_at_mut((r1 - r0) * dv);
        slices.push((r0, head));
        rest = tail;
    }
    crate::pool::parallel(|| {
        slices.into_par_iter().for_each_init(
            || Vec::with_capacity(a.tokens),
            |scores, (r0, o)| {
                let group: Vec<OneQuery> = (r0..r0 + o.len() / dv).map(|hq| a.query(hq)).collect();
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: the CPU has AVX-512F (`available`); `check` bounded every row.
                    unsafe { wide::group(&group, o) };
                    return;
                }
                let _ = wide;
                for (q, o) in group.iter().zip(o.chunks_exact_mut(dv)) {
                    q.run(scores, o);
                }
            },
        )
    });
    out
}

/// Shapes of one [`mla_attention`] call.
#[derive(Debug, Clone, Copy)]
pub struct MlaShape {
    pub heads: usize,
    /// Query rows (positions `start..start + queries`).
    pub queries: usize,
    /// Cached rows (positions `0..tokens`).
    pub tokens: usize,
    pub latent: usize,
    pub rope: usize,
    /// Position of the first query: query i sees keys `0..=start + i`.
    pub start: usize,
}

/// MLA in the absorbed form: `q_lat: [H, S, L]`, `q_pe: [H, S, R]`, `entries: [T, L + R]` ->
/// `o_lat: [H, S, L]` with `o = softmax(scale · (q_lat·c_kvᵀ + q_pe·k_peᵀ) + mask) · c_kv`.
pub fn mla_attention(q_lat: &[f32], q_pe: &[f32], entries: &[f32], shape: MlaShape, scale: f32) -> Vec<f32> {
    mla_attention_with(crate::backend(), q_lat, q_pe, entries, None, shape, scale)
}

/// [`mla_attention`] over a paged cache, in place: `pool` holds whole pages of `[L + R]` rows
/// and `pages` maps the sequence's rows into it.
pub fn mla_attention_paged(q_lat: &[f32], q_pe: &[f32], pool: &[f32], pages: Pages, shape: MlaShape, scale: f32) -> Vec<f32> {
    mla_attention_with(crate::backend(), q_lat, q_pe, pool, Some(pages), shape, scale)
}

/// [`mla_attention`] (or, with `pages`, [`mla_attention_paged`]) on a chosen backend.
pub fn mla_attention_with(
    backend: Backend,
    q_lat: &[f32],
    q_pe: &[f32],
    entries: &[f32],
    pages: Option<Pages>,
    shape: MlaShape,
    scale: f32,
) -> Vec<f32> {
    let (parts, values) = mla_operands(q_lat, q_pe, entries, shape);
    attention_with(backend, &mla_call(&parts, values, pages, shape, scale))
}

/// [`mla_attention`] (with `pages`, [`mla_attention_paged`]) for a decode call over a bf16 cache,
/// `cache` holding the rows' bf16 bits: the rows as stored, by `vdpbf16ps`, the queries rounded to
/// bf16 and the softmax weights split into bf16 high and low parts (see `decode::Bf16Decode`). `None` where
/// that kernel does not run (no AVX-512 BF16, more than `DECODE_MAX_QUERIES` queries, odd
/// widths): the caller then reads the rows as f32 for [`mla_attention`].
pub fn mla_decode_bf16(
    q_lat: &[f32],
    q_pe: &[f32],
    cache: &[u16],
    pages: Option<Pages>,
    shape: MlaShape,
    scale: f32,
) -> Option<Vec<f32>> {
    if !bf16_decode_applies(shape, pages.map(|p| p.size)) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    return Some(decode::Bf16Decode { q_lat, q_pe, cache, pages, shape, scale }.run(rayon::current_num_threads().max(1)));
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q_lat, q_pe, cache, scale);
        None
    }
}

/// Whether [`mla_decode_bf16`] runs a call of `shape` (over pages of `page_size` rows).
pub fn bf16_decode_applies(shape: MlaShape, page_size: Option<usize>) -> bool {
    #[cfg(target_arch = "x86_64")]
    return matches!(crate::backend(), Backend::Avx512 | Backend::Amx) && decode::bf16_applies(shape, page_size);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (shape, page_size);
        false
    }
}

/// The plain definition of [`mla_attention_with`], in f64 (for tests).
pub fn mla_attention_reference(
    q_lat: &[f32],
    q_pe: &[f32],
    entries: &[f32],
    pages: Option<Pages>,
    shape: MlaShape,
    scale: f32,
) -> Vec<f32> {
    let (parts, values) = mla_operands(q_lat, q_pe, entries, shape);
    attention_reference(&mla_call(&parts, values, pages, shape, scale))
}

type Part<'a> = (&'a [f32], Rows<'a>);

/// The absorbed form's operands: the latent and rope sections of the shared cache rows as keys,
/// the latent section again as values.
fn mla_operands<'a>(q_lat: &'a [f32], q_pe: &'a [f32], entries: &'a [f32], shape: MlaShape) -> ([Part<'a>; 2], Rows<'a>) {
    let MlaShape { latent, rope, .. } = shape;
    let row = latent + rope;
    let rows = |offset, width| Rows { data: entries, offset, stride: row, head_step: 0, width };
    ([(q_lat, rows(0, latent)), (q_pe, rows(latent, rope))], rows(0, latent))
}

fn mla_call<'a>(parts: &'a [Part<'a>], values: Rows<'a>, pages: Option<Pages<'a>>, shape: MlaShape, scale: f32) -> Attention<'a> {
    let MlaShape { heads, queries, tokens, start, .. } = shape;
    Attention { parts, values, heads, queries, tokens, start, scale, pages }
}

/// [`attention_with`] with the key rows split over `threads` ranges, each attended by every query
/// row on one thread (`kernel(keys, o, stats)`: unnormalized outputs and each row's softmax
/// `(max, sum)`), the ranges' partial softmaxes merged after.
#[cfg(target_arch = "x86_64")]
fn split_over_keys(
    a: &Attention,
    threads: usize,
    kernel: impl Fn(std::ops::Range<usize>, &mut [f32], Option<&mut [(f32, f32)]>) + Sync,
) -> Vec<f32> {
    let (rows, dv) = (a.heads * a.queries, a.values.width);
    let per = a.tokens.div_ceil(threads).next_multiple_of(64);
    // each range's unnormalized outputs and its rows' softmax (max, sum)
    type Partial = (Vec<f32>, Vec<(f32, f32)>);
    let starts: Vec<usize> = (0..a.tokens).step_by(per).collect();
    let parts: Vec<Partial> = crate::pool::map_indices(starts.len(), |i| {
        let mut o = vec![0f32; rows * dv];
        let mut stats = vec![(f32::NEG_INFINITY, 0f32); rows];
        kernel(starts[i]..starts[i] + per, &mut o, Some(&mut stats));
        (o, stats)
    });
    let mut out = vec![0f32; rows * dv];
    for (r, o) in out.chunks_exact_mut(dv).enumerate() {
        let max = parts.iter().map(|(_, st)| st[r].0).fold(f32::NEG_INFINITY, f32::max);
        let weight = |m: f32| if m == f32::NEG_INFINITY { 0.0 } else { (m - max).exp() };
        let total: f32 = parts.iter().map(|(_, st)| weight(st[r].0) * st[r].1).sum();
        let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
        for (part, st) in &parts {
            let w = weight(st[r].0) * inv;
            o.iter_mut().zip(&part[r * dv..(r + 1) * dv]).for_each(|(o, p)| *o += w * p);
        }
    }
    out
}

/// One (head, query) row of an attention call.
struct OneQuery<'a> {
    a: &'a Attention<'a>,
    hq: usize,
    /// Key rows this query sees (causal).
    seen: usize,
}

impl<'a> OneQuery<'a> {
    /// Its parts: `(q, that part's key rows from this head's first, their stride)`.
    fn parts(&self) -> impl Iterator<Item = (&'a [f32], &'a [f32], usize)> + '_ {
        let (hq, h) = (self.hq, self.hq / self.a.queries);
        self.a.parts.iter().map(move |(q, k)| (&q[hq * k.width..(hq + 1) * k.width], k.head(h), k.stride))
    }

    /// Its value rows from this head's first.
    fn values(&self) -> &'a [f32] {
        self.a.values.head(self.hq / self.a.queries)
    }

    /// Scores against every seen row, softmax, weighted sum of the values into `o`.
    fn run(&self, scores: &mut Vec<f32>, o: &mut [f32]) {
        let (v, v_stride, dv) = (self.values(), self.a.values.stride, self.a.values.width);
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for t in 0..self.seen {
            let r = self.a.phys(t);
            let s: f32 = self.parts().map(|(q, k, stride)| dot(q, &k[r * stride..r * stride + q.len()])).sum();
            let s = self.a.scale * s;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        // the weighted sum 64 values at a time, in registers across the rows
        for c0 in (0..dv).step_by(64) {
            let len = (dv - c0).min(64);
            let mut acc = [0f32; 64];
            for (t, p) in scores.iter().enumerate() {
                let r = self.a.phys(t);
                let row = &v[r * v_stride + c0..r * v_stride + c0 + len];
                acc.iter_mut().zip(row).for_each(|(a, x)| *a += p * x);
            }
            o[c0..c0 + len].iter_mut().zip(acc).for_each(|(o, a)| *o = a * inv);
        }
    }
}

/// The AVX-512 attention: flash-style, over blocks of key rows with an online softmax, so that
/// a block is loaded into L1 once for every query row of a group.
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::OneQuery;
    use crate::simd::{exp16, lane_mask, sum16};

    /// Key rows per block: 32 rows of R1's 576 floats are 72 KiB, mostly in L1 and L2's
    /// nearest lines, and enough to amortize the rescaling of each row's accumulator.
    const BLOCK: usize = 32;

    /// One 16-lane piece of a query part: its values, the key rows it multiplies (this piece's
    /// column of the first row), their stride, and its lanes.
    #[derive(Clone, Copy)]
    struct Piece {
        q: __m512,
        keys: *const f32,
        stride: usize,
        mask: __mmask16,
    }

    /// `o: [group.len(), dv]` for the query rows of `group`, which all read the same key and
    /// value rows.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every query's rows must hold `seen` rows of their widths.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn group(group: &[OneQuery], o: &mut [f32]) {
        group_over(group, o, 0..usize::MAX, None)
    }

    /// [`group`] over the key rows in `keys` only. With `stats`, each row's running softmax
    /// `(max, sum)` goes there and `o` stays unnormalized (`Σ e^(s - max) · v`), for the caller
    /// to merge with the other ranges; without, `o` is normalized.
    ///
    /// # Safety
    /// As [`group`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn group_over(group: &[OneQuery], o: &mut [f32], keys: Range<usize>, stats: Option<&mut [(f32, f32)]>) {
        let Some(first) = group.first() else { return };
        let (scale, v_stride, dv) = (first.a.scale, first.a.values.stride, first.a.values.width);
        let v = first.values().as_ptr();
        // every query's pieces, one query after another
        let per_query: usize = first.parts().map(|(qp, ..)| qp.len().div_ceil(16)).sum();
        let mut pieces: Vec<Piece> = Vec::with_capacity(group.len() * per_query);
        for (qp, k, stride) in group.iter().flat_map(|q| q.parts()) {
            for i in (0..qp.len()).step_by(16) {
                let mask = lane_mask(qp.len() - i);
                pieces.push(Piece { q: _mm512_maskz_loadu_ps(mask, qp.as_ptr().add(i)), keys: k.as_ptr().add(i), stride, mask });
            }
        }
        // running max and sum of each row's softmax
        let mut max = vec![f32::NEG_INFINITY; group.len()];
        let mut sum = vec![0f32; group.len()];
        o.fill(0.0);
        let seen = group.iter().map(|q| q.seen).max().unwrap_or(0);
        let mut p = [0f32; BLOCK];
        for t0 in (keys.start..seen.min(keys.end)).step_by(BLOCK) {
            // the physical row of each 16 rows of the block (contiguous within a page)
            let base: [usize; BLOCK / 16] = std::array::from_fn(|j| first.a.phys((t0 + 16 * j).min(seen - 1)));
            for (g, q) in group.iter().enumerate() {
                let n = q.seen.min(keys.end).saturating_sub(t0).min(BLOCK);
                if n == 0 {
                    continue;
                }
                let pieces = &pieces[g * per_query..(g + 1) * per_query];
                // scores: 16 rows at a time, their sums transposed into one vector (no
                // horizontal sum per row), then four at a time against one load of the query
                let mut t = 0;
                while n - t >= 16 {
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for pc in pieces {
                        let kr = pc.keys.add(base[t / 16] * pc.stride);
                        for (k, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm512_fmadd_ps(pc.q, _mm512_maskz_loadu_ps(pc.mask, kr.add(k * pc.stride)), *acc);
                        }
                    }
                    _mm512_storeu_ps(p.as_mut_ptr().add(t), _mm512_mul_ps(_mm512_set1_ps(scale), sum16(&acc)));
                    t += 16;
                }
                while t < n {
                    let k4 = (n - t).min(4);
                    let mut acc = [_mm512_setzero_ps(); 4];
                    for pc in pieces {
                        // (rows t.. lie in the same 16 as t: the loop above took whole 16s)
                        let kr = pc.keys.add((base[t / 16] + t % 16) * pc.stride);
                        for (k, acc) in acc.iter_mut().enumerate().take(k4) {
                            *acc = _mm512_fmadd_ps(pc.q, _mm512_maskz_loadu_ps(pc.mask, kr.add(k * pc.stride)), *acc);
                        }
                    }
                    for k in 0..k4 {
                        p[t + k] = scale * _mm512_reduce_add_ps(acc[k]);
                    }
                    t += k4;
                }
                let masks = [lane_mask(n), lane_mask(n.saturating_sub(16))];
                let neg = _mm512_set1_ps(f32::NEG_INFINITY);
                let block_max = _mm512_reduce_max_ps(_mm512_max_ps(
                    _mm512_mask_loadu_ps(neg, masks[0], p.as_ptr()),
                    _mm512_mask_loadu_ps(neg, masks[1], p.as_ptr().add(16)),
                ));
                let new_max = max[g].max(block_max);
                let rescale = (max[g] - new_max).exp();
                max[g] = new_max;
                let mut block_sum = _mm512_setzero_ps();
                for (h, &m) in masks.iter().enumerate() {
                    let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.as_ptr().add(16 * h)), _mm512_set1_ps(new_max));
                    let ex = _mm512_maskz_mov_ps(m, exp16(x));
                    _mm512_mask_storeu_ps(p.as_mut_ptr().add(16 * h), m, ex);
                    block_sum = _mm512_add_ps(block_sum, ex);
                }
                sum[g] = sum[g] * rescale + _mm512_reduce_add_ps(block_sum);
                // o = o · rescale + Σ p · v: 256 values at a time in registers, then 64; each 16
                // rows of the block (contiguous) in turn, the first rescaling
                let og = o.as_mut_ptr().add(g * dv);
                for (j, p) in p[..n].chunks(16).enumerate() {
                    let (rows, rescale) = (v.add(base[j] * v_stride), if j == 0 { rescale } else { 1.0 });
                    let mut b0 = 0;
                    while dv - b0 >= 256 {
                        accumulate::<16>(og.add(b0), rows.add(b0), v_stride, p, rescale, dv - b0);
                        b0 += 256;
                    }
                    while b0 < dv {
                        accumulate::<4>(og.add(b0), rows.add(b0), v_stride, p, rescale, dv - b0);
                        b0 += 64;
                    }
                }
            }
        }
        if let Some(stats) = stats {
            stats.iter_mut().zip(max.into_iter().zip(sum)).for_each(|(st, ms)| *st = ms);
            return;
        }
        for (g, o) in o.chunks_exact_mut(dv).enumerate() {
            let inv = if sum[g] > 0.0 { 1.0 / sum[g] } else { 0.0 };
            o.iter_mut().for_each(|v| *v *= inv);
        }
    }

    /// `o[..] = o · rescale + Σ_t p[t] · rows[t]` over the first `min(len, 16·NV)` values, the
    /// `NV` vectors of sums in registers (a constant count, so they are never spilled).
    ///
    /// # Safety
    /// AVX-512F; `o` and each of the `p.len()` rows (`stride` apart) valid for those values.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn accumulate<const NV: usize>(o: *mut f32, rows: *const f32, stride: usize, p: &[f32], rescale: f32, len: usize) {
        let masks: [u16; NV] = std::array::from_fn(|i| lane_mask(len.saturating_sub(16 * i)));
        let rescale = _mm512_set1_ps(rescale);
        let mut acc = [_mm512_setzero_ps(); NV];
        for i in 0..NV {
            acc[i] = _mm512_mul_ps(rescale, _mm512_maskz_loadu_ps(masks[i], o.wrapping_add(16 * i)));
        }
        for (t, &pt) in p.iter().enumerate() {
            let (pv, r) = (_mm512_set1_ps(pt), rows.add(t * stride));
            for i in 0..NV {
                acc[i] = _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(masks[i], r.wrapping_add(16 * i)), acc[i]);
            }
        }
        for i in 0..NV {
            _mm512_mask_storeu_ps(o.wrapping_add(16 * i), masks[i], acc[i]);
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // sixteen independent sums so the loop vectorizes
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The plain definition of [`attention`], in f64 (for tests).
pub fn attention_reference(a: &Attention) -> Vec<f32> {
    a.check();
    let dv = a.values.width;
    let mut out = vec![0f32; a.heads * a.queries * dv];
    for hq in 0..a.heads * a.queries {
        let (h, i) = (hq / a.queries, hq % a.queries);
        let scores: Vec<f64> = (0..a.tokens)
            .map(|t| {
                if t > a.start + i {
                    return f64::NEG_INFINITY;
                }
                let s: f64 = a
                    .parts
                    .iter()
                    .map(|(q, k)| {
                        let q = &q[hq * k.width..(hq + 1) * k.width];
                        q.iter().zip(k.row(h, a.phys(t))).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>()
                    })
                    .sum();
                a.scale as f64 * s
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        for k in 0..dv {
            let v: f64 = (0..a.tokens).map(|t| (scores[t] - max).exp() / z * a.values.row(h, a.phys(t))[k] as f64).sum();
            out[hq * dv + k] = v as f32;
        }
    }
    out
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    unsafe fn sums_of(v: &[f32]) -> [f32; 16] {
        let mut a = [_mm512_setzero_ps(); 16];
        for (k, a) in a.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(v.as_ptr().add(16 * k));
        }
        let mut out = [0f32; 16];
        _mm512_storeu_ps(out.as_mut_ptr(), crate::simd::sum16(&a));
        out
    }

    #[test]
    fn sum16_sums_each_vector() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let v: Vec<f32> = (0..256).map(|i| ((i * 7919 % 257) as f32 - 128.0) / 16.0).collect();
        // SAFETY: AVX-512F checked above.
        let got = unsafe { sums_of(&v) };
        for (k, g) in got.iter().enumerate() {
            let want: f32 = v[16 * k..16 * (k + 1)].iter().sum();
            assert!((g - want).abs() <= 1e-5 * want.abs().max(1.0), "vector {k}: {g} vs {want}");
        }
    }
}
