//! Network test modes on the `net` stack: `net` (ARP/NDP + ICMP/ICMPv6
//! echo, optionally expecting no answer), `net-udp` (a UDP round trip per
//! family), `net-peer` (a sleeping peer that answers ARP/NDP/echo and reports
//! marked frames), `net-spoof` (legitimate and spoofed frames, each marked).
//! Addresses: `ip=` / `bexar.ip`, SLAAC / `bexar.ip6` / `bexar.gw6` (see
//! `net::stack`).
use crate::idle::{self, Keys};
use crate::net::stack::{self, param_ip4, param_ip6, param_u64, NetError};
use crate::net::wire::{self, Addr, Arp, Ip4, Ip6, Mac, L2, L3};
use crate::net::{ByteWriter, Fail, Stack};
use crate::vtests::features_str;
use crate::{code, TestResult, P};
use core::fmt::Write;
use rt::arch::{self, rdtsc};
use rt::bootparams::{cmdline_param, BootParams};
use rt::{irq, println, uart};

const PING_PAYLOAD: usize = 56;
const PING_ID: u16 = 0xbe2a;

fn ping_payload(seq: u16, i: usize) -> u8 {
    (i as u8).wrapping_mul(7) ^ seq as u8
}

fn family(a: Addr) -> &'static str {
    if a.is_v6() {
        "v6"
    } else {
        "v4"
    }
}

/// An echo request (ICMP 8 / ICMPv6 128) segment.
pub(crate) fn echo_request(v6: bool, seq: u16) -> [u8; 8 + PING_PAYLOAD] {
    let mut s = [0u8; 8 + PING_PAYLOAD];
    let mut body = [0u8; PING_PAYLOAD];
    for (i, b) in body.iter_mut().enumerate() {
        *b = ping_payload(seq, i);
    }
    let mut rest = [0u8; 4];
    rest[0..2].copy_from_slice(&PING_ID.to_be_bytes());
    rest[2..4].copy_from_slice(&seq.to_be_bytes());
    let ty = if v6 { wire::ICMP6_ECHO_REQUEST } else { wire::ICMP_ECHO_REQUEST };
    wire::icmp_seg(&mut s, ty, 0, rest, &body);
    s
}

/// Is `f` the echo reply to our request `seq` from `peer`?
pub(crate) fn is_echo_reply(st: &Stack, f: &[u8], peer: Addr, seq: u16) -> bool {
    let Some(e) = wire::parse_eth(f) else { return false };
    let Some(p) = wire::parse_ip(&e) else { return false };
    let (proto, ty) = if peer.is_v6() {
        (wire::PROTO_ICMPV6, wire::ICMP6_ECHO_REPLY)
    } else {
        (wire::PROTO_ICMP, wire::ICMP_ECHO_REPLY)
    };
    let m = p.payload;
    p.src == peer
        && p.dst == st.src_for(peer)
        && p.proto == proto
        && m.len() >= 8 + PING_PAYLOAD
        && m[0] == ty
        && m[4..6] == PING_ID.to_be_bytes()
        && m[6..8] == seq.to_be_bytes()
        && m[8..8 + PING_PAYLOAD].iter().enumerate().all(|(i, &b)| b == ping_payload(seq, i))
        && p.csum_ok()
}

/// Print how `dst` was resolved: `<tag>: A is at M` or `<tag>: A via H at M`.
fn print_resolved(st: &Stack, dst: Addr, mac: [u8; 6]) {
    match st.next_hop(dst) {
        Ok(Some(h)) if h != dst => println!("{P}: {}: {dst} via {h} at {}", st.tag, Mac(mac)),
        _ => println!("{P}: {}: {dst} is at {}", st.tag, Mac(mac)),
    }
}

/// What one family of `net` gave.
enum PingOutcome {
    /// Echo replies received (of `count`).
    Replies(u16),
    /// The peer / next hop did not answer ARP / NDP.
    NoNeighbour,
}

