//! Logical network segments (what the scheduler connects NICs to) and the address management
//! of the NICs on them: validation, overlap checks, stable MACs, IPv4/IPv6 allocation and the
//! names of the kernel objects that carry them.
//!
//! Everything here is pure: the kernel side lives in `crate::net`, the bookkeeping in
//! `crate::network`.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::spec::{valid_id, FieldError, NicSpec};
use bexar_devices::rate_limiter::RateLimitConfig;

/// How guests on a segment reach the rest of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SegmentMode {
    /// One L2 domain; the host uplink (if configured) carries it tagged with the VLAN id.
    Bridged,
    /// The host is the guests' gateway: IPv4 leaves through NAT, IPv6 is routed as is.
    Routed,
}

/// How a segment reaches other hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overlay {
    /// A VXLAN tunnel to the agent's overlay peers (`--overlay-peer`), VNI = the segment's
    /// VLAN id: one layer-2 domain across those hosts.
    Vxlan,
}

/// IPv4 of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipv4Spec {
    /// The subnet, `10.1.0.0/24` (prefix length 8-30, no host bits).
    pub subnet: Ipv4Net,
    /// The guests' default gateway: the host on a routed segment (default: the first address),
    /// the segment's own router on a bridged one (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
}

/// IPv6 of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipv6Spec {
    /// The prefix, `2001:db8:1::/64` (a /64, so guests can use SLAAC).
    pub prefix: Ipv6Net,
    /// The host's address on a routed segment (default: `prefix::1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv6Addr>,
}

/// A segment as the scheduler defines it. Immutable: a create with the same id and an equal
/// body is a no-op, a different one a conflict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSpec {
    /// Caller-chosen id (same rules as VM ids).
    pub id: String,
    /// VLAN id (1-4094), unique on the host.
    pub vlan: u16,
    /// `bridged` or `routed`.
    pub mode: SegmentMode,
    /// IPv4 subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Spec>,
    /// IPv6 prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Spec>,
    /// Spans hosts through this overlay (none: this host only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<Overlay>,
}

