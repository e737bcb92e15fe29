//! API keys: `Authorization: Bearer KEY` (or Anthropic's `x-api-key`), compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::anthropic::AnthropicError;
use super::error::ApiError;
use super::limits::KeyId;
use super::AppState;

/// Equal-length comparison whose time does not depend on where the bytes differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Check the API key, then the key's request rate; tags the request with the key's label
/// (`key-N`, or `anonymous` on an open server) and usage counters.
pub async fn require_key(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let anthropic = req.uri().path().starts_with("/v1/messages");
    let reject = |e: ApiError| if anthropic { AnthropicError(e).into_response() } else { e.into_response() };
    let label = if state.api_keys.is_empty() {
        Some("anonymous".to_string())
    } else {
        presented_key(&req).and_then(|p| {
            // check every key so the time does not reveal which one matched
            state.api_keys.iter().enumerate().fold(None, |m, (i, k)| {
                if constant_time_eq(p.as_bytes(), k.as_bytes()) {
                    Some(format!("key-{i}"))
                } else {
                    m
                }
            })
        })
    };
    let Some(label) = label else { return reject(ApiError::unauthorized()) };
    match state.limiter.admit_request(&label) {
        Ok(usage) => {
            req.extensions_mut().insert(KeyId(label));
            req.extensions_mut().insert(usage);
            next.run(req).await
        }
        Err(limited) => reject(limited.into()),
    }
}

fn presented_key(req: &Request) -> Option<String> {
    let h = req.headers();
    let presented = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(|s| s.trim().to_string());
    presented
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq() {
        assert!(super::constant_time_eq(b"secret", b"secret"));
        assert!(!super::constant_time_eq(b"secret", b"secreT"));
        assert!(!super::constant_time_eq(b"secret", b"secret2"));
    }
}
