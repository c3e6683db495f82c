//! virtio-vsock bridged to Unix sockets, with the convention Firecracker users know:
//!
//! * host to guest: a host process connects to the VM's socket `uds`, writes `CONNECT <port>\n`
//!   and, once the guest accepts, reads `OK <host port>\n`; then the stream is the connection;
//! * guest to host: a guest connection to CID 2 port P is connected to the Unix socket
//!   `<uds>_P`, which a host service listens on.
//!
//! Stream sockets only. Credit-based flow control both ways: the device never reads more from a
//! host socket than the guest has room for, and advertises its own buffer so the guest never
//! sends more than the device holds. A socket is unwatched while it cannot make progress (no
//! guest credit, too many packets waiting for rx buffers), so nothing spins.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    serve_queue, ActivateError, Counters, DeviceBase, VirtioDevice, INT_USED_RING, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};

/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
/// The host's CID.
pub const HOST_CID: u64 = 2;
const HDR: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flag: the sender will receive nothing more.
const SHUT_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send nothing more.
const SHUT_SEND: u32 = 2;
/// Bytes we accept from the guest per connection before they reach the host socket.
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload we put in one rx packet.
const MAX_PAYLOAD: usize = 4096;
/// Stop reading host sockets while this many packets wait for rx buffers.
const RX_BACKLOG: usize = 64;
/// Stop taking guest tx packets (whose answers queue up) beyond this many waiting packets.
const TO_GUEST_MAX: usize = 512;
/// Most connections per device, and host connections still sending their CONNECT line.
const MAX_CONNS: usize = 1024;
const MAX_HANDSHAKES: usize = 64;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;

/// How the vsock device is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u32,
    /// The host-side Unix socket.
    pub uds: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = String;
    /// Parses `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(v.parse::<u32>().ok().filter(|c| *c >= 3).ok_or_else(|| {
                        format!("invalid cid {v:?}: a number from 3 to 4294967295")
                    })?)
                }
                Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
                _ => {
                    return Err(format!(
                        "unknown vsock option {opt:?}: expected cid=N,uds=PATH"
                    ))
                }
            }
        }
        Ok(VsockConfig {
            cid: cid.ok_or("vsock needs cid=N")?,
            uds: uds.ok_or("vsock needs uds=PATH")?,
        })
    }
}

/// A packet header (virtio 1.2 §5.10.6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn parse(b: &[u8; HDR]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// The host side's port (ours).
    local_port: u32,
    /// The guest's port.
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest written to the host socket.
    fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    fwd_cnt_sent: u32,
    /// Guest data not yet written to the host socket.
    to_host: VecDeque<u8>,
    watching_in: bool,
    watching_out: bool,
    /// The host closed its sending side (the guest has been told, once).
    host_eof: bool,
    /// The guest will send nothing more.
    guest_no_send: bool,
    /// The guest will receive nothing more.
    guest_no_recv: bool,
    /// The host socket's write side was shut down after the guest's last byte.
    write_shut: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_host: VecDeque::new(),
            watching_in: false,
            watching_out: false,
            host_eof: false,
            guest_no_send: false,
            guest_no_recv: false,
            write_shut: false,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// Connects to a host service without blocking the event loop: a Unix socket whose backlog is
/// full answers EAGAIN at once, which the guest sees as a refused connection.
fn connect_nonblocking(path: &str) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    sock.connect(&SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(sock)))
}

/// The header of a packet from the host side of connection `c` to guest `cid`.
fn conn_hdr(cid: u64, c: &Conn, op: u16, len: u32) -> Hdr {
    Hdr {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: c.local_port,
        dst_port: c.peer_port,
        len,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt,
    }
}

/// A host connection still sending its `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A virtio-vsock device.
pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    base: DeviceBase,
    active: Option<(GuestMemoryMmap, Vec<Queue>)>,
    conns: HashMap<(u32, u32), Conn>,
    by_fd: HashMap<RawFd, (u32, u32)>,
    handshakes: HashMap<RawFd, Handshake>,
    to_guest: VecDeque<(Hdr, Vec<u8>)>,
    next_port: u32,
    config: [u8; 8],
    /// Sockets of connections dropped by a driver reset, to unregister before closing.
    closing: Vec<UnixStream>,
    /// Connections to end with a reset (their packet did not fit the guest's buffer).
    broken: Vec<(u32, u32)>,
    listener_watched: bool,
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The Unix socket cannot be created.
    #[error("cannot listen on vsock socket {path}: {err}")]
    Listen {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        err: std::io::Error,
    },
}

