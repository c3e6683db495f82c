//! How a virtio device reaches the guest: the register interface (MMIO today, PCI later) and
//! the interrupt line. Devices see only [`VirtioInterrupt`]: which transport carries them, and
//! how it tells the driver which queue or the configuration changed, is the transport's.

pub mod mmio;

use std::io;

/// What an interrupt is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The configuration changed, or the device needs a reset.
    Config,
    /// Queue N has new used buffers.
    Queue(u16),
}

/// A device's line to the driver. The MMIO transport's sets its InterruptStatus register and
/// raises one irqfd; an MSI-X one would pick a vector per queue.
pub trait VirtioInterrupt: Send + Sync {
    /// Tells the driver about `t`.
    fn trigger(&self, t: VirtioInterruptType) -> io::Result<()>;
}
