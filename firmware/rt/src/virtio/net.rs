//! virtio-net driver (virtio 1.2 §5.1), polled: receive queue 0, transmit
//! queue 1, no offloads and no mergeable buffers, so every frame is a
//! 12-byte `virtio_net_hdr` (all zeros on transmit) followed by at most
//! 1514 bytes of Ethernet frame. Receive buffers are 2 KiB each, one
//! descriptor per buffer, indexed by descriptor number; transmit copies the
//! frame into a per-descriptor 2 KiB buffer.
use super::mmio::Transport;
use super::queue::{Buf, VirtQueue};
use super::{Error, Result, DEFAULT_TIMEOUT_MS};
use crate::arch::ms_to_cycles;
use crate::dma;

/// Feature bits.
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const MQ: u64 = 1 << 22;
}

/// The features this driver accepts when offered.
pub const DRIVER_FEATURES: u64 = feature::MAC | feature::STATUS;
/// `virtio_net_hdr` with VERSION_1 (num_buffers included).
pub const HDR_LEN: usize = 12;
/// Bytes per receive / transmit buffer.
pub const BUF_LEN: usize = 2048;
/// Largest frame (without the virtio header) this driver sends.
pub const MAX_FRAME: usize = 1514;
const RX: u16 = 0;
const TX: u16 = 1;

pub struct Net {
    pub t: Transport,
    pub rx: VirtQueue,
    pub tx: VirtQueue,
    pub offered: u64,
    pub features: u64,
    /// From config space if VIRTIO_NET_F_MAC, else zero.
    pub mac: [u8; 6],
    pub timeout_cycles: u64,
    rx_bufs: *mut u8,
    tx_bufs: *mut u8,
    /// Frames received with a used length too short for the header or
    /// longer than the buffer (dropped).
    pub rx_bad: u64,
}

impl Net {
    /// Initialise the device with queues of up to `queue_size` entries and
    /// post every receive buffer.
    pub fn open(t: Transport, queue_size: u16) -> Result<Net> {
        if t.device_id != super::device_id::NET {
            return Err(Error::NoDevice);
        }
        let offered = t.device_features();
        let features = t.negotiate(DRIVER_FEATURES)?;
        let mac = if features & feature::MAC != 0 {
            t.config_consistent(|t| core::array::from_fn(|i| t.config_read8(i)))
        } else {
            [0u8; 6]
        };
        let (rx, tx) = match (VirtQueue::new(&t, RX, queue_size), VirtQueue::new(&t, TX, queue_size)) {
            (Ok(rx), Ok(tx)) => (rx, tx),
            (Err(e), _) | (_, Err(e)) => {
                t.fail();
                return Err(e);
            }
        };
        let rx_bufs = dma::alloc(rx.size() as usize * BUF_LEN, 4096).ok_or(Error::NoMemory)?;
        let tx_bufs = dma::alloc(tx.size() as usize * BUF_LEN, 4096).ok_or(Error::NoMemory)?;
        let mut n = Net {
            t,
            rx,
            tx,
            offered,
            features,
            mac,
            timeout_cycles: ms_to_cycles(DEFAULT_TIMEOUT_MS),
            rx_bufs,
            tx_bufs,
            rx_bad: 0,
        };
        while n.rx.num_free() > 0 {
            n.post_rx()?;
        }
        t.driver_ok()?;
        n.rx.kick();
        Ok(n)
    }

    /// Used-buffer interrupts on the receive queue (for a driver that sleeps
    /// until frames arrive: route the device's IRQ, see [`crate::irq`], and
    /// acknowledge with `t.ack_interrupt()`). Transmit stays silent.
    pub fn enable_rx_interrupts(&mut self) {
        self.rx.set_interrupts(true);
    }

    /// Link state from config space (None without VIRTIO_NET_F_STATUS).
    pub fn link_up(&self) -> Option<bool> {
        (self.features & feature::STATUS != 0).then(|| self.t.config_read16(6) & 1 != 0)
    }

    fn post_rx(&mut self) -> Result<()> {
        let i = self.rx.next_head() as usize;
        let p = unsafe { self.rx_bufs.add(i * BUF_LEN) };
        self.rx.add(&[Buf::inp(p, BUF_LEN)])?;
        Ok(())
    }

    /// Free the buffers of finished transmissions.
    pub fn reclaim_tx(&mut self) -> Result<()> {
        while self.tx.pop_used()?.is_some() {}
        Ok(())
    }

