//! Host networking: TAP devices, the rtnetlink calls that build the segments' links, the
//! nftables ruleset that filters and routes them, router advertisements and DHCP.

pub mod dhcp;
pub mod netlink;
pub mod nft;
pub mod ra;
pub mod service;
pub mod tap;
