//! COM1: a 16550 UART (vm-superio) whose output goes to a console sink (stdout, a file or a Unix
//! socket) and whose input comes from stdin or the socket's client.
//!
//! Output is written by the vCPU thread that wrote the transmit register. Input is served by
//! [`ConsoleInput`], an event-loop subscriber the VMM runs on its own thread: no thread is made
//! per client. Input waits in the host (the socket's or the terminal's buffer) while the UART's
//! 64-byte FIFO is full, and moves on when the guest has emptied it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use super::IrqTrigger;
use bexar_util::sync::lock;

/// COM1 base port.
pub const COM1_BASE: u64 = 0x3f8;
/// COM1 range length.
pub const COM1_LEN: u64 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Console bytes kept for a socket client that connects late.
const REPLAY_BYTES: usize = 64 * 1024;
/// Input read from a source at a time (and so the most that waits for FIFO room).
const INPUT_CHUNK: usize = 256;
/// Bytes the 16550's receive FIFO holds.
const FIFO_SIZE: usize = 64;

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ConsoleConfig {
    /// The VMM's stdout (and stdin as input).
    Stdio,
    /// Appended to a file.
    File {
        /// The file.
        path: PathBuf,
    },
    /// A Unix socket the VMM listens on; one client at a time reads and writes the console.
    Socket {
        /// The socket.
        path: PathBuf,
    },
    /// A socket as above, with every output byte also appended to a log file (the agent's
    /// layout: the log serves `logs`, the socket serves interactive attach).
    SocketWithLog {
        /// The attach socket.
        socket: PathBuf,
        /// The log file.
        log: PathBuf,
    },
    /// Discarded.
    None,
}

impl std::str::FromStr for ConsoleConfig {
    type Err = String;
    /// Parses the `--console` flag: `stdio`, `none`, `file:PATH` or `socket:PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.split_once(':') {
                Some(("file", p)) if !p.is_empty() => Ok(Self::File { path: p.into() }),
                Some(("socket", p)) if !p.is_empty() => Ok(Self::Socket { path: p.into() }),
                _ => Err(format!(
                    "invalid console {s:?}: expected stdio, none, file:PATH or socket:PATH"
                )),
            },
        }
    }
}

/// Shared state of a socket console: the connected client and the replay buffer.
#[derive(Default)]
struct SocketShared {
    client: Option<UnixStream>,
    replay: VecDeque<u8>,
    /// Bytes that went through the replay buffer in all (the marks of
    /// [`ConsoleOut::output_since`]).
    written: u64,
}

impl SocketShared {
    /// Keeps `buf` in the replay buffer (its last [`REPLAY_BYTES`]).
    fn keep(&mut self, buf: &[u8]) {
        self.replay.extend(buf);
        let excess = self.replay.len().saturating_sub(REPLAY_BYTES);
        self.replay.drain(..excess);
        self.written += buf.len() as u64;
    }
}

impl Sink {
    /// Writes `bytes` where this sink sends console output: the stream or file, or a socket
    /// console's log, replay buffer and client (a client that is gone or too slow is dropped).
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout(s) => s.write_all(bytes)?,
            Sink::File(f) => f.write_all(bytes)?,
            Sink::Socket(shared, log) => {
                if let Some(f) = log {
                    f.write_all(bytes)?;
                }
                let mut s = lock(shared);
                s.keep(bytes);
                if let Some(c) = s.client.as_mut() {
                    if c.write_all(bytes).is_err() {
                        // Gone, or too slow to keep up: drop it (the replay keeps the output).
                        if let Some(old) = s.client.take() {
                            let _ = old.shutdown(std::net::Shutdown::Both);
                        }
                    }
                }
            }
            Sink::Null => {}
        }
        Ok(())
    }
}

/// The most console output [`ConsoleOut::output_since`] hands out at once.
pub const RECENT_MAX: usize = REPLAY_BYTES;

enum Sink {
    Stdout(io::Stdout),
    File(File),
    Socket(Arc<Mutex<SocketShared>>, Option<File>),
    Null,
}

