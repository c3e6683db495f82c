//! What every disk on a network server needs, whatever the protocol: a thread that owns the
//! connection, a table of the requests the server has not answered, reconnection with the
//! outstanding requests sent again, a retry policy, and completions handed back to the
//! device's event loop. A protocol ([`Protocol`]: NBD in [`super::nbd`], iSCSI in
//! [`super::iscsi`]) only logs in, encodes a request and parses what the server sends.
//!
//! One thread per disk polls the connection and the device's wake-up eventfd; the device's
//! event loop never waits on the network. A request stays in the table until its answer is
//! complete, so when the connection breaks (the server restarts, an answer is overdue, an
//! answer makes no sense) every outstanding request is sent again on a new connection. A
//! write sent twice writes the same bytes twice, so resending is safe for every operation
//! a disk has. If no connection comes back within the disk's retry time, the outstanding
//! requests and any new ones fail with EIO until it does (the guest sees I/O errors, the VMM
//! keeps running).

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    check, BlockError, BlockOp, BlockRequest, Completion, DiskBackend, DiskInfo, LinkState,
};
use crate::memory::{mark_dirty, GuestMemoryMmap};
use bexar_util::sync::lock;

/// A request the server has not fully answered.
pub(super) struct Pending {
    pub user_data: u64,
    pub req: BlockRequest,
    pub mem: GuestMemoryMmap,
    /// When it went out on the current connection (`None`: not sent on it yet).
    pub sent: Option<Instant>,
    /// What the server said went wrong, reported when the answer is complete.
    pub error: Option<String>,
    /// Times the protocol asked to send it again on the same connection.
    pub retries: u8,
    /// Bytes of read data the server sent for it on the current connection.
    pub received: u64,
    /// Connections that broke while it was out on them.
    pub drops: u8,
    /// Since when it waits to be sent (the server's window is shut, or a retry's delay).
    pub waiting_since: Option<Instant>,
}

/// Connections that may break under one request before it fails: a request that kills every
/// connection it goes out on (a server that chokes on it, an answer later than the timeout
/// each time) must not be sent again forever.
const MAX_DROPS: u8 = 5;

/// What parsing the server's bytes produced for one request.
pub(super) enum Outcome {
    /// Finished: bytes moved, or the error.
    Done(io::Result<u64>),
    /// Send it again (the server asked for a retry).
    Resend,
}

/// The part of a remote disk that speaks its protocol.
pub(super) trait Protocol: Send + 'static {
    /// The target, for logs (`nbd://...`, `iscsi://...`).
    fn url(&self) -> String;
    /// Seconds a broken connection is retried, and seconds an answer may be late.
    fn policy(&self) -> (u32, u32);
    /// Makes a new connection and logs in; the socket comes back non-blocking.
    fn connect(&mut self, timeout: Duration) -> io::Result<TcpStream>;
    /// The result of `op` when it needs no server (something the server cannot do).
    fn local(&self, op: BlockOp) -> Option<io::Result<u64>>;
    /// Encodes request `tag` onto `out`; false when it must wait (the server's command
    /// window is shut).
    fn send(&mut self, tag: u64, p: &mut Pending, out: &mut Vec<u8>) -> bool;
    /// Takes every whole message from `inb[*at..]`, moving `at` past each, writing read data
    /// into guest memory and anything the server asked for (data it wants, pings) onto
    /// `out`; an `Err` is a broken conversation, and the connection is dropped.
    fn parse(
        &mut self,
        inb: &[u8],
        at: &mut usize,
        table: &mut BTreeMap<u64, Pending>,
        out: &mut Vec<u8>,
        done: &mut Vec<(u64, Outcome)>,
    ) -> Result<(), String>;
    /// The farewell message of a clean close.
    fn goodbye(&mut self, out: &mut Vec<u8>);
}

/// Default of a remote disk's `retry_s`: seconds a broken connection is retried before the
/// guest's requests fail.
pub(super) fn default_retry() -> u32 {
    30
}

/// Default of a remote disk's `timeout_s`: seconds an answer may be late.
pub(super) fn default_timeout() -> u32 {
    15
}

/// Checks a remote disk's retry and timeout; returns the field and the problem.
pub(super) fn check_policy(retry_s: u32, timeout_s: u32) -> Result<(), (String, String)> {
    if retry_s > 86_400 {
        return Err(("retry_s".into(), "must be at most 86400".into()));
    }
    if !(1..=3600).contains(&timeout_s) {
        return Err(("timeout_s".into(), "must be 1-3600".into()));
    }
    Ok(())
}

/// Splits `HOST[:PORT]` (`[V6]:PORT` for an IPv6 address with a port; a bare IPv6 address
/// has none), `port` when none is given.
pub(super) fn split_host_port(s: &str, port: u16) -> Result<(&str, u16), String> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))?,
        ),
        _ => (s, port),
    };
    Ok((host.trim_start_matches('[').trim_end_matches(']'), port))
}

