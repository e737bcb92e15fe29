//! MoE block: float32 router, grouped routed experts (one matmul per active expert over all the
//! tokens routed to it), shared experts; expert outputs accumulate in float32.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use moeserve_core::{error::Context, profile, DeepSeekConfig, Result};
use moeserve_cpu::{Activations, Format, PackedMatrix};
use moeserve_quant::Weights;
use rayon::prelude::*;

mod dispatch;

use crate::mlp::Mlp;
use crate::parallel::Parallel;
use crate::router::{Router, Routing};

#[derive(Debug, Clone)]
pub struct Moe {
    router: Router,
    /// The routed experts this rank holds (all of them on one rank): global ids `first..`.
    experts: Vec<Mlp>,
    first: usize,
    n_experts: usize,
    shared: Option<Mlp>,
    par: Arc<Parallel>,
}

/// Gate, up and down weights of one expert, the rows of the input it takes, and the weight of
/// its output in each row's sum.
type Group<'a> = ([&'a PackedMatrix; 3], Vec<usize>, Vec<f32>);

impl Moe {
    /// `w` points at `model.layers.L.mlp`. A rank loads only the experts of its expert group,
    /// each only in its part (see `parallel`), and its tensor-parallel part of the shared experts.
    pub fn load(w: &Weights, cfg: &DeepSeekConfig, router_dtype: DType, par: &Arc<Parallel>) -> Result<Self> {
        let n = cfg.n_routed_experts.unwrap_or(0);
        let router = Router::load(&w.pp("gate"), cfg, router_dtype)?;
        let owned = Parallel::split(n, par.ep(), "n_routed_experts")?;
        let experts = owned
            .clone()
            .map(|e| Mlp::load_part(&w.pp("experts").pp(e), cfg.hidden_size, cfg.moe_intermediate_size, par.moe_tp()))
            .collect::<Result<Vec<_>>>()?;
        let shared = (cfg.n_shared_experts > 0)
            .then(|| {
                let inter = cfg.moe_intermediate_size * cfg.n_shared_experts;
                Mlp::load_part(&w.pp("shared_experts"), cfg.hidden_size, inter, par.tp())
            })
            .transpose()?;
        Ok(Moe { router, experts, first: owned.start, n_experts: n, shared, par: par.clone() })
    }

    /// Routed experts held by this rank (global ids).
    pub fn held_experts(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.experts.len()
    }

    /// Weight bytes read per token: the router, `top_k` experts of average size, the shared experts.
    pub fn active_bytes(&self) -> usize {
        let experts: usize = self.experts.iter().map(Mlp::resident_bytes).sum();
        let per = experts / self.experts.len().max(1);
        self.router.weight_bytes() + per * self.router.top_k() + self.shared.as_ref().map_or(0, Mlp::resident_bytes)
    }

    /// The weights read first whatever the routing (the router's, the shared experts' gate and
    /// up), for the waiting threads to fetch ahead (`moeserve_cpu::prefetch`).
    pub fn fetch_first(&self) {
        let shared = self.shared.as_ref().and_then(Mlp::packed);
        moeserve_cpu::prefetch::next(self.router.packed().into_iter().chain(shared.into_iter().flat_map(|[g, u, _]| [g, u])));
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// `x: [n, hidden]` -> `[n, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.par.world() > 1 {
            return self.forward_parallel(x)?.to_dtype(x.dtype()).ctx(|| "moe out".into());
        }
        let routing = {
            let _p = profile::span("ffn block/router");
            self.router.route(x)?
        };
        let _p = profile::span("ffn block/experts");
        if let Some(out) = self.grouped_forward(x, &routing)? {
            return out.to_dtype(x.dtype()).ctx(|| "moe out".into());
        }
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

impl Moe {
    /// The CPU kernels' path: the gate and up projections of every active expert and the shared
    /// experts in one parallel call, SiLU·mul, then every down projection in a second call; the
    /// weighted sum in f32. `None` when the experts are not resident in a kernel format.
    pub fn grouped_forward(&self, x: &Tensor, routing: &Routing) -> Result<Option<Tensor>> {
        let Some(shared) = self.shared.as_ref().map_or(Some(None), |s| s.packed().map(Some)) else { return Ok(None) };
        let experts: Option<Vec<_>> = self.experts.iter().map(Mlp::packed).collect();
        let Some(experts) = experts else { return Ok(None) };
        let ctx = || format!("grouped moe {:?}", x.dims());
        let (n, hidden) = x.dims2().ctx(ctx)?;
        let (xs, _) = moeserve_quant::packed::rows_f32(x, hidden, "moe")?;
        // (weights, token rows, routing weight per row); the shared experts take every token at weight 1
        let mut groups: Vec<Group> = Vec::new();
        let mut slot_of = vec![usize::MAX; experts.len()];
        for (slot, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            let e = e as usize;
            if slot_of[e] == usize::MAX {
                slot_of[e] = groups.len();
                groups.push((experts[e], Vec::new(), Vec::new()));
            }
            let g = &mut groups[slot_of[e]];
            g.1.push(slot / routing.top_k);
            g.2.push(w);
        }
        if let Some(s) = shared {
            groups.push((s, (0..n).collect(), vec![1.0; n]));
        }
        moeserve_cpu::prefetch::next(groups.iter().flat_map(|g| [g.0[0], g.0[1]]));
        let out = run_groups(&groups, &xs, n, hidden)?;
        Ok(Some(Tensor::from_vec(out, (n, hidden), x.device()).ctx(ctx)?))
    }
}

/// Values of the buffer [`run_groups`] keeps for its products' outputs between calls, instead of
/// zeroing fresh ones each layer (16 MiB: about 40 tokens a step at DeepSeek-R1's shape, 1000 at
/// bench-small's); larger calls (prefill) allocate theirs, as does a call that finds it in use
/// (a concurrent rank's).
const SCRATCH_VALUES: usize = 4 << 20;
static SCRATCH: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());

