//! The agent's packet filter, as nftables rules in two tables it owns (`bridge bexar` and
//! `inet bexar`), kept in step with the desired state by [`Filter`]: it lists both tables,
//! compares them with what the records want and applies only the difference.
//!
//! - `bridge bexar`: anti-spoofing per TAP, before the bridge forwards or delivers a frame: the
//!   source MAC, IPv4 and IPv6 addresses must be the NIC's; ARP must tell the truth; neighbour
//!   advertisements may only announce the NIC's own addresses; RARP (a migrated NIC's
//!   announcement) passes from the NIC's own MAC; router advertisements, redirects,
//!   DHCP/DHCPv6 server replies, VLAN tags and other EtherTypes are dropped. Frames
//!   to the metadata service get the NIC's mark, which is how the service knows who asks.
//!   A TAP of the agent's that has no NIC is dropped.
//!
//!   One base chain of fixed rules looks each frame's source up in sets keyed by the TAP's
//!   name (`macs`, `v4`, `v6`, `targets`) and a map (`marks`): a NIC is a handful of set
//!   elements, not a chain of its own. That is what keeps the cost flat: with a chain per NIC
//!   the kernel's work per transaction and per listing grew with the square of the NICs (21.7 s
//!   to write 1,000 NICs' chains on this machine and 6.5 s to list them), with sets it is
//!   90 ms and 100 ms (docs/networking.md has the table).
//! - `inet bexar`: segments do not route into each other; the host routes only for `routed`
//!   segments (IPv4 out through NAT and replies back in, IPv6 both ways unchanged); guests
//!   reach only the metadata service, ICMP and DHCP on the host itself.
//!
//! Every rule and set carries a comment `bx:` + a hash of its own text, so a listing says
//! whether a table's shape is the one wanted without parsing rules back. A table whose shape
//! differs (missing, older layout, edited by hand) is rewritten whole, in one transaction;
//! otherwise only set elements are added and removed. The ruleset's generation number
//! (NFT_MSG_GETGEN, one netlink round trip) tells whether anything changed since the last
//! look, so a repair pass on an unchanged host runs no `nft` at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{GATEWAY_PREFIX, IMDS_ADDR, OVERLAY_PREFIX, TAP_PREFIX};

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
    /// nft listed something that is not JSON.
    #[error("nft listed something unreadable: {0}")]
    Listing(String),
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

/// The sets of the bridge table (kind, name, type); each NIC has elements in them.
const BRIDGE_SETS: [(&str, &str, &str); 5] = [
    ("set", "macs", "type ifname . ether_addr"),
    ("set", "v4", "type ifname . ipv4_addr"),
    ("set", "v6", "type ifname . ipv6_addr"),
    // The target of a neighbour advertisement: bits 64-191 of the ICMPv6 message (nft 1.0.6
    // has no name for the field, so the set is typed after the raw payload, which is also why
    // the bridge table is written as nft's text rather than its JSON).
    ("set", "targets", "typeof iifname . @th,64,128"),
    ("map", "marks", "type ifname : mark"),
];

/// The bridge table's base chain, in order. Frames of other ports pass untouched.
fn bridge_rules() -> Vec<String> {
    vec![
        format!("iifname != \"{TAP_PREFIX}*\" accept"),
        // The MAC, for every frame: a TAP with no NIC has no element and loses everything.
        "iifname . ether saddr != @macs drop".into(),
        // RARP, from the NIC's own MAC (checked above): what a VMM sends after a live
        // migration so bridges learn where the MAC went; it carries no address to spoof.
        "ether type 0x8035 accept".into(),
        // VLAN tags (the kernel shows a tag it took off), and EtherTypes other than these.
        "ether type != { ip, ip6, arp } drop".into(),
        "iifname . arp saddr ether != @macs drop".into(),
        // A NIC without IPv4 has no `v4` element: its ARP and IPv4 are dropped.
        "iifname . arp saddr ip != @v4 drop".into(),
        "iifname . ip saddr != @v4 drop".into(),
        // A DHCP client has no address yet (`v4` holds 0.0.0.0 for each NIC with IPv4).
        "ip saddr 0.0.0.0 udp dport 67 accept".into(),
        "ip saddr 0.0.0.0 drop".into(),
        format!("ip daddr {IMDS_ADDR} tcp dport 80 meta mark set iifname map @marks"),
        // A NIC without IPv6 has no `v6` element; `::` is there for duplicate address detection.
        "iifname . ip6 saddr != @v6 drop".into(),
        "icmpv6 type { nd-router-advert, nd-redirect, router-renumbering } drop".into(),
        "icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @targets drop".into(),
        // DHCP and DHCPv6 server replies.
        "udp sport { 67, 547 } drop".into(),
    ]
}

