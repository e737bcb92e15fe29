//! Device dispatch: the one place where model code reaches device-specific kernels
//! (ARCHITECTURE rule 6). Each function returns `Ok(None)` when no kernel applies (CPU tensors,
//! a build without the `cuda` feature, an unsupported dtype or shape) and the caller runs its
//! generic candle math, which stays the reference.

use candle_core::Tensor;
use moeserve_core::Result;

use crate::router::RouterConfig;

/// A sequence's rows of one layer in the engine's page pool (for the paged decode kernel).
pub struct PagedRows<'a> {
    /// `[num_pages * page_size, row_dim]`
    pub pool: &'a Tensor,
    pub pages: &'a [u32],
    pub page_size: usize,
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::{DType, Tensor};
    use moeserve_core::{error::Context, Result, ScoringFunc, TopkMethod};
    use moeserve_kernels::cuda::ops;
    use moeserve_kernels::reference::mla::MlaShape;
    use moeserve_kernels::reference::router::{Method, RouteConfig, Scoring};

    use super::PagedRows;
    use crate::router::RouterConfig;

    fn kernel_dtype(t: &Tensor) -> bool {
        t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::BF16)
    }

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
        if !kernel_dtype(x) || w.dtype() != x.dtype() {
            return Ok(None);
        }
        ops::rms_norm(x, w, eps).map(Some).ctx(|| format!("rms_norm kernel {:?}", x.dims()))
    }

    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
        if !kernel_dtype(x) || x.rank() != 3 || x.layout().stride().last() != Some(&1) {
            return Ok(None);
        }
        ops::rope_interleaved(x, cos, sin).map(Some).ctx(|| format!("rope kernel {:?}", x.dims()))
    }

    pub fn route(cfg: &RouterConfig, logits: &Tensor, bias: Option<&[f32]>) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
        if !logits.device().is_cuda() || logits.dtype() != DType::F32 || cfg.dtype != DType::F32 {
            return Ok(None);
        }
        let kc = RouteConfig {
            n_experts: cfg.n_experts,
            top_k: cfg.top_k,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            scoring: match cfg.scoring {
                ScoringFunc::Sigmoid => Scoring::Sigmoid,
                ScoringFunc::Softmax => Scoring::Softmax,
            },
            method: match cfg.method {
                TopkMethod::Greedy => Method::Greedy,
                TopkMethod::GroupLimitedGreedy => Method::GroupLimitedGreedy,
                TopkMethod::NoauxTc => Method::NoauxTc,
            },
            norm_topk_prob: cfg.norm_topk_prob,
            scaling: cfg.scaling,
        };
        if kc.n_experts > 512 || kc.n_group > 64 || kc.top_k > 32 {
            return Ok(None);
        }
        let ctx = || format!("router kernel {:?}", logits.dims());
        let bias = bias.map(|b| Tensor::from_slice(b, b.len(), logits.device())).transpose().ctx(ctx)?;
        ops::route(logits, bias.as_ref(), &kc).map(Some).ctx(ctx)
    }

    /// `q: [1, H, L + R]` (absorbed query of one decode token) over `len` cached rows.
    pub fn mla_decode(q: &Tensor, rows: &PagedRows, len: usize, latent: usize, scale: f64) -> Result<Option<Tensor>> {
        let (_, heads, d) = q.dims3().ctx(|| "mla decode q".into())?;
        if !kernel_dtype(q) || rows.pool.dtype() != q.dtype() || d > 576 || latent > 512 || len == 0 {
            return Ok(None);
        }
        let max_pages = len.div_ceil(rows.page_size);
        let table: Vec<i32> = rows.pages.iter().take(max_pages).map(|&p| p as i32).collect();
        if table.len() < max_pages {
            return Ok(None);
        }
        let shape = MlaShape { heads, latent, rope: d - latent, page_size: rows.page_size, max_pages, scale: scale as f32 };
        ops::mla_decode(q, rows.pool, &table, &[len as i32], &shape).map(Some).ctx(|| format!("mla decode kernel {shape:?}"))
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::Tensor;
    use moeserve_core::Result;

    use super::PagedRows;
    use crate::router::RouterConfig;

    pub fn rms_norm(_: &Tensor, _: &Tensor, _: f64) -> Result<Option<Tensor>> {
        Ok(None)
    }

    pub fn rope(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    pub fn route(_: &RouterConfig, _: &Tensor, _: Option<&[f32]>) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
        Ok(None)
    }

    pub fn mla_decode(_: &Tensor, _: &PagedRows, _: usize, _: usize, _: f64) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Whether the paged MLA decode kernel can run on `t`'s device (CUDA build, CUDA tensor).
pub fn has_paged_mla(t: &Tensor) -> bool {
    cfg!(feature = "cuda") && t.device().is_cuda()
}

/// Fused RMSNorm (f32 statistics, weight multiply in the compute dtype).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    imp::rms_norm(x, w, eps)
}

/// Interleaved rope of `x: [n, heads, rope_dim]` (a strided view is fine) with `[n, rope_dim/2]` tables.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    imp::rope(x, cos, sin)
}

/// Router selection from f32 logits `[n, n_experts]`.
pub fn route(cfg: &RouterConfig, logits: &Tensor, bias: Option<&[f32]>) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
    imp::route(cfg, logits, bias)
}

/// Absorbed MLA attention of one decode token over its paged cache rows: `[1, H, latent]`.
pub fn mla_decode(q: &Tensor, rows: &PagedRows, len: usize, latent: usize, scale: f64) -> Result<Option<Tensor>> {
    imp::mla_decode(q, rows, len, latent, scale)
}
