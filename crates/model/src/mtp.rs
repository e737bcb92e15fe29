//! The MTP (next-n) module stored as `model.layers.{num_hidden_layers}`: for row i it combines
//! the embedding of token t_{i+1} with the main model's post-norm hidden h_i and predicts t_{i+2}.
//!
//! `x = eh_proj([enorm(emb(t_{i+1})), hnorm(h_i)])` (embedding first), then a full MoE decoder
//! block with its own one-layer latent cache at rope position i, then `shared_head.norm` and
//! `shared_head.head`. The embedding is the main model's (the checkpoint's layer copy is identical).

use std::sync::Arc;

use candle_core::{DType, Tensor};
use moeserve_core::{error::Context, DeepSeekConfig, Error, KvLayout, Result};
use moeserve_quant::{Linear, Slice, Weights};

use crate::batch::ForwardBatch;
use crate::cache::{ContiguousLatentCache, LatentKv};
use crate::layer::DecoderLayer;
use crate::model::{vocab_part, DeepSeekModel};
use crate::norm::RmsNorm;
use crate::parallel::Parallel;

#[derive(Debug)]
pub struct Mtp {
    enorm: RmsNorm,
    hnorm: RmsNorm,
    eh_proj: Arc<dyn Linear>,
    block: DecoderLayer,
    head_norm: RmsNorm,
    /// Vocab-parallel like lm_head.
    head: Arc<dyn Linear>,
    par: Arc<Parallel>,
}

impl Mtp {
    /// `w` points at `model.layers.{num_hidden_layers}`.
    /// Under parallelism the block is split like the main layers, the head like lm_head, and
    /// eh_proj is replicated.
    pub fn load(w: &Weights, cfg: &DeepSeekConfig, router_dtype: DType, par: &Arc<Parallel>) -> Result<Self> {
        let (d, eps, v) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.vocab_size);
        Ok(Mtp {
            enorm: RmsNorm::load(&w.pp("enorm"), d, eps)?,
            hnorm: RmsNorm::load(&w.pp("hnorm"), d, eps)?,
            eh_proj: w.linear("eh_proj", 2 * d, d)?,
            block: DecoderLayer::load(w, cfg, cfg.n_routed_experts.is_some(), router_dtype, par)?,
            head_norm: RmsNorm::load(&w.pp("shared_head").pp("norm"), d, eps)?,
            head: w.pp("shared_head").linear_part("head", d, v, &Slice::rows(vocab_part(v, par)))?,
            par: par.clone(),
        })
    }

    /// The MTP layer keeps its own single-layer latent cache.
    pub fn kv_layout(cfg: &DeepSeekConfig) -> KvLayout {
        KvLayout { num_layers: 1, ..cfg.kv_layout() }
    }

    pub fn new_cache(model: &DeepSeekModel) -> ContiguousLatentCache {
        ContiguousLatentCache::new(Self::kv_layout(&model.cfg), model.dtype(), model.device().clone())
    }

    /// `batch.tokens` are the next tokens t_{i+1}; `hidden: [n, hidden]` the main model's
    /// post-norm hidden h_i at the same positions. Returns the block output `[n, hidden]`.
    pub fn forward(
        &self,
        model: &DeepSeekModel,
        batch: &ForwardBatch,
        hidden: &Tensor,
        kv: &mut [&mut dyn LatentKv],
    ) -> Result<Tensor> {
        model.check_batch(batch, kv)?;
        if hidden.dims() != [batch.tokens.len(), model.cfg.hidden_size] {
            return Err(Error::Input(format!("mtp hidden {:?} for {} tokens", hidden.dims(), batch.tokens.len())));
        }
        let ctx = || "mtp input".to_string();
        let e = self.enorm.forward(&model.embed(&batch.tokens)?)?;
        let h = self.hnorm.forward(&hidden.to_dtype(model.dtype()).ctx(ctx)?)?;
        let x = self.eh_proj.forward(&Tensor::cat(&[&e, &h], 1).ctx(ctx)?)?;
        let rope = model.rope().tables(&batch.positions(), model.device())?;
        let y = self.block.forward(&x, batch, &rope, kv, 0)?;
        for (c, cache) in batch.chunks.iter().zip(kv.iter_mut()) {
            cache.set_seq_len(c.start_pos + c.len)?;
        }
        Ok(y)
    }

    /// Float32 draft logits `[n, vocab]` from the block output.
    pub fn logits(&self, y: &Tensor) -> Result<Tensor> {
        self.head_logits(&self.norm(y)?)
    }

    /// `shared_head.norm` of the block output: the head's input, and the hidden that recursive
    /// drafting feeds back as the next row's h (as SGLang does).
    pub fn norm(&self, y: &Tensor) -> Result<Tensor> {
        self.head_norm.forward(y)
    }

    /// Float32 logits `[n, vocab]` from normed rows (see `norm`).
    pub fn head_logits(&self, normed: &Tensor) -> Result<Tensor> {
        let local = self.head.forward(normed)?.to_dtype(DType::F32).ctx(|| "mtp logits".into())?;
        self.par.gather_columns(&local)
    }
}
