//! Serving-side pieces that sit above the model: tokenizer and chat template, incremental
//! detokenization, sampling, and the single-sequence generation loop.

pub mod chat;
pub mod constraint;
pub mod detok;
pub mod engine;
pub mod generate;
pub mod kv;
pub mod metrics;
pub mod reasoning;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod spec;
pub mod stop;
pub mod tokenizer;
pub mod tools;

pub use detok::StreamDecoder;
pub use engine::{Engine, EngineConfig, EngineHandle, RequestStream};
pub use generate::{generate, generate_speculative, GenerateRequest, GenerateStats};
pub use request::{Event, FinishReason, Request, SubmitError, Usage};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::Tokenizer;
