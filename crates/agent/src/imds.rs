//! The instance metadata service at 169.254.169.254:80, answered by the agent for every VM on a
//! segment.
//!
//! **Who is asking** is decided by the interface a request arrived on, never by its source
//! address: the bridge filter marks every metadata packet with `MARK_BASE | ifindex` of the TAP
//! it came from (`bexar_hostnet::nft`), and with `net.ipv4.tcp_fwmark_accept` the accepted socket
//! carries the mark of its SYN, which the service reads back (`SO_MARK`). A request without a
//! known mark (from the host, another namespace, an unknown TAP) is refused.
//!
//! **IMDSv2 sessions**: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
//! (1-21600) returns a token bound to the calling NIC; every EC2 path needs it in
//! `X-aws-ec2-metadata-token`; a token used from another interface is refused. Requests with
//! `X-Forwarded-For` cannot get a token, and every reply leaves with IP TTL 1, so a guest-side
//! proxy or router cannot relay it (the EC2 hop limit).
//!
//! Paths: the EC2 tree under `/latest/meta-data/` (instance id, host names, type, MAC,
//! addresses, public keys, network interfaces, placement, tags), `/latest/user-data`,
//! `/latest/dynamic/instance-identity/document`, and cloud-init NoCloud files under
//! `/nocloud/` (`meta-data`, `user-data`, `vendor-data`, `network-config`), which cloud-init
//! fetches without a token, so they are served to the VM's own interface without one.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;

use crate::network::NicOwner;
use crate::segment::NicState;
use crate::spec::VmRecord;
use crate::Agent;
use bexar_util::sync::lock;

/// The token request header.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// The token header.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Longest token lifetime (6 hours, as EC2).
pub const MAX_TTL: u64 = 21_600;
/// Live tokens kept per NIC; the oldest goes first.
const MAX_TOKENS_PER_NIC: usize = 32;

/// Who connected: the mark of the SYN (`MARK_BASE | ifindex` of the TAP) and the address.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Socket mark.
    pub mark: u32,
    /// Peer address (for logs only).
    pub remote: SocketAddr,
}

/// Accepts TCP connections and reads each one's mark.
pub struct ImdsListener {
    listener: tokio::net::TcpListener,
}

impl axum::serve::Listener for ImdsListener {
    type Io = tokio::net::TcpStream;
    type Addr = Caller;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((s, remote)) => {
                    let mark = socket2::SockRef::from(&s).mark().unwrap_or(0);
                    return (s, Caller { mark, remote });
                }
                Err(e) => {
                    tracing::warn!("metadata accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Caller {
            mark: 0,
            remote: self.listener.local_addr()?,
        })
    }
}

impl Connected<IncomingStream<'_, ImdsListener>> for Caller {
    fn connect_info(s: IncomingStream<'_, ImdsListener>) -> Self {
        s.remote_addr().clone()
    }
}

struct Token {
    owner_mark: u32,
    vm: String,
    expires: Instant,
}

/// The service's state.
pub struct Imds {
    agent: Arc<Agent>,
    zone: String,
    tokens: Mutex<HashMap<String, Token>>,
}

/// Binds `addr` (normally 169.254.169.254:80; the address need not exist yet) with IP TTL 1.
pub fn bind(addr: SocketAddr) -> std::io::Result<ImdsListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
        s.set_ttl_v4(1)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(ImdsListener {
        listener: tokio::net::TcpListener::from_std(s.into())?,
    })
}