/// Resolve `peer`, then `count` echo requests, 1 s each.
fn ping(st: &mut Stack, peer: Addr, count: u16) -> Result<PingOutcome, Fail> {
    let v6 = peer.is_v6();
    let mac = match st.resolve(peer) {
        Ok(m) => m,
        Err(NetError::NoNeighbour(h)) => {
            match h {
                Addr::V4(_) => println!("{P}: net: no ARP reply from {h} ({} bad rx frames)", st.nic.rx_bad),
                Addr::V6(_) => println!("{P}: net: no neighbor advertisement from {h}"),
            }
            return Ok(PingOutcome::NoNeighbour);
        }
        Err(e) => return Err(stack::fail("net", "cannot reach the peer", e)),
    };
    print_resolved(st, peer, mac);
    let hz = arch::tsc_hz();
    let (proto, what) = if v6 { (wire::PROTO_ICMPV6, "echo6") } else { (wire::PROTO_ICMP, "echo") };
    let mut ok = 0;
    for seq in 1..=count {
        let t0 = rdtsc();
        st.send_ip(peer, proto, stack::DEFAULT_TTL, &echo_request(v6, seq))
            .map_err(|e| stack::fail("net", "send failed", e))?;
        let got = st
            .wait_for(1000, |st, f| is_echo_reply(st, f, peer, seq).then_some(()))
            .map_err(|e| stack::fail("net", "receive failed", e))?;
        if got.is_some() {
            let us = rdtsc().wrapping_sub(t0) / (hz / 1_000_000).max(1);
            println!("{P}: net: {what} reply from {peer} seq {seq}: {us} us");
            ok += 1;
        } else {
            println!("{P}: net: no {what} reply for seq {seq}");
        }
    }
    if v6 {
        println!("{P}: net: {ok}/{count} echo6 replies");
    } else {
        println!("{P}: net: {ok}/{count} echo replies ({} bad rx frames)", st.nic.rx_bad);
    }
    Ok(PingOutcome::Replies(ok))
}

/// `net`: ARP / NDP for `bexar.peer` (default 10.0.2.2, through the gateway
/// when off-subnet) and / or `bexar.peer6`, then `bexar.count` echo requests
/// per family. `bexar.expect=unreachable` inverts the verdict.
pub fn test_net(bp: &BootParams) -> TestResult {
    let peer4 = param_ip4(bp, "bexar.peer")?;
    let peer6 = param_ip6(bp, "bexar.peer6")?;
    let count = param_u64(bp, "bexar.count", 3)?.clamp(1, 1000) as u16;
    let expect_unreachable = match cmdline_param(bp.cmdline(), "bexar.expect") {
        None => false,
        Some("unreachable") => true,
        Some(v) => {
            println!("{P}: bad value for bexar.expect: {v}");
            return Err((code::BAD_PARAM, "bad command-line parameter"));
        }
    };
    let mut peers = [None, None];
    if peer4.is_some() || peer6.is_none() {
        peers[0] = Some(Addr::V4(peer4.unwrap_or([10, 0, 2, 2])));
    }
    peers[1] = peer6.map(Addr::V6);

    let mut st = Stack::open(bp, "net")?;
    st.print_device();
    println!("{P}: net: features offered {}", features_str(st.nic.offered));
    println!("{P}: net: features accepted {}", features_str(st.nic.features));
    st.configure(bp)?;

    let mut replies = 0u32;
    let mut failure: Option<Fail> = None;
    for peer in peers.into_iter().flatten() {
        let v6 = peer.is_v6();
        let r = ping(&mut st, peer, count)?;
        let f = match r {
            PingOutcome::NoNeighbour if v6 => Some((code::NET_NO_NDP, "no neighbor advertisement")),
            PingOutcome::NoNeighbour => Some((code::NET_NO_REPLY, "no ARP reply")),
            PingOutcome::Replies(n) => {
                replies += n as u32;
                match (n == count, v6) {
                    (true, _) => None,
                    (false, true) => Some((code::NET_NO_ECHO6, "missing echo6 replies")),
                    (false, false) => Some((code::NET_NO_REPLY, "missing echo replies")),
                }
            }
        };
        if failure.is_none() {
            failure = f;
        }
    }
    if expect_unreachable {
        if replies > 0 {
            println!("{P}: net: {replies} echo replies although the peer should be unreachable");
            return Err((code::NET_REACHABLE, "reachable although unreachable was expected"));
        }
        println!("{P}: net: unreachable as expected");
        return Ok(());
    }
    failure.map_or(Ok(()), Err)
}

