//! RMSNorm with float32 statistics; the weight multiply happens in the compute dtype (HF order).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use moeserve_core::{error::Context, Result};
use moeserve_quant::Weights;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// The weight's values when it is an f32 or bf16 CPU tensor: CPU inputs of its dtype take
    /// the fused loops.
    cpu: Option<Arc<Vec<f32>>>,
}

impl RmsNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self::new(w.tensor("weight", &[dim])?, eps))
    }

    /// From a weight tensor `[dim]` in the compute dtype (tests, synthetic layers).
    pub fn new(weight: Tensor, eps: f64) -> Self {
        let cpu = (weight.device().is_cpu() && matches!(weight.dtype(), DType::F32 | DType::BF16))
            .then(|| weight.to_dtype(DType::F32).and_then(|w| w.to_vec1::<f32>()).ok())
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
        if let (Some(w), true) = (&self.cpu, x.device().is_cpu() && x.dtype() == self.weight.dtype()) {
            let (xs, _) = moeserve_quant::packed::rows_f32(x, w.len(), "rms_norm")?;
            return match x.dtype() {
                DType::BF16 => {
                    Tensor::from_vec(moeserve_cpu::elementwise::rms_norm_bf16(&xs, w, self.eps as f32), x.dims(), x.device())
                }
                _ => Tensor::from_vec(moeserve_cpu::rms_norm(&xs, w, self.eps as f32), x.dims(), x.device()),
            }
            .ctx(ctx);
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32).ctx(ctx)?;
        let ms = xf.sqr().ctx(ctx)?.mean_keepdim(D::Minus1).ctx(ctx)?;
        let normed = xf.broadcast_div(&(ms + self.eps).ctx(ctx)?.sqrt().ctx(ctx)?).ctx(ctx)?;
        normed.to_dtype(dtype).ctx(ctx)?.broadcast_mul(&self.weight).ctx(ctx)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The fused loops against candle's ops (a norm without the weight's values takes them), on
    /// f32 (within 1e-6: it multiplies by the inverse where candle divides) and on bf16: within
    /// one rounding step of its result (the sum of squares is added in another order), and
    /// mostly equal.
    #[test]
    fn fused_norms_match_the_tensor_ops() {
        let dim = 531;
        let x = (Tensor::randn(0f32, 3.0, (4, dim), &Device::Cpu).unwrap() + 0.5).unwrap();
        let w = (Tensor::randn(0f32, 0.2, dim, &Device::Cpu).unwrap() + 1.0).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let (x, w) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
            let fused = RmsNorm::new(w.clone(), 1e-6);
            assert!(fused.cpu.is_some(), "{dtype:?}");
            let ops = RmsNorm { weight: w, eps: 1e-6, cpu: None };
            let get = |n: &RmsNorm| -> Vec<f32> {
                let y = n.forward(&x).unwrap();
                assert_eq!(y.dtype(), dtype);
                y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
            };
            let (a, b) = (get(&fused), get(&ops));
            let tol = if dtype == DType::BF16 { 2f32.powi(-7) } else { 1e-6 };
            let mut equal = 0;
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                assert!((a - b).abs() <= tol * b.abs().max(1e-3), "{dtype:?} {i}: {a} vs {b}");
                equal += usize::from(a == b);
            }
            if dtype == DType::BF16 {
                assert!(equal * 10 >= 9 * a.len(), "{dtype:?}: {equal} of {} equal", a.len());
            }
        }
    }
}
