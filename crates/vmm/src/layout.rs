//! Guest physical address map shared by the boot code, the devices and the firmware contract.
//!
//! ```text
//! 0x0000_0500  GDT used for the 64-bit and PVH entries
//! 0x0000_0520  empty IDT
//! 0x0000_6000  PVH hvm_start_info, followed by its memory map
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_8ff0  initial stack pointer
//! 0x0000_9000  PML4, then PDPT at 0xa000, then four PDs (0xb000..0xf000): identity map of 4 GiB
//! 0x0001_0000  left free for the guest (the test guest's AP trampoline lives here)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  MP table (last KiB of base memory); reserved up to 1 MiB
//! 0x000f_0000  SMBIOS 3.0 entry point, its table 32 bytes on (the BIOS area a guest scans)
//! 0x0010_0000  high memory: kernels load here or above
//! 0xc000_0000  MMIO gap up to 4 GiB: virtio-mmio slots from 0xd000_0000 (4 KiB each),
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! ```

/// GDT for the boot entries.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT loaded at entry (the guest installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map, right after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux `boot_params` (the zero page).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer handed to the guest.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories (2 MiB pages) covering 4 GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept (Linux 6.x allows up to 2 KiB by default on x86; we allow more
/// for kernels built with a larger COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Where the MP table goes (the last KiB of conventional memory, the EBDA).
pub const MPTABLE_START: u64 = 0x9fc00;
/// SMBIOS entry point (the start of the area guests scan for it).
pub const SMBIOS_START: u64 = 0xf_0000;
/// End of that area.
pub const SMBIOS_END: u64 = 0x10_0000;
/// Start of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// First virtio-mmio slot; slot `i` is at `VIRTIO_MMIO_BASE + i * 0x1000` on GSI `VIRTIO_GSI_BASE + i`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSI of the first virtio-mmio slot (0-4 are the PIT, keyboard, cascade, COM2 and COM1).
pub const VIRTIO_GSI_BASE: u32 = 5;
/// Number of virtio-mmio slots: GSIs 5 to 23 on the IOAPIC.
pub const VIRTIO_SLOTS: u32 = 19;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Address KVM uses for the TSS on Intel (three pages, inside the MMIO gap).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
