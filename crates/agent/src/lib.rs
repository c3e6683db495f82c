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
pub mod imds;
mod lifecycle;
pub mod netplan;
pub mod network;
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
    /// The state directory failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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
}

impl Agent {
    /// Opens the state directory, loads every VM, re-adopts running VMMs and resolves whatever
    /// a previous agent left half-done.
    pub async fn open(config: AgentConfig) -> Result<Arc<Self>, AgentError> {
        let store = Store::open(&config.state_dir)?;
        let records = store.load_all()?;
        let events = Events::open(store.root());
        let net = network::Network::open(store.root(), config.network.clone())?;
        let agent = Arc::new(Self {
            config,
            store,
            vms: Mutex::new(BTreeMap::new()),
            events,
            info: host::host_info(),
            version: watch::channel(0).0,
            net,
        });
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
                    }),
                );
            }
        }
        agent.recover().await;
        // Re-adopt the network as it is (links and rules survive an agent restart), repair
        // what is missing, remove what an interrupted operation left behind.
        if let Err(e) = agent.sync_network().await {
            tracing::error!("cannot set up the network: {e}");
        }
        Ok(agent)
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
        let mut rec = lock(&entry.rec);
        let mut next = rec.clone();
        f(&mut next);
        if next == *rec {
            return Ok(next);
        }
        next.status.updated_ms = now_ms();
        self.store.save(&next)?;
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

    /// Every VM whose labels match `selector` (see [`VmSpec::matches`]), by id.
    pub fn list(&self, selector: Option<&str>) -> Vec<VmRecord> {
        self.entries()
            .iter()
            .map(|e| Self::snapshot(e))
            .filter(|r| selector.is_none_or(|s| r.spec.matches(s)))
            .collect()
    }

    /// The host's inventory now.
    pub fn inventory(&self) -> Inventory {
        self.inventory_of(&lock(&self.vms))
    }

    /// The inventory given the VM map (whose lock the caller holds).
    fn inventory_of(&self, vms: &BTreeMap<String, Arc<VmEntry>>) -> Inventory {
        let specs: Vec<VmSpec> = vms.values().map(|e| lock(&e.rec).spec.clone()).collect();
        host::inventory(&self.config.capacity, self.store.root(), specs.iter())
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
        host::admit(&self.inventory_of(&vms), &spec).map_err(AgentError::Capacity)?;
        let taken: Vec<_> = vms
            .values()
            .flat_map(|e| lock(&e.rec).nics.clone())
            .collect();
        let nics = self.resolve_nics(&spec, &taken)?;
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
            }),
            nics,
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

    /// The control sockets of VMs with a running VMM, for metrics.
    pub fn running(&self) -> Vec<(String, PathBuf)> {
        self.entries()
            .iter()
            .filter(|e| lock(&e.rec).state.has_vmm())
            .map(|e| (e.id.clone(), self.store.vm_dir(&e.id)))
            .collect()
    }
}
