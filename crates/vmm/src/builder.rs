//! The boot recipe: a [`Vmm`] from a [`VmConfig`], top to bottom. Each step is a named
//! function; the order matters where a comment says why.
//!
//! Two recipes: [`build_for_boot`] loads a kernel; [`build_from_snapshot`] maps a snapshot's
//! memory file and puts the saved vCPU, VM-wide and device state back. Both use the same steps
//! for the VM, the devices, the event loops and the vCPU threads.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

use crate::boot::{self, BootEntry};
use crate::config::{ControlConfig, VmConfig};
use crate::control::ControlServer;
use crate::cpuid;
use crate::device_manager::{DeviceError, DeviceManager, OpenedDevices};
use crate::layout::KVM_TSS_ADDR;
use crate::memory::{self, create_guest_memory, GuestRam};
use crate::platform::{adjust_cmdline, Platform};
use crate::snapshot::{self, SnapshotError};
use crate::vcpu::{self, VcpuContext, VcpuError, VcpuHandle};
use crate::vmm::{main_loop, VirtioLoop, Vmm, VmmState};
use crate::{ExitHandle, VmmError};
use bexar_devices::block::DiskConfig;
use bexar_devices::serial::{self, ConsoleConfig, ConsoleSetup, ConsoleStats};
use bexar_devices::virtio::block::Block;
use bexar_devices::virtio::rng::Rng;
use bexar_util::sync::lock;

/// Builds a VM that boots `config`'s kernel: every device attached, every thread made, every
/// vCPU paused at its entry state. [`Vmm::run_until_exit`] starts it.
pub fn build_for_boot(config: &VmConfig) -> Result<Vmm, VmmError> {
    let start = Instant::now();
    let phase = |name: &str| {
        tracing::debug!(
            "boot phase {name}: {:.3} ms",
            start.elapsed().as_secs_f64() * 1e3
        )
    };
    config.validate()?;
    // Opened now, read after the jail: a kernel image may be a tenant's.
    let files = boot::BootFiles::open(&config.kernel, config.initrd.as_deref())?;
    let host = HostSide::open(
        start,
        (&config.console, config.stdin, config.control.as_ref()),
        &config.disks,
        &config.nics,
        config.vsock.as_ref(),
    )?;
    let mut kept = config.clone();
    fill_formats(&mut kept.disks, &host.devices);
    // Everything the VM needs is open: the process gives up the host (jail.rs).
    host.enter_jail(config.memory_mib << 20)?;
    phase("opened, and jailed");
    let mut cmdline = platform_cmdline(host.platform, config);
    let ram = create_guest_memory(config.memory_mib)?;
    let (parts, control) = host.machine(ram, config, |vm, ram, exit, console, devices| {
        phase("VM, memory and interrupt controllers created");
        attach_devices(vm, ram, config, exit, console, devices)
    })?;
    // The platform description: the MP table, SMBIOS, and where the virtio devices are.
    let described = parts
        .devices
        .describe(&parts.ram.mem, config.vcpus, &config.smbios)
        .map_err(VmmError::Device)?;
    cmdline.push_str(&described);
    phase("devices attached");

    let line = cmdline.clone();
    let vmm = assemble(
        parts,
        kept,
        control,
        move |ram| {
            let entry = boot::prepare(&ram.mem, files, &line)?;
            tracing::debug!(?entry, "kernel loaded, in the jail");
            phase("kernel loaded");
            Ok(entry)
        },
        true,
        cmdline,
    )?;
    phase("vCPUs created");
    Ok(vmm)
}

/// What a restored VM takes from its new process rather than from the snapshot.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// Where its console goes.
    pub console: ConsoleConfig,
    /// Whether stdin feeds the console.
    pub stdin: bool,
    /// Its control socket.
    pub control: Option<ControlConfig>,
    /// Backends in place of the saved ones, for a clone or a VM brought to another host:
    /// `None` keeps what the snapshot names. Given, each list must have one entry per saved
    /// device of its kind, in slot order.
    pub backends: Option<Backends>,
    /// The guest memory (MiB) the launch expects, if it says: what a migration's receiver
    /// sizes its jail's file limit by before the stream says.
    pub memory_mib: Option<u64>,
}