// ---------------------------------------------------------------- net-udp

/// `net-udp`: a datagram `bexar-udp <v4|v6> <seq>` from port 40000+seq to
/// `bexar.peer` / `[bexar.peer6]` port `bexar.port` (default 7); a datagram
/// with the same payload must come back to that port (from any address)
/// within 1 s; `bexar.count` tries.
pub fn test_net_udp(bp: &BootParams) -> TestResult {
    let peer4 = param_ip4(bp, "bexar.peer")?;
    let peer6 = param_ip6(bp, "bexar.peer6")?;
    let count = param_u64(bp, "bexar.count", 3)?.clamp(1, 1000) as u16;
    let port = param_u64(bp, "bexar.port", 7)?;
    let Ok(port) = u16::try_from(port) else {
        println!("{P}: bad value for bexar.port: {port}");
        return Err((code::BAD_PARAM, "bad command-line parameter"));
    };
    let mut peers = [None, None];
    if peer4.is_some() || peer6.is_none() {
        peers[0] = Some(Addr::V4(peer4.unwrap_or([10, 0, 2, 2])));
    }
    peers[1] = peer6.map(Addr::V6);

    let mut st = Stack::open(bp, "net-udp")?;
    st.print_device();
    st.configure(bp)?;
    let mut missing = [false, false];
    for (i, peer) in peers.into_iter().enumerate() {
        let Some(peer) = peer else { continue };
        let fam = family(peer);
        let shown = Shown(peer, port);
        let mut got = false;
        for seq in 1..=count {
            let mut pl = [0u8; 32];
            let mut w = ByteWriter::new(&mut pl);
            let _ = write!(w, "bexar-udp {fam} {seq}");
            let n = w.len;
            let sport = 40000u16.wrapping_add(seq);
            let mut seg = [0u8; 64];
            let len = wire::udp_seg(&mut seg, sport, port, &pl[..n]);
            if let Err(e) = st.send_ip(peer, wire::PROTO_UDP, stack::DEFAULT_TTL, &seg[..len]) {
                let f = stack::fail("net-udp", "cannot send", e);
                if matches!(e, NetError::Dev(_)) {
                    return Err(f);
                }
                break;
            }
            println!("{P}: net-udp: sent {fam} seq {seq} to {shown} from port {sport}");
            let reply = st
                .wait_for(1000, |st, f| {
                    let e = wire::parse_eth(f)?;
                    let p = wire::parse_ip(&e)?;
                    let u = wire::parse_udp(&p)?;
                    // Any source: a server bound to the wildcard address answers from its own
                    // choice of address, and a NAT may sit in between.
                    (p.dst == st.src_for(peer) && u.dport == sport && u.payload == &pl[..n] && p.csum_ok())
                        .then_some((p.src, u.sport))
                })
                .map_err(|e| stack::fail("net-udp", "receive failed", e))?;
            if let Some((from, rport)) = reply {
                println!("{P}: net-udp: {fam} reply from {}", Shown(from, rport));
                got = true;
                break;
            }
        }
        if !got {
            println!("{P}: net-udp: no {fam} reply from {shown} ({count} tries)");
            missing[i] = true;
        }
    }
    match missing {
        [false, false] => Ok(()),
        [true, false] => Err((code::NET_UDP_V4, "no UDP reply over IPv4")),
        [false, true] => Err((code::NET_UDP_V6, "no UDP reply over IPv6")),
        [true, true] => Err((code::NET_UDP_BOTH, "no UDP reply over IPv4 nor IPv6")),
    }
}

