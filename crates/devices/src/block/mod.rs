//! The block layer: disks behind one completion-based trait, [`DiskBackend`], opened by one
//! factory, [`open_disk`]. It knows nothing of virtio: a device parses its requests, hands
//! [`BlockRequest`]s to a backend with a tag of its own, and gets [`Completion`]s back with
//! that tag; the backend never writes a status byte.
//!
//! Backends complete asynchronously: a request submitted now may finish later, and the
//! backend's [`DiskBackend::notifier`] eventfd becomes readable when completions wait (the
//! device's event loop watches it). The backends:
//!
//! * [`raw::RawUring`]: a raw file through io_uring, reads and writes straight between the
//!   file and guest memory (readv/writev on iovecs into the guest's pages), fdatasync as a
//!   flush;
//! * [`raw::RawFile`]: the same operations done at submit time through a bounce buffer, for
//!   hosts without io_uring and for O_DIRECT images (whose buffers must be aligned, which guest
//!   buffers need not be) ([`SyncDisk`]s like this one and the next become backends through
//!   [`Immediate`]);
//! * [`qcow2::Qcow2Image`]: a qcow2 image and its backing chain, at submit time, straight
//!   between the file and guest memory;
//! * [`remote::RemoteDisk`]: a disk on a network server, on a thread of its own that
//!   reconnects and resends, speaking NBD ([`nbd`]) or iSCSI ([`iscsi`]).
//!
//! [`open_disk`] probes the format once (or takes the one the caller recorded) and picks the
//! backend; the device never knows which it got. [`dirty::DirtyMap`] records which blocks a
//! guest wrote, for copying a disk while it runs.

pub mod copy;
pub mod dirty;
pub mod iscsi;
pub mod nbd;
pub mod qcow2;
pub mod raw;
pub mod remote;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::RateLimitConfig;

/// Sector size of the block protocols we speak.
pub const SECTOR: u64 = 512;
/// Largest serial number a disk reports (virtio-blk's GET_ID).
pub const SERIAL_MAX: usize = 20;

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// The format of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Every byte of the disk at the same offset in the file.
    Raw,
    /// qcow2 (version 2 or 3), possibly over a chain of backing images.
    Qcow2,
}

impl DiskFormat {
    /// The name qemu-img and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            _ => Err(format!("unknown disk format {s:?}: expected raw or qcow2")),
        }
    }
}

/// How a disk is attached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Image file (empty for a remote disk).
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub path: PathBuf,
    /// A disk on an NBD server instead of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<nbd::NbdTarget>,
    /// A disk on an iSCSI target instead of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi: Option<iscsi::IscsiTarget>,
    /// Its format; probed from the file's first bytes when absent. Give it for any image a
    /// guest wrote raw: a guest can write a qcow2 header into its raw disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default)]
    pub direct: bool,
    /// Serial reported to the guest (defaults to the file name), at most 20 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Rate limits (bytes and requests per refill time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// For a writable qcow2 image: what it was made over (the agent records it). A VMM writes
    /// the image's header, so one a guest took over could make it name any host file, which
    /// the next VMM would open as root as the guest's backing data: an image whose header
    /// names another backing file (or one where none was), or another format for it, is
    /// refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<BackingPin>,
}

