//! vCPUs: set-up, the run loop (exits dispatched to the buses, every way a guest can end turned
//! into an [`ExitReason`]), and the [`VcpuHandle`] the rest of the VMM drives each one with.
//!
//! Each vCPU thread owns its `VcpuFd` and takes requests on a channel between `KVM_RUN` calls:
//! run, pause, save its state, restore a state, resume, exit. A thread starts paused, so every
//! thread exists before the first guest instruction runs; a request to a vCPU inside the guest
//! is noticed after a signal kicks it out of `KVM_RUN`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, Xsave, KVM_INTERNAL_ERROR_EMULATION,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::boot::{regs, BootEntry};
use super::threads::{self, ThreadKind};
use super::{ExitHandle, ExitReason};
use bexar_devices::bus::Bus;
use bexar_devices::memory::GuestMemoryMmap;

/// Errors setting a vCPU up or moving its state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// The boot registers could not be built.
    #[error(transparent)]
    Boot(#[from] super::boot::BootError),
    /// More MSRs than KVM's list can carry.
    #[error("too many MSRs ({0})")]
    TooManyMsrs(usize),
    /// KVM stopped at an MSR it would not set or get.
    #[error("KVM took {done} of {of} MSRs (stopped at {index:#x})")]
    Msrs {
        /// How many it took.
        done: usize,
        /// How many there were.
        of: usize,
        /// The first one refused.
        index: u32,
    },
    /// The thread cannot be started.
    #[error("cannot start the vCPU thread: {0}")]
    Thread(std::io::Error),
    /// The vCPU thread did not answer (it ended, or did not leave the guest in time).
    #[error("vCPU {0} did not answer")]
    NoAnswer(u8),
    /// A saved state that cannot be loaded as it is.
    #[error("a vCPU state that cannot be loaded: {0}")]
    BadState(String),
    /// The vCPU thread refused the request.
    #[error("vCPU {id}: {why}")]
    Refused {
        /// Which vCPU.
        id: u8,
        /// Why.
        why: String,
    },
}

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
) -> Result<(), VcpuError> {
    let kvm = |what: &'static str| move |e: kvm_ioctls::Error| VcpuError::Kvm(what, e);
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
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::TooManyMsrs(entries.len()))?;
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
    /// Where the reason the VM ended goes.
    pub exit: ExitHandle,
    /// Instructions the platform's emulator refused that the VMM completed itself, for the
    /// whole VM (every vCPU shares one counter, so the first is logged once per VM).
    pub completed: Arc<AtomicU64>,
}

/// What a vCPU is asked to do.
#[derive(Debug)]
pub enum VcpuRequest {
    /// Leave the guest and wait (answered with [`VcpuResponse::Paused`]).
    Pause,
    /// Enter the guest (again). Not answered: nothing waits for a vCPU to run, and a thread
    /// that never answers never allocates (its first allocation would cost the VMM a malloc
    /// arena, ~16 KiB).
    Resume,
    /// Read the vCPU's state (paused only).
    SaveState(Arc<SaveSpec>),
    /// Load a state into the vCPU (paused only), the host's XSAVE size with it, and the time
    /// in ns its TSC moves on from the saved value (a handover's or a migration's pause: the
    /// guest's clocks count it, as they would have on the host it left).
    RestoreState(Box<VcpuState>, XsaveSize, u64),
    /// Leave the run loop for good.
    Exit,
}

/// What to read besides the registers every vCPU has.
#[derive(Debug, Clone)]
pub struct SaveSpec {
    /// The MSRs (KVM's index list).
    pub msrs: Vec<u32>,
    /// How this host reads the XSAVE area.
    pub xsave: XsaveSize,
}

/// How KVM on this host hands out a vCPU's XSAVE area (x87, SSE, AVX and every other state
/// component the guest may use; `KVM_GET_FPU` has only x87 and SSE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XsaveSize {
    /// No XSAVE: x87 and SSE through `KVM_GET_FPU` only.
    None,
    /// `KVM_GET_XSAVE`: the 4 KiB `struct kvm_xsave`.
    Legacy,
    /// `KVM_GET_XSAVE2`: this many bytes (`KVM_CAP_XSAVE2`; more than 4 KiB with AMX).
    Sized(usize),
}

impl XsaveSize {
    /// What `vm` offers.
    pub fn of(kvm: &kvm_ioctls::Kvm, vm: &kvm_ioctls::VmFd) -> Self {
        match vm.check_extension_int(kvm_ioctls::Cap::Xsave2) {
            n if n > 0 => Self::Sized(n as usize),
            _ if kvm.check_extension(kvm_ioctls::Cap::Xsave) => Self::Legacy,
            _ => Self::None,
        }
    }
}