impl RestoreConfig {
    /// A restore with the saved backends, its console on `console`.
    pub fn new(console: ConsoleConfig) -> Self {
        Self {
            console,
            stdin: false,
            control: None,
            backends: None,
            memory_mib: None,
        }
    }

    /// Whether the launch names every backend (the agent's always does): then nothing of the
    /// saved state is read before the jail.
    fn names_backends(&self) -> bool {
        self.backends
            .as_ref()
            .is_some_and(|b| b.disks.is_some() && b.nics.is_some())
    }
}

/// The host-side ends of a restored VM's devices, each kind `None` to keep the saved ones:
/// disk files, TAPs with the MAC each NIC shows, the vsock device's CID and socket. A guest
/// that already read a MAC keeps using it until its driver probes again; the vsock CID it reads
/// again when told its connections are gone, which a restored vsock device does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backends {
    /// One per saved disk, in slot order.
    pub disks: Option<Vec<DiskConfig>>,
    /// One per saved NIC, in slot order.
    pub nics: Option<Vec<bexar_devices::virtio::net::NicConfig>>,
    /// For the saved vsock device.
    pub vsock: Option<bexar_devices::virtio::vsock::VsockConfig>,
}

/// Puts `backends` in place of the saved ones, in the saved devices and in the configuration.
fn rebind(saved: &mut snapshot::SnapshotState, backends: &Backends) -> Result<(), VmmError> {
    use bexar_devices::virtio::DeviceSnapshot;
    let mismatch = |what: &str, given: usize, had: usize| {
        VmmError::Config(crate::config::ConfigError::new(
            what,
            format!("{given} given; the snapshot has {had}"),
        ))
    };
    let config = &mut saved.config;
    if let Some(d) = &backends.disks {
        if d.len() != config.disks.len() {
            return Err(mismatch("disks", d.len(), config.disks.len()));
        }
        config.disks = d.clone();
    }
    if let Some(n) = &backends.nics {
        if n.len() != config.nics.len() {
            return Err(mismatch("nics", n.len(), config.nics.len()));
        }
        config.nics = n.clone();
    }
    if let Some(v) = &backends.vsock {
        if config.vsock.is_none() {
            return Err(mismatch("vsock", 1, 0));
        }
        config.vsock = Some(v.clone());
    } else if backends.disks.is_some() && backends.nics.is_some() && config.vsock.is_some() {
        // A launch that names every backend (the agent's) and no vsock device.
        return Err(mismatch("vsock", 0, 1));
    }
    // Every saved device gets its backend from the configuration just checked, and none is
    // left over: the state file's own device entries (written by a VMM, perhaps a compromised
    // one) never name a file, TAP or socket this VMM opens.
    let (mut disks, mut nics) = (config.disks.iter(), config.nics.iter());
    let extra = |what: &str| {
        VmmError::Restore(format!(
            "the snapshot's devices hold more {what} than its configuration"
        ))
    };
    for slot in &mut saved.devices.virtio {
        match &mut slot.device {
            DeviceSnapshot::Block(b) => {
                b.disk = disks.next().ok_or_else(|| extra("disks"))?.clone()
            }
            DeviceSnapshot::Net(n) => n.nic = nics.next().ok_or_else(|| extra("NICs"))?.clone(),
            DeviceSnapshot::Vsock(v) => {
                v.config = config.vsock.clone().ok_or_else(|| extra("vsock devices"))?
            }
            DeviceSnapshot::Rng(_) => {}
        }
    }
    if disks.next().is_some() || nics.next().is_some() {
        return Err(VmmError::Restore(
            "the snapshot's configuration holds devices its device list does not".into(),
        ));
    }
    Ok(())
}

