//! The agent's HTTP/1.1 + JSON API on a Unix socket, versioned under `/v1` and described by
//! docs/openapi.json (checked against [`ROUTES`] and the request types in tests).
//!
//! Handlers only translate: parse and check the request, call the [`Agent`], turn the result
//! or the error into JSON.

pub mod client;
pub mod error;
pub mod metrics;

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path as UrlPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::spec::{Phase, VmSpec};
use crate::store::layout;
use crate::{Agent, AgentError};
pub use error::{ApiError, ErrorCode};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest wait a client may ask for.
const MAX_WAIT: f64 = 3600.0;

/// Every route, as (method, path template). docs/openapi.json lists exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/host"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{id}"),
    ("DELETE", "/v1/vms/{id}"),
    ("POST", "/v1/vms/{id}/start"),
    ("POST", "/v1/vms/{id}/stop"),
    ("POST", "/v1/vms/{id}/reboot"),
    ("POST", "/v1/vms/{id}/pause"),
    ("POST", "/v1/vms/{id}/resume"),
    ("GET", "/v1/vms/{id}/wait"),
    ("GET", "/v1/vms/{id}/console"),
    ("GET", "/v1/vms/{id}/console/attach"),
    ("GET", "/v1/vms/{id}/metadata"),
    ("PUT", "/v1/vms/{id}/metadata"),
    ("POST", "/v1/vms/{id}/upgrade"),
    ("POST", "/v1/vms/{id}/migrate"),
    ("POST", "/v1/vms/{id}/migrate/cancel"),
    ("POST", "/v1/vms/{id}/migrate/complete"),
    ("POST", "/v1/vms/{id}/snapshot"),
    ("GET", "/v1/vms/{id}/snapshots"),
    ("DELETE", "/v1/vms/{id}/snapshots/{name}"),
    ("PUT", "/v1/vms/{id}/disks/{index}/rate-limit"),
    ("PUT", "/v1/vms/{id}/nics/{index}/rate-limit"),
    ("GET", "/v1/segments"),
    ("POST", "/v1/segments"),
    ("GET", "/v1/segments/{id}"),
    ("DELETE", "/v1/segments/{id}"),
    ("GET", "/v1/images"),
    ("POST", "/v1/images"),
    ("GET", "/v1/images/{id}"),
    ("DELETE", "/v1/images/{id}"),
    ("GET", "/v1/events"),
    ("GET", "/v1/metrics"),
    ("GET", "/v1/openapi.json"),
];

/// The OpenAPI document, served at /v1/openapi.json.
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.json");

/// What every handler shares.
pub struct ApiState {
    /// The agent.
    pub agent: Arc<Agent>,
    /// Request latencies.
    pub requests: metrics::RequestMetrics,
    /// The VMMs' counters as last asked.
    pub vm_counters: Arc<metrics::VmCounters>,
}

type St = State<Arc<ApiState>>;

/// Query parameters, checked against the ones a route accepts.
struct Params(BTreeMap<String, String>);

impl Params {
    fn parse(raw: Option<String>, allowed: &[&str]) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::field(ErrorCode::InvalidParameter, "query", e.to_string()))?;
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::field(
                    ErrorCode::InvalidParameter,
                    k.clone(),
                    format!(
                        "unknown parameter; this route takes: {}",
                        allowed.join(", ")
                    ),
                ));
            }
            if map.contains_key(&k) {
                // Which one would count? Checking only the last would let `?force=maybe&force=1`
                // through, so neither does.
                return Err(ApiError::field(
                    ErrorCode::InvalidParameter,
                    k,
                    "given more than once",
                ));
            }
            map.insert(k, v);
        }
        Ok(Self(map))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn flag(&self, k: &str) -> Result<bool, ApiError> {
        match self.get(k) {
            None => Ok(false),
            Some("" | "1" | "true" | "yes") => Ok(true),
            Some("0" | "false" | "no") => Ok(false),
            Some(v) => Err(ApiError::field(
                ErrorCode::InvalidParameter,
                k,
                format!("{v:?} is not a boolean"),
            )),
        }
    }

    fn seconds(&self, k: &str) -> Result<Option<Duration>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.parse::<f64>() {
                Ok(s) if s.is_finite() && (0.0..=MAX_WAIT).contains(&s) => {
                    Ok(Some(Duration::from_secs_f64(s)))
                }
                _ => Err(ApiError::field(
                    ErrorCode::InvalidParameter,
                    k,
                    format!("{v:?} is not a number of seconds in 0-{MAX_WAIT}"),
                )),
            },
        }
    }

    fn phase(&self, k: &str) -> Result<Option<Phase>, ApiError> {
        self.get(k)
            .map(|v| {
                Phase::parse(v).ok_or_else(|| {
                    ApiError::field(
                        ErrorCode::InvalidParameter,
                        k,
                        format!("unknown state {v:?}"),
                    )
                })
            })
            .transpose()
    }

    fn u64(&self, k: &str) -> Result<Option<u64>, ApiError> {
        self.get(k)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::field(
                        ErrorCode::InvalidParameter,
                        k,
                        format!("{v:?} is not a non-negative integer"),
                    )
                })
            })
            .transpose()
    }
}

/// Reads a body of at most [`MAX_BODY`] bytes.
async fn read_body(body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BodyTooLarge,
            format!("request bodies are limited to {MAX_BODY} bytes"),
        )
    })
}

/// Reads a JSON body: size-limited, an object, unknown fields refused, the rules of
/// [`normalise`] applied, errors naming the field.
async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = read_body(body).await?;
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "malformed JSON"
        } else {
            "trailing data"
        };
        ApiError::field(ErrorCode::InvalidJson, "body", format!("{what}: {e}"))
    })?;
    if !value.is_object() {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            "body",
            "must be a JSON object",
        ));
    }
    let mut nulls = Vec::new();
    normalise(&mut value, "", &mut nulls)?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut err = error::from_json(e);
        // A required field sent as null reads as missing once nulls are dropped: say so.
        if let Some(f) = err.field.as_ref().filter(|f| nulls.contains(f)) {
            err.message = format!("{f}: must not be null");
        }
        err
    })
}

/// Body fields that hold lists (`type: array` in docs/openapi.json's request schemas; a test
/// holds the two together). An array anywhere else is refused: serde would otherwise read a
/// struct from an array of its fields in order, so `PUT .../metadata` with `[]` would clear
/// the metadata.
const LIST_FIELDS: &[&str] = &["disks", "nics", "public_keys"];

