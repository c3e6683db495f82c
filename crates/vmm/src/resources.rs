//! Where devices go: MMIO windows, I/O port ranges and interrupt lines (GSIs), handed out by
//! rust-vmm's vm-allocator so that no two devices can be given the same one and the layout
//! is decided in one place. A restore will ask for the exact resources a snapshot recorded.

use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};

use crate::layout::{VIRTIO_GSI_BASE, VIRTIO_MMIO_BASE, VIRTIO_SLOTS};

/// Size of one virtio-mmio window.
pub const MMIO_WINDOW: u64 = bexar_devices::virtio::transport::mmio::MMIO_LEN;

/// A resource could not be given.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// Every virtio-mmio window (or GSI) is taken.
    #[error("no {what} left: at most {VIRTIO_SLOTS} virtio devices fit")]
    Exhausted {
        /// Which resource.
        what: &'static str,
    },
    /// A fixed range overlaps one given before, or lies outside the space.
    #[error("{what} {base:#x}+{len:#x} is taken or out of range")]
    Taken {
        /// Which resource.
        what: &'static str,
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// The VM's allocatable resources.
#[derive(Debug)]
pub struct ResourceAllocator {
    mmio: AddressAllocator,
    pio: AddressAllocator,
    /// The fixed port ranges claimed so far. vm-allocator 0.1.4 grants an `ExactMatch` inside
    /// a range it already handed out (its interval search does not check the node is free;
    /// the test below caught it), so fixed claims are checked against these first.
    fixed_ports: Vec<(u64, u64)>,
    gsi: IdAllocator,
}

impl Default for ResourceAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceAllocator {
    /// The virtio-mmio area (`VIRTIO_SLOTS` windows from `VIRTIO_MMIO_BASE`), the 64 KiB of
    /// I/O ports, and the GSIs above the ISA lines the legacy devices use.
    pub fn new() -> Self {
        // The constants are valid ranges: these cannot fail, and a test checks it.
        let mmio = AddressAllocator::new(VIRTIO_MMIO_BASE, u64::from(VIRTIO_SLOTS) * MMIO_WINDOW)
            .unwrap_or_else(|e| unreachable!("virtio-mmio area: {e}"));
        let pio = AddressAllocator::new(0, 1 << 16)
            .unwrap_or_else(|e| unreachable!("I/O port space: {e}"));
        let gsi = IdAllocator::new(VIRTIO_GSI_BASE, VIRTIO_GSI_BASE + VIRTIO_SLOTS - 1)
            .unwrap_or_else(|e| unreachable!("GSI range: {e}"));
        Self {
            mmio,
            pio,
            fixed_ports: Vec::new(),
            gsi,
        }
    }

    /// The next free virtio-mmio window (lowest address first): its base.
    pub fn mmio_window(&mut self) -> Result<u64, ResourceError> {
        self.mmio
            .allocate(MMIO_WINDOW, MMIO_WINDOW, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|_| ResourceError::Exhausted {
                what: "virtio-mmio window",
            })
    }

    /// The next free GSI for a device's interrupt.
    pub fn gsi(&mut self) -> Result<u32, ResourceError> {
        self.gsi
            .allocate_id()
            .map_err(|_| ResourceError::Exhausted {
                what: "interrupt line",
            })
    }

    /// Claims the fixed port range `[base, base + len)` (legacy devices sit where PC software
    /// expects them).
    pub fn ports(&mut self, base: u64, len: u64) -> Result<(), ResourceError> {
        let taken = ResourceError::Taken {
            what: "I/O port range",
            base,
            len,
        };
        let end = base.checked_add(len).ok_or(ResourceError::Taken {
            what: "I/O port range",
            base,
            len,
        })?;
        if self
            .fixed_ports
            .iter()
            .any(|&(b, l)| base < b + l && b < end)
        {
            return Err(taken);
        }
        self.pio
            .allocate(len, 1, AllocPolicy::ExactMatch(base))
            .map_err(|_| taken)?;
        self.fixed_ports.push((base, len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_windows_and_gsis_follow_the_layout_until_they_run_out() {
        let mut r = ResourceAllocator::new();
        for slot in 0..u64::from(VIRTIO_SLOTS) {
            assert_eq!(
                r.mmio_window().unwrap(),
                VIRTIO_MMIO_BASE + slot * MMIO_WINDOW
            );
            assert_eq!(
                u64::from(r.gsi().unwrap()),
                u64::from(VIRTIO_GSI_BASE) + slot
            );
        }
        assert!(matches!(
            r.mmio_window(),
            Err(ResourceError::Exhausted { .. })
        ));
        assert!(matches!(r.gsi(), Err(ResourceError::Exhausted { .. })));
        // The last GSI is the IOAPIC's last pin.
        assert_eq!(VIRTIO_GSI_BASE + VIRTIO_SLOTS - 1, 23);
    }

    #[test]
    fn fixed_port_ranges_cannot_overlap() {
        let mut r = ResourceAllocator::new();
        r.ports(0x3f8, 8).unwrap();
        r.ports(0x60, 5).unwrap();
        r.ports(0xf4, 4).unwrap();
        assert!(r.ports(0x3fc, 2).is_err(), "inside COM1");
        assert!(r.ports(0x5e, 4).is_err(), "straddles the i8042");
        assert!(r.ports(0xffff, 2).is_err(), "past the port space");
        r.ports(0x2f8, 8).unwrap();
    }
}
