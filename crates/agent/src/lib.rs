//! The host agent: owns every VM on the host, each run by its own `bexar vmm` process that
//! outlives the agent. The agent keeps one record per VM (spec, desired state, observed status,
//! operation in flight) in its state directory, serialises operations per VM, re-adopts running
//! VMMs when it starts, and applies restart policies.
//!
//! [`Agent`] is the domain layer; [`api`] puts HTTP in front of it, [`imds`] serves the guests'
//! metadata, and `bexar-hostnet` does the host's side of the network.

pub mod api;
pub mod events;
pub mod host;
pub mod images;
pub mod imds;
mod lifecycle;
pub mod migrate;
pub mod netplan;
pub mod network;
pub mod sandbox;
pub mod segment;
pub mod snapshots;
pub mod spec;
pub mod store;
pub mod vmm_process;
mod wire;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use bexar_util::sync::lock;
use events::Events;
use host::{CapacityConfig, HostInfo, Inventory};
use spec::{
    now_ms, Desired, FieldError, Operation, OperationKind, Phase, VmRecord, VmSpec, VmStatus,
};
use store::{Store, StoreError};

/// Which rate limit to change ([`Agent::set_rate_limit`]).
#[derive(Debug, Clone)]
pub enum RateTarget {
    /// Disk `index`'s one limit.
    Disk {
        /// The disk, in spec order.
        index: usize,
        /// Its limit (empty: none).
        limit: bexar_devices::rate_limiter::RateLimitConfig,
    },
    /// NIC `index`'s limits.
    Nic {
        /// The NIC, in spec order.
        index: usize,
        /// Frames to the guest.
        rx: bexar_devices::rate_limiter::RateLimitConfig,
        /// Frames from the guest.
        tx: bexar_devices::rate_limiter::RateLimitConfig,
    },
}

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/bexar/agent.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bexar";

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The binary VMM processes run (normally this one).
    pub exe: PathBuf,
    /// What may be allocated.
    pub capacity: CapacityConfig,
    /// First restart delay of the restart policy (doubles per restart, at most a minute).
    pub restart_backoff: Duration,
    /// Default time a graceful stop waits before forcing.
    pub stop_timeout: Duration,
    /// Bridge and uplink of the segments.
    pub network: network::NetworkConfig,
    /// The VMMs' jail and cgroups.
    pub sandbox: sandbox::SandboxConfig,
    /// Live migration between hosts (`None`: off).
    pub migration: Option<migrate::MigrationConfig>,
}