/// The bridge table's other chains, for the VXLAN ports of segments that span hosts (`bxo…`):
/// each host is the gateway of its own guests (the same addresses and MAC on every host), so
/// nothing the host itself sends on a segment (ARP and neighbour answers for the gateway,
/// router advertisements, DHCP and metadata replies) may leave through the overlay, and guests'
/// DHCP requests stay on their own host. Guests' frames to each other cross as they are.
fn bridge_overlay_chains() -> [(&'static str, &'static str, Vec<String>); 2] {
    let o = format!("\"{OVERLAY_PREFIX}*\"");
    [
        ("output", "output", vec![format!("oifname {o} drop")]),
        (
            "forward",
            "forward",
            vec![format!("oifname {o} udp dport {{ 67, 547 }} drop")],
        ),
    ]
}

/// The comment that names a rule or set by its own text.
fn tag(text: &str) -> String {
    let h = Sha256::digest(text.as_bytes());
    let mut s = String::from("bx:");
    for b in &h[..6] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// One element of one of the bridge table's sets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    /// `macs`: the TAP's MAC (lower case).
    Mac(String, String),
    /// `v4`: an IPv4 source the TAP may use.
    V4(String, Ipv4Addr),
    /// `v6`: an IPv6 source the TAP may use.
    V6(String, Ipv6Addr),
    /// `targets`: an address its neighbour advertisements may announce.
    Target(String, u128),
    /// `marks`: the mark of its metadata requests.
    Mark(String, u32),
}

impl Element {
    fn set(&self) -> &'static str {
        match self {
            Self::Mac(..) => "macs",
            Self::V4(..) => "v4",
            Self::V6(..) => "v6",
            Self::Target(..) => "targets",
            Self::Mark(..) => "marks",
        }
    }

    /// The element as nft reads it; `key_only` for deleting from a map.
    fn text(&self, key_only: bool) -> String {
        match self {
            Self::Mac(t, m) => format!("\"{t}\" . {m}"),
            Self::V4(t, a) => format!("\"{t}\" . {a}"),
            Self::V6(t, a) => format!("\"{t}\" . {a}"),
            Self::Target(t, a) => format!("\"{t}\" . 0x{a:032x}"),
            Self::Mark(t, _) if key_only => format!("\"{t}\""),
            Self::Mark(t, m) => format!("\"{t}\" : 0x{m:08x}"),
        }
    }

    /// Reads an element of set `set` from nft's JSON listing; None if it is not one of ours.
    fn parse(set: &str, e: &Value) -> Option<Self> {
        fn num(v: &Value) -> Option<u128> {
            match v {
                Value::Number(n) => n.as_u64().map(u128::from),
                Value::String(s) => u128::from_str_radix(s.strip_prefix("0x")?, 16).ok(),
                _ => None,
            }
        }
        if set == "marks" {
            let [k, v] = e.as_array()?.as_slice() else {
                return None;
            };
            return Some(Self::Mark(
                k.as_str()?.to_owned(),
                u32::try_from(num(v)?).ok()?,
            ));
        }
        let [k, v] = e.get("concat")?.as_array()?.as_slice() else {
            return None;
        };
        let tap = k.as_str()?.to_owned();
        Some(match set {
            "macs" => Self::Mac(tap, v.as_str()?.to_ascii_lowercase()),
            "v4" => Self::V4(tap, v.as_str()?.parse().ok()?),
            "v6" => Self::V6(tap, v.as_str()?.parse().ok()?),
            "targets" => Self::Target(tap, num(v)?),
            _ => return None,
        })
    }
}

