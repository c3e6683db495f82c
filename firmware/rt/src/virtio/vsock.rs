//! virtio-vsock driver (virtio 1.2 §5.10), polled: receive queue 0,
//! transmit queue 1, event queue 2; only VIRTIO_F_VERSION_1 is accepted
//! (no SEQPACKET). Every packet is a 44-byte little-endian header
//! ([`Hdr`]) followed by `len` payload bytes.
//!
//! Receive: one device-writable descriptor of [`RX_BUF_LEN`] (header + 4 KiB)
//! per buffer, indexed by descriptor number, all posted at start and
//! re-posted after each packet. Transmit: a header descriptor, plus a payload
//! descriptor if the packet carries data (both device-readable), in per-head
//! buffers. Event: a few 8-byte buffers (`virtio_vsock_event`, id 0 =
//! TRANSPORT_RESET).
//!
//! Connection state and stream credit (§5.10.6.3) live in [`Conn`]: every
//! packet we send advertises our `buf_alloc` and `fwd_cnt`; every packet of
//! the connection updates the peer's; [`Vsock::send_conn`] refuses RW data
//! beyond `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`.
use super::mmio::Transport;
use super::queue::{Buf, VirtQueue};
use super::{Error, Result, DEFAULT_TIMEOUT_MS};
use crate::arch::ms_to_cycles;
use crate::dma;

/// Header bytes on the wire.
pub const HDR_LEN: usize = 44;
/// Largest payload per packet (both directions).
pub const MAX_PAYLOAD: usize = 4096;
/// Length of one receive descriptor.
pub const RX_BUF_LEN: usize = HDR_LEN + MAX_PAYLOAD;
/// Distance between receive buffers (RX_BUF_LEN rounded up to 64).
const RX_STRIDE: usize = (RX_BUF_LEN + 63) & !63;
const TX_HDR_STRIDE: usize = 64;
const EV_BUF_LEN: usize = 8;
const EV_BUFS: u16 = 4;
const RX: u16 = 0;
const TX: u16 = 1;
const EV: u16 = 2;

/// Well-known CIDs.
pub const CID_HYPERVISOR: u64 = 0;
pub const CID_LOCAL: u64 = 1;
pub const CID_HOST: u64 = 2;

/// `type` field.
pub const TYPE_STREAM: u16 = 1;
pub const TYPE_SEQPACKET: u16 = 2;

/// `op` field.
pub mod op {
    pub const INVALID: u16 = 0;
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;

    pub fn name(op: u16) -> &'static str {
        match op {
            REQUEST => "REQUEST",
            RESPONSE => "RESPONSE",
            RST => "RST",
            SHUTDOWN => "SHUTDOWN",
            RW => "RW",
            CREDIT_UPDATE => "CREDIT_UPDATE",
            CREDIT_REQUEST => "CREDIT_REQUEST",
            _ => "?",
        }
    }
}

/// SHUTDOWN flags.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    pub const BOTH: u32 = 3;
}

/// `virtio_vsock_event` id: all connections were reset (e.g. after migration).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// A packet header (`virtio_vsock_hdr`), in host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// Decode the first 44 bytes of `b`.
    pub fn parse(b: &[u8]) -> Hdr {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encode into the first 44 bytes of `b`.
    pub fn write(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }
}

/// One stream connection: addresses and credit counters (all wrapping u32).
#[derive(Clone, Copy, Debug, Default)]
pub struct Conn {
    pub local_cid: u64,
    pub local_port: u32,
    pub peer_cid: u64,
    pub peer_port: u32,
    /// Our receive buffer space, advertised in every packet.
    pub buf_alloc: u32,
    /// Payload bytes we have consumed (freed from our buffer).
    pub fwd_cnt: u32,
    /// The `fwd_cnt` last told to the peer.
    pub fwd_cnt_sent: u32,
    /// Payload bytes received.
    pub rx_cnt: u32,
    /// Payload bytes sent.
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// SHUTDOWN flags received from the peer (accumulated).
    pub peer_shutdown: u32,
}

impl Conn {
    pub fn new(local_cid: u64, local_port: u32, peer_cid: u64, peer_port: u32, buf_alloc: u32) -> Conn {
        Conn { local_cid, local_port, peer_cid, peer_port, buf_alloc, ..Default::default() }
    }

    /// Is `h` addressed to this connection (peer -> us)?
    pub fn matches(&self, h: &Hdr) -> bool {
        h.src_cid == self.peer_cid
            && h.src_port == self.peer_port
            && h.dst_cid == self.local_cid
            && h.dst_port == self.local_port
    }

