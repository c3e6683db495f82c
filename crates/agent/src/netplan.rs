//! The network reconciler's pure half: from the records to what the host should have
//! ([`plan`]), from that and what the kernel has to the link changes ([`link_ops`]), and the
//! filter for the links as they are ([`ruleset`]). No I/O here: `network.rs` observes the
//! kernel, asks these, and applies the answers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::segment::{
    link_local, overlay_link, segment_links, segment_mac, stable_hash, NicState, SegmentMode,
    SegmentSpec,
};
use bexar_hostnet::netlink::Link;
use bexar_hostnet::nft::{NicRule, Ruleset, SegmentRule, MARK_BASE};
use bexar_hostnet::{GATEWAY_PREFIX, IMDS_ADDR, OVERLAY_PREFIX, TAP_PREFIX, UPLINK_PREFIX};

/// Alias prefix of every link the agent owns.
pub const ALIAS_PREFIX: &str = "bexar:";

/// A segment's 802.1Q interface on the uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkPlan {
    /// Its name (`bxu…`).
    pub name: String,
    /// Its alias.
    pub alias: String,
    /// The VLAN id it tags with.
    pub vlan: u16,
    /// The interface it sits on.
    pub on: String,
}

/// Where segments with an overlay reach the other hosts (the agent's `--overlay-*` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    /// This host's address on the underlay network: VXLAN packets are sent from it.
    pub local: Ipv4Addr,
    /// The other hosts' underlay addresses.
    pub peers: Vec<Ipv4Addr>,
    /// The UDP port (4789, IANA's for VXLAN, unless told).
    pub port: u16,
}

/// A segment's VXLAN interface, a port of its bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayPlan {
    /// Its name (`bxo…`).
    pub name: String,
    /// Its alias; it names the underlay settings, so a change of peers or port remakes it.
    pub alias: String,
    /// The VXLAN network identifier: the segment's VLAN id.
    pub vni: u32,
    /// The underlay.
    pub config: OverlayConfig,
}

/// A segment's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgePlan {
    /// The segment.
    pub segment: String,
    /// Its name (`bxg…`).
    pub name: String,
    /// Its alias.
    pub alias: String,
    /// Its fixed MAC.
    pub mac: [u8; 6],
    /// Whether the host has IPv6 on it (a routed IPv6 segment only).
    pub ipv6: bool,
    /// The host's addresses on it: the metadata service's, and the gateways of a routed
    /// segment.
    pub addresses: Vec<IpNet>,
    /// On a bridged IPv4 segment: the route to its subnet through the bridge, from the
    /// metadata address, so metadata replies find the guests.
    pub metadata_route: Option<Ipv4Net>,
    /// Where a bridged segment leaves the host (with `--uplink`).
    pub uplink: Option<UplinkPlan>,
    /// The tunnel of a segment that spans hosts.
    pub overlay: Option<OverlayPlan>,
}

/// A NIC's TAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapPlan {
    /// The VM.
    pub vm: String,
    /// The NIC's index in the VM's spec.
    pub index: usize,
    /// The NIC as resolved.
    pub nic: NicState,
    /// The bridge it is a port of.
    pub bridge: String,
}

/// A router advertisement sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaPlan {
    /// The segment.
    pub segment: String,
    /// Its bridge.
    pub bridge: String,
    /// The prefix it announces.
    pub prefix: Ipv6Net,
}

/// A DHCPv4 server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpPlan {
    /// The segment.
    pub segment: String,
    /// Its bridge.
    pub bridge: String,
    /// The server identifier it answers with.
    pub server_id: Ipv4Addr,
}

