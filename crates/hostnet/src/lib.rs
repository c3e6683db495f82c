//! The host side of the agent's networking: the rtnetlink calls that build the segments'
//! links, the nftables ruleset that filters and routes them, router advertisements and DHCP.
//! (The VMM's side, a TAP device behind virtio-net, is `devices::tap`.)

pub mod dhcp;
pub mod netlink;
pub mod nft;
pub mod ra;
pub mod service;

use std::net::Ipv4Addr;

/// The link-local address of the instance metadata service.
pub const IMDS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Prefix of every TAP name the agent creates.
pub const TAP_PREFIX: &str = "bxt";
/// Prefix of the segments' bridges.
pub const GATEWAY_PREFIX: &str = "bxg";
/// Prefix of the segments' uplink VLAN interfaces.
pub const UPLINK_PREFIX: &str = "bxu";
/// Prefix of the segments' VXLAN interfaces (segments that span hosts).
pub const OVERLAY_PREFIX: &str = "bxo";
