//! Raw image files: every byte of the disk at the same offset in the file.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use io_uring::register::Restriction;
use io_uring::{opcode, types, IoUring};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    check, BlockError, BlockOp, BlockRequest, Completion, DiskBackend, DiskInfo, SyncDisk,
};
use crate::memory::{mark_dirty, GuestMemoryMmap};

/// Alignment of the bounce buffer: what O_DIRECT needs on any device we expect.
const BOUNCE_ALIGN: usize = 4096;
/// io_uring submission queue entries: one per virtio-blk queue slot is enough.
const RING_ENTRIES: u32 = 256;

/// Deallocates or zeroes a range of the file.
fn punch(file: &File, op: BlockOp, off: u64, len: u64) -> io::Result<()> {
    let mode = match op {
        BlockOp::Discard | BlockOp::WriteZeroes { unmap: true } => {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        }
        _ => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
    };
    // SAFETY: fallocate on a file descriptor we own with plain integer arguments.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A bounce buffer whose usable window starts on a 4 KiB boundary (O_DIRECT needs aligned
/// memory); over-allocating keeps this free of `unsafe`. Also what a disk copy reads a raw
/// image through (it shares the device's open file, O_DIRECT included).
#[derive(Default)]
pub struct Bounce(Vec<u8>);

impl Bounce {
    /// An aligned window of `len` bytes (contents unspecified).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if self.0.len() < len + BOUNCE_ALIGN {
            self.0.resize(len + BOUNCE_ALIGN, 0);
        }
        let off = self.0.as_ptr().align_offset(BOUNCE_ALIGN);
        &mut self.0[off..off + len]
    }
}

/// A raw image served synchronously: each request runs when it is submitted, through a
/// bounce buffer.
pub struct RawFile {
    file: File,
    info: DiskInfo,
    bounce: Bounce,
}

impl RawFile {
    /// A disk on `file`.
    pub fn new(file: File, info: DiskInfo) -> Self {
        Self {
            file,
            info,
            bounce: Bounce::default(),
        }
    }
}

impl SyncDisk for RawFile {
    fn engine(&self) -> &'static str {
        "sync"
    }
    fn copy_source(&self) -> Option<io::Result<super::copy::CopySource>> {
        Some(self.file.try_clone().map(super::copy::CopySource::Raw))
    }
    fn info(&self) -> DiskInfo {
        self.info
    }
    fn run(&mut self, mem: &GuestMemoryMmap, req: &BlockRequest) -> io::Result<u64> {
        match req.op {
            BlockOp::Read => {
                let buf = self.bounce.get(req.len as usize);
                self.file.read_exact_at(buf, req.offset)?;
                let mut at = 0;
                for (addr, len) in &req.segments {
                    let n = *len as usize;
                    mem.write_slice(&buf[at..at + n], *addr)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    at += n;
                }
                Ok(req.len)
            }
            BlockOp::Write => {
                let buf = self.bounce.get(req.len as usize);
                let mut at = 0;
                for (addr, len) in &req.segments {
                    let n = *len as usize;
                    mem.read_slice(&mut buf[at..at + n], *addr)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    at += n;
                }
                self.file.write_all_at(buf, req.offset)?;
                Ok(req.len)
            }
            BlockOp::Flush => self.file.sync_data().map(|_| 0),
            op => punch(&self.file, op, req.offset, req.len).map(|_| 0),
        }
    }
}

/// One request in the kernel's hands.
struct InFlight {
    /// Bytes the operation must move to count as a success (0 for a flush).
    expect: u64,
    /// The iovec array the entry points at: kept alive until the completion is reaped.
    _iovecs: Vec<libc::iovec>,
    /// The guest buffers a read fills. The kernel writes them behind vm-memory's back, so
    /// they are marked dirty here when it is done (none for writes and flushes).
    fills: Vec<(GuestAddress, u32)>,
}

/// A raw image served by io_uring: reads and writes go straight between the file and the
/// guest's pages, flushes are fdatasync, and completions are signalled on an eventfd.
/// Discard and write-zeroes (fallocate) run at submit time.
pub struct RawUring {
    file: File,
    info: DiskInfo,
    ring: IoUring,
    evt: EventFd,
    in_flight: HashMap<u64, InFlight>,
    /// Finished without the kernel's ring (fallocate, refused iovecs).
    done: Vec<Completion>,
    /// The guest memory reads fill, if it logs dirty pages (decided at the first read): only
    /// then is there anything to mark.
    dirty_log: Option<Option<GuestMemoryMmap>>,
    /// Whether the file takes RWF_NOWAIT for reads, and for writes (each cleared the first
    /// time the file refuses the flag for it: ext4 on Linux 6.18 takes it for buffered reads
    /// and refuses it with EOPNOTSUPP for buffered writes, and one refusal must not cost the
    /// reads their fast path).
    nowait: [bool; 2],
}

