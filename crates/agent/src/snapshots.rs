//! Snapshots of VMs: taken through the VMM's control socket into the VM's directory, listed and
//! deleted under the VM, and used by new VMs (`restore` in a spec) on this host or, copied, on
//! another.
//!
//! A snapshot lives in `vms/ID/snapshots/NAME/`: the VMM's `vm.state` and `memory`
//! ([`bexar_vmm::snapshot`]) and the agent's `snapshot.json` ([`SnapshotInfo`]), written last.
//! The VMM writes its state file last and atomically, so a directory with a state file that reads
//! holds a whole snapshot even without `snapshot.json` (the agent died before writing it): its
//! description is then made from the files ([`finished`]). Anything less is a snapshot that did
//! not finish, never listed and removed when its name is used again. A VM created from a snapshot gets its own hard links to the two files
//! (a copy across file systems) in `vms/NEW/restore/`, so deleting the snapshot, or its VM,
//! never takes the files from under a VM that will restore them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::events::EventKind;
use super::spec::FieldError;
use super::spec::{now_ms, valid_id, Desired, Operation, OperationKind, Phase, VmSpec};
use super::store::write_atomic;
use super::vmm_process as vp;
use super::{Agent, AgentError};
use bexar_vmm::control::Request;
use bexar_vmm::snapshot::{self, AfterSnapshot, SnapshotState};

/// The agent's description of a snapshot, beside its files.
const INFO: &str = "snapshot.json";
/// Where a VM created from a snapshot keeps its links to the files.
pub const RESTORE_DIR: &str = "restore";
/// How long a VMM may take to write a snapshot (memory is copied at disk speed).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// `POST /v1/vms/{id}/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot's name, unique under the VM (a VM id's characters).
    pub name: String,
    /// What the VM does afterwards: `resume` (the default), `pause`, `stop`, or `suspend` (stop,
    /// and restore this snapshot at the VM's next start).
    #[serde(default)]
    pub then: AfterSnapshot,
}

/// A snapshot as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// The VM it was taken of.
    pub vm: String,
    /// Unix time (ms) it was taken.
    pub created_ms: u64,
    /// Its directory (`vm.state` and `memory`), to copy to another host.
    pub path: PathBuf,
    /// The state file's size in bytes.
    pub state_bytes: u64,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Bytes of it the memory file holds (the rest are holes).
    pub memory_saved_bytes: u64,
    /// How long the VM was paused for it, in milliseconds.
    pub paused_ms: f64,
}

fn invalid(field: &str, msg: impl Into<String>) -> AgentError {
    AgentError::Invalid(FieldError::new(field, msg))
}

impl Agent {
    fn snapshots_dir(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("snapshots")
    }