/// Every set element of one NIC.
pub fn nic_elements(n: &NicRule) -> Vec<Element> {
    let t = || n.tap.clone();
    let mut e = vec![
        Element::Mac(t(), n.mac.to_ascii_lowercase()),
        Element::Mark(t(), n.mark),
    ];
    if let Some(ip) = n.ipv4 {
        e.push(Element::V4(t(), ip));
        e.push(Element::V4(t(), Ipv4Addr::UNSPECIFIED));
    }
    if !n.ipv6.is_empty() {
        e.push(Element::V6(t(), Ipv6Addr::UNSPECIFIED));
    }
    for a in &n.ipv6 {
        e.push(Element::V6(t(), *a));
        e.push(Element::Target(t(), u128::from(*a)));
    }
    e
}

/// `add element` / `delete element` commands for `elements`, one per set.
fn element_commands(out: &mut String, verb: &str, elements: &BTreeSet<Element>) {
    let mut per: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for e in elements {
        per.entry(e.set())
            .or_default()
            .push(e.text(verb == "delete"));
    }
    for (set, items) in per {
        // Long lines are fine for nft; a batch this size is one transaction either way.
        let _ = writeln!(
            out,
            "{verb} element bridge {TABLE} {set} {{ {} }}",
            items.join(", ")
        );
    }
}

/// A table as listed: chains with their rules' comments in order, sets with their comments,
/// the set elements that are ours, and whether anything is not.
#[derive(Debug, Default, PartialEq)]
struct Shape {
    chains: BTreeMap<String, Vec<Option<String>>>,
    sets: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Default)]
struct Listed {
    shape: Shape,
    elements: BTreeSet<Element>,
    foreign: bool,
}

impl Listed {
    fn parse(doc: &Value) -> Self {
        let mut l = Listed::default();
        for o in doc["nftables"].as_array().into_iter().flatten() {
            if let Some(c) = o.get("chain") {
                if let Some(name) = c["name"].as_str() {
                    l.shape.chains.entry(name.to_owned()).or_default();
                }
            } else if let Some(r) = o.get("rule") {
                let chain = r["chain"].as_str().unwrap_or_default().to_owned();
                let comment = r["comment"].as_str().map(str::to_owned);
                l.shape.chains.entry(chain).or_default().push(comment);
            } else if let Some(s) = o.get("set").or_else(|| o.get("map")) {
                let name = s["name"].as_str().unwrap_or_default();
                let comment = s["comment"].as_str().map(str::to_owned);
                l.shape.sets.insert(name.to_owned(), comment);
                for e in s["elem"].as_array().into_iter().flatten() {
                    match Element::parse(name, e) {
                        Some(e) => {
                            l.elements.insert(e);
                        }
                        None => l.foreign = true,
                    }
                }
            }
        }
        l
    }
}

/// What the bridge table should be.
fn bridge_shape() -> Shape {
    let mut chains = BTreeMap::new();
    chains.insert(
        "prerouting".to_owned(),
        bridge_rules().iter().map(|r| Some(tag(r))).collect(),
    );
    for (name, _, rules) in bridge_overlay_chains() {
        chains.insert(
            name.to_owned(),
            rules.iter().map(|r| Some(tag(r))).collect(),
        );
    }
    let sets = BRIDGE_SETS
        .iter()
        .map(|(kind, name, ty)| {
            (
                (*name).to_owned(),
                Some(tag(&format!("{kind} {name} {ty}"))),
            )
        })
        .collect();
    Shape { chains, sets }
}

/// The nft script that replaces the bridge table with one holding `elements`.
fn bridge_script(elements: &BTreeSet<Element>) -> String {
    let mut s = String::new();
    let t = format!("table bridge {TABLE}");
    let _ = writeln!(s, "add {t}\ndelete {t}\nadd {t}");
    for (kind, name, ty) in BRIDGE_SETS {
        let c = tag(&format!("{kind} {name} {ty}"));
        let _ = writeln!(
            s,
            "add {kind} bridge {TABLE} {name} {{ {ty}; comment \"{c}\"; }}"
        );
    }
    let _ = writeln!(
        s,
        "add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority -200; policy accept; }}"
    );
    for r in bridge_rules() {
        let _ = writeln!(
            s,
            "add rule bridge {TABLE} prerouting {r} comment \"{}\"",
            tag(&r)
        );
    }
    for (name, hook, rules) in bridge_overlay_chains() {
        let _ = writeln!(
            s,
            "add chain bridge {TABLE} {name} {{ type filter hook {hook} priority -200; policy accept; }}"
        );
        for r in rules {
            let _ = writeln!(
                s,
                "add rule bridge {TABLE} {name} {r} comment \"{}\"",
                tag(&r)
            );
        }
    }
    element_commands(&mut s, "add", elements);
    s
}