/// Builds a VM from snapshot directory `dir` ([`crate::snapshot`]): guest memory is the memory
/// file mapped privately (nothing is read until the guest touches a page), every device is
/// built again on its reopened backend at the slot it had, and the vCPUs and the VM-wide state
/// are loaded. The VM is returned paused; [`Vmm::run_until_exit`] resumes it where it was.
/// Nothing is half-restored: an error leaves no VM (and the snapshot files unchanged).
///
/// The state is read once the process is jailed, like every restore's ([`HostSide`]); a
/// restore whose launch does not name its backends learns them from the state, which is then
/// read first.
pub fn build_from_snapshot(dir: &Path, restore: &RestoreConfig) -> Result<Vmm, VmmError> {
    let state = snapshot::open_state(dir)?;
    let path = snapshot::memory_path(dir);
    let memory = bexar_util::handed::file(&path, false, || std::fs::File::open(&path))
        .map_err(|err| SnapshotError::Io { path, err })?;
    let (host, state) = if restore.names_backends() {
        (HostSide::for_restore(restore, None)?, Saved::Unread(state))
    } else {
        let mut s = state.read()?;
        rebind(
            &mut s,
            restore.backends.as_ref().unwrap_or(&Backends::default()),
        )?;
        (
            HostSide::for_restore(restore, Some(&s.config))?,
            Saved::Read(Box::new(s)),
        )
    };
    let size = memory.metadata().map(|m| m.len()).unwrap_or(0);
    host.enter_jail(size)?;
    let saved = state.read()?;
    tracing::info!("snapshot state read{}", crate::jail::in_jail());
    host.restore(saved, restore, Memory::File(memory), None)
}

/// Builds the VM another VMM handed over (live upgrade): its state from `dir`, its memory the
/// descriptor that VMM sent (mapped shared: the same pages, nothing copied), paused by it at
/// `paused_at_ns` (`CLOCK_MONOTONIC`). Returned paused, like [`build_from_snapshot`].
pub fn build_from_handoff(
    dir: &Path,
    restore: &RestoreConfig,
    memory: std::fs::File,
    paused_at_ns: u64,
) -> Result<Vmm, VmmError> {
    let state = snapshot::open_state(dir)?;
    let host = HostSide::for_restore(restore, None)?;
    host.enter_jail(memory.metadata().map(|m| m.len()).unwrap_or(0))?;
    let state = state.read()?;
    tracing::info!("handed-over state read{}", crate::jail::in_jail());
    // Saved by the VMM that handed over, on this host's clock (one older than these readings
    // paused the guest just before it saved it).
    let saved_at = state.vm.saved_at_ns.or(Some(paused_at_ns));
    let mut vmm = host.restore(state, restore, Memory::Memfd(memory), saved_at)?;
    vmm.handed_over = Some((paused_at_ns, None));
    Ok(vmm)
}

/// Builds the VM a live migration brings: `receive` ([`crate::migration::receive`] on the
/// caller's stream) runs once the process is jailed, writing the VM's disks through the
/// targets it is given, and returns its memory (a memfd the stream filled) and state, paused
/// by the sender at `paused_at_ns` (carried over to this host's `CLOCK_MONOTONIC`, see
/// [`crate::migration::Received`]). The disks, NICs and vsock socket are the launch's; a
/// launch that names none receives a VM with none. Returned paused.
pub fn build_from_migration(
    restore: &RestoreConfig,
    receive: impl FnOnce(
        &[Option<bexar_devices::block::copy::CopyTarget>],
    ) -> Result<crate::migration::Received, crate::migration::MigrationError>,
) -> Result<Vmm, VmmError> {
    let mut restore = restore.clone();
    let b = restore.backends.get_or_insert_with(Backends::default);
    b.disks.get_or_insert_with(Vec::new);
    b.nics.get_or_insert_with(Vec::new);
    let host = HostSide::for_restore(&restore, None)?;
    let memory = restore
        .memory_mib
        .unwrap_or(crate::config::MAX_MEMORY_MIB)
        .saturating_mul(1 << 20);
    host.enter_jail(memory)?;
    let targets = host
        .devices
        .disks
        .iter()
        .map(bexar_devices::block::copy::CopyTarget::on)
        .collect::<Result<Vec<_>, _>>()
        .map_err(crate::migration::MigrationError::from)?;
    let received = receive(&targets)?;
    // The targets' metadata is written back; the disks' backends are made on the same files.
    drop(targets);
    tracing::info!(
        "received {} pages of a {} MiB guest and {} disk bytes in {:.1} ms{}",
        received.pages,
        received.memory_mib,
        received.disk_bytes,
        received.elapsed.as_secs_f64() * 1e3,
        crate::jail::in_jail()
    );
    let mut vmm = host.restore(
        received.state,
        &restore,
        Memory::Memfd(received.memory),
        received.saved_at_ns,
    )?;
    vmm.handed_over = Some((received.paused_at_ns, None));
    // The console goes on where it was: its log and attach replay begin with the output the
    // guest wrote on the sender (a console that cannot take it loses only the history).
    if let Some(uart) = vmm.devices.uart() {
        if let Err(e) = lock(uart).writer_mut().replay_earlier(&received.console) {
            tracing::warn!("the guest's earlier console output is not in this console: {e}");
        }
    }
    // The NICs are on another host's bridges now: they say so before the guest runs, and four
    // times more at growing intervals (50, 150, 250 and 350 ms, as QEMU spaces its
    // announcements), in case a frame was lost or a bridge on the way was not ready.
    if vmm.devices.announce() > 0 {
        let now = std::time::Instant::now();
        let mut at = Duration::ZERO;
        for gap in [50, 150, 250, 350] {
            at += Duration::from_millis(gap);
            vmm.announce_at.push_back(now + at);
        }
    }
    Ok(vmm)
}