/// The body rules serde alone does not give, applied to the parsed JSON before it is decoded:
/// * a `null` value is the same as leaving the field out (every optional field is nullable in
///   the document; a required one sent as null is refused as null);
/// * a number with no fractional part is an integer (`1.0` is `1`, as JSON Schema's
///   `integer` has it);
/// * arrays only where the API has lists ([`LIST_FIELDS`]).
fn normalise(
    v: &mut serde_json::Value,
    path: &str,
    nulls: &mut Vec<String>,
) -> Result<(), ApiError> {
    use serde_json::Value;
    let child = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            m.retain(|k, v| {
                if v.is_null() {
                    nulls.push(child(k));
                }
                !v.is_null()
            });
            for (k, v) in m.iter_mut() {
                if v.is_array() && !LIST_FIELDS.contains(&k.as_str()) {
                    return Err(ApiError::field(
                        ErrorCode::InvalidField,
                        child(k),
                        "an array is not accepted here",
                    ));
                }
                normalise(v, &child(k), nulls)?;
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                let p = format!("{path}[{i}]");
                if v.is_array() || v.is_null() {
                    return Err(ApiError::field(
                        ErrorCode::InvalidField,
                        p,
                        "a list item must not be an array or null",
                    ));
                }
                normalise(v, &p, nulls)?;
            }
        }
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    *v = if f < 0.0 {
                        Value::from(f as i64)
                    } else {
                        Value::from(f as u64)
                    };
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The body of a route that takes none: anything but nothing, `{}` or whitespace is refused.
struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req.into_body()).await?;
        let text = String::from_utf8_lossy(&bytes);
        let t = text.trim();
        if t.is_empty() || t == "{}" {
            Ok(Self)
        } else {
            Err(ApiError::field(
                ErrorCode::InvalidField,
                "body",
                "this action takes its options as query parameters, not a body",
            ))
        }
    }
}

/// A path id that cannot name anything (ids double as file names) is a 404 without a lookup.
fn check_id_of(kind: &str, id: &str) -> Result<(), ApiError> {
    if crate::spec::valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no {kind} with id {id:?} (not a valid id)"),
        ))
    }
}

/// The path's VM id, checked: one that cannot name a VM (ids double as file names) is a 404
/// without a lookup.
struct VmId(String);

/// The path's segment id, checked like [`VmId`].
struct SegmentId(String);

/// The path's VM id and device index.
struct DevicePath(String, usize);

impl<S: Send + Sync> FromRequestParts<S> for DevicePath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let (id, index): (String, String) = path_params(parts, state, "device").await?;
        check_id_of("VM", &id)?;
        let index = index
            .parse::<usize>()
            .ok()
            .filter(|i| *i < 64)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NotFound,
                    format!("{index:?} is not a device index (0, 1, ...)"),
                )
            })?;
        Ok(Self(id, index))
    }
}

/// The body of a NIC's rate-limit change.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NicRateLimits {
    #[serde(default)]
    rx: Option<bexar_devices::rate_limiter::RateLimitConfig>,
    #[serde(default)]
    tx: Option<bexar_devices::rate_limiter::RateLimitConfig>,
}

/// The path's image id, checked like [`VmId`].
struct ImageId(String);

impl<S: Send + Sync> FromRequestParts<S> for ImageId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        path_id(parts, state, "image").await.map(Self)
    }
}

/// The path's parameters as `T`; a path they do not fit names no `kind`: 404.
async fn path_params<T, S>(parts: &mut Parts, state: &S, kind: &str) -> Result<T, ApiError>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    UrlPath::<T>::from_request_parts(parts, state)
        .await
        .map(|UrlPath(t)| t)
        .map_err(|e| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                format!("no {kind} at this path ({e})"),
            )
        })
}

async fn path_id<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
    kind: &str,
) -> Result<String, ApiError> {
    let id: String = path_params(parts, state, kind).await?;
    check_id_of(kind, &id)?;
    Ok(id)
}

impl<S: Send + Sync> FromRequestParts<S> for VmId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        path_id(parts, state, "VM").await.map(Self)
    }
}

/// The path's VM id and snapshot name, each checked like [`VmId`].
struct SnapshotPath(String, String);

impl<S: Send + Sync> FromRequestParts<S> for SnapshotPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let (id, name): (String, String) = path_params(parts, state, "snapshot").await?;
        check_id_of("VM", &id)?;
        check_id_of("snapshot", &name)?;
        Ok(Self(id, name))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for SegmentId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        path_id(parts, state, "segment").await.map(Self)
    }
}

/// The parameters a route accepts, as a type, so that [`Query`] can check them before any
/// other extractor runs (a bad parameter is named before the path's id is looked at).
trait Accepts {
    const NAMES: &'static [&'static str];
}

macro_rules! accepts {
    ($($name:ident: [$($p:literal),*];)*) => {$(
        struct $name;
        impl Accepts for $name {
            const NAMES: &'static [&'static str] = &[$($p),*];
        }
    )*};
}

accepts! {
    Nothing: [];
    ListVmsParams: ["selector", "state", "limit", "after", "fields"];
    CreateVmParams: ["start"];
    StartParams: ["fresh"];
    StopParams: ["timeout", "force"];
    RebootParams: ["timeout"];
    WaitParams: ["state", "timeout"];
    ConsoleParams: ["offset", "follow"];
    EventsParams: ["since", "follow", "vm"];
}

/// A route's query parameters: any the route does not accept is refused by name.
struct Query<A>(Params, std::marker::PhantomData<A>);

/// The query of a route that takes no parameters.
type NoParams = Query<Nothing>;

impl<S: Send + Sync, A: Accepts> FromRequestParts<S> for Query<A> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let p = Params::parse(parts.uri.query().map(str::to_owned), A::NAMES)?;
        Ok(Self(p, std::marker::PhantomData))
    }
}

