//! Polling virtio 1.x drivers over the virtio-mmio (version 2) transport with
//! split virtqueues, for ring-3 guests: MMIO register accesses exit to the
//! VMM directly, and completions are found by polling the used ring (the
//! drivers set `VIRTQ_AVAIL_F_NO_INTERRUPT`; a program that sleeps instead of
//! polling can ask for used-buffer interrupts, see
//! [`queue::VirtQueue::set_interrupts`] and [`crate::irq`]).
//!
//! Contract with the VMM: devices sit in slots at `0xd000_0000 + i * 0x1000`
//! (i = 0..31); a slot holds a device if MagicValue = "virt", Version = 2
//! and DeviceID != 0; the scan stops at the first empty slot. Rings and
//! buffers live in identity-mapped guest RAM ([`crate::dma`]).
//!
//! Modules: [`mmio`] the transport (probe/scan, reset, feature negotiation,
//! config space); [`queue`] a split virtqueue (descriptor chains,
//! avail/used rings, polling); [`blk`] virtio-blk (read, write, flush,
//! get-id, discard, write-zeroes); [`rng`] virtio-rng (entropy); [`net`]
//! virtio-net (raw Ethernet frames, no offloads); [`vsock`] virtio-vsock
//! (stream packets and credit accounting).
pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
pub mod vsock;

pub use mmio::Transport;
pub use queue::VirtQueue;

/// Device-independent feature bits (virtio 1.2 §6).
pub mod feature {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
    pub const RING_PACKED: u64 = 1 << 34;
    pub const IN_ORDER: u64 = 1 << 35;
    pub const ORDER_PLATFORM: u64 = 1 << 36;
    pub const SR_IOV: u64 = 1 << 37;
    pub const NOTIFICATION_DATA: u64 = 1 << 38;
    pub const RING_RESET: u64 = 1 << 40;
}

/// Device IDs (virtio 1.2 §5).
pub mod device_id {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const ENTROPY: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;

    /// Short name of a device type ("?" if unknown).
    pub fn name(id: u32) -> &'static str {
        match id {
            NET => "net",
            BLOCK => "block",
            CONSOLE => "console",
            ENTROPY => "entropy",
            BALLOON => "balloon",
            VSOCK => "vsock",
            _ => "?",
        }
    }
}

/// Driver errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// No device of the wanted kind in the scanned slots.
    NoDevice,
    /// The slot does not hold a virtio-mmio version-2 device.
    NotVirtio,
    /// Status did not read back 0 after the reset write.
    ResetTimeout,
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// FEATURES_OK did not stick: the device refused the feature set.
    FeaturesRejected,
    /// QueueNumMax is 0: the queue does not exist.
    QueueUnavailable,
    /// QueueReady already reads 1 before the setup.
    QueueInUse,
    /// QueueReady did not read back 1 after the setup.
    QueueNotReady,
    /// DRIVER_OK did not stick (or the device set FAILED / NEEDS_RESET at once).
    DriverOkRejected,
    /// The DMA pool is exhausted.
    NoMemory,
    /// Not enough free descriptors for the chain.
    QueueFull,
    /// A chain needs more segments than the device or the driver allows.
    TooManySegments,
    /// Bad argument (buffer length, alignment, range).
    BadArgument,
    /// No used-ring entry within the time limit.
    Timeout,
    /// The device set DEVICE_NEEDS_RESET in Status.
    NeedsReset,
    /// The used ring returned an id that is not the head of a chain in flight.
    BadUsedId(u32),
    /// The device reported more bytes written than the chain can hold.
    BadUsedLen(u32),
    /// The device's status byte for the request was not OK.
    Status(u8),
    /// The device did not write the status byte of a completed request.
    NoStatus,
    /// vsock: the data exceeds the peer's credit.
    NoCredit,
    /// vsock: a received packet is malformed (used length shorter than the
    /// header or than header + len, or len above the buffer); the value is the length.
    BadPacket(u32),
}

impl Error {
    pub fn as_str(&self) -> &'static str {
        match self {
            Error::NoDevice => "no such device",
            Error::NotVirtio => "not a virtio-mmio v2 device",
            Error::ResetTimeout => "reset did not complete",
            Error::NoVersion1 => "device does not offer VIRTIO_F_VERSION_1",
            Error::FeaturesRejected => "FEATURES_OK rejected",
            Error::QueueUnavailable => "queue not available (QueueNumMax 0)",
            Error::QueueInUse => "queue already ready",
            Error::QueueNotReady => "QueueReady did not stick",
            Error::DriverOkRejected => "DRIVER_OK rejected",
            Error::NoMemory => "out of DMA memory",
            Error::QueueFull => "queue full",
            Error::TooManySegments => "too many segments",
            Error::BadArgument => "bad argument",
            Error::Timeout => "timeout waiting for the used ring",
            Error::NeedsReset => "device needs reset",
            Error::BadUsedId(_) => "bad id in the used ring",
            Error::BadUsedLen(_) => "bad length in the used ring",
            Error::Status(1) => "status IOERR",
            Error::Status(2) => "status UNSUPP",
            Error::Status(_) => "bad status byte",
            Error::NoStatus => "status byte not written",
            Error::NoCredit => "no credit from the peer",
            Error::BadPacket(_) => "malformed packet",
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::BadUsedId(v) | Error::BadUsedLen(v) | Error::BadPacket(v) => write!(f, "{} ({v})", self.as_str()),
            Error::Status(s) => write!(f, "{} ({s})", self.as_str()),
            _ => f.write_str(self.as_str()),
        }
    }
}

pub type Result<T> = core::result::Result<T, Error>;

/// Default time limit for one request, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 2000;