impl Vsock {
    /// Creates the device and its host socket.
    pub fn new(cfg: &VsockConfig, irqfd: EventFd) -> Result<Self, VsockError> {
        let err = |err| VsockError::Listen {
            path: cfg.uds.clone(),
            err,
        };
        match std::fs::remove_file(&cfg.uds) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(&cfg.uds).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Self {
            cid: u64::from(cfg.cid),
            uds: cfg.uds.clone(),
            listener,
            base: DeviceBase::new(3, irqfd).map_err(err)?,
            active: None,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            to_guest: VecDeque::new(),
            next_port: 1 << 30,
            config: u64::from(cfg.cid).to_le_bytes(),
            closing: Vec::new(),
            broken: Vec::new(),
            listener_watched: false,
        })
    }

    fn reply(&self, to: &Hdr, op: u16) -> Hdr {
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            ..Default::default()
        }
    }

    fn conn_hdr(&self, c: &Conn, op: u16, len: u32) -> Hdr {
        conn_hdr(self.cid, c, op, len)
    }

    fn close(&mut self, key: (u32, u32), ops: &mut EventOps, rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            if c.watching_in || c.watching_out {
                let _ = ops.remove(Events::new(&c.stream, EventSet::IN | EventSet::OUT));
            }
            self.by_fd.remove(&c.stream.as_raw_fd());
            if rst {
                let h = self.conn_hdr(&c, OP_RST, 0);
                self.to_guest.push_back((h, Vec::new()));
            }
        }
    }

    /// Sets the epoll interest of a connection's socket to what can make progress.
    fn rewatch(&mut self, key: (u32, u32), ops: &mut EventOps) {
        let backlog = self.to_guest.len() >= RX_BACKLOG;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want_in = c.state == State::Established
            && c.credit() > 0
            && !backlog
            && !c.host_eof
            && !c.guest_no_recv;
        let want_out = !c.to_host.is_empty();
        if (want_in, want_out) == (c.watching_in, c.watching_out) {
            return;
        }
        let mut set = EventSet::empty();
        if want_in {
            set |= EventSet::IN;
        }
        if want_out {
            set |= EventSet::OUT;
        }
        let had = c.watching_in || c.watching_out;
        let r = match (had, set.is_empty()) {
            (false, false) => ops.add(Events::new(&c.stream, set)),
            (true, true) => ops.remove(Events::new(&c.stream, EventSet::IN | EventSet::OUT)),
            (true, false) => ops.modify(Events::new(&c.stream, set)),
            (false, true) => Ok(()),
        };
        if r.is_ok() {
            c.watching_in = want_in;
            c.watching_out = want_out;
        }
    }

    fn rewatch_all(&mut self, ops: &mut EventOps) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for k in keys {
            self.rewatch(k, ops);
        }
    }

    /// Handles one packet from the guest.
    fn handle_guest_packet(&mut self, h: Hdr, payload: Vec<u8>, ops: &mut EventOps) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            Counters::inc(&self.base.counters.refused);
            if h.op != OP_RST {
                let r = self.reply(&h, OP_RST);
                self.to_guest.push_back((r, Vec::new()));
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            if self.conns.contains_key(&key) {
                Counters::inc(&self.base.counters.refused);
                return;
            }
            let path = format!("{}_{}", self.uds.display(), h.dst_port);
            let connected = if self.conns.len() >= MAX_CONNS {
                Err(std::io::Error::other("too many vsock connections"))
            } else {
                connect_nonblocking(&path)
            };
            match connected {
                Ok(stream) => {
                    let mut c = Conn::new(stream, State::Established, h.dst_port, h.src_port);
                    c.peer_buf_alloc = h.buf_alloc;
                    c.peer_fwd_cnt = h.fwd_cnt;
                    let r = self.conn_hdr(&c, OP_RESPONSE, 0);
                    self.by_fd.insert(c.stream.as_raw_fd(), key);
                    self.conns.insert(key, c);
                    self.to_guest.push_back((r, Vec::new()));
                    Counters::inc(&self.base.counters.requests);
                    self.rewatch(key, ops);
                }
                Err(e) => {
                    tracing::debug!("vsock: guest connection to {path}: {e}");
                    let r = self.reply(&h, OP_RST);
                    self.to_guest.push_back((r, Vec::new()));
                }
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                let r = self.reply(&h, OP_RST);
                self.to_guest.push_back((r, Vec::new()));
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                let line = format!("OK {}\n", c.local_port);
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.close(key, ops, true);
                    return;
                }
                Counters::inc(&self.base.counters.requests);
            }
            OP_RW if c.state == State::Established => {
                if c.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    // The guest ignored our credit.
                    Counters::inc(&self.base.counters.refused);
                    self.close(key, ops, true);
                    return;
                }
                self.base
                    .counters
                    .written_bytes
                    .fetch_add(payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
                c.to_host.extend(payload);
                self.flush_to_host(key, ops);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                let u = conn_hdr(self.cid, c, OP_CREDIT_UPDATE, 0);
                c.fwd_cnt_sent = c.fwd_cnt;
                self.to_guest.push_back((u, Vec::new()));
            }
            OP_RST => {
                self.close(key, ops, false);
                return;
            }
            OP_SHUTDOWN => {
                c.guest_no_recv |= h.flags & SHUT_RCV != 0;
                c.guest_no_send |= h.flags & SHUT_SEND != 0;
                // Whatever the guest already sent still reaches the host (flush_to_host, then
                // finish); nothing here blocks the event loop.
                self.flush_to_host(key, ops);
                return;
            }
            _ => {
                Counters::inc(&self.base.counters.refused);
                self.close(key, ops, true);
                return;
            }
        }
        self.rewatch(key, ops);
    }

    /// Writes buffered guest data to the host socket; tells the guest about freed room.
    fn flush_to_host(&mut self, key: (u32, u32), ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.close(key, ops, true);
                    return;
                }
            }
        }
        // Tell the guest once it has a quarter of the buffer back.
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= BUF_ALLOC / 4 {
            c.fwd_cnt_sent = c.fwd_cnt;
            let u = conn_hdr(self.cid, c, OP_CREDIT_UPDATE, 0);
            self.to_guest.push_back((u, Vec::new()));
        }
        self.finish(key, ops);
    }

    /// Applies half-closes once the guest's data has reached the host, and ends the connection
    /// when neither side will send again (or the guest will neither send nor receive).
    fn finish(&mut self, key: (u32, u32), ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let drained = c.to_host.is_empty();
        if c.guest_no_send && drained && !c.write_shut {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            c.write_shut = true;
        }
        let done = drained && c.guest_no_send && (c.host_eof || c.guest_no_recv);
        if done {
            self.close(key, ops, true);
        } else {
            self.rewatch(key, ops);
        }
    }

    /// Reads what the guest has credit for from a host socket.
    fn read_from_host(&mut self, key: (u32, u32), ops: &mut EventOps) {
        let mut buf = [0u8; MAX_PAYLOAD];
        loop {
            if self.to_guest.len() >= RX_BACKLOG {
                break;
            }
            let Some(c) = self.conns.get_mut(&key) else {
                return;
            };
            let room = (c.credit() as usize).min(MAX_PAYLOAD);
            if room == 0 || c.state != State::Established {
                break;
            }
            match c.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    // The host will send nothing more: tell the guest once, stop reading.
                    c.host_eof = true;
                    let mut h = conn_hdr(self.cid, c, OP_SHUTDOWN, 0);
                    h.flags = SHUT_SEND;
                    self.to_guest.push_back((h, Vec::new()));
                    self.finish(key, ops);
                    return;
                }
                Ok(n) => {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    let h = conn_hdr(self.cid, c, OP_RW, n as u32);
                    self.to_guest.push_back((h, buf[..n].to_vec()));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.close(key, ops, true);
                    return;
                }
            }
        }
        self.rewatch(key, ops);
    }

    /// Accepts host connections and reads their CONNECT lines. At the connection limit, or when
    /// accept fails (out of descriptors), the listener is unwatched until a connection ends.
    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            if self.handshakes.len() >= MAX_HANDSHAKES || self.conns.len() >= MAX_CONNS {
                self.watch_listener(ops, false);
                return;
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!("vsock: accept on {} failed: {e}", self.uds.display());
                    self.watch_listener(ops, false);
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.handshakes.insert(
                    stream.as_raw_fd(),
                    Handshake {
                        stream,
                        line: Vec::new(),
                    },
                );
            }
        }
    }

    fn watch_listener(&mut self, ops: &mut EventOps, on: bool) {
        if self.listener_watched == on {
            return;
        }
        let ev = Events::new(&self.listener, EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        if r.is_ok() {
            self.listener_watched = on;
        }
    }
    fn handshake(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut b = [0u8; 64];
        let done = match hs.stream.read(&mut b) {
            Ok(0) => Err(()),
            Ok(n) => {
                hs.line.extend_from_slice(&b[..n]);
                if hs.line.len() > 64 {
                    Err(())
                } else if let Some(end) = hs.line.iter().position(|c| *c == b'\n') {
                    let text = String::from_utf8_lossy(&hs.line[..end]).into_owned();
                    match text
                        .strip_prefix("CONNECT ")
                        .and_then(|p| p.trim().parse::<u32>().ok())
                    {
                        Some(port) => Ok(Some(port)),
                        None => Err(()),
                    }
                } else {
                    Ok(None)
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(_) => Err(()),
        };
        match done {
            Ok(None) => {}
            Err(()) => {
                if let Some(hs) = self.handshakes.remove(&fd) {
                    let _ = ops.remove(Events::new(&hs.stream, EventSet::IN));
                    Counters::inc(&self.base.counters.refused);
                }
            }
            Ok(Some(port)) => {
                let Some(hs) = self.handshakes.remove(&fd) else {
                    return;
                };
                let _ = ops.remove(Events::new(&hs.stream, EventSet::IN));
                let local = self.next_port;
                self.next_port = self.next_port.wrapping_add(1).max(1 << 30);
                let key = (local, port);
                let c = Conn::new(hs.stream, State::Connecting, local, port);
                let req = self.conn_hdr(&c, OP_REQUEST, 0);
                self.by_fd.insert(c.stream.as_raw_fd(), key);
                self.conns.insert(key, c);
                self.to_guest.push_back((req, Vec::new()));
            }
        }
    }

    /// Takes every tx packet from the guest.
    fn process_tx(&mut self, ops: &mut EventOps) {
        if self.to_guest.len() >= TO_GUEST_MAX {
            // Answers would pile up: leave the guest's packets in its ring until rx drains.
            return;
        }
        let Some((mem, queues)) = self.active.as_mut() else {
            Counters::inc(&self.base.counters.spurious_notifies);
            return;
        };
        let mem = mem.clone();
        let mut packets = Vec::new();
        let counters = self.base.counters.clone();
        serve_queue(
            "virtio-vsock tx",
            &mut queues[TX],
            &mem,
            &self.base.interrupt,
            &counters,
            |chain| {
                match chain.reader(&mem) {
                    Ok(mut r) if r.available_bytes() >= HDR => {
                        let mut hb = [0u8; HDR];
                        if r.read_exact(&mut hb).is_ok() {
                            let h = Hdr::parse(&hb);
                            let n = (h.len as usize).min(r.available_bytes());
                            // Only data packets carry a payload.
                            let allowed = if h.op == OP_RW { BUF_ALLOC as usize } else { 0 };
                            if n == h.len as usize && n <= allowed {
                                let mut p = vec![0u8; n];
                                if r.read_exact(&mut p).is_ok() {
                                    packets.push((h, p));
                                    return 0;
                                }
                            }
                        }
                        Counters::inc(&counters.refused);
                    }
                    _ => Counters::inc(&counters.refused),
                }
                0
            },
        );
        for (h, p) in packets {
            self.handle_guest_packet(h, p, ops);
        }
    }

    /// Moves waiting packets into the guest's rx buffers.
    fn fill_rx(&mut self) {
        let Some((mem, queues)) = self.active.as_mut() else {
            return;
        };
        let mem = mem.clone();
        let mut delivered = false;
        while let Some((h, payload)) = self.to_guest.front() {
            let chain = match queues[RX].iter(&mem) {
                Ok(mut it) => it.next(),
                Err(_) => {
                    Counters::inc(&self.base.counters.needs_reset);
                    self.base.interrupt.set_needs_reset();
                    return;
                }
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let written = chain
                .writer(&mem)
                .ok()
                .filter(|w| w.available_bytes() >= HDR + payload.len())
                .and_then(|mut w| {
                    w.write_all(&h.bytes())
                        .and_then(|_| w.write_all(payload))
                        .ok()
                });
            let len = match written {
                Some(()) => {
                    self.base
                        .counters
                        .read_bytes
                        .fetch_add(payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    (HDR + payload.len()) as u32
                }
                None => {
                    // The packet does not fit: dropping it would corrupt the stream, so the
                    // connection ends with a reset instead.
                    Counters::inc(&self.base.counters.refused);
                    if h.op == OP_RW {
                        self.broken.push((h.src_port, h.dst_port));
                    }
                    0
                }
            };
            if queues[RX].add_used(&mem, head, len).is_err() {
                Counters::inc(&self.base.counters.needs_reset);
                self.base.interrupt.set_needs_reset();
                return;
            }
            self.to_guest.pop_front();
            delivered = true;
        }
        if delivered && !matches!(queues[RX].needs_notification(&mem), Ok(false)) {
            self.base.interrupt.trigger(INT_USED_RING);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn kind(&self) -> &'static str {
        "vsock"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        if let Some(i) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::BadQueue(i));
        }
        self.active = Some((mem, queues));
        Ok(())
    }
    fn reset(&mut self) {
        // A driver reset drops every connection (the host sockets close).
        // The sockets are still registered with the event loop: they are unregistered (and so
        // closed) at the next event, where the loop's operations are at hand.
        self.active = None;
        self.closing
            .extend(self.conns.drain().map(|(_, c)| c.stream));
        self.closing
            .extend(self.handshakes.drain().map(|(_, h)| h.stream));
        self.by_fd.clear();
        self.to_guest.clear();
        self.broken.clear();
    }
    fn base(&self) -> &DeviceBase {
        &self.base
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        for s in self.closing.drain(..) {
            let _ = ops.remove(Events::new(&s, EventSet::IN | EventSet::OUT));
        }
        let fd = events.fd();
        if fd == self.base.queue_evts[RX].as_raw_fd() {
            let _ = self.base.queue_evts[RX].read();
            self.rewatch_all(ops);
        } else if fd == self.base.queue_evts[TX].as_raw_fd() {
            let _ = self.base.queue_evts[TX].read();
            self.process_tx(ops);
        } else if fd == self.base.queue_evts[EVT].as_raw_fd() {
            let _ = self.base.queue_evts[EVT].read();
        } else if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if self.handshakes.contains_key(&fd) {
            self.handshake(fd, ops);
        } else if let Some(key) = self.by_fd.get(&fd).copied() {
            let set = events.event_set();
            if set.contains(EventSet::OUT) {
                self.flush_to_host(key, ops);
            }
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                self.read_from_host(key, ops);
            }
        }
        if self.active.is_some() {
            self.fill_rx();
            for key in std::mem::take(&mut self.broken) {
                self.close(key, ops, true);
            }
            if self.to_guest.len() < TO_GUEST_MAX / 2 {
                // Guest packets left in the tx ring while answers were piling up.
                self.process_tx(ops);
                self.fill_rx();
            }
            if self.to_guest.len() < RX_BACKLOG {
                self.rewatch_all(ops);
            }
        }
        if self.handshakes.len() < MAX_HANDSHAKES && self.conns.len() < MAX_CONNS {
            self.watch_listener(ops, true);
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.base.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("virtio-vsock: cannot watch a queue eventfd: {e:?}");
            }
        }
        self.watch_listener(ops, true);
        if !self.listener_watched {
            tracing::error!("virtio-vsock: cannot watch {}", self.uds.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Hdr {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5000,
            len: 17,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 99,
        };
        assert_eq!(Hdr::parse(&h.bytes()), h);
    }

    #[test]
    fn config_parses() {
        let c: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!((c.cid, c.uds.to_str().unwrap()), (3, "/tmp/v.sock"));
        assert!("cid=2,uds=/x".parse::<VsockConfig>().is_err());
        assert!("cid=3".parse::<VsockConfig>().is_err());
        assert!("uds=/x".parse::<VsockConfig>().is_err());
    }
}
