//! MoE router, always in float32: logits, scores (sigmoid / softmax), the three selection
//! methods (greedy, V2 group_limited_greedy, V3 noaux_tc with the correction bias), weights.
//!
//! The bias of R1's router sits around +2; adding it in bf16 collapses nearby scores and picks
//! other experts, so both the logits and the biased scores stay in f32 here.

use candle_core::{DType, Tensor};
use moeserve_core::{error::Context, DeepSeekConfig, Result, ScoringFunc, TopkMethod};
use moeserve_quant::Weights;

#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub method: TopkMethod,
    pub scoring: ScoringFunc,
    pub norm_topk_prob: bool,
    pub scaling: f32,
    /// F32 (default). BF16 rounds logits, scores and biased scores to bf16 like a naive bf16
    /// router does; it exists to demonstrate (and test) why the router must stay in f32.
    pub dtype: DType,
}

impl RouterConfig {
    pub fn from_config(cfg: &DeepSeekConfig) -> Self {
        RouterConfig {
            n_experts: cfg.n_routed_experts.unwrap_or(0),
            top_k: cfg.num_experts_per_tok,
            n_group: cfg.n_group.max(1),
            topk_group: cfg.topk_group,
            method: cfg.topk_method,
            scoring: cfg.scoring_func,
            norm_topk_prob: cfg.norm_topk_prob,
            scaling: cfg.routed_scaling_factor as f32,
            dtype: DType::F32,
        }
    }
}

impl Router {
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            RouterWeight::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
            RouterWeight::Packed(p) => p.resident_bytes(),
        }
    }

    /// The CPU kernels' copy of the weight (none for a device tensor).
    pub fn packed(&self) -> Option<&moeserve_cpu::PackedMatrix> {
        match &self.weight {
            RouterWeight::Tensor(_) => None,
            RouterWeight::Packed(p) => Some(p),
        }
    }

    pub fn top_k(&self) -> usize {
        self.cfg.top_k
    }
}

#[derive(Debug, Clone)]
pub struct Router {
    cfg: RouterConfig,
    weight: RouterWeight,
    /// e_score_correction_bias, float32 (noaux_tc only)
    bias: Option<Vec<f32>>,
}

/// The router weight `[n_experts, hidden]` in float32, held once: a tensor on a device, the
/// kernels' matrix on the CPU (as bf16 where that holds the same values).
#[derive(Debug, Clone)]
enum RouterWeight {
    Tensor(Tensor),
    Packed(std::sync::Arc<moeserve_cpu::PackedMatrix>),
}

