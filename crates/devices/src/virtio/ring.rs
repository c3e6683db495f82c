//! The driver's side of a split virtqueue, written straight into guest memory: what the unit
//! tests and the fuzz targets use to hand a device real descriptor chains (well-formed or
//! hostile) without a guest.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Descriptor flag: the chain continues at `next`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;

/// A split queue laid out at fixed guest addresses.
pub struct DriverRing<'a> {
    mem: &'a GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
}

/// One raw descriptor.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags.
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

impl<'a> DriverRing<'a> {
    /// A ring of `size` entries with its tables at `base` (needs 16 KiB).
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        Self {
            mem,
            size,
            desc: base,
            avail: base + 0x1000 * 2,
            used: base + 0x1000 * 3,
            next_avail: 0,
        }
    }

    /// Sets a device's queue up the way a driver would through the transport.
    pub fn configure(&self, q: &mut Queue) {
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
    }

    /// Writes descriptor `index`.
    pub fn set_desc(&self, index: u16, d: Desc) {
        let a = self.desc + u64::from(index) * 16;
        let m = self.mem;
        m.write_obj(d.addr, GuestAddress(a)).unwrap();
        m.write_obj(d.len, GuestAddress(a + 8)).unwrap();
        m.write_obj(d.flags, GuestAddress(a + 12)).unwrap();
        m.write_obj(d.next, GuestAddress(a + 14)).unwrap();
    }

    /// Writes a chain into descriptors `first..` (linking them) and makes it available.
    pub fn push_chain(&mut self, first: u16, bufs: &[(u64, u32, bool)]) {
        for (i, (addr, len, write)) in bufs.iter().enumerate() {
            let idx = first + i as u16;
            let last = i + 1 == bufs.len();
            let mut flags = if *write { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            self.set_desc(
                idx,
                Desc {
                    addr: *addr,
                    len: *len,
                    flags,
                    next: idx + 1,
                },
            );
        }
        self.publish(first);
    }

    /// Puts `head` in the available ring and bumps its index.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + u64::from(self.next_avail % self.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(self.next_avail);
    }

    /// Writes the available index directly (hostile drivers do this).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring entry `i`: (descriptor head, bytes written).
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let a = self.used + 4 + u64::from(i % self.size) * 8;
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }
}
