//! A small IPv4/IPv6 host on one virtio-net NIC: address configuration
//! (`ip=`, `bexar.ip`, SLAAC, `bexar.ip6` / `bexar.gw6`), a neighbour cache
//! filled by ARP and NDP, and the duties of a host that run whenever a frame
//! is received: ARP replies for the own IPv4 address, solicited Neighbor
//! Advertisements for the own IPv6 addresses (global and link-local), ICMP and
//! ICMPv6 echo replies. Everything is polled; timing uses the TSC.
use super::wire::{self, Addr, Arp, Ip4, Ip6, Mac, L2, L3};
use crate::{code, TestResult, P};
use rt::arch::{ms_to_cycles, rdtsc};
use rt::bootparams::{cmdline_param, BootParams};
use rt::println;
use rt::virtio::mmio::{self, Transport};
use rt::virtio::net::Net;
use rt::virtio::{device_id, Error};

/// Neighbour cache entries.
const CACHE: usize = 16;
/// ARP / NS: tries and the wait after each.
const RESOLVE_TRIES: u32 = 10;
const RESOLVE_RETRY_MS: u64 = 300;
/// SLAAC: Router Solicitations and the total wait for an Advertisement.
const RS_TRIES: u64 = 3;
const RA_WAIT_MS: u64 = 2000;
pub const DEFAULT_TTL: u8 = 64;

/// Why a packet could not be sent or a wait ended.
#[derive(Clone, Copy, Debug)]
pub enum NetError {
    /// The device failed.
    Dev(Error),
    /// No route: off-link destination and no gateway / router.
    NoRoute(Addr),
    /// The next hop (the value) did not answer ARP / NDP.
    NoNeighbour(Addr),
    /// No source address of the needed family (no IPv6 global address).
    NoAddress,
}

impl From<Error> for NetError {
    fn from(e: Error) -> NetError {
        NetError::Dev(e)
    }
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NetError::Dev(e) => write!(f, "device error: {e}"),
            NetError::NoRoute(a) => write!(f, "no route to {a}"),
            NetError::NoNeighbour(a @ Addr::V4(_)) => write!(f, "no ARP reply from {a}"),
            NetError::NoNeighbour(a) => write!(f, "no neighbor advertisement from {a}"),
            NetError::NoAddress => write!(f, "no IPv6 global address"),
        }
    }
}

pub type NetResult<T> = Result<T, NetError>;

/// Counters of the background duties.
#[derive(Default, Debug)]
pub struct Stats {
    pub arp_answered: u64,
    pub ns_answered: u64,
    pub echo_answered: u64,
    pub echo6_answered: u64,
    /// IP packets for us with a bad L4 checksum (dropped).
    pub bad_csum: u64,
    /// Frames dropped on purpose (`bexar.rx-drop`).
    pub dropped: u64,
}

pub struct Stack {
    pub nic: Net,
    pub t: Transport,
    /// Prefix of console lines (the test name, e.g. `net`).
    pub tag: &'static str,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    pub prefix: u8,
    pub gw: Option<[u8; 4]>,
    /// An extra address treated as on-link (the metadata service).
    pub onlink4: Option<[u8; 4]>,
    pub ll6: [u8; 16],
    pub ip6: Option<[u8; 16]>,
    pub gw6: Option<[u8; 16]>,
    /// Print a line for every ARP / NS / echo request answered.
    pub verbose: bool,
    /// Drop every N-th received frame (0: none), for loss tests (`bexar.rx-drop`).
    pub rx_drop: u64,
    rx_count: u64,
    pub stats: Stats,
    cache: [Option<(Addr, [u8; 6])>; CACHE],
    cache_next: usize,
    ipid: u16,
}

/// A failure of a test: exit status and reason.
pub type Fail = (u32, &'static str);

/// Print `<tag>: <what>: <error>` and map the error to an exit status
/// (`no_neighbour` for ARP/NDP failures).
pub fn fail(tag: &str, what: &'static str, e: NetError) -> Fail {
    println!("{P}: {tag}: {what}: {e}");
    let status = match e {
        NetError::Dev(Error::NoMemory) => code::VIRTIO_NO_MEMORY,
        NetError::Dev(_) => code::VIRTIO_IO,
        NetError::NoRoute(_) => code::NET_NO_ROUTE,
        NetError::NoNeighbour(Addr::V4(_)) => code::NET_NO_REPLY,
        NetError::NoNeighbour(Addr::V6(_)) => code::NET_NO_NDP,
        NetError::NoAddress => code::NET_NO_ADDR6,
    };
    (status, what)
}

fn bad_param(key: &str, v: &str) -> Fail {
    println!("{P}: bad value for {key}: {v}");
    (code::BAD_PARAM, "bad command-line parameter")
}

/// A decimal command-line number, `default` if absent.
pub fn param_u64(bp: &BootParams, key: &str, default: u64) -> Result<u64, Fail> {
    match cmdline_param(bp.cmdline(), key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| bad_param(key, v)),
    }
}

