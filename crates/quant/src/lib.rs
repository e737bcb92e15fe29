//! Weights: checkpoint sources (memory-mapped safetensors, sharded or single), FP8 block
//! dequantization, the prefixed weight loader and the `Linear` seam every projection goes through.

pub mod checkpoint;
pub mod fp8;
pub mod gguf;
pub mod gpu;
pub mod linear;
pub mod packed;
pub mod progress;
pub mod spec;
pub mod weights;

pub use checkpoint::{Checkpoint, MappedRows, Slice, TensorMeta};
pub use linear::{DenseLinear, Linear};
pub use packed::PackedLinear;
pub use spec::{QuantSpec, Target, TensorClass};
pub use weights::{LoadReport, Weights};
