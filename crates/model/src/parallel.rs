//! Tensor and expert parallelism: which part of each weight a rank holds, and the collectives
//! that put the parts back together.
//!
//! A group of `world = max(tp, ep)` ranks. `tp` is 1 (attention and dense layers replicated) or
//! `world` (split over every rank); `ep` divides `world`:
//! - MLA: heads split over the tp ranks (q_b / q_proj and kv_b by head block, o_proj by input
//!   columns, then an all-reduce). q_a / kv_a and their norms are replicated, and so is the latent
//!   cache: every head attends over the whole latent row, so each rank computes and keeps the
//!   same 576 values per token (splitting the latent would need an all-reduce of the scores of
//!   every head, every layer);
//! - dense MLP and shared experts: column-parallel gate/up, row-parallel down;
//! - routed experts: rank r belongs to expert group `r / (world / ep)`, which owns
//!   `n_routed_experts / ep` experts; inside a group each expert is split over the
//!   `world / ep` ranks like a dense MLP (so `tp = world, ep = 1` is plain tensor-parallel MoE);
//! - lm_head (and the MTP head) vocab-parallel over the tp ranks, all-gathered;
//! - embeddings, norms and routers replicated (the CPU embedding table is memory-mapped, so a
//!   replica costs only the rows looked up).

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use moeserve_core::{error::Context, Communicator, Error, Result, SoloComm};

#[derive(Debug, Clone)]
pub struct Parallel {
    comm: Arc<dyn Communicator>,
    tp: usize,
    ep: usize,
}

impl Default for Parallel {
    fn default() -> Self {
        Parallel { comm: Arc::new(SoloComm), tp: 1, ep: 1 }
    }
}

/// (index of this rank inside a split, number of parts).
pub type Part = (usize, usize);

impl Parallel {
    /// Check the layout against the communicator's world size.
    pub fn new(comm: Arc<dyn Communicator>, tp: usize, ep: usize) -> Result<Self> {
        let world = comm.world_size();
        Self::check_sizes(tp, ep)?;
        if world != tp.max(ep) {
            return Err(Error::Input(format!(
                "tensor-parallel {tp} x expert-parallel {ep} needs {} ranks, not {world}",
                tp.max(ep)
            )));
        }
        Ok(Parallel { comm, tp, ep })
    }

    /// The layouts this implementation runs: `tp` is 1 or the world size, `ep` divides it.
    pub fn check_sizes(tp: usize, ep: usize) -> Result<usize> {
        let world = tp.max(ep);
        if tp == 0 || ep == 0 || !(tp == 1 || tp == world) || !world.is_multiple_of(ep) {
            return Err(Error::Input(format!(
                "unsupported layout tensor-parallel {tp}, expert-parallel {ep}: the group has max(tp, ep) ranks; \
                 tp must be 1 or that size, and ep must divide it"
            )));
        }
        Ok(world)
    }

    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// Part of the tensor-parallel split (heads, dense intermediate, vocab).
    pub fn tp(&self) -> Part {
        if self.tp > 1 {
            (self.rank(), self.tp)
        } else {
            (0, 1)
        }
    }

    /// Size of an expert group: every expert is split over this many ranks.
    fn group_size(&self) -> usize {
        self.world() / self.ep
    }

    /// Part of the split of one routed expert inside its group.
    pub fn moe_tp(&self) -> Part {
        (self.rank() % self.group_size(), self.group_size())
    }

    /// Which expert group this rank is in, and how many there are.
    pub fn ep(&self) -> Part {
        (self.rank() / self.group_size(), self.ep)
    }

    /// The ranks that hold (parts of) routed expert `e` of `n_experts`.
    pub fn expert_ranks(&self, e: usize, n_experts: usize) -> Range<usize> {
        let g = e / (n_experts / self.ep).max(1);
        g * self.group_size()..(g + 1) * self.group_size()
    }

    /// Part `part.0` of `total` cut into `part.1` equal pieces; `what` names the dimension in
    /// the error when it does not divide.
    pub fn split(total: usize, part: Part, what: &str) -> Result<Range<usize>> {
        let (i, n) = part;
        if !total.is_multiple_of(n) {
            return Err(Error::Input(format!("{what} ({total}) is not divisible by the parallel size {n}")));
        }
        let step = total / n;
        Ok(i * step..(i + 1) * step)
    }

    /// Sum of `t` over every rank (the partial outputs of a row-parallel projection).
    pub fn all_reduce(&self, t: &Tensor) -> Result<Tensor> {
        if self.world() == 1 {
            return Ok(t.clone());
        }
        let ctx = || format!("all_reduce {:?}", t.dims());
        let mut v: Vec<f32> = t.to_dtype(DType::F32).ctx(ctx)?.flatten_all().ctx(ctx)?.to_vec1().ctx(ctx)?;
        self.comm.all_reduce_sum(&mut v)?;
        Tensor::from_vec(v, t.dims(), t.device()).ctx(ctx)?.to_dtype(t.dtype()).ctx(ctx)
    }

    /// `[n, cols_r]` on every tp rank -> `[n, Σ cols_r]` in rank order (vocab-parallel heads).
    pub fn gather_columns(&self, t: &Tensor) -> Result<Tensor> {
        if self.tp().1 == 1 {
            return Ok(t.clone());
        }
        let ctx = || format!("all_gather {:?}", t.dims());
        let (n, _) = t.dims2().ctx(ctx)?;
        let v: Vec<f32> = t.to_dtype(DType::F32).ctx(ctx)?.flatten_all().ctx(ctx)?.to_vec1().ctx(ctx)?;
        let parts = self.comm.all_gather(&v)?;
        let widths: Vec<usize> = parts.iter().map(|p| p.len() / n.max(1)).collect();
        let total: usize = widths.iter().sum();
        let mut out = Vec::with_capacity(n * total);
        for row in 0..n {
            for (p, &w) in parts.iter().zip(&widths) {
                out.extend_from_slice(&p[row * w..(row + 1) * w]);
            }
        }
        Tensor::from_vec(out, (n, total), t.device()).ctx(ctx)?.to_dtype(t.dtype()).ctx(ctx)
    }
}

#[cfg(test)]
mod tests {
    use moeserve_core::ThreadGroup;

    use super::*;

    #[test]
    fn layouts_and_parts() {
        assert!(Parallel::check_sizes(2, 4).is_err(), "tp must be 1 or the world size");
        assert!(Parallel::check_sizes(4, 3).is_err());
        assert_eq!(Parallel::check_sizes(4, 2).unwrap(), 4);
        let comms = ThreadGroup::new(4).comms();
        let p: Vec<Parallel> = comms.into_iter().map(|c| Parallel::new(Arc::new(c), 4, 2).unwrap()).collect();
        // groups {0,1} and {2,3}; each expert split in two inside its group
        assert_eq!(p.iter().map(|p| (p.ep(), p.moe_tp(), p.tp())).collect::<Vec<_>>()[3], ((1, 2), (1, 2), (3, 4)));
        assert_eq!(p[0].expert_ranks(7, 16), 0..2);
        assert_eq!(p[0].expert_ranks(8, 16), 2..4);
        assert_eq!(Parallel::split(12, (2, 4), "heads").unwrap(), 6..9);
        assert!(Parallel::split(10, (0, 4), "heads").unwrap_err().to_string().contains("heads (10)"));
        let comms = ThreadGroup::new(2).comms();
        assert!(Parallel::new(Arc::new(comms[0].clone()), 4, 4).is_err(), "4 ranks asked, 2 in the group");
    }
}
