//! Descriptors a process was handed at exec in place of the paths it would open.
//!
//! The agent opens, with its rights, what a VMM needs of the host (`/dev/kvm`, the kernel,
//! each disk's files, each TAP, the sockets it serves) and lists them in the VMM's launch,
//! each with the descriptor number it is inherited at. The VMM [`install`]s that list first
//! thing; every place that would open one of those by path asks [`take`] before it does. A
//! `strict` table refuses what it was not handed: such a VMM opens nothing of the host by
//! path, before its jail or after. The table is emptied ([`close_all`]) as the VMM enters its
//! jail, so no handed descriptor it did not use stays open there.
//!
//! A process with no table (`bexar run`, the agent itself) opens by path as it always did.

use std::collections::HashMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::sync::lock;

/// What a handed descriptor stands for: the key a lookup names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum What {
    /// `/dev/kvm`.
    Kvm,
    /// A regular file by the path the launch (or an image's backing chain) names it by, read
    /// only or read and write (a log: appending, created if missing).
    File {
        /// The path as named.
        path: PathBuf,
        /// Opened for writing too.
        writable: bool,
    },
    /// A Unix socket listening at `path`, owner-only.
    Listener {
        /// The path as named.
        path: PathBuf,
    },
    /// The TAP interface `name`, attached (TUNSETIFF) with virtio-net headers.
    Tap {
        /// The interface.
        name: String,
    },
}

/// One handed descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedFd {
    /// What it is.
    pub what: What,
    /// Its number in the process it was handed to.
    pub fd: i32,
}

/// The list a launch carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handed {
    /// The descriptors.
    pub fds: Vec<HandedFd>,
    /// Refuse to open by path what is not among them.
    pub strict: bool,
}

