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
use crate::spec::{TokenPolicy, VmRecord};
use crate::Agent;
use bexar_util::sync::lock;
use bexar_vmm::boot::smbios::SmbiosIdentity;

/// The system serial number of a VM on a segment: cloud-init's NoCloud datasource reads it
/// from SMBIOS and fetches `meta-data`, `user-data` and `vendor-data` from the URL, so a stock
/// image finds this service with no kernel parameter. `nocloud-net`, not `nocloud`: before
/// cloud-init 23.2 (Debian 12 has 22.4) `ds=nocloud` means a local seed and an `http` seed URL
/// is ignored; `nocloud-net` works on every version.
pub const NOCLOUD_SEED: &str = "ds=nocloud-net;s=http://169.254.169.254/nocloud/";

/// What a VM's SMBIOS tables say: its UUID, the VM id as chassis asset tag, and as serial
/// number the NoCloud seed when the VM can reach this service (a NIC on a segment), its UUID
/// otherwise.
pub fn smbios_identity(rec: &VmRecord) -> SmbiosIdentity {
    let reachable = rec.nics.iter().any(|n| n.segment.is_some());
    SmbiosIdentity {
        serial: Some(if reachable {
            NOCLOUD_SEED.to_owned()
        } else {
            rec.uuid.to_string()
        }),
        uuid: Some(rec.uuid),
        asset_tag: Some(rec.id.clone()),
    }
}

/// The token request header.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// The token header.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Longest token lifetime (6 hours, as EC2).
pub const MAX_TTL: u64 = 21_600;
/// The dated versions of the EC2 tree that EC2 lists at `/`, each served as `/latest/` is.
/// Clients read dated paths, not `latest`: cloud-init asks for `2009-04-04` on a platform it
/// does not know as AWS and for `2021-03-23`, `2018-09-24` or `2016-09-02` on AWS.
pub const EC2_VERSIONS: &[&str] = &[
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
    "2022-09-24",
];

/// The path in the `/latest/` tree that `path` names: dated versions are aliases of it.
fn canonical(path: &str) -> Option<String> {
    let rest = path.strip_prefix('/')?;
    let (version, tail) = match rest.split_once('/') {
        Some((v, t)) => (v, Some(t)),
        None => (rest, None),
    };
    if version != "latest" && !EC2_VERSIONS.contains(&version) {
        return None;
    }
    Some(match tail {
        Some(t) => format!("/latest/{t}"),
        None => "/latest".to_owned(),
    })
}

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
    // EC2's rules: a token, when sent, must be valid whatever the policy; with `required`
    // one must be sent.
    let token = headers.get(TOKEN_HEADER);
    let authorised = match token {
        Some(_) => st.token_ok(&headers, caller.mark, &owner),
        None => rec.metadata.http_tokens == TokenPolicy::Optional,
    };
    if !authorised {
        return text(
            StatusCode::UNAUTHORIZED,
            "a valid session token is required (PUT /latest/api/token)\n",
        );
    }
    if path == "/" {
        let mut versions: Vec<&str> = EC2_VERSIONS.to_vec();
        versions.push("latest");
        return text(StatusCode::OK, versions.join("\n"));
    }
    let tree = ec2_tree(&rec, &nic, &st);
    match canonical(path).and_then(|p| lookup(&tree, &p)) {
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
    t
}

/// A NoCloud file, or None.
///
/// `meta-data` and `network-config` are YAML documents, written as JSON: JSON is YAML, and in
/// it every string is double-quoted, so no reader's implicit typing can change a value. That
/// matters because cloud-init reads them with PyYAML, a YAML 1.1 reader, where a bare `on`,
/// `no` or `Yes` is a boolean, `017` is 15, `12:30` is 750 and `2024-01-01` a date. The YAML
/// serialisers on crates.io (serde_yaml, serde_yaml_ng, serde_norway) write YAML 1.2, which
/// leaves exactly those bare (measured: `on`, `no`, `Yes`, `OFF`, `1_000`, `12:30` and
/// `2024-01-01` came back from PyYAML changed), so serde_json is the serialiser here.
/// `user-data` and `vendor-data` are the caller's bytes; when absent they are empty (200),
/// because before 23.2 cloud-init treats a missing `user-data` as a failed seed and drops the
/// meta-data with it.
fn nocloud(file: &str, rec: &VmRecord, agent: &Agent) -> Option<String> {
    use serde_json::{json, Map, Value};
    let md = &rec.metadata;
    let host = md.hostname.clone().unwrap_or_else(|| rec.id.clone());
    let doc = match file {
        "meta-data" => {
            let mut m = Map::new();
            m.insert("instance-id".into(), json!(rec.id));
            m.insert("local-hostname".into(), json!(host));
            if !md.public_keys.is_empty() {
                m.insert("public-keys".into(), json!(md.public_keys));
            }
            Value::Object(m)
        }
        "user-data" => return Some(md.user_data.clone().unwrap_or_default()),
        "vendor-data" => return Some(md.vendor_data.clone().unwrap_or_default()),
        "network-config" => {
            let mut ethernets = Map::new();
            for (i, n) in rec.nics.iter().enumerate() {
                let seg = agent.segment_of(n);
                let mut addrs = Vec::new();
                let mut routes = Vec::new();
                if let (Some(a), Some(v4)) = (n.ipv4, seg.as_ref().and_then(|s| s.ipv4.as_ref())) {
                    addrs.push(format!("{a}/{}", v4.subnet.prefix_len()));
                    if let Some(g) = v4.gateway {
                        routes.push(json!({"to": "0.0.0.0/0", "via": g.to_string()}));
                    }
                }
                if let Some(a) = n.ipv6 {
                    addrs.push(format!("{a}/64"));
                }
                let mut e = Map::new();
                e.insert("match".into(), json!({"macaddress": n.mac}));
                e.insert("set-name".into(), json!(format!("eth{i}")));
                if addrs.is_empty() {
                    e.insert("dhcp4".into(), json!(false));
                } else {
                    e.insert("addresses".into(), json!(addrs));
                }
                if !routes.is_empty() {
                    e.insert("routes".into(), json!(routes));
                }
                ethernets.insert(format!("nic{i}"), Value::Object(e));
            }
            json!({"version": 2, "ethernets": ethernets})
        }
        _ => return None,
    };
    serde_json::to_string_pretty(&doc).ok().map(|s| s + "\n")
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