// SAFETY: the iovecs in `in_flight` point into guest memory, which is shared, lives as long as
// the VM, and is only touched by the kernel while an operation is in flight; nothing here is
// thread-affine.
unsafe impl Send for RawUring {}

impl RawUring {
    /// A backend on `file`; fails where io_uring is unavailable.
    pub fn new(file: File, info: DiskInfo) -> io::Result<Self> {
        // Made disabled, so it can be restricted before its first use: a VMM whose jail has
        // taken `openat` and most sockets away must not get them back through its ring
        // (io_uring's own operations are not seen by seccomp). Only the three operations this
        // backend submits are allowed, no SQE flags, and no registration once enabled.
        let ring = IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?;
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let sub = ring.submitter();
        sub.register_eventfd(evt.as_raw_fd())?;
        sub.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
        ])?;
        sub.register_enable_rings()?;
        Ok(Self {
            file,
            info,
            ring,
            evt,
            in_flight: HashMap::new(),
            done: Vec::new(),
            dirty_log: None,
            nowait: [true; 2],
        })
    }

    /// Tries a read or write at once, without waiting: data already in (or room in) the page
    /// cache is copied on this thread, which is cheaper than a trip through the ring and a
    /// wake-up of the event loop (the common case for a guest's hot data). Returns false when
    /// the kernel would have to wait (or moved only part): the ring then does the whole
    /// request.
    fn try_now(&mut self, iovecs: &[libc::iovec], req: &BlockRequest) -> bool {
        let kind = usize::from(req.op != BlockOp::Read);
        if !self.nowait[kind] {
            return false;
        }
        let fd = self.file.as_raw_fd();
        let n = iovecs.len() as libc::c_int;
        let off = req.offset as libc::off_t;
        // SAFETY: the iovecs point into guest memory checked by `iovecs` (each lies in one
        // region, which lives with the VM); the kernel reads or fills them during the call only.
        let r = unsafe {
            if req.op == BlockOp::Read {
                libc::preadv2(fd, iovecs.as_ptr(), n, off, libc::RWF_NOWAIT)
            } else {
                libc::pwritev2(fd, iovecs.as_ptr(), n, off, libc::RWF_NOWAIT)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) {
                // EOPNOTSUPP and the like: this file does not do it; stop trying.
                self.nowait[kind] = false;
            }
            return false;
        }
        r as u64 == req.len
    }

    fn push(&mut self, entry: io_uring::squeue::Entry, user_data: u64, f: InFlight) -> bool {
        let entry = entry.user_data(user_data);
        // Recorded first so the iovecs the entry points at are in place when the kernel reads
        // them, and removed again if the entry never reaches the queue.
        self.in_flight.insert(user_data, f);
        // SAFETY: the entry's buffers (iovec array, guest pages) stay valid until its
        // completion is reaped: the iovecs live in `in_flight`, guest memory lives with the VM
        // (the device drains the backend before the memory goes away).
        let mut pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed && self.ring.submit().is_ok() {
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        }
        if !pushed {
            self.in_flight.remove(&user_data);
        }
        pushed
    }

    /// The host addresses of a request's guest buffers (on the stack up to four: a request
    /// the page cache serves at once needs no allocation).
    fn iovecs(
        mem: &GuestMemoryMmap,
        req: &BlockRequest,
    ) -> Result<smallvec::SmallVec<[libc::iovec; 4]>, BlockError> {
        req.segments
            .iter()
            .map(|(addr, len)| {
                let slice = mem
                    .get_slice(*addr, *len as usize)
                    .map_err(|_| BlockError::BadBuffer(addr.0))?;
                Ok(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: *len as usize,
                })
            })
            .collect()
    }
}

