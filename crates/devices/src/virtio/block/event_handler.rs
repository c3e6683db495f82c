//! virtio-blk on the event loop. Registered at creation; it then hears about three things: the
//! driver's notifications on the queue's ioeventfd, the backend's completions, and its rate
//! limiter's timer.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Block;

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if !events.event_set().contains(EventSet::IN) {
            return;
        }
        if events.fd() == self.common.queue_evts[0].as_raw_fd() {
            let _ = self.common.queue_evts[0].read();
            self.process_queue();
        } else if events.fd() == self.limiter.as_raw_fd() {
            self.on_rate_limit_timer();
        } else {
            self.complete();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.common.queue_evts[0], EventSet::IN)) {
            tracing::error!("virtio-blk: cannot watch the queue eventfd: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(self.completion_fd(), EventSet::IN)) {
            tracing::error!("virtio-blk: cannot watch the backend's completions: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.limiter, EventSet::IN)) {
            tracing::error!("virtio-blk: cannot watch the rate limiter's timer: {e:?}");
        }
    }
}
