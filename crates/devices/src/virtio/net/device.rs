//! The virtio-net device: one rx and one tx queue on a TAP, checksum and TSO offloads
//! negotiated, the virtio-net header passed through to the TAP unchanged. Back-pressure: while
//! the guest has no rx buffer, the device stops watching the TAP, so frames wait in the host
//! kernel's queue (nothing is dropped inside the VMM, nothing spins) until the guest refills
//! the ring.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net as vn;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::ByteValued;

use super::NicConfig;
use crate::memory::GuestMemoryMmap;
use crate::tap::{offload, Tap, TapError, VNET_HDR_LEN};
use crate::virtio::transport::VirtioInterruptType;
use crate::virtio::{
    read_config_bytes, ActivateError, ActivationContext, Counters, PersistError, VirtioCommon,
    VirtioDevice, VirtioState,
};

/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: a 64 KiB GSO frame plus headers.
const MAX_FRAME: usize = 65562;

pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The features we offer: checksum and TSO offloads both ways, our MAC, link status.
const FEATURES: u64 = bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_MAC)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_ECN)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_ECN)
    | bit(vn::VIRTIO_NET_F_STATUS);

/// The start of `struct virtio_net_config`: MAC, status, max_virtqueue_pairs.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct ConfigSpace {
    mac: [u8; 6],
    status: u16,
    max_virtqueue_pairs: u16,
}

// SAFETY: a packed struct of bytes and integers: no padding, every byte pattern is valid.
unsafe impl ByteValued for ConfigSpace {}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP cannot be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The queue eventfds cannot be created.
    #[error("cannot create the virtio-net eventfds: {0}")]
    EventFd(std::io::Error),
}

/// What a virtio-net saves: its queues and its identity on the wire. Frames in flight are
/// not saved: a frame is in the device only within one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The virtio part.
    pub virtio: VirtioState,
    /// The NIC as attached (TAP name and MAC).
    pub nic: NicConfig,
}

/// A virtio-net device.
pub struct Net {
    pub(super) common: VirtioCommon,
    nic: NicConfig,
    pub(super) tap: Tap,
    config: ConfigSpace,
    frame: Vec<u8>,
    /// Whether the TAP is in the event loop's interest set (kept across resets).
    pub(super) tap_watched: bool,
}

impl Net {
    /// Opens the TAP and builds the device.
    pub fn new(cfg: &NicConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&cfg.tap)?;
        Ok(Self {
            common: VirtioCommon::new(VIRTIO_ID_NET, "net", FEATURES, &[QUEUE_SIZE, QUEUE_SIZE])
                .map_err(NetError::EventFd)?,
            nic: cfg.clone(),
            tap,
            config: ConfigSpace {
                mac: cfg.mac,
                status: (vn::VIRTIO_NET_S_LINK_UP as u16).to_le(),
                max_virtqueue_pairs: 1u16.to_le(),
            },
            frame: vec![0u8; MAX_FRAME],
            tap_watched: false,
        })
    }

    /// The device's state.
    pub fn save(&self) -> NetState {
        NetState {
            virtio: self.common.save(),
            nic: self.nic.clone(),
        }
    }

    /// A device in `state` on its TAP, opened again (activated by its transport's restore).
    pub fn restore(state: &NetState) -> Result<Self, PersistError> {
        let mut d = Self::new(&state.nic).map_err(|e| PersistError::Backend(e.to_string()))?;
        d.common.restore(&state.virtio)?;
        Ok(d)
    }

    /// Moves frames from the TAP into rx buffers while both exist. Returns whether the TAP
    /// should stay watched (false: the guest has no buffers; wait for an rx notification).
    pub(super) fn process_rx(&mut self) -> bool {
        let Self {
            common, tap, frame, ..
        } = self;
        let Some(mut s) = common.serving_quiet() else {
            return false;
        };
        let mem: &GuestMemoryMmap = s.mem;
        let mut delivered = false;
        let keep_watching = loop {
            let chain = match s.queues[RX].iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    s.fail(&format!("corrupt rx ring ({e})"));
                    break false;
                }
            };
            let Some(chain) = chain else {
                break false; // no buffer: leave frames in the TAP queue
            };
            let n = match tap.file().read(frame) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    s.queues[RX].go_to_previous_position();
                    break true;
                }
                Err(e) => {
                    // A TAP that fails persistently (detached) must not spin the loop.
                    s.queues[RX].go_to_previous_position();
                    Counters::inc(&s.counters.io_errors);
                    tracing::debug!("virtio-net: TAP read failed: {e}");
                    break false;
                }
            };
            let head = chain.head_index();
            let written = receive(chain, mem, &mut frame[..n], s.counters);
            if !s.add_used(RX, head, written) {
                break false;
            }
            delivered = true;
        };
        if delivered && !matches!(s.queues[RX].needs_notification(mem), Ok(false)) {
            s.signal(VirtioInterruptType::Queue(RX as u16));
        }
        keep_watching
    }

    /// Sends every frame the guest queued for transmission.
    pub(super) fn process_tx(&mut self) {
        let Self {
            common, tap, frame, ..
        } = self;
        let Some(mut s) = common.serving() else {
            return;
        };
        s.serve(TX, |chain, counters| {
            transmit(chain, tap, frame, counters);
            0
        });
    }
}

