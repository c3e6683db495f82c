//! virtio-rng: one queue of device-writable buffers, filled from the host's getrandom.

use std::io::Write;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::DescriptorChain;

use super::{ActivateError, ActivationContext, Counters, PersistError, VirtioCommon, VirtioDevice};
use super::{Serving, VirtioState};
use crate::memory::GuestMemoryMmap;

/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 64;
/// Most entropy handed out per request.
const MAX_REQUEST: usize = 64 * 1024;

/// A virtio-rng device.
pub struct Rng {
    common: VirtioCommon,
    buf: Vec<u8>,
}

/// What a virtio-rng saves: its queue (the entropy itself is never saved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The virtio part.
    pub virtio: VirtioState,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            common: VirtioCommon::new(VIRTIO_ID_RNG, "rng", 0, &[QUEUE_SIZE])?,
            buf: Vec::new(),
        })
    }

    /// The device's state.
    pub fn save(&self) -> RngState {
        RngState {
            virtio: self.common.save(),
        }
    }

    /// A device in `state` (activated again by its transport's restore).
    pub fn restore(state: &RngState) -> Result<Self, PersistError> {
        let mut d = Self::new().map_err(|e| PersistError::Backend(e.to_string()))?;
        d.common.restore(&state.virtio)?;
        Ok(d)
    }

    fn fill(
        chain: DescriptorChain<&GuestMemoryMmap>,
        buf: &mut Vec<u8>,
        counters: &Counters,
    ) -> u32 {
        let Ok(mut w) = chain.clone().writer(chain.memory()) else {
            Counters::inc(&counters.refused);
            return 0;
        };
        let n = w.available_bytes().min(MAX_REQUEST);
        if n == 0 {
            Counters::inc(&counters.refused);
            return 0;
        }
        buf.resize(n, 0);
        let mut got = 0;
        while got < n {
            // SAFETY: getrandom writes at most `n - got` bytes into our buffer.
            let r = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), n - got, 0) };
            if r <= 0 {
                Counters::inc(&counters.io_errors);
                return 0;
            }
            got += r as usize;
        }
        if w.write_all(&buf[..n]).is_err() {
            Counters::inc(&counters.refused);
            return 0;
        }
        Counters::inc(&counters.requests);
        Counters::add(&counters.read_bytes, n as u64);
        n as u32
    }

    /// Serves every request on the queue.
    pub fn process_queue(&mut self) {
        let buf = &mut self.buf;
        let Some(mut s): Option<Serving<'_>> = self.common.serving() else {
            return;
        };
        s.serve(0, |chain, counters| Self::fill(chain, buf, counters));
    }
}

impl VirtioDevice for Rng {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn save_state(&self) -> Option<crate::virtio::DeviceSnapshot> {
        Some(crate::virtio::DeviceSnapshot::Rng(self.save()))
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        let restored = ctx.restored;
        self.common.activate(ctx)?;
        // Requests the driver queued before DRIVER_OK go to the event loop, as if notified; a
        // restored device waits for the VMM's notification (`ActivationContext::restored`).
        if !restored {
            self.common.notify_queues();
        }
        Ok(())
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            let _ = self.common.queue_evts[0].read();
            self.process_queue();
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.common.queue_evts[0], EventSet::IN)) {
            tracing::error!("virtio-rng: cannot watch the queue eventfd: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ring::DriverRing;
    use crate::virtio::test_utils::{activate, TestInterrupt};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn entropy_fills_the_buffers_and_state_round_trips() {
        let mem = crate::memory::test_memory(1);
        let mut dev = Rng::new().unwrap();
        let mut ring = DriverRing::new(&mem, 0x1_0000, 16);
        let irq = TestInterrupt::new();
        activate(&mut dev, &ring, &mem, &irq);
        ring.push_chain(0, &[(0x8_0000, 64, true)]);
        dev.process_queue();
        assert_eq!(ring.used_entry(0), (0, 64));
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, GuestAddress(0x8_0000)).unwrap();
        assert!(
            got.iter().any(|b| *b != 0),
            "64 random bytes are not all zero"
        );
        assert_eq!(irq.queue_interrupts(), 1);

        // Save, restore into a new device, activate it again: it continues on the same ring.
        let saved = dev.save();
        let back: RngState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let mut dev2 = Rng::restore(&back).unwrap();
        let irq2 = TestInterrupt::new();
        dev2.activate(crate::virtio::test_utils::context(&mem, &irq2))
            .unwrap();
        assert_eq!(dev2.save(), saved);
        ring.push_chain(1, &[(0x9_0000, 16, true)]);
        dev2.process_queue();
        assert_eq!(ring.used_idx(), 2);
        assert_eq!(ring.used_entry(1), (1, 16));
        // A read-only buffer is refused, counted, and still returned.
        ring.push_chain(2, &[(0x9_0000, 16, false)]);
        dev2.process_queue();
        assert_eq!(ring.used_entry(2), (2, 0));
        assert_eq!(
            dev2.counters()
                .refused
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
