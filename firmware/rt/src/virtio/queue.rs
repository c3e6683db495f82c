//! Split virtqueue (virtio 1.2 §2.7) driven by polling.
//!
//! The descriptor table, the available ring and the used ring come from
//! [`crate::dma`] (desc aligned 16, avail 2, used 4). The free list and the
//! length of each chain in flight are kept in driver memory (shadow arrays),
//! never read back from the shared table, so a misbehaving device cannot
//! corrupt the driver's bookkeeping: used-ring ids are checked against it.
use super::mmio::{reg, Transport};
use super::{Error, Result};
use crate::arch::{mb, rdtsc};
use crate::dma;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
pub const USED_F_NO_NOTIFY: u16 = 1;
/// Largest queue this driver sets up (shadow arrays are this long).
pub const MAX_QUEUE_SIZE: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One buffer of a chain: guest-physical address, length, and whether the
/// device writes it (`device_writes`, VIRTQ_DESC_F_WRITE) or reads it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn out<T: ?Sized>(p: *const T, len: usize) -> Buf {
        Buf { addr: p as *const u8 as u64, len: len as u32, device_writes: false }
    }
    /// A buffer the device writes.
    pub fn inp<T: ?Sized>(p: *mut T, len: usize) -> Buf {
        Buf { addr: p as *mut u8 as u64, len: len as u32, device_writes: true }
    }
}

/// One used-ring entry: the chain's head and the bytes the device wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u16,
    pub len: u32,
}

pub struct VirtQueue {
    index: u16,
    size: u16,
    notify_base: usize,
    desc: *mut Desc,
    /// flags, idx, ring[size], used_event
    avail: *mut u16,
    /// flags u16, idx u16, ring[size] of (id u32, len u32), avail_event
    used: *mut u8,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
    next: [u16; MAX_QUEUE_SIZE],
    /// Descriptors in the chain headed here (0 = not a head in flight).
    chain_len: [u16; MAX_QUEUE_SIZE],
    /// Bytes the device may write into the chain headed here.
    chain_wlen: [u32; MAX_QUEUE_SIZE],
}

/// Bytes of the rings of a queue of `size` entries: (desc, avail, used).
pub fn ring_sizes(size: usize) -> (usize, usize, usize) {
    (16 * size, 6 + 2 * size, 6 + 8 * size)
}

