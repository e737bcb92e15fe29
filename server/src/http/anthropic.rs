//! Anthropic Messages API: `POST /v1/messages` (content blocks, system, `thinking` blocks for R1
//! reasoning, the streaming event sequence) and `POST /v1/messages/count_tokens`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Request as HttpRequest, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use moeserve_engine::reasoning::ReasoningParser;
use moeserve_engine::tools::{ToolCall, ToolCallDetector};
use moeserve_engine::{Event, FinishReason, RequestStream, Usage};
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat::read_json;
use super::error::ApiError;
use super::openai::{self, OneOrMany, Sampling};
use super::{AppState, Ready};

/// An `ApiError` rendered in Anthropic's error schema.
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let e = self.0;
        let kind = match e.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_server_error() => "api_error",
            _ => "invalid_request_error",
        };
        let mut r = (e.status, Json(json!({"type": "error", "error": {"type": kind, "message": e.message}}))).into_response();
        if let Some(v) = e.retry_after.and_then(|s| axum::http::HeaderValue::from_str(&s.to_string()).ok()) {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        r
    }
}

#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: Option<String>,
    pub max_tokens: usize,
    pub messages: Vec<Value>,
    pub system: Option<Value>,
    #[serde(default)]
    pub stream: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub stop_sequences: Option<Vec<String>>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct CountTokensRequest {
    pub model: Option<String>,
    pub messages: Vec<Value>,
    pub system: Option<Value>,
    pub tools: Option<Vec<Value>>,
}

/// Text of a `tool_result` content: a string or text blocks.
fn result_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join(""),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Anthropic messages (+ system) as chat-template messages: text blocks joined, `tool_use`
/// blocks become the assistant's tool calls, `tool_result` blocks become tool messages.
fn chat_messages(system: &Option<Value>, messages: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(s) = system {
        let text = match s {
            Value::String(t) => t.clone(),
            Value::Array(_) => result_text(s),
            _ => return Err(ApiError::invalid_param("system", "system must be a string or text blocks")),
        };
        out.push(json!({"role": "system", "content": text}));
    }
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages.{i}");
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if role != "user" && role != "assistant" {
            return Err(ApiError::invalid_param(
                &format!("{param}.role"),
                format!("role must be `user` or `assistant`, got `{role}`"),
            ));
        }
        let blocks = match m.get("content") {
            Some(Value::String(t)) => vec![json!({"type": "text", "text": t})],
            Some(Value::Array(b)) => b.clone(),
            _ => {
                return Err(ApiError::invalid_param(
                    &format!("{param}.content"),
                    "content must be a string or a list of content blocks",
                ))
            }
        };
        let (mut text, mut calls, mut results) = (String::new(), Vec::new(), Vec::new());
        for b in &blocks {
            match b.get("type").and_then(Value::as_str) {
                Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                Some("thinking") | Some("redacted_thinking") => {}
                Some("tool_use") if role == "assistant" => {
                    let name = b
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::invalid_param(&param, "tool_use needs a name"))?;
                    let input = b.get("input").cloned().unwrap_or(json!({}));
                    calls.push(json!({"type": "function", "function": {"name": name, "arguments": input.to_string()}}));
                }
                Some("tool_result") if role == "user" => results.push(result_text(b.get("content").unwrap_or(&Value::Null))),
                Some(other) => {
                    return Err(ApiError::invalid_param(
                        &format!("{param}.content"),
                        format!("content blocks of type `{other}` are not supported here"),
                    ))
                }
                None => return Err(ApiError::invalid_param(&format!("{param}.content"), "malformed content block")),
            }
        }
        for r in results {
            out.push(json!({"role": "tool", "content": r}));
        }
        if !calls.is_empty() {
            out.push(json!({"role": "assistant", "content": text, "tool_calls": calls}));
        } else if !text.is_empty() || role == "assistant" || out.last().is_none_or(|l| l["role"] != "tool") {
            out.push(json!({"role": role, "content": text}));
        }
    }
    openai::normalize_messages(&out)
}

/// Anthropic `tools` / `tool_choice` as the OpenAI-shaped system message.
fn tools_message(tools: &Option<Vec<Value>>, choice: &Option<Value>) -> Result<Option<Value>, ApiError> {
    let Some(tools) = tools.as_ref().filter(|t| !t.is_empty()) else { return Ok(None) };
    let converted: Vec<Value> = tools
        .iter()
        .map(|t| json!({"type": "function", "function": {"name": t.get("name"), "description": t.get("description"), "parameters": t.get("input_schema")}}))
        .collect();
    let choice = match choice.as_ref().and_then(|c| c.get("type")).and_then(Value::as_str) {
        None | Some("auto") => None,
        Some("any") => Some(json!("required")),
        Some("none") => Some(json!("none")),
        Some("tool") => Some(
            json!({"type": "function", "function": {"name": choice.as_ref().and_then(|c| c.get("name")).cloned().unwrap_or(Value::Null)}}),
        ),
        Some(other) => return Err(ApiError::invalid_param("tool_choice", format!("unknown tool_choice type `{other}`"))),
    };
    openai::tools_system_message(&Some(converted), &choice)
}

