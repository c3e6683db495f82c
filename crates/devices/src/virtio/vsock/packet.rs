//! The vsock packet header (virtio 1.2 §5.10.6) and its operations.

use vm_memory::ByteValued;

/// Bytes of a header on the wire.
pub const HDR_LEN: usize = 44;
/// The only socket type we carry.
pub const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will receive nothing more.
pub const SHUT_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send nothing more.
pub const SHUT_SEND: u32 = 2;

/// The header as it lies in guest memory (`struct virtio_vsock_hdr`, little-endian, packed).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VsockHeader {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

// SAFETY: a packed struct of plain integers: no padding, every byte pattern is a valid value.
unsafe impl ByteValued for VsockHeader {}

/// What a packet does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Open a connection.
    Request,
    /// Accept one.
    Response,
    /// Reset (refuse or abort) one.
    Rst,
    /// Shut a direction down (see the flags).
    Shutdown,
    /// Data.
    Rw,
    /// "Here is my credit."
    CreditUpdate,
    /// "What is your credit?"
    CreditRequest,
    /// Anything else.
    Unknown(u16),
}

impl From<u16> for Op {
    fn from(v: u16) -> Self {
        match v {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            other => Self::Unknown(other),
        }
    }
}

impl From<Op> for u16 {
    fn from(op: Op) -> u16 {
        match op {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
            Op::Unknown(v) => v,
        }
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hdr {
    /// Sender's context id.
    pub src_cid: u64,
    /// Receiver's context id.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload bytes.
    pub len: u32,
    /// Socket type.
    pub kind: u16,
    /// Operation.
    pub op: Op,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// The sender's receive buffer.
    pub buf_alloc: u32,
    /// Bytes the sender has taken from it.
    pub fwd_cnt: u32,
}

impl Default for Hdr {
    fn default() -> Self {
        Self::from(VsockHeader::default())
    }
}

impl From<VsockHeader> for Hdr {
    fn from(h: VsockHeader) -> Self {
        Self {
            src_cid: u64::from_le(h.src_cid),
            dst_cid: u64::from_le(h.dst_cid),
            src_port: u32::from_le(h.src_port),
            dst_port: u32::from_le(h.dst_port),
            len: u32::from_le(h.len),
            kind: u16::from_le(h.type_),
            op: Op::from(u16::from_le(h.op)),
            flags: u32::from_le(h.flags),
            buf_alloc: u32::from_le(h.buf_alloc),
            fwd_cnt: u32::from_le(h.fwd_cnt),
        }
    }
}

impl From<&Hdr> for VsockHeader {
    fn from(h: &Hdr) -> Self {
        Self {
            src_cid: h.src_cid.to_le(),
            dst_cid: h.dst_cid.to_le(),
            src_port: h.src_port.to_le(),
            dst_port: h.dst_port.to_le(),
            len: h.len.to_le(),
            type_: h.kind.to_le(),
            op: u16::from(h.op).to_le(),
            flags: h.flags.to_le(),
            buf_alloc: h.buf_alloc.to_le(),
            fwd_cnt: h.fwd_cnt.to_le(),
        }
    }
}

impl Hdr {
    /// Decodes the 44 header bytes.
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let mut raw = VsockHeader::default();
        raw.as_mut_slice().copy_from_slice(b);
        raw.into()
    }

    /// Encodes the header.
    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b.copy_from_slice(VsockHeader::from(self).as_slice());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        assert_eq!(std::mem::size_of::<VsockHeader>(), HDR_LEN);
        let h = Hdr {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5000,
            len: 17,
            kind: TYPE_STREAM,
            op: Op::Rw,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 99,
        };
        let b = h.bytes();
        assert_eq!(Hdr::parse(&b), h);
        // Field offsets as the spec lays them out.
        assert_eq!(&b[16..20], &1234u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &99u32.to_le_bytes());
        for v in 0..10u16 {
            assert_eq!(u16::from(Op::from(v)), v);
        }
    }
}
