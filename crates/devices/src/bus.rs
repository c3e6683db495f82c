//! Port-I/O and MMIO buses: a fixed set of address ranges, each owned by one device, built once
//! before the vCPUs start and then shared read-only between vCPU threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bexar_util::sync::lock;

/// A device that answers reads and writes at offsets inside its range.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` from the device base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` from the device base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
    /// A zero-length range.
    #[error("device range at {0:#x} has zero length")]
    Empty(u64),
}

struct Entry {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// An address space of devices.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
    unhandled: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` at `[base, base+len)`.
    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        let off = addr - e.base;
        (off.checked_add(size as u64)? <= e.len).then_some((e, off))
    }

    /// Dispatches a read; unclaimed addresses read as all ones, like an empty ISA bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, off)) => {
                lock(&e.dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Dispatches a write; writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, off)) => {
                lock(&e.dev).write(off, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Accesses that hit no device.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(1))), 0x3f8, 8).unwrap();
        bus.insert(Arc::new(Mutex::new(Reg(9))), 0x60, 5).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3f8 + 2, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x60, &[42]));
        assert!(bus.read(0x64, &mut b));
        assert_eq!(b[0], 46);
        // Straddling the end of a device, or outside every device.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w));
        assert_eq!(w, [0xff; 4]);
        assert!(!bus.write(0x80, &[1]));
        assert!(!bus.read(u64::MAX, &mut b));
        assert_eq!(bus.unhandled(), 3);
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(0))), 0x10, 0x10)
            .unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x18, 2).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x8, 9).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x20, 0).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x20, 1).is_ok());
    }
}
