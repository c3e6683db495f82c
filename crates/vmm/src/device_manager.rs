//! The device manager: every device of the VM with its id and resources, the buses they sit
//! on, and the description of them the guest needs (today the kernel command line's
//! `virtio_mmio.device=` entries; ACPI tables later).
//!
//! Devices are attached one kind at a time (`attach_*`). Each takes its port range, MMIO
//! window and GSI from the [`ResourceAllocator`], has its interrupt and notification eventfds
//! registered with KVM, and goes on its bus. virtio devices also go on the virtio event loop.
//! The buses are frozen when the vCPUs start: after that no device can be added.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::smbios::SmbiosIdentity;
use crate::resources::{ResourceAllocator, ResourceError, MMIO_WINDOW};
use crate::{ExitHandle, ExitReason, ExitTrigger};
use bexar_devices::bus::{Bus, BusDevice, BusError};
use bexar_devices::legacy::{
    ExitPort, I8042State, EXIT_PORT, EXIT_PORT_LEN, I8042, I8042_BASE, I8042_KBD_IRQ, I8042_LEN,
};
use bexar_devices::memory::GuestMemoryMmap;
use bexar_devices::serial::{self, ConsoleInput, ConsoleSetup, SerialDevice, Uart, UartState};
use bexar_devices::virtio::block::Block;
use bexar_devices::virtio::net::Net;
use bexar_devices::virtio::rng::Rng;
use bexar_devices::virtio::transport::mmio::{
    MmioInterrupt, MmioState, MmioTransport, QUEUE_NOTIFY,
};
use bexar_devices::virtio::vsock::Vsock;
use bexar_devices::virtio::{
    Counters, DeviceReport, DeviceSnapshot, DiskCopy, PersistError, VirtioDevice,
};
use bexar_devices::IrqTrigger;
use bexar_util::sync::lock;

/// A restored VM's virtio devices as opened before its jail, on the backends its launch names:
/// each kind in slot order. [`DeviceManager::restore_virtio`] takes them one by one as the
/// saved state lists them and puts that state on them.
#[derive(Default)]
pub struct OpenedDevices {
    /// The disks' files or connections (the backend is made, and an image parsed, as each
    /// is restored).
    pub disks: std::collections::VecDeque<bexar_devices::block::OpenedDisk>,
    /// The NICs, each on its TAP.
    pub nics: std::collections::VecDeque<Net>,
    /// The vsock device, listening on its socket.
    pub vsock: Option<Vsock>,
}

impl OpenedDevices {
    /// Opens the backends `disks`, `nics` and `vsock` name.
    pub fn open(
        disks: &[bexar_devices::block::DiskConfig],
        nics: &[bexar_devices::virtio::net::NicConfig],
        vsock: Option<&bexar_devices::virtio::vsock::VsockConfig>,
    ) -> Result<Self, DeviceError> {
        Ok(Self {
            disks: disks
                .iter()
                .map(bexar_devices::block::preopen_disk)
                .collect::<Result<_, _>>()?,
            nics: nics.iter().map(Net::new).collect::<Result<_, _>>()?,
            vsock: vsock.map(Vsock::new).transpose()?,
        })
    }
}

