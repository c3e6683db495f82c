//! virtio-blk over a raw image file: read, write, flush (fdatasync), GET_ID, DISCARD (punch
//! hole) and WRITE_ZEROES (zero range), every request bounds-checked against the disk size.
//! Reads, writes and flushes go through io_uring where the host has it (`crate::block::uring`);
//! everything else, and every refusal, is answered synchronously on the event loop thread.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    read_config_bytes, ActivateError, Counters, DeviceBase, VirtioDevice, INT_USED_RING,
    TYPE_BLOCK, VIRTIO_F_VERSION_1,
};
use crate::block::uring::Uring;

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
/// Largest single data transfer we accept (bounce buffer limit).
pub const MAX_TRANSFER: usize = 4 << 20;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const ID_BYTES: usize = 20;
const WRITE_ZEROES_UNMAP: u32 = 1;

/// How a disk is attached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskConfig {
    /// Image file.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Serial reported by GET_ID (defaults to the file name).
    pub serial: Option<String>,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    /// Parses `PATH[,ro][,serial=ID]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("empty disk path")?;
        let mut cfg = DiskConfig {
            path: path.into(),
            read_only: false,
            serial: None,
            direct: false,
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => cfg.read_only = true,
                None if opt == "rw" => cfg.read_only = false,
                None if opt == "direct" => cfg.direct = true,
                Some(("serial", v)) if !v.is_empty() && v.len() <= ID_BYTES => {
                    cfg.serial = Some(v.to_owned())
                }
                _ => {
                    return Err(format!(
                    "unknown disk option {opt:?}: expected ro, rw, direct or serial=ID (at most 20 bytes)"
                ))
                }
            }
        }
        Ok(cfg)
    }
}

/// Errors opening a disk.
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
    /// The image size is not a whole number of sectors.
    #[error("disk {0} is not a multiple of 512 bytes long")]
    Size(PathBuf),
    /// The eventfd cannot be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
}

/// A virtio-blk device.
pub struct Block {
    file: File,
    read_only: bool,
    size: u64,
    serial: [u8; ID_BYTES],
    config: Vec<u8>,
    base: DeviceBase,
    active: Option<Active>,
    buf: Bounce,
    /// The io_uring fast path, when the host has it and the image is not O_DIRECT.
    uring: Option<Uring>,
}

/// Alignment of the bounce buffer: what O_DIRECT needs on any device we expect.
const BOUNCE_ALIGN: usize = 4096;

/// A bounce buffer whose usable window starts on a 4 KiB boundary (O_DIRECT needs aligned
/// memory); over-allocating keeps this free of `unsafe`.
#[derive(Default)]
struct Bounce(Vec<u8>);

impl Bounce {
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.0.len() < len + BOUNCE_ALIGN {
            self.0.resize(len + BOUNCE_ALIGN, 0);
        }
        let off = self.0.as_ptr().align_offset(BOUNCE_ALIGN);
        &mut self.0[off..off + len]
    }
}

