//! The VMM's private control socket: how the host agent (or an operator) pauses, resumes,
//! shuts down and inspects a running VM.
//!
//! The protocol is one JSON object per line each way: a [`Request`] `{"op": "..."}` and a
//! [`Reply`] `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. Operations:
//!
//! * `info`: identity (VM id, launch token, pid), state, uptime and counters;
//! * `pause` / `resume`: park or release every vCPU (replies once all are parked);
//! * `shutdown`: ask the guest to shut down (Ctrl-Alt-Del on the i8042);
//! * `stop`: end the VM now (the VMM writes its outcome and exits).
//!
//! The socket is created owner-only (0600) in the VM's private directory. It is served by the
//! VMM's main event loop ([`ControlServer`] is a subscriber of it): connections are read and
//! parsed there, the requests handed to the [`crate::Vmm`], and the replies written back. No
//! thread is made per connection; at most [`MAX_CONNECTIONS`] are open at once.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};

use bexar_devices::virtio::DeviceReport;

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Identity, state and counters.
    Info,
    /// Park every vCPU.
    Pause,
    /// Release the vCPUs.
    Resume,
    /// Ask the guest to shut down.
    Shutdown,
    /// End the VM now.
    Stop,
    /// Hand the VM to a new VMM process (live upgrade): pause it, write its state (not its
    /// memory) into `dir`, answer with guest memory's descriptor, then end.
    Handoff {
        /// Where the state goes.
        dir: std::path::PathBuf,
    },
    /// Replace a device's rate limit (`device`: its id, `block0`, `net1`...).
    SetRateLimit {
        /// The device's id.
        device: String,
        /// Which of its limits.
        path: bexar_devices::rate_limiter::LimitedPath,
        /// The new limit (an empty one limits nothing).
        limit: bexar_devices::rate_limiter::RateLimitConfig,
    },
    /// Move the VM to another VMM process listening on the Unix socket `to` (live migration:
    /// [`crate::migration`]); this VMM ends once the other holds it.
    Migrate {
        /// The receiving VMM's socket.
        to: std::path::PathBuf,
        /// The largest blackout wanted, milliseconds (default 100).
        #[serde(default)]
        downtime_ms: Option<u32>,
        /// The most pre-copy rounds (default 30; 0: none, all memory is sent while the guest is
        /// paused, a stop-and-copy).
        #[serde(default)]
        max_rounds: Option<u32>,
        /// Copy the VM's writable local raw disks in the stream too (the receiver writes them
        /// into its own disk files); without it the receiver reopens these disks' files.
        #[serde(default)]
        disks: bool,
        /// The most MiB a second the pre-copy sends (default: no limit; the switch-over is
        /// never limited).
        #[serde(default)]
        max_bandwidth_mib: Option<u32>,
    },
    /// Save the VM into a snapshot directory, then resume, pause or stop it.
    Snapshot {
        /// The snapshot directory (made if missing).
        dir: std::path::PathBuf,
        /// What then.
        #[serde(default)]
        then: crate::snapshot::AfterSnapshot,
    },
    /// Test builds only (absent from release builds): make the VMM misbehave as a compromised
    /// one would, to prove the sandbox holds.
    #[cfg(debug_assertions)]
    Fault {
        /// What to try.
        fault: Fault,
    },
}

/// What a test makes a VMM try ([`Request::Fault`]).
#[cfg(debug_assertions)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// A system call no thread's filter allows (`mount`).
    Syscall,
    /// Open a file of the host (`/etc/passwd`); the reply says what happened.
    OpenHostFile,
    /// Allocate and touch memory without end, as a leak would.
    Leak,
    /// Connect to this TCP port on 127.0.0.1; the reply says what happened.
    Connect(u16),
}

/// Whether the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// The vCPUs run the guest.
    Running,
    /// The vCPUs are parked.
    Paused,
}