impl SegmentSpec {
    /// Checks the segment on its own and fills in defaults (gateways).
    pub fn validate(&mut self) -> Result<(), FieldError> {
        if !valid_id(&self.id) {
            return Err(FieldError::new(
                "id",
                "must be 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit",
            ));
        }
        if !(1..=4094).contains(&self.vlan) {
            return Err(FieldError::new(
                "vlan",
                format!("{} is out of range 1-4094", self.vlan),
            ));
        }
        if self.mode == SegmentMode::Routed && self.ipv4.is_none() && self.ipv6.is_none() {
            return Err(FieldError::new(
                "ipv4",
                "a routed segment needs an IPv4 subnet, an IPv6 prefix or both",
            ));
        }
        if let Some(v4) = &mut self.ipv4 {
            let n = v4.subnet;
            if !(8..=30).contains(&n.prefix_len()) {
                return Err(FieldError::new(
                    "ipv4.subnet",
                    format!("{n}: the prefix length must be 8-30"),
                ));
            }
            if n.addr() != n.network() {
                return Err(FieldError::new(
                    "ipv4.subnet",
                    format!("{n} has host bits set (the subnet is {})", n.trunc()),
                ));
            }
            let link_local: Ipv4Net = "169.254.0.0/16".parse().expect("constant");
            if n.contains(&link_local.network()) || link_local.contains(&n.network()) {
                return Err(FieldError::new(
                    "ipv4.subnet",
                    format!("{n} overlaps 169.254.0.0/16, where the metadata service lives"),
                ));
            }
            if v4.gateway.is_none() && self.mode == SegmentMode::Routed {
                v4.gateway = Some(first_host(n));
            }
            if let Some(g) = v4.gateway {
                if !usable_v4(n, g) {
                    return Err(FieldError::new(
                        "ipv4.gateway",
                        format!("{g} is not a host address of {n}"),
                    ));
                }
            }
        }
        if let Some(v6) = &mut self.ipv6 {
            let p = v6.prefix;
            if p.prefix_len() != 64 {
                return Err(FieldError::new(
                    "ipv6.prefix",
                    format!("{p}: must be a /64 (guests configure themselves by SLAAC)"),
                ));
            }
            if p.addr() != p.network() {
                return Err(FieldError::new(
                    "ipv6.prefix",
                    format!("{p} has host bits set (the prefix is {})", p.trunc()),
                ));
            }
            let special: [Ipv6Net; 2] = [
                "fe80::/10".parse().expect("constant"),
                "ff00::/8".parse().expect("constant"),
            ];
            if special.iter().any(|s| s.contains(&p.network())) {
                return Err(FieldError::new(
                    "ipv6.prefix",
                    format!("{p} is link-local or multicast"),
                ));
            }
            if v6.gateway.is_none() && self.mode == SegmentMode::Routed {
                v6.gateway = Some(host6(p, 1));
            }
            if let Some(g) = v6.gateway {
                if !p.contains(&g) || g == p.network() {
                    return Err(FieldError::new(
                        "ipv6.gateway",
                        format!("{g} is not a host address of {p}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the segment against the host's other segments: VLAN ids are unique and subnets
    /// do not overlap. The error names the field and the other segment.
    pub fn check_against<'a>(
        &self,
        others: impl IntoIterator<Item = &'a SegmentSpec>,
    ) -> Result<(), FieldError> {
        for o in others {
            if o.id == self.id {
                continue;
            }
            if o.vlan == self.vlan {
                return Err(FieldError::new(
                    "vlan",
                    format!("VLAN {} is already used by segment {:?}", self.vlan, o.id),
                ));
            }
            if let (Some(a), Some(b)) = (&self.ipv4, &o.ipv4) {
                if a.subnet.contains(&b.subnet.network()) || b.subnet.contains(&a.subnet.network())
                {
                    return Err(FieldError::new(
                        "ipv4.subnet",
                        format!("{} overlaps {} of segment {:?}", a.subnet, b.subnet, o.id),
                    ));
                }
            }
            if let (Some(a), Some(b)) = (&self.ipv6, &o.ipv6) {
                if a.prefix.contains(&b.prefix.network()) || b.prefix.contains(&a.prefix.network())
                {
                    return Err(FieldError::new(
                        "ipv6.prefix",
                        format!("{} overlaps {} of segment {:?}", a.prefix, b.prefix, o.id),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The host's addresses on the segment's gateway port (routed segments only).
    pub fn host_addresses(&self) -> (Option<Ipv4Net>, Option<Ipv6Net>) {
        if self.mode != SegmentMode::Routed {
            return (None, None);
        }
        let v4 = self.ipv4.as_ref().and_then(|v| {
            v.gateway
                .and_then(|g| Ipv4Net::new(g, v.subnet.prefix_len()).ok())
        });
        let v6 = self.ipv6.as_ref().and_then(|v| {
            v.gateway
                .and_then(|g| Ipv6Net::new(g, v.prefix.prefix_len()).ok())
        });
        (v4, v6)
    }
}

fn first_host(n: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(n.network()) + 1)
}

fn usable_v4(n: Ipv4Net, a: Ipv4Addr) -> bool {
    n.contains(&a) && a != n.network() && a != n.broadcast()
}

fn host6(p: Ipv6Net, low: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(p.network()) | low)
}

/// The modified EUI-64 interface identifier of `mac` (RFC 4291 appendix A).
pub fn eui64(mac: [u8; 6]) -> u64 {
    let b = [
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ];
    u64::from_be_bytes(b)
}

/// The SLAAC address of `mac` in the /64 `prefix`.
pub fn slaac(prefix: Ipv6Net, mac: [u8; 6]) -> Ipv6Addr {
    host6(prefix, u128::from(eui64(mac)))
}

/// The link-local address of `mac`.
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    host6(
        "fe80::/64".parse().expect("constant"),
        u128::from(eui64(mac)),
    )
}

/// FNV-1a, 64 bits: a hash that never changes between builds (names and MACs derive from it).
pub fn stable_hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The default MAC of NIC `index` of VM `vm` (salted on a collision): locally administered,
/// unicast, stable for the VM's life.
pub fn default_mac(vm: &str, index: usize, salt: u32) -> [u8; 6] {
    let h = stable_hash(format!("bexar-nic/{vm}/{index}/{salt}").as_bytes()).to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Name of the TAP of NIC `index` of VM `vm` (`bxt` + 8 hex digits + NIC index; 12 bytes).
pub fn tap_name(vm: &str, index: usize, salt: u32) -> String {
    let h = stable_hash(format!("bexar-tap/{vm}/{salt}").as_bytes()) as u32;
    format!("bxt{h:08x}{index:x}")
}

/// Names of a segment's links: its bridge (`bxg…`, which also carries the host's addresses on
/// the segment) and its VLAN interface on the uplink (`bxu…`, bridged segments only).
pub fn segment_links(segment: &str) -> (String, String) {
    let h = stable_hash(format!("bexar-segment/{segment}").as_bytes()) as u32;
    (format!("bxg{h:08x}"), format!("bxu{h:08x}"))
}

/// Name of a segment's VXLAN interface (`bxo…`, segments with an overlay only).
pub fn overlay_link(segment: &str) -> String {
    let h = stable_hash(format!("bexar-segment/{segment}").as_bytes()) as u32;
    format!("bxo{h:08x}")
}

/// The fixed MAC of a segment's bridge (the same on every host: derived from the id alone, so
/// a segment that spans hosts has one gateway MAC everywhere and a guest that moves keeps its
/// next hop).
pub fn segment_mac(segment: &str) -> [u8; 6] {
    let h = stable_hash(format!("bexar-segment-mac/{segment}").as_bytes()).to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// A NIC as the agent resolved it at create time: everything the host needs to wire it,
/// persisted with the VM so that allocations survive restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicState {
    /// Segment (absent for a NIC on a caller-managed TAP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    /// The TAP (created by the agent for a segment NIC).
    pub tap: String,
    /// MAC address.
    pub mac: String,
    /// IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// Rate limit on frames to the guest now (the spec's, or as changed since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limit: Option<RateLimitConfig>,
    /// Rate limit on frames from the guest now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limit: Option<RateLimitConfig>,
}

impl NicState {
    /// The MAC as bytes.
    pub fn mac_bytes(&self) -> [u8; 6] {
        bexar_devices::virtio::net::parse_mac(&self.mac).unwrap_or([0; 6])
    }
}

/// Why a NIC could not be resolved.
#[derive(Debug)]
pub enum NicError {
    /// A field is wrong on its own (unknown segment, address outside the subnet...).
    Invalid(FieldError),
    /// The field clashes with another VM's NIC (duplicate MAC or address), or the segment is
    /// full.
    Conflict(FieldError),
}

/// Resolves the NICs of VM `vm`: defaults MACs, allocates addresses, picks TAP names. `taken`
/// lists the NICs of every other VM on the host; `segment` looks a segment up by id.
pub fn resolve_nics<'a>(
    vm: &str,
    nics: &[NicSpec],
    segment: impl Fn(&str) -> Option<&'a SegmentSpec>,
    taken: &[NicState],
) -> Result<Vec<NicState>, NicError> {
    let mut out: Vec<NicState> = Vec::new();
    for (i, n) in nics.iter().enumerate() {
        let field = |f: &str| format!("nics[{i}].{f}");
        let in_use = |pred: &dyn Fn(&NicState) -> bool| taken.iter().chain(&out).any(pred);
        let given_mac = n
            .mac
            .as_deref()
            .and_then(bexar_devices::virtio::net::parse_mac);
        let Some(seg_id) = &n.segment else {
            // A caller-managed TAP: only the MAC is ours to check.
            let tap = n.tap.clone().unwrap_or_default();
            let mac = given_mac.unwrap_or_else(|| bexar_devices::virtio::net::derived_mac(&tap));
            let m = format_mac(mac);
            if in_use(&|s| s.mac == m) {
                return Err(NicError::Conflict(FieldError::new(
                    field("mac"),
                    format!("MAC {m} is already used on this host"),
                )));
            }
            out.push(NicState {
                segment: None,
                tap,
                mac: m,
                ipv4: None,
                ipv6: None,
                rx_rate_limit: n.rx_rate_limit,
                tx_rate_limit: n.tx_rate_limit,
            });
            continue;
        };
        let seg = segment(seg_id).ok_or_else(|| {
            NicError::Invalid(FieldError::new(
                field("segment"),
                format!("no segment {seg_id:?} on this host"),
            ))
        })?;
        let mac = match given_mac {
            Some(m) => {
                let s = format_mac(m);
                if in_use(&|x| x.mac == s) {
                    return Err(NicError::Conflict(FieldError::new(
                        field("mac"),
                        format!("MAC {s} is already used on this host"),
                    )));
                }
                m
            }
            None => (0..64)
                .map(|salt| default_mac(vm, i, salt))
                .find(|m| {
                    let s = format_mac(*m);
                    !in_use(&|x| x.mac == s)
                })
                .ok_or_else(|| NicError::Conflict(FieldError::new(field("mac"), "no free MAC")))?,
        };
        let ipv4 = match (&seg.ipv4, n.ipv4) {
            (None, Some(a)) => {
                return Err(NicError::Invalid(FieldError::new(
                    field("ipv4"),
                    format!("{a}: segment {seg_id:?} has no IPv4 subnet"),
                )))
            }
            (None, None) => None,
            (Some(v4), Some(a)) => {
                if !usable_v4(v4.subnet, a) || Some(a) == v4.gateway {
                    return Err(NicError::Invalid(FieldError::new(
                        field("ipv4"),
                        format!(
                            "{a} is not a free host address of {} (network, broadcast and gateway are reserved)",
                            v4.subnet
                        ),
                    )));
                }
                if in_use(&|x| x.segment.as_ref() == Some(seg_id) && x.ipv4 == Some(a)) {
                    return Err(NicError::Conflict(FieldError::new(
                        field("ipv4"),
                        format!("{a} is already used on segment {seg_id:?}"),
                    )));
                }
                Some(a)
            }
            (Some(v4), None) => {
                let n = v4.subnet;
                let first = u32::from(n.network()) + 1;
                let last = u32::from(n.broadcast());
                let a = (first..last).map(Ipv4Addr::from).find(|a| {
                    Some(*a) != v4.gateway
                        && !in_use(&|x| x.segment.as_ref() == Some(seg_id) && x.ipv4 == Some(*a))
                });
                Some(a.ok_or_else(|| {
                    NicError::Conflict(FieldError::new(
                        field("ipv4"),
                        format!("segment {seg_id:?} has no free IPv4 address in {n}"),
                    ))
                })?)
            }
        };
        let ipv6 = match (&seg.ipv6, n.ipv6) {
            (None, Some(a)) => {
                return Err(NicError::Invalid(FieldError::new(
                    field("ipv6"),
                    format!("{a}: segment {seg_id:?} has no IPv6 prefix"),
                )))
            }
            (None, None) => None,
            (Some(v6), a) => {
                let a = a.unwrap_or_else(|| slaac(v6.prefix, mac));
                if !v6.prefix.contains(&a) || a == v6.prefix.network() || Some(a) == v6.gateway {
                    return Err(NicError::Invalid(FieldError::new(
                        field("ipv6"),
                        format!("{a} is not a free host address of {}", v6.prefix),
                    )));
                }
                if in_use(&|x| x.segment.as_ref() == Some(seg_id) && x.ipv6 == Some(a)) {
                    return Err(NicError::Conflict(FieldError::new(
                        field("ipv6"),
                        format!("{a} is already used on segment {seg_id:?}"),
                    )));
                }
                Some(a)
            }
        };
        let tap = (0..64)
            .map(|salt| tap_name(vm, i, salt))
            .find(|t| !in_use(&|x| &x.tap == t))
            .ok_or_else(|| {
                NicError::Conflict(FieldError::new(field("segment"), "no free TAP name"))
            })?;
        out.push(NicState {
            segment: Some(seg_id.clone()),
            tap,
            mac: format_mac(mac),
            ipv4,
            ipv6,
            rx_rate_limit: n.rx_rate_limit,
            tx_rate_limit: n.tx_rate_limit,
        });
    }
    Ok(out)
}

/// The Linux `ip=` parameter that configures the first IPv4 NIC of a VM, for guests without
/// DHCP: `ip=ADDR::GW:MASK:HOSTNAME:ethN:off`.
pub fn kernel_ip_param<'a>(
    nics: &[NicState],
    segment: impl Fn(&str) -> Option<&'a SegmentSpec>,
    hostname: &str,
) -> Option<String> {
    nics.iter().enumerate().find_map(|(i, n)| {
        let addr = n.ipv4?;
        let v4 = segment(n.segment.as_deref()?)?.ipv4.as_ref()?;
        let gw = v4.gateway.map(|g| g.to_string()).unwrap_or_default();
        Some(format!(
            "ip={addr}::{gw}:{}:{hostname}:eth{i}:off",
            v4.subnet.netmask()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(id: &str, vlan: u16, v4: &str, v6: &str) -> SegmentSpec {
        let mut s = SegmentSpec {
            id: id.into(),
            vlan,
            mode: SegmentMode::Routed,
            ipv4: Some(Ipv4Spec {
                subnet: v4.parse().unwrap(),
                gateway: None,
            }),
            ipv6: Some(Ipv6Spec {
                prefix: v6.parse().unwrap(),
                gateway: None,
            }),
            overlay: None,
        };
        s.validate().unwrap();
        s
    }

    fn nic(segment: &str) -> NicSpec {
        NicSpec {
            segment: Some(segment.into()),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_the_field_and_fills_gateways() {
        let s = seg("a", 10, "10.1.0.0/24", "2001:db8:1::/64");
        assert_eq!(
            s.ipv4.as_ref().unwrap().gateway,
            Some("10.1.0.1".parse().unwrap())
        );
        assert_eq!(
            s.ipv6.as_ref().unwrap().gateway,
            Some("2001:db8:1::1".parse().unwrap())
        );
        let bad = |f: &dyn Fn(&mut SegmentSpec)| {
            let mut s = seg("a", 10, "10.1.0.0/24", "2001:db8:1::/64");
            f(&mut s);
            s.validate().unwrap_err().field
        };
        assert_eq!(bad(&|s| s.vlan = 0), "vlan");
        assert_eq!(bad(&|s| s.vlan = 4095), "vlan");
        assert_eq!(bad(&|s| s.id = "A B".into()), "id");
        assert_eq!(
            bad(&|s| s.ipv4.as_mut().unwrap().subnet = "10.1.0.5/24".parse().unwrap()),
            "ipv4.subnet"
        );
        assert_eq!(
            bad(&|s| s.ipv4.as_mut().unwrap().subnet = "169.254.0.0/24".parse().unwrap()),
            "ipv4.subnet"
        );
        assert_eq!(
            bad(&|s| s.ipv4.as_mut().unwrap().gateway = Some("10.2.0.1".parse().unwrap())),
            "ipv4.gateway"
        );
        assert_eq!(
            bad(&|s| s.ipv6.as_mut().unwrap().prefix = "2001:db8::/48".parse().unwrap()),
            "ipv6.prefix"
        );
    }

    #[test]
    fn overlaps_and_duplicate_vlans_are_refused() {
        let a = seg("a", 10, "10.1.0.0/24", "2001:db8:1::/64");
        let b = seg("b", 10, "10.2.0.0/24", "2001:db8:2::/64");
        assert_eq!(b.check_against([&a]).unwrap_err().field, "vlan");
        let c = seg("c", 11, "10.1.0.128/25", "2001:db8:3::/64");
        let e = c.check_against([&a]).unwrap_err();
        assert_eq!(e.field, "ipv4.subnet");
        assert!(e.message.contains("\"a\""), "{}", e.message);
        let d = seg("d", 12, "10.0.0.0/8", "2001:db8:4::/64");
        assert_eq!(d.check_against([&a]).unwrap_err().field, "ipv4.subnet");
        let e6 = seg("e", 13, "10.3.0.0/24", "2001:db8:1::/64");
        assert_eq!(e6.check_against([&a]).unwrap_err().field, "ipv6.prefix");
        assert!(seg("f", 14, "10.4.0.0/24", "2001:db8:5::/64")
            .check_against([&a])
            .is_ok());
    }

    #[test]
    fn nics_get_stable_macs_and_free_addresses() {
        let a = seg("a", 10, "10.1.0.0/29", "2001:db8:1::/64");
        let find = |id: &str| (id == "a").then_some(&a);
        let one = resolve_nics("vm1", &[nic("a")], find, &[]).unwrap();
        let again = resolve_nics("vm1", &[nic("a")], find, &[]).unwrap();
        assert_eq!(one, again, "derivation is stable");
        assert_eq!(one[0].ipv4, Some("10.1.0.2".parse().unwrap()));
        let mac = one[0].mac_bytes();
        assert_eq!(mac[0] & 3, 2, "locally administered unicast");
        assert_eq!(
            one[0].ipv6,
            Some(slaac(a.ipv6.as_ref().unwrap().prefix, mac))
        );
        assert_eq!(one[0].tap.len(), 12);
        // The next VM gets the next address; the subnet holds .2-.6 (gateway .1).
        let mut taken = one.clone();
        for want in 3..=6 {
            let n = resolve_nics(&format!("vm{want}"), &[nic("a")], find, &taken).unwrap();
            assert_eq!(n[0].ipv4, Some(Ipv4Addr::new(10, 1, 0, want)));
            taken.extend(n);
        }
        match resolve_nics("full", &[nic("a")], find, &taken) {
            Err(NicError::Conflict(f)) => assert_eq!(f.field, "nics[0].ipv4"),
            other => panic!("{other:?}"),
        }
        // Duplicates and bad values name the field.
        let dup_mac = NicSpec {
            mac: Some(one[0].mac.clone()),
            ..nic("a")
        };
        match resolve_nics("x", &[dup_mac], find, &one) {
            Err(NicError::Conflict(f)) => assert_eq!(f.field, "nics[0].mac"),
            other => panic!("{other:?}"),
        }
        let dup_ip = NicSpec {
            ipv4: Some("10.1.0.2".parse().unwrap()),
            ..nic("a")
        };
        assert!(matches!(
            resolve_nics("x", &[dup_ip], find, &one),
            Err(NicError::Conflict(_))
        ));
        let outside = NicSpec {
            ipv4: Some("10.9.0.2".parse().unwrap()),
            ..nic("a")
        };
        assert!(matches!(
            resolve_nics("x", &[outside], find, &[]),
            Err(NicError::Invalid(_))
        ));
        match resolve_nics("x", &[nic("nope")], find, &[]) {
            Err(NicError::Invalid(f)) => assert_eq!(f.field, "nics[0].segment"),
            other => panic!("{other:?}"),
        }
        let p = kernel_ip_param(&one, find, "vm1").unwrap();
        assert_eq!(p, "ip=10.1.0.2::10.1.0.1:255.255.255.248:vm1:eth0:off");
    }

    #[test]
    fn eui64_matches_rfc4291() {
        let mac = [0x00, 0x1b, 0x21, 0x3c, 0x4d, 0x5e];
        assert_eq!(eui64(mac), 0x021b_21ff_fe3c_4d5e);
        assert_eq!(
            link_local(mac),
            "fe80::21b:21ff:fe3c:4d5e".parse::<Ipv6Addr>().unwrap()
        );
    }
}
