//! `bexar vmm --dir DIR`: the per-VM process the agent starts. It runs one VM from
//! `DIR/launch.json`, serves its control and console sockets in DIR, holds `DIR/vmm.lock` for
//! its whole life (so two VMMs can never run the same VM), and writes `DIR/result.json` when
//! the VM ends.

use std::path::Path;
use std::process::ExitCode;

use super::RunStatus;
use bexar_agent::store::{layout, try_lock, write_atomic};
use bexar_agent::vmm_process::{Launch, RunResult};

fn write_result(dir: &Path, result: &RunResult) {
    match serde_json::to_vec_pretty(result) {
        Ok(data) => {
            if let Err(e) = write_atomic(&dir.join(layout::RESULT), &data) {
                tracing::error!("cannot write the result: {e}");
            }
        }
        Err(e) => tracing::error!("cannot encode the result: {e}"),
    }
}

/// Runs `bexar vmm`.
pub fn main(dir: &Path) -> ExitCode {
    let launch: Launch = match std::fs::read(dir.join(layout::LAUNCH))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{}: {e}", dir.join(layout::LAUNCH).display());
            return RunStatus::BadInput.into();
        }
    };
    let _lock = match try_lock(&dir.join(layout::VMM_LOCK)) {
        Ok(Some(l)) => l,
        Ok(None) => {
            tracing::error!("another VMM already runs VM {:?}", launch.id);
            return RunStatus::BadInput.into();
        }
        Err(e) => {
            tracing::error!("{e}");
            return RunStatus::BadInput.into();
        }
    };
    let fail = |status: RunStatus, reason: String| -> ExitCode {
        tracing::error!("{reason}");
        write_result(
            dir,
            &RunResult {
                token: launch.token.clone(),
                clean: false,
                reason,
                outcome: None,
            },
        );
        status.into()
    };
    let config = match launch.spec.vm_config(
        dir,
        &launch.token,
        &launch.nics,
        launch.cmdline_extra.as_deref(),
    ) {
        Ok(c) => c,
        Err(e) => return fail(RunStatus::BadInput, e.to_string()),
    };
    tracing::info!(
        vm = %launch.id,
        pid = std::process::id(),
        "VMM starting: {} vCPUs, {} MiB",
        config.vcpus,
        config.memory_mib
    );
    match bexar_vmm::run(&config, None) {
        Ok(outcome) => {
            let status = super::run::status_for(&outcome.reason);
            tracing::info!(vm = %launch.id, "VM ended: {}", outcome.reason);
            write_result(
                dir,
                &RunResult {
                    token: launch.token.clone(),
                    clean: outcome.reason.is_clean(),
                    reason: outcome.reason.to_string(),
                    outcome: serde_json::to_value(&outcome).ok(),
                },
            );
            status.into()
        }
        Err(e) => fail(RunStatus::KvmError, e.to_string()),
    }
}
