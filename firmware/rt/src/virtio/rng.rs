//! virtio-rng (entropy device, virtio 1.2 §5.4): one queue of
//! device-writable buffers that the device fills with random bytes.
use super::mmio::Transport;
use super::queue::{Buf, VirtQueue};
use super::{Error, Result, DEFAULT_TIMEOUT_MS};
use crate::arch::ms_to_cycles;

pub struct Rng {
    pub t: Transport,
    pub q: VirtQueue,
    pub features: u64,
    pub timeout_cycles: u64,
}

impl Rng {
    pub fn open(t: Transport) -> Result<Rng> {
        if t.device_id != super::device_id::ENTROPY {
            return Err(Error::NoDevice);
        }
        let features = t.negotiate(0)?;
        let q = match VirtQueue::new(&t, 0, 8) {
            Ok(q) => q,
            Err(e) => {
                t.fail();
                return Err(e);
            }
        };
        t.driver_ok()?;
        Ok(Rng { t, q, features, timeout_cycles: ms_to_cycles(DEFAULT_TIMEOUT_MS) })
    }

    /// One request: hand `buf` to the device, return how many bytes it
    /// filled (may be fewer than `buf.len()`, never more).
    pub fn read_once(&mut self, buf: &mut [u8]) -> Result<usize> {
        if buf.is_empty() {
            return Err(Error::BadArgument);
        }
        let head = self.q.add(&[Buf::inp(buf.as_mut_ptr(), buf.len())])?;
        self.q.kick();
        let u = self.q.wait_used(&self.t, self.timeout_cycles)?;
        if u.id != head {
            return Err(Error::BadUsedId(u.id as u32));
        }
        Ok(u.len as usize)
    }

    /// Fill all of `buf` (at most 64 requests).
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut off = 0;
        for _ in 0..64 {
            if off == buf.len() {
                return Ok(());
            }
            off += self.read_once(&mut buf[off..])?;
        }
        if off == buf.len() {
            Ok(())
        } else {
            Err(Error::Timeout)
        }
    }
}
