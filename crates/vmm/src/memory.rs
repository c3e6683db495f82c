//! Guest memory: one memfd, mapped `MAP_SHARED`, so that another process (a migration helper, a
//! snapshotter) can later map the same pages. RAM that would overlap the 32-bit MMIO gap is moved
//! above 4 GiB.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is unusable.
    #[error("memory size {0} MiB is out of range (minimum 2 MiB)")]
    BadSize(u64),
    /// memfd_create failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    /// Growing the memfd failed.
    #[error("cannot size the guest memory file to {size} bytes: {err}")]
    Truncate {
        /// Requested size.
        size: u64,
        /// Underlying error.
        err: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(vm_memory::mmap::MmapRegionError),
    /// The regions could not form a guest memory.
    #[error("cannot assemble guest memory regions: {0}")]
    Regions(String),
}

/// Guest RAM ranges (guest address, size in bytes) for `size` bytes of RAM, skipping the MMIO gap.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Guest memory and the memfd behind it.
pub struct GuestRam {
    /// The mapped guest memory.
    pub mem: GuestMemoryMmap,
    /// The memfd holding every byte of guest RAM, in guest-address order with the gap removed.
    pub file: File,
    /// Total RAM in bytes.
    pub size: u64,
}

/// Creates `size_mib` MiB of guest RAM backed by a fresh memfd.
pub fn create_guest_memory(size_mib: u64) -> Result<GuestRam, MemoryError> {
    if !(2..=(1 << 24)).contains(&size_mib) {
        return Err(MemoryError::BadSize(size_mib));
    }
    let size = size_mib << 20;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the returned descriptor, if
    // valid, is owned by nobody else, so handing it to File is sound.
    let file = unsafe {
        let fd = libc::memfd_create(c"bexar-guest-ram".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        File::from_raw_fd(fd)
    };
    file.set_len(size)
        .map_err(|err| MemoryError::Truncate { size, err })?;

    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (base, len) in ram_ranges(size) {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(clone, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::Mmap)?;
        // SAFETY: advising a mapping we own over its exact extent. DONTFORK keeps guest RAM out
        // of any child of the VMM (see teardown.rs), so a child never pins or copies it.
        if unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_DONTFORK) }
            != 0
        {
            tracing::debug!("MADV_DONTFORK: {}", std::io::Error::last_os_error());
        }
        let region = GuestRegionMmap::new(mapping, base)
            .ok_or_else(|| MemoryError::Regions(format!("region at {:#x} overflows", base.0)))?;
        regions.push(region);
        offset += len;
    }
    let mem =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))?;
    Ok(GuestRam { mem, file, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn memory_is_shared_through_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = create_guest_memory(4).unwrap();
        ram.mem
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.mem.num_regions(), 1);
    }

    #[test]
    fn rejects_zero_size() {
        assert!(matches!(
            create_guest_memory(0),
            Err(MemoryError::BadSize(0))
        ));
    }
}
