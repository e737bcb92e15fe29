//! MoE block: float32 router, grouped routed experts (one matmul per active expert over all the
//! tokens routed to it), shared experts; expert outputs accumulate in float32.

use candle_core::{DType, Tensor};
use moeserve_core::{error::Context, DeepSeekConfig, Result};
use moeserve_quant::Weights;

use crate::mlp::Mlp;
use crate::router::{Router, Routing};

#[derive(Debug, Clone)]
pub struct Moe {
    router: Router,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
}

impl Moe {
    /// `w` points at `model.layers.L.mlp`.
    pub fn load(w: &Weights, cfg: &DeepSeekConfig, router_dtype: DType) -> Result<Self> {
        let n = cfg.n_routed_experts.unwrap_or(0);
        let router = Router::load(&w.pp("gate"), cfg, router_dtype)?;
        let experts = (0..n)
            .map(|e| Mlp::load(&w.pp("experts").pp(e), cfg.hidden_size, cfg.moe_intermediate_size))
            .collect::<Result<Vec<_>>>()?;
        let shared = (cfg.n_shared_experts > 0)
            .then(|| Mlp::load(&w.pp("shared_experts"), cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts))
            .transpose()?;
        Ok(Moe { router, experts, shared })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// `x: [n, hidden]` -> `[n, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let routing = self.router.route(x)?;
        let routed = self.experts_forward(x, &routing)?;
        let out = match &self.shared {
            Some(s) => (routed + s.forward(x)?.to_dtype(DType::F32).ctx(|| "shared".into())?).ctx(|| "moe add".into())?,
            None => routed,
        };
        out.to_dtype(x.dtype()).ctx(|| "moe out".into())
    }

    /// Σ_e w_e · FFN_e(x) in f32, grouped by expert.
    pub fn experts_forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let ctx = || format!("moe experts {:?}", x.dims());
        let (n, hidden) = x.dims2().ctx(ctx)?;
        let device = x.device();
        // per expert: token indices and their routing weights
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut weights: Vec<Vec<f32>> = vec![Vec::new(); self.experts.len()];
        for (slot, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            tokens[e as usize].push((slot / routing.top_k) as u32);
            weights[e as usize].push(w);
        }
        let mut all_idx = Vec::with_capacity(n * routing.top_k);
        let mut outs = Vec::new();
        for (e, expert) in self.experts.iter().enumerate() {
            if tokens[e].is_empty() {
                continue;
            }
            let cnt = tokens[e].len();
            let idx = Tensor::from_slice(&tokens[e], cnt, device).ctx(ctx)?;
            let xs = if cnt == n && tokens[e].iter().enumerate().all(|(i, &t)| t as usize == i) {
                x.clone()
            } else {
                x.index_select(&idx, 0).ctx(ctx)?
            };
            let y = expert.forward(&xs)?.to_dtype(DType::F32).ctx(ctx)?; // [cnt, hidden]
            let w = Tensor::from_slice(&weights[e], (cnt, 1), device).ctx(ctx)?;
            outs.push(y.broadcast_mul(&w).ctx(ctx)?);
            all_idx.extend_from_slice(&tokens[e]);
        }
        let zeros = Tensor::zeros((n, hidden), DType::F32, device).ctx(ctx)?;
        if outs.is_empty() {
            return Ok(zeros);
        }
        let idx = Tensor::from_vec(all_idx, outs.iter().map(|o| o.dims()[0]).sum::<usize>(), device).ctx(ctx)?;
        let src = Tensor::cat(&outs, 0).ctx(ctx)?;
        zeros.index_add(&idx, &src, 0).ctx(ctx)
    }
}

/// Reference implementation of the routed sum: a plain per-token loop (for tests).
pub fn experts_forward_reference(moe: &Moe, x: &Tensor, routing: &Routing) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    let mut rows = Vec::with_capacity(n);
    for t in 0..n {
        let xt = x.narrow(0, t, 1)?;
        let mut acc: Option<Tensor> = None;
        for k in 0..routing.top_k {
            let e = routing.experts[t * routing.top_k + k] as usize;
            let w = routing.weights[t * routing.top_k + k] as f64;
            let y = (moe.experts[e].forward(&xt)?.to_dtype(DType::F32)? * w)?;
            acc = Some(match acc {
                Some(a) => (a + y)?,
                None => y,
            });
        }
        rows.push(acc.unwrap_or(Tensor::zeros((1, x.dims()[1]), DType::F32, x.device())?));
    }
    Ok(Tensor::cat(&rows, 0)?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::Device;
    use moeserve_quant::Checkpoint;

    use super::*;

    #[test]
    fn grouped_experts_match_the_per_token_reference() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v3");
        let cfg = DeepSeekConfig::from_file(&dir.join("config.json")).unwrap();
        let w = Weights::new(Arc::new(Checkpoint::open(&dir).unwrap()), DType::F32, Device::Cpu, None);
        let moe = Moe::load(&w.pp("model.layers.1.mlp"), &cfg, DType::F32).unwrap();
        // ragged token counts, including one token and more tokens than experts
        for n in [1, 5, 13, 37] {
            let x = Tensor::randn(0f32, 1.0, (n, cfg.hidden_size), &Device::Cpu).unwrap();
            let routing = moe.router().route(&x).unwrap();
            let fast: Vec<f32> = moe.experts_forward(&x, &routing).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let slow: Vec<f32> = experts_forward_reference(&moe, &x, &routing).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let num: f32 = fast.iter().zip(&slow).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            let den: f32 = slow.iter().map(|b| b * b).sum::<f32>().sqrt();
            assert!(den > 0.0 && num / den < 1e-5, "{n} tokens: relative error {}", num / den);
        }
    }
}