/// What a writable qcow2 image was made over, recorded when it was made: its header, which
/// a VMM writes, must still say so ([`qcow2::open_chain_files`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackingPin {
    /// The backing file; `None` for an image made with none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The backing file's format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    /// Parses the `--disk` flag (`nbd://HOST[:PORT]/EXPORT[,retry=S][,timeout=S]` for a disk
    /// on an NBD server, `iscsi://[USER%SECRET@]HOST[:PORT]/IQN/LUN[,retry=S][,timeout=S]`
    /// for one on an iSCSI target, then the same options):
    /// `PATH[,ro|rw][,direct][,serial=ID][,format=raw|qcow2][,bps=N][,iops=N][,bps-burst=N][,iops-burst=N]`
    /// (`bps` and `iops`: a limit per second, as a bucket of N refilled every second; the
    /// bursts are one-time extras).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("empty disk path")?;
        let mut cfg = if let Some(rest) = path.strip_prefix("nbd://") {
            DiskConfig {
                nbd: Some(nbd::NbdTarget::from_url(rest)?),
                ..Default::default()
            }
        } else if let Some(rest) = path.strip_prefix("iscsi://") {
            DiskConfig {
                iscsi: Some(iscsi::IscsiTarget::from_url(rest)?),
                ..Default::default()
            }
        } else {
            DiskConfig {
                path: path.into(),
                ..Default::default()
            }
        };
        for opt in parts {
            match opt.split_once('=') {
                Some((k @ ("retry" | "timeout"), v)) if cfg.is_remote() => {
                    let s: u32 = v.parse().map_err(|_| format!("{k}={v}: not seconds"))?;
                    let (retry, timeout) = match (cfg.nbd.as_mut(), cfg.iscsi.as_mut()) {
                        (Some(t), _) => (&mut t.retry_s, &mut t.timeout_s),
                        (_, Some(t)) => (&mut t.retry_s, &mut t.timeout_s),
                        _ => continue,
                    };
                    *if k == "retry" { retry } else { timeout } = s;
                }
                None if opt == "ro" => cfg.read_only = true,
                None if opt == "rw" => cfg.read_only = false,
                None if opt == "direct" => cfg.direct = true,
                Some(("serial", v)) => cfg.serial = Some(v.to_owned()),
                Some(("format", v)) => cfg.format = Some(v.parse()?),
                Some((k, v)) if RateLimitConfig::apply_flag(&mut cfg.rate_limit, k, v)? => {}
                _ => {
                    return Err(format!(
                        "unknown disk option {opt:?}: expected ro, rw, direct, serial=ID, format=raw|qcow2, bps=N, iops=N, bps-burst=N or iops-burst=N"
                    ))
                }
            }
        }
        cfg.check().map_err(|(_, m)| m)?;
        Ok(cfg)
    }
}

impl DiskConfig {
    /// The TCP port of the disk's server, for an NBD or iSCSI disk.
    pub fn remote_port(&self) -> Option<u16> {
        self.remote_server().map(|(_, p)| p)
    }

    /// A remote disk's server: the host as the disk names it, and the TCP port.
    pub fn remote_server(&self) -> Option<(String, u16)> {
        match (&self.nbd, &self.iscsi) {
            (Some(n), _) => Some((n.host.clone(), n.port)),
            (None, Some(i)) => i.server(),
            (None, None) => None,
        }
    }

    /// Checks what can be checked without opening the image; returns the field and the
    /// problem.
    pub fn check(&self) -> Result<(), (String, String)> {
        let targets = usize::from(self.nbd.is_some()) + usize::from(self.iscsi.is_some());
        match (targets, self.path.as_os_str().is_empty()) {
            (0, true) => return Err(("path".into(), "empty disk path".into())),
            (1, true) => {
                if let Some(t) = &self.nbd {
                    t.check().map_err(|(f, m)| (format!("nbd.{f}"), m))?;
                }
                if let Some(t) = &self.iscsi {
                    t.check().map_err(|(f, m)| (format!("iscsi.{f}"), m))?;
                }
                if self.format.is_some() {
                    return Err(("format".into(), "a remote disk is raw".into()));
                }
            }
            (0, false) => {}
            _ => {
                return Err((
                    "path".into(),
                    "give one of a path, an nbd target and an iscsi target".into(),
                ))
            }
        }
        if let Some(s) = &self.serial {
            if s.is_empty() || s.len() > SERIAL_MAX || s.contains(',') {
                return Err((
                    "serial".into(),
                    format!("serial {s:?} must be 1-{SERIAL_MAX} bytes without ','"),
                ));
            }
        }
        if let Some(rl) = &self.rate_limit {
            rl.check()
                .map_err(|(f, m)| (format!("rate_limit.{f}"), m))?;
        }
        Ok(())
    }

