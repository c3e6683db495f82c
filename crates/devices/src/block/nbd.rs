//! A disk served over the network by an NBD server: our own client of the protocol
//! (docs/storage.md says why no library), needing no kernel module on the host.
//!
//! The connection is the fixed newstyle handshake with `NBD_OPT_GO` (the server's error for
//! an export it does not have is reported by name), structured replies when the server offers
//! them (data and holes in chunks, errors with messages) and simple replies otherwise. Requests
//! are pipelined on one connection, tagged by a handle.
//!
//! One thread per disk (`nbd`) owns the connection and polls it with the device's requests;
//! the device's event loop never waits on the network. A request stays in the worker's table
//! until its reply is complete, so when the connection breaks (the server restarts, a reply
//! is overdue, a reply makes no sense) every outstanding request is sent again on a new
//! connection. If no connection comes back within the disk's `retry_s`, the outstanding
//! requests and any new ones fail with EIO until it does (the guest sees I/O errors, the VMM
//! keeps running).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    check, BlockError, BlockOp, BlockRequest, Completion, DiskBackend, DiskInfo, LinkState, SECTOR,
};
use crate::memory::{mark_dirty, GuestMemoryMmap};
use bexar_util::sync::lock;

/// Where an NBD disk is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdTarget {
    /// Server host name or address.
    pub host: String,
    /// TCP port (10809 is NBD's).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Export name.
    #[serde(default)]
    pub export: String,
    /// Seconds a broken connection is retried before the guest's requests fail with EIO.
    #[serde(default = "default_retry")]
    pub retry_s: u32,
    /// Seconds a request may go unanswered before the connection is taken for dead.
    #[serde(default = "default_timeout")]
    pub timeout_s: u32,
}

fn default_port() -> u16 {
    10809
}
fn default_retry() -> u32 {
    30
}
fn default_timeout() -> u32 {
    15
}

impl NbdTarget {
    /// Checks it; returns the field and the problem.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.host.is_empty() || self.host.len() > 255 {
            return Err(("host".into(), "must be a host name or address".into()));
        }
        if self.port == 0 {
            return Err(("port".into(), "must be 1-65535".into()));
        }
        if self.export.len() > 4096 {
            return Err(("export".into(), "must be at most 4096 bytes".into()));
        }
        if self.retry_s > 86_400 {
            return Err(("retry_s".into(), "must be at most 86400".into()));
        }
        if !(1..=3600).contains(&self.timeout_s) {
            return Err(("timeout_s".into(), "must be 1-3600".into()));
        }
        Ok(())
    }

    /// Parses `HOST[:PORT]/EXPORT` (what follows `nbd://`; `[V6]:PORT` for an IPv6 address).
    pub fn from_url(rest: &str) -> Result<Self, String> {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>()
                    .map_err(|_| format!("{p:?} is not a port"))?,
            ),
            _ => (hostport, default_port()),
        };
        let t = Self {
            host: host.to_owned(),
            port,
            export: export.to_owned(),
            retry_s: default_retry(),
            timeout_s: default_timeout(),
        };
        t.check().map_err(|(f, m)| format!("nbd {f}: {m}"))?;
        Ok(t)
    }

    /// `nbd://host:port/export`, for logs and serials.
    pub fn url(&self) -> String {
        format!("nbd://{}:{}/{}", self.host, self.port, self.export)
    }
}

// Protocol constants (the NBD protocol document, "fixed newstyle negotiation").
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const INFO_EXPORT: u16 = 0;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
const CHUNK_DONE: u16 = 1;
const CHUNK_NONE: u16 = 0;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_OFFSET_HOLE: u16 = 2;
const CHUNK_ERROR: u16 = 32769;
const CHUNK_ERROR_OFFSET: u16 = 32770;
/// Largest reply payload we accept: bigger than any request we send (a virtio request is at
/// most 254 segments of 64 KiB), so anything larger is a broken server.
const MAX_PAYLOAD: u32 = 32 << 20;