/// A snapshot's state, read before the jail only when it had to be.
enum Saved {
    /// Opened, to be read in the jail.
    Unread(snapshot::StateFile),
    /// Read already (its backends rebound): it named what the launch did not.
    Read(Box<snapshot::SnapshotState>),
}

impl Saved {
    fn read(self) -> Result<snapshot::SnapshotState, VmmError> {
        match self {
            Self::Unread(f) => Ok(f.read()?),
            Self::Read(s) => Ok(*s),
        }
    }
}

/// Where a restored VM's memory comes from.
enum Memory {
    /// A snapshot's memory file, mapped privately (read as the guest touches it).
    File(std::fs::File),
    /// Another VMM's memfd, or one a migration filled, mapped shared.
    Memfd(std::fs::File),
}

/// What a restored VM's process opens with the host's rights, before its jail: /dev/kvm, the
/// console, the control socket, and each device's backend (a disk's files, a NIC's TAP, the
/// vsock socket), all named by the launch. The saved state (a snapshot's, a handed-over VM's,
/// a migration stream), which a compromised VMM may have written, is read only after
/// [`HostSide::enter_jail`]; so is every image's metadata.
struct HostSide {
    start: Instant,
    /// What /dev/kvm is (read from sysfs, which the jail does not have).
    platform: Platform,
    kvm: Kvm,
    /// What KVM supports here, asked before the jail: the query costs ~1 ms on this machine
    /// (each leaf a CPUID the host's hypervisor answers), which overlaps the making of the
    /// jail's network namespace on another thread ([`crate::jail::arm`]).
    supported: kvm_bindings::CpuId,
    stats: Arc<ConsoleStats>,
    console: serial::Console,
    control: Option<ControlServer>,
    devices: OpenedDevices,
}

impl HostSide {
    /// Opens what `restore` names (its backends, or `saved`'s where it names none).
    fn for_restore(restore: &RestoreConfig, saved: Option<&VmConfig>) -> Result<Self, VmmError> {
        let named = restore.backends.clone().unwrap_or_default();
        let disks = named
            .disks
            .or_else(|| saved.map(|c| c.disks.clone()))
            .unwrap_or_default();
        let nics = named
            .nics
            .or_else(|| saved.map(|c| c.nics.clone()))
            .unwrap_or_default();
        let vsock = named.vsock.or_else(|| saved.and_then(|c| c.vsock.clone()));
        VmConfig::check_disk_files(&disks)?;
        Self::open(
            Instant::now(),
            (&restore.console, restore.stdin, restore.control.as_ref()),
            &disks,
            &nics,
            vsock.as_ref(),
        )
    }

    /// Opens /dev/kvm, the console (its config, whether stdin feeds it, the control socket)
    /// and the backends of `disks`, `nics` and `vsock`.
    fn open(
        start: Instant,
        (console, stdin, control): (&ConsoleConfig, bool, Option<&ControlConfig>),
        disks: &[DiskConfig],
        nics: &[bexar_devices::virtio::net::NicConfig],
        vsock: Option<&bexar_devices::virtio::vsock::VsockConfig>,
    ) -> Result<Self, VmmError> {
        let platform = Platform::detect();
        let kvm = open_kvm()?;
        let supported = cpuid::supported(&kvm, platform)
            .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let stats = ConsoleStats::new(start);
        let console = serial::build(ConsoleSetup {
            config: console,
            stdin,
            stats: stats.clone(),
        })
        .map_err(DeviceError::from)?;
        let control = bind_control(control)?;
        let devices = OpenedDevices::open(disks, nics, vsock)?;
        Ok(Self {
            start,
            platform,
            kvm,
            supported,
            stats,
            console,
            control,
            devices,
        })
    }