/// Big-endian fields of the protocols' headers (the caller has checked the length).
pub(super) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub(super) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub(super) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A server that broke the protocol, as an I/O error.
pub(super) fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Set once the process can no longer resolve names: see [`pin_resolved`].
static PINNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, a server's name means the addresses it resolved to last (the VMM calls this as
/// it enters its jail). Its disks were opened, so their names resolved, before; a reconnect
/// happens inside the jail, where the host's `/etc/hosts` and `/etc/resolv.conf` are not and
/// the resolver's own system calls (`uname`) are refused by the seccomp filter: resolving
/// there killed the VMM. A server that moves to another address is followed by restarting the
/// VM, not by a reconnect. Processes that never call it (the agent's checks) resolve afresh
/// each time.
pub fn pin_resolved() {
    PINNED.store(true, std::sync::atomic::Ordering::Release);
}

/// The addresses of `host:port`: resolved, and recorded; once [`pin_resolved`], the recorded
/// ones.
fn resolve(host: &str, port: u16) -> io::Result<Vec<std::net::SocketAddr>> {
    type Known = std::collections::HashMap<(String, u16), Vec<std::net::SocketAddr>>;
    static KNOWN: std::sync::OnceLock<std::sync::Mutex<Known>> = std::sync::OnceLock::new();
    let known = KNOWN.get_or_init(Default::default);
    let key = (host.to_owned(), port);
    if PINNED.load(std::sync::atomic::Ordering::Acquire) {
        if let Some(addrs) = lock(known).get(&key) {
            return Ok(addrs.clone());
        }
    }
    let addrs: Vec<_> = (host, port).to_socket_addrs()?.collect();
    if !addrs.is_empty() {
        lock(known).insert(key, addrs.clone());
    }
    Ok(addrs)
}

/// Whom this process asks for its remote disks' connections, if it does not make them.
enum Dialer {
    /// A Unix socket's path: the agent's, for its VMMs.
    Path(std::path::PathBuf),
    /// One end of a datagram pair: `bexar run`'s waiting parent ([`serve_dials_over`]).
    Channel(std::os::unix::net::UnixDatagram),
}

static DIALER: std::sync::OnceLock<Dialer> = std::sync::OnceLock::new();

/// From now on this process's remote disks get their TCP connections from whoever listens on
/// the Unix socket `path` ([`serve_dial`]; relative paths are relative to the working
/// directory): a VMM whose network namespace is empty asks its agent, which connects to the
/// disk's server (only to one of that VM's disks' servers) and hands back the socket. Set once.
pub fn dial_through(path: std::path::PathBuf) {
    let _ = DIALER.set(Dialer::Path(path));
}

/// Whether this process's remote disks get their connections from a dialer.
pub fn has_dialer() -> bool {
    DIALER.get().is_some()
}

/// As [`dial_through`], asking over `channel` instead, whose other end a process outside this
/// one's network namespace serves with [`serve_dials_over`]: `bexar run`'s parent, which
/// stays in the host's network namespace as its VMM leaves it. Set once.
pub fn dial_over(channel: std::os::unix::net::UnixDatagram) {
    let _ = DIALER.set(Dialer::Channel(channel));
}

/// A request for a connection ([`dial_through`]): one JSON line.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialRequest {
    /// The server's host (a name or an address).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// How long the connect may take, in milliseconds.
    pub timeout_ms: u64,
}

/// The answer: one JSON line, sent with the connected socket when `error` is `None`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialReply {
    /// Why there is no connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The longest request or reply line.
const DIAL_LINE_MAX: usize = 4096;

/// Reads one line (at most [`DIAL_LINE_MAX`] bytes) after `first`, which came with the first
/// read.
fn dial_line(s: &mut std::os::unix::net::UnixStream, mut text: Vec<u8>) -> io::Result<Vec<u8>> {
    let mut buf = [0u8; 512];
    while !text.contains(&b'\n') {
        if text.len() > DIAL_LINE_MAX {
            return Err(proto("a dial line too long"));
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the dialer closed the connection",
            ));
        }
        text.extend_from_slice(&buf[..n]);
    }
    Ok(text)
}

