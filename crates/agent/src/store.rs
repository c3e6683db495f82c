//! The agent's state directory: one directory per VM holding its record, its VMM's sockets and
//! its logs. Records are replaced atomically (write a temporary file, fsync, rename, fsync the
//! directory), so after a crash at any instant each record is either the old or the new one.
//!
//! ```text
//! STATE/agent.lock            flock: one agent per state directory
//! STATE/events.ndjson         lifecycle events (append-only, trimmed on start)
//! STATE/vms/ID/vm.json        the record: spec, desired state, status, operation in flight
//! STATE/vms/ID/launch.json    what the current VMM was started with (a versioned VmConfig)
//! STATE/vms/ID/vmm.lock       flock held by the VMM for its whole life
//! STATE/vms/ID/control.sock   the VMM's control socket
//! STATE/vms/ID/console.sock   interactive console
//! STATE/vms/ID/console.log    everything the guest wrote to its console
//! STATE/vms/ID/vmm.log        the VMM's own log
//! STATE/vms/ID/result.json    how the last VMM run ended (written by the VMM)
//! ```

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use bexar_util::fs::{io_err, FsError};
pub use bexar_util::fs::{sync_dir, try_lock, write_atomic};

use super::spec::VmRecord;

/// File names inside a VM's directory.
pub mod layout {
    pub use bexar_vmm::launch::files::{LAUNCH, LOCK as VMM_LOCK, RESULT};
    /// The VM record.
    pub const RECORD: &str = "vm.json";
    /// The VMM's control socket.
    pub const CONTROL_SOCKET: &str = "control.sock";
    /// The console socket.
    pub const CONSOLE_SOCKET: &str = "console.sock";
    /// The console log.
    pub const CONSOLE_LOG: &str = "console.log";
    /// The VMM's log.
    pub const VMM_LOG: &str = "vmm.log";
    /// The vsock host socket.
    pub const VSOCK_SOCKET: &str = "vsock.sock";
    /// Where a VMM launched to receive a live migration listens for its stream.
    pub const INCOMING_SOCKET: &str = "incoming.sock";
    /// Where the agent listens for the stream of a VMM it is migrating away (in the jail's
    /// writable directory, so a jailed VMM can reach it).
    pub const MIGRATE_SOCKET: &str = "migrate.sock";
    /// Made when a VMM receiving a live migration has told the sender it holds the VM: from
    /// then on the VM is this host's, even if that VMM dies before the launch is recorded.
    pub const INCOMING_COMMITTED: &str = "incoming.committed";
}

/// Runs `f`, file I/O that waits for the disk (an fsync), without holding up the other tasks
/// of the async worker it runs on: on the agent's multi-threaded runtime the worker hands its
/// queue to the others for the duration.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] FsError),
    /// Another agent owns this state directory.
    #[error("another agent already uses the state directory {0}")]
    Locked(PathBuf),
    /// A record could not be encoded.
    #[error("cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The state directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    _lock: File,
}