    /// Queue one Ethernet frame (without the virtio header) and notify.
    /// Waits (up to the timeout) for a free descriptor if the ring is full.
    pub fn send(&mut self, frame: &[u8]) -> Result<()> {
        if frame.is_empty() || frame.len() > MAX_FRAME {
            return Err(Error::BadArgument);
        }
        self.reclaim_tx()?;
        if self.tx.num_free() == 0 {
            self.tx.wait_used(&self.t, self.timeout_cycles)?;
        }
        let i = self.tx.next_head() as usize;
        let p = unsafe { self.tx_bufs.add(i * BUF_LEN) };
        unsafe {
            core::ptr::write_bytes(p, 0, HDR_LEN);
            core::ptr::copy_nonoverlapping(frame.as_ptr(), p.add(HDR_LEN), frame.len());
        }
        self.tx.add(&[Buf::out(p, HDR_LEN + frame.len())])?;
        self.tx.kick();
        Ok(())
    }

    /// Write the virtio header + `frame` into every transmit buffer, for
    /// [`Net::submit_prepared`] (a blast of identical frames without copies).
    pub fn prepare_tx(&mut self, frame: &[u8]) -> Result<()> {
        if frame.is_empty() || frame.len() > MAX_FRAME {
            return Err(Error::BadArgument);
        }
        for i in 0..self.tx.size() as usize {
            let p = unsafe { self.tx_bufs.add(i * BUF_LEN) };
            unsafe {
                core::ptr::write_bytes(p, 0, HDR_LEN);
                core::ptr::copy_nonoverlapping(frame.as_ptr(), p.add(HDR_LEN), frame.len());
            }
        }
        Ok(())
    }

    /// Queue the frame of `len` bytes that [`Net::prepare_tx`] left in the
    /// next free transmit buffer, without notifying. False if the ring is full.
    pub fn submit_prepared(&mut self, len: usize) -> Result<bool> {
        if len == 0 || len > MAX_FRAME {
            return Err(Error::BadArgument);
        }
        if self.tx.num_free() == 0 {
            return Ok(false);
        }
        let i = self.tx.next_head() as usize;
        let p = unsafe { self.tx_bufs.add(i * BUF_LEN) };
        self.tx.add(&[Buf::out(p, HDR_LEN + len)])?;
        Ok(true)
    }

    /// Count (and free) finished transmissions.
    pub fn reclaim_tx_count(&mut self) -> Result<u64> {
        let mut n = 0;
        while self.tx.pop_used()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Hand every received frame waiting in the used ring to `f` (without
    /// the virtio header), re-post the buffers and notify once. Returns the
    /// number of frames passed to `f` (malformed ones are counted in `rx_bad`).
    pub fn recv_batch(&mut self, mut f: impl FnMut(&[u8])) -> Result<usize> {
        let mut n = 0;
        let mut reposted = false;
        while let Some(u) = self.rx.pop_used()? {
            let len = u.len as usize;
            let p = unsafe { self.rx_bufs.add(u.id as usize * BUF_LEN) };
            if len > HDR_LEN && len <= BUF_LEN {
                f(unsafe { core::slice::from_raw_parts(p.add(HDR_LEN), len - HDR_LEN) });
                n += 1;
            } else {
                self.rx_bad += 1;
            }
            self.post_rx()?;
            reposted = true;
        }
        if reposted {
            self.rx.kick();
        }
        Ok(n)
    }

    /// Copy the next received frame (without the virtio header) into `out`
    /// and give its buffer back to the device. Returns the frame length
    /// (truncated to `out.len()`), or None if nothing arrived.
    pub fn recv(&mut self, out: &mut [u8]) -> Result<Option<usize>> {
        loop {
            let Some(u) = self.rx.pop_used()? else {
                return Ok(None);
            };
            let len = u.len as usize;
            let p = unsafe { self.rx_bufs.add(u.id as usize * BUF_LEN) };
            let got = if len > HDR_LEN && len <= BUF_LEN {
                let n = (len - HDR_LEN).min(out.len());
                unsafe { core::ptr::copy_nonoverlapping(p.add(HDR_LEN), out.as_mut_ptr(), n) };
                Some(n)
            } else {
                self.rx_bad += 1;
                None
            };
            self.post_rx()?;
            self.rx.kick();
            if got.is_some() {
                return Ok(got);
            }
        }
    }
}