/// Counts console output and notes when its first byte came.
pub struct ConsoleStats {
    start: Instant,
    first_byte_ns: AtomicU64,
    bytes: AtomicU64,
}

impl ConsoleStats {
    /// Stats whose clock starts at `start`.
    pub fn new(start: Instant) -> Arc<Self> {
        Arc::new(Self {
            start,
            first_byte_ns: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }
    /// Time from `start` to the first console byte.
    pub fn first_byte(&self) -> Option<Duration> {
        match self.first_byte_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
    /// Console bytes written by the guest.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    fn count(&self, n: usize) {
        // The clock is read for the first byte only, not for every byte the guest writes.
        if self.first_byte_ns.load(Ordering::Relaxed) == 0 {
            let ns = self.start.elapsed().as_nanos().max(1) as u64;
            let _ =
                self.first_byte_ns
                    .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Something that wants to see the guest's console output as it is written (the CLI's pattern
/// watch, for instance). Called on the vCPU thread that wrote the bytes: it must not block.
pub trait ConsoleObserver: Send {
    /// The guest wrote `bytes`.
    fn observe(&mut self, bytes: &[u8]);
}

/// The UART's output side: the sink, the counters and the observers.
pub struct ConsoleOut {
    sink: Sink,
    stats: Arc<ConsoleStats>,
    observers: Vec<Box<dyn ConsoleObserver>>,
}

impl ConsoleOut {
    /// The console output since `mark` (a mark this returned before; 0: everything still kept,
    /// at most [`RECENT_MAX`] bytes), and the mark to ask from next time: what a live
    /// migration carries to the VMM that takes the guest over, so its console log and attach
    /// replay go on where they were. `None` for a sink that keeps nothing (stdout, a file,
    /// none).
    pub fn output_since(&self, mark: u64) -> Option<(Vec<u8>, u64)> {
        let Sink::Socket(shared, _) = &self.sink else {
            return None;
        };
        let s = lock(shared);
        let new = usize::try_from(s.written.saturating_sub(mark)).unwrap_or(usize::MAX);
        let skip = s.replay.len().saturating_sub(new);
        Some((s.replay.iter().skip(skip).copied().collect(), s.written))
    }

    /// Writes output the guest wrote before this VMM had it (a migration's [`Self::output_since`]
    /// from the sender) to the sink, as if just written, without counting it as this VMM's
    /// console output or showing it to observers.
    pub fn replay_earlier(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sink.put(bytes)
    }

    /// Adds an observer of everything written from now on.
    pub fn add_observer(&mut self, o: Box<dyn ConsoleObserver>) {
        self.observers.push(o);
    }

    fn observe(&mut self, buf: &[u8]) {
        if buf.is_empty() {
            return;
        }
        self.stats.count(buf.len());
        for o in &mut self.observers {
            o.observe(buf);
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.observe(buf);
        self.sink.put(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Stdout(s) => s.flush(),
            Sink::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

/// Tells the console's input side that the guest emptied the receive FIFO.
pub struct FifoEvents(EventFd);

impl SerialEvents for FifoEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// The UART as the guest sees it.
pub type Uart = Serial<IrqTrigger, FifoEvents, ConsoleOut>;

/// The UART's registers, FIFO and interrupt state, for a snapshot (vm-superio's `SerialState`
/// in a form serde can write).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes in the receive FIFO, oldest first.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// COM1 on the bus.
pub struct SerialDevice(pub Arc<Mutex<Uart>>);

impl SerialDevice {
    /// The UART's state.
    pub fn state(&self) -> UartState {
        lock(&self.0).state().into()
    }

    /// Puts the UART back in `state`, keeping its interrupt line, events and output. Refused
    /// (nothing changes) if the state holds more bytes than the FIFO does.
    pub fn restore(&self, state: &UartState) -> Result<(), ConsoleError> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(ConsoleError::State(format!(
                "{} bytes in a {FIFO_SIZE}-byte receive FIFO",
                state.in_buffer.len()
            )));
        }
        let mut uart = lock(&self.0);
        // vm-superio builds a device from a state; ours keeps its trigger, events and sink.
        let trigger = IrqTrigger(
            uart.interrupt_evt()
                .0
                .try_clone()
                .map_err(ConsoleError::EventFd)?,
        );
        let events = FifoEvents(uart.events().0.try_clone().map_err(ConsoleError::EventFd)?);
        let out = std::mem::replace(
            uart.writer_mut(),
            ConsoleOut {
                sink: Sink::Null,
                stats: ConsoleStats::new(Instant::now()),
                observers: Vec::new(),
            },
        );
        *uart = Serial::from_state(&state.into(), trigger, events, out)
            .map_err(|e| ConsoleError::State(format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = lock(&self.0).read(off);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = lock(&self.0).write(off, *v) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The log file cannot be opened.
    #[error("cannot open console file {path}: {err}")]
    File {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        err: io::Error,
    },
    /// The socket cannot be bound.
    #[error("cannot listen on console socket {path}: {err}")]
    Socket {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        err: io::Error,
    },
    /// An eventfd cannot be created.
    #[error("cannot create a serial eventfd: {0}")]
    EventFd(io::Error),
    /// A saved UART state cannot be applied.
    #[error("invalid UART state: {0}")]
    State(String),
}

/// How long a console write may wait for a slow client before the client is dropped (the
/// vCPU thread writes the console: a client that stops reading must not stall the guest).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_millis(20);

/// Where console input comes from.
enum Source {
    /// The VMM's standard input.
    Stdin,
    /// The socket console's current client.
    Client(UnixStream),
}

impl Source {
    fn fd(&self) -> RawFd {
        match self {
            Self::Stdin => libc::STDIN_FILENO,
            Self::Client(c) => c.as_raw_fd(),
        }
    }
}

/// The console's input side, served by an event loop: the socket listener (one client at a
/// time; a new client replaces the old and first gets the replay of recent output), the
/// client's or stdin's bytes into the UART's receive FIFO, and the guest emptying that FIFO.
///
/// A source is read only when its bytes can go somewhere: what does not fit in the FIFO waits
/// here (at most one read's worth), the source is unwatched, and the rest follows when the
/// guest has emptied the FIFO. Reads take one `read` per readiness event, so descriptors shared
/// with other processes (a terminal) are never switched to non-blocking mode.
pub struct ConsoleInput {
    uart: Arc<Mutex<Uart>>,
    listener: Option<(UnixListener, Arc<Mutex<SocketShared>>)>,
    source: Option<Source>,
    source_watched: bool,
    fifo_empty: EventFd,
    pending: VecDeque<u8>,
}

impl ConsoleInput {
    /// The console socket's listening descriptor, if the console has one.
    pub fn listener_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.listener.as_ref().map(|(l, _)| l.as_raw_fd())
    }

    /// Whether input waits for FIFO room (the owner retries [`Self::retry`] now and then, for a
    /// guest that left the UART in loopback mode and so never empties the FIFO).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Input read from the source that waits for FIFO room, oldest first (a snapshot keeps it:
    /// the source gave it up and will not give it again).
    pub fn pending_bytes(&self) -> Vec<u8> {
        self.pending.iter().copied().collect()
    }

    /// Puts input back in line for the FIFO (a restore, before the event loop runs).
    pub fn push_pending(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
    }

    /// Moves waiting input into the FIFO, as far as it fits.
    pub fn retry(&mut self, ops: &mut EventOps) {
        self.feed_pending();
        self.watch_source(ops);
    }

    fn feed_pending(&mut self) {
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            let n = lock(&self.uart).enqueue_raw_bytes(a).unwrap_or(0);
            if n == 0 {
                break;
            }
            self.pending.drain(..n);
        }
    }

    /// Watches the source exactly when nothing waits for FIFO room.
    fn watch_source(&mut self, ops: &mut EventOps) {
        let want = self.pending.is_empty();
        let Some(src) = &self.source else {
            return;
        };
        if want == self.source_watched {
            return;
        }
        let ev = Events::with_data_raw(src.fd(), src.fd() as u32, EventSet::IN);
        let r = if want { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.source_watched = want,
            Err(e) if want => {
                // /dev/null and regular files cannot be watched: they have no input to give.
                tracing::debug!("console input cannot be watched ({e:?}); ignoring it");
                self.source = None;
            }
            Err(_) => {}
        }
    }

    fn drop_source(&mut self, ops: &mut EventOps) {
        if let Some(src) = self.source.take() {
            if self.source_watched {
                let fd = src.fd();
                let _ = ops.remove(Events::with_data_raw(fd, fd as u32, EventSet::IN));
            }
        }
        self.source_watched = false;
        self.pending.clear();
    }

    fn read_source(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; INPUT_CHUNK];
        let n = match &mut self.source {
            Some(Source::Stdin) => io::stdin().lock().read(&mut buf),
            Some(Source::Client(c)) => c.read(&mut buf),
            None => return,
        };
        match n {
            Ok(0) | Err(_) => self.drop_source(ops),
            Ok(n) => {
                self.pending.extend(&buf[..n]);
                self.feed_pending();
                self.watch_source(ops);
            }
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Some(shared) = self.listener.as_ref().map(|(_, s)| s.clone()) else {
            return;
        };
        loop {
            let Some((listener, _)) = &self.listener else {
                return;
            };
            let mut conn = match listener.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of descriptors or similar: the connection stays queued and is
                    // retried at the next event.
                    tracing::debug!("console socket: accept failed: {e}");
                    return;
                }
            };
            let Ok(input) = conn.try_clone() else {
                continue;
            };
            if conn.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT)).is_err() {
                continue;
            }
            {
                let mut s = lock(&shared);
                let (a, b) = s.replay.as_slices();
                if conn.write_all(a).and_then(|_| conn.write_all(b)).is_err() {
                    continue;
                }
                // One client at a time: the previous one is disconnected.
                if let Some(old) = s.client.replace(conn) {
                    let _ = old.shutdown(std::net::Shutdown::Both);
                }
            }
            self.drop_source(ops);
            self.source = Some(Source::Client(input));
            self.watch_source(ops);
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.fifo_empty.as_raw_fd() {
            let _ = self.fifo_empty.read();
            self.retry(ops);
        } else if self
            .listener
            .as_ref()
            .is_some_and(|(l, _)| l.as_raw_fd() == fd)
        {
            self.accept(ops);
        } else if self.source.as_ref().is_some_and(|s| s.fd() == fd) {
            self.read_source(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fifo_empty, EventSet::IN)) {
            tracing::error!("console: cannot watch the FIFO event: {e:?}");
        }
        if let Some((l, _)) = &self.listener {
            if let Err(e) = ops.add(Events::new(l, EventSet::IN)) {
                tracing::error!("console: cannot watch the socket: {e:?}");
            }
        }
        self.watch_source(ops);
    }
}

/// Everything a built UART needs from its caller.
pub struct ConsoleSetup<'a> {
    /// Where output goes.
    pub config: &'a ConsoleConfig,
    /// Whether stdin feeds the UART (stdio console only).
    pub stdin: bool,
    /// Clock and counters.
    pub stats: Arc<ConsoleStats>,
}

/// COM1 built: the UART, the eventfd to register as its irqfd, and its input side (if it has
/// one) for an event loop to run.
pub struct Console {
    /// The UART.
    pub uart: Arc<Mutex<Uart>>,
    /// Its interrupt (an irqfd on GSI [`COM1_IRQ`]).
    pub irq: EventFd,
    /// Its input side.
    pub input: Option<ConsoleInput>,
}

fn open_log(path: &std::path::Path) -> Result<File, ConsoleError> {
    bexar_util::handed::file(path, true, || {
        OpenOptions::new().create(true).append(true).open(path)
    })
    .map_err(|err| ConsoleError::File {
        path: path.to_owned(),
        err,
    })
}

fn listen(path: &std::path::Path) -> Result<UnixListener, ConsoleError> {
    let err = |err| ConsoleError::Socket {
        path: path.to_owned(),
        err,
    };
    let l = bexar_util::unix::bind_owner_only(path).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Builds COM1 and its input side.
pub fn build(setup: ConsoleSetup<'_>) -> Result<Console, ConsoleError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::EventFd)?;
    let irq_for_kvm = irq.try_clone().map_err(ConsoleError::EventFd)?;
    let fifo_empty = EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::EventFd)?;
    let events = FifoEvents(fifo_empty.try_clone().map_err(ConsoleError::EventFd)?);
    let mut listener = None;
    let sink = match setup.config {
        ConsoleConfig::Stdio => Sink::Stdout(io::stdout()),
        ConsoleConfig::None => Sink::Null,
        ConsoleConfig::File { path } => Sink::File(open_log(path)?),
        ConsoleConfig::Socket { path } => {
            let shared = Arc::new(Mutex::new(SocketShared::default()));
            listener = Some((listen(path)?, shared.clone()));
            Sink::Socket(shared, None)
        }
        ConsoleConfig::SocketWithLog { socket, log } => {
            let file = open_log(log)?;
            let shared = Arc::new(Mutex::new(SocketShared::default()));
            listener = Some((listen(socket)?, shared.clone()));
            Sink::Socket(shared, Some(file))
        }
    };
    let out = ConsoleOut {
        sink,
        stats: setup.stats,
        observers: Vec::new(),
    };
    let uart = Arc::new(Mutex::new(Serial::with_events(
        IrqTrigger(irq),
        events,
        out,
    )));
    let stdin = setup.stdin && *setup.config == ConsoleConfig::Stdio;
    let input = (stdin || listener.is_some()).then(|| ConsoleInput {
        uart: uart.clone(),
        listener,
        source: stdin.then_some(Source::Stdin),
        source_watched: false,
        fifo_empty,
        pending: VecDeque::new(),
    });
    Ok(Console {
        uart,
        irq: irq_for_kvm,
        input,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_config_parses_and_round_trips() {
        assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(ConsoleConfig::File {
                path: "/tmp/x".into()
            })
        );
        assert_eq!(
            "socket:/run/c".parse(),
            Ok(ConsoleConfig::Socket {
                path: "/run/c".into()
            })
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tcp:1".parse::<ConsoleConfig>().is_err());
        let c = ConsoleConfig::SocketWithLog {
            socket: "/s".into(),
            log: "/l".into(),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"socket-with-log","socket":"/s","log":"/l"}"#
        );
        assert_eq!(serde_json::from_str::<ConsoleConfig>(&text).unwrap(), c);
    }

    #[test]
    fn observers_and_stats_see_every_byte() {
        struct Collect(Arc<Mutex<Vec<u8>>>);
        impl ConsoleObserver for Collect {
            fn observe(&mut self, bytes: &[u8]) {
                lock(&self.0).extend_from_slice(bytes);
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stats = ConsoleStats::new(Instant::now());
        let mut out = ConsoleOut {
            sink: Sink::Null,
            stats: stats.clone(),
            observers: Vec::new(),
        };
        assert!(stats.first_byte().is_none());
        out.add_observer(Box::new(Collect(seen.clone())));
        out.write_all(b"hello ").unwrap();
        out.write_all(b"").unwrap();
        out.write_all(b"world").unwrap();
        assert_eq!(&*lock(&seen), b"hello world");
        assert_eq!(stats.bytes(), 11);
        assert!(stats.first_byte().is_some());
    }

    #[test]
    fn recent_output_is_handed_out_from_a_mark_and_replayed_into_another_sink() {
        let log = std::env::temp_dir().join(format!("bexar-serial-log-{}", std::process::id()));
        let shared = Arc::new(Mutex::new(SocketShared::default()));
        let mut out = ConsoleOut {
            sink: Sink::Socket(shared, None),
            stats: ConsoleStats::new(Instant::now()),
            observers: Vec::new(),
        };
        let (all, mark) = out.output_since(0).unwrap();
        assert!(all.is_empty());
        out.write_all(b"boot log\n").unwrap();
        let (all, mark) = out.output_since(mark).unwrap();
        assert_eq!(all, b"boot log\n");
        out.write_all(b"more").unwrap();
        assert_eq!(out.output_since(mark).unwrap().0, b"more");
        // Past what is kept: the last RECENT_MAX bytes.
        out.write_all(&vec![b'x'; RECENT_MAX + 10]).unwrap();
        let (tail, _) = out.output_since(mark).unwrap();
        assert_eq!(tail.len(), RECENT_MAX);
        assert!(tail.iter().all(|&b| b == b'x'));
        // The VMM that takes over writes it first, into its log and replay, uncounted.
        let stats = ConsoleStats::new(Instant::now());
        let mut next = ConsoleOut {
            sink: Sink::Socket(
                Arc::new(Mutex::new(SocketShared::default())),
                Some(File::create(&log).unwrap()),
            ),
            stats: stats.clone(),
            observers: Vec::new(),
        };
        next.replay_earlier(b"earlier ").unwrap();
        next.write_all(b"now").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"earlier now");
        assert_eq!(next.output_since(0).unwrap().0, b"earlier now");
        assert_eq!(stats.bytes(), 3);
        // A sink that keeps nothing hands nothing out.
        let null = ConsoleOut {
            sink: Sink::Null,
            stats,
            observers: Vec::new(),
        };
        assert!(null.output_since(0).is_none());
        std::fs::remove_file(log).ok();
    }

    #[test]
    fn uart_output_reaches_a_file() {
        let path = std::env::temp_dir().join(format!("bexar-serial-{}", std::process::id()));
        let c = build(ConsoleSetup {
            config: &ConsoleConfig::File { path: path.clone() },
            stdin: false,
            stats: ConsoleStats::new(Instant::now()),
        })
        .unwrap();
        assert!(c.input.is_none(), "a file console has no input side");
        let mut dev = SerialDevice(c.uart);
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn uart_state_round_trips_with_fifo_and_registers() {
        let c = build(ConsoleSetup {
            config: &ConsoleConfig::None,
            stdin: false,
            stats: ConsoleStats::new(Instant::now()),
        })
        .unwrap();
        let mut dev = SerialDevice(c.uart);
        // Guest programs the line (LCR, DLAB divisor, IER, scratch), host sends input.
        dev.write(3, &[0x80]);
        dev.write(0, &[0x0c]);
        dev.write(3, &[0x03]);
        dev.write(1, &[0x01]);
        dev.write(7, &[0x5a]);
        lock(&dev.0).enqueue_raw_bytes(b"abc").unwrap();
        let saved = dev.state();
        assert_eq!(saved.in_buffer, b"abc");
        let json = serde_json::to_string(&saved).unwrap();
        let back: UartState = serde_json::from_str(&json).unwrap();

        let fresh = build(ConsoleSetup {
            config: &ConsoleConfig::None,
            stdin: false,
            stats: ConsoleStats::new(Instant::now()),
        })
        .unwrap();
        let mut dev2 = SerialDevice(fresh.uart);
        dev2.restore(&back).unwrap();
        assert_eq!(dev2.state(), saved);
        // The restored UART goes on from there: the FIFO's bytes come out in order.
        let mut b = [0u8];
        let mut got = Vec::new();
        for _ in 0..3 {
            dev2.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"abc");
        let mut scratch = [0u8];
        dev2.read(7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        // A state with more bytes than the FIFO holds is refused and changes nothing.
        let mut bad = saved.clone();
        bad.in_buffer = vec![0; 65];
        assert!(dev2.restore(&bad).is_err());
        assert_eq!(dev2.state().scratch, 0x5a);
    }
}