/// What the handshake learnt.
#[derive(Debug, Clone, Copy)]
struct Export {
    size: u64,
    flags: u16,
    structured: bool,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// One option reply: (type, data).
fn read_opt_reply(s: &mut TcpStream, opt: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    if be64(&h) != REPLY_MAGIC || be32(&h[8..]) != opt {
        return Err(proto("the server's option reply is malformed"));
    }
    let len = be32(&h[16..]);
    if len > 1 << 20 {
        return Err(proto("the server's option reply is too long"));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((be32(&h[12..]), data))
}

/// Connects and negotiates; a refusal of the export is `NotFound` with the server's words.
fn connect(t: &NbdTarget, deadline: Duration) -> io::Result<(TcpStream, Export)> {
    let addrs: Vec<_> = (t.host.as_str(), t.port).to_socket_addrs()?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    let mut sock = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, deadline) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut s = sock.ok_or(last)?;
    s.set_read_timeout(Some(deadline))?;
    s.set_write_timeout(Some(deadline))?;
    s.set_nodelay(true)?;
    let mut h = [0u8; 18];
    s.read_exact(&mut h)?;
    if be64(&h) != NBDMAGIC || be64(&h[8..]) != IHAVEOPT {
        return Err(proto("not a newstyle NBD server"));
    }
    let hflags = be16(&h[16..]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("the server does not speak fixed newstyle"));
    }
    let cflags = u32::from(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES));
    s.write_all(&cflags.to_be_bytes())?;
    // Structured replies if the server has them.
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[])?;
    let (rep, _) = read_opt_reply(&mut s, OPT_STRUCTURED_REPLY)?;
    let structured = rep == REP_ACK;
    // GO: the export, no information requests beyond the mandatory export info.
    let mut go = Vec::new();
    go.extend_from_slice(&(t.export.len() as u32).to_be_bytes());
    go.extend_from_slice(t.export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, OPT_GO, &go)?;
    let mut export = None;
    loop {
        let (rep, data) = read_opt_reply(&mut s, OPT_GO)?;
        match rep {
            REP_ACK => break,
            REP_INFO if data.len() >= 12 && be16(&data) == INFO_EXPORT => {
                export = Some((be64(&data[2..]), be16(&data[10..])));
            }
            REP_INFO => {}
            e if e & (1 << 31) != 0 => {
                let msg = String::from_utf8_lossy(&data).into_owned();
                let kind = if e == REP_ERR_UNKNOWN {
                    io::ErrorKind::NotFound
                } else {
                    io::ErrorKind::PermissionDenied
                };
                return Err(io::Error::new(
                    kind,
                    format!(
                        "the server refused export {:?} (error {:#x}){}{msg}",
                        t.export,
                        e,
                        if msg.is_empty() { "" } else { ": " }
                    ),
                ));
            }
            other => return Err(proto(format!("unexpected option reply {other}"))),
        }
    }
    let (size, flags) = export.ok_or_else(|| proto("the server sent no export information"))?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    s.set_nonblocking(true)?;
    Ok((
        s,
        Export {
            size,
            flags,
            structured,
        },
    ))
}

/// What the device and the worker share.
struct Shared {
    done: Mutex<Vec<Completion>>,
    cv: Condvar,
    notifier: EventFd,
    link: Arc<LinkState>,
}

enum Cmd {
    Req(u64, BlockRequest, GuestMemoryMmap),
}