/// `buf` cut into consecutive slices of `lens`.
fn carve(mut buf: &mut [f32], lens: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    lens.map(|n| {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(n);
        buf = rest;
        head
    })
    .collect()
}

/// Rows of a step's expert groups from which [`run_groups`] prepares the downs' activations on
/// the pool's threads.
const PARALLEL_PREP_ROWS: usize = 16;

/// `Σ_g w_g[i] · FFN_g(xs[rows_g[i]])` into row `rows_g[i]` of an `[n, hidden]` f32 output: the
/// gate and up projections of every group in one parallel kernel call, SiLU·mul, then every down
/// projection in a second call.
fn run_groups(groups: &[Group], xs: &[f32], n: usize, hidden: usize) -> Result<Vec<f32>> {
    // x's activations prepared once per weight format (each token quantized once, not once per
    // expert it goes to), and each group's rows gathered from them unless it takes every row (a
    // decode step's experts all take its one token), the groups in parallel; gate and up share
    // theirs when they share a format
    let mut bases: Vec<(Format, usize, Activations)> = Vec::new(); // format, columns, x's activations
                                                                   // each group's gate and up: the index of x's activations in their format
    let base_of: Vec<[usize; 2]> = groups
        .iter()
        .map(|(w, _, _)| {
            [w[0], w[1]].map(|m| match bases.iter().position(|b| b.0 == m.format() && b.1 == m.cols()) {
                Some(b) => b,
                None => {
                    bases.push((m.format(), m.cols(), moeserve_cpu::activations(m, xs, n)));
                    bases.len() - 1
                }
            })
        })
        .collect();
    // up takes gate's activations where they are the same ones
    let shared = |i: usize| base_of[i][0] == base_of[i][1];
    // each group's gate and up activations gathered from x's, `None` where they are x's as they
    // are (every row) or up takes gate's
    let every = |rows: &[usize]| rows.len() == n && rows.iter().enumerate().all(|(i, &r)| i == r);
    let picked: Vec<[Option<Activations>; 2]> = if groups.iter().all(|g| every(&g.1)) {
        groups.iter().map(|_| [None, None]).collect()
    } else {
        moeserve_cpu::pool::map_indices(groups.len(), |i| {
            let rows = &groups[i].1;
            let gathered = |k: usize| (!every(rows)).then(|| bases[base_of[i][k]].2.gather(rows));
            [gathered(0), if shared(i) { None } else { gathered(1) }]
        })
    };
    let acts_of = |i: usize, k: usize| -> &Activations {
        let k = if k == 1 && shared(i) { 0 } else { k };
        picked[i][k].as_ref().unwrap_or(&bases[base_of[i][k]].2)
    };
    // the products' outputs in one reused buffer (they write every value)
    let lens = |k: usize| groups.iter().map(move |(w, rows, _)| rows.len() * w[k].rows());
    let total: usize = (0..3).flat_map(lens).sum();
    let mut kept = (total <= SCRATCH_VALUES).then(|| SCRATCH.try_lock().ok()).flatten();
    let mut fresh = Vec::new();
    let buf: &mut Vec<f32> = kept.as_deref_mut().unwrap_or(&mut fresh);
    if buf.len() < total {
        buf.resize(total, 0.0);
    }
    let (gate_buf, rest) = buf.split_at_mut(lens(0).sum());
    let (up_buf, down_buf) = rest.split_at_mut(lens(1).sum());
    let mut gate = carve(gate_buf, lens(0));
    let mut up = carve(up_buf, lens(1));
    let mut down = carve(down_buf, lens(2));
    {
        let _p = profile::span("ffn block/experts/gate and up products");
        let mut products = Vec::with_capacity(2 * groups.len());
        for (i, (((w, _, _), g), u)) in groups.iter().zip(gate.iter_mut()).zip(up.iter_mut()).enumerate() {
            products.push(moeserve_cpu::Product { w: w[0], x: acts_of(i, 0), y: g });
            products.push(moeserve_cpu::Product { w: w[1], x: acts_of(i, 1), y: u });
        }
        moeserve_cpu::matmul_many(&mut products);
    }
    moeserve_cpu::prefetch::next(groups.iter().map(|g| g.0[2]));
    // SiLU(gate)·up and the downs' activations, the groups in parallel where they hold many
    // rows (bench-small q4_K, 16 sequences: steps 2-3 % faster; a single sequence's 7 rows are
    // faster on one thread)
    let down_act = |((g, u), (w, rows, _)): ((&mut &mut [f32], &&mut [f32]), &Group)| {
        moeserve_cpu::silu_mul(g, u);
        moeserve_cpu::activations(w[2], g, rows.len())
    };
    let down_acts: Vec<Activations> = if groups.iter().map(|g| g.1.len()).sum::<usize>() >= PARALLEL_PREP_ROWS {
        moeserve_cpu::pool::parallel(|| gate.par_iter_mut().zip(up.par_iter()).zip(groups.par_iter()).map(down_act).collect())
    } else {
        gate.iter_mut().zip(up.iter()).zip(groups).map(down_act).collect()
    };
    drop(up);
    let mut products: Vec<_> = groups
        .iter()
        .zip(&down_acts)
        .zip(down.iter_mut())
        .map(|(((w, _, _), a), y)| moeserve_cpu::Product { w: w[2], x: a, y })
        .collect();
    let p = profile::span("ffn block/experts/down products");
    moeserve_cpu::matmul_many(&mut products);
    drop(p);
    let mut out = vec![0f32; n * hidden];
    for ((_, rows, ws), y) in groups.iter().zip(&down) {
        for ((&t, &w), yr) in rows.iter().zip(ws).zip(y.chunks_exact(hidden)) {
            for (o, v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(yr) {
                *o += w * v;
            }
        }
    }
    Ok(out)
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
        let moe = Moe::load(&w.pp("model.layers.1.mlp"), &cfg, DType::F32, &Arc::default()).unwrap();
        // ragged token counts, including one token and more tokens than experts
        for n in [1, 5, 13, 37] {
            let x = Tensor::randn(0f32, 1.0, (n, cfg.hidden_size), &Device::Cpu).unwrap();
            let routing = moe.router().route(&x).unwrap();
            let fast: Vec<f32> = moe.experts_forward(&x, &routing).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let slow: Vec<f32> = experts_forward_reference(&moe, &x, &routing).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let num: f32 = fast.iter().zip(&slow).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            let den: f32 = slow.iter().map(|b| b * b).sum::<f32>().sqrt();
            assert!(den > 0.0 && num / den < 1e-5, "{n} tokens: relative error {}", num / den);
            // the kernels' grouped call (routed and shared experts at once) against the reference
            let shared = moe.shared.as_ref().unwrap().forward(&x).unwrap();
            let want: Vec<f32> = (experts_forward_reference(&moe, &x, &routing).unwrap() + shared)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f32> =
                moe.grouped_forward(&x, &routing).unwrap().expect("packed experts").flatten_all().unwrap().to_vec1().unwrap();
            let num: f32 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            let den: f32 = want.iter().map(|b| b * b).sum::<f32>().sqrt();
            assert!(num / den < 1e-5, "grouped, {n} tokens: relative error {}", num / den);
        }
    }
}
