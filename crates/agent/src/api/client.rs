//! A small client for the agent API over its Unix socket (used by the CLI, the tests and the
//! benchmark): one HTTP/1.1 connection per request.

use std::path::{Path, PathBuf};

use axum::http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Errors reaching the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach the agent at {path}: {err} (is `bexar agent` running? see --socket)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// HTTP failed.
    #[error("HTTP: {0}")]
    Http(String),
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (Null if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// The API client.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the agent listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        upgrade: Option<&str>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|err| ClientError::Connect {
                    path: self.socket.clone(),
                    err,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "bexar");
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        if let Some(proto) = upgrade {
            req = req.header("connection", "upgrade").header("upgrade", proto);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))
    }

    /// Sends a request with a raw body and reads the whole reply.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Reply, ClientError> {
        let resp = self.send_raw(method, path, body, None).await?;
        read_reply(resp).await
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Result<Reply, ClientError> {
        self.request(Method::GET, path, Vec::new()).await
    }

    /// POST with a JSON body (or none for `Null`).
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Reply, ClientError> {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).unwrap_or_default()
        };
        self.request(Method::POST, path, bytes).await
    }

    /// PUT with a JSON body.
    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Result<Reply, ClientError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.request(Method::PUT, path, bytes).await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Result<Reply, ClientError> {
        self.request(Method::DELETE, path, Vec::new()).await
    }

    /// GET a streaming body, handing each chunk to `each` until the stream ends or `each`
    /// returns false. Returns the status (and the body, if it was an error).
    pub async fn stream(
        &self,
        path: &str,
        mut each: impl FnMut(&[u8]) -> bool,
    ) -> Result<Reply, ClientError> {
        let resp = self.send_raw(Method::GET, path, Vec::new(), None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let b = body
                .collect()
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?
                .to_bytes();
            return Ok(Reply { status, body: b });
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Http(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                if !each(data) {
                    break;
                }
            }
        }
        Ok(Reply {
            status,
            body: Bytes::new(),
        })
    }

    /// Opens an upgraded (raw, two-way) connection, e.g. the interactive console.
    pub async fn upgrade(
        &self,
        path: &str,
        protocol: &str,
    ) -> Result<Result<TokioIo<hyper::upgrade::Upgraded>, Reply>, ClientError> {
        let resp = self
            .send_raw(Method::GET, path, Vec::new(), Some(protocol))
            .await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Err(read_reply(resp).await?));
        }
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(Ok(TokioIo::new(up)))
    }
}

/// Reads a whole response into a [`Reply`].
async fn read_reply(resp: hyper::Response<Incoming>) -> Result<Reply, ClientError> {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    Ok(Reply { status, body })
}
