//! The error codes of the contract, shared by socket acks and HTTP answers.

use axum::{
    Json,
    body::to_bytes,
    http::{StatusCode, header},
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
    MethodNotAllowed,
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
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::LimitExceeded => StatusCode::BAD_REQUEST,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ClusterUnavailable | ErrorCode::OverCapacity => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
}

/// The code for an error status that axum answered by itself; other client errors are
/// `invalid_request`. Server errors are not rewritten: chorus answers its own.
fn code_for_status(status: StatusCode) -> Option<ErrorCode> {
    Some(match status {
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        s if s.is_client_error() => ErrorCode::InvalidRequest,
        _ => return None,
    })
}

/// Response middleware: gives the error answers that axum makes by itself (unknown path,
/// wrong method, unreadable path parameters, ...), plain text or empty, the contract's JSON
/// shape. The status and the other headers (such as `Allow`) stay.
pub async fn json_errors(response: Response) -> Response {
    /// axum's rejection texts are one short line; a longer body is not read.
    const MAX_TEXT: usize = 1024;
    let status = response.status();
    let Some(code) = code_for_status(status) else {
        return response;
    };
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let message = to_bytes(body, MAX_TEXT)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| match code {
            ErrorCode::NotFound => "no such route".to_owned(),
            ErrorCode::MethodNotAllowed => "this route does not take this method".to_owned(),
            _ => status.canonical_reason().unwrap_or("refused").to_owned(),
        });
    let mut answer = (
        status,
        Json(ErrorBody {
            error: code,
            message,
        }),
    )
        .into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name, value.clone());
        }
    }
    answer
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

/// The socket acknowledgement: `{"ok":true}` (with what the event reports, see [`Done`]) or
/// `{"ok":false,"error":..,"message":..}`.
#[derive(Debug, Serialize)]
pub struct Ack {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(flatten)]
    pub done: Done,
}

/// What a successful event reports besides `ok`.
#[derive(Debug, Default, Serialize)]
pub struct Done {
    /// `publish`: the message's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `resume`: whether nothing could have been missed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// `join` and `resume` with history on: where the socket stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<String>,
}

impl From<()> for Done {
    fn from((): ()) -> Self {
        Done::default()
    }
}

impl From<Result<Done, Failure>> for Ack {
    fn from(r: Result<Done, Failure>) -> Self {
        match r {
            Ok(done) => Ack {
                ok: true,
                error: None,
                message: None,
                done,
            },
            Err(f) => Ack {
                ok: false,
                error: Some(f.code),
                message: Some(f.message),
                done: Done::default(),
            },
        }
    }
}
