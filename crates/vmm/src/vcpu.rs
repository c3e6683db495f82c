//! vCPU setup and the run loop: one thread per vCPU, exits dispatched to the buses, and every way
//! a guest can end turned into an [`ExitReason`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{regs, BootEntry};
use super::{ExitHandle, ExitReason, VmmError};
use bexar_devices::bus::Bus;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Counters of one vCPU, readable while it runs.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Exits to user space.
    pub exits: AtomicU64,
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Set when the vCPU has left its run loop.
    pub done: AtomicBool,
    /// Instruction pointer when the vCPU was stopped from outside (0 if unknown).
    pub stopped_rip: AtomicU64,
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = lapic.regs[reg + i] as u8;
    }
    let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *b as _;
    }
}

/// Configures a vCPU: CPUID, MSRs, FPU, LAPIC LINT pins, and for the boot vCPU the entry state.
pub fn configure(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    cpuid: &CpuId,
    template_msrs: &[(u32, u64)],
    boot: Option<&BootEntry>,
) -> Result<(), VmmError> {
    let kvm = |what: &'static str| move |e: kvm_ioctls::Error| VmmError::Kvm(what, e);
    vcpu.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let mut entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),          // fast strings
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ]
    .iter()
    .map(|(index, data)| kvm_msr_entry {
        index: *index,
        data: *data,
        ..Default::default()
    })
    .collect();
    for (index, data) in template_msrs {
        entries.push(kvm_msr_entry {
            index: *index,
            data: *data,
            ..Default::default()
        });
    }
    let msrs = Msrs::from_entries(&entries).map_err(|_| VmmError::Setup("too many MSRs".into()))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        // KVM stops at the first MSR it refuses; the rest are optional on some hosts.
        tracing::debug!(
            "KVM accepted {set} of {} boot MSRs (refused {:#x})",
            entries.len(),
            entries[set].index
        );
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;

    if let Some(boot) = boot {
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let sregs = regs::setup_sregs(mem, boot.mode, sregs)?;
        vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs::boot_regs(boot.mode, boot.entry, boot.params))
            .map_err(kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// Reads up to 16 bytes at the guest's current instruction pointer, for error reports.
fn instruction_bytes(vcpu: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    let phys = match vcpu.translate_gva(rip) {
        Ok(t) if t.valid != 0 => t.physical_address,
        _ => rip,
    };
    let mut buf = [0u8; 16];
    match mem.read_slice(&mut buf, GuestAddress(phys)) {
        Ok(()) => buf.to_vec(),
        Err(_) => Vec::new(),
    }
}

/// Everything a vCPU thread shares with the rest of the VM.
pub struct VcpuContext {
    /// vCPU index.
    pub id: u8,
    /// Guest memory (for error reports).
    pub mem: GuestMemoryMmap,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Set when the VM is ending; the thread leaves its loop at the next exit.
    pub stop: Arc<AtomicBool>,
    /// Where the reason the VM ended goes.
    pub exit: ExitHandle,
    /// Counters.
    pub stats: Arc<VcpuStats>,
    /// Parks the thread while the VM is paused.
    pub pause: Arc<super::control::PauseGate>,
}

/// Runs a vCPU until the VM ends.
pub fn run(mut vcpu: VcpuFd, ctx: VcpuContext) {
    let id = ctx.id;
    while !ctx.stop.load(Ordering::Acquire) && !ctx.exit.requested() {
        if ctx.pause.requested() {
            ctx.pause.park(&ctx.stop);
            continue;
        }
        let result = vcpu.run();
        ctx.stats.exits.fetch_add(1, Ordering::Relaxed);
        let reason = match result {
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.stats.pio.fetch_add(1, Ordering::Relaxed);
                ctx.pio.write(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.stats.pio.fetch_add(1, Ordering::Relaxed);
                ctx.pio.read(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.stats.mmio.fetch_add(1, Ordering::Relaxed);
                if !ctx.mmio.read(addr, data) {
                    data.fill(0);
                }
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.stats.mmio.fetch_add(1, Ordering::Relaxed);
                ctx.mmio.write(addr, data);
                continue;
            }
            Ok(VcpuExit::Hlt) => ExitReason::Halted,
            Ok(VcpuExit::Shutdown) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                ExitReason::TripleFault { vcpu: id, rip }
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                KVM_SYSTEM_EVENT_CRASH => ExitReason::Crash,
                other => {
                    tracing::warn!(vcpu = id, "unknown system event {other}");
                    continue;
                }
            },
            Ok(VcpuExit::InternalError) => {
                let internal = {
                    let run = vcpu.get_kvm_run();
                    // SAFETY: KVM reported KVM_EXIT_INTERNAL_ERROR, so `internal` is the member
                    // of the exit union that KVM filled in.
                    unsafe { run.__bindgen_anon_1.internal }
                };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                let n = (internal.ndata as usize).min(internal.data.len());
                ExitReason::InternalError {
                    vcpu: id,
                    suberror: internal.suberror,
                    rip,
                    insn: instruction_bytes(&vcpu, &ctx.mem, rip),
                    data: internal.data[..n].to_vec(),
                }
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => ExitReason::FailEntry { vcpu: id, reason },
            Ok(VcpuExit::Intr) => continue,
            Ok(other) => {
                tracing::warn!(vcpu = id, "unhandled vCPU exit {other:?}");
                continue;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => ExitReason::VmmError(format!("KVM_RUN on vCPU {id}: {e}")),
        };
        ctx.exit.request(reason);
        break;
    }
    if let Ok(r) = vcpu.get_regs() {
        ctx.stats.stopped_rip.store(r.rip, Ordering::Relaxed);
    }
    ctx.stats.done.store(true, Ordering::Release);
}