impl DiskBackend for RawUring {
    fn engine(&self) -> &'static str {
        "io_uring"
    }
    fn copy_source(&self) -> Option<io::Result<super::copy::CopySource>> {
        Some(self.file.try_clone().map(super::copy::CopySource::Raw))
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
        let fd = types::Fd(self.file.as_raw_fd());
        let (entry, f) = match req.op {
            BlockOp::Read | BlockOp::Write => {
                // Every buffer must lie in one region of guest memory (get_slice checks).
                let iovecs = Self::iovecs(mem, &req)?;
                if req.op == BlockOp::Read {
                    self.dirty_log
                        .get_or_insert_with(|| crate::memory::logs_dirty(mem).then(|| mem.clone()));
                }
                if self.try_now(&iovecs, &req) {
                    if let (BlockOp::Read, Some(Some(log))) = (req.op, &self.dirty_log) {
                        for (addr, len) in &req.segments {
                            mark_dirty(log, *addr, *len as usize);
                        }
                    }
                    self.done.push(Completion {
                        user_data,
                        result: Ok(req.len),
                    });
                    return Ok(());
                }
                // On the heap from here: the kernel reads the array when it takes the entry,
                // after `InFlight` (which keeps it) has moved into the map.
                let iovecs = iovecs.into_vec();
                let (ptr, n) = (iovecs.as_ptr(), iovecs.len() as u32);
                let (entry, fills) = if req.op == BlockOp::Read {
                    let e = opcode::Readv::new(fd, ptr, n).offset(req.offset).build();
                    (e, req.segments)
                } else {
                    let e = opcode::Writev::new(fd, ptr, n).offset(req.offset).build();
                    (e, Vec::new())
                };
                (
                    entry,
                    InFlight {
                        expect: req.len,
                        _iovecs: iovecs,
                        fills,
                    },
                )
            }
            BlockOp::Flush => (
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                InFlight {
                    expect: 0,
                    _iovecs: Vec::new(),
                    fills: Vec::new(),
                },
            ),
            op => {
                let result = punch(&self.file, op, req.offset, req.len).map(|_| 0);
                self.done.push(Completion { user_data, result });
                return Ok(());
            }
        };
        if self.push(entry, user_data, f) {
            Ok(())
        } else {
            Err(BlockError::Busy)
        }
    }

    fn kick(&mut self) -> io::Result<()> {
        self.ring.submit().map(|_| ())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.evt.read();
        out.append(&mut self.done);
        let Self {
            ring,
            in_flight,
            dirty_log,
            ..
        } = self;
        for c in ring.completion() {
            let (user_data, res) = (c.user_data(), c.result());
            let Some(f) = in_flight.remove(&user_data) else {
                continue;
            };
            // The kernel has written (some of) the pages: mark them even if it failed midway.
            if let Some(mem) = dirty_log
                .as_ref()
                .and_then(Option::as_ref)
                .filter(|_| res > 0)
            {
                for (addr, len) in &f.fills {
                    mark_dirty(mem, *addr, *len as usize);
                }
            }
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if res as u64 != f.expect {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{res} of {} bytes", f.expect),
                ))
            } else {
                Ok(res as u64)
            };
            out.push(Completion { user_data, result });
        }
    }

    fn notifier(&self) -> &EventFd {
        &self.evt
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len() + self.done.len()
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        self.reap(out);
        while !self.in_flight.is_empty() {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("io_uring wait failed with requests in flight: {e}");
                    break;
                }
            }
            self.reap(out);
        }
    }
}

impl Drop for RawUring {
    fn drop(&mut self) {
        // The kernel must not write into guest memory after the backend (and the VM) is gone.
        let mut out = Vec::new();
        self.drain(&mut out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{open_disk, DiskConfig};
    use vm_memory::GuestAddress;

    fn image(name: &str, len: u64) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("bexar-raw-{}-{name}", std::process::id()));
        File::create(&p).unwrap().set_len(len).unwrap();
        p
    }

