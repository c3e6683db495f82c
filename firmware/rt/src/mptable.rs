//! Reader for the Intel MultiProcessor Specification 1.4 tables.
use crate::boot::MAX_CPUS;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MpCpu {
    pub apic_id: u8,
    pub apic_version: u8,
    pub enabled: bool,
    pub bsp: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MpIoApic {
    pub id: u8,
    pub version: u8,
    pub enabled: bool,
    pub addr: u32,
}

#[derive(Clone, Debug)]
pub struct MpTable {
    /// Physical address of the "_MP_" floating pointer structure.
    pub fp_addr: usize,
    /// Physical address of the "PCMP" configuration table.
    pub config_addr: usize,
    pub spec_rev: u8,
    pub lapic_addr: u32,
    /// Processor entries, in table order (at most MAX_CPUS kept).
    pub cpus: [MpCpu; MAX_CPUS],
    pub ncpus: usize,
    /// Processor entries beyond MAX_CPUS (not kept).
    pub cpus_dropped: usize,
    pub ioapics: [MpIoApic; 8],
    pub nioapics: usize,
    pub nbuses: usize,
    pub nirqs: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpError {
    /// No "_MP_" floating pointer in the EBDA, the last KiB of base memory or the BIOS ROM.
    NotFound,
    FloatingChecksum,
    /// The floating pointer asks for one of the default configurations (no table).
    DefaultConfig(u8),
    BadConfigSignature,
    ConfigChecksum,
    BadEntry(u8),
}

impl core::fmt::Display for MpError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            MpError::NotFound => write!(f, "no MP floating pointer found"),
            MpError::FloatingChecksum => write!(f, "MP floating pointer checksum mismatch"),
            MpError::DefaultConfig(t) => write!(f, "MP default configuration {} (no table)", t),
            MpError::BadConfigSignature => write!(f, "MP configuration table signature is not PCMP"),
            MpError::ConfigChecksum => write!(f, "MP configuration table checksum mismatch"),
            MpError::BadEntry(t) => write!(f, "unknown MP table entry type {}", t),
        }
    }
}

fn rd8(a: usize) -> u8 {
    unsafe { (a as *const u8).read_volatile() }
}
fn rd16(a: usize) -> u16 {
    u16::from_le_bytes([rd8(a), rd8(a + 1)])
}
fn rd32(a: usize) -> u32 {
    u32::from_le_bytes([rd8(a), rd8(a + 1), rd8(a + 2), rd8(a + 3)])
}
fn checksum(a: usize, len: usize) -> u8 {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd8(a + i)))
}

fn scan(start: usize, len: usize) -> Option<usize> {
    let mut a = start & !15;
    while a + 16 <= start + len {
        if rd8(a) == b'_' && rd8(a + 1) == b'M' && rd8(a + 2) == b'P' && rd8(a + 3) == b'_' {
            return Some(a);
        }
        a += 16;
    }
    None
}

/// Find the floating pointer: first KiB of the EBDA, last KiB of base
/// memory (0x9fc00), then the BIOS ROM 0xf0000-0xfffff.
pub fn find_floating() -> Option<usize> {
    let ebda = (rd16(0x40e) as usize) << 4;
    if (0x80000..0xa0000).contains(&ebda) {
        if let Some(a) = scan(ebda, 1024) {
            return Some(a);
        }
    }
    scan(0x9fc00, 1024).or_else(|| scan(0xf0000, 0x10000))
}

impl MpTable {
    pub fn find() -> Result<MpTable, MpError> {
        let fp = find_floating().ok_or(MpError::NotFound)?;
        Self::parse(fp)
    }

    /// Parse the tables from the floating pointer at `fp`.
    pub fn parse(fp: usize) -> Result<MpTable, MpError> {
        let fp_len = (rd8(fp + 8) as usize).max(1) * 16;
        if checksum(fp, fp_len) != 0 {
            return Err(MpError::FloatingChecksum);
        }
        let feature1 = rd8(fp + 11);
        if feature1 != 0 {
            return Err(MpError::DefaultConfig(feature1));
        }
        let cfg = rd32(fp + 4) as usize;
        if cfg == 0 {
            return Err(MpError::DefaultConfig(0));
        }
        if rd32(cfg) != u32::from_le_bytes(*b"PCMP") {
            return Err(MpError::BadConfigSignature);
        }
        let base_len = rd16(cfg + 4) as usize;
        if checksum(cfg, base_len) != 0 {
            return Err(MpError::ConfigChecksum);
        }
        let mut t = MpTable {
            fp_addr: fp,
            config_addr: cfg,
            spec_rev: rd8(cfg + 6),
            lapic_addr: rd32(cfg + 36),
            cpus: [MpCpu::default(); MAX_CPUS],
            ncpus: 0,
            cpus_dropped: 0,
            ioapics: [MpIoApic::default(); 8],
            nioapics: 0,
            nbuses: 0,
            nirqs: 0,
        };
        let count = rd16(cfg + 34) as usize;
        let end = cfg + base_len;
        let mut p = cfg + 44;
        for _ in 0..count {
            if p >= end {
                break;
            }
            let ty = rd8(p);
            match ty {
                0 => {
                    let flags = rd8(p + 3);
                    let cpu = MpCpu {
                        apic_id: rd8(p + 1),
                        apic_version: rd8(p + 2),
                        enabled: flags & 1 != 0,
                        bsp: flags & 2 != 0,
                    };
                    if t.ncpus < MAX_CPUS {
                        t.cpus[t.ncpus] = cpu;
                        t.ncpus += 1;
                    } else {
                        t.cpus_dropped += 1;
                    }
                    p += 20;
                }
                1 => {
                    t.nbuses += 1;
                    p += 8;
                }
                2 => {
                    if t.nioapics < t.ioapics.len() {
                        t.ioapics[t.nioapics] = MpIoApic {
                            id: rd8(p + 1),
                            version: rd8(p + 2),
                            enabled: rd8(p + 3) & 1 != 0,
                            addr: rd32(p + 4),
                        };
                        t.nioapics += 1;
                    }
                    p += 8;
                }
                3 | 4 => {
                    t.nirqs += 1;
                    p += 8;
                }
                other => return Err(MpError::BadEntry(other)),
            }
        }
        Ok(t)
    }

    pub fn cpus(&self) -> &[MpCpu] {
        &self.cpus[..self.ncpus]
    }

    pub fn enabled_cpus(&self) -> impl Iterator<Item = &MpCpu> {
        self.cpus().iter().filter(|c| c.enabled)
    }

    pub fn bsp(&self) -> Option<&MpCpu> {
        self.cpus().iter().find(|c| c.bsp)
    }

    pub fn ioapics(&self) -> &[MpIoApic] {
        &self.ioapics[..self.nioapics]
    }
}
