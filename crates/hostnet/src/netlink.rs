//! The few rtnetlink operations the agent's network wiring needs: list links, create bridges
//! and VLAN interfaces, enslave ports, set addresses and routes, delete links. Thin and
//! idempotent where the kernel allows (an existing link, address or route is not an error).

use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVlan, LinkVxlan, RouteMessageBuilder};

/// A netlink failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("netlink: {what}: {err}")]
pub struct NetlinkError {
    /// The operation.
    pub what: String,
    /// The kernel's (or the socket's) answer.
    pub err: String,
}

fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |e| NetlinkError {
        what,
        err: e.to_string(),
    }
}

/// Whether a netlink error is the kernel's EEXIST.
fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

/// A link as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// `ifalias` (the agent tags what it owns with `bexar:...`).
    pub alias: Option<String>,
    /// Index of the bridge (or other controller) it is a port of.
    pub controller: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// Link kind (`bridge`, `veth`, `tun`...).
    pub kind: Option<String>,
    /// MAC address.
    pub mac: Option<[u8; 6]>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            alias: None,
            controller: None,
            up: m.header.flags.contains(LinkFlags::Up),
            kind: None,
            mac: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::IfAlias(s) => l.alias = Some(s.clone()),
                LinkAttribute::Controller(c) => l.controller = Some(*c),
                LinkAttribute::Address(b) if b.len() == 6 => {
                    l.mac = Some([b[0], b[1], b[2], b[3], b[4], b[5]])
                }
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            l.kind = Some(match k {
                                InfoKind::Other(s) => s.clone(),
                                other => other.to_string(),
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }
}

