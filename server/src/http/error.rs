//! API errors in OpenAI's JSON schema; every status code is assigned here.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use moeserve_engine::SubmitError;
use serde_json::json;

use super::limits::RateLimited;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code, retry_after: None }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message)
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.to_string()), ..Self::invalid(message) }
    }

    pub fn context_overflow(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", Some("context_length_exceeded"), message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect or missing API key: pass it as `Authorization: Bearer KEY`.",
        )
    }

    pub fn model_not_found(name: &str, served: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                format!("The model `{name}` does not exist; this server serves `{served}`."),
            )
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("Request body exceeds {limit} bytes."),
        )
    }

    pub fn not_ready() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("model_loading"), "The model is still loading.")
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("server_overloaded"), message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, message)
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), format!("Unknown endpoint {path}."))
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid(m) if m.contains("exceeds") => ApiError::context_overflow(m),
            SubmitError::Invalid(m) => ApiError::invalid(m),
            SubmitError::Overloaded(m) => ApiError::overloaded(m),
            SubmitError::Stopped => ApiError::overloaded("the engine is shutting down"),
        }
    }
}

impl From<RateLimited> for ApiError {
    fn from(r: RateLimited) -> Self {
        let (secs, msg) = if r.retry_after.is_finite() {
            let secs = r.retry_after.ceil().max(1.0) as u64;
            (secs, format!("Rate limit reached for {}; retry after {secs} s.", r.what))
        } else {
            (60, format!("This request alone exceeds the {} limit.", r.what))
        };
        ApiError {
            retry_after: Some(secs),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("rate_limit_exceeded"), msg)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        let mut r = (self.status, Json(body)).into_response();
        if let Some(v) = self.retry_after.and_then(|s| header::HeaderValue::from_str(&s.to_string()).ok()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}