    /// Take the peer's credit information from a packet of this connection.
    pub fn update_credit(&mut self, h: &Hdr) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Payload bytes we may still send: peer_buf_alloc - (tx_cnt - peer_fwd_cnt).
    /// 0 if the peer's counters are inconsistent (more acknowledged than sent
    /// or more in flight than its buffer).
    pub fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Received payload bytes not yet consumed.
    pub fn unconsumed(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// Would a packet of `len` payload bytes from the peer overflow our buffer?
    pub fn overruns(&self, len: u32) -> bool {
        self.unconsumed() as u64 + len as u64 > self.buf_alloc as u64
    }

    /// Bytes consumed since the peer last heard our `fwd_cnt`.
    pub fn credit_owed(&self) -> u32 {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent)
    }

    /// A header from us to the peer (STREAM, our credit counters).
    pub fn hdr(&self, op: u16, flags: u32, len: u32) -> Hdr {
        Hdr {
            src_cid: self.local_cid,
            dst_cid: self.peer_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }
}

pub struct Vsock {
    pub t: Transport,
    pub rx: VirtQueue,
    pub tx: VirtQueue,
    pub ev: VirtQueue,
    pub offered: u64,
    pub features: u64,
    /// From config space (0x100, u64).
    pub guest_cid: u64,
    pub timeout_cycles: u64,
    rx_bufs: *mut u8,
    tx_hdrs: *mut u8,
    tx_data: *mut u8,
    ev_bufs: *mut u8,
    /// Events received (TRANSPORT_RESET or unknown ids).
    pub events: u64,
}

impl Vsock {
    /// Initialise the device with rx/tx queues of up to `queue_size` entries,
    /// post every receive buffer and a few event buffers.
    pub fn open(t: Transport, queue_size: u16) -> Result<Vsock> {
        if t.device_id != super::device_id::VSOCK {
            return Err(Error::NoDevice);
        }
        let offered = t.device_features();
        let features = t.negotiate(0)?;
        let guest_cid = t.config_read64(0);
        let queues =
            (VirtQueue::new(&t, RX, queue_size), VirtQueue::new(&t, TX, queue_size), VirtQueue::new(&t, EV, 8));
        let (rx, tx, ev) = match queues {
            (Ok(rx), Ok(tx), Ok(ev)) => (rx, tx, ev),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                t.fail();
                return Err(e);
            }
        };
        let rx_bufs = dma::alloc(rx.size() as usize * RX_STRIDE, 4096).ok_or(Error::NoMemory)?;
        let tx_hdrs = dma::alloc(tx.size() as usize * TX_HDR_STRIDE, 4096).ok_or(Error::NoMemory)?;
        let tx_data = dma::alloc(tx.size() as usize * MAX_PAYLOAD, 4096).ok_or(Error::NoMemory)?;
        let ev_bufs = dma::alloc(ev.size() as usize * EV_BUF_LEN, 64).ok_or(Error::NoMemory)?;
        let mut v = Vsock {
            t,
            rx,
            tx,
            ev,
            offered,
            features,
            guest_cid,
            timeout_cycles: ms_to_cycles(DEFAULT_TIMEOUT_MS),
            rx_bufs,
            tx_hdrs,
            tx_data,
            ev_bufs,
            events: 0,
        };
        while v.rx.num_free() > 0 {
            v.post_rx()?;
        }
        for _ in 0..EV_BUFS.min(v.ev.size()) {
            v.post_ev()?;
        }
        t.driver_ok()?;
        v.rx.kick();
        v.ev.kick();
        Ok(v)
    }

    fn post_rx(&mut self) -> Result<()> {
        let i = self.rx.next_head() as usize;
        let p = unsafe { self.rx_bufs.add(i * RX_STRIDE) };
        self.rx.add(&[Buf::inp(p, RX_BUF_LEN)])?;
        Ok(())
    }

    fn post_ev(&mut self) -> Result<()> {
        let i = self.ev.next_head() as usize;
        let p = unsafe { self.ev_bufs.add(i * EV_BUF_LEN) };
        unsafe { core::ptr::write_bytes(p, 0xff, EV_BUF_LEN) };
        self.ev.add(&[Buf::inp(p, EV_BUF_LEN)])?;
        Ok(())
    }

    /// Free the buffers of finished transmissions.
    pub fn reclaim_tx(&mut self) -> Result<()> {
        while self.tx.pop_used()?.is_some() {}
        Ok(())
    }