/// What the host should have for the segments and NICs in the records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPlan {
    /// One bridge per segment.
    pub bridges: Vec<BridgePlan>,
    /// One TAP per NIC on a segment.
    pub taps: Vec<TapPlan>,
    /// NICs on segments that do not exist (reported, not wired).
    pub orphans: Vec<(String, usize, String)>,
    /// Forward IPv4 (a routed IPv4 segment exists).
    pub forward_v4: bool,
    /// Forward IPv6 (a routed IPv6 segment exists).
    pub forward_v6: bool,
    /// Router advertisements, per routed IPv6 segment.
    pub ra: Vec<RaPlan>,
    /// DHCP, per segment with IPv4.
    pub dhcp: Vec<DhcpPlan>,
}

impl NetPlan {
    /// Nothing to have: no segment, no NIC.
    pub fn is_empty(&self) -> bool {
        self.bridges.is_empty() && self.taps.is_empty() && self.orphans.is_empty()
    }

    /// The names of every link the plan wants.
    pub fn wanted(&self) -> BTreeSet<&str> {
        let mut w: BTreeSet<&str> = BTreeSet::new();
        for b in &self.bridges {
            w.insert(&b.name);
            if let Some(u) = &b.uplink {
                w.insert(&u.name);
            }
            if let Some(o) = &b.overlay {
                w.insert(&o.name);
            }
        }
        for t in &self.taps {
            w.insert(&t.nic.tap);
        }
        for (_, _, tap) in &self.orphans {
            w.insert(tap);
        }
        w
    }
}

/// What the host should have: computed from the segments and the segment NICs of the VMs
/// (`(vm, index, nic)`), and the uplink bridged segments leave through.
pub fn plan(
    segments: &BTreeMap<String, SegmentSpec>,
    nics: &[(String, usize, NicState)],
    uplink: Option<&str>,
    overlay: Option<&OverlayConfig>,
) -> NetPlan {
    let mut p = NetPlan::default();
    for s in segments.values() {
        let (bridge, vlan_link) = segment_links(&s.id);
        let (v4, v6) = s.host_addresses();
        let mut addresses = vec![IpNet::V4(Ipv4Net::from(IMDS_ADDR))];
        addresses.extend(v4.map(IpNet::V4));
        addresses.extend(v6.map(IpNet::V6));
        let bridged = s.mode == SegmentMode::Bridged;
        let routed6 = s.mode == SegmentMode::Routed && s.ipv6.is_some();
        p.bridges.push(BridgePlan {
            segment: s.id.clone(),
            name: bridge.clone(),
            alias: format!("{ALIAS_PREFIX}segment {}", s.id),
            mac: segment_mac(&s.id),
            ipv6: routed6,
            addresses,
            metadata_route: s.ipv4.as_ref().filter(|_| bridged).map(|v| v.subnet),
            uplink: uplink.filter(|_| bridged).map(|u| UplinkPlan {
                name: vlan_link,
                alias: format!("{ALIAS_PREFIX}uplink {}", s.id),
                vlan: s.vlan,
                on: u.to_owned(),
            }),
            overlay: overlay
                .filter(|_| s.overlay.is_some())
                .map(|o| OverlayPlan {
                    name: overlay_link(&s.id),
                    // A hash of the underlay settings, not the settings: an alias has at most
                    // 255 bytes, and a list of peers can be longer.
                    alias: format!(
                        "{ALIAS_PREFIX}overlay {} vni {} underlay {:016x}",
                        s.id,
                        s.vlan,
                        stable_hash(
                            format!(
                                "{}:{} {}",
                                o.local,
                                o.port,
                                o.peers
                                    .iter()
                                    .map(|p| p.to_string())
                                    .collect::<Vec<_>>()
                                    .join(",")
                            )
                            .as_bytes()
                        )
                    ),
                    vni: u32::from(s.vlan),
                    config: o.clone(),
                }),
        });
        p.forward_v4 |= s.mode == SegmentMode::Routed && s.ipv4.is_some();
        p.forward_v6 |= routed6;
        if let (Some(v6), true) = (&s.ipv6, routed6) {
            p.ra.push(RaPlan {
                segment: s.id.clone(),
                bridge: bridge.clone(),
                prefix: v6.prefix,
            });
        }
        if s.ipv4.is_some() {
            p.dhcp.push(DhcpPlan {
                segment: s.id.clone(),
                bridge,
                server_id: v4.map_or(IMDS_ADDR, |a| a.addr()),
            });
        }
    }
    for (vm, index, nic) in nics {
        let Some(seg) = nic.segment.as_deref() else {
            continue;
        };
        if segments.contains_key(seg) {
            p.taps.push(TapPlan {
                vm: vm.clone(),
                index: *index,
                nic: nic.clone(),
                bridge: segment_links(seg).0,
            });
        } else {
            p.orphans.push((vm.clone(), *index, nic.tap.clone()));
        }
    }
    p
}