/// Selected experts and their weights, `top_k` per token, token-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Router {
    pub fn load(w: &Weights, cfg: &DeepSeekConfig, dtype: DType) -> Result<Self> {
        let rc = RouterConfig { dtype, ..RouterConfig::from_config(cfg) };
        let weight = w.tensor_as("weight", &[rc.n_experts, cfg.hidden_size], DType::F32)?;
        let bias = if rc.method == TopkMethod::NoauxTc {
            let b = w.tensor_as("e_score_correction_bias", &[rc.n_experts], DType::F32)?;
            Some(b.to_vec1::<f32>().ctx(|| w.name("e_score_correction_bias"))?)
        } else {
            None
        };
        let weight = if w.device.is_cpu() {
            let values = weight.flatten_all().and_then(|t| t.to_vec1::<f32>()).ctx(|| w.name("weight"))?;
            // bf16 when that is exact (a bf16 checkpoint's router): half the bytes, the same
            // weights; the products still sum in f32
            let format = if moeserve_cpu::bf16_exact(&values) { moeserve_cpu::Format::Bf16 } else { moeserve_cpu::Format::F32 };
            let p = moeserve_cpu::PackedMatrix::from_f32(format, rc.n_experts, cfg.hidden_size, &values)
                .map_err(|e| moeserve_core::Error::Input(format!("{}: {e}", w.name("weight"))))?;
            RouterWeight::Packed(std::sync::Arc::new(p))
        } else {
            RouterWeight::Tensor(weight)
        };
        Ok(Router { cfg: rc, weight, bias })
    }

    pub fn new(cfg: RouterConfig, weight: Tensor, bias: Option<Vec<f32>>) -> Self {
        Router { cfg, weight: RouterWeight::Tensor(weight), bias }
    }

    /// `x: [n, hidden]` in any dtype; logits are computed in f32.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let ctx = || format!("router {:?}", x.dims());
        let weight = match &self.weight {
            RouterWeight::Tensor(t) => t,
            RouterWeight::Packed(w) => {
                // the CPU: f32 logits from the kernels, on the pool
                let (xs, n) = moeserve_quant::packed::rows_f32(x, w.cols(), "router")?;
                let mut logits = vec![0f32; n * w.rows()];
                moeserve_cpu::matmul(w, &xs, n, &mut logits);
                // a prefill's tokens select their experts on every thread
                use rayon::prelude::*;
                let picks: Vec<_> = moeserve_core::profile::parallel(|| {
                    logits.par_chunks_exact(w.rows()).with_min_len(8).map(|row| self.select(row)).collect()
                });
                return Ok(self.routing(picks));
            }
        };
        let logits = x.to_dtype(DType::F32).ctx(ctx)?.matmul(&weight.t().ctx(ctx)?).ctx(ctx)?;
        if let Some((experts, weights)) = crate::device_ops::route(&self.cfg, &logits, self.bias.as_deref())? {
            return Ok(Routing { top_k: self.cfg.top_k, experts, weights });
        }
        let logits: Vec<Vec<f32>> = logits.to_vec2().ctx(ctx)?;
        Ok(self.route_rows(logits.iter().map(Vec::as_slice)))
    }

    /// The routing of every token's logits.
    fn route_rows<'a>(&self, rows: impl Iterator<Item = &'a [f32]>) -> Routing {
        self.routing(rows.map(|row| self.select(row)))
    }

    /// Every token's selection ([`Self::select`]) in one routing.
    fn routing(&self, picks: impl IntoIterator<Item = (Vec<usize>, Vec<f32>)>) -> Routing {
        let mut routing = Routing { top_k: self.cfg.top_k, experts: Vec::new(), weights: Vec::new() };
        for (e, w) in picks {
            routing.experts.extend(e.iter().map(|&i| i as u32));
            routing.weights.extend(w);
        }
        routing
    }

    /// Experts and weights for one token's router logits.
    pub fn select(&self, logits: &[f32]) -> (Vec<usize>, Vec<f32>) {
        let c = &self.cfg;
        let round = |x: f32| if c.dtype == DType::BF16 { half::bf16::from_f32(x).to_f32() } else { x };
        let logits: Vec<f32> = logits.iter().map(|&l| round(l)).collect();
        let scores: Vec<f32> = match c.scoring {
            ScoringFunc::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
            ScoringFunc::Softmax => {
                let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = logits.iter().map(|&l| (l - m).exp()).collect();
                let s: f32 = e.iter().sum();
                e.iter().map(|v| v / s).collect()
            }
        };
        let scores: Vec<f32> = scores.into_iter().map(round).collect();
        let per_group = c.n_experts / c.n_group;
        let choice: Vec<f32> = match c.method {
            TopkMethod::Greedy => scores.clone(),
            TopkMethod::GroupLimitedGreedy => {
                // group score = its best expert; other groups' scores become 0 (as HF / DeepSeek-V2)
                let gs: Vec<f32> =
                    scores.chunks(per_group).map(|g| g.iter().cloned().fold(f32::NEG_INFINITY, f32::max)).collect();
                let keep = top_indices(&gs, c.topk_group);
                mask_groups(&scores, &keep, per_group, 0.0)
            }
            TopkMethod::NoauxTc => {
                let biased: Vec<f32> = match &self.bias {
                    Some(b) => scores.iter().zip(b).map(|(s, b)| round(s + b)).collect(),
                    None => scores.clone(),
                };
                // group score = sum of its two best biased scores; other groups masked with -inf
                let gs: Vec<f32> = biased.chunks(per_group).map(|g| top_indices(g, 2).iter().map(|&i| g[i]).sum()).collect();
                let keep = top_indices(&gs, c.topk_group);
                mask_groups(&biased, &keep, per_group, f32::NEG_INFINITY)
            }
        };
        let experts = top_indices(&choice, c.top_k);
        // weights come from the unbiased scores
        let mut weights: Vec<f32> = experts.iter().map(|&e| scores[e]).collect();
        if c.norm_topk_prob && c.top_k > 1 {
            let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        weights.iter_mut().for_each(|w| *w *= c.scaling);
        (experts, weights)
    }
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn mask_groups(v: &[f32], keep: &[usize], per_group: usize, fill: f32) -> Vec<f32> {
    v.iter().enumerate().map(|(i, &x)| if keep.contains(&(i / per_group)) { x } else { fill }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn router(method: TopkMethod, scoring: ScoringFunc, bias: Option<Vec<f32>>, top_k: usize) -> Router {
        let cfg = RouterConfig {
            n_experts: 8,
            top_k,
            n_group: 4,
            topk_group: 2,
            method,
            scoring,
            norm_topk_prob: true,
            scaling: 2.5,
            dtype: DType::F32,
        };
        Router::new(cfg, Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap(), bias)
    }

    #[test]
    fn noaux_tc_selects_by_biased_score_and_weights_by_unbiased() {
        // expert 7 has the lowest logit but a large bias: it must be selected,
        // and its weight must come from its own (small) sigmoid score
        let bias = vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0];
        let r = router(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, Some(bias), 2);
        let logits = [3.0, 2.9, 0.1, 0.2, 0.3, 0.4, 0.5, -3.0];
        let (e, w) = r.select(&logits);
        assert_eq!(e, vec![7, 0]);
        let s = |l: f32| 1.0 / (1.0 + (-l).exp());
        let sum = s(-3.0) + s(3.0);
        assert!((w[0] - 2.5 * s(-3.0) / sum).abs() < 1e-6);
        assert!((w.iter().sum::<f32>() - 2.5).abs() < 1e-5);
    }

    #[test]
    fn group_limit_excludes_experts_outside_the_best_groups() {
        let r = router(TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, None, 3);
        // groups {0,1} {2,3} {4,5} {6,7}: the best single scores are in groups 0 and 1
        let logits = [5.0, -5.0, 4.8, -5.0, 4.7, 4.6, -6.0, -6.0];
        let (e, w) = r.select(&logits);
        assert_eq!(e, vec![0, 2, 1]);
        let greedy = router(TopkMethod::Greedy, ScoringFunc::Softmax, None, 3);
        assert_eq!(greedy.select(&logits).0, vec![0, 2, 4]);
        // noaux_tc ranks groups by their top-2 sum instead: groups 2 and 0
        let tc = router(TopkMethod::NoauxTc, ScoringFunc::Softmax, Some(vec![0.0; 8]), 3);
        assert_eq!(tc.select(&logits).0, vec![0, 4, 5]);
        assert!(w.iter().all(|&x| x > 0.0));
    }

    #[test]
    fn noaux_tc_group_score_is_the_top2_sum() {
        let r = router(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, Some(vec![0.0; 8]), 2);
        // group 0 has the single best expert but group 1 and 2 have better pairs
        let logits = [6.0, -6.0, 2.0, 2.0, 1.5, 1.5, -6.0, -6.0];
        let (e, _) = r.select(&logits);
        assert_eq!(e, vec![2, 3]);
    }
}