fn encode_prompt(
    ready: &Ready,
    system: &Option<Value>,
    messages: &[Value],
    tools: Option<Value>,
) -> Result<(Vec<u32>, String), ApiError> {
    let tok = ready.tokenizer.as_ref().ok_or_else(|| ApiError::invalid("this model has no tokenizer"))?;
    let mut msgs = chat_messages(system, messages)?;
    if let Some(t) = tools {
        msgs.insert(0, t);
    }
    let rendered = tok.apply_chat_template(&msgs, true).map_err(|e| ApiError::invalid(e.to_string()))?;
    let ids = tok.encode(&rendered).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok((ids, rendered))
}

pub async fn count_tokens(State(app): State<Arc<AppState>>, req: HttpRequest) -> Result<Json<Value>, AnthropicError> {
    let ready = app.ready()?;
    let body: CountTokensRequest = read_json(&app, req).await?;
    openai::check_model(&ready, &body.model)?;
    let (ids, _) = encode_prompt(&ready, &body.system, &body.messages, tools_message(&body.tools, &None)?)?;
    Ok(Json(json!({"input_tokens": ids.len()})))
}

fn stop_reason(reason: FinishReason, stop: &Option<String>, tool_use: bool) -> &'static str {
    match (reason, stop) {
        (FinishReason::Length, _) => "max_tokens",
        (_, Some(_)) => "stop_sequence",
        _ if tool_use => "tool_use",
        _ => "end_turn",
    }
}

/// A parsed call as a `tool_use` block (arguments that are not JSON become `{"raw": ...}`).
fn tool_use_block(c: &ToolCall) -> Value {
    let input: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({"raw": c.arguments}));
    json!({"type": "tool_use", "id": format!("toolu_{:024x}", rand::random::<u128>() >> 32), "name": c.name, "input": input})
}

fn usage_json(u: &Usage) -> Value {
    let mut v = json!({"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens, "cache_read_input_tokens": u.cached_prompt_tokens});
    if let Some(sp) = &u.speculative {
        v["speculative"] = super::chat::speculative_json(sp);
    }
    v
}

pub async fn messages(State(app): State<Arc<AppState>>, req: HttpRequest) -> Result<Response, AnthropicError> {
    let ready = app.ready()?;
    let key = super::chat::key_of(&req);
    let body: MessagesRequest = read_json(&app, req).await?;
    openai::check_model(&ready, &body.model)?;
    let tools = tools_message(&body.tools, &body.tool_choice)?;
    let with_tools = tools.is_some();
    let (prompt, rendered) = encode_prompt(&ready, &body.system, &body.messages, tools)?;
    let sampling = Sampling {
        temperature: body.temperature,
        top_p: body.top_p,
        top_k: body.top_k,
        stop: body.stop_sequences.clone().map(OneOrMany::Many),
        max_tokens: Some(body.max_tokens),
        ..Default::default()
    };
    let input_tokens = prompt.len();
    let request = openai::engine_request(&ready, prompt, &sampling, None)?;
    app.limiter.admit_tokens(&key.0, request.prompt.len(), request.max_tokens).map_err(ApiError::from)?;
    let stream = ready.engine.submit(request).map_err(ApiError::from)?;
    let parser = ready.reasoning.then(|| ReasoningParser::new(rendered.trim_end().ends_with("<think>")));
    let id = format!("msg_{:024x}", rand::random::<u128>() >> 32);
    if body.stream {
        let st = StreamState {
            stream,
            parser,
            tools: with_tools.then(ToolCallDetector::default),
            block: Block::None,
            index: 0,
            started: false,
            id,
            model: ready.model_name.clone(),
            input_tokens,
        };
        Ok(Sse::new(event_stream(st)).keep_alive(KeepAlive::default()).into_response())
    } else {
        let tools = with_tools.then(ToolCallDetector::default);
        Ok(Json(collect(stream, parser, tools, id, &ready.model_name).await?).into_response())
    }
}

async fn collect(
    mut stream: RequestStream,
    mut parser: Option<ReasoningParser>,
    mut tools: Option<ToolCallDetector>,
    id: String,
    model: &str,
) -> Result<Value, ApiError> {
    let (mut thinking, mut text) = (String::new(), String::new());
    let mut end = (FinishReason::Stop, None, Usage::default());
    let mut add = |parser: &mut Option<ReasoningParser>, t: &str, last: bool| match parser {
        Some(p) => {
            let mut s = p.push(t);
            if last {
                let f = p.finish();
                s.reasoning += &f.reasoning;
                s.content += &f.content;
            }
            thinking += &s.reasoning;
            text += &s.content;
        }
        None => text += t,
    };
    while let Some(ev) = stream.next().await {
        match ev {
            Event::Token { text: t, .. } => add(&mut parser, &t, false),
            Event::Finished { reason, text: t, usage, stop, .. } => {
                add(&mut parser, &t, true);
                end = (reason, stop, usage);
            }
            Event::Error(e) => return Err(ApiError::internal(e)),
        }
    }
    let calls = match tools.as_mut() {
        Some(d) => {
            let mut shown = d.push(&text).content;
            let (rest, calls, _) = d.finish();
            shown.push_str(&rest);
            text = shown;
            calls
        }
        None => Vec::new(),
    };
    let mut content = Vec::new();
    if !thinking.is_empty() {
        content.push(json!({"type": "thinking", "thinking": thinking, "signature": ""}));
    }
    if !text.is_empty() || calls.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    content.extend(calls.iter().map(tool_use_block));
    Ok(json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason(end.0, &end.1, !calls.is_empty()), "stop_sequence": end.1, "usage": usage_json(&end.2),
    }))
}

