//! Expert-parallel MoE: every rank routes its share of the tokens, sends each token once to
//! every rank that holds (a part of) one of its experts, those ranks run their experts over what
//! they received, and send the weighted sums back (all-to-all dispatch and combine). The shared
//! experts run beside them, and one all-reduce gives every rank the whole output.

use candle_core::{DType, Tensor};
use moeserve_core::comm::part_range;
use moeserve_core::{error::Context, Error, Result};

use super::{run_groups, Group, Moe};

/// One token's entry in a dispatch message: `[token, count, (expert, weight) × count, row]`.
struct Entry {
    token: usize,
    experts: Vec<(usize, f32)>,
    /// Offset of the token's hidden row inside the message.
    row: usize,
}

fn bits(v: usize) -> f32 {
    f32::from_bits(v as u32)
}

fn parse(msg: &[f32], hidden: usize) -> Result<Vec<Entry>> {
    let bad = || Error::Input(format!("malformed expert dispatch message of {} values", msg.len()));
    let mut entries = Vec::new();
    let mut at = 0;
    while at < msg.len() {
        let head = msg.get(at..at + 2).ok_or_else(bad)?;
        let (token, count) = (head[0].to_bits() as usize, head[1].to_bits() as usize);
        let pairs = msg.get(at + 2..at + 2 + 2 * count).ok_or_else(bad)?;
        let experts = pairs.chunks_exact(2).map(|p| (p[0].to_bits() as usize, p[1])).collect();
        let row = at + 2 + 2 * count;
        if row + hidden > msg.len() {
            return Err(bad());
        }
        entries.push(Entry { token, experts, row });
        at = row + hidden;
    }
    Ok(entries)
}

impl Moe {
    /// `x: [n, hidden]`, the same on every rank -> `[n, hidden]` f32, the same on every rank.
    pub(crate) fn forward_parallel(&self, x: &Tensor) -> Result<Tensor> {
        let ctx = || format!("expert-parallel moe {:?}", x.dims());
        let (world, rank) = (self.par.world(), self.par.rank());
        let (n, hidden) = x.dims2().ctx(ctx)?;
        let (xs, _) = moeserve_quant::packed::rows_f32(x, hidden, "moe")?;
        let own = part_range(n, world, rank);

        // dispatch: this rank's tokens to the ranks of their experts, once per rank
        let mut send: Vec<Vec<f32>> = vec![Vec::new(); world];
        if !own.is_empty() {
            let routing = self.router.route(&x.narrow(0, own.start, own.len()).ctx(ctx)?)?;
            for (i, t) in own.clone().enumerate() {
                let picks = &routing.experts[i * routing.top_k..(i + 1) * routing.top_k];
                let weights = &routing.weights[i * routing.top_k..(i + 1) * routing.top_k];
                for (dst, msg) in send.iter_mut().enumerate() {
                    let mine: Vec<(usize, f32)> = picks
                        .iter()
                        .zip(weights)
                        .map(|(&e, &w)| (e as usize, w))
                        .filter(|&(e, _)| self.par.expert_ranks(e, self.n_experts).contains(&dst))
                        .collect();
                    if mine.is_empty() {
                        continue;
                    }
                    msg.extend([bits(t), bits(mine.len())]);
                    mine.iter().for_each(|&(e, w)| msg.extend([bits(e), w]));
                    msg.extend_from_slice(&xs[t * hidden..(t + 1) * hidden]);
                }
            }
        }
        let sent: Vec<Vec<Entry>> = send.iter().map(|m| parse(m, hidden)).collect::<Result<_>>()?;
        let recv = self.par.comm().all_to_all(send)?;

        // this rank's experts over every token it received
        let entries: Vec<Vec<Entry>> = recv.iter().map(|m| parse(m, hidden)).collect::<Result<_>>()?;
        let rows: Vec<(usize, &Entry)> =
            entries.iter().enumerate().flat_map(|(src, es)| es.iter().map(move |e| (src, e))).collect();
        let mut inputs = Vec::with_capacity(rows.len() * hidden);
        for (src, e) in &rows {
            inputs.extend_from_slice(&recv[*src][e.row..e.row + hidden]);
        }
        let assigned: Vec<(usize, usize, f32)> =
            rows.iter().enumerate().flat_map(|(r, (_, e))| e.experts.iter().map(move |&(ex, w)| (r, ex, w))).collect();
        let y = self.local_experts(&inputs, rows.len(), hidden, &assigned, x)?;

        // combine: each row's weighted sum back to the rank that sent it, in the order received
        let mut back: Vec<Vec<f32>> = vec![Vec::new(); world];
        for ((src, _), yr) in rows.iter().zip(y.chunks_exact(hidden)) {
            back[*src].extend_from_slice(yr);
        }
        let returned = self.par.comm().all_to_all(back)?;
        let mut out = vec![0f32; n * hidden];
        for (entries, ys) in sent.iter().zip(&returned) {
            if ys.len() != entries.len() * hidden {
                return Err(Error::Input(format!("expert combine: {} values for {} tokens", ys.len(), entries.len())));
            }
            for (e, yr) in entries.iter().zip(ys.chunks_exact(hidden)) {
                out[e.token * hidden..(e.token + 1) * hidden].iter_mut().zip(yr).for_each(|(o, v)| *o += v);
            }
        }

        // shared experts: a tensor-parallel part over every token, or (replicated) this rank's tokens
        if let Some(shared) = &self.shared {
            let (rows, first) = if self.par.tp().1 > 1 { (0..n, 0) } else { (own.clone(), own.start) };
            if !rows.is_empty() {
                let s = shared.forward(&x.narrow(0, rows.start, rows.len()).ctx(ctx)?)?.to_dtype(DType::F32).ctx(ctx)?;
                let s: Vec<f32> = s.flatten_all().ctx(ctx)?.to_vec1().ctx(ctx)?;
                out[first * hidden..].iter_mut().zip(&s).for_each(|(o, v)| *o += v);
            }
        }
        self.par.comm().all_reduce_sum(&mut out)?;
        Tensor::from_vec(out, (n, hidden), x.device()).ctx(ctx)
    }