/// The alias of a NIC's TAP.
pub fn tap_alias(vm: &str, index: usize) -> String {
    format!("{ALIAS_PREFIX}nic {vm} {index}")
}

/// Whether the agent made `l`: a bexar name and a `bexar:` alias. Links without both are
/// never touched.
pub fn is_ours(l: &Link) -> bool {
    has_our_name(&l.name) && has_our_alias(l.alias.as_deref())
}

/// Whether a link's name carries one of the agent's prefixes.
pub fn has_our_name(name: &str) -> bool {
    [TAP_PREFIX, GATEWAY_PREFIX, UPLINK_PREFIX, OVERLAY_PREFIX]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Whether a link's ifalias is one the agent wrote.
pub fn has_our_alias(alias: Option<&str>) -> bool {
    alias.is_some_and(|a| a.starts_with(ALIAS_PREFIX))
}

/// A change to the host's links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOp {
    /// Make a segment's bridge.
    AddBridge {
        /// Name.
        name: String,
        /// Alias.
        alias: String,
        /// MAC.
        mac: [u8; 6],
    },
    /// Make a segment's VLAN interface on the uplink.
    AddVlan {
        /// Name.
        name: String,
        /// The uplink.
        on: String,
        /// The VLAN id.
        vlan: u16,
    },
    /// Make (or remake) a segment's VXLAN interface.
    AddVxlan {
        /// Name.
        name: String,
        /// The VXLAN network identifier.
        vni: u32,
        /// The underlay.
        config: OverlayConfig,
    },
    /// Remove a link the agent made that nothing wants any more, or (when the plan still
    /// wants it) one about to be made again.
    Delete {
        /// Its index.
        index: u32,
        /// Its name.
        name: String,
    },
}

/// The link changes that take `observed` to `plan`: bridges and VLAN interfaces to make
/// (TAPs are made with their NIC), links of ours to remove. Settings of existing links are
/// applied every time (they are idempotent), so they are not part of the difference.
pub fn link_ops(plan: &NetPlan, observed: &[Link]) -> Vec<LinkOp> {
    let have: BTreeSet<&str> = observed.iter().map(|l| l.name.as_str()).collect();
    let mut ops = Vec::new();
    for b in &plan.bridges {
        if !have.contains(b.name.as_str()) {
            ops.push(LinkOp::AddBridge {
                name: b.name.clone(),
                alias: b.alias.clone(),
                mac: b.mac,
            });
        }
        if let Some(u) = &b.uplink {
            if !have.contains(u.name.as_str()) {
                ops.push(LinkOp::AddVlan {
                    name: u.name.clone(),
                    on: u.on.clone(),
                    vlan: u.vlan,
                });
            }
        }
        if let Some(o) = &b.overlay {
            // A VXLAN interface made with other underlay settings (its alias says which) is
            // remade: the kernel does not change a VXLAN interface's local address or port.
            let stale = observed
                .iter()
                .find(|l| l.name == o.name && l.alias.as_deref() != Some(o.alias.as_str()));
            if let Some(l) = stale {
                ops.push(LinkOp::Delete {
                    index: l.index,
                    name: l.name.clone(),
                });
            }
            if !have.contains(o.name.as_str()) || stale.is_some() {
                ops.push(LinkOp::AddVxlan {
                    name: o.name.clone(),
                    vni: o.vni,
                    config: o.config.clone(),
                });
            }
        }
    }
    let wanted = plan.wanted();
    for l in observed {
        if is_ours(l) && !wanted.contains(l.name.as_str()) {
            ops.push(LinkOp::Delete {
                index: l.index,
                name: l.name.clone(),
            });
        }
    }
    ops
}

