//! CPU hot paths. Decode on a CPU is memory-bound: these kernels read every weight byte once per
//! call, for one activation row or a batch of up to a few dozen (batched decode, MTP
//! verification, prefill chunks reuse each weight row from L1).
//!
//! - [`format`]: resident weight formats ([`PackedMatrix`]) and their f32 reference dequantization;
//! - [`matmul`]: the products, threaded over output rows, with run-time CPU feature detection;
//! - [`bandwidth`]: a streaming-read measurement to compare the kernels against.

pub mod absorb;
pub mod act;
#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
pub mod bandwidth;
pub mod bench;
pub mod elementwise;
pub mod format;
pub mod matmul;
pub mod pool;
pub mod prefetch;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use absorb::{
    absorb_queries, absorb_queries_with, absorption_reference, expand_values, expand_values_with, takes_as_stored, Kvb, KvbShape,
};
pub use act::Activations;
pub use attention::{
    attention, attention_reference, attention_with, bf16_decode_applies, mla_attention, mla_attention_paged,
    mla_attention_reference, mla_attention_with, mla_decode_bf16, Attention, MlaShape, Pages, Rows,
};
pub use elementwise::{exp_shifted, rms_norm, silu_mul};
pub use format::{bf16_exact, Format, PackedMatrix};
pub use matmul::{activations, backend, matmul, matmul_many, matmul_many_with, matmul_reference, Backend, Product};
pub use pool::{for_each_index, on_pool};

/// A packing or shape error (the caller adds the tensor name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}
