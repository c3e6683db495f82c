//! Guest memory: one memfd, mapped `MAP_SHARED`, so that another process (a migration helper, a
//! snapshotter) can later map the same pages. RAM that would overlap the 32-bit MMIO gap is moved
//! above 4 GiB. For snapshots, [`save_ram`] writes it out as a sparse memory file and
//! [`map_ram_file`] maps such a file back `MAP_PRIVATE`, read lazily as the guest touches it.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
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
    /// KVM could not hand over a slot's dirty log.
    #[error("KVM_GET_DIRTY_LOG on slot {slot} failed: {err}")]
    DirtyLog {
        /// The slot.
        slot: u32,
        /// KVM's error.
        err: kvm_ioctls::Error,
    },
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
        matches!(self, Self::BadSize(_) | Self::FileSize { .. })
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
    /// Whether `file` is mapped privately (a restored snapshot's memory file: the guest's
    /// writes are private copies the file does not have).
    pub private: bool,
}

/// Creates `size_mib` MiB of guest RAM backed by a fresh memfd.
pub fn create_guest_memory(size_mib: u64) -> Result<GuestRam, MemoryError> {
    if size_mib == 0 || size_mib > MAX_MEMORY_MIB {
        return Err(MemoryError::BadSize(size_mib));
    }
    let size = size_mib << 20;
    let file = new_memfd(size)?;
    let mem = map_ram(&file, size, libc::MAP_SHARED)?;
    Ok(GuestRam {
        mem,
        file,
        size,
        private: false,
    })
}

/// A new, empty memfd of `size` bytes (all holes), for guest RAM.
pub fn new_memfd(size: u64) -> Result<File, MemoryError> {
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
    Ok(file)
}

/// Maps `size` bytes of guest RAM from `file` (guest-address order, the MMIO gap removed) with
/// `flags` (`MAP_SHARED` for the VM's own memfd, `MAP_PRIVATE` for a snapshot's memory file).
fn map_ram(file: &File, size: u64, flags: libc::c_int) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (base, len) in ram_ranges(size) {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        // Every region carries a dirty bitmap (one bit per 4 KiB page: 32 KiB per GiB), so
        // that the VMM's own writes into guest memory (used rings, disk reads, received frames)
        // are known to a live migration, which KVM's dirty log cannot see. It costs an atomic OR
        // per page a device writes, next to the copy of the page itself.
        let mapping = MmapRegionBuilder::new_with_bitmap(
            len as usize,
            Some(AtomicBitmap::new(
                len as usize,
                std::num::NonZeroUsize::new(PAGE as usize).expect("a page is not empty"),
            )),
        )
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

/// Bytes per page: the unit the memory file is saved in.
const PAGE: u64 = 4096;

/// Copies guest RAM into `out` as a sparse file of the same size, holding only the pages the
/// guest may have written: the ranges of the backing file that hold data (`SEEK_DATA`: on the
/// VM's memfd, every page the guest touched; on a restored VM's memory file, what the earlier
/// snapshot held) and, for a restored VM, the pages it has written since ([`private_pages`]).
/// Pages are read through the mapping, so they are what the guest sees; all-zero pages are
/// left as holes.
/// The VM must be paused. The file is not synced (the caller does, once the VM runs again).
/// Returns the bytes written.
pub fn save_ram(ram: &GuestRam, out: &File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    out.set_len(ram.size)?;
    let in_file = data_pages(&ram.file, ram.size)?
        .iter()
        .filter(|&&w| w)
        .count();
    let wanted = touched_pages(ram)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let mut file_off = 0u64;
    for region in ram.mem.iter() {
        let len = region.len();
        let first = (file_off / PAGE) as usize;
        let mut page = 0u64;
        while page < len / PAGE {
            if !wanted[first + page as usize] {
                page += 1;
                continue;
            }
            // A run of wanted pages, at most one buffer long.
            let start = page;
            while page < len / PAGE
                && wanted[first + page as usize]
                && (page - start + 1) * PAGE <= buf.len() as u64
            {
                page += 1;
            }
            let n = ((page - start) * PAGE) as usize;
            region
                .read_slice(&mut buf[..n], MemoryRegionAddress(start * PAGE))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            // Runs of non-zero pages, one write each.
            let zero: Vec<bool> = buf[..n]
                .chunks(PAGE as usize)
                .map(|c| c.iter().all(|&b| b == 0))
                .collect();
            let mut i = 0;
            while i < zero.len() {
                let j = (i..zero.len())
                    .find(|&j| zero[j] != zero[i])
                    .unwrap_or(zero.len());
                if !zero[i] {
                    let (a, b) = (i * PAGE as usize, j * PAGE as usize);
                    out.write_all_at(&buf[a..b], file_off + start * PAGE + a as u64)?;
                    written += (b - a) as u64;
                }
                i = j;
            }
        }
        file_off += len;
    }
    tracing::debug!(
        "memory: {in_file} pages with data in the file, {} wanted, {} written",
        wanted.iter().filter(|&&w| w).count(),
        written / PAGE
    );
    Ok(written)
}

/// One flag per page of guest RAM (memfd order): whether it may hold anything but zeros. The
/// backing file's data ranges and, for a privately mapped (restored) VM, the pages it has
/// written since.
pub(crate) fn touched_pages(ram: &GuestRam) -> std::io::Result<Vec<bool>> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut wanted = data_pages(&ram.file, ram.size)?;
    if ram.private {
        let mut first = 0usize;
        for region in ram.mem.iter() {
            let n = (region.len() / PAGE) as usize;
            private_pages(region, &mut wanted[first..first + n])?;
            first += n;
        }
    }
    Ok(wanted)
}

