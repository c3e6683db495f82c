//! virtio-net on a TAP device: one rx and one tx queue, checksum and TSO offloads negotiated,
//! the virtio-net header passed through to the TAP unchanged. Back-pressure: while the guest
//! has no rx buffer, the device stops watching the TAP, so frames wait in the host kernel's
//! queue (nothing is dropped inside the VMM, nothing spins) until the guest refills the ring.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    serve_queue, ActivateError, Counters, DeviceBase, VirtioDevice, INT_USED_RING, TYPE_NET,
    VIRTIO_F_VERSION_1,
};
use crate::tap::{offload, Tap, VNET_HDR_LEN};

/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: a 64 KiB GSO frame plus headers.
const MAX_FRAME: usize = 65562;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_ECN: u64 = 1 << 9;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_ECN: u64 = 1 << 13;
const F_STATUS: u64 = 1 << 16;

const RX: usize = 0;
const TX: usize = 1;

/// How a NIC is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    /// TAP interface name.
    pub tap: String,
    /// MAC address.
    pub mac: [u8; 6],
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// A stable, locally administered unicast MAC derived from `seed` (FNV-1a).
pub fn derived_mac(seed: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

impl std::str::FromStr for NicConfig {
    type Err = String;
    /// Parses `tap=NAME[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_owned()),
                Some(("mac", v)) => {
                    mac = Some(parse_mac(v).ok_or_else(|| {
                        format!("invalid mac {v:?}: expected a unicast aa:bb:cc:dd:ee:ff")
                    })?)
                }
                _ => {
                    return Err(format!(
                        "unknown NIC option {opt:?}: expected tap=NAME[,mac=MAC]"
                    ))
                }
            }
        }
        let tap = tap.ok_or("a NIC needs tap=NAME")?;
        Ok(NicConfig {
            mac: mac.unwrap_or_else(|| derived_mac(&tap)),
            tap,
        })
    }
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
}

/// A virtio-net device.
pub struct Net {
    tap: Tap,
    config: Vec<u8>,
    base: DeviceBase,
    active: Option<Active>,
    frame: Vec<u8>,
    /// Whether the TAP is in the event loop's interest set (kept across resets).
    tap_watched: bool,
}

impl Net {
    /// Opens the TAP and builds the device around `irqfd`.
    pub fn new(cfg: &NicConfig, irqfd: EventFd) -> Result<Self, crate::tap::TapError> {
        let tap = Tap::open(&cfg.tap)?;
        let mut config = vec![0u8; 10];
        config[..6].copy_from_slice(&cfg.mac);
        config[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        Ok(Self {
            tap,
            config,
            base: DeviceBase::new(2, irqfd).map_err(|err| crate::tap::TapError::Open {
                name: cfg.tap.clone(),
                what: "eventfd",
                err,
            })?,
            active: None,
            frame: vec![0u8; MAX_FRAME],
            tap_watched: false,
        })
    }

    /// Moves frames from the TAP into rx buffers while both exist. Returns whether the TAP
    /// should stay watched (false: the guest has no buffers; wait for an rx notification).
    fn process_rx(&mut self) -> bool {
        if self.base.interrupt.needs_reset() {
            return false;
        }
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let mem = a.mem.clone();
        let mut delivered = false;
        let keep_watching = loop {
            let chain = match a.queues[RX].iter(&mem) {
                Ok(mut it) => it.next(),
                Err(_) => {
                    Counters::inc(&self.base.counters.needs_reset);
                    self.base.interrupt.set_needs_reset();
                    break false;
                }
            };
            let Some(chain) = chain else {
                break false; // no buffer: leave frames in the TAP queue
            };
            let mut tap = self.tap.file();
            let n = match tap.read(&mut self.frame) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    a.queues[RX].go_to_previous_position();
                    break true;
                }
                Err(e) => {
                    // A TAP that fails persistently (detached) must not spin the loop.
                    a.queues[RX].go_to_previous_position();
                    Counters::inc(&self.base.counters.io_errors);
                    tracing::debug!("virtio-net: TAP read failed: {e}");
                    break false;
                }
            };
            let head = chain.head_index();
            let written = match chain.writer(&mem) {
                Ok(mut w) if w.available_bytes() >= n && n >= VNET_HDR_LEN => {
                    // num_buffers = 1: the TAP leaves that header field untouched.
                    self.frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                    match w.write_all(&self.frame[..n]) {
                        Ok(()) => {
                            Counters::inc(&self.base.counters.requests);
                            self.base
                                .counters
                                .read_bytes
                                .fetch_add(n as u64, Ordering::Relaxed);
                            n as u32
                        }
                        Err(_) => {
                            Counters::inc(&self.base.counters.refused);
                            0
                        }
                    }
                }
                _ => {
                    // A buffer too small for the frame (or outside memory): the frame is lost.
                    Counters::inc(&self.base.counters.refused);
                    0
                }
            };
            if a.queues[RX].add_used(&mem, head, written).is_err() {
                Counters::inc(&self.base.counters.needs_reset);
                self.base.interrupt.set_needs_reset();
                break false;
            }
            delivered = true;
        };
        if delivered && !matches!(a.queues[RX].needs_notification(&mem), Ok(false)) {
            self.base.interrupt.trigger(INT_USED_RING);
        }
        keep_watching
    }

    fn process_tx(&mut self) {
        if self.base.interrupt.needs_reset() {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            Counters::inc(&self.base.counters.spurious_notifies);
            return;
        };
        let mem = a.mem.clone();
        let (tap, frame, counters) = (&self.tap, &mut self.frame, &self.base.counters);
        serve_queue(
            "virtio-net tx",
            &mut a.queues[TX],
            &mem,
            &self.base.interrupt,
            counters,
            |chain| {
                transmit(chain, &mem, tap, frame, counters);
                0
            },
        );
    }

    fn watch_tap(&mut self, ops: &mut EventOps, on: bool) {
        let on = on && self.active.is_some() && !self.base.interrupt.needs_reset();
        if self.tap_watched == on {
            return;
        }
        let ev = Events::new(self.tap.file(), EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        if r.is_ok() {
            self.tap_watched = on;
        }
    }
}