    /// Enters the armed jail, its file limit sized by `memory` bytes and the disks opened.
    fn enter_jail(&self, memory: u64) -> Result<(), VmmError> {
        crate::jail::dial_for(
            self.devices
                .disks
                .iter()
                .filter_map(|d| d.config().remote_server())
                .collect(),
        )?;
        enter_jail(file_size_limit(memory, &self.devices))
    }

    /// The VM on `ram` with the devices `attach` makes on what was opened (the console, the
    /// devices' backends), and the control socket.
    fn machine(
        self,
        ram: GuestRam,
        config: &VmConfig,
        attach: impl FnOnce(
            &VmFd,
            &GuestRam,
            &ExitHandle,
            serial::Console,
            OpenedDevices,
        ) -> Result<DeviceManager, VmmError>,
    ) -> Result<(Parts, Option<ControlServer>), VmmError> {
        let Self {
            start,
            platform,
            kvm,
            supported,
            stats,
            console,
            control,
            devices,
        } = self;
        let parts = machine(
            (kvm, supported),
            ram,
            config,
            platform,
            start,
            stats,
            |vm, ram, exit| attach(vm, ram, exit, console, devices),
        )?;
        Ok((parts, control))
    }

    /// Builds the VM `saved` describes on what was opened, in the jail. `saved_at_ns`: for a
    /// guest that lived through the time since its state was saved (a handover, a migration),
    /// when that was on this host's `CLOCK_MONOTONIC`: its clocks are moved on by the time
    /// since ([`crate::vm_state::VmState::advance`]). `None` for a snapshot.
    fn restore(
        self,
        mut saved: snapshot::SnapshotState,
        restore: &RestoreConfig,
        memory: Memory,
        saved_at_ns: Option<u64>,
    ) -> Result<Vmm, VmmError> {
        rebind(
            &mut saved,
            restore.backends.as_ref().unwrap_or(&Backends::default()),
        )?;
        let mut config = VmConfig {
            console: restore.console.clone(),
            stdin: restore.stdin,
            control: restore.control.clone(),
            ..saved.config.clone()
        };
        fill_formats(&mut config.disks, &self.devices);
        config.validate_restored()?;
        if saved.vcpus.len() != usize::from(config.vcpus) {
            return Err(VmmError::Restore(format!(
                "{} vCPU states for a VM of {} vCPUs",
                saved.vcpus.len(),
                config.vcpus
            )));
        }
        if saved.memory.size != config.memory_mib << 20 {
            return Err(VmmError::Restore(format!(
                "{} bytes of memory saved for a VM of {} MiB",
                saved.memory.size, config.memory_mib
            )));
        }
        let restored_from_file = matches!(memory, Memory::File(_));
        let ram = match memory {
            Memory::Memfd(memfd) => memory::map_ram_memfd(memfd, config.memory_mib)?,
            Memory::File(file) => memory::map_ram_file(file, config.memory_mib)?,
        };
        let start = self.start;
        let (parts, control) =
            self.machine(ram, &config, |vm, ram, exit, console, mut opened| {
                restore_devices(vm, ram, console, exit, &saved.devices, &mut opened)
            })?;
        let entry = saved.entry;
        let mut vmm = assemble(
            parts,
            config,
            control,
            move |_| Ok(entry),
            false,
            saved.cmdline,
        )?;
        if restored_from_file {
            // A VM that may now exist twice (a clone, or the same snapshot restored again)
            // gets a new generation ID; a handover is the same VM going on.
            if let Some(g) = boot::smbios::new_generation(&vmm.ram.mem)? {
                tracing::debug!("VM generation ID {g:032x}");
            }
        }
        vmm.state = VmmState::Paused;
        // Last before loading: the time since the state was saved is measured as late as it
        // can be.
        let advance_ns = saved_at_ns.map_or(0, |at| {
            saved
                .vm
                .advance(crate::control::monotonic_ns().saturating_sub(at))
        });
        if advance_ns > 0 {
            tracing::debug!(
                "guest clocks advanced {:.3} ms (the pause)",
                advance_ns as f64 / 1e6
            );
        }
        vmm.restore_vm_state(&saved.vm)?;
        vmm.restore_vcpus(saved.vcpus, advance_ns)?;
        vmm.devices.notify_restored();
        tracing::debug!("restored in {:.3} ms", start.elapsed().as_secs_f64() * 1e3);
        Ok(vmm)
    }
}

