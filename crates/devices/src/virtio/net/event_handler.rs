//! virtio-net on the event loop: the rx and tx notifications, the TAP while the guest has
//! rx buffers for it (and the rx limiter allows), and the two rate limiters' timers.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{RX, TX};
use super::Net;

impl Net {
    fn watch_tap(&mut self, ops: &mut EventOps, on: bool) {
        let on = on && self.common.is_active() && !self.common.needs_reset();
        if self.tap_watched == on {
            return;
        }
        let ev = Events::new(self.tap.file(), EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        if r.is_ok() {
            self.tap_watched = on;
        }
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.common.queue_evts[RX].as_raw_fd() {
            let _ = self.common.queue_evts[RX].read();
            let watch = self.process_rx(true);
            self.watch_tap(ops, watch);
        } else if fd == self.common.queue_evts[TX].as_raw_fd() {
            let _ = self.common.queue_evts[TX].read();
            self.process_tx();
        } else if fd == self.tap.file().as_raw_fd() {
            // Also the way a TAP still watched after a driver reset gets unwatched.
            let watch = self.process_rx(false);
            self.watch_tap(ops, watch);
        } else if fd == self.rx_limiter.as_raw_fd() {
            self.rx_limiter.on_timer();
            let watch = self.process_rx(false);
            self.watch_tap(ops, watch);
        } else if fd == self.tx_limiter.as_raw_fd() {
            self.tx_limiter.on_timer();
            self.process_tx();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.common.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("virtio-net: cannot watch a queue eventfd: {e:?}");
            }
        }
        for timer in [&self.rx_limiter, &self.tx_limiter] {
            if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                tracing::error!("virtio-net: cannot watch a rate limiter's timer: {e:?}");
            }
        }
    }
}