/// What `info` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    /// VM id.
    pub id: String,
    /// Launch token.
    pub token: String,
    /// Process id of the VMM.
    pub pid: u32,
    /// Running or paused.
    pub state: RunState,
    /// Milliseconds since the VMM started.
    pub uptime_ms: u64,
    /// Exits to user space per vCPU.
    pub vcpu_exits: Vec<u64>,
    /// Instructions the platform's emulator refused that the VMM completed (`fwait` on PVM).
    #[serde(default)]
    pub completed_instructions: u64,
    /// Console bytes written by the guest.
    pub console_bytes: u64,
    /// For a VM handed over from another VMM: how long its guest was paused across the
    /// handover, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_pause_ms: Option<f64>,
    /// Virtio device counters.
    pub devices: Vec<DeviceReport>,
}

/// A reply on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The answer to `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Info>,
    /// The answer to `snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<crate::snapshot::SnapshotReport>,
    /// The answer to `handoff` (guest memory's descriptor comes with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffReport>,
    /// The answer to `migrate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::MigrationReport>,
    /// Why the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// Done.
    pub fn ok() -> Self {
        Self {
            ok: true,
            info: None,
            snapshot: None,
            handoff: None,
            migration: None,
            error: None,
        }
    }

    /// The answer to `info`.
    pub fn info(info: Info) -> Self {
        Self {
            info: Some(info),
            ..Self::ok()
        }
    }

    /// The answer to `snapshot`.
    pub fn snapshot(report: crate::snapshot::SnapshotReport) -> Self {
        Self {
            snapshot: Some(report),
            ..Self::ok()
        }
    }

    /// The answer to `handoff`.
    pub fn handoff(report: HandoffReport) -> Self {
        Self {
            handoff: Some(report),
            ..Self::ok()
        }
    }

    /// The answer to `migrate`.
    pub fn migration(report: crate::migration::MigrationReport) -> Self {
        Self {
            migration: Some(report),
            ..Self::ok()
        }
    }

    /// Refused or failed.
    pub fn error(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            info: None,
            snapshot: None,
            handoff: None,
            migration: None,
            error: Some(e.into()),
        }
    }

    /// The reply as a result: the info (if any) or the error.
    pub fn into_result(self) -> Result<Option<Info>, String> {
        if self.ok {
            Ok(self.info)
        } else {
            Err(self.error.unwrap_or_else(|| "unknown error".into()))
        }
    }
}

/// What a VMM handing its VM over says with guest memory's descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffReport {
    /// When its vCPUs were paused (`CLOCK_MONOTONIC`, ns): the new VMM measures the pause the
    /// guest saw from here.
    pub paused_at_ns: u64,
    /// Guest memory in bytes (the descriptor's size).
    pub memory_bytes: u64,
    /// What the descriptors sent after guest memory's are, in order: the TAPs and listening
    /// sockets the new VMM takes as they are (none from a VMM of an older version, whose
    /// successor opens them again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub descriptors: Vec<bexar_util::handed::What>,
}

/// The most descriptors a handover carries besides guest memory's.
const HANDOFF_MAX_FDS: usize = 64;