impl Store {
    /// Opens (creating it if needed, owner-only) and locks the state directory.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("vms"))
            .map_err(io_err("create", root))?;
        // A crashed agent's children that were forked but had not yet exec'd (VMMs, nft) share
        // its lock until their exec closes it: give them a moment before calling it taken.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let lock = loop {
            match try_lock(&root.join("agent.lock"))? {
                Some(lock) => break lock,
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                None => return Err(StoreError::Locked(root.to_owned())),
            }
        };
        Ok(Self {
            root: root.to_owned(),
            _lock: lock,
        })
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether an atomic write to the state directory works.
    pub fn writable(&self) -> bool {
        let probe = self.root.join(".probe");
        let ok = write_atomic(&probe, b"{}").is_ok();
        let _ = fs::remove_file(&probe);
        ok
    }

    /// The directory of VM `id`.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.root.join("vms").join(id)
    }

    /// Writes a VM's record (creating its directory on first write), off the async worker.
    pub fn save(&self, rec: &VmRecord) -> Result<(), StoreError> {
        blocking(|| self.save_now(rec))
    }

    fn save_now(&self, rec: &VmRecord) -> Result<(), StoreError> {
        let dir = self.vm_dir(&rec.id);
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(io_err("create", &dir))?;
            sync_dir(&self.root.join("vms"))?;
        }
        Ok(write_atomic(
            &dir.join(layout::RECORD),
            &serde_json::to_vec_pretty(rec)?,
        )?)
    }

    /// Removes a VM's directory and everything in it.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.vm_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &dir)(e).into()),
        }
        Ok(sync_dir(&self.root.join("vms"))?)
    }

    /// Removes what interrupted atomic writes left in the VM directories (`*.tmp.*`). Not
    /// needed to load (records are whole or absent), so it runs after the agent listens.
    pub fn sweep_temp(&self) {
        let vms = self.root.join("vms");
        for dir in fs::read_dir(&vms).into_iter().flatten().flatten() {
            for f in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().contains(".tmp.") {
                    let _ = fs::remove_file(f.path());
                }
            }
        }
    }

    /// Loads every record. Directories without a record (a create that crashed before its
    /// first write) are removed; unreadable records are reported and skipped, never deleted.
    pub fn load_all(&self) -> Result<Vec<VmRecord>, StoreError> {
        let vms = self.root.join("vms");
        let mut dirs = Vec::new();
        for entry in fs::read_dir(&vms).map_err(io_err("read", &vms))? {
            let Ok(entry) = entry else { continue };
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // The type comes with the directory listing: no stat per VM.
            let dir = entry
                .file_type()
                .is_ok_and(|t| t.is_dir() || (t.is_symlink() && entry.path().is_dir()));
            if super::spec::valid_id(&id) && dir {
                dirs.push((id, entry.path()));
            }
        }
        // Read and parsed on every CPU: the API listens only once this is done (about 50 us
        // a record on one core of this machine, 50 ms at 1,000 VMs).
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let chunk = dirs.len().div_ceil(threads).max(1);
        let mut out: Vec<VmRecord> = std::thread::scope(|scope| {
            let workers: Vec<_> = dirs
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .filter_map(|(id, dir)| self.load_one(id, dir))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            // A loader that panicked must not make its VMs look absent (recovery would then
            // kill their VMMs as owned by no one): the panic goes on.
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// One VM's record, or None (reported; a directory without one is removed).
    fn load_one(&self, id: &str, dir: &Path) -> Option<VmRecord> {
        let path = dir.join(layout::RECORD);
        match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<VmRecord>(&bytes) {
                Ok(rec) if rec.id == id => {
                    // A record from before VMs had a UUID was given a random one: keep it, so
                    // the guest's SMBIOS UUID does not change at every load.
                    if !bytes.windows(6).any(|w| w == b"\"uuid\"") {
                        if let Err(e) = self.save(&rec) {
                            tracing::warn!("{}: cannot save its new UUID: {e}", path.display());
                        }
                    }
                    Some(rec)
                }
                Ok(rec) => {
                    tracing::error!(
                        "{}: record for {:?} in the directory of {id:?}; skipped",
                        path.display(),
                        rec.id
                    );
                    None
                }
                Err(e) => {
                    tracing::error!("{}: unreadable record: {e}; skipped", path.display());
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(
                    "{}: no record (interrupted create); removing",
                    dir.display()
                );
                let _ = self.remove(id);
                None
            }
            Err(e) => {
                tracing::error!("{}: {e}; skipped", path.display());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_directory_has_one_owner() {
        let dir = std::env::temp_dir().join(format!("bexar-store-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = Store::open(&dir).unwrap();
        assert!(matches!(Store::open(&dir), Err(StoreError::Locked(_))));
        drop(a);
        Store::open(&dir).unwrap();
        let _ = fs::remove_dir_all(&dir);
    }
}
