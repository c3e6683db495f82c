//! The virtio-vsock device: its three queues (rx, tx, event) and the host side of its
//! streams, Unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use event_manager::{EventOps, EventSet, Events};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use super::connection::{Conn, State};
use super::packet::{Hdr, Op, HDR_LEN, SHUT_RCV, SHUT_SEND, TYPE_STREAM};
use super::VsockConfig;
use crate::virtio::{
    read_config_bytes, ActivateError, ActivationContext, Counters, PersistError, VirtioCommon,
    VirtioDevice, VirtioState,
};
/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Bytes we accept from the guest per connection before they reach the host socket.
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload we put in one rx packet.
const MAX_PAYLOAD: usize = 4096;
/// Stop reading host sockets while this many packets wait for rx buffers.
pub(super) const RX_BACKLOG: usize = 64;
/// Stop taking guest tx packets (whose answers queue up) beyond this many waiting packets.
pub(super) const TO_GUEST_MAX: usize = 512;
/// Most connections per device, and host connections still sending their CONNECT line.
pub(super) const MAX_CONNS: usize = 1024;
pub(super) const MAX_HANDSHAKES: usize = 64;
pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;
pub(super) const EVT: usize = 2;

/// Connects to a host service without blocking the event loop: a Unix socket whose backlog is
/// full answers EAGAIN at once, which the guest sees as a refused connection.
fn connect_nonblocking(path: &str) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    sock.connect(&SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(sock)))
}

/// The header of a packet from the host side of connection `c` to guest `cid`.
fn conn_hdr(cid: u64, c: &Conn, op: Op, len: u32) -> Hdr {
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
    pub(super) common: VirtioCommon,
    /// A VIRTIO_VSOCK_EVENT_TRANSPORT_RESET waits for an event buffer (after a restore: the
    /// guest's connections did not survive it).
    reset_event_pending: bool,
    conns: HashMap<(u32, u32), Conn>,
    by_fd: HashMap<RawFd, (u32, u32)>,
    handshakes: HashMap<RawFd, Handshake>,
    to_guest: VecDeque<(Hdr, Vec<u8>)>,
    next_port: u32,
    config: [u8; 8],
    /// Sockets of connections dropped by a driver reset, to unregister before closing.
    pub(super) closing: Vec<UnixStream>,
    /// Connections to end with a reset (their packet did not fit the guest's buffer).
    pub(super) broken: Vec<(u32, u32)>,
    pub(super) listener_watched: bool,
}

/// What a virtio-vsock saves: its queues and its identity. Connections do not survive a
/// snapshot: the restored device tells the guest with a transport reset event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The virtio part.
    pub virtio: VirtioState,
    /// The device as attached (context id, host socket).
    pub config: VsockConfig,
}

