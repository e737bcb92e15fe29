//! Multi-head Latent Attention over the latent cache.
//!
//! Per token the cache holds `c_kv` (kv_lora_rank, normalized) and `k_pe` (rope dim, rotated).
//! `kv_b_proj` holds `W_UK [H, P, L]` and `W_UV [H, V, L]` (on the CPU kept as stored, the
//! kernels reading each head's rows; elsewhere split once at load into `W_UK` and `W_UV^T`):
//! - naive form (long prefill): decompress `k_nope = W_UK c_kv`, `v = W_UV c_kv` per head;
//! - absorbed form (decode): `q_lat = W_UKᵀ q_nope`, attend over `c_kv` directly, then `W_UV`.
//!
//! Both are exact algebra and differ only by rounding.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moeserve_core::{error::Context, profile, DeepSeekConfig, Error, Result};
use moeserve_cpu::{Attention, Format, Kvb, KvbShape, PackedMatrix, Pages, Rows};
use moeserve_quant::packed::forward_same_input;
use moeserve_quant::{Linear, Slice, Weights};

use crate::batch::{ForwardBatch, SeqChunk};
use crate::cache::LatentKv;
use crate::device_ops::PagedRows;
use crate::norm::RmsNorm;
use crate::parallel::Parallel;
use crate::rope::RopeTables;
use crate::values::{with_bf16_bits, with_f32};

mod pooled;

/// Query rows per step of the naive (prefill) attention.
const QUERY_CHUNK: usize = 64;

/// Cached rows per product when the CPU's naive attention decompresses them (the golden
/// tests' 96-token prompt spans two).
const DECOMPRESS_ROWS: usize = 64;

#[derive(Debug, Clone)]
enum QProj {
    /// q_a_proj -> q_a_layernorm -> q_b_proj (V3, V2 with q_lora_rank)
    LowRank { a: Arc<dyn Linear>, norm: RmsNorm, b: Arc<dyn Linear> },
    /// q_proj (V2-Lite: q_lora_rank null)
    Full(Arc<dyn Linear>),
}

impl Mla {
    /// Weight bytes read per decoded token (absorbed form: W_UK and W_UV instead of kv_b).
    pub fn active_bytes(&self) -> usize {
        let q = match &self.q {
            QProj::LowRank { a, b, .. } => a.resident_bytes() + b.resident_bytes(),
            QProj::Full(q) => q.resident_bytes(),
        };
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let absorbed = match &self.absorbed {
            Absorbed::Cpu(c) => c.decode_bytes(),
            Absorbed::Tensors { w_uk, w_uv_t } => t(w_uk) + t(w_uv_t),
        };
        q + self.kv_a.resident_bytes() + self.o_proj.resident_bytes() + absorbed
    }
}

/// kv_b as CPU kernel weights ([`Kvb`], `[H·(P+V), L]`): decode's absorption products read each
/// head's key rows (`q_lat = W_UKᵀ q_nope`) and value rows (`o = W_UV o_lat`) from it, and one
/// product decompresses a prefill's cache rows into every head's keys and values. FP8
/// checkpoints' kv_b as FP8 where the absorption loops decode it (to the bits of its f32
/// dequantization: a quarter of the bytes, which for DeepSeek-R1 are 67 MB a layer and token as
/// f32); q8_0 where kv_b is already quantized to a ggml format (its error is far below theirs;
/// half the bytes of bf16: 17 MB a layer and token less for DeepSeek-R1); bf16 where that is
/// exact (bf16 checkpoints); f32 otherwise, so f32 checkpoints keep the reference's numbers.
/// (An FP8 kv_b is taken as stored by the caller; this packs the others from `values`, the
/// dequantized `[H, P+V, L]`; `quantized`: kv_b is held in a ggml format.)
fn cpu_kvb(values: &[f32], shape: KvbShape, latent: usize, quantized: bool) -> std::result::Result<Kvb, moeserve_cpu::Error> {
    if quantized {
        return Kvb::quantized(values, shape, latent);
    }
    let format = if moeserve_cpu::bf16_exact(values) { Format::Bf16 } else { Format::F32 };
    PackedMatrix::from_f32(format, shape.heads * (shape.nope + shape.v), latent, values).and_then(|kv| Kvb::as_stored(kv, shape))
}

