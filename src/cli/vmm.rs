//! `bexar vmm --dir DIR`: the per-VM process the agent starts. It runs one VM from
//! `DIR/launch.json`, serves its control and console sockets in DIR, holds `DIR/vmm.lock` for
//! its whole life (so two VMMs can never run the same VM), and writes `DIR/result.json` when
//! the VM ends (see `bexar_vmm::launch`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::run::{status_for, status_for_error};
use super::RunStatus;
use bexar_util::fs::{try_lock, write_atomic};
use bexar_vmm::launch::{files, Launch, RunResult};
use bexar_vmm::{build_for_boot, build_from_handoff, build_from_snapshot};

/// How long a VMM launched to receive a migration waits for the stream to arrive: the agent
/// that launched it connects within milliseconds, and an agent that died meanwhile never will
/// (its VM, then, runs on the sender; this VMM ends and the restarted agent deletes the copy).
/// A stream that stalls later fails on its own timeouts.
const INCOMING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn write_result(dir: &Path, result: &RunResult) {
    match serde_json::to_vec_pretty(result) {
        Ok(data) => {
            if let Err(e) = write_atomic(&dir.join(files::RESULT), &data) {
                tracing::error!("cannot write the result: {e}");
            }
        }
        Err(e) => tracing::error!("cannot encode the result: {e}"),
    }
}

/// [`write_result`] in place at once, made durable by the caller later
/// ([`bexar_util::fs::Unsynced::sync`]).
fn write_result_unsynced(dir: &Path, result: &RunResult) -> Option<bexar_util::fs::Unsynced> {
    let written = serde_json::to_vec_pretty(result)
        .map_err(|e| e.to_string())
        .and_then(|data| {
            bexar_util::fs::write_replace(&dir.join(files::RESULT), &data)
                .map_err(|e| e.to_string())
        });
    match written {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::error!("cannot write the result: {e}");
            None
        }
    }
}

/// Waits up to 10 s for the VMM lock of `dir` (the VMM that handed its VM over is ending).
fn wait_lock(dir: &Path) -> Result<std::fs::File, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match try_lock(&dir.join(files::LOCK)) {
            Ok(Some(l)) => return Ok(l),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_micros(200))
            }
            Ok(None) => return Err("the VMM that handed the VM over did not end".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Arms the launch's jail, if it has one: the seccomp filters (with `DIR/vmm.fault` for a
/// violation's record), the jail itself (entered by the builder), and the jail's root as the
/// working directory, so the relative paths of the launch (the vsock socket) mean the same
/// file before and after `pivot_root`.
fn arm_jail(dir: &Path, launch: &Launch) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(j) = &launch.jail else {
        return Ok(());
    };
    if j.seccomp {
        let fault = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(files::FAULT))
            .map_err(|e| format!("{}: {e}", dir.join(files::FAULT).display()))?;
        // TCP sockets only for remote disks that the VMM connects itself.
        let inet = launch.dialer.is_none() && launch.config.disks.iter().any(|d| d.is_remote());
        bexar_vmm::seccomp::arm(Some(fault.into()), inet).map_err(|e| e.to_string())?;
    }
    // The only TCP the jail allows: the remote disks' servers' ports (none when the agent
    // connects them).
    let tcp_ports = launch
        .config
        .disks
        .iter()
        .filter(|_| launch.dialer.is_none())
        .filter_map(|d| d.remote_port())
        .collect();
    bexar_vmm::jail::arm(bexar_vmm::jail::JailConfig {
        tcp_ports,
        ..j.clone()
    })
    .map_err(|e| e.to_string())?;
    std::env::set_current_dir(&j.root).map_err(|e| format!("{}: {e}", j.root.display()))?;
    Ok(())
}

/// The handover state a jailed VMM left in the jail's root, moved out of it (while this VMM
/// is still root), so the root is empty again and the next VMM there can write its own.
fn out_of_jail_root(dir: &Path, state: PathBuf) -> PathBuf {
    let dest = dir.join(files::HANDOFF);
    if state == dest {
        return state;
    }
    let _ = std::fs::remove_dir_all(&dest);
    // The old VMM made it: a directory, not a link to somewhere else, before and after.
    let is_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    if !is_dir(&state) || std::fs::rename(&state, &dest).is_err() || !is_dir(&dest) {
        tracing::warn!("the handover state {} is not a directory", state.display());
        let _ = std::fs::remove_file(&dest);
        return dest;
    }
    dest
}

/// Where the result goes: `DIR`, or the jail's root once the VMM lives in it.
fn out_dir(dir: &Path) -> PathBuf {
    if bexar_vmm::jail::in_jail_root() {
        Path::new("/").join(files::JAIL_OUT)
    } else {
        dir.to_owned()
    }
}