/// An IPv4 address parameter.
pub fn param_ip4(bp: &BootParams, key: &str) -> Result<Option<[u8; 4]>, Fail> {
    match cmdline_param(bp.cmdline(), key) {
        None => Ok(None),
        Some(v) => wire::parse_ip4(v).map(Some).ok_or_else(|| bad_param(key, v)),
    }
}

/// An IPv6 address parameter.
pub fn param_ip6(bp: &BootParams, key: &str) -> Result<Option<[u8; 16]>, Fail> {
    match cmdline_param(bp.cmdline(), key) {
        None => Ok(None),
        Some(v) => wire::parse_ip6(v).map(Some).ok_or_else(|| bad_param(key, v)),
    }
}

/// IPv4 settings from the command line.
struct Config4 {
    ip: [u8; 4],
    prefix: u8,
    gw: Option<[u8; 4]>,
}

/// The last `ip=` token (Linux: `client:server:gw:netmask:host:device:autoconf`)
/// if it configures NIC `index` (device empty or `eth<index>`) with a static
/// address; else `bexar.ip` (default 10.0.2.15) /24 without a gateway.
fn config4(bp: &BootParams, index: usize) -> Result<Config4, Fail> {
    let ipeq = bp.cmdline().split_ascii_whitespace().filter_map(|t| t.strip_prefix("ip=")).next_back();
    if let Some(v) = ipeq {
        let f: [&str; 7] = {
            let mut it = v.split(':');
            core::array::from_fn(|_| it.next().unwrap_or(""))
        };
        let dev_ok = match f[5] {
            "" => index == 0,
            d => d.strip_prefix("eth").and_then(|n| n.parse::<usize>().ok()) == Some(index),
        };
        match wire::parse_ip4(f[0]) {
            Some(ip) if dev_ok => {
                let prefix = match f[3] {
                    "" => 24,
                    m => wire::parse_ip4(m).and_then(wire::mask_len).ok_or_else(|| bad_param("ip= netmask", m))?,
                };
                let gw = match f[2] {
                    "" => None,
                    g => Some(wire::parse_ip4(g).ok_or_else(|| bad_param("ip= gateway", g))?),
                };
                return Ok(Config4 { ip, prefix, gw: gw.filter(|g| *g != [0; 4]) });
            }
            Some(_) => println!("{P}: netcfg: ip= is for device {:?}, not NIC {index}: ignored", f[5]),
            None => println!("{P}: netcfg: ip= without a static address ({v}): ignored"),
        }
    }
    let ip = param_ip4(bp, "bexar.ip")?.unwrap_or([10, 0, 2, 15]);
    Ok(Config4 { ip, prefix: 24, gw: None })
}

/// `bexar.net` (default 0): the NIC to use.
pub fn nic_index(bp: &BootParams) -> Result<usize, Fail> {
    Ok(param_u64(bp, "bexar.net", 0)? as usize)
}

/// The IRQ of the virtio-mmio device at `base` from the
/// `virtio_mmio.device=4K@ADDR:IRQ` tokens, else the VMM's layout (5 + slot).
pub fn virtio_irq(bp: &BootParams, t: &Transport) -> (u8, bool) {
    for tok in bp.cmdline().split_ascii_whitespace() {
        let Some(v) = tok.strip_prefix("virtio_mmio.device=") else { continue };
        let Some((_, rest)) = v.split_once('@') else { continue };
        let mut it = rest.split(':');
        let addr = it.next().unwrap_or("");
        let addr = match addr.strip_prefix("0x").or_else(|| addr.strip_prefix("0X")) {
            Some(h) => usize::from_str_radix(h, 16).ok(),
            None => addr.parse().ok(),
        };
        if addr == Some(t.base) {
            if let Some(irq) = it.next().and_then(|i| i.parse::<u8>().ok()) {
                return (irq, true);
            }
        }
    }
    (5 + t.slot as u8, false)
}

