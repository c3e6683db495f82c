//! virtio-mmio version 2 ("modern") transport (virtio 1.2 §4.2.2).
//! All register accesses are 32-bit; device config space is read byte-wise
//! or naturally aligned, under the ConfigGeneration check.
use super::{feature, Error, Result};
use crate::arch::{mmio_read32, mmio_write32, ms_to_cycles, rdtsc};

pub const MMIO_BASE: usize = 0xd000_0000;
pub const MMIO_STRIDE: usize = 0x1000;
pub const MMIO_SLOTS: usize = 32;
/// "virt" little-endian.
pub const MAGIC: u32 = 0x7472_6976;
pub const VERSION_MODERN: u32 = 2;

/// Register offsets.
pub mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const VENDOR_ID: usize = 0x00c;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const INTERRUPT_STATUS: usize = 0x060;
    pub const INTERRUPT_ACK: usize = 0x064;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG_GENERATION: usize = 0x0fc;
    pub const CONFIG: usize = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// One virtio-mmio slot holding a device.
#[derive(Clone, Copy, Debug)]
pub struct Transport {
    pub slot: usize,
    pub base: usize,
    pub version: u32,
    pub device_id: u32,
    pub vendor_id: u32,
}

/// Base address of slot `i`.
pub fn slot_base(i: usize) -> usize {
    MMIO_BASE + i * MMIO_STRIDE
}

impl Transport {
    /// The device in slot `slot`, if the slot holds a virtio-mmio v2 device.
    pub fn probe(slot: usize) -> Option<Transport> {
        if slot >= MMIO_SLOTS {
            return None;
        }
        let base = slot_base(slot);
        if mmio_read32(base + reg::MAGIC) != MAGIC {
            return None;
        }
        let version = mmio_read32(base + reg::VERSION);
        let device_id = mmio_read32(base + reg::DEVICE_ID);
        if version != VERSION_MODERN || device_id == 0 {
            return None;
        }
        let vendor_id = mmio_read32(base + reg::VENDOR_ID);
        Some(Transport { slot, base, version, device_id, vendor_id })
    }

    #[inline(always)]
    pub fn read(&self, off: usize) -> u32 {
        mmio_read32(self.base + off)
    }

    #[inline(always)]
    pub fn write(&self, off: usize, v: u32) {
        mmio_write32(self.base + off, v)
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read(reg::DEVICE_FEATURES);
        ((hi as u64) << 32) | lo as u64
    }

    pub fn set_driver_features(&self, f: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, f as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (f >> 32) as u32);
    }

    pub fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }

    pub fn set_status(&self, s: u32) {
        self.write(reg::STATUS, s)
    }

    /// Add bits to Status (read-modify-write).
    pub fn add_status(&self, bits: u32) {
        let s = self.status();
        self.set_status(s | bits)
    }

    /// Has the device set DEVICE_NEEDS_RESET?
    pub fn needs_reset(&self) -> bool {
        self.status() & status::DEVICE_NEEDS_RESET != 0
    }

    /// Write 0 to Status and wait (up to 100 ms) until it reads back 0.
    pub fn reset(&self) -> Result<()> {
        self.set_status(0);
        let t0 = rdtsc();
        let limit = ms_to_cycles(100);
        while self.status() != 0 {
            if rdtsc().wrapping_sub(t0) > limit {
                return Err(Error::ResetTimeout);
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Reset, ACKNOWLEDGE, DRIVER, accept `VERSION_1 | (wanted & offered)`,
    /// FEATURES_OK and check that it stuck. Returns the accepted features.
    /// The caller then sets up its queues and calls [`Transport::driver_ok`].
    pub fn negotiate(&self, wanted: u64) -> Result<u64> {
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features();
        if offered & feature::VERSION_1 == 0 {
            self.fail();
            return Err(Error::NoVersion1);
        }
        // ACCESS_PLATFORM is harmless without an IOMMU (addresses are
        // physical either way); a device may insist on it.
        let accepted = offered & (wanted | feature::VERSION_1 | feature::ACCESS_PLATFORM);
        self.set_driver_features(accepted);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.fail();
            return Err(Error::FeaturesRejected);
        }
        Ok(accepted)
    }

    /// Set DRIVER_OK and check that the device took it.
    pub fn driver_ok(&self) -> Result<()> {
        self.add_status(status::DRIVER_OK);
        let s = self.status();
        if s & status::DRIVER_OK == 0 || s & (status::FAILED | status::DEVICE_NEEDS_RESET) != 0 {
            return Err(Error::DriverOkRejected);
        }
        Ok(())
    }

    /// Tell the device we gave up (Status |= FAILED).
    pub fn fail(&self) {
        self.add_status(status::FAILED);
    }

    /// Ring queue `q`'s doorbell.
    #[inline(always)]
    pub fn notify(&self, q: u16) {
        self.write(reg::QUEUE_NOTIFY, q as u32)
    }

    /// Read and acknowledge the interrupt status bits.
    pub fn ack_interrupt(&self) -> u32 {
        let s = self.read(reg::INTERRUPT_STATUS);
        if s != 0 {
            self.write(reg::INTERRUPT_ACK, s);
        }
        s
    }

    pub fn config_generation(&self) -> u32 {
        self.read(reg::CONFIG_GENERATION)
    }

    pub fn config_read8(&self, off: usize) -> u8 {
        unsafe { core::ptr::read_volatile((self.base + reg::CONFIG + off) as *const u8) }
    }

    pub fn config_read16(&self, off: usize) -> u16 {
        unsafe { core::ptr::read_volatile((self.base + reg::CONFIG + off) as *const u16) }
    }

    pub fn config_read32(&self, off: usize) -> u32 {
        self.read(reg::CONFIG + off)
    }

    /// A 64-bit field as two 32-bit reads (low first), retried until the
    /// config generation is stable.
    pub fn config_read64(&self, off: usize) -> u64 {
        self.config_consistent(|t| ((t.config_read32(off + 4) as u64) << 32) | t.config_read32(off) as u64)
    }

    /// Run `f` (config reads) until ConfigGeneration is the same before and
    /// after (at most 16 tries).
    pub fn config_consistent<T>(&self, f: impl Fn(&Self) -> T) -> T {
        let mut tries = 0;
        loop {
            let g0 = self.config_generation();
            let v = f(self);
            tries += 1;
            if self.config_generation() == g0 || tries >= 16 {
                return v;
            }
        }
    }
}

/// The devices in slot order, stopping at the first empty slot.
pub fn scan() -> impl Iterator<Item = Transport> {
    (0..MMIO_SLOTS).map_while(Transport::probe)
}

/// The `n`-th device (0-based, slot order) with device id `id`.
pub fn find(id: u32, n: usize) -> Option<Transport> {
    scan().filter(|t| t.device_id == id).nth(n)
}
