//! The Linear seam: every projection in the model is a `dyn Linear`, built by one factory
//! (`Weights::linear`) from the checkpoint's format. A new weight format is one new impl.

use candle_core::{DType, Tensor};
use moeserve_core::{error::Context, Result};

pub trait Linear: Send + Sync + std::fmt::Debug {
    /// `x: [.., in_dim]` -> `[.., out_dim]`, in the activation dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    fn in_dim(&self) -> usize;
    fn out_dim(&self) -> usize;
    /// Short format name for logs and `bench` output (e.g. "f32", "bf16").
    fn format(&self) -> &'static str;
    /// The weight as a dense `[out_dim, in_dim]` tensor (weight absorption, tests).
    fn dense_weight(&self, dtype: DType) -> Result<Tensor>;
    /// Bytes this weight keeps in memory.
    fn resident_bytes(&self) -> usize;
    /// The CPU kernels' weight, when it has one (grouped MoE calls several at once).
    fn packed(&self) -> Option<&moeserve_cpu::PackedMatrix> {
        None
    }
}

/// A dense weight `[out, in]` held in the compute dtype (f32 / bf16 / f16).
#[derive(Debug)]
pub struct DenseLinear {
    name: String,
    /// [out, in]
    weight: Tensor,
}

impl DenseLinear {
    pub fn new(name: impl Into<String>, weight: Tensor) -> Self {
        DenseLinear { name: name.into(), weight }
    }
}

impl Linear for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ctx = || format!("linear {} {:?} x {:?}", self.name, x.dims(), self.weight.dims());
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim)).ctx(ctx)?;
        let y = x2.matmul(&self.weight.t().ctx(ctx)?).ctx(ctx)?;
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.out_dim();
        }
        y.reshape(out).ctx(ctx)
    }

    fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    fn format(&self) -> &'static str {
        match self.weight.dtype() {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            _ => "dense",
        }
    }

    fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        self.weight.to_dtype(dtype).ctx(|| format!("{} to {dtype:?}", self.name))
    }

    fn resident_bytes(&self) -> usize {
        self.weight.elem_count() * self.weight.dtype().size_in_bytes()
    }
}