impl Stack {
    /// Open the `bexar.net`-th NIC (rx buffers posted). No addresses yet: see
    /// [`Stack::configure`].
    pub fn open(bp: &BootParams, tag: &'static str) -> Result<Stack, Fail> {
        let idx = nic_index(bp)?;
        let t = mmio::find(device_id::NET, idx).ok_or_else(|| {
            println!("{P}: {tag}: no network device #{idx}");
            (code::VIRTIO_NO_DEVICE, "no network device")
        })?;
        let nic = Net::open(t, 64).map_err(|e| {
            println!("{P}: {tag}: device init failed: {e}");
            (crate::vtests::err_code(e), "device init failed")
        })?;
        let mac = nic.mac;
        Ok(Stack {
            nic,
            t,
            tag,
            mac,
            ip: [0; 4],
            prefix: 24,
            gw: None,
            onlink4: None,
            ll6: wire::link_local(mac),
            ip6: None,
            gw6: None,
            verbose: true,
            rx_drop: 0,
            rx_count: 0,
            stats: Stats::default(),
            cache: [None; CACHE],
            cache_next: 0,
            ipid: (rdtsc() as u16) | 1,
        })
    }

    /// `<tag>: slot S at ADDR: mac M, link L, queues R/T`.
    pub fn print_device(&self) {
        let link = match self.nic.link_up() {
            Some(true) => "up",
            Some(false) => "down",
            None => "unknown",
        };
        println!(
            "{P}: {}: slot {} at {:#x}: mac {}, link {link}, queues {}/{}",
            self.tag,
            self.t.slot,
            self.t.base,
            Mac(self.mac),
            self.nic.rx.size(),
            self.nic.tx.size()
        );
    }

    /// Addresses from the command line (see [`config4`], `bexar.ip6`,
    /// `bexar.gw6`), SLAAC unless `bexar.slaac=0` or both IPv6 overrides are
    /// given, then the `netcfg:` line.
    pub fn configure(&mut self, bp: &BootParams) -> TestResult {
        self.rx_drop = param_u64(bp, "bexar.rx-drop", 0)?;
        let c = config4(bp, nic_index(bp)?)?;
        (self.ip, self.prefix, self.gw) = (c.ip, c.prefix, c.gw);
        let ip6 = param_ip6(bp, "bexar.ip6")?;
        let gw6 = param_ip6(bp, "bexar.gw6")?;
        let slaac = param_u64(bp, "bexar.slaac", 1)? != 0;
        if slaac && (ip6.is_none() || gw6.is_none()) {
            self.slaac().map_err(|e| fail(self.tag, "SLAAC", e))?;
        }
        if ip6.is_some() {
            self.ip6 = ip6;
        }
        if gw6.is_some() {
            self.gw6 = gw6;
        }
        self.print_config();
        Ok(())
    }