/// A device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No room for it.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// The bus refused it (the buses are frozen once the vCPUs run).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The buses are shared with running vCPUs: no device can be added now.
    #[error("the buses are frozen: devices are added before the vCPUs start")]
    Frozen,
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// An eventfd cannot be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The console cannot be set up.
    #[error(transparent)]
    Console(#[from] bexar_devices::serial::ConsoleError),
    /// A disk cannot be attached.
    #[error(transparent)]
    Block(#[from] bexar_devices::block::BlockError),
    /// A NIC cannot be attached.
    #[error(transparent)]
    Net(#[from] bexar_devices::virtio::net::NetError),
    /// The vsock device cannot be attached.
    #[error(transparent)]
    Vsock(#[from] bexar_devices::virtio::vsock::VsockError),
    /// The entropy device cannot be made.
    #[error("cannot create virtio-rng: {0}")]
    Rng(std::io::Error),
    /// The platform description cannot be written into guest memory.
    #[error("cannot write the platform description: {0}")]
    Describe(#[from] crate::boot::BootError),
    /// A device cannot be saved for a snapshot.
    #[error("device {0} cannot be saved in a snapshot")]
    Unsaveable(String),
    /// A saved device state cannot be brought back.
    #[error("device {id}: {err}")]
    Persist {
        /// The device.
        id: String,
        /// Why.
        err: PersistError,
    },
    /// The saved devices do not fit the VM being restored.
    #[error("the saved devices do not fit: {0}")]
    Layout(String),
}

impl DeviceError {
    /// Whether the caller's input is at fault (a missing disk, a TAP that does not exist).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Console(_)
                | Self::Block(_)
                | Self::Net(_)
                | Self::Vsock(_)
                | Self::Resource(_)
                | Self::Persist { .. }
                | Self::Layout(_)
        )
    }
}

/// Where a device sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its id (`com1`, `block0`, `net1`...), unique in the VM.
    pub id: String,
    /// I/O ports (base, length).
    pub ports: Option<(u64, u64)>,
    /// MMIO window (base, length).
    pub mmio: Option<(u64, u64)>,
    /// Interrupt line.
    pub gsi: Option<u32>,
}

/// A virtio device as the manager keeps it.
struct VirtioEntry {
    info: DeviceInfo,
    kind: &'static str,
    counters: Arc<Counters>,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    transport: Arc<Mutex<MmioTransport>>,
    link: Option<Arc<bexar_devices::block::LinkState>>,
}

/// Every device's state, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1: registers, receive FIFO, interrupt state.
    pub uart: Option<UartState>,
    /// Console input read from its source that waited for FIFO room.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub console_pending: Vec<u8>,
    /// The i8042.
    pub i8042: Option<I8042State>,
    /// The virtio devices in slot order.
    pub virtio: Vec<VirtioSlotState>,
}

/// One virtio device as saved: where it sat, its transport's registers and its own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSlotState {
    /// Its id (`block0`...).
    pub id: String,
    /// Base of its MMIO window.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub gsi: u32,
    /// The virtio-mmio registers.
    pub transport: MmioState,
    /// The device.
    pub device: DeviceSnapshot,
}

/// The i8042 as the VMM builds it.
pub type Keyboard = I8042<IrqTrigger, ExitTrigger>;