/// Serves metadata on `listener` until the task is dropped.
pub async fn serve(agent: Arc<Agent>, listener: ImdsListener, zone: String) {
    let state = Arc::new(Imds {
        agent,
        zone,
        tokens: Mutex::new(HashMap::new()),
    });
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(state)
        .into_make_service_with_connect_info::<Caller>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metadata service failed: {e}");
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [("content-type", "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

async fn handle(
    State(st): State<Arc<Imds>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some(owner) = st.agent.nic_of_mark(caller.mark) else {
        tracing::warn!(remote = %caller.remote, mark = caller.mark, "metadata request from an unknown interface refused");
        return text(StatusCode::FORBIDDEN, "not a VM interface\n");
    };
    let Some((rec, nic)) = st.agent.nic_record(&owner) else {
        return text(StatusCode::FORBIDDEN, "not a VM interface\n");
    };
    let path = uri.path();
    if method == Method::PUT && path == "/latest/api/token" {
        return st.new_token(&headers, caller.mark, &rec.id);
    }
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET, HEAD or PUT /latest/api/token\n",
        );
    }
    if let Some(file) = path.strip_prefix("/nocloud/") {
        return match nocloud(file, &rec, &st.agent) {
            Some(body) => text(StatusCode::OK, body),
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        };
    }
    if !st.token_ok(&headers, caller.mark, &owner) {
        return text(
            StatusCode::UNAUTHORIZED,
            "a valid session token is required (PUT /latest/api/token)\n",
        );
    }
    let tree = ec2_tree(&rec, &nic, &st);
    match lookup(&tree, path) {
        Some(body) => text(StatusCode::OK, body),
        None => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

impl Imds {
    fn new_token(&self, headers: &HeaderMap, mark: u32, vm: &str) -> Response {
        if headers.contains_key("x-forwarded-for") {
            return text(
                StatusCode::FORBIDDEN,
                "forwarded requests cannot get a token\n",
            );
        }
        let ttl = headers
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|t| (1..=MAX_TTL).contains(t));
        let Some(ttl) = ttl else {
            return text(
                StatusCode::BAD_REQUEST,
                format!("{TTL_HEADER} must be 1-{MAX_TTL}\n"),
            );
        };
        let token = format!(
            "{}{}",
            crate::vmm_process::new_token(),
            crate::vmm_process::new_token()
        );
        let now = Instant::now();
        let mut tokens = lock(&self.tokens);
        tokens.retain(|_, t| t.expires > now);
        let mut mine: Vec<(String, Instant)> = tokens
            .iter()
            .filter(|(_, t)| t.owner_mark == mark)
            .map(|(k, t)| (k.clone(), t.expires))
            .collect();
        if mine.len() >= MAX_TOKENS_PER_NIC {
            mine.sort_by_key(|(_, e)| *e);
            for (k, _) in &mine[..=mine.len() - MAX_TOKENS_PER_NIC] {
                tokens.remove(k);
            }
        }
        tokens.insert(
            token.clone(),
            Token {
                owner_mark: mark,
                vm: vm.to_owned(),
                expires: now + Duration::from_secs(ttl),
            },
        );
        (
            StatusCode::OK,
            [
                ("content-type", "text/plain".to_owned()),
                (TTL_HEADER, ttl.to_string()),
            ],
            token,
        )
            .into_response()
    }

    /// Whether the request carries a live token issued to this very interface (and VM: a
    /// TAP index reused by a new VM does not inherit old tokens).
    fn token_ok(&self, headers: &HeaderMap, mark: u32, owner: &NicOwner) -> bool {
        let Some(t) = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        lock(&self.tokens)
            .get(t.trim())
            .is_some_and(|t| t.owner_mark == mark && t.vm == owner.vm && t.expires > Instant::now())
    }
}

/// Finds `path` in the tree: a leaf's value, or a directory's listing (children one per
/// line, sub-directories with a trailing `/`).
fn lookup(tree: &BTreeMap<String, String>, path: &str) -> Option<String> {
    let p = path.trim_end_matches('/');
    if let Some(v) = tree.get(p) {
        return Some(v.clone());
    }
    let dir = format!("{p}/");
    let mut children: Vec<String> = Vec::new();
    for k in tree.keys().filter(|k| k.starts_with(&dir)) {
        let rest = &k[dir.len()..];
        let child = match rest.split_once('/') {
            Some((d, _)) => format!("{d}/"),
            None => rest.to_owned(),
        };
        if children.last() != Some(&child) && !children.contains(&child) {
            children.push(child);
        }
    }
    if children.is_empty() {
        return None;
    }
    // EC2 lists public keys as `N=name`.
    if p == "/latest/meta-data/public-keys" {
        children = children
            .iter()
            .map(|c| {
                format!(
                    "{}=key-{}",
                    c.trim_end_matches('/'),
                    c.trim_end_matches('/')
                )
            })
            .collect();
    }
    Some(children.join("\n"))
}

fn ec2_tree(rec: &VmRecord, nic: &NicState, st: &Imds) -> BTreeMap<String, String> {
    let md = &rec.metadata;
    let host = md.hostname.clone().unwrap_or_else(|| rec.id.clone());
    let mut t = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        t.insert(format!("/latest/meta-data/{k}"), v);
    };
    put("instance-id", rec.id.clone());
    put("hostname", host.clone());
    put("local-hostname", host.clone());
    put(
        "instance-type",
        format!("bexar.{}c.{}m", rec.spec.vcpus, rec.spec.memory_mib),
    );
    put("mac", nic.mac.clone());
    if let Some(a) = nic.ipv4 {
        put("local-ipv4", a.to_string());
    }
    if let Some(a) = nic.ipv6 {
        put("ipv6", a.to_string());
    }
    put("placement/availability-zone", st.zone.clone());
    put("placement/host-id", st.agent.info.hostname.clone());
    put("services/domain", "bexar.local".into());
    for (i, k) in md.public_keys.iter().enumerate() {
        put(&format!("public-keys/{i}/openssh-key"), k.clone());
    }
    for (k, v) in &md.tags {
        put(&format!("tags/instance/{k}"), v.clone());
    }
    for (i, n) in rec.nics.iter().enumerate() {
        let base = format!("network/interfaces/macs/{}", n.mac);
        put(&format!("{base}/device-number"), i.to_string());
        put(&format!("{base}/mac"), n.mac.clone());
        if let Some(a) = n.ipv4 {
            put(&format!("{base}/local-ipv4s"), a.to_string());
        }
        if let Some(a) = n.ipv6 {
            put(&format!("{base}/ipv6s"), a.to_string());
        }
        let seg = st.agent.segment_of(n);
        if let Some(s) = &seg {
            put(&format!("{base}/segment-id"), s.id.clone());
            if let Some(v4) = &s.ipv4 {
                put(
                    &format!("{base}/subnet-ipv4-cidr-block"),
                    v4.subnet.to_string(),
                );
                if let Some(g) = v4.gateway {
                    put(&format!("{base}/gateway-ipv4"), g.to_string());
                }
            }
            if let Some(v6) = &s.ipv6 {
                put(
                    &format!("{base}/subnet-ipv6-cidr-blocks"),
                    v6.prefix.to_string(),
                );
            }
        }
    }
    if let Some(u) = &md.user_data {
        t.insert("/latest/user-data".into(), u.clone());
    }
    let doc = serde_json::json!({
        "instanceId": rec.id,
        "instanceType": format!("bexar.{}c.{}m", rec.spec.vcpus, rec.spec.memory_mib),
        "privateIp": nic.ipv4,
        "availabilityZone": st.zone,
        "region": st.zone,
        "architecture": "x86_64",
        "hostId": st.agent.info.hostname,
        "pendingTime": rec.status.started_ms,
        "version": "2017-09-30",
    });
    t.insert(
        "/latest/dynamic/instance-identity/document".into(),
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    );
    t.insert("/".into(), "latest".into());
    t
}

/// A NoCloud file (YAML), or None.
fn nocloud(file: &str, rec: &VmRecord, agent: &Agent) -> Option<String> {
    let md = &rec.metadata;
    let host = md.hostname.clone().unwrap_or_else(|| rec.id.clone());
    match file {
        "meta-data" => {
            let mut s = format!("instance-id: {}\nlocal-hostname: {host}\n", rec.id);
            if !md.public_keys.is_empty() {
                s.push_str("public-keys:\n");
                for k in &md.public_keys {
                    s.push_str(&format!("  - {}\n", serde_json::to_string(k).ok()?));
                }
            }
            Some(s)
        }
        "user-data" => md.user_data.clone(),
        "vendor-data" => Some(md.vendor_data.clone().unwrap_or_default()),
        "network-config" => {
            let mut s = String::from("version: 2\nethernets:\n");
            for (i, n) in rec.nics.iter().enumerate() {
                s.push_str(&format!(
                    "  nic{i}:\n    match:\n      macaddress: \"{}\"\n    set-name: eth{i}\n",
                    n.mac
                ));
                let seg = agent.segment_of(n);
                let mut addrs = Vec::new();
                let mut routes = Vec::new();
                if let (Some(a), Some(v4)) = (n.ipv4, seg.as_ref().and_then(|s| s.ipv4.as_ref())) {
                    addrs.push(format!("{a}/{}", v4.subnet.prefix_len()));
                    if let Some(g) = v4.gateway {
                        routes.push(format!("{{to: 0.0.0.0/0, via: {g}}}"));
                    }
                }
                if let Some(a) = n.ipv6 {
                    addrs.push(format!("\"{a}/64\""));
                }
                if addrs.is_empty() {
                    s.push_str("    dhcp4: false\n");
                } else {
                    s.push_str(&format!("    addresses: [{}]\n", addrs.join(", ")));
                }
                if !routes.is_empty() {
                    s.push_str(&format!("    routes: [{}]\n", routes.join(", ")));
                }
            }
            Some(s)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_list_their_children() {
        let mut t = BTreeMap::new();
        for k in [
            "/latest/meta-data/instance-id",
            "/latest/meta-data/public-keys/0/openssh-key",
            "/latest/meta-data/public-keys/1/openssh-key",
            "/latest/meta-data/placement/availability-zone",
        ] {
            t.insert(k.to_owned(), "v".to_owned());
        }
        assert_eq!(lookup(&t, "/latest/meta-data/instance-id").unwrap(), "v");
        assert_eq!(
            lookup(&t, "/latest/meta-data/").unwrap(),
            "instance-id\nplacement/\npublic-keys/"
        );
        assert_eq!(
            lookup(&t, "/latest/meta-data/public-keys/").unwrap(),
            "0=key-0\n1=key-1"
        );
        assert_eq!(lookup(&t, "/latest").unwrap(), "meta-data/");
        assert!(lookup(&t, "/latest/nope").is_none());
    }
}
