//! virtio-blk driver (virtio 1.2 §5.2), one request queue, polled.
//!
//! A request is a chain: header {type u32, reserved u32, sector u64}
//! (device-readable), data (split at `size_max` if the device sets
//! VIRTIO_BLK_F_SIZE_MAX), status byte (device-writable). Per-request
//! headers, status bytes and discard segments are indexed by the head
//! descriptor, so up to `queue size / 3` requests can be in flight.
use super::mmio::Transport;
use super::queue::{Buf, Used, VirtQueue};
use super::{Error, Result, DEFAULT_TIMEOUT_MS};
use crate::arch::ms_to_cycles;
use crate::dma;
use core::ptr::{read_volatile, write_volatile};

pub const SECTOR_SIZE: usize = 512;

/// Feature bits.
pub mod feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const GEOMETRY: u64 = 1 << 4;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const TOPOLOGY: u64 = 1 << 10;
    pub const CONFIG_WCE: u64 = 1 << 11;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    pub const LIFETIME: u64 = 1 << 15;
    pub const SECURE_ERASE: u64 = 1 << 16;
}

/// Request types.
pub mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
    /// What the driver puts in the status byte before submitting, to see
    /// whether the device wrote it.
    pub const UNWRITTEN: u8 = 0xff;

    pub fn name(s: u8) -> &'static str {
        match s {
            OK => "OK",
            IOERR => "IOERR",
            UNSUPP => "UNSUPP",
            UNWRITTEN => "unwritten",
            _ => "invalid",
        }
    }
}

/// The features this driver accepts when offered.
pub const DRIVER_FEATURES: u64 = feature::SIZE_MAX
    | feature::SEG_MAX
    | feature::RO
    | feature::BLK_SIZE
    | feature::FLUSH
    | feature::DISCARD
    | feature::WRITE_ZEROES;

/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Most data segments one request may have in this driver.
pub const MAX_DATA_SEGS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReqHeader {
    pub type_: u32,
    pub reserved: u32,
    pub sector: u64,
}