/// `A:P` or `[A]:P`.
struct Shown(Addr, u16);

impl core::fmt::Display for Shown {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Addr::V4(a) => write!(f, "{}:{}", Ip4(a), self.1),
            Addr::V6(a) => write!(f, "[{}]:{}", Ip6(a), self.1),
        }
    }
}

// ---------------------------------------------------------------- net-peer

const MARK: &[u8] = b"BXMARK:";

/// The marker name after the first `BXMARK:` in `f` ([A-Za-z0-9_.-]{1,32}).
fn marker(f: &[u8]) -> Option<&[u8]> {
    let mut from = 0;
    while let Some(i) = wire::find(&f[from..], MARK) {
        let start = from + i + MARK.len();
        let n = f[start..]
            .iter()
            .take(32)
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            .count();
        if n > 0 {
            return Some(&f[start..start + n]);
        }
        from = start;
    }
    None
}

/// `net-peer`: configure, print `net-peer: ready ...`, then serve forever,
/// asleep in a ring-0 `hlt` between interrupts of the NIC (rx used buffers),
/// COM1 (input discarded) and the keyboard (Ctrl+Alt+Del ends the test).
/// Every frame holding `BXMARK:<name>` is reported.
pub fn test_net_peer(bp: &BootParams) -> TestResult {
    let mut st = Stack::open(bp, "net-peer")?;
    st.nic.enable_rx_interrupts();
    st.print_device();
    st.configure(bp)?;
    let (nic_irq, from_cmdline) = stack::virtio_irq(bp, &st.t);
    if nic_irq as usize >= irq::LINES || nic_irq == irq::IRQ_KEYBOARD || nic_irq == irq::IRQ_COM1 {
        println!("{P}: net-peer: unusable IRQ {nic_irq} for the NIC");
        return Err((code::BAD_PARAM, "unusable NIC IRQ"));
    }
    let ioapic = idle::ioapic_addr();
    irq::lapic_enable();
    idle::keyboard_irq_on();
    irq::route_isa_irq(ioapic, irq::IRQ_KEYBOARD);
    irq::route_isa_irq(ioapic, irq::IRQ_COM1);
    irq::route_isa_irq(ioapic, nic_irq);
    uart::enable_rx_interrupt();
    println!(
        "{P}: net-peer: irq {nic_irq} ({}), vector {:#x}, ioapic {ioapic:#x}",
        if from_cmdline { "virtio_mmio.device" } else { "slot default" },
        irq::VECTOR_BASE + nic_irq
    );
    struct Opt6(Option<[u8; 16]>);
    impl core::fmt::Display for Opt6 {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self.0 {
                Some(a) => Ip6(a).fmt(f),
                None => f.write_str("none"),
            }
        }
    }
    println!("{P}: net-peer: ready ip {} ip6 {} mac {}", Ip4(st.ip), Opt6(st.ip6), Mac(st.mac));

    let mut keys = Keys::default();
    let (mut wakeups, mut frames, mut markers) = (0u64, 0u64, 0u64);
    let mut buf = [0u8; wire::MAX_FRAME + 4];
    // Everything is looked at once before the first sleep.
    let mut pending = u32::MAX;
    loop {
        if pending & (1 << nic_irq) != 0 {
            st.t.ack_interrupt();
            while let Some(n) = st.recv(&mut buf).map_err(|e| stack::fail("net-peer", "receive failed", e))? {
                frames += 1;
                let f = &buf[..n];
                if let Some(name) = marker(f) {
                    markers += 1;
                    let name = core::str::from_utf8(name).unwrap_or("?");
                    let src: [u8; 6] = f[6..12].try_into().unwrap_or([0; 6]);
                    println!("{P}: net-peer: marker {name} from {} len {n}", Mac(src));
                }
            }
        }
        if pending & (1 << irq::IRQ_COM1) != 0 {
            while uart::try_getb().is_some() {}
        }
        if pending & (1 << irq::IRQ_KEYBOARD) != 0 && idle::keyboard_ctrl_alt_del(&mut keys) {
            println!("{P}: net-peer: {wakeups} wakeups, {frames} frames, {markers} markers");
            println!("{P}: net-peer: ctrl-alt-del, shutting down");
            for line in [irq::IRQ_KEYBOARD, irq::IRQ_COM1, nic_irq] {
                irq::mask_isa_irq(ioapic, line);
            }
            return Ok(());
        }
        pending = irq::wait();
        wakeups += 1;
    }
}

