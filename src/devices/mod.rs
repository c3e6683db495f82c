//! Emulated devices and the buses they sit on.

pub mod bus;
pub mod legacy;
pub mod serial;
pub mod tap;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line that is an eventfd (for a VMM, an irqfd KVM injects from).
pub struct IrqTrigger(pub EventFd);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
