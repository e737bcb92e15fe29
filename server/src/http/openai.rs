//! OpenAI request bodies and their translation into engine requests.

use std::collections::HashMap;

use moeserve_engine::constraint::ResponseFormat;
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
    pub tool_choice: Option<Value>,
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
                out["tool_calls"] = normalize_tool_calls(tc, &format!("{param}.tool_calls"))?;
            }
            Ok(out)
        })
        .collect()
}

/// Past tool calls as the chat template renders them: `type` present, `arguments` a string.
fn normalize_tool_calls(v: &Value, param: &str) -> Result<Value, ApiError> {
    let calls = v.as_array().ok_or_else(|| ApiError::invalid_param(param, "tool_calls must be an array"))?;
    calls
        .iter()
        .map(|c| {
            let f = c.get("function").ok_or_else(|| ApiError::invalid_param(param, "each tool call needs a `function`"))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid_param(param, "function.name is required"))?;
            let arguments = match f.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => "{}".to_string(),
                Some(other) => other.to_string(),
            };
            let kind = c.get("type").and_then(Value::as_str).unwrap_or("function");
            Ok(json!({"type": kind, "function": {"name": name, "arguments": arguments}}))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// The system message describing `tools` for `tool_choice` (None: tools are off).
pub fn tools_system_message(tools: &Option<Vec<Value>>, tool_choice: &Option<Value>) -> Result<Option<Value>, ApiError> {
    let Some(tools) = tools.as_ref().filter(|t| !t.is_empty()) else { return Ok(None) };
    for (i, t) in tools.iter().enumerate() {
        if t.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).is_none() {
            return Err(ApiError::invalid_param(&format!("tools[{i}]"), "each tool needs function.name"));
        }
    }
    let instruction = match tool_choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "auto" => None,
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "required" => Some("You must call at least one of the functions above.".to_string()),
        Some(v) => match v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(n) if tools.iter().any(|t| t["function"]["name"] == n) => Some(format!("You must call the function `{n}`.")),
            Some(n) => return Err(ApiError::invalid_param("tool_choice", format!("`{n}` is not one of the tools"))),
            None => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    "expected none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ))
            }
        },
    };
    let text = moeserve_engine::tools::tools_preamble(tools, instruction.as_deref());
    Ok(Some(json!({"role": "system", "content": text})))
}

/// `response_format`: text (None), `json_object`, or `json_schema` with its `schema`.
pub fn response_format(v: &Option<Value>) -> Result<Option<ResponseFormat>, ApiError> {
    let Some(v) = v.as_ref().filter(|v| !v.is_null()) else { return Ok(None) };
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => {
            let schema =
                v.get("json_schema").and_then(|j| j.get("schema")).filter(|s| s.is_object() || s.is_boolean()).ok_or_else(
                    || ApiError::invalid_param("response_format", "json_schema needs a `json_schema.schema` object"),
                )?;
            Ok(Some(ResponseFormat::JsonSchema(schema.clone())))
        }
        _ => Err(ApiError::invalid_param("response_format", "type must be text, json_object or json_schema")),
    }
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
        response_format: None,
    })
}
