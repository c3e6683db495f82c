//! API errors: every failure is JSON `{"error": {"code", "message", "field"?}}` with a status
//! that says whose fault it is.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::AgentError;

/// An error response.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    /// HTTP status.
    #[serde(skip)]
    pub status: StatusCode,
    /// Stable machine-readable code (see docs/openapi.json, `Error.code`).
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// The offending field or parameter, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// An error without a field.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A bad value of field or parameter `field`.
    pub fn field(code: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = message.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            code,
            message: if message.starts_with(&field) {
                message
            } else {
                format!("{field}: {message}")
            },
            field: Some(field),
        }
    }
}

/// Every code the API returns, for the OpenAPI check.
pub const CODES: &[&str] = &[
    "invalid_json",
    "invalid_field",
    "invalid_parameter",
    "body_too_large",
    "not_found",
    "no_route",
    "method_not_allowed",
    "already_exists",
    "conflict",
    "in_use",
    "network_error",
    "illegal_transition",
    "over_capacity",
    "timeout",
    "start_failed",
    "vmm_error",
    "upgrade_required",
    "read_only",
    "internal",
];

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        (status, axum::Json(serde_json::json!({ "error": self }))).into_response()
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        let msg = e.to_string();
        match e {
            AgentError::NotFound(_) | AgentError::SegmentNotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", msg)
            }
            AgentError::Invalid(f) => Self::field("invalid_field", f.field, f.message),
            AgentError::Exists(_) => Self::new(StatusCode::CONFLICT, "already_exists", msg),
            AgentError::Conflict(f) => Self {
                status: StatusCode::CONFLICT,
                ..Self::field("conflict", f.field, f.message)
            },
            AgentError::InUse(_) => Self::new(StatusCode::CONFLICT, "in_use", msg),
            AgentError::Network(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "network_error", msg)
            }
            AgentError::IllegalTransition { .. } => {
                Self::new(StatusCode::CONFLICT, "illegal_transition", msg)
            }
            AgentError::Capacity(_) => Self::new(StatusCode::CONFLICT, "over_capacity", msg),
            AgentError::Timeout { .. } => Self::new(StatusCode::REQUEST_TIMEOUT, "timeout", msg),
            AgentError::StartFailed { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "start_failed", msg)
            }
            AgentError::Vmm { .. } => Self::new(StatusCode::BAD_GATEWAY, "vmm_error", msg),
            AgentError::Store(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        }
    }
}

/// Turns a JSON decoding error (with its path) into an error naming the field.
pub fn from_json(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let msg = inner.to_string();
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::field("invalid_json", "body", format!("malformed JSON: {msg}"));
    }
    // serde names unknown and missing fields in backquotes.
    let named = msg
        .split('`')
        .nth(1)
        .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"));
    let field = match (named, path.as_str()) {
        // An unknown field is already the last element of the path; a missing one is not.
        (Some(n), p) if p == n || p.ends_with(&format!(".{n}")) => p.to_owned(),
        (Some(n), ".") => n.to_owned(),
        (Some(n), p) => format!("{p}.{n}"),
        (None, ".") => "body".to_owned(),
        (None, p) => p.to_owned(),
    };
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
    ApiError::field("invalid_field", field, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> ApiError {
        let de = &mut serde_json::Deserializer::from_str(text);
        let r: Result<crate::spec::VmSpec, _> = serde_path_to_error::deserialize(de);
        from_json(r.unwrap_err())
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(decode("{").code, "invalid_json");
        let e = decode(r#"{"id":"a","vcpus":"two","memory_mib":1,"boot":{"kernel":"/k"}}"#);
        assert_eq!(e.field.as_deref(), Some("vcpus"));
        let e = decode(r#"{"id":"a","vcpus":1,"memory_mib":1,"boot":{"kernel":"/k","x":1}}"#);
        assert_eq!(e.field.as_deref(), Some("boot.x"));
        let e = decode(r#"{"id":"a","vcpus":1,"boot":{"kernel":"/k"}}"#);
        assert_eq!(e.field.as_deref(), Some("memory_mib"));
        let e = decode(
            r#"{"id":"a","vcpus":1,"memory_mib":1,"boot":{"kernel":"/k"},"disks":[{"path":3}]}"#,
        );
        assert_eq!(e.field.as_deref(), Some("disks[0].path"));
    }
}