/// The router.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{id}/start", post(start_vm))
        .route("/v1/vms/{id}/stop", post(stop_vm))
        .route("/v1/vms/{id}/reboot", post(reboot_vm))
        .route("/v1/vms/{id}/pause", post(pause_vm))
        .route("/v1/vms/{id}/resume", post(resume_vm))
        .route("/v1/vms/{id}/wait", get(wait_vm))
        .route("/v1/vms/{id}/console", get(console))
        .route("/v1/vms/{id}/console/attach", get(attach))
        .route("/v1/vms/{id}/metadata", get(get_metadata).put(put_metadata))
        .route("/v1/vms/{id}/upgrade", post(upgrade_vm))
        .route("/v1/vms/{id}/migrate", post(migrate_vm))
        .route("/v1/vms/{id}/migrate/cancel", post(cancel_migration))
        .route("/v1/vms/{id}/migrate/complete", post(complete_migration))
        .route("/v1/vms/{id}/snapshot", post(snapshot_vm))
        .route("/v1/vms/{id}/snapshots", get(list_snapshots))
        .route(
            "/v1/vms/{id}/disks/{index}/rate-limit",
            put(disk_rate_limit),
        )
        .route("/v1/vms/{id}/nics/{index}/rate-limit", put(nic_rate_limit))
        .route(
            "/v1/vms/{id}/snapshots/{name}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/v1/segments", get(list_segments).post(create_segment))
        .route("/v1/segments/{id}", get(get_segment).delete(delete_segment))
        .route("/v1/images", get(list_images).post(register_image))
        .route("/v1/images/{id}", get(get_image).delete(delete_image))
        .route("/v1/events", get(events))
        .route("/v1/metrics", get(metrics_text))
        .route("/metrics", get(metrics_text))
        .route("/v1/openapi.json", get(openapi))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NoRoute,
                "no such route; see /v1/openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                "method not allowed on this route; see /v1/openapi.json",
            )
        })
        .layer(axum::middleware::from_fn(hide_secrets))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            after_recovery,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Holds a change (anything but GET, and the interactive console) until the agent has
/// recovered after its start: reads are served from the records at once, but a change must
/// not race the re-adoption of the VMMs (nor the clean-up of processes no VM owns).
async fn after_recovery(State(st): St, req: Request, next: Next) -> Response {
    if req.method() != axum::http::Method::GET || req.uri().path().ends_with("/console/attach") {
        st.agent.recovered().await;
    }
    next.run(req).await
}

/// Shows every CHAP secret of a VM response as `(hidden)`: the record keeps it (the VMM
/// needs it to log in again), the API never gives it back.
async fn hide_secrets(req: Request, next: Next) -> Response {
    let vms = req.uri().path().starts_with("/v1/vms");
    let resp = next.run(req).await;
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/json");
    if !vms || !json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "the response could not be read",
        )
        .into_response();
    };
    if !bytes.windows(7).any(|w| w == b"\"chap\":") {
        return Response::from_parts(parts, Body::from(bytes));
    }
    fn hide(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m.iter_mut() {
                    match v {
                        serde_json::Value::Object(c) if k == "chap" && c.contains_key("secret") => {
                            c.insert("secret".into(), serde_json::Value::from("(hidden)"));
                        }
                        _ => hide(v),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(hide),
            _ => {}
        }
    }
    let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(mut v) => {
            hide(&mut v);
            serde_json::to_vec(&v).unwrap_or_default()
        }
        Err(_) => bytes.to_vec(),
    };
    let mut parts = parts;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

async fn observe(State(st): St, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |p| p.as_str().to_owned());
    let t = Instant::now();
    let resp = next.run(req).await;
    st.requests
        .observe(method.as_str(), &route, resp.status().as_u16(), t.elapsed());
    resp
}

async fn host(State(st): St, _: NoParams) -> Result<Response, ApiError> {
    let agent = &st.agent;
    let counts = agent.counts();
    let kvm_ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let state_ok = agent.state_writable();
    let failed = counts.get("failed").copied().unwrap_or(0);
    let recovering = agent.recovering();
    let healthy = kvm_ok && state_ok;
    Ok(Json(serde_json::json!({
        "info": agent.info,
        "inventory": agent.inventory(),
        "health": {
            "status": if !healthy { "unhealthy" } else if failed > 0 || recovering { "degraded" } else { "ok" },
            "checks": [
                {"name": "kvm", "ok": kvm_ok, "detail": "/dev/kvm opens read-write"},
                {"name": "state_dir", "ok": state_ok, "detail": "the state directory takes an atomic write"},
                {"name": "vms", "ok": failed == 0, "detail": format!("{counts:?}")},
                {"name": "recovered", "ok": !recovering, "detail": if recovering {
                    "re-adopting VMs after the agent started: reads show the records as last written, changes wait"
                } else {
                    "every VM re-adopted after the agent started"
                }},
            ],
        },
        "vms": counts,
        "last_event": agent.events.last_seq(),
    }))
    .into_response())
}

/// The most VMs one list response holds (and its default size).
pub const MAX_PAGE: usize = 1000;

/// The top-level fields of a VM, which `fields=` may name.
pub const VM_FIELDS: [&str; 12] = [
    "id",
    "state",
    "spec",
    "generation",
    "desired",
    "status",
    "operation",
    "nics",
    "disks",
    "metadata",
    "uuid",
    "restore_pending",
];

async fn list_vms(State(st): St, Query(p, _): Query<ListVmsParams>) -> Result<Response, ApiError> {
    let state = p.phase("state")?;
    let limit = match p.u64("limit")? {
        None => MAX_PAGE,
        Some(n) if (1..=MAX_PAGE as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::field(
                ErrorCode::InvalidParameter,
                "limit",
                format!("{n} is not in 1-{MAX_PAGE}"),
            ))
        }
    };
    let fields: Option<Vec<&str>> = match p.get("fields") {
        None => None,
        Some(f) => {
            let names: Vec<&str> = f.split(',').collect();
            if let Some(bad) = names.iter().find(|n| !VM_FIELDS.contains(n)) {
                return Err(ApiError::field(
                    ErrorCode::InvalidParameter,
                    "fields",
                    format!(
                        "{bad:?} is not a field of a VM; they are {}",
                        VM_FIELDS.join(", ")
                    ),
                ));
            }
            Some(names)
        }
    };
    let (vms, next) = st
        .agent
        .list_page(p.get("selector"), state, p.get("after"), limit);
    /// One page, serialised straight from the records.
    #[derive(serde::Serialize)]
    struct Page<T> {
        items: Vec<T>,
        #[serde(skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    }
    let Some(fields) = fields else {
        return Ok(Json(Page { items: vms, next }).into_response());
    };
    let items: Vec<serde_json::Value> = vms
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.retain(|k, _| fields.contains(&k.as_str()));
            }
            v
        })
        .collect();
    Ok(Json(Page { items, next }).into_response())
}