/// kv_b as the attention uses it.
#[derive(Debug, Clone)]
enum Absorbed {
    /// On the CPU: as kernel weights (decode's absorption products, prefill's decompression).
    Cpu(Arc<Kvb>),
    /// Elsewhere: `W_UK [H, P, L]` and `W_UV^T [H, L, V]` for the device's products.
    Tensors { w_uk: Tensor, w_uv_t: Tensor },
}

#[derive(Debug, Clone)]
pub struct Mla {
    q: QProj,
    kv_a: Arc<dyn Linear>,
    kv_a_norm: RmsNorm,
    absorbed: Absorbed,
    o_proj: Arc<dyn Linear>,
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    latent: usize,
    scale: f64,
}

impl Mla {
    /// `w` points at `model.layers.L.self_attn`. Under tensor parallelism this rank keeps its
    /// block of heads: their rows of q_b (or q_proj) and kv_b, their input columns of o_proj
    /// (whose output is then a partial sum, all-reduced by the caller).
    pub fn load(w: &Weights, cfg: &DeepSeekConfig, par: &Parallel) -> Result<Self> {
        let (all_heads, d) = (cfg.num_attention_heads, cfg.hidden_size);
        let (nope, rope, v, latent) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let heads = Parallel::split(all_heads, par.tp(), "num_attention_heads")?;
        let h = heads.len();
        let per_head = |width: usize| Slice::rows(heads.start * width..heads.end * width);
        let eps = cfg.rms_norm_eps;
        let q = match cfg.q_lora_rank {
            Some(r) => QProj::LowRank {
                a: w.linear("q_a_proj", d, r)?,
                norm: RmsNorm::load(&w.pp("q_a_layernorm"), r, eps)?,
                b: w.linear_part("q_b_proj", r, all_heads * (nope + rope), &per_head(nope + rope))?,
            },
            None => QProj::Full(w.linear_part("q_proj", d, all_heads * (nope + rope), &per_head(nope + rope))?),
        };
        // kv_b_proj [H*(P+V), L]: the CPU kernels' copy (`cpu_kvb`), or
        // split into the absorbed factors (the CPU keeps only the kernels' copy: at R1's shape
        // the two f32 factors would be another 67 MB per layer)
        let kv_b = w.linear_part("kv_b_proj", latent, all_heads * (nope + v), &per_head(nope + v))?;
        let ctx = || w.name("kv_b_proj");
        let dense = || -> Result<Tensor> { kv_b.dense_weight(w.dtype)?.reshape((h, nope + v, latent)).ctx(ctx) };
        let fp8 = kv_b.packed().filter(|p| {
            matches!(p.format(), Format::Fp8 { .. })
                && (p.rows(), p.cols()) == (h * (nope + v), latent)
                && moeserve_cpu::takes_as_stored(p)
        });
        let shape = KvbShape { heads: h, nope, v };
        let absorbed = match w.device.is_cpu() {
            true => {
                let kvb = match fp8 {
                    Some(kv) => Kvb::as_stored(kv.clone(), shape),
                    None => {
                        let values = dense()?
                            .to_dtype(DType::F32)
                            .and_then(|t| t.flatten_all())
                            .and_then(|t| t.to_vec1::<f32>())
                            .ctx(ctx)?;
                        let quantized =
                            kv_b.packed().is_some_and(|p| matches!(p.format(), Format::Q8_0 | Format::Q4K | Format::Q6K));
                        cpu_kvb(&values, shape, latent, quantized)
                    }
                };
                Absorbed::Cpu(Arc::new(kvb.map_err(|e| Error::Input(format!("{}: {e}", ctx())))?))
            }
            false => {
                let kvb = dense()?;
                let w_uk = kvb.narrow(1, 0, nope).ctx(ctx)?.contiguous().ctx(ctx)?;
                let w_uv_t = kvb.narrow(1, nope, v).ctx(ctx)?.transpose(1, 2).ctx(ctx)?.contiguous().ctx(ctx)?;
                Absorbed::Tensors { w_uk, w_uv_t }
            }
        };
        let o_cols = Slice::cols(heads.start * v..heads.end * v);
        Ok(Mla {
            q,
            kv_a: w.linear("kv_a_proj_with_mqa", d, latent + rope)?,
            kv_a_norm: RmsNorm::load(&w.pp("kv_a_layernorm"), latent, eps)?,
            absorbed,
            o_proj: w.linear_part("o_proj", all_heads * v, d, &o_cols)?,
            heads: h,
            nope,
            rope,
            v,
            latent,
            scale: cfg.softmax_scale(),
        })
    }

