//! Weights: checkpoint sources (memory-mapped safetensors, sharded or single), FP8 block
//! dequantization, the prefixed weight loader and the `Linear` seam every projection goes through.

pub mod checkpoint;
pub mod fp8;
pub mod linear;
pub mod progress;
pub mod weights;

pub use checkpoint::{Checkpoint, Slice, TensorMeta};
pub use linear::{DenseLinear, Linear};
pub use weights::Weights;