fn build_config(sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&sectors.to_le_bytes()); // capacity
    c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
    c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
    c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
    c[36..40].copy_from_slice(&(u32::MAX >> 9).to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
    c[48..52].copy_from_slice(&(u32::MAX >> 9).to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl Block {
    /// Opens the image and builds the device around `irqfd`.
    pub fn new(cfg: &DiskConfig, irqfd: EventFd) -> Result<Self, BlockError> {
        let open_err = |err| BlockError::Open {
            path: cfg.path.clone(),
            err,
        };
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .custom_flags(if cfg.direct { libc::O_DIRECT } else { 0 })
            .open(&cfg.path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        if size % SECTOR != 0 {
            return Err(BlockError::Size(cfg.path.clone()));
        }
        let mut serial = [0u8; ID_BYTES];
        let id = cfg
            .serial
            .clone()
            .unwrap_or_else(|| default_serial(&cfg.path));
        let n = id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file,
            read_only: cfg.read_only,
            size,
            serial,
            config: build_config(size / SECTOR),
            base: DeviceBase::new(1, irqfd).map_err(BlockError::EventFd)?,
            active: None,
            buf: Bounce::default(),
            uring: if cfg.direct {
                None
            } else {
                match Uring::new() {
                    Ok(u) => Some(u),
                    Err(e) => {
                        tracing::info!(
                            "io_uring unavailable ({e}): {} uses synchronous I/O",
                            cfg.path.display()
                        );
                        None
                    }
                }
            },
        })
    }

    /// Runs every available request (what a queue notification triggers). A corrupt ring marks
    /// the device DEVICE_NEEDS_RESET.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            Counters::inc(&self.base.counters.spurious_notifies);
            return;
        };
        if self.base.interrupt.needs_reset() {
            Counters::inc(&self.base.counters.spurious_notifies);
            return;
        }
        let mem = active.mem.clone();
        // Never more requests in flight than the ring has slots: the rest stay in the
        // available ring until completions make room (complete() comes back here).
        let budget =
            usize::from(QUEUE_SIZE).saturating_sub(self.uring.as_ref().map_or(0, Uring::in_flight));
        if budget == 0 {
            return;
        }
        let chains: Vec<DescriptorChain<&GuestMemoryMmap>> = match active.queue.iter(&mem) {
            Ok(it) => it.take(budget).collect(),
            Err(e) => {
                tracing::debug!("virtio-blk: corrupt available ring ({e}): device needs a reset");
                Counters::inc(&self.base.counters.needs_reset);
                self.base.interrupt.set_needs_reset();
                return;
            }
        };
        let mut used = Vec::new();
        let mut submitted = false;
        for chain in chains {
            if let Some(u) = self.uring.as_mut() {
                if submit_async(&chain, &mem, u, &self.file, self.read_only, self.size) {
                    submitted = true;
                    continue;
                }
            }
            let head = chain.head_index();
            let len = handle_request(
                chain,
                &mem,
                &self.file,
                self.read_only,
                self.size,
                &self.serial,
                &self.base.counters,
                &mut self.buf,
            );
            used.push((head, len));
        }
        if submitted {
            if let Some(Err(e)) = self.uring.as_mut().map(Uring::submit) {
                tracing::debug!("virtio-blk: io_uring submit failed: {e}");
            }
        }
        self.return_used(&mem, &used);
    }

    /// Puts finished requests on the used ring and interrupts the driver if it wants it.
    fn return_used(&mut self, mem: &GuestMemoryMmap, used: &[(u16, u32)]) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if used.is_empty() {
            return;
        }
        for (head, len) in used {
            if let Err(e) = active.queue.add_used(mem, *head, *len) {
                tracing::debug!(
                    "virtio-blk: cannot return descriptor {head} ({e}): device needs a reset"
                );
                Counters::inc(&self.base.counters.needs_reset);
                self.base.interrupt.set_needs_reset();
                return;
            }
        }
        if !matches!(active.queue.needs_notification(mem), Ok(false)) {
            self.base.interrupt.trigger(INT_USED_RING);
        }
    }

    /// Returns the io_uring requests that finished.
    fn complete(&mut self) {
        let Some(u) = self.uring.as_mut() else {
            return;
        };
        let Some(active) = self.active.as_ref() else {
            // Reset meanwhile: nothing to return, but the eventfd must be drained.
            u.discard();
            return;
        };
        let mem = active.mem.clone();
        let mut used = Vec::new();
        for d in u.reap(&mem) {
            if d.ok {
                Counters::inc(&self.base.counters.requests);
                let c = if d.read {
                    &self.base.counters.read_bytes
                } else {
                    &self.base.counters.written_bytes
                };
                c.fetch_add(d.bytes as u64, std::sync::atomic::Ordering::Relaxed);
            } else {
                Counters::inc(&self.base.counters.io_errors);
            }
            used.push((d.head, d.used_len));
        }
        self.return_used(&mem, &used);
        // Requests left in the available ring while the in-flight budget was used up.
        if !used.is_empty() {
            self.process_queue_quiet();
        }
    }

    /// process_queue without counting the call as a notification.
    fn process_queue_quiet(&mut self) {
        if self.active.is_some() && !self.base.interrupt.needs_reset() {
            self.process_queue();
        }
    }
    /// Waits until no request is in flight (tests and fuzzing; the event loop never blocks).
    pub fn settle(&mut self) {
        while self.uring.as_ref().is_some_and(|u| u.in_flight() > 0) {
            if let Some(Err(_)) = self.uring.as_mut().map(Uring::wait) {
                break;
            }
            self.complete();
        }
    }
}

