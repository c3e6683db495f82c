//! virtio-blk requests: one parser for every request a driver can make (virtio 1.2 §5.2.6),
//! whatever its descriptor layout, turning a chain into a typed [`Request`] or a
//! [`RequestError`] that knows which status the driver gets.
//!
//! A request is a chain of device-readable descriptors (a 16-byte header, then the data of a
//! write, discard or write-zeroes) followed by device-writable ones (the data of a read or
//! GET_ID, then one status byte). Drivers split and merge these freely (Linux puts the header
//! alone and the status alone; others put the header and data in one buffer), so the parser
//! works on the byte streams, not on descriptor counts.

use virtio_bindings::virtio_blk as vb;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::block::{in_bounds, BlockOp, SECTOR};
use crate::memory::GuestMemoryMmap;

/// Largest single data transfer we accept.
pub const MAX_TRANSFER: u64 = 4 << 20;

/// The request header (`struct virtio_blk_outhdr`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestHeader {
    /// VIRTIO_BLK_T_*.
    pub type_: u32,
    /// Priority (ignored).
    pub ioprio: u32,
    /// First sector.
    pub sector: u64,
}

// SAFETY: a repr(C) struct of plain integers with no padding (4 + 4 + 8 bytes): every byte
// pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// One range of a discard or write-zeroes request
/// (`struct virtio_blk_discard_write_zeroes`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub num_sectors: u32,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
    pub flags: u32,
}

// SAFETY: a repr(C) struct of plain integers with no padding (8 + 4 + 4 bytes).
unsafe impl ByteValued for DiscardSegment {}

/// The request types we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors.
    In,
    /// Write sectors.
    Out,
    /// Flush the write cache.
    Flush,
    /// The device's serial number.
    GetId,
    /// Deallocate ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
    /// Anything else.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            vb::VIRTIO_BLK_T_IN => Self::In,
            vb::VIRTIO_BLK_T_OUT => Self::Out,
            vb::VIRTIO_BLK_T_FLUSH => Self::Flush,
            vb::VIRTIO_BLK_T_GET_ID => Self::GetId,
            vb::VIRTIO_BLK_T_DISCARD => Self::Discard,
            vb::VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// The status byte a request ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok,
    /// Failed (refused or an I/O error).
    IoErr,
    /// Not a request we do.
    Unsupported,
}

