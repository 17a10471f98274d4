//! The error codes of the contract, shared by socket acks and HTTP answers.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    LimitExceeded,
    RateLimited,
    ClusterUnavailable,
    OverCapacity,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::LimitExceeded => StatusCode::BAD_REQUEST,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ClusterUnavailable | ErrorCode::OverCapacity => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
}

/// A refused request: `{"error": CODE, "message": TEXT}` over HTTP,
/// `{"ok": false, "error": CODE, "message": TEXT}` as a socket ack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub fn cluster_unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ClusterUnavailable, message)
    }
}

/// The HTTP error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorCode,
    pub message: String,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            message: self.message,
        };
        (self.code.status(), Json(body)).into_response()
    }
}

/// The socket acknowledgement: `{"ok":true}` or `{"ok":false,"error":..,"message":..}`.
#[derive(Debug, Serialize)]
pub struct Ack {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl From<Result<(), Failure>> for Ack {
    fn from(r: Result<(), Failure>) -> Self {
        match r {
            Ok(()) => Ack {
                ok: true,
                error: None,
                message: None,
            },
            Err(f) => Ack {
                ok: false,
                error: Some(f.code),
                message: Some(f.message),
            },
        }
    }
}