fn default_serial(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().chars().take(ID_BYTES).collect())
        .unwrap_or_default()
}

/// Checks `[sector * 512, + len)` lies inside the disk; returns the byte offset.
fn in_bounds(sector: u64, len: u64, size: u64) -> Option<u64> {
    let off = sector.checked_mul(SECTOR)?;
    (off.checked_add(len)? <= size).then_some(off)
}

fn punch(file: &File, mode: libc::c_int, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a file descriptor we own with plain integer arguments.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Hands a request in the layout every Linux driver uses (a 16-byte header descriptor, data
/// descriptors all in one direction, a 1-byte status descriptor) to io_uring, reading or writing
/// guest memory in place. Returns false for anything else, including every request that must be
/// refused: those take the synchronous path, which answers them.
fn submit_async(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    u: &mut Uring,
    file: &File,
    read_only: bool,
    size: u64,
) -> bool {
    use vm_memory::{Bytes, GuestMemoryBackend};
    let descs: Vec<_> = chain.clone().collect();
    let Some((hdr, rest)) = descs.split_first() else {
        return false;
    };
    let Some((status, data)) = rest.split_last() else {
        return false;
    };
    if hdr.is_write_only() || hdr.len() != 16 || !status.is_write_only() || status.len() != 1 {
        return false;
    }
    let mut h = [0u8; 16];
    if mem.read_slice(&mut h, hdr.addr()).is_err() || mem.read_obj::<u8>(status.addr()).is_err() {
        return false;
    }
    let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
    let head = chain.head_index();
    match kind {
        T_FLUSH if data.is_empty() => u.flush(file.as_raw_fd(), head, status.addr()).is_ok(),
        T_IN | T_OUT => {
            let read = kind == T_IN;
            if (!read && read_only)
                || data.is_empty()
                || data.iter().any(|d| d.is_write_only() != read)
            {
                return false;
            }
            let len: u64 = data.iter().map(|d| u64::from(d.len())).sum();
            if len == 0 || !len.is_multiple_of(SECTOR) || len > MAX_TRANSFER as u64 {
                return false;
            }
            let Some(off) = in_bounds(sector, len, size) else {
                return false;
            };
            let mut iov = Vec::with_capacity(data.len());
            for d in data {
                let Ok(slice) = mem.get_slice(d.addr(), d.len() as usize) else {
                    return false;
                };
                iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: d.len() as usize,
                });
            }
            u.rw(file.as_raw_fd(), read, off, iov, head, status.addr())
                .is_ok()
        }
        _ => false,
    }
}

/// Writes IOERR into the last byte of the chain's last writable descriptor, if that byte is in
/// guest memory; returns the bytes written (0 or 1).
fn fail_status(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
    use vm_memory::{Address, Bytes};
    let last = chain.filter(|d| d.is_write_only() && d.len() > 0).last();
    match last {
        Some(d) => match d.addr().checked_add(u64::from(d.len()) - 1) {
            Some(a) if mem.write_obj(S_IOERR, a).is_ok() => 1,
            _ => 0,
        },
        None => 0,
    }
}

