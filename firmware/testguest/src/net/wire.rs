//! Wire formats: addresses (parse, print), the Internet checksum, and
//! building / parsing Ethernet, 802.1Q, ARP, IPv4, IPv6, ICMP, ICMPv6 (NDP),
//! UDP and TCP. Everything works on byte slices; builders return the number
//! of bytes written and fill in every checksum.

/// Largest Ethernet frame (without FCS and virtio header) the driver sends.
pub const MAX_FRAME: usize = rt::virtio::net::MAX_FRAME;
pub const BROADCAST: [u8; 6] = [0xff; 6];

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_VLAN: u16 = 0x8100;
pub const ETH_IPV6: u16 = 0x86dd;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP6_ECHO_REQUEST: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const ND_ROUTER_SOLICIT: u8 = 133;
pub const ND_ROUTER_ADVERT: u8 = 134;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
/// NDP option types.
pub const ND_OPT_SOURCE_LL: u8 = 1;
pub const ND_OPT_TARGET_LL: u8 = 2;
pub const ND_OPT_PREFIX: u8 = 3;
/// Neighbor Advertisement flags (first byte after the checksum).
pub const NA_SOLICITED: u8 = 0x40;
pub const NA_OVERRIDE: u8 = 0x20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const ALL_ROUTERS: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

// ---------------------------------------------------------------- addresses

/// An IPv4 or IPv6 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Addr {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Addr::V4(a) => a,
            Addr::V6(a) => a,
        }
    }

    pub fn is_v6(&self) -> bool {
        matches!(self, Addr::V6(_))
    }
}

impl core::fmt::Display for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Addr::V4(a) => Ip4(*a).fmt(f),
            Addr::V6(a) => Ip6(*a).fmt(f),
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// Dotted quad.
pub struct Ip4(pub [u8; 4]);

impl core::fmt::Display for Ip4 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}.{}.{}", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// An IPv6 address in the RFC 5952 form (lower case, no leading zeros, the
/// longest run of two or more zero groups, the first of equal ones, as `::`).
pub struct Ip6(pub [u8; 16]);

impl core::fmt::Display for Ip6 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let g: [u16; 8] = core::array::from_fn(|i| u16::from_be_bytes([self.0[2 * i], self.0[2 * i + 1]]));
        let (mut best, mut best_len) = (8, 0);
        let mut i = 0;
        while i < 8 {
            if g[i] == 0 {
                let start = i;
                while i < 8 && g[i] == 0 {
                    i += 1;
                }
                if i - start > best_len {
                    (best, best_len) = (start, i - start);
                }
            } else {
                i += 1;
            }
        }
        if best_len < 2 {
            best = 8;
        }
        let mut i = 0;
        while i < 8 {
            if i == best {
                f.write_str("::")?;
                i += best_len;
                continue;
            }
            if i > 0 && i != best + best_len {
                f.write_str(":")?;
            }
            write!(f, "{:x}", g[i])?;
            i += 1;
        }
        Ok(())
    }
}

/// `a.b.c.d`.
pub fn parse_ip4(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut ip {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *b = p.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// Colon-separated groups of 1-4 hex digits, with at most one `::`; the last
/// 32 bits may be a dotted quad.
pub fn parse_ip6(s: &str) -> Option<[u8; 16]> {
    fn groups(s: &str, out: &mut [u16; 8], n: &mut usize, last: bool) -> Option<()> {
        if s.is_empty() {
            return Some(());
        }
        let mut it = s.split(':').peekable();
        while let Some(p) = it.next() {
            if last && it.peek().is_none() && p.contains('.') {
                let v4 = parse_ip4(p)?;
                if *n + 2 > 8 {
                    return None;
                }
                out[*n] = u16::from_be_bytes([v4[0], v4[1]]);
                out[*n + 1] = u16::from_be_bytes([v4[2], v4[3]]);
                *n += 2;
                continue;
            }
            if p.is_empty() || p.len() > 4 || *n >= 8 {
                return None;
            }
            out[*n] = u16::from_str_radix(p, 16).ok()?;
            *n += 1;
        }
        Some(())
    }
    let mut head = [0u16; 8];
    let mut tail = [0u16; 8];
    let (mut nh, mut nt) = (0, 0);
    match s.split_once("::") {
        Some((a, b)) => {
            if b.contains("::") {
                return None;
            }
            groups(a, &mut head, &mut nh, false)?;
            groups(b, &mut tail, &mut nt, true)?;
            if nh + nt > 7 {
                return None;
            }
        }
        None => {
            groups(s, &mut head, &mut nh, true)?;
            if nh != 8 {
                return None;
            }
        }
    }
    let mut g = [0u16; 8];
    g[..nh].copy_from_slice(&head[..nh]);
    g[8 - nt..].copy_from_slice(&tail[..nt]);
    let mut a = [0u8; 16];
    for (i, v) in g.iter().enumerate() {
        a[2 * i..2 * i + 2].copy_from_slice(&v.to_be_bytes());
    }
    Some(a)
}

/// `aa:bb:cc:dd:ee:ff` or with `-`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut mac {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Modified EUI-64 interface identifier of a MAC (RFC 4291 appendix A).
pub fn eui64(mac: [u8; 6]) -> [u8; 8] {
    [mac[0] ^ 0x02, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]]
}

/// `prefix` (first 64 bits) + EUI-64 of `mac`.
pub fn slaac_addr(prefix: &[u8; 16], mac: [u8; 6]) -> [u8; 16] {
    let mut a = *prefix;
    a[8..].copy_from_slice(&eui64(mac));
    a
}

/// fe80::EUI-64(mac).
pub fn link_local(mac: [u8; 6]) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 0xfe;
    p[1] = 0x80;
    slaac_addr(&p, mac)
}

