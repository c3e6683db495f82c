//! What device unit tests and fuzz targets share: an interrupt line that counts, and a driver
//! that activates a device on rings laid out by [`super::ring::DriverRing`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::ring::DriverRing;
use super::transport::{VirtioInterrupt, VirtioInterruptType};
use super::{ActivationContext, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemoryMmap;

/// An interrupt line that counts queue and configuration interrupts.
#[derive(Default)]
pub struct TestInterrupt {
    queue: AtomicU64,
    config: AtomicU64,
}

impl TestInterrupt {
    /// A line with nothing raised yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// Queue interrupts raised so far.
    pub fn queue_interrupts(&self) -> u64 {
        self.queue.load(Ordering::Relaxed)
    }
    /// Configuration interrupts raised so far.
    pub fn config_interrupts(&self) -> u64 {
        self.config.load(Ordering::Relaxed)
    }
}

impl VirtioInterrupt for TestInterrupt {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        match t {
            VirtioInterruptType::Queue(_) => self.queue.fetch_add(1, Ordering::Relaxed),
            VirtioInterruptType::Config => self.config.fetch_add(1, Ordering::Relaxed),
        };
        Ok(())
    }
}

/// An activation context over `mem` and `irq`, with VERSION_1 accepted.
pub fn context(mem: &GuestMemoryMmap, irq: &Arc<TestInterrupt>) -> ActivationContext {
    ActivationContext {
        mem: mem.clone(),
        interrupt: irq.clone(),
        acked_features: VIRTIO_F_VERSION_1,
        restored: false,
    }
}

/// [`context`] for a device a restore activates.
pub fn restored_context(mem: &GuestMemoryMmap, irq: &Arc<TestInterrupt>) -> ActivationContext {
    ActivationContext {
        restored: true,
        ..context(mem, irq)
    }
}

/// Sets every queue of `dev` up on `rings` (one per queue, in order) and activates it.
pub fn activate_all(
    dev: &mut dyn VirtioDevice,
    rings: &[&DriverRing<'_>],
    mem: &GuestMemoryMmap,
    irq: &Arc<TestInterrupt>,
) {
    for (q, ring) in dev.queues_mut().iter_mut().zip(rings) {
        ring.configure(q);
    }
    dev.activate(context(mem, irq)).expect("activation");
}

/// [`activate_all`] for a device with one queue.
pub fn activate(
    dev: &mut dyn VirtioDevice,
    ring: &DriverRing<'_>,
    mem: &GuestMemoryMmap,
    irq: &Arc<TestInterrupt>,
) {
    activate_all(dev, &[ring], mem, irq)
}
