//! Weights resident on a CUDA device: FP8 block-scaled projections stay FP8 (one byte per weight
//! plus the f32 block scales) and are multiplied by the kernels crate's FP8 GEMM, dequantized in
//! the tile. Other formats load as dense device tensors (`DenseLinear`, cuBLAS via candle).

use std::sync::Arc;

use crate::linear::Linear;
use crate::weights::Weights;
use moeserve_core::Result;

/// The FP8 projection `name` (`[out_dim, in_dim]`) as a GPU FP8 linear, when the device is CUDA,
/// the checkpoint stores it in FP8 and this build has the kernels; `None` otherwise.
pub fn fp8_linear(w: &Weights, name: &str, in_dim: usize, out_dim: usize) -> Result<Option<Arc<dyn Linear>>> {
    imp::fp8_linear(w, name, in_dim, out_dim)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn fp8_linear(_: &Weights, _: &str, _: usize, _: usize) -> Result<Option<Arc<dyn Linear>>> {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::{DType, Tensor};
    use moeserve_core::{error::Context, Error};
    use moeserve_kernels::cuda::ops::{self, GpuWeight};
    use safetensors::Dtype;

    use super::*;

    pub fn fp8_linear(w: &Weights, name: &str, in_dim: usize, out_dim: usize) -> Result<Option<Arc<dyn Linear>>> {
        let ckpt = w.checkpoint();
        if !w.device.is_cuda() || ckpt.meta(name)?.dtype != Dtype::F8_E4M3 {
            return Ok(None);
        }
        let block = w.fp8_block();
        let (data, scale, [rows, cols]) = ckpt.fp8_parts(name, &format!("{name}_scale_inv"), block)?;
        if [rows, cols] != [out_dim, in_dim] {
            return Err(Error::Shape {
                file: ckpt.file_of(name),
                tensor: name.into(),
                expected: vec![out_dim, in_dim],
                found: vec![rows, cols],
            });
        }
        let ctx = || format!("{name} to the GPU");
        let sdims = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
        let gpu = GpuWeight {
            data: Tensor::from_slice(data, (rows, cols), &w.device).ctx(ctx)?,
            scale: Some(Tensor::from_vec(scale, (sdims[0], sdims[1]), &w.device).ctx(ctx)?),
            block,
        };
        Ok(Some(Arc::new(Fp8GpuLinear { name: name.into(), w: gpu })))
    }

    /// An FP8 block-scaled weight on the GPU.
    #[derive(Debug)]
    pub struct Fp8GpuLinear {
        name: String,
        w: GpuWeight,
    }

    impl Linear for Fp8GpuLinear {
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            let ctx = || format!("fp8 gpu linear {} {:?}", self.name, x.dims());
            let (n, k) = self.w.dims();
            let mut shape = x.dims().to_vec();
            let rows = x.elem_count() / k.max(1);
            let y = ops::gemm(&x.reshape((rows, k)).ctx(ctx)?, &self.w).ctx(ctx)?;
            if let Some(last) = shape.last_mut() {
                *last = n;
            }
            y.reshape(shape).ctx(ctx)
        }

        fn in_dim(&self) -> usize {
            self.w.dims().1
        }

        fn out_dim(&self) -> usize {
            self.w.dims().0
        }

        fn format(&self) -> &'static str {
            "fp8"
        }

        /// `W = (I · Wᵀ)ᵀ`: the kernel dequantizes, an identity input picks every column.
        fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
            let ctx = || format!("{} to {dtype:?}", self.name);
            let (_, k) = self.w.dims();
            let eye = Tensor::eye(k, DType::F32, self.w.data.device()).ctx(ctx)?;
            ops::gemm(&eye, &self.w).and_then(|t| t.t()?.contiguous()?.to_dtype(dtype)).ctx(ctx)
        }

        fn resident_bytes(&self) -> usize {
            let (n, k) = self.w.dims();
            n * k + self.w.scale.as_ref().map_or(0, |s| s.elem_count() * 4)
        }
    }
}
