//! RMSNorm with float32 statistics; the weight multiply happens in the compute dtype (HF order).

use candle_core::{DType, Tensor, D};
use moeserve_core::{error::Context, Result};
use moeserve_quant::Weights;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: w.tensor("weight", &[dim])?, eps })
    }

    /// From a weight tensor `[dim]` in the compute dtype (tests, synthetic layers).
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// `x: [.., dim]`: `w · (x / sqrt(mean(x²) + eps))`, statistics in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::device_ops::rms_norm(x, &self.weight, self.eps)? {
            return Ok(y);
        }
        let ctx = || format!("rms_norm {:?}", x.dims());
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32).ctx(ctx)?;
        let ms = xf.sqr().ctx(ctx)?.mean_keepdim(D::Minus1).ctx(ctx)?;
        let normed = xf.broadcast_div(&(ms + self.eps).ctx(ctx)?.sqrt().ctx(ctx)?).ctx(ctx)?;
        normed.to_dtype(dtype).ctx(ctx)?.broadcast_mul(&self.weight).ctx(ctx)
    }
}
