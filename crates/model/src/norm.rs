//! RMSNorm with float32 statistics; the weight multiply happens in the compute dtype (HF order).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use moeserve_core::{error::Context, Result};
use moeserve_quant::Weights;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// The weight's values when it is an f32 CPU tensor: f32 CPU inputs take the fused loop.
    cpu: Option<Arc<Vec<f32>>>,
}

impl RmsNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self::new(w.tensor("weight", &[dim])?, eps))
    }

    /// From a weight tensor `[dim]` in the compute dtype (tests, synthetic layers).
    pub fn new(weight: Tensor, eps: f64) -> Self {
        let cpu = (weight.device().is_cpu() && weight.dtype() == DType::F32)
            .then(|| weight.to_vec1::<f32>().ok())
            .flatten()
            .map(Arc::new);
        RmsNorm { weight, eps, cpu }
    }

    /// `x: [.., dim]`: `w · (x / sqrt(mean(x²) + eps))`, statistics in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::device_ops::rms_norm(x, &self.weight, self.eps)? {
            return Ok(y);
        }
        let ctx = || format!("rms_norm {:?}", x.dims());
        if let (Some(w), true) = (&self.cpu, x.device().is_cpu() && x.dtype() == DType::F32) {
            let (xs, _) = moeserve_quant::packed::rows_f32(x, w.len(), "rms_norm")?;
            return Tensor::from_vec(moeserve_cpu::rms_norm(&xs, w, self.eps as f32), x.dims(), x.device()).ctx(ctx);
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32).ctx(ctx)?;
        let ms = xf.sqr().ctx(ctx)?.mean_keepdim(D::Minus1).ctx(ctx)?;
        let normed = xf.broadcast_div(&(ms + self.eps).ctx(ctx)?.sqrt().ctx(ctx)?).ctx(ctx)?;
        normed.to_dtype(dtype).ctx(ctx)?.broadcast_mul(&self.weight).ctx(ctx)
    }
}