/// Records in `disks` the format of each image `opened` (in the same order) found, where the
/// disk does not say: a jailed VMM cannot look at a file by its path again, and what it does
/// with a disk later (refusing to move a writable qcow2 image without copying it) depends on
/// the format.
fn fill_formats(disks: &mut [DiskConfig], opened: &OpenedDevices) {
    for (d, o) in disks.iter_mut().zip(&opened.disks) {
        if d.format.is_none() {
            d.format = o.local().map(|(f, _)| f);
        }
    }
}

/// /dev/kvm, as the agent handed it or opened here.
fn open_kvm() -> Result<Kvm, VmmError> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    match bexar_util::handed::take(&bexar_util::handed::What::Kvm) {
        None => Kvm::new().map_err(VmmError::KvmOpen),
        Some(fd) => {
            let fd = fd.map_err(VmmError::KvmNotHanded)?;
            // SAFETY: `fd` is a descriptor of /dev/kvm this process owns (a copy of the one
            // the agent handed it), given up here to the Kvm object, which closes it.
            Ok(unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) })
        }
    }
}

/// Binds the control socket, if the VM has one.
fn bind_control(control: Option<&ControlConfig>) -> Result<Option<ControlServer>, VmmError> {
    control
        .map(|c| {
            ControlServer::bind(&c.socket).map_err(|err| VmmError::Control {
                path: c.socket.clone(),
                err,
            })
        })
        .transpose()
}

/// Enters the armed jail, if any: from here the process has given up the host ([`crate::jail`]).
fn enter_jail(file_bytes: u64) -> Result<(), VmmError> {
    // Everything is open: what the agent handed and nothing took is closed, not kept in the
    // jail.
    let by_path = bexar_util::handed::opened_by_path();
    if !by_path.is_empty() {
        tracing::info!("opened by path, not handed: {by_path:?}");
    }
    bexar_util::handed::close_all();
    // Remote disks reconnect to the addresses their servers' names resolved to before.
    bexar_devices::block::remote::pin_resolved();
    crate::jail::enter_armed(file_bytes)?;
    Ok(())
}

/// What both recipes make before the vCPUs: the VM, its memory, its devices.
struct Parts {
    kvm: Kvm,
    supported: kvm_bindings::CpuId,
    vm: VmFd,
    ram: GuestRam,
    devices: DeviceManager,
    exit: ExitHandle,
    console: Arc<ConsoleStats>,
    platform: Platform,
    start: Instant,
}

/// The VM on `ram` with its interrupt controllers and the devices `attach` makes: what both
/// recipes build before the vCPUs, on /dev/kvm and a console clock opened before.
fn machine(
    (kvm, supported): (Kvm, kvm_bindings::CpuId),
    ram: GuestRam,
    config: &VmConfig,
    platform: Platform,
    start: Instant,
    console: Arc<ConsoleStats>,
    attach: impl FnOnce(&VmFd, &GuestRam, &ExitHandle) -> Result<DeviceManager, VmmError>,
) -> Result<Parts, VmmError> {
    let vm = create_vm(&kvm, &ram, config.legacy_pit)?;
    crate::teardown::hand_to_keeper(&vm);
    let exit = ExitHandle::new().map_err(|err| VmmError::Start {
        what: "exit eventfd",
        err,
    })?;
    let devices = attach(&vm, &ram, &exit)?;
    Ok(Parts {
        kvm,
        supported,
        vm,
        ram,
        devices,
        exit,
        console,
        platform,
        start,
    })
}