    /// Every backend the host offers: the factory's choice and the synchronous one.
    fn backends(path: &std::path::Path) -> Vec<Box<dyn DiskBackend>> {
        let cfg = DiskConfig {
            path: path.to_owned(),
            ..Default::default()
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let info = open_disk(&cfg).unwrap().info();
        vec![
            open_disk(&cfg).unwrap(),
            Box::new(crate::block::Immediate::wrap(RawFile::new(file, info)).unwrap()),
        ]
    }

    fn wait(b: &mut dyn DiskBackend) -> Vec<Completion> {
        let mut out = Vec::new();
        b.kick().unwrap();
        b.drain(&mut out);
        out
    }

    #[test]
    fn scattered_writes_read_back_and_land_in_the_file() {
        let path = image("rw", 64 << 10);
        let mem = crate::memory::test_memory(1);
        for mut b in backends(&path) {
            let pattern: Vec<u8> = (0..3072u32).map(|i| (i * 7 + 3) as u8).collect();
            mem.write_slice(&pattern[..1024], GuestAddress(0x1000))
                .unwrap();
            mem.write_slice(&pattern[1024..], GuestAddress(0x8000))
                .unwrap();
            let write = BlockRequest {
                op: BlockOp::Write,
                offset: 4096,
                len: 3072,
                segments: vec![(GuestAddress(0x1000), 1024), (GuestAddress(0x8000), 2048)],
            };
            b.submit(&mem, write, 7).unwrap();
            let done = wait(b.as_mut());
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].user_data, 7);
            assert_eq!(done[0].result.as_ref().unwrap(), &3072);
            let mut on_disk = vec![0u8; 3072];
            File::open(&path)
                .unwrap()
                .read_exact_at(&mut on_disk, 4096)
                .unwrap();
            assert_eq!(on_disk, pattern);

            let read = BlockRequest {
                op: BlockOp::Read,
                offset: 4096,
                len: 3072,
                segments: vec![(GuestAddress(0x20000), 3072)],
            };
            b.submit(&mem, read, 8).unwrap();
            assert!(wait(b.as_mut())[0].result.is_ok());
            let mut back = vec![0u8; 3072];
            mem.read_slice(&mut back, GuestAddress(0x20000)).unwrap();
            assert_eq!(back, pattern);
            assert_eq!(b.in_flight(), 0);
        }
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn a_file_that_refuses_nowait_writes_keeps_nowait_reads() {
        let path = image("nowait", 64 << 10);
        let mem = crate::memory::test_memory(1);
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let info = DiskInfo {
            capacity: 64 << 10,
            read_only: false,
            discard: true,
            write_zeroes: true,
        };
        let mut b = RawUring::new(file, info).unwrap();
        let req = |op| BlockRequest {
            op,
            offset: 0,
            len: 4096,
            segments: vec![(GuestAddress(0x1000), 4096)],
        };
        for op in [BlockOp::Write, BlockOp::Read, BlockOp::Read] {
            b.submit(&mem, req(op), 1).unwrap();
            assert!(wait(&mut b)[0].result.is_ok());
        }
        // Whatever the file system says about writes (ext4 refuses RWF_NOWAIT for buffered
        // writes), a cached read is done on the spot.
        assert!(b.nowait[0], "reads lost RWF_NOWAIT after a write");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn discard_zeroes_flush_and_refusals() {
        let path = image("discard", 64 << 10);
        let mem = crate::memory::test_memory(1);
        for mut b in backends(&path) {
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .write_all_at(&[1u8; 8192], 0)
                .unwrap();
            let range = |op, offset, len| BlockRequest {
                op,
                offset,
                len,
                segments: vec![],
            };
            b.submit(&mem, range(BlockOp::Discard, 0, 4096), 1).unwrap();
            b.submit(
                &mem,
                range(BlockOp::WriteZeroes { unmap: false }, 4096, 4096),
                2,
            )
            .unwrap();
            b.submit(&mem, range(BlockOp::Flush, 0, 0), 3).unwrap();
            let mut done = wait(b.as_mut());
            done.sort_by_key(|c| c.user_data);
            assert_eq!(
                done.iter().map(|c| c.user_data).collect::<Vec<_>>(),
                [1, 2, 3]
            );
            assert!(done.iter().all(|c| c.result.is_ok()));
            let mut back = [0xaau8; 8192];
            File::open(&path)
                .unwrap()
                .read_exact_at(&mut back, 0)
                .unwrap();
            assert!(back.iter().all(|x| *x == 0));
            // Past the end, and a buffer outside guest memory: refused before any I/O.
            assert!(matches!(
                b.submit(&mem, range(BlockOp::Discard, 60 << 10, 8192), 4),
                Err(BlockError::OutOfRange { .. })
            ));
            let bad = BlockRequest {
                op: BlockOp::Read,
                offset: 0,
                len: 512,
                segments: vec![(GuestAddress(0xffff_0000_0000), 512)],
            };
            match b.submit(&mem, bad, 5) {
                Err(BlockError::BadBuffer(_)) => {}
                Ok(()) => assert!(wait(b.as_mut())[0].result.is_err()),
                Err(e) => panic!("{e}"),
            }
        }
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn bounce_windows_are_aligned() {
        let mut b = Bounce::default();
        for len in [512, 4096, 65536, 1000] {
            assert_eq!(b.get(len).as_ptr() as usize % BOUNCE_ALIGN, 0);
            assert_eq!(b.get(len).len(), len);
        }
    }
}
