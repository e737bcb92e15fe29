//! A batched decode step's attention on the CPU, where every sequence's cache rows are in one
//! page pool (the engine's): the work of all sequences in three calls rather than three per
//! sequence.
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
use crate::values::{with_values, CpuValues};

impl Mla {
    /// `[n, H·V]` for `q_nope: [n, H, P]` and `q_pe: [n, H, R]` (rotated), every chunk of
    /// `batch` attending over its cache rows (written); `None` where this path does not apply
    /// (one chunk, kv_b not on the CPU, rows outside one CPU page pool the kernels read).
    pub(super) fn attend_pooled(
        &self,
        batch: &ForwardBatch,
        kv: &[&mut dyn LatentKv],
        layer: usize,
        q_nope: &Tensor,
        q_pe: &Tensor,
    ) -> Result<Option<Tensor>> {
        let ctx = || format!("mla layer {layer} batched attention");
        let Absorbed::Cpu(cpu) = &self.absorbed else { return Ok(None) };
        if batch.chunks.len() < 2 {
            return Ok(None);
        }
        let paged = batch.chunks.iter().zip(kv).map(|(chunk, cache)| self.cpu_pages(batch, chunk, &**cache, layer));
        let Some(paged) = paged.collect::<Option<Vec<_>>>() else { return Ok(None) };
        let pool = paged[0].pool;
        if paged.iter().any(|p| p.pool.id() != pool.id()) {
            return Ok(None);
        }
        let (h, l, r) = (self.heads, self.latent, self.rope);
        let n = q_nope.dims()[0];

        let span = moeserve_core::profile::span("attention block/attention/absorbed products");
        let q_lat = moeserve_cpu::absorb_queries(cpu, &f32_values(&q_nope.transpose(0, 1).ctx(ctx)?)?, n); // [H, n, L]
        moeserve_cpu::prefetch::next_bytes(
            cpu.expansion_bytes().into_iter().chain(self.o_proj.packed().map(PackedMatrix::bytes)),
        );
        let q_pe = f32_values(&q_pe.transpose(0, 1).ctx(ctx)?)?; // [H, n, R]
        drop(span);

        // each chunk's first row among the n
        let firsts: Vec<usize> = batch.chunks.iter().scan(0, |at, c| Some(std::mem::replace(at, *at + c.len))).collect();
        let scale = self.scale as f32;
        let span = moeserve_core::profile::span("attention block/attention/over the cache");
        let o_lats = with_values(pool, |rows| {
            let rows = rows?;
            let outs = moeserve_cpu::pool::map_indices(batch.chunks.len(), |i| {
                let (chunk, first) = (&batch.chunks[i], firsts[i]);
                let s = chunk.len;
                let shape =
                    MlaShape { heads: h, queries: s, tokens: chunk.start_pos + s, latent: l, rope: r, start: chunk.start_pos };
                let pages = Pages { ids: paged[i].pages, size: paged[i].page_size };
                let (ql, qp) = (head_rows(&q_lat, h, n, l, first, s), head_rows(&q_pe, h, n, r, first, s));
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
        let mut o_lat = vec![0f32; h * n * l]; // [H, n, L]
        for ((o, chunk), first) in o_lats.iter().zip(&batch.chunks).zip(&firsts) {
            let s = chunk.len;
            for (head, o) in o.chunks_exact(s * l).enumerate() {
                o_lat[(head * n + first) * l..][..s * l].copy_from_slice(o);
            }
        }
        let o = moeserve_cpu::expand_values(cpu, &o_lat, n); // [H, n, V]
        Tensor::from_vec(o, (h, n, self.v), pool.device())
            .and_then(|t| t.to_dtype(q_nope.dtype()))
            .and_then(|t| t.transpose(0, 1))
            .and_then(|t| t.reshape((n, h * self.v)))
            .map(Some)
            .ctx(ctx)
    }
}

/// `[H, s, w]`: rows `first..first + s` of each head of `x: [H, n, w]`.
fn head_rows(x: &[f32], heads: usize, n: usize, w: usize, first: usize, s: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * s * w);
    for head in 0..heads {
        out.extend_from_slice(&x[(head * n + first) * w..][..s * w]);
    }
    out
}
