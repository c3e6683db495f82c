//! The agent's packet filter, as nftables rules in two tables it owns (`bridge bexar` and
//! `inet bexar`), replaced as a whole in one atomic transaction through the nft JSON API
//! (`nft -j -f -`) whenever the desired state changes.
//!
//! - `bridge bexar`: anti-spoofing per TAP, before the bridge forwards or delivers a frame: the
//!   source MAC, IPv4 and IPv6 addresses must be the NIC's; ARP must tell the truth; neighbour
//!   advertisements may only announce the NIC's own addresses; router advertisements,
//!   redirects, DHCP/DHCPv6 server replies, VLAN tags and other EtherTypes are dropped. Frames
//!   to the metadata service get the NIC's mark, which is how the service knows who asks.
//!   A TAP of the agent's without rules is dropped.
//! - `inet bexar`: segments do not route into each other; the host routes only for `routed`
//!   segments (IPv4 out through NAT and replies back in, IPv6 both ways unchanged); guests
//!   reach only the metadata service, ICMP and DHCP on the host itself.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{json, Value};

use super::{GATEWAY_PREFIX, IMDS_ADDR, TAP_PREFIX};

/// Name of both tables.
pub const TABLE: &str = "bexar";
/// Marks set on metadata requests are `MARK_BASE | ifindex` of the TAP they came from.
pub const MARK_BASE: u32 = 0x4000_0000;

/// What failed applying the rules.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// nft could not be run.
    #[error("cannot run nft (install the nftables package): {0}")]
    Spawn(std::io::Error),
    /// nft refused the ruleset.
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
}

/// One NIC's filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicRule {
    /// Its TAP.
    pub tap: String,
    /// Its MAC, `aa:bb:...`.
    pub mac: String,
    /// Its IPv4 address (none: IPv4 and ARP are dropped).
    pub ipv4: Option<Ipv4Addr>,
    /// Its IPv6 addresses including the link-local one (empty: IPv6 is dropped).
    pub ipv6: Vec<Ipv6Addr>,
    /// Mark of its metadata requests.
    pub mark: u32,
}

/// One segment's routing policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRule {
    /// The host end of its gateway port.
    pub port: String,
    /// Whether the host routes for it.
    pub routed: bool,
    /// Its IPv4 subnet.
    pub ipv4: Option<Ipv4Net>,
    /// Its IPv6 prefix.
    pub ipv6: Option<Ipv6Net>,
}

