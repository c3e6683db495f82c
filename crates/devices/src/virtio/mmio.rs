//! The virtio-mmio transport, version 2 ("modern") register layout (virtio 1.2 §4.2.2).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{status, Counters, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use bexar_util::sync::lock;

/// Size of one device's register window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of the QueueNotify register (the ioeventfd address).
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Our vendor id ("BX").
const VENDOR_ID: u32 = 0x5842;

/// One device behind the MMIO transport.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    counters: Arc<Counters>,
    mem: GuestMemoryMmap,
    device_type: u32,
    device_features: u64,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    queues: Vec<Queue>,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    /// Wraps `device` for guest memory `mem`.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryMmap) -> Self {
        let (interrupt, counters, device_type, device_features, queues) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .filter_map(|&max| Queue::new(max).ok())
                .collect();
            (
                d.interrupt().clone(),
                d.counters().clone(),
                d.device_type(),
                d.features(),
                queues,
            )
        };
        Self {
            device,
            interrupt,
            counters,
            mem,
            device_type,
            device_features,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            queues,
            status: 0,
            config_generation: 0,
            active: false,
        }
    }

    /// The device's status register as the guest reads it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.interrupt.needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
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

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
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
        let ready: Vec<usize> = (0..self.queues.len())
            .filter(|&i| self.queues[i].ready())
            .collect();
        for &i in &ready {
            if !self.queues[i].is_valid(&self.mem) {
                self.refuse("an invalid queue at DRIVER_OK");
                Counters::inc(&self.counters.needs_reset);
                self.interrupt.set_needs_reset();
                return;
            }
        }
        let queues: Vec<Queue> = self
            .queues
            .iter()
            .filter_map(|q| Queue::try_from(q.state()).ok())
            .collect();
        let mut dev = lock(&self.device);
        match dev.activate(self.mem.clone(), self.acked_features, queues) {
            Ok(()) => {
                self.active = true;
                Counters::inc(&self.counters.activations);
            }
            Err(e) => {
                drop(dev);
                tracing::debug!(
                    device = self.device_type,
                    "virtio device did not start: {e}"
                );
                Counters::inc(&self.counters.needs_reset);
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device_type,
            0x00c => VENDOR_ID,
            0x010 => match self.features_select {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status(),
            0x0fc => self.config_generation,
            _ => {
                self.refuse("a read of an unknown register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x014 => self.features_select = v,
            0x020 => {
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
            0x024 => self.acked_features_select = v,
            0x030 => self.queue_select = v,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                if !self.queue_writable() {
                    return self.refuse("a queue register write outside set-up");
                }
                let Some(q) = self.selected_queue() else {
                    return self.refuse("a write to a queue that does not exist");
                };
                match offset {
                    0x038 => {
                        if v > u32::from(q.max_size()) || v == 0 || !v.is_power_of_two() {
                            // QueueNum is write-only: the driver can only learn of the refusal
                            // through DEVICE_NEEDS_RESET.
                            self.refuse("a bad queue size");
                            Counters::inc(&self.counters.needs_reset);
                            self.interrupt.set_needs_reset();
                            return;
                        }
                        q.set_size(v as u16);
                    }
                    0x044 => q.set_ready(v == 1),
                    0x080 => q.set_desc_table_address(Some(v), None),
                    0x084 => q.set_desc_table_address(None, Some(v)),
                    0x090 => q.set_avail_ring_address(Some(v), None),
                    0x094 => q.set_avail_ring_address(None, Some(v)),
                    0x0a0 => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                }
            }
            QUEUE_NOTIFY => {
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
            0x064 => self.interrupt.ack(v),
            0x070 => self.write_status(v),
            _ => self.refuse("a write to an unknown register"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            lock(&self.device).read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return self.refuse("a register read that is not 32-bit aligned");
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            lock(&self.device).write_config(offset - 0x100, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return self.refuse("a register write that is not 32-bit aligned");
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(data);
        self.write_reg(offset, u32::from_le_bytes(b));
    }
}

/// Whether a counter moved (used by tests).
pub fn refused(c: &Counters) -> u64 {
    c.refused.load(Ordering::Relaxed)
}