    /// Whether the disk is on a network server (NBD or iSCSI).
    pub fn is_remote(&self) -> bool {
        self.nbd.is_some() || self.iscsi.is_some()
    }

    /// The serial the guest sees: the configured one, else the file name or the export's
    /// name (cut to 20 bytes).
    pub fn serial_bytes(&self) -> [u8; SERIAL_MAX] {
        let id = self
            .serial
            .clone()
            .unwrap_or_else(|| match (&self.nbd, &self.iscsi) {
                (Some(t), _) => t.export.chars().take(SERIAL_MAX).collect(),
                // The end of the IQN is the part that tells targets apart.
                (_, Some(t)) => {
                    let n = t.target.chars().count();
                    t.target
                        .chars()
                        .skip(n.saturating_sub(SERIAL_MAX))
                        .collect()
                }
                _ => self
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().chars().take(SERIAL_MAX).collect())
                    .unwrap_or_default(),
            });
        let mut serial = [0u8; SERIAL_MAX];
        let n = id.len().min(SERIAL_MAX);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        serial
    }
}

/// What a backend can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in bytes (a whole number of sectors).
    pub capacity: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Discard (deallocate a range) is supported.
    pub discard: bool,
    /// Write-zeroes is supported.
    pub write_zeroes: bool,
}

/// An operation on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// Read into the request's guest buffers.
    Read,
    /// Write the request's guest buffers.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Deallocate a range (it reads back as zeros).
    Discard,
    /// Zero a range; `unmap` allows deallocating it.
    WriteZeroes {
        /// Whether the range may be deallocated.
        unmap: bool,
    },
}

/// One request for a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRequest {
    /// What to do.
    pub op: BlockOp,
    /// Byte offset on the disk (0 for a flush).
    pub offset: u64,
    /// Bytes concerned: the sum of `segments` for reads and writes, the range for discard
    /// and write-zeroes, 0 for a flush.
    pub len: u64,
    /// Guest buffers (address, length) of a read or write, in order.
    pub segments: Vec<(GuestAddress, u32)>,
}

/// A finished request: the submitter's tag and the bytes moved, or why it failed.
#[derive(Debug)]
pub struct Completion {
    /// The tag given at submit.
    pub user_data: u64,
    /// Bytes transferred (reads and writes), 0 otherwise; or the error.
    pub result: std::io::Result<u64>,
}