/// Runs an operation on its own task, to its end or its recorded failure, whatever the caller
/// does meanwhile. A handler's future is dropped when its client hangs up (a scheduler's
/// request timeout, a Ctrl-C), and an operation run inside it would stop at whatever `.await`
/// it had reached: a VMM spawned but not recorded, a reboot's stop without its start. The
/// caller that went away can come back and `wait` for the state it asked for.
async fn run_to_end<T, F, Fut>(agent: &Arc<Agent>, op: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(Arc<Agent>) -> Fut,
    Fut: std::future::Future<Output = Result<T, AgentError>> + Send + 'static,
{
    match tokio::spawn(op(agent.clone())).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("the operation failed inside the agent: {e}"),
        )),
    }
}

async fn create_vm(
    State(st): St,
    Query(p, _): Query<CreateVmParams>,
    body: Body,
) -> Result<Response, ApiError> {
    let start = p.flag("start")?;
    let spec: VmSpec = json_body(body).await?;
    let (rec, created) = run_to_end(&st.agent, |agent| async move {
        let (rec, created) = agent.create(spec, start).await?;
        if start {
            Ok((agent.start(&rec.id, false).await?, created))
        } else {
            Ok((rec, created))
        }
    })
    .await?;
    Ok(created_response(
        created,
        &rec,
        &format!("/v1/vms/{}", rec.id),
    ))
}

/// 201 with `Location` for a new object, 200 (and `Location`) for one that already existed.
fn created_response(created: bool, body: &impl serde::Serialize, location: &str) -> Response {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut resp = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

async fn get_metadata(State(st): St, _: NoParams, VmId(id): VmId) -> Result<Response, ApiError> {
    Ok(Json(st.agent.get(&id)?.metadata).into_response())
}

async fn put_metadata(
    State(st): St,
    _: NoParams,
    VmId(id): VmId,
    body: Body,
) -> Result<Response, ApiError> {
    let md: crate::spec::VmMetadata = json_body(body).await?;
    Ok(Json(st.agent.set_metadata(&id, md)?.metadata).into_response())
}

async fn upgrade_vm(
    State(st): St,
    _: NoParams,
    VmId(id): VmId,
    _: NoBody,
) -> Result<Response, ApiError> {
    Ok(Json(run_to_end(&st.agent, |a| async move { a.upgrade(&id).await }).await?).into_response())
}

async fn migrate_vm(
    State(st): St,
    _: NoParams,
    VmId(id): VmId,
    body: Body,
) -> Result<Response, ApiError> {
    let req: crate::migrate::MigrateRequest = json_body(body).await?;
    let done = run_to_end(&st.agent, |a| async move { a.migrate(&id, req).await }).await?;
    Ok(Json(done).into_response())
}

async fn cancel_migration(
    State(st): St,
    _: NoParams,
    VmId(id): VmId,
    _: NoBody,
) -> Result<Response, ApiError> {
    let rec = st.agent.cancel_migration(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)).into_response())
}

async fn complete_migration(
    State(st): St,
    _: NoParams,
    VmId(id): VmId,
    _: NoBody,
) -> Result<Response, ApiError> {
    let rec = st.agent.complete_migration(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)).into_response())
}

