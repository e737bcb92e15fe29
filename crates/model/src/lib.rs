//! DeepSeek V2 / V3 / R1 on candle: YaRN rope, MLA over a latent KV cache (naive prefill,
//! weight-absorbed decode), group-limited MoE with a float32 router, and the MTP draft head.
//!
//! The model is immutable: all per-sequence state lives in `LatentKv` caches passed in.

pub mod batch;
pub mod cache;
pub mod device_ops;
pub mod eval;
pub mod fp8_encode;
pub mod group;
pub mod layer;
pub mod mla;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod mtp;
pub mod norm;
pub mod parallel;
pub mod rope;
pub mod router;
pub mod synth;
pub mod values;

pub use batch::{AttnMode, ForwardBatch, SeqChunk};
pub use cache::{ContiguousLatentCache, LatentKv};
pub use group::ModelGroup;
pub use model::{DeepSeekModel, LoadOptions};
pub use mtp::Mtp;
pub use parallel::Parallel;
pub use values::with_f32;
