//! Capacity planning for DeepSeek V2/V3/R1 checkpoints (`moeserve plan`).
//!
//! From a config (and optionally the checkpoint's safetensors headers) it derives every tensor
//! with its shape and storage format ([`inventory`]), splits it over a tensor/expert parallel
//! layout ([`layout`]), and budgets device memory per rank: weights, the latent KV cache and an
//! activation/workspace reserve ([`memory`]). Hardware and model presets live in [`hardware`]
//! and [`presets`].

pub mod format;
pub mod hardware;
pub mod headers;
pub mod inventory;
pub mod layout;
pub mod memory;
pub mod presets;

pub use format::Format;
pub use hardware::{DeviceKind, Hardware};
pub use inventory::{Class, Entry, Inventory, Split};
pub use layout::Layout;
pub use memory::{KvPlan, LayoutPlan, PlanOptions, Reserve};

pub type Result<T> = std::result::Result<T, PlanError>;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("--gpus `{spec}`: {msg}")]
    Gpus { spec: String, msg: String },

    #[error("model `{name}`: {msg}")]
    Model { name: String, msg: String },

    #[error("layout TP={tp} EP={ep} on {world} devices: {msg}")]
    Layout { tp: usize, ep: usize, world: usize, msg: String },

    #[error("invalid input: {0}")]
    Input(String),

    #[error(transparent)]
    Core(#[from] moeserve_core::Error),
}
