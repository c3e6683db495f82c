//! VM lifecycle: start, stop, pause, resume, reboot, delete; watching VMMs end; the restart
//! policy; and recovery when the agent starts.
//!
//! Every action takes the VM's operation lock for its whole duration and writes the record
//! (with the operation in flight) before touching the VMM, so a crash at any point leaves a
//! record that says what was going on. The exit watcher never takes the operation lock: it only
//! records what happened, so an action can wait for it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::events::EventKind;
use super::sandbox;
use super::spec::{
    now_ms, Desired, Operation, OperationKind as Op, Phase, RestartPolicy, VmRecord,
};
use super::store::{layout, write_atomic};
use super::vmm_process::{self as vp};
use super::{Agent, AgentError, RateTarget, VmEntry, VmmHandle};
use bexar_util::sync::lock;
use bexar_vmm::control::{Request, RunState};
use bexar_vmm::launch::{Launch, RunResult};

/// How long a VMM may take from exec to answering on its control socket.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest a live migration into this host may take, from its VMM's launch to the VM
/// running here.
pub(crate) const INCOMING_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long recovery waits for an adopted VMM's first answer before going on without it (it
/// is asked again in the background; a slow VMM is never killed for being slow).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest pause between two attempts to reach an adopted VMM that has not answered yet.
const RECONCILE_MAX_DELAY: Duration = Duration::from_secs(2);
/// How long a forced stop waits at each step (stop request, then SIGKILL).
const FORCE_STEP: Duration = Duration::from_secs(3);
/// How long recovery waits for a live upgrade it finds under way to leave one VMM (the new one
/// waits as long for the old one to hand the VM over).
const HANDOVER_SETTLE: Duration = Duration::from_secs(10);
/// Longest restart back-off.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub(crate) fn op(kind: Op) -> Option<Operation> {
    Some(Operation {
        kind,
        started_ms: now_ms(),
        progress: None,
        destination: None,
        timeout_ms: None,
    })
}

/// A stop or reboot, with the grace the caller gave the guest (zero when forced), so that an
/// agent finishing it after a crash gives no more and no less.
fn ending_op(kind: Op, grace: Duration) -> Option<Operation> {
    op(kind).map(|o| Operation {
        timeout_ms: Some(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)),
        ..o
    })
}

/// What is left of the grace a recorded stop or reboot gave the guest when it began (the
/// agent's default for records written before the grace was recorded).
fn recorded_grace(rec: &VmRecord, default: Duration, now_ms: u64) -> Duration {
    let Some(o) = rec.operation.as_ref() else {
        return default;
    };
    let Some(grace) = o.timeout_ms.map(Duration::from_millis) else {
        return default;
    };
    grace.saturating_sub(Duration::from_millis(now_ms.saturating_sub(o.started_ms)))
}

pub(crate) fn illegal(rec: &VmRecord, action: &'static str) -> AgentError {
    AgentError::IllegalTransition {
        id: rec.id.clone(),
        action,
        state: rec.state.as_str(),
    }
}

/// The last non-empty lines of a VMM's log, as the reason a start failed.
fn log_tail(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(dir.join(layout::VMM_LOG)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(2)..].join(" / ");
    if tail.is_empty() {
        "the VMM exited without a message".into()
    } else {
        tail
    }
}

/// Records in `r` that its VMM is gone: `state`, why, when.
fn mark_ended(r: &mut VmRecord, state: Phase, reason: &str) {
    r.state = state;
    r.status.exit_reason = Some(reason.to_owned());
    r.status.pid = None;
    r.status.pid_start_ticks = None;
    r.status.stopped_ms = Some(now_ms());
}

/// The result of launch `token`: in the jail's root (a jailed VMM writes it there), else in
/// the VM's directory (an unjailed VMM, or a jailed one that failed before it entered).
fn read_result(dir: &std::path::Path, token: &str) -> Option<RunResult> {
    use bexar_vmm::launch::files::{JAIL_OUT, JAIL_ROOT};
    let jailed = dir.join(JAIL_ROOT).join(JAIL_OUT).join(layout::RESULT);
    [jailed, dir.join(layout::RESULT)]
        .into_iter()
        .find_map(|p| {
            // The jailed VMM owns the directory: read as it could have left it, bounded.
            let bytes = sandbox::read_untrusted(&p, sandbox::MAX_RESULT_BYTES)?;
            let r: RunResult = serde_json::from_slice(&bytes).ok()?;
            (r.token == token).then_some(r)
        })
}

/// What recovery found for a VM.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Found {
    /// Its VMM runs and was re-adopted; the state recorded for it (the one it reported, or
    /// the recorded one until it answers).
    adopted: Option<Phase>,
    /// Its last VMM's own account of its end (clean, reason), if it wrote one.
    result: Option<(bool, String)>,
    /// That account says the VMM handed the VM to another VMM (a live migration's sender).
    handed_off: bool,
    /// A VMM receiving the VM by live migration told the sender it holds it
    /// (`layout::INCOMING_COMMITTED`): the VM is this host's, whatever became of that VMM.
    committed: bool,
}

/// What follows a VMM found gone.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AfterEnd {
    /// A start, reboot or restart was under way: finish it.
    Relaunch,
    /// The VM ended on its own: its restart policy decides.
    RestartPolicy,
    /// It was being stopped anyway.
    Nothing,
}

/// What follows the adoption of a live VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AfterAdopt {
    /// Settle its state with it once it answers: finish a pause or resume that was asked, and
    /// make it run or stay paused as the caller last wanted.
    Reconcile,
    /// A stop (or a delete's stop) was under way: finish it.
    FinishStop,
    /// A reboot was under way (its guest may already be shutting down): finish it, so the VM
    /// comes back up rather than being recorded as having stopped on its own.
    FinishReboot,
}

/// What recovery does with a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Recovery {
    /// A delete was interrupted: finish it.
    FinishDelete,
    /// Its VMM runs and proved who it is.
    Adopted {
        /// The state recorded for it.
        state: Phase,
        /// What follows.
        then: AfterAdopt,
    },
    /// Its VMM is gone: record the end, then `then`.
    Ended {
        /// Stopped (it ended cleanly, or was being stopped) or failed.
        state: Phase,
        /// Why, for the record and the event.
        reason: String,
        /// What follows.
        then: AfterEnd,
    },
    /// No VMM, and a start was under way: start it.
    Relaunch,
    /// No VMM and nothing under way.
    Idle {
        /// An operation that cannot matter any more is still recorded: clear it.
        clear_operation: bool,
        /// The caller wants it up: its restart policy decides (a restart that was waiting out
        /// its back-off when the agent died is scheduled again).
        restart_policy: bool,
    },
}

/// The recovery decision for one VM: a table of its record and what was found.
fn decide(rec: &VmRecord, found: &Found) -> Recovery {
    if rec.state == Phase::Deleting {
        return Recovery::FinishDelete;
    }
    let migration = rec.operation.as_ref().map(|o| o.kind);
    if found.adopted.is_none() {
        match migration {
            // A VM that was arriving with no VMM left here runs on the sender still (the
            // sender's VMM resumes when its stream breaks): this copy goes. Unless its VMM had
            // told the sender it holds the VM: then the sender let it go, and it ended here.
            Some(Op::Incoming) if found.committed => {
                return Recovery::Ended {
                    state: Phase::Failed,
                    reason: "its VMM ended after it took the VM over from another host".into(),
                    then: AfterEnd::RestartPolicy,
                }
            }
            Some(Op::Incoming) => return Recovery::FinishDelete,
            // The VM was leaving. Its VMM said it handed the VM over: it is the
            // destination's, and goes here. Without that word it may or may not have: it is
            // recorded failed and never restarted here, so that it cannot run twice; the
            // operator looks at the destination.
            Some(Op::Migrate) if found.handed_off => return Recovery::FinishDelete,
            Some(Op::Migrate) => {
                return Recovery::Ended {
                    state: Phase::Failed,
                    reason: format!(
                        "the VMM ended during a live migration, without saying it handed the                          VM over ({}): the VM may run on the destination; not restarted here",
                        found
                            .result
                            .as_ref()
                            .map_or("no result", |(_, r)| r.as_str())
                    ),
                    then: AfterEnd::Nothing,
                }
            }
            _ => {}
        }
    }
    if let Some(state) = found.adopted {
        let then = if rec.desired == Desired::Stopped {
            AfterAdopt::FinishStop
        } else if rec.operation.as_ref().is_some_and(|o| o.kind == Op::Reboot) {
            AfterAdopt::FinishReboot
        } else {
            AfterAdopt::Reconcile
        };
        return Recovery::Adopted { state, then };
    }
    let starting = rec
        .operation
        .as_ref()
        .is_some_and(|o| matches!(o.kind, Op::Start | Op::Reboot | Op::Restart));
    if rec.state.has_vmm() {
        let expected = rec.desired == Desired::Stopped;
        let (clean, reason) = found.result.clone().unwrap_or_else(|| {
            (
                false,
                "the VMM process ended while the agent was not running, without reporting why"
                    .into(),
            )
        });
        return Recovery::Ended {
            state: if clean || expected {
                Phase::Stopped
            } else {
                Phase::Failed
            },
            reason,
            then: match (starting, expected) {
                (_, true) => AfterEnd::Nothing,
                (true, false) => AfterEnd::Relaunch,
                (false, false) => AfterEnd::RestartPolicy,
            },
        };
    }
    if starting {
        Recovery::Relaunch
    } else {
        Recovery::Idle {
            clear_operation: rec.operation.is_some(),
            restart_policy: rec.desired != Desired::Stopped,
        }
    }
}

