//! Snapshot files: a VM's whole state taken out of its process, to be brought back in another.
//!
//! A snapshot is a directory with two files:
//!
//! * `vm.state`: one header line, then the body. The header is a JSON object (`format`,
//!   `version`, the body's length and its CRC-32), so a reader learns the version before it
//!   parses anything else, and a truncated or corrupted body is named as such instead of
//!   surfacing as a parse error somewhere inside it. The body is a JSON [`SnapshotState`]: the
//!   configuration the VM was built from, every vCPU's state, the VM-wide state KVM holds (clock,
//!   interrupt controllers, PIT) and every device's state.
//! * `memory`: guest RAM in guest-address order with the MMIO gap removed (as the VM's memfd
//!   holds it), exactly the RAM's size, sparse: pages the guest never wrote are holes.
//!
//! Disk contents are not in a snapshot: each disk's identity (path, size) is, and a restore
//! refuses a disk that is missing or changed size. Keeping a raw disk consistent with a
//! snapshot (copying it while the VM is stopped) is the caller's part.
//!
//! Saving removes an earlier state file in the directory first, then writes the memory file and
//! the state file last, each atomically (a temporary file, fsync, rename, fsync of the
//! directory): a directory whose state file exists holds one whole snapshot, and a crash while
//! saving leaves none there, never the state of one snapshot with the memory of another.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::boot::BootEntry;
use crate::config::VmConfig;
use crate::device_manager::DevicesState;
use crate::vcpu::VcpuState;
use crate::vm_state::VmState;

/// The state format this VMM writes. A newer one is refused with a clear error; every older
/// one is read (version 1 is the first).
pub const VERSION: u32 = 1;
/// The header's `format`.
pub const FORMAT: &str = "bexar-snapshot";
/// The longest header line read (it is about 80 bytes).
const MAX_HEADER: usize = 1024;
/// The largest body read: 32 vCPUs with their XSAVE areas and 20 devices take well under
/// 2 MiB of JSON; anything far bigger is not a state this VMM wrote.
const MAX_BODY: u64 = 64 << 20;

/// File names in a snapshot directory.
pub mod files {
    /// The state file.
    pub const STATE: &str = "vm.state";
    /// The memory file.
    pub const MEMORY: &str = "memory";
}

/// Errors reading or writing snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file cannot be read or written.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The file is not a snapshot state file (no header, or another format).
    #[error("{path} is not a Bexar snapshot state file: {why}")]
    NotSnapshot {
        /// The file.
        path: PathBuf,
        /// Why not.
        why: String,
    },
    /// A newer VMM wrote it.
    #[error("{path} is snapshot version {found}; this VMM reads versions 1 to {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The body is shorter than its header says.
    #[error("{path} is truncated: its header announces {expected} bytes of state, {found} follow")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes announced.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The body does not match its checksum, or does not describe a VM.
    #[error("{path} is corrupt: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The state cannot be encoded.
    #[error("cannot encode the VM's state: {0}")]
    Encode(serde_json::Error),
}

impl SnapshotError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |err| Self::Io {
            path: path.to_owned(),
            err,
        }
    }
}

/// The header line of a state file.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    /// Body length in bytes.
    len: u64,
    /// CRC-32 (IEEE) of the body.
    crc32: u32,
}

/// Guest memory as saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// The RAM's size in bytes (the memory file's length).
    pub size: u64,
    /// Bytes of it the memory file holds data for (the rest are holes).
    pub saved: u64,
}

/// Everything a VM is, but its memory and its disks' contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The configuration the VM was built from (the kernel is not read again on restore).
    pub config: VmConfig,
    /// How the guest was entered at boot (reported, not used again).
    pub entry: BootEntry,
    /// The kernel command line the guest booted with (with the VMM's own entries).
    pub cmdline: String,
    /// Guest memory.
    pub memory: MemoryInfo,
    /// Clock, interrupt controllers, PIT.
    pub vm: VmState,
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// Every device.
    pub devices: DevicesState,
}