struct Table {
    strict: bool,
    fds: HashMap<What, OwnedFd>,
    /// A lenient table's misses.
    by_path: Vec<What>,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

/// Takes ownership of the descriptors `handed` lists (each made close-on-exec). Refused, with
/// nothing taken, if one is a standard stream, listed twice, or not open.
pub fn install(handed: &Handed) -> io::Result<()> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let mut seen = std::collections::HashSet::new();
    for h in &handed.fds {
        if h.fd <= 2 || !seen.insert(h.fd) {
            return Err(bad(format!("handed descriptor {} for {:?}", h.fd, h.what)));
        }
        // SAFETY: F_GETFD only reads the flags of a descriptor number.
        if unsafe { libc::fcntl(h.fd, libc::F_GETFD) } < 0 {
            return Err(bad(format!(
                "handed descriptor {} for {:?} is not open",
                h.fd, h.what
            )));
        }
    }
    let mut fds = HashMap::new();
    for h in &handed.fds {
        // SAFETY: F_SETFD sets the close-on-exec flag of a descriptor checked open above.
        unsafe { libc::fcntl(h.fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: the launch hands this process `h.fd` (checked open, listed once, not a
        // standard stream); nothing else in the process claims it, so it is owned here once.
        let fd = unsafe { OwnedFd::from_raw_fd(h.fd) };
        fds.insert(h.what.clone(), fd);
    }
    *lock(&TABLE) = Some(Table {
        strict: handed.strict,
        fds,
        by_path: Vec::new(),
    });
    Ok(())
}

/// Adds `fds` to the table (a descriptor already there for the same thing is replaced),
/// making a lenient table if there is none: what a VMM handing its VM over sends along
/// (`bexar_vmm::control::take_over`).
pub fn add(fds: impl IntoIterator<Item = (What, OwnedFd)>) {
    let mut table = lock(&TABLE);
    let t = table.get_or_insert_with(|| Table {
        strict: false,
        fds: HashMap::new(),
        by_path: Vec::new(),
    });
    t.fds.extend(fds);
}

/// What this process opened by path because it was not handed (a lenient table's misses),
/// for its log.
pub fn opened_by_path() -> Vec<What> {
    lock(&TABLE)
        .as_ref()
        .map_or(Vec::new(), |t| t.by_path.clone())
}

/// What was handed for `what`: `None` when nothing was and the caller may open it itself;
/// a descriptor of it (the table keeps its own until [`close_all`], as two disks may share a
/// backing file); or, from a strict table, an error naming what was not handed. A file is
/// opened again through `/proc/self/fd` with the handed one's access mode and flags, so each
/// taker has a file description of its own (one disk's `O_DIRECT` is not another's); the
/// rest are copies.
pub fn take(what: &What) -> Option<io::Result<OwnedFd>> {
    let mut table = lock(&TABLE);
    let t = table.as_mut()?;
    match t.fds.get(what) {
        Some(fd) if matches!(what, What::File { .. }) => Some(reopen(fd)),
        Some(fd) => Some(fd.try_clone()),
        None if t.strict => Some(Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{what:?} was not handed to this process, which opens nothing by path"),
        ))),
        None => {
            t.by_path.push(what.clone());
            None
        }
    }
}

/// `fd`, opened again: a new file description of the same file, with its access mode and
/// its `O_APPEND` and `O_NONBLOCK`.
fn reopen(fd: &OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // SAFETY: F_GETFL only reads the status flags of a descriptor the table owns.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let mode = flags & libc::O_ACCMODE;
    let f = std::fs::OpenOptions::new()
        .read(mode != libc::O_WRONLY)
        .write(mode != libc::O_RDONLY && flags & libc::O_APPEND == 0)
        .append(flags & libc::O_APPEND != 0)
        .custom_flags(flags & libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(f.into())
}

/// Closes every handed descriptor (the copies [`take`] gave out stay open); a strict table
/// stays strict.
pub fn close_all() {
    if let Some(t) = lock(&TABLE).as_mut() {
        t.fds.clear();
    }
}

/// Whether this process has a strict table.
pub fn strict() -> bool {
    lock(&TABLE).as_ref().is_some_and(|t| t.strict)
}

/// The regular file `path` as handed, or else opened by path with `open`.
pub fn file(
    path: &std::path::Path,
    writable: bool,
    open: impl FnOnce() -> io::Result<std::fs::File>,
) -> io::Result<std::fs::File> {
    let what = What::File {
        path: path.to_owned(),
        writable,
    };
    match take(&what) {
        Some(fd) => fd.map(std::fs::File::from),
        None => open(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    // One test: the table is the process's.
    #[test]
    fn handed_descriptors_are_taken_and_a_strict_table_refuses_the_rest() {
        let dir = std::env::temp_dir().join(format!("bexar-handed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"handed").unwrap();
        let other = dir.join("g");
        std::fs::write(&other, b"by path").unwrap();
        assert!(take(&What::Kvm).is_none(), "no table: open by path");

        let f = std::fs::File::open(&path).unwrap().into_raw_fd();
        let what = What::File {
            path: path.clone(),
            writable: false,
        };
        let dup = HandedFd {
            what: What::Kvm,
            fd: f,
        };
        let listed_twice = Handed {
            fds: vec![
                HandedFd {
                    what: what.clone(),
                    fd: f,
                },
                dup,
            ],
            strict: true,
        };
        assert!(install(&listed_twice).is_err());
        let closed = Handed {
            fds: vec![HandedFd {
                what: What::Kvm,
                fd: 1 << 20,
            }],
            strict: true,
        };
        assert!(install(&closed).is_err());
        assert!(!strict(), "a refused list installs nothing");

        install(&Handed {
            fds: vec![HandedFd { what, fd: f }],
            strict: true,
        })
        .unwrap();
        // SAFETY: F_GETFD reads the flags of `f`, which the table owns.
        assert_eq!(unsafe { libc::fcntl(f, libc::F_GETFD) }, libc::FD_CLOEXEC);
        let got = file(&path, false, || panic!("handed: not opened by path")).unwrap();
        assert_ne!(got.as_raw_fd(), f, "a copy");
        assert_eq!(std::io::read_to_string(&got).unwrap(), "handed");
        // A file description of its own: the first taker's offset (at the end) is not the
        // second's.
        let again = file(&path, false, || panic!()).unwrap();
        assert_eq!(std::io::read_to_string(again).unwrap(), "handed");
        // Same path, other mode; another path: refused, not opened.
        assert_eq!(
            file(&path, true, || panic!()).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        assert!(file(&other, false, || panic!()).is_err());
        close_all();
        assert!(lock(&TABLE).as_ref().unwrap().fds.is_empty());
        assert!(strict());
        assert!(take(&What::Kvm).unwrap().is_err());
        *lock(&TABLE) = None;
        std::fs::remove_dir_all(&dir).ok();
    }
}