/// Why an agent operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No such VM.
    #[error("no VM with id {0:?}")]
    NotFound(String),
    /// No such segment.
    #[error("no segment with id {0:?}")]
    SegmentNotFound(String),
    /// No such image.
    #[error("no image with id {0:?}")]
    ImageNotFound(String),
    /// The VM has no such disk or NIC.
    #[error("VM {id:?} has no {what}")]
    NoDevice {
        /// VM id.
        id: String,
        /// What was asked for.
        what: String,
    },
    /// A field of the request is invalid.
    #[error("{0}")]
    Invalid(#[from] FieldError),
    /// A VM (or segment) with this id exists with a different spec.
    #[error("{0:?} already exists with a different spec")]
    Exists(String),
    /// A field clashes with what exists on the host (duplicate MAC, address or VLAN,
    /// overlapping subnet, full segment).
    #[error("{0}")]
    Conflict(FieldError),
    /// The object is still used (a segment with NICs on it).
    #[error("{0}")]
    InUse(String),
    /// The kernel refused the network wiring.
    #[error("network: {0}")]
    Network(#[from] network::NetError),
    /// No such snapshot.
    #[error("VM {vm:?} has no snapshot {name:?}")]
    SnapshotNotFound {
        /// VM id.
        vm: String,
        /// Snapshot name.
        name: String,
    },
    /// A snapshot of this name exists.
    #[error("VM {vm:?} already has a snapshot {name:?}")]
    SnapshotExists {
        /// VM id.
        vm: String,
        /// Snapshot name.
        name: String,
    },
    /// The action is not possible in the VM's current state.
    #[error("cannot {action} VM {id:?}: it is {state}")]
    IllegalTransition {
        /// VM id.
        id: String,
        /// The action.
        action: &'static str,
        /// Its state.
        state: &'static str,
    },
    /// Admission control refused the VM.
    #[error("over capacity: {0}")]
    Capacity(String),
    /// A wait timed out.
    #[error("timed out after {secs} s waiting for VM {id:?} to be {want}; it is {state}")]
    Timeout {
        /// VM id.
        id: String,
        /// Wanted state.
        want: String,
        /// Current state.
        state: String,
        /// Seconds waited.
        secs: f64,
    },
    /// The VMM could not start the VM.
    #[error("VM {id:?} failed to start: {reason}")]
    StartFailed {
        /// VM id.
        id: String,
        /// The VMM's reason.
        reason: String,
    },
    /// The VMM did not do what it was asked.
    #[error("VMM of {id:?}: {err}")]
    Vmm {
        /// VM id.
        id: String,
        /// What went wrong.
        err: vmm_process::VmmProcessError,
    },
    /// A live migration failed after the destination took the VM's record: the VM goes on
    /// here.
    #[error("migration failed: {0}")]
    MigrationFailed(String),
    /// A live migration was cancelled before its switch-over: the VM goes on here.
    #[error("migration cancelled: {0}")]
    MigrationCancelled(String),
    /// The state directory failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<images::ImageError> for AgentError {
    fn from(e: images::ImageError) -> Self {
        match e {
            images::ImageError::Invalid(f) => AgentError::Invalid(f),
            images::ImageError::NotFound(id) => AgentError::ImageNotFound(id),
            images::ImageError::Exists(id) => AgentError::Exists(id),
            images::ImageError::Store(e) => AgentError::Store(e),
        }
    }
}

/// A running VMM the agent watches.
#[derive(Debug, Clone)]
struct VmmHandle {
    token: String,
    pidfd: Arc<OwnedFd>,
    /// Turns true once the exit has been recorded.
    done: watch::Receiver<bool>,
}

/// One VM: its record, its operation lock and its VMM.
struct VmEntry {
    id: String,
    /// Held for the whole of an operation: operations on one VM run one at a time.
    op: tokio::sync::Mutex<()>,
    rec: Mutex<VmRecord>,
    vmm: Mutex<Option<VmmHandle>>,
    /// The live migration of this VM under way, if any (to cancel it).
    migration: Mutex<Option<Arc<migrate::Cancel>>>,
}

/// The agent.
pub struct Agent {
    /// Configuration.
    pub config: AgentConfig,
    store: Store,
    vms: Mutex<BTreeMap<String, Arc<VmEntry>>>,
    /// Lifecycle events.
    pub events: Events,
    /// Static host facts.
    pub info: HostInfo,
    /// Bumped on every record change (waiters watch it).
    version: watch::Sender<u64>,
    /// Segments and the host side of the NICs.
    net: network::Network,
    /// Registered base images.
    pub images: images::Images,
    /// Whether recovery after the agent started has finished (changes wait for it).
    recovered: watch::Sender<bool>,
    /// Whether the first network pass after start has run.
    wired: watch::Sender<bool>,
    /// The VMs' cgroups, where the host has them.
    pub(crate) cgroups: Option<sandbox::Cgroups>,
    /// Network namespaces made ahead for jailed VMMs.
    pub(crate) netns: Arc<sandbox::NetnsPool>,
    /// Out-of-memory kills each VM's cgroup had when its VMM started.
    pub(crate) oom_base: Mutex<std::collections::HashMap<String, u64>>,
    /// VMMs killed by their seccomp filter, and by their cgroup's memory limit.
    pub(crate) sandbox_kills: SandboxKills,
    /// Live migration's TLS, if configured.
    pub(crate) migration: Option<Arc<migrate::MigrationTls>>,
}

/// Counts of VMMs the sandbox stopped.
#[derive(Debug, Default)]
pub struct SandboxKills {
    /// By their seccomp filter.
    pub seccomp: std::sync::atomic::AtomicU64,
    /// By their cgroup's memory limit.
    pub oom: std::sync::atomic::AtomicU64,
}

/// Waits until `flag` is true (it is never lowered again).
async fn raised(flag: &watch::Sender<bool>) {
    let _ = flag.subscribe().wait_for(|r| *r).await;
}

impl Agent {
    /// Opens the state directory, loads every VM, re-adopts running VMMs, resolves whatever
    /// a previous agent left half-done and brings the network in line: [`Agent::load`], then
    /// [`Agent::recover_and_wire`].
    pub async fn open(config: AgentConfig) -> Result<Arc<Self>, AgentError> {
        let agent = Self::load(config)?;
        agent.recover_and_wire().await;
        Ok(agent)
    }

    /// The VMs' cgroups under the configured parent, or none (with a warning) where the host
    /// has no usable hierarchy.
    fn open_cgroups(cfg: &sandbox::SandboxConfig) -> Option<sandbox::Cgroups> {
        let parent = cfg.cgroup_parent.as_ref()?;
        let Some(h) = sandbox::Hierarchy::detect() else {
            tracing::warn!(
                "no cgroup hierarchy with the cpu or memory controller: VMs run unlimited"
            );
            return None;
        };
        let name = h.name();
        let off = match (cfg.favor_dynmods, sandbox::favor_dynmods_mount()) {
            (_, Some(m)) => {
                tracing::debug!("cgroup2 at {} has favordynmods", m.display());
                None
            }
            (false, None) => Some("--no-cgroup-favordynmods".to_owned()),
            (true, None) => match sandbox::favor_dynmods() {
                sandbox::DynMods::AlreadyOn(_) => None,
                sandbox::DynMods::TurnedOn(m) => {
                    tracing::info!(
                        "remounted cgroup2 at {} with favordynmods: a VMM joins its cgroups in \
                         microseconds, not an RCU grace period (--no-cgroup-favordynmods \
                         leaves the mount as it is)",
                        m.display()
                    );
                    None
                }
                sandbox::DynMods::Unavailable(why) => Some(why),
            },
        };
        if let Some(why) = off {
            tracing::warn!(
                "cgroup favordynmods is off ({why}): each VM start waits an RCU grace period \
                 (3-20 ms here) to move its VMM into its cgroups"
            );
        }
        match sandbox::Cgroups::new(h, parent) {
            Ok(c) => {
                tracing::info!("VM cgroups: {name}, under {}", parent.display());
                Some(c)
            }
            Err(e) => {
                tracing::warn!("cannot set up the VMs' cgroups ({e}): VMs run unlimited");
                None
            }
        }
    }

    /// Opens the state directory and loads every record: enough to answer reads. Nothing is
    /// re-adopted and no change is taken until [`Agent::recover_and_wire`] has recovered.
    pub fn load(config: AgentConfig) -> Result<Arc<Self>, AgentError> {
        let t = std::time::Instant::now();
        let store = Store::open(&config.state_dir)?;
        let records = store.load_all()?;
        let n = records.len();
        let events = Events::open(store.root());
        let net = network::Network::open(store.root(), config.network.clone())?;
        let images = images::Images::open(store.root())?;
        let cgroups = Self::open_cgroups(&config.sandbox);
        let migration = match &config.migration {
            None => None,
            Some(m) => {
                Some(Arc::new(migrate::MigrationTls::load(m).map_err(|e| {
                    AgentError::Invalid(FieldError::new("migration", e))
                })?))
            }
        };
        let migration_listen = config.migration.as_ref().and_then(|m| m.listen);
        if !config.sandbox.jail {
            tracing::warn!(
                "VMMs run WITHOUT their jail (--no-jail): as root, in the host's namespaces, \
                 with every system call; a guest that escapes through a device bug owns the host"
            );
        }
        let agent = Arc::new(Self {
            config,
            store,
            vms: Mutex::new(BTreeMap::new()),
            events,
            info: host::HostInfo {
                migration_listen: migration_listen.map(|a| a.to_string()),
                ..host::host_info()
            },
            version: watch::channel(0).0,
            net,
            images,
            recovered: watch::channel(false).0,
            wired: watch::channel(false).0,
            cgroups,
            netns: Arc::new(sandbox::NetnsPool::default()),
            oom_base: Mutex::new(std::collections::HashMap::new()),
            sandbox_kills: SandboxKills::default(),
            migration,
        });
        tracing::info!(
            vms = n,
            ms = t.elapsed().as_millis() as u64,
            "records loaded"
        );
        {
            let mut vms = lock(&agent.vms);
            for rec in records {
                vms.insert(
                    rec.id.clone(),
                    Arc::new(VmEntry {
                        id: rec.id.clone(),
                        op: tokio::sync::Mutex::new(()),
                        rec: Mutex::new(rec),
                        vmm: Mutex::new(None),
                        migration: Mutex::new(None),
                    }),
                );
            }
        }
        Ok(agent)
    }

    /// Re-adopts running VMMs and finishes what a previous agent left half-done (then changes
    /// are taken), and brings the network in line with the records. The API may serve reads
    /// meanwhile: they show the records as last written.
    pub async fn recover_and_wire(self: &Arc<Self>) {
        if self.config.sandbox.jail {
            // Network namespaces for the jails, made before the first start needs one.
            self.netns.refill();
        }
        /// Says "recovered" and "wired" whatever happens, a panic included: changes would
        /// otherwise wait for ever behind a failure that reads do not show.
        struct Done<'a>(&'a Agent);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.recovered.send_replace(true);
                self.0.wired.send_replace(true);
            }
        }
        let done = Done(self);
        let t = std::time::Instant::now();
        self.store.sweep_temp();
        self.recover().await;
        if let Some(cg) = &self.cgroups {
            // What a delete left when a VM's cgroups would not go in time.
            let known: std::collections::HashSet<String> =
                lock(&self.vms).keys().cloned().collect();
            let n = cg.sweep(|id| known.contains(id));
            if n > 0 {
                tracing::info!(cgroups = n, "removed the cgroups of VMs no longer recorded");
            }
        }
        self.recovered.send_replace(true);
        tracing::info!(
            vms = self.entries().len(),
            ms = t.elapsed().as_millis() as u64,
            "agent recovered"
        );
        // Re-adopt the network as it is (links and rules survive an agent restart), repair
        // what is missing, remove what an interrupted operation left behind.
        let t = std::time::Instant::now();
        match self.sync_network().await {
            Ok(()) => tracing::info!(
                ms = t.elapsed().as_millis() as u64,
                "network in line with the records"
            ),
            Err(e) => tracing::error!("cannot set up the network: {e}"),
        }
        drop(done);
    }

    /// Waits until the first network pass after start has run (the metadata service knows
    /// its NICs from then on).
    pub async fn wired(&self) {
        raised(&self.wired).await
    }

    /// Waits until recovery after start has finished.
    pub async fn recovered(&self) {
        raised(&self.recovered).await
    }

    /// Whether recovery after start is still running.
    pub fn recovering(&self) -> bool {
        !*self.recovered.borrow()
    }

    fn entry(&self, id: &str) -> Result<Arc<VmEntry>, AgentError> {
        lock(&self.vms)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(id.to_owned()))
    }

    fn entries(&self) -> Vec<Arc<VmEntry>> {
        lock(&self.vms).values().cloned().collect()
    }

    /// Changes a record durably: `f` edits a copy, the copy is written, and only then does it
    /// replace the record in memory. A failed write leaves the VM as it was.
    fn update(
        &self,
        entry: &VmEntry,
        f: impl FnOnce(&mut VmRecord),
    ) -> Result<VmRecord, AgentError> {
        self.update_then(entry, f, |_| {})
    }

    /// [`Self::update`], then `then` with the new record while readers still see the old one:
    /// events emitted there are in the log before any reader can see the change they report.
    /// Not called when nothing changed.
    fn update_then(
        &self,
        entry: &VmEntry,
        f: impl FnOnce(&mut VmRecord),
        then: impl FnOnce(&VmRecord),
    ) -> Result<VmRecord, AgentError> {
        let mut rec = lock(&entry.rec);
        let mut next = rec.clone();
        f(&mut next);
        if next == *rec {
            return Ok(next);
        }
        next.status.updated_ms = now_ms();
        self.store.save(&next)?;
        then(&next);
        *rec = next.clone();
        drop(rec);
        self.version.send_modify(|v| *v += 1);
        Ok(next)
    }

    fn snapshot(entry: &VmEntry) -> VmRecord {
        lock(&entry.rec).clone()
    }

    /// One VM.
    pub fn get(&self, id: &str) -> Result<VmRecord, AgentError> {
        let e = self.entry(id)?;
        Ok(Self::snapshot(&e))
    }

    /// One page of VMs by id: those after `after` whose labels match `selector` and whose
    /// state is `state`, at most `limit`, and the id to continue after if more may follow.
    /// Ids order the pages, so a VM made meanwhile shows on a later page or not at all, and
    /// none is seen twice or skipped. Costs the page, not the host (without a filter).
    pub fn list_page(
        &self,
        selector: Option<&str>,
        state: Option<spec::Phase>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<VmRecord>, Option<String>) {
        use std::ops::Bound;
        let vms = lock(&self.vms);
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page = Vec::new();
        let mut next = None;
        for (_, e) in vms.range::<str, _>((from, Bound::Unbounded)) {
            let rec = lock(&e.rec);
            if !selector.is_none_or(|s| rec.spec.matches(s))
                || !state.is_none_or(|s| rec.state == s)
            {
                continue;
            }
            if page.len() == limit {
                next = page.last().map(|r: &VmRecord| r.id.clone());
                break;
            }
            page.push(rec.clone());
        }
        (page, next)
    }

    /// The host's inventory now.
    pub fn inventory(&self) -> Inventory {
        self.inventory_of(&lock(&self.vms))
    }

    /// The inventory given the VM map (whose lock the caller holds).
    fn inventory_of(&self, vms: &BTreeMap<String, Arc<VmEntry>>) -> Inventory {
        let recs: Vec<(VmSpec, Vec<spec::DiskState>)> = vms
            .values()
            .map(|e| {
                let r = lock(&e.rec);
                (r.spec.clone(), r.disks.clone())
            })
            .collect();
        host::inventory(
            &self.config.capacity,
            self.store.root(),
            recs.iter().map(|(s, d)| (s, d.as_slice())),
            self.images.bytes(),
        )
    }

    /// Registers a base image (copies and hashes it: blocking, run off the async workers).
    pub fn register_image(
        &self,
        spec: &images::ImageSpec,
    ) -> Result<(images::Image, bool), AgentError> {
        Ok(self.images.register(spec)?)
    }

    /// Removes a base image, refused while a VM's disk is made from it; one that does not
    /// exist is gone already.
    pub fn delete_image(&self, id: &str) -> Result<(), AgentError> {
        // The map lock keeps a create from taking the image meanwhile.
        let vms = lock(&self.vms);
        if self.images.get(id).is_err() {
            return Ok(());
        }
        let users: Vec<String> = vms
            .values()
            .filter(|e| {
                lock(&e.rec)
                    .spec
                    .disks
                    .iter()
                    .any(|d| d.image.as_deref() == Some(id))
            })
            .map(|e| e.id.clone())
            .collect();
        if !users.is_empty() {
            return Err(AgentError::InUse(format!(
                "image {id:?} is used by VM(s) {}",
                users.join(", ")
            )));
        }
        self.images.remove(id)?;
        Ok(())
    }

    /// Connects to each remote disk of `spec` once; returns each disk's size (`None` for local
    /// disks).
    fn probe_remote(spec: &VmSpec) -> Result<Vec<Option<u64>>, AgentError> {
        spec.disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                use bexar_devices::block::{iscsi, nbd, DiskBackend};
                let bad = |field: &str, e: bexar_devices::block::BlockError| {
                    AgentError::Invalid(FieldError::new(
                        format!("disks[{i}].{field}"),
                        e.to_string(),
                    ))
                };
                match (&d.nbd, &d.iscsi) {
                    (Some(t), _) => nbd::open(t, d.read_only)
                        .map(|b| Some(b.info().capacity))
                        .map_err(|e| bad("nbd", e)),
                    (_, Some(t)) => iscsi::open(t, d.read_only)
                        .map(|b| Some(b.info().capacity))
                        .map_err(|e| bad("iscsi", e)),
                    _ => Ok(None),
                }
            })
            .collect()
    }

    /// Resolves the disks of a new VM: opens each path disk (its format probed once, here) and
    /// makes an overlay for each disk made from an image, in the VM's directory. Nothing is
    /// left behind on failure (the directory is removed; one without a record would be
    /// removed at the next start anyway).
    fn make_disks(
        &self,
        spec: &VmSpec,
        remote: &[Option<u64>],
    ) -> Result<Vec<spec::DiskState>, AgentError> {
        use bexar_devices::block::{qcow2, DiskFormat};
        let dir = self.vm_dir(&spec.id);
        let mut out = Vec::with_capacity(spec.disks.len());
        let made = (|| -> Result<(), AgentError> {
            for (i, d) in spec.disks.iter().enumerate() {
                let bad = |field: &str, e: bexar_devices::block::BlockError| {
                    AgentError::Invalid(FieldError::new(
                        format!("disks[{i}].{field}"),
                        e.to_string(),
                    ))
                };
                if d.is_remote() {
                    out.push(spec::DiskState {
                        path: Default::default(),
                        format: DiskFormat::Raw,
                        size: remote.get(i).copied().flatten().unwrap_or(0),
                        rate_limit: d.rate_limit,
                        link: None,
                        backing: None,
                    });
                    continue;
                }
                match (&d.path, &d.image) {
                    (Some(p), _) => {
                        let format = match d.format {
                            Some(f) => f,
                            None => qcow2::probe(p).map_err(|e| bad("path", e))?,
                        };
                        let mut levels = Vec::new();
                        let image = qcow2::open_chain(p, format, false, false, &mut levels)
                            .map_err(|e| bad("path", e))?;
                        out.push(spec::DiskState {
                            path: p.clone(),
                            format,
                            size: image.size(),
                            rate_limit: d.rate_limit,
                            link: None,
                            backing: (format == DiskFormat::Qcow2 && !d.read_only).then(|| {
                                bexar_devices::block::BackingPin {
                                    file: levels.get(1).map(|l| l.path.clone()),
                                    format: levels.get(1).map(|l| l.format),
                                }
                            }),
                        });
                    }
                    (None, Some(id)) => {
                        let img = self.images.get(id).map_err(|_| {
                            AgentError::Invalid(FieldError::new(
                                format!("disks[{i}].image"),
                                format!("no image with id {id:?} (see /v1/images)"),
                            ))
                        })?;
                        let size = d.size_mib.map(|m| m << 20);
                        if size.is_some_and(|s| s < img.virtual_size) {
                            return Err(AgentError::Invalid(FieldError::new(
                                format!("disks[{i}].size_mib"),
                                format!(
                                    "smaller than image {id:?} ({} MiB)",
                                    img.virtual_size.div_ceil(1 << 20)
                                ),
                            )));
                        }
                        if !dir.exists() {
                            use std::os::unix::fs::DirBuilderExt;
                            std::fs::DirBuilder::new()
                                .mode(0o700)
                                .create(&dir)
                                .map_err(|e| {
                                    StoreError::Io(bexar_util::fs::io_err("create", &dir)(e))
                                })?;
                        }
                        let path = dir.join(spec::overlay_name(i));
                        let blob = self.images.blob(&img);
                        let size = qcow2::create_overlay(&path, &blob, img.format, size)
                            .map_err(|e| bad("image", e))?;
                        out.push(spec::DiskState {
                            path,
                            format: DiskFormat::Qcow2,
                            size,
                            rate_limit: d.rate_limit,
                            link: None,
                            backing: (!d.read_only).then_some(bexar_devices::block::BackingPin {
                                file: Some(blob),
                                format: Some(img.format),
                            }),
                        });
                    }
                    (None, None) => {
                        return Err(AgentError::Invalid(FieldError::new(
                            format!("disks[{i}].path"),
                            "give exactly one of path and image",
                        )))
                    }
                }
            }
            Ok(())
        })();
        match made {
            Ok(()) => Ok(out),
            Err(e) => {
                if dir.exists() {
                    let _ = self.store.remove(&spec.id);
                }
                Err(e)
            }
        }
    }

    /// Whether the state directory takes an atomic write (health check).
    pub fn state_writable(&self) -> bool {
        self.store.writable()
    }

    /// The directory of a VM (console log, sockets).
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.store.vm_dir(id)
    }

    /// Defines a VM and wires its NICs (TAPs, filters) so it can start. Returns the record and
    /// whether it was created now (false: an identical VM already existed). If the NICs cannot
    /// be wired the VM is removed again. With `start`, the first record already says a start
    /// is under way (desired running), so an agent that dies before the start finishes it when
    /// it comes back; the caller then calls [`Agent::start`].
    pub async fn create(
        self: &Arc<Self>,
        spec: VmSpec,
        start: bool,
    ) -> Result<(VmRecord, bool), AgentError> {
        let (rec, created) = self.create_record(spec, start)?;
        if created && rec.nics.iter().any(|n| n.segment.is_some()) {
            if let Err(e) = self.wire_nics(&rec).await {
                tracing::error!(vm = %rec.id, "cannot wire the NICs: {e}; removing the VM");
                let _ = self.delete(&rec.id).await;
                return Err(e);
            }
        }
        Ok((rec, created))
    }

    fn create_record(&self, mut spec: VmSpec, start: bool) -> Result<(VmRecord, bool), AgentError> {
        spec.validate()?;
        let restore_from = self.restore_source(&spec)?;
        // Remote disks are reached now, before any lock (a server may take seconds to
        // answer), so that an unreachable server or an unknown export is refused at create,
        // naming the disk.
        let remote = store::blocking(|| Self::probe_remote(&spec))?;
        // Aliases (`baseline`) are stored by their canonical name, so a retry with either
        // spelling is the same spec.
        if let Ok(t) = bexar_vmm::cpuid::CpuTemplate::from_name(&spec.cpu_template) {
            spec.cpu_template = t.name().to_owned();
        }
        // The map lock is held across admission and the first write, so two creates cannot
        // both take the last free capacity.
        let mut vms = lock(&self.vms);
        if let Some(e) = vms.get(&spec.id) {
            let rec = Self::snapshot(e);
            return if rec.spec == spec && rec.state != Phase::Deleting {
                Ok((rec, false))
            } else {
                Err(AgentError::Exists(spec.id))
            };
        }
        let new_disk_mib: u64 = spec
            .disks
            .iter()
            .filter(|d| d.image.is_some())
            .map(|d| {
                d.size_mib.unwrap_or(0).max(
                    d.image
                        .as_deref()
                        .and_then(|id| self.images.get(id).ok())
                        .map_or(0, |i| i.virtual_size.div_ceil(1 << 20)),
                )
            })
            .sum();
        host::admit(&self.inventory_of(&vms), &spec, new_disk_mib).map_err(AgentError::Capacity)?;
        let taken: Vec<_> = vms
            .values()
            .flat_map(|e| lock(&e.rec).nics.clone())
            .collect();
        let nics = self.resolve_nics(&spec, &taken)?;
        let disks = store::blocking(|| self.make_disks(&spec, &remote))?;
        let rec_uuid = spec.uuid.unwrap_or_else(uuid::Uuid::new_v4);
        let now = now_ms();
        let rec = VmRecord {
            id: spec.id.clone(),
            state: Phase::Stopped,
            spec,
            generation: 1,
            desired: if start {
                Desired::Running
            } else {
                Desired::Stopped
            },
            status: VmStatus {
                created_ms: now,
                updated_ms: now,
                ..Default::default()
            },
            operation: start.then_some(Operation {
                kind: OperationKind::Start,
                started_ms: now,
                progress: None,
                destination: None,
                timeout_ms: None,
            }),
            nics,
            disks,
            metadata: Default::default(),
            uuid: rec_uuid,
            restore_pending: restore_from.is_some(),
        };
        if let Err(e) = self.store.save(&rec) {
            let _ = self.store.remove(&rec.id);
            return Err(e.into());
        }
        if let Some(from) = &restore_from {
            if let Err(e) = snapshots::link_restore(from, &self.vm_dir(&rec.id)) {
                let _ = self.store.remove(&rec.id);
                return Err(AgentError::Invalid(spec::FieldError::new(
                    "restore",
                    format!("cannot take the snapshot's files: {e}"),
                )));
            }
        }
        vms.insert(
            rec.id.clone(),
            Arc::new(VmEntry {
                id: rec.id.clone(),
                op: tokio::sync::Mutex::new(()),
                rec: Mutex::new(rec.clone()),
                vmm: Mutex::new(None),
                migration: Mutex::new(None),
            }),
        );
        drop(vms);
        self.version.send_modify(|v| *v += 1);
        self.events
            .emit(&rec.id, events::EventKind::Created, Some(rec.state), "");
        Ok((rec, true))
    }

    /// Waits until VM `id` is in `want` (or, for `None`, gone), for at most `timeout`.
    pub async fn wait(
        &self,
        id: &str,
        want: Option<Phase>,
        timeout: Duration,
    ) -> Result<Option<VmRecord>, AgentError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.version.subscribe();
        loop {
            let current = match self.get(id) {
                Ok(r) => Some(r),
                Err(AgentError::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
            match (&current, want) {
                (None, None) => return Ok(None),
                (Some(r), Some(w)) if r.state == w => return Ok(current),
                (None, Some(_)) => return Err(AgentError::NotFound(id.to_owned())),
                _ => {}
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(AgentError::Timeout {
                    id: id.to_owned(),
                    want: want.map_or("deleted", Phase::as_str).to_owned(),
                    state: current.map_or("deleted", |r| r.state.as_str()).to_owned(),
                    secs: timeout.as_secs_f64(),
                });
            }
        }
    }

    /// Count of VMs per state.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for e in self.entries() {
            *m.entry(lock(&e.rec).state.as_str()).or_insert(0) += 1;
        }
        m
    }

    /// Asks each running VM with remote disks how their connections are, records changes in
    /// the VM's `disks[].link`, and emits `disk-down` / `disk-up` events (run periodically).
    pub async fn watch_remote_disks(self: &Arc<Self>) {
        for e in self.entries() {
            // Looked at under the lock; only a VM with a remote disk is copied (this runs every
            // 2 s over every VM).
            let rec = {
                let r = lock(&e.rec);
                if !r.state.has_vmm() || !r.spec.disks.iter().any(|d| d.is_remote()) {
                    continue;
                }
                r.clone()
            };
            let Ok((Some(info), _)) =
                vmm_process::call(&self.vm_dir(&rec.id), &bexar_vmm::control::Request::Info).await
            else {
                continue;
            };
            // Disks take the first virtio slots, in spec order.
            let links: Vec<Option<String>> = info
                .devices
                .iter()
                .filter(|d| d.kind == "block")
                .map(|d| d.link.clone())
                .collect();
            let mut changes = Vec::new();
            for (i, d) in rec.spec.disks.iter().enumerate() {
                let (Some(url), Some(now)) = (d.remote_url(), links.get(i).cloned().flatten())
                else {
                    continue;
                };
                let before = rec.disks.get(i).and_then(|s| s.link.clone());
                if before.as_deref() != Some(now.as_str()) {
                    changes.push((i, url, before, now));
                }
            }
            if changes.is_empty() {
                continue;
            }
            let _op = e.op.lock().await;
            let saved = self.update_then(
                &e,
                |r| {
                    for (i, _, _, now) in &changes {
                        if let Some(s) = r.disks.get_mut(*i) {
                            s.link = Some(now.clone());
                        }
                    }
                },
                |r| {
                    for (i, url, before, now) in &changes {
                        let kind = if now == "up" {
                            if before.is_none() {
                                continue; // first look: nothing happened
                            }
                            events::EventKind::DiskUp
                        } else {
                            events::EventKind::DiskDown
                        };
                        self.events.emit(
                            &r.id,
                            kind,
                            Some(r.state),
                            format!("disk {i} ({url}): {now}"),
                        );
                    }
                },
            );
            if let Err(err) = saved {
                tracing::warn!(vm = %rec.id, "cannot record a remote disk's link: {err}");
            }
        }
    }

    /// The control sockets of VMs with a running VMM, for metrics.
    pub fn running(&self) -> Vec<(String, PathBuf)> {
        self.entries()
            .iter()
            .filter(|e| lock(&e.rec).state.has_vmm())
            .map(|e| (e.id.clone(), self.store.vm_dir(&e.id)))
            .collect()
    }
}
