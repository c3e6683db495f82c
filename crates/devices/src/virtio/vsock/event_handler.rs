//! virtio-vsock on the event loop: the queue notifications, the listening socket, host
//! connections still sending their CONNECT line, and each connection's socket while it can
//! make progress.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{EVT, MAX_CONNS, MAX_HANDSHAKES, RX, RX_BACKLOG, TO_GUEST_MAX, TX};
use super::Vsock;

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        for s in self.closing.drain(..) {
            let _ = ops.remove(Events::new(&s, EventSet::IN | EventSet::OUT));
        }
        let fd = events.fd();
        if fd == self.common.queue_evts[RX].as_raw_fd() {
            let _ = self.common.queue_evts[RX].read();
            self.rewatch_all(ops);
        } else if fd == self.common.queue_evts[TX].as_raw_fd() {
            let _ = self.common.queue_evts[TX].read();
            self.process_tx(ops, true);
        } else if fd == self.common.queue_evts[EVT].as_raw_fd() {
            let _ = self.common.queue_evts[EVT].read();
            self.send_events();
        } else if fd == self.listener_fd() {
            self.accept(ops);
        } else if self.is_handshake(fd) {
            self.handshake(fd, ops);
        } else if let Some(key) = self.conn_of(fd) {
            let set = events.event_set();
            if set.contains(EventSet::OUT) {
                self.flush_to_host(key, ops);
            }
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                self.read_from_host(key, ops);
            }
        }
        if self.common.is_active() {
            self.fill_rx();
            for key in std::mem::take(&mut self.broken) {
                self.close(key, ops, true);
            }
            if self.to_guest_len() < TO_GUEST_MAX / 2 {
                // Guest packets left in the tx ring while answers were piling up.
                self.process_tx(ops, false);
                self.fill_rx();
            }
            if self.to_guest_len() < RX_BACKLOG {
                self.rewatch_all(ops);
            }
        }
        if self.handshakes_len() < MAX_HANDSHAKES && self.conns_len() < MAX_CONNS {
            self.watch_listener(ops, true);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.common.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("virtio-vsock: cannot watch a queue eventfd: {e:?}");
            }
        }
        self.watch_listener(ops, true);
        if !self.listener_watched {
            tracing::error!("virtio-vsock: cannot watch {}", self.uds_display());
        }
    }
}
