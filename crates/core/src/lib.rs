//! Shared types of moeserve: the DeepSeek V2/V3 config, the error type, the latent KV layout.

pub mod ab;
pub mod comm;
pub mod config;
pub mod error;
pub mod kv;
pub mod profile;
pub mod rendezvous;

pub use comm::{Communicator, SoloComm, ThreadComm, ThreadGroup};
pub use config::{DeepSeekConfig, ModelType, QuantizationConfig, RopeScaling, ScoringFunc, TopkMethod};
pub use error::{Error, Result};
pub use kv::KvLayout;
