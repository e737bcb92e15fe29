//! OpenAI request bodies and their translation into engine requests.

use std::collections::HashMap;

use moeserve_engine::sampling::SamplingParams;
use moeserve_engine::Request;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::Ready;

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Sampling fields shared by chat and completions (OpenAI names; vLLM-style extensions).
#[derive(Debug, Deserialize, Default)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub n: Option<usize>,
    pub stop: Option<OneOrMany>,
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    pub tools: Option<Vec<Value>>,
    pub response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Completions API: number of top log-probabilities (0 = only the sampled token's).
    pub logprobs: Option<usize>,
}

pub fn check_model(ready: &Ready, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if !m.is_empty() && m != &ready.model_name => Err(ApiError::model_not_found(m, &ready.model_name)),
        _ => Ok(()),
    }
}

/// Chat messages normalized for the chat template: string content (text parts joined),
/// roles checked, `reasoning_content` of earlier turns dropped (the template never re-sends it).
pub fn normalize_messages(messages: &[Value]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "`messages` must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let obj = m.as_object().ok_or_else(|| ApiError::invalid_param(&param, "each message must be an object"))?;
            let role =
                obj.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::invalid_param(&param, "missing `role`"))?;
            if !matches!(role, "system" | "user" | "assistant" | "tool" | "developer") {
                return Err(ApiError::invalid_param(&format!("{param}.role"), format!("unknown role `{role}`")));
            }
            let content = match obj.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t.to_string()),
                        _ => Err(ApiError::invalid_param(&format!("{param}.content"), "only text content parts are supported")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                Some(_) => {
                    return Err(ApiError::invalid_param(
                        &format!("{param}.content"),
                        "content must be a string or an array of text parts",
                    ))
                }
            };
            let role = if role == "developer" { "system" } else { role };
            let mut out = json!({"role": role, "content": content});
            if let Some(tc) = obj.get("tool_calls").filter(|v| !v.is_null()) {
                out["tool_calls"] = tc.clone();
            }
            Ok(out)
        })
        .collect()
}

/// Build the engine request; `prompt_len` is known, the context window bounds max_tokens.
pub fn engine_request(ready: &Ready, prompt: Vec<u32>, s: &Sampling, logprobs: Option<usize>) -> Result<Request, ApiError> {
    let d = &ready.defaults;
    let room = ready.context.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::context_overflow(format!(
            "This model's maximum context length is {} tokens; the prompt has {}.",
            ready.context,
            prompt.len()
        )));
    }
    let max_tokens = s.max_completion_tokens.or(s.max_tokens).unwrap_or(room);
    if max_tokens == 0 {
        return Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1"));
    }
    if max_tokens > room {
        return Err(ApiError::context_overflow(format!(
            "This model's maximum context length is {} tokens; the prompt has {} and max_tokens asks for {max_tokens}.",
            ready.context,
            prompt.len()
        )));
    }
    let top_k = match s.top_k {
        None => d.top_k,
        Some(k) if k <= 0 => 0,
        Some(k) => k as usize,
    };
    let logit_bias = s
        .logit_bias
        .iter()
        .flatten()
        .map(|(k, v)| {
            k.parse::<u32>()
                .map(|t| (t, *v))
                .map_err(|_| ApiError::invalid_param("logit_bias", format!("`{k}` is not a token id")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(d.temperature),
        top_p: s.top_p.unwrap_or(d.top_p),
        top_k,
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        logit_bias,
        seed: s.seed,
    };
    let stop = match &s.stop {
        None => vec![],
        Some(OneOrMany::One(x)) => vec![x.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    Ok(Request {
        prompt,
        sampling,
        max_tokens,
        stop_token_ids: s.stop_token_ids.clone().unwrap_or_default(),
        stop,
        ignore_eos: s.ignore_eos,
        n: s.n.unwrap_or(1),
        logprobs,
    })
}