/// The event loops and the vCPU threads around `parts` and its `control` socket, in the jail:
/// the boot vCPU set at the entry `load` gives (it reads the kernel) if `at_entry`, else every
/// vCPU waits for its saved state.
fn assemble(
    parts: Parts,
    config: VmConfig,
    control: Option<ControlServer>,
    load: impl FnOnce(&GuestRam) -> Result<BootEntry, VmmError>,
    at_entry: bool,
    cmdline: String,
) -> Result<Vmm, VmmError> {
    let Parts {
        kvm,
        supported,
        vm,
        ram,
        mut devices,
        exit,
        console,
        platform,
        start,
    } = parts;
    let control = control.map(|c| Arc::new(Mutex::new(c)));
    let (main_loop, console_input) = main_loop(&exit, &devices, control.as_ref())?;
    // The process gave up the host before (its caller entered the jail), before its first
    // thread; each thread below installs its seccomp filter as it starts.
    debug_assert!(crate::jail::armed().is_none() || crate::jail::entered().is_some());
    let entry = load(&ram)?;
    // The vCPUs first: their threads end by themselves if a later step fails (they are
    // parked, and their channels close), the virtio loop's would not.
    let completed = Arc::new(AtomicU64::new(0));
    let vcpus = create_vcpus(
        &supported,
        &vm,
        &ram,
        &config,
        at_entry.then_some(&entry),
        &exit,
        &completed,
        &devices,
    )?;
    let virtio_loop = if devices.has_virtio() {
        Some(VirtioLoop::spawn(devices.take_virtio_subscribers(), &exit)?)
    } else {
        // No devices, no loop: a thread to start and to join costs ~0.1 ms here.
        None
    };
    // Last, now that no other thread is to be made from here: the main thread's own filter
    // (it would be inherited by, and stacked on, any thread made after it).
    crate::seccomp::install(crate::threads::ThreadKind::Vmm)?;
    Ok(Vmm {
        kvm,
        config,
        platform,
        start,
        entry,
        cmdline,
        vm,
        ram,
        devices,
        vcpus,
        completed,
        virtio_loop,
        main_loop,
        console_input,
        control,
        exit,
        console,
        state: VmmState::Created,
        running: None,
        handoff_memory: None,
        handed_off: false,
        handed_over: None,
        announce_at: Default::default(),
        in_doubt: false,
    })
}

/// RLIMIT_FSIZE for a jailed VMM: no file it writes (a disk image growing, a snapshot's
/// memory) needs more than twice the larger of guest memory (`memory` bytes) and its largest
/// disk, plus 1 GiB for qcow2 metadata and snapshot state.
fn file_size_limit(memory: u64, opened: &OpenedDevices) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut largest = memory;
    for (format, files) in opened.disks.iter().filter_map(|d| d.local()) {
        let Some((_, f)) = files.first() else {
            continue;
        };
        let mut size = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut virt = [0u8; 8];
        if format == bexar_devices::block::DiskFormat::Qcow2
            && f.read_exact_at(&mut virt, 24).is_ok()
        {
            // A qcow2 file grows towards its virtual size (bytes 24..32, big-endian).
            size = size.max(u64::from_be_bytes(virt));
        }
        largest = largest.max(size);
    }
    largest.saturating_mul(2).saturating_add(1 << 30)
}

/// The caller's command line with the parameters this platform needs (PVM), logged when added.
fn platform_cmdline(platform: Platform, config: &VmConfig) -> String {
    if !config.platform_params {
        return config.cmdline.clone();
    }
    let cmdline = adjust_cmdline(platform, &config.cmdline);
    if cmdline != config.cmdline {
        tracing::info!(
            "{} host detected: CPUID masks have no effect here, so the guest kernel gets: {}",
            platform.name(),
            cmdline[config.cmdline.len()..].trim()
        );
    }
    cmdline
}

/// The VM with its memory and in-kernel interrupt controllers.
#[inline(never)]
fn create_vm(kvm: &Kvm, ram: &GuestRam, legacy_pit: bool) -> Result<VmFd, VmmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;
    // Memory first: registering a slot after KVM_CREATE_IRQCHIP waits for an expedited SRCU
    // grace period behind the irqchip's own (measured 5-11 ms on PVM, ~0.03 ms this way round).
    memory::register(&vm, ram)?;
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    if legacy_pit {
        // Only for guests that need an i8254: KVM's PIT runs a kernel worker whose shutdown
        // costs ~15 ms of VM teardown on PVM, and Linux guests use the LAPIC TSC-deadline timer
        // and kvm-clock without it.
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;
    }
    Ok(vm)
}

