//! The agent's network: segments (persisted one file each under `STATE/segments/`), the NICs
//! of VMs on them, and the kernel state that carries both. The kernel side is level-driven:
//! [`Agent::sync_network`] computes what should exist from the records and makes it so (links,
//! VLANs, addresses, routes, the nftables ruleset, router advertisements), deleting whatever
//! the agent once made that no record wants. It runs after every change, when the agent
//! starts (re-adoption after a restart, clean-up after a crash) and periodically (repair).
//!
//! Layout on the host: one Linux bridge per segment (see docs/architecture.md for why not one
//! VLAN-aware bridge):
//!
//! ```text
//!   guest ── TAP bxt… ──┐
//!   guest ── TAP bxt… ──┤ bridge bxg… (fixed MAC; the host's addresses on the segment:
//!   uplink.VLAN bxu… ───┤  gateway of a routed segment, 169.254.169.254 for metadata)
//!   VXLAN bxo… ─────────┘  (a segment that spans hosts: to the other hosts' bridges)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::netplan::{self, nic_rule, LinkOp};
use super::segment::{segment_links, NicState, SegmentSpec};
use super::spec::VmRecord;
use super::store::{sync_dir, write_atomic, StoreError};
use super::{Agent, AgentError};
use bexar_devices::tap::Tap;
use bexar_hostnet::dhcp::{Binding, Bindings};
use bexar_hostnet::netlink::{self, Link, Netlink};
use bexar_hostnet::nft::{self, MARK_BASE};
use bexar_hostnet::service::Service;
use bexar_hostnet::IMDS_ADDR;
use bexar_util::sync::lock;

/// How the host side of the network is set up.
#[derive(Debug, Clone, Default)]
pub struct NetworkConfig {
    /// The interface that carries bridged segments to the rest of their L2 domain, each
    /// tagged with its VLAN id (through an 802.1Q interface the agent makes on it).
    pub uplink: Option<String>,
    /// Where segments with an overlay meet the other hosts (`--overlay-local`,
    /// `--overlay-peer`); none: no segment may have one.
    pub overlay: Option<netplan::OverlayConfig>,
}

/// The NIC a metadata request came from.
#[derive(Debug, Clone)]
pub struct NicOwner {
    /// The VM.
    pub vm: String,
    /// The NIC's index in the VM's spec.
    pub nic: usize,
}

/// The network part of the agent.
pub(super) struct Network {
    pub(super) config: NetworkConfig,
    dir: PathBuf,
    pub(super) segments: Mutex<BTreeMap<String, SegmentSpec>>,
    nl: Mutex<Option<Netlink>>,
    sync: tokio::sync::Mutex<()>,
    /// Mark of metadata requests -> NIC (rebuilt by every sync).
    marks: Mutex<HashMap<u32, NicOwner>>,
    /// Whether the last sync left anything in the kernel (the first one always looks).
    active: std::sync::atomic::AtomicBool,
    /// The nftables tables, and what was last seen in them.
    filter: std::sync::Arc<nft::Filter>,
    /// Link and address changes since the last sync looked.
    watch: Mutex<Option<netlink::LinkWatch>>,
    /// What the last full sync found (taken while a sync runs, kept only if it succeeds).
    last: Mutex<Option<LastSync>>,
    /// The record version the DHCP bindings were last built from.
    bindings_at: Mutex<Option<u64>>,
    /// When a sync last looked at everything.
    looked: Mutex<std::time::Instant>,
    /// Router advertisement threads (stop flag, thread), per segment.
    ra: Mutex<HashMap<String, Service>>,
    /// DHCP server threads and their bindings, per segment with IPv4.
    dhcp: Mutex<HashMap<String, (Service, Bindings)>>,
}

