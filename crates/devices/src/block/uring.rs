//! The io_uring fast path: reads and writes go straight between the image file and guest memory
//! (readv/writev on iovecs pointing into the guest's pages), flushes are fdatasync operations,
//! and completions are signalled on an eventfd the virtio event loop watches.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Submission queue entries (one per virtio-blk queue slot is enough).
const ENTRIES: u32 = 256;

/// One request in flight.
struct Pending {
    head: u16,
    status: GuestAddress,
    /// Bytes the operation must transfer to count as a success (0 for a flush).
    expect: usize,
    /// Bytes reported to the driver as written into its buffers on success.
    used_len: u32,
    /// Whether the guest reads (the device wrote into guest memory).
    read: bool,
    /// Kept alive until the kernel is done with them.
    _iovecs: Vec<libc::iovec>,
}

/// A finished request.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    /// Descriptor head to return.
    pub head: u16,
    /// Length for the used ring.
    pub used_len: u32,
    /// Whether the operation succeeded.
    pub ok: bool,
    /// Data bytes moved.
    pub bytes: usize,
    /// Whether it was a read.
    pub read: bool,
}

/// An io_uring instance for one disk.
pub struct Uring {
    ring: IoUring,
    evt: EventFd,
    pending: HashMap<u64, Pending>,
    next: u64,
}

// SAFETY: the iovecs in `pending` point into guest memory, which is shared, lives as long as the
// VM, and is only touched by the kernel while an operation is in flight; nothing here is
// thread-affine.
unsafe impl Send for Uring {}

impl Uring {
    /// Creates a ring whose completions signal an eventfd; fails where io_uring is unavailable.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(ENTRIES)?;
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        Ok(Self {
            ring,
            evt,
            pending: HashMap::new(),
            next: 0,
        })
    }

    /// The completion eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn push(&mut self, entry: io_uring::squeue::Entry, p: Pending) -> io::Result<()> {
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        let entry = entry.user_data(id);
        // Recorded first so the iovecs the entry points at are in place when the kernel reads
        // them, and removed again if the entry never reaches the queue.
        self.pending.insert(id, p);
        // SAFETY: the entry's buffers (iovec array, guest pages) stay valid until its
        // completion is reaped: the iovecs live in `pending[id]`, guest memory lives with the VM
        // (Block drains the ring before it goes away).
        let mut pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed && self.ring.submit().is_ok() {
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        }
        if !pushed {
            self.pending.remove(&id);
            return Err(io::Error::other("io_uring submission queue full"));
        }
        Ok(())
    }
    /// Queues a read (guest reads the disk) or write of `segments` (host addresses and lengths
    /// inside guest memory) at byte `offset`.
    #[allow(clippy::too_many_arguments)]
    pub fn rw(
        &mut self,
        fd: RawFd,
        read: bool,
        offset: u64,
        segments: Vec<libc::iovec>,
        head: u16,
        status: GuestAddress,
    ) -> io::Result<()> {
        let expect: usize = segments.iter().map(|s| s.iov_len).sum();
        let n = segments.len() as u32;
        let ptr = segments.as_ptr();
        let entry = if read {
            opcode::Readv::new(types::Fd(fd), ptr, n)
                .offset(offset)
                .build()
        } else {
            opcode::Writev::new(types::Fd(fd), ptr, n)
                .offset(offset)
                .build()
        };
        let used_len = if read { expect as u32 + 1 } else { 1 };
        self.push(
            entry,
            Pending {
                head,
                status,
                expect,
                used_len,
                read,
                _iovecs: segments,
            },
        )
    }

    /// Queues an fdatasync.
    pub fn flush(&mut self, fd: RawFd, head: u16, status: GuestAddress) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.push(
            entry,
            Pending {
                head,
                status,
                expect: 0,
                used_len: 1,
                read: false,
                _iovecs: Vec::new(),
            },
        )
    }

    /// Hands queued entries to the kernel.
    pub fn submit(&mut self) -> io::Result<usize> {
        self.ring.submit()
    }

    /// Collects finished requests, writing each one's status byte into guest memory.
    pub fn reap(&mut self, mem: &GuestMemoryMmap) -> Vec<Done> {
        let _ = self.evt.read();
        let mut done = Vec::new();
        let results: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (id, res) in results {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            let ok = res >= 0 && res as usize == p.expect;
            let status: u8 = if ok { 0 } else { 1 };
            let _ = mem.write_obj(status, p.status);
            done.push(Done {
                head: p.head,
                used_len: if ok { p.used_len } else { 1 },
                ok,
                bytes: if ok { p.expect } else { 0 },
                read: p.read,
            });
        }
        done
    }

    /// Drops finished requests without touching guest memory (the device was reset).
    pub fn discard(&mut self) {
        let _ = self.evt.read();
        let ids: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
        for id in ids {
            self.pending.remove(&id);
        }
    }

    /// Blocks until at least one request completes (tests, reset).
    pub fn wait(&mut self) -> io::Result<()> {
        self.ring.submit_and_wait(1).map(|_| ())
    }

    /// Waits for every request in flight (device reset: the kernel must stop touching guest
    /// memory before the driver reuses it).
    pub fn drain(&mut self, mem: &GuestMemoryMmap) {
        while !self.pending.is_empty() {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap(mem);
        }
    }
}