/// Reads page `page` of guest RAM (memfd order) as the guest sees it, through the mapping (a
/// restored VM's own writes are not in its file).
pub(crate) fn read_page(ram: &GuestRam, page: u64, buf: &mut [u8]) -> std::io::Result<()> {
    use vm_memory::Bytes;
    let off = page * PAGE;
    let gpa = if off < MMIO_GAP_START || ram.size <= MMIO_GAP_START {
        off
    } else {
        MMIO_GAP_END + (off - MMIO_GAP_START)
    };
    ram.mem
        .read_slice(&mut buf[..PAGE as usize], GuestAddress(gpa))
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// One flag per page of `file` (`size` bytes): whether the file holds data there.
pub(crate) fn data_pages(file: &File, size: u64) -> std::io::Result<Vec<bool>> {
    let mut pages = vec![false; (size / PAGE) as usize];
    for (data, len) in bexar_util::fs::data_extents(file, size)? {
        let end = (data + len).div_ceil(PAGE).min(pages.len() as u64);
        for p in &mut pages[(data / PAGE) as usize..end as usize] {
            *p = true;
        }
    }
    Ok(pages)
}

/// Sets the flag of every page of `region` that is a private copy in this process's mapping
/// (present or swapped, and not a page of the file: `/proc/self/pagemap` bits 63, 62, 61), the
/// pages a restored guest wrote since its memory file was mapped. A page the guest only read
/// is the file's own page: data the file holds, or a hole's zeros.
fn private_pages(region: &GuestRegionMmap, pages: &mut [bool]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|e| std::io::Error::other(e.to_string()))? as u64;
    let pagemap = crate::jail::proc_self_pagemap()?;
    let mut entries = vec![0u8; 8 * 4096];
    for (chunk_no, chunk) in pages.chunks_mut(4096).enumerate() {
        let bytes = &mut entries[..chunk.len() * 8];
        let first = host / PAGE + (chunk_no * 4096) as u64;
        pagemap.read_exact_at(bytes, first * 8)?;
        for (p, e) in chunk.iter_mut().zip(bytes.chunks_exact(8)) {
            let e = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            *p |= e & (PRESENT | SWAPPED) != 0 && e & FILE == 0;
        }
    }
    Ok(())
}

/// Guest RAM for a restore: `file` (a memory file [`save_ram`] wrote, of exactly `size_mib`
/// MiB) mapped `MAP_PRIVATE`, so nothing is read until the guest touches a page, and the
/// guest's writes stay in this process (the file is never changed and can be restored again).
pub fn map_ram_file(file: File, size_mib: u64) -> Result<GuestRam, MemoryError> {
    map_existing(file, size_mib, true)
}

/// Guest RAM handed over by another VMM: its memfd of exactly `size_mib` MiB, mapped shared
/// (the same pages; nothing is copied or read).
pub fn map_ram_memfd(file: File, size_mib: u64) -> Result<GuestRam, MemoryError> {
    map_existing(file, size_mib, false)
}

