//! The driver's side of a split virtqueue, for unit tests and fuzz targets that hand a device
//! real descriptor chains (well-formed or hostile) without a guest: a thin layer over
//! virtio-queue's own driver model (`mock::MockSplitQueue`) that adds what the tests use most
//! (a chain from a list of buffers, a raw available index, the used ring's entries).

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::{MockSplitQueue, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Descriptor flag: the chain continues at `next`.
pub const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

/// A split queue laid out by virtio-queue's mock driver from a base address.
pub struct DriverRing<'a> {
    q: MockSplitQueue<'a, GuestMemoryMmap>,
    /// The used ring, laid out here: virtio-queue 0.18's mock puts its own `size` bytes after
    /// the available ring's entries begin (it counts entries, not bytes), on top of available
    /// entries 8 and up, so a driver with more than 8 requests outstanding saw its ring
    /// overwritten by the device's answers.
    used: UsedRing<'a, GuestMemoryMmap>,
    used_addr: GuestAddress,
    mem: &'a GuestMemoryMmap,
    size: u16,
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
    /// A ring of `size` entries with its tables from `base` (descriptor table, available ring,
    /// used ring, back to back: under 8 KiB for 256 entries).
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let q = MockSplitQueue::create(mem, GuestAddress(base), size);
        // flags, idx, `size` entries, used_event; the used ring is 4-aligned.
        let avail_len = 4 + 2 * u64::from(size) + 2;
        let used_addr = q
            .avail_addr()
            .unchecked_add(avail_len)
            .unchecked_align_up(4);
        let used = UsedRing::new(mem, used_addr, size);
        Self {
            q,
            used,
            used_addr,
            mem,
            size,
            next_avail: 0,
        }
    }

    /// Sets a device's queue up the way a driver would through the transport.
    pub fn configure(&self, q: &mut Queue) {
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        q.set_size(self.size);
        let (lo, hi) = split(self.q.desc_table_addr());
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.q.avail_addr());
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used_addr);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
    }

    /// Where the available ring starts.
    pub fn avail_addr(&self) -> GuestAddress {
        self.q.avail_addr()
    }

    /// Where the descriptor table starts.
    pub fn desc_table_addr(&self) -> GuestAddress {
        self.q.desc_table_addr()
    }

    /// Writes descriptor `index`.
    pub fn set_desc(&self, index: u16, d: Desc) {
        let raw = RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, d.flags, d.next));
        self.q
            .desc_table()
            .store(index, raw)
            .expect("descriptor index inside the table");
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
        let slot = usize::from(self.next_avail % self.size);
        self.q
            .avail()
            .ring()
            .ref_at(slot)
            .expect("slot inside the ring")
            .store(head.to_le());
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(self.next_avail);
    }

    /// Writes the available index directly (hostile drivers do this).
    pub fn set_avail_idx(&self, idx: u16) {
        self.q.avail().idx().store(idx.to_le());
    }

    /// The used ring's flags (`VRING_USED_F_NO_NOTIFY`: the device asks not to be kicked).
    pub fn used_flags(&self) -> u16 {
        use vm_memory::Bytes;
        u16::from_le(self.mem.read_obj(self.used_addr).unwrap_or(u16::MAX))
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.used.idx().load())
    }

    /// Used ring entry `i`: (descriptor head, bytes written).
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let e = self
            .used
            .ring()
            .ref_at(usize::from(i % self.size))
            .expect("slot inside the ring")
            .load();
        (e.id(), e.len())
    }
}
