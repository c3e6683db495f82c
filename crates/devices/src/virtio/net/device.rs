//! The virtio-net device: one rx and one tx queue on a TAP, checksum and TSO offloads
//! negotiated, the virtio-net header passed through to the TAP unchanged. Back-pressure: while
//! the guest has no rx buffer, the device stops watching the TAP, so frames wait in the host
//! kernel's queue (nothing is dropped inside the VMM, nothing spins) until the guest refills
//! the ring.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net as vn;
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::ByteValued;

use super::NicConfig;
use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::{LimitedPath, RateLimitConfig, RateLimiter};
use crate::tap::{offload, Tap, TapError, VNET_HDR_LEN};
use crate::virtio::{
    read_config_bytes, ActivateError, ActivationContext, Counters, PersistError, Round,
    VirtioCommon, VirtioDevice, VirtioState, POLL,
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
    /// Limits on frames to the guest.
    pub(super) rx_limiter: RateLimiter,
    /// Limits on frames from the guest.
    pub(super) tx_limiter: RateLimiter,
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
            rx_limiter: RateLimiter::new(cfg.rx_rate_limit.unwrap_or_default())
                .map_err(NetError::EventFd)?,
            tx_limiter: RateLimiter::new(cfg.tx_rate_limit.unwrap_or_default())
                .map_err(NetError::EventFd)?,
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
        d.restore_state(state)?;
        Ok(d)
    }

    /// Puts `state` on this device, made afresh on the TAP the state names.
    pub fn restore_state(&mut self, state: &NetState) -> Result<(), PersistError> {
        self.common.restore(&state.virtio)
    }

    /// Moves frames from the TAP into rx buffers while both exist (`notified`: because the
    /// guest gave buffers). Returns whether the TAP should stay watched (false: the guest has
    /// no buffers; wait for an rx notification).
    pub(super) fn process_rx(&mut self, notified: bool) -> bool {
        let Self {
            common,
            tap,
            frame,
            rx_limiter,
            ..
        } = self;
        let Some(mut s) = common.serving_for(notified) else {
            return false;
        };
        let mem: &GuestMemoryMmap = s.mem;
        let mut delivered = false;
        let keep_watching = loop {
            // Held back: frames wait in the TAP's queue (unwatched) until the timer fires.
            if rx_limiter.blocked_counting(&s.counters.throttled) {
                break false;
            }
            let Ok(chain) = s.next_chain(RX) else {
                break false;
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
            rx_limiter.consume(n.saturating_sub(VNET_HDR_LEN) as u64);
            let written = receive(chain, mem, &mut frame[..n], s.counters);
            if !s.add_used(RX, head, written) {
                break false;
            }
            delivered = true;
        };
        if delivered {
            s.notify(RX);
        }
        keep_watching
    }

    /// Sends every frame the guest queued for transmission (as far as the limiter allows;
    /// the rest wait in the ring for its timer).
    pub(super) fn process_tx(&mut self) {
        let Self {
            common,
            tap,
            frame,
            tx_limiter,
            ..
        } = self;
        let Some(mut s) = common.serving() else {
            return;
        };
        let turn = std::time::Instant::now();
        let again = loop {
            s.quiet(TX);
            s.serve_limited(TX, tx_limiter, |chain, counters| {
                (0, transmit(chain, tap, frame, counters))
            });
            // A throttled queue waits for its timer, not for the driver.
            if tx_limiter.waiting() {
                break false;
            }
            // A guest that never stops sending gets the thread for a turn; its frames then
            // wait for the next.
            match s.next_round(TX, turn, POLL) {
                Round::Now => {}
                Round::Later => break true,
                Round::Done => break false,
            }
        };
        if again {
            // Back here once the event loop has gone round (its notifications stay off).
            let _ = common.queue_evts[TX].write(1);
        }
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

/// The most buffers of a tx chain sent straight from guest memory ([`transmit`]); a longer
/// chain is copied first. A Linux driver uses one or two (header, frame) and up to 19 for a
/// scattered GSO frame.
const TX_IOVECS: usize = 20;

/// Sends one tx chain (virtio-net header + frame) to the TAP; returns the frame's bytes
/// (without the header) for the rate limiter.
///
/// The chain's buffers go to the TAP in one `writev` straight from guest memory: no copy and
/// no allocation per frame (the chain reader allocated its list of buffers and the frame was
/// copied out: 1,200-1,260 ns per frame against 1,030 ns this way, 4 runs each of the test
/// guest's `net-blast` here, 64 and 1514-byte frames). A guest that rewrites a buffer
/// meanwhile changes only its own frame.
fn transmit(
    chain: DescriptorChain<&GuestMemoryMmap>,
    tap: &Tap,
    frame: &mut [u8],
    counters: &Counters,
) -> u64 {
    use std::os::fd::AsRawFd;
    use vm_memory::GuestMemoryBackend;
    let mem = chain.memory();
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; TX_IOVECS];
    let (mut used, mut total, mut copy) = (0usize, 0usize, false);
    // Every buffer is checked, whichever way the frame then goes: a chain with a buffer for
    // the device to write, or longer than a frame, is refused.
    for desc in chain.clone() {
        let len = desc.len() as usize;
        total += len;
        if desc.is_write_only() || total > MAX_FRAME {
            Counters::inc(&counters.refused);
            return 0;
        }
        if len == 0 || copy {
            continue;
        }
        // A buffer across two memory regions, or a chain of many: copied, below.
        match (iov.get_mut(used), mem.get_slice(desc.addr(), len)) {
            (Some(slot), Ok(slice)) => {
                *slot = libc::iovec {
                    iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                    iov_len: len,
                };
                used += 1;
            }
            _ => copy = true,
        }
    }
    if total <= VNET_HDR_LEN {
        Counters::inc(&counters.refused);
        return 0;
    }
    if copy {
        return transmit_copied(chain, tap, frame, counters);
    }
    // SAFETY: the first `used` iovecs point into guest memory at ranges `get_slice` checked,
    // which stays mapped while `mem` is borrowed (vm-memory without its `xen` feature, which
    // this workspace does not enable: there a guard's drop would unmap it); the kernel only
    // reads them. One frame per write on a TAP.
    let w = unsafe { libc::writev(tap.file().as_raw_fd(), iov.as_ptr(), used as libc::c_int) };
    if usize::try_from(w) == Ok(total) {
        Counters::inc(&counters.requests);
        Counters::add(&counters.written_bytes, total as u64);
    } else {
        Counters::inc(&counters.io_errors);
    }
    (total - VNET_HDR_LEN) as u64
}

/// [`transmit`] by a copy of the frame, for a chain whose buffers cannot go to `writev` as
/// they are.
fn transmit_copied(
    chain: DescriptorChain<&GuestMemoryMmap>,
    tap: &Tap,
    frame: &mut [u8],
    counters: &Counters,
) -> u64 {
    let mem = chain.memory();
    let mut r = match chain.clone().reader(mem) {
        Ok(r) if r.available_bytes() <= MAX_FRAME && r.available_bytes() > VNET_HDR_LEN => r,
        _ => {
            Counters::inc(&counters.refused);
            return 0;
        }
    };
    let n = r.available_bytes();
    if r.read_exact(&mut frame[..n]).is_err() {
        Counters::inc(&counters.refused);
        return 0;
    }
    // One frame per write(2) on a TAP.
    match tap.file().write(&frame[..n]) {
        Ok(w) if w == n => {
            Counters::inc(&counters.requests);
            Counters::add(&counters.written_bytes, n as u64);
        }
        _ => Counters::inc(&counters.io_errors),
    }
    (n - VNET_HDR_LEN) as u64
}

/// The frame a NIC announces itself with after it moved (the RARP request QEMU and switches
/// use for it): from the NIC's MAC to everyone, so every bridge on the way learns the port the
/// MAC is behind now. No IP address is needed (the MAC, and so every neighbour cache, is
/// unchanged). 60 bytes, the shortest Ethernet frame, after the virtio-net header.
pub fn announcement(mac: [u8; 6]) -> [u8; VNET_HDR_LEN + 60] {
    let mut f = [0u8; VNET_HDR_LEN + 60];
    let e = &mut f[VNET_HDR_LEN..];
    e[..6].copy_from_slice(&[0xff; 6]);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    e[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    e[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    e[18] = 6;
    e[19] = 4;
    e[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    e[22..28].copy_from_slice(&mac);
    e[32..38].copy_from_slice(&mac);
    f
}

/// The frames that announce a guest's addresses after it moved, each after a virtio-net
/// header: a gratuitous ARP (a broadcast request for its own IPv4 address, as Linux sends one)
/// for each IPv4 address, and an unsolicited neighbour advertisement to all nodes (override
/// set, with its MAC as the target link-layer address, RFC 4861 7.2.6) for each IPv6 one.
/// Every frame is padded to Ethernet's 60 bytes.
pub fn address_announcements(mac: [u8; 6], addresses: &[std::net::IpAddr]) -> Vec<Vec<u8>> {
    use etherparse::{
        icmpv6::NeighborAdvertisementHeader, ArpEthIpv4Packet, ArpOperation, Icmpv6Type,
        PacketBuilder,
    };
    let mut frames = Vec::new();
    for a in addresses {
        let mut f = vec![0u8; VNET_HDR_LEN];
        let written = match a {
            std::net::IpAddr::V4(ip) => {
                let arp = ArpEthIpv4Packet {
                    operation: ArpOperation::REQUEST,
                    sender_mac: mac,
                    sender_ipv4: ip.octets(),
                    target_mac: [0; 6],
                    target_ipv4: ip.octets(),
                };
                PacketBuilder::ethernet2(mac, [0xff; 6])
                    .arp(arp.into())
                    .write(&mut f)
            }
            std::net::IpAddr::V6(ip) => {
                // Target address, then the target link-layer address option (type 2, 8 bytes).
                let mut body = ip.octets().to_vec();
                body.extend_from_slice(&[2, 1]);
                body.extend_from_slice(&mac);
                let na = NeighborAdvertisementHeader {
                    router: false,
                    solicited: false,
                    r#override: true,
                };
                let all_nodes = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
                PacketBuilder::ethernet2(mac, [0x33, 0x33, 0, 0, 0, 1])
                    .ipv6(ip.octets(), all_nodes.octets(), 255)
                    .icmpv6(Icmpv6Type::NeighborAdvertisement(na))
                    .write(&mut f, &body)
            }
        };
        match written {
            Ok(()) => {
                f.resize(f.len().max(VNET_HDR_LEN + 60), 0);
                frames.push(f);
            }
            Err(e) => tracing::warn!("cannot build the announcement of {a}: {e}"),
        }
    }
    frames
}

impl VirtioDevice for Net {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn host_descriptors(&self) -> Vec<(bexar_util::handed::What, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        vec![(
            bexar_util::handed::What::Tap {
                name: self.tap.name().to_owned(),
            },
            self.tap.file().as_raw_fd(),
        )]
    }
    fn announce(&mut self) -> bool {
        use std::io::Write;
        let mut frames = vec![announcement(self.nic.mac).to_vec()];
        frames.extend(address_announcements(self.nic.mac, &self.nic.addresses));
        let mut all = true;
        for frame in &frames {
            // A TAP takes a frame in one write, whole or not at all.
            match self.tap.file().write(frame) {
                Ok(n) if n == frame.len() => {}
                Ok(n) => {
                    tracing::debug!(
                        "{}: an announcement went short ({n} bytes)",
                        self.tap.name()
                    );
                    all = false;
                }
                Err(e) => {
                    tracing::debug!("{}: cannot announce the NIC: {e}", self.tap.name());
                    all = false;
                }
            }
        }
        all
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn set_rate_limit(&mut self, path: LimitedPath, limit: RateLimitConfig) -> Result<(), String> {
        limit.check().map_err(|(f, m)| format!("{f}: {m}"))?;
        let set = (!limit.is_empty()).then_some(limit);
        match path {
            LimitedPath::Rx => {
                self.rx_limiter.update(limit);
                self.nic.rx_rate_limit = set;
            }
            LimitedPath::Tx => {
                self.tx_limiter.update(limit);
                self.nic.tx_rate_limit = set;
            }
            LimitedPath::Disk => return Err("a NIC's limits are rx and tx".into()),
        }
        Ok(())
    }
    fn save_state(&self) -> Option<crate::virtio::DeviceSnapshot> {
        Some(crate::virtio::DeviceSnapshot::Net(self.save()))
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
        let restored = ctx.restored;
        self.common.activate(ctx)?;
        // The event loop starts watching the TAP at the next rx notification, which Linux
        // sends as soon as it has filled the rx ring. A restored device waits for the VMM's
        // notification of every queue (`ActivationContext::restored`).
        if !restored {
            let _ = self.common.queue_evts[RX].write(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::memory::test_memory;
    use crate::virtio::ring::DriverRing;

    #[test]
    fn addresses_are_announced_by_gratuitous_arp_and_unsolicited_advertisement() {
        use etherparse::{ArpOperation, Icmpv6Type, NetSlice, SlicedPacket, TransportSlice};
        let mac = [2, 0xaa, 0, 0, 0, 7];
        let v4: std::net::IpAddr = "10.40.0.10".parse().unwrap();
        let v6: std::net::IpAddr = "2001:db8:40::10".parse().unwrap();
        let frames = address_announcements(mac, &[v4, v6]);
        assert_eq!(frames.len(), 2);
        for f in &frames {
            assert!(f[..VNET_HDR_LEN].iter().all(|b| *b == 0));
            assert!(f.len() >= VNET_HDR_LEN + 60);
        }
        // The ARP: a broadcast request from the MAC for its own address.
        let p = SlicedPacket::from_ethernet(&frames[0][VNET_HDR_LEN..]).unwrap();
        let eth = p.link.as_ref().unwrap().to_header().unwrap();
        assert_eq!(eth.ethernet2().unwrap().destination, [0xff; 6]);
        let Some(NetSlice::Arp(arp)) = &p.net else {
            panic!("not ARP: {:?}", p.net)
        };
        assert_eq!(arp.operation(), ArpOperation::REQUEST);
        assert_eq!(arp.sender_hw_addr(), &mac);
        assert_eq!(arp.sender_protocol_addr(), &[10, 40, 0, 10]);
        assert_eq!(arp.target_protocol_addr(), &[10, 40, 0, 10]);
        // The advertisement: to all nodes, override set, the MAC as the link-layer address,
        // a checksum that holds.
        let p = SlicedPacket::from_ethernet(&frames[1][VNET_HDR_LEN..]).unwrap();
        let Some(NetSlice::Ipv6(ip)) = &p.net else {
            panic!("not IPv6: {:?}", p.net)
        };
        assert_eq!(ip.header().hop_limit(), 255);
        assert_eq!(ip.header().destination()[..2], [0xff, 0x02]);
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("not ICMPv6: {:?}", p.transport)
        };
        let Icmpv6Type::NeighborAdvertisement(na) = icmp.icmp_type() else {
            panic!("not an NA: {:?}", icmp.icmp_type())
        };
        assert!(na.r#override && !na.solicited && !na.router);
        let body = icmp.payload();
        assert_eq!(
            &body[..16],
            &"2001:db8:40::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&body[16..24], &[2, 1, 2, 0xaa, 0, 0, 0, 7]);
        let (src, dst) = (ip.header().source(), ip.header().destination());
        assert_eq!(
            icmp.header()
                .icmp_type
                .calc_checksum(src, dst, body)
                .unwrap(),
            icmp.checksum()
        );
    }

    #[test]
    fn the_announcement_is_a_broadcast_rarp_request_from_the_nic() {
        let mac = [2, 0xaa, 0, 0, 0, 7];
        let f = announcement(mac);
        assert!(
            f[..VNET_HDR_LEN].iter().all(|b| *b == 0),
            "no offloads asked"
        );
        let e = &f[VNET_HDR_LEN..];
        assert_eq!(e.len(), 60);
        assert_eq!(&e[..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &mac);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[20..22], &[0, 3], "reverse request");
        assert_eq!((&e[22..28], &e[32..38]), (&mac[..], &mac[..]));
    }
    use crate::virtio::test_utils::{activate_all, restored_context, TestInterrupt};
    use vm_memory::{Bytes, GuestAddress};

    /// Runs `body` on a thread of its own in a new network namespace (TAPs made there vanish
    /// with it); skipped where namespaces cannot be made (not root).
    fn in_netns(body: impl FnOnce() + Send + 'static) {
        let t = std::thread::spawn(move || {
            // SAFETY: unshare(2) with a flag only: this thread alone moves to a new namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("cannot make a network namespace here: skipped");
                return;
            }
            body();
        });
        t.join().unwrap();
    }

    fn frame(mem: &GuestMemoryMmap, at: u64, len: usize) {
        let mut f = vec![0u8; len];
        // An Ethernet frame after the 12-byte virtio-net header: broadcast, from our MAC.
        f[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&[0xff; 6]);
        f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        mem.write_slice(&f, GuestAddress(at)).unwrap();
    }

    #[test]
    fn state_round_trips_on_the_same_tap_and_tx_goes_on() {
        in_netns(|| {
            crate::tap::Tap::create_persistent("bxtest0").unwrap();
            let nic: NicConfig = "tap=bxtest0,mac=02:00:00:00:00:01".parse().unwrap();
            let mem = test_memory(2);
            let mut dev = Net::new(&nic).unwrap();
            let rx = DriverRing::new(&mem, 0x1_0000, 16);
            let mut tx = DriverRing::new(&mem, 0x2_0000, 16);
            let irq = TestInterrupt::new();
            activate_all(&mut dev, &[&rx, &tx], &mem, &irq);
            frame(&mem, 0x8_0000, 60 + VNET_HDR_LEN);
            tx.push_chain(0, &[(0x8_0000, (60 + VNET_HDR_LEN) as u32, false)]);
            tx.push_chain(1, &[(0x8_0000, 4, false)]); // shorter than a header: refused
            dev.process_tx();
            assert_eq!(tx.used_idx(), 2);
            // Quiet while it served; asking for kicks again once the driver added no more.
            assert_eq!(tx.used_flags(), 0, "the device left the driver's kicks off");
            let c = dev.counters().clone();
            // The TAP is down, so the kernel takes the frame or refuses it: either way it was
            // handed over once, and the runt was refused.
            assert_eq!(
                c.requests.load(Ordering::Relaxed) + c.io_errors.load(Ordering::Relaxed),
                1
            );
            assert_eq!(c.refused.load(Ordering::Relaxed), 1);

            let saved = dev.save();
            assert_eq!(saved.virtio.queues[1].next_avail, 2);
            let json = serde_json::to_string(&saved).unwrap();
            let back: NetState = serde_json::from_str(&json).unwrap();
            drop(dev);
            let mut dev2 = Net::restore(&back).unwrap();
            let mut cfg = [0u8; 6];
            dev2.read_config(0, &mut cfg);
            assert_eq!(cfg, [2, 0, 0, 0, 0, 1], "the MAC comes back");
            dev2.activate(restored_context(&mem, &irq)).unwrap();
            assert_eq!(dev2.save(), saved);
            assert!(
                dev2.queue_events()[RX].read().is_err(),
                "notified at a restore's activation"
            );
            tx.push_chain(2, &[(0x8_0000, (60 + VNET_HDR_LEN) as u32, false)]);
            dev2.process_tx();
            assert_eq!(
                tx.used_idx(),
                3,
                "the restored device serves the same ring on"
            );
            assert_eq!(tx.used_entry(2).0, 2);
        });
    }

    /// Frames in several buffers reach the TAP byte for byte: one sent straight from guest
    /// memory (three buffers), one with more buffers than that path takes (copied first);
    /// a chain with a buffer the device would write into is refused. Seen by a packet socket on
    /// the TAP, in a network namespace of the test's own.
    #[test]
    fn tx_chains_of_many_buffers_reach_the_tap_byte_for_byte() {
        in_netns(|| {
            crate::tap::Tap::create_persistent("bxtest1").unwrap();
            let nic: NicConfig = "tap=bxtest1,mac=02:00:00:00:00:01".parse().unwrap();
            let mem = test_memory(2);
            let mut dev = Net::new(&nic).unwrap();
            let up = std::process::Command::new("ip")
                .args(["link", "set", "dev", "bxtest1", "up"])
                .status()
                .unwrap();
            assert!(up.success());
            // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            // SAFETY: a fresh descriptor owned by nobody else.
            let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            // SAFETY: a zeroed sockaddr_ll is a valid value; bind reads it for its length.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: a NUL-terminated name.
            sll.sll_ifindex = unsafe { libc::if_nametoindex(c"bxtest1".as_ptr()) } as i32;
            assert!(sll.sll_ifindex > 0);
            // SAFETY: binds the socket above to a valid sockaddr_ll of the right size.
            let r = unsafe {
                libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
            let rx = DriverRing::new(&mem, 0x1_0000, 64);
            let mut tx = DriverRing::new(&mem, 0x2_0000, 64);
            let irq = TestInterrupt::new();
            activate_all(&mut dev, &[&rx, &tx], &mem, &irq);
            // Two frames of the blast's ethertype with a pattern of their own each.
            let eth = |len: usize, seed: u8| -> Vec<u8> {
                let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
                f[..6].copy_from_slice(&[0xff; 6]);
                f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
                f[12..14].copy_from_slice(&[0x88, 0xb5]);
                f
            };
            let (a, b) = (eth(60, 0x11), eth(100, 0x22));
            let mut addr = 0x8_0000u64;
            let mut put = |bytes: &[u8]| -> (u64, u32, bool) {
                mem.write_slice(bytes, GuestAddress(addr)).unwrap();
                let at = addr;
                addr += 0x100;
                (at, bytes.len() as u32, false)
            };
            let hdr = [0u8; VNET_HDR_LEN];
            let chain_a = vec![put(&hdr), put(&a[..20]), put(&a[20..])];
            let mut chain_b = vec![put(&hdr)];
            chain_b.extend(b.chunks(4).map(&mut put));
            assert!(chain_b.len() > TX_IOVECS);
            // A device-writable buffer: refused.
            let mut chain_c = vec![put(&hdr), put(&a)];
            chain_c[1].2 = true;
            // The same past the buffers sent straight from memory: refused too, not copied.
            let mut chain_d = vec![put(&hdr)];
            chain_d.extend(b.chunks(4).map(&mut put));
            chain_d.push(put(&a[..8]));
            chain_d.last_mut().unwrap().2 = true;
            tx.push_chain(0, &chain_a);
            tx.push_chain(3, &chain_b);
            let at_c = 3 + chain_b.len() as u16;
            tx.push_chain(at_c, &chain_c);
            tx.push_chain(at_c + chain_c.len() as u16, &chain_d);
            dev.process_tx();
            assert_eq!(tx.used_idx(), 4);
            let c = dev.counters().clone();
            assert_eq!(c.requests.load(Ordering::Relaxed), 2);
            assert_eq!(c.refused.load(Ordering::Relaxed), 2);
            assert_eq!(c.io_errors.load(Ordering::Relaxed), 0);
            // The frames as the kernel got them (other traffic on the link skipped).
            let tv = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            // SAFETY: SO_RCVTIMEO with a timeval of its size, on the socket above.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            assert_eq!(r, 0);
            let mut seen = Vec::new();
            let mut buf = [0u8; 2048];
            while seen.len() < 2 {
                // SAFETY: recv into `buf`, of its length, on the socket above.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                assert!(
                    n > 0,
                    "the frames on the TAP: {}",
                    std::io::Error::last_os_error()
                );
                if buf[12..14] == [0x88, 0xb5] {
                    seen.push(buf[..n as usize].to_vec());
                }
            }
            drop(sock);
            assert_eq!(seen, vec![a, b]);
        });
    }
}