/// An NBD disk.
pub struct NbdBackend {
    info: DiskInfo,
    structured: bool,
    tx: Option<mpsc::Sender<Cmd>>,
    wake: Arc<EventFd>,
    shared: Arc<Shared>,
    in_flight: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NbdBackend {
    /// Connects to `target` (an unreachable server or an unknown export is an error now) and
    /// starts the disk's thread.
    pub fn open(target: &NbdTarget, read_only: bool) -> Result<Self, BlockError> {
        let err = |e: io::Error| BlockError::Remote {
            url: target.url(),
            reason: e.to_string(),
        };
        let (sock, export) = connect(target, Duration::from_secs(5)).map_err(err)?;
        if export.size % SECTOR != 0 {
            return Err(BlockError::Remote {
                url: target.url(),
                reason: format!("the export is {} bytes, not whole sectors", export.size),
            });
        }
        let ro = read_only || export.flags & TF_READ_ONLY != 0;
        tracing::info!(
            "{}: connected, {} bytes, {}{}",
            target.url(),
            export.size,
            if export.structured {
                "structured replies"
            } else {
                "simple replies"
            },
            if export.flags & TF_READ_ONLY != 0 {
                ", read-only export"
            } else {
                ""
            }
        );
        let info = DiskInfo {
            capacity: export.size,
            read_only: ro,
            discard: !ro && export.flags & TF_SEND_TRIM != 0,
            write_zeroes: !ro && export.flags & TF_SEND_WRITE_ZEROES != 0,
        };
        let shared = Arc::new(Shared {
            done: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            notifier: EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            link: Arc::new(LinkState::default()),
        });
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?);
        let (tx, rx) = mpsc::channel();
        let mut w = Worker {
            target: target.clone(),
            export,
            rx,
            wake: wake.clone(),
            shared: shared.clone(),
            conn: Some(Conn::new(sock)),
            table: BTreeMap::new(),
            next_handle: 1,
            down_since: None,
            next_try: Instant::now(),
            failing: false,
        };
        let thread = std::thread::Builder::new()
            .name("nbd".into())
            .spawn(move || w.run())
            .map_err(BlockError::EventFd)?;
        Ok(Self {
            info,
            structured: export.structured,
            tx: Some(tx),
            wake,
            shared,
            in_flight: Arc::new(AtomicUsize::new(0)),
            thread: Some(thread),
        })
    }
}

