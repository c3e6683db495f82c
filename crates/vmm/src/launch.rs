//! The contract between the agent and each `bexar vmm --dir DIR` process, as files in DIR:
//!
//! * `launch.json` ([`Launch`]): what to run, a versioned [`VmConfig`] whose control section
//!   carries the VM id and the launch token;
//! * `vmm.lock`: an flock the VMM holds for its whole life (two VMMs never run one VM);
//! * `result.json` ([`RunResult`]): how the VM ended, written atomically by the VMM.

use std::os::fd::OwnedFd;
use std::path::Path;

use bexar_util::handed::{Handed, What};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// File names in a VM's directory that the VMM itself uses.
pub mod files {
    /// What to run.
    pub const LAUNCH: &str = "launch.json";
    /// Held by the VMM for its whole life.
    pub const LOCK: &str = "vmm.lock";
    /// How it ended.
    pub const RESULT: &str = "result.json";
    /// Where a VMM handing its VM over writes the VM's state for the new one.
    pub const HANDOFF: &str = "handoff";
    /// The jail's root directory (empty when the VMM starts; its result, snapshot staging and
    /// handover state are written there by the jailed VMM).
    pub const JAIL_ROOT: &str = "root";
    /// Where the VMM's seccomp handler records a forbidden system call.
    pub const FAULT: &str = "vmm.fault";
    /// The one directory of the jail's root the jailed VMM may write (its result, snapshot
    /// staging, handover state); the root itself stays root's, so what else is there (the
    /// vsock socket) cannot be replaced from inside.
    pub const JAIL_OUT: &str = "out";
}

/// The launch format this VMM writes and reads. A newer one is refused with a clear error;
/// older ones are read.
pub const LAUNCH_VERSION: u32 = 1;

/// What a VMM is started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    /// Format version.
    pub version: u32,
    /// The VM.
    pub config: VmConfig,
    /// Restore this snapshot directory instead of booting `config`'s kernel (the config's
    /// disks, NICs and vsock device are the restored VM's backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<std::path::PathBuf>,
    /// Take the VM over from the VMM running it in this directory (live upgrade): its state and
    /// guest memory's descriptor through its control socket, then its lock once it has ended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handoff: bool,
    /// The pid of the VMM running it, as the host sees it (with `handoff`). A VMM in a PID
    /// namespace of its own cannot learn it from the control socket (the kernel names a peer
    /// outside the namespace as pid 0), and needs it to tell whether that VMM is jailed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_from: Option<u32>,
    /// Receive the VM from a live migration on this Unix socket (bound by the VMM, before its
    /// jail) instead of booting `config`'s kernel (whose disks, NICs and vsock device are the
    /// received VM's backends; its writable raw disks are written from the stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<std::path::PathBuf>,
    /// Jail the VMM (`DIR/root` its root) before the guest runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<crate::jail::JailConfig>,
    /// What the agent opened for the VMM ([`Launch::open_handed`]), inherited at exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed: Option<Handed>,
    /// The Unix socket (relative to the jail's root, the VMM's working directory) on which
    /// the agent connects the VMM's remote disks to their servers and hands the sockets back
    /// (`bexar_devices::block::remote::dial_through`): the VMM's own network namespace stays
    /// empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialer: Option<std::path::PathBuf>,
}

/// `launch.json` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// It cannot be read.
    #[error("{path}: {err}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// It is not a launch document.
    #[error("{path}: {err}")]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        err: serde_json::Error,
    },
    /// A newer agent wrote it.
    #[error("{path} is launch format {found}; this VMM reads up to {LAUNCH_VERSION}")]
    Version {
        /// The file.
        path: std::path::PathBuf,
        /// Its version.
        found: u32,
    },
    /// What the VMM needs of the host cannot be opened for it.
    #[error("cannot {what}: {err}")]
    Hand {
        /// What was being opened.
        what: String,
        /// Why not.
        err: String,
    },
    /// It has no control section (the VMM must be able to prove who it is).
    #[error("{0} has no control socket, VM id and launch token")]
    NoControl(std::path::PathBuf),
}

impl Launch {
    /// A launch of `config` in the current format.
    pub fn new(config: VmConfig) -> Self {
        Self {
            version: LAUNCH_VERSION,
            config,
            restore: None,
            handoff: false,
            handoff_from: None,
            incoming: None,
            jail: None,
            handed: None,
            dialer: None,
        }
    }