/// The filter of a NIC whose TAP has interface index `ifindex`.
pub fn nic_rule(n: &NicState, ifindex: u32) -> NicRule {
    let mut ipv6: Vec<_> = n.ipv6.into_iter().collect();
    if !ipv6.is_empty() {
        ipv6.push(link_local(n.mac_bytes()));
    }
    NicRule {
        tap: n.tap.clone(),
        mac: n.mac.clone(),
        ipv4: n.ipv4,
        ipv6,
        mark: MARK_BASE | ifindex,
    }
}

/// The whole ruleset for the plan, with the TAPs' interface indexes as they are now, and the
/// metadata marks it hands out (mark -> VM, NIC index). TAPs without an index (not made) get
/// no rule, and so no traffic.
pub fn ruleset(
    plan: &NetPlan,
    segments: &BTreeMap<String, SegmentSpec>,
    ifindex: &HashMap<String, u32>,
) -> (Ruleset, HashMap<u32, (String, usize)>) {
    let mut rules = Ruleset::default();
    let mut marks = HashMap::new();
    for t in &plan.taps {
        let Some(index) = ifindex.get(&t.nic.tap) else {
            continue;
        };
        let rule = nic_rule(&t.nic, *index);
        marks.insert(rule.mark, (t.vm.clone(), t.index));
        rules.nics.push(rule);
    }
    for s in segments.values() {
        rules.segments.push(SegmentRule {
            port: segment_links(&s.id).0,
            routed: s.mode == SegmentMode::Routed,
            ipv4: s.ipv4.as_ref().map(|v| v.subnet),
            ipv6: s.ipv6.as_ref().map(|v| v.prefix),
        });
    }
    (rules, marks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(json: serde_json::Value) -> SegmentSpec {
        let mut s: SegmentSpec = serde_json::from_value(json).unwrap();
        s.validate().unwrap();
        s
    }

    fn fixture() -> BTreeMap<String, SegmentSpec> {
        let web = segment(serde_json::json!({
            "id": "web", "vlan": 10, "mode": "routed",
            "ipv4": {"subnet": "10.10.0.0/24"}, "ipv6": {"prefix": "2001:db8:10::/64"}
        }));
        let lab = segment(serde_json::json!({
            "id": "lab", "vlan": 20, "mode": "bridged", "ipv4": {"subnet": "10.20.0.0/24"}
        }));
        [(web.id.clone(), web), (lab.id.clone(), lab)]
            .into_iter()
            .collect()
    }

    fn nic(segment: &str, tap: &str, ipv4: &str) -> NicState {
        serde_json::from_value(serde_json::json!({
            "segment": segment, "mac": "02:00:00:00:00:01", "tap": tap, "ipv4": ipv4
        }))
        .unwrap()
    }

    fn link(index: u32, name: &str, alias: Option<&str>) -> Link {
        Link {
            index,
            name: name.into(),
            alias: alias.map(str::to_owned),
            controller: None,
            up: true,
            kind: None,
            mac: None,
        }
    }

    #[test]
    fn the_plan_follows_the_records() {
        let segs = fixture();
        let nics = vec![
            ("vm1".to_owned(), 0, nic("web", "bxt0001", "10.10.0.2")),
            ("vm2".to_owned(), 1, nic("gone", "bxt0002", "10.99.0.2")),
        ];
        let p = plan(&segs, &nics, Some("eth9"), None);
        assert_eq!(p.bridges.len(), 2);
        let lab = p.bridges.iter().find(|b| b.segment == "lab").unwrap();
        let web = p.bridges.iter().find(|b| b.segment == "web").unwrap();
        // Routed: gateways on the bridge, IPv6 on, no uplink, no metadata route.
        assert_eq!(
            web.addresses,
            vec![
                "169.254.169.254/32".parse().unwrap(),
                "10.10.0.1/24".parse().unwrap(),
                "2001:db8:10::1/64".parse().unwrap()
            ]
        );
        assert!(web.ipv6 && web.uplink.is_none() && web.metadata_route.is_none());
        // Bridged: only the metadata address, a route to its subnet, tagged on the uplink.
        assert_eq!(lab.addresses, vec!["169.254.169.254/32".parse().unwrap()]);
        assert_eq!(lab.metadata_route, Some("10.20.0.0/24".parse().unwrap()));
        let up = lab.uplink.as_ref().unwrap();
        assert_eq!((up.vlan, up.on.as_str()), (20, "eth9"));
        assert!(!lab.ipv6);
        // Forwarding, RA and DHCP where they belong.
        assert!(p.forward_v4 && p.forward_v6);
        assert_eq!(p.ra.len(), 1);
        assert_eq!(p.ra[0].segment, "web");
        assert_eq!(p.dhcp.len(), 2);
        let lab_dhcp = p.dhcp.iter().find(|d| d.segment == "lab").unwrap();
        assert_eq!(
            lab_dhcp.server_id, IMDS_ADDR,
            "no gateway of ours on a bridged segment"
        );
        // A NIC on a segment that no longer exists keeps its TAP but is not wired.
        assert_eq!(p.taps.len(), 1);
        assert_eq!(p.taps[0].bridge, web.name);
        assert_eq!(p.orphans, vec![("vm2".to_owned(), 1, "bxt0002".to_owned())]);
        assert!(p.wanted().contains("bxt0002"));
        // Without segments or NICs the plan is empty.
        assert!(plan(&BTreeMap::new(), &[], None, None).is_empty());
    }

    #[test]
    fn link_changes_touch_only_what_differs_and_only_what_is_ours() {
        let segs = fixture();
        let nics = vec![("vm1".to_owned(), 0, nic("web", "bxt0001", "10.10.0.2"))];
        let p = plan(&segs, &nics, Some("eth9"), None);
        let web = p
            .bridges
            .iter()
            .find(|b| b.segment == "web")
            .unwrap()
            .clone();
        let lab = p
            .bridges
            .iter()
            .find(|b| b.segment == "lab")
            .unwrap()
            .clone();
        let observed = vec![
            link(1, "eth9", None),
            link(2, &web.name, Some(&web.alias)),
            link(3, "bxt0001", Some("bexar:nic vm1 0")),
            // Left by a crash mid-create: ours, wanted by nothing.
            link(4, "bxt00ff", Some("bexar:nic vm9 0")),
            // Someone else's, even with our prefix: never touched.
            link(5, "bxtmine", None),
            link(6, "bxg-other", Some("their alias")),
        ];
        let ops = link_ops(&p, &observed);
        assert_eq!(
            ops,
            vec![
                LinkOp::AddBridge {
                    name: lab.name.clone(),
                    alias: lab.alias.clone(),
                    mac: lab.mac
                },
                LinkOp::AddVlan {
                    name: lab.uplink.as_ref().unwrap().name.clone(),
                    on: "eth9".into(),
                    vlan: 20
                },
                LinkOp::Delete {
                    index: 4,
                    name: "bxt00ff".into()
                },
            ]
        );
        // Once everything exists, nothing changes.
        let mut all = observed[..3].to_vec();
        all.push(link(7, &lab.name, Some(&lab.alias)));
        all.push(link(
            8,
            &lab.uplink.as_ref().unwrap().name,
            Some("bexar:uplink lab"),
        ));
        assert!(link_ops(&p, &all).is_empty());
    }

    #[test]
    fn the_ruleset_marks_each_tap_by_its_index() {
        let segs = fixture();
        let nics = vec![
            ("vm1".to_owned(), 0, nic("web", "bxt0001", "10.10.0.2")),
            ("vm1".to_owned(), 1, nic("lab", "bxt0002", "10.20.0.7")),
        ];
        let p = plan(&segs, &nics, None, None);
        let idx: HashMap<String, u32> = [("bxt0001".to_owned(), 41)].into_iter().collect();
        let (rules, marks) = ruleset(&p, &segs, &idx);
        assert_eq!(rules.nics.len(), 1, "a TAP not made yet gets no rule");
        assert_eq!(rules.nics[0].mark, MARK_BASE | 41);
        assert_eq!(marks[&(MARK_BASE | 41)], ("vm1".to_owned(), 0));
        assert_eq!(rules.segments.len(), 2);
        assert!(rules.segments.iter().any(|s| s.routed));
    }

    #[test]
    fn a_segment_with_an_overlay_gets_a_vxlan_port_remade_when_the_underlay_changes() {
        let mut segs = fixture();
        segs.get_mut("web").unwrap().overlay = Some(super::super::segment::Overlay::Vxlan);
        let config = OverlayConfig {
            local: "10.99.0.1".parse().unwrap(),
            peers: vec!["10.99.0.2".parse().unwrap(), "10.99.0.3".parse().unwrap()],
            port: 4789,
        };
        // No overlay configured: no VXLAN port (the API refuses such a segment anyway).
        assert!(plan(&segs, &[], None, None)
            .bridges
            .iter()
            .all(|b| b.overlay.is_none()));
        let p = plan(&segs, &[], None, Some(&config));
        let web = p.bridges.iter().find(|b| b.segment == "web").unwrap();
        let o = web.overlay.as_ref().unwrap();
        assert_eq!(o.vni, 10);
        assert!(o.name.starts_with("bxo"), "{}", o.name);
        assert!(
            o.alias.starts_with("bexar:overlay web vni 10 underlay "),
            "{}",
            o.alias
        );
        assert!(o.alias.len() < 256);
        // Another peer list is another alias.
        let mut more = config.clone();
        more.peers.push("10.99.0.4".parse().unwrap());
        let p2 = plan(&segs, &[], None, Some(&more));
        let o2 = p2.bridges.iter().find_map(|b| b.overlay.as_ref()).unwrap();
        assert_ne!(o2.alias, o.alias);
        assert!(p
            .bridges
            .iter()
            .find(|b| b.segment == "lab")
            .unwrap()
            .overlay
            .is_none());
        assert!(p.wanted().contains(o.name.as_str()));
        // Absent: made. Present as wanted: left alone. Present with other peers: remade.
        let bridges: Vec<Link> = p
            .bridges
            .iter()
            .map(|b| link(1, &b.name, Some(&b.alias)))
            .collect();
        let ops = link_ops(&p, &bridges);
        assert_eq!(
            ops,
            vec![LinkOp::AddVxlan {
                name: o.name.clone(),
                vni: 10,
                config: config.clone()
            }]
        );
        let mut have = bridges.clone();
        have.push(link(7, &o.name, Some(&o.alias)));
        assert!(link_ops(&p, &have).is_empty());
        have.pop();
        have.push(link(
            7,
            &o.name,
            Some("bexar:overlay web vni 10 underlay 0123456789abcdef"),
        ));
        assert_eq!(
            link_ops(&p, &have),
            vec![
                LinkOp::Delete {
                    index: 7,
                    name: o.name.clone()
                },
                LinkOp::AddVxlan {
                    name: o.name.clone(),
                    vni: 10,
                    config
                }
            ]
        );
        // The segment gone: its VXLAN port goes with it.
        let none = plan(&BTreeMap::new(), &[], None, None);
        let mut have = vec![link(7, &o.name, Some(&o.alias))];
        have[0].alias = Some(o.alias.clone());
        assert_eq!(
            link_ops(&none, &have),
            vec![LinkOp::Delete {
                index: 7,
                name: o.name.clone()
            }]
        );
    }
}
