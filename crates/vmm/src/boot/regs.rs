//! Entry state for the boot protocols: GDT, identity page tables, special and general registers.

use bexar_devices::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};

use super::BootError;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selector of the boot code segment (the Linux boot protocol's `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the boot TSS.
pub const BOOT_TSS: u16 = 0x20;

/// Which entry the guest is started through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol: long mode, paging on, RSI = boot_params.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

/// Builds a GDT descriptor from flags, base and limit (the layout of the x86 segment descriptor).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
        | ((limit & 0x000f_0000) << 32)
        | ((flags & 0x0000_f0ff) << 40)
}

/// Decodes a GDT descriptor into the segment KVM wants.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// The boot GDT for an entry mode: null, null, code (0x10), data (0x18), TSS (0x20).
pub fn boot_gdt(mode: EntryMode) -> [u64; 5] {
    let code = match mode {
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, present, DPL0
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),     // 32-bit code, 4 GiB flat
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data, read/write, 4 GiB flat
        gdt_entry(0x808b, 0, 0xfffff), // 32/64-bit busy TSS
    ]
}

/// Writes the identity map of the first 4 GiB (2 MiB pages, supervisor only) the 64-bit entry needs.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let mut pml4 = [0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPTE_START | 0x3).to_le_bytes());
    let mut pdpt = [0u8; 4096];
    for i in 0..4u64 {
        let pd = PDE_START + i * 0x1000;
        pdpt[(i as usize) * 8..(i as usize + 1) * 8].copy_from_slice(&(pd | 0x3).to_le_bytes());
    }
    let mut pds = vec![0u8; 4 * 4096];
    for (i, chunk) in pds.chunks_exact_mut(8).enumerate() {
        // present | writable | page size (2 MiB)
        let entry = ((i as u64) << 21) | 0x83;
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    let w = |addr: u64, data: &[u8]| {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|_| BootError::LowMemory(addr))
    };
    w(PML4_START, &pml4)?;
    w(PDPTE_START, &pdpt)?;
    w(PDE_START, &pds)
}

/// Writes the GDT and an empty IDT, and returns the special registers for `mode`.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, BootError> {
    let gdt = boot_gdt(mode);
    let mut bytes = Vec::with_capacity(gdt.len() * 8);
    for e in gdt {
        bytes.extend_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .map_err(|_| BootError::LowMemory(BOOT_GDT_START))?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| BootError::LowMemory(BOOT_IDT_START))?;

    let code = kvm_segment_from_gdt(gdt[2], BOOT_CS);
    let data = kvm_segment_from_gdt(gdt[3], BOOT_DS);
    let tss = kvm_segment_from_gdt(gdt[4], BOOT_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        EntryMode::Linux64 => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.cr3 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// General registers at entry: `params` is the boot_params (Linux64) or hvm_start_info (PVH).
pub fn boot_regs(mode: EntryMode, entry: u64, params: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => regs.rsi = params,
        EntryMode::Pvh => regs.rbx = params,
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        let seg = kvm_segment_from_gdt(code, BOOT_CS);
        assert_eq!(
            (seg.l, seg.db, seg.present, seg.s, seg.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!(seg.limit, 0xffff_ffff);
        let data = kvm_segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), BOOT_DS);
        assert_eq!((data.l, data.db, data.type_, data.g), (0, 1, 3, 1));
        let pvh = kvm_segment_from_gdt(boot_gdt(EntryMode::Pvh)[2], BOOT_CS);
        assert_eq!((pvh.l, pvh.db), (0, 1));
    }

    #[test]
    fn long_mode_sregs_and_identity_map() {
        let mem = crate::memory::create_guest_memory(1).unwrap().mem;
        let s = setup_sregs(&mem, EntryMode::Linux64, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        // The last 2 MiB page below 4 GiB maps itself.
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 4 * 4096 - 8))
            .unwrap();
        assert_eq!(last, (0xffe0_0000u64) | 0x83);
        let gdt2: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 16)).unwrap();
        assert_eq!(gdt2, boot_gdt(EntryMode::Linux64)[2]);
    }

    #[test]
    fn pvh_sregs_leave_paging_off() {
        let mem = crate::memory::create_guest_memory(1).unwrap().mem;
        let s = setup_sregs(&mem, EntryMode::Pvh, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(s.efer, 0);
        let r = boot_regs(EntryMode::Pvh, 0x100_0000, 0x6000);
        assert_eq!((r.rip, r.rbx, r.rsi), (0x100_0000, 0x6000, 0));
    }
}