/// Guest RAM from an existing file of exactly `size_mib` MiB, mapped privately or shared.
fn map_existing(file: File, size_mib: u64, private: bool) -> Result<GuestRam, MemoryError> {
    if size_mib == 0 || size_mib > MAX_MEMORY_MIB {
        return Err(MemoryError::BadSize(size_mib));
    }
    let size = size_mib << 20;
    let len = file.metadata().map_err(MemoryError::File)?.len();
    if len != size {
        return Err(MemoryError::FileSize { len, size });
    }
    let flags = if private {
        libc::MAP_PRIVATE
    } else {
        libc::MAP_SHARED
    };
    let mem = map_ram(&file, size, flags)?;
    Ok(GuestRam {
        mem,
        file,
        size,
        private,
    })
}

/// Registers every region of `ram` with `vm` as a KVM memory slot.
pub fn register(vm: &kvm_ioctls::VmFd, ram: &GuestRam) -> Result<(), MemoryError> {
    set_slots(vm, ram, 0)
}

/// Starts (or stops) KVM's log of the pages the vCPUs write, on every slot. Started, the log
/// holds every page written since; [`take_dirty`] reads and clears it.
pub fn set_dirty_logging(
    vm: &kvm_ioctls::VmFd,
    ram: &GuestRam,
    on: bool,
) -> Result<(), MemoryError> {
    set_slots(
        vm,
        ram,
        if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
    )
}

/// Pages of guest RAM, by their index in the memfd (guest-address order, the MMIO gap removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    bits: Vec<u64>,
    pages: u64,
}

impl PageSet {
    /// No page of `pages`.
    pub fn empty(pages: u64) -> Self {
        Self {
            bits: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Whether page `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages
            && self
                .bits
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Adds page `page` (ignored past the end).
    pub fn insert(&mut self, page: u64) {
        if page < self.pages {
            self.bits[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Adds every page of `other` (a set over as many pages).
    pub fn union(&mut self, other: &PageSet) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    /// How many pages are in the set.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The pages in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        set_bits(&self.bits, self.pages)
    }

    /// Adds the pages set in `words` (bit `i` = page `first + i`, for `i < len`).
    fn or_at(&mut self, first: u64, words: &[u64], len: u64) {
        for rel in set_bits(words, len) {
            self.insert(first + rel);
        }
    }
}

/// The indexes below `len` of the bits set in `words`, in order (word by word, set bits only:
/// a log of a few dirty pages among millions costs a scan of its words).
fn set_bits(words: &[u64], len: u64) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(move |(i, &w)| {
        let mut w = w;
        std::iter::from_fn(move || {
            (w != 0).then(|| {
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                i as u64 * 64 + b
            })
        })
        .take_while(move |&p| p < len)
    })
}

/// The pages of guest RAM written since the last call (or since [`set_dirty_logging`] started
/// KVM's log): the vCPUs' writes (KVM's log, which this reads and clears) together with the
/// VMM's own writes through guest memory (the regions' bitmaps, also cleared). A page written
/// while this runs is in this set or the next, never in neither.
pub fn take_dirty(vm: &kvm_ioctls::VmFd, ram: &GuestRam) -> Result<PageSet, MemoryError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut set = PageSet::empty(ram.size / PAGE);
    let mut first = 0u64;
    for (slot, region) in ram.mem.iter().enumerate() {
        let len = region.len() / PAGE;
        let kvm = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|err| MemoryError::DirtyLog {
                slot: slot as u32,
                err,
            })?;
        set.or_at(first, &kvm, len);
        // The region's whole bitmap (the trait's `bitmap()` is a view without get-and-reset).
        let mapping: &vm_memory::mmap::MmapRegion<_> = region;
        if let Some(b) = mapping.bitmap() {
            set.or_at(first, &b.get_and_reset(), len);
        }
        first += len;
    }
    Ok(set)
}

fn set_slots(vm: &kvm_ioctls::VmFd, ram: &GuestRam, flags: u32) -> Result<(), MemoryError> {
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    for (slot, region) in ram.mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Unmapped(region.start_addr().raw_value()))?;
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
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
    let status = crate::jail::proc_self_status().ok()?;
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
