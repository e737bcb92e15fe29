//! API keys: `Authorization: Bearer KEY` (or Anthropic's `x-api-key`), compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::anthropic::AnthropicError;
use super::error::ApiError;
use super::AppState;

/// Equal-length comparison whose time does not depend on where the bytes differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.api_keys.is_empty() {
        return next.run(req).await;
    }
    let h = req.headers();
    let presented = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim);
    // check every key so the time does not reveal which one matched
    let ok =
        presented.is_some_and(|p| state.api_keys.iter().fold(false, |m, k| m | constant_time_eq(p.as_bytes(), k.as_bytes())));
    if ok {
        next.run(req).await
    } else if req.uri().path().starts_with("/v1/messages") {
        AnthropicError(ApiError::unauthorized()).into_response()
    } else {
        ApiError::unauthorized().into_response()
    }
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