// ---------------------------------------------------------------- net-spoof

/// `BXMARK:<name>\n`.
fn mark(name: &str) -> ([u8; 48], usize) {
    let mut b = [0u8; 48];
    let mut w = ByteWriter::new(&mut b);
    let _ = writeln!(w, "BXMARK:{name}");
    let n = w.len;
    (b, n)
}

/// The marker as an NDP option of type 253 (padded to 8-byte units).
fn mark_option(name: &str) -> ([u8; 56], usize) {
    let (m, n) = mark(name);
    let mut o = [0u8; 56];
    let len = (2 + n).div_ceil(8) * 8;
    o[0] = 253;
    o[1] = (len / 8) as u8;
    o[2..2 + n].copy_from_slice(&m[..n]);
    (o, len)
}

fn flip_last<const N: usize>(mut a: [u8; N]) -> [u8; N] {
    a[N - 1] ^= 0x01;
    a
}

/// The frames of `net-spoof`, built one at a time.
struct Spoofer<'a> {
    st: &'a mut Stack,
    peer: [u8; 4],
    peer_mac: [u8; 6],
    spoof_ip: [u8; 4],
    ip6: [u8; 16],
    vlan: u16,
}

const DISCARD_PORT: u16 = 9;
const SPOOF_SPORT: u16 = 40009;