/// Now on `CLOCK_MONOTONIC`, in ns (one clock for every process of the host).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Takes the VM over from the VMM serving control socket `socket`: asks it for a handover,
/// which it answers with guest memory's descriptor and this report once the VM's state is
/// written. Returns where the state is: `state_dir` for a VMM that sees the host's root, the
/// same name in `jail_root`'s `out` for one jailed there (which writes `/out/handoff`).
/// `from_pid`: that VMM's pid as the host sees it, which a caller in a PID namespace of its
/// own cannot learn from the socket.
pub fn take_over(
    socket: &Path,
    state_dir: &Path,
    jail_root: &Path,
    from_pid: Option<u32>,
) -> Result<(std::fs::File, HandoffReport, std::path::PathBuf), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let peer = peer_pid(&s).map_err(|e| format!("{}: {e}", socket.display()))?;
    // 0: the peer is outside this process's PID namespace; the launch says who it is.
    let peer = match (peer, from_pid) {
        (0, Some(p)) => p,
        (p, _) => p as u32,
    };
    let (asked, found) = if crate::jail::is_root_of(peer, jail_root) {
        let name = Path::new(crate::launch::files::JAIL_OUT)
            .join(state_dir.file_name().unwrap_or_default());
        (Path::new("/").join(&name), jail_root.join(name))
    } else {
        (state_dir.to_owned(), state_dir.to_owned())
    };
    let state_dir = &asked;
    // As long as an agent recovering from a crash waits for the handover to settle.
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let req = Request::Handoff {
        dir: state_dir.to_owned(),
    };
    let mut line = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let (n, mut fds, cut) =
        recv_fds(&s, &mut buf).map_err(|e| format!("no answer to the handover: {e}"))?;
    let mut text = buf[..n].to_vec();
    while !text.contains(&b'\n') {
        let m = s.read(&mut buf).map_err(|e| e.to_string())?;
        if m == 0 {
            break;
        }
        text.extend_from_slice(&buf[..m]);
    }
    let reply: Reply = serde_json::from_slice(text.trim_ascii_end())
        .map_err(|e| format!("a handover reply that does not parse: {e}"))?;
    if !reply.ok {
        return Err(format!(
            "the running VMM refused the handover: {}",
            reply.error.unwrap_or_default()
        ));
    }
    let Some(r) = reply.handoff else {
        return Err("the handover reply came without guest memory".into());
    };
    if fds.is_empty() {
        return Err("the handover reply came without guest memory".into());
    }
    let memory = std::fs::File::from(fds.remove(0));
    // The TAPs and listening sockets, taken as they are; were they not all there, the new
    // VMM opens them again by name, as from a VMM of an older version. (The VM is this VMM's
    // now: the old one ends, so guest memory is kept whatever else went wrong.)
    if !cut && fds.len() == r.descriptors.len() {
        for (what, fd) in r.descriptors.iter().zip(&fds) {
            if matches!(what, bexar_util::handed::What::Listener { .. }) {
                // Listening here at once makes a client's SO_PEERCRED name this VMM from now
                // on, not the old one, whose last listen() the socket still carries.
                if let Err(e) = nix::sys::socket::listen(fd, nix::sys::socket::Backlog::MAXCONN) {
                    tracing::warn!("cannot listen on the handed-over {what:?}: {e}");
                }
            }
        }
        bexar_util::handed::add(r.descriptors.iter().cloned().zip(fds));
    } else if !fds.is_empty() || !r.descriptors.is_empty() {
        tracing::warn!(
            "the handover named {} descriptors and {} came: opening them again",
            r.descriptors.len(),
            fds.len()
        );
    }
    Ok((memory, r, found))
}

/// Receives one message into `buf` with the descriptors it carries (close-on-exec as they
/// arrive; at most 1 + [`HANDOFF_MAX_FDS`]), and whether some were cut off (too many, or
/// this process out of descriptors): those that came are kept.
fn recv_fds(
    s: &UnixStream,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<std::os::fd::OwnedFd>, bool)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 1 + HANDOFF_MAX_FDS]);
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(got) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us.
            fds.extend(
                got.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let cut = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    if cut {
        tracing::warn!("the handover's descriptors were cut off (too many, or none left here)");
    }
    Ok((msg.bytes, fds, cut))
}

/// The pid of the process at the other end of `s` (SO_PEERCRED).
fn peer_pid(s: &UnixStream) -> std::io::Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred on this stack.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// Longest request line accepted.
pub const MAX_LINE: usize = 4096;
/// Most connections open at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;

/// Which connection a request came on: its descriptor and the number of its accept, so that an
/// answer never reaches a later connection that was given the same descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId {
    fd: RawFd,
    serial: u64,
}

struct Conn {
    serial: u64,
    stream: UnixStream,
    buf: Vec<u8>,
    /// The client sent everything it will (half-close): it goes once its requests are
    /// answered.
    eof: bool,
}

