//! `POST /v1/chat/completions` and `POST /v1/completions`: non-streaming and SSE streaming,
//! R1 reasoning split into `reasoning_content`, usage with cached and reasoning token counts.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Request as HttpRequest, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use moeserve_engine::reasoning::ReasoningParser;
use moeserve_engine::sampling::TokenLogprob;
use moeserve_engine::tools::{ToolCall, ToolCallDetector, ToolDelta};
use moeserve_engine::{Event, FinishReason, RequestStream, Usage};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::error::ApiError;
use super::limits::{KeyId, KeyUsage};
use super::openai::{self, ChatRequest, CompletionRequest, Prompt};
use super::{AppState, Ready};

/// Read and parse a JSON body, with the size limit and errors in the API's schema.
pub async fn read_json<T: DeserializeOwned>(app: &AppState, req: HttpRequest) -> Result<T, ApiError> {
    let bytes =
        axum::body::to_bytes(req.into_body(), app.max_body_bytes).await.map_err(|_| ApiError::too_large(app.max_body_bytes))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("Invalid request body: {e}")))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Per-choice state while events arrive.
struct Choice {
    parser: Option<ReasoningParser>,
    content: String,
    reasoning: String,
    reasoning_tokens: usize,
    logprobs: Vec<Value>,
    finish: Option<FinishReason>,
    role_sent: bool,
    /// Present when the request offered tools.
    tools: Option<ToolCallDetector>,
    tool_calls: Vec<ToolCall>,
}

/// What one event contributed to a choice.
#[derive(Default)]
struct Applied {
    reasoning: String,
    content: String,
    logprob: Option<Value>,
    tools: Vec<ToolDelta>,
}

struct Collector {
    kind: Kind,
    ready: Arc<Ready>,
    id: String,
    created: u64,
    choices: Vec<Choice>,
    usage: Usage,
    want_logprobs: bool,
    key_usage: Option<Arc<KeyUsage>>,
}