impl Agent {
    /// Starts a stopped or failed VM. Starting a running VM is a no-op. A VM with a restore
    /// pending (created from a snapshot, or suspended) restores it, unless `fresh`: then the
    /// saved state is dropped and the kernel boots.
    pub async fn start(self: &Arc<Self>, id: &str, fresh: bool) -> Result<VmRecord, AgentError> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = Self::snapshot(&entry);
        if rec
            .operation
            .as_ref()
            .is_some_and(|o| o.kind == Op::Incoming)
        {
            // Its memory and disks are still on their way from another host.
            return Err(illegal(&rec, "start"));
        }
        match rec.state {
            Phase::Running => return Ok(rec),
            Phase::Stopped | Phase::Failed => {}
            _ => return Err(illegal(&rec, "start")),
        }
        if fresh && rec.restore_pending {
            self.update(&entry, |r| r.restore_pending = false)?;
            let _ = std::fs::remove_dir_all(self.vm_dir(id).join(super::snapshots::RESTORE_DIR));
        }
        self.launch(&entry, Op::Start).await
    }

    /// Stops a running or paused VM: Ctrl-Alt-Del, then (after `timeout`, or at once if
    /// `force`) the VMM is told to stop, then killed. Stopping a stopped VM is a no-op; stopping
    /// a failed VM acknowledges the failure (it becomes stopped and is not restarted).
    pub async fn stop(
        self: &Arc<Self>,
        id: &str,
        timeout: Option<Duration>,
        force: bool,
    ) -> Result<VmRecord, AgentError> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = Self::snapshot(&entry);
        match rec.state {
            Phase::Running | Phase::Paused => {}
            Phase::Stopped | Phase::Failed => {
                return self.update(&entry, |r| {
                    r.state = Phase::Stopped;
                    if r.desired != Desired::Stopped {
                        r.desired = Desired::Stopped;
                        r.generation += 1;
                    }
                });
            }
            _ => return Err(illegal(&rec, "stop")),
        }
        let grace = timeout.unwrap_or(self.config.stop_timeout);
        self.update(&entry, |r| {
            r.desired = Desired::Stopped;
            r.generation += 1;
            r.operation = ending_op(Op::Stop, if force { Duration::ZERO } else { grace });
        })?;
        let result = self.end_vmm(&entry, grace, force).await;
        let rec = self.update(&entry, |r| r.operation = None)?;
        result.map(|_| rec)
    }

    /// Pauses a running VM (its vCPUs stop; memory and devices stay).
    pub async fn pause(self: &Arc<Self>, id: &str) -> Result<VmRecord, AgentError> {
        self.pause_resume(id, true).await
    }

    /// Resumes a paused VM.
    pub async fn resume(self: &Arc<Self>, id: &str) -> Result<VmRecord, AgentError> {
        self.pause_resume(id, false).await
    }

    async fn pause_resume(self: &Arc<Self>, id: &str, pause: bool) -> Result<VmRecord, AgentError> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = Self::snapshot(&entry);
        let (from, to, action, req, kind) = if pause {
            (
                Phase::Running,
                Phase::Paused,
                Op::Pause,
                Request::Pause,
                EventKind::Paused,
            )
        } else {
            (
                Phase::Paused,
                Phase::Running,
                Op::Resume,
                Request::Resume,
                EventKind::Resumed,
            )
        };
        if rec.state == to {
            return Ok(rec);
        }
        if rec.state != from {
            return Err(illegal(&rec, action.as_str()));
        }
        self.update(&entry, |r| r.operation = op(action))?;
        let dir = self.vm_dir(id);
        let result = vp::call(&dir, &req).await;
        let rec = self.update(&entry, |r| {
            r.operation = None;
            if result.is_ok() && r.state == from {
                r.state = to;
                r.desired = if pause {
                    Desired::Paused
                } else {
                    Desired::Running
                };
                r.generation += 1;
            }
        })?;
        match result {
            Ok(_) => {
                self.events.emit(id, kind, Some(rec.state), "");
                Ok(rec)
            }
            Err(err) => Err(AgentError::Vmm {
                id: id.to_owned(),
                err,
            }),
        }
    }

    /// Changes a disk's or NIC's rate limits, on the running VMM first (if there is one) and
    /// then in the record, which later starts use. `index` counts disks or NICs in spec
    /// order.
    pub async fn set_rate_limit(
        self: &Arc<Self>,
        id: &str,
        target: RateTarget,
    ) -> Result<VmRecord, AgentError> {
        use bexar_devices::rate_limiter::LimitedPath;
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = Self::snapshot(&entry);
        let (device, changes) = match &target {
            RateTarget::Disk { index, limit } => {
                if *index >= rec.disks.len() {
                    return Err(AgentError::NoDevice {
                        id: id.to_owned(),
                        what: format!("disk {index} (it has {})", rec.disks.len()),
                    });
                }
                (format!("block{index}"), vec![(LimitedPath::Disk, *limit)])
            }
            RateTarget::Nic { index, rx, tx } => {
                if *index >= rec.nics.len() {
                    return Err(AgentError::NoDevice {
                        id: id.to_owned(),
                        what: format!("NIC {index} (it has {})", rec.nics.len()),
                    });
                }
                (
                    format!("net{index}"),
                    vec![(LimitedPath::Rx, *rx), (LimitedPath::Tx, *tx)],
                )
            }
        };
        for (path, limit) in &changes {
            let prefix = match path {
                LimitedPath::Disk => "",
                LimitedPath::Rx => "rx.",
                LimitedPath::Tx => "tx.",
            };
            limit.check().map_err(|(f, m)| {
                AgentError::Invalid(super::FieldError::new(format!("{prefix}{f}"), m))
            })?;
        }
        if rec.state.has_vmm() {
            let dir = self.vm_dir(id);
            for (path, limit) in &changes {
                let req = Request::SetRateLimit {
                    device: device.clone(),
                    path: *path,
                    limit: *limit,
                };
                vp::call(&dir, &req).await.map_err(|err| AgentError::Vmm {
                    id: id.to_owned(),
                    err,
                })?;
            }
        }
        let some = |l: &bexar_devices::rate_limiter::RateLimitConfig| (!l.is_empty()).then_some(*l);
        self.update(&entry, |r| match &target {
            RateTarget::Disk { index, limit } => {
                if let Some(d) = r.disks.get_mut(*index) {
                    d.rate_limit = some(limit);
                }
            }
            RateTarget::Nic { index, rx, tx } => {
                if let Some(n) = r.nics.get_mut(*index) {
                    n.rx_rate_limit = some(rx);
                    n.tx_rate_limit = some(tx);
                }
            }
        })
    }

    /// Hands a running VM to a new VMM process of the agent's binary (live upgrade): the new
    /// process starts, takes the guest's state and memory (its descriptor, nothing copied) from
    /// the running one, which then ends; the guest sees a pause. If the new VMM cannot take
    /// over, the VM goes on in the old one (or, if it was already handed over, is failed).
    pub async fn upgrade(self: &Arc<Self>, id: &str) -> Result<VmRecord, AgentError> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = Self::snapshot(&entry);
        if rec.state != Phase::Running {
            return Err(illegal(&rec, "upgrade"));
        }
        let old = rec.status.clone();
        let err = match self.launch(&entry, Op::Upgrade).await {
            Ok(rec) => return Ok(rec),
            Err(e) => e,
        };
        // The old VMM's exit watcher clears its handle when it ends.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let old_runs = lock(&entry.vmm)
            .as_ref()
            .is_some_and(|h| h.token == old.token);
        let reason = err.to_string();
        let rec = self.update(&entry, |r| {
            r.operation = None;
            if old_runs {
                r.status = old.clone();
                r.state = Phase::Running;
            } else {
                r.status.previous_token = None;
                mark_ended(r, Phase::Failed, &reason);
            }
        })?;
        if !old_runs {
            self.events
                .emit(id, EventKind::Failed, Some(rec.state), reason);
        }
        Err(err)
    }

    /// Reboots a running or paused VM: a graceful stop (forced after `timeout`), then a start
    /// with a fresh VMM.
    pub async fn reboot(
        self: &Arc<Self>,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<VmRecord, AgentError> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = Self::snapshot(&entry);
        if !rec.state.has_vmm() {
            return Err(illegal(&rec, "reboot"));
        }
        let grace = timeout.unwrap_or(self.config.stop_timeout);
        self.update(&entry, |r| r.operation = ending_op(Op::Reboot, grace))?;
        self.end_vmm(&entry, grace, false).await?;
        self.launch(&entry, Op::Reboot).await
    }

    /// Deletes a VM: its VMM is killed and its directory (record, logs, sockets) removed.
    /// Deleting a VM that does not exist succeeds (the VM is gone either way).
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<(), AgentError> {
        let entry = match self.entry(id) {
            Ok(e) => e,
            Err(AgentError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _op = entry.op.lock().await;
        if !lock(&self.vms).contains_key(id) {
            return Ok(());
        }
        self.update(&entry, |r| {
            r.state = Phase::Deleting;
            r.desired = Desired::Stopped;
            r.operation = op(Op::Delete);
        })?;
        self.finish_delete(&entry).await
    }

    pub(crate) async fn finish_delete(&self, entry: &Arc<VmEntry>) -> Result<(), AgentError> {
        self.end_vmm(entry, Duration::ZERO, true).await?;
        // A VMM the agent lost track of (it was mid-start when an agent died) goes too.
        for (pid, _) in vp::find_vmms(&self.store.root().join("vms"))
            .into_iter()
            .filter(|(_, d)| *d == self.vm_dir(&entry.id))
        {
            vp::kill_and_wait(pid).await;
        }
        // Its cgroups go while the VM still holds its id: a VM made again with the same id
        // must not find them going away under its VMM.
        if let Some(c) = &self.cgroups {
            c.remove(&entry.id).await;
        }
        lock(&self.oom_base).remove(&entry.id);
        self.store.remove(&entry.id)?;
        let nics = lock(&entry.rec).nics.clone();
        lock(&self.vms).remove(&entry.id);
        self.version.send_modify(|v| *v += 1);
        if nics.iter().any(|n| n.segment.is_some()) {
            // Its TAPs and filters go with it.
            self.unwire_nics(&entry.id, &nics).await;
        }
        self.events.emit(&entry.id, EventKind::Deleted, None, "");
        Ok(())
    }

    /// Ends the VM's VMM, if it has one, and waits until its exit is recorded: a graceful
    /// shutdown first (unless `force`), then a stop request, then SIGKILL.
    async fn end_vmm(
        &self,
        entry: &VmEntry,
        timeout: Duration,
        force: bool,
    ) -> Result<(), AgentError> {
        let Some(handle) = lock(&entry.vmm).clone() else {
            return Ok(());
        };
        let dir = self.vm_dir(&entry.id);
        let mut done = handle.done.clone();
        let wait = |d: Duration| {
            let mut done = done.clone();
            async move { tokio::time::timeout(d, done.wait_for(|v| *v)).await.is_ok() }
        };
        if !force && !timeout.is_zero() {
            match vp::call(&dir, &Request::Shutdown).await {
                Ok(_) => {
                    if wait(timeout).await {
                        return Ok(());
                    }
                    tracing::info!(vm = %entry.id, "guest did not shut down within {timeout:?}; stopping it");
                }
                Err(e) => {
                    tracing::info!(vm = %entry.id, "graceful shutdown not possible ({e}); stopping it")
                }
            }
        }
        if vp::call(&dir, &Request::Stop).await.is_ok() && wait(FORCE_STEP).await {
            return Ok(());
        }
        tracing::warn!(vm = %entry.id, "VMM did not stop on request; killing it");
        let _ = vp::pidfd_kill(&handle.pidfd, libc::SIGKILL);
        if tokio::time::timeout(FORCE_STEP, done.wait_for(|v| *v))
            .await
            .is_ok()
        {
            return Ok(());
        }
        Err(AgentError::Vmm {
            id: entry.id.clone(),
            err: vp::VmmProcessError::Unkillable,
        })
    }

    /// Starts a VMM for the VM (operation lock held): record the launch token, write the
    /// launch file, exec, wait until the VMM proves who it is on its control socket.
    pub(super) async fn launch(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        kind: Op,
    ) -> Result<VmRecord, AgentError> {
        let token = vp::new_token();
        let dir = self.vm_dir(&entry.id);
        let by_request = kind != Op::Restart;
        let rec = self.update(entry, |r| {
            r.status.previous_token =
                (kind == Op::Upgrade).then(|| std::mem::take(&mut r.status.token));
            r.status.token = token.clone();
            // A reboot's second half is a start, and is recorded as one: a VMM found running
            // after a crash is then the new one, adopted as it is, not the old one still to
            // be stopped (which would reboot the VM twice, the second time after the grace).
            r.operation = op(if kind == Op::Reboot { Op::Start } else { kind });
            if r.desired != Desired::Running {
                r.desired = Desired::Running;
                r.generation += 1;
            }
            if by_request && kind != Op::Upgrade {
                r.status.restarts = 0;
            }
        })?;
        let config = rec.spec.vm_config(
            &dir,
            &token,
            &rec.disks,
            &rec.nics,
            self.kernel_ip_param(&rec).as_deref(),
            crate::imds::smbios_identity(&rec),
        );
        let fail = |reason: String| {
            if kind == Op::Upgrade {
                // The VMM that ran the VM may still run it: the caller settles the record.
                return AgentError::StartFailed {
                    id: entry.id.clone(),
                    reason,
                };
            }
            let rec = self.update(entry, |r| {
                mark_ended(r, Phase::Failed, &reason);
                r.operation = None;
            });
            self.events.emit(
                &entry.id,
                EventKind::Failed,
                Some(Phase::Failed),
                reason.clone(),
            );
            match rec {
                Ok(_) => AgentError::StartFailed {
                    id: entry.id.clone(),
                    reason,
                },
                Err(e) => e,
            }
        };
        let mut config = match config {
            Ok(c) => c,
            Err(e) => return Err(fail(format!("the VM cannot be configured: {e}"))),
        };
        // Anything but a live upgrade first checks that no VMM runs this VM, whose sockets,
        // cgroup limits and dialer the steps below would replace (the VMM itself checks again,
        // and holds the lock for its life). Then a dialer socket left in the jail's root is
        // stale (its VMM ended while the agent was down).
        if kind != Op::Upgrade {
            match bexar_util::fs::try_lock(&dir.join(layout::VMM_LOCK)) {
                Ok(Some(_)) => {}
                Ok(None) => return Err(fail("another VMM still runs this VM".into())),
                Err(e) => return Err(fail(e.to_string())),
            }
            sandbox::Dialer::remove_stale(&dir);
        }
        let jail = sandbox::jail_for(&self.config.sandbox, &dir);
        if jail.is_some() {
            // The VMM binds and connects its vsock sockets relative to its working directory,
            // the jail's root before and after pivot_root; VMM_DIR/vsock.sock points there.
            if let Some(v) = &mut config.vsock {
                v.uds = std::path::PathBuf::from(layout::VSOCK_SOCKET);
                let link = dir.join(layout::VSOCK_SOCKET);
                let target = std::path::Path::new(bexar_vmm::launch::files::JAIL_ROOT)
                    .join(layout::VSOCK_SOCKET);
                if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                    let _ = std::fs::remove_file(&link);
                    if let Err(e) = std::os::unix::fs::symlink(&target, &link) {
                        return Err(fail(format!("{}: {e}", link.display())));
                    }
                }
            }
        }
        if let Err(e) = sandbox::prepare_root(&dir) {
            return Err(fail(format!("cannot prepare the jail's root: {e}")));
        }
        // A jailed VMM's remote disks connect through the agent: its network namespace is
        // empty. Bound before the VMM starts, which connects its disks first thing.
        let dialer = if jail.is_some() && config.disks.iter().any(|d| d.is_remote()) {
            match sandbox::Dialer::bind(&dir, &token) {
                Ok(d) => Some(d),
                Err(e) => return Err(fail(format!("cannot make the VM's dialer socket: {e}"))),
            }
        } else {
            None
        };
        let cgroup = match &self.cgroups {
            None => None,
            Some(c) => {
                let limits = sandbox::Limits::of(
                    config.vcpus,
                    config.memory_mib,
                    self.config.sandbox.memory_headroom_mib,
                );
                match c.prepare(&entry.id, limits) {
                    Ok(g) => {
                        lock(&self.oom_base).insert(entry.id.clone(), c.oom_kills(&entry.id));
                        Some(g)
                    }
                    Err(e) => return Err(fail(format!("cannot make the VM's cgroup: {e}"))),
                }
            }
        };
        let tap_missing = rec.nics.iter().any(|n| {
            n.segment.is_some() && !std::path::Path::new("/sys/class/net").join(&n.tap).exists()
        });
        if tap_missing {
            // Someone removed a TAP: wire the NICs again (and repair what else is missing).
            if let Err(e) = self.wire_nics(&rec).await {
                return Err(fail(format!("cannot wire the NICs: {e}")));
            }
        }
        let mut jail = jail;
        let netns = match &mut jail {
            Some(j) if j.network => match self.netns.take() {
                Ok(fd) => {
                    j.netns_fd = Some(sandbox::NETNS_FD);
                    Some(fd)
                }
                // The VMM makes its own.
                Err(e) => {
                    tracing::warn!(vm = %entry.id, "no network namespace made ahead: {e}");
                    None
                }
            },
            _ => None,
        };
        // A jailed VMM is the first process of a PID namespace of its own and hands its VM to
        // the agent, which drops it after the VMM has ended (teardown.rs says why).
        let keeper = match &mut jail {
            Some(j) => match std::os::unix::net::UnixStream::pair() {
                Ok(pair) => {
                    j.keeper_fd = Some(sandbox::KEEPER_FD);
                    Some(pair)
                }
                Err(e) => return Err(fail(format!("cannot make the VM's keeper socket: {e}"))),
            },
            None => None,
        };
        let mut launch = Launch::new(config);
        launch.jail = jail;
        launch.dialer = dialer.as_ref().map(|d| d.name.clone());
        if kind == Op::Upgrade {
            launch.handoff = true;
            launch.handoff_from = rec.status.pid;
        } else if kind == Op::Incoming {
            let socket = dir.join(layout::INCOMING_SOCKET);
            let _ = std::fs::remove_file(&socket);
            launch.incoming = Some(socket);
        } else if rec.restore_pending {
            launch.restore = Some(dir.join(super::snapshots::RESTORE_DIR));
        }
        // What the VMM needs of the host, opened here: it opens nothing by path. A VMM taking
        // a running VM over gets the rest (TAPs, sockets) from the old one, as they are.
        let handed = match launch.open_handed() {
            Ok(h) => h,
            Err(e) => return Err(fail(e.to_string())),
        };
        launch.handed = Some(bexar_util::handed::Handed {
            fds: handed
                .iter()
                .map(|(what, fd)| bexar_util::handed::HandedFd {
                    what: what.clone(),
                    fd: fd.as_raw_fd(),
                })
                .collect(),
            strict: kind != Op::Upgrade,
        });
        let data = serde_json::to_vec_pretty(&launch).map_err(super::StoreError::from)?;
        write_atomic(&dir.join(layout::LAUNCH), &data).map_err(super::StoreError::from)?;
        let _ = std::fs::remove_file(dir.join(layout::RESULT));
        let procs = cgroup.as_ref().map(|g| g.raw()).unwrap_or_default();
        let (kept, theirs) = keeper.unzip();
        let handed_fds: Vec<i32> = handed.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let spawned = vp::spawn(
            &self.config.exe,
            &dir,
            &procs,
            (netns.as_ref(), theirs.as_ref()),
            &handed_fds,
            kept.is_some(),
        );
        // The VMM has its copies: a socket it serves must close when it ends.
        drop((cgroup, netns, theirs, handed));
        let pid = match spawned {
            Ok(p) => p,
            Err(e) => return Err(fail(e.to_string())),
        };
        let pidfd = match vp::pidfd_open(pid) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                vp::reap(pid);
                return Err(fail(format!("cannot open a pidfd for the VMM: {e}")));
            }
        };
        let ticks = bexar_util::procfs::start_ticks(pid);
        let watch_fd = match pidfd.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                let _ = vp::pidfd_kill(&pidfd, libc::SIGKILL);
                return Err(fail(format!("cannot duplicate a pidfd: {e}")));
            }
        };
        if let Some(sock) = kept {
            drop(tokio::spawn(vp::keep_vm(sock, pidfd.clone())));
        }
        if let Some(d) = dialer {
            d.spawn(&launch, &pidfd);
        }
        // Until the VMM answers with our token, watch for it dying instead.
        let exit = tokio::spawn(vp::wait_exit(watch_fd));
        // A VMM receiving a migration answers once the whole VM has arrived; the stream's
        // own timeouts end it if the sender stalls.
        let deadline = tokio::time::Instant::now()
            + if kind == Op::Incoming {
                INCOMING_TIMEOUT
            } else {
                LAUNCH_TIMEOUT
            };
        let mut delay = Duration::from_millis(2);
        let mut handoff_pause_ms = None;
        let answered = loop {
            if exit.is_finished() {
                break false;
            }
            if let Ok((info, peer)) = vp::info(&dir).await {
                if info.token == token && peer == pid {
                    handoff_pause_ms = info.handoff_pause_ms;
                    break true;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = vp::pidfd_kill(&pidfd, libc::SIGKILL);
                break false;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        };
        if !answered {
            let _ = exit.await;
            vp::reap(pid);
            let reason = read_result(&dir, &token)
                .map(|r| r.reason)
                .unwrap_or_else(|| log_tail(&dir));
            return Err(fail(reason));
        }
        let done = Self::attach_vmm(entry, &token, pidfd);
        let rec = self.update(entry, |r| {
            r.state = Phase::Running;
            r.status.pid = Some(pid);
            r.status.pid_start_ticks = ticks;
            r.status.started_ms = Some(now_ms());
            r.status.exit_reason = None;
            r.operation = None;
            // Restored once: later starts boot.
            r.restore_pending = false;
            r.status.previous_token = None;
            if !by_request {
                r.status.restarts += 1;
            }
        })?;
        let (event, message) = match kind {
            Op::Upgrade => (
                EventKind::Upgraded,
                format!(
                    "VMM pid {pid}; the guest was paused {:.2} ms",
                    handoff_pause_ms.unwrap_or(f64::NAN)
                ),
            ),
            Op::Restart => (EventKind::Restarted, format!("VMM pid {pid}")),
            Op::Incoming => (
                EventKind::Migrated,
                format!(
                    "arrived from another host; VMM pid {pid}; the guest was paused {:.2} ms",
                    handoff_pause_ms.unwrap_or(f64::NAN)
                ),
            ),
            _ => (EventKind::Started, format!("VMM pid {pid}")),
        };
        self.events
            .emit(&entry.id, event, Some(Phase::Running), message);
        self.watch_exit(entry, token, pid, done, async move {
            let _ = exit.await;
        });
        Ok(rec)
    }

    /// Records the VM's running VMM; the returned sender marks its exit as recorded.
    fn attach_vmm(entry: &VmEntry, token: &str, pidfd: Arc<OwnedFd>) -> watch::Sender<bool> {
        let (done_tx, done_rx) = watch::channel(false);
        *lock(&entry.vmm) = Some(VmmHandle {
            token: token.to_owned(),
            pidfd,
            done: done_rx,
        });
        done_tx
    }

    /// Once `exit` (the VMM's end) resolves: reap it, record the end, mark it done. Spawned
    /// only after the record says the VMM runs, so the end is never recorded before the start.
    fn watch_exit(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        token: String,
        pid: u32,
        done: watch::Sender<bool>,
        exit: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let agent = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            exit.await;
            vp::reap(pid);
            agent.on_exit(&entry, &token);
            let _ = done.send(true);
        });
    }

    /// Why the sandbox ended a VMM that did not end cleanly, if it did: its seccomp filter, or
    /// its cgroup's memory limit. Counted for the metrics.
    fn sandbox_end(&self, id: &str, dir: &std::path::Path) -> Option<String> {
        use std::sync::atomic::Ordering;
        if let Some(why) = sandbox::seccomp_fault(dir) {
            self.sandbox_kills.seccomp.fetch_add(1, Ordering::Relaxed);
            tracing::error!(vm = id, "VMM {why}");
            return Some(format!("the VMM was {why}"));
        }
        let c = self.cgroups.as_ref()?;
        let base = lock(&self.oom_base).get(id).copied().unwrap_or(0);
        if c.oom_kills(id) > base {
            self.sandbox_kills.oom.fetch_add(1, Ordering::Relaxed);
            let limit = c
                .memory_limit(id)
                .map_or("?".into(), |b| (b >> 20).to_string());
            let why = format!(
                "the VMM was killed by the out-of-memory killer at its cgroup's memory limit \
                 ({limit} MiB: guest memory plus {} MiB)",
                self.config.sandbox.memory_headroom_mib
            );
            tracing::error!(vm = id, "{why}");
            return Some(why);
        }
        None
    }

    /// Records that the VMM of launch `token` ended, and applies the restart policy.
    fn on_exit(self: &Arc<Self>, entry: &Arc<VmEntry>, token: &str) {
        {
            let mut vmm = lock(&entry.vmm);
            if vmm.as_ref().is_some_and(|h| h.token == token) {
                *vmm = None;
            }
        }
        let dir = self.vm_dir(&entry.id);
        let migrating = lock(&entry.rec)
            .operation
            .as_ref()
            .map(|o| o.kind)
            .filter(|k| matches!(k, Op::Migrate | Op::Incoming));
        if let Some(kind) = migrating {
            // Recorded once the migration's own code (which holds the operation lock) is done
            // with the VM, by what the VM was doing when its VMM ended.
            self.settle_migration(entry, token, kind);
            return;
        }
        let result = read_result(&dir, token);
        let handed_off = result.as_ref().is_some_and(RunResult::handed_off);
        let (mut clean, mut reason) = result.map_or_else(
            || {
                (
                    false,
                    "the VMM process ended without reporting why (killed or crashed)".to_owned(),
                )
            },
            |r| (r.clean, r.reason),
        );
        // A VMM that handed its VM to another (a live upgrade an agent restart cut) ends
        // cleanly; if no VMM holds the VM now, the one it handed to is gone too and the VM
        // was lost: a failure (its restart policy applies), not a stop.
        if clean && handed_off {
            let root = self.store.root().join("vms");
            if vp::find_vmms(&root).iter().all(|(_, d)| *d != dir) {
                clean = false;
                reason = format!("{reason}, handing the VM to a VMM that is gone");
            }
        }
        if !clean {
            if let Some(why) = self.sandbox_end(&entry.id, &dir) {
                reason = why;
            }
        }
        let mut expected = false;
        let updated = self.update(entry, |r| {
            if r.status.token != token || !r.state.has_vmm() {
                return;
            }
            expected = r.desired == Desired::Stopped
                || r.operation.as_ref().is_some_and(|o| {
                    matches!(o.kind, Op::Stop | Op::Reboot | Op::Delete | Op::Migrate)
                });
            let state = if expected || clean {
                Phase::Stopped
            } else {
                Phase::Failed
            };
            mark_ended(r, state, &reason);
            // Settling with a VMM that is gone is over.
            if r.operation.as_ref().is_some_and(|o| o.kind == Op::Recover) {
                r.operation = None;
            }
        });
        let rec = match updated {
            Ok(r) if r.status.token == token && !r.state.has_vmm() => r,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(vm = %entry.id, "cannot record the VMM's exit: {e}");
                return;
            }
        };
        if rec.state == Phase::Deleting {
            return;
        }
        let kind = if rec.state == Phase::Failed {
            EventKind::Failed
        } else {
            EventKind::Stopped
        };
        self.events.emit(&entry.id, kind, Some(rec.state), reason);
        if !expected {
            self.maybe_restart(entry, &rec);
        }
    }

    /// Records the end of a VMM that ended while its VM was migrating, once whoever holds the
    /// VM's operation lock is done: a VM that was arriving goes (it runs on the sender); a VM
    /// that was leaving goes if its VMM said it handed the VM over, and is otherwise recorded
    /// failed, never restarted here (it may run on the destination).
    fn settle_migration(self: &Arc<Self>, entry: &Arc<VmEntry>, token: &str, kind: Op) {
        let agent = self.clone();
        let entry = entry.clone();
        let token = token.to_owned();
        tokio::spawn(async move {
            let _op = entry.op.lock().await;
            // The same VM (not one made again with its id meanwhile), its end not recorded.
            let same = lock(&agent.vms)
                .get(&entry.id)
                .is_some_and(|e| Arc::ptr_eq(e, &entry));
            if !same || lock(&entry.vmm).is_some() {
                return;
            }
            // Nobody recorded this end meanwhile (the migration's code deletes the VM when it
            // moved; when it failed it leaves the end to this).
            let rec = Self::snapshot(&entry);
            if rec.status.token != token || !rec.state.has_vmm() {
                return;
            }
            let kind = Some(kind);
            let dir = agent.vm_dir(&entry.id);
            let result = read_result(&dir, &token);
            let handed_off = result.as_ref().is_some_and(RunResult::handed_off);
            // An arriving VM whose VMM told the sender it holds it is this host's: its end is
            // a failure here, like any VM's (the sender let its copy go).
            let committed = dir.join(layout::INCOMING_COMMITTED).exists();
            if kind == Some(Op::Incoming) && !committed || handed_off {
                if handed_off {
                    agent.events.emit(
                        &entry.id,
                        EventKind::Migrated,
                        None,
                        "its VMM handed the VM over while the agent was away",
                    );
                }
                let _ = agent.update(&entry, |r| {
                    r.state = Phase::Deleting;
                    r.desired = Desired::Stopped;
                });
                if let Err(e) = agent.finish_delete(&entry).await {
                    tracing::error!(vm = %entry.id, "cannot remove a migrated VM: {e}");
                }
                return;
            }
            let reason = if kind == Some(Op::Incoming) {
                format!(
                    "its VMM ended after it took the VM over from another host ({})",
                    result.map_or_else(|| "no result".to_owned(), |r| r.reason)
                )
            } else {
                format!(
                    "the VMM ended during a live migration without saying it handed the VM \
                     over ({}): the VM may run on the destination; not restarted here",
                    result.map_or_else(|| "no result".to_owned(), |r| r.reason)
                )
            };
            let updated = agent.update(&entry, |r| {
                mark_ended(r, Phase::Failed, &reason);
                r.operation = None;
            });
            if updated.is_ok() {
                agent
                    .events
                    .emit(&entry.id, EventKind::Failed, Some(Phase::Failed), reason);
            }
        });
    }

    /// Schedules a restart if the VM's policy asks for one.
    fn maybe_restart(self: &Arc<Self>, entry: &Arc<VmEntry>, rec: &VmRecord) {
        let wanted = match rec.spec.restart_policy {
            RestartPolicy::No => false,
            RestartPolicy::OnFailure => rec.state == Phase::Failed,
            RestartPolicy::Always => true,
        } && rec.desired != Desired::Stopped;
        if !wanted {
            return;
        }
        // Counted from the VMM's end, so a restart rescheduled by a new agent (the old one died
        // during the back-off) waits only what was left of it.
        let since_end = rec.status.stopped_ms.map_or(Duration::ZERO, |t| {
            Duration::from_millis(now_ms().saturating_sub(t))
        });
        let delay = self
            .config
            .restart_backoff
            .saturating_mul(1u32 << rec.status.restarts.min(16))
            .min(MAX_BACKOFF)
            .saturating_sub(since_end);
        let token = rec.status.token.clone();
        self.events.emit(
            &entry.id,
            EventKind::Restarting,
            Some(rec.state),
            format!(
                "restart policy {:?}: restart {} in {:.1} s",
                rec.spec.restart_policy,
                rec.status.restarts + 1,
                delay.as_secs_f64()
            ),
        );
        let agent = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _op = entry.op.lock().await;
            let r = Self::snapshot(&entry);
            let still = lock(&agent.vms).contains_key(&entry.id)
                && r.status.token == token
                && matches!(r.state, Phase::Stopped | Phase::Failed)
                && r.desired != Desired::Stopped;
            if still {
                if let Err(e) = agent.launch(&entry, Op::Restart).await {
                    tracing::warn!(vm = %entry.id, "restart failed: {e}");
                    let r = Self::snapshot(&entry);
                    agent.maybe_restart(&entry, &r);
                }
            }
        });
    }

    /// Run once at start: re-adopt live VMMs, record the ones that died, finish interrupted
    /// operations, and kill VMM processes nobody owns. For each VM: look (`probe`, for every
    /// VM at once, so a slow VMM delays nobody), decide (`decide`, a pure table), act.
    pub(super) async fn recover(self: &Arc<Self>) {
        let mut relaunch = Vec::new();
        let mut restart = Vec::new();
        let mut finish_stop = Vec::new();
        let mut finish_reboot = Vec::new();
        let (mut adopted, mut vanished) = (0, 0);
        let mut looked = Vec::new();
        for entry in self.entries() {
            let mut rec = Self::snapshot(&entry);
            if rec.state == Phase::Creating {
                // A create that crashed after its first write: the VM exists, stopped.
                if let Ok(r) = self.update(&entry, |r| r.state = Phase::Stopped) {
                    rec = r;
                }
            }
            looked.push((entry, rec));
        }
        // One look at the process table serves every VM's probe.
        let running = vp::find_vmms(&self.store.root().join("vms"));
        let found = futures_util::future::join_all(
            looked
                .iter()
                .map(|(entry, rec)| self.probe(entry, rec, &running)),
        )
        .await;
        for ((entry, rec), found) in looked.into_iter().zip(found) {
            match decide(&rec, &found) {
                Recovery::FinishDelete => {
                    if let Err(e) = self.finish_delete(&entry).await {
                        tracing::error!(vm = %entry.id, "cannot finish an interrupted delete: {e}");
                    }
                }
                Recovery::Adopted { state, then } => {
                    adopted += 1;
                    self.events.emit(
                        &entry.id,
                        EventKind::Adopted,
                        Some(state),
                        "VMM still running after an agent restart",
                    );
                    match then {
                        AfterAdopt::Reconcile => self.reconcile(&entry),
                        AfterAdopt::FinishStop => finish_stop.push(entry.clone()),
                        AfterAdopt::FinishReboot => finish_reboot.push(entry.clone()),
                    }
                }
                Recovery::Ended {
                    state,
                    reason,
                    then,
                } => {
                    vanished += 1;
                    let recorded = self.update(&entry, |r| {
                        mark_ended(r, state, &reason);
                        r.operation = None;
                    });
                    if let Err(e) = recorded {
                        tracing::error!(vm = %entry.id, "cannot record a vanished VMM: {e}");
                        continue;
                    }
                    let kind = if state == Phase::Failed {
                        EventKind::Failed
                    } else {
                        EventKind::Stopped
                    };
                    self.events.emit(&entry.id, kind, Some(state), reason);
                    match then {
                        AfterEnd::Relaunch => relaunch.push(entry.clone()),
                        AfterEnd::RestartPolicy => restart.push(entry.clone()),
                        AfterEnd::Nothing => {}
                    }
                }
                Recovery::Relaunch => relaunch.push(entry.clone()),
                Recovery::Idle {
                    clear_operation,
                    restart_policy,
                } => {
                    if clear_operation {
                        let _ = self.update(&entry, |r| r.operation = None);
                    }
                    if restart_policy {
                        restart.push(entry.clone());
                    }
                }
            }
        }
        // Every VMM process under our state directory that is not adopted now belongs to no
        // one (a launch the previous agent never recorded, or a VM whose record is gone).
        let owned: Vec<std::path::PathBuf> = self
            .entries()
            .iter()
            .filter(|e| lock(&e.vmm).is_some())
            .map(|e| self.vm_dir(&e.id))
            .collect();
        for (pid, dir) in vp::find_vmms(&self.store.root().join("vms")) {
            if !owned.contains(&dir) {
                tracing::warn!(pid, dir = %dir.display(), "killing a VMM process no VM owns");
                vp::kill_and_wait(pid).await;
            }
        }
        self.events.emit(
            "",
            EventKind::AgentStarted,
            None,
            format!(
                "{} VMs: {adopted} re-adopted, {vanished} lost their VMM while the agent was down, {} interrupted starts and {} reboots to finish",
                self.entries().len(),
                relaunch.len(),
                finish_reboot.len()
            ),
        );
        for entry in relaunch {
            let agent = self.clone();
            tokio::spawn(async move {
                let _op = entry.op.lock().await;
                if let Err(e) = agent.launch(&entry, Op::Start).await {
                    tracing::warn!(vm = %entry.id, "finishing an interrupted start failed: {e}");
                }
            });
        }
        for entry in finish_stop {
            let agent = self.clone();
            tokio::spawn(async move {
                let id = entry.id.clone();
                let _op = entry.op.lock().await;
                let grace =
                    recorded_grace(&Self::snapshot(&entry), agent.config.stop_timeout, now_ms());
                let _ = agent.update(&entry, |r| r.operation = ending_op(Op::Stop, grace));
                if let Err(e) = agent.end_vmm(&entry, grace, grace.is_zero()).await {
                    tracing::warn!(vm = %id, "finishing an interrupted stop failed: {e}");
                }
                let _ = agent.update(&entry, |r| r.operation = None);
            });
        }
        for entry in finish_reboot {
            let agent = self.clone();
            tokio::spawn(async move {
                let _op = entry.op.lock().await;
                let grace =
                    recorded_grace(&Self::snapshot(&entry), agent.config.stop_timeout, now_ms());
                let r = match agent.end_vmm(&entry, grace, false).await {
                    Ok(()) => agent.launch(&entry, Op::Reboot).await.map(drop),
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    tracing::warn!(vm = %entry.id, "finishing an interrupted reboot failed: {e}");
                }
            });
        }
        for entry in restart {
            let rec = Self::snapshot(&entry);
            self.maybe_restart(&entry, &rec);
        }
    }

    /// What recovery needs to know about a VM beyond its record: whether its VMM still runs
    /// (re-adopted; `running` is every VMM process found, with its directory) and, if not,
    /// what its last VMM said when it ended.
    async fn probe(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        rec: &VmRecord,
        running: &[(u32, std::path::PathBuf)],
    ) -> Found {
        if rec.state == Phase::Deleting {
            return Found::default();
        }
        let settled;
        let running = if rec.status.previous_token.is_some() {
            // A live upgrade the agent died in: two VMMs may hold the VM for a moment. Once
            // one has handed the VM over (and ended) or the other has given up (and ended),
            // the one left is adopted, whichever token it has.
            settled = self.handover_settled(&entry.id).await;
            &settled[..]
        } else {
            running
        };
        let adopted = self.adopt(entry, rec, running).await;
        let ended = adopted
            .is_none()
            .then(|| read_result(&self.vm_dir(&entry.id), &rec.status.token))
            .flatten();
        let handed_off = ended.as_ref().is_some_and(RunResult::handed_off);
        let result = ended.map(|r| (r.clean, r.reason));
        let committed = self
            .vm_dir(&entry.id)
            .join(layout::INCOMING_COMMITTED)
            .exists();
        Found {
            adopted,
            result,
            handed_off,
            committed,
        }
    }

    /// Waits (up to [`HANDOVER_SETTLE`]) until at most one VMM process runs for VM `id`, and
    /// returns every VMM process found then.
    async fn handover_settled(&self, id: &str) -> Vec<(u32, std::path::PathBuf)> {
        let root = self.store.root().join("vms");
        let dir = self.vm_dir(id);
        let deadline = tokio::time::Instant::now() + HANDOVER_SETTLE;
        loop {
            let found = vp::find_vmms(&root);
            let here = found.iter().filter(|(_, d)| *d == dir).count();
            if here <= 1 || tokio::time::Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Re-adopts the VM's VMM if one is running. Who it is is proven without its help: it
    /// holds the VM directory's lock (which only a VMM started on the directory's current
    /// launch file takes), its command line is `bexar vmm --dir` of that directory, and a
    /// pidfd opened on it pins the process while that is checked again. If it also answers
    /// within [`PROBE_TIMEOUT`], its launch token must be the recorded one (a VMM with another
    /// identity is killed) and the state it reports is recorded; if it does not (stopped,
    /// starved of CPU), it is adopted all the same, with the operation `recover` recorded until
    /// [`Agent::reconcile`] reaches it. Returns the state recorded.
    async fn adopt(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        rec: &VmRecord,
        running: &[(u32, std::path::PathBuf)],
    ) -> Option<Phase> {
        let dir = self.vm_dir(&entry.id);
        match bexar_util::fs::try_lock(&dir.join(layout::VMM_LOCK)) {
            // Nobody holds it: no VMM runs for this VM (ours is dropped at once).
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) => {}
        }
        let pids: Vec<u32> = running
            .iter()
            .filter(|(_, d)| *d == dir)
            .map(|(p, _)| *p)
            .collect();
        let pid = match rec.status.pid.filter(|p| pids.contains(p)) {
            Some(p) => p,
            None if pids.len() == 1 => pids[0],
            None => {
                tracing::warn!(vm = %rec.id, ?pids, "the VM's lock is held but its VMM cannot be told apart");
                return None;
            }
        };
        let pidfd = vp::pidfd_open(pid).ok()?;
        // The pidfd pins the process: if it is still this VM's VMM now, the pid was not
        // recycled between the scan and the open.
        if vp::vmm_dir_of(pid).as_ref() != Some(&dir) {
            return None;
        }
        let ticks = bexar_util::procfs::start_ticks(pid);
        // A live upgrade the agent died in, whose old VMM (the recorded pid) still holds the
        // VM: it is adopted with its own token. (The new VMM, had it taken over, would be
        // another process.)
        let token = match &rec.status.previous_token {
            Some(previous) if rec.status.pid == Some(pid) => previous.clone(),
            _ => rec.status.token.clone(),
        };
        let reported = match tokio::time::timeout(PROBE_TIMEOUT, vp::info(&dir)).await {
            Ok(Ok((info, peer))) => {
                if info.id != rec.id || info.token != token || info.pid != peer || peer != pid {
                    tracing::warn!(vm = %rec.id, pid = peer, "a VMM answers with another identity; killing it");
                    vp::kill_and_wait(peer).await;
                    return None;
                }
                Some(if info.state == RunState::Paused {
                    Phase::Paused
                } else {
                    Phase::Running
                })
            }
            _ => {
                tracing::warn!(vm = %rec.id, pid, "its VMM holds the VM's lock but does not answer yet; adopted, and asked again later");
                None
            }
        };
        let state = reported.unwrap_or(if rec.state.has_vmm() {
            rec.state
        } else {
            Phase::Running
        });
        let watch_fd = pidfd.try_clone().ok()?;
        // Its remote disks connected through the agent before: serve them again (the old
        // agent's socket went with it), under the name the adopted VMM asks on, its own
        // launch's token. That is the launch on record, or, if an agent died in a live upgrade
        // that did not finish, its predecessor's: the same VM's, with the same disks.
        if let Ok(launch) = Launch::read(&dir) {
            if launch.dialer.is_some() {
                match sandbox::Dialer::bind(&dir, &token) {
                    Ok(d) => d.spawn(&launch, &pidfd),
                    Err(e) => {
                        tracing::warn!(vm = %rec.id, "cannot make the VM's dialer socket again: {e}; its remote disks cannot reconnect")
                    }
                }
            }
        }
        let done = Self::attach_vmm(entry, &token, Arc::new(pidfd));
        if let Err(e) = self.update(entry, |r| {
            r.status.token = token.clone();
            r.status.previous_token = None;
            r.state = state;
            r.status.pid = Some(pid);
            r.status.pid_start_ticks = ticks;
            if r.status.started_ms.is_none() {
                r.status.started_ms = Some(now_ms());
            }
            // A stop, reboot, pause or resume stays recorded until it is finished; anything
            // else is settled by the VMM's word, `recover` until then.
            let keep = r.operation.as_ref().is_some_and(|o| {
                matches!(
                    o.kind,
                    Op::Stop | Op::Reboot | Op::Pause | Op::Resume | Op::Migrate | Op::Incoming
                )
            });
            if !keep {
                r.operation = op(Op::Recover);
            }
        }) {
            tracing::error!(vm = %rec.id, "cannot record an adopted VMM: {e}");
        }
        self.watch_exit(entry, token, pid, done, vp::wait_exit(watch_fd));
        Some(state)
    }

    /// Settles an adopted VM with its VMM, in the background: asks it (again and again, never
    /// killing it for being slow) until it answers, then finishes the pause or resume that was
    /// under way, makes it run or stay paused as the caller last wanted, and records the state
    /// it is in, so the API's view comes from the VMM. Gives up when the VMM ends or is stopped
    /// by a caller meanwhile.
    fn reconcile(self: &Arc<Self>, entry: &Arc<VmEntry>) {
        let Some(token) = lock(&entry.vmm).as_ref().map(|h| h.token.clone()) else {
            return;
        };
        let agent = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            let dir = agent.vm_dir(&entry.id);
            let ours =
                |entry: &VmEntry| lock(&entry.vmm).as_ref().is_some_and(|h| h.token == token);
            let mut delay = Duration::from_millis(50);
            let reported = loop {
                if !ours(&entry) {
                    return;
                }
                if let Ok((info, _)) = vp::info(&dir).await {
                    if info.token == token {
                        break info.state;
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONCILE_MAX_DELAY);
            };
            let _op = entry.op.lock().await;
            if !ours(&entry) {
                return;
            }
            let rec = Self::snapshot(&entry);
            if rec.desired == Desired::Stopped {
                // A caller stopped it meanwhile; that stop owns the VM now.
                return;
            }
            // A VMM paused by a migration in doubt may have handed the VM over: never resumed
            // from here (that could make two); the destination is asked instead.
            if let Some(dest) = rec
                .operation
                .as_ref()
                .filter(|o| o.kind == Op::Migrate && reported == RunState::Paused)
                .and_then(|o| o.destination.clone())
            {
                drop(_op);
                agent.settle_in_doubt_later(&entry, dest);
                return;
            }
            let want_paused = match rec.operation.as_ref().map(|o| o.kind) {
                Some(Op::Pause) => true,
                Some(Op::Resume) => false,
                Some(Op::Migrate | Op::Incoming) => reported == RunState::Paused,
                _ => rec.desired == Desired::Paused,
            };
            let mut paused = reported == RunState::Paused;
            if paused != want_paused {
                let req = if want_paused {
                    Request::Pause
                } else {
                    Request::Resume
                };
                match vp::call(&dir, &req).await {
                    Ok(_) => paused = want_paused,
                    Err(e) => {
                        tracing::warn!(vm = %entry.id, "cannot finish settling the adopted VM: {e}")
                    }
                }
            }
            let (state, desired) = if paused {
                (Phase::Paused, Desired::Paused)
            } else {
                (Phase::Running, Desired::Running)
            };
            let updated = agent.update(&entry, |r| {
                if r.status.token != token || !r.state.has_vmm() {
                    return;
                }
                r.state = state;
                if r.desired != desired {
                    r.desired = desired;
                    r.generation += 1;
                }
                r.operation = None;
            });
            if updated.is_ok() && state != rec.state {
                let kind = if paused {
                    EventKind::Paused
                } else {
                    EventKind::Resumed
                };
                agent.events.emit(
                    &entry.id,
                    kind,
                    Some(state),
                    "settled after an agent restart",
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{VmSpec, VmStatus};

    fn rec(state: Phase, desired: Desired, op_kind: Option<Op>) -> VmRecord {
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "id": "a", "vcpus": 1, "memory_mib": 64, "boot": {"kernel": "/k"}
        }))
        .unwrap();
        VmRecord {
            id: "a".into(),
            state,
            spec,
            generation: 1,
            desired,
            status: VmStatus::default(),
            operation: op_kind.and_then(op),
            nics: vec![],
            disks: vec![],
            metadata: Default::default(),
            uuid: uuid::Uuid::nil(),
            restore_pending: false,
        }
    }

    fn found(adopted: Option<Phase>, result: Option<(bool, &str)>) -> Found {
        Found {
            adopted,
            result: result.map(|(c, r)| (c, r.to_owned())),
            handed_off: false,
            committed: false,
        }
    }

    #[test]
    fn a_migration_the_agent_died_in_never_leaves_two_copies() {
        // The receiver without its VMM: the VM runs on the sender; this copy goes.
        let r = rec(Phase::Stopped, Desired::Running, Some(Op::Incoming));
        assert_eq!(decide(&r, &found(None, None)), Recovery::FinishDelete);
        // ... unless that VMM had told the sender it holds the VM: it is this host's.
        let committed = Found {
            committed: true,
            ..found(None, None)
        };
        assert!(matches!(
            decide(&r, &committed),
            Recovery::Ended {
                state: Phase::Failed,
                ..
            }
        ));
        // The sender whose VMM handed the VM over: it is the destination's.
        let r = rec(Phase::Running, Desired::Running, Some(Op::Migrate));
        let handed = Found {
            handed_off: true,
            ..found(None, Some((true, "stopped on request")))
        };
        assert_eq!(decide(&r, &handed), Recovery::FinishDelete);
        // The sender whose VMM ended without saying so: failed, never restarted here.
        let d = decide(&r, &found(None, None));
        assert!(
            matches!(
                d,
                Recovery::Ended {
                    state: Phase::Failed,
                    then: AfterEnd::Nothing,
                    ..
                }
            ),
            "{d:?}"
        );
        // A VMM still running is adopted on either side.
        for op in [Op::Migrate, Op::Incoming] {
            let r = rec(Phase::Running, Desired::Running, Some(op));
            assert!(matches!(
                decide(&r, &found(Some(Phase::Running), None)),
                Recovery::Adopted { .. }
            ));
        }
    }

    #[test]
    fn recovery_decisions_row_by_row() {
        use Desired as D;
        use Phase as P;
        let nothing = found(None, None);
        // An interrupted delete is finished whatever else is true.
        assert_eq!(
            decide(
                &rec(P::Deleting, D::Stopped, Some(Op::Delete)),
                &found(Some(P::Running), None)
            ),
            Recovery::FinishDelete
        );
        // A live VMM is kept and settled with; a stop or a reboot it was in the middle of is
        // finished (a reboot's guest may be shutting down already: it must come back up).
        assert_eq!(
            decide(
                &rec(P::Running, D::Running, None),
                &found(Some(P::Running), None)
            ),
            Recovery::Adopted {
                state: P::Running,
                then: AfterAdopt::Reconcile
            }
        );
        assert_eq!(
            decide(
                &rec(P::Running, D::Running, Some(Op::Pause)),
                &found(Some(P::Running), None)
            ),
            Recovery::Adopted {
                state: P::Running,
                then: AfterAdopt::Reconcile
            }
        );
        assert_eq!(
            decide(
                &rec(P::Paused, D::Stopped, Some(Op::Stop)),
                &found(Some(P::Paused), None)
            ),
            Recovery::Adopted {
                state: P::Paused,
                then: AfterAdopt::FinishStop
            }
        );
        assert_eq!(
            decide(
                &rec(P::Running, D::Running, Some(Op::Reboot)),
                &found(Some(P::Running), None)
            ),
            Recovery::Adopted {
                state: P::Running,
                then: AfterAdopt::FinishReboot
            }
        );
        // A VMM that ended cleanly on its own: stopped, the restart policy decides.
        assert_eq!(
            decide(
                &rec(P::Running, D::Running, None),
                &found(None, Some((true, "guest powered off")))
            ),
            Recovery::Ended {
                state: P::Stopped,
                reason: "guest powered off".into(),
                then: AfterEnd::RestartPolicy
            }
        );
        // One that vanished without a word: failed.
        let r = decide(&rec(P::Running, D::Running, None), &nothing);
        assert!(matches!(
            r,
            Recovery::Ended {
                state: P::Failed,
                then: AfterEnd::RestartPolicy,
                ..
            }
        ));
        // One that was being stopped: stopped, nothing follows.
        assert!(matches!(
            decide(&rec(P::Running, D::Stopped, Some(Op::Stop)), &nothing),
            Recovery::Ended {
                state: P::Stopped,
                then: AfterEnd::Nothing,
                ..
            }
        ));
        // One that was mid-reboot: its end is recorded and the reboot finished.
        assert!(matches!(
            decide(&rec(P::Running, D::Running, Some(Op::Reboot)), &nothing),
            Recovery::Ended {
                then: AfterEnd::Relaunch,
                ..
            }
        ));
        // No VMM, a start under way (a create with start included): start it.
        assert_eq!(
            decide(&rec(P::Stopped, D::Running, Some(Op::Start)), &nothing),
            Recovery::Relaunch
        );
        assert_eq!(
            decide(&rec(P::Failed, D::Running, Some(Op::Restart)), &nothing),
            Recovery::Relaunch
        );
        // A pause left over: cleared.
        assert_eq!(
            decide(&rec(P::Stopped, D::Stopped, Some(Op::Pause)), &nothing),
            Recovery::Idle {
                clear_operation: true,
                restart_policy: false
            }
        );
        // Failed and wanted up (a restart was waiting out its back-off): the policy decides
        // again. Stopped and wanted stopped: nothing.
        assert_eq!(
            decide(&rec(P::Failed, D::Running, None), &nothing),
            Recovery::Idle {
                clear_operation: false,
                restart_policy: true
            }
        );
        assert_eq!(
            decide(&rec(P::Stopped, D::Stopped, None), &nothing),
            Recovery::Idle {
                clear_operation: false,
                restart_policy: false
            }
        );
    }

    #[test]
    fn a_finished_stop_keeps_what_is_left_of_the_callers_grace() {
        use Desired as D;
        use Phase as P;
        let default = Duration::from_secs(10);
        let mut r = rec(P::Running, D::Stopped, None);
        r.operation = ending_op(Op::Stop, Duration::from_secs(3));
        let began = r.operation.as_ref().unwrap().started_ms;
        assert_eq!(recorded_grace(&r, default, began), Duration::from_secs(3));
        assert_eq!(
            recorded_grace(&r, default, began + 1_000),
            Duration::from_secs(2)
        );
        // Past the deadline the stop is forced; a clock that went back gives no more grace.
        assert_eq!(recorded_grace(&r, default, began + 60_000), Duration::ZERO);
        assert_eq!(
            recorded_grace(&r, default, began - 5),
            Duration::from_secs(3)
        );
        // A forced stop stays forced.
        r.operation = ending_op(Op::Stop, Duration::ZERO);
        assert_eq!(recorded_grace(&r, default, began), Duration::ZERO);
        // A record from before the grace was kept: the agent's default.
        r.operation = op(Op::Reboot);
        assert_eq!(recorded_grace(&r, default, began + 1), default);
        // A reboot whose new VMM runs is recorded as a start, so that VMM is adopted as it is.
        assert_eq!(
            decide(
                &rec(P::Running, D::Running, Some(Op::Start)),
                &found(Some(P::Running), None)
            ),
            Recovery::Adopted {
                state: P::Running,
                then: AfterAdopt::Reconcile
            }
        );
    }
}
