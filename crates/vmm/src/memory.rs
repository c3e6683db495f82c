//! Guest memory: one memfd, mapped `MAP_SHARED`, so that another process (a migration helper, a
//! snapshotter) can later map the same pages. RAM that would overlap the 32-bit MMIO gap is moved
//! above 4 GiB. For snapshots, [`save_ram`] writes it out as a sparse memory file and
//! [`map_ram_file`] maps such a file back `MAP_PRIVATE`, read lazily as the guest touches it.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress};

pub use bexar_devices::memory::{GuestMemoryMmap, GuestRegionMmap};

use super::config::MAX_MEMORY_MIB;
use super::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is unusable.
    #[error("memory size {0} MiB is out of range (1-{MAX_MEMORY_MIB} MiB)")]
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
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    Register(kvm_ioctls::Error),
    /// A region has no host mapping.
    #[error("guest region at {0:#x} has no host mapping")]
    Unmapped(u64),
    /// A memory file cannot be read.
    #[error("cannot read the memory file: {0}")]
    File(std::io::Error),
    /// A memory file is not the size of the VM's memory.
    #[error("the memory file has {len} bytes; the VM's memory is {size}")]
    FileSize {
        /// The file's length.
        len: u64,
        /// The memory's size.
        size: u64,
    },
}

impl MemoryError {
    /// Whether the caller asked for something impossible (rather than the host running out).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Self::BadSize(_))
    }
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
    if size_mib == 0 || size_mib > MAX_MEMORY_MIB {
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
    let mem = map_ram(&file, size, libc::MAP_SHARED)?;
    Ok(GuestRam { mem, file, size })
}

/// Maps `size` bytes of guest RAM from `file` (guest-address order, the MMIO gap removed) with
/// `flags` (`MAP_SHARED` for the VM's own memfd, `MAP_PRIVATE` for a snapshot's memory file).
fn map_ram(file: &File, size: u64, flags: libc::c_int) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (base, len) in ram_ranges(size) {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(clone, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags | libc::MAP_NORESERVE)
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
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))
}

/// Copies guest RAM into `out` as a sparse file of the same size: only the ranges of the memfd
/// that hold pages (`SEEK_DATA`; pages the guest never touched are holes in it) are written, so
/// the file takes the space of the pages the guest touched, and reading a hole gives the zeros
/// the guest would have read. The VM must be paused. Returns the bytes written.
pub fn save_ram(ram: &GuestRam, out: &File) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    out.set_len(ram.size)?;
    let fd = ram.file.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let (mut pos, mut written) = (0u64, 0u64);
    while pos < ram.size {
        // SAFETY: lseek on a descriptor `ram` owns; it moves only that descriptor's offset,
        // which nothing else uses (guest RAM is read through the mapping, and below by
        // positioned reads).
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut at, end) = (data as u64, (hole as u64).min(ram.size));
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            ram.file.read_exact_at(&mut buf[..n], at)?;
            out.write_all_at(&buf[..n], at)?;
            at += n as u64;
            written += n as u64;
        }
        pos = end;
    }
    out.sync_data()?;
    Ok(written)
}

/// Guest RAM for a restore: `file` (a memory file [`save_ram`] wrote, of exactly `size_mib`
/// MiB) mapped `MAP_PRIVATE`, so nothing is read until the guest touches a page, and the
/// guest's writes stay in this process (the file is never changed and can be restored again).
pub fn map_ram_file(file: File, size_mib: u64) -> Result<GuestRam, MemoryError> {
    if size_mib == 0 || size_mib > MAX_MEMORY_MIB {
        return Err(MemoryError::BadSize(size_mib));
    }
    let size = size_mib << 20;
    let len = file.metadata().map_err(MemoryError::File)?.len();
    if len != size {
        return Err(MemoryError::FileSize { len, size });
    }
    let mem = map_ram(&file, size, libc::MAP_PRIVATE)?;
    Ok(GuestRam { mem, file, size })
}

/// Registers every region of `ram` with `vm` as a KVM memory slot.
pub fn register(vm: &kvm_ioctls::VmFd, ram: &GuestRam) -> Result<(), MemoryError> {
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    for (slot, region) in ram.mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Unmapped(region.start_addr().raw_value()))?;
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `ram`, which
        // outlives the VM's use of it (the process exits or the VM is dropped first).
        unsafe { vm.set_user_memory_region(r) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

/// Memory of this process in KiB, split into the guest's part and the VMM's own.
#[derive(Debug, Clone, Copy)]
pub struct MemoryUse {
    /// Resident set minus guest RAM (includes shared library and binary pages).
    pub vmm_rss: u64,
    /// Anonymous memory (heap, stacks, device state): what one more VM costs the host, since
    /// binary and library pages are shared by every VMM process.
    pub vmm_private: u64,
    /// Resident guest RAM.
    pub guest: u64,
}

/// Reads this process's memory use. Guest RAM is a memfd, so it is exactly the shared-memory
/// (RssShmem) part of the resident set.
pub fn memory_use() -> Option<MemoryUse> {
    use bexar_util::procfs::kib_field;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss = kib_field(&status, "VmRSS:")?;
    let guest = kib_field(&status, "RssShmem:")?;
    Some(MemoryUse {
        vmm_rss: rss.saturating_sub(guest),
        vmm_private: kib_field(&status, "RssAnon:")?,
        guest,
    })
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

    /// Pages the guest touched travel, pages it never touched stay holes, and a restored
    /// memory reads the same and writes privately.
    #[test]
    fn ram_saves_sparse_and_maps_back_privately() {
        use std::os::unix::fs::MetadataExt;
        let ram = create_guest_memory(8).unwrap();
        ram.mem
            .write_obj(0x1234_5678_u32, GuestAddress(0x1000))
            .unwrap();
        ram.mem
            .write_slice(&[0xab; 8192], GuestAddress(0x30_0000))
            .unwrap();
        let path = std::env::temp_dir().join(format!("bexar-ram-{}.mem", std::process::id()));
        let out = File::create(&path).unwrap();
        let written = save_ram(&ram, &out).unwrap();
        assert_eq!(written, 3 * 4096, "only the three touched pages");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 8 << 20);
        assert!(
            meta.blocks() * 512 <= 64 << 10,
            "{} bytes allocated",
            meta.blocks() * 512
        );

        let restored = map_ram_file(File::open(&path).unwrap(), 8).unwrap();
        assert_eq!(
            restored.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1234_5678
        );
        let mut page = [0u8; 8192];
        restored
            .mem
            .read_slice(&mut page, GuestAddress(0x30_0000))
            .unwrap();
        assert!(page.iter().all(|&b| b == 0xab));
        assert_eq!(
            restored
                .mem
                .read_obj::<u64>(GuestAddress(0x50_0000))
                .unwrap(),
            0
        );
        // The restored guest's writes stay in the process: the file is unchanged.
        restored.mem.write_obj(0u32, GuestAddress(0x1000)).unwrap();
        let again = map_ram_file(File::open(&path).unwrap(), 8).unwrap();
        assert_eq!(
            again.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1234_5678
        );
        // A file of another size is refused.
        assert!(matches!(
            map_ram_file(File::open(&path).unwrap(), 16),
            Err(MemoryError::FileSize { .. })
        ));
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn rejects_zero_size() {
        assert!(matches!(
            create_guest_memory(0),
            Err(MemoryError::BadSize(0))
        ));
    }
}