    /// What a VMM of this launch would open of the host, opened here with this process's
    /// rights, to be handed to it at exec ([`bexar_util::handed`]): /dev/kvm, the kernel and
    /// initrd (or a snapshot's state and memory), every local disk's file and the files of
    /// its backing chain (found as the VMM would find them, pins checked), the console's log,
    /// and, unless the VMM takes a running VM over (whose VMM holds them, and hands them to it
    /// as they are: `control::take_over`), each TAP, the console's socket, the control socket,
    /// the vsock socket and the socket a migration arrives on. A path relative to the VMM's
    /// working directory (its jail's root, where it has one) is opened there. Remote disks
    /// are not here: the agent connects them when the VMM asks ([`Launch::dialer`]).
    pub fn open_handed(&self) -> Result<Vec<(What, OwnedFd)>, LaunchError> {
        use bexar_devices::serial::ConsoleConfig;
        let c = &self.config;
        let base = self.jail.as_ref().map(|j| j.root.clone());
        let at = |p: &Path| match &base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.to_owned(),
        };
        let mut out: Vec<(What, OwnedFd)> = Vec::new();
        let open_err = |what: &str, p: &Path, err: std::io::Error| LaunchError::Hand {
            what: format!("{what} {}", p.display()),
            err: err.to_string(),
        };
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| open_err("open", Path::new("/dev/kvm"), e))?;
        out.push((What::Kvm, kvm.into()));
        let mut read_only = |p: &Path| -> Result<(), LaunchError> {
            let f = std::fs::File::open(at(p)).map_err(|e| open_err("open", p, e))?;
            out.push((
                What::File {
                    path: p.to_owned(),
                    writable: false,
                },
                f.into(),
            ));
            Ok(())
        };
        match (&self.restore, &self.incoming, self.handoff) {
            (_, Some(_), _) | (_, _, true) => {}
            (Some(dir), None, false) => {
                read_only(&crate::snapshot::state_path(dir))?;
                read_only(&crate::snapshot::memory_path(dir))?;
            }
            (None, None, false) => {
                read_only(&c.kernel)?;
                if let Some(i) = &c.initrd {
                    read_only(i)?;
                }
            }
        }
        for d in c.disks.iter().filter(|d| !d.is_remote()) {
            let opened = bexar_devices::block::preopen_disk(d).map_err(|e| LaunchError::Hand {
                what: format!("open disk {}", d.path.display()),
                err: e.to_string(),
            })?;
            for (i, (path, f)) in opened
                .local()
                .map(|l| l.1)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let f = f.try_clone().map_err(|e| open_err("copy", path, e))?;
                let writable = i == 0 && !d.read_only;
                out.push((
                    What::File {
                        path: path.clone(),
                        writable,
                    },
                    f.into(),
                ));
            }
        }
        if let ConsoleConfig::File { path } | ConsoleConfig::SocketWithLog { log: path, .. } =
            &c.console
        {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(at(path))
                .map_err(|e| open_err("open", path, e))?;
            out.push((
                What::File {
                    path: path.clone(),
                    writable: true,
                },
                f.into(),
            ));
        }
        if self.handoff {
            return Ok(out);
        }
        for n in &c.nics {
            let tap = bexar_devices::tap::Tap::open(&n.tap).map_err(|e| LaunchError::Hand {
                what: format!("open TAP {}", n.tap),
                err: e.to_string(),
            })?;
            let f = tap
                .file()
                .try_clone()
                .map_err(|e| open_err("copy TAP", Path::new(&n.tap), e))?;
            out.push((
                What::Tap {
                    name: n.tap.clone(),
                },
                f.into(),
            ));
        }
        let mut listen = |p: &Path| -> Result<(), LaunchError> {
            // Bound, not listening: the VMM listens, so that the agent's client sees the
            // VMM's pid as its peer's.
            let l =
                bexar_util::unix::bind_for_another(&at(p)).map_err(|e| open_err("bind", p, e))?;
            out.push((What::Listener { path: p.to_owned() }, l));
            Ok(())
        };
        match &c.console {
            ConsoleConfig::Socket { path } => listen(path)?,
            ConsoleConfig::SocketWithLog { socket, .. } => listen(socket)?,
            _ => {}
        }
        if let Some(ctl) = &c.control {
            listen(&ctl.socket)?;
        }
        if let Some(v) = &c.vsock {
            listen(&v.uds)?;
        }
        if let Some(s) = &self.incoming {
            listen(s)?;
        }
        Ok(out)
    }

    /// Reads `DIR/launch.json`.
    pub fn read(dir: &Path) -> Result<Self, LaunchError> {
        let path = dir.join(files::LAUNCH);
        let bytes = std::fs::read(&path).map_err(|err| LaunchError::Read {
            path: path.clone(),
            err,
        })?;
        // The version is read first, so a newer format is named as such rather than as a
        // field this VMM does not know.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(&bytes).map_err(|err| LaunchError::Parse {
            path: path.clone(),
            err,
        })?;
        if v.version > LAUNCH_VERSION {
            return Err(LaunchError::Version {
                path,
                found: v.version,
            });
        }
        let launch: Self = serde_json::from_slice(&bytes).map_err(|err| LaunchError::Parse {
            path: path.clone(),
            err,
        })?;
        if launch.config.control.is_none() {
            return Err(LaunchError::NoControl(path));
        }
        Ok(launch)
    }

    /// The restore of [`Self::restore`]: the console, control socket and backends are this
    /// launch's own.
    pub fn restore_config(&self) -> crate::builder::RestoreConfig {
        let c = &self.config;
        crate::builder::RestoreConfig {
            stdin: false,
            control: c.control.clone(),
            backends: Some(crate::builder::Backends {
                disks: Some(c.disks.clone()),
                nics: Some(c.nics.clone()),
                vsock: c.vsock.clone(),
            }),
            memory_mib: Some(c.memory_mib),
            ..crate::builder::RestoreConfig::new(c.console.clone())
        }
    }

    /// The VM id.
    pub fn id(&self) -> &str {
        self.config.control.as_ref().map_or("", |c| c.id.as_str())
    }

    /// The launch token.
    pub fn token(&self) -> &str {
        self.config
            .control
            .as_ref()
            .map_or("", |c| c.token.as_str())
    }
}

