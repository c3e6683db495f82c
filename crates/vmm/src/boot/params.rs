//! Boot information handed to the guest: the e820 map, the Linux zero page and the PVH start info.

use bexar_devices::memory::GuestMemoryMmap;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{
    CMDLINE_START, HIMEM_START, MPTABLE_START, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START,
};

use super::BootError;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// One memory map entry: (start, size, type).
pub type MemEntry = (u64, u64, u32);

/// The guest's memory map: conventional memory up to the MP table, the MP table and BIOS area
/// reserved, then every RAM region from 1 MiB up.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<MemEntry> {
    let mut map = vec![
        (0, MPTABLE_START, E820_RAM),
        (MPTABLE_START, HIMEM_START - MPTABLE_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.last_addr().raw_value() + 1;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Where the command line and initrd were put.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootInfo {
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    /// Initrd address and size, if any.
    pub initrd: Option<(u64, u64)>,
}

/// Writes the Linux zero page. `header` is the bzImage's own setup header, if any.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    info: BootInfo,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = memory_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyMemoryRegions);
    }
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::Params(e.to_string()))
}

/// Writes the PVH start info, its memory map and the initrd module entry.
pub fn write_pvh_info(mem: &GuestMemoryMmap, info: BootInfo) -> Result<(), BootError> {
    let map = memory_map(mem);
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new::<hvm_start_info>(&start, GuestAddress(PVH_INFO_START));
    if let Some((addr, size)) = info.initrd {
        let modlist = PVH_MEMMAP_START
            + (entries.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        start.nr_modules = 1;
        start.modlist_paddr = modlist;
        params = BootParams::new::<hvm_start_info>(&start, GuestAddress(PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: addr,
                size,
                ..Default::default()
            }],
            GuestAddress(modlist),
        );
    }
    params.set_sections::<hvm_memmap_table_entry>(&entries, GuestAddress(PVH_MEMMAP_START));
    if PVH_MEMMAP_START + ((entries.len() + 1) * 32) as u64 > ZERO_PAGE_START {
        return Err(BootError::TooManyMemoryRegions);
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::Params(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_area() {
        let ram = create_guest_memory(64).unwrap();
        let map = memory_map(&ram.mem);
        assert_eq!(map[0], (0, MPTABLE_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn zero_page_has_cmdline_initrd_and_map() {
        let ram = create_guest_memory(16).unwrap();
        let info = BootInfo {
            cmdline_len: 12,
            initrd: Some((0x80_0000, 0x1234)),
        };
        write_zero_page(&ram.mem, None, info).unwrap();
        let p: boot_params = ram.mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.ramdisk_image }, 0x80_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(p.e820_entries, 3);
        // Offsets the firmware relies on.
        let raw: u32 = ram
            .mem
            .read_obj(GuestAddress(ZERO_PAGE_START + 0x228))
            .unwrap();
        assert_eq!(raw, CMDLINE_START as u32);
        let n: u8 = ram
            .mem
            .read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8))
            .unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn pvh_start_info_points_at_its_map() {
        let ram = create_guest_memory(16).unwrap();
        write_pvh_info(
            &ram.mem,
            BootInfo {
                cmdline_len: 3,
                initrd: Some((0x40_0000, 10)),
            },
        )
        .unwrap();
        let s: hvm_start_info = ram.mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(s.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(s.memmap_entries, 3);
        assert_eq!(s.nr_modules, 1);
        let m: hvm_modlist_entry = ram.mem.read_obj(GuestAddress(s.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x40_0000, 10));
    }
}