impl VirtQueue {
    /// Set up queue `index` of `t` with min(QueueNumMax, `max_size`, 256)
    /// entries rounded down to a power of two. The device must be between
    /// FEATURES_OK and DRIVER_OK.
    pub fn new(t: &Transport, index: u16, max_size: u16) -> Result<VirtQueue> {
        t.write(reg::QUEUE_SEL, index as u32);
        if t.read(reg::QUEUE_READY) != 0 {
            return Err(Error::QueueInUse);
        }
        let num_max = t.read(reg::QUEUE_NUM_MAX);
        if num_max == 0 {
            return Err(Error::QueueUnavailable);
        }
        let want = (num_max as usize).min(max_size.max(1) as usize).min(MAX_QUEUE_SIZE);
        let size = 1usize << (usize::BITS - 1 - want.leading_zeros());
        let (dl, al, ul) = ring_sizes(size);
        let desc = dma::alloc(dl, 4096).ok_or(Error::NoMemory)? as *mut Desc;
        let avail = dma::alloc(al, 64).ok_or(Error::NoMemory)? as *mut u16;
        let used = dma::alloc(ul, 64).ok_or(Error::NoMemory)?;
        let mut q = VirtQueue {
            index,
            size: size as u16,
            notify_base: t.base,
            desc,
            avail,
            used,
            free_head: 0,
            num_free: size as u16,
            avail_idx: 0,
            last_used: 0,
            next: [0; MAX_QUEUE_SIZE],
            chain_len: [0; MAX_QUEUE_SIZE],
            chain_wlen: [0; MAX_QUEUE_SIZE],
        };
        for i in 0..size {
            q.next[i] = ((i + 1) % size) as u16;
        }
        // We poll: ask the device not to interrupt.
        unsafe { write_volatile(avail, AVAIL_F_NO_INTERRUPT) };
        t.write(reg::QUEUE_NUM, size as u32);
        let (d, a, u) = (desc as u64, avail as u64, used as u64);
        t.write(reg::QUEUE_DESC_LOW, d as u32);
        t.write(reg::QUEUE_DESC_HIGH, (d >> 32) as u32);
        t.write(reg::QUEUE_DRIVER_LOW, a as u32);
        t.write(reg::QUEUE_DRIVER_HIGH, (a >> 32) as u32);
        t.write(reg::QUEUE_DEVICE_LOW, u as u32);
        t.write(reg::QUEUE_DEVICE_HIGH, (u >> 32) as u32);
        mb();
        t.write(reg::QUEUE_READY, 1);
        if t.read(reg::QUEUE_READY) != 1 {
            return Err(Error::QueueNotReady);
        }
        Ok(q)
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// The head index the next [`VirtQueue::add`] will use (per-request
    /// driver data can be indexed by it).
    pub fn next_head(&self) -> u16 {
        self.free_head
    }

    /// Chains handed to the device and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Addresses of (descriptor table, avail ring, used ring).
    pub fn ring_addrs(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    /// Put a chain of `bufs` on the available ring (without notifying).
    /// Returns the head descriptor index.
    pub fn add(&mut self, bufs: &[Buf]) -> Result<u16> {
        if bufs.is_empty() {
            return Err(Error::BadArgument);
        }
        if bufs.len() > self.num_free as usize {
            return Err(Error::QueueFull);
        }
        let head = self.free_head;
        let mut i = head;
        let mut wlen = 0u32;
        for (k, b) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            if b.device_writes {
                wlen = wlen.saturating_add(b.len);
            }
            let next = self.next[i as usize];
            self.write_desc(i, Desc { addr: b.addr, len: b.len, flags, next: if last { 0 } else { next } });
            if !last {
                i = next;
            } else {
                self.free_head = next;
            }
        }
        self.num_free -= bufs.len() as u16;
        self.chain_len[head as usize] = bufs.len() as u16;
        self.chain_wlen[head as usize] = wlen;
        self.publish(head);
        Ok(head)
    }

    /// Write descriptor `i` of the shared table (no bookkeeping; for tests
    /// that build chains by hand, together with [`VirtQueue::publish`]).
    pub fn write_desc(&mut self, i: u16, d: Desc) {
        assert!(i < self.size);
        unsafe { write_volatile(self.desc.add(i as usize), d) };
    }

    /// Append `head` to the available ring and bump avail.idx (no notify).
    /// Used by [`VirtQueue::add`]; on its own it lets a test publish any
    /// value (even an out-of-range head): such chains are not tracked.
    pub fn publish(&mut self, head: u16) {
        let slot = (self.avail_idx % self.size) as usize;
        unsafe { write_volatile(self.avail.add(2 + slot), head) };
        compiler_fence(Ordering::Release); // x86: stores are not reordered
        self.avail_idx = self.avail_idx.wrapping_add(1);
        unsafe { write_volatile(self.avail.add(1), self.avail_idx) };
    }

    /// Ask the device for used-buffer interrupts on this queue (clear
    /// `VIRTQ_AVAIL_F_NO_INTERRUPT`), or to stop sending them (set it, the
    /// default). Without EVENT_IDX the flag is the only suppression there is.
    pub fn set_interrupts(&mut self, on: bool) {
        unsafe { write_volatile(self.avail, if on { 0 } else { AVAIL_F_NO_INTERRUPT }) };
        mb();
    }

    /// Ring the doorbell (QueueNotify = queue index) after a full barrier.
    pub fn kick(&self) {
        mb();
        unsafe { write_volatile((self.notify_base + reg::QUEUE_NOTIFY) as *mut u32, self.index as u32) };
    }

    /// Kicks unless the device said it needs none (VIRTQ_USED_F_NO_NOTIFY: it is watching
    /// the ring), as Linux's `virtqueue_kick_prepare` decides without EVENT_IDX. The barrier
    /// orders the available index before the flag's read; the device clears the flag before
    /// it reads the index a last time, so one of the two sees the other.
    pub fn kick_if_wanted(&self) {
        mb();
        if self.device_wants_notify() {
            self.kick();
        }
    }

    /// The device's used.idx.
    pub fn used_idx(&self) -> u16 {
        unsafe { read_volatile(self.used.add(2) as *const u16) }
    }

    /// Does the device accept notifications (VIRTQ_USED_F_NO_NOTIFY clear)?
    /// A hint only: the device may set the flag while it is busy.
    pub fn device_wants_notify(&self) -> bool {
        let flags = unsafe { read_volatile(self.used as *const u16) };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// The driver's count of used entries consumed so far.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Read used-ring entry number `pos` (free-running index) without
    /// consuming it or touching the bookkeeping (for tests).
    pub fn used_entry(&self, pos: u16) -> Used {
        let slot = (pos % self.size) as usize;
        let e = unsafe { self.used.add(4 + 8 * slot) };
        let id = unsafe { read_volatile(e as *const u32) };
        let len = unsafe { read_volatile(e.add(4) as *const u32) };
        Used { id: id as u16, len }
    }

    /// Is a used entry waiting?
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Take the next used entry, if any, and free its chain. Ids that are
    /// not heads in flight and lengths larger than the chain's writable
    /// bytes are errors (the entry is consumed).
    pub fn pop_used(&mut self) -> Result<Option<Used>> {
        if self.used_idx() == self.last_used {
            return Ok(None);
        }
        compiler_fence(Ordering::Acquire); // x86: loads are not reordered
        let slot = (self.last_used % self.size) as usize;
        let e = unsafe { self.used.add(4 + 8 * slot) };
        let id = unsafe { read_volatile(e as *const u32) };
        let len = unsafe { read_volatile(e.add(4) as *const u32) };
        self.last_used = self.last_used.wrapping_add(1);
        if id >= self.size as u32 || self.chain_len[id as usize] == 0 {
            return Err(Error::BadUsedId(id));
        }
        let id = id as u16;
        let n = self.chain_len[id as usize];
        let wlen = self.chain_wlen[id as usize];
        // Return the chain to the free list using the shadow links.
        let mut tail = id;
        for _ in 1..n {
            tail = self.next[tail as usize];
        }
        self.next[tail as usize] = self.free_head;
        self.free_head = id;
        self.num_free += n;
        self.chain_len[id as usize] = 0;
        if len > wlen {
            return Err(Error::BadUsedLen(len));
        }
        Ok(Some(Used { id, len }))
    }

    /// Poll the used ring until an entry arrives or `timeout_cycles` TSC
    /// cycles pass. On a timeout, a set DEVICE_NEEDS_RESET is reported as
    /// [`Error::NeedsReset`], else [`Error::Timeout`]. Status is also checked
    /// every ~64 K polls so a device that gave up is noticed early.
    pub fn wait_used(&mut self, t: &Transport, timeout_cycles: u64) -> Result<Used> {
        let t0 = rdtsc();
        let mut spins = 0u32;
        loop {
            if let Some(u) = self.pop_used()? {
                return Ok(u);
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(65536) && t.needs_reset() {
                return Err(Error::NeedsReset);
            }
            if rdtsc().wrapping_sub(t0) > timeout_cycles {
                return Err(if t.needs_reset() { Error::NeedsReset } else { Error::Timeout });
            }
            core::hint::spin_loop();
        }
    }
}
