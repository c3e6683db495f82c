//! The virtual machine monitor: one VM in this process.
//!
//! A [`Vmm`] is built from a [`VmConfig`] by [`builder::build_for_boot`] (a second path that
//! builds from saved state will sit beside it) and driven by its methods: run until the guest
//! ends, pause, resume, read state, shut down. It holds the VM, guest memory, one handle per
//! vCPU (each with a request channel), the device manager, and the event loops.
//!
//! * [`config`]: the VM's description and the bounds on it; [`launch`]: how the agent hands it
//!   to a `bexar vmm` process;
//! * [`builder`]: the boot recipe; [`vmm`]: the VM while it runs; [`control`]: the control
//!   socket that drives it from outside;
//! * [`device_manager`] and [`resources`]: devices, buses, MMIO windows, ports and GSIs;
//! * [`vcpu`], [`cpuid`], [`boot`], [`memory`], [`layout`], [`platform`]: the machine itself;
//! * [`threads`]: the one place threads are made; [`teardown`]: releasing the VM after exit;
//! * [`jail`] and [`seccomp`]: the sandbox the process enters before its guest runs.

pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod device_manager;
pub mod jail;
pub mod launch;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod pid_ns;
pub mod platform;
pub mod resources;
pub mod seccomp;
pub mod snapshot;
pub mod teardown;
pub mod threads;
pub mod vcpu;
pub mod vm_state;
#[allow(clippy::module_inception)]
pub mod vmm;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

pub use builder::{
    build_for_boot, build_from_handoff, build_from_migration, build_from_snapshot, RestoreConfig,
};
pub use config::{VmConfig, DEFAULT_CMDLINE};
pub use vmm::{Vmm, VmmState};

/// Errors that stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is refused.
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// /dev/kvm cannot be used.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and are you allowed to use it?)")]
    KvmOpen(kvm_ioctls::Error),
    /// /dev/kvm was not among what the launch handed the VMM ([`bexar_util::handed`]).
    #[error("cannot use /dev/kvm: {0}")]
    KvmNotHanded(std::io::Error),
    /// The sandbox could not be entered.
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    /// A seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest memory could not be created or registered.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// A live migration failed (the VM goes on where it was, if it was sending).
    #[error(transparent)]
    Migration(#[from] migration::MigrationError),
    /// The guest could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A device could not be attached.
    #[error(transparent)]
    Device(#[from] device_manager::DeviceError),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// The VM-wide state could not be read or loaded.
    #[error(transparent)]
    VmState(#[from] vm_state::VmStateError),
    /// A thread or event loop of the VMM could not be started.
    #[error("cannot start the VMM's {what}: {err}")]
    Start {
        /// What.
        what: &'static str,
        /// Why.
        err: std::io::Error,
    },
    /// The control socket cannot be served.
    #[error("cannot serve the control socket {path}: {err}")]
    Control {
        /// The socket.
        path: std::path::PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The vCPUs did not all park within the pause timeout (the VM was left running).
    #[error("vCPUs did not park within {0:?}; VM left running")]
    PauseTimeout(std::time::Duration),
    /// An operation needs the VM in another state.
    #[error("the VM is {0}")]
    State(&'static str),
    /// Snapshot files cannot be read or written.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// A snapshot does not fit what it is restored into.
    #[error("the snapshot cannot be restored: {0}")]
    Restore(String),
}

impl VmmError {
    /// Whether the caller's input is at fault (exit status 2 for `bexar run`) rather than KVM
    /// or the host (status 4).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Config(_) | Self::Boot(_) | Self::Restore(_) => true,
            Self::Snapshot(e) => !matches!(e, snapshot::SnapshotError::Encode(_)),
            Self::Memory(e) => e.is_bad_input(),
            Self::Device(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "kebab-case")]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine (i8042 or KVM system event).
    Reset,
    /// The guest wrote a status to the exit port.
    GuestStatus(u32),
    /// A vCPU halted with no in-kernel interrupt controller to wake it.
    Halted,
    /// The guest reported a crash (KVM system event).
    Crash,
    /// A triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// vCPU that faulted.
        vcpu: u8,
        /// Its instruction pointer.
        rip: u64,
    },
    /// KVM could not run an instruction.
    InternalError {
        /// vCPU.
        vcpu: u8,
        /// KVM's sub-error code.
        suberror: u32,
        /// Instruction pointer.
        rip: u64,
        /// Bytes at the instruction pointer.
        insn: Vec<u8>,
        /// KVM's extra data words.
        data: Vec<u64>,
    },
    /// KVM could not enter the guest.
    FailEntry {
        /// vCPU.
        vcpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The expected console pattern appeared.
    PatternMatched,
    /// The timeout expired.
    Timeout,
    /// Stopped on request (control socket).
    Stopped,
    /// The VMM itself failed while running.
    VmmError(String),
}

impl ExitReason {
    /// Whether this is an orderly end of the guest.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            Self::PowerOff
                | Self::Reset
                | Self::GuestStatus(0)
                | Self::Halted
                | Self::PatternMatched
                | Self::Stopped
        )
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PowerOff => write!(f, "guest powered off"),
            Self::Reset => write!(f, "guest reset"),
            Self::GuestStatus(s) => write!(f, "guest reported status {s} on the exit port"),
            Self::Halted => write!(f, "guest halted"),
            Self::Crash => write!(f, "guest reported a crash"),
            Self::TripleFault { vcpu, rip } => {
                write!(f, "triple fault on vCPU {vcpu} at rip {rip:#x}")
            }
            Self::InternalError {
                vcpu,
                suberror,
                rip,
                insn,
                data,
            } => {
                write!(f, "KVM internal error {suberror} on vCPU {vcpu} at rip {rip:#x}, instruction bytes [")?;
                for (i, b) in insn.iter().enumerate() {
                    write!(f, "{}{b:02x}", if i == 0 { "" } else { " " })?;
                }
                write!(f, "], data {data:x?}")
            }
            Self::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "KVM could not enter vCPU {vcpu} (hardware reason {reason:#x})"
                )
            }
            Self::PatternMatched => write!(f, "expected console pattern seen"),
            Self::Timeout => write!(f, "timed out"),
            Self::Stopped => write!(f, "stopped on request"),
            Self::VmmError(e) => write!(f, "VMM error: {e}"),
        }
    }
}

