//! COM1: a 16550 UART (vm-superio) whose output goes to a console sink (stdout, a file or a Unix
//! socket) and whose input comes from stdin or the socket's client.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_superio::serial::NoEvents;
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

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The VMM's stdout (and stdin as input).
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// A Unix socket the VMM listens on; one client at a time reads and writes the console.
    Socket(PathBuf),
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
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.split_once(':') {
                Some(("file", p)) if !p.is_empty() => Ok(Self::File(p.into())),
                Some(("socket", p)) if !p.is_empty() => Ok(Self::Socket(p.into())),
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
}

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
        let ns = self.start.elapsed().as_nanos().max(1) as u64;
        let _ = self
            .first_byte_ns
            .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
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
        match &mut self.sink {
            Sink::Stdout(s) => s.write_all(buf)?,
            Sink::File(f) => f.write_all(buf)?,
            Sink::Socket(shared, log) => {
                if let Some(f) = log {
                    f.write_all(buf)?;
                }
                let mut s = lock(shared);
                s.replay.extend(buf);
                let excess = s.replay.len().saturating_sub(REPLAY_BYTES);
                s.replay.drain(..excess);
                if let Some(c) = s.client.as_mut() {
                    if c.write_all(buf).is_err() {
                        // Gone, or too slow to keep up: drop it (the replay keeps the output).
                        if let Some(old) = s.client.take() {
                            let _ = old.shutdown(std::net::Shutdown::Both);
                        }
                    }
                }
            }
            Sink::Null => {}
        }
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

/// The UART as the guest sees it.
pub type Uart = Serial<IrqTrigger, NoEvents, ConsoleOut>;

/// COM1 on the bus.
pub struct SerialDevice(pub Arc<Mutex<Uart>>);

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
    /// The interrupt eventfd cannot be created.
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(io::Error),
}

/// Feeds input bytes into the UART, waiting while its FIFO is full.
fn feed(uart: &Mutex<Uart>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let n = lock(uart).enqueue_raw_bytes(bytes).unwrap_or(0);
        bytes = &bytes[n..];
        if n == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn spawn_reader<R: Read + Send + 'static>(uart: Arc<Mutex<Uart>>, mut input: R) {
    let _ = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 {
                    break;
                }
                feed(&uart, &buf[..n]);
            }
        });
}

/// How long a console write may wait for a slow client before the client is dropped (the
/// vCPU thread writes the console: a client that stops reading must not stall the guest).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_millis(20);

fn accept_loop(listener: UnixListener, shared: Arc<Mutex<SocketShared>>, uart: Arc<Mutex<Uart>>) {
    loop {
        let mut conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                tracing::debug!("console socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if conn.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT)).is_err() {
            continue;
        }
        let input = match conn.try_clone() {
            Ok(c) => c,
            Err(_) => continue,
        };
        {
            let mut s = lock(&shared);
            let (a, b) = s.replay.as_slices();
            if conn.write_all(a).and_then(|_| conn.write_all(b)).is_err() {
                continue;
            }
            // One client at a time: the previous one is disconnected, which also ends its
            // reader thread.
            if let Some(old) = s.client.replace(conn) {
                let _ = old.shutdown(std::net::Shutdown::Both);
            }
        }
        spawn_reader(uart.clone(), input);
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

/// Builds COM1 and starts its input side. Returns the UART and the eventfd to register as irqfd.
pub fn build(setup: ConsoleSetup<'_>) -> Result<(Arc<Mutex<Uart>>, EventFd), ConsoleError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::EventFd)?;
    let irq_for_kvm = irq.try_clone().map_err(ConsoleError::EventFd)?;
    let mut listener = None;
    let sink = match setup.config {
        ConsoleConfig::Stdio => Sink::Stdout(io::stdout()),
        ConsoleConfig::None => Sink::Null,
        ConsoleConfig::File(path) => Sink::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|err| ConsoleError::File {
                    path: path.clone(),
                    err,
                })?,
        ),
        ConsoleConfig::Socket(path) => {
            let l =
                bexar_util::unix::bind_owner_only(path).map_err(|err| ConsoleError::Socket {
                    path: path.clone(),
                    err,
                })?;
            let shared = Arc::new(Mutex::new(SocketShared::default()));
            listener = Some((l, shared.clone()));
            Sink::Socket(shared, None)
        }
        ConsoleConfig::SocketWithLog { socket, log } => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|err| ConsoleError::File {
                    path: log.clone(),
                    err,
                })?;
            let l =
                bexar_util::unix::bind_owner_only(socket).map_err(|err| ConsoleError::Socket {
                    path: socket.clone(),
                    err,
                })?;
            let shared = Arc::new(Mutex::new(SocketShared::default()));
            listener = Some((l, shared.clone()));
            Sink::Socket(shared, Some(file))
        }
    };
    let out = ConsoleOut {
        sink,
        stats: setup.stats,
        observers: Vec::new(),
    };
    let uart = Arc::new(Mutex::new(Serial::new(IrqTrigger(irq), out)));
    if let Some((l, shared)) = listener {
        let u = uart.clone();
        let _ = std::thread::Builder::new()
            .name("console-accept".into())
            .spawn(move || accept_loop(l, shared, u));
    }
    if setup.stdin && *setup.config == ConsoleConfig::Stdio {
        spawn_reader(uart.clone(), io::stdin());
    }
    Ok((uart, irq_for_kvm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_config_parses() {
        assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(ConsoleConfig::File("/tmp/x".into()))
        );
        assert_eq!(
            "socket:/run/c".parse(),
            Ok(ConsoleConfig::Socket("/run/c".into()))
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tcp:1".parse::<ConsoleConfig>().is_err());
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
    fn uart_output_reaches_a_file() {
        let path = std::env::temp_dir().join(format!("bexar-serial-{}", std::process::id()));
        let (uart, _irq) = build(ConsoleSetup {
            config: &ConsoleConfig::File(path.clone()),
            stdin: false,
            stats: ConsoleStats::new(Instant::now()),
        })
        .unwrap();
        let mut dev = SerialDevice(uart);
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
}
