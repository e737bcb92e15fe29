//! moeserve's CUDA kernels and their plain CPU references.
//!
//! - [`reference`]: slice-based CPU references of every kernel, always compiled (no nvcc);
//! - `cuda` (feature `cuda`): the kernels compiled from `src/*.cu` by `build.rs`, loaded into
//!   candle's CUDA context through cudarc, and a tensor-level API over candle CUDA tensors
//!   (`cuda::ops`) that the model and quant crates call through their narrow seams.
//!
//! At run time `MOESERVE_KERNELS_PTX_DIR=DIR` replaces the embedded PTX of module `NAME` by
//! `DIR/NAME.cubin` or `DIR/NAME.ptx` when present (e.g. sm_90a code built by a newer nvcc).

pub mod reference;

#[cfg(feature = "cuda")]
pub mod cuda;