/// Payload of DISCARD and WRITE_ZEROES (flags bit 0: unmap).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DiscardSeg {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// The device config fields this driver reads (0 when the feature that
/// makes a field valid was not negotiated).
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl Config {
    pub fn read(t: &Transport, features: u64) -> Config {
        t.config_consistent(|t| {
            let mut c = Config {
                capacity: ((t.config_read32(4) as u64) << 32) | t.config_read32(0) as u64,
                ..Default::default()
            };
            if features & feature::SIZE_MAX != 0 {
                c.size_max = t.config_read32(8);
            }
            if features & feature::SEG_MAX != 0 {
                c.seg_max = t.config_read32(12);
            }
            if features & feature::BLK_SIZE != 0 {
                c.blk_size = t.config_read32(20);
            }
            if features & feature::DISCARD != 0 {
                c.max_discard_sectors = t.config_read32(36);
                c.max_discard_seg = t.config_read32(40);
                c.discard_sector_alignment = t.config_read32(44);
            }
            if features & feature::WRITE_ZEROES != 0 {
                c.max_write_zeroes_sectors = t.config_read32(48);
                c.max_write_zeroes_seg = t.config_read32(52);
                c.write_zeroes_may_unmap = t.config_read8(56);
            }
            c
        })
    }
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor (the request's tag).
    pub head: u16,
    /// Bytes the device says it wrote (data + status byte).
    pub used_len: u32,
    /// The status byte ([`status::UNWRITTEN`] if the device left it alone).
    pub status: u8,
}

impl Completion {
    /// OK status -> Ok; anything else -> [`Error::Status`] / [`Error::NoStatus`].
    pub fn ok(self) -> Result<Completion> {
        match self.status {
            status::OK => Ok(self),
            status::UNWRITTEN => Err(Error::NoStatus),
            s => Err(Error::Status(s)),
        }
    }
}

pub struct Blk {
    pub t: Transport,
    pub q: VirtQueue,
    /// Offered by the device.
    pub offered: u64,
    /// Accepted by the driver.
    pub features: u64,
    pub config: Config,
    /// Time limit of the synchronous helpers, in TSC cycles.
    pub timeout_cycles: u64,
    hdrs: *mut ReqHeader,
    segs: *mut DiscardSeg,
    status: *mut u8,
}

impl Blk {
    /// Initialise the block device `t` with [`DRIVER_FEATURES`] and a queue
    /// of up to 256 entries.
    pub fn open(t: Transport) -> Result<Blk> {
        Self::open_with(t, DRIVER_FEATURES, 256)
    }

    /// Initialise with the features `wanted` (VERSION_1 is always asked
    /// for) and a queue of at most `queue_size` entries.
    pub fn open_with(t: Transport, wanted: u64, queue_size: u16) -> Result<Blk> {
        Self::open_stage(t, wanted, queue_size, true)
    }

    /// Like [`Blk::open_with`]; with `driver_ok` false the device is left
    /// before DRIVER_OK (queue ready, device not live: for tests).
    pub fn open_stage(t: Transport, wanted: u64, queue_size: u16, driver_ok: bool) -> Result<Blk> {
        if t.device_id != super::device_id::BLOCK {
            return Err(Error::NoDevice);
        }
        let offered = t.device_features();
        let features = t.negotiate(wanted)?;
        let config = Config::read(&t, features);
        let q = match VirtQueue::new(&t, 0, queue_size) {
            Ok(q) => q,
            Err(e) => {
                t.fail();
                return Err(e);
            }
        };
        let n = q.size() as usize;
        let hdrs = dma::alloc(n * 16, 16).ok_or(Error::NoMemory)? as *mut ReqHeader;
        let segs = dma::alloc(n * 16, 16).ok_or(Error::NoMemory)? as *mut DiscardSeg;
        let status = dma::alloc(n, 16).ok_or(Error::NoMemory)?;
        if driver_ok {
            t.driver_ok()?;
        }
        Ok(Blk {
            t,
            q,
            offered,
            features,
            config,
            timeout_cycles: ms_to_cycles(DEFAULT_TIMEOUT_MS),
            hdrs,
            segs,
            status,
        })
    }

    /// Reset the device and initialise it again with the same features and
    /// queue size (new rings; the old ones are not reused).
    pub fn reopen(&mut self) -> Result<()> {
        let timeout = self.timeout_cycles;
        *self = Self::open_with(self.t, self.features, self.q.size())?;
        self.timeout_cycles = timeout;
        Ok(())
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    pub fn read_only(&self) -> bool {
        self.has(feature::RO)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.config.capacity
    }

    /// Largest data segment (size_max, or 1 GiB if not set).
    fn seg_size(&self) -> usize {
        if self.config.size_max != 0 {
            self.config.size_max as usize
        } else {
            1 << 30
        }
    }

    /// Descriptors one request with `data_len` bytes of data needs.
    pub fn descs_per_request(&self, data_len: usize) -> usize {
        2 + data_len.div_ceil(self.seg_size()).max(if data_len > 0 { 1 } else { 0 })
    }

    /// Queue a request (no notify). `data` is the data buffer (address,
    /// length, device writes it?), split at `size_max`. Returns the tag.
    pub fn submit(&mut self, type_: u32, sector: u64, data: Option<Buf>) -> Result<u16> {
        let mut bufs = [Buf { addr: 0, len: 0, device_writes: false }; MAX_DATA_SEGS + 2];
        let head = self.q.next_head() as usize;
        let mut n = 1;
        if let Some(d) = data {
            let seg = self.seg_size();
            let mut off = 0usize;
            loop {
                let len = (d.len as usize - off).min(seg);
                if n > MAX_DATA_SEGS {
                    return Err(Error::TooManySegments);
                }
                bufs[n] = Buf { addr: d.addr + off as u64, len: len as u32, device_writes: d.device_writes };
                n += 1;
                off += len;
                if off >= d.len as usize {
                    break;
                }
            }
            if self.config.seg_max != 0 && n - 1 > self.config.seg_max as usize {
                return Err(Error::TooManySegments);
            }
        }
        if n + 1 > self.q.num_free() as usize {
            return Err(Error::QueueFull);
        }
        unsafe {
            write_volatile(self.hdrs.add(head), ReqHeader { type_, reserved: 0, sector });
            write_volatile(self.status.add(head), status::UNWRITTEN);
        }
        bufs[0] = Buf::out(unsafe { self.hdrs.add(head) }, 16);
        bufs[n] = Buf::inp(unsafe { self.status.add(head) }, 1);
        n += 1;
        let h = self.q.add(&bufs[..n])?;
        debug_assert_eq!(h as usize, head);
        Ok(h)
    }

    /// Queue a read of `len` bytes at `sector` into `addr`.
    pub fn submit_read(&mut self, sector: u64, addr: *mut u8, len: usize) -> Result<u16> {
        self.submit(req::IN, sector, Some(Buf::inp(addr, len)))
    }

    /// Queue a write of `len` bytes from `addr` to `sector`.
    pub fn submit_write(&mut self, sector: u64, addr: *const u8, len: usize) -> Result<u16> {
        self.submit(req::OUT, sector, Some(Buf::out(addr, len)))
    }

    /// Queue a DISCARD (`write_zeroes` false) or WRITE_ZEROES of one range.
    pub fn submit_range(&mut self, write_zeroes: bool, sector: u64, num_sectors: u32, unmap: bool) -> Result<u16> {
        let head = self.q.next_head() as usize;
        let seg = unsafe { self.segs.add(head) };
        unsafe { write_volatile(seg, DiscardSeg { sector, num_sectors, flags: unmap as u32 }) };
        let t = if write_zeroes { req::WRITE_ZEROES } else { req::DISCARD };
        self.submit(t, 0, Some(Buf::out(seg, 16)))
    }

    /// Ring the doorbell.
    pub fn kick(&self) {
        self.q.kick()
    }

    /// [`Self::kick`] unless the device is watching the ring (`Queue::kick_if_wanted`).
    pub fn kick_if_wanted(&self) {
        self.q.kick_if_wanted()
    }

    fn completion(&self, u: Used) -> Completion {
        let status = unsafe { read_volatile(self.status.add(u.id as usize)) };
        Completion { head: u.id, used_len: u.len, status }
    }

    /// A finished request, if any.
    pub fn poll(&mut self) -> Result<Option<Completion>> {
        Ok(self.q.pop_used()?.map(|u| self.completion(u)))
    }

    /// Wait for the next finished request (up to `timeout_cycles`).
    pub fn wait(&mut self, timeout_cycles: u64) -> Result<Completion> {
        let u = self.q.wait_used(&self.t, timeout_cycles)?;
        Ok(self.completion(u))
    }

    /// Submit one request, notify and wait for it (nothing else may be in
    /// flight). Returns the completion whatever its status.
    pub fn request(&mut self, type_: u32, sector: u64, data: Option<Buf>) -> Result<Completion> {
        let head = self.submit(type_, sector, data)?;
        self.kick();
        let c = self.wait(self.timeout_cycles)?;
        if c.head != head {
            return Err(Error::BadUsedId(c.head as u32));
        }
        Ok(c)
    }

    /// Read `buf.len()` bytes (a multiple of 512) at `sector`.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() || !buf.len().is_multiple_of(SECTOR_SIZE) {
            return Err(Error::BadArgument);
        }
        let c = self.request(req::IN, sector, Some(Buf::inp(buf.as_mut_ptr(), buf.len())))?.ok()?;
        if (c.used_len as usize) < buf.len() + 1 {
            return Err(Error::BadUsedLen(c.used_len));
        }
        Ok(())
    }

    /// Write `buf.len()` bytes (a multiple of 512) to `sector`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<()> {
        if buf.is_empty() || !buf.len().is_multiple_of(SECTOR_SIZE) {
            return Err(Error::BadArgument);
        }
        self.request(req::OUT, sector, Some(Buf::out(buf.as_ptr(), buf.len())))?.ok()?;
        Ok(())
    }

    /// FLUSH (the caller checks that VIRTIO_BLK_F_FLUSH was negotiated).
    pub fn flush(&mut self) -> Result<()> {
        self.request(req::FLUSH, 0, None)?.ok()?;
        Ok(())
    }

    /// GET_ID: the device's serial (up to 20 bytes, NUL-padded).
    pub fn get_id(&mut self) -> Result<[u8; ID_LEN]> {
        let buf = dma::alloc(ID_LEN, 16).ok_or(Error::NoMemory)?;
        self.request(req::GET_ID, 0, Some(Buf::inp(buf, ID_LEN)))?.ok()?;
        let mut id = [0u8; ID_LEN];
        for (i, b) in id.iter_mut().enumerate() {
            *b = unsafe { read_volatile(buf.add(i)) };
        }
        Ok(id)
    }

    /// DISCARD `num_sectors` at `sector`.
    pub fn discard(&mut self, sector: u64, num_sectors: u32) -> Result<()> {
        self.submit_range(false, sector, num_sectors, false)?;
        self.kick();
        self.wait(self.timeout_cycles)?.ok()?;
        Ok(())
    }

    /// WRITE_ZEROES `num_sectors` at `sector` (`unmap`: the device may deallocate).
    pub fn write_zeroes(&mut self, sector: u64, num_sectors: u32, unmap: bool) -> Result<()> {
        self.submit_range(true, sector, num_sectors, unmap)?;
        self.kick();
        self.wait(self.timeout_cycles)?.ok()?;
        Ok(())
    }
}