impl Spoofer<'_> {
    fn udp(&mut self, l2: L2, src: Addr, dst: Addr, sport: u16, dport: u16, payload: &[u8]) -> ([u8; 600], usize) {
        let mut seg = [0u8; 560];
        let n = wire::udp_seg(&mut seg, sport, dport, payload);
        let mut f = [0u8; 600];
        let id = self.st.next_id();
        let len = wire::ip_frame(&mut f, l2, L3 { src, dst, proto: wire::PROTO_UDP, ttl: 64, id }, &seg[..n]);
        (f, len)
    }

    fn udp4(&mut self, name: &str, eth_src: [u8; 6], ip_src: [u8; 4], vlan: Option<u16>) -> ([u8; 600], usize) {
        let (m, n) = mark(name);
        let l2 = L2 { dst: self.peer_mac, src: eth_src, vlan };
        self.udp(l2, Addr::V4(ip_src), Addr::V4(self.peer), SPOOF_SPORT, DISCARD_PORT, &m[..n])
    }

    fn udp6(&mut self, name: &str, src: [u8; 16]) -> ([u8; 600], usize) {
        let (m, n) = mark(name);
        let l2 = self.st.l2(wire::multicast_mac6(&wire::ALL_NODES));
        self.udp(l2, Addr::V6(src), Addr::V6(wire::ALL_NODES), SPOOF_SPORT, DISCARD_PORT, &m[..n])
    }

    fn arp(&mut self, name: &str, eth_src: [u8; 6], a: Arp) -> ([u8; 600], usize) {
        let (m, n) = mark(name);
        let mut f = [0u8; 600];
        let len = wire::arp_frame(&mut f, L2 { dst: wire::BROADCAST, src: eth_src, vlan: None }, &a, &m[..n]);
        (f, len)
    }

    fn icmp6(&mut self, seg: &[u8]) -> ([u8; 600], usize) {
        let mut f = [0u8; 600];
        let l3 = L3 {
            src: Addr::V6(self.st.ll6),
            dst: Addr::V6(wire::ALL_NODES),
            proto: wire::PROTO_ICMPV6,
            ttl: 255,
            id: 0,
        };
        let len = wire::ip_frame(&mut f, self.st.l2(wire::multicast_mac6(&wire::ALL_NODES)), l3, seg);
        (f, len)
    }

    /// RA from the own link-local address: router lifetime 1800 s, source
    /// link-layer option, prefix 2001:db8:bad::/64 (L, A), the marker option.
    fn ra(&mut self, name: &str) -> ([u8; 600], usize) {
        let mut body = [0u8; 128];
        let mut k = 8; // reachable time, retrans timer: 0
        body[k..k + 8].copy_from_slice(&[wire::ND_OPT_SOURCE_LL, 1, 0, 0, 0, 0, 0, 0]);
        body[k + 2..k + 8].copy_from_slice(&self.st.mac);
        k += 8;
        let prefix = [0x20, 0x01, 0x0d, 0xb8, 0x0b, 0xad, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        body[k..k + 4].copy_from_slice(&[wire::ND_OPT_PREFIX, 4, 64, 0xc0]);
        body[k + 4..k + 8].copy_from_slice(&86400u32.to_be_bytes());
        body[k + 8..k + 12].copy_from_slice(&14400u32.to_be_bytes());
        body[k + 16..k + 32].copy_from_slice(&prefix);
        k += 32;
        let (o, n) = mark_option(name);
        body[k..k + n].copy_from_slice(&o[..n]);
        k += n;
        let mut seg = [0u8; 160];
        let lifetime = 1800u16.to_be_bytes();
        let len = wire::icmp_seg(&mut seg, wire::ND_ROUTER_ADVERT, 0, [64, 0, lifetime[0], lifetime[1]], &body[..k]);
        self.icmp6(&seg[..len])
    }

    /// Unsolicited NA (override) for `target`, with the marker option.
    fn na(&mut self, name: &str, target: [u8; 16]) -> ([u8; 600], usize) {
        let (o, n) = mark_option(name);
        let mut seg = [0u8; 128];
        let len = wire::nd_seg(&mut seg, Some(wire::NA_OVERRIDE), &target, self.st.mac, &o[..n]);
        self.icmp6(&seg[..len])
    }

    /// A DHCPOFFER-like BOOTP reply from port 67 to 255.255.255.255:68
    /// (broadcast MAC), the marker after the end option.
    fn dhcp(&mut self, name: &str) -> ([u8; 600], usize) {
        let mut b = [0u8; 400];
        b[0..4].copy_from_slice(&[2, 1, 6, 0]); // BOOTREPLY, Ethernet
        b[4..8].copy_from_slice(b"BXMK"); // xid
        b[10] = 0x80; // broadcast flag
        b[16..20].copy_from_slice(&self.spoof_ip); // yiaddr
        b[20..24].copy_from_slice(&self.st.ip); // siaddr
        b[28..34].copy_from_slice(&self.peer_mac); // chaddr
        b[236..240].copy_from_slice(&[99, 130, 83, 99]);
        let mut k = 240;
        let ip = self.st.ip;
        let mask = (u32::MAX.checked_shl(32 - self.st.prefix as u32).unwrap_or(0)).to_be_bytes();
        for opt in
            [&[53u8, 1, 2][..], &[54, 4, ip[0], ip[1], ip[2], ip[3]], &[1, 4, mask[0], mask[1], mask[2], mask[3]]]
        {
            b[k..k + opt.len()].copy_from_slice(opt);
            k += opt.len();
        }
        b[k..k + 6].copy_from_slice(&[3, 4, ip[0], ip[1], ip[2], ip[3]]);
        k += 6;
        b[k] = 255;
        k += 1;
        let (m, n) = mark(name);
        b[k..k + n].copy_from_slice(&m[..n]);
        k += n;
        let l2 = self.st.l2(wire::BROADCAST);
        self.udp(l2, Addr::V4(self.st.ip), Addr::V4([255; 4]), 67, 68, &b[..k])
    }

    fn frame(&mut self, name: &str) -> ([u8; 600], usize) {
        let (mac, ip) = (self.st.mac, self.st.ip);
        let arp = |op, sha, spa, tha, tpa| Arp { op, sha, spa, tha, tpa };
        match name {
            "legit-v4" | "legit-end" => self.udp4(name, mac, ip, None),
            "spoof-mac" => self.udp4(name, flip_last(mac), ip, None),
            "spoof-ip" => self.udp4(name, mac, self.spoof_ip, None),
            "spoof-vlan" => self.udp4(name, mac, ip, Some(self.vlan)),
            "spoof-arp-reply" => {
                let a = arp(wire::ARP_REPLY, mac, self.spoof_ip, self.peer_mac, self.peer);
                self.arp(name, mac, a)
            }
            "spoof-garp" => self.arp(name, mac, arp(wire::ARP_REQUEST, mac, self.spoof_ip, [0; 6], self.spoof_ip)),
            "spoof-arp-sha" => self.arp(name, mac, arp(wire::ARP_REQUEST, flip_last(mac), ip, [0; 6], self.peer)),
            "legit-arp" => self.arp(name, mac, arp(wire::ARP_REQUEST, mac, ip, [0; 6], self.peer)),
            "spoof-ip6" => self.udp6(name, flip_last(self.ip6)),
            "legit-v6" => self.udp6(name, self.ip6),
            "spoof-ra" => self.ra(name),
            "spoof-na" => self.na(name, flip_last(self.ip6)),
            "spoof-dhcp" => self.dhcp(name),
            _ => ([0; 600], 0),
        }
    }
}

