//! `bexar run`: one VM in the foreground.

use std::time::Duration;

use super::{RunArgs, RunStatus, VmArgs};
use bexar_vmm::cpuid::CpuTemplate;
use bexar_vmm::{self as vmm, ExitReason, VmConfig, VmmError, DEFAULT_CMDLINE};

/// Checks the VM flags and builds a config; the error names the offending flag.
pub fn vm_config(
    kernel: &std::path::Path,
    vm: &VmArgs,
    index: usize,
    count: usize,
) -> Result<VmConfig, String> {
    let pick = |list: &[String], what: &str| -> Result<Option<String>, String> {
        match list.len() {
            0 => Ok(None),
            1 => Ok(Some(list[0].clone())),
            n if n == count => Ok(Some(list[index].clone())),
            n => Err(format!(
                "--{what} given {n} times for {count} images: give it once or once per image"
            )),
        }
    };
    let initrds: Vec<String> = vm.initrd.iter().map(|p| p.display().to_string()).collect();
    let cpu_template =
        CpuTemplate::from_name(&vm.cpu_template).map_err(|e| format!("--cpu-template: {e}"))?;
    if !(1..=vmm::boot::mptable::MAX_VCPUS).contains(&vm.vcpus) {
        return Err(format!(
            "--vcpus: {} is out of range 1-{}",
            vm.vcpus,
            vmm::boot::mptable::MAX_VCPUS
        ));
    }
    if vm.memory < 16 || vm.memory > 1 << 20 {
        return Err(format!(
            "--memory: {} MiB is out of range 16-1048576",
            vm.memory
        ));
    }
    let timeout = match vm.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(format!(
                "--timeout: {t} is not a positive number of seconds"
            ))
        }
    };
    if !kernel.is_file() {
        return Err(format!(
            "--kernel: {} does not exist or is not a file",
            kernel.display()
        ));
    }
    for d in &vm.disk {
        if !d.path.is_file() {
            return Err(format!(
                "--disk: {} does not exist or is not a file",
                d.path.display()
            ));
        }
    }
    let initrd = pick(&initrds, "initrd")?.map(std::path::PathBuf::from);
    if let Some(p) = &initrd {
        if !p.is_file() {
            return Err(format!(
                "--initrd: {} does not exist or is not a file",
                p.display()
            ));
        }
    }
    Ok(VmConfig {
        kernel: kernel.to_owned(),
        initrd,
        cmdline: pick(&vm.cmdline, "cmdline")?.unwrap_or_else(|| DEFAULT_CMDLINE.to_owned()),
        vcpus: vm.vcpus,
        memory_mib: vm.memory,
        cpu_template,
        console: bexar_devices::serial::ConsoleConfig::Stdio,
        stdin: false,
        timeout,
        platform_params: !vm.no_platform_params,
        legacy_pit: vm.legacy_pit,
        disks: vm.disk.clone(),
        nics: vm.net.clone(),
        rng: vm.rng,
        vsock: vm.vsock.clone(),
        control: None,
    })
}

/// Maps how a VM ended to the exit status of `bexar run`.
pub fn status_for(reason: &ExitReason) -> RunStatus {
    match reason {
        r if r.is_clean() => RunStatus::Clean,
        ExitReason::GuestStatus(_) | ExitReason::Crash => RunStatus::GuestFailure,
        ExitReason::TripleFault { .. } => RunStatus::TripleFault,
        ExitReason::Timeout => RunStatus::Timeout,
        _ => RunStatus::KvmError,
    }
}

/// Runs `bexar run`.
pub fn main(args: &RunArgs) -> RunStatus {
    let mut config = match vm_config(&args.kernel, &args.vm, 0, 1) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bexar run: {e}");
            return RunStatus::BadInput;
        }
    };
    config.console = args.console.clone();
    config.stdin = !args.no_stdin;
    let matched = std::sync::Mutex::new(None);
    let hook = |exit: &vmm::ExitHandle, start: std::time::Instant| {
        let pattern = args.expect.as_deref().unwrap_or("");
        let (w, m) = super::watch::PatternWatch::new(pattern, exit.clone(), start);
        *bexar_util::sync::lock(&matched) = Some(m);
        Box::new(w) as Box<dyn bexar_devices::serial::ConsoleObserver>
    };
    let hook = args
        .expect
        .is_some()
        .then_some(&hook as vmm::builder::ConsoleHook<'_>);
    match vmm::run(&config, hook) {
        Ok(mut outcome) => {
            outcome.pattern_ms = bexar_util::sync::lock(&matched)
                .as_ref()
                .and_then(|m| m.at())
                .map(|d| d.as_secs_f64() * 1e3);
            let status = status_for(&outcome.reason);
            if status == RunStatus::Clean {
                tracing::info!(
                    "VM ended: {} after {:.1} ms",
                    outcome.reason,
                    outcome.elapsed_ms
                );
            } else {
                tracing::error!(
                    "VM ended: {} after {:.1} ms",
                    outcome.reason,
                    outcome.elapsed_ms
                );
            }
            if let Some(path) = &args.result_json {
                let json = serde_json::to_vec_pretty(&outcome).unwrap_or_default();
                if let Err(e) = std::fs::write(path, json) {
                    eprintln!("bexar run: cannot write {}: {e}", path.display());
                }
            }
            status
        }
        Err(e) => {
            eprintln!("bexar run: {e}");
            match e {
                VmmError::Kvm0(_) | VmmError::Kvm(..) | VmmError::Setup(_) => RunStatus::KvmError,
                _ => RunStatus::BadInput,
            }
        }
    }
}
