//! Tensor / expert parallel layouts over `world` devices and each tensor's share per rank.
//!
//! A layout `TP=t, EP=e` on `G` devices:
//! * attention, the dense MLP, the shared experts and lm_head are split over an attention TP group
//!   of `t` ranks (heads, columns/rows, vocab); moeserve runs `t = G` or `t = 1` (attention
//!   replicated on every rank, all ranks serving the same sequences). `1 < t < G` would need
//!   data-parallel attention groups (SGLang's `--enable-dp-attention`), which moeserve does not
//!   have: such layouts are listed as not runnable;
//! * routed experts are split over `e` EP ranks (`ceil(E / e)` whole experts per rank) and each
//!   expert over the remaining `G / e` ranks of an expert-TP group (vLLM's TP MoE when `e = 1`);
//! * embeddings, norms, q_a / kv_a projections, the router and eh_proj are replicated.
//!
//! Bytes per rank are the maximum over ranks (uneven vocab or expert splits round up).

use crate::format::Format;
use crate::inventory::{Entry, Split};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Layout {
    pub tp: usize,
    pub ep: usize,
    pub world: usize,
}

impl Layout {
    pub fn new(tp: usize, ep: usize, world: usize) -> std::result::Result<Self, String> {
        if tp == 0 || ep == 0 || world == 0 {
            return Err("TP, EP and the device count must be > 0".into());
        }
        if !world.is_multiple_of(tp) {
            return Err(format!("TP={tp} does not divide the {world} devices"));
        }
        if !world.is_multiple_of(ep) {
            return Err(format!("EP={ep} does not divide the {world} devices"));
        }
        Ok(Layout { tp, ep, world })
    }

    /// Attention replicas (data-parallel attention groups).
    pub fn attn_dp(&self) -> usize {
        self.world / self.tp
    }

    /// Why moeserve's runtime cannot run this layout (it splits attention over all ranks or none).
    pub fn unsupported(&self) -> Option<String> {
        (self.tp != 1 && self.tp != self.world).then(|| {
            format!("TP={} < {} devices needs data-parallel attention, which moeserve does not have", self.tp, self.world)
        })
    }

    /// Ranks each routed expert is split over.
    pub fn moe_tp(&self) -> usize {
        self.world / self.ep
    }

    /// The candidates for `world` devices: every TP×EP = world, and TP = world with every EP
    /// dividing it (EP over the same ranks as TP).
    pub fn candidates(world: usize) -> Vec<Layout> {
        let divisors: Vec<usize> = (1..=world).filter(|d| world.is_multiple_of(*d)).collect();
        let mut out: Vec<Layout> = divisors.iter().map(|&t| Layout { tp: t, ep: world / t, world }).collect();
        out.extend(divisors.iter().map(|&e| Layout { tp: world, ep: e, world }));
        out.sort_by_key(|l| (std::cmp::Reverse(l.tp), l.ep));
        out.dedup();
        out
    }

    /// One rank's share of `e` in format `fmt`: (tensors, shape of each), for the rank holding most.
    pub fn shard(&self, e: &Entry, fmt: Format, heads: usize) -> std::result::Result<(u64, Vec<usize>), String> {
        let mut shape = e.shape.clone();
        let mut count = e.count();
        let split = |shape: &mut Vec<usize>, dim: usize, parts: usize, what: &str| -> std::result::Result<(), String> {
            let n = shape[dim];
            if !n.is_multiple_of(parts) {
                return Err(format!("{}: {what} {n} not divisible by {parts}", e.name));
            }
            let align = if dim == 0 { fmt.row_align() } else { fmt.col_align() };
            if parts > 1 && !(n / parts).is_multiple_of(align) {
                return Err(format!("{}: {what} {n}/{parts} is not a multiple of the {} block {align}", e.name, fmt.name()));
            }
            shape[dim] = n / parts;
            Ok(())
        };
        match e.split {
            Split::Replicated => {}
            Split::HeadRows | Split::HeadCols => {
                if !heads.is_multiple_of(self.tp) {
                    return Err(format!("{heads} attention heads not divisible by TP={}", self.tp));
                }
                let dim = usize::from(e.split == Split::HeadCols);
                split(&mut shape, dim, self.tp, if dim == 0 { "rows" } else { "columns" })?;
            }
            Split::TpRows => split(&mut shape, 0, self.tp, "rows")?,
            Split::TpCols => split(&mut shape, 1, self.tp, "columns")?,
            Split::Vocab => shape[0] = shape[0].div_ceil(self.tp),
            Split::ExpertRows | Split::ExpertCols => {
                count = (e.layers * e.per_layer.div_ceil(self.ep)) as u64;
                let dim = usize::from(e.split == Split::ExpertCols);
                split(&mut shape, dim, self.moe_tp(), "expert width")?;
            }
        }
        Ok((count, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::Layout;

    #[test]
    fn candidates_cover_grids_and_full_tp() {
        let c: Vec<(usize, usize)> = Layout::candidates(8).iter().map(|l| (l.tp, l.ep)).collect();
        assert_eq!(c, [(8, 1), (8, 2), (8, 4), (8, 8), (4, 2), (2, 4), (1, 8)]);
        assert!(Layout::new(3, 1, 8).is_err() && Layout::new(8, 16, 8).is_err());
        let l = Layout::new(2, 4, 8).unwrap();
        assert_eq!((l.attn_dp(), l.moe_tp()), (4, 2));
    }
}