/// The control socket on an event loop: accepts, reads lines, parses them, and queues the
/// requests for the VMM, which answers with [`ControlServer::reply`].
pub struct ControlServer {
    listener: UnixListener,
    conns: HashMap<RawFd, Conn>,
    accepted: u64,
    requests: Vec<(ConnId, Result<Request, String>)>,
}

impl ControlServer {
    /// The listening socket's descriptor (a live upgrade hands it to the next VMM).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Binds the socket (owner-only), replacing a stale one.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = bexar_util::unix::bind_owner_only(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            conns: HashMap::new(),
            accepted: 0,
            requests: Vec::new(),
        })
    }

    /// The requests read so far, with the connection each came on (a line that is not a
    /// request comes as the parse error).
    pub fn take_requests(&mut self) -> Vec<(ConnId, Result<Request, String>)> {
        std::mem::take(&mut self.requests)
    }

    /// Drops the connections whose clients have finished, now that their requests are
    /// answered.
    pub fn finish(&mut self) {
        self.conns.retain(|_, c| !c.eof);
    }

    /// Writes `reply` on connection `conn`. A peer that cannot take it is dropped at its next
    /// event (its socket reports the error).
    pub fn reply(&mut self, conn: ConnId, reply: &Reply) {
        let Some(c) = self
            .conns
            .get_mut(&conn.fd)
            .filter(|c| c.serial == conn.serial)
        else {
            return;
        };
        let Ok(mut text) = serde_json::to_vec(reply) else {
            return;
        };
        text.push(b'\n');
        if let Err(e) = c.stream.write_all(&text) {
            tracing::debug!("control socket: a client did not take its reply: {e}");
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// [`Self::reply`] with a descriptor passed along (`SCM_RIGHTS`), in one message.
    pub fn reply_with_fds(
        &mut self,
        conn: ConnId,
        reply: &Reply,
        fds: &[RawFd],
    ) -> std::io::Result<()> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let c = self
            .conns
            .get_mut(&conn.fd)
            .filter(|c| c.serial == conn.serial)
            .ok_or_else(|| std::io::Error::other("the client has gone"))?;
        let mut text = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let n = c
            .stream
            .send_with_fds(&[&text[..]], fds)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if n != text.len() {
            return Err(std::io::Error::other("the reply was cut short"));
        }
        Ok(())
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&fd) {
            let _ = ops.remove(Events::new(&c.stream, EventSet::IN));
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!("control socket: accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                tracing::warn!("control socket: {MAX_CONNECTIONS} clients already; refusing one");
                continue;
            }
            if stream.set_nonblocking(true).is_err()
                || ops.add(Events::new(&stream, EventSet::IN)).is_err()
            {
                continue;
            }
            self.accepted += 1;
            self.conns.insert(
                stream.as_raw_fd(),
                Conn {
                    serial: self.accepted,
                    stream,
                    buf: Vec::new(),
                    eof: false,
                },
            );
        }
    }

    fn read(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 1024];
        let mut open = true;
        loop {
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    // Half-closed: what it sent is answered, then it goes (`finish`).
                    c.eof = true;
                    let _ = ops.remove(Events::new(&c.stream, EventSet::IN));
                    break;
                }
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    open = false;
                    break;
                }
            }
            if c.buf.len() > MAX_LINE {
                break;
            }
        }
        while let Some(end) = c.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = c.buf.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]);
            let req = serde_json::from_str::<Request>(text.trim()).map_err(|e| e.to_string());
            let conn = ConnId {
                fd,
                serial: c.serial,
            };
            self.requests.push((conn, req));
        }
        if c.buf.len() > MAX_LINE {
            tracing::debug!("control socket: a line longer than {MAX_LINE} bytes; closing");
            open = false;
        }
        if !open {
            self.close(fd, ops);
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if events
            .event_set()
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.read(fd, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("control socket: cannot watch the listener: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_keep_their_wire_form() {
        let r: Request = serde_json::from_str(r#"{"op":"pause"}"#).unwrap();
        assert_eq!(r, Request::Pause);
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Shutdown).unwrap(),
            r#"{"op":"shutdown"}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::ok()).unwrap(),
            r#"{"ok":true}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::error("no")).unwrap(),
            r#"{"ok":false,"error":"no"}"#
        );
        let back: Reply = serde_json::from_str(r#"{"ok":false,"error":"busy"}"#).unwrap();
        assert_eq!(back.into_result().unwrap_err(), "busy");
        let info = Info {
            id: "a".into(),
            token: "t".into(),
            pid: 1,
            state: RunState::Paused,
            uptime_ms: 5,
            vcpu_exits: vec![1, 2],
            completed_instructions: 0,
            console_bytes: 3,
            handoff_pause_ms: None,
            devices: vec![],
        };
        let text = serde_json::to_string(&Reply::info(info)).unwrap();
        assert!(text.contains(r#""state":"paused""#), "{text}");
        let back: Reply = serde_json::from_str(&text).unwrap();
        assert_eq!(back.into_result().unwrap().unwrap().vcpu_exits, [1, 2]);
    }

    #[test]
    fn the_server_reads_lines_from_many_clients_on_one_loop() {
        use event_manager::{EventManager, SubscriberOps};
        use std::sync::{Arc, Mutex};
        let path = std::env::temp_dir().join(format!("bexar-ctl-{}", std::process::id()));
        let server = Arc::new(Mutex::new(ControlServer::bind(&path).unwrap()));
        let mut ops = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        ops.add_subscriber(server.clone());
        let mut a = UnixStream::connect(&path).unwrap();
        let mut b = UnixStream::connect(&path).unwrap();
        a.write_all(b"{\"op\":\"info\"}\n{\"op\":\"pa").unwrap();
        b.write_all(b"nonsense\n").unwrap();
        let mut got = Vec::new();
        for _ in 0..20 {
            ops.run_with_timeout(50).unwrap();
            got.extend(bexar_util::sync::lock(&server).take_requests());
            if got.len() >= 2 {
                break;
            }
        }
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().any(|(_, r)| r == &Ok(Request::Info)));
        assert!(got.iter().any(|(_, r)| r.is_err()));
        // The rest of a split line arrives later; replies go back on the right connection.
        a.write_all(b"use\"}\n").unwrap();
        let mut more = Vec::new();
        for _ in 0..20 {
            ops.run_with_timeout(50).unwrap();
            more.extend(bexar_util::sync::lock(&server).take_requests());
            if !more.is_empty() {
                break;
            }
        }
        assert_eq!(more[0].1, Ok(Request::Pause));
        bexar_util::sync::lock(&server).reply(more[0].0, &Reply::error("not now"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut a), &mut line).unwrap();
        assert_eq!(line, "{\"ok\":false,\"error\":\"not now\"}\n");
        // A line without end beyond the limit closes that connection only.
        b.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        for _ in 0..5 {
            ops.run_with_timeout(50).unwrap();
        }
        let mut rest = Vec::new();
        let _ = b.read_to_end(&mut rest);
        assert!(rest.is_empty(), "closed without a reply");
        // A late reply for that connection never reaches the next one, which the kernel gives
        // the lowest free descriptor: the one just closed (held while the client's end of the
        // new connection is made, so that the server's end gets it).
        let stale = got.iter().find(|(_, r)| r.is_err()).unwrap().0;
        let hold = std::fs::File::open("/dev/null").unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        drop(hold);
        for _ in 0..5 {
            ops.run_with_timeout(50).unwrap();
        }
        bexar_util::sync::lock(&server).reply(stale, &Reply::error("for b"));
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(
            matches!(c.read(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock),
            "an answer meant for a closed connection"
        );
        std::fs::remove_file(path).ok();
    }
}
