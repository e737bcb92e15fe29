//! Prefixed weight loader over a checkpoint (mirrors the checkpoint tree: `w.pp("self_attn")`).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moeserve_core::{Error, Result};
use safetensors::Dtype;

use crate::checkpoint::{Checkpoint, Slice};
use crate::linear::{DenseLinear, Linear};

/// DeepSeek's FP8 checkpoints use 128×128 blocks when `weight_block_size` is absent.
pub const DEFAULT_FP8_BLOCK: [usize; 2] = [128, 128];

#[derive(Clone)]
pub struct Weights {
    ckpt: Arc<Checkpoint>,
    prefix: String,
    /// Compute dtype of activations and dense weights.
    pub dtype: DType,
    pub device: Device,
    fp8_block: [usize; 2],
}

impl Weights {
    pub fn new(ckpt: Arc<Checkpoint>, dtype: DType, device: Device, fp8_block: Option<[usize; 2]>) -> Self {
        Weights { ckpt, prefix: String::new(), dtype, device, fp8_block: fp8_block.unwrap_or(DEFAULT_FP8_BLOCK) }
    }

    pub fn checkpoint(&self) -> &Arc<Checkpoint> {
        &self.ckpt
    }

    /// Descend one level of the tensor-name tree.
    pub fn pp(&self, part: impl std::fmt::Display) -> Self {
        let mut w = self.clone();
        w.prefix = self.name(&part.to_string());
        w
    }

    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    pub fn contains(&self, leaf: &str) -> bool {
        self.ckpt.contains(&self.name(leaf))
    }

    fn check_shape(&self, name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
        if found != expected {
            return Err(Error::Shape {
                file: self.ckpt.file_of(name),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    /// A tensor of the expected shape in `dtype` (FP8 weights are dequantized).
    pub fn tensor_as(&self, leaf: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.tensor_slice_as(leaf, shape, &Slice::full(), dtype)
    }

    /// A tensor in the compute dtype.
    pub fn tensor(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        self.tensor_as(leaf, shape, self.dtype)
    }

    /// A slice of a tensor whose full shape must be `shape`.
    pub fn tensor_slice_as(&self, leaf: &str, shape: &[usize], slice: &Slice, dtype: DType) -> Result<Tensor> {
        let name = self.name(leaf);
        let meta = self.ckpt.meta(&name)?;
        self.check_shape(&name, &meta.shape, shape)?;
        if meta.dtype == Dtype::F8_E4M3 {
            let scale = format!("{name}_scale_inv");
            if !self.ckpt.contains(&scale) {
                return Err(Error::Tensor {
                    file: self.ckpt.file_of(&name),
                    tensor: name,
                    msg: format!("FP8 weight without its scale tensor `{scale}`"),
                });
            }
            return self.ckpt.load_fp8(&name, &scale, self.fp8_block, slice, dtype, &self.device);
        }
        self.ckpt.load(&name, slice, dtype, &self.device)
    }

    /// The projection `{leaf}.weight` of shape `[out_dim, in_dim]` behind the Linear seam.
    pub fn linear(&self, leaf: &str, in_dim: usize, out_dim: usize) -> Result<Arc<dyn Linear>> {
        let w = self.pp(leaf);
        let weight = w.tensor("weight", &[out_dim, in_dim])?;
        Ok(Arc::new(DenseLinear::new(w.name("weight"), weight)))
    }
}
