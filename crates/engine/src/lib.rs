//! Serving-side pieces that sit above the model: tokenizer and chat template, incremental
//! detokenization, sampling, and the single-sequence generation loop.

pub mod chat;
pub mod detok;
pub mod generate;
pub mod sampling;
pub mod tokenizer;

pub use detok::StreamDecoder;
pub use generate::{generate, GenerateRequest, GenerateStats};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::Tokenizer;