    /// The weights of the first products of [`Mla::forward`] (q_a or q_proj, and kv_a), for the
    /// waiting threads to fetch ahead (`moeserve_cpu::prefetch`).
    pub fn fetch_first(&self) {
        let q = match &self.q {
            QProj::LowRank { a, .. } => a,
            QProj::Full(p) => p,
        };
        moeserve_cpu::prefetch::next([q, &self.kv_a].into_iter().filter_map(|l| l.packed()));
    }

    /// `x: [n, hidden]` (normed) for all chunks of `batch`; writes this layer's cache rows.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &ForwardBatch,
        rope: &RopeTables,
        kv: &mut [&mut dyn LatentKv],
        layer: usize,
    ) -> Result<Tensor> {
        let ctx = || format!("mla layer {layer}");
        let n = x.dims()[0];
        let span = profile::span("attention block/projections in");
        // q: [n, H·(P+R)] and a = kv_a(x): [n, L+R], the two products of x in one kernel call
        // where they can be
        let (q, a) = match &self.q {
            QProj::LowRank { a, norm, b } => {
                let [qa, kva] = forward_same_input([a.as_ref(), self.kv_a.as_ref()], x)?;
                moeserve_cpu::prefetch::next(b.packed());
                let q = b.forward(&norm.forward(&qa)?)?;
                if let Absorbed::Cpu(kvb) = &self.absorbed {
                    moeserve_cpu::prefetch::next([kvb.absorption_weights()]);
                }
                (q, kva)
            }
            QProj::Full(p) => {
                let [q, kva] = forward_same_input([p.as_ref(), self.kv_a.as_ref()], x)?;
                if let Absorbed::Cpu(kvb) = &self.absorbed {
                    moeserve_cpu::prefetch::next([kvb.absorption_weights()]);
                }
                (q, kva)
            }
        };
        let q = q.reshape((n, self.heads, self.nope + self.rope)).ctx(ctx)?; // [n, H, P+R]
        let q_nope = q.narrow(2, 0, self.nope).ctx(ctx)?; // [n, H, P]
        let q_pe = rope.apply(&q.narrow(2, self.nope, self.rope).ctx(ctx)?)?; // [n, H, R]

        let c_kv = self.kv_a_norm.forward(&a.narrow(1, 0, self.latent).ctx(ctx)?)?; // [n, L]
        let k_pe = rope.apply(&a.narrow(1, self.latent, self.rope).ctx(ctx)?.unsqueeze(1).ctx(ctx)?)?; // [n, 1, R]
        let rows = Tensor::cat(&[&c_kv, &k_pe.squeeze(1).ctx(ctx)?], 1).ctx(ctx)?; // [n, L+R]
        drop(span);
        let span = profile::span("attention block/attention");

        // every chunk's rows into its cache, then the chunks' attention over their caches
        let mut offset = 0;
        for (chunk, cache) in batch.chunks.iter().zip(kv.iter_mut()) {
            cache.write(layer, chunk.start_pos, &rows.narrow(0, offset, chunk.len).ctx(ctx)?)?;
            offset += chunk.len;
        }
        if offset != n {
            return Err(Error::Input(format!("batch chunks cover {offset} tokens, batch has {n}")));
        }
        // the chunks whose rows lie in one CPU page pool attend together, the others one at a time
        let (pooled, pooled_out) = self.attend_pooled(batch, kv, layer, &q_nope, &q_pe)?.unzip();
        let o = match (pooled.as_deref(), pooled_out) {
            (Some(all), Some(o)) if all.len() == batch.chunks.len() => o,
            (pooled, pooled_out) => {
                let pooled = pooled.unwrap_or_default();
                let mut outs = Vec::with_capacity(batch.chunks.len());
                // (`pooled` is in chunk order: the next pooled chunk is `pooled[k]`)
                let (mut offset, mut at, mut k) = (0, 0, 0);
                for (i, (chunk, cache)) in batch.chunks.iter().zip(kv.iter()).enumerate() {
                    let s = chunk.len;
                    match &pooled_out {
                        Some(o) if pooled.get(k) == Some(&i) => {
                            outs.push(o.narrow(0, at, s).ctx(ctx)?);
                            (at, k) = (at + s, k + 1);
                        }
                        _ => {
                            let head_major = |t: &Tensor| t.narrow(0, offset, s)?.transpose(0, 1)?.contiguous();
                            let qn = head_major(&q_nope).ctx(ctx)?; // [H, S, P]
                            let qp = head_major(&q_pe).ctx(ctx)?; // [H, S, R]
                            let o = self.attend_chunk(batch, chunk, &**cache, layer, &qn, &qp)?; // [H, S, V]
                            outs.push(o.transpose(0, 1).and_then(|o| o.reshape((s, self.heads * self.v))).ctx(ctx)?);
                        }
                    }
                    offset += s;
                }
                Tensor::cat(&outs, 0).ctx(ctx)?
            }
        };
        drop(span);
        let _span = profile::span("attention block/o_proj");
        self.o_proj.forward(&o)
    }

    /// `chunk`'s cache rows as a CPU page pool that the absorbed CPU kernels read in place, if
    /// they are (a bf16 pool only where its decode kernel runs: the f32 one would read the whole
    /// pool as f32).
    fn cpu_pages<'a>(
        &self,
        batch: &ForwardBatch,
        chunk: &SeqChunk,
        cache: &'a dyn LatentKv,
        layer: usize,
    ) -> Option<PagedRows<'a>> {
        let p = cache.paged(layer)?;
        let takes = batch.use_absorbed(chunk)
            && p.pool.device().is_cpu()
            && (p.pool.dtype() == DType::F32
                || p.pool.dtype() == DType::BF16 && self.bf16_decode_applies(chunk.len, Some(p.page_size)));
        takes.then_some(p)
    }

    /// One chunk's attention over its cache rows (written): `[H, S, V]`.
    fn attend_chunk(
        &self,
        batch: &ForwardBatch,
        chunk: &SeqChunk,
        cache: &dyn LatentKv,
        layer: usize,
        qn: &Tensor,
        qp: &Tensor,
    ) -> Result<Tensor> {
        let (s, len) = (chunk.len, chunk.start_pos + chunk.len);
        if let (1, Some(pages)) = (s, cache.paged(layer)) {
            if batch.use_absorbed(chunk) && crate::device_ops::has_paged_mla(qn) {
                if let Some(o) = self.attend_paged(qn, qp, &pages, len)? {
                    return Ok(o);
                }
            }
        }
        if !batch.use_absorbed(chunk) {
            return self.attend_naive(qn, qp, &cache.read(layer, len)?, chunk.start_pos);
        }
        match (&self.absorbed, self.cpu_pages(batch, chunk, cache, layer)) {
            // a paged cache on the CPU: its pool rows in place, not a gathered copy
            (Absorbed::Cpu(cpu), Some(p)) => {
                let pages = Pages { ids: p.pages, size: p.page_size };
                self.attend_absorbed_cpu(cpu, qn, qp, p.pool, Some(pages), len, chunk.start_pos)
            }
            _ => self.attend_absorbed(qn, qp, &cache.read(layer, len)?, chunk.start_pos),
        }
    }

    fn split_entries(&self, entries: &Tensor) -> Result<(Tensor, Tensor)> {
        let ctx = || "mla cache split".to_string();
        let c_kv = entries.narrow(1, 0, self.latent).ctx(ctx)?.contiguous().ctx(ctx)?; // [T, L]
        let k_pe = entries.narrow(1, self.latent, self.rope).ctx(ctx)?.contiguous().ctx(ctx)?; // [T, R]
        Ok((c_kv, k_pe))
    }

    /// Weight-absorbed attention: MQA with one (L+R)-dim key and an L-dim value over the cache.
    fn attend_absorbed(&self, q_nope: &Tensor, q_pe: &Tensor, entries: &Tensor, start: usize) -> Result<Tensor> {
        let ctx = || "mla absorbed".to_string();
        let (w_uk, w_uv_t) = match &self.absorbed {
            // (a bf16 cache's rows are read as f32, exactly: the kernel's bits then do not depend
            // on the step's query count, where candle's products below would)
            Absorbed::Cpu(cpu) => return self.attend_absorbed_cpu(cpu, q_nope, q_pe, entries, None, entries.dims()[0], start),
            Absorbed::Tensors { w_uk, w_uv_t } => (w_uk, w_uv_t),
        };
        let q_lat = q_nope.matmul(w_uk).ctx(ctx)?; // [H, S, L]
        let (c_kv, k_pe) = self.split_entries(entries)?;
        let scores = (q_lat.broadcast_matmul(&c_kv.t().ctx(ctx)?).ctx(ctx)?
            + q_pe.broadcast_matmul(&k_pe.t().ctx(ctx)?).ctx(ctx)?)
        .ctx(ctx)?; // [H, S, T]
        let p = self.softmax(&scores, start)?;
        let o_lat = p.broadcast_matmul(&c_kv).ctx(ctx)?; // [H, S, L]
        o_lat.matmul(w_uv_t).ctx(ctx) // [H, S, V]
    }

    /// The absorbed form on the CPU kernels: absorption on the pool, one fused pass over the
    /// cache rows `rows` (`[T, L+R]`, or with `pages` a page pool read in place), expansion.
    #[allow(clippy::too_many_arguments)]
    fn attend_absorbed_cpu(
        &self,
        cpu: &Kvb,
        q_nope: &Tensor,
        q_pe: &Tensor,
        rows: &Tensor,
        pages: Option<Pages>,
        tokens: usize,
        start: usize,
    ) -> Result<Tensor> {
        let ctx = || "mla absorbed".to_string();
        let (h, s, _) = q_nope.dims3().ctx(ctx)?;
        let p = profile::span("attention block/attention/absorbed products");
        let q_lat = moeserve_cpu::absorb_queries(cpu, &f32_values(q_nope)?, s); // [H, S, L]

        // fetched while the attention kernel lays out its queries, and after it
        moeserve_cpu::prefetch::next_bytes(
            cpu.expansion_bytes().into_iter().chain(self.o_proj.packed().map(PackedMatrix::bytes)),
        );
        drop(p);
        let shape = moeserve_cpu::MlaShape { heads: h, queries: s, tokens, latent: self.latent, rope: self.rope, start };
        let q_pe = f32_values(q_pe)?;
        let p = profile::span("attention block/attention/over the cache");
        let scale = self.scale as f32;
        // a bf16 cache's rows as stored where its decode kernel runs, else read as f32
        let bf16 = with_bf16_bits(rows, |bits| moeserve_cpu::mla_decode_bf16(&q_lat, &q_pe, bits, pages, shape, scale)).flatten();
        let o_lat = match bf16 {
            Some(o) => o,
            None => with_f32(rows, |e| match pages {
                Some(pages) => moeserve_cpu::mla_attention_paged(&q_lat, &q_pe, e, pages, shape, scale),
                None => moeserve_cpu::mla_attention(&q_lat, &q_pe, e, shape, scale),
            })
            .ctx(ctx)?,
        };
        drop(p);
        let _p = profile::span("attention block/attention/absorbed products");
        let o = moeserve_cpu::expand_values(cpu, &o_lat, s); // [H, S, V]
        Tensor::from_vec(o, (h, s, self.v), rows.device()).and_then(|t| t.to_dtype(q_nope.dtype())).ctx(ctx)
    }

    /// Whether the bf16 cache's decode kernel takes `s` queries per head (over pages of
    /// `page_size` rows).
    fn bf16_decode_applies(&self, s: usize, page_size: Option<usize>) -> bool {
        let shape =
            moeserve_cpu::MlaShape { heads: self.heads, queries: s, tokens: 0, latent: self.latent, rope: self.rope, start: 0 };
        moeserve_cpu::bf16_decode_applies(shape, page_size)
    }

    /// One decode token, absorbed form, by the paged kernel over the pool rows in place.
    fn attend_paged(&self, q_nope: &Tensor, q_pe: &Tensor, pages: &PagedRows, len: usize) -> Result<Option<Tensor>> {
        let ctx = || "mla paged".to_string();
        let Absorbed::Tensors { w_uk, w_uv_t } = &self.absorbed else { return Ok(None) };
        let q_lat = q_nope.matmul(w_uk).ctx(ctx)?; // [H, 1, L]
        let q = Tensor::cat(&[&q_lat, q_pe], 2).ctx(ctx)?.transpose(0, 1).ctx(ctx)?.contiguous().ctx(ctx)?; // [1, H, L+R]
        let Some(o_lat) = crate::device_ops::mla_decode(&q, pages, len, self.latent, self.scale)? else { return Ok(None) };
        let o_lat = o_lat.transpose(0, 1).ctx(ctx)?.contiguous().ctx(ctx)?; // [H, 1, L]
        o_lat.matmul(w_uv_t).map(Some).ctx(ctx) // [H, 1, V]
    }

    /// Naive attention: decompress per-head keys and values from the latent rows.
    fn attend_naive(&self, q_nope: &Tensor, q_pe: &Tensor, entries: &Tensor, start: usize) -> Result<Tensor> {
        let ctx = || "mla naive".to_string();
        let (w_uk, w_uv_t) = match &self.absorbed {
            // (a bf16 cache's rows read as f32, exactly)
            Absorbed::Cpu(cpu) => {
                let (h, s, _) = q_nope.dims3().ctx(ctx)?;
                let o = with_f32(entries, |e| self.attend_naive_cpu(cpu, &f32_values(q_nope)?, &f32_values(q_pe)?, e, s, start))
                    .ctx(ctx)??;
                return Tensor::from_vec(o, (h, s, self.v), entries.device()).and_then(|t| t.to_dtype(q_nope.dtype())).ctx(ctx);
            }
            Absorbed::Tensors { w_uk, w_uv_t } => (w_uk, w_uv_t),
        };
        let (c_kv, k_pe) = self.split_entries(entries)?;
        let (t, s) = (c_kv.dims()[0], q_nope.dims()[1]);
        let k_nope = w_uk.broadcast_matmul(&c_kv.t().ctx(ctx)?).ctx(ctx)?.transpose(1, 2).ctx(ctx)?; // [H, T, P]
        let v = c_kv.broadcast_matmul(w_uv_t).ctx(ctx)?; // [H, T, V]
        let k_pe = k_pe.unsqueeze(0).ctx(ctx)?.broadcast_as((self.heads, t, self.rope)).ctx(ctx)?; // [H, T, R]
        let k = Tensor::cat(&[&k_nope, &k_pe], 2).ctx(ctx)?.contiguous().ctx(ctx)?; // [H, T, P+R]
        let q = Tensor::cat(&[q_nope, q_pe], 2).ctx(ctx)?; // [H, S, P+R]

        // the queries in chunks, each against only the keys it may see: a long prompt's products
        // halve, and a score tensor is [H, QUERY_CHUNK, T] instead of [H, S, T]
        let mut outs = Vec::with_capacity(s.div_ceil(QUERY_CHUNK));
        for c0 in (0..s).step_by(QUERY_CHUNK) {
            let len = (s - c0).min(QUERY_CHUNK);
            let seen = start + c0 + len;
            // rows `from..from + n` of each head (CUDA's batched matmul takes only contiguous
            // batches; the CPU's takes the view)
            let rows = |x: &Tensor, from: usize, n: usize| {
                let part = x.narrow(1, from, n)?;
                if x.device().is_cpu() {
                    Ok(part)
                } else {
                    part.contiguous()
                }
            };
            let (kc, vc) = (rows(&k, 0, seen).ctx(ctx)?, rows(&v, 0, seen).ctx(ctx)?); // [H, seen, P+R], [H, seen, V]
            let scores = rows(&q, c0, len).ctx(ctx)?.matmul(&kc.t().ctx(ctx)?).ctx(ctx)?; // [H, len, seen]
            let p = self.softmax(&scores, start + c0)?;
            outs.push(p.matmul(&vc).ctx(ctx)?); // [H, len, V]
        }
        Tensor::cat(&outs, 1).ctx(ctx) // [H, S, V]
    }

    /// Naive attention on the CPU kernels, `q_nope: [H, S, P]`, `q_pe: [H, S, R]`,
    /// `entries: [T, L+R]` -> `[H, S, V]`: every cached row's per-head keys and values in one
    /// product through kv_b, then the fused attention reading them (and the rotated keys in the
    /// cache rows) in place.
    fn attend_naive_cpu(
        &self,
        cpu: &Kvb,
        q_nope: &[f32],
        q_pe: &[f32],
        entries: &[f32],
        s: usize,
        start: usize,
    ) -> Result<Vec<f32>> {
        let row = self.latent + self.rope;
        let tokens = entries.len() / row;
        let span = profile::span("attention block/attention/decompression");
        let (head, width) = (self.nope + self.v, self.heads * (self.nope + self.v));
        // [H, T, P+V], head-major: one head's rows contiguous (at a stride of H·(P+V) floats, a
        // few KiB, they would share a few L1 sets); decompressed DECOMPRESS_ROWS cached rows
        // at a time, so that the product's [rows, H·(P+V)] output stays a bounded buffer
        let mut by_head = vec![0f32; tokens * width];
        let mut c_kv = Vec::with_capacity(DECOMPRESS_ROWS * self.latent);
        let mut kv = vec![0f32; DECOMPRESS_ROWS.min(tokens) * width];
        for t0 in (0..tokens).step_by(DECOMPRESS_ROWS) {
            let n = (tokens - t0).min(DECOMPRESS_ROWS);
            c_kv.clear();
            c_kv.extend(entries[t0 * row..(t0 + n) * row].chunks_exact(row).flat_map(|e| &e[..self.latent])); // [n, L]
            moeserve_cpu::matmul(cpu.kv(), &c_kv, n, &mut kv[..n * width]); // [n, H·(P+V)]
            for (h, dst) in by_head.chunks_exact_mut(tokens * head).enumerate() {
                for (d, src) in dst[t0 * head..(t0 + n) * head].chunks_exact_mut(head).zip(kv.chunks_exact(width)) {
                    d.copy_from_slice(&src[h * head..(h + 1) * head]);
                }
            }
        }
        drop(span);
        let _span = profile::span("attention block/attention/over the cache");
        let per_head = |offset, w| Rows { data: &by_head, offset, stride: head, head_step: tokens * head, width: w };
        let parts = [
            (q_nope, per_head(0, self.nope)),
            (q_pe, Rows { data: entries, offset: self.latent, stride: row, head_step: 0, width: self.rope }),
        ];
        let call = Attention {
            parts: &parts,
            values: per_head(self.nope, self.v),
            heads: self.heads,
            queries: s,
            tokens,
            start,
            scale: self.scale as f32,
            pages: None,
        };
        Ok(moeserve_cpu::attention(&call))
    }

    /// `scale · scores` + causal mask, softmax in f32, back to the compute dtype.
    fn softmax(&self, scores: &Tensor, start: usize) -> Result<Tensor> {
        let ctx = || "mla softmax".to_string();
        let dtype = scores.dtype();
        let (_, s, t) = scores.dims3().ctx(ctx)?;
        let mut x = (scores.to_dtype(DType::F32).ctx(ctx)? * self.scale).ctx(ctx)?;
        if s > 1 {
            x = x.broadcast_add(&causal_mask(s, t, start, scores.device())?).ctx(ctx)?;
        }
        candle_nn::ops::softmax_last_dim(&x).ctx(ctx)?.to_dtype(dtype).ctx(ctx)
    }
}

/// A tensor's values as f32, in order.
fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).ctx(|| "mla operands".into())
}

/// `[S, T]`: query i (position start + i) sees keys `0..=start + i`.
fn causal_mask(s: usize, t: usize, start: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..s).flat_map(|i| (0..t).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (s, t), device).ctx(|| "causal mask".into())
}