/// The legacy devices, then every virtio device in slot order: disks (the first is
/// /dev/vda), NICs, the entropy device, vsock; each on the backend `opened` before the jail
/// (a disk's image is parsed here).
#[inline(never)]
fn attach_devices(
    vm: &VmFd,
    ram: &GuestRam,
    config: &VmConfig,
    exit: &ExitHandle,
    console: serial::Console,
    mut opened: OpenedDevices,
) -> Result<DeviceManager, VmmError> {
    let mut dm = attach_legacy(vm, console, exit)?;
    let mem = &ram.mem;
    let missing = |what: &str| VmmError::Restore(format!("no {what} was opened for the VM"));
    for disk in &config.disks {
        let o = opened.disks.pop_front().ok_or_else(|| missing("disk"))?;
        let backend = bexar_devices::block::open_disk_from(o).map_err(DeviceError::from)?;
        let b = Block::with_backend(disk, backend).map_err(DeviceError::from)?;
        tracing::debug!(disk = %disk.path.display(), "virtio-blk on {:?}", b);
        dm.attach_virtio(vm, mem, b)?;
    }
    for _ in &config.nics {
        let n = opened.nics.pop_front().ok_or_else(|| missing("TAP"))?;
        dm.attach_virtio(vm, mem, n)?;
    }
    if config.rng {
        dm.attach_virtio(vm, mem, Rng::new().map_err(DeviceError::Rng)?)?;
    }
    if config.vsock.is_some() {
        let v = opened.vsock.take().ok_or_else(|| missing("vsock socket"))?;
        dm.attach_virtio(vm, mem, v)?;
    }
    Ok(dm)
}

/// COM1 on `console`, the i8042 and the exit port: the same for a boot and a restore.
fn attach_legacy(
    vm: &VmFd,
    console: serial::Console,
    exit: &ExitHandle,
) -> Result<DeviceManager, VmmError> {
    let mut dm = DeviceManager::new();
    dm.attach_console(vm, console)?;
    dm.attach_i8042(vm, exit)?;
    dm.attach_exit_port(exit)?;
    Ok(dm)
}

/// The devices of a snapshot: the legacy ones as at boot with their saved state, then every
/// virtio device in slot order, on the backends `opened` before the jail, with its saved
/// state put on it. A backend opened and not claimed by a saved device is an error.
fn restore_devices(
    vm: &VmFd,
    ram: &GuestRam,
    console: serial::Console,
    exit: &ExitHandle,
    saved: &crate::device_manager::DevicesState,
    opened: &mut OpenedDevices,
) -> Result<DeviceManager, VmmError> {
    let mut dm = attach_legacy(vm, console, exit)?;
    dm.restore_legacy(saved)?;
    for slot in &saved.virtio {
        dm.restore_virtio(vm, &ram.mem, slot, opened)?;
    }
    if !opened.disks.is_empty() || !opened.nics.is_empty() || opened.vsock.is_some() {
        return Err(VmmError::Restore(
            "the launch names more devices than the saved VM has".into(),
        ));
    }
    Ok(dm)
}

/// One thread per vCPU, each configured (CPUID per vCPU, boot MSRs, FPU, LAPIC LINT pins; the
/// boot vCPU gets the entry registers, the others wait for INIT-SIPI like real APs) and
/// paused.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn create_vcpus(
    supported: &kvm_bindings::CpuId,
    vm: &VmFd,
    ram: &GuestRam,
    config: &VmConfig,
    entry: Option<&BootEntry>,
    exit: &ExitHandle,
    completed: &Arc<AtomicU64>,
    devices: &DeviceManager,
) -> Result<Vec<VcpuHandle>, VmmError> {
    vcpu::install_kick_handler().map_err(|err| VmmError::Start {
        what: "vCPU kick handler",
        err,
    })?;
    let (pio, mmio) = devices.freeze();
    let mut handles = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VcpuError::Kvm("KVM_CREATE_VCPU", e))?;
        let cpuid = cpuid::for_vcpu(supported, config.cpu_template, id, config.vcpus);
        vcpu::configure(
            &fd,
            &ram.mem,
            &cpuid,
            config.cpu_template.msrs(),
            entry.filter(|_| id == 0),
        )?;
        let ctx = VcpuContext {
            id,
            mem: ram.mem.clone(),
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
            completed: completed.clone(),
        };
        handles.push(VcpuHandle::spawn(fd, ctx)?);
    }
    Ok(handles)
}
