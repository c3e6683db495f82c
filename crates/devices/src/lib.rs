//! Emulated devices, the buses they sit on and the backends behind them. Nothing here knows
//! the VMM: devices raise interrupts and report guest requests (reset, exit status, console
//! output) through triggers, callbacks and observers their owner hands them.

pub mod block;
pub mod bus;
pub mod legacy;
pub mod memory;
pub mod rate_limiter;
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