/// Bytes of the fixed part of `struct kvm_xsave`.
const XSAVE_LEGACY_WORDS: usize = 1024;

/// What a vCPU answers.
#[derive(Debug)]
pub enum VcpuResponse {
    /// Out of the guest, waiting.
    Paused,
    /// Its state.
    Saved(Box<VcpuState>),
    /// The state is loaded.
    Restored,
    /// The request failed.
    Failed(String),
}

/// The x87/SSE state (`struct kvm_fpu`), in a form serde can write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// ST0-ST7, 16 bytes each.
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: Vec<[u8; 16]>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> Option<kvm_fpu> {
        Some(kvm_fpu {
            fpr: self.fpr.clone().try_into().ok()?,
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            xmm: self.xmm.clone().try_into().ok()?,
            mxcsr: self.mxcsr,
            ..Default::default()
        })
    }
}

/// One vCPU's architectural state as KVM holds it: what a snapshot stores per vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87 and SSE.
    pub fpu: FpuState,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// The XSAVE area, as 32-bit words (at least the 4 KiB of `struct kvm_xsave`), when the
    /// host has XSAVE: it holds the AVX and later state `fpu` lacks, and is loaded instead of
    /// `fpu` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xsave: Option<Vec<u32>>,
}

/// Most MSRs one KVM_GET_MSRS carries.
const MSR_CHUNK: usize = 64;

impl VcpuState {
    /// Reads `vcpu`'s state, with the MSRs and the XSAVE area `spec` names.
    pub fn save(vcpu: &VcpuFd, spec: &SaveSpec) -> Result<Self, VcpuError> {
        let kvm = |what: &'static str| move |e: kvm_ioctls::Error| VcpuError::Kvm(what, e);
        let msr_list = &spec.msrs[..];
        // KVM lists MSRs some hosts then refuse to read: KVM_GET_MSRS stops at the first it
        // refuses, so that one is skipped and the rest read on.
        let mut msrs = Vec::with_capacity(msr_list.len());
        let mut rest = msr_list;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(MSR_CHUNK)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut m =
                Msrs::from_entries(&entries).map_err(|_| VcpuError::TooManyMsrs(entries.len()))?;
            let n = vcpu.get_msrs(&mut m).map_err(kvm("KVM_GET_MSRS"))?;
            msrs.extend(m.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            if n < chunk.len() {
                tracing::debug!("MSR {:#x} is listed but not readable; not saved", chunk[n]);
                rest = &rest[n + 1..];
            } else {
                rest = &rest[n..];
            }
        }
        Ok(Self {
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            fpu: FpuState::from(&vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?),
            xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs,
            mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            xsave: save_xsave(vcpu, spec.xsave)?,
        })
    }

    /// Moves the saved TSC on by `cycles` (the `IA32_TSC` value KVM_SET_MSRS loads).
    pub fn advance_tsc(&mut self, cycles: u64) {
        for (index, value) in &mut self.msrs {
            if *index == MSR_IA32_TSC {
                *value = value.wrapping_add(cycles);
            }
        }
    }

    /// Whether this state can be loaded on a host that takes XSAVE areas as `host` says, as far
    /// as can be told without KVM (what KVM refuses is found when loading).
    pub fn check(&self, host: XsaveSize) -> Result<(), VcpuError> {
        self.float_state(host).map(drop)
    }

    /// The x87/SSE/AVX state in the form KVM takes on this host: the XSAVE area when saved,
    /// else the FPU state.
    fn float_state(&self, host: XsaveSize) -> Result<FloatState, VcpuError> {
        match &self.xsave {
            Some(words) => xsave_buffer(words, host).map(FloatState::Xsave),
            None => self
                .fpu
                .to_kvm()
                .map(|f| FloatState::Fpu(Box::new(f)))
                .ok_or_else(|| {
                    VcpuError::BadState("an FPU state with the wrong number of registers".into())
                }),
        }
    }