impl Status {
    /// The byte the driver reads.
    pub fn byte(self) -> u8 {
        (match self {
            Self::Ok => vb::VIRTIO_BLK_S_OK,
            Self::IoErr => vb::VIRTIO_BLK_S_IOERR,
            Self::Unsupported => vb::VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// Why a chain is not a request we carry out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No byte the device may write: nothing can be reported to the driver.
    #[error("no writable byte for the status")]
    NoStatus,
    /// A descriptor lies (partly) outside guest memory.
    #[error("a descriptor at {0:#x} is outside guest memory")]
    BadDescriptor(u64),
    /// A device-readable descriptor after a device-writable one.
    #[error("readable descriptors after writable ones")]
    Order,
    /// Fewer than 16 readable bytes.
    #[error("no complete request header")]
    ShortHeader,
    /// A type we do not carry out.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A write, discard or write-zeroes on a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// No data, not whole sectors, or more than we take at once.
    #[error("a transfer of {0} bytes")]
    BadLength(u64),
    /// Beyond the end of the disk.
    #[error("sectors {sector}+{len} bytes are outside the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u64,
    },
    /// A discard or write-zeroes that is not exactly one range of at least one sector.
    #[error("a discard or write-zeroes request must carry exactly one non-empty range")]
    BadRange,
}

impl RequestError {
    /// What the driver is told: the one place errors map to virtio status.
    pub fn status(&self) -> Status {
        match self {
            Self::Unsupported(_) => Status::Unsupported,
            _ => Status::IoErr,
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// For reads, writes, discards and write-zeroes: the backend operation, byte offset and
    /// length.
    pub op: Option<(BlockOp, u64, u64)>,
    /// Guest buffers of the data: what the device reads (writes) or fills (reads, GET_ID).
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// What the parser needs to know about the disk.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Size in bytes.
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

/// A parse that failed, with where its status goes (none if the chain has no writable byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub error: RequestError,
    /// The status byte's address, if the chain has one in guest memory.
    pub status: Option<GuestAddress>,
}

/// A list of guest buffers, on the stack up to four (a request's header, data and status are
/// one to three): parsing allocated four lists per request, 6 % of a virtio-blk thread serving
/// 4 KiB reads from the page cache (perf).
type Bufs = smallvec::SmallVec<[(GuestAddress, u32); 4]>;

/// Takes `len` bytes from the front of a list of buffers; returns them as buffers.
fn take(bufs: &mut Bufs, mut len: u64) -> Bufs {
    let mut out = Bufs::new();
    while len > 0 && !bufs.is_empty() {
        let (addr, n) = bufs[0];
        let k = u64::from(n).min(len);
        out.push((addr, k as u32));
        if k == u64::from(n) {
            bufs.remove(0);
        } else {
            bufs[0] = (addr.unchecked_add(k), n - k as u32);
        }
        len -= k;
    }
    out
}

fn total(bufs: &[(GuestAddress, u32)]) -> u64 {
    bufs.iter().map(|(_, n)| u64::from(*n)).sum()
}

/// Reads an object that may span buffers.
fn read_obj<T: ByteValued + Default>(
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, u32)],
) -> Option<T> {
    let mut v = T::default();
    let bytes = v.as_mut_slice();
    let mut at = 0;
    for (addr, n) in bufs {
        let n = *n as usize;
        mem.read_slice(bytes.get_mut(at..at + n)?, *addr).ok()?;
        at += n;
    }
    (at == bytes.len()).then_some(v)
}

impl Request {
    /// Parses `chain` against a disk with `limits`.
    pub fn parse(
        chain: &DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        limits: Limits,
    ) -> Result<Request, Refused> {
        let mut readable = Bufs::new();
        let mut writable = Bufs::new();
        let mut order_ok = true;
        let mut bad = None;
        for d in chain.clone() {
            if d.len() == 0 {
                continue;
            }
            if bad.is_none() && !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
                bad = Some(d.addr().raw_value());
            }
            if d.is_write_only() {
                writable.push((d.addr(), d.len()));
            } else if writable.is_empty() {
                readable.push((d.addr(), d.len()));
            } else {
                order_ok = false;
            }
        }
        // The status is the last writable byte, if that is in guest memory.
        let status = writable.last().and_then(|(a, n)| {
            let s = a.checked_add(u64::from(*n) - 1)?;
            GuestMemoryBackend::check_range(mem, s, 1).then_some(s)
        });
        let refuse = |error| Refused { error, status };
        if writable.is_empty() {
            return Err(refuse(RequestError::NoStatus));
        }
        if let Some(a) = bad {
            return Err(refuse(RequestError::BadDescriptor(a)));
        }
        let Some(status) = status else {
            return Err(refuse(RequestError::NoStatus));
        };
        if !order_ok {
            return Err(refuse(RequestError::Order));
        }
        // Without the status byte, the writable part is the data of a read or GET_ID.
        let in_len = total(&writable) - 1;
        let mut in_data = take(&mut writable, in_len);
        let hdr_bufs = take(&mut readable, 16);
        let hdr: RequestHeader =
            read_obj(mem, &hdr_bufs).ok_or(refuse(RequestError::ShortHeader))?;
        let kind = RequestType::from(u32::from_le(hdr.type_));
        let sector = u64::from_le(hdr.sector);
        let out_data = readable;
        let transfer = |len: u64| {
            if len == 0 || !len.is_multiple_of(SECTOR) || len > MAX_TRANSFER {
                return Err(refuse(RequestError::BadLength(len)));
            }
            match sector.checked_mul(SECTOR) {
                Some(off) if in_bounds(off, len, limits.capacity) => Ok(off),
                _ => Err(refuse(RequestError::OutOfRange { sector, len })),
            }
        };
        let writes = matches!(
            kind,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && limits.read_only {
            return Err(refuse(RequestError::ReadOnly));
        }
        let (op, data) = match kind {
            RequestType::In => {
                let off = transfer(in_len)?;
                (Some((BlockOp::Read, off, in_len)), in_data.into_vec())
            }
            RequestType::Out => {
                let len = total(&out_data);
                let off = transfer(len)?;
                (Some((BlockOp::Write, off, len)), out_data.into_vec())
            }
            RequestType::Flush => (Some((BlockOp::Flush, 0, 0)), Vec::new()),
            RequestType::GetId => {
                let n = in_len.min(vb::VIRTIO_BLK_ID_BYTES as u64);
                (None, take(&mut in_data, n).into_vec())
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                // We advertise one range per request (max_discard_seg = 1).
                if total(&out_data) != 16 {
                    return Err(refuse(RequestError::BadRange));
                }
                let seg: DiscardSegment =
                    read_obj(mem, &out_data).ok_or(refuse(RequestError::BadRange))?;
                let (s, n) = (
                    u64::from_le(seg.sector),
                    u64::from(u32::from_le(seg.num_sectors)),
                );
                if n == 0 {
                    return Err(refuse(RequestError::BadRange));
                }
                let len = n * SECTOR;
                let off = s
                    .checked_mul(SECTOR)
                    .filter(|off| in_bounds(*off, len, limits.capacity))
                    .ok_or(refuse(RequestError::OutOfRange { sector: s, len }))?;
                let op = if kind == RequestType::Discard {
                    BlockOp::Discard
                } else {
                    BlockOp::WriteZeroes {
                        unmap: u32::from_le(seg.flags) & vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                            != 0,
                    }
                };
                (Some((op, off, len)), Vec::new())
            }
            RequestType::Unsupported(t) => return Err(refuse(RequestError::Unsupported(t))),
        };
        Ok(Request {
            kind,
            op,
            data,
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::test_memory;
    use crate::virtio::ring::DriverRing;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    const HDR: u64 = 0x20000;
    const DATA: u64 = 0x30000;
    const STATUS: u64 = 0x40000;
    const LIMITS: Limits = Limits {
        capacity: 64 * 512,
        read_only: false,
    };

    /// Parses one chain made of `bufs` with header `(type, sector)` at HDR.
    fn parse(
        mem: &GuestMemoryMmap,
        hdr: (u32, u64),
        bufs: &[(u64, u32, bool)],
        limits: Limits,
    ) -> Result<Request, Refused> {
        mem.write_obj(
            RequestHeader {
                type_: hdr.0,
                ioprio: 0,
                sector: hdr.1,
            },
            GuestAddress(HDR),
        )
        .unwrap();
        let mut ring = DriverRing::new(mem, 0x10000, 16);
        let mut q = Queue::new(16).unwrap();
        ring.configure(&mut q);
        ring.push_chain(0, bufs);
        let chain = q.iter(mem).unwrap().next().unwrap();
        Request::parse(&chain, mem, limits)
    }

    #[test]
    fn the_usual_layouts_parse_to_the_same_request() {
        let mem = test_memory(1);
        let linux = parse(
            &mem,
            (vb::VIRTIO_BLK_T_IN, 3),
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
            LIMITS,
        )
        .unwrap();
        assert_eq!(linux.kind, RequestType::In);
        assert_eq!(linux.op, Some((BlockOp::Read, 3 * 512, 1024)));
        assert_eq!(linux.data, vec![(GuestAddress(DATA), 1024)]);
        assert_eq!(linux.status, GuestAddress(STATUS));
        // Data and status in one writable buffer: the last byte is the status.
        let merged = parse(
            &mem,
            (vb::VIRTIO_BLK_T_IN, 3),
            &[(HDR, 16, false), (DATA, 1025, true)],
            LIMITS,
        )
        .unwrap();
        assert_eq!(merged.op, linux.op);
        assert_eq!(merged.status, GuestAddress(DATA + 1024));
        // A write whose header and data share a buffer, data split in two.
        mem.write_obj(0u64, GuestAddress(HDR + 16)).unwrap();
        let w = parse(
            &mem,
            (vb::VIRTIO_BLK_T_OUT, 1),
            &[
                (HDR, 16 + 512, false),
                (DATA, 512, false),
                (STATUS, 1, true),
            ],
            LIMITS,
        )
        .unwrap();
        assert_eq!(w.op, Some((BlockOp::Write, 512, 1024)));
        assert_eq!(
            w.data,
            vec![(GuestAddress(HDR + 16), 512), (GuestAddress(DATA), 512)]
        );
    }

    #[test]
    fn every_refusal_says_which_status_the_driver_gets() {
        let mem = test_memory(1);
        let io = |r: Result<Request, Refused>| {
            let e = r.unwrap_err();
            (e.error.status(), e.status)
        };
        let st = Some(GuestAddress(STATUS));
        let chain = [(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)];
        // Beyond the end, not whole sectors, too large, zero length.
        assert_eq!(
            io(parse(&mem, (0, 63), &chain, LIMITS)),
            (Status::IoErr, st)
        );
        let odd = [(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)];
        assert_eq!(io(parse(&mem, (0, 0), &odd, LIMITS)), (Status::IoErr, st));
        let huge = [
            (HDR, 16, false),
            (0, (MAX_TRANSFER + 512) as u32, true),
            (STATUS, 1, true),
        ];
        let big = test_memory(8);
        assert_eq!(
            io(parse(
                &big,
                (0, 0),
                &huge,
                Limits {
                    capacity: 1 << 30,
                    read_only: false
                }
            )),
            (Status::IoErr, st)
        );
        let none = [(HDR, 16, false), (STATUS, 1, true)];
        assert_eq!(io(parse(&mem, (0, 0), &none, LIMITS)), (Status::IoErr, st));
        // Unknown types are UNSUPP.
        assert_eq!(
            io(parse(&mem, (99, 0), &none, LIMITS)),
            (Status::Unsupported, st)
        );
        // Writes on a read-only disk.
        let ro = Limits {
            read_only: true,
            ..LIMITS
        };
        let w = [(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)];
        assert_eq!(io(parse(&mem, (1, 0), &w, ro)), (Status::IoErr, st));
        assert!(parse(&mem, (0, 0), &chain, ro).is_ok(), "reads are fine");
        // A header cut short, a buffer outside memory, readable after writable.
        let short = [(HDR, 8, false), (STATUS, 1, true)];
        assert_eq!(
            parse(&mem, (0, 0), &short, LIMITS).unwrap_err().error,
            RequestError::ShortHeader
        );
        let outside = [
            (HDR, 16, false),
            (0xffff_0000_0000, 512, true),
            (STATUS, 1, true),
        ];
        let e = parse(&mem, (0, 0), &outside, LIMITS).unwrap_err();
        assert!(matches!(e.error, RequestError::BadDescriptor(_)));
        assert_eq!(e.status, st, "the driver still hears about it");
        let order = [(HDR, 16, false), (STATUS, 1, true), (DATA, 512, false)];
        assert_eq!(
            parse(&mem, (1, 0), &order, LIMITS).unwrap_err().error,
            RequestError::Order
        );
        // No writable byte at all, or the status byte outside memory: nothing to tell.
        let mute = [(HDR, 16, false)];
        let e = parse(&mem, (4, 0), &mute, LIMITS).unwrap_err();
        assert_eq!((e.error, e.status), (RequestError::NoStatus, None));
        let lost = [(HDR, 16, false), (0xffff_0000_0000, 1, true)];
        assert_eq!(parse(&mem, (4, 0), &lost, LIMITS).unwrap_err().status, None);
    }

    #[test]
    fn discard_and_write_zeroes_take_exactly_one_range() {
        let mem = test_memory(1);
        let seg = |sector: u64, n: u32, flags: u32| {
            mem.write_obj(
                DiscardSegment {
                    sector,
                    num_sectors: n,
                    flags,
                },
                GuestAddress(DATA),
            )
            .unwrap();
        };
        let chain = [(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)];
        seg(8, 8, 0);
        let d = parse(&mem, (vb::VIRTIO_BLK_T_DISCARD, 0), &chain, LIMITS).unwrap();
        assert_eq!(d.op, Some((BlockOp::Discard, 4096, 4096)));
        seg(8, 8, vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let z = parse(&mem, (vb::VIRTIO_BLK_T_WRITE_ZEROES, 0), &chain, LIMITS).unwrap();
        assert_eq!(
            z.op,
            Some((BlockOp::WriteZeroes { unmap: true }, 4096, 4096))
        );
        seg(8, 0, 0);
        assert!(parse(&mem, (vb::VIRTIO_BLK_T_DISCARD, 0), &chain, LIMITS).is_err());
        seg(60, 8, 0);
        assert!(parse(&mem, (vb::VIRTIO_BLK_T_DISCARD, 0), &chain, LIMITS).is_err());
        let two = [(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)];
        assert_eq!(
            parse(&mem, (vb::VIRTIO_BLK_T_DISCARD, 0), &two, LIMITS)
                .unwrap_err()
                .error,
            RequestError::BadRange
        );
    }
}
