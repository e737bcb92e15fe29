//! Structured output by constrained decoding: a JSON schema (or "any JSON object") is compiled by
//! llguidance into a token-level matcher; each step masks the tokens the grammar forbids.
//!
//! Reasoning first: the `<think>` token stays allowed as the first token, and while the model is
//! thinking (until `</think>`) nothing is constrained, so R1 reasons freely and answers in JSON.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::TokEnv;
use llguidance::{Matcher, ParserFactory};
use moeserve_core::{Error, Result};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// A value matching this JSON schema.
    JsonSchema(Value),
}

/// Compiles response formats into per-sequence constraints (one per model + tokenizer).
pub struct GrammarCompiler {
    factory: ParserFactory,
    think: Option<(u32, u32)>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GrammarCompiler(think tokens: {:?})", self.think)
    }
}

impl GrammarCompiler {
    /// `tokenizer_json`: the model's tokenizer.json; `vocab`: rows of the model's logits.
    pub fn new(tokenizer_json: &[u8], eos: &[u32], vocab: usize, think: Option<(u32, u32)>) -> Result<Self> {
        let err = |e: String| Error::Tokenizer(format!("grammar tokenizer: {e}"));
        let mut bt = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(tokenizer_json).map_err(|e| err(e.to_string()))?;
        let n = bt.tokrx_info().vocab_size;
        let eos: Vec<u32> = eos.iter().copied().filter(|&t| t < n).collect();
        if !eos.is_empty() {
            bt.set_eos_tokens(&eos);
        }
        let env: TokEnv = bt.into_tok_env(Some(vocab.max(n as usize))).map_err(|e| err(e.to_string()))?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| err(e.to_string()))?;
        factory.quiet();
        Ok(GrammarCompiler { factory, think })
    }

    pub fn compile(&self, format: &ResponseFormat) -> Result<Constraint> {
        let mut schema = match format {
            ResponseFormat::JsonObject => json!({"type": "object"}),
            ResponseFormat::JsonSchema(s) => s.clone(),
        };
        // compact JSON (", " and ": " separators, no free whitespace): a model can not stall
        // in endless whitespace, and the output is what clients expect
        if let Some(obj) = schema.as_object_mut() {
            obj.entry("x-guidance")
                .or_insert(json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| Error::Input(format!("response_format: invalid JSON schema: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::Input(format!("response_format: {e}")));
        }
        Ok(Constraint { matcher, state: State::First, think: self.think })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first token: the grammar applies, but `<think>` may open a reasoning block.
    First,
    Thinking,
    Active,
}

pub struct Constraint {
    matcher: Matcher,
    state: State,
    think: Option<(u32, u32)>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Constraint({:?})", self.state)
    }
}

pub type SharedCompiler = Arc<GrammarCompiler>;

impl Constraint {
    /// Set the logits of forbidden tokens to -inf.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<()> {
        if self.state == State::Thinking {
            return Ok(());
        }
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| Error::Input(format!("constrained decoding: {e}")))?;
        let open = if self.state == State::First { self.think.map(|t| t.0) } else { None };
        for (t, l) in logits.iter_mut().enumerate() {
            if !mask.is_allowed(t as u32) && Some(t as u32) != open {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advance past the sampled token.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        match (self.state, self.think) {
            (State::First, Some((open, _))) if token == open => self.state = State::Thinking,
            (State::Thinking, Some((_, close))) => {
                if token == close {
                    self.state = State::Active;
                }
            }
            (State::Thinking, None) => self.state = State::Active,
            _ => {
                self.state = State::Active;
                if !self.matcher.is_stopped() {
                    self.matcher.consume_token(token).map_err(|e| Error::Input(format!("constrained decoding: {e}")))?;
                }
            }
        }
        Ok(())
    }

    /// The grammar is complete and allows nothing further.
    pub fn is_finished(&self) -> bool {
        self.state == State::Active && self.matcher.is_stopped()
    }
}