async fn snapshot_vm(
    State(st): St,
    _: NoParams,
    VmId(id): VmId,
    body: Body,
) -> Result<Response, ApiError> {
    let req: crate::snapshots::SnapshotRequest = json_body(body).await?;
    let info = run_to_end(
        &st.agent,
        |a| async move { a.take_snapshot(&id, req).await },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list_snapshots(State(st): St, _: NoParams, VmId(id): VmId) -> Result<Response, ApiError> {
    Ok(Json(serde_json::json!({ "items": st.agent.snapshots(&id)? })).into_response())
}

async fn delete_snapshot(
    State(st): St,
    _: NoParams,
    SnapshotPath(id, name): SnapshotPath,
) -> Result<Response, ApiError> {
    st.agent.delete_snapshot(&id, &name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_segments(State(st): St, _: NoParams) -> Result<Response, ApiError> {
    Ok(Json(serde_json::json!({ "items": st.agent.segments() })).into_response())
}

async fn create_segment(State(st): St, _: NoParams, body: Body) -> Result<Response, ApiError> {
    let spec: crate::segment::SegmentSpec = json_body(body).await?;
    let (seg, created) =
        run_to_end(&st.agent, |a| async move { a.create_segment(spec).await }).await?;
    Ok(created_response(
        created,
        &seg,
        &format!("/v1/segments/{}", seg.id),
    ))
}

async fn get_segment(
    State(st): St,
    _: NoParams,
    SegmentId(id): SegmentId,
) -> Result<Response, ApiError> {
    Ok(Json(st.agent.segment(&id)?).into_response())
}

async fn delete_segment(
    State(st): St,
    _: NoParams,
    SegmentId(id): SegmentId,
) -> Result<Response, ApiError> {
    run_to_end(&st.agent, |a| async move { a.delete_segment(&id).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn disk_rate_limit(
    State(st): St,
    _: NoParams,
    DevicePath(id, index): DevicePath,
    body: Body,
) -> Result<Response, ApiError> {
    let limit: bexar_devices::rate_limiter::RateLimitConfig = json_body(body).await?;
    let target = crate::RateTarget::Disk { index, limit };
    Ok(Json(
        run_to_end(
            &st.agent,
            |a| async move { a.set_rate_limit(&id, target).await },
        )
        .await?,
    )
    .into_response())
}

async fn nic_rate_limit(
    State(st): St,
    _: NoParams,
    DevicePath(id, index): DevicePath,
    body: Body,
) -> Result<Response, ApiError> {
    let l: NicRateLimits = json_body(body).await?;
    let target = crate::RateTarget::Nic {
        index,
        rx: l.rx.unwrap_or_default(),
        tx: l.tx.unwrap_or_default(),
    };
    Ok(Json(
        run_to_end(
            &st.agent,
            |a| async move { a.set_rate_limit(&id, target).await },
        )
        .await?,
    )
    .into_response())
}

async fn list_images(State(st): St, _: NoParams) -> Result<Response, ApiError> {
    Ok(Json(serde_json::json!({ "items": st.agent.images.list() })).into_response())
}

async fn register_image(State(st): St, _: NoParams, body: Body) -> Result<Response, ApiError> {
    let spec: crate::images::ImageSpec = json_body(body).await?;
    // Copying and hashing a large image takes seconds: off the async workers.
    let agent = st.agent.clone();
    let (img, created) = tokio::task::spawn_blocking(move || agent.register_image(&spec))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                format!("the registration failed inside the agent: {e}"),
            )
        })??;
    Ok(created_response(
        created,
        &img,
        &format!("/v1/images/{}", img.id),
    ))
}

async fn get_image(State(st): St, _: NoParams, ImageId(id): ImageId) -> Result<Response, ApiError> {
    Ok(Json(st.agent.images.get(&id).map_err(AgentError::from)?).into_response())
}

async fn delete_image(
    State(st): St,
    _: NoParams,
    ImageId(id): ImageId,
) -> Result<Response, ApiError> {
    let agent = st.agent.clone();
    tokio::task::spawn_blocking(move || agent.delete_image(&id))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                format!("the delete failed inside the agent: {e}"),
            )
        })??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_vm(State(st): St, _: NoParams, VmId(id): VmId) -> Result<Response, ApiError> {
    Ok(Json(st.agent.get(&id)?).into_response())
}

async fn delete_vm(State(st): St, _: NoParams, VmId(id): VmId) -> Result<Response, ApiError> {
    run_to_end(&st.agent, |a| async move { a.delete(&id).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start_vm(
    State(st): St,
    Query(p, _): Query<StartParams>,
    VmId(id): VmId,
    _: NoBody,
) -> Result<Response, ApiError> {
    let fresh = p.flag("fresh")?;
    Ok(
        Json(run_to_end(&st.agent, |a| async move { a.start(&id, fresh).await }).await?)
            .into_response(),
    )
}

async fn stop_vm(
    State(st): St,
    Query(p, _): Query<StopParams>,
    VmId(id): VmId,
    _: NoBody,
) -> Result<Response, ApiError> {
    let (timeout, force) = (p.seconds("timeout")?, p.flag("force")?);
    let rec = run_to_end(
        &st.agent,
        |a| async move { a.stop(&id, timeout, force).await },
    )
    .await?;
    Ok(Json(rec).into_response())
}

async fn reboot_vm(
    State(st): St,
    Query(p, _): Query<RebootParams>,
    VmId(id): VmId,
    _: NoBody,
) -> Result<Response, ApiError> {
    let timeout = p.seconds("timeout")?;
    Ok(
        Json(run_to_end(&st.agent, |a| async move { a.reboot(&id, timeout).await }).await?)
            .into_response(),
    )
}

async fn pause_vm(
    State(st): St,
    _: NoParams,
    VmId(id): VmId,
    _: NoBody,
) -> Result<Response, ApiError> {
    Ok(Json(run_to_end(&st.agent, |a| async move { a.pause(&id).await }).await?).into_response())
}

async fn resume_vm(
    State(st): St,
    _: NoParams,
    VmId(id): VmId,
    _: NoBody,
) -> Result<Response, ApiError> {
    Ok(Json(run_to_end(&st.agent, |a| async move { a.resume(&id).await }).await?).into_response())
}

async fn wait_vm(
    State(st): St,
    Query(p, _): Query<WaitParams>,
    VmId(id): VmId,
) -> Result<Response, ApiError> {
    let want = match p.get("state") {
        None => {
            return Err(ApiError::field(
                ErrorCode::InvalidParameter,
                "state",
                "required",
            ))
        }
        Some("deleted") => None,
        Some(_) => p.phase("state")?,
    };
    let timeout = p.seconds("timeout")?.unwrap_or(Duration::from_secs(30));
    match st.agent.wait(&id, want, timeout).await? {
        Some(rec) => Ok(Json(rec).into_response()),
        None => Ok(Json(serde_json::json!({"id": id, "state": "deleted"})).into_response()),
    }
}

/// A streaming body fed by a task through a channel.
fn channel_body() -> (tokio::sync::mpsc::Sender<Vec<u8>>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    });
    (tx, Body::from_stream(stream))
}

async fn console(
    State(st): St,
    Query(p, _): Query<ConsoleParams>,
    VmId(id): VmId,
) -> Result<Response, ApiError> {
    st.agent.get(&id)?;
    let offset = p.u64("offset")?.unwrap_or(0);
    let follow = p.flag("follow")?;
    let path = st.agent.vm_dir(&id).join(layout::CONSOLE_LOG);
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    let (tx, body) = channel_body();
    let agent = st.agent.clone();
    tokio::spawn(async move {
        let mut pos = offset;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Ok(mut f) = tokio::fs::File::open(&path).await {
                if f.seek(std::io::SeekFrom::Start(pos)).await.is_ok() {
                    loop {
                        match f.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                pos += n as u64;
                                if tx.send(buf[..n].to_vec()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            }
            // Following ends when the VM has no VMM any more (its output is complete) or
            // the client went away.
            let live = agent.get(&id).is_ok_and(|r| r.state.has_vmm());
            if !follow || !live || tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&size.to_string()) {
        resp.headers_mut().insert("x-console-size", v);
    }
    Ok(resp)
}

/// The Upgrade protocol name for an interactive console.
pub const CONSOLE_PROTOCOL: &str = "bexar-console";

async fn attach(
    State(st): St,
    _: NoParams,
    VmId(id): VmId,
    req: Request,
) -> Result<Response, ApiError> {
    let rec = st.agent.get(&id)?;
    if !rec.state.has_vmm() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::IllegalTransition,
            format!("cannot attach to VM {id:?}: it is {}", rec.state.as_str()),
        ));
    }
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONSOLE_PROTOCOL));
    // RFC 9110 7.8: an Upgrade header counts only when `Connection` lists `upgrade`.
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants || !connection_upgrade {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            ErrorCode::UpgradeRequired,
            format!("attach needs `Connection: Upgrade` and `Upgrade: {CONSOLE_PROTOCOL}`; for the log use /console"),
        ));
    }
    let sock_path = st.agent.vm_dir(&id).join(layout::CONSOLE_SOCKET);
    let mut sock = tokio::net::UnixStream::connect(&sock_path)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::VmmError,
                format!("cannot reach the console of {id:?}: {e}"),
            )
        })?;
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(up) => {
                let mut up = hyper_util::rt::TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut up, &mut sock).await;
            }
            Err(e) => tracing::debug!("console upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(CONSOLE_PROTOCOL));
    Ok(resp)
}

