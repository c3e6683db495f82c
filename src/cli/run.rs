//! `bexar run`: one VM in the foreground.

use std::time::Duration;

use super::watch::PatternWatch;
use super::{RunArgs, RunStatus, VmArgs};
use bexar_vmm::config::{ConfigError, ConsoleConfig, ControlConfig, DEFAULT_CMDLINE};
use bexar_vmm::cpuid::CpuTemplate;
use bexar_vmm::{
    build_for_boot, build_from_migration, build_from_snapshot, ExitReason, RestoreConfig, VmConfig,
    VmOutcome, Vmm, VmmError,
};

/// The flag a refused field of a [`VmConfig`] came from.
fn flag_of(e: &ConfigError) -> &'static str {
    let f = e.field.as_str();
    match f.split(['[', '.']).next().unwrap_or(f) {
        "vcpus" => "--vcpus",
        "memory_mib" => "--memory",
        "kernel" => "--kernel",
        "initrd" => "--initrd",
        "cmdline" => "--cmdline",
        "disks" => "--disk",
        "nics" => "--net",
        "vsock" => "--vsock",
        "console" => "--console",
        _ => "flags",
    }
}

/// A VM to run and how long it may run.
pub struct Plan {
    /// The VM.
    pub config: VmConfig,
    /// End it after this long (counted from the VMM's start).
    pub timeout: Option<Duration>,
}

/// Checks the VM flags of image `index` out of `count` (flags given once count for every
/// image) and builds its config; the error names the offending flag.
pub fn plan(
    kernel: &std::path::Path,
    vm: &VmArgs,
    index: usize,
    count: usize,
) -> Result<Plan, String> {
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
    let timeout = match vm.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(format!(
                "--timeout: {t} is not a positive number of seconds"
            ))
        }
    };
    let config = VmConfig {
        initrd: pick(&initrds, "initrd")?.map(std::path::PathBuf::from),
        cmdline: pick(&vm.cmdline, "cmdline")?.unwrap_or_else(|| DEFAULT_CMDLINE.to_owned()),
        vcpus: vm.vcpus,
        memory_mib: vm.memory,
        cpu_template,
        console: ConsoleConfig::Stdio,
        platform_params: !vm.no_platform_params,
        legacy_pit: vm.legacy_pit,
        disks: vm.disk.clone(),
        nics: vm.net.clone(),
        rng: vm.rng,
        vsock: vm.vsock.clone(),
        smbios: vm.smbios.clone().unwrap_or_default(),
        ..VmConfig::new(kernel)
    };
    config
        .validate()
        .map_err(|e| format!("{}: {}", flag_of(&e), e.message))?;
    Ok(Plan { config, timeout })
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

/// The exit status for a VM that could not be built or run.
pub fn status_for_error(e: &VmmError) -> RunStatus {
    if e.is_bad_input() {
        RunStatus::BadInput
    } else {
        RunStatus::KvmError
    }
}