/// What to do with the VM once its snapshot is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSnapshot {
    /// Let it run on (the default).
    #[default]
    Resume,
    /// Keep it paused.
    Pause,
    /// End it (the snapshot is where it goes on).
    Stop,
    /// End it, as `Stop`; the agent then restores the snapshot at the VM's next start (a
    /// suspend). The VMM does exactly what `Stop` does.
    Suspend,
}

impl AfterSnapshot {
    /// Whether the VMM ends once the snapshot is durable.
    pub fn ends_vmm(self) -> bool {
        matches!(self, AfterSnapshot::Stop | AfterSnapshot::Suspend)
    }
}

/// What a snapshot took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// The state file's size in bytes.
    pub state_bytes: u64,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Bytes of it the memory file holds (the rest are holes).
    pub memory_saved_bytes: u64,
    /// How long the vCPUs were paused for it, in milliseconds.
    pub paused_ms: f64,
}

/// The state file of snapshot directory `dir`.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(files::STATE)
}

/// The memory file of snapshot directory `dir`.
pub fn memory_path(dir: &Path) -> PathBuf {
    dir.join(files::MEMORY)
}

/// Encodes `state` as a state file's bytes (header line and body).
pub fn encode(state: &SnapshotState) -> Result<Vec<u8>, SnapshotError> {
    let body = serde_json::to_vec(state).map_err(SnapshotError::Encode)?;
    let header = Header {
        format: FORMAT.to_owned(),
        version: VERSION,
        len: body.len() as u64,
        crc32: crc32fast::hash(&body),
    };
    let mut out = serde_json::to_vec(&header).map_err(SnapshotError::Encode)?;
    out.push(b'\n');
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a state file's bytes; `path` names it in errors.
pub fn decode(path: &Path, data: &[u8]) -> Result<SnapshotState, SnapshotError> {
    let not = |why: &str| SnapshotError::NotSnapshot {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let end = data
        .iter()
        .take(MAX_HEADER)
        .position(|&b| b == b'\n')
        .ok_or_else(|| not("no header line"))?;
    let header: Header = serde_json::from_slice(&data[..end])
        .map_err(|e| not(&format!("the header line does not parse: {e}")))?;
    if header.format != FORMAT {
        return Err(not(&format!("format {:?}", header.format)));
    }
    if header.version > VERSION {
        return Err(SnapshotError::Version {
            path: path.to_owned(),
            found: header.version,
        });
    }
    if header.version == 0 {
        return Err(not("version 0"));
    }
    let body = &data[end + 1..];
    if (body.len() as u64) < header.len {
        return Err(SnapshotError::Truncated {
            path: path.to_owned(),
            expected: header.len,
            found: body.len() as u64,
        });
    }
    let corrupt = |why: String| SnapshotError::Corrupt {
        path: path.to_owned(),
        why,
    };
    if (body.len() as u64) > header.len {
        return Err(corrupt(format!(
            "{} bytes after the {} its header announces",
            body.len() as u64 - header.len,
            header.len
        )));
    }
    let crc = crc32fast::hash(body);
    if crc != header.crc32 {
        return Err(corrupt(format!(
            "the state's CRC-32 is {crc:#010x}, its header says {:#010x}",
            header.crc32
        )));
    }
    // Version 1 is the only one yet; an older version would be read here into the current
    // form, field by field.
    serde_json::from_slice(body).map_err(|e| corrupt(format!("the state does not parse: {e}")))
}

/// Reads the state file of snapshot directory `dir`.
pub fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    open_state(dir)?.read()
}

/// The state file of snapshot directory `dir`, opened (not read: [`StateFile::read`]).
pub fn open_state(dir: &Path) -> Result<StateFile, SnapshotError> {
    let path = state_path(dir);
    let file = bexar_util::handed::file(&path, false, || File::open(&path))
        .map_err(SnapshotError::io(&path))?;
    Ok(StateFile { path, file })
}

/// A snapshot's state file, opened by a VMM that may read it only once jailed.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    file: File,
}