async fn events(State(st): St, Query(p, _): Query<EventsParams>) -> Result<Response, ApiError> {
    let since = p.u64("since")?.unwrap_or(0);
    let follow = p.flag("follow")?;
    let vm = p.get("vm").map(str::to_owned);
    let (backlog, mut rx, complete) = st.agent.events.since(since);
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        let keep = |e: &crate::events::Event| vm.as_ref().is_none_or(|v| *v == e.vm);
        let line = |v: &serde_json::Value| {
            let mut b = serde_json::to_vec(v).unwrap_or_default();
            b.push(b'\n');
            b
        };
        if !complete {
            let gap = serde_json::json!({"kind": "gap", "message": "events after the cursor were dropped from the backlog; re-list VMs"});
            if tx.send(line(&gap)).await.is_err() {
                return;
            }
        }
        let mut last = since;
        for e in backlog {
            last = e.seq;
            if keep(&e) && tx.send(line(&serde_json::json!(e))).await.is_err() {
                return;
            }
        }
        if !follow {
            return;
        }
        loop {
            match rx.recv().await {
                Ok(e) if e.seq > last => {
                    last = e.seq;
                    if keep(&e) && tx.send(line(&serde_json::json!(e))).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let gap = serde_json::json!({"kind": "gap", "message": format!("follower too slow; resume with since={last}")});
                    let _ = tx.send(line(&gap)).await;
                    return;
                }
                Err(_) => return,
            }
        }
    });
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