    /// Can a packet with payload be queued without waiting?
    pub fn tx_ready(&mut self) -> Result<bool> {
        self.reclaim_tx()?;
        Ok(self.tx.num_free() >= 2)
    }

    /// Queue one packet (`h.len` is set to `payload.len()`, at most
    /// [`MAX_PAYLOAD`]) and notify. Waits (up to the timeout) for free
    /// descriptors if the ring is full.
    pub fn send(&mut self, h: &Hdr, payload: &[u8]) -> Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::BadArgument);
        }
        let need = if payload.is_empty() { 1 } else { 2 };
        self.reclaim_tx()?;
        while (self.tx.num_free() as usize) < need {
            self.tx.wait_used(&self.t, self.timeout_cycles)?;
        }
        let head = self.tx.next_head() as usize;
        let hp = unsafe { self.tx_hdrs.add(head * TX_HDR_STRIDE) };
        let mut hdr = *h;
        hdr.len = payload.len() as u32;
        hdr.write(unsafe { core::slice::from_raw_parts_mut(hp, HDR_LEN) });
        if payload.is_empty() {
            self.tx.add(&[Buf::out(hp, HDR_LEN)])?;
        } else {
            let dp = unsafe { self.tx_data.add(head * MAX_PAYLOAD) };
            unsafe { core::ptr::copy_nonoverlapping(payload.as_ptr(), dp, payload.len()) };
            self.tx.add(&[Buf::out(hp, HDR_LEN), Buf::out(dp, payload.len())])?;
        }
        self.tx.kick();
        Ok(())
    }

    /// Send a packet of connection `c` with our credit counters; RW payload
    /// counts against the peer's credit (refused with [`Error::NoCredit`]
    /// beyond it) and advances `tx_cnt`.
    pub fn send_conn(&mut self, c: &mut Conn, op: u16, flags: u32, payload: &[u8]) -> Result<()> {
        if op == op::RW && payload.len() as u64 > c.credit() as u64 {
            return Err(Error::NoCredit);
        }
        self.send(&c.hdr(op, flags, payload.len() as u32), payload)?;
        c.fwd_cnt_sent = c.fwd_cnt;
        if op == op::RW {
            c.tx_cnt = c.tx_cnt.wrapping_add(payload.len() as u32);
        }
        Ok(())
    }

    /// Reply RST to a packet `h` (to no connection of ours).
    pub fn send_rst_for(&mut self, h: &Hdr) -> Result<()> {
        let r = Hdr {
            src_cid: self.guest_cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        };
        self.send(&r, &[])
    }

    /// Take the next received packet: its header, and its payload copied
    /// into `payload` (which must hold [`MAX_PAYLOAD`] bytes); the buffer goes
    /// back to the device. A used length shorter than the header, or
    /// shorter than header + `len`, or `len` above [`MAX_PAYLOAD`], is
    /// [`Error::BadPacket`] (the packet is dropped).
    pub fn recv(&mut self, payload: &mut [u8]) -> Result<Option<Hdr>> {
        let Some(u) = self.rx.pop_used()? else {
            return Ok(None);
        };
        let used = u.len as usize;
        let p = unsafe { self.rx_bufs.add(u.id as usize * RX_STRIDE) };
        let buf = unsafe { core::slice::from_raw_parts(p, RX_BUF_LEN) };
        let r = if used < HDR_LEN {
            Err(Error::BadPacket(u.len))
        } else {
            let h = Hdr::parse(buf);
            let n = h.len as usize;
            if n > MAX_PAYLOAD || n > used - HDR_LEN || n > payload.len() {
                Err(Error::BadPacket(h.len))
            } else {
                payload[..n].copy_from_slice(&buf[HDR_LEN..HDR_LEN + n]);
                Ok(Some(h))
            }
        };
        self.post_rx()?;
        self.rx.kick();
        r
    }

    /// The next event id from the event queue, if any (the buffer is re-posted).
    pub fn poll_event(&mut self) -> Result<Option<u32>> {
        let Some(u) = self.ev.pop_used()? else {
            return Ok(None);
        };
        let p = unsafe { self.ev_bufs.add(u.id as usize * EV_BUF_LEN) };
        let id = if u.len >= 4 { unsafe { core::ptr::read_volatile(p as *const u32) } } else { u32::MAX };
        self.events += 1;
        self.post_ev()?;
        self.ev.kick();
        Ok(Some(id))
    }
}
