//! `/v1/models`, `/health`, `/metrics` (Prometheus text), `/tokenize`, `/detokenize`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use moeserve_engine::metrics::Histogram;
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat::read_json;
use super::error::ApiError;
use super::limits::KeyUsage;
use super::{openai, AppState};

pub async fn models(State(app): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let r = app.ready()?;
    Ok(Json(json!({"object": "list", "data": [{
        "id": r.model_name, "object": "model", "created": r.created, "owned_by": "moeserve", "max_model_len": r.context,
    }]})))
}

pub async fn health(State(app): State<Arc<AppState>>) -> Response {
    match app.ready() {
        Ok(_) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A minimal chat page (static, no build step) that streams from /v1/chat/completions.
pub async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("static/index.html"))
}

pub async fn fallback(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut acc = 0;
    for (i, b) in h.bounds.iter().enumerate() {
        acc += h.counts[i];
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", h.count, h.sum, h.count);
}

pub async fn metrics(State(app): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let r = app.ready()?;
    let m = r.engine.metrics();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    metric("moeserve_requests_waiting", "gauge", "Sequences waiting to be scheduled.", m.waiting.to_string());
    metric("moeserve_requests_running", "gauge", "Sequences in the running batch.", m.running.to_string());
    metric("moeserve_kv_pages_total", "gauge", "KV cache pages.", m.kv_pages_total.to_string());
    metric("moeserve_kv_pages_used", "gauge", "KV cache pages referenced by sequences.", m.kv_pages_used.to_string());
    metric("moeserve_kv_pages_free", "gauge", "Free KV cache pages.", m.kv_pages_free.to_string());
    metric("moeserve_kv_pages_cached", "gauge", "Unreferenced pages kept for prefix reuse.", m.kv_pages_cached.to_string());
    metric(
        "moeserve_prefix_cache_hit_rate",
        "gauge",
        "Prompt tokens served from the prefix cache / looked up.",
        format!("{}", m.prefix_hit_rate()),
    );
    metric("moeserve_prompt_tokens_total", "counter", "Prompt tokens received.", m.prompt_tokens.to_string());
    metric("moeserve_generation_tokens_total", "counter", "Tokens generated.", m.generated_tokens.to_string());
    metric(
        "moeserve_generation_tokens_per_second",
        "gauge",
        "Generated tokens per busy second.",
        format!("{}", m.generation_tokens_per_second()),
    );
    metric("moeserve_requests_finished_total", "counter", "Sequences finished.", m.requests_finished.to_string());
    metric("moeserve_requests_aborted_total", "counter", "Sequences aborted.", m.requests_aborted.to_string());
    metric("moeserve_requests_rejected_total", "counter", "Requests rejected as overloaded.", m.requests_rejected.to_string());
    metric("moeserve_preemptions_total", "counter", "Sequences preempted for KV pages.", m.preemptions.to_string());
    if m.num_draft_tokens > 0 {
        let sp = &m.speculative;
        metric(
            "moeserve_spec_draft_tokens_per_step",
            "gauge",
            "Tokens drafted per speculative step (K).",
            m.num_draft_tokens.to_string(),
        );
        metric("moeserve_spec_verify_steps_total", "counter", "Speculative verification steps.", sp.steps.to_string());
        metric("moeserve_spec_draft_tokens_total", "counter", "Draft tokens verified.", sp.draft_tokens.to_string());
        metric("moeserve_spec_accepted_tokens_total", "counter", "Draft tokens accepted.", sp.accepted_tokens.to_string());
        metric(
            "moeserve_spec_mean_accepted_length",
            "gauge",
            "Tokens produced per verification step (accepted drafts + 1).",
            format!("{}", sp.mean_accepted_length()),
        );
        let name = "moeserve_spec_acceptance_rate";
        let _ = writeln!(out, "# HELP {name} Accepted / proposed drafts per draft position.\n# TYPE {name} gauge");
        for (j, r) in sp.acceptance_rate_per_position().iter().enumerate() {
            let _ = writeln!(out, "{name}{{position=\"{}\"}} {r}", j + 1);
        }
    }
    let keys = app.limiter.usage();
    for (name, help, get) in [
        ("moeserve_key_requests_total", "Requests per API key.", (|u: &KeyUsage| &u.requests) as fn(&KeyUsage) -> &AtomicU64),
        ("moeserve_key_prompt_tokens_total", "Prompt tokens per API key.", |u: &KeyUsage| &u.prompt_tokens),
        ("moeserve_key_completion_tokens_total", "Completion tokens per API key.", |u: &KeyUsage| &u.completion_tokens),
        ("moeserve_key_rate_limited_total", "Requests refused by rate limits per API key.", |u: &KeyUsage| &u.rate_limited),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (k, u) in &keys {
            let _ = writeln!(out, "{name}{{key=\"{k}\"}} {}", get(u).load(Ordering::Relaxed));
        }
    }
    histogram(&mut out, "moeserve_time_to_first_token_seconds", "Time to first token.", &m.time_to_first_token);
    histogram(&mut out, "moeserve_inter_token_latency_seconds", "Time between tokens.", &m.inter_token_latency);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

#[derive(Deserialize)]
struct TokenizeBody {
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

pub async fn tokenize(State(app): State<Arc<AppState>>, req: HttpRequest) -> Result<Json<Value>, ApiError> {
    let r = app.ready()?;
    let body: TokenizeBody = read_json(&app, req).await?;
    let tok = r.tokenizer.as_ref().ok_or_else(|| ApiError::invalid("this model has no tokenizer"))?;
    let text = match (body.prompt, body.messages) {
        (Some(p), None) => p,
        (None, Some(m)) => tok
            .apply_chat_template(&openai::normalize_messages(&m)?, body.add_generation_prompt)
            .map_err(|e| ApiError::invalid(e.to_string()))?,
        _ => return Err(ApiError::invalid("give exactly one of `prompt` or `messages`")),
    };
    let tokens = tok.encode(&text).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(Json(json!({"count": tokens.len(), "max_model_len": r.context, "tokens": tokens})))
}

#[derive(Deserialize)]
struct DetokenizeBody {
    tokens: Vec<u32>,
}

pub async fn detokenize(State(app): State<Arc<AppState>>, req: HttpRequest) -> Result<Json<Value>, ApiError> {
    let r = app.ready()?;
    let body: DetokenizeBody = read_json(&app, req).await?;
    let tok = r.tokenizer.as_ref().ok_or_else(|| ApiError::invalid("this model has no tokenizer"))?;
    if let Some(t) = body.tokens.iter().find(|&&t| t as usize >= tok.vocab_size()) {
        return Err(ApiError::invalid_param("tokens", format!("token id {t} out of range")));
    }
    let text = tok.decode(&body.tokens).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(Json(json!({"prompt": text})))
}