/// Which content block is open in the stream.
#[derive(Clone, Copy, PartialEq)]
enum Block {
    None,
    Thinking,
    Text,
    Tool,
}

struct StreamState {
    stream: RequestStream,
    parser: Option<ReasoningParser>,
    tools: Option<ToolCallDetector>,
    block: Block,
    index: usize,
    started: bool,
    id: String,
    model: String,
    input_tokens: usize,
}

fn ev(name: &str, data: Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

impl StreamState {
    /// Events that switch to `want` (closing the open block) and carry `delta`.
    fn delta(&mut self, want: Block, delta: &str, out: &mut Vec<SseEvent>) {
        if delta.is_empty() {
            return;
        }
        if self.block != want {
            if self.block != Block::None {
                out.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": self.index})));
                self.index += 1;
            }
            let cb = match want {
                Block::Thinking => json!({"type": "thinking", "thinking": ""}),
                _ => json!({"type": "text", "text": ""}),
            };
            out.push(ev("content_block_start", json!({"type": "content_block_start", "index": self.index, "content_block": cb})));
            self.block = want;
        }
        let d = match want {
            Block::Thinking => json!({"type": "thinking_delta", "thinking": delta}),
            _ => json!({"type": "text_delta", "text": delta}),
        };
        out.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": self.index, "delta": d})));
    }

    fn text(&mut self, t: &str, last: bool, out: &mut Vec<SseEvent>) {
        let (mut r, mut c) = match self.parser.as_mut() {
            Some(p) => {
                let s = p.push(t);
                (s.reasoning, s.content)
            }
            None => (String::new(), t.to_string()),
        };
        if last {
            if let Some(p) = self.parser.as_mut() {
                let f = p.finish();
                r += &f.reasoning;
                c += &f.content;
            }
        }
        let c = match self.tools.as_mut() {
            Some(d) => d.push(&c).content,
            None => c,
        };
        self.delta(Block::Thinking, &r, out);
        self.delta(Block::Text, &c, out);
    }

    /// Close the open block and emit the parsed tool calls as `tool_use` blocks.
    fn tool_blocks(&mut self, out: &mut Vec<SseEvent>) -> bool {
        let Some(d) = self.tools.as_mut() else { return false };
        let (rest, calls, _) = d.finish();
        self.delta(Block::Text, &rest, out);
        for c in &calls {
            if self.block != Block::None {
                out.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": self.index})));
                self.index += 1;
            }
            let mut block = tool_use_block(c);
            let input = std::mem::replace(&mut block["input"], json!({}));
            out.push(ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": self.index, "content_block": block}),
            ));
            let delta = json!({"type": "input_json_delta", "partial_json": input.to_string()});
            out.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": self.index, "delta": delta})));
            self.block = Block::Tool;
        }
        !calls.is_empty()
    }
}

fn event_stream(st: StreamState) -> impl futures_util::Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(Some(st), |state| async move {
        let mut st = state?;
        let mut out = Vec::new();
        let ev_in = st.stream.next().await;
        if !st.started {
            st.started = true;
            let msg = json!({"id": st.id, "type": "message", "role": "assistant", "model": st.model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": st.input_tokens, "output_tokens": 0}});
            out.push(ev("message_start", json!({"type": "message_start", "message": msg})));
        }
        match ev_in {
            Some(Event::Token { text, .. }) => {
                st.text(&text, false, &mut out);
                Some((out, Some(st)))
            }
            Some(Event::Finished { reason, text, usage, stop, .. }) => {
                st.text(&text, true, &mut out);
                let tool_use = st.tool_blocks(&mut out);
                if st.block == Block::None {
                    let cb = json!({"type": "text", "text": ""});
                    out.push(ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": cb})));
                }
                out.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": st.index})));
                out.push(ev(
                    "message_delta",
                    json!({"type": "message_delta", "delta": {"stop_reason": stop_reason(reason, &stop, tool_use), "stop_sequence": stop}, "usage": usage_json(&usage)}),
                ));
                out.push(ev("message_stop", json!({"type": "message_stop"})));
                Some((out, None))
            }
            Some(Event::Error(e)) => {
                out.push(ev("error", json!({"type": "error", "error": {"type": "api_error", "message": e}})));
                Some((out, None))
            }
            None => Some((out, None)),
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}
