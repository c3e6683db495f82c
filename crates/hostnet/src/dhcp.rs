//! A small DHCPv4 server (RFC 2131/2132) on each segment's bridge, so stock guest images that
//! configure their network by DHCP get the address the agent allocated, the mask, the gateway
//! and their host name. It hands out fixed bindings only: a client whose MAC is not a NIC on
//! that segment gets nothing. Which addresses a guest may use is still enforced by the filter.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::service::{is_timeout, Service};

/// Lease time announced (seconds).
pub const LEASE_SECS: u32 = 86_400;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;
const INFORM: u8 = 8;

/// What one client (by MAC) is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Its address.
    pub addr: Ipv4Addr,
    /// Prefix length of the segment.
    pub prefix_len: u8,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// Host name.
    pub hostname: String,
}

/// Bindings per MAC, shared with the agent (which rewrites them as NICs come and go).
pub type Bindings = Arc<Mutex<HashMap<[u8; 6], Binding>>>;

/// Serves one segment.
pub struct Server {
    /// The segment's bridge.
    pub ifname: String,
    /// The address the server speaks from (the host's on the segment).
    pub server_id: Ipv4Addr,
    /// The segment's bindings.
    pub bindings: Bindings,
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    kind: u8,
    xid: [u8; 4],
    flags: [u8; 2],
    ciaddr: Ipv4Addr,
    giaddr: Ipv4Addr,
    chaddr: [u8; 6],
    requested: Option<Ipv4Addr>,
}

fn parse(p: &[u8]) -> Option<Request> {
    if p.len() < 240 || p[0] != 1 || p[1] != 1 || p[2] != 6 || p[236..240] != MAGIC {
        return None;
    }
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let mut r = Request {
        kind: 0,
        xid: [p[4], p[5], p[6], p[7]],
        flags: [p[10], p[11]],
        ciaddr: ip(12),
        giaddr: ip(24),
        chaddr: [p[28], p[29], p[30], p[31], p[32], p[33]],
        requested: None,
    };
    let mut i = 240;
    while i < p.len() {
        let code = p[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = *p.get(i + 1)? as usize;
        let v = p.get(i + 2..i + 2 + len)?;
        match (code, len) {
            (53, 1) => r.kind = v[0],
            (50, 4) => r.requested = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
            _ => {}
        }
        i += 2 + len;
    }
    (r.kind != 0).then_some(r)
}

fn mask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0),
    )
}

/// The reply to `r` from a server at `server_id`, or None (ignore).
fn reply(r: &Request, b: &Binding, server_id: Ipv4Addr) -> Option<Vec<u8>> {
    let (kind, yiaddr) = match r.kind {
        DISCOVER => (OFFER, b.addr),
        REQUEST => {
            let asked = r.requested.unwrap_or(r.ciaddr);
            if asked == b.addr {
                (ACK, b.addr)
            } else {
                (NAK, Ipv4Addr::UNSPECIFIED)
            }
        }
        INFORM => (ACK, Ipv4Addr::UNSPECIFIED),
        _ => return None,
    };
    let mut p = vec![0u8; 240];
    p[0] = 2;
    p[1] = 1;
    p[2] = 6;
    p[4..8].copy_from_slice(&r.xid);
    p[10..12].copy_from_slice(&r.flags);
    p[12..16].copy_from_slice(&r.ciaddr.octets());
    p[16..20].copy_from_slice(&yiaddr.octets());
    p[20..24].copy_from_slice(&server_id.octets());
    p[24..28].copy_from_slice(&r.giaddr.octets());
    p[28..34].copy_from_slice(&r.chaddr);
    p[236..240].copy_from_slice(&MAGIC);
    let mut opt = |code: u8, v: &[u8]| {
        p.push(code);
        p.push(v.len() as u8);
        p.extend_from_slice(v);
    };
    opt(53, &[kind]);
    opt(54, &server_id.octets());
    if kind != NAK {
        if r.kind != INFORM {
            opt(51, &LEASE_SECS.to_be_bytes());
            opt(58, &(LEASE_SECS / 2).to_be_bytes());
            opt(59, &(LEASE_SECS / 8 * 7).to_be_bytes());
        }
        opt(1, &mask(b.prefix_len).octets());
        if let Some(g) = b.gateway {
            opt(3, &g.octets());
        }
        let h = b.hostname.as_bytes();
        opt(12, &h[..h.len().min(63)]);
        opt(26, &1500u16.to_be_bytes());
    }
    p.push(255);
    p.resize(p.len().max(300), 0);
    Some(p)
}