/// Copies one frame (with its virtio-net header) into an rx chain; returns the bytes written.
fn receive(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    counters: &Counters,
) -> u32 {
    let n = frame.len();
    match chain.writer(mem) {
        Ok(mut w) if w.available_bytes() >= n && n >= VNET_HDR_LEN => {
            // num_buffers = 1: the TAP leaves that header field untouched.
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            match w.write_all(frame) {
                Ok(()) => {
                    Counters::inc(&counters.requests);
                    Counters::add(&counters.read_bytes, n as u64);
                    n as u32
                }
                Err(_) => {
                    Counters::inc(&counters.refused);
                    0
                }
            }
        }
        _ => {
            // A buffer too small for the frame (or outside memory): the frame is lost.
            Counters::inc(&counters.refused);
            0
        }
    }
}

/// Sends one tx chain (virtio-net header + frame) to the TAP.
fn transmit(
    chain: DescriptorChain<&GuestMemoryMmap>,
    tap: &Tap,
    frame: &mut [u8],
    counters: &Counters,
) {
    let mem = chain.memory();
    let mut r = match chain.clone().reader(mem) {
        Ok(r) if r.available_bytes() <= MAX_FRAME && r.available_bytes() > VNET_HDR_LEN => r,
        _ => return Counters::inc(&counters.refused),
    };
    let n = r.available_bytes();
    if r.read_exact(&mut frame[..n]).is_err() {
        return Counters::inc(&counters.refused);
    }
    // One frame per write(2) on a TAP.
    match tap.file().write(&frame[..n]) {
        Ok(w) if w == n => {
            Counters::inc(&counters.requests);
            Counters::add(&counters.written_bytes, n as u64);
        }
        _ => Counters::inc(&counters.io_errors),
    }
}

impl VirtioDevice for Net {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config.as_slice(), offset, data);
    }
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        let acked = ctx.acked_features;
        let mut flags = 0;
        if acked & bit(vn::VIRTIO_NET_F_GUEST_CSUM) != 0 {
            flags |= offload::CSUM;
            if acked & bit(vn::VIRTIO_NET_F_GUEST_TSO4) != 0 {
                flags |= offload::TSO4;
            }
            if acked & bit(vn::VIRTIO_NET_F_GUEST_TSO6) != 0 {
                flags |= offload::TSO6;
            }
            if acked & bit(vn::VIRTIO_NET_F_GUEST_ECN) != 0 {
                flags |= offload::TSO_ECN;
            }
        }
        if let Err(e) = self.tap.set_offload(flags) {
            tracing::warn!(
                "virtio-net: TUNSETOFFLOAD {flags:#x} on {}: {e}",
                self.tap.name()
            );
        }
        self.common.activate(ctx)?;
        // The event loop starts watching the TAP at the next rx notification, which Linux
        // sends as soon as it has filled the rx ring.
        let _ = self.common.queue_evts[RX].write(1);
        Ok(())
    }
}