/// Handles one request chain; returns the number of bytes written into guest buffers.
#[allow(clippy::too_many_arguments)]
fn handle_request(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    file: &File,
    read_only: bool,
    size: u64,
    serial: &[u8; ID_BYTES],
    counters: &Counters,
    bounce: &mut Bounce,
) -> u32 {
    let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.clone().writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            // A descriptor outside guest memory, or a chain the queue library rejects. If the
            // last writable descriptor is usable, the driver still gets an IOERR status.
            Counters::inc(&counters.refused);
            return fail_status(chain, mem);
        }
    };
    let avail = writer.available_bytes();
    if avail == 0 {
        // No room for even the status byte: nothing we can tell the driver.
        Counters::inc(&counters.refused);
        return 0;
    }
    let mut status_w = match writer.split_at(avail - 1) {
        Ok(s) => s,
        Err(_) => {
            Counters::inc(&counters.refused);
            return 0;
        }
    };
    let mut hdr = [0u8; 16];
    let status = if reader.read_exact(&mut hdr).is_err() {
        Counters::inc(&counters.refused);
        S_IOERR
    } else {
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let r = match kind {
            T_IN => {
                let len = writer.available_bytes();
                match in_bounds(sector, len as u64, size) {
                    Some(off)
                        if len > 0
                            && (len as u64).is_multiple_of(SECTOR)
                            && len <= MAX_TRANSFER =>
                    {
                        let buf = bounce.get(len);
                        file.read_exact_at(buf, off)
                            .and_then(|_| writer.write_all(buf))
                            .map(|_| {
                                counters
                                    .read_bytes
                                    .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                            })
                            .map_err(Some)
                    }
                    _ => Err(None),
                }
            }
            T_OUT if read_only => Err(None),
            T_OUT => {
                let len = reader.available_bytes();
                match in_bounds(sector, len as u64, size) {
                    Some(off)
                        if len > 0
                            && (len as u64).is_multiple_of(SECTOR)
                            && len <= MAX_TRANSFER =>
                    {
                        let buf = bounce.get(len);
                        reader
                            .read_exact(buf)
                            .and_then(|_| file.write_all_at(buf, off))
                            .map(|_| {
                                counters
                                    .written_bytes
                                    .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                            })
                            .map_err(Some)
                    }
                    _ => Err(None),
                }
            }
            T_FLUSH => file.sync_data().map_err(Some),
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_BYTES);
                writer.write_all(&serial[..n]).map_err(Some)
            }
            T_DISCARD | T_WRITE_ZEROES if read_only => Err(None),
            T_DISCARD | T_WRITE_ZEROES => {
                let mut result = Ok(());
                // We advertise one segment per request (max_discard_seg = 1).
                if reader.available_bytes() != 16 {
                    result = Err(None);
                }
                while result.is_ok() && reader.available_bytes() >= 16 {
                    let mut seg = [0u8; 16];
                    if reader.read_exact(&mut seg).is_err() {
                        result = Err(None);
                        break;
                    }
                    let s = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                    let n = u64::from(u32::from_le_bytes(
                        seg[8..12].try_into().unwrap_or_default(),
                    ));
                    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                    let Some(off) = in_bounds(s, n * SECTOR, size).filter(|_| n > 0) else {
                        result = Err(None);
                        break;
                    };
                    let mode = if kind == T_DISCARD || flags & WRITE_ZEROES_UNMAP != 0 {
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                    } else {
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                    };
                    if let Err(e) = punch(file, mode, off, n * SECTOR) {
                        result = Err(Some(e));
                    }
                }
                result
            }
            _ => {
                Counters::inc(&counters.refused);
                let _ = status_w.write_all(&[S_UNSUPP]);
                return (writer.bytes_written() + status_w.bytes_written()) as u32;
            }
        };
        match r {
            Ok(()) => {
                Counters::inc(&counters.requests);
                S_OK
            }
            Err(None) => {
                Counters::inc(&counters.refused);
                S_IOERR
            }
            Err(Some(e)) => {
                tracing::warn!("virtio-blk: I/O error: {e}");
                Counters::inc(&counters.io_errors);
                S_IOERR
            }
        }
    };
    let _ = status_w.write_all(&[status]);
    (writer.bytes_written() + status_w.bytes_written()) as u32
}

