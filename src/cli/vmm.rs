//! `bexar vmm --dir DIR`: the per-VM process the agent starts. It runs one VM from
//! `DIR/launch.json`, serves its control and console sockets in DIR, holds `DIR/vmm.lock` for
//! its whole life (so two VMMs can never run the same VM), and writes `DIR/result.json` when
//! the VM ends (see `bexar_vmm::launch`).

use std::path::Path;
use std::process::ExitCode;

use super::run::{status_for, status_for_error};
use super::RunStatus;
use bexar_util::fs::{try_lock, write_atomic};
use bexar_vmm::launch::{files, Launch, RunResult};
use bexar_vmm::{build_for_boot, build_from_snapshot};

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

/// Runs `bexar vmm`.
pub fn main(dir: &Path) -> ExitCode {
    let launch = match Launch::read(dir) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return RunStatus::BadInput.into();
        }
    };
    let _lock = match try_lock(&dir.join(files::LOCK)) {
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
    let token = launch.token().to_owned();
    tracing::info!(
        vm = %launch.id(),
        pid = std::process::id(),
        "VMM starting: {} vCPUs, {} MiB",
        launch.config.vcpus,
        launch.config.memory_mib
    );
    let built = match &launch.restore {
        Some(snapshot) => {
            tracing::info!(vm = %launch.id(), "restoring {}", snapshot.display());
            build_from_snapshot(snapshot, &launch.restore_config())
        }
        None => build_for_boot(&launch.config),
    };
    match built.and_then(|vmm| vmm.run_until_exit(None)) {
        Ok(outcome) => {
            tracing::info!(vm = %launch.id(), "VM ended: {}", outcome.reason);
            write_result(
                dir,
                &RunResult {
                    token,
                    clean: outcome.reason.is_clean(),
                    reason: outcome.reason.to_string(),
                    outcome: serde_json::to_value(&outcome).ok(),
                },
            );
            status_for(&outcome.reason).into()
        }
        Err(e) => {
            tracing::error!("{e}");
            write_result(
                dir,
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
