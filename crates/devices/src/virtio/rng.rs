//! virtio-rng: one queue of device-writable buffers, filled from the host's getrandom.

use std::io::Write;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    serve_queue, ActivateError, Counters, DeviceBase, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1,
};

/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 64;
/// Most entropy handed out per request.
const MAX_REQUEST: usize = 64 * 1024;

/// A virtio-rng device.
pub struct Rng {
    base: DeviceBase,
    active: Option<(GuestMemoryMmap, Queue)>,
    buf: Vec<u8>,
}

impl Rng {
    /// A new entropy device raising `irqfd`.
    pub fn new(irqfd: EventFd) -> std::io::Result<Self> {
        Ok(Self {
            base: DeviceBase::new(1, irqfd)?,
            active: None,
            buf: Vec::new(),
        })
    }

    fn fill(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        buf: &mut Vec<u8>,
        counters: &Counters,
    ) -> u32 {
        let Ok(mut w) = chain.writer(mem) else {
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
        counters
            .read_bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n as u32
    }

    fn process_queue(&mut self) {
        let Some((mem, queue)) = self.active.as_mut() else {
            Counters::inc(&self.base.counters.spurious_notifies);
            return;
        };
        if self.base.interrupt.needs_reset() {
            return;
        }
        let mem = mem.clone();
        let (buf, counters) = (&mut self.buf, &self.base.counters);
        serve_queue(
            "virtio-rng",
            queue,
            &mem,
            &self.base.interrupt,
            counters,
            |chain| Self::fill(chain, &mem, buf, counters),
        );
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn kind(&self) -> &'static str {
        "rng"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked: u64,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 || !queues[0].ready() {
            return Err(ActivateError::BadQueue(0));
        }
        self.active = Some((mem, queues.remove(0)));
        self.process_queue();
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn base(&self) -> &DeviceBase {
        &self.base
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            let _ = self.base.queue_evts[0].read();
            self.process_queue();
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.base.queue_evts[0], EventSet::IN)) {
            tracing::error!("virtio-rng: cannot watch the queue eventfd: {e:?}");
        }
    }
}
