//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs, its
//! IOAPIC and how ISA interrupts are wired.

use bexar_devices::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_ADDR, IOAPIC_ADDR, MPTABLE_START};

use super::BootError;

/// Most vCPUs the table (and so the VM) supports: what fits in the last KiB of base memory.
pub const MAX_VCPUS: u8 = 32;

// 16 + 44 + 20 * 32 + 8 + 8 + 24 * 8 + 2 * 8 = 924 bytes: fits below 0xa0000 from 0x9fc00.

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// CPU signature reported per processor entry (family 6); Linux reads CPUID instead.
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags per processor entry: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the floating pointer and configuration table for `vcpus` CPUs, to live at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, BootError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(BootError::TooManyVcpus(vcpus));
    }
    let ioapic_id = vcpus + 1;
    let config_addr = base + 16;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // Every IOAPIC pin: ISA IRQs 0-15 and the virtio-mmio lines above them.
    for irq in 0..24u8 {
        let kind = if irq == 0 {
            INT_TYPE_EXTINT
        } else {
            INT_TYPE_INT
        };
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Every local APIC: LINT0 is ExtINT (the PIC), LINT1 is NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(MPC_SPEC_REV);
    header.push(0); // checksum, patched below
    header.extend_from_slice(b"BEXAR   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0);
    let mut config = header;
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(config_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(MPC_SPEC_REV);
    fp.push(0); // checksum, patched below
    fp.extend_from_slice(&[0u8; 5]); // feature bytes: the configuration table is present
    fp[10] = checksum(&fp);

    let mut table = fp;
    table.extend_from_slice(&config);
    if base + table.len() as u64 > 0xa0000 {
        return Err(BootError::TooManyVcpus(vcpus));
    }
    Ok(table)
}

/// Writes the MP table for `vcpus` CPUs at its fixed place.
pub fn setup(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), BootError> {
    let table = build(vcpus, MPTABLE_START)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(|_| BootError::LowMemory(MPTABLE_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, 4, MAX_VCPUS] {
            let t = build(n, MPTABLE_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let cfg = &t[16..];
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "config table checksum");
            let entries = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(entries as usize, n as usize + 1 + 1 + 24 + 2);
            // The first processor is the BSP with APIC id 0, the last has id n-1.
            assert_eq!(cfg[44 + 1], 0);
            assert_eq!(cfg[44 + 3], CPU_ENABLED | CPU_BSP);
            let last = 44 + 20 * (n as usize - 1);
            assert_eq!(cfg[last + 1], n - 1);
        }
    }

    #[test]
    fn refuses_zero_and_too_many() {
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(MAX_VCPUS + 1, MPTABLE_START).is_err());
    }
}
