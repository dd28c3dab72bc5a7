//! Errors: [`ServerError`] for starting the server (model, tokenizer, socket) and [`ApiError`],
//! the OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`) that a bad
//! request gets with its 4xx status — the server keeps serving.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Model(#[from] lockstep_model::ModelError),
    #[error(transparent)]
    Engine(#[from] lockstep_engine::EngineError),
    #[error("{file}: {msg}")]
    Tokenizer { file: String, msg: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Config(String),
    /// a second SIGTERM / Ctrl-C while draining: stopped without finishing the requests
    #[error("interrupted while draining: {0} connections were still open")]
    Interrupted(usize),
}

pub type Result<T> = std::result::Result<T, ServerError>;

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`,
    /// `authentication_error`, `permission_error`
    pub kind: &'static str,
    /// the request field at fault
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// seconds sent as `Retry-After` (overload refusals: 503 / 429)
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// 400 naming `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            message: if param.is_empty() { message } else { format!("{param}: {message}") },
            kind: "invalid_request_error",
            param: (!param.is_empty()).then(|| param.to_string()),
            code: Some("invalid_value"),
            retry_after: None,
        }
    }

    pub fn model_not_found(name: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("model: `{name}` does not exist; this server serves `{served}`"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: format!("no route {path}"), kind: "invalid_request_error", param: None, code: Some("not_found"), retry_after: None }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, code: None, retry_after: None }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into(), kind: "server_error", param: None, code: None, retry_after: None }
    }

    /// 401: no API key, or the wrong one (the key itself is never echoed).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self { status: StatusCode::UNAUTHORIZED, message: message.into(), kind: "authentication_error", param: None, code: Some("invalid_api_key"), retry_after: None }
    }

    /// 403: the request is understood but not allowed here.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::FORBIDDEN, message: message.into(), kind: "permission_error", param: None, code: Some(code), retry_after: None }
    }

    /// 421: the `Host` header names no address this server answers for (DNS rebinding).
    pub fn misdirected(message: impl Into<String>) -> Self {
        Self { status: StatusCode::MISDIRECTED_REQUEST, message: message.into(), kind: "invalid_request_error", param: None, code: Some("host_not_allowed"), retry_after: None }
    }

    /// 415: the body is not `application/json`.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self { status: StatusCode::UNSUPPORTED_MEDIA_TYPE, message: message.into(), kind: "invalid_request_error", param: None, code: Some("unsupported_media_type"), retry_after: None }
    }

    /// 503 with `Retry-After`: the server is at a limit (`code` names it: `max_waiting`,
    /// `max_connections`) or draining (`draining`); retrying later can succeed.
    pub fn overloaded(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into(), kind: "server_error", param: None, code: Some(code), retry_after: Some(retry_after) }
    }

    /// 408: the client did not send its request body within `body_timeout`.
    pub fn body_timeout(secs: f64) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("body_timeout: the request body did not arrive within {secs} s"),
            kind: "invalid_request_error",
            param: None,
            code: Some("body_timeout"),
            retry_after: None,
        }
    }

    /// 504: the request ran past `request_timeout`; its sequences were dropped.
    pub fn request_timeout(secs: f64) -> Self {
        Self {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!("request_timeout: not finished within {secs} s; generation stopped"),
            kind: "server_error",
            param: None,
            code: Some("request_timeout"),
            retry_after: None,
        }
    }

    /// 413: the body is larger than `limit` bytes.
    pub fn too_large(limit: usize) -> Self {
        Self { status: StatusCode::PAYLOAD_TOO_LARGE, code: Some("body_too_large"), ..Self::invalid("body", format!("larger than {limit} bytes")) }
    }

    /// 409 naming `param`: e.g. a policy version that does not increase.
    pub fn conflict(param: &str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::CONFLICT, code: Some("conflict"), ..Self::invalid(param, message) }
    }

    /// The JSON body (also sent as an SSE event when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code },
        })
        .unwrap_or_default()
    }

    /// From an engine error: request errors name their field (400), the rest are 500.
    pub fn from_engine(e: &lockstep_engine::EngineError) -> Self {
        match e {
            lockstep_engine::EngineError::Request { field, msg, .. } => Self::invalid(field, msg.clone()),
            other => Self::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(s));
        }
        r
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}
