//! One decoder block: `h += MLA(norm(h)); h += FFN(norm(h))`, FFN dense or MoE by config.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use moeserve_core::{error::Context, profile, DeepSeekConfig, Result};
use moeserve_quant::Weights;

use crate::batch::ForwardBatch;
use crate::cache::LatentKv;
use crate::mla::Mla;
use crate::mlp::Mlp;
use crate::moe::Moe;
use crate::norm::RmsNorm;
use crate::parallel::Parallel;
use crate::rope::RopeTables;

#[derive(Debug, Clone)]
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Mla,
    post_norm: RmsNorm,
    pub ffn: Ffn,
    par: Arc<Parallel>,
}

impl DecoderLayer {
    /// Weight bytes read per decoded token.
    pub fn active_bytes(&self) -> usize {
        self.attn.active_bytes()
            + match &self.ffn {
                Ffn::Dense(m) => m.resident_bytes(),
                Ffn::Moe(m) => m.active_bytes(),
            }
    }

    /// `w` points at `model.layers.L`; `router_dtype` only matters for MoE blocks; `par` says
    /// which part of the block this rank holds.
    pub fn load(w: &Weights, cfg: &DeepSeekConfig, moe: bool, router_dtype: DType, par: &Arc<Parallel>) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(DecoderLayer {
            input_norm: RmsNorm::load(&w.pp("input_layernorm"), d, cfg.rms_norm_eps)?,
            attn: Mla::load(&w.pp("self_attn"), cfg, par)?,
            post_norm: RmsNorm::load(&w.pp("post_attention_layernorm"), d, cfg.rms_norm_eps)?,
            ffn: if moe {
                Ffn::Moe(Moe::load(&w.pp("mlp"), cfg, router_dtype, par)?)
            } else {
                Ffn::Dense(Mlp::load_part(&w.pp("mlp"), d, cfg.intermediate_size, par.tp())?)
            },
            par: par.clone(),
        })
    }

    /// Sum the tensor-parallel partial outputs (attention's o_proj, the dense MLP's down).
    fn reduce_tp(&self, t: Tensor) -> Result<Tensor> {
        if self.par.tp().1 > 1 {
            self.par.all_reduce(&t)
        } else {
            Ok(t)
        }
    }

    /// `cache_layer` is this block's layer index inside the caches it is given.
    pub fn forward(
        &self,
        h: &Tensor,
        batch: &ForwardBatch,
        rope: &RopeTables,
        kv: &mut [&mut dyn LatentKv],
        cache_layer: usize,
    ) -> Result<Tensor> {
        let ctx = || format!("layer {cache_layer} residual");
        self.attn.fetch_first();
        let x = {
            let _p = profile::span("norms and residuals");
            self.input_norm.forward(h)?
        };
        let a = {
            let _p = profile::span("attention block");
            self.reduce_tp(self.attn.forward(&x, batch, rope, kv, cache_layer)?)?
        };
        match &self.ffn {
            Ffn::Dense(m) => m.fetch_first(),
            Ffn::Moe(m) => m.fetch_first(),
        }
        let _p = profile::span("norms and residuals");
        let h = (h + a).ctx(ctx)?;
        let x = self.post_norm.forward(&h)?;
        drop(_p);
        let f = {
            let _p = profile::span("ffn block");
            match &self.ffn {
                Ffn::Dense(m) => self.reduce_tp(m.forward(&x)?)?,
                Ffn::Moe(m) => m.forward(&x)?,
            }
        };
        let _p = profile::span("norms and residuals");
        (h + f).ctx(ctx)
    }
}