/// The frames of `net-spoof`, in sending order.
pub const SPOOF_FRAMES: [&str; 14] = [
    "legit-v4",
    "spoof-mac",
    "spoof-ip",
    "spoof-arp-reply",
    "spoof-garp",
    "spoof-arp-sha",
    "spoof-ip6",
    "spoof-ra",
    "spoof-na",
    "spoof-dhcp",
    "spoof-vlan",
    "legit-v6",
    "legit-arp",
    "legit-end",
];

/// `net-spoof`: resolve `bexar.peer`, then send [`SPOOF_FRAMES`] ~20 ms
/// apart, each marked `BXMARK:<name>`.
pub fn test_net_spoof(bp: &BootParams) -> TestResult {
    let peer = param_ip4(bp, "bexar.peer")?.unwrap_or([10, 0, 2, 2]);
    let vlan = param_u64(bp, "bexar.vlan-tag", 10)?;
    if !(1..4095).contains(&vlan) {
        println!("{P}: bad value for bexar.vlan-tag: {vlan}");
        return Err((code::BAD_PARAM, "bad command-line parameter"));
    }
    let mut st = Stack::open(bp, "net-spoof")?;
    st.print_device();
    st.configure(bp)?;
    let spoof_ip = param_ip4(bp, "bexar.spoof-ip")?.unwrap_or(flip_last(st.ip));
    let Some(ip6) = st.ip6 else {
        println!("{P}: net-spoof: no IPv6 global address (SLAAC or bexar.ip6 needed for the IPv6 frames)");
        return Err((code::NET_NO_ADDR6, "no IPv6 global address"));
    };
    let peer_mac = st.resolve(Addr::V4(peer)).map_err(|e| stack::fail("net-spoof", "cannot resolve the peer", e))?;
    print_resolved(&st, Addr::V4(peer), peer_mac);
    println!("{P}: net-spoof: spoofed IPv4 source {}, VLAN tag {vlan}", Ip4(spoof_ip));
    let mut sp = Spoofer { st: &mut st, peer, peer_mac, spoof_ip, ip6, vlan: vlan as u16 };
    for name in SPOOF_FRAMES {
        let (f, n) = sp.frame(name);
        if n == 0 {
            return Err((code::FAIL, "frame does not fit"));
        }
        sp.st.send_frame(&f[..n]).map_err(|e| stack::fail("net-spoof", "send failed", e))?;
        println!("{P}: net-spoof: sent {name}");
        sp.st.idle(20).map_err(|e| stack::fail("net-spoof", "receive failed", e))?;
    }
    Ok(())
}