impl Network {
    /// Loads the segments from `STATE/segments`.
    pub(super) fn open(root: &Path, config: NetworkConfig) -> Result<Self, StoreError> {
        let dir = root.join("segments");
        std::fs::create_dir_all(&dir).map_err(bexar_util::fs::io_err("create", &dir))?;
        let mut segments = BTreeMap::new();
        for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = f.path();
            let name = f.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp.") {
                let _ = std::fs::remove_file(&p);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<SegmentSpec>(&b).map_err(|e| e.to_string()))
            {
                Ok(s) => {
                    segments.insert(s.id.clone(), s);
                }
                Err(e) => tracing::error!("{}: unreadable segment: {e}; skipped", p.display()),
            }
        }
        Ok(Self {
            config,
            dir,
            segments: Mutex::new(segments),
            nl: Mutex::new(None),
            sync: tokio::sync::Mutex::new(()),
            marks: Mutex::new(HashMap::new()),
            active: std::sync::atomic::AtomicBool::new(true),
            filter: Default::default(),
            watch: Mutex::new(None),
            last: Mutex::new(None),
            bindings_at: Mutex::new(None),
            looked: Mutex::new(std::time::Instant::now()),
            ra: Mutex::new(HashMap::new()),
            dhcp: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn netlink(&self) -> Result<Netlink, AgentError> {
        let mut nl = lock(&self.nl);
        if nl.is_none() {
            *nl = Some(Netlink::open().map_err(net_err)?);
        }
        Ok(nl.clone().expect("just set"))
    }

    /// The NIC whose metadata requests carry `mark`.
    pub(super) fn owner_of_mark(&self, mark: u32) -> Option<NicOwner> {
        lock(&self.marks).get(&mark).cloned()
    }
}

/// How often a sync looks at everything even if no event said anything changed.
const FULL_LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// What a sync found, for the next one to reuse while nothing changes.
struct LastSync {
    plan: netplan::NetPlan,
    links: Vec<Link>,
    tap_index: HashMap<String, u32>,
}

/// Why the kernel's side of the network could not be made to match the records.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An rtnetlink request failed.
    #[error(transparent)]
    Netlink(#[from] bexar_hostnet::netlink::NetlinkError),
    /// nft refused the ruleset.
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    /// A TAP could not be made.
    #[error(transparent)]
    Tap(#[from] bexar_devices::tap::TapError),
    /// A sysctl could not be set.
    #[error("sysctl: {0}")]
    Sysctl(#[from] std::io::Error),
    /// A blocking task (nft) did not finish.
    #[error("a network task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A link the agent made or needs is not there.
    #[error("{0}")]
    Missing(String),
}

impl From<String> for NetError {
    fn from(s: String) -> Self {
        Self::Missing(s)
    }
}

fn net_err(e: impl Into<NetError>) -> AgentError {
    AgentError::Network(e.into())
}

impl Agent {
    /// Every segment, by id.
    pub fn segments(&self) -> Vec<SegmentSpec> {
        lock(&self.net.segments).values().cloned().collect()
    }

    /// One segment.
    pub fn segment(&self, id: &str) -> Result<SegmentSpec, AgentError> {
        lock(&self.net.segments)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::SegmentNotFound(id.to_owned()))
    }

    /// Defines a segment and wires it. Returns it (with defaults filled in) and whether it was
    /// created now (false: an identical one existed). A segment the kernel refuses is removed
    /// again: nothing is left half-made.
    pub async fn create_segment(
        &self,
        mut spec: SegmentSpec,
    ) -> Result<(SegmentSpec, bool), AgentError> {
        spec.validate()?;
        if spec.overlay.is_some() && self.net.config.overlay.is_none() {
            return Err(AgentError::Invalid(super::spec::FieldError::new(
                "overlay",
                "this agent has no overlay network: start it with --overlay-local (and \
                 --overlay-peer for each other host)",
            )));
        }
        {
            let mut segs = lock(&self.net.segments);
            if let Some(s) = segs.get(&spec.id) {
                return if *s == spec {
                    Ok((s.clone(), false))
                } else {
                    Err(AgentError::Exists(format!("segment {}", spec.id)))
                };
            }
            spec.check_against(segs.values())
                .map_err(AgentError::Conflict)?;
            let data = serde_json::to_vec_pretty(&spec).map_err(StoreError::from)?;
            super::store::blocking(|| write_atomic(&self.net.path(&spec.id), &data))
                .map_err(StoreError::from)?;
            segs.insert(spec.id.clone(), spec.clone());
        }
        if let Err(e) = self.sync_network().await {
            tracing::error!(segment = %spec.id, "cannot wire the segment: {e}; removing it");
            lock(&self.net.segments).remove(&spec.id);
            let _ = std::fs::remove_file(self.net.path(&spec.id));
            let _ = sync_dir(&self.net.dir);
            let _ = self.sync_network().await;
            return Err(e);
        }
        self.events
            .emit(&spec.id, super::events::EventKind::SegmentCreated, None, "");
        Ok((spec, true))
    }

    /// Deletes a segment no NIC uses. Deleting a segment that does not exist succeeds.
    pub async fn delete_segment(&self, id: &str) -> Result<(), AgentError> {
        {
            let mut segs = lock(&self.net.segments);
            if !segs.contains_key(id) {
                return Ok(());
            }
            let users: Vec<String> = self
                .entries()
                .iter()
                .filter(|e| {
                    lock(&e.rec)
                        .nics
                        .iter()
                        .any(|n| n.segment.as_deref() == Some(id))
                })
                .map(|e| e.id.clone())
                .collect();
            if !users.is_empty() {
                return Err(AgentError::InUse(format!(
                    "segment {id:?} has NICs of VMs {users:?}"
                )));
            }
            match std::fs::remove_file(self.net.path(id)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(StoreError::from(bexar_util::fs::io_err(
                        "remove",
                        &self.net.path(id),
                    )(err))
                    .into())
                }
            }
            sync_dir(&self.net.dir).map_err(StoreError::from)?;
            segs.remove(id);
        }
        self.sync_network().await?;
        self.events
            .emit(id, super::events::EventKind::SegmentDeleted, None, "");
        Ok(())
    }

    /// Resolves the NICs of a VM being created (the VM map lock is held by the caller, so
    /// allocations cannot race).
    pub(super) fn resolve_nics(
        &self,
        spec: &super::spec::VmSpec,
        others: &[NicState],
    ) -> Result<Vec<NicState>, AgentError> {
        let segs = lock(&self.net.segments);
        super::segment::resolve_nics(&spec.id, &spec.nics, |id| segs.get(id), others).map_err(|e| {
            match e {
                super::segment::NicError::Invalid(f) => AgentError::Invalid(f),
                super::segment::NicError::Conflict(f) => AgentError::Conflict(f),
            }
        })
    }

    /// The `ip=` kernel parameter for a VM, unless its command line has one.
    pub(super) fn kernel_ip_param(&self, rec: &VmRecord) -> Option<String> {
        let cmdline = rec.spec.boot.cmdline.as_deref().unwrap_or("");
        if cmdline.split_whitespace().any(|t| t.starts_with("ip=")) {
            return None;
        }
        let segs = lock(&self.net.segments);
        let host = rec.metadata.hostname.as_deref().unwrap_or(&rec.id);
        super::segment::kernel_ip_param(&rec.nics, |id| segs.get(id), host)
    }

    /// The NIC whose metadata requests carry `mark`.
    pub fn nic_of_mark(&self, mark: u32) -> Option<NicOwner> {
        self.net.owner_of_mark(mark)
    }

    /// Makes the kernel match the records: bridges with their addresses and routes, uplink
    /// VLAN interfaces, one filtered TAP per segment NIC, the nftables ruleset, forwarding,
    /// router advertisements and DHCP; and removes links the agent made that nothing wants any
    /// more. Observe, plan (`netplan`, pure), apply the difference.
    pub async fn sync_network(&self) -> Result<(), AgentError> {
        let began = std::time::Instant::now();
        let segs: BTreeMap<String, SegmentSpec> = lock(&self.net.segments).clone();
        let nics: Vec<(String, usize, NicState)> = self
            .entries()
            .iter()
            .flat_map(|e| {
                let r = lock(&e.rec);
                r.nics
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| n.segment.is_some())
                    .map(|(i, n)| (r.id.clone(), i, n.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let plan = netplan::plan(
            &segs,
            &nics,
            self.net.config.uplink.as_deref(),
            self.net.config.overlay.as_ref(),
        );
        if plan.is_empty()
            && !self.net.active.load(std::sync::atomic::Ordering::Relaxed)
            && !self.net_touched()
        {
            // A host without segments is not touched at all.
            return Ok(());
        }
        let _guard = self.net.sync.lock().await;
        // Quiet: no link or address changed since the last pass, which made this same plan;
        // then what it found stands, and only the filter (which has its own check) is looked at.
        let changed = {
            let mut w = lock(&self.net.watch);
            if w.is_none() {
                *w = netlink::LinkWatch::open().ok();
            }
            w.as_mut().is_none_or(|w| w.changed())
        };
        let last = lock(&self.net.last).take();
        let same_plan = last.as_ref().is_some_and(|l| l.plan == plan);
        // A pass every five minutes looks anyway, for what no event announces (a sysctl set by
        // hand): at 1,000 VMs a look costs about 100 ms, a quiet pass 3-5 ms.
        let looked = *lock(&self.net.looked);
        let quiet = !changed && same_plan && looked.elapsed() < FULL_LOOK_EVERY;
        let (links, tap_index, taps_fixed) = match last {
            Some(l) if quiet => (l.links, l.tap_index, 0),
            _ => {
                let nl = self.net.netlink()?;
                let observed = nl.links().await.map_err(net_err)?;
                let ops = netplan::link_ops(&plan, &observed);

                // Links to make: bridges, then the uplink VLAN interfaces on them.
                let mut deletes = Vec::new();
                let mut made = false;
                let wanted = plan.wanted();
                for op in ops {
                    made |= !matches!(op, LinkOp::Delete { .. });
                    match op {
                        LinkOp::AddBridge { name, alias, mac } => {
                            nl.add_bridge(&name, &alias, mac).await.map_err(net_err)?
                        }
                        LinkOp::AddVlan { name, on, vlan } => {
                            let base = find(&observed, &on)
                                .ok_or_else(|| net_err(format!("uplink {on} does not exist")))?
                                .index;
                            nl.add_vlan(&name, base, vlan).await.map_err(net_err)?;
                        }
                        LinkOp::AddVxlan { name, vni, config } => {
                            nl.add_vxlan(&name, vni, config.local, config.port)
                                .await
                                .map_err(net_err)?;
                        }
                        // Still wanted: deleted now, to be made again by the next op.
                        LinkOp::Delete { index, name } if wanted.contains(name.as_str()) => {
                            tracing::info!("remaking {name}");
                            nl.del_link(index).await.map_err(net_err)?;
                        }
                        LinkOp::Delete { index, name } => deletes.push((index, name)),
                    }
                }
                // Links made just now have indexes only the kernel knows: list them again then.
                let links = if made {
                    nl.links().await.map_err(net_err)?
                } else {
                    observed
                };

                // Every bridge's settings, addresses and route (idempotent, so applied every time).
                for b in &plan.bridges {
                    let bl = find(&links, &b.name)
                        .cloned()
                        .ok_or_else(|| net_err(format!("{} did not appear", b.name)))?;
                    let br = &b.name;
                    let _ = netlink::sysctl(
                        &format!("net/ipv6/conf/{br}/disable_ipv6"),
                        if b.ipv6 { "0" } else { "1" },
                    );
                    let _ = netlink::sysctl(&format!("net/ipv6/conf/{br}/accept_dad"), "0");
                    let _ = netlink::sysctl(&format!("net/ipv6/conf/{br}/accept_ra"), "0");
                    let _ = netlink::sysctl(&format!("net/ipv4/conf/{br}/arp_ignore"), "1");
                    // Only when it differs: a link set is announced to every listener (our own
                    // link watch included) even when it changes nothing.
                    if bl.alias.as_deref() != Some(b.alias.as_str()) || !bl.up {
                        nl.set_link(bl.index, &b.alias, None, true)
                            .await
                            .map_err(net_err)?;
                    }
                    let have = nl.addresses(bl.index).await.map_err(net_err)?;
                    for a in b.addresses.iter().filter(|a| !have.contains(a)) {
                        nl.add_address(bl.index, *a).await.map_err(net_err)?;
                    }
                    if let Some(subnet) = b.metadata_route {
                        // Metadata replies reach bridged guests through their bridge.
                        nl.add_link_route(bl.index, subnet, IMDS_ADDR)
                            .await
                            .map_err(net_err)?;
                    }
                    if let Some(o) = &b.overlay {
                        // The tunnel to the other hosts: a port of the bridge, flooding to every
                        // peer what it has not learned a place for.
                        let index = ensure_port(&nl, &links, &o.name, &o.alias, bl.index).await?;
                        for peer in &o.config.peers {
                            nl.add_flood_peer(index, *peer).await.map_err(net_err)?;
                        }
                    }
                    if let Some(u) = &b.uplink {
                        // The uplink carries the segment tagged with its VLAN.
                        ensure_port(&nl, &links, &u.name, &u.alias, bl.index).await?;
                    }
                }

                // One TAP per segment NIC, a port of its segment's bridge. One listing says which are
                // as wanted already; only the others are made or set (at 500 NICs, three calls per
                // TAP on every repair pass were most of its time).
                let mut tap_index = HashMap::new();
                let mut taps_fixed = 0usize;
                for t in &plan.taps {
                    let Some(bl) = find(&links, &t.bridge) else {
                        continue;
                    };
                    let alias = netplan::tap_alias(&t.vm, t.index);
                    let index = match find(&links, &t.nic.tap) {
                        Some(l)
                            if l.up
                                && l.controller == Some(bl.index)
                                && l.alias.as_deref() == Some(&alias) =>
                        {
                            l.index
                        }
                        _ => {
                            taps_fixed += 1;
                            ensure_tap(&nl, &t.vm, t.index, &t.nic, bl.index).await?
                        }
                    };
                    tap_index.insert(t.nic.tap.clone(), index);
                }
                for (vm, i, tap) in &plan.orphans {
                    tracing::error!(vm = %vm, "NIC {i} ({tap}) is on a segment that does not exist");
                }

                // Whatever the agent made that nothing wants any more.
                for (index, name) in deletes {
                    tracing::info!("removing {name}");
                    if let Err(e) = nl.del_link(index).await {
                        tracing::warn!("cannot remove {name}: {e}");
                    }
                }
                (links, tap_index, taps_fixed)
            }
        };

        let links_ms = began.elapsed().as_secs_f64() * 1e3;
        // Filters and routing policy: only what differs from the kernel's tables.
        let (rules, marks) = netplan::ruleset(&plan, &segs, &tap_index);
        let filter = self.net.filter.clone();
        if plan.is_empty() {
            // Nothing to filter: the agent's tables go too.
            match tokio::task::spawn_blocking(move || filter.remove_tables())
                .await
                .map_err(net_err)?
            {
                Ok(()) | Err(nft::NftError::Spawn(_)) => {}
                Err(e) => return Err(net_err(e)),
            }
        } else {
            let report = tokio::task::spawn_blocking(move || filter.sync(&rules))
                .await
                .map_err(net_err)?
                .map_err(net_err)?;
            if report.changed() || taps_fixed > 0 {
                tracing::info!(
                    rewrote = ?report.rewrote,
                    added = report.added,
                    removed = report.removed,
                    taps_fixed,
                    ms = began.elapsed().as_millis() as u64,
                    "network brought in line with the records"
                );
            }
        }
        self.net
            .active
            .store(!plan.is_empty(), std::sync::atomic::Ordering::Relaxed);
        *lock(&self.net.marks) = marks
            .into_iter()
            .map(|(mark, (vm, nic))| (mark, NicOwner { vm, nic }))
            .collect();

        // Host-wide switches (this network namespace only).
        let _ = netlink::sysctl("net/ipv4/tcp_fwmark_accept", "1");
        if plan.forward_v4 {
            netlink::sysctl("net/ipv4/ip_forward", "1").map_err(net_err)?;
        }
        if plan.forward_v6 {
            netlink::sysctl("net/ipv6/conf/all/forwarding", "1").map_err(net_err)?;
        }

        // Router advertisements and DHCP servers: keep the running ones the plan still has,
        // start the missing ones. (A service dropped from its map stops.)
        let mut ra = lock(&self.net.ra);
        ra.retain(|id, t| plan.ra.iter().any(|r| &r.segment == id) && t.is_running());
        for r in &plan.ra {
            if ra.contains_key(&r.segment) {
                continue;
            }
            if let Some(gl) = find(&links, &r.bridge) {
                let adv = bexar_hostnet::ra::Advertiser {
                    ifname: r.bridge.clone(),
                    ifindex: gl.index,
                    mac: gl.mac.unwrap_or([0; 6]),
                    prefix: r.prefix,
                };
                ra.insert(r.segment.clone(), adv.start());
            }
        }
        drop(ra);
        let mut dhcp = lock(&self.net.dhcp);
        dhcp.retain(|id, (w, _)| plan.dhcp.iter().any(|d| &d.segment == id) && w.is_running());
        let mut started_dhcp = false;
        for d in &plan.dhcp {
            if dhcp.contains_key(&d.segment) {
                continue;
            }
            started_dhcp = true;
            let bindings = Bindings::default();
            let server = bexar_hostnet::dhcp::Server {
                ifname: d.bridge.clone(),
                server_id: d.server_id,
                bindings: bindings.clone(),
            };
            dhcp.insert(d.segment.clone(), (server.start(), bindings));
        }
        drop(dhcp);
        if started_dhcp || *lock(&self.net.bindings_at) != Some(*self.version.borrow()) {
            self.refresh_bindings();
        }
        tracing::debug!(
            quiet,
            changed,
            same_plan,
            links_ms,
            ms = began.elapsed().as_secs_f64() * 1e3,
            "network pass"
        );
        if !quiet {
            *lock(&self.net.looked) = std::time::Instant::now();
            // What this pass changed itself was announced too; it is in line now. (A change
            // someone else made meanwhile waits for the next pass that looks anyway.)
            if let Some(w) = lock(&self.net.watch).as_mut() {
                w.changed();
            }
        }
        *lock(&self.net.last) = Some(LastSync {
            plan,
            links,
            tap_index,
        });
        Ok(())
    }

    /// Rewrites the DHCP bindings of every segment from the VM records.
    pub(super) fn refresh_bindings(&self) {
        *lock(&self.net.bindings_at) = Some(*self.version.borrow());
        let segs = lock(&self.net.segments).clone();
        let mut per: HashMap<String, HashMap<[u8; 6], Binding>> = HashMap::new();
        for e in self.entries() {
            let r = lock(&e.rec);
            let host = r.metadata.hostname.clone().unwrap_or_else(|| r.id.clone());
            for n in &r.nics {
                let (Some(seg), Some(addr)) = (&n.segment, n.ipv4) else {
                    continue;
                };
                let Some(v4) = segs.get(seg).and_then(|s| s.ipv4.as_ref()) else {
                    continue;
                };
                per.entry(seg.clone()).or_default().insert(
                    n.mac_bytes(),
                    Binding {
                        addr,
                        prefix_len: v4.subnet.prefix_len(),
                        gateway: v4.gateway,
                        hostname: host.clone(),
                    },
                );
            }
        }
        for (id, (_, b)) in lock(&self.net.dhcp).iter() {
            *lock(b) = per.remove(id).unwrap_or_default();
        }
    }

    /// Wires the segment NICs of one VM (TAP, bridge port, filter) without touching anything
    /// else, so the cost does not grow with the number of VMs. Falls back to a full sync if
    /// the rest is not in place (the segment's bridge or the tables missing).
    pub(super) async fn wire_nics(&self, rec: &VmRecord) -> Result<(), AgentError> {
        if let Err(e) = self.try_wire_nics(rec).await {
            tracing::info!(vm = %rec.id, "wiring the NICs alone failed ({e}); syncing everything");
            return self.sync_network().await;
        }
        Ok(())
    }

    async fn try_wire_nics(&self, rec: &VmRecord) -> Result<(), AgentError> {
        let _guard = self.net.sync.lock().await;
        let nl = self.net.netlink()?;
        for (i, n) in rec.nics.iter().enumerate() {
            let Some(seg) = &n.segment else { continue };
            let br = nl
                .link(&segment_links(seg).0)
                .await
                .map_err(net_err)?
                .ok_or_else(|| net_err(format!("segment {seg} has no bridge")))?;
            let index = ensure_tap(&nl, &rec.id, i, n, br.index).await?;
            let rule = nic_rule(n, index);
            let mark = rule.mark;
            let filter = self.net.filter.clone();
            tokio::task::spawn_blocking(move || filter.add_nic(&rule))
                .await
                .map_err(net_err)?
                .map_err(net_err)?;
            lock(&self.net.marks).insert(
                mark,
                NicOwner {
                    vm: rec.id.clone(),
                    nic: i,
                },
            );
        }
        self.net
            .active
            .store(true, std::sync::atomic::Ordering::Relaxed);
        drop(_guard);
        self.refresh_bindings();
        Ok(())
    }

    /// Removes the TAPs and filters of a deleted VM's NICs (a full sync if that fails).
    pub(super) async fn unwire_nics(&self, vm: &str, nics: &[NicState]) {
        let r = async {
            let _guard = self.net.sync.lock().await;
            let nl = self.net.netlink()?;
            for n in nics.iter().filter(|n| n.segment.is_some()) {
                let link = nl.link(&n.tap).await.map_err(net_err)?;
                // A map element is deleted by its key: the index only matters for the mark
                // kept in memory.
                let rule = nic_rule(n, link.as_ref().map_or(0, |l| l.index));
                let filter = self.net.filter.clone();
                tokio::task::spawn_blocking(move || filter.remove_nic(&rule))
                    .await
                    .map_err(net_err)?
                    .map_err(net_err)?;
                if let Some(l) = link {
                    lock(&self.net.marks).remove(&(MARK_BASE | l.index));
                    nl.del_link(l.index).await.map_err(net_err)?;
                }
            }
            Ok::<(), AgentError>(())
        }
        .await;
        self.refresh_bindings();
        if let Err(e) = r {
            tracing::info!(vm = %vm, "removing the NICs alone failed ({e}); syncing everything");
            if let Err(e) = self.sync_network().await {
                tracing::error!(vm = %vm, "cannot remove the VM's NICs: {e}");
            }
        }
    }

    /// Whether the agent has network state to clean up even with no segments or NICs: links
    /// it tagged, left by an earlier run.
    fn net_touched(&self) -> bool {
        let Ok(list) = std::fs::read_dir("/sys/class/net") else {
            return false;
        };
        list.flatten().any(|e| {
            // The alias is read only for a name that could be ours.
            netplan::has_our_name(&e.file_name().to_string_lossy())
                && netplan::has_our_alias(
                    std::fs::read_to_string(e.path().join("ifalias"))
                        .ok()
                        .as_deref(),
                )
        })
    }

    /// Sets what the metadata service tells VM `id`'s guest.
    pub fn set_metadata(
        &self,
        id: &str,
        md: super::spec::VmMetadata,
    ) -> Result<VmRecord, AgentError> {
        md.validate()?;
        let entry = self.entry(id)?;
        let rec = self.update(&entry, |r| r.metadata = md)?;
        self.refresh_bindings();
        Ok(rec)
    }

    /// The record of the VM owning `owner`'s NIC.
    pub fn nic_record(&self, owner: &NicOwner) -> Option<(VmRecord, NicState)> {
        let rec = self.get(&owner.vm).ok()?;
        let nic = rec.nics.get(owner.nic)?.clone();
        Some((rec, nic))
    }

    /// The segment of a NIC.
    pub fn segment_of(&self, nic: &NicState) -> Option<SegmentSpec> {
        nic.segment
            .as_deref()
            .and_then(|s| lock(&self.net.segments).get(s).cloned())
    }
}

/// Makes NIC `i` of VM `vm` a TAP (created persistent if missing) that is an up port of
/// bridge `bridge`, without IPv6 of the host's own; returns its interface index.
async fn ensure_tap(
    nl: &Netlink,
    vm: &str,
    i: usize,
    n: &NicState,
    bridge: u32,
) -> Result<u32, AgentError> {
    let tl = match nl.link(&n.tap).await.map_err(net_err)? {
        Some(l) => l,
        None => {
            Tap::create_persistent(&n.tap).map_err(net_err)?;
            nl.link(&n.tap)
                .await
                .map_err(net_err)?
                .ok_or_else(|| net_err(format!("{} did not appear", n.tap)))?
        }
    };
    let _ = netlink::sysctl(&format!("net/ipv6/conf/{}/disable_ipv6", n.tap), "1");
    nl.set_link(tl.index, &netplan::tap_alias(vm, i), Some(bridge), true)
        .await
        .map_err(net_err)?;
    Ok(tl.index)
}

/// Makes link `name` (one the agent made: an uplink VLAN or a VXLAN interface) an up port of
/// bridge `bridge`, tagged `alias`, without IPv6 of its own; returns its index. Sets it only
/// when it differs (a link set is announced to every listener even when it changes nothing).
async fn ensure_port(
    nl: &Netlink,
    links: &[Link],
    name: &str,
    alias: &str,
    bridge: u32,
) -> Result<u32, AgentError> {
    let l = find(links, name).ok_or_else(|| net_err(format!("{name} missing")))?;
    let _ = netlink::sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1");
    if l.alias.as_deref() != Some(alias) || !l.up || l.controller != Some(bridge) {
        nl.set_link(l.index, alias, Some(bridge), true)
            .await
            .map_err(net_err)?;
    }
    Ok(l.index)
}

fn find<'a>(links: &'a [Link], name: &str) -> Option<&'a Link> {
    links.iter().find(|l| l.name == name)
}