    /// Takes a snapshot of a running or paused VM, then resumes, pauses, stops or suspends it.
    pub async fn take_snapshot(
        self: &Arc<Self>,
        id: &str,
        req: SnapshotRequest,
    ) -> Result<SnapshotInfo, AgentError> {
        if !valid_id(&req.name) {
            return Err(invalid(
                "name",
                "must be 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit",
            ));
        }
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = Self::snapshot(&entry);
        if !matches!(rec.state, Phase::Running | Phase::Paused) {
            return Err(AgentError::IllegalTransition {
                id: id.to_owned(),
                action: "snapshot",
                state: rec.state.as_str(),
            });
        }
        let dir = self.snapshots_dir(id).join(&req.name);
        if finished(&dir, id).is_some() {
            return Err(AgentError::SnapshotExists {
                vm: id.to_owned(),
                name: req.name,
            });
        }
        // What an earlier attempt that never finished left.
        let _ = std::fs::remove_dir_all(&dir);
        let before = rec.desired;
        self.update(&entry, |r| {
            r.operation = Some(Operation {
                kind: OperationKind::Snapshot,
                started_ms: now_ms(),
                progress: None,
                destination: None,
                timeout_ms: None,
            });
            if req.then.ends_vmm() {
                // The VMM ends once the snapshot is durable: not a failure to restart from.
                r.desired = Desired::Stopped;
                r.generation += 1;
            }
        })?;
        let created_ms = now_ms();
        // A jailed VMM sees only its root: it writes the snapshot there (`/out/snapshot-NAME`), and
        // the agent moves it into place once it is durable.
        let vm_dir = self.vm_dir(id);
        let staged = rec
            .status
            .pid
            .and_then(|pid| super::sandbox::jail_root_of(pid, &vm_dir))
            .map(|root| {
                let name = std::path::Path::new(bexar_vmm::launch::files::JAIL_OUT)
                    .join(format!("snapshot-{}", req.name));
                (std::path::Path::new("/").join(&name), root.join(name))
            });
        if let Some((_, host)) = &staged {
            let _ = std::fs::remove_dir_all(host);
        }
        let asked = staged
            .as_ref()
            .map_or(dir.clone(), |(inside, _)| inside.clone());
        let result = vp::exchange(
            &self.vm_dir(id),
            &Request::Snapshot {
                dir: asked,
                then: req.then,
            },
            SNAPSHOT_TIMEOUT,
        )
        .await
        .and_then(|r| {
            let Some((_, host)) = &staged else {
                return Ok(r);
            };
            if let Some(parent) = dir.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            super::sandbox::adopt_staged(host, &dir)
                .map(|()| r)
                .map_err(|e| {
                    let _ = std::fs::remove_dir_all(host);
                    vp::VmmProcessError::Refused {
                        op: "snapshot".into(),
                        err: format!("the snapshot the jailed VMM wrote cannot be taken in: {e}"),
                    }
                })
        })
        .and_then(|(reply, _)| {
            reply.snapshot.ok_or_else(|| vp::VmmProcessError::Refused {
                op: "snapshot".into(),
                err: "the VMM answered without a report".into(),
            })
        });
        let report = match result {
            Ok(r) => r,
            Err(err) => {
                let _ = self.update(&entry, |r| {
                    r.operation = None;
                    if r.desired != before {
                        r.desired = before;
                        r.generation += 1;
                    }
                });
                let _ = std::fs::remove_dir_all(&dir);
                return Err(AgentError::Vmm {
                    id: id.to_owned(),
                    err,
                });
            }
        };
        let info = SnapshotInfo {
            name: req.name.clone(),
            vm: id.to_owned(),
            created_ms,
            path: dir.clone(),
            state_bytes: report.state_bytes,
            memory_bytes: report.memory_bytes,
            memory_saved_bytes: report.memory_saved_bytes,
            paused_ms: report.paused_ms,
        };
        let data = serde_json::to_vec_pretty(&info).map_err(super::StoreError::from)?;
        write_atomic(&dir.join(INFO), &data).map_err(super::StoreError::from)?;
        // A suspend: the VM's own links to the files, then the record that says the next start
        // restores them. An agent that dies between the two leaves a VM that boots afresh at
        // its next start (its disks were flushed when the VMM ended), never one that restores
        // files it does not have.
        let suspend = req.then == AfterSnapshot::Suspend;
        if suspend {
            if let Err(e) = link_restore(&dir, &vm_dir) {
                // The VMM has ended: the VM is stopped, its state in the snapshot only. Said so,
                // rather than a suspend that would boot afresh at the next start.
                let _ = self.update(&entry, |r| r.operation = None);
                tracing::error!(vm = %id, "suspend: cannot take the snapshot in to restore: {e}");
                return Err(AgentError::Vmm {
                    id: id.to_owned(),
                    err: vp::VmmProcessError::Refused {
                        op: "suspend".into(),
                        err: format!(
                            "the VM stopped and its state is in snapshot {}, but it cannot be \
                             linked for its next start ({e}): create a VM from the snapshot",
                            req.name
                        ),
                    },
                });
            }
        }
        let rec = self.update(&entry, |r| {
            r.operation = None;
            if suspend {
                r.restore_pending = true;
            }
            if req.then == AfterSnapshot::Pause && r.state == Phase::Running {
                r.state = Phase::Paused;
                r.desired = Desired::Paused;
                r.generation += 1;
            } else if req.then == AfterSnapshot::Resume && r.state == Phase::Paused {
                r.state = Phase::Running;
                r.desired = Desired::Running;
                r.generation += 1;
            }
        })?;
        self.events.emit(
            id,
            EventKind::Snapshotted,
            Some(rec.state),
            format!(
                "snapshot {}: {} of {} bytes of memory, paused {:.1} ms, then {}",
                info.name,
                info.memory_saved_bytes,
                info.memory_bytes,
                info.paused_ms,
                serde_json::to_value(req.then)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
        );
        Ok(info)
    }

    /// The finished snapshots of a VM, oldest first.
    pub fn snapshots(&self, id: &str) -> Result<Vec<SnapshotInfo>, AgentError> {
        self.entry(id)?;
        let mut list: Vec<SnapshotInfo> = std::fs::read_dir(self.snapshots_dir(id))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| finished(&e.path(), id))
            .collect();
        list.sort_by_key(|s| (s.created_ms, s.name.clone()));
        Ok(list)
    }