fn finish_reason(r: FinishReason, tool_calls: bool) -> &'static str {
    match r {
        FinishReason::Stop if tool_calls => "tool_calls",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

fn tool_calls_json(calls: &[ToolCall]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|c| {
                json!({"id": format!("call_{:024x}", rand::random::<u128>() >> 32), "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect(),
    )
}

impl Collector {
    fn new(kind: Kind, ready: Arc<Ready>, n: usize, reasoning_from_start: Option<bool>, want_logprobs: bool) -> Self {
        let id = format!("{}-{:016x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, rand::random::<u64>());
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let choices = (0..n)
            .map(|_| Choice {
                parser: reasoning_from_start.map(ReasoningParser::new),
                content: String::new(),
                reasoning: String::new(),
                reasoning_tokens: 0,
                logprobs: Vec::new(),
                finish: None,
                role_sent: false,
                tools: None,
                tool_calls: Vec::new(),
            })
            .collect();
        Collector { kind, ready, id, created, choices, usage: Usage::default(), want_logprobs, key_usage: None }
    }

    fn token_text(&self, id: u32) -> String {
        self.ready.tokenizer.as_ref().and_then(|t| t.decode(&[id]).ok()).unwrap_or_default()
    }

    fn logprob_json(&self, lp: &TokenLogprob) -> Value {
        let entry = |id: u32, logprob: f32| {
            let t = self.token_text(id);
            json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
        };
        let mut v = entry(lp.token, lp.logprob);
        v["top_logprobs"] = Value::Array(lp.top.iter().map(|&(id, l)| entry(id, l)).collect());
        v
    }

    /// Apply one engine event; returns the (reasoning, content) delta, its logprob entry and
    /// tool-call pieces.
    fn apply(&mut self, index: usize, text: &str, logprob: Option<&TokenLogprob>, counts_token: bool) -> Applied {
        let lp = logprob.filter(|_| self.want_logprobs).map(|l| self.logprob_json(l));
        let Some(c) = self.choices.get_mut(index) else { return Applied::default() };
        let (r, t) = match c.parser.as_mut() {
            Some(p) => {
                let was = p.in_reasoning();
                let s = p.push(text);
                if counts_token && (was || p.in_reasoning() || !s.reasoning.is_empty()) {
                    c.reasoning_tokens += 1;
                }
                (s.reasoning, s.content)
            }
            None => (String::new(), text.to_string()),
        };
        let (t, tools) = match c.tools.as_mut() {
            Some(d) => {
                let p = d.push(&t);
                (p.content, p.tools)
            }
            None => (t, Vec::new()),
        };
        c.reasoning.push_str(&r);
        c.content.push_str(&t);
        if let Some(l) = &lp {
            c.logprobs.push(l.clone());
        }
        Applied { reasoning: r, content: t, logprob: lp, tools }
    }

    fn finish(&mut self, index: usize, reason: FinishReason, text: &str, usage: Usage) -> Applied {
        let Applied { reasoning: mut r, content: mut t, mut tools, .. } = self.apply(index, text, None, false);
        if let Some(c) = self.choices.get_mut(index) {
            if let Some(p) = c.parser.as_mut() {
                let s = p.finish();
                c.reasoning.push_str(&s.reasoning);
                r.push_str(&s.reasoning);
                let content = match c.tools.as_mut() {
                    Some(d) => {
                        let p = d.push(&s.content);
                        tools.extend(p.tools);
                        p.content
                    }
                    None => s.content,
                };
                c.content.push_str(&content);
                t.push_str(&content);
            }
            if let Some(d) = c.tools.as_mut() {
                let (rest, calls, tail) = d.finish();
                c.content.push_str(&rest);
                t.push_str(&rest);
                c.tool_calls = calls;
                tools.extend(tail);
            }
            c.finish = Some(reason);
        }
        self.usage.prompt_tokens = usage.prompt_tokens;
        self.usage.cached_prompt_tokens = self.usage.cached_prompt_tokens.max(usage.cached_prompt_tokens);
        self.usage.completion_tokens += usage.completion_tokens;
        if let Some(sp) = &usage.speculative {
            self.usage.speculative.get_or_insert_with(Default::default).merge(sp);
        }
        if let Some(k) = &self.key_usage {
            k.completion_tokens.fetch_add(usage.completion_tokens as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Applied { reasoning: r, content: t, logprob: None, tools }
    }

    fn usage_json(&self) -> Value {
        let reasoning: usize = self.choices.iter().map(|c| c.reasoning_tokens).sum();
        let mut u = json!({
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "total_tokens": self.usage.prompt_tokens + self.usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.usage.cached_prompt_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        });
        if let Some(sp) = &self.usage.speculative {
            u["speculative"] = speculative_json(sp);
        }
        u
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn chunk(&self, choice: Value) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.ready.model_name, "choices": [choice]})
    }

    /// A streaming chunk for a delta (None when there is nothing to send).
    fn delta_chunk(&mut self, index: usize, a: Applied, finish: Option<FinishReason>) -> Option<Value> {
        let Applied { reasoning: r, content: t, logprob: lp, tools } = a;
        if r.is_empty() && t.is_empty() && lp.is_none() && tools.is_empty() && finish.is_none() {
            return None;
        }
        let logprobs = lp.map(|l| match self.kind {
            Kind::Chat => json!({"content": [l]}),
            Kind::Completion => {
                json!({"tokens": [l["token"]], "token_logprobs": [l["logprob"]], "top_logprobs": [l["top_logprobs"]]})
            }
        });
        let calls = self.choices.get(index).map(|c| c.tool_calls.clone()).unwrap_or_default();
        let fr = finish.map(|f| finish_reason(f, !calls.is_empty()));
        Some(match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if !tools.is_empty() {
                    delta["tool_calls"] = Self::tool_call_deltas(&tools);
                }
                if let Some(c) = self.choices.get_mut(index) {
                    if !c.role_sent {
                        delta["role"] = json!("assistant");
                        c.role_sent = true;
                    }
                }
                if !r.is_empty() {
                    delta["reasoning_content"] = json!(r);
                }
                if !t.is_empty() {
                    delta["content"] = json!(t);
                }
                self.chunk(json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": fr}))
            }
            Kind::Completion => self.chunk(json!({"index": index, "text": t, "logprobs": logprobs, "finish_reason": fr})),
        })
    }

    /// OpenAI streaming tool-call entries: the first carries id, type and name, the rest
    /// argument text.
    fn tool_call_deltas(tools: &[ToolDelta]) -> Value {
        Value::Array(
            tools
                .iter()
                .map(|d| match d {
                    ToolDelta::Start { index: i, name } => {
                        let id = format!("call_{:024x}", rand::random::<u128>() >> 32);
                        json!({"index": i, "id": id, "type": "function", "function": {"name": name, "arguments": ""}})
                    }
                    ToolDelta::Args { index: i, text } => json!({"index": i, "function": {"arguments": text}}),
                })
                .collect(),
        )
    }

    fn full_response(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let fr = c.finish.map(|f| finish_reason(f, !c.tool_calls.is_empty()));
                match self.kind {
                    Kind::Chat => {
                        let mut message = json!({"role": "assistant", "content": c.content});
                        if !c.tool_calls.is_empty() {
                            message["tool_calls"] = tool_calls_json(&c.tool_calls);
                            if c.content.is_empty() {
                                message["content"] = Value::Null;
                            }
                        }
                        if c.parser.is_some() && !c.reasoning.is_empty() {
                            message["reasoning_content"] = json!(c.reasoning);
                        }
                        let logprobs = self.want_logprobs.then(|| json!({"content": c.logprobs}));
                        json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": fr})
                    }
                    Kind::Completion => {
                        let logprobs = self.want_logprobs.then(|| {
                            json!({
                                "tokens": c.logprobs.iter().map(|l| l["token"].clone()).collect::<Vec<_>>(),
                                "token_logprobs": c.logprobs.iter().map(|l| l["logprob"].clone()).collect::<Vec<_>>(),
                                "top_logprobs": c.logprobs.iter().map(|l| l["top_logprobs"].clone()).collect::<Vec<_>>(),
                            })
                        });
                        json!({"index": i, "text": c.content, "logprobs": logprobs, "finish_reason": fr})
                    }
                }
            })
            .collect();
        json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.ready.model_name,
            "choices": choices, "usage": self.usage_json(),
        })
    }
}