    /// Loads the state into `vcpu` (`host` says how this host takes an XSAVE area): system
    /// registers first, then the rest, pending events last (KVM checks them against the state
    /// they interrupt).
    pub fn restore(&self, vcpu: &VcpuFd, host: XsaveSize) -> Result<(), VcpuError> {
        let kvm = |what: &'static str| move |e: kvm_ioctls::Error| VcpuError::Kvm(what, e);
        // What can be refused without KVM is refused before anything is loaded.
        let float = self.float_state(host)?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        match float {
            // SAFETY: the buffer holds at least this host's XSAVE size (KVM_CAP_XSAVE2, or the
            // 4 KiB of `struct kvm_xsave` without it; see `xsave_buffer`), which is what
            // KVM_SET_XSAVE reads.
            FloatState::Xsave(x) => unsafe { vcpu.set_xsave2(&x) }.map_err(kvm("KVM_SET_XSAVE"))?,
            FloatState::Fpu(fpu) => vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?,
        }
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let m =
                Msrs::from_entries(&entries).map_err(|_| VcpuError::TooManyMsrs(entries.len()))?;
            let n = vcpu.set_msrs(&m).map_err(kvm("KVM_SET_MSRS"))?;
            if n != entries.len() {
                return Err(VcpuError::Msrs {
                    done: n,
                    of: entries.len(),
                    index: entries[n].index,
                });
            }
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads the XSAVE area the way this host offers it.
fn save_xsave(vcpu: &VcpuFd, how: XsaveSize) -> Result<Option<Vec<u32>>, VcpuError> {
    match how {
        XsaveSize::None => Ok(None),
        XsaveSize::Legacy => {
            let x = vcpu
                .get_xsave()
                .map_err(|e| VcpuError::Kvm("KVM_GET_XSAVE", e))?;
            Ok(Some(x.region.to_vec()))
        }
        XsaveSize::Sized(bytes) => {
            let extra = bytes
                .saturating_sub(XSAVE_LEGACY_WORDS * 4)
                .div_ceil(std::mem::size_of::<u32>());
            let mut x = Xsave::new(extra).map_err(|e| VcpuError::BadState(e.to_string()))?;
            // SAFETY: `x` holds 4 KiB plus `extra` words, at least the `bytes` that
            // KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) gave for this VM, which is all KVM_GET_XSAVE2
            // writes (the VMM enables no XSTATE feature dynamically after asking).
            unsafe { vcpu.get_xsave2(&mut x) }.map_err(|e| VcpuError::Kvm("KVM_GET_XSAVE2", e))?;
            let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
            words.extend_from_slice(x.as_slice());
            Ok(Some(words))
        }
    }
}

/// The x87/SSE/AVX state as one of the two ioctls that load it takes it.
enum FloatState {
    Xsave(Xsave),
    Fpu(Box<kvm_fpu>),
}

/// The buffer KVM_SET_XSAVE is given for `words` (an area saved here or on another host), or
/// why they cannot be loaded here. It is at least as large as what KVM reads on this host,
/// zero-filled past the saved words, so a state from a host with a smaller area cannot make
/// KVM read beyond it; a state larger than this host's area keeps components this host cannot
/// hold, and KVM refuses it.
fn xsave_buffer(words: &[u32], host: XsaveSize) -> Result<Xsave, VcpuError> {
    if words.len() < XSAVE_LEGACY_WORDS {
        return Err(VcpuError::BadState(format!(
            "an XSAVE area of {} words (at least {XSAVE_LEGACY_WORDS})",
            words.len()
        )));
    }
    let host_bytes = match host {
        XsaveSize::None => {
            return Err(VcpuError::BadState(
                "an XSAVE area, and this host has no XSAVE".into(),
            ))
        }
        XsaveSize::Legacy => XSAVE_LEGACY_WORDS * 4,
        XsaveSize::Sized(b) => b,
    };
    let extra = (words.len() - XSAVE_LEGACY_WORDS).max(
        host_bytes
            .saturating_sub(XSAVE_LEGACY_WORDS * 4)
            .div_ceil(4),
    );
    let mut x = Xsave::new(extra).map_err(|e| VcpuError::BadState(e.to_string()))?;
    let region: [u32; XSAVE_LEGACY_WORDS] = words[..XSAVE_LEGACY_WORDS]
        .try_into()
        .map_err(|_| VcpuError::BadState("XSAVE region".into()))?;
    // SAFETY: only the fixed `xsave.region` is written, never the `len` the wrapper relies on.
    unsafe { x.as_mut_fam_struct() }.xsave.region = region;
    x.as_mut_slice()[..words.len() - XSAVE_LEGACY_WORDS]
        .copy_from_slice(&words[XSAVE_LEGACY_WORDS..]);
    Ok(x)
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the signal that kicks vCPU threads out of `KVM_RUN`: the
/// signal must interrupt the ioctl, not kill the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(std::io::Error::from)
}

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

/// The rest of the VMM's hold on one vCPU thread.
pub struct VcpuHandle {
    id: u8,
    requests: Sender<(u64, VcpuRequest)>,
    responses: Receiver<(u64, VcpuResponse)>,
    /// Number of the last request sent; only its answer is taken (see [`VcpuHandle::answer`]).
    last_sent: AtomicU64,
    /// Set when a request waits, so the thread checks its channel before re-entering the guest
    /// (a flag is cheaper than a channel on every exit).
    pending: Arc<AtomicBool>,
    stats: Arc<VcpuStats>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread of vCPU `ctx.id`, paused: it enters the guest at the first
    /// [`VcpuRequest::Resume`].
    pub fn spawn(vcpu: VcpuFd, ctx: VcpuContext) -> Result<Self, VcpuError> {
        let (req_tx, req_rx) = mpsc::channel();
        let (resp_tx, resp_rx) = mpsc::channel();
        let pending = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(VcpuStats::default());
        let id = ctx.id;
        let thread = {
            let (pending, stats) = (pending.clone(), stats.clone());
            let exit = ctx.exit.clone();
            threads::spawn(ThreadKind::Vcpu(id), exit, move || {
                // Marks the vCPU done however the thread ends (a panic included).
                struct Done(Arc<VcpuStats>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        self.0.done.store(true, Ordering::Release);
                    }
                }
                let _done = Done(stats.clone());
                let mut t = VcpuThread {
                    vcpu,
                    ctx,
                    requests: req_rx,
                    responses: resp_tx,
                    pending,
                    stats,
                    io_pending: false,
                };
                t.main();
            })
            .map_err(VcpuError::Thread)?
        };
        Ok(Self {
            id,
            requests: req_tx,
            responses: resp_rx,
            last_sent: AtomicU64::new(0),
            pending,
            stats,
            thread: Some(thread),
        })
    }

    /// The vCPU's counters.
    pub fn stats(&self) -> &Arc<VcpuStats> {
        &self.stats
    }

    /// Whether the thread has left its run loop.
    pub fn done(&self) -> bool {
        self.stats.done.load(Ordering::Acquire)
    }

    /// Queues `req` and, unless it is a resume (which only a parked vCPU waits for), kicks the
    /// vCPU out of the guest so it sees it.
    pub fn send(&self, req: VcpuRequest) -> Result<(), VcpuError> {
        let kick = !matches!(req, VcpuRequest::Resume);
        let seq = self.last_sent.fetch_add(1, Ordering::Relaxed) + 1;
        self.requests
            .send((seq, req))
            .map_err(|_| VcpuError::NoAnswer(self.id))?;
        self.pending.store(true, Ordering::Release);
        if kick {
            self.kick();
        }
        Ok(())
    }

    /// Waits until `deadline` for the answer to the last request, kicking the vCPU again
    /// while it waits (a kick that lands just before `KVM_RUN` is lost). Answers carry the
    /// number of their request: a late answer to an earlier one (a pause the caller stopped
    /// waiting for, answered once the vCPU got there) is dropped, never taken for this one's.
    pub fn answer(&self, deadline: Instant) -> Result<VcpuResponse, VcpuError> {
        let wanted = self.last_sent.load(Ordering::Relaxed);
        loop {
            match self.responses.recv_timeout(Duration::from_micros(200)) {
                Ok((seq, r)) if seq == wanted => return Ok(r),
                Ok((seq, r)) => {
                    tracing::debug!(vcpu = self.id, seq, wanted, "late answer dropped: {r:?}");
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::NoAnswer(self.id)),
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.done() || Instant::now() >= deadline {
                return Err(VcpuError::NoAnswer(self.id));
            }
            self.kick();
        }
    }

    /// Sends `req` and waits for its answer.
    pub fn request(&self, req: VcpuRequest, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        self.send(req)?;
        self.answer(Instant::now() + timeout)
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            let _ = t.kill(SIGRTMIN());
        }
    }

    /// Tells the thread to leave (without waiting). The vCPU that saw the VM's end has left
    /// already and is not disturbed.
    pub fn begin_stop(&self) {
        if !self.done() {
            let _ = self.send(VcpuRequest::Exit);
        }
    }

    /// Kicks the thread until it has left its loop, for at most until `deadline`. A vCPU that
    /// misses every kick is left behind: the caller is about to end the VM anyway. (Threads are
    /// not joined: the process is about to exit, and a join would wait for the thread's own
    /// teardown.)
    pub fn finish_stop(&self, deadline: Instant) {
        while !self.done() && Instant::now() < deadline {
            self.kick();
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// The thread's side.
struct VcpuThread {
    vcpu: VcpuFd,
    ctx: VcpuContext,
    requests: Receiver<(u64, VcpuRequest)>,
    responses: Sender<(u64, VcpuResponse)>,
    pending: Arc<AtomicBool>,
    stats: Arc<VcpuStats>,
    /// The last exit was a port or MMIO access, which KVM completes (a read's value into the
    /// guest's register, RIP past the instruction) only at the next KVM_RUN.
    io_pending: bool,
}

/// What the thread does after a request.
enum Next {
    Run,
    Exit,
}

impl VcpuThread {
    fn main(&mut self) {
        // Created paused: wait for the first Resume.
        if let Next::Exit = self.paused() {
            return;
        }
        self.run();
        if let Ok(r) = self.vcpu.get_regs() {
            self.stats.stopped_rip.store(r.rip, Ordering::Relaxed);
        }
        // Done now, not when the vCPU's descriptor is closed after this returns.
        self.stats.done.store(true, Ordering::Release);
    }

    /// Answers request number `seq`.
    fn reply(&self, seq: u64, r: VcpuResponse) {
        let _ = self.responses.send((seq, r));
    }

    // Saving and restoring are apart from the loops that wait for requests, and never inlined
    // into them: a `VcpuState` is 2 KiB and its save 3.6 KiB of stack, which every vCPU thread
    // would otherwise touch (and keep, ~4 KiB each) whether a snapshot is ever taken or not.
    #[inline(never)]
    fn save(&self, spec: &SaveSpec) -> VcpuResponse {
        match VcpuState::save(&self.vcpu, spec) {
            Ok(s) => VcpuResponse::Saved(Box::new(s)),
            Err(e) => VcpuResponse::Failed(e.to_string()),
        }
    }

    #[inline(never)]
    fn restore(&self, s: &mut VcpuState, host: XsaveSize, advance_ns: u64) -> VcpuResponse {
        if advance_ns > 0 {
            // The TSC runs at this host's rate (PVM cannot scale it; see PLATFORM.md).
            match self.vcpu.get_tsc_khz() {
                Ok(khz) => {
                    s.advance_tsc((u128::from(advance_ns) * u128::from(khz) / 1_000_000) as u64)
                }
                Err(e) => tracing::warn!("KVM_GET_TSC_KHZ failed ({e}): the TSC is not advanced"),
            }
        }
        match s.restore(&self.vcpu, host) {
            Ok(()) => VcpuResponse::Restored,
            Err(e) => VcpuResponse::Failed(e.to_string()),
        }
    }

    /// Completes an instruction the platform's emulator refused, when doing so is exactly what
    /// the CPU would have done; true if the guest may go on.
    ///
    /// Only `fwait` (0x9b) qualifies. On a PVM host guest ring 0 is emulated and the emulator
    /// has no `fwait`, yet Linux runs one in `fpu__drop` each time a task exits (the first one
    /// is a kernel thread early in boot or a failed exec of init), so without this every Linux
    /// guest would die there. `fwait` only checks for pending x87 exceptions: with no unmasked
    /// exception pending (FSW.ES clear) and no lazy-FPU trap armed (CR0.TS with CR0.MP, which
    /// would raise #NM) it does nothing, so the VMM steps over its one byte. In any other state
    /// the VM ends with the usual report rather than the VMM guessing at an exception. A
    /// hardware-virtualised host never gets here: `fwait` runs natively.
    #[inline(never)]
    fn complete_refused(&self, insn: &[u8]) -> bool {
        const FWAIT: u8 = 0x9b;
        const FSW_ES: u16 = 1 << 7;
        const CR0_MP: u64 = 1 << 1;
        const CR0_TS: u64 = 1 << 3;
        if insn.first() != Some(&FWAIT) {
            return false;
        }
        let (Ok(mut regs), Ok(sregs), Ok(fpu)) = (
            self.vcpu.get_regs(),
            self.vcpu.get_sregs(),
            self.vcpu.get_fpu(),
        ) else {
            return false;
        };
        if fpu.fsw & FSW_ES != 0 || sregs.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
            return false;
        }
        regs.rip = regs.rip.wrapping_add(1);
        if self.vcpu.set_regs(&regs).is_err() {
            return false;
        }
        if self.ctx.completed.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::info!(
                vcpu = self.ctx.id,
                rip = format_args!("{:#x}", regs.rip - 1),
                "the platform's emulator refused fwait; the VMM completed it (a no-op with no \
                 x87 exception pending) and counts every later one without logging"
            );
        }
        true
    }

    /// Serves requests while out of the guest, until told to run or to exit.
    fn paused(&mut self) -> Next {
        loop {
            let Ok((seq, req)) = self.requests.recv() else {
                return Next::Exit;
            };
            match req {
                VcpuRequest::Resume => return Next::Run,
                VcpuRequest::Pause => self.reply(seq, VcpuResponse::Paused),
                VcpuRequest::SaveState(spec) => self.reply(seq, self.save(&spec)),
                VcpuRequest::RestoreState(mut s, host, advance_ns) => {
                    let r = self.restore(&mut s, host, advance_ns);
                    self.reply(seq, r)
                }
                VcpuRequest::Exit => return Next::Exit,
            }
        }
    }

    /// Takes the requests that arrived while in the guest.
    fn requests_while_running(&mut self) -> Next {
        self.pending.store(false, Ordering::Release);
        while let Ok((seq, req)) = self.requests.try_recv() {
            match req {
                VcpuRequest::Pause => {
                    self.reply(seq, VcpuResponse::Paused);
                    if let Next::Exit = self.paused() {
                        return Next::Exit;
                    }
                }
                VcpuRequest::Resume => {}
                VcpuRequest::Exit => return Next::Exit,
                VcpuRequest::SaveState(_) | VcpuRequest::RestoreState(..) => self.reply(
                    seq,
                    VcpuResponse::Failed("the vCPU is running: pause it first".into()),
                ),
            }
        }
        Next::Run
    }

    /// Runs the vCPU until the VM ends.
    fn run(&mut self) {
        let id = self.ctx.id;
        loop {
            if self.ctx.exit.requested() {
                return;
            }
            if self.pending.load(Ordering::Acquire) {
                if self.io_pending {
                    // Requests are taken with the guest's last instruction complete: paused
                    // (and saved) between the exit and the next KVM_RUN, a port read would run
                    // again after a restore and take a second UART byte, a write be done twice.
                    // KVM_RUN with immediate_exit completes it and returns at once (EINTR), or
                    // with the next exit of a string instruction, handled as any other.
                    self.vcpu.set_kvm_immediate_exit(1);
                } else {
                    self.vcpu.set_kvm_immediate_exit(0);
                    if let Next::Exit = self.requests_while_running() {
                        return;
                    }
                    continue;
                }
            }
            let result = self.vcpu.run();
            let (ctx, stats) = (&self.ctx, &self.stats);
            stats.exits.fetch_add(1, Ordering::Relaxed);
            self.io_pending = false;
            let reason = match result {
                Ok(VcpuExit::IoOut(port, data)) => {
                    stats.pio.fetch_add(1, Ordering::Relaxed);
                    ctx.pio.write(u64::from(port), data);
                    self.io_pending = true;
                    continue;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    stats.pio.fetch_add(1, Ordering::Relaxed);
                    ctx.pio.read(u64::from(port), data);
                    self.io_pending = true;
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    stats.mmio.fetch_add(1, Ordering::Relaxed);
                    if !ctx.mmio.read(addr, data) {
                        data.fill(0);
                    }
                    self.io_pending = true;
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    stats.mmio.fetch_add(1, Ordering::Relaxed);
                    ctx.mmio.write(addr, data);
                    self.io_pending = true;
                    continue;
                }
                Ok(VcpuExit::Hlt) => ExitReason::Halted,
                Ok(VcpuExit::Shutdown) => {
                    let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
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
                        let run = self.vcpu.get_kvm_run();
                        // SAFETY: KVM reported KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                        // member of the exit union that KVM filled in.
                        unsafe { run.__bindgen_anon_1.internal }
                    };
                    let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    let insn = instruction_bytes(&self.vcpu, &self.ctx.mem, rip);
                    if internal.suberror == KVM_INTERNAL_ERROR_EMULATION
                        && self.complete_refused(&insn)
                    {
                        continue;
                    }
                    let n = (internal.ndata as usize).min(internal.data.len());
                    ExitReason::InternalError {
                        vcpu: id,
                        suberror: internal.suberror,
                        rip,
                        insn,
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
            self.ctx.exit.request(reason);
            return;
        }
    }
}