pub fn is_link_local6(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

pub fn is_multicast6(a: &[u8; 16]) -> bool {
    a[0] == 0xff
}

/// ff02::1:ffXX:XXXX of `a`.
pub fn solicited_node(a: &[u8; 16]) -> [u8; 16] {
    let mut s = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
    s[13..].copy_from_slice(&a[13..]);
    s
}

/// 33:33 + the low 32 bits of an IPv6 multicast address.
pub fn multicast_mac6(a: &[u8; 16]) -> [u8; 6] {
    [0x33, 0x33, a[12], a[13], a[14], a[15]]
}

/// Prefix length of a contiguous netmask (None if not contiguous).
pub fn mask_len(mask: [u8; 4]) -> Option<u8> {
    let m = u32::from_be_bytes(mask);
    let len = m.leading_ones();
    (m.checked_shl(len).unwrap_or(0) == 0).then_some(len as u8)
}

/// Do `a` and `b` share the first `len` bits?
pub fn same_prefix(a: &[u8], b: &[u8], len: u32) -> bool {
    let full = (len / 8) as usize;
    if a[..full] != b[..full] {
        return false;
    }
    let rest = len % 8;
    rest == 0 || (a[full] ^ b[full]) & (0xff << (8 - rest)) == 0
}

// ---------------------------------------------------------------- checksum

/// One's-complement sum over several pieces (odd-length pieces are joined
/// correctly), folded and inverted: the Internet checksum.
pub struct Csum {
    sum: u64,
    odd: bool,
}

impl Csum {
    pub fn new() -> Csum {
        Csum { sum: 0, odd: false }
    }

    pub fn add(&mut self, data: &[u8]) -> &mut Csum {
        for &b in data {
            self.sum += if self.odd { b as u64 } else { (b as u64) << 8 };
            self.odd = !self.odd;
        }
        self
    }

    pub fn finish(&self) -> u16 {
        let mut s = self.sum;
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
}

/// Checksum of `seg` (protocol `proto`) with the IPv4 or IPv6 pseudo-header.
pub fn pseudo_csum(src: Addr, dst: Addr, proto: u8, seg: &[u8]) -> u16 {
    let mut c = Csum::new();
    c.add(src.bytes()).add(dst.bytes());
    let len = seg.len() as u32;
    match src {
        Addr::V4(_) => c.add(&[0, proto]).add(&(len as u16).to_be_bytes()),
        Addr::V6(_) => c.add(&len.to_be_bytes()).add(&[0, 0, 0, proto]),
    };
    c.add(seg).finish()
}

/// Offset of the checksum field in a segment of `proto` (and whether the
/// pseudo-header is included), None for protocols we do not checksum.
fn csum_field(proto: u8, v6: bool) -> Option<(usize, bool)> {
    match proto {
        PROTO_ICMP if !v6 => Some((2, false)),
        PROTO_ICMPV6 => Some((2, true)),
        PROTO_UDP => Some((6, true)),
        PROTO_TCP => Some((16, true)),
        _ => None,
    }
}

// ---------------------------------------------------------------- builders

/// Ethernet header, with an 802.1Q tag (PCP 0, VID `vlan`) if given.
/// Returns its length (14 or 18).
pub fn put_eth(out: &mut [u8], dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, ethertype: u16) -> usize {
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    match vlan {
        Some(vid) => {
            out[12..14].copy_from_slice(&ETH_VLAN.to_be_bytes());
            out[14..16].copy_from_slice(&(vid & 0x0fff).to_be_bytes());
            out[16..18].copy_from_slice(&ethertype.to_be_bytes());
            18
        }
        None => {
            out[12..14].copy_from_slice(&ethertype.to_be_bytes());
            14
        }
    }
}

/// The link-layer part of a frame.
#[derive(Clone, Copy)]
pub struct L2 {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub vlan: Option<u16>,
}

/// IP header fields of a frame to build.
#[derive(Clone, Copy)]
pub struct L3 {
    pub src: Addr,
    pub dst: Addr,
    pub proto: u8,
    /// TTL / hop limit.
    pub ttl: u8,
    /// IPv4 identification (ignored for IPv6).
    pub id: u16,
}

/// A whole frame: Ethernet (+ tag), IPv4 (DF set) or IPv6 header, then `seg`
/// with its checksum field filled in (ICMP, ICMPv6, UDP, TCP). Returns the
/// frame length, 0 if it does not fit or the address families differ.
pub fn ip_frame(out: &mut [u8], l2: L2, l3: L3, seg: &[u8]) -> usize {
    let v6 = match (l3.src, l3.dst) {
        (Addr::V4(_), Addr::V4(_)) => false,
        (Addr::V6(_), Addr::V6(_)) => true,
        _ => return 0,
    };
    let ihl = if v6 { 40 } else { 20 };
    let eth = put_eth(out, l2.dst, l2.src, l2.vlan, if v6 { ETH_IPV6 } else { ETH_IPV4 });
    let total = eth + ihl + seg.len();
    if total > out.len() || seg.len() > 0xffff - 40 {
        return 0;
    }
    let h = &mut out[eth..eth + ihl];
    h.fill(0);
    match (l3.src, l3.dst) {
        (Addr::V4(s), Addr::V4(d)) => {
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + seg.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&l3.id.to_be_bytes());
            h[6] = 0x40; // DF
            h[8] = l3.ttl;
            h[9] = l3.proto;
            h[12..16].copy_from_slice(&s);
            h[16..20].copy_from_slice(&d);
            let c = Csum::new().add(h).finish();
            h[10..12].copy_from_slice(&c.to_be_bytes());
        }
        (Addr::V6(s), Addr::V6(d)) => {
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(seg.len() as u16).to_be_bytes());
            h[6] = l3.proto;
            h[7] = l3.ttl;
            h[8..24].copy_from_slice(&s);
            h[24..40].copy_from_slice(&d);
        }
        _ => unreachable!(),
    }
    let p = &mut out[eth + ihl..total];
    p.copy_from_slice(seg);
    if let Some((off, pseudo)) = csum_field(l3.proto, v6) {
        if p.len() >= off + 2 {
            p[off..off + 2].fill(0);
            let mut c = if pseudo { pseudo_csum(l3.src, l3.dst, l3.proto, p) } else { Csum::new().add(p).finish() };
            if c == 0 && l3.proto == PROTO_UDP {
                c = 0xffff;
            }
            p[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    total
}

/// The ARP fields (Ethernet / IPv4).
#[derive(Clone, Copy, Debug)]
pub struct Arp {
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

/// An ARP frame; `trailer` follows the 28-byte ARP body (in what receivers
/// treat as padding), then zeros up to the 60-byte minimum. Returns the length.
pub fn arp_frame(out: &mut [u8], l2: L2, a: &Arp, trailer: &[u8]) -> usize {
    let eth = put_eth(out, l2.dst, l2.src, l2.vlan, ETH_ARP);
    let b = &mut out[eth..eth + 28];
    b[0..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 0]);
    b[6..8].copy_from_slice(&a.op.to_be_bytes());
    b[8..14].copy_from_slice(&a.sha);
    b[14..18].copy_from_slice(&a.spa);
    b[18..24].copy_from_slice(&a.tha);
    b[24..28].copy_from_slice(&a.tpa);
    let end = eth + 28 + trailer.len();
    out[eth + 28..end].copy_from_slice(trailer);
    let total = end.max(60);
    out[end..total].fill(0);
    total
}

/// UDP header + payload (checksum left to [`ip_frame`]). Returns the length.
pub fn udp_seg(out: &mut [u8], sport: u16, dport: u16, payload: &[u8]) -> usize {
    let len = 8 + payload.len();
    out[0..2].copy_from_slice(&sport.to_be_bytes());
    out[2..4].copy_from_slice(&dport.to_be_bytes());
    out[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    out[6..8].fill(0);
    out[8..len].copy_from_slice(payload);
    len
}

/// ICMP / ICMPv6 message: type, code, 4 bytes of rest-of-header, body.
pub fn icmp_seg(out: &mut [u8], ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> usize {
    out[0] = ty;
    out[1] = code;
    out[2..4].fill(0);
    out[4..8].copy_from_slice(&rest);
    out[8..8 + body.len()].copy_from_slice(body);
    8 + body.len()
}

/// A Neighbor Solicitation (`na_flags` None) or Advertisement for `target`
/// with a source / target link-layer address option holding `mac`, followed
/// by `extra` (more options). Returns the length.
pub fn nd_seg(out: &mut [u8], na_flags: Option<u8>, target: &[u8; 16], mac: [u8; 6], extra: &[u8]) -> usize {
    let (ty, opt, flags) = match na_flags {
        None => (ND_NEIGHBOR_SOLICIT, ND_OPT_SOURCE_LL, 0),
        Some(f) => (ND_NEIGHBOR_ADVERT, ND_OPT_TARGET_LL, f),
    };
    let mut body = [0u8; 24];
    body[0..16].copy_from_slice(target);
    body[16] = opt;
    body[17] = 1;
    body[18..24].copy_from_slice(&mac);
    let n = icmp_seg(out, ty, 0, [flags, 0, 0, 0], &body);
    out[n..n + extra.len()].copy_from_slice(extra);
    n + extra.len()
}

/// A TCP segment: 20-byte header (+ MSS option if `mss`), then `payload`.
/// Returns the length.
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub mss: Option<u16>,
}

pub fn tcp_seg(out: &mut [u8], h: &TcpHdr, payload: &[u8]) -> usize {
    let hl = if h.mss.is_some() { 24 } else { 20 };
    out[0..2].copy_from_slice(&h.sport.to_be_bytes());
    out[2..4].copy_from_slice(&h.dport.to_be_bytes());
    out[4..8].copy_from_slice(&h.seq.to_be_bytes());
    out[8..12].copy_from_slice(&h.ack.to_be_bytes());
    out[12] = ((hl / 4) as u8) << 4;
    out[13] = h.flags;
    out[14..16].copy_from_slice(&h.window.to_be_bytes());
    out[16..20].fill(0);
    if let Some(mss) = h.mss {
        out[20..24].copy_from_slice(&[2, 4, (mss >> 8) as u8, mss as u8]);
    }
    out[hl..hl + payload.len()].copy_from_slice(payload);
    hl + payload.len()
}

// ---------------------------------------------------------------- parsers

pub struct Eth<'a> {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// 0x8100 for a tagged frame (not unwrapped).
    pub ethertype: u16,
    pub payload: &'a [u8],
}

pub fn parse_eth(f: &[u8]) -> Option<Eth<'_>> {
    if f.len() < 14 {
        return None;
    }
    Some(Eth {
        dst: f[0..6].try_into().ok()?,
        src: f[6..12].try_into().ok()?,
        ethertype: u16::from_be_bytes([f[12], f[13]]),
        payload: &f[14..],
    })
}

pub fn parse_arp(e: &Eth) -> Option<Arp> {
    let b = e.payload;
    if e.ethertype != ETH_ARP || b.len() < 28 || b[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    Some(Arp {
        op: u16::from_be_bytes([b[6], b[7]]),
        sha: b[8..14].try_into().ok()?,
        spa: b[14..18].try_into().ok()?,
        tha: b[18..24].try_into().ok()?,
        tpa: b[24..28].try_into().ok()?,
    })
}

/// An IPv4 or IPv6 packet (IPv4 without options' meaning, unfragmented;
/// IPv6 without extension headers). `payload` is cut at the IP length.
pub struct IpPkt<'a> {
    pub src: Addr,
    pub dst: Addr,
    pub proto: u8,
    /// TTL / hop limit.
    pub ttl: u8,
    pub payload: &'a [u8],
}

impl IpPkt<'_> {
    /// Is the L4 checksum right (ICMP, ICMPv6, UDP, TCP; others: true)?
    /// A UDP checksum of 0 over IPv4 means "none".
    pub fn csum_ok(&self) -> bool {
        let v6 = self.src.is_v6();
        match csum_field(self.proto, v6) {
            None => true,
            Some((off, _)) if self.payload.len() < off + 2 => false,
            Some((off, _)) if self.proto == PROTO_UDP && !v6 && self.payload[off..off + 2] == [0, 0] => true,
            Some((_, true)) => pseudo_csum(self.src, self.dst, self.proto, self.payload) == 0,
            Some((_, false)) => Csum::new().add(self.payload).finish() == 0,
        }
    }
}

/// IPv4 (header checksum checked) or IPv6 from an untagged frame.
pub fn parse_ip<'a>(e: &Eth<'a>) -> Option<IpPkt<'a>> {
    let b = e.payload;
    match e.ethertype {
        ETH_IPV4 => {
            if b.len() < 20 || b[0] >> 4 != 4 {
                return None;
            }
            let ihl = (b[0] & 0xf) as usize * 4;
            let total = u16::from_be_bytes([b[2], b[3]]) as usize;
            if ihl < 20 || total < ihl || total > b.len() || Csum::new().add(&b[..ihl]).finish() != 0 {
                return None;
            }
            let frag = u16::from_be_bytes([b[6], b[7]]);
            if frag & 0x3fff != 0 {
                return None; // a fragment
            }
            Some(IpPkt {
                src: Addr::V4(b[12..16].try_into().ok()?),
                dst: Addr::V4(b[16..20].try_into().ok()?),
                proto: b[9],
                ttl: b[8],
                payload: &b[ihl..total],
            })
        }
        ETH_IPV6 => {
            if b.len() < 40 || b[0] >> 4 != 6 {
                return None;
            }
            let plen = u16::from_be_bytes([b[4], b[5]]) as usize;
            if 40 + plen > b.len() {
                return None;
            }
            Some(IpPkt {
                src: Addr::V6(b[8..24].try_into().ok()?),
                dst: Addr::V6(b[24..40].try_into().ok()?),
                proto: b[6],
                ttl: b[7],
                payload: &b[40..40 + plen],
            })
        }
        _ => None,
    }
}