/// Hands the reason a VM ended to whoever waits for it. Cheap to clone; the first reason
/// wins. The waiter watches [`ExitHandle::event`], an eventfd, in its event loop.
#[derive(Clone, Debug)]
pub struct ExitHandle(Arc<ExitState>);

#[derive(Debug)]
struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    requested: AtomicBool,
    evt: EventFd,
}

impl ExitHandle {
    /// A handle nobody has pulled yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(Arc::new(ExitState {
            reason: Mutex::new(None),
            requested: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })))
    }

    /// Asks for the VM to end with `reason` (ignored if another reason came first).
    pub fn request(&self, reason: ExitReason) {
        {
            let mut r = bexar_util::sync::lock(&self.0.reason);
            if r.is_some() {
                return;
            }
            *r = Some(reason);
        }
        self.0.requested.store(true, Ordering::Release);
        let _ = self.0.evt.write(1);
    }

    /// Whether an end was asked for: a vCPU that sees it does not enter the guest again.
    pub fn requested(&self) -> bool {
        self.0.requested.load(Ordering::Acquire)
    }

    /// The reason, once one was given.
    pub fn reason(&self) -> Option<ExitReason> {
        bexar_util::sync::lock(&self.0.reason).clone()
    }

    /// Readable once an end was asked for.
    pub fn event(&self) -> &EventFd {
        &self.0.evt
    }
}

impl AsRef<EventFd> for ExitHandle {
    fn as_ref(&self) -> &EventFd {
        self.event()
    }
}

/// A line that ends the VM with a given reason when pulled (the i8042's reset line).
pub struct ExitTrigger {
    /// Where the reason goes.
    pub exit: ExitHandle,
    /// The reason.
    pub reason: ExitReason,
}

impl vm_superio::Trigger for ExitTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.exit.request(self.reason.clone());
        Ok(())
    }
}

/// What happened to a VM, for the CLI and machine-readable reports.
#[derive(Debug, Clone, Serialize)]
pub struct VmOutcome {
    /// Why it ended.
    pub reason: ExitReason,
    /// Time from VMM start to the end.
    pub elapsed_ms: f64,
    /// Time from VMM start (the build or restore) to the vCPUs first let run: how long a boot
    /// or a restore took to reach the guest's first instruction.
    #[serde(default)]
    pub running_ms: Option<f64>,
    /// The VM was handed to a new VMM process (a live upgrade or a live migration): it goes on
    /// there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handed_off: bool,
    /// Time from VMM start to the first console byte.
    pub first_console_byte_ms: Option<f64>,
    /// Time from VMM start to the expected pattern (set by the caller that watched for it).
    pub pattern_ms: Option<f64>,
    /// Console bytes the guest wrote.
    pub console_bytes: u64,
    /// Exits to user space, summed over vCPUs.
    pub vcpu_exits: u64,
    /// Instructions the platform's emulator refused that the VMM completed (`fwait` on PVM).
    pub completed_instructions: u64,
    /// Port and MMIO accesses that hit no device.
    pub unhandled_io: u64,
    /// Resident memory of the VMM itself (RSS minus guest memory), KiB.
    pub vmm_rss_kib: Option<u64>,
    /// Anonymous memory of the VMM (heap, stacks, device state): the per-VM cost, KiB.
    pub vmm_private_kib: Option<u64>,
    /// Resident guest memory, KiB.
    pub guest_rss_kib: Option<u64>,
    /// Platform detected.
    pub platform: &'static str,
    /// Entry protocol used.
    pub entry: String,
    /// The command line the guest got.
    pub cmdline: String,
    /// Per-device counters at the end.
    pub devices: Vec<bexar_devices::virtio::DeviceReport>,
    /// What the sandbox cost this VMM's start, by layer (absent when not jailed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jail: Option<jail::JailTimes>,
}
