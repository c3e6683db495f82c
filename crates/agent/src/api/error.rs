//! API errors: every failure is JSON `{"error": {"code", "message", "field"?}}` with a status
//! that says whose fault it is.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::wire::wire_enum;
use crate::AgentError;

/// An error response.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    /// HTTP status.
    #[serde(skip)]
    pub status: StatusCode,
    /// Stable machine-readable code (see docs/openapi.json, `Error.code`).
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// The offending field or parameter, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// An error without a field.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A bad value of field or parameter `field`.
    pub fn field(code: ErrorCode, field: impl Into<String>, message: impl Into<String>) -> Self {
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

wire_enum! {
    /// Every code the API returns (`Error.code` in docs/openapi.json, checked by a test).
    pub enum ErrorCode {
        /// The body is not JSON of the expected shape.
        InvalidJson = "invalid_json",
        /// A field of the body is refused.
        InvalidField = "invalid_field",
        /// A query parameter is refused.
        InvalidParameter = "invalid_parameter",
        /// The body is larger than the API takes.
        BodyTooLarge = "body_too_large",
        /// No such VM or segment.
        NotFound = "not_found",
        /// No such path.
        NoRoute = "no_route",
        /// The path does not take this method.
        MethodNotAllowed = "method_not_allowed",
        /// An object with this id exists with a different spec.
        AlreadyExists = "already_exists",
        /// A field clashes with what exists on the host.
        Conflict = "conflict",
        /// The object is still in use.
        InUse = "in_use",
        /// The kernel refused the network wiring.
        NetworkError = "network_error",
        /// The action is not possible in the VM's state.
        IllegalTransition = "illegal_transition",
        /// Admission control refused the VM.
        OverCapacity = "over_capacity",
        /// A wait timed out.
        Timeout = "timeout",
        /// The VMM could not start the VM.
        StartFailed = "start_failed",
        /// The VMM did not do what it was asked.
        VmmError = "vmm_error",
        /// A live migration failed once under way (the VM goes on where it was).
        MigrationFailed = "migration_failed",
        /// A live migration was cancelled before its switch-over (the VM goes on where it
        /// was).
        MigrationCancelled = "migration_cancelled",
        /// The console attach needs an upgrade to the console protocol.
        UpgradeRequired = "upgrade_required",
        /// The socket is read-only (the debug socket).
        ReadOnly = "read_only",
        /// The agent failed (its state directory).
        Internal = "internal",
    }
}

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
            AgentError::NotFound(_)
            | AgentError::SegmentNotFound(_)
            | AgentError::ImageNotFound(_)
            | AgentError::NoDevice { .. }
            | AgentError::SnapshotNotFound { .. } => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, msg)
            }
            AgentError::Invalid(f) => Self::field(ErrorCode::InvalidField, f.field, f.message),
            AgentError::Exists(_) | AgentError::SnapshotExists { .. } => {
                Self::new(StatusCode::CONFLICT, ErrorCode::AlreadyExists, msg)
            }
            AgentError::Conflict(f) => Self {
                status: StatusCode::CONFLICT,
                ..Self::field(ErrorCode::Conflict, f.field, f.message)
            },
            AgentError::InUse(_) => Self::new(StatusCode::CONFLICT, ErrorCode::InUse, msg),
            AgentError::Network(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::NetworkError,
                msg,
            ),
            AgentError::IllegalTransition { .. } => {
                Self::new(StatusCode::CONFLICT, ErrorCode::IllegalTransition, msg)
            }
            AgentError::Capacity(_) => {
                Self::new(StatusCode::CONFLICT, ErrorCode::OverCapacity, msg)
            }
            AgentError::Timeout { .. } => {
                Self::new(StatusCode::REQUEST_TIMEOUT, ErrorCode::Timeout, msg)
            }
            AgentError::StartFailed { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::StartFailed,
                msg,
            ),
            AgentError::Vmm { .. } => Self::new(StatusCode::BAD_GATEWAY, ErrorCode::VmmError, msg),
            AgentError::MigrationFailed(_) => {
                Self::new(StatusCode::BAD_GATEWAY, ErrorCode::MigrationFailed, msg)
            }
            AgentError::MigrationCancelled(_) => {
                Self::new(StatusCode::CONFLICT, ErrorCode::MigrationCancelled, msg)
            }
            AgentError::Store(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, msg)
            }
        }
    }
}

/// Turns a JSON decoding error (with its path) into an error naming the field.
pub fn from_json(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let msg = inner.to_string();
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::field(
            ErrorCode::InvalidJson,
            "body",
            format!("malformed JSON: {msg}"),
        );
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
    let msg = msg.split(" at line ").next().unwrap_or(&msg);
    ApiError::field(ErrorCode::InvalidField, field, json_words(msg))
}

/// serde's message in the API's words: JSON types and ranges, not Rust type names
/// (`expected u8` becomes `expected an integer from 0 to 255`).
fn json_words(msg: &str) -> String {
    const TYPES: &[(&str, &str)] = &[
        ("u8", "an integer from 0 to 255"),
        ("u16", "an integer from 0 to 65535"),
        ("u32", "an integer from 0 to 4294967295"),
        ("u64", "an integer from 0 to 18446744073709551615"),
        ("usize", "an integer from 0 to 18446744073709551615"),
        ("i32", "an integer from -2147483648 to 2147483647"),
        ("i64", "an integer"),
        ("f64", "a number"),
        ("a map", "an object"),
        ("a sequence", "an array"),
        ("unit", "null"),
    ];
    let mut out = msg.to_owned();
    for (rust, json) in TYPES {
        for (before, after) in [
            (format!("expected {rust}"), format!("expected {json}")),
            (
                format!("invalid type: {rust},"),
                format!("invalid type: {json},"),
            ),
        ] {
            if out.ends_with(&before) || out.contains(&format!("{before} ")) {
                out = out.replace(&before, &after);
            }
        }
    }
    out.replace("floating point", "number")
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
        assert_eq!(decode("{").code, ErrorCode::InvalidJson);
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
        let e = decode(r#"{"id":"a","vcpus":300,"memory_mib":1,"boot":{"kernel":"/k"}}"#);
        assert_eq!(e.field.as_deref(), Some("vcpus"));
        assert!(
            e.message.ends_with("expected an integer from 0 to 255"),
            "{}",
            e.message
        );
    }
}