async fn metrics_text(State(st): St, _: NoParams) -> Result<Response, ApiError> {
    let text = metrics::render(&st.agent, &st.requests, &st.vm_counters).await;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn openapi(_: NoParams) -> Result<Response, ApiError> {
    Ok(([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response())
}

/// Accepts connections on the API socket from root or the agent's own user only (or, on the
/// debug socket, from anyone the socket's file permissions let in).
pub struct PeerCheckedListener {
    /// The socket.
    pub listener: tokio::net::UnixListener,
    /// Check the peer's uid (false for the read-only debug socket, guarded by its mode).
    pub check_uid: bool,
}

impl axum::serve::Listener for PeerCheckedListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        loop {
            match self.listener.accept().await {
                Ok((s, a)) => match s.peer_cred() {
                    Ok(c) if !self.check_uid || c.uid() == 0 || c.uid() == me => return (s, a),
                    Ok(c) => {
                        tracing::warn!(uid = c.uid(), pid = ?c.pid(), "API connection refused: peer is neither root nor the agent's user")
                    }
                    Err(e) => tracing::warn!("API connection refused: no peer credentials: {e}"),
                },
                Err(e) => {
                    tracing::warn!("API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// Binds an API socket with `mode` (0600 for the API, 0660 for the debug socket). A stale socket
/// file (no one listening) is replaced; a live one is an error (another agent).
pub fn bind(path: &Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another agent", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Refuses everything but inspection on the debug socket.
async fn read_only(req: Request, next: Next) -> Response {
    if req.method() != axum::http::Method::GET || req.uri().path().ends_with("/console/attach") {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::ReadOnly,
            "this is the read-only debug socket: GET requests only, no interactive console",
        )
        .into_response();
    }
    next.run(req).await
}

/// Serves the API on `socket` (and read-only on `debug_socket`) until SIGTERM or SIGINT. VMs
/// keep running after the agent stops.
pub async fn serve(
    agent: Arc<Agent>,
    socket: PathBuf,
    debug_socket: Option<PathBuf>,
) -> std::io::Result<()> {
    let listener = bind(&socket, 0o600)?;
    let state = Arc::new(ApiState {
        agent,
        requests: metrics::RequestMetrics::default(),
        vm_counters: Arc::default(),
    });
    let app = router(state.clone());
    if let Some(path) = &debug_socket {
        let l = bind(path, 0o660)?;
        tracing::info!(socket = %path.display(), "read-only debug API listening");
        let ro = router(state).layer(axum::middleware::from_fn(read_only));
        tokio::spawn(async move {
            let listener = PeerCheckedListener {
                listener: l,
                check_uid: false,
            };
            if let Err(e) = axum::serve(listener, ro).await {
                tracing::error!("debug socket failed: {e}");
            }
        });
    }
    // Logged once every socket is bound: callers (and the tests) take this line as "up".
    tracing::info!(socket = %socket.display(), "agent API listening");
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("agent stopping; VMs keep running");
    };
    // No graceful drain: followers of /events or /console would hold it open forever, and
    // nothing an agent does in a request is lost by stopping (records are written first).
    tokio::select! {
        r = axum::serve(PeerCheckedListener { listener, check_uid: true }, app).into_future() => r?,
        _ = shutdown => {}
    }
    let _ = std::fs::remove_file(&socket);
    if let Some(p) = debug_socket {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! docs/openapi.json is checked against the code: its paths and methods are exactly
    //! [`ROUTES`], its schemas name exactly the fields the types serialise, and its error codes
    //! are exactly [`error::CODES`].

    use super::*;
    use crate::spec::*;
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn doc() -> Value {
        serde_json::from_str(OPENAPI).expect("docs/openapi.json is valid JSON")
    }

    fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
        let s = &doc["components"]["schemas"][name];
        assert!(
            s.is_object(),
            "schema {name} missing from docs/openapi.json"
        );
        s
    }

    fn props(doc: &Value, name: &str) -> BTreeSet<String> {
        schema(doc, name)["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name} has no properties"))
            .keys()
            .cloned()
            .collect()
    }

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    fn full_limit() -> bexar_devices::rate_limiter::RateLimitConfig {
        let b = bexar_devices::rate_limiter::TokenBucketConfig {
            size: 1,
            one_time_burst: 1,
            refill_time_ms: 1,
        };
        bexar_devices::rate_limiter::RateLimitConfig {
            bandwidth: Some(b),
            ops: Some(b),
        }
    }

    fn full_spec() -> VmSpec {
        VmSpec {
            id: "a".into(),
            vcpus: 1,
            memory_mib: 64,
            cpu_template: "host".into(),
            boot: BootSpec {
                kernel: "/k".into(),
                initrd: Some("/i".into()),
                cmdline: Some("c".into()),
            },
            disks: vec![DiskSpec {
                path: Some("/d".into()),
                image: Some("i".into()),
                nbd: Some(bexar_devices::block::nbd::NbdTarget {
                    host: "h".into(),
                    port: 1,
                    export: "e".into(),
                    retry_s: 1,
                    timeout_s: 1,
                }),
                iscsi: Some(bexar_devices::block::iscsi::IscsiTarget {
                    portal: "h:1".into(),
                    target: "iqn.2026-12.x:y".into(),
                    lun: 1,
                    chap: Some(bexar_devices::block::iscsi::Chap {
                        user: "u".into(),
                        secret: "s".into(),
                    }),
                    initiator: Some("iqn.2026-12.x:i".into()),
                    retry_s: 1,
                    timeout_s: 1,
                }),
                size_mib: Some(1),
                format: Some(bexar_devices::block::DiskFormat::Qcow2),
                read_only: true,
                direct: false,
                serial: Some("s".into()),
                rate_limit: Some(full_limit()),
            }],
            nics: vec![NicSpec {
                segment: Some("s".into()),
                tap: Some("t".into()),
                mac: Some("02:00:00:00:00:01".into()),
                ipv4: Some("10.0.0.2".parse().unwrap()),
                ipv6: Some("2001:db8::2".parse().unwrap()),
                rx_rate_limit: Some(full_limit()),
                tx_rate_limit: Some(full_limit()),
            }],
            rng: true,
            vsock: Some(VsockSpec { cid: 3 }),
            labels: [("k".to_owned(), "v".to_owned())].into(),
            restart_policy: RestartPolicy::OnFailure,
            uuid: Some(uuid::Uuid::nil()),
            restore: Some(RestoreSpec {
                vm: Some("v".into()),
                snapshot: Some("s".into()),
                path: Some("/p".into()),
            }),
        }
    }

    fn full_metadata() -> VmMetadata {
        VmMetadata {
            hostname: Some("h".into()),
            user_data: Some("u".into()),
            vendor_data: Some("v".into()),
            public_keys: vec!["ssh-ed25519 AAAA k".into()],
            tags: [("k".to_owned(), "v".to_owned())].into(),
            http_tokens: crate::spec::TokenPolicy::Required,
        }
    }

    fn full_segment() -> crate::segment::SegmentSpec {
        use crate::segment::*;
        SegmentSpec {
            id: "s".into(),
            vlan: 10,
            mode: SegmentMode::Routed,
            ipv4: Some(Ipv4Spec {
                subnet: "10.0.0.0/24".parse().unwrap(),
                gateway: Some("10.0.0.1".parse().unwrap()),
            }),
            ipv6: Some(Ipv6Spec {
                prefix: "2001:db8::/64".parse().unwrap(),
                gateway: Some("2001:db8::1".parse().unwrap()),
            }),
            overlay: Some(Overlay::Vxlan),
        }
    }

    #[test]
    fn network_schemas_match_the_types() {
        let doc = doc();
        let seg = serde_json::to_value(full_segment()).unwrap();
        assert_eq!(props(&doc, "Segment"), keys(&seg));
        assert_eq!(props(&doc, "SegmentIpv4"), keys(&seg["ipv4"]));
        assert_eq!(props(&doc, "SegmentIpv6"), keys(&seg["ipv6"]));
        let md = serde_json::to_value(full_metadata()).unwrap();
        assert_eq!(props(&doc, "VmMetadata"), keys(&md));
        for name in ["Segment", "SegmentIpv4", "SegmentIpv6", "VmMetadata"] {
            assert_eq!(
                schema(&doc, name)["additionalProperties"],
                Value::Bool(false),
                "{name} must refuse unknown fields, as the code does"
            );
        }
        let modes: BTreeSet<String> = schema(&doc, "Segment")["properties"]["mode"]["enum"]
            .as_array()
            .expect("mode enum")
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            modes,
            ["bridged", "routed"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
    }

    #[test]
    fn paths_and_methods_match_the_routes() {
        let doc = doc();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().unwrap().keys() {
                if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        let code: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(
            documented, code,
            "docs/openapi.json paths differ from api::ROUTES"
        );
    }

    #[test]
    fn list_fields_are_the_documented_arrays_and_optional_fields_are_nullable() {
        let doc = doc();
        let mut arrays = BTreeSet::new();
        for name in [
            "VmSpec",
            "BootSpec",
            "DiskSpec",
            "NicSpec",
            "VsockSpec",
            "VmMetadata",
            "Segment",
            "SegmentIpv4",
            "SegmentIpv6",
            "RateLimit",
            "TokenBucket",
            "NicRateLimits",
            "ImageSpec",
            "NbdTarget",
            "IscsiTarget",
            "Chap",
        ] {
            let s = schema(&doc, name);
            let required: BTreeSet<&str> = s["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for (k, p) in s["properties"].as_object().unwrap() {
                let types = p["type"].to_string() + &p["anyOf"].to_string();
                if types.contains("array") {
                    arrays.insert(k.clone());
                }
                if !required.contains(k.as_str()) {
                    assert!(
                        types.contains("null"),
                        "{name}.{k} is optional, so nullable"
                    );
                }
            }
        }
        let listed: BTreeSet<String> = LIST_FIELDS.iter().map(|s| s.to_string()).collect();
        assert_eq!(arrays, listed);
    }

    #[test]
    fn request_schemas_match_the_types() {
        let doc = doc();
        let spec = serde_json::to_value(full_spec()).unwrap();
        assert_eq!(props(&doc, "VmSpec"), keys(&spec));
        assert_eq!(props(&doc, "BootSpec"), keys(&spec["boot"]));
        assert_eq!(props(&doc, "DiskSpec"), keys(&spec["disks"][0]));
        assert_eq!(props(&doc, "NicSpec"), keys(&spec["nics"][0]));
        assert_eq!(props(&doc, "VsockSpec"), keys(&spec["vsock"]));
        assert_eq!(
            props(&doc, "RateLimit"),
            keys(&spec["disks"][0]["rate_limit"])
        );
        assert_eq!(
            props(&doc, "TokenBucket"),
            keys(&spec["disks"][0]["rate_limit"]["ops"])
        );
        assert_eq!(
            props(&doc, "NicRateLimits"),
            ["rx", "tx"].iter().map(|s| s.to_string()).collect()
        );
        for name in ["VmSpec", "BootSpec", "DiskSpec", "NicSpec", "VsockSpec"] {
            assert_eq!(
                schema(&doc, name)["additionalProperties"],
                Value::Bool(false),
                "{name} must refuse unknown fields, as the code does"
            );
        }
        let policies: BTreeSet<String> = ["no", "on-failure", "always"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let documented: BTreeSet<String> = schema(&doc, "VmSpec")["properties"]["restart_policy"]
            ["enum"]
            .as_array()
            .expect("restart_policy enum")
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(documented, policies);
    }

    #[test]
    fn response_schemas_match_the_types() {
        let doc = doc();
        let rec = VmRecord {
            id: "a".into(),
            state: Phase::Running,
            spec: full_spec(),
            generation: 1,
            desired: Desired::Running,
            status: VmStatus {
                pid: Some(1),
                pid_start_ticks: Some(1),
                token: "t".into(),
                previous_token: Some("p".into()),
                exit_reason: Some("r".into()),
                restarts: 0,
                created_ms: 1,
                started_ms: Some(1),
                stopped_ms: Some(1),
                updated_ms: 1,
            },
            operation: Some(Operation {
                kind: crate::spec::OperationKind::Start,
                started_ms: 1,
                progress: Some(Default::default()),
                destination: Some("h:1".into()),
                timeout_ms: Some(1),
            }),
            nics: vec![crate::segment::NicState {
                segment: Some("s".into()),
                tap: "t".into(),
                mac: "02:00:00:00:00:01".into(),
                ipv4: Some("10.0.0.2".parse().unwrap()),
                ipv6: Some("2001:db8::2".parse().unwrap()),
                rx_rate_limit: Some(full_limit()),
                tx_rate_limit: Some(full_limit()),
            }],
            disks: vec![crate::spec::DiskState {
                path: "/d".into(),
                format: bexar_devices::block::DiskFormat::Raw,
                size: 1,
                rate_limit: Some(full_limit()),
                link: Some("up".into()),
                backing: Some(bexar_devices::block::BackingPin {
                    file: Some("/b".into()),
                    format: Some(bexar_devices::block::DiskFormat::Raw),
                }),
            }],
            metadata: full_metadata(),
            uuid: uuid::Uuid::nil(),
            restore_pending: true,
        };
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(props(&doc, "Vm"), keys(&v));
        // `fields=` takes exactly a VM's fields, and the list documents exactly its parameters.
        assert_eq!(
            VM_FIELDS
                .iter()
                .map(|f| f.to_string())
                .collect::<BTreeSet<_>>(),
            keys(&v)
        );
        let documented: BTreeSet<&str> = doc["paths"]["/v1/vms"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(documented, ListVmsParams::NAMES.iter().copied().collect());
        assert_eq!(props(&doc, "DiskState"), keys(&v["disks"][0]));
        let img = crate::images::Image {
            id: "i".into(),
            format: bexar_devices::block::DiskFormat::Qcow2,
            sha256: "0".repeat(64),
            virtual_size: 1,
            file_size: 1,
            source: "/s".into(),
            created_ms: 1,
        };
        assert_eq!(
            props(&doc, "Image"),
            keys(&serde_json::to_value(img).unwrap())
        );
        let ispec = crate::images::ImageSpec {
            id: "i".into(),
            path: "/p".into(),
            format: Some(bexar_devices::block::DiskFormat::Raw),
        };
        assert_eq!(
            props(&doc, "ImageSpec"),
            keys(&serde_json::to_value(ispec).unwrap())
        );
        assert_eq!(props(&doc, "VmStatus"), keys(&v["status"]));
        assert_eq!(props(&doc, "Operation"), keys(&v["operation"]));
        assert_eq!(
            props(&doc, "MigrationProgress"),
            keys(&v["operation"]["progress"])
        );
        assert_eq!(props(&doc, "NicState"), keys(&v["nics"][0]));
        let states: BTreeSet<String> = schema(&doc, "VmState")["enum"]
            .as_array()
            .expect("VmState enum")
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let code: BTreeSet<String> = [
            Phase::Creating,
            Phase::Stopped,
            Phase::Running,
            Phase::Paused,
            Phase::Failed,
            Phase::Deleting,
        ]
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
        assert_eq!(states, code);
        let event = crate::events::Event {
            seq: 1,
            time_ms: 1,
            vm: "a".into(),
            kind: crate::events::EventKind::Started,
            state: Some(Phase::Running),
            message: "m".into(),
        };
        assert_eq!(
            props(&doc, "Event"),
            keys(&serde_json::to_value(event).unwrap())
        );
        let codes: BTreeSet<String> = schema(&doc, "Error")["properties"]["error"]["properties"]
            ["code"]["enum"]
            .as_array()
            .expect("Error.error.code enum")
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let code: BTreeSet<String> = ErrorCode::ALL
            .iter()
            .map(|c| {
                let wire = serde_json::to_value(c).unwrap();
                assert_eq!(wire, c.as_str(), "as_str agrees with serde");
                c.as_str().to_owned()
            })
            .collect();
        assert_eq!(codes, code);
        // The lifecycle enums: what the code can write is what the document lists.
        let listed = |schema_name: &str, prop: &str| -> BTreeSet<String> {
            schema(&doc, schema_name)["properties"][prop]["enum"]
                .as_array()
                .unwrap_or_else(|| panic!("{schema_name}.{prop} enum"))
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        let wire = |v: serde_json::Value| v.as_str().unwrap().to_owned();
        let kinds: BTreeSet<String> = crate::events::EventKind::ALL
            .iter()
            .map(|k| wire(serde_json::to_value(k).unwrap()))
            .collect();
        assert_eq!(listed("Event", "kind"), kinds, "Event.kind");
        let ops: BTreeSet<String> = crate::spec::OperationKind::ALL
            .iter()
            .map(|k| {
                assert_eq!(wire(serde_json::to_value(k).unwrap()), k.as_str());
                k.as_str().to_owned()
            })
            .collect();
        assert_eq!(listed("Operation", "kind"), ops, "Operation.kind");
        let policies: BTreeSet<String> = crate::spec::TokenPolicy::ALL
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect();
        assert_eq!(
            listed("VmMetadata", "http_tokens"),
            policies,
            "VmMetadata.http_tokens"
        );
        let inv = crate::host::inventory(
            &crate::host::CapacityConfig::default(),
            std::path::Path::new("/"),
            std::iter::empty(),
            0,
        );
        assert_eq!(
            props(&doc, "DiskSpace"),
            keys(&serde_json::to_value(inv.disk).unwrap())
        );
        assert_eq!(
            props(&doc, "Inventory"),
            keys(&serde_json::to_value(inv).unwrap())
        );
        assert_eq!(
            props(&doc, "Resource"),
            keys(&serde_json::to_value(inv.vcpus).unwrap())
        );
        assert_eq!(
            props(&doc, "OpenFiles"),
            keys(&serde_json::to_value(inv.files).unwrap())
        );
        let info = serde_json::to_value(crate::host::host_info()).unwrap();
        assert_eq!(props(&doc, "HostInfo"), keys(&info));
    }
}