impl Server {
    fn socket(&self) -> io::Result<Socket> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_broadcast(true)?;
        s.bind_device(Some(self.ifname.as_bytes()))?;
        s.bind(&SockAddr::from(SocketAddrV4::new(
            Ipv4Addr::UNSPECIFIED,
            67,
        )))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(s)
    }

    /// Serves on a thread of its own until the service is dropped.
    pub fn start(self) -> Service {
        Service::spawn(format!("dhcp-{}", self.ifname), move |stop| {
            self.serve(stop)
        })
    }

    fn serve(&self, stop: &AtomicBool) -> io::Result<()> {
        let s = self.socket()?;
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            let n = match std::io::Read::read(&mut &s, &mut buf) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) => continue,
                Err(e) => return Err(e),
            };
            let Some(req) = parse(&buf[..n]) else {
                continue;
            };
            let binding = self
                .bindings
                .lock()
                .ok()
                .and_then(|b| b.get(&req.chaddr).cloned());
            let Some(b) = binding else {
                tracing::debug!(bridge = %self.ifname, "DHCP from an unknown MAC ignored");
                continue;
            };
            let Some(out) = reply(&req, &b, self.server_id) else {
                continue;
            };
            // A client with an address (renewing, informing) gets a unicast reply; one without
            // gets a broadcast (it cannot receive unicast before it has an address).
            let to = if req.ciaddr.is_unspecified() {
                Ipv4Addr::BROADCAST
            } else {
                req.ciaddr
            };
            s.send_to(&out, &SockAddr::from(SocketAddrV4::new(to, 68)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discover(kind: u8, requested: Option<Ipv4Addr>) -> Vec<u8> {
        let mut p = vec![0u8; 240];
        p[0] = 1;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&[1, 2, 3, 4]);
        p[28..34].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        p[236..240].copy_from_slice(&MAGIC);
        p.extend([53, 1, kind]);
        if let Some(a) = requested {
            p.extend([50, 4]);
            p.extend(a.octets());
        }
        p.push(255);
        p
    }

    #[test]
    fn offers_and_acks_the_binding_and_naks_anything_else() {
        let b = Binding {
            addr: "10.0.0.5".parse().unwrap(),
            prefix_len: 24,
            gateway: Some("10.0.0.1".parse().unwrap()),
            hostname: "vm".into(),
        };
        let sid = "10.0.0.1".parse().unwrap();
        let r = parse(&discover(DISCOVER, None)).unwrap();
        let o = reply(&r, &b, sid).unwrap();
        assert_eq!(o[0], 2);
        assert_eq!(&o[4..8], &[1, 2, 3, 4]);
        assert_eq!(&o[16..20], &[10, 0, 0, 5]);
        assert_eq!(&o[240..243], &[53, 1, OFFER]);
        assert!(o.windows(6).any(|w| w == [1, 4, 255, 255, 255, 0]));
        let r = parse(&discover(REQUEST, Some(b.addr))).unwrap();
        assert_eq!(reply(&r, &b, sid).unwrap()[242], ACK);
        let r = parse(&discover(REQUEST, Some("10.0.0.6".parse().unwrap()))).unwrap();
        assert_eq!(reply(&r, &b, sid).unwrap()[242], NAK);
        assert!(parse(&[0u8; 100]).is_none());
        let mut truncated = discover(DISCOVER, None);
        truncated.truncate(241);
        truncated.push(40);
        assert!(parse(&truncated).is_none());
    }
}