/// How `bexar run` gets its VM.
enum Source<'a> {
    /// Boots a kernel.
    Boot(&'a VmConfig),
    /// Restores a snapshot directory.
    Restore(&'a std::path::Path, Box<RestoreConfig>),
    /// Receives a migrating VM on this socket.
    Incoming(&'a std::path::Path, Box<RestoreConfig>),
}

/// Receives a VM migrated to `socket` and builds it: the sender's guest is ours once this
/// answers it, which happens only after the VM is restored here.
pub(super) fn receive_migration(
    socket: &std::path::Path,
    restore: &RestoreConfig,
    timeout: Option<Duration>,
) -> Result<Vmm, VmmError> {
    use bexar_vmm::migration::{answer, receive};
    let control_err = |err: std::io::Error| VmmError::Control {
        path: socket.to_owned(),
        err,
    };
    // Only this user's processes may connect (what they send becomes this VM, written onto
    // the disks this launch names), and only a connection from this user or root is taken.
    let listener = bexar_util::unix::bind_owner_only(socket).map_err(control_err)?;
    listener.set_nonblocking(true).map_err(control_err)?;
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => {
                let me = nix::unistd::geteuid().as_raw();
                match nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials) {
                    Ok(c) if c.uid() == me || c.uid() == 0 => break s,
                    Ok(c) => tracing::warn!("migration from uid {} refused", c.uid()),
                    Err(e) => tracing::warn!("migration peer unknown ({e}): refused"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    let _ = std::fs::remove_file(socket);
                    return Err(control_err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no migration arrived before the timeout",
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(control_err(e)),
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(socket);
    stream.set_nonblocking(false).map_err(control_err)?;
    stream
        .set_read_timeout(Some(bexar_vmm::migration::IO_TIMEOUT))
        .map_err(control_err)?;
    // The stream is read once this process is jailed, onto the disks its launch names.
    let built = build_from_migration(restore, |disks| receive(&mut &stream, &mut &stream, disks));
    let said = answer(
        &mut stream,
        built.as_ref().map(|_| ()).map_err(|e| e.to_string()),
    );
    let vmm = built?;
    // Without the answer the sender resumes its guest: this copy must not run too.
    said.map_err(control_err)?;
    Ok(vmm)
}

/// Builds (or restores) and runs the VM; watches its console for `expect`, if given.
fn run(
    source: Source<'_>,
    timeout: Option<Duration>,
    expect: Option<&str>,
) -> Result<VmOutcome, VmmError> {
    let vmm: Vmm = match source {
        Source::Boot(config) => build_for_boot(config)?,
        Source::Restore(dir, restore) => build_from_snapshot(dir, &restore)?,
        Source::Incoming(socket, restore) => receive_migration(socket, &restore, timeout)?,
    };
    let matched = expect.map(|pattern| {
        let (watch, matched) = PatternWatch::new(pattern, vmm.exit_handle(), vmm.start_time());
        vmm.observe_console(Box::new(watch));
        matched
    });
    let mut outcome = vmm.run_until_exit(timeout)?;
    outcome.pattern_ms = matched.and_then(|m| m.at()).map(|d| d.as_secs_f64() * 1e3);
    Ok(outcome)
}

/// The control section for `--control PATH` (`bexar run` has no agent to prove itself to).
fn control_of(path: Option<&std::path::Path>) -> Option<ControlConfig> {
    path.map(|p| ControlConfig {
        socket: p.to_owned(),
        id: "run".into(),
        token: "run".into(),
    })
}

/// The root every jailed `bexar run` shares: empty, owned by root, read-only to the VMM.
const RUN_JAIL_ROOT: &str = "/run/bexar/empty";

/// Where the mount namespace of that root is kept ([`bexar_vmm::jail::JailConfig::shared_mount_ns`]).
const RUN_JAIL_MNTNS: &str = "/run/bexar/ns/empty.mntns";

/// Arms the jail and the seccomp filters for this run, as `bexar vmm` does for the agent. As
/// another user than root only seccomp (which needs no privilege) is armed.
fn arm_jail(args: &RunArgs) -> Result<(), String> {
    if args.no_jail {
        tracing::warn!(
            "--no-jail: this VMM keeps root, the host's namespaces and every system call; a \
             guest that escapes through a device bug owns the host"
        );
        return Ok(());
    }
    let remote: Vec<(String, u16)> = args
        .vm
        .disk
        .iter()
        .filter_map(|d| d.remote_server())
        .collect();
    // Forking into a PID namespace needs root; as another user the VMM stays this process, as
    // it does when it is the first process of a PID namespace already (a container's).
    let root_user = nix::unistd::geteuid().as_raw() == 0;
    let fork = root_user && !args.no_pid_namespace && !bexar_vmm::jail::own_pid_namespace();
    // TCP sockets only for a VMM that connects its remote disks itself.
    bexar_vmm::seccomp::arm(None, !remote.is_empty() && !fork).map_err(|e| e.to_string())?;
    if !root_user {
        tracing::warn!(
            "not root: no jail (namespaces, empty root, own uid) for this VMM, only its seccomp \
             filters"
        );
        return Ok(());
    }
    let root = std::path::Path::new(RUN_JAIL_ROOT);
    std::fs::create_dir_all(root).map_err(|e| format!("{RUN_JAIL_ROOT}: {e}"))?;
    std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o555))
        .map_err(|e| format!("{RUN_JAIL_ROOT}: {e}"))?;
    let mut j = bexar_vmm::jail::JailConfig::new(args.jail_uid_base, root.to_owned());
    // Every jailed `bexar run` joins one mount namespace whose only mount is that root,
    // rather than making its own and pivoting (about 1 ms here).
    j.shared_mount_ns = Some(RUN_JAIL_MNTNS.into());
    // The VMM goes on as pid 1 of a PID namespace of its own; this process waits outside, in
    // the host's network namespace, and connects the remote disks for the VMM, whose own
    // network namespace is then empty.
    // (The servers it dials are those of the disks the VMM opens, a snapshot's included.)
    j.fork_pid_namespace = fork;
    if !fork {
        // Remote disks keep the host's network, to reconnect to their servers' ports (only).
        j.network = remote.is_empty();
        j.tcp_ports = remote.iter().map(|(_, p)| *p).collect();
    }
    bexar_vmm::jail::arm(j).map_err(|e| e.to_string())
}

/// Runs `bexar run`.
pub fn main(args: &RunArgs) -> RunStatus {
    if let Err(e) = arm_jail(args) {
        eprintln!("bexar run: {e}");
        return RunStatus::BadInput;
    }
    // Opened now: a jailed run cannot open it by its path once the VM is built.
    let mut result_file = match &args.result_json {
        None => None,
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("bexar run: cannot write {}: {e}", path.display());
                return RunStatus::BadInput;
            }
        },
    };
    let control = control_of(args.control.as_deref());
    let ran = if let Some(dir) = args.restore.as_ref().or(args.incoming.as_ref()) {
        let timeout = match args.vm.timeout {
            Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
            Some(t) => {
                eprintln!("bexar run: --timeout: {t} is not a positive number of seconds");
                return RunStatus::BadInput;
            }
            None => None,
        };
        let v = &args.vm;
        let restore = RestoreConfig {
            stdin: !args.no_stdin,
            control,
            backends: Some(bexar_vmm::builder::Backends {
                disks: (!v.disk.is_empty()).then(|| v.disk.clone()),
                nics: (!v.net.is_empty()).then(|| v.net.clone()),
                vsock: v.vsock.clone(),
            }),
            ..RestoreConfig::new(args.console.clone())
        };
        let source = if args.incoming.is_some() {
            Source::Incoming(dir, Box::new(restore))
        } else {
            Source::Restore(dir, Box::new(restore))
        };
        run(source, timeout, args.expect.as_deref())
    } else {
        let kernel = args.kernel.clone().unwrap_or_default();
        let mut plan = match plan(&kernel, &args.vm, 0, 1) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("bexar run: {e}");
                return RunStatus::BadInput;
            }
        };
        plan.config.console = args.console.clone();
        plan.config.stdin = !args.no_stdin;
        plan.config.control = control;
        run(
            Source::Boot(&plan.config),
            plan.timeout,
            args.expect.as_deref(),
        )
    };
    match ran {
        Ok(outcome) => {
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
            if let (Some(path), Some(f)) = (&args.result_json, result_file.as_mut()) {
                use std::io::Write;
                let json = serde_json::to_vec_pretty(&outcome).unwrap_or_default();
                if let Err(e) = f.write_all(&json) {
                    eprintln!("bexar run: cannot write {}: {e}", path.display());
                }
            }
            status
        }
        Err(e) => {
            eprintln!("bexar run: {e}");
            status_for_error(&e)
        }
    }
}