/// Sends one tx chain (virtio-net header + frame) to the TAP.
fn transmit(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    tap: &Tap,
    frame: &mut [u8],
    counters: &Counters,
) {
    let mut r = match chain.reader(mem) {
        Ok(r) if r.available_bytes() <= MAX_FRAME && r.available_bytes() > VNET_HDR_LEN => r,
        _ => return Counters::inc(&counters.refused),
    };
    let n = r.available_bytes();
    if r.read_exact(&mut frame[..n]).is_err() {
        return Counters::inc(&counters.refused);
    }
    // SAFETY: write(2) of our own initialised buffer to the TAP descriptor.
    let w = unsafe { libc::write(tap.file().as_raw_fd(), frame.as_ptr().cast(), n) };
    if w == n as isize {
        Counters::inc(&counters.requests);
        counters
            .written_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    } else {
        Counters::inc(&counters.io_errors);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn kind(&self) -> &'static str {
        "net"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | F_CSUM
            | F_GUEST_CSUM
            | F_MAC
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_STATUS
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        let mut flags = 0;
        if acked & F_GUEST_CSUM != 0 {
            flags |= offload::CSUM;
            if acked & F_GUEST_TSO4 != 0 {
                flags |= offload::TSO4;
            }
            if acked & F_GUEST_TSO6 != 0 {
                flags |= offload::TSO6;
            }
            if acked & F_GUEST_ECN != 0 {
                flags |= offload::TSO_ECN;
            }
        }
        if let Err(e) = self.tap.set_offload(flags) {
            tracing::warn!(
                "virtio-net: TUNSETOFFLOAD {flags:#x} on {}: {e}",
                self.tap.name()
            );
        }
        if queues.iter().any(|q| !q.ready()) {
            return Err(ActivateError::BadQueue(
                queues.iter().position(|q| !q.ready()).unwrap_or(0),
            ));
        }
        self.active = Some(Active { mem, queues });
        // The event loop starts watching the TAP at the next rx notification, which Linux
        // sends as soon as it has filled the rx ring.
        let _ = self.base.queue_evts[RX].write(1);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn base(&self) -> &DeviceBase {
        &self.base
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.base.queue_evts[RX].as_raw_fd() {
            let _ = self.base.queue_evts[RX].read();
            if self.active.is_none() {
                Counters::inc(&self.base.counters.spurious_notifies);
                return;
            }
            let watch = self.process_rx();
            self.watch_tap(ops, watch);
        } else if fd == self.base.queue_evts[TX].as_raw_fd() {
            let _ = self.base.queue_evts[TX].read();
            self.process_tx();
        } else if fd == self.tap.file().as_raw_fd() {
            // Also the way a TAP still watched after a driver reset gets unwatched.
            let watch = self.process_rx();
            self.watch_tap(ops, watch);
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.base.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("virtio-net: cannot watch a queue eventfd: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_specs_parse() {
        let n: NicConfig = "tap=tap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 1]);
        let d: NicConfig = "tap=tap1".parse().unwrap();
        assert_eq!(d.mac, derived_mac("tap1"));
        assert_eq!(d.mac[0], 0x02);
        assert!("mac=02:00:00:00:00:01".parse::<NicConfig>().is_err());
        assert!(
            "tap=t,mac=01:00:00:00:00:01".parse::<NicConfig>().is_err(),
            "multicast"
        );
        assert!("tap=t,mac=zz".parse::<NicConfig>().is_err());
    }
}