/// Asks `dialer` for a connection to `host:port`.
fn ask_dialer(dialer: &Dialer, host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut s = match dialer {
        Dialer::Path(path) => std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| io::Error::new(e.kind(), format!("the dialer {}: {e}", path.display())))?,
        Dialer::Channel(channel) => {
            // A connection of its own for each request, handed over as a datagram (which the
            // kernel keeps whole), so that requests from several disks at once never mix.
            let (mine, theirs) = std::os::unix::net::UnixStream::pair()?;
            channel
                .send_with_fd(&b"d"[..], theirs.as_raw_fd())
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        format!("the dialer (this process's parent): {e}"),
                    )
                })?;
            mine
        }
    };
    // The dialer's connects (one per address it tries), and a little for the exchange.
    s.set_read_timeout(Some(
        timeout * MAX_ADDRESSES as u32 + Duration::from_secs(2),
    ))?;
    s.set_write_timeout(Some(timeout))?;
    let req = DialRequest {
        host: host.to_owned(),
        port,
        timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
    };
    let mut line = serde_json::to_vec(&req).map_err(io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut buf = [0u8; 512];
    let (n, file) = s
        .recv_with_fd(&mut buf)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let text = dial_line(&mut s, buf[..n].to_vec())?;
    let reply: DialReply = serde_json::from_slice(text.trim_ascii_end())
        .map_err(|e| proto(format!("a dialer reply that does not parse: {e}")))?;
    match (reply.error, file) {
        (Some(e), _) => Err(io::Error::new(io::ErrorKind::ConnectionRefused, e)),
        (None, Some(f)) => {
            let sock = TcpStream::from(std::os::fd::OwnedFd::from(f));
            // Only a TCP socket will do (the dialer is trusted, but a mistake should not
            // become a stream of something else).
            sock.peer_addr()?;
            sock.set_nonblocking(false)?;
            Ok(sock)
        }
        (None, None) => Err(proto("the dialer answered without a socket")),
    }
}

/// Answers one request on `conn` from a process whose remote disks' servers are `allowed`
/// (host and port as its disks name them): connects (resolving the name afresh) and sends the
/// socket back, or says why not. What is not in `allowed` is refused, answered, and returned
/// as a `PermissionDenied` error for the caller to log; a server that does not answer is only
/// answered (the asking VMM logs it, and retries on its disk's policy).
pub fn serve_dial(
    mut conn: std::os::unix::net::UnixStream,
    allowed: &[(String, u16)],
) -> io::Result<()> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let text = dial_line(&mut conn, Vec::new())?;
    let req: DialRequest = serde_json::from_slice(text.trim_ascii_end())
        .map_err(|e| proto(format!("a dial request that does not parse: {e}")))?;
    let timeout = Duration::from_millis(req.timeout_ms.clamp(1, 60_000));
    let allowed = allowed
        .iter()
        .any(|(h, p)| *h == req.host && *p == req.port);
    if asker_gone(&conn) {
        // It gave up waiting (requests queued behind dead servers): no connection for nobody.
        return Ok(());
    }
    let result = if allowed {
        connect_to(&req.host, req.port, timeout)
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            // Quoted: the name is the asker's, and goes to a log.
            format!(
                "{:?}:{} is not one of this VM's disks' servers",
                req.host, req.port
            ),
        ))
    };
    let reply = DialReply {
        error: result.as_ref().err().map(|e| e.to_string()),
    };
    let mut line = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    line.push(b'\n');
    match result {
        Ok(sock) => conn
            .send_with_fd(&line[..], sock.as_raw_fd())
            .map(drop)
            .map_err(|e| io::Error::from_raw_os_error(e.errno())),
        Err(e) => {
            conn.write_all(&line)?;
            if allowed {
                Ok(())
            } else {
                Err(e)
            }
        }
    }
}

/// Whether the asker of a request on `conn` has closed its end (a read would see the end).
fn asker_gone(conn: &std::os::unix::net::UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    // A Unix stream socket whose peer has closed reports POLLHUP (asked for or not).
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLHUP)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