fn rule(family: &str, chain: &str, expr: Vec<Value>) -> Value {
    let comment = tag(&Value::Array(expr.clone()).to_string());
    json!({"add": {"rule": {"family": family, "table": TABLE, "chain": chain, "expr": expr,
        "comment": comment}}})
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

impl Ruleset {
    /// Every set element of the bridge table.
    pub fn elements(&self) -> BTreeSet<Element> {
        self.nics.iter().flat_map(nic_elements).collect()
    }

    /// The nft JSON document that replaces the inet table (routing policy, NAT, the host's
    /// own services): its size follows the segments, not the NICs.
    pub fn inet_doc(&self) -> Value {
        let mut cmds: Vec<Value> = Vec::new();
        let i = "inet";
        let gw_any = json!(format!("{GATEWAY_PREFIX}*"));
        cmds.extend(table_reset(i));
        cmds.push(chain(i, "forward", Some(("filter", "forward", 0))));
        cmds.push(chain(i, "postrouting", Some(("nat", "postrouting", 100))));
        cmds.push(chain(i, "input", Some(("filter", "input", 0))));
        // Within a segment. Bridged frames pass these hooks too when br_netfilter is present
        // with bridge-nf-call-iptables on (built into some kernels, loaded by Docker...).
        for s in &self.segments {
            let p = json!(s.port);
            cmds.push(rule(
                i,
                "forward",
                vec![
                    m("==", meta("iifname"), p.clone()),
                    m("==", meta("oifname"), p.clone()),
                    accept(),
                ],
            ));
        }
        cmds.push(rule(
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
                    cmds.push(rule(
                        i,
                        "forward",
                        vec![
                            from.clone(),
                            m("==", payload("ip", "saddr"), sub.clone()),
                            accept(),
                        ],
                    ));
                    cmds.push(rule(
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
                    cmds.push(rule(
                        i,
                        "forward",
                        vec![
                            from.clone(),
                            m("==", payload("ip6", "saddr"), sub.clone()),
                            accept(),
                        ],
                    ));
                    cmds.push(rule(
                        i,
                        "forward",
                        vec![to.clone(), m("==", payload("ip6", "daddr"), sub), accept()],
                    ));
                }
                cmds.push(rule(
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
            cmds.push(rule(i, "forward", vec![from.clone(), drop()]));
            cmds.push(rule(i, "forward", vec![to, drop()]));
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
                cmds.push(rule(i, "input", e));
            }
            cmds.push(rule(i, "input", vec![from, drop()]));
        }
        json!({ "nftables": cmds })
    }

    /// Replaces both of the agent's tables with this ruleset, whatever is there now.
    pub fn apply(&self) -> Result<(), NftError> {
        run_script(&bridge_script(&self.elements()))?;
        run_nft(&self.inet_doc())
    }
}

/// What the inet table should be, read off the document that writes it.
fn inet_shape(doc: &Value) -> Shape {
    let mut shape = Shape::default();
    for c in doc["nftables"].as_array().into_iter().flatten() {
        if let Some(ch) = c.pointer("/add/chain") {
            if let Some(name) = ch["name"].as_str() {
                shape.chains.entry(name.to_owned()).or_default();
            }
        } else if let Some(r) = c.pointer("/add/rule") {
            let chain = r["chain"].as_str().unwrap_or_default().to_owned();
            let comment = r["comment"].as_str().map(str::to_owned);
            shape.chains.entry(chain).or_default().push(comment);
        }
    }
    shape
}

/// What one [`Filter::sync`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Whether it listed the tables (false: the generation said nothing changed).
    pub listed: bool,
    /// Tables written whole (`bridge`, `inet`).
    pub rewrote: Vec<&'static str>,
    /// Set elements added.
    pub added: usize,
    /// Set elements removed.
    pub removed: usize,
}

impl SyncReport {
    /// Whether it changed anything.
    pub fn changed(&self) -> bool {
        !self.rewrote.is_empty() || self.added > 0 || self.removed > 0
    }
}

/// What the kernel was last seen to hold (the ruleset, its NICs by TAP), and the ruleset
/// generation then.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    generation: u32,
    rules: Ruleset,
}

/// The ruleset with its NICs in TAP order, as [`Seen`] keeps it.
fn canonical(rules: &Ruleset) -> Ruleset {
    let mut r = rules.clone();
    r.nics.sort_by(|a, b| a.tap.cmp(&b.tap));
    r
}

/// The agent's filter: applies the desired ruleset as a difference from what the kernel
/// holds, and remembers what it verified so an unchanged host costs one netlink round trip.
#[derive(Debug, Default)]
pub struct Filter {
    seen: Mutex<Option<Seen>>,
}

impl Filter {
    /// Makes the kernel's tables hold `rules`: lists them (unless the generation says nothing
    /// changed since the last sync), rewrites a table whose shape is not the wanted one, and
    /// otherwise adds and removes only the set elements that differ, in one transaction.
    pub fn sync(&self, rules: &Ruleset) -> Result<SyncReport, NftError> {
        let rules = canonical(rules);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let before = generation().ok();
        if let (Some(g), Some(s)) = (before, seen.as_ref()) {
            if s.generation == g && s.rules == rules {
                return Ok(SyncReport::default());
            }
        }
        *seen = None;
        let elements = rules.elements();
        let inet = rules.inet_doc();
        let mut report = SyncReport {
            listed: true,
            ..SyncReport::default()
        };
        let mut transactions = 0;
        let bridge = list("bridge")?;
        let mut script = String::new();
        match bridge {
            Some(l) if !l.foreign && l.shape == bridge_shape() => {
                let gone: BTreeSet<Element> = l.elements.difference(&elements).cloned().collect();
                // A map element whose value changes is deleted and added again.
                let new: BTreeSet<Element> = elements.difference(&l.elements).cloned().collect();
                report.removed = gone.len();
                report.added = new.len();
                element_commands(&mut script, "delete", &gone);
                element_commands(&mut script, "add", &new);
            }
            _ => {
                report.rewrote.push("bridge");
                report.added = elements.len();
                script = bridge_script(&elements);
            }
        }
        if !script.is_empty() {
            run_script(&script)?;
            transactions += 1;
        }
        let inet_now = list("inet")?;
        if inet_now.is_none_or(|l| l.foreign || l.shape != inet_shape(&inet)) {
            report.rewrote.push("inet");
            run_nft(&inet)?;
            transactions += 1;
        }
        // Verified only if no one else committed in between (each transaction is one
        // generation); otherwise the next sync lists again.
        if let (Some(b), Ok(a)) = (before, generation()) {
            if a == b.wrapping_add(transactions) {
                *seen = Some(Seen {
                    generation: a,
                    rules,
                });
            }
        }
        Ok(report)
    }

    /// Adds one NIC's elements (or changes its mark), in one transaction that does not grow
    /// with the number of NICs. Fails if the bridge table is not there.
    pub fn add_nic(&self, n: &NicRule) -> Result<(), NftError> {
        self.change(n, true)
    }

    /// Removes one NIC's elements, in one transaction. Fails if they are not there.
    pub fn remove_nic(&self, n: &NicRule) -> Result<(), NftError> {
        self.change(n, false)
    }

    fn change(&self, n: &NicRule, add: bool) -> Result<(), NftError> {
        let mine: BTreeSet<Element> = nic_elements(n).into_iter().collect();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let before = generation().ok();
        // Nothing to do if the kernel holds what was seen and that is already so (a VM that
        // starts again: a full sync made its elements when it was created). Running nft then
        // would commit nothing, leave the generation where it was, and lose the cache.
        if let (Some(s), Some(b)) = (seen.as_ref(), before) {
            let has = s.rules.nics.iter().any(|o| o == n);
            let knows_tap = s.rules.nics.iter().any(|o| o.tap == n.tap);
            if s.generation == b && ((add && has) || (!add && !knows_tap)) {
                return Ok(());
            }
        }
        let mut script = String::new();
        // The TAP's old elements go first (a map will not take a second value for a key).
        let old: BTreeSet<Element> = seen
            .as_ref()
            .and_then(|s| s.rules.nics.iter().find(|o| o.tap == n.tap))
            .map(|o| {
                nic_elements(o)
                    .into_iter()
                    .filter(|e| !mine.contains(e))
                    .collect()
            })
            .unwrap_or_default();
        if add {
            element_commands(&mut script, "delete", &old);
        }
        element_commands(&mut script, if add { "add" } else { "delete" }, &mine);
        let r = run_script(&script);
        let after = generation().ok();
        match (seen.as_mut(), before, after) {
            (Some(s), Some(b), Some(a))
                if r.is_ok() && s.generation == b && a == b.wrapping_add(1) =>
            {
                s.generation = a;
                s.rules.nics.retain(|o| o.tap != n.tap);
                if add {
                    let at = s.rules.nics.partition_point(|o| o.tap < n.tap);
                    s.rules.nics.insert(at, n.clone());
                }
            }
            _ => *seen = None,
        }
        r
    }

    /// Deletes the agent's tables (nothing if they do not exist).
    pub fn remove_tables(&self) -> Result<(), NftError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        *seen = None;
        remove_tables()
    }
}

/// Lists the agent's table of `family`; None if it does not exist.
fn list(family: &str) -> Result<Option<Listed>, NftError> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", family, TABLE])
        .stdin(Stdio::null())
        .output()
        .map_err(NftError::Spawn)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(NftError::Refused(err.trim().to_owned()));
    }
    let doc: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| NftError::Listing(e.to_string()))?;
    Ok(Some(Listed::parse(&doc)))
}