/// A netlink connection (its reader task runs on the current tokio runtime).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a route netlink socket in the current network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetlinkError {
            what: "open socket".into(),
            err: e.to_string(),
        })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Every link.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list links"))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// The link called `name`, if any (one request, not a dump).
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let r: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_collect()
            .await;
        match r {
            Ok(msgs) => Ok(msgs.first().map(Link::from_message)),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl_err(format!("get link {name}"))(e)),
        }
    }

    /// Creates the bridge `name` with a fixed MAC (a bridge otherwise takes the lowest MAC of
    /// its ports, and guests' ARP caches would go stale as VMs come and go), tagged `alias`.
    pub async fn add_bridge(
        &self,
        name: &str,
        alias: &str,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        let msg = LinkBridge::new(name)
            .address(mac.to_vec())
            .alias(alias)
            .up()
            .build();
        match self.handle.link().add(msg).execute().await {
            Err(e) if !is_exists(&e) => Err(nl_err(format!("create bridge {name}"))(e)),
            _ => Ok(()),
        }
    }

    /// Creates `name`, the 802.1Q interface of `vlan` on link `base`.
    pub async fn add_vlan(&self, name: &str, base: u32, vlan: u16) -> Result<(), NetlinkError> {
        let msg = LinkVlan::new(name, base, vlan).build();
        match self.handle.link().add(msg).execute().await {
            Err(e) if !is_exists(&e) => {
                Err(nl_err(format!("create VLAN {vlan} interface {name}"))(e))
            }
            _ => Ok(()),
        }
    }

    /// Creates `name`, a VXLAN interface for network identifier `vni` that sends from `local`
    /// on UDP `port` and learns where remote MACs live from what it receives. Where unknown,
    /// broadcast and multicast frames go is set by [`Netlink::add_flood_peer`].
    pub async fn add_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: Ipv4Addr,
        port: u16,
    ) -> Result<(), NetlinkError> {
        let msg = LinkVxlan::new(name, vni)
            .local(local)
            .port(port)
            .learning(true)
            .build();
        match self.handle.link().add(msg).execute().await {
            Err(e) if !is_exists(&e) => {
                Err(nl_err(format!("create VXLAN {vni} interface {name}"))(e))
            }
            _ => Ok(()),
        }
    }

    /// Adds `peer` to the hosts a VXLAN interface floods broadcast and unknown frames to (the
    /// `00:00:00:00:00:00 dst PEER` forwarding entry of head-end replication). No error if it
    /// is there.
    pub async fn add_flood_peer(&self, index: u32, peer: Ipv4Addr) -> Result<(), NetlinkError> {
        use rtnetlink::packet_core::{
            NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
        };
        use rtnetlink::packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        };
        use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        // The entry belongs to the VXLAN device itself (`self`), not to a bridge's table.
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                peer,
            )));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(m));
        // Append: one all-zero entry per peer (create-exclusive would refuse the second).
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        let what = format!("add flood peer {peer} to {index}");
        let mut handle = self.handle.clone();
        let mut resp = handle.request(req).map_err(nl_err(what.clone()))?;
        while let Some(msg) = futures_util::StreamExt::next(&mut resp).await {
            if let NetlinkPayload::Error(e) = msg.payload {
                let e = rtnetlink::Error::NetlinkError(e);
                if !is_exists(&e) {
                    return Err(nl_err(what)(e));
                }
            }
        }
        Ok(())
    }

    /// Sets a link's alias, bridge (`controller`) and state.
    pub async fn set_link(
        &self,
        index: u32,
        alias: &str,
        controller: Option<u32>,
        up: bool,
    ) -> Result<(), NetlinkError> {
        let mut b = LinkUnspec::new_with_index(index).alias(alias);
        if let Some(c) = controller {
            b = b.controller(c);
        }
        b = if up { b.up() } else { b.down() };
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(nl_err(format!("set link {index}")))
    }

    /// The addresses on link `index`.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err(format!("list addresses of {index}")))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNet::new(*ip, m.header.prefix_len).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds `addr` to link `index` (no error if it is there).
    pub async fn add_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        match self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
        {
            Err(e) if !is_exists(&e) => Err(nl_err(format!("add {addr} to {index}"))(e)),
            _ => Ok(()),
        }
    }

    /// Adds the on-link route `dest` via link `index` with source `src` (no error if there).
    pub async fn add_link_route(
        &self,
        index: u32,
        dest: Ipv4Net,
        src: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest.network(), dest.prefix_len())
            .output_interface(index)
            .pref_source(src)
            .scope(RouteScope::Link)
            .build();
        match self.handle.route().add(msg).execute().await {
            Err(e) if !is_exists(&e) => Err(nl_err(format!("add route {dest} via {index}"))(e)),
            _ => Ok(()),
        }
    }

    /// Deletes link `index`.
    pub async fn del_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl_err(format!("delete link {index}")))
    }
}

/// Writes a sysctl under /proc/sys (`net/ipv4/ip_forward`...). Interface names are part of
/// the path, so only names the agent made go through here.
pub fn sysctl(path: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(format!("/proc/sys/{path}"), value)
}

/// Tells whether any link or address changed in this network namespace since it last looked:
/// a route netlink socket subscribed to the link and address groups, drained without waiting.
/// The kernel tells every listener of every change, whoever makes it, so a repair pass that
/// finds nothing here has nothing to compare.
pub struct LinkWatch {
    sock: netlink_sys::Socket,
}

impl LinkWatch {
    /// Subscribes (RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR: the
    /// metadata route is an IPv4 route).
    pub fn open() -> std::io::Result<Self> {
        use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
        const GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100;
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind(&SocketAddr::new(0, GROUPS))?;
        sock.set_non_blocking(true)?;
        Ok(Self { sock })
    }

    /// Whether anything changed since the last call (or the socket overflowed, or failed:
    /// then it cannot say, which counts as changed).
    pub fn changed(&mut self) -> bool {
        let mut changed = false;
        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            buf.clear();
            match self.sock.recv(&mut buf, 0) {
                Ok(0) => return changed,
                Ok(_) => changed = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return changed,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // ENOBUFS: messages were lost.
                Err(_) => return true,
            }
        }
    }
}