/// Errors of the block layer.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk {path}: {err}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        err: std::io::Error,
    },
    /// A remote disk cannot be reached or refused us.
    #[error("remote disk {url}: {reason}")]
    Remote {
        /// The target.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// An image, or an image of its backing chain, cannot be used.
    #[error("disk image {path}: {reason}")]
    Image {
        /// The image concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The image size is not a whole number of sectors.
    #[error("disk {0} is not a multiple of 512 bytes long")]
    Size(PathBuf),
    /// An eventfd cannot be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The request cannot be queued now (the backend is full); try again after completions.
    #[error("the backend's queue is full")]
    Busy,
    /// A guest buffer of the request is not in guest memory.
    #[error("a buffer at {0:#x} is outside guest memory")]
    BadBuffer(u64),
    /// The request does not fit the disk (the device checks this first; backends check too).
    #[error("{op:?} of {len} bytes at {offset} is outside the disk")]
    OutOfRange {
        /// The operation.
        op: BlockOp,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// The disk is read-only.
    #[error("the disk is read-only")]
    ReadOnly,
}

/// The connection of a remote disk, shared between its backend and the VMM's reports.
#[derive(Debug, Default)]
pub struct LinkState {
    /// The connection is broken (being made again).
    pub down: std::sync::atomic::AtomicBool,
    /// Broken for longer than the disk's retry time: requests fail with EIO.
    pub failing: std::sync::atomic::AtomicBool,
    /// Connections made again after a break.
    pub reconnects: std::sync::atomic::AtomicU64,
}

impl LinkState {
    /// `up`, `reconnecting` or `failing`.
    pub fn state(&self) -> &'static str {
        use std::sync::atomic::Ordering::Relaxed;
        if self.failing.load(Relaxed) {
            "failing"
        } else if self.down.load(Relaxed) {
            "reconnecting"
        } else {
            "up"
        }
    }
}

/// A disk, as a device sees it.
pub trait DiskBackend: Send {
    /// Which engine this is (`io_uring`, `sync`), for logs and reports.
    fn engine(&self) -> &'static str;
    /// Size and abilities.
    fn info(&self) -> DiskInfo;
    /// Queues `req`, tagged `user_data`. Its completion comes from [`Self::reap`], possibly
    /// before this returns (synchronous backends), never twice.
    fn submit(
        &mut self,
        mem: &GuestMemoryMmap,
        req: BlockRequest,
        user_data: u64,
    ) -> Result<(), BlockError>;
    /// Hands queued requests to whatever executes them (called once per batch).
    fn kick(&mut self) -> std::io::Result<()>;
    /// Moves finished requests into `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);
    /// Readable when completions wait.
    fn notifier(&self) -> &EventFd;
    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Waits until nothing is in flight, moving every completion into `out` (a device reset
    /// or a snapshot: the kernel must be done with the guest's buffers).
    fn drain(&mut self, out: &mut Vec<Completion>);
    /// The connection of a remote disk (`None` for a local one).
    fn link(&self) -> Option<std::sync::Arc<LinkState>> {
        None
    }
    /// What a disk copy reads the disk through while the guest runs (a local image; `None`
    /// for a remote disk).
    fn copy_source(&self) -> Option<std::io::Result<copy::CopySource>> {
        None
    }
}

/// A disk whose requests are done at submit time, on the caller's thread.
pub trait SyncDisk: Send {
    /// Which engine this is, for logs and reports.
    fn engine(&self) -> &'static str;
    /// Size and abilities.
    fn info(&self) -> DiskInfo;
    /// Does one (checked) request; the bytes moved, or why it failed.
    fn run(&mut self, mem: &GuestMemoryMmap, req: &BlockRequest) -> std::io::Result<u64>;
    /// As [`DiskBackend::copy_source`].
    fn copy_source(&self) -> Option<std::io::Result<copy::CopySource>> {
        None
    }
}

/// A [`SyncDisk`] as a [`DiskBackend`]: each completion is ready when its submit returns (the
/// device reaps right after submitting), so the notifier is never written.
pub struct Immediate<T> {
    disk: T,
    done: Vec<Completion>,
    notifier: EventFd,
}

impl<T: SyncDisk> Immediate<T> {
    /// The disk it runs.
    pub fn disk(&self) -> &T {
        &self.disk
    }

    /// `disk` as a backend.
    pub fn wrap(disk: T) -> Result<Self, BlockError> {
        Ok(Self {
            disk,
            done: Vec::new(),
            notifier: EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?,
        })
    }
}

impl<T: SyncDisk> DiskBackend for Immediate<T> {
    fn engine(&self) -> &'static str {
        self.disk.engine()
    }
    fn info(&self) -> DiskInfo {
        self.disk.info()
    }
    fn submit(
        &mut self,
        mem: &GuestMemoryMmap,
        req: BlockRequest,
        user_data: u64,
    ) -> Result<(), BlockError> {
        check(&self.disk.info(), &req)?;
        let result = self.disk.run(mem, &req);
        if let Err(e) = &result {
            tracing::warn!(
                "{} disk: {:?} of {} bytes at {}: {e}",
                self.disk.engine(),
                req.op,
                req.len,
                req.offset
            );
        }
        self.done.push(Completion { user_data, result });
        Ok(())
    }
    fn kick(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn copy_source(&self) -> Option<std::io::Result<copy::CopySource>> {
        self.disk.copy_source()
    }
    fn drain(&mut self, out: &mut Vec<Completion>) {
        self.reap(out);
    }
}

/// Whether io_uring works on this host, probed once per process.
fn io_uring_available() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| match io_uring::IoUring::new(2) {
        Ok(_) => true,
        Err(e) => {
            tracing::info!("io_uring unavailable ({e}): disks use synchronous I/O");
            false
        }
    })
}

