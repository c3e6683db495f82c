//! IPv6 router advertisements on a routed segment's gateway port (RFC 4861 section 6): the
//! host announces itself as the default router and the segment's /64 for SLAAC, every minute
//! and in answer to each router solicitation. Guests then configure their address (the EUI-64
//! one the agent allocated) and default route without DHCPv6.

use std::io::{self, Read};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::service::{is_timeout, Service};

/// Seconds between unsolicited advertisements.
pub const INTERVAL: Duration = Duration::from_secs(60);
/// Router lifetime announced (seconds).
pub const ROUTER_LIFETIME: u16 = 1800;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const ROUTER_SOLICIT: u8 = 133;
const ROUTER_ADVERT: u8 = 134;

/// Advertises one segment.
#[derive(Debug, Clone)]
pub struct Advertiser {
    /// The gateway port's name.
    pub ifname: String,
    /// Its index.
    pub ifindex: u32,
    /// Its MAC (source link-layer address option).
    pub mac: [u8; 6],
    /// The segment's /64.
    pub prefix: Ipv6Net,
}

impl Advertiser {
    /// The ICMPv6 router advertisement (the kernel fills in the checksum).
    pub fn packet(&self) -> Vec<u8> {
        let mut p = vec![ROUTER_ADVERT, 0, 0, 0, 64, 0];
        p.extend(ROUTER_LIFETIME.to_be_bytes());
        p.extend([0u8; 8]); // reachable time, retransmission timer: unspecified
        p.extend([1, 1]); // source link-layer address
        p.extend(self.mac);
        p.extend([5, 1, 0, 0]); // MTU
        p.extend(1500u32.to_be_bytes());
        p.extend([3, 4, 64, 0xc0]); // prefix information: on-link, autonomous
        p.extend(86_400u32.to_be_bytes()); // valid lifetime
        p.extend(14_400u32.to_be_bytes()); // preferred lifetime
        p.extend([0u8; 4]);
        p.extend(self.prefix.network().octets());
        p
    }

    fn socket(&self) -> io::Result<Socket> {
        let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        s.bind_device(Some(self.ifname.as_bytes()))?;
        s.set_multicast_hops_v6(255)?;
        s.set_unicast_hops_v6(255)?;
        s.set_multicast_loop_v6(false)?;
        s.set_multicast_if_v6(self.ifindex)?;
        s.join_multicast_v6(&ALL_ROUTERS, self.ifindex)?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(s)
    }

    fn send(&self, s: &Socket) -> io::Result<()> {
        let to = SockAddr::from(SocketAddrV6::new(ALL_NODES, 0, 0, self.ifindex));
        s.send_to(&self.packet(), &to).map(|_| ())
    }

    /// Advertises on a thread of its own until the service is dropped; socket errors (the port
    /// not yet having its link-local address, say) are retried.
    pub fn start(self) -> Service {
        Service::spawn(format!("ra-{}", self.ifname), move |stop| self.serve(stop))
    }

    fn serve(&self, stop: &AtomicBool) -> io::Result<()> {
        let mut s = self.socket()?;
        self.send(&s)?;
        let mut next = Instant::now() + INTERVAL;
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(n) if n > 0 && buf[0] == ROUTER_SOLICIT => self.send(&s)?,
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(e),
            }
            if Instant::now() >= next {
                self.send(&s)?;
                next = Instant::now() + INTERVAL;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_layout() {
        let a = Advertiser {
            ifname: "x".into(),
            ifindex: 1,
            mac: [2, 0, 0, 0, 0, 1],
            prefix: "2001:db8:1::/64".parse().unwrap(),
        };
        let p = a.packet();
        assert_eq!(p.len(), 16 + 8 + 8 + 32);
        assert_eq!(p[0], 134);
        assert_eq!(u16::from_be_bytes([p[6], p[7]]), ROUTER_LIFETIME);
        assert_eq!(&p[18..24], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(p[32], 3);
        assert_eq!(p[34], 64);
        assert_eq!(&p[48..50], &[0x20, 0x01]);
    }
}