    /// Deletes a snapshot of a VM (VMs created from it keep their own links to its files).
    pub fn delete_snapshot(&self, id: &str, name: &str) -> Result<(), AgentError> {
        self.entry(id)?;
        let not_found = || AgentError::SnapshotNotFound {
            vm: id.to_owned(),
            name: name.to_owned(),
        };
        if !valid_id(name) {
            return Err(not_found());
        }
        let dir = self.snapshots_dir(id).join(name);
        if finished(&dir, id).is_none() {
            return Err(not_found());
        }
        // The state file goes first (then the description): a crash half-way leaves an
        // unfinished snapshot, which is never listed and is removed when the name is used again.
        let _ = std::fs::remove_file(snapshot::state_path(&dir));
        match std::fs::remove_file(dir.join(INFO)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => {
                let path = dir.join(INFO);
                return Err(
                    super::StoreError::from(bexar_util::fs::io_err("remove", &path)(e)).into(),
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// The snapshot directory a spec's `restore` names, checked against the spec: it must be a
    /// snapshot this VMM reads, with the spec's vCPUs, memory and devices.
    pub(super) fn restore_source(&self, spec: &VmSpec) -> Result<Option<PathBuf>, AgentError> {
        let Some(r) = &spec.restore else {
            return Ok(None);
        };
        let dir = match (&r.vm, &r.snapshot, &r.path) {
            (Some(vm), Some(name), _) => {
                let dir = self.snapshots_dir(vm).join(name);
                if finished(&dir, vm).is_none() {
                    return Err(invalid(
                        "restore.snapshot",
                        format!("VM {vm:?} has no snapshot {name:?}"),
                    ));
                }
                dir
            }
            (_, _, Some(p)) => p.clone(),
            _ => return Err(invalid("restore", "give either vm and snapshot, or path")),
        };
        let field = if r.path.is_some() {
            "restore.path"
        } else {
            "restore.snapshot"
        };
        let state = snapshot::read_state(&dir).map_err(|e| invalid(field, e.to_string()))?;
        check_fits(spec, &state).map_err(|m| invalid(field, m))?;
        let memory = snapshot::memory_path(&dir);
        match std::fs::metadata(&memory) {
            Ok(m) if m.len() == state.memory.size => {}
            Ok(m) => {
                return Err(invalid(
                    field,
                    format!(
                        "{} has {} bytes; the snapshot's memory is {}",
                        memory.display(),
                        m.len(),
                        state.memory.size
                    ),
                ))
            }
            Err(e) => return Err(invalid(field, format!("{}: {e}", memory.display()))),
        }
        Ok(Some(dir))
    }
}

/// The description of the finished snapshot in `dir` (of VM `vm`): its `snapshot.json`, or, if
/// the agent died between the VMM's last write and its own, one made from the files (and
/// written, so that it is made once). `None` for a directory that holds no whole snapshot.
fn finished(dir: &Path, vm: &str) -> Option<SnapshotInfo> {
    if let Ok(data) = std::fs::read(dir.join(INFO)) {
        return serde_json::from_slice(&data).ok();
    }
    let state = snapshot::read_state(dir).ok()?;
    let meta = std::fs::metadata(snapshot::state_path(dir)).ok()?;
    let memory = std::fs::metadata(snapshot::memory_path(dir)).ok()?;
    if memory.len() != state.memory.size {
        return None;
    }
    let created_ms = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    let info = SnapshotInfo {
        name: dir.file_name()?.to_string_lossy().into_owned(),
        vm: vm.to_owned(),
        created_ms,
        path: dir.to_owned(),
        state_bytes: meta.len(),
        memory_bytes: state.memory.size,
        memory_saved_bytes: state.memory.saved,
        paused_ms: 0.0,
    };
    tracing::info!(vm, snapshot = %info.name, "a snapshot the agent had not recorded: recorded now");
    if let Ok(data) = serde_json::to_vec_pretty(&info) {
        let _ = write_atomic(&dir.join(INFO), &data);
    }
    Some(info)
}

/// Whether a snapshot's machine is the one `spec` describes.
fn check_fits(spec: &VmSpec, s: &SnapshotState) -> Result<(), String> {
    let c = &s.config;
    let differ = |what: &str, snap: String, spec: String| {
        Err(format!("the snapshot has {snap} {what}, the spec {spec}"))
    };
    if c.vcpus != spec.vcpus {
        return differ("vCPUs", c.vcpus.to_string(), spec.vcpus.to_string());
    }
    if c.memory_mib != spec.memory_mib {
        return differ(
            "MiB of memory",
            c.memory_mib.to_string(),
            spec.memory_mib.to_string(),
        );
    }
    if c.disks.len() != spec.disks.len() {
        return differ(
            "disks",
            c.disks.len().to_string(),
            spec.disks.len().to_string(),
        );
    }
    if c.nics.len() != spec.nics.len() {
        return differ(
            "NICs",
            c.nics.len().to_string(),
            spec.nics.len().to_string(),
        );
    }
    if c.rng != spec.rng {
        return differ(
            "entropy devices",
            u8::from(c.rng).to_string(),
            u8::from(spec.rng).to_string(),
        );
    }
    if c.vsock.is_some() != spec.vsock.is_some() {
        return differ(
            "vsock devices",
            u8::from(c.vsock.is_some()).to_string(),
            u8::from(spec.vsock.is_some()).to_string(),
        );
    }
    Ok(())
}

/// Gives VM directory `vm_dir` its own links to the snapshot files in `from` (copies where a
/// link cannot cross file systems).
pub(super) fn link_restore(from: &Path, vm_dir: &Path) -> std::io::Result<()> {
    let to = vm_dir.join(RESTORE_DIR);
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to)?;
    for name in [snapshot::files::STATE, snapshot::files::MEMORY] {
        let (a, b) = (from.join(name), to.join(name));
        if std::fs::hard_link(&a, &b).is_err() {
            std::fs::copy(&a, &b)?;
            std::fs::File::open(&b)?.sync_all()?;
        }
    }
    let sync =
        |d: &Path| bexar_util::fs::sync_dir(d).map_err(|e| std::io::Error::other(e.to_string()));
    sync(&to)?;
    sync(vm_dir)?;
    Ok(())
}