/// Checks a request against the disk before any backend touches the image.
pub(crate) fn check(info: &DiskInfo, req: &BlockRequest) -> Result<(), BlockError> {
    let writes = !matches!(req.op, BlockOp::Read | BlockOp::Flush);
    if writes && info.read_only {
        return Err(BlockError::ReadOnly);
    }
    if req.op != BlockOp::Flush && !in_bounds(req.offset, req.len, info.capacity) {
        return Err(BlockError::OutOfRange {
            op: req.op,
            offset: req.offset,
            len: req.len,
        });
    }
    Ok(())
}

/// Opens the disk `cfg` describes with the most capable backend this host offers, probing
/// the format when `cfg` does not name one: [`preopen_disk`], then [`open_disk_from`].
pub fn open_disk(cfg: &DiskConfig) -> Result<Box<dyn DiskBackend>, BlockError> {
    open_disk_from(preopen_disk(cfg)?)
}

/// A disk as a VMM opens it while it still has the host's rights: a local image's file and
/// every backing file under it, none of them parsed beyond where the next one is, or a
/// remote disk's connection. [`open_disk_from`] makes the backend, which is where an image's
/// metadata (written by a guest's VMM, perhaps a compromised one) is read: in the jail.
pub struct OpenedDisk {
    cfg: DiskConfig,
    what: Opened,
}

enum Opened {
    /// An NBD or iSCSI disk, connected and logged in.
    Remote(Box<dyn DiskBackend>),
    /// A local image in `format`: its file, then the files of its backing chain, each with
    /// the path the chain names it by. None has O_DIRECT yet (a migration's receiver writes
    /// unaligned through them first); [`open_disk_from`] sets it where the disk asks.
    Local {
        format: DiskFormat,
        files: Vec<(PathBuf, std::fs::File)>,
        /// Each file's format as the walk took it (the top's is `format`).
        formats: Vec<DiskFormat>,
    },
}

impl std::fmt::Debug for OpenedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files = match &self.what {
            Opened::Remote(_) => 0,
            Opened::Local { files, .. } => files.len(),
        };
        f.debug_struct("OpenedDisk")
            .field("cfg", &self.cfg)
            .field("files", &files)
            .finish()
    }
}

impl OpenedDisk {
    /// What the disk was opened as.
    pub fn config(&self) -> &DiskConfig {
        &self.cfg
    }

    /// A local image's format and files (top first), `None` for a remote disk.
    pub fn local(&self) -> Option<(DiskFormat, &[(PathBuf, std::fs::File)])> {
        match &self.what {
            Opened::Remote(_) => None,
            Opened::Local { format, files, .. } => Some((*format, files)),
        }
    }

    /// Hands out the files opened here by the path the chain names them by (a duplicate
    /// descriptor each time), with the format the walk took each to be:
    /// [`qcow2::open_chain_with`]'s opener. A path not among them is not found: nothing is
    /// opened by path.
    pub fn opener(
        &self,
    ) -> impl FnMut(&Path, bool) -> std::io::Result<(std::fs::File, Option<DiskFormat>)> + '_ {
        move |p: &Path, _writable: bool| {
            let (files, formats) = match &self.what {
                Opened::Remote(_) => (&[][..], &[][..]),
                Opened::Local { files, formats, .. } => (&files[..], &formats[..]),
            };
            match files.iter().position(|(q, _)| q == p) {
                Some(i) => Ok((files[i].1.try_clone()?, formats.get(i).copied())),
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not among the files opened before the jail",
                )),
            }
        }
    }
}

