//! The virtio-mmio transport, version 2 ("modern") register layout (virtio 1.2 §4.2.2).
//!
//! The transport keeps register state only (feature selectors, the negotiated features, the
//! status, the queue selector); the queues themselves belong to the device, which the transport
//! sets up through [`VirtioDevice::queues_mut`] while the driver configures them. Its interrupt
//! line, [`MmioInterrupt`], owns the InterruptStatus register and the irqfd.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioInterrupt, VirtioInterruptType};
use crate::bus::BusDevice;
use crate::memory::GuestMemoryMmap;
use crate::virtio::{status, ActivationContext, Counters, VirtioDevice, VIRTIO_F_VERSION_1};
use bexar_util::sync::lock;

/// Size of one device's register window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of the QueueNotify register (the ioeventfd address).
pub const QUEUE_NOTIFY: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Our vendor id ("BX").
const VENDOR_ID: u32 = 0x5842;
/// Where the device configuration space starts.
const CONFIG: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// Interrupt status bit: a used buffer was added.
pub const INT_USED_RING: u32 = reg::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = reg::VIRTIO_MMIO_INT_CONFIG;

/// The MMIO transport's interrupt: the InterruptStatus register and the irqfd KVM injects from.
pub struct MmioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl MmioInterrupt {
    /// A line raising `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The eventfd KVM injects from (registered as an irqfd on the device's GSI).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    fn reset(&self) {
        self.status.store(0, Ordering::Release);
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        let bit = match t {
            VirtioInterruptType::Config => INT_CONFIG,
            VirtioInterruptType::Queue(_) => INT_USED_RING,
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.irqfd.write(1)
    }
}

/// The transport's registers, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// DeviceFeaturesSel.
    pub features_select: u32,
    /// DriverFeaturesSel.
    pub acked_features_select: u32,
    /// The features the driver wrote.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// The status register (without DEVICE_NEEDS_RESET, which is the device's).
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device was activated.
    pub active: bool,
}