    /// `<P>: netcfg: mac M ip A/len gw G ip6 B gw6 R`.
    pub fn print_config(&self) {
        struct Opt<T>(Option<T>);
        impl<T: core::fmt::Display> core::fmt::Display for Opt<T> {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match &self.0 {
                    Some(v) => v.fmt(f),
                    None => f.write_str("none"),
                }
            }
        }
        println!(
            "{P}: netcfg: mac {} ip {}/{} gw {} ip6 {} gw6 {}",
            Mac(self.mac),
            Ip4(self.ip),
            self.prefix,
            Opt(self.gw.map(Ip4)),
            Opt(self.ip6.map(Ip6)),
            Opt(self.gw6.map(Ip6))
        );
    }

    // ------------------------------------------------------------ neighbours

    pub fn lookup(&self, a: Addr) -> Option<[u8; 6]> {
        self.cache.iter().flatten().find(|(k, _)| *k == a).map(|(_, m)| *m)
    }

    pub fn learn(&mut self, a: Addr, mac: [u8; 6]) {
        if mac == [0; 6] || mac[0] & 1 != 0 {
            return;
        }
        if let Some(e) = self.cache.iter_mut().flatten().find(|(k, _)| *k == a) {
            e.1 = mac;
            return;
        }
        self.cache[self.cache_next] = Some((a, mac));
        self.cache_next = (self.cache_next + 1) % CACHE;
    }

    /// Is `d` on the own IPv4 subnet (or the extra on-link address)?
    pub fn onlink_v4(&self, d: [u8; 4]) -> bool {
        self.onlink4 == Some(d) || wire::same_prefix(&d, &self.ip, self.prefix as u32)
    }

    /// Is `d` on-link for IPv6 (link-local or in the own /64)?
    pub fn onlink_v6(&self, d: &[u8; 16]) -> bool {
        wire::is_link_local6(d) || self.ip6.is_some_and(|a| a[..8] == d[..8])
    }

    /// The next hop towards `dst` (`dst` itself when on-link), None for a
    /// broadcast / multicast destination.
    pub fn next_hop(&self, dst: Addr) -> NetResult<Option<Addr>> {
        match dst {
            Addr::V4(d) => {
                let bcast = u32::from_be_bytes(self.ip) | (u32::MAX.checked_shr(self.prefix as u32).unwrap_or(0));
                if d == [255; 4] || (self.prefix < 31 && u32::from_be_bytes(d) == bcast) {
                    Ok(None)
                } else if self.onlink_v4(d) {
                    Ok(Some(dst))
                } else {
                    self.gw.map(|g| Some(Addr::V4(g))).ok_or(NetError::NoRoute(dst))
                }
            }
            Addr::V6(d) => {
                if wire::is_multicast6(&d) {
                    Ok(None)
                } else if self.onlink_v6(&d) {
                    Ok(Some(dst))
                } else {
                    self.gw6.map(|g| Some(Addr::V6(g))).ok_or(NetError::NoRoute(dst))
                }
            }
        }
    }

    /// Source address for `dst`: the IPv4 address; for IPv6 the link-local
    /// one towards link-local / multicast-to-link destinations, else the
    /// global one (the link-local one if there is none).
    pub fn src_for(&self, dst: Addr) -> Addr {
        match dst {
            Addr::V4(_) => Addr::V4(self.ip),
            Addr::V6(d) if wire::is_link_local6(&d) || (wire::is_multicast6(&d) && d[1] & 0xf == 2) => {
                Addr::V6(self.ll6)
            }
            Addr::V6(_) => Addr::V6(self.ip6.unwrap_or(self.ll6)),
        }
    }

    /// Send an ARP request / Neighbor Solicitation for `a`.
    pub fn solicit(&mut self, a: Addr) -> NetResult<()> {
        let mut f = [0u8; 128];
        let n = match a {
            Addr::V4(t) => {
                let arp = Arp { op: wire::ARP_REQUEST, sha: self.mac, spa: self.ip, tha: [0; 6], tpa: t };
                wire::arp_frame(&mut f, self.l2(wire::BROADCAST), &arp, &[])
            }
            Addr::V6(t) => {
                let sn = wire::solicited_node(&t);
                let mut seg = [0u8; 32];
                let len = wire::nd_seg(&mut seg, None, &t, self.mac, &[]);
                let l3 = L3 { src: self.src_for(a), dst: Addr::V6(sn), proto: wire::PROTO_ICMPV6, ttl: 255, id: 0 };
                wire::ip_frame(&mut f, self.l2(wire::multicast_mac6(&sn)), l3, &seg[..len])
            }
        };
        self.send_frame(&f[..n])
    }

    /// The MAC for `dst`: broadcast / multicast MACs directly, else the next
    /// hop's from the cache or by ARP / NDP (10 tries 300 ms apart).
    pub fn resolve(&mut self, dst: Addr) -> NetResult<[u8; 6]> {
        let nh = match self.next_hop(dst)? {
            None => {
                return Ok(match dst {
                    Addr::V4(_) => wire::BROADCAST,
                    Addr::V6(d) => wire::multicast_mac6(&d),
                })
            }
            Some(nh) => nh,
        };
        if let Some(m) = self.lookup(nh) {
            return Ok(m);
        }
        for _ in 0..RESOLVE_TRIES {
            self.solicit(nh)?;
            if let Some(m) = self.wait_for(RESOLVE_RETRY_MS, |st, _| st.lookup(nh))? {
                return Ok(m);
            }
        }
        Err(NetError::NoNeighbour(nh))
    }

    // ------------------------------------------------------------ sending

    pub fn l2(&self, dst: [u8; 6]) -> L2 {
        L2 { dst, src: self.mac, vlan: None }
    }

    pub fn next_id(&mut self) -> u16 {
        self.ipid = self.ipid.wrapping_add(1);
        self.ipid
    }

    pub fn send_frame(&mut self, f: &[u8]) -> NetResult<()> {
        Ok(self.nic.send(f)?)
    }

    /// Send `seg` (an ICMP / ICMPv6 / UDP / TCP segment; the checksum is
    /// filled in) to `dst` from [`Stack::src_for`], resolving the next hop.
    pub fn send_ip(&mut self, dst: Addr, proto: u8, ttl: u8, seg: &[u8]) -> NetResult<()> {
        if dst.is_v6() && self.ip6.is_none() && !self.onlink_v6_ll(dst) {
            return Err(NetError::NoAddress);
        }
        let mac = self.resolve(dst)?;
        let src = self.src_for(dst);
        let mut f = [0u8; wire::MAX_FRAME];
        let id = self.next_id();
        let n = wire::ip_frame(&mut f, self.l2(mac), L3 { src, dst, proto, ttl, id }, seg);
        if n == 0 {
            return Err(NetError::Dev(Error::BadArgument));
        }
        self.send_frame(&f[..n])
    }

    fn onlink_v6_ll(&self, dst: Addr) -> bool {
        matches!(dst, Addr::V6(d) if wire::is_link_local6(&d) || wire::is_multicast6(&d))
    }

    // ------------------------------------------------------------ receiving

    /// The next received frame (copied into `buf`), after the background
    /// duties ran on it. None if nothing is waiting.
    pub fn recv(&mut self, buf: &mut [u8]) -> NetResult<Option<usize>> {
        let Some(n) = self.nic.recv(buf)? else { return Ok(None) };
        self.rx_count += 1;
        if self.rx_drop > 0 && self.rx_count.is_multiple_of(self.rx_drop) {
            self.stats.dropped += 1;
            return Ok(None);
        }
        self.background(&buf[..n])?;
        Ok(Some(n))
    }

    /// Receive for up to `ms` milliseconds, handing every frame to `f` until
    /// it returns Some.
    pub fn wait_for<T>(&mut self, ms: u64, mut f: impl FnMut(&mut Stack, &[u8]) -> Option<T>) -> NetResult<Option<T>> {
        let mut buf = [0u8; wire::MAX_FRAME + 4];
        let t0 = rdtsc();
        let limit = ms_to_cycles(ms);
        while rdtsc().wrapping_sub(t0) < limit {
            match self.recv(&mut buf)? {
                Some(n) => {
                    if let Some(v) = f(self, &buf[..n]) {
                        return Ok(Some(v));
                    }
                }
                None => core::hint::spin_loop(),
            }
        }
        Ok(None)
    }

    /// Serve the background duties for `ms` milliseconds.
    pub fn idle(&mut self, ms: u64) -> NetResult<()> {
        self.wait_for(ms, |_, _| None::<()>).map(|_| ())
    }

    /// Is `a` one of our addresses (unicast)?
    pub fn is_own(&self, a: Addr) -> bool {
        match a {
            Addr::V4(d) => d == self.ip,
            Addr::V6(d) => d == self.ll6 || Some(d) == self.ip6,
        }
    }

    /// Is a packet to `a` for us (own address, broadcast, all-nodes, our
    /// solicited-node groups)?
    pub fn accepts(&self, a: Addr) -> bool {
        match a {
            Addr::V4(d) => d == self.ip || d == [255; 4] || matches!(self.next_hop(a), Ok(None)),
            Addr::V6(d) => {
                self.is_own(a)
                    || d == wire::ALL_NODES
                    || d == wire::solicited_node(&self.ll6)
                    || self.ip6.is_some_and(|g| d == wire::solicited_node(&g))
            }
        }
    }

    /// ARP requests for the own address, NS for the own IPv6 addresses, echo
    /// requests to the own addresses; neighbours are learned from ARP and NDP.
    fn background(&mut self, f: &[u8]) -> NetResult<()> {
        let Some(e) = wire::parse_eth(f) else { return Ok(()) };
        if e.dst != self.mac && e.dst[0] & 1 == 0 {
            return Ok(()); // unicast for another host (flooded by a bridge)
        }
        if let Some(a) = wire::parse_arp(&e) {
            if a.tpa == self.ip && a.spa != [0; 4] {
                self.learn(Addr::V4(a.spa), a.sha);
            }
            if a.op == wire::ARP_REQUEST && a.tpa == self.ip && self.ip != [0; 4] {
                let r = Arp { op: wire::ARP_REPLY, sha: self.mac, spa: self.ip, tha: a.sha, tpa: a.spa };
                let mut out = [0u8; 64];
                let n = wire::arp_frame(&mut out, self.l2(a.sha), &r, &[]);
                self.send_frame(&out[..n])?;
                self.stats.arp_answered += 1;
                if self.verbose {
                    println!("{P}: {}: answered an ARP request from {} ({})", self.tag, Ip4(a.spa), Mac(a.sha));
                }
            }
            return Ok(());
        }
        let Some(p) = wire::parse_ip(&e) else { return Ok(()) };
        if !self.accepts(p.dst) {
            return Ok(());
        }
        if matches!(p.proto, wire::PROTO_ICMP | wire::PROTO_ICMPV6) && !p.csum_ok() {
            self.stats.bad_csum += 1;
            return Ok(());
        }
        match (p.src, p.dst, p.proto) {
            (Addr::V4(_), Addr::V4(d), wire::PROTO_ICMP)
                if d == self.ip && p.payload.len() >= 8 && p.payload[0] == wire::ICMP_ECHO_REQUEST =>
            {
                self.echo_reply(&e, &p)?;
            }
            (Addr::V6(s), Addr::V6(_), wire::PROTO_ICMPV6) if p.payload.len() >= 8 => {
                let m = p.payload;
                match m[0] {
                    wire::ICMP6_ECHO_REQUEST if self.is_own(p.dst) => self.echo_reply(&e, &p)?,
                    wire::ND_NEIGHBOR_SOLICIT if p.ttl == 255 && m.len() >= 24 => {
                        let target: [u8; 16] = m[8..24].try_into().unwrap_or([0; 16]);
                        let slla = wire::nd_ll_option(&m[24..], wire::ND_OPT_SOURCE_LL);
                        if s != [0; 16] {
                            if let Some(mac) = slla {
                                self.learn(p.src, mac);
                            }
                        }
                        if self.is_own(Addr::V6(target)) {
                            self.neighbor_advert(s, target, slla.unwrap_or(e.src))?;
                        }
                    }
                    wire::ND_NEIGHBOR_ADVERT if p.ttl == 255 && m.len() >= 24 => {
                        let target: [u8; 16] = m[8..24].try_into().unwrap_or([0; 16]);
                        let mac = wire::nd_ll_option(&m[24..], wire::ND_OPT_TARGET_LL).unwrap_or(e.src);
                        self.learn(Addr::V6(target), mac);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Echo reply (ICMP type 0 / ICMPv6 129) to the request in `p`, to the
    /// frame's Ethernet source.
    fn echo_reply(&mut self, e: &wire::Eth, p: &wire::IpPkt) -> NetResult<()> {
        let v6 = p.src.is_v6();
        let mut seg = [0u8; wire::MAX_FRAME];
        let len = p.payload.len().min(wire::MAX_FRAME - 14 - 40);
        seg[..len].copy_from_slice(&p.payload[..len]);
        seg[0] = if v6 { wire::ICMP6_ECHO_REPLY } else { wire::ICMP_ECHO_REPLY };
        let mut f = [0u8; wire::MAX_FRAME];
        let id = self.next_id();
        let l3 = L3 { src: p.dst, dst: p.src, proto: p.proto, ttl: DEFAULT_TTL, id };
        let n = wire::ip_frame(&mut f, self.l2(e.src), l3, &seg[..len]);
        if n > 0 {
            self.send_frame(&f[..n])?;
        }
        if v6 {
            self.stats.echo6_answered += 1;
        } else {
            self.stats.echo_answered += 1;
        }
        if self.verbose {
            let what = if v6 { "echo6" } else { "echo" };
            println!("{P}: {}: answered an {what} request from {}", self.tag, p.src);
        }
        Ok(())
    }

    /// Solicited NA (S|O) for `target` to `to` (ff02::1 without S when the
    /// solicitation came from the unspecified address), with the target
    /// link-layer option.
    fn neighbor_advert(&mut self, to: [u8; 16], target: [u8; 16], to_mac: [u8; 6]) -> NetResult<()> {
        let (dst, flags, mac) = if to == [0; 16] {
            (wire::ALL_NODES, wire::NA_OVERRIDE, wire::multicast_mac6(&wire::ALL_NODES))
        } else {
            (to, wire::NA_SOLICITED | wire::NA_OVERRIDE, to_mac)
        };
        let mut seg = [0u8; 32];
        let len = wire::nd_seg(&mut seg, Some(flags), &target, self.mac, &[]);
        let mut f = [0u8; 128];
        let l3 = L3 { src: Addr::V6(target), dst: Addr::V6(dst), proto: wire::PROTO_ICMPV6, ttl: 255, id: 0 };
        let n = wire::ip_frame(&mut f, self.l2(mac), l3, &seg[..len]);
        self.send_frame(&f[..n])?;
        self.stats.ns_answered += 1;
        if self.verbose {
            println!("{P}: {}: answered a neighbor solicitation from {} for {}", self.tag, Ip6(to), Ip6(target));
        }
        Ok(())
    }

    // ------------------------------------------------------------ SLAAC

    /// Router Solicitation (from the link-local address to ff02::2 with the
    /// source link-layer option) up to 3 times within ~2 s; the first Prefix
    /// Information option with A set and length 64 gives the global address
    /// (prefix + EUI-64), the RA's source the default router (its MAC from the
    /// source link-layer option, else resolved later by NS).
    pub fn slaac(&mut self) -> NetResult<()> {
        let mut router = None;
        for _ in 0..RS_TRIES {
            let mut seg = [0u8; 16];
            let mut opt = [0u8; 8];
            opt[0] = wire::ND_OPT_SOURCE_LL;
            opt[1] = 1;
            opt[2..8].copy_from_slice(&self.mac);
            let len = wire::icmp_seg(&mut seg, wire::ND_ROUTER_SOLICIT, 0, [0; 4], &opt);
            let mut f = [0u8; 128];
            let l3 = L3 {
                src: Addr::V6(self.ll6),
                dst: Addr::V6(wire::ALL_ROUTERS),
                proto: wire::PROTO_ICMPV6,
                ttl: 255,
                id: 0,
            };
            let n = wire::ip_frame(&mut f, self.l2(wire::multicast_mac6(&wire::ALL_ROUTERS)), l3, &seg[..len]);
            self.send_frame(&f[..n])?;
            let got = self.wait_for(RA_WAIT_MS / RS_TRIES, |st, f| {
                let (src, mac, prefix) = parse_ra(f)?;
                if let Some(m) = mac {
                    st.learn(Addr::V6(src), m);
                }
                router.get_or_insert(src);
                prefix.map(|p| (src, p))
            })?;
            if let Some((src, prefix)) = got {
                self.ip6 = Some(wire::slaac_addr(&prefix, self.mac));
                self.gw6 = Some(src);
                return Ok(());
            }
        }
        if let Some(r) = router {
            self.gw6 = Some(r);
        }
        Ok(())
    }
}

/// What a Router Advertisement says: source, source link-layer address, prefix.
type Ra = ([u8; 16], Option<[u8; 6]>, Option<[u8; 16]>);

/// A Router Advertisement (hop limit 255, valid checksum): its source, the
/// MAC from the source link-layer option, and the first /64 prefix with the
/// autonomous flag.
fn parse_ra(f: &[u8]) -> Option<Ra> {
    let e = wire::parse_eth(f)?;
    let p = wire::parse_ip(&e)?;
    let Addr::V6(src) = p.src else { return None };
    let m = p.payload;
    if p.proto != wire::PROTO_ICMPV6 || p.ttl != 255 || m.len() < 16 || m[0] != wire::ND_ROUTER_ADVERT {
        return None;
    }
    if !wire::is_link_local6(&src) || !p.csum_ok() {
        return None;
    }
    let opts = &m[16..];
    let mac = wire::nd_ll_option(opts, wire::ND_OPT_SOURCE_LL);
    let prefix = wire::nd_options(opts).find_map(|(t, o)| {
        // type 3, length 4: prefix length, flags (L 0x80, A 0x40), lifetimes, prefix at 16.
        (t == wire::ND_OPT_PREFIX && o.len() >= 32 && o[2] == 64 && o[3] & 0x40 != 0)
            .then(|| o[16..32].try_into().ok())
            .flatten()
    });
    Some((src, mac, prefix))
}