/// The event that says every connection is gone (virtio 1.2 §5.10.6.7).
const EVENT_TRANSPORT_RESET: u32 = 0;

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
    pub fn new(cfg: &VsockConfig) -> Result<Self, VsockError> {
        let err = |err| VsockError::Listen {
            path: cfg.uds.clone(),
            err,
        };
        let listener = bexar_util::unix::bind_owner_only(&cfg.uds).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Self {
            cid: u64::from(cfg.cid),
            uds: cfg.uds.clone(),
            listener,
            common: VirtioCommon::new(
                VIRTIO_ID_VSOCK,
                "vsock",
                0,
                &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE],
            )
            .map_err(err)?,
            reset_event_pending: false,
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

    pub(super) fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
    pub(super) fn is_handshake(&self, fd: RawFd) -> bool {
        self.handshakes.contains_key(&fd)
    }
    pub(super) fn conn_of(&self, fd: RawFd) -> Option<(u32, u32)> {
        self.by_fd.get(&fd).copied()
    }
    pub(super) fn to_guest_len(&self) -> usize {
        self.to_guest.len()
    }
    pub(super) fn handshakes_len(&self) -> usize {
        self.handshakes.len()
    }
    pub(super) fn conns_len(&self) -> usize {
        self.conns.len()
    }
    pub(super) fn uds_display(&self) -> std::path::Display<'_> {
        self.uds.display()
    }

    /// The device's state.
    pub fn save(&self) -> VsockState {
        VsockState {
            virtio: self.common.save(),
            config: VsockConfig {
                cid: self.cid as u32,
                uds: self.uds.clone(),
            },
        }
    }

    /// A device in `state`, listening again on its socket (activated by its transport's
    /// restore). The guest hears that its connections are gone as soon as it has an event
    /// buffer for it.
    pub fn restore(state: &VsockState) -> Result<Self, PersistError> {
        let mut d = Self::new(&state.config).map_err(|e| PersistError::Backend(e.to_string()))?;
        d.restore_state(state)?;
        Ok(d)
    }

    /// Puts `state` on this device, made afresh on the socket the state names.
    pub fn restore_state(&mut self, state: &VsockState) -> Result<(), PersistError> {
        self.common.restore(&state.virtio)?;
        self.reset_event_pending = state.virtio.activated;
        Ok(())
    }

    /// Delivers a pending transport reset event into the event queue, if the driver gave a
    /// buffer for it.
    pub(super) fn send_events(&mut self) {
        if !self.reset_event_pending {
            return;
        }
        let Some(mut s) = self.common.serving_quiet() else {
            return;
        };
        let Ok(Some(chain)) = s.next_chain(EVT) else {
            return;
        };
        let head = chain.head_index();
        let mem = s.mem;
        let written = chain
            .writer(mem)
            .map(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok());
        let len = if matches!(written, Ok(true)) {
            4
        } else {
            Counters::inc(&s.counters.refused);
            0
        };
        if s.complete(EVT, &[(head, len)]) && len == 4 {
            self.reset_event_pending = false;
        }
    }

    fn reply(&self, to: &Hdr, op: Op) -> Hdr {
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

    fn conn_hdr(&self, c: &Conn, op: Op, len: u32) -> Hdr {
        conn_hdr(self.cid, c, op, len)
    }

    pub(super) fn close(&mut self, key: (u32, u32), ops: &mut EventOps, rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            if c.watching_in || c.watching_out {
                let _ = ops.remove(Events::new(&c.stream, EventSet::IN | EventSet::OUT));
            }
            self.by_fd.remove(&c.stream.as_raw_fd());
            if rst {
                let h = self.conn_hdr(&c, Op::Rst, 0);
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

    pub(super) fn rewatch_all(&mut self, ops: &mut EventOps) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for k in keys {
            self.rewatch(k, ops);
        }
    }

    /// Handles one packet from the guest.
    fn handle_guest_packet(&mut self, h: Hdr, payload: Vec<u8>, ops: &mut EventOps) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            Counters::inc(&self.common.counters().refused);
            if h.op != Op::Rst {
                let r = self.reply(&h, Op::Rst);
                self.to_guest.push_back((r, Vec::new()));
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == Op::Request {
            if self.conns.contains_key(&key) {
                Counters::inc(&self.common.counters().refused);
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
                    let r = self.conn_hdr(&c, Op::Response, 0);
                    self.by_fd.insert(c.stream.as_raw_fd(), key);
                    self.conns.insert(key, c);
                    self.to_guest.push_back((r, Vec::new()));
                    Counters::inc(&self.common.counters().requests);
                    self.rewatch(key, ops);
                }
                Err(e) => {
                    tracing::debug!("vsock: guest connection to {path}: {e}");
                    let r = self.reply(&h, Op::Rst);
                    self.to_guest.push_back((r, Vec::new()));
                }
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != Op::Rst {
                let r = self.reply(&h, Op::Rst);
                self.to_guest.push_back((r, Vec::new()));
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            Op::Response if c.state == State::Connecting => {
                c.state = State::Established;
                let line = format!("OK {}\n", c.local_port);
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.close(key, ops, true);
                    return;
                }
                Counters::inc(&self.common.counters().requests);
            }
            Op::Rw if c.state == State::Established => {
                if c.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    // The guest ignored our credit.
                    Counters::inc(&self.common.counters().refused);
                    self.close(key, ops, true);
                    return;
                }
                Counters::add(&self.common.counters().written_bytes, payload.len() as u64);
                c.to_host.extend(payload);
                self.flush_to_host(key, ops);
            }
            Op::CreditUpdate => {}
            Op::CreditRequest => {
                let u = conn_hdr(self.cid, c, Op::CreditUpdate, 0);
                c.fwd_cnt_sent = c.fwd_cnt;
                self.to_guest.push_back((u, Vec::new()));
            }
            Op::Rst => {
                self.close(key, ops, false);
                return;
            }
            Op::Shutdown => {
                c.guest_no_recv |= h.flags & SHUT_RCV != 0;
                c.guest_no_send |= h.flags & SHUT_SEND != 0;
                // Whatever the guest already sent still reaches the host (flush_to_host, then
                // finish); nothing here blocks the event loop.
                self.flush_to_host(key, ops);
                return;
            }
            _ => {
                Counters::inc(&self.common.counters().refused);
                self.close(key, ops, true);
                return;
            }
        }
        self.rewatch(key, ops);
    }

    /// Writes buffered guest data to the host socket; tells the guest about freed room.
    pub(super) fn flush_to_host(&mut self, key: (u32, u32), ops: &mut EventOps) {
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
            let u = conn_hdr(self.cid, c, Op::CreditUpdate, 0);
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
    pub(super) fn read_from_host(&mut self, key: (u32, u32), ops: &mut EventOps) {
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
                    let mut h = conn_hdr(self.cid, c, Op::Shutdown, 0);
                    h.flags = SHUT_SEND;
                    self.to_guest.push_back((h, Vec::new()));
                    self.finish(key, ops);
                    return;
                }
                Ok(n) => {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    let h = conn_hdr(self.cid, c, Op::Rw, n as u32);
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
    pub(super) fn accept(&mut self, ops: &mut EventOps) {
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

    pub(super) fn watch_listener(&mut self, ops: &mut EventOps, on: bool) {
        if self.listener_watched == on {
            return;
        }
        let ev = Events::new(&self.listener, EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        if r.is_ok() {
            self.listener_watched = on;
        }
    }
    pub(super) fn handshake(&mut self, fd: RawFd, ops: &mut EventOps) {
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
                    Counters::inc(&self.common.counters().refused);
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
                let req = self.conn_hdr(&c, Op::Request, 0);
                self.by_fd.insert(c.stream.as_raw_fd(), key);
                self.conns.insert(key, c);
                self.to_guest.push_back((req, Vec::new()));
            }
        }
    }

    /// Takes every tx packet from the guest (`notified`: because the guest said so).
    pub(super) fn process_tx(&mut self, ops: &mut EventOps, notified: bool) {
        if self.to_guest.len() >= TO_GUEST_MAX {
            // Answers would pile up: leave the guest's packets in its ring until rx drains.
            return;
        }
        let Some(mut s) = self.common.serving_for(notified) else {
            return;
        };
        let mut packets = Vec::new();
        s.serve(TX, |chain, counters| {
            let mem = chain.memory();
            match chain.clone().reader(mem) {
                Ok(mut r) if r.available_bytes() >= HDR_LEN => {
                    let mut hb = [0u8; HDR_LEN];
                    if r.read_exact(&mut hb).is_ok() {
                        let h = Hdr::parse(&hb);
                        let n = (h.len as usize).min(r.available_bytes());
                        // Only data packets carry a payload.
                        let allowed = if h.op == Op::Rw {
                            BUF_ALLOC as usize
                        } else {
                            0
                        };
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
        });
        for (h, p) in packets {
            self.handle_guest_packet(h, p, ops);
        }
    }

    /// Moves waiting packets into the guest's rx buffers.
    pub(super) fn fill_rx(&mut self) {
        let Some(mut s) = self.common.serving_quiet() else {
            return;
        };
        let mem = s.mem;
        let mut delivered = false;
        while let Some((h, payload)) = self.to_guest.front() {
            let Ok(chain) = s.next_chain(RX) else {
                return;
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let written = chain
                .writer(mem)
                .ok()
                .filter(|w| w.available_bytes() >= HDR_LEN + payload.len())
                .and_then(|mut w| {
                    w.write_all(&h.bytes())
                        .and_then(|_| w.write_all(payload))
                        .ok()
                });
            let len = match written {
                Some(()) => {
                    Counters::add(&s.counters.read_bytes, payload.len() as u64);
                    (HDR_LEN + payload.len()) as u32
                }
                None => {
                    // The packet does not fit: dropping it would corrupt the stream, so the
                    // connection ends with a reset instead.
                    Counters::inc(&s.counters.refused);
                    if h.op == Op::Rw {
                        self.broken.push((h.src_port, h.dst_port));
                    }
                    0
                }
            };
            if !s.add_used(RX, head, len) {
                return;
            }
            self.to_guest.pop_front();
            delivered = true;
        }
        if delivered {
            s.notify(RX);
        }
    }
}

impl VirtioDevice for Vsock {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn host_descriptors(&self) -> Vec<(bexar_util::handed::What, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        vec![(
            bexar_util::handed::What::Listener {
                path: self.uds.clone(),
            },
            self.listener.as_raw_fd(),
        )]
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn save_state(&self) -> Option<crate::virtio::DeviceSnapshot> {
        Some(crate::virtio::DeviceSnapshot::Vsock(self.save()))
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        let restored = ctx.restored;
        self.common.activate(ctx)?;
        // A restored device owes the guest a transport reset; it is sent when the VMM notifies
        // the event queue (`ActivationContext::restored`), on the event loop, never here.
        if !restored {
            self.common.notify_queues();
        }
        Ok(())
    }
    fn reset(&mut self) {
        // A driver reset drops every connection (the host sockets close).
        // The sockets are still registered with the event loop: they are unregistered (and so
        // closed) at the next event, where the loop's operations are at hand.
        self.common.reset();
        self.closing
            .extend(self.conns.drain().map(|(_, c)| c.stream));
        self.closing
            .extend(self.handshakes.drain().map(|(_, h)| h.stream));
        self.by_fd.clear();
        self.to_guest.clear();
        self.broken.clear();
        self.reset_event_pending = false;
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory::{test_memory, GuestMemoryMmap};
    use crate::virtio::ring::DriverRing;
    use crate::virtio::test_utils::{activate_all, restored_context, TestInterrupt};

    const GUEST_CID: u64 = 3;

    struct Rig {
        mem: GuestMemoryMmap,
        dev: Arc<Mutex<Vsock>>,
        loop_: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
        uds: PathBuf,
        irq: Arc<TestInterrupt>,
    }

    fn rig(name: &str) -> Rig {
        let uds = std::env::temp_dir().join(format!("bexar-vsock-{}-{name}", std::process::id()));
        let dev = Arc::new(Mutex::new(
            Vsock::new(&VsockConfig {
                cid: GUEST_CID as u32,
                uds: uds.clone(),
            })
            .unwrap(),
        ));
        let mut loop_ = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        loop_.add_subscriber(dev.clone());
        Rig {
            mem: test_memory(2),
            dev,
            loop_,
            uds,
            irq: TestInterrupt::new(),
        }
    }

    impl Rig {
        /// The rx, tx and event rings in `mem` (the rig's memory), and the device activated
        /// on them.
        fn activate<'m>(
            &self,
            mem: &'m GuestMemoryMmap,
        ) -> (DriverRing<'m>, DriverRing<'m>, DriverRing<'m>) {
            let rx = DriverRing::new(mem, 0x1_0000, 16);
            let tx = DriverRing::new(mem, 0x2_0000, 16);
            let ev = DriverRing::new(mem, 0x3_0000, 16);
            activate_all(
                &mut *bexar_util::sync::lock(&self.dev),
                &[&rx, &tx, &ev],
                mem,
                &self.irq,
            );
            (rx, tx, ev)
        }
        /// The guest (port 1234) connects to a host service on port 5000 with the first tx
        /// buffer: returns the service and the host's end of the connection.
        fn open_connection(&mut self, tx: &mut DriverRing<'_>) -> (UnixListener, UnixStream) {
            let service = UnixListener::bind(format!("{}_5000", self.uds.display())).unwrap();
            self.send(tx, 0, guest_hdr(Op::Request, 1234, 5000, 0), &[]);
            let (host, _) = service.accept().unwrap();
            (service, host)
        }
        fn spin(&mut self) {
            for _ in 0..5 {
                self.loop_.run_with_timeout(10).unwrap();
            }
        }
        /// The guest sends `h` (with `payload`) on the tx ring.
        fn send(&mut self, tx: &mut DriverRing<'_>, slot: u16, h: Hdr, payload: &[u8]) {
            let at = 0x10_0000 + u64::from(slot) * 0x1000;
            self.mem.write_slice(&h.bytes(), GuestAddress(at)).unwrap();
            self.mem
                .write_slice(payload, GuestAddress(at + HDR_LEN as u64))
                .unwrap();
            tx.push_chain(slot, &[(at, (HDR_LEN + payload.len()) as u32, false)]);
            let _ = bexar_util::sync::lock(&self.dev).common.queue_evts[TX].write(1);
            self.spin();
        }
        /// The header the device put in rx buffer `slot`.
        fn received(&self, slot: u16) -> Hdr {
            let mut b = [0u8; HDR_LEN];
            self.mem
                .read_slice(&mut b, GuestAddress(0x18_0000 + u64::from(slot) * 0x1000))
                .unwrap();
            Hdr::parse(&b)
        }
    }

    fn guest_hdr(op: Op, src_port: u32, dst_port: u32, len: u32) -> Hdr {
        Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            kind: TYPE_STREAM,
            op,
            buf_alloc: 4096,
            ..Default::default()
        }
    }

    /// Gives the device `n` rx buffers of 4 KiB.
    fn rx_buffers(rx: &mut DriverRing<'_>, n: u16) {
        for i in 0..n {
            rx.push_chain(i, &[(0x18_0000 + u64::from(i) * 0x1000, 0x1000, true)]);
        }
    }

    #[test]
    fn credit_overrun_and_unknown_connections_get_a_reset() {
        let mut r = rig("credit");
        let mem = r.mem.clone();
        let (mut rx, mut tx, _ev) = r.activate(&mem);
        rx_buffers(&mut rx, 8);
        let (_service, mut host) = r.open_connection(&mut tx);
        assert_eq!(r.received(0).op, Op::Response);
        // Data within credit reaches the host socket.
        r.send(&mut tx, 1, guest_hdr(Op::Rw, 1234, 5000, 5), b"hello");
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // A packet to a connection that does not exist is answered with a reset.
        r.send(&mut tx, 2, guest_hdr(Op::Rw, 999, 5000, 1), b"x");
        let rst = r.received(1);
        assert_eq!((rst.op, rst.dst_port), (Op::Rst, 999));
        // The host stops reading; the guest ignores our credit and sends on. Once more than
        // the buffer we advertised waits for the host, the connection is reset and the host
        // socket closed; the refusal is counted.
        let chunk = vec![7u8; 60 * 1024];
        let mut reset = false;
        for slot in 3..15 {
            r.send(
                &mut tx,
                slot,
                guest_hdr(Op::Rw, 1234, 5000, chunk.len() as u32),
                &chunk,
            );
            if (2..8).any(|i| {
                let h = r.received(i);
                h.op == Op::Rst && h.dst_port == 1234
            }) {
                reset = true;
                break;
            }
        }
        assert!(reset, "an overrun connection is reset");
        let c = bexar_util::sync::lock(&r.dev).counters().clone();
        assert!(c.refused.load(std::sync::atomic::Ordering::Relaxed) >= 1);
        let mut rest = Vec::new();
        host.set_nonblocking(false).unwrap();
        let _ = host.read_to_end(&mut rest);
        assert!(
            rest.len() <= BUF_ALLOC as usize + 256 * 1024,
            "the host sees its end"
        );
        std::fs::remove_file(format!("{}_5000", r.uds.display())).ok();
        std::fs::remove_file(&r.uds).ok();
    }

    #[test]
    fn state_round_trips_and_the_guest_hears_its_connections_are_gone() {
        let mut r = rig("state");
        let mem = r.mem.clone();
        let (_rx, _tx, mut ev) = r.activate(&mem);
        // A running device never uses the event buffers.
        ev.push_chain(0, &[(0x4_0000, 8, true)]);
        r.spin();
        assert_eq!(ev.used_idx(), 0);
        let saved = bexar_util::sync::lock(&r.dev).save();
        let json = serde_json::to_string(&saved).unwrap();
        let back: VsockState = serde_json::from_str(&json).unwrap();
        drop(r);

        let mut dev2 = Vsock::restore(&back).unwrap();
        mem.write_slice(&[0xffu8; 8], GuestAddress(0x4_0000))
            .unwrap();
        let irq = TestInterrupt::new();
        dev2.activate(restored_context(&mem, &irq)).unwrap();
        // Nothing goes to the guest at a restore's activation; the reset goes when the VMM
        // notifies the event queue (after its jail and the interrupt controllers' state).
        assert_eq!(ev.used_idx(), 0, "sent at a restore's activation");
        assert_eq!(irq.queue_interrupts(), 0);
        dev2.send_events();
        let now = dev2.save();
        assert_eq!(now.config, saved.config);
        assert_eq!(now.virtio.queues[..2], saved.virtio.queues[..2]);
        assert_eq!(
            now.virtio.queues[EVT].next_used,
            saved.virtio.queues[EVT].next_used + 1
        );
        // The buffer the guest left in the event ring now carries TRANSPORT_RESET (id 0).
        assert_eq!(ev.used_idx(), 1);
        assert_eq!(ev.used_entry(0), (0, 4));
        let id: u32 = mem.read_obj(GuestAddress(0x4_0000)).unwrap();
        assert_eq!(id, 0);
        assert_eq!(irq.queue_interrupts(), 1);
        // Once.
        ev.push_chain(1, &[(0x4_1000, 8, true)]);
        dev2.send_events();
        assert_eq!(ev.used_idx(), 1);
        // And its socket listens again.
        UnixStream::connect(&back.config.uds).unwrap();
        std::fs::remove_file(&back.config.uds).ok();
    }

    /// The payload the device put in rx buffer `slot`.
    fn received_payload(r: &Rig, slot: u16, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        r.mem
            .read_slice(
                &mut b,
                GuestAddress(0x18_0000 + u64::from(slot) * 0x1000 + HDR_LEN as u64),
            )
            .unwrap();
        b
    }

    #[test]
    fn half_closes_go_through_in_both_directions() {
        let mut r = rig("halfclose");
        let mem = r.mem.clone();
        let (mut rx, mut tx, _ev) = r.activate(&mem);
        rx_buffers(&mut rx, 8);
        let (_service, mut host) = r.open_connection(&mut tx);
        host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(r.received(0).op, Op::Response);

        // The guest sends, then shuts its sending side: the host reads the data, then EOF.
        r.send(&mut tx, 1, guest_hdr(Op::Rw, 1234, 5000, 3), b"abc");
        let mut shut = guest_hdr(Op::Shutdown, 1234, 5000, 0);
        shut.flags = SHUT_SEND;
        r.send(&mut tx, 2, shut, &[]);
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abc");

        // The other direction still carries data to the guest.
        host.write_all(b"xyz").unwrap();
        r.spin();
        let h = r.received(1);
        assert_eq!((h.op, h.len, h.dst_port), (Op::Rw, 3, 1234));
        assert_eq!(received_payload(&r, 1, 3), b"xyz");

        // The host shuts its side too: the guest hears SHUTDOWN(SEND), and with neither side
        // sending the connection ends with a reset.
        host.shutdown(std::net::Shutdown::Write).unwrap();
        r.spin();
        let h = r.received(2);
        assert_eq!((h.op, h.flags & SHUT_SEND), (Op::Shutdown, SHUT_SEND));
        assert_eq!(r.received(3).op, Op::Rst);
        assert_eq!(bexar_util::sync::lock(&r.dev).conns_len(), 0);
        std::fs::remove_file(format!("{}_5000", r.uds.display())).ok();
        std::fs::remove_file(&r.uds).ok();
    }

    #[test]
    fn host_handshakes_are_bounded_and_checked() {
        let mut r = rig("handshake");
        let mem = r.mem.clone();
        let (mut rx, _tx, _ev) = r.activate(&mem);
        rx_buffers(&mut rx, 8);
        let dev = r.dev.clone();
        let refused = || {
            bexar_util::sync::lock(&dev)
                .counters()
                .refused
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let dropped = |s: &mut UnixStream| {
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut b = [0u8; 8];
            matches!(s.read(&mut b), Ok(0))
        };
        // A line that never ends: dropped past 64 bytes.
        let mut long = UnixStream::connect(&r.uds).unwrap();
        long.write_all(&[b'a'; 70]).unwrap();
        r.spin();
        assert!(dropped(&mut long), "an endless handshake is dropped");
        assert_eq!(refused(), 1);
        // A line that is not CONNECT: dropped.
        let mut bad = UnixStream::connect(&r.uds).unwrap();
        bad.write_all(b"HELLO 5000\n").unwrap();
        r.spin();
        assert!(dropped(&mut bad), "a bad handshake is dropped");
        assert_eq!(refused(), 2);
        assert_eq!(bexar_util::sync::lock(&r.dev).handshakes_len(), 0);
        // A good one becomes a connection request to the guest.
        let mut good = UnixStream::connect(&r.uds).unwrap();
        good.write_all(b"CONNECT 5000\n").unwrap();
        r.spin();
        let h = r.received(0);
        assert_eq!(
            (h.op, h.dst_port, h.dst_cid),
            (Op::Request, 5000, GUEST_CID)
        );
        assert_eq!(bexar_util::sync::lock(&r.dev).conns_len(), 1);
        std::fs::remove_file(&r.uds).ok();
    }
}