/// What a VMM writes when it ends (`result.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Token of the launch that ended.
    pub token: String,
    /// Whether the guest ended in an orderly way (power-off, reset, stop on request).
    pub clean: bool,
    /// Why it ended, for people.
    pub reason: String,
    /// The VMM's full outcome, when it got as far as running the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<serde_json::Value>,
}

impl RunResult {
    /// Whether the VMM handed its VM to another VMM before it ended (a live upgrade's old
    /// VMM, a live migration's sender).
    pub fn handed_off(&self) -> bool {
        self.outcome
            .as_ref()
            .and_then(|o| o.get("handed_off"))
            .and_then(|h| h.as_bool())
            == Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ControlConfig;

    #[test]
    fn launch_files_round_trip_and_newer_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("bexar-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = VmConfig::new("/boot/vmlinux");
        config.control = Some(ControlConfig {
            socket: dir.join("control.sock"),
            id: "vm-1".into(),
            token: "abc".into(),
        });
        let launch = Launch::new(config);
        std::fs::write(
            dir.join(files::LAUNCH),
            serde_json::to_vec(&launch).unwrap(),
        )
        .unwrap();
        let back = Launch::read(&dir).unwrap();
        assert_eq!(back, launch);
        assert_eq!((back.id(), back.token()), ("vm-1", "abc"));

        let mut v = serde_json::to_value(&launch).unwrap();
        v["version"] = 2.into();
        v["config"]["something_new"] = true.into();
        std::fs::write(dir.join(files::LAUNCH), v.to_string()).unwrap();
        let e = Launch::read(&dir).unwrap_err();
        assert!(matches!(e, LaunchError::Version { found: 2, .. }), "{e}");

        let mut no_control = launch.clone();
        no_control.config.control = None;
        std::fs::write(
            dir.join(files::LAUNCH),
            serde_json::to_vec(&no_control).unwrap(),
        )
        .unwrap();
        assert!(matches!(Launch::read(&dir), Err(LaunchError::NoControl(_))));
        std::fs::remove_dir_all(&dir).ok();
    }
}
