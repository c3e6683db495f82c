//! Guest memory as every layer sees it: one type, whose regions can carry a dirty bitmap.
//!
//! Writes through vm-memory (`write_slice`, virtio-queue's `Writer`, ...) mark the pages they
//! touch in the bitmap when a region has one; writes that bypass it (io_uring reading a disk
//! straight into guest pages) call [`mark_dirty`] when they complete. The VMM makes every region
//! with one (the dirty-page log of a live migration reads and clears them); regions without one
//! (`None`, the device tests' memory) cost nothing.

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The bitmap a guest memory region may carry.
pub type DirtyBitmap = Option<AtomicBitmap>;
/// Guest memory.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;
/// One region of guest memory.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;

/// Whether any region of `mem` logs dirty pages (has a bitmap).
pub fn logs_dirty(mem: &GuestMemoryMmap) -> bool {
    mem.iter().any(|r| r.bitmap().is_some())
}

/// Marks `[addr, addr + len)` written, in whichever regions it spans.
pub fn mark_dirty(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) {
    let mut addr = addr;
    let mut left = len;
    while left > 0 {
        let Some(region) = mem.find_region(addr) else {
            return;
        };
        let offset = addr.0 - region.start_addr().0;
        let n = left.min((region.len() - offset) as usize);
        region.bitmap().mark_dirty(offset as usize, n);
        left -= n;
        addr = GuestAddress(addr.0 + n as u64);
    }
}

/// Anonymous guest memory of `mib` MiB at guest address 0, for unit tests and fuzz targets that
/// drive devices without a VM.
#[cfg(any(test, feature = "fuzzing"))]
pub fn test_memory(mib: u64) -> GuestMemoryMmap {
    let mapping = vm_memory::mmap::MmapRegionBuilder::new((mib << 20) as usize)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .build()
        .expect("anonymous guest memory");
    let region = GuestRegionMmap::new(mapping, GuestAddress(0)).expect("one region");
    GuestMemoryMmap::from_regions(vec![region]).expect("guest memory")
}

/// [`test_memory`] with a dirty bitmap over it (4 KiB pages).
#[cfg(any(test, feature = "fuzzing"))]
pub fn tracked_test_memory(mib: u64) -> GuestMemoryMmap {
    use vm_memory::bitmap::NewBitmap;
    let size = (mib << 20) as usize;
    let mapping = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
        size,
        Some(AtomicBitmap::with_len(size)),
    )
    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
    .build()
    .expect("anonymous guest memory");
    let region = GuestRegionMmap::new(mapping, GuestAddress(0)).expect("one region");
    GuestMemoryMmap::from_regions(vec![region]).expect("guest memory")
}

/// Whether the page at `addr` is marked written (tests).
#[cfg(any(test, feature = "fuzzing"))]
pub fn is_dirty(mem: &GuestMemoryMmap, addr: u64) -> bool {
    mem.find_region(GuestAddress(addr))
        .is_some_and(|r| r.bitmap().dirty_at((addr - r.start_addr().0) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn tracked(mib: u64) -> GuestMemoryMmap {
        tracked_test_memory(mib)
    }

    fn dirty(mem: &GuestMemoryMmap, addr: u64) -> bool {
        is_dirty(mem, addr)
    }

    #[test]
    fn writes_through_the_type_and_marked_writes_are_tracked() {
        let mem = tracked(1);
        assert!(!dirty(&mem, 0x3000));
        mem.write_obj(7u32, GuestAddress(0x3000)).unwrap();
        assert!(dirty(&mem, 0x3000), "vm-memory writes mark the page");
        assert!(!dirty(&mem, 0x5000));
        // What bypasses vm-memory (io_uring into guest pages) is marked on completion.
        mark_dirty(&mem, GuestAddress(0x5000), 0x2001);
        assert!(dirty(&mem, 0x5000) && dirty(&mem, 0x7000));
        assert!(!dirty(&mem, 0x8000));
        // Without a bitmap, nothing is tracked and nothing fails.
        let plain = test_memory(1);
        mark_dirty(&plain, GuestAddress(0x5000), 0x1000);
        mark_dirty(&plain, GuestAddress(0xffff_0000), 1);
    }
}
