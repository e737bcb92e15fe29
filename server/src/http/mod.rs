//! `moeserve serve`: the OpenAI-compatible HTTP server (axum) in front of the engine.

mod admin;
mod anthropic;
mod auth;
mod chat;
mod error;
mod limits;
mod openai;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use clap::Args as ClapArgs;
use moeserve_engine::sampling::SamplingParams;
use moeserve_engine::{Engine, EngineHandle, Tokenizer};

use crate::engine_args::EngineArgs;
use crate::source::{self, ModelArgs};
use error::ApiError;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Accepted API keys (repeatable). Without keys the server is open.
    #[arg(long = "api-key")]
    pub api_keys: Vec<String>,
    /// File with one API key per line.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Model name reported by /v1/models and accepted in requests (default: the directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest accepted request body.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Requests per minute per API key (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub rate_limit_rpm: u64,
    /// Prompt + max_tokens per minute per API key (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub rate_limit_tpm: u64,
}

/// Everything that exists once the model is loaded.
pub struct Ready {
    pub engine: EngineHandle,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub model_name: String,
    pub context: usize,
    pub bos: Option<u32>,
    pub defaults: SamplingParams,
    /// The tokenizer knows `</think>`: split R1 reasoning from content.
    pub reasoning: bool,
    pub created: u64,
}

pub struct AppState {
    ready: OnceLock<Arc<Ready>>,
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    pub limiter: limits::RateLimiter,
}

impl AppState {
    pub fn ready(&self) -> Result<Arc<Ready>, ApiError> {
        self.ready.get().cloned().ok_or_else(ApiError::not_ready)
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/models", get(admin::models))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/tokenize", post(admin::tokenize))
        .route("/detokenize", post(admin::detokenize))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .merge(api)
        .route("/", get(admin::index))
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .fallback(admin::fallback)
        // bodies are read (and limited) by the handlers, which answer 413 in the API's schema
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

fn load_keys(args: &Args) -> Result<Vec<String>> {
    let mut keys = args.api_keys.clone();
    if let Some(f) = &args.api_key_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading --api-key-file {}", f.display()))?;
        keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
    }
    Ok(keys)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    eprintln!("shutting down: draining in-flight requests");
}

pub fn run(args: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let state = Arc::new(AppState {
        ready: OnceLock::new(),
        api_keys: load_keys(&args)?,
        max_body_bytes: args.max_body_bytes,
        limiter: limits::RateLimiter::new(Some(args.rate_limit_rpm), Some(args.rate_limit_tpm)),
    });
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("invalid --host/--port {}:{}", args.host, args.port))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    eprintln!("listening on http://{}", listener.local_addr()?);

    // load in the background: /health answers 503 until the model is ready
    let loader_state = state.clone();
    let loader = tokio::task::spawn_blocking(move || -> Result<()> {
        let loaded = source::load(&args.model, args.engine.spec.draft_tokens() > 0)?;
        let name = args.served_model_name.clone().unwrap_or_else(|| match &args.model.model {
            Some(d) => source::model_name(d),
            None => "moeserve-builtin-tiny".into(),
        });
        let cfg = &loaded.model.lead().cfg;
        let (context, bos) = (cfg.max_position_embeddings, cfg.bos_token_id);
        let defaults = SamplingParams::from_generation_config(&loaded.dir);
        let tokenizer = loaded.tokenizer.map(Arc::new);
        let reasoning = tokenizer.as_ref().is_some_and(|t| t.token_id("</think>").is_some());
        let engine = Engine::start(loaded.model, tokenizer.clone(), args.engine.config()?)?;
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        eprintln!("model `{name}` ready ({} KV pages of {} tokens)", engine.metrics().kv_pages_total, engine.config().page_size);
        let _ = loader_state.ready.set(Arc::new(Ready {
            engine,
            tokenizer,
            model_name: name,
            context,
            bos,
            defaults,
            reasoning,
            created,
        }));
        Ok(())
    });
    let load_failed = async move {
        match loader.await {
            Ok(Ok(())) => std::future::pending::<anyhow::Error>().await,
            Ok(Err(e)) => e,
            Err(e) => anyhow::anyhow!("model loader panicked: {e}"),
        }
    };
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(shutdown_signal());
    tokio::select! {
        r = server => r.context("http server")?,
        e = load_failed => return Err(e.context("loading the model")),
    }
    Ok(())
}