    /// `Σ w · expert(row)` for `assigned` = (row, global expert, weight) over `m` input rows;
    /// the kernels' grouped call when the experts are resident in a kernel format.
    fn local_experts(
        &self,
        inputs: &[f32],
        m: usize,
        hidden: usize,
        assigned: &[(usize, usize, f32)],
        x: &Tensor,
    ) -> Result<Vec<f32>> {
        let local = |e: usize| {
            e.checked_sub(self.first)
                .filter(|&l| l < self.experts.len())
                .ok_or_else(|| Error::Input(format!("expert {e} was sent to a rank that holds {:?}", self.held_experts())))
        };
        let mut by_expert: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for &(r, e, w) in assigned {
            let l = local(e)?;
            by_expert[l].0.push(r);
            by_expert[l].1.push(w);
        }
        if let Some(packed) = self.experts.iter().map(|e| e.packed()).collect::<Option<Vec<_>>>() {
            let groups: Vec<Group> = by_expert
                .into_iter()
                .zip(packed)
                .filter(|((rows, _), _)| !rows.is_empty())
                .map(|((rows, ws), w)| (w, rows, ws))
                .collect();
            return run_groups(&groups, inputs, m, hidden);
        }
        // dense weights (reference path, GPU): one matmul per expert over its rows
        let ctx = || "expert-parallel moe (dense)".to_string();
        let mut out = vec![0f32; m * hidden];
        for ((rows, ws), expert) in by_expert.iter().zip(&self.experts) {
            if rows.is_empty() {
                continue;
            }
            let xs: Vec<f32> = rows.iter().flat_map(|&r| &inputs[r * hidden..(r + 1) * hidden]).copied().collect();
            let xe = Tensor::from_vec(xs, (rows.len(), hidden), x.device()).ctx(ctx)?.to_dtype(x.dtype()).ctx(ctx)?;
            let y: Vec<f32> = expert.forward(&xe)?.to_dtype(DType::F32).ctx(ctx)?.flatten_all().ctx(ctx)?.to_vec1().ctx(ctx)?;
            for ((&r, &w), yr) in rows.iter().zip(ws).zip(y.chunks_exact(hidden)) {
                out[r * hidden..(r + 1) * hidden].iter_mut().zip(yr).for_each(|(o, v)| *o += w * v);
            }
        }
        Ok(out)
    }
}