impl Drop for Block {
    fn drop(&mut self) {
        // The kernel must not write into guest memory after the device (and the VM) is gone.
        if let (Some(u), Some(active)) = (self.uring.as_mut(), self.active.as_ref()) {
            u.drain(&active.mem);
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn kind(&self) -> &'static str {
        "block"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked: u64,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 || !queues[0].ready() {
            return Err(ActivateError::BadQueue(0));
        }
        self.active = Some(Active {
            mem,
            queue: queues.remove(0),
        });
        // Requests the driver queued before DRIVER_OK.
        self.process_queue();
        Ok(())
    }
    fn reset(&mut self) {
        // The kernel must be done with the driver's buffers before the driver reuses them.
        if let (Some(u), Some(active)) = (self.uring.as_mut(), self.active.as_ref()) {
            u.drain(&active.mem);
        }
        self.active = None;
    }
    fn base(&self) -> &DeviceBase {
        &self.base
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if !events.event_set().contains(EventSet::IN) {
            return;
        }
        if events.fd() == self.base.queue_evts[0].as_raw_fd() {
            let _ = self.base.queue_evts[0].read();
            self.process_queue();
        } else {
            self.complete();
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.base.queue_evts[0], EventSet::IN)) {
            tracing::error!("virtio-blk: cannot watch the queue eventfd: {e:?}");
        }
        if let Some(u) = &self.uring {
            if let Err(e) = ops.add(Events::new(u.eventfd(), EventSet::IN)) {
                tracing::error!("virtio-blk: cannot watch the io_uring eventfd: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::memory::test_memory;
    use crate::virtio::ring::{Desc, DriverRing, F_NEXT};
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    const RING: u64 = 0x10000;
    const HDR: u64 = 0x20000;
    const DATA: u64 = 0x30000;
    const STATUS: u64 = 0x40000;

    struct Rig {
        mem: GuestMemoryMmap,
        dev: Block,
        path: PathBuf,
    }

    fn rig(sectors: u64, read_only: bool) -> Rig {
        rig_with(sectors, read_only, false)
    }

    fn rig_with(sectors: u64, read_only: bool, direct: bool) -> Rig {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "bexar-blk-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = File::create(&path).unwrap();
        f.set_len(sectors * SECTOR).unwrap();
        let cfg = DiskConfig {
            path: path.clone(),
            read_only,
            serial: Some("disk-serial-1".into()),
            direct,
        };
        let dev = Block::new(&cfg, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
        Rig {
            mem: test_memory(4),
            dev,
            path,
        }
    }

    impl Rig {
        fn header(&self, kind: u32, sector: u64) {
            self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        }
        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }
    }

    /// Makes a chain available and runs the device until it has answered.
    fn submit(r: &mut Rig, ring: &mut DriverRing<'_>, first: u16, bufs: &[(u64, u32, bool)]) {
        ring.push_chain(first, bufs);
        r.dev.process_queue();
        r.dev.settle();
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            std::fs::remove_file(&self.path).ok();
        }
    }

    fn counter(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn write_then_read_back_through_the_ring() {
        let mut r = rig(64, false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        r.header(T_OUT, 5);
        let mem = r.mem.clone();
        let mut ring = DriverRing::new(&mem, RING, 16);
        r.dev.activate(mem.clone(), 0, vec![ring.queue()]).unwrap();
        submit(
            &mut r,
            &mut ring,
            0,
            &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), S_OK);
        assert_eq!(ring.used_idx(), 1);
        assert_eq!(ring.used_entry(0), (0, 1));
        // The bytes are in the file at sector 5.
        let mut on_disk = vec![0u8; 1024];
        r.dev.file.read_exact_at(&mut on_disk, 5 * SECTOR).unwrap();
        assert_eq!(on_disk, pattern);
        // Read them back into a clean buffer.
        r.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        r.header(T_IN, 5);
        submit(
            &mut r,
            &mut ring,
            3,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), S_OK);
        assert_eq!(ring.used_entry(1), (3, 1025));
        let mut back = vec![0u8; 1024];
        r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(counter(&r.dev.base.counters.requests), 2);
    }

    #[test]
    fn direct_io_round_trip() {
        let mut r = rig_with(64, false, true);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
        r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        let mem = r.mem.clone();
        let mut ring = DriverRing::new(&mem, RING, 16);
        r.dev.activate(mem.clone(), 0, vec![ring.queue()]).unwrap();
        r.header(T_OUT, 8);
        submit(
            &mut r,
            &mut ring,
            0,
            &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), S_OK);
        r.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
        r.header(T_IN, 8);
        submit(
            &mut r,
            &mut ring,
            3,
            &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), S_OK);
        let mut back = vec![0u8; 4096];
        r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn canonical_requests_take_the_io_uring_path_when_the_host_has_it() {
        let mut r = rig(64, false);
        let Some(_) = r.dev.uring.as_ref() else {
            // io_uring disabled on this host (e.g. kernel.io_uring_disabled): the synchronous
            // path is what the other tests cover.
            eprintln!("io_uring unavailable here; only the synchronous path is tested");
            return;
        };
        let mem = r.mem.clone();
        let mut ring = DriverRing::new(&mem, RING, 16);
        r.dev.activate(mem.clone(), 0, vec![ring.queue()]).unwrap();
        r.header(T_IN, 2);
        ring.push_chain(
            0,
            &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        );
        r.dev.process_queue();
        assert_eq!(
            r.dev.uring.as_ref().unwrap().in_flight(),
            1,
            "not submitted to io_uring"
        );
        assert_eq!(ring.used_idx(), 0, "returned before completion");
        r.dev.settle();
        assert_eq!(r.status(), S_OK);
        assert_eq!(ring.used_entry(0), (0, 4097));
        assert_eq!(counter(&r.dev.base.counters.read_bytes), 4096);
    }

    #[test]
    fn bounce_windows_are_aligned() {
        let mut b = Bounce::default();
        for len in [512, 4096, 65536, 1000] {
            assert_eq!(b.get(len).as_ptr() as usize % BOUNCE_ALIGN, 0);
            assert_eq!(b.get(len).len(), len);
        }
    }

    #[test]
    fn flush_get_id_discard_and_unknown_types() {
        let mut r = rig(64, false);
        let mem = r.mem.clone();
        let mut ring = DriverRing::new(&mem, RING, 16);
        r.dev.activate(mem.clone(), 0, vec![ring.queue()]).unwrap();
        r.header(T_FLUSH, 0);
        submit(&mut r, &mut ring, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(r.status(), S_OK);

        r.header(T_GET_ID, 0);
        submit(
            &mut r,
            &mut ring,
            2,
            &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), S_OK);
        let mut id = [0u8; 13];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"disk-serial-1");

        // Fill sectors 8..16 with ones, then discard them: they read back as zeros.
        r.dev.file.write_all_at(&[1u8; 4096], 8 * SECTOR).unwrap();
        r.header(T_DISCARD, 0);
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        submit(
            &mut r,
            &mut ring,
            5,
            &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), S_OK);
        let mut back = [0xaau8; 4096];
        r.dev.file.read_exact_at(&mut back, 8 * SECTOR).unwrap();
        assert!(back.iter().all(|b| *b == 0));

        r.header(99, 0);
        submit(&mut r, &mut ring, 8, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(r.status(), S_UNSUPP);
        assert_eq!(counter(&r.dev.base.counters.refused), 1);
    }

    #[test]
    fn hostile_requests_are_refused_and_counted() {
        let mut r = rig(16, false);
        let mem = r.mem.clone();
        let mut ring = DriverRing::new(&mem, RING, 16);
        r.dev.activate(mem.clone(), 0, vec![ring.queue()]).unwrap();

        // Beyond the end of the disk.
        r.header(T_IN, 15);
        submit(
            &mut r,
            &mut ring,
            0,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), S_IOERR);

        // Not a whole number of sectors.
        r.header(T_OUT, 0);
        submit(
            &mut r,
            &mut ring,
            3,
            &[(HDR, 16, false), (DATA, 100, false), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), S_IOERR);

        // A data buffer outside guest memory.
        r.header(T_IN, 0);
        submit(
            &mut r,
            &mut ring,
            6,
            &[
                (HDR, 16, false),
                (0xffff_0000_0000, 512, true),
                (STATUS, 1, true),
            ],
        );
        // Refused, and the valid status descriptor says so.
        assert_eq!(ring.used_entry(2).1, 1);
        assert_eq!(r.status(), S_IOERR);

        // A descriptor that loops onto itself: the walk is bounded.
        ring.set_desc(
            9,
            Desc {
                addr: HDR,
                len: 16,
                flags: F_NEXT,
                next: 9,
            },
        );
        ring.publish(9);
        r.dev.process_queue();
        r.dev.settle();

        // No writable byte for the status.
        r.header(T_FLUSH, 0);
        submit(&mut r, &mut ring, 10, &[(HDR, 16, false)]);

        // A head index outside the ring: refused as a request, and the used ring cannot name
        // it, so the device fails the ring.
        ring.publish(200);
        r.dev.process_queue();
        r.dev.settle();
        assert_eq!(counter(&r.dev.base.counters.refused), 6);
        assert!(
            r.dev.base.interrupt.needs_reset(),
            "a bad head must fail the ring"
        );
        assert_eq!(counter(&r.dev.base.counters.needs_reset), 1);
    }