/// Runs `bexar vmm`.
pub fn main(dir: &Path) -> ExitCode {
    let launch = match Launch::read(dir) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return RunStatus::BadInput.into();
        }
    };
    let token = launch.token().to_owned();
    let handed = launch.handed.as_ref().map_or(Ok(()), |h| {
        bexar_util::handed::install(h).map_err(|e| format!("the launch's descriptors: {e}"))
    });
    if let Some(p) = &launch.dialer {
        bexar_devices::block::remote::dial_through(p.clone());
    }
    if let Err(e) = handed.and_then(|()| arm_jail(dir, &launch)) {
        {
            tracing::error!(vm = %launch.id(), "{e}");
            write_result(
                dir,
                &RunResult {
                    token,
                    clean: false,
                    reason: e,
                    outcome: None,
                },
            );
            return RunStatus::BadInput.into();
        }
    }
    let (lock, built) = if launch.handoff {
        // The running VMM pauses the guest and hands over its memory, TAPs and sockets; this
        // one restores it as soon as that one has ended (and released its lock).
        let socket = launch
            .config
            .control
            .as_ref()
            .map(|c| c.socket.clone())
            .unwrap_or_default();
        let state = dir.join(files::HANDOFF);
        let root = dir.join(files::JAIL_ROOT);
        match bexar_vmm::control::take_over(&socket, &state, &root, launch.handoff_from)
            .and_then(|(memory, report, state)| Ok((memory, report, state, wait_lock(dir)?)))
        {
            Ok((memory, report, state, lock)) => (
                lock,
                build_from_handoff(
                    &out_of_jail_root(dir, state),
                    &launch.restore_config(),
                    memory,
                    report.paused_at_ns,
                ),
            ),
            Err(e) => {
                tracing::error!(vm = %launch.id(), "cannot take the VM over: {e}");
                write_result(
                    dir,
                    &RunResult {
                        token,
                        clean: false,
                        reason: format!("cannot take the VM over: {e}"),
                        outcome: None,
                    },
                );
                return RunStatus::KvmError.into();
            }
        }
    } else {
        let lock = match try_lock(&dir.join(files::LOCK)) {
            Ok(Some(l)) => l,
            Ok(None) => {
                tracing::error!("another VMM already runs VM {:?}", launch.id());
                return RunStatus::BadInput.into();
            }
            Err(e) => {
                tracing::error!("{e}");
                return RunStatus::BadInput.into();
            }
        };
        tracing::info!(
            vm = %launch.id(),
            pid = bexar_vmm::jail::host_pid(),
            "VMM starting: {} vCPUs, {} MiB",
            launch.config.vcpus,
            launch.config.memory_mib
        );
        let built = match (&launch.incoming, &launch.restore) {
            (Some(socket), _) => {
                tracing::info!(vm = %launch.id(), "receiving a migration on {}", socket.display());
                super::run::receive_migration(
                    socket,
                    &launch.restore_config(),
                    Some(INCOMING_TIMEOUT),
                )
            }
            (None, Some(snapshot)) => {
                tracing::info!(vm = %launch.id(), "restoring {}", snapshot.display());
                build_from_snapshot(snapshot, &launch.restore_config())
            }
            (None, None) => build_for_boot(&launch.config),
        };
        (lock, built)
    };
    let mut lock = Some(lock);
    match built.and_then(|vmm| vmm.run_until_exit(None)) {
        Ok(outcome) => {
            tracing::info!(vm = %launch.id(), "VM ended: {}", outcome.reason);
            let result = RunResult {
                token,
                clean: outcome.reason.is_clean(),
                reason: outcome.reason.to_string(),
                outcome: serde_json::to_value(&outcome).ok(),
            };
            if outcome.handed_off {
                // The new VMM waits for the lock with the guest paused, and then makes the
                // jail's `out` its own: the result (which an agent that restarted during a
                // live upgrade or a migration reads) is put in place first, its fsyncs
                // after the lock, so the pause grows by microseconds, not milliseconds.
                let unsynced = write_result_unsynced(&out_dir(dir), &result);
                drop(lock.take());
                if let Some(Err(e)) = unsynced.map(bexar_util::fs::Unsynced::sync) {
                    tracing::error!("cannot make the result durable: {e}");
                }
            } else {
                write_result(&out_dir(dir), &result);
            }
            status_for(&outcome.reason).into()
        }
        Err(e) => {
            tracing::error!("{e}");
            write_result(
                &out_dir(dir),
                &RunResult {
                    token,
                    clean: false,
                    reason: e.to_string(),
                    outcome: None,
                },
            );
            status_for_error(&e).into()
        }
    }
}