async fn collect_all(mut stream: RequestStream, mut col: Collector) -> Result<Value, ApiError> {
    while let Some(ev) = stream.next().await {
        match ev {
            Event::Token { index, text, logprob, .. } => {
                col.apply(index, &text, logprob.as_ref(), true);
            }
            Event::Finished { index, reason, text, usage, .. } => {
                col.finish(index, reason, &text, usage);
            }
            Event::Error(e) => return Err(ApiError::internal(e)),
        }
    }
    Ok(col.full_response())
}

fn sse_stream(stream: RequestStream, col: Collector, include_usage: bool) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: &Value| SseEvent::default().data(v.to_string());
    stream::unfold(Some((stream, col)), move |state| async move {
        let (mut stream, mut col) = state?;
        let mut out = Vec::new();
        match stream.next().await {
            Some(Event::Token { index, text, logprob, .. }) => {
                let a = col.apply(index, &text, logprob.as_ref(), true);
                out.extend(col.delta_chunk(index, a, None).as_ref().map(data));
            }
            Some(Event::Finished { index, reason, text, usage, .. }) => {
                let a = col.finish(index, reason, &text, usage);
                out.extend(col.delta_chunk(index, a, Some(reason)).as_ref().map(data));
            }
            Some(Event::Error(e)) => {
                out.push(data(&json!({"error": {"message": e, "type": "server_error", "param": null, "code": null}})));
                out.push(SseEvent::default().data("[DONE]"));
                return Some((out, None));
            }
            None => {
                if include_usage {
                    let mut u = col.chunk(json!(null));
                    u["choices"] = json!([]);
                    u["usage"] = col.usage_json();
                    out.push(data(&u));
                }
                out.push(SseEvent::default().data("[DONE]"));
                return Some((out, None));
            }
        }
        Some((out, Some((stream, col))))
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}

async fn respond(stream: RequestStream, col: Collector, streaming: bool, include_usage: bool) -> Result<Response, ApiError> {
    if streaming {
        Ok(Sse::new(sse_stream(stream, col, include_usage)).keep_alive(KeepAlive::default()).into_response())
    } else {
        Ok(Json(collect_all(stream, col).await?).into_response())
    }
}

/// The key label and usage counters the auth layer attached.
pub fn key_of(req: &HttpRequest) -> (String, Option<Arc<KeyUsage>>) {
    let label = req.extensions().get::<KeyId>().map_or_else(|| "anonymous".to_string(), |k| k.0.clone());
    (label, req.extensions().get::<Arc<KeyUsage>>().cloned())
}

/// Charge the key's tokens/min and submit. Structured output compiles a grammar (the first one
/// also builds the token trie), so that submit runs off the async workers.
async fn submit(
    app: &AppState,
    ready: &Arc<Ready>,
    key: &(String, Option<Arc<KeyUsage>>),
    request: moeserve_engine::Request,
) -> Result<RequestStream, ApiError> {
    app.limiter.admit_tokens(&key.0, request.prompt.len(), request.max_tokens * request.n)?;
    if request.response_format.is_none() {
        return Ok(ready.engine.submit(request)?);
    }
    let r = ready.clone();
    let submitted = tokio::task::spawn_blocking(move || r.engine.submit(request)).await;
    Ok(submitted.map_err(|e| ApiError::internal(format!("grammar compilation failed: {e}")))??)
}

pub async fn chat_completions(State(app): State<Arc<AppState>>, req: HttpRequest) -> Result<Response, ApiError> {
    let ready = app.ready()?;
    let key = key_of(&req);
    let body: ChatRequest = read_json(&app, req).await?;
    openai::check_model(&ready, &body.model)?;
    let format = openai::response_format(&body.response_format)?;
    let tok = ready
        .tokenizer
        .as_ref()
        .ok_or_else(|| ApiError::invalid("this model has no tokenizer; use /v1/completions with token ids"))?;
    let mut messages = openai::normalize_messages(&body.messages)?;
    let tools_msg = openai::tools_system_message(&body.tools, &body.tool_choice)?;
    let with_tools = tools_msg.is_some();
    if let Some(m) = tools_msg {
        messages.insert(0, m);
    }
    let rendered = tok.apply_chat_template(&messages, true).map_err(|e| ApiError::invalid(e.to_string()))?;
    let prompt = tok.encode(&rendered).map_err(|e| ApiError::invalid(e.to_string()))?;
    let top = if body.logprobs { Some(body.top_logprobs.unwrap_or(0)) } else { None };
    let mut request = openai::engine_request(&ready, prompt, &body.sampling, top)?;
    request.response_format = format;
    let n = request.n;
    let stream = submit(&app, &ready, &key, request).await?;
    let reasoning = ready.reasoning.then(|| rendered.trim_end().ends_with("<think>"));
    let mut col = Collector::new(Kind::Chat, ready.clone(), n, reasoning, body.logprobs);
    col.key_usage = key.1;
    if with_tools {
        col.choices.iter_mut().for_each(|c| c.tools = Some(ToolCallDetector::default()));
    }
    let include_usage = body.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
    respond(stream, col, body.sampling.stream, include_usage).await
}

pub async fn completions(State(app): State<Arc<AppState>>, req: HttpRequest) -> Result<Response, ApiError> {
    let ready = app.ready()?;
    let key = key_of(&req);
    let body: CompletionRequest = read_json(&app, req).await?;
    openai::check_model(&ready, &body.model)?;
    let encode = |text: &str| -> Result<Vec<u32>, ApiError> {
        let tok = ready
            .tokenizer
            .as_ref()
            .ok_or_else(|| ApiError::invalid_param("prompt", "this model has no tokenizer: send token ids"))?;
        let mut ids: Vec<u32> = ready.bos.into_iter().collect();
        ids.extend(tok.encode(text).map_err(|e| ApiError::invalid(e.to_string()))?);
        Ok(ids)
    };
    let prompt = match &body.prompt {
        Prompt::Ids(ids) => ids.clone(),
        Prompt::Text(text) => encode(text)?,
        Prompt::Texts(t) if t.len() == 1 => encode(&t[0])?,
        Prompt::Texts(_) => {
            return Err(ApiError::invalid_param("prompt", "batched prompts are not supported; send one prompt per request"))
        }
    };
    let request = openai::engine_request(&ready, prompt, &body.sampling, body.logprobs)?;
    let n = request.n;
    let stream = submit(&app, &ready, &key, request).await?;
    let mut col = Collector::new(Kind::Completion, ready.clone(), n, None, body.logprobs.is_some());
    col.key_usage = key.1;
    let include_usage = body.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
    respond(stream, col, body.sampling.stream, include_usage).await
}

/// Usage extension: draft acceptance of speculatively decoded choices (summed over choices).
pub fn speculative_json(sp: &moeserve_engine::spec::SpecStats) -> Value {
    json!({
        "verify_steps": sp.steps,
        "draft_tokens": sp.draft_tokens,
        "accepted_tokens": sp.accepted_tokens,
        "mean_accepted_length": sp.mean_accepted_length(),
        "acceptance_rate": sp.acceptance_rate(),
        "acceptance_rate_per_position": sp.acceptance_rate_per_position(),
    })
}
