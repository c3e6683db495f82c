//! virtio 1.x devices over the MMIO transport.
//!
//! A device is shared between two threads: the vCPU thread drives its registers through
//! [`mmio::MmioTransport`] (feature negotiation, queue set-up, status, reset), and the virtio
//! event loop thread runs its queues when the guest's notifications arrive on ioeventfds.
//! Interrupts go back through an irqfd. Guest-controlled input never panics the VMM: bad
//! requests are refused and counted, and a device whose rings are corrupt marks itself
//! DEVICE_NEEDS_RESET and stops until the driver resets it.

pub mod block;
pub mod mmio;
pub mod net;
#[cfg(any(test, feature = "fuzzing"))]
pub mod ring;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use event_manager::MutEventSubscriber;
use serde::Serialize;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: the only transport generation we speak.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device type: network card.
pub const TYPE_NET: u32 = 1;
/// Device type: block device.
pub const TYPE_BLOCK: u32 = 2;
/// Device type: entropy source.
pub const TYPE_RNG: u32 = 4;
/// Device type: vsock.
pub const TYPE_VSOCK: u32 = 19;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a used buffer was added.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// The device's line to the guest: interrupt status register plus an irqfd, and the
/// NEEDS_RESET flag the transport reports in its status register.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// An interrupt line raising `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
            needs_reset: AtomicBool::new(false),
        }
    }

    /// Raises the interrupt with `bits` set in the interrupt status.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// Current interrupt status.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Acknowledges `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Marks the device broken until the driver resets it, and tells the driver.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            self.trigger(INT_CONFIG);
        }
    }

    /// Whether the device needs a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Clears everything (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// The eventfd KVM injects from.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Counters every device keeps; exported in the VM outcome and (later) as metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests completed successfully.
    pub requests: AtomicU64,
    /// Requests refused because they were malformed or out of bounds.
    pub refused: AtomicU64,
    /// Requests that failed in the backend (I/O errors).
    pub io_errors: AtomicU64,
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub written_bytes: AtomicU64,
    /// Queue notifications that arrived before DRIVER_OK or after a failure.
    pub spurious_notifies: AtomicU64,
    /// Times the device marked itself DEVICE_NEEDS_RESET.
    pub needs_reset: AtomicU64,
    /// Times a driver brought the device up (DRIVER_OK accepted).
    pub activations: AtomicU64,
}

impl Counters {
    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of a device's counters.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeviceReport {
    /// Device kind.
    pub kind: String,
    /// MMIO slot.
    pub slot: u32,
    /// Requests completed.
    pub requests: u64,
    /// Requests refused.
    pub refused: u64,
    /// Backend I/O errors.
    pub io_errors: u64,
    /// Bytes the guest read.
    pub read_bytes: u64,
    /// Bytes the guest wrote.
    pub written_bytes: u64,
    /// Notifications before DRIVER_OK.
    pub spurious_notifies: u64,
    /// Times the device needed a reset.
    pub needs_reset: u64,
    /// Times a driver brought the device up.
    pub activations: u64,
}

impl DeviceReport {
    /// Snapshot of `c`.
    pub fn new(kind: &'static str, slot: u32, c: &Counters) -> Self {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Self {
            kind: kind.to_owned(),
            slot,
            requests: g(&c.requests),
            refused: g(&c.refused),
            io_errors: g(&c.io_errors),
            read_bytes: g(&c.read_bytes),
            written_bytes: g(&c.written_bytes),
            spurious_notifies: g(&c.spurious_notifies),
            needs_reset: g(&c.needs_reset),
            activations: g(&c.activations),
        }
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up the wrong number of queues or an invalid one.
    #[error("queue {0} is not usable")]
    BadQueue(usize),
}

/// What every device has: one eventfd per queue (the ioeventfds), its interrupt line, and its
/// counters.
pub struct DeviceBase {
    /// The ioeventfd of each queue.
    pub queue_evts: Vec<EventFd>,
    /// The interrupt line.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// The counters.
    pub counters: std::sync::Arc<Counters>,
}

impl DeviceBase {
    /// A base for `queues` queues raising `irqfd`.
    pub fn new(queues: usize, irqfd: EventFd) -> std::io::Result<Self> {
        Ok(Self {
            queue_evts: (0..queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<std::io::Result<_>>()?,
            interrupt: std::sync::Arc::new(Interrupt::new(irqfd)),
            counters: std::sync::Arc::new(Counters::default()),
        })
    }
}

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: MutEventSubscriber + Send {
    /// virtio device type.
    fn device_type(&self) -> u32;
    /// Short name for logs and reports.
    fn kind(&self) -> &'static str;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (including VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the negotiated features and the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// Stops the device and forgets the queues (driver reset).
    fn reset(&mut self);
    /// The parts every device has.
    fn base(&self) -> &DeviceBase;
    /// The ioeventfd of each queue (registered with KVM by the builder).
    fn queue_events(&self) -> &[EventFd] {
        &self.base().queue_evts
    }
    /// The device's interrupt line.
    fn interrupt(&self) -> &std::sync::Arc<Interrupt> {
        &self.base().interrupt
    }
    /// The device's counters.
    fn counters(&self) -> &std::sync::Arc<Counters> {
        &self.base().counters
    }
}

/// Reads `data.len()` bytes of a little-endian configuration structure at `offset`; bytes past
/// its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off < config.len() {
        let n = data.len().min(config.len() - off);
        data[..n].copy_from_slice(&config[off..off + n]);
    }
}

/// Serves every chain the driver has made available on `queue`: `handle` turns a chain into the
/// number of bytes it wrote into guest buffers, the chains go back on the used ring, and the
/// driver is interrupted if it wants to be. A corrupt ring (an available index running past the
/// ring, a head outside it) marks the device DEVICE_NEEDS_RESET instead. Returns how many
/// chains were served.
pub fn serve_queue(
    name: &str,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    counters: &Counters,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> usize {
    if interrupt.needs_reset() {
        return 0;
    }
    let chains: Vec<DescriptorChain<&GuestMemoryMmap>> = match queue.iter(mem) {
        Ok(it) => it.collect(),
        Err(e) => {
            tracing::debug!("{name}: corrupt available ring ({e}): device needs a reset");
            Counters::inc(&counters.needs_reset);
            interrupt.set_needs_reset();
            return 0;
        }
    };
    if chains.is_empty() {
        return 0;
    }
    let mut used = Vec::with_capacity(chains.len());
    for chain in chains {
        let head = chain.head_index();
        used.push((head, handle(chain)));
    }
    for (head, len) in &used {
        if let Err(e) = queue.add_used(mem, *head, *len) {
            tracing::debug!("{name}: cannot return descriptor {head} ({e}): device needs a reset");
            Counters::inc(&counters.needs_reset);
            interrupt.set_needs_reset();
            return used.len();
        }
    }
    if !matches!(queue.needs_notification(mem), Ok(false)) {
        interrupt.trigger(INT_USED_RING);
    }
    used.len()
}