/// Serves the requests that come over `channel` (the other end of a [`dial_over`]), one at a
/// time, for servers in `allowed` only, as [`serve_dial`]; for the life of the process (a
/// datagram socket sees no end when its peer goes). Refusals and broken requests are logged
/// and answered; only the channel's own failure ends it.
pub fn serve_dials_over(channel: &std::os::unix::net::UnixDatagram, allowed: &[(String, u16)]) {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    loop {
        let mut b = [0u8; 1];
        match channel.recv_with_fd(&mut b) {
            Ok((_, Some(f))) => {
                let conn = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(f));
                if let Err(e) = serve_dial(conn, allowed) {
                    tracing::warn!("a dial request from the VMM: {e}");
                }
            }
            // A datagram without a connection: nothing to answer on.
            Ok((_, None)) => tracing::warn!("a dial request without its connection"),
            // Interrupted, or a datagram that came with more than a connection (refused, its
            // descriptors closed): the next one is served.
            Err(e) if matches!(e.errno(), libc::EINTR | libc::ENOBUFS | libc::EMSGSIZE) => {
                if e.errno() != libc::EINTR {
                    tracing::warn!("a dial request that is not one: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("the dial channel: {e}; no more connections for the VMM");
                return;
            }
        }
    }
}

/// The most addresses of one server name a connection is tried at (each with the whole
/// timeout): bounds how long a reconnect waits for a name with many dead addresses.
const MAX_ADDRESSES: usize = 4;

/// Opens a TCP connection to the first address of `host:port` that answers, with
/// `timeout` on the connect and on blocking reads and writes (the handshake); through the
/// dialer, if this process has one ([`dial_through`]).
pub(super) fn dial(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let s = match DIALER.get() {
        Some(dialer) => ask_dialer(dialer, host, port, timeout)?,
        None => connect_to(host, port, timeout)?,
    };
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Connects to the first address of `host:port` that answers within `timeout`.
fn connect_to(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in resolve(host, port)?.into_iter().take(MAX_ADDRESSES) {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Ends the handshake: the worker polls a non-blocking socket.
pub(super) fn unblock(s: &TcpStream) -> io::Result<()> {
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    s.set_nonblocking(true)
}

/// Copies `data` into the guest buffers of a read, starting `at` bytes into the request.
pub(super) fn put(p: &Pending, at: u64, data: &[u8]) -> Result<(), String> {
    if at
        .checked_add(data.len() as u64)
        .is_none_or(|end| end > p.req.len)
    {
        return Err("data outside its request".into());
    }
    let mut skip = at as usize;
    let mut src = data;
    for (addr, len) in &p.req.segments {
        let len = *len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(src.len());
        p.mem
            .write_slice(&src[..n], GuestAddress(addr.0 + skip as u64))
            .map_err(|e| e.to_string())?;
        src = &src[n..];
        skip = 0;
        if src.is_empty() {
            break;
        }
    }
    Ok(())
}

/// Appends `len` bytes of a write's guest buffers, from `at` bytes into the request, to
/// `out`; false if a buffer left guest memory (checked at submit, so never in practice).
pub(super) fn gather(p: &Pending, at: u64, len: usize, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    out.resize(start + len, 0);
    let mut skip = at as usize;
    let mut off = start;
    let end = start + len;
    for (addr, l) in &p.req.segments {
        let l = *l as usize;
        if skip >= l {
            skip -= l;
            continue;
        }
        let n = (l - skip).min(end - off);
        if p.mem
            .read_slice(&mut out[off..off + n], GuestAddress(addr.0 + skip as u64))
            .is_err()
        {
            return false;
        }
        off += n;
        skip = 0;
        if off == end {
            break;
        }
    }
    off == end
}

/// What the device and the worker share.
struct Shared {
    done: Mutex<Vec<Completion>>,
    cv: Condvar,
    notifier: EventFd,
    link: Arc<LinkState>,
}

struct Cmd(u64, BlockRequest, GuestMemoryMmap);

/// A disk on a network server, whatever its protocol.
pub struct RemoteDisk {
    info: DiskInfo,
    engine: &'static str,
    tx: Option<mpsc::Sender<Cmd>>,
    wake: Arc<EventFd>,
    shared: Arc<Shared>,
    in_flight: Arc<AtomicUsize>,
    /// The worker, until its thread is started by the first request: a VMM that enters its
    /// jail after building the VM must still be one thread then (see `bexar_vmm::jail`).
    pending: Option<(String, Box<dyn FnOnce() + Send>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RemoteDisk {
    /// Starts the disk's thread (named `thread`) on a connection `proto` already made.
    pub(super) fn start<P: Protocol>(
        proto: P,
        sock: TcpStream,
        info: DiskInfo,
        engine: &'static str,
        thread: &str,
    ) -> Result<Self, BlockError> {
        let shared = Arc::new(Shared {
            done: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            notifier: EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            link: Arc::new(LinkState::default()),
        });
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?);
        let (tx, rx) = mpsc::channel();
        let mut w = Worker {
            proto,
            rx,
            wake: wake.clone(),
            shared: shared.clone(),
            conn: Some(Conn::new(sock)),
            table: BTreeMap::new(),
            waiting: VecDeque::new(),
            next_tag: 1,
            down_since: None,
            next_try: Instant::now(),
            failing: false,
            finished: Vec::new(),
            delayed: Vec::new(),
        };
        Ok(Self {
            info,
            engine,
            tx: Some(tx),
            wake,
            shared,
            in_flight: Arc::new(AtomicUsize::new(0)),
            pending: Some((thread.into(), Box::new(move || w.run()))),
            thread: None,
        })
    }

    /// Starts the worker's thread if it is not running yet.
    fn ensure_started(&mut self) -> Result<(), BlockError> {
        if let Some((name, run)) = self.pending.take() {
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(run)
                .map_err(BlockError::EventFd)?;
            self.thread = Some(t);
        }
        Ok(())
    }
}

impl DiskBackend for RemoteDisk {
    fn engine(&self) -> &'static str {
        self.engine
    }
    fn info(&self) -> DiskInfo {
        self.info
    }
    fn submit(
        &mut self,
        mem: &GuestMemoryMmap,
        req: BlockRequest,
        user_data: u64,
    ) -> Result<(), BlockError> {
        check(&self.info, &req)?;
        for (addr, len) in &req.segments {
            mem.get_slice(*addr, *len as usize)
                .map_err(|_| BlockError::BadBuffer(addr.0))?;
        }
        self.ensure_started()?;
        let tx = self.tx.as_ref().ok_or(BlockError::Busy)?;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if tx.send(Cmd(user_data, req, mem.clone())).is_err() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(BlockError::Busy);
        }
        Ok(())
    }
    fn kick(&mut self) -> io::Result<()> {
        self.wake.write(1)
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.shared.notifier.read();
        let mut done = lock(&self.shared.done);
        self.in_flight.fetch_sub(done.len(), Ordering::AcqRel);
        out.append(&mut done);
    }
    fn notifier(&self) -> &EventFd {
        &self.shared.notifier
    }
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
    fn link(&self) -> Option<Arc<LinkState>> {
        Some(self.shared.link.clone())
    }
    fn drain(&mut self, out: &mut Vec<Completion>) {
        let _ = self.kick();
        loop {
            self.reap(out);
            if self.in_flight() == 0 {
                return;
            }
            let done = lock(&self.shared.done);
            if done.is_empty() {
                let _ = self
                    .shared
                    .cv
                    .wait_timeout(done, Duration::from_millis(100));
            }
        }
    }
}

impl Drop for RemoteDisk {
    fn drop(&mut self) {
        // Closing the channel ends the worker (after it says goodbye to the server).
        self.tx = None;
        let _ = self.wake.write(1);
        // A worker never started still says goodbye to the server (on this thread).
        if let Some((_, run)) = self.pending.take() {
            run();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes read from the server at a time (the buffer grows for a larger message).
const READ_CHUNK: usize = 256 * 1024;

/// One connection: bytes waiting to go out, and bytes received (`inb[start..end]` not yet
/// parsed; the buffer is zeroed once and reused, not cleared per read).
struct Conn {
    sock: TcpStream,
    out: Vec<u8>,
    sent: usize,
    inb: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    fn new(sock: TcpStream) -> Self {
        Self {
            sock,
            out: Vec::new(),
            sent: 0,
            inb: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
        }
    }

    /// Room for at least `READ_CHUNK` more bytes after `end`.
    fn make_room(&mut self) {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.start > 0 && self.inb.len() - self.end < READ_CHUNK {
            self.inb.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.inb.len() - self.end < READ_CHUNK {
            self.inb.resize(self.end + READ_CHUNK, 0);
        }
    }
}

struct Worker<P> {
    proto: P,
    rx: mpsc::Receiver<Cmd>,
    wake: Arc<EventFd>,
    shared: Arc<Shared>,
    conn: Option<Conn>,
    table: BTreeMap<u64, Pending>,
    /// Requests the protocol could not send yet (its window was shut), oldest first.
    waiting: VecDeque<u64>,
    next_tag: u64,
    down_since: Option<Instant>,
    next_try: Instant,
    /// The retry time ran out: requests fail at once until a connection is back.
    failing: bool,
    /// Completions not yet handed to the device.
    finished: Vec<Completion>,
    /// Requests to send again once their time comes (the server asked for a retry).
    delayed: Vec<(Instant, u64)>,
}

impl<P: Protocol> Worker<P> {
    fn run(&mut self) {
        loop {
            let _ = self.wake.read();
            loop {
                match self.rx.try_recv() {
                    Ok(Cmd(user_data, req, mem)) => self.add(user_data, req, mem),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.finish();
                        return;
                    }
                }
            }
            if self.conn.is_none() {
                self.reconnect();
            }
            self.due();
            self.check_timeouts();
            // Send what is queued now: the socket is nearly always writable, and waiting for
            // poll to say so costs a system call per batch.
            if self.conn.as_ref().is_some_and(|c| c.sent < c.out.len()) {
                self.write_out();
            }
            self.publish();
            self.poll_once();
        }
    }

    /// Moves the delayed requests whose time has come to the queue.
    fn due(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.delayed.len() {
            if self.delayed[i].0 <= now {
                let (_, tag) = self.delayed.swap_remove(i);
                if self.table.contains_key(&tag) {
                    self.waiting.push_back(tag);
                }
            } else {
                i += 1;
            }
        }
        if !self.waiting.is_empty() {
            self.send_waiting();
        }
    }

    /// Hands the finished requests to the device: one lock and one eventfd write per batch,
    /// not per request.
    fn publish(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        lock(&self.shared.done).append(&mut self.finished);
        self.shared.cv.notify_all();
        let _ = self.shared.notifier.write(1);
    }

    fn complete(&mut self, tag: u64, result: io::Result<u64>) {
        if let Some(p) = self.table.remove(&tag) {
            if let (Ok(_), BlockOp::Read) = (&result, p.req.op) {
                for (addr, len) in &p.req.segments {
                    mark_dirty(&p.mem, *addr, *len as usize);
                }
            }
            self.finished.push(Completion {
                user_data: p.user_data,
                result,
            });
        }
    }

    fn add(&mut self, user_data: u64, req: BlockRequest, mem: GuestMemoryMmap) {
        let tag = self.next_tag;
        self.next_tag += 1;
        let local = self.proto.local(req.op);
        self.table.insert(
            tag,
            Pending {
                user_data,
                req,
                mem,
                sent: None,
                error: None,
                retries: 0,
                received: 0,
                drops: 0,
                waiting_since: Some(Instant::now()),
            },
        );
        if let Some(r) = local {
            return self.complete(tag, r);
        }
        if self.failing {
            let (retry, _) = self.proto.policy();
            let msg = format!(
                "{} is unreachable (for more than {retry} s)",
                self.proto.url()
            );
            return self.complete(tag, Err(io::Error::other(msg)));
        }
        self.waiting.push_back(tag);
        self.send_waiting();
    }

    /// Sends the waiting requests, oldest first, while the protocol takes them.
    fn send_waiting(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        while let Some(&tag) = self.waiting.front() {
            let Some(p) = self.table.get_mut(&tag) else {
                self.waiting.pop_front();
                continue;
            };
            p.error = None;
            p.received = 0;
            if !self.proto.send(tag, p, &mut conn.out) {
                break;
            }
            p.sent = Some(Instant::now());
            p.waiting_since = None;
            self.waiting.pop_front();
        }
    }

    fn finish(&mut self) {
        if let Some(mut c) = self.conn.take() {
            let mut bye = Vec::new();
            self.proto.goodbye(&mut bye);
            let _ = c.sock.set_nonblocking(false);
            let _ = c.sock.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = c.sock.write_all(&c.out[c.sent..]);
            let _ = c.sock.write_all(&bye);
        }
        let tags: Vec<u64> = self.table.keys().copied().collect();
        for t in tags {
            self.complete(t, Err(io::Error::other("the disk was closed")));
        }
        self.publish();
    }

    fn drop_conn(&mut self, why: &str) {
        if self.conn.take().is_some() {
            tracing::warn!(
                "{}: connection lost ({why}); reconnecting",
                self.proto.url()
            );
            self.shared.link.down.store(true, Ordering::Relaxed);
            self.down_since.get_or_insert_with(Instant::now);
            self.next_try = Instant::now();
            let mut doomed = Vec::new();
            for (tag, p) in self.table.iter_mut() {
                if p.sent.take().is_some() {
                    p.drops += 1;
                    if p.drops >= MAX_DROPS {
                        doomed.push(*tag);
                    }
                }
            }
            for tag in doomed {
                let msg = format!(
                    "{}: {MAX_DROPS} connections broke while this request was out",
                    self.proto.url()
                );
                tracing::error!("{msg}; failing it");
                self.complete(tag, Err(io::Error::other(msg)));
            }
        }
    }

    fn reconnect(&mut self) {
        let now = Instant::now();
        let down = *self.down_since.get_or_insert(now);
        let (retry, _) = self.proto.policy();
        if !self.failing && now.duration_since(down) > Duration::from_secs(retry.into()) {
            tracing::error!(
                "{}: unreachable for {retry} s; failing its requests until it is back",
                self.proto.url()
            );
            self.failing = true;
            self.shared.link.failing.store(true, Ordering::Relaxed);
            self.waiting.clear();
            self.delayed.clear();
            let tags: Vec<u64> = self.table.keys().copied().collect();
            let msg = format!("{} is unreachable", self.proto.url());
            for t in tags {
                self.complete(t, Err(io::Error::other(msg.clone())));
            }
        }
        if now < self.next_try {
            return;
        }
        match self.proto.connect(Duration::from_secs(2)) {
            Ok(sock) => {
                tracing::info!(
                    "{}: connected again; resending {} request(s)",
                    self.proto.url(),
                    self.table.len()
                );
                self.conn = Some(Conn::new(sock));
                self.shared.link.reconnects.fetch_add(1, Ordering::Relaxed);
                self.shared.link.failing.store(false, Ordering::Relaxed);
                self.shared.link.down.store(false, Ordering::Relaxed);
                self.down_since = None;
                self.failing = false;
                // Everything outstanding goes again, in the order it first came.
                self.delayed.clear();
                self.waiting = self.table.keys().copied().collect();
                let now = Instant::now();
                for p in self.table.values_mut() {
                    p.waiting_since = Some(now);
                }
                self.send_waiting();
            }
            Err(e) => {
                tracing::debug!("{}: reconnect failed: {e}", self.proto.url());
                self.next_try = now + Duration::from_millis(250);
            }
        }
    }

    fn check_timeouts(&mut self) {
        if self.conn.is_none() {
            return;
        }
        let (_, timeout) = self.proto.policy();
        let limit = Duration::from_secs(timeout.into());
        // One pass and one clock read per turn of the loop (this runs at every wake-up).
        let now = Instant::now();
        let late = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) > limit);
        let why = self.table.values().find_map(|p| {
            if late(p.sent) {
                Some("an answer is overdue")
            } else if late(p.waiting_since) {
                // The server's command window stayed shut: a new login opens a new one.
                Some("the server took no command for too long")
            } else {
                None
            }
        });
        if let Some(why) = why {
            self.drop_conn(why);
        }
    }

    fn poll_once(&mut self) {
        let mut fds = [
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            },
        ];
        if let Some(c) = &self.conn {
            fds[1].fd = c.sock.as_raw_fd();
            fds[1].events = libc::POLLIN
                | if c.sent < c.out.len() {
                    libc::POLLOUT
                } else {
                    0
                };
        }
        // Short while a connection is missing (to retry it), else long enough to idle.
        let now = Instant::now();
        let next = self.delayed.iter().map(|d| d.0).min();
        let timeout = match (self.conn.is_none(), next) {
            (true, _) => 100,
            (false, Some(t)) => t.saturating_duration_since(now).as_millis().min(1000) as i32,
            (false, None) => 1000,
        };
        // SAFETY: poll on two pollfds we own, for `timeout` ms.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n <= 0 || fds[1].fd < 0 {
            return;
        }
        let re = fds[1].revents;
        if re & libc::POLLOUT != 0 {
            self.write_out();
        }
        if re & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.read_in();
        }
    }

    fn write_out(&mut self) {
        let Some(c) = self.conn.as_mut() else { return };
        while c.sent < c.out.len() {
            match c.sock.write(&c.out[c.sent..]) {
                Ok(0) => return self.drop_conn("the server closed the connection"),
                Ok(n) => c.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.drop_conn(&e.to_string()),
            }
        }
        if c.sent == c.out.len() {
            c.out.clear();
            c.sent = 0;
        }
    }

    fn read_in(&mut self) {
        loop {
            let Some(c) = self.conn.as_mut() else { return };
            c.make_room();
            match c.sock.read(&mut c.inb[c.end..]) {
                Ok(0) => return self.drop_conn("the server closed the connection"),
                Ok(n) => {
                    c.end += n;
                    if c.end < c.inb.len() {
                        break; // the socket had no more for now
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.drop_conn(&e.to_string()),
            }
        }
        let Some(c) = self.conn.as_mut() else { return };
        let mut done = Vec::new();
        let mut at = c.start;
        let r = self.proto.parse(
            &c.inb[..c.end],
            &mut at,
            &mut self.table,
            &mut c.out,
            &mut done,
        );
        c.start = at;
        for (tag, outcome) in done {
            match outcome {
                Outcome::Done(result) => self.complete(tag, result),
                Outcome::Resend => {
                    if let Some(p) = self.table.get_mut(&tag) {
                        p.sent = None;
                        p.waiting_since = Some(Instant::now());
                        // The server was busy: give it 2 ms, doubling per retry up to 256 ms.
                        let wait = Duration::from_millis(2 << p.retries.min(7));
                        self.delayed.push((Instant::now() + wait, tag));
                    }
                }
            }
        }
        match r {
            Err(why) => self.drop_conn(&why),
            // Answers may have opened the server's window.
            Ok(()) => self.send_waiting(),
        }
    }
}

/// What a fuzzer (or a test) drives: a protocol's parser fed a hostile server's bytes.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz {
    use super::*;
    use crate::memory::test_memory;

    /// Which protocol speaks.
    #[derive(Debug, Clone, Copy)]
    pub enum Kind {
        /// NBD with structured replies.
        Nbd,
        /// iSCSI (a session as tgt negotiates it: 8 KiB PDUs, 64 KiB first burst).
        Iscsi,
    }

    /// The requests in flight when the server's bytes arrive: reads and writes of one and
    /// two segments, a flush and a discard, tagged 1-6, buffers in the first 64 KiB.
    pub fn requests() -> Vec<BlockRequest> {
        let r = |op, offset, segs: &[(u64, u32)]| BlockRequest {
            op,
            offset,
            len: segs.iter().map(|s| u64::from(s.1)).sum(),
            segments: segs.iter().map(|&(a, l)| (GuestAddress(a), l)).collect(),
        };
        vec![
            r(BlockOp::Read, 0, &[(0x1000, 4096)]),
            r(BlockOp::Read, 8192, &[(0x2000, 512), (0x3000, 3584)]),
            r(BlockOp::Write, 4096, &[(0x4000, 16384)]),
            r(BlockOp::Flush, 0, &[]),
            BlockRequest {
                op: BlockOp::Discard,
                offset: 65536,
                len: 65536,
                segments: vec![],
            },
            r(BlockOp::Write, 0, &[(0x8000, 512)]),
        ]
    }

    /// Sends [`requests`], then feeds `data` to the parser in pieces (each piece's length is
    /// taken from `data` itself); returns the outcomes, `(tag, Ok(bytes) | Err)`, until the
    /// parser gives up on the conversation. Never panics, whatever `data` is.
    pub fn server_bytes(kind: Kind, data: &[u8]) -> Vec<(u64, Result<u64, String>)> {
        let mem = test_memory(1);
        let mut proto: Box<dyn Protocol> = match kind {
            Kind::Nbd => Box::new(super::super::nbd::for_fuzzing()),
            Kind::Iscsi => Box::new(super::super::iscsi::for_fuzzing()),
        };
        let mut table = BTreeMap::new();
        let mut out = Vec::new();
        for (i, req) in requests().into_iter().enumerate() {
            let tag = i as u64 + 1;
            let mut p = Pending {
                user_data: tag,
                req,
                mem: mem.clone(),
                sent: None,
                error: None,
                retries: 0,
                received: 0,
                drops: 0,
                waiting_since: None,
            };
            if proto.local(p.req.op).is_none() {
                proto.send(tag, &mut p, &mut out);
                table.insert(tag, p);
            }
        }
        let mut results = Vec::new();
        let (mut inb, mut at, mut rest) = (Vec::new(), 0, data);
        while !rest.is_empty() {
            let n = (usize::from(rest[0]) * 7 + 1).min(rest.len());
            inb.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            let mut done = Vec::new();
            let r = proto.parse(&inb, &mut at, &mut table, &mut out, &mut done);
            assert!(at <= inb.len(), "the parser went past its input");
            for (tag, o) in done {
                assert!(table.contains_key(&tag), "an outcome for unknown tag {tag}");
                if let Outcome::Done(r) = o {
                    table.remove(&tag);
                    results.push((tag, r.map_err(|e| e.to_string())));
                }
            }
            if r.is_err() {
                break;
            }
        }
        results
    }
}

#[cfg(test)]
mod dial_tests {
    use super::*;

    /// A dialer connects to a server the disks name and hands the socket over; any other
    /// server is refused, and a server that is down is reported as such.
    #[test]
    fn a_dialer_connects_only_to_the_servers_it_was_given() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other_port = other.local_addr().unwrap().port();
        let down_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let path = std::env::temp_dir().join(format!("bexar-dialer-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let dialer = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let allowed = vec![
            ("127.0.0.1".to_string(), port),
            ("127.0.0.1".to_string(), down_port),
        ];
        let serving = std::thread::spawn(move || {
            (0..3)
                .map(|_| serve_dial(dialer.accept().unwrap().0, &allowed).map_err(|e| e.kind()))
                .collect::<Vec<_>>()
        });
        let t = Duration::from_secs(2);
        let path = Dialer::Path(path);
        let mut s = ask_dialer(&path, "127.0.0.1", port, t).unwrap();
        let (mut at_server, _) = server.accept().unwrap();
        s.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        at_server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");

        let e = ask_dialer(&path, "127.0.0.1", other_port, t).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(
            e.to_string()
                .contains("not one of this VM's disks' servers"),
            "{e}"
        );
        let e = ask_dialer(&path, "127.0.0.1", down_port, t).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        // The refusal is the server's error too (the agent logs it); a server down is not.
        assert_eq!(
            serving.join().unwrap(),
            [Ok(()), Err(io::ErrorKind::PermissionDenied), Ok(())]
        );
        if let Dialer::Path(p) = path {
            std::fs::remove_file(p).ok();
        }
    }

    /// A request whose asker has given up by the time it is served makes no connection (the
    /// queue behind a dead server would otherwise open one per stale request).
    #[test]
    fn a_request_whose_asker_has_gone_is_not_dialed() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        server.set_nonblocking(true).unwrap();
        let allowed = vec![("127.0.0.1".to_string(), port)];
        let (mut asker, conn) = std::os::unix::net::UnixStream::pair().unwrap();
        let req = DialRequest {
            host: "127.0.0.1".into(),
            port,
            timeout_ms: 1000,
        };
        let mut line = serde_json::to_vec(&req).unwrap();
        line.push(b'\n');
        asker.write_all(&line).unwrap();
        drop(asker);
        serve_dial(conn, &allowed).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            server.accept().map(drop).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "a connection was made for nobody"
        );
    }

    /// Over a channel (`bexar run`'s parent), each request has a connection of its own: two
    /// disks asking at once each get their own server socket, and a server not named is
    /// refused as through a path.
    #[test]
    fn a_dialer_over_a_channel_answers_each_request_apart() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let (inside, outside) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let allowed = vec![("127.0.0.1".to_string(), port)];
        std::thread::spawn(move || serve_dials_over(&outside, &allowed));
        let dialer = Dialer::Channel(inside);
        let t = Duration::from_secs(2);
        let socks: Vec<TcpStream> = std::thread::scope(|scope| {
            let asks: Vec<_> = (0..2)
                .map(|_| scope.spawn(|| ask_dialer(&dialer, "127.0.0.1", port, t)))
                .collect();
            asks.into_iter()
                .map(|a| a.join().unwrap().unwrap())
                .collect()
        });
        let mut ports: Vec<u16> = (0..2).map(|_| server.accept().unwrap().1.port()).collect();
        ports.sort_unstable();
        let mut mine: Vec<u16> = socks
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect();
        mine.sort_unstable();
        assert_eq!(ports, mine, "two connections, one per request");
        let e = ask_dialer(&dialer, "127.0.0.1", port + 1, t).unwrap_err();
        assert!(
            e.to_string()
                .contains("not one of this VM's disks' servers"),
            "{e}"
        );
    }
}
