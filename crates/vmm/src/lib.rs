//! The virtual machine monitor: guest memory, boot, vCPUs and devices of one VM in this process.
//!
//! [`builder::run`] is the whole recipe; the rest are its parts.

pub mod boot;
pub mod builder;
pub mod control;
pub mod cpuid;
pub mod layout;
pub mod memory;
pub mod platform;
pub mod teardown;
pub mod vcpu;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use serde::Serialize;

use bexar_devices::serial::ConsoleConfig;
pub use builder::run;
use cpuid::CpuTemplate;

/// Command line used when none is given: serial console, i8042 reboot (our VM exit), and a
/// panicking kernel reboots at once instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Errors that stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm cannot be used.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and are you allowed to use it?)")]
    Kvm0(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The guest could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A NIC could not be attached.
    #[error(transparent)]
    Nic(#[from] bexar_devices::tap::TapError),
    /// The vsock device could not be attached.
    #[error(transparent)]
    Vsock(#[from] bexar_devices::virtio::vsock::VsockError),
    /// A disk could not be attached.
    #[error(transparent)]
    Disk(#[from] bexar_devices::virtio::block::BlockError),
    /// The console could not be set up.
    #[error(transparent)]
    Console(#[from] bexar_devices::serial::ConsoleError),
    /// Any other setup failure.
    #[error("VM setup failed: {0}")]
    Setup(String),
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// Hands the reason a VM ended to the thread waiting for it. Cheap to clone; the first reason wins.
#[derive(Clone, Debug)]
pub struct ExitHandle(mpsc::Sender<ExitReason>, Arc<AtomicBool>);

impl ExitHandle {
    /// A handle and the receiver the VM's owner waits on.
    pub fn new() -> (Self, mpsc::Receiver<ExitReason>) {
        let (tx, rx) = mpsc::channel();
        (Self(tx, Arc::new(AtomicBool::new(false))), rx)
    }

    /// Asks for the VM to end with `reason`.
    pub fn request(&self, reason: ExitReason) {
        self.1.store(true, Ordering::Release);
        let _ = self.0.send(reason);
    }

    /// Whether an end was asked for: a vCPU that sees it does not enter the guest again.
    pub fn requested(&self) -> bool {
        self.1.load(Ordering::Acquire)
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

/// Everything needed to run one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image (ELF or bzImage).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line as given by the user.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// CPU template.
    pub cpu_template: CpuTemplate,
    /// Console destination.
    pub console: ConsoleConfig,
    /// Whether stdin feeds the console.
    pub stdin: bool,
    /// End the VM after this long.
    pub timeout: Option<Duration>,
    /// Add the platform's kernel parameters (PVM) to the command line.
    pub platform_params: bool,
    /// Give the guest an i8254 PIT (old guests without a LAPIC timer or kvm-clock need one).
    pub legacy_pit: bool,
    /// virtio-blk disks, in slot order (the first is /dev/vda).
    pub disks: Vec<bexar_devices::virtio::block::DiskConfig>,
    /// virtio-net NICs on TAP devices.
    pub nics: Vec<bexar_devices::virtio::net::NicConfig>,
    /// Attach a virtio-rng.
    pub rng: bool,
    /// Attach a virtio-vsock bridged to Unix sockets.
    pub vsock: Option<bexar_devices::virtio::vsock::VsockConfig>,
    /// Serve a control socket (pause, resume, shutdown, info) while the VM runs.
    pub control: Option<control::ControlConfig>,
}

/// What happened to a VM, for the CLI and machine-readable reports.
#[derive(Debug, Clone, Serialize)]
pub struct VmOutcome {
    /// Why it ended.
    pub reason: ExitReason,
    /// Time from VMM start to the end.
    pub elapsed_ms: f64,
    /// Time from VMM start to the first console byte.
    pub first_console_byte_ms: Option<f64>,
    /// Time from VMM start to the expected pattern (set by the caller that watched for it).
    pub pattern_ms: Option<f64>,
    /// Console bytes the guest wrote.
    pub console_bytes: u64,
    /// Exits to user space, summed over vCPUs.
    pub vcpu_exits: u64,
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
}