/// Every device of a VM.
pub struct DeviceManager {
    resources: ResourceAllocator,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    devices: Vec<DeviceInfo>,
    virtio: Vec<VirtioEntry>,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    uart: Option<Arc<Mutex<Uart>>>,
    console_input: Option<Arc<Mutex<ConsoleInput>>>,
    keyboard: Option<Arc<Mutex<Keyboard>>>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self {
            resources: ResourceAllocator::new(),
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            devices: Vec::new(),
            virtio: Vec::new(),
            subscribers: Vec::new(),
            uart: None,
            console_input: None,
            keyboard: None,
        }
    }

    fn pio_mut(&mut self) -> Result<&mut Bus, DeviceError> {
        Arc::get_mut(&mut self.pio).ok_or(DeviceError::Frozen)
    }

    fn mmio_mut(&mut self) -> Result<&mut Bus, DeviceError> {
        Arc::get_mut(&mut self.mmio).ok_or(DeviceError::Frozen)
    }

    /// Puts a device at the fixed ports `[base, base + len)`.
    fn attach_ports(
        &mut self,
        id: &str,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
        gsi: Option<u32>,
    ) -> Result<(), DeviceError> {
        self.resources.ports(base, len)?;
        self.pio_mut()?.insert(dev, base, len)?;
        self.devices.push(DeviceInfo {
            id: id.to_owned(),
            ports: Some((base, len)),
            mmio: None,
            gsi,
        });
        Ok(())
    }

    fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, DeviceError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&evt, gsi)
            .map_err(|e| DeviceError::Kvm("KVM_IRQFD", e))?;
        Ok(evt)
    }

    /// COM1 (ports 0x3f8-0x3ff, ISA IRQ 4) with its console.
    pub fn attach_serial(&mut self, vm: &VmFd, setup: ConsoleSetup<'_>) -> Result<(), DeviceError> {
        self.attach_console(vm, serial::build(setup)?)
    }

    /// COM1 on a console built before ([`serial::build`]: where its output goes is opened
    /// there).
    pub fn attach_console(
        &mut self,
        vm: &VmFd,
        console: serial::Console,
    ) -> Result<(), DeviceError> {
        vm.register_irqfd(&console.irq, serial::COM1_IRQ)
            .map_err(|e| DeviceError::Kvm("KVM_IRQFD", e))?;
        self.attach_ports(
            "com1",
            Arc::new(Mutex::new(SerialDevice(console.uart.clone()))),
            serial::COM1_BASE,
            serial::COM1_LEN,
            Some(serial::COM1_IRQ),
        )?;
        self.uart = Some(console.uart);
        self.console_input = console.input.map(|i| Arc::new(Mutex::new(i)));
        Ok(())
    }

    /// The i8042 (ports 0x60-0x64, keyboard on ISA IRQ 1): its reset line ends the VM.
    pub fn attach_i8042(&mut self, vm: &VmFd, exit: &ExitHandle) -> Result<(), DeviceError> {
        let irq = Self::irqfd(vm, I8042_KBD_IRQ)?;
        let kbd = Arc::new(Mutex::new(I8042::new(
            IrqTrigger(irq),
            ExitTrigger {
                exit: exit.clone(),
                reason: ExitReason::Reset,
            },
        )));
        self.attach_ports(
            "i8042",
            kbd.clone(),
            I8042_BASE,
            I8042_LEN,
            Some(I8042_KBD_IRQ),
        )?;
        self.keyboard = Some(kbd);
        Ok(())
    }

    /// The exit port (0xf4): a status written there ends the VM.
    pub fn attach_exit_port(&mut self, exit: &ExitHandle) -> Result<(), DeviceError> {
        let exit = exit.clone();
        let port = ExitPort(move |code| exit.request(ExitReason::GuestStatus(code)));
        self.attach_ports(
            "exit-port",
            Arc::new(Mutex::new(port)),
            EXIT_PORT,
            EXIT_PORT_LEN,
            None,
        )
    }

    /// A virtio device behind the MMIO transport, in the next free window with the next free
    /// GSI: its irqfd on the GSI, one ioeventfd per queue on QueueNotify (matched on the queue
    /// index), the transport on the MMIO bus, the device on the virtio event loop. Returns its
    /// id (`KINDn`).
    pub fn attach_virtio<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        dev: D,
    ) -> Result<String, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let kind = dev.kind();
        let n = self.virtio.iter().filter(|v| v.kind == kind).count();
        let id = format!("{kind}{n}");
        let base = self.resources.mmio_window()?;
        let gsi = self.resources.gsi()?;
        let interrupt = Arc::new(MmioInterrupt::new(Self::irqfd(vm, gsi)?));
        for (q, evt) in dev.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                .map_err(|e| DeviceError::Kvm("KVM_IOEVENTFD", e))?;
        }
        let counters = dev.counters().clone();
        let frozen = dev.frozen_flag();
        let link = dev.link();
        let dev = Arc::new(Mutex::new(dev));
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            dev.clone(),
            mem.clone(),
            interrupt,
        )));
        self.mmio_mut()?
            .insert(transport.clone(), base, MMIO_WINDOW)?;
        self.subscribers.push(dev);
        let info = DeviceInfo {
            id: id.clone(),
            ports: None,
            mmio: Some((base, MMIO_WINDOW)),
            gsi: Some(gsi),
        };
        self.devices.push(info.clone());
        self.virtio.push(VirtioEntry {
            info,
            kind,
            counters,
            frozen,
            transport,
            link,
        });
        Ok(id)
    }

    /// Replaces a rate limit of the virtio device `id` (a running VM's disk or NIC).
    pub fn set_rate_limit(
        &self,
        id: &str,
        path: bexar_devices::rate_limiter::LimitedPath,
        limit: bexar_devices::rate_limiter::RateLimitConfig,
    ) -> Result<(), String> {
        let entry = self
            .virtio
            .iter()
            .find(|v| v.info.id == id)
            .ok_or_else(|| format!("no device {id:?}"))?;
        let dev = lock(&entry.transport).device().clone();
        let r = lock(&dev).set_rate_limit(path, limit);
        r
    }

    /// Starts copying every writable local raw disk (see [`VirtioDevice::start_disk_copy`]):
    /// each with its index among the VM's disks (the order of the configuration's `disks`).
    /// On an error nothing stays started.
    pub fn start_disk_copies(&self) -> std::io::Result<Vec<(u32, DiskCopy)>> {
        let mut copies = Vec::new();
        for (i, v) in self.virtio.iter().filter(|v| v.kind == "block").enumerate() {
            let dev = lock(&v.transport).device().clone();
            let started = lock(&dev).start_disk_copy();
            match started {
                None => {}
                Some(Ok(c)) => copies.push((i as u32, c)),
                Some(Err(e)) => {
                    self.stop_disk_copies();
                    return Err(e);
                }
            }
        }
        Ok(copies)
    }

    /// Has every NIC announce itself to the network (after a live migration); how many did.
    pub fn announce(&self) -> usize {
        self.virtio
            .iter()
            .filter(|v| v.kind == "net")
            .filter(|v| {
                let dev = lock(&v.transport).device().clone();
                let sent = lock(&dev).announce();
                sent
            })
            .count()
    }

    /// Stops every disk copy (no more write tracking).
    pub fn stop_disk_copies(&self) {
        for v in self.virtio.iter().filter(|v| v.kind == "block") {
            let dev = lock(&v.transport).device().clone();
            lock(&dev).stop_disk_copy();
        }
    }

    /// Describes the platform to the guest, the way a guest without ACPI learns it: writes the
    /// MP table (the `vcpus` CPUs, the IOAPIC and the routing of its interrupt lines, which
    /// the legacy devices and the GSIs handed out here use) into `mem`, and returns the kernel
    /// command line's entries for the virtio devices ([`Self::kernel_cmdline`]). ACPI tables
    /// will be generated here from the same device list.
    pub fn describe(
        &self,
        mem: &GuestMemoryMmap,
        vcpus: u8,
        identity: &SmbiosIdentity,
    ) -> Result<String, DeviceError> {
        crate::boot::mptable::setup(mem, vcpus)?;
        crate::boot::smbios::setup(mem, identity)?;
        Ok(self.kernel_cmdline())
    }

    /// The guest's view of the virtio devices, for the kernel command line: one
    /// `virtio_mmio.device=SIZE@BASE:GSI` per device, in the order they were attached.
    pub fn kernel_cmdline(&self) -> String {
        self.virtio
            .iter()
            .filter_map(|v| Some((v.info.mmio?, v.info.gsi?)))
            .map(|((base, len), gsi)| format!(" virtio_mmio.device={}K@{base:#x}:{gsi}", len >> 10))
            .collect()
    }

    /// Every device with where it sits.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// The virtio devices' counters.
    pub fn reports(&self) -> Vec<DeviceReport> {
        self.virtio
            .iter()
            .map(|v| {
                let slot = v.info.mmio.map_or(0, |(base, _)| {
                    ((base - crate::layout::VIRTIO_MMIO_BASE) / MMIO_WINDOW) as u32
                });
                let mut r = DeviceReport::new(v.kind, slot, &v.counters);
                r.link = v.link.as_ref().map(|l| l.state().to_owned());
                r
            })
            .collect()
    }

    /// Whether the VM has virtio devices (and so needs the virtio event loop).
    pub fn has_virtio(&self) -> bool {
        !self.virtio.is_empty()
    }

    /// The virtio devices' event-loop subscribers (taken once, by the loop that runs them).
    pub fn take_virtio_subscribers(&mut self) -> Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> {
        std::mem::take(&mut self.subscribers)
    }

    /// The console's input side, for the main event loop.
    pub fn console_input(&self) -> Option<&Arc<Mutex<ConsoleInput>>> {
        self.console_input.as_ref()
    }

    /// The UART (to add console observers, to flush at the end).
    pub fn uart(&self) -> Option<&Arc<Mutex<Uart>>> {
        self.uart.as_ref()
    }

    /// Queues Ctrl+Alt+Del on the i8042; false if it could not be delivered.
    pub fn send_ctrl_alt_del(&self) -> bool {
        self.keyboard
            .as_ref()
            .is_some_and(|k| lock(k).send_ctrl_alt_del())
    }

    /// The buses, shared with the vCPU threads: no device can be added afterwards.
    pub fn freeze(&self) -> (Arc<Bus>, Arc<Bus>) {
        (self.pio.clone(), self.mmio.clone())
    }

    /// Quiesces every device and holds them all still while `then` runs with their state: the
    /// virtio event loop waits for the devices' locks, so neither a device nor its backend
    /// writes guest memory or answers a queue meanwhile (the vCPUs must be paused). In-flight
    /// disk requests are completed first, so the saved rings hold none.
    pub fn save_with<T>(&self, then: impl FnOnce(DevicesState) -> T) -> Result<T, DeviceError> {
        let devs: Vec<_> = self
            .virtio
            .iter()
            .map(|v| lock(&v.transport).device().clone())
            .collect();
        // Transport before device: the order a vCPU's register access takes them in.
        let transports: Vec<_> = self.virtio.iter().map(|v| lock(&v.transport)).collect();
        let mut held: Vec<_> = devs.iter().map(|d| lock(d)).collect();
        let mut virtio = Vec::with_capacity(held.len());
        for ((v, t), d) in self.virtio.iter().zip(&transports).zip(held.iter_mut()) {
            d.quiesce();
            let device = d
                .save_state()
                .ok_or_else(|| DeviceError::Unsaveable(v.info.id.clone()))?;
            virtio.push(VirtioSlotState {
                id: v.info.id.clone(),
                mmio_base: v.info.mmio.map_or(0, |(base, _)| base),
                gsi: v.info.gsi.unwrap_or(0),
                transport: t.save(),
                device,
            });
        }
        let state = DevicesState {
            uart: self.uart.as_ref().map(|u| SerialDevice(u.clone()).state()),
            console_pending: self
                .console_input
                .as_ref()
                .map(|c| lock(c).pending_bytes())
                .unwrap_or_default(),
            i8042: self.keyboard.as_ref().map(|k| lock(k).state()),
            virtio,
        };
        Ok(then(state))
    }

    /// Freezes (`true`) or thaws every virtio device: a frozen device touches neither guest
    /// memory nor its backend, so a VM whose state went to a snapshot to go on elsewhere does
    /// nothing twice (a frame the guest queued is sent by the restored VM only). Takes no
    /// device lock: it is called inside [`Self::save_with`]. Thawing notifies every queue, for
    /// notifications that arrived while frozen.
    pub fn set_frozen(&self, frozen: bool) {
        for v in &self.virtio {
            v.frozen.store(frozen, std::sync::atomic::Ordering::Release);
        }
        if !frozen {
            self.notify_restored();
        }
    }

    /// Puts the legacy devices' saved state back (they are attached as at boot first).
    pub fn restore_legacy(&self, state: &DevicesState) -> Result<(), DeviceError> {
        if let (Some(u), Some(s)) = (&self.uart, &state.uart) {
            SerialDevice(u.clone()).restore(s)?;
        }
        if let (Some(k), Some(s)) = (&self.keyboard, &state.i8042) {
            lock(k)
                .restore(s)
                .map_err(|e| DeviceError::Layout(e.to_string()))?;
        }
        if let Some(c) = &self.console_input {
            lock(c).push_pending(&state.console_pending);
        }
        Ok(())
    }

    /// Builds a saved virtio device again (its backend reopened), attaches it where it sat, and
    /// restores its transport (which activates it again if the driver had). Refused if it would
    /// not land at the same id, window and GSI: the guest's drivers know it there.
    pub fn restore_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        slot: &VirtioSlotState,
        opened: &mut OpenedDevices,
    ) -> Result<(), DeviceError> {
        let persist = |err| DeviceError::Persist {
            id: slot.id.clone(),
            err,
        };
        let missing = |what: &str| DeviceError::Persist {
            id: slot.id.clone(),
            err: PersistError::Backend(format!("no {what} was opened for it")),
        };
        let id = match &slot.device {
            DeviceSnapshot::Block(s) => {
                let disk = opened.disks.pop_front().ok_or_else(|| missing("disk"))?;
                let backend = bexar_devices::block::open_disk_from(disk)?;
                let mut d = Block::with_backend(&s.disk, backend)?;
                d.restore_state(s).map_err(persist)?;
                self.attach_virtio(vm, mem, d)
            }
            DeviceSnapshot::Net(s) => {
                let mut d = opened.nics.pop_front().ok_or_else(|| missing("TAP"))?;
                d.restore_state(s).map_err(persist)?;
                self.attach_virtio(vm, mem, d)
            }
            DeviceSnapshot::Rng(s) => {
                self.attach_virtio(vm, mem, Rng::restore(s).map_err(persist)?)
            }
            DeviceSnapshot::Vsock(s) => {
                let mut d = opened.vsock.take().ok_or_else(|| missing("vsock socket"))?;
                d.restore_state(s).map_err(persist)?;
                self.attach_virtio(vm, mem, d)
            }
        }?;
        let Some(entry) = self.virtio.last() else {
            return Err(DeviceError::Layout(format!("{} was not attached", slot.id)));
        };
        let at = (entry.info.mmio.map(|(b, _)| b), entry.info.gsi);
        if id != slot.id || at != (Some(slot.mmio_base), Some(slot.gsi)) {
            return Err(DeviceError::Layout(format!(
                "{} at {:#x} GSI {} was saved; it came back as {id} at {:?}",
                slot.id, slot.mmio_base, slot.gsi, at
            )));
        }
        lock(&entry.transport)
            .restore(&slot.transport)
            .map_err(persist)
    }

    /// What of the host the devices hold that a VMM taking the VM over gets as it is
    /// ([`VirtioDevice::host_descriptors`]), and the console's listening socket.
    pub fn host_descriptors(
        &self,
        console_socket: Option<&std::path::Path>,
    ) -> Vec<(bexar_util::handed::What, std::os::fd::RawFd)> {
        let mut out = Vec::new();
        for v in &self.virtio {
            let dev = lock(&v.transport).device().clone();
            out.extend(lock(&dev).host_descriptors());
        }
        if let (Some(path), Some(input)) = (console_socket, &self.console_input) {
            if let Some(fd) = lock(input).listener_fd() {
                out.push((
                    bexar_util::handed::What::Listener {
                        path: path.to_owned(),
                    },
                    fd,
                ));
            }
        }
        out
    }

    /// Notifies every active virtio device once on each queue, as the guest would: a restored
    /// device looks at the rings the guest filled before the snapshot (frames to send, buffers
    /// to receive into), which the guest will not announce again; and raises again the
    /// interrupts the drivers had not acknowledged. A restore calls it last, once the VMM is
    /// in its jail and the VM's interrupt controllers hold their saved state: a restored
    /// device serves and raises nothing before (`ActivationContext::restored`).
    pub fn notify_restored(&self) {
        for v in &self.virtio {
            let transport = lock(&v.transport);
            transport.raise_restored();
            let dev = transport.device().clone();
            drop(transport);
            let d = lock(&dev);
            if d.common().is_active() {
                d.common().notify_queues();
            }
        }
    }

    /// Accesses to addresses no device claims, on both buses.
    pub fn unhandled(&self) -> u64 {
        self.pio.unhandled() + self.mmio.unhandled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bexar_devices::serial::{ConsoleConfig, ConsoleStats};

    fn vm() -> Option<VmFd> {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        let vm = kvm.create_vm().ok()?;
        vm.create_irq_chip().ok()?;
        Some(vm)
    }

    #[test]
    fn devices_get_their_resources_and_the_guest_its_description() {
        let Some(vm) = vm() else {
            eprintln!("no /dev/kvm here: skipped");
            return;
        };
        let mem = crate::memory::create_guest_memory(4).unwrap().mem;
        let exit = ExitHandle::new().unwrap();
        let mut dm = DeviceManager::new();
        dm.attach_serial(
            &vm,
            ConsoleSetup {
                config: &ConsoleConfig::None,
                stdin: false,
                stats: ConsoleStats::new(std::time::Instant::now()),
            },
        )
        .unwrap();
        dm.attach_i8042(&vm, &exit).unwrap();
        dm.attach_exit_port(&exit).unwrap();
        let rng = |dm: &mut DeviceManager| {
            dm.attach_virtio(&vm, &mem, bexar_devices::virtio::rng::Rng::new().unwrap())
        };
        assert_eq!(rng(&mut dm).unwrap(), "rng0");
        assert_eq!(rng(&mut dm).unwrap(), "rng1");
        assert_eq!(
            dm.describe(&mem, 2, &SmbiosIdentity::default()).unwrap(),
            " virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        // ...and the MP table, where a guest looks for it.
        let mut sig = [0u8; 4];
        vm_memory::Bytes::read_slice(
            &mem,
            &mut sig,
            vm_memory::GuestAddress(crate::layout::MPTABLE_START),
        )
        .unwrap();
        assert_eq!(&sig, b"_MP_");
        let ids: Vec<_> = dm.devices().iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["com1", "i8042", "exit-port", "rng0", "rng1"]);
        assert_eq!(dm.devices()[1].gsi, Some(1));
        assert_eq!(
            dm.reports().iter().map(|r| r.slot).collect::<Vec<_>>(),
            [0, 1]
        );
        // The 20th virtio device finds no window.
        for _ in 2..crate::layout::VIRTIO_SLOTS {
            rng(&mut dm).unwrap();
        }
        assert!(matches!(rng(&mut dm), Err(DeviceError::Resource(_))));
        // A second exit port is refused by the allocator.
        assert!(dm.attach_exit_port(&exit).is_err());
        // Once shared with vCPUs, the buses take no more devices.
        let (_pio, _mmio) = dm.freeze();
        assert!(matches!(
            dm.attach_ports("x", Arc::new(Mutex::new(ExitPort(|_| {}))), 0x500, 1, None),
            Err(DeviceError::Frozen)
        ));
        assert!(dm.send_ctrl_alt_del());
    }
}
