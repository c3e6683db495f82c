//! One vsock stream's state: who opened it, the credit each side has (virtio 1.2 §5.10.6.3),
//! what the guest sent that the host socket has not taken yet, and how far each direction is
//! shut down. No event loop and no queues here.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;

/// Where a connection is in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// One stream between a guest port and a host socket.
pub struct Conn {
    /// The host socket.
    pub stream: UnixStream,
    /// Handshake state.
    pub state: State,
    /// The host side's port (ours).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// The guest's receive buffer for this stream.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has taken from that buffer.
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub tx_cnt: u32,
    /// Bytes from the guest written to the host socket.
    pub fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    pub fwd_cnt_sent: u32,
    /// Guest data not yet written to the host socket.
    pub to_host: VecDeque<u8>,
    /// Whether the event loop watches the socket for reading.
    pub watching_in: bool,
    /// Whether the event loop watches the socket for writing.
    pub watching_out: bool,
    /// The host closed its sending side (the guest has been told, once).
    pub host_eof: bool,
    /// The guest will send nothing more.
    pub guest_no_send: bool,
    /// The guest will receive nothing more.
    pub guest_no_recv: bool,
    /// The host socket's write side was shut down after the guest's last byte.
    pub write_shut: bool,
}

impl Conn {
    /// A connection on `stream` between our `local_port` and the guest's `peer_port`.
    pub fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_host: VecDeque::new(),
            watching_in: false,
            watching_out: false,
            host_eof: false,
            guest_no_send: false,
            guest_no_recv: false,
            write_shut: false,
        }
    }

    /// Bytes the guest can still take: its buffer minus what is sent and not yet taken.
    pub fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_follows_the_peer_and_survives_counter_wrap() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, State::Established, 1, 2);
        assert_eq!(
            c.credit(),
            0,
            "no credit before the peer says its buffer size"
        );
        c.peer_buf_alloc = 1000;
        assert_eq!(c.credit(), 1000);
        c.tx_cnt = 600;
        assert_eq!(c.credit(), 400);
        c.peer_fwd_cnt = 500;
        assert_eq!(c.credit(), 900);
        // The counters are free-running u32s.
        c.tx_cnt = 100;
        c.peer_fwd_cnt = u32::MAX - 99;
        assert_eq!(c.credit(), 800);
        // A peer that claims to have taken more than was sent gets no extra credit.
        c.tx_cnt = 0;
        c.peer_fwd_cnt = 0;
        c.peer_buf_alloc = 10;
        c.tx_cnt = 20;
        assert_eq!(c.credit(), 0);
    }
}