/// The nftables ruleset generation of this network namespace: the kernel counts every
/// committed transaction, whoever made it (NFT_MSG_GETGEN over NETLINK_NETFILTER).
pub fn generation() -> std::io::Result<u32> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_GETGEN: u16 = 16;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const NFTA_GEN_ID: u16 = 1;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    // struct nlmsghdr, then struct nfgenmsg (AF_UNSPEC, NFNETLINK_V0, resource id 0).
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&20u32.to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[0, 0, 0, 0]);
    sock.send(&req, 0)?;
    let mut buf = Vec::with_capacity(1024);
    let n = sock.recv(&mut buf, 0)?;
    let msg = buf.get(..n).ok_or_else(|| bad("short reply"))?;
    let u16_at = |at: usize| {
        msg.get(at..at + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
    };
    let kind = u16_at(4).ok_or_else(|| bad("short reply"))?;
    if kind == NLMSG_ERROR {
        let code = msg
            .get(16..20)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(-libc::EIO);
        return Err(std::io::Error::from_raw_os_error(-code));
    }
    // Attributes follow the two headers, each padded to 4 bytes.
    let mut at = 20;
    while let (Some(len), Some(ty)) = (u16_at(at), u16_at(at + 2)) {
        let len = usize::from(len);
        if len < 4 {
            break;
        }
        if ty & 0x3fff == NFTA_GEN_ID {
            let v = msg
                .get(at + 4..at + 8)
                .ok_or_else(|| bad("short attribute"))?;
            return Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        }
        at += (len + 3) & !3;
    }
    Err(bad("no generation in the reply"))
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
    run(
        &["-j", "-f", "-"],
        &serde_json::to_vec(doc).expect("JSON values serialise"),
    )
}