/// The whole desired filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Per NIC.
    pub nics: Vec<NicRule>,
    /// Per segment.
    pub segments: Vec<SegmentRule>,
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn m(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn set(items: Vec<Value>) -> Value {
    json!({"set": items})
}

fn drop() -> Value {
    json!({"drop": null})
}

fn accept() -> Value {
    json!({"accept": null})
}

fn prefix(addr: String, len: u8) -> Value {
    json!({"prefix": {"addr": addr, "len": len}})
}

impl Ruleset {
    fn rule(family: &str, chain: &str, expr: Vec<Value>) -> Value {
        json!({"add": {"rule": {"family": family, "table": TABLE, "chain": chain, "expr": expr}}})
    }

    fn chain(family: &str, name: &str, hook: Option<(&str, &str, i32)>) -> Value {
        let mut c = json!({"family": family, "table": TABLE, "name": name});
        if let Some((kind, hook, prio)) = hook {
            c["type"] = json!(kind);
            c["hook"] = json!(hook);
            c["prio"] = json!(prio);
            c["policy"] = json!("accept");
        }
        json!({"add": {"chain": c}})
    }

    fn table_reset(family: &str) -> [Value; 3] {
        let t = json!({"table": {"family": family, "name": TABLE}});
        [json!({"add": t}), json!({"delete": t}), json!({"add": t})]
    }

    fn nic_rules(n: &NicRule) -> Vec<Vec<Value>> {
        let mut r = vec![
            vec![m("!=", payload("ether", "saddr"), json!(n.mac)), drop()],
            vec![
                m(
                    "==",
                    payload("ether", "type"),
                    set(vec![json!("8021q"), json!("8021ad")]),
                ),
                drop(),
            ],
        ];
        match n.ipv4 {
            Some(ip) => {
                r.push(vec![
                    m("!=", payload("arp", "saddr ether"), json!(n.mac)),
                    drop(),
                ]);
                r.push(vec![
                    m(
                        "!=",
                        payload("arp", "saddr ip"),
                        set(vec![json!(ip.to_string()), json!("0.0.0.0")]),
                    ),
                    drop(),
                ]);
                // A DHCP client has no address yet.
                r.push(vec![
                    m("==", payload("ip", "saddr"), json!("0.0.0.0")),
                    m("==", payload("udp", "dport"), json!(67)),
                    accept(),
                ]);
                r.push(vec![
                    m("!=", payload("ip", "saddr"), json!(ip.to_string())),
                    drop(),
                ]);
                r.push(vec![
                    m("==", payload("ip", "daddr"), json!(IMDS_ADDR.to_string())),
                    m("==", payload("tcp", "dport"), json!(80)),
                    json!({"mangle": {"key": meta("mark"), "value": n.mark}}),
                ]);
            }
            None => r.push(vec![
                m(
                    "==",
                    payload("ether", "type"),
                    set(vec![json!("ip"), json!("arp")]),
                ),
                drop(),
            ]),
        }
        if n.ipv6.is_empty() {
            r.push(vec![
                m("==", payload("ether", "type"), json!("ip6")),
                drop(),
            ]);
        } else {
            let mut src: Vec<Value> = n.ipv6.iter().map(|a| json!(a.to_string())).collect();
            src.push(json!("::"));
            r.push(vec![m("!=", payload("ip6", "saddr"), set(src)), drop()]);
            r.push(vec![
                m(
                    "==",
                    payload("icmpv6", "type"),
                    set(vec![
                        json!("nd-router-advert"),
                        json!("nd-redirect"),
                        json!("router-renumbering"),
                    ]),
                ),
                drop(),
            ]);
            // A neighbour advertisement's target (bits 64-191 of the ICMPv6 message) must be
            // one of the NIC's own addresses.
            let targets = n
                .ipv6
                .iter()
                .map(|a| json!(format!("0x{:032x}", u128::from(*a))))
                .collect();
            r.push(vec![
                m("==", payload("icmpv6", "type"), json!("nd-neighbor-advert")),
                m(
                    "!=",
                    json!({"payload": {"base": "th", "offset": 64, "len": 128}}),
                    set(targets),
                ),
                drop(),
            ]);
        }
        // DHCP and DHCPv6 server replies.
        r.push(vec![
            m(
                "==",
                payload("udp", "sport"),
                set(vec![json!(67), json!(547)]),
            ),
            drop(),
        ]);
        r.push(vec![
            m(
                "!=",
                payload("ether", "type"),
                set(vec![json!("ip"), json!("ip6"), json!("arp")]),
            ),
            drop(),
        ]);
        r.push(vec![accept()]);
        r
    }

    /// The nft JSON document that replaces both tables with this ruleset.
    pub fn to_json(&self) -> Value {
        let mut cmds: Vec<Value> = Vec::new();
        // bridge: anti-spoofing.
        let b = "bridge";
        cmds.extend(Self::table_reset(b));
        cmds.push(json!({"add": {"map": {
            "family": b, "table": TABLE, "name": NIC_MAP, "type": "ifname", "map": "verdict"
        }}}));
        cmds.push(Self::chain(
            b,
            "prerouting",
            Some(("filter", "prerouting", -200)),
        ));
        for n in &self.nics {
            cmds.extend(nic_commands(n));
        }
        cmds.push(Self::rule(
            b,
            "prerouting",
            vec![json!({"vmap": {"key": meta("iifname"), "data": format!("@{NIC_MAP}")}})],
        ));
        cmds.push(Self::rule(
            b,
            "prerouting",
            vec![
                m("==", meta("iifname"), json!(format!("{TAP_PREFIX}*"))),
                drop(),
            ],
        ));

        // inet: routing policy, NAT, the host's own services.
        let i = "inet";
        let gw_any = json!(format!("{GATEWAY_PREFIX}*"));
        cmds.extend(Self::table_reset(i));
        cmds.push(Self::chain(i, "forward", Some(("filter", "forward", 0))));
        cmds.push(Self::chain(
            i,
            "postrouting",
            Some(("nat", "postrouting", 100)),
        ));
        cmds.push(Self::chain(i, "input", Some(("filter", "input", 0))));
        // Within a segment. Bridged frames pass these hooks too when br_netfilter is present
        // with bridge-nf-call-iptables on (built into some kernels, loaded by Docker...).
        for s in &self.segments {
            let p = json!(s.port);
            cmds.push(Self::rule(
                i,
                "forward",
                vec![
                    m("==", meta("iifname"), p.clone()),
                    m("==", meta("oifname"), p.clone()),
                    accept(),
                ],
            ));
        }
        cmds.push(Self::rule(
            i,
            "forward",
            vec![
                m("==", meta("iifname"), gw_any.clone()),
                m("==", meta("oifname"), gw_any.clone()),
                drop(),
            ],
        ));
        for s in &self.segments {
            let p = json!(s.port);
            let from = m("==", meta("iifname"), p.clone());
            let to = m("==", meta("oifname"), p.clone());
            if s.routed {
                if let Some(n) = s.ipv4 {
                    let sub = prefix(n.network().to_string(), n.prefix_len());
                    cmds.push(Self::rule(
                        i,
                        "forward",
                        vec![
                            from.clone(),
                            m("==", payload("ip", "saddr"), sub.clone()),
                            accept(),
                        ],
                    ));
                    cmds.push(Self::rule(
                        i,
                        "postrouting",
                        vec![
                            m("==", payload("ip", "saddr"), sub),
                            m("!=", meta("oifname"), gw_any.clone()),
                            json!({"masquerade": null}),
                        ],
                    ));
                }
                if let Some(n) = s.ipv6 {
                    let sub = prefix(n.network().to_string(), n.prefix_len());
                    cmds.push(Self::rule(
                        i,
                        "forward",
                        vec![
                            from.clone(),
                            m("==", payload("ip6", "saddr"), sub.clone()),
                            accept(),
                        ],
                    ));
                    cmds.push(Self::rule(
                        i,
                        "forward",
                        vec![to.clone(), m("==", payload("ip6", "daddr"), sub), accept()],
                    ));
                }
                cmds.push(Self::rule(
                    i,
                    "forward",
                    vec![
                        to.clone(),
                        m(
                            "in",
                            json!({"ct": {"key": "state"}}),
                            json!(["established", "related"]),
                        ),
                        accept(),
                    ],
                ));
            }
            cmds.push(Self::rule(i, "forward", vec![from.clone(), drop()]));
            cmds.push(Self::rule(i, "forward", vec![to, drop()]));
            // The host itself: metadata, ICMP, DHCP, replies.
            for allow in [
                vec![
                    m("==", payload("ip", "daddr"), json!(IMDS_ADDR.to_string())),
                    m("==", payload("tcp", "dport"), json!(80)),
                ],
                vec![m(
                    "==",
                    meta("l4proto"),
                    set(vec![json!("icmp"), json!("ipv6-icmp")]),
                )],
                vec![m("==", payload("udp", "dport"), json!(67))],
                vec![m(
                    "in",
                    json!({"ct": {"key": "state"}}),
                    json!(["established", "related"]),
                )],
            ] {
                let mut e = vec![from.clone()];
                e.extend(allow);
                e.push(accept());
                cmds.push(Self::rule(i, "input", e));
            }
            cmds.push(Self::rule(i, "input", vec![from, drop()]));
        }
        json!({ "nftables": cmds })
    }

    /// Replaces the agent's tables with this ruleset, atomically.
    pub fn apply(&self) -> Result<(), NftError> {
        run_nft(&self.to_json())
    }
}

/// The verdict map from a TAP's name to its chain.
pub const NIC_MAP: &str = "nics";

fn nic_chain(tap: &str) -> String {
    format!("nic-{tap}")
}

fn nic_element(tap: &str) -> Value {
    json!({"element": {"family": "bridge", "table": TABLE, "name": NIC_MAP,
        "elem": [[tap, {"jump": {"target": nic_chain(tap)}}]]}})
}

/// The commands that (re)write one NIC's chain and its entry in the map.
fn nic_commands(n: &NicRule) -> Vec<Value> {
    let chain = nic_chain(&n.tap);
    let c = json!({"chain": {"family": "bridge", "table": TABLE, "name": chain}});
    let mut cmds = vec![json!({"add": c}), json!({"flush": c})];
    for r in Ruleset::nic_rules(n) {
        cmds.push(Ruleset::rule("bridge", &chain, r));
    }
    cmds.push(json!({"add": nic_element(&n.tap)}));
    cmds
}

/// Adds (or rewrites) one NIC's filter in the existing tables, in one transaction: the cost
/// does not grow with the number of NICs. Fails if the tables are not there.
pub fn add_nic(n: &NicRule) -> Result<(), NftError> {
    run_nft(&json!({ "nftables": nic_commands(n) }))
}

/// Removes one NIC's filter, in one transaction. Fails if it is not there.
pub fn remove_nic(tap: &str) -> Result<(), NftError> {
    let c = json!({"chain": {"family": "bridge", "table": TABLE, "name": nic_chain(tap)}});
    run_nft(&json!({ "nftables": [
        {"delete": nic_element(tap)}, {"flush": c}, {"delete": c}
    ]}))
}

/// Deletes the agent's tables (nothing if they do not exist).
pub fn remove_tables() -> Result<(), NftError> {
    let mut cmds = Vec::new();
    for f in ["bridge", "inet"] {
        let t = json!({"table": {"family": f, "name": TABLE}});
        cmds.push(json!({"add": t}));
        cmds.push(json!({"delete": t}));
    }
    run_nft(&json!({ "nftables": cmds }))
}

fn run_nft(doc: &Value) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    let body = serde_json::to_vec(doc).expect("JSON values serialise");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&body).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_has_a_chain_per_nic_and_drops_unknown_taps() {
        let r = Ruleset {
            nics: vec![NicRule {
                tap: "bxt000000010".into(),
                mac: "02:00:00:00:00:01".into(),
                ipv4: Some("10.0.0.2".parse().unwrap()),
                ipv6: vec!["2001:db8::1".parse().unwrap(), "fe80::1".parse().unwrap()],
                mark: MARK_BASE | 7,
            }],
            segments: vec![SegmentRule {
                port: "bxg00000001".into(),
                routed: true,
                ipv4: Some("10.0.0.0/24".parse().unwrap()),
                ipv6: Some("2001:db8::/64".parse().unwrap()),
            }],
        };
        let text = r.to_json().to_string();
        assert!(text.contains("\"nic-bxt000000010\""));
        assert!(text.contains("\"vmap\""));
        assert!(text.contains("\"bxt*\""));
        assert!(text.contains("masquerade"));
        assert!(text.contains(&format!("{}", MARK_BASE | 7)));
        assert!(text.contains("0x20010db8000000000000000000000001"));
    }
}
