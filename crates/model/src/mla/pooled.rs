//! A step's attention on the CPU over the sequences whose cache rows are in one page pool (the
//! engine's; a step's prefill chunks that take the naive form attend on their own): the work of
//! all of them in three calls rather than three per sequence.
//!
//! One sequence's call alone keeps about one thread busy when its heads make a single lane
//! group over few rows, and reads kv_b's key and value rows once per sequence. Here:
//! - the queries of every sequence are absorbed in one product (kv_b's key rows read once);
//! - the sequences' passes over their cache rows run in one parallel loop;
//! - the outputs are expanded in one product (kv_b's value rows read once).
//!
//! The pool is read-locked once, on the step's thread, for the whole loop. (A loop whose calls
//! each took the lock on a pool thread deadlocked against another rank's pending write to a
//! shared pool: a waiting writer blocks new readers, and a holder waited on the loops that the
//! blocked readers kept from running.)

use candle_core::Tensor;
use moeserve_core::{error::Context, Result};
use moeserve_cpu::{MlaShape, PackedMatrix, Pages};

use super::{f32_values, Absorbed, Mla};
use crate::batch::ForwardBatch;
use crate::cache::LatentKv;
use crate::device_ops::PagedRows;
use crate::values::{with_values, CpuValues};

impl Mla {
    /// The attention of the chunks of `batch` whose cache rows (written) lie in one CPU page
    /// pool that the kernels read in place (`cpu_pages`; the first such chunk's pool): their
    /// indices, in order, and their outputs `[their tokens, H·V]`, from `q_nope: [n, H, P]` and
    /// `q_pe: [n, H, R]` (rotated) of all the batch's `n` tokens. `None` where no chunk qualifies
    /// (kv_b not on the CPU, rows elsewhere).
    pub(super) fn attend_pooled(
        &self,
        batch: &ForwardBatch,
        kv: &[&mut dyn LatentKv],
        layer: usize,
        q_nope: &Tensor,
        q_pe: &Tensor,
    ) -> Result<Option<(Vec<usize>, Tensor)>> {
        let ctx = || format!("mla layer {layer} batched attention");
        let Absorbed::Cpu(cpu) = &self.absorbed else { return Ok(None) };
        // (chunk, its first token among the n, its pages)
        let mut chosen = Vec::with_capacity(batch.chunks.len());
        let mut first = 0;
        for (i, (chunk, cache)) in batch.chunks.iter().zip(kv).enumerate() {
            if let Some(p) = self.cpu_pages(batch, chunk, &**cache, layer) {
                if chosen.first().is_none_or(|(_, _, q): &(usize, usize, PagedRows)| q.pool.id() == p.pool.id()) {
                    chosen.push((i, first, p));
                }
            }
            first += chunk.len;
        }
        let Some(pool) = chosen.first().map(|(_, _, p)| p.pool) else { return Ok(None) };
        let (h, l, r) = (self.heads, self.latent, self.rope);
        let n = q_nope.dims()[0];
        // the chosen tokens, each chunk's from `at[j]` among the m
        let lens: Vec<usize> = chosen.iter().map(|&(i, _, _)| batch.chunks[i].len).collect();
        let at: Vec<usize> = lens.iter().scan(0, |m, &s| Some(std::mem::replace(m, *m + s))).collect();
        let m: usize = lens.iter().sum();
        let tokens = || chosen.iter().zip(&lens).flat_map(|(&(_, first, _), &s)| first..first + s);

        let span = moeserve_core::profile::span("attention block/attention/absorbed products");
        let dtype = q_nope.dtype();
        let q_nope = head_major(&f32_values(q_nope)?, n, h, self.nope, tokens()); // [H, m, P]
        let q_lat = moeserve_cpu::absorb_queries(cpu, &q_nope, m); // [H, m, L]
        moeserve_cpu::prefetch::next_bytes(
            cpu.expansion_bytes().into_iter().chain(self.o_proj.packed().map(PackedMatrix::bytes)),
        );
        let q_pe = head_major(&f32_values(q_pe)?, n, h, r, tokens()); // [H, m, R]
        drop(span);

        let scale = self.scale as f32;
        let span = moeserve_core::profile::span("attention block/attention/over the cache");
        let o_lats = with_values(pool, |rows| {
            let rows = rows?;
            let outs = moeserve_cpu::pool::map_indices(chosen.len(), |j| {
                let (i, _, p) = &chosen[j];
                let (chunk, s) = (&batch.chunks[*i], lens[j]);
                let shape =
                    MlaShape { heads: h, queries: s, tokens: chunk.start_pos + s, latent: l, rope: r, start: chunk.start_pos };
                let pages = Pages { ids: p.pages, size: p.page_size };
                let (ql, qp) = (head_rows(&q_lat, h, m, l, at[j], s), head_rows(&q_pe, h, m, r, at[j], s));
                match rows {
                    CpuValues::Bf16(bits) => moeserve_cpu::mla_decode_bf16(&ql, &qp, bits, Some(pages), shape, scale),
                    CpuValues::F32(e) => Some(moeserve_cpu::mla_attention_paged(&ql, &qp, e, pages, shape, scale)),
                }
            });
            outs.into_iter().collect::<Option<Vec<_>>>()
        });
        // (`cpu_pages` took only pools whose kernel runs these chunks)
        let Some(o_lats) = o_lats else { return Ok(None) };
        drop(span);

        let _span = moeserve_core::profile::span("attention block/attention/absorbed products");
        let mut o_lat = vec![0f32; h * m * l]; // [H, m, L]
        for ((o, &s), &at) in o_lats.iter().zip(&lens).zip(&at) {
            for (head, o) in o.chunks_exact(s * l).enumerate() {
                o_lat[(head * m + at) * l..][..s * l].copy_from_slice(o);
            }
        }
        let o = moeserve_cpu::expand_values(cpu, &o_lat, m); // [H, m, V]
        let o = Tensor::from_vec(o, (h, m, self.v), pool.device())
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.transpose(0, 1))
            .and_then(|t| t.reshape((m, h * self.v)))
            .ctx(ctx)?;
        Ok(Some((chosen.into_iter().map(|(i, _, _)| i).collect(), o)))
    }
}

/// `[H, m, w]`: the rows `tokens` (m of them) of `x: [n, H, w]`, head by head.
fn head_major(x: &[f32], n: usize, heads: usize, w: usize, tokens: impl Iterator<Item = usize> + Clone) -> Vec<f32> {
    debug_assert_eq!(x.len(), n * heads * w);
    let mut out = Vec::with_capacity(heads * tokens.clone().count() * w);
    for head in 0..heads {
        for t in tokens.clone() {
            out.extend_from_slice(&x[(t * heads + head) * w..][..w]);
        }
    }
    out
}

/// `[H, s, w]`: rows `first..first + s` of each head of `x: [H, n, w]`.
fn head_rows(x: &[f32], heads: usize, n: usize, w: usize, first: usize, s: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * s * w);
    for head in 0..heads {
        out.extend_from_slice(&x[(head * n + first) * w..][..s * w]);
    }
    out
}