/// Opens what the disk `cfg` describes with the host's rights, parsing nothing of an image
/// but its first four bytes (the format, when `cfg` does not name one) and where each backing
/// file is ([`qcow2::open_chain_files`]). A remote disk connects and logs in here.
pub fn preopen_disk(cfg: &DiskConfig) -> Result<OpenedDisk, BlockError> {
    let what = if let Some(t) = &cfg.nbd {
        Opened::Remote(Box::new(nbd::open(t, cfg.read_only)?))
    } else if let Some(t) = &cfg.iscsi {
        Opened::Remote(Box::new(iscsi::open(t, cfg.read_only)?))
    } else {
        let open_err = |err| BlockError::Open {
            path: cfg.path.clone(),
            err,
        };
        let file = bexar_util::handed::file(&cfg.path, !cfg.read_only, || {
            OpenOptions::new()
                .read(true)
                .write(!cfg.read_only)
                .open(&cfg.path)
        })
        .map_err(open_err)?;
        let format = match cfg.format {
            Some(f) => f,
            None => qcow2::probe_file(&file).map_err(open_err)?,
        };
        let (files, formats) = match format {
            DiskFormat::Qcow2 => {
                let pinned = cfg.backing.as_ref().filter(|_| !cfg.read_only);
                qcow2::open_chain_files(&cfg.path, file, pinned)?
                    .into_iter()
                    .map(|(p, f, fmt)| ((p, f), fmt))
                    .unzip()
            }
            DiskFormat::Raw => (vec![(cfg.path.clone(), file)], vec![DiskFormat::Raw]),
        };
        Opened::Local {
            format,
            files,
            formats,
        }
    };
    Ok(OpenedDisk {
        cfg: cfg.clone(),
        what,
    })
}

