//! What a client submits to the engine and the events it gets back.

use crate::constraint::ResponseFormat;
use crate::sampling::{SamplingParams, TokenLogprob};
use crate::spec::SpecStats;

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Extra stop token ids (the model's EOS is added unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Stop strings, matched on the detokenized text and never emitted.
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Number of independent choices (each with its own seed `seed + index`).
    pub n: usize,
    /// Report log-probabilities with this many alternatives per token (None: off).
    pub logprobs: Option<usize>,
    /// Constrain the output (after any reasoning block) to JSON.
    pub response_format: Option<ResponseFormat>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Request {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            n: 1,
            logprobs: None,
            response_format: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// max_tokens reached.
    Length,
    /// Aborted by the client (the stream was dropped) or by shutdown.
    Abort,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// Draft acceptance when this choice was decoded speculatively (None: it was not).
    pub speculative: Option<SpecStats>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token of choice `index` and the text it completes (may be empty while a
    /// multi-byte character or a possible stop string is pending).
    Token { index: usize, token: u32, text: String, logprob: Option<TokenLogprob> },
    /// Choice `index` finished; `text` is any held-back text released at the end, `stop` the
    /// stop string that ended it (if one did).
    Finished { index: usize, reason: FinishReason, text: String, usage: Usage, stop: Option<String> },
    /// The request failed inside the engine.
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("server overloaded: {0}")]
    Overloaded(String),
    #[error("engine stopped")]
    Stopped,
}