    #[test]
    fn a_runaway_available_index_needs_a_reset_and_reset_recovers() {
        let mut r = rig(16, false);
        let mem = r.mem.clone();
        let ring = DriverRing::new(&mem, RING, 16);
        r.dev.activate(mem.clone(), 0, vec![ring.queue()]).unwrap();
        ring.set_avail_idx(1000);
        r.dev.process_queue();
        r.dev.settle();
        assert!(r.dev.base.interrupt.needs_reset());
        r.dev.reset();
        r.dev.base.interrupt.reset();
        let mut ring = DriverRing::new(&mem, 0x60000, 16);
        r.dev.activate(mem.clone(), 0, vec![ring.queue()]).unwrap();
        r.header(T_FLUSH, 0);
        submit(&mut r, &mut ring, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(r.status(), S_OK);
    }

    #[test]
    fn read_only_disks_refuse_writes_and_discards() {
        let mut r = rig(16, true);
        assert_ne!(r.dev.features() & F_RO, 0);
        assert_eq!(r.dev.features() & (F_DISCARD | F_WRITE_ZEROES), 0);
        let mem = r.mem.clone();
        let mut ring = DriverRing::new(&mem, RING, 16);
        r.dev.activate(mem.clone(), 0, vec![ring.queue()]).unwrap();
        r.header(T_OUT, 0);
        submit(
            &mut r,
            &mut ring,
            0,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), S_IOERR);
        r.header(T_IN, 0);
        submit(
            &mut r,
            &mut ring,
            3,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), S_OK);
    }

    #[test]
    fn notifications_before_activation_are_counted_not_served() {
        let mut r = rig(16, false);
        r.dev.process_queue();
        r.dev.settle();
        assert_eq!(counter(&r.dev.base.counters.spurious_notifies), 1);
    }

    #[test]
    fn disk_specs_parse() {
        assert!("/tmp/b.img,direct".parse::<DiskConfig>().unwrap().direct);
        let d: DiskConfig = "/tmp/a.img,ro,serial=abc".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.read_only);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert!("".parse::<DiskConfig>().is_err());
        assert!("/a,rx".parse::<DiskConfig>().is_err());
        assert!("/a,serial=123456789012345678901"
            .parse::<DiskConfig>()
            .is_err());
    }

    #[test]
    fn bounds() {
        assert_eq!(in_bounds(0, 512, 1024), Some(0));
        assert_eq!(in_bounds(1, 512, 1024), Some(512));
        assert_eq!(in_bounds(2, 512, 1024), None);
        assert_eq!(in_bounds(u64::MAX, 512, 1024), None);
        assert_eq!(in_bounds(1, u64::MAX, 1024), None);
    }

    #[test]
    fn config_layout() {
        let c = build_config(2048);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(c.len(), 60);
        let mut b = [0u8; 8];
        read_config_bytes(&c, 0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 2048);
        let mut tail = [0xffu8; 8];
        read_config_bytes(&c, 58, &mut tail);
        assert_eq!(tail, [0; 8]);
    }
}