impl StateFile {
    /// Reads and decodes the state.
    pub fn read(mut self) -> Result<SnapshotState, SnapshotError> {
        let mut data = Vec::new();
        (&mut self.file)
            .take(MAX_BODY + MAX_HEADER as u64)
            .read_to_end(&mut data)
            .map_err(SnapshotError::io(&self.path))?;
        decode(&self.path, &data)
    }
}

/// Writes the state file of snapshot directory `dir` atomically and durably; returns its size.
pub fn write_state(dir: &Path, state: &SnapshotState) -> Result<u64, SnapshotError> {
    let path = state_path(dir);
    let data = encode(state)?;
    bexar_util::fs::write_atomic(&path, &data).map_err(|e| SnapshotError::Io {
        path: path.clone(),
        err: std::io::Error::other(e.to_string()),
    })?;
    Ok(data.len() as u64)
}

/// Writes the state file of `dir` atomically (a temporary file renamed) but not durably: for a
/// handover, whose state is read at once by the next VMM and is worth nothing after a host
/// crash (guest memory, in a memfd, is gone then too). Saves the fsyncs (a millisecond or more
/// of the guest's pause).
pub fn write_state_now(dir: &Path, state: &SnapshotState) -> Result<u64, SnapshotError> {
    let path = state_path(dir);
    let tmp = bexar_util::fs::temp_name(&path);
    let data = encode(state)?;
    let io = |p: &Path| {
        let p = p.to_owned();
        move |err| SnapshotError::Io { path: p, err }
    };
    let written = std::fs::write(&tmp, &data)
        .map_err(io(&tmp))
        .and_then(|()| std::fs::rename(&tmp, &path).map_err(io(&path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    Ok(data.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let header = Header {
            format: FORMAT.into(),
            version: VERSION,
            len: 2,
            crc32: crc32fast::hash(b"{}"),
        };
        let mut v = serde_json::to_vec(&header).unwrap();
        v.push(b'\n');
        v.extend_from_slice(b"{}");
        v
    }

    fn err(data: &[u8]) -> String {
        decode(Path::new("s"), data).unwrap_err().to_string()
    }

    #[test]
    fn the_header_names_what_is_wrong_before_the_body_is_parsed() {
        // A well-formed file whose body is not a VM: parsed only after every check passes.
        assert!(
            err(&sample()).contains("does not parse"),
            "{}",
            err(&sample())
        );
        assert!(err(b"").contains("no header line"));
        assert!(err(b"{\"format\":\"x\"}\n").contains("header line does not parse"));
        let other = sample().replace_bytes(FORMAT, "qcow2");
        assert!(err(&other).contains("format \"qcow2\""), "{}", err(&other));
        let future = sample().replace_bytes("\"version\":1", "\"version\":9");
        assert!(
            err(&future).contains("snapshot version 9; this VMM reads versions 1 to 1"),
            "{}",
            err(&future)
        );
        let mut short = sample();
        short.pop();
        assert!(err(&short).contains("truncated"), "{}", err(&short));
        let mut long = sample();
        long.push(b' ');
        assert!(err(&long).contains("1 bytes after"), "{}", err(&long));
        let mut flipped = sample();
        *flipped.last_mut().unwrap() = b']';
        assert!(err(&flipped).contains("CRC-32"), "{}", err(&flipped));
    }

    trait ReplaceBytes {
        fn replace_bytes(self, from: &str, to: &str) -> Vec<u8>;
    }
    impl ReplaceBytes for Vec<u8> {
        fn replace_bytes(self, from: &str, to: &str) -> Vec<u8> {
            String::from_utf8(self)
                .unwrap()
                .replacen(from, to, 1)
                .into_bytes()
        }
    }
}