/// One device behind the MMIO transport.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<MmioInterrupt>,
    needs_reset: Arc<AtomicBool>,
    counters: Arc<Counters>,
    mem: GuestMemoryMmap,
    device_type: u32,
    device_features: u64,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    /// Puts `device` behind the transport, for guest memory `mem`, interrupting through
    /// `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<MmioInterrupt>,
    ) -> Self {
        let (needs_reset, counters, device_type, device_features) = {
            let d = lock(&device);
            (
                d.needs_reset_flag(),
                d.counters().clone(),
                d.device_type(),
                d.avail_features(),
            )
        };
        Self {
            device,
            interrupt,
            needs_reset,
            counters,
            mem,
            device_type,
            device_features,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            active: false,
        }
    }

    /// The interrupt line.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The device behind the transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device's status register as the guest reads it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.needs_reset.load(Ordering::Acquire) {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    /// The registers, for a snapshot.
    pub fn save(&self) -> MmioState {
        MmioState {
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            active: self.active,
        }
    }

    /// Puts the registers of `state` back; if the device was active, activates it again with
    /// its restored queues (the device's own state must be restored first). Refused, changing
    /// nothing, if the state is not one the register machine can reach.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), crate::virtio::PersistError> {
        let bad = |w: &str| Err(crate::virtio::PersistError::Mismatch(w.to_owned()));
        if state.acked_features & !self.device_features != 0 {
            return bad("acked features the device does not offer");
        }
        if state.active
            && (state.status & status::DRIVER_OK == 0 || state.status & status::FEATURES_OK == 0)
        {
            return bad("an active device without FEATURES_OK and DRIVER_OK");
        }
        if state.active {
            let ctx = self.context(state.acked_features, true);
            if let Err(e) = lock(&self.device).activate(ctx) {
                return Err(crate::virtio::PersistError::Mismatch(format!(
                    "the device does not start again: {e}"
                )));
            }
        }
        self.features_select = state.features_select;
        self.acked_features_select = state.acked_features_select;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt.ack(!0);
        // Whatever the driver had not acknowledged is raised again by `raise_restored`, once
        // the VM's interrupt controllers hold their saved state (raised now, it could be
        // overwritten by that state).
        self.interrupt
            .status
            .store(state.interrupt_status, Ordering::Release);
        self.active = state.active;
        Ok(())
    }

    /// Raises the interrupt a restored device's driver had not acknowledged when the VM was
    /// saved: called once the VM's interrupt controllers hold their saved state.
    pub fn raise_restored(&self) {
        if self.interrupt.status.load(Ordering::Acquire) != 0 {
            let _ = self.interrupt.irqfd.write(1);
        }
    }

    fn context(&self, acked_features: u64, restored: bool) -> ActivationContext {
        ActivationContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            acked_features,
            restored,
        }
    }

    /// Queue registers may only change while the queue is not live.
    fn queue_writable(&self) -> bool {
        !self.active
            && self.status & status::FEATURES_OK != 0
            && self.status & status::DRIVER_OK == 0
    }

    fn refuse(&self, what: &str) {
        Counters::inc(&self.counters.refused);
        tracing::debug!(
            device = self.device_type,
            "virtio-mmio: refused {what} (status {:#x})",
            self.status
        );
    }

    /// Marks the device broken until the driver resets it (a queue set-up it cannot use).
    fn fail(&self, why: &str) {
        crate::virtio::needs_reset(&self.needs_reset, &self.counters, &*self.interrupt, why);
    }

    fn reset(&mut self) {
        // The device's reset clears its NEEDS_RESET flag with its queues.
        lock(&self.device).reset();
        self.interrupt.reset();
        self.status = 0;
        self.acked_features = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.queue_select = 0;
        self.active = false;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (virtio 1.2 §3.1.1); anything else is a driver bug.
        if value & self.status != self.status {
            self.refuse("a status write that clears bits");
            return;
        }
        let new = value & !self.status;
        if new & status::FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are not supported: leave FEATURES_OK clear so the driver sees it.
            self.refuse("FEATURES_OK without VIRTIO_F_VERSION_1");
            self.status = value & !status::FEATURES_OK;
            return;
        }
        if new & status::DRIVER_OK != 0 && !self.active {
            if self.status & status::FEATURES_OK == 0 {
                self.refuse("DRIVER_OK before FEATURES_OK");
                self.status = value & !status::DRIVER_OK;
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        let ctx = self.context(self.acked_features, false);
        let mut dev = lock(&self.device);
        if dev
            .queues()
            .iter()
            .any(|q| q.ready() && !q.is_valid(&self.mem))
        {
            drop(dev);
            self.refuse("an invalid queue at DRIVER_OK");
            self.fail("an invalid queue at DRIVER_OK");
            return;
        }
        match dev.activate(ctx) {
            Ok(()) => {
                self.active = true;
                Counters::inc(&self.counters.activations);
            }
            Err(e) => {
                drop(dev);
                self.fail(&format!("it did not start ({e})"));
            }
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device_type,
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.features_select {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX | reg::VIRTIO_MMIO_QUEUE_READY => {
                let dev = lock(&self.device);
                match dev.queues().get(self.queue_select as usize) {
                    None => 0,
                    Some(q) if offset == reg::VIRTIO_MMIO_QUEUE_NUM_MAX => u32::from(q.max_size()),
                    Some(q) => u32::from(q.ready()),
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.status(),
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                self.refuse("a read of an unknown register");
                0
            }
        }
    }

    fn write_queue_reg(&mut self, offset: u32, v: u32) {
        if !self.queue_writable() {
            return self.refuse("a queue register write outside set-up");
        }
        let mut dev = lock(&self.device);
        let Some(q) = dev.queues_mut().get_mut(self.queue_select as usize) else {
            drop(dev);
            return self.refuse("a write to a queue that does not exist");
        };
        match offset {
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                // virtio-queue's own check: a power of two, 1 to the maximum.
                if u16::try_from(v).map_or(true, |n| q.try_set_size(n).is_err()) {
                    drop(dev);
                    // QueueNum is write-only: the driver can only learn of the refusal
                    // through DEVICE_NEEDS_RESET.
                    self.refuse("a bad queue size");
                    self.fail("a bad queue size");
                }
            }
            reg::VIRTIO_MMIO_QUEUE_READY => q.set_ready(v == 1),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            _ => q.set_used_ring_address(None, Some(v)),
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.features_select = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    self.refuse("a feature write outside negotiation");
                    return;
                }
                let shift = match self.acked_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return self.refuse("a feature write to a bad selector"),
                };
                let offered = (self.device_features >> shift) as u32;
                let mask = !(0xffff_ffffu64 << shift);
                self.acked_features =
                    (self.acked_features & mask) | (u64::from(v & offered) << shift);
            }
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.acked_features_select = v,
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = v,
            reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_READY
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_reg(offset, v),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd in KVM; this path only runs without one.
                let dev = lock(&self.device);
                match dev.queue_events().get(v as usize) {
                    Some(evt) => {
                        let _ = evt.write(1);
                    }
                    None => {
                        drop(dev);
                        self.refuse("a notification for a queue that does not exist");
                    }
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            reg::VIRTIO_MMIO_STATUS => self.write_status(v),
            _ => self.refuse("a write to an unknown register"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            lock(&self.device).read_config(offset - CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return self.refuse("a register read that is not 32-bit aligned");
        }
        let v = self.read_reg(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            lock(&self.device).write_config(offset - CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return self.refuse("a register write that is not 32-bit aligned");
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(data);
        self.write_reg(offset as u32, u32::from_le_bytes(b));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::memory::test_memory;
    use crate::virtio::{ActivateError, VirtioCommon};

    /// A device that records what the transport did to it.
    struct Mock {
        common: VirtioCommon,
        config: [u8; 8],
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
        refuse_activation: bool,
    }

    impl VirtioDevice for Mock {
        fn common(&self) -> &VirtioCommon {
            &self.common
        }
        fn common_mut(&mut self) -> &mut VirtioCommon {
            &mut self.common
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(b) = self.config.get_mut(offset as usize) {
                *b = data[0];
            }
        }
        fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
            if self.refuse_activation {
                return Err(ActivateError::Backend("refused on purpose".into()));
            }
            self.common.activate(ctx)?;
            self.activations.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn reset(&mut self) {
            self.common.reset();
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Rig {
        t: MmioTransport,
        dev: Arc<Mutex<Mock>>,
        irq: EventFd,
    }

    /// A transport over a mock device with two queues (max 16 and 8) offering feature bit 3.
    fn rig() -> Rig {
        let dev = Arc::new(Mutex::new(Mock {
            common: VirtioCommon::new(42, "mock", 1 << 3, &[16, 8]).unwrap(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            activations: Arc::default(),
            resets: Arc::default(),
            refuse_activation: false,
        }));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(MmioInterrupt::new(irq.try_clone().unwrap()));
        let t = MmioTransport::new(dev.clone(), test_memory(1), interrupt);
        Rig { t, dev, irq }
    }

    impl Rig {
        fn r(&mut self, off: u32) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(u64::from(off), &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, off: u32, v: u32) {
            self.t.write(u64::from(off), &v.to_le_bytes());
        }
        fn refused(&self) -> u64 {
            self.t.counters.refused.load(Ordering::Relaxed)
        }
        /// A driver's handshake up to FEATURES_OK, accepting `features`.
        fn negotiate(&mut self, features: u64) {
            self.w(reg::VIRTIO_MMIO_STATUS, 0);
            self.w(reg::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
            self.w(
                reg::VIRTIO_MMIO_STATUS,
                status::ACKNOWLEDGE | status::DRIVER,
            );
            for sel in 0..2 {
                self.w(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
                self.w(
                    reg::VIRTIO_MMIO_DRIVER_FEATURES,
                    (features >> (32 * sel)) as u32,
                );
            }
            self.w(
                reg::VIRTIO_MMIO_STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            );
        }
        /// Sets queue `q` up at `base` with `size` entries and makes it ready.
        fn queue(&mut self, q: u32, base: u32, size: u32) {
            self.w(reg::VIRTIO_MMIO_QUEUE_SEL, q);
            self.w(reg::VIRTIO_MMIO_QUEUE_NUM, size);
            self.w(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, base);
            self.w(reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
            self.w(reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
            self.w(reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
            self.w(reg::VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000);
            self.w(reg::VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
            self.w(reg::VIRTIO_MMIO_QUEUE_READY, 1);
        }
        fn driver_ok(&mut self) {
            let s = self.r(reg::VIRTIO_MMIO_STATUS);
            self.w(reg::VIRTIO_MMIO_STATUS, s | status::DRIVER_OK);
        }
        fn activations(&self) -> usize {
            lock(&self.dev).activations.load(Ordering::Relaxed)
        }
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

    #[test]
    fn identity_registers() {
        let mut r = rig();
        assert_eq!(r.r(reg::VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(r.r(reg::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r.r(reg::VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(r.r(reg::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        r.w(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r.r(reg::VIRTIO_MMIO_DEVICE_FEATURES), 1 << 3);
        r.w(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r.r(reg::VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 32"
        );
        r.w(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r.r(reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);
        r.w(reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r.r(reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        r.w(reg::VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(r.r(reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 2");
        assert_eq!(r.refused(), 0);
    }

    #[test]
    fn a_full_handshake_activates_the_device_once() {
        let mut r = rig();
        r.negotiate(VIRTIO_F_VERSION_1 | 1 << 3 | 1 << 9);
        assert_eq!(r.r(reg::VIRTIO_MMIO_STATUS), ALL);
        assert_eq!(
            r.t.acked_features,
            VIRTIO_F_VERSION_1 | 1 << 3,
            "bit 9 is not offered"
        );
        r.queue(0, 0x1_0000, 16);
        r.queue(1, 0x2_0000, 8);
        assert_eq!(r.r(reg::VIRTIO_MMIO_QUEUE_READY), 1);
        r.driver_ok();
        assert_eq!(r.activations(), 1);
        assert!(lock(&r.dev).common.is_active());
        assert_eq!(
            lock(&r.dev).common.context().unwrap().acked_features,
            VIRTIO_F_VERSION_1 | 1 << 3
        );
        // Writing DRIVER_OK again does not activate twice; queues are frozen now.
        r.driver_ok();
        assert_eq!(r.activations(), 1);
        r.w(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        r.w(reg::VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(lock(&r.dev).common.queues[0].size(), 16);
        assert_eq!(r.refused(), 1);
        assert_eq!(r.t.counters.activations.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_order_of_the_handshake_is_enforced() {
        let mut r = rig();
        // DRIVER_OK before FEATURES_OK: refused, the bit stays clear.
        r.w(
            reg::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        r.w(
            reg::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(r.r(reg::VIRTIO_MMIO_STATUS) & status::DRIVER_OK, 0);
        assert_eq!(r.activations(), 0);
        // Features outside negotiation (before DRIVER) are refused.
        r.w(reg::VIRTIO_MMIO_STATUS, 0);
        r.w(reg::VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        assert_eq!(r.t.acked_features, 0);
        // A legacy driver (no VERSION_1): FEATURES_OK stays clear.
        r.negotiate(1 << 3);
        assert_eq!(r.r(reg::VIRTIO_MMIO_STATUS) & status::FEATURES_OK, 0);
        // Clearing bits other than by a reset is refused.
        r.negotiate(VIRTIO_F_VERSION_1);
        r.w(reg::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        assert_eq!(r.r(reg::VIRTIO_MMIO_STATUS), ALL);
        // Queue registers only between FEATURES_OK and DRIVER_OK.
        r.w(reg::VIRTIO_MMIO_STATUS, 0);
        r.w(reg::VIRTIO_MMIO_QUEUE_NUM, 8);
        assert_eq!(lock(&r.dev).common.queues[0].size(), 16, "unchanged");
        // Unknown and unaligned registers.
        let before = r.refused();
        r.w(0x0f0, 1);
        let _ = r.r(0x0f0);
        let mut two = [0u8; 2];
        r.t.read(u64::from(reg::VIRTIO_MMIO_STATUS), &mut two);
        r.t.write(0x071, &[1, 2, 3, 4]);
        assert_eq!(r.refused(), before + 4);
        assert_eq!(r.activations(), 0);
    }

    #[test]
    fn bad_queues_make_the_device_need_a_reset_and_a_reset_recovers() {
        let mut r = rig();
        r.negotiate(VIRTIO_F_VERSION_1);
        // A size that is not a power of two: NEEDS_RESET with a config interrupt.
        r.w(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        r.w(reg::VIRTIO_MMIO_QUEUE_NUM, 3);
        assert_ne!(r.r(reg::VIRTIO_MMIO_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r.r(reg::VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(r.irq.read().unwrap(), 1);
        r.w(reg::VIRTIO_MMIO_INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(r.r(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // A reset clears it, and resets the device and its queues.
        let resets = lock(&r.dev).resets.load(Ordering::Relaxed);
        r.w(reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r.r(reg::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(lock(&r.dev).resets.load(Ordering::Relaxed), resets + 1);
        assert_eq!(
            lock(&r.dev).common.queues[0].size(),
            16,
            "queue set-up forgotten"
        );
        // A ring outside guest memory (1 MiB here) at DRIVER_OK: not activated, NEEDS_RESET.
        r.negotiate(VIRTIO_F_VERSION_1);
        r.queue(0, 0x8000_0000, 16);
        r.queue(1, 0x2_0000, 8);
        r.driver_ok();
        assert_eq!(r.activations(), 0);
        assert_ne!(r.r(reg::VIRTIO_MMIO_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // A queue left not ready: the device refuses to start.
        r.w(reg::VIRTIO_MMIO_STATUS, 0);
        r.negotiate(VIRTIO_F_VERSION_1);
        r.queue(0, 0x1_0000, 16);
        r.driver_ok();
        assert_eq!(r.activations(), 0);
        assert_ne!(r.r(reg::VIRTIO_MMIO_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // And the clean path works afterwards.
        r.w(reg::VIRTIO_MMIO_STATUS, 0);
        r.negotiate(VIRTIO_F_VERSION_1);
        r.queue(0, 0x1_0000, 16);
        r.queue(1, 0x2_0000, 8);
        r.driver_ok();
        assert_eq!(r.activations(), 1);
        assert_eq!(r.r(reg::VIRTIO_MMIO_STATUS), ALL | status::DRIVER_OK);
        assert_eq!(r.t.counters.needs_reset.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn config_space_and_notifications_without_an_ioeventfd() {
        let mut r = rig();
        let mut b = [0u8; 4];
        r.t.read(CONFIG + 2, &mut b);
        assert_eq!(b, [3, 4, 5, 6]);
        r.t.read(CONFIG + 6, &mut b);
        assert_eq!(b, [7, 8, 0, 0], "past the end reads zero");
        let generation = r.r(reg::VIRTIO_MMIO_CONFIG_GENERATION);
        r.t.write(CONFIG, &[9]);
        r.t.read(CONFIG, &mut b);
        assert_eq!(b[0], 9);
        assert_eq!(r.r(reg::VIRTIO_MMIO_CONFIG_GENERATION), generation + 1);
        // QueueNotify reaches the queue's eventfd; a queue that does not exist is refused.
        r.w(reg::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(lock(&r.dev).common.queue_evts[1].read().unwrap(), 1);
        let before = r.refused();
        r.w(reg::VIRTIO_MMIO_QUEUE_NOTIFY, 5);
        assert_eq!(r.refused(), before + 1);
    }

    #[test]
    fn a_device_that_refuses_to_start_needs_a_reset() {
        let mut r = rig();
        lock(&r.dev).refuse_activation = true;
        r.negotiate(VIRTIO_F_VERSION_1);
        r.queue(0, 0x1_0000, 16);
        r.queue(1, 0x2_0000, 8);
        r.driver_ok();
        assert!(!r.t.active);
        assert_ne!(r.r(reg::VIRTIO_MMIO_STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn state_round_trips_and_reactivates_the_device() {
        let mut r = rig();
        r.negotiate(VIRTIO_F_VERSION_1 | 1 << 3);
        r.queue(0, 0x1_0000, 16);
        r.queue(1, 0x2_0000, 8);
        r.driver_ok();
        r.w(reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        r.t.write(CONFIG, &[1]);
        let _ = r.t.interrupt.trigger(VirtioInterruptType::Queue(0));
        let saved = r.t.save();
        let device_state = lock(&r.dev).common.save();
        let json = serde_json::to_string(&saved).unwrap();
        let back: MmioState = serde_json::from_str(&json).unwrap();

        // A new transport over a new device: the device first, then the transport.
        let mut r2 = rig();
        lock(&r2.dev).common.restore(&device_state).unwrap();
        r2.t.restore(&back).unwrap();
        assert_eq!(r2.t.save(), saved);
        assert_eq!(r2.activations(), 1, "activated again with its queues");
        assert_eq!(r2.r(reg::VIRTIO_MMIO_STATUS), ALL | status::DRIVER_OK);
        assert_eq!(
            r2.r(reg::VIRTIO_MMIO_QUEUE_SEL),
            0,
            "QueueSel is write-only"
        );
        assert_eq!(
            r2.r(reg::VIRTIO_MMIO_QUEUE_READY),
            1,
            "queue 1 selected and ready"
        );
        assert_eq!(r2.r(reg::VIRTIO_MMIO_INTERRUPT_STATUS), INT_USED_RING);
        // Raised again only when the VMM says the interrupt controllers are restored.
        assert!(
            r2.irq.read().is_err(),
            "raised before the VM's interrupt controllers had their state"
        );
        r2.t.raise_restored();
        assert_eq!(
            r2.irq.read().unwrap(),
            1,
            "the pending interrupt is raised again"
        );
        assert_eq!(lock(&r2.dev).common.queues[1].size(), 8);

        // States the register machine cannot reach are refused.
        let mut bad = saved.clone();
        bad.status = status::ACKNOWLEDGE;
        assert!(rig().t.restore(&bad).is_err());
        let mut greedy = saved;
        greedy.acked_features |= 1 << 20;
        assert!(rig().t.restore(&greedy).is_err());
    }
}