/// Turns O_DIRECT on for an open file (as opening it with the flag would have).
fn set_direct(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor `f` owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The backend for a disk [`preopen_disk`] opened: here an image's metadata is parsed (a
/// qcow2 chain through [`qcow2::open_chain_with`], on the files opened before), and no file
/// is opened by path.
pub fn open_disk_from(disk: OpenedDisk) -> Result<Box<dyn DiskBackend>, BlockError> {
    let OpenedDisk { cfg, what } = disk;
    let (format, files, formats) = match what {
        Opened::Remote(b) => return Ok(b),
        Opened::Local {
            format,
            files,
            formats,
        } => (format, files, formats),
    };
    if cfg.direct {
        for (path, f) in &files {
            set_direct(f).map_err(|err| BlockError::Open {
                path: path.clone(),
                err,
            })?;
        }
    }
    let open_err = |err| BlockError::Open {
        path: cfg.path.clone(),
        err,
    };
    if format == DiskFormat::Qcow2 {
        let opened = OpenedDisk {
            cfg: cfg.clone(),
            what: Opened::Local {
                format,
                files,
                formats,
            },
        };
        let image = qcow2::open_chain_with(
            &cfg.path,
            DiskFormat::Qcow2,
            !cfg.read_only,
            cfg.direct,
            &mut Vec::new(),
            &mut opened.opener(),
        )?;
        if image.size() % SECTOR != 0 {
            return Err(BlockError::Size(cfg.path.clone()));
        }
        let disk = Immediate::wrap(qcow2::Qcow2Image::new(image, cfg.read_only))?;
        if !cfg.direct && io_uring_available() {
            let (ring_file, _) = opened.opener()(&cfg.path, !cfg.read_only).map_err(open_err)?;
            match qcow2::Qcow2Uring::new(disk, ring_file) {
                Ok(b) => return Ok(Box::new(b)),
                Err((disk, e)) => {
                    tracing::info!(
                        "io_uring ring for {} failed ({e}): synchronous I/O",
                        cfg.path.display()
                    );
                    return Ok(Box::new(disk));
                }
            }
        }
        return Ok(Box::new(disk));
    }
    let Some((_, file)) = files.into_iter().next() else {
        return Err(open_err(std::io::ErrorKind::NotFound.into()));
    };
    let capacity = file.metadata().map_err(open_err)?.len();
    if capacity % SECTOR != 0 {
        return Err(BlockError::Size(cfg.path.clone()));
    }
    let info = DiskInfo {
        capacity,
        read_only: cfg.read_only,
        discard: !cfg.read_only,
        write_zeroes: !cfg.read_only,
    };
    if !cfg.direct && io_uring_available() {
        match raw::RawUring::new(file.try_clone().map_err(open_err)?, info) {
            Ok(b) => return Ok(Box::new(b)),
            Err(e) => tracing::info!(
                "io_uring ring for {} failed ({e}): synchronous I/O",
                cfg.path.display()
            ),
        }
    }
    Ok(Box::new(Immediate::wrap(raw::RawFile::new(file, info))?))
}

/// Checks `[offset, offset + len)` lies inside a disk of `capacity` bytes.
pub fn in_bounds(offset: u64, len: u64, capacity: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= capacity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_flags_parse_and_check() {
        assert!("/tmp/b.img,direct".parse::<DiskConfig>().unwrap().direct);
        let d: DiskConfig = "/tmp/a.img,ro,serial=abc".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.read_only);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert!("".parse::<DiskConfig>().is_err());
        assert!("/a,rx".parse::<DiskConfig>().is_err());
        assert!("/a,serial=".parse::<DiskConfig>().is_err());
        assert!("/a,serial=123456789012345678901"
            .parse::<DiskConfig>()
            .is_err());
        // The API form is the same struct.
        let j: DiskConfig =
            serde_json::from_str(r#"{"path":"/tmp/a.img","read_only":true,"serial":"abc"}"#)
                .unwrap();
        assert_eq!(j, d);
        assert!(serde_json::from_str::<DiskConfig>(r#"{"path":"/a","colour":1}"#).is_err());
    }

    #[test]
    fn disk_limits_parse_from_flags() {
        let d: DiskConfig = "/a,iops=500,iops-burst=100,bps=1048576".parse().unwrap();
        let rl = d.rate_limit.unwrap();
        assert_eq!(rl.ops.unwrap().size, 500);
        assert_eq!(rl.ops.unwrap().one_time_burst, 100);
        assert_eq!(rl.bandwidth.unwrap().size, 1 << 20);
        assert!("/a,iops=x".parse::<DiskConfig>().is_err());
        assert!(
            "/a,bps-burst=10".parse::<DiskConfig>().is_err(),
            "a burst without a rate"
        );
        let j: DiskConfig = serde_json::from_str(
            r#"{"path":"/a","rate_limit":{"ops":{"size":0,"refill_time_ms":1}}}"#,
        )
        .unwrap();
        assert_eq!(j.check().unwrap_err().0, "rate_limit.ops.size");
    }

    #[test]
    fn serials_default_to_the_file_name() {
        let d: DiskConfig = "/images/a-very-long-root-image-name.ext4".parse().unwrap();
        assert_eq!(&d.serial_bytes(), b"a-very-long-root-ima");
        let s: DiskConfig = "/x,serial=disk1".parse().unwrap();
        assert_eq!(&s.serial_bytes()[..6], b"disk1\0");
    }

    #[test]
    fn bounds() {
        assert!(in_bounds(0, 512, 1024));
        assert!(in_bounds(512, 512, 1024));
        assert!(!in_bounds(1024, 512, 1024));
        assert!(!in_bounds(u64::MAX, 512, 1024));
        assert!(!in_bounds(512, u64::MAX, 1024));
    }
}