pub struct Udp<'a> {
    pub sport: u16,
    pub dport: u16,
    pub payload: &'a [u8],
}

pub fn parse_udp<'a>(p: &IpPkt<'a>) -> Option<Udp<'a>> {
    let b = p.payload;
    if p.proto != PROTO_UDP || b.len() < 8 {
        return None;
    }
    let len = u16::from_be_bytes([b[4], b[5]]) as usize;
    if len < 8 || len > b.len() {
        return None;
    }
    Some(Udp { sport: u16::from_be_bytes([b[0], b[1]]), dport: u16::from_be_bytes([b[2], b[3]]), payload: &b[8..len] })
}

pub struct Tcp<'a> {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: &'a [u8],
}

pub fn parse_tcp<'a>(p: &IpPkt<'a>) -> Option<Tcp<'a>> {
    let b = p.payload;
    if p.proto != PROTO_TCP || b.len() < 20 {
        return None;
    }
    let off = (b[12] >> 4) as usize * 4;
    if off < 20 || off > b.len() {
        return None;
    }
    Some(Tcp {
        sport: u16::from_be_bytes([b[0], b[1]]),
        dport: u16::from_be_bytes([b[2], b[3]]),
        seq: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        ack: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        flags: b[13],
        payload: &b[off..],
    })
}

/// NDP options after a fixed part: (type, whole option including type and
/// length bytes). Stops at a zero length or a truncated option.
pub fn nd_options(opts: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = opts;
    core::iter::from_fn(move || {
        if rest.len() < 2 || rest[1] == 0 {
            return None;
        }
        let len = rest[1] as usize * 8;
        if len > rest.len() {
            return None;
        }
        let (o, r) = rest.split_at(len);
        rest = r;
        Some((o[0], o))
    })
}

/// The MAC in the first source / target link-layer option of type `ty`.
pub fn nd_ll_option(opts: &[u8], ty: u8) -> Option<[u8; 6]> {
    nd_options(opts).find(|(t, o)| *t == ty && o.len() >= 8).and_then(|(_, o)| o[2..8].try_into().ok())
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}
