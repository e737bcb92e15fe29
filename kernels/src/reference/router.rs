//! Reference of `router.cu`: the model's `Router::select` (f32), as plain data in and out.

/// `scoring`: sigmoid / softmax; `method`: greedy, group_limited_greedy, noaux_tc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    Sigmoid = 0,
    Softmax = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Greedy = 0,
    GroupLimitedGreedy = 1,
    NoauxTc = 2,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteConfig {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub scoring: Scoring,
    pub method: Method,
    pub norm_topk_prob: bool,
    pub scaling: f32,
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Experts and weights for one token's logits (`bias`: e_score_correction_bias, noaux_tc only).
pub fn route(c: &RouteConfig, logits: &[f32], bias: Option<&[f32]>) -> (Vec<u32>, Vec<f32>) {
    let scores: Vec<f32> = match c.scoring {
        Scoring::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
        Scoring::Softmax => {
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = logits.iter().map(|&l| (l - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        }
    };
    let per_group = c.n_experts / c.n_group.max(1);
    let keep_groups = |gs: &[f32]| top_indices(gs, c.topk_group);
    let choice: Vec<f32> = match c.method {
        Method::Greedy => scores.clone(),
        Method::GroupLimitedGreedy => {
            let gs: Vec<f32> = scores.chunks(per_group).map(|g| g.iter().cloned().fold(f32::NEG_INFINITY, f32::max)).collect();
            let keep = keep_groups(&gs);
            scores.iter().enumerate().map(|(i, &s)| if keep.contains(&(i / per_group)) { s } else { 0.0 }).collect()
        }
        Method::NoauxTc => {
            let biased: Vec<f32> = match bias {
                Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => scores.clone(),
            };
            let gs: Vec<f32> = biased.chunks(per_group).map(|g| top_indices(g, 2).iter().map(|&i| g[i]).sum()).collect();
            let keep = keep_groups(&gs);
            biased.iter().enumerate().map(|(i, &s)| if keep.contains(&(i / per_group)) { s } else { f32::NEG_INFINITY }).collect()
        }
    };
    let experts = top_indices(&choice, c.top_k);
    let mut weights: Vec<f32> = experts.iter().map(|&e| scores[e]).collect();
    if c.norm_topk_prob && c.top_k > 1 {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= sum);
    }
    weights.iter_mut().for_each(|w| *w *= c.scaling);
    (experts.into_iter().map(|e| e as u32).collect(), weights)
}

/// Token-major experts `[n, top_k]` and weights for `logits: [n, n_experts]`.
pub fn route_batch(c: &RouteConfig, logits: &[f32], bias: Option<&[f32]>) -> (Vec<u32>, Vec<f32>) {
    let (mut e, mut w) = (Vec::new(), Vec::new());
    for row in logits.chunks_exact(c.n_experts) {
        let (re, rw) = route(c, row, bias);
        e.extend(re);
        w.extend(rw);
    }
    (e, w)
}
