//! The contract between the agent and each `bexar vmm --dir DIR` process, as files in DIR:
//!
//! * `launch.json` ([`Launch`]): what to run, a versioned [`VmConfig`] whose control section
//!   carries the VM id and the launch token;
//! * `vmm.lock`: an flock the VMM holds for its whole life (two VMMs never run one VM);
//! * `result.json` ([`RunResult`]): how the VM ended, written atomically by the VMM.

use std::path::Path;

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
        }
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
