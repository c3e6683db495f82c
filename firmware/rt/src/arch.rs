//! Small wrappers around x86 instructions usable from ring 3 with IOPL=3.
use core::arch::asm;

#[inline(always)]
pub fn outb(port: u16, val: u8) {
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn outl(port: u16, val: u32) {
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    unsafe { asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags)) }
    v
}

/// CPUID leaf/subleaf -> (eax, ebx, ecx, edx).
#[inline]
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// This CPU's initial APIC id as CPUID reports it (leaf 1 EBX[31:24]).
pub fn cpuid_apic_id() -> u32 {
    cpuid(1, 0).1 >> 24
}

/// The x2APIC id from CPUID leaf 0xB (EDX), if the leaf exists.
pub fn cpuid_x2apic_id() -> Option<u32> {
    if cpuid(0, 0).0 >= 0xb {
        let (_, ebx, _, edx) = cpuid(0xb, 0);
        if ebx != 0 {
            return Some(edx);
        }
    }
    None
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

/// Current privilege level (CS.RPL).
pub fn cpl() -> u8 {
    let cs: u16;
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) }
    (cs & 3) as u8
}

pub fn rflags() -> u64 {
    let f: u64;
    unsafe { asm!("pushfq", "pop {}", out(reg) f, options(nomem, preserves_flags)) }
    f
}

/// RFLAGS.IOPL.
pub fn iopl() -> u8 {
    ((rflags() >> 12) & 3) as u8
}

/// Where [`tsc_hz_info`] got the TSC frequency from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscSource {
    /// CPUID leaf 0x15 (crystal clock and TSC/crystal ratio).
    Cpuid15,
    /// The hypervisor leaf 0x40000010 (TSC kHz).
    Hypervisor,
    /// CPUID leaf 0x16 (base frequency in MHz).
    Cpuid16,
    /// Nothing reported it: 3 GHz assumed.
    Guess,
}

impl TscSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TscSource::Cpuid15 => "cpuid-0x15",
            TscSource::Hypervisor => "cpuid-0x40000010",
            TscSource::Cpuid16 => "cpuid-0x16",
            TscSource::Guess => "guess",
        }
    }
}

fn tsc_probe() -> (u64, TscSource) {
    let max = cpuid(0, 0).0;
    if max >= 0x15 {
        let (den, num, crystal, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            return (crystal as u64 * num as u64 / den as u64, TscSource::Cpuid15);
        }
    }
    let hv_max = cpuid(0x4000_0000, 0).0;
    if (0x4000_0010..0x4000_0100).contains(&hv_max) {
        let khz = cpuid(0x4000_0010, 0).0;
        if khz != 0 {
            return (khz as u64 * 1000, TscSource::Hypervisor);
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16, 0).0 & 0xffff;
        if mhz != 0 {
            return (mhz as u64 * 1_000_000, TscSource::Cpuid16);
        }
    }
    (3_000_000_000, TscSource::Guess)
}

/// TSC frequency in Hz (bits 0-61) and its source (bits 62-63), 0 = not probed yet.
static TSC_CACHE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Estimated TSC frequency in Hz and where it came from: CPUID 0x15
/// (crystal ratio), else the hypervisor leaf 0x40000010 (kHz), else CPUID
/// 0x16 (MHz), else 3 GHz. Probed once (CPUID exits to the VMM), then cached.
pub fn tsc_hz_info() -> (u64, TscSource) {
    use core::sync::atomic::Ordering;
    const SOURCES: [TscSource; 4] = [TscSource::Cpuid15, TscSource::Hypervisor, TscSource::Cpuid16, TscSource::Guess];
    let v = TSC_CACHE.load(Ordering::Relaxed);
    if v != 0 {
        return (v & ((1 << 62) - 1), SOURCES[(v >> 62) as usize]);
    }
    let (hz, src) = tsc_probe();
    let hz = hz.clamp(1_000_000, (1 << 62) - 1);
    let idx = SOURCES.iter().position(|s| *s == src).unwrap_or(3) as u64;
    TSC_CACHE.store(hz | (idx << 62), Ordering::Relaxed);
    (hz, src)
}

/// Estimated TSC frequency in Hz (see [`tsc_hz_info`]).
pub fn tsc_hz() -> u64 {
    tsc_hz_info().0
}

/// TSC cycles in `ms` milliseconds.
pub fn ms_to_cycles(ms: u64) -> u64 {
    tsc_hz() / 1000 * ms
}

/// Full memory barrier (`mfence`): orders ring writes before a doorbell and
/// used-ring reads after it.
#[inline(always)]
pub fn mb() {
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst)
}

/// Busy-wait for about `us` microseconds (TSC based, native in ring 3).
pub fn delay_us(us: u64) {
    let hz = tsc_hz();
    let cycles = hz / 1_000_000 * us;
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}

/// 32-bit MMIO read (the identity map makes physical = virtual).
#[inline(always)]
pub fn mmio_read32(addr: usize) -> u32 {
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

#[inline(always)]
pub fn mmio_write32(addr: usize, val: u32) {
    unsafe { core::ptr::write_volatile(addr as *mut u32, val) }
}
