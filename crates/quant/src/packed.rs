//! `PackedLinear`: a weight resident in one of the CPU kernels' formats (f32, bf16, FP8
//! block-scaled, q8_0, q4_K, q6_K), multiplied by `moeserve-cpu`'s SIMD kernels. Activations
//! arrive and leave in the compute dtype; the kernels work in f32 (8-bit activations for the
//! ggml block formats).

use candle_core::{DType, Tensor};
use moeserve_core::{error::Context, Error, Result};
use moeserve_cpu::PackedMatrix;

use crate::linear::Linear;

#[derive(Debug)]
pub struct PackedLinear {
    name: String,
    w: PackedMatrix,
}

impl PackedLinear {
    pub fn new(name: impl Into<String>, w: PackedMatrix) -> Self {
        PackedLinear { name: name.into(), w }
    }
}

/// `x: [.., in]` as row-major f32 values and the number of rows.
pub fn rows_f32(x: &Tensor, in_dim: usize, what: &str) -> Result<(Vec<f32>, usize)> {
    let ctx = || format!("{what} input {:?}", x.dims());
    if x.dims().last() != Some(&in_dim) {
        return Err(Error::Input(format!("{what}: input {:?}, expected last dimension {in_dim}", x.dims())));
    }
    let v = x.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).ctx(ctx)?;
    let rows = v.len() / in_dim.max(1);
    Ok((v, rows))
}

impl Linear for PackedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xs, rows) = rows_f32(x, self.w.cols(), &self.name)?;
        let mut y = vec![0f32; rows * self.w.rows()];
        moeserve_cpu::matmul(&self.w, &xs, rows, &mut y);
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.w.rows();
        }
        let ctx = || format!("linear {} output", self.name);
        Tensor::from_vec(y, shape, x.device()).and_then(|t| t.to_dtype(x.dtype())).ctx(ctx)
    }

    fn in_dim(&self) -> usize {
        self.w.cols()
    }

    fn out_dim(&self) -> usize {
        self.w.rows()
    }

    fn format(&self) -> &'static str {
        self.w.format().name()
    }

    fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        let cols = self.w.cols();
        let v: Vec<f32> = (0..self.w.rows()).flat_map(|r| self.w.dequantize_row(r).into_iter().take(cols)).collect();
        Tensor::from_vec(v, (self.w.rows(), cols), &candle_core::Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .ctx(|| format!("{} to {dtype:?}", self.name))
    }

    fn resident_bytes(&self) -> usize {
        self.w.resident_bytes()
    }

    fn packed(&self) -> Option<&PackedMatrix> {
        Some(&self.w)
    }
}