fn run_script(script: &str) -> Result<(), NftError> {
    run(&["-f", "-"], script.as_bytes())
}

fn run(args: &[&str], body: &[u8]) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(body).map_err(NftError::Spawn)?;
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

    fn nic() -> NicRule {
        NicRule {
            tap: "bxt000000010".into(),
            mac: "02:00:00:00:00:0A".into(),
            ipv4: Some("10.0.0.2".parse().unwrap()),
            ipv6: vec!["2001:db8::1".parse().unwrap(), "fe80::1".parse().unwrap()],
            mark: MARK_BASE | 7,
        }
    }

    #[test]
    fn a_nic_is_set_elements_in_a_script_of_fixed_rules() {
        let r = Ruleset {
            nics: vec![nic()],
            segments: vec![SegmentRule {
                port: "bxg00000001".into(),
                routed: true,
                ipv4: Some("10.0.0.0/24".parse().unwrap()),
                ipv6: Some("2001:db8::/64".parse().unwrap()),
            }],
        };
        let script = bridge_script(&r.elements());
        assert!(!script.contains("nic-"), "no chain per NIC: {script}");
        for want in [
            "\"bxt000000010\" . 02:00:00:00:00:0a",
            "\"bxt000000010\" . 10.0.0.2",
            "\"bxt000000010\" . 0.0.0.0",
            "\"bxt000000010\" . ::",
            "\"bxt000000010\" . 0x20010db8000000000000000000000001",
            &format!("\"bxt000000010\" : 0x{:08x}", MARK_BASE | 7),
        ] {
            assert!(script.contains(want), "{want} missing from {script}");
        }
        // Every rule is tagged with its own text, and the same script always gets the same tags.
        assert_eq!(
            script.matches("comment \"bx:").count(),
            5 + bridge_rules().len()
                + bridge_overlay_chains()
                    .iter()
                    .map(|(_, _, r)| r.len())
                    .sum::<usize>()
        );
        assert!(script.contains("hook output"), "{script}");
        assert_eq!(script, bridge_script(&r.elements()));
        let inet = r.inet_doc().to_string();
        assert!(inet.contains("masquerade"));
        assert!(inet_shape(&r.inet_doc()).chains["forward"]
            .iter()
            .all(Option::is_some));
    }

    #[test]
    fn listed_elements_read_back_as_written_and_strangers_are_noticed() {
        let listing = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "bridge", "name": "bexar", "handle": 6}},
            {"set": {"family": "bridge", "name": "macs", "table": "bexar", "comment": "bx:1",
                "elem": [{"concat": ["bxt000000010", "02:00:00:00:00:0a"]}]}},
            {"set": {"family": "bridge", "name": "v4", "table": "bexar",
                "elem": [{"concat": ["bxt000000010", "10.0.0.2"]},
                         {"concat": ["bxt000000010", "0.0.0.0"]}]}},
            {"set": {"family": "bridge", "name": "v6", "table": "bexar",
                "elem": [{"concat": ["bxt000000010", "::"]},
                         {"concat": ["bxt000000010", "2001:db8::1"]},
                         {"concat": ["bxt000000010", "fe80::1"]}]}},
            {"set": {"family": "bridge", "name": "targets", "table": "bexar",
                "elem": [{"concat": ["bxt000000010", "0x20010db8000000000000000000000001"]},
                         {"concat": ["bxt000000010", "0xfe800000000000000000000000000001"]}]}},
            {"map": {"family": "bridge", "name": "marks", "table": "bexar", "map": "mark",
                "elem": [["bxt000000010", MARK_BASE | 7]]}},
            {"chain": {"family": "bridge", "table": "bexar", "name": "prerouting"}},
            {"rule": {"family": "bridge", "table": "bexar", "chain": "prerouting",
                "comment": "bx:2", "expr": []}},
            {"rule": {"family": "bridge", "table": "bexar", "chain": "prerouting", "expr": []}}
        ]});
        let l = Listed::parse(&listing);
        assert!(!l.foreign);
        let want: BTreeSet<Element> = nic_elements(&nic()).into_iter().collect();
        assert_eq!(l.elements, want);
        assert_eq!(
            l.shape.chains["prerouting"],
            vec![Some("bx:2".into()), None]
        );
        assert_eq!(l.shape.sets["macs"], Some("bx:1".into()));
        // An element with a timeout or comment is an object nft prints differently: not ours.
        let odd = json!({"nftables": [{"set": {"name": "macs", "elem": [
            {"elem": {"val": {"concat": ["bxt1", "02:00:00:00:00:01"]}, "comment": "x"}}
        ]}}]});
        assert!(Listed::parse(&odd).foreign);
    }
}