impl DiskBackend for NbdBackend {
    fn engine(&self) -> &'static str {
        if self.structured {
            "nbd-structured"
        } else {
            "nbd"
        }
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
        let tx = self.tx.as_ref().ok_or(BlockError::Busy)?;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if tx.send(Cmd::Req(user_data, req, mem.clone())).is_err() {
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

impl Drop for NbdBackend {
    fn drop(&mut self) {
        // Closing the channel ends the worker (after it sends NBD_CMD_DISC).
        self.tx = None;
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request the server has not fully answered.
struct Pending {
    user_data: u64,
    req: BlockRequest,
    mem: GuestMemoryMmap,
    sent: Option<Instant>,
    error: Option<String>,
}

/// One connection: bytes waiting to go out, bytes received and not yet parsed.
struct Conn {
    sock: TcpStream,
    out: Vec<u8>,
    sent: usize,
    inb: Vec<u8>,
}

impl Conn {
    fn new(sock: TcpStream) -> Self {
        Self {
            sock,
            out: Vec::new(),
            sent: 0,
            inb: Vec::new(),
        }
    }
}

struct Worker {
    target: NbdTarget,
    export: Export,
    rx: mpsc::Receiver<Cmd>,
    wake: Arc<EventFd>,
    shared: Arc<Shared>,
    conn: Option<Conn>,
    table: BTreeMap<u64, Pending>,
    next_handle: u64,
    down_since: Option<Instant>,
    next_try: Instant,
    /// The retry time ran out: requests fail at once until a connection is back.
    failing: bool,
}

impl Worker {
    fn run(&mut self) {
        loop {
            // New requests.
            let _ = self.wake.read();
            loop {
                match self.rx.try_recv() {
                    Ok(Cmd::Req(user_data, req, mem)) => self.add(user_data, req, mem),
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
            self.check_timeouts();
            self.poll_once();
        }
    }

    fn complete(&mut self, handle: u64, result: io::Result<u64>) {
        if let Some(p) = self.table.remove(&handle) {
            if let (Ok(_), BlockOp::Read) = (&result, p.req.op) {
                for (addr, len) in &p.req.segments {
                    mark_dirty(&p.mem, *addr, *len as usize);
                }
            }
            lock(&self.shared.done).push(Completion {
                user_data: p.user_data,
                result,
            });
            self.shared.cv.notify_all();
            let _ = self.shared.notifier.write(1);
        }
    }

    fn add(&mut self, user_data: u64, req: BlockRequest, mem: GuestMemoryMmap) {
        let handle = self.next_handle;
        self.next_handle += 1;
        let unsupported = match req.op {
            BlockOp::Flush => self.export.flags & TF_SEND_FLUSH == 0,
            BlockOp::Discard => self.export.flags & TF_SEND_TRIM == 0,
            BlockOp::WriteZeroes { .. } => self.export.flags & TF_SEND_WRITE_ZEROES == 0,
            _ => false,
        };
        self.table.insert(
            handle,
            Pending {
                user_data,
                req,
                mem,
                sent: None,
                error: None,
            },
        );
        if unsupported {
            // A server without flush writes through; a discard it cannot do is a no-op
            // (virtio allows it); write-zeroes is not offered to the guest then.
            let op = self.table[&handle].req.op;
            let r = if matches!(op, BlockOp::WriteZeroes { .. }) {
                Err(io::Error::other("the server cannot write zeroes"))
            } else {
                Ok(0)
            };
            self.complete(handle, r);
            return;
        }
        if self.failing {
            self.complete(
                handle,
                Err(io::Error::other(format!(
                    "{} is unreachable (for more than {} s)",
                    self.target.url(),
                    self.target.retry_s
                ))),
            );
            return;
        }
        self.send(handle);
    }

    /// Puts request `handle` in the connection's output, if there is a connection.
    fn send(&mut self, handle: u64) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let Some(p) = self.table.get_mut(&handle) else {
            return;
        };
        let (cmd, flags, len) = match p.req.op {
            BlockOp::Read => (CMD_READ, 0, p.req.len),
            BlockOp::Write => (CMD_WRITE, 0, p.req.len),
            BlockOp::Flush => (CMD_FLUSH, 0, 0),
            BlockOp::Discard => (CMD_TRIM, 0, p.req.len),
            BlockOp::WriteZeroes { unmap } => (
                CMD_WRITE_ZEROES,
                if unmap { 0 } else { CMD_FLAG_NO_HOLE },
                p.req.len,
            ),
        };
        p.error = None;
        let o = &mut conn.out;
        o.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        o.extend_from_slice(&flags.to_be_bytes());
        o.extend_from_slice(&cmd.to_be_bytes());
        o.extend_from_slice(&handle.to_be_bytes());
        o.extend_from_slice(&p.req.offset.to_be_bytes());
        o.extend_from_slice(&(len as u32).to_be_bytes());
        if cmd == CMD_WRITE {
            let at = o.len();
            o.resize(at + p.req.len as usize, 0);
            let mut off = at;
            for (addr, l) in &p.req.segments {
                let l = *l as usize;
                if p.mem.read_slice(&mut o[off..off + l], *addr).is_err() {
                    // Checked at submit; memory does not shrink.
                    p.error = Some("a buffer left guest memory".into());
                }
                off += l;
            }
        }
        p.sent = Some(Instant::now());
    }

    fn finish(&mut self) {
        if let Some(mut c) = self.conn.take() {
            let mut m = Vec::new();
            m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            m.extend_from_slice(&0u16.to_be_bytes());
            m.extend_from_slice(&CMD_DISC.to_be_bytes());
            m.extend_from_slice(&[0u8; 16]);
            m.extend_from_slice(&0u32.to_be_bytes());
            let _ = c.sock.set_nonblocking(false);
            let _ = c.sock.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = c.sock.write_all(&c.out[c.sent..]);
            let _ = c.sock.write_all(&m);
        }
        let handles: Vec<u64> = self.table.keys().copied().collect();
        for h in handles {
            self.complete(h, Err(io::Error::other("the disk was closed")));
        }
    }

    fn drop_conn(&mut self, why: &str) {
        if self.conn.take().is_some() {
            tracing::warn!(
                "{}: connection lost ({why}); reconnecting",
                self.target.url()
            );
            self.shared.link.down.store(true, Ordering::Relaxed);
            self.down_since.get_or_insert_with(Instant::now);
            self.next_try = Instant::now();
            for p in self.table.values_mut() {
                p.sent = None;
            }
        }
    }

    fn reconnect(&mut self) {
        let now = Instant::now();
        let down = *self.down_since.get_or_insert(now);
        if !self.failing
            && now.duration_since(down) > Duration::from_secs(self.target.retry_s.into())
        {
            tracing::error!(
                "{}: unreachable for {} s; failing its requests until it is back",
                self.target.url(),
                self.target.retry_s
            );
            self.failing = true;
            self.shared.link.failing.store(true, Ordering::Relaxed);
            let handles: Vec<u64> = self.table.keys().copied().collect();
            for h in handles {
                self.complete(
                    h,
                    Err(io::Error::other(format!(
                        "{} is unreachable",
                        self.target.url()
                    ))),
                );
            }
        }
        if now < self.next_try {
            return;
        }
        match connect(&self.target, Duration::from_secs(2)) {
            Ok((sock, export)) if export.size == self.export.size => {
                tracing::info!(
                    "{}: connected again; resending {} request(s)",
                    self.target.url(),
                    self.table.len()
                );
                self.export = export;
                self.conn = Some(Conn::new(sock));
                self.shared.link.reconnects.fetch_add(1, Ordering::Relaxed);
                self.shared.link.failing.store(false, Ordering::Relaxed);
                self.shared.link.down.store(false, Ordering::Relaxed);
                self.down_since = None;
                self.failing = false;
                let handles: Vec<u64> = self.table.keys().copied().collect();
                for h in handles {
                    self.send(h);
                }
            }
            Ok((_, export)) => {
                tracing::error!(
                    "{}: the export is {} bytes now, it was {}: not using it",
                    self.target.url(),
                    export.size,
                    self.export.size
                );
                self.next_try = now + Duration::from_secs(1);
            }
            Err(e) => {
                tracing::debug!("{}: reconnect failed: {e}", self.target.url());
                self.next_try = now + Duration::from_millis(250);
            }
        }
    }

    fn check_timeouts(&mut self) {
        if self.conn.is_none() {
            return;
        }
        let limit = Duration::from_secs(self.target.timeout_s.into());
        if self
            .table
            .values()
            .any(|p| p.sent.is_some_and(|t| t.elapsed() > limit))
        {
            self.drop_conn("a reply is overdue");
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
        let timeout = if self.conn.is_none() { 100 } else { 1000 };
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
        let mut buf = [0u8; 64 * 1024];
        loop {
            let Some(c) = self.conn.as_mut() else { return };
            match c.sock.read(&mut buf) {
                Ok(0) => return self.drop_conn("the server closed the connection"),
                Ok(n) => c.inb.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.drop_conn(&e.to_string()),
            }
        }
        if let Err(why) = self.parse() {
            self.drop_conn(&why);
        }
    }

    /// Takes every whole reply out of the input buffer.
    fn parse(&mut self) -> Result<(), String> {
        loop {
            let Some(c) = self.conn.as_mut() else {
                return Ok(());
            };
            let b = &c.inb;
            if b.len() < 4 {
                return Ok(());
            }
            match be32(b) {
                SIMPLE_REPLY_MAGIC => {
                    if b.len() < 16 {
                        return Ok(());
                    }
                    let err = be32(&b[4..]);
                    let handle = be64(&b[8..]);
                    let p = self
                        .table
                        .get(&handle)
                        .ok_or_else(|| format!("a reply for unknown handle {handle}"))?;
                    let data = if err == 0 && p.req.op == BlockOp::Read {
                        p.req.len as usize
                    } else {
                        0
                    };
                    if b.len() < 16 + data {
                        return Ok(());
                    }
                    let body: Vec<u8> = b[16..16 + data].to_vec();
                    c.inb.drain(..16 + data);
                    let result = if err != 0 {
                        Err(io::Error::from_raw_os_error(err as i32))
                    } else {
                        if data > 0 {
                            put(p, 0, &body)?;
                        }
                        Ok(p.req.len)
                    };
                    self.complete(handle, result);
                }
                STRUCTURED_REPLY_MAGIC => {
                    if b.len() < 20 {
                        return Ok(());
                    }
                    let flags = be16(&b[4..]);
                    let kind = be16(&b[6..]);
                    let handle = be64(&b[8..]);
                    let len = be32(&b[16..]);
                    if len > MAX_PAYLOAD {
                        return Err(format!("a reply chunk of {len} bytes"));
                    }
                    if b.len() < 20 + len as usize {
                        return Ok(());
                    }
                    let body: Vec<u8> = b[20..20 + len as usize].to_vec();
                    c.inb.drain(..20 + len as usize);
                    let p = self
                        .table
                        .get_mut(&handle)
                        .ok_or_else(|| format!("a reply for unknown handle {handle}"))?;
                    match kind {
                        CHUNK_NONE => {}
                        CHUNK_OFFSET_DATA if body.len() >= 8 => {
                            let at = be64(&body).wrapping_sub(p.req.offset);
                            put(p, at, &body[8..])?;
                        }
                        CHUNK_OFFSET_HOLE if body.len() >= 12 => {
                            let at = be64(&body).wrapping_sub(p.req.offset);
                            let n = be32(&body[8..]) as usize;
                            put(p, at, &vec![0u8; n.min(p.req.len as usize)])?;
                        }
                        CHUNK_ERROR | CHUNK_ERROR_OFFSET if body.len() >= 6 => {
                            let code = be32(&body);
                            let mlen = (be16(&body[4..]) as usize).min(body.len() - 6);
                            let msg = String::from_utf8_lossy(&body[6..6 + mlen]);
                            p.error = Some(format!(
                                "the server failed it: {} {msg}",
                                io::Error::from_raw_os_error(code as i32)
                            ));
                        }
                        other => return Err(format!("an unknown reply chunk type {other}")),
                    }
                    if flags & CHUNK_DONE != 0 {
                        let p = &self.table[&handle];
                        let result = match &p.error {
                            Some(e) => Err(io::Error::other(e.clone())),
                            None if p.req.op == BlockOp::Read => Ok(p.req.len),
                            None => Ok(0),
                        };
                        self.complete(handle, result);
                    }
                }
                m => return Err(format!("a reply with magic {m:#x}")),
            }
        }
    }
}

/// Copies `data` into the guest buffers of a read, starting `at` bytes into the request.
fn put(p: &Pending, at: u64, data: &[u8]) -> Result<(), String> {
    if at
        .checked_add(data.len() as u64)
        .is_none_or(|end| end > p.req.len)
    {
        return Err("a reply chunk outside its request".into());
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
            .write_slice(&src[..n], vm_memory::GuestAddress(addr.0 + skip as u64))
            .map_err(|e| e.to_string())?;
        src = &src[n..];
        skip = 0;
        if src.is_empty() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_targets_are_named() {
        let t = NbdTarget::from_url("10.0.0.1:10900/disk0").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.export.as_str()),
            ("10.0.0.1", 10900, "disk0")
        );
        let t = NbdTarget::from_url("storage.example/").unwrap();
        assert_eq!((t.port, t.export.as_str()), (10809, ""));
        let t = NbdTarget::from_url("[fd00::1]:1234/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("fd00::1", 1234));
        assert!(NbdTarget::from_url("h:99999/x").is_err());
        assert!(NbdTarget::from_url("/x").is_err());
        let mut t = NbdTarget::from_url("h/x").unwrap();
        t.timeout_s = 0;
        assert_eq!(t.check().unwrap_err().0, "timeout_s");
    }

    /// A "server" that answers the greeting with `greeting`, then hangs up.
    fn fake_server(greeting: Vec<u8>) -> NbdTarget {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(&greeting);
                let mut sink = [0u8; 256];
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = s.read(&mut sink);
            }
        });
        NbdTarget::from_url(&format!("127.0.0.1:{port}/x")).unwrap()
    }

    #[test]
    fn a_server_that_does_not_speak_the_protocol_is_refused_not_trusted() {
        for greeting in [
            b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            [NBDMAGIC.to_be_bytes(), IHAVEOPT.to_be_bytes()].concat(), // no flags, then EOF
            [
                &NBDMAGIC.to_be_bytes()[..],
                &IHAVEOPT.to_be_bytes(),
                &[0, 0],
            ]
            .concat(), // oldstyle
            vec![],
        ] {
            let t = fake_server(greeting.clone());
            let e = NbdBackend::open(&t, false).err().expect("opened");
            assert!(e.to_string().contains(&t.url()), "{e}");
        }
    }
}
