//! Files that survive a crash at any instant: replaced atomically and durably, and advisory
//! locks that say who owns a directory; and where a sparse file holds data.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A file operation that failed, with what was being done and to which file.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {err}")]
pub struct FsError {
    /// What was being done (`create`, `fsync`, `rename`...).
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why it failed.
    pub err: io::Error,
}

/// Turns an `io::Error` into an [`FsError`] about `path`.
pub fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |err| FsError {
        what,
        path: path.to_owned(),
        err,
    }
}

/// Writes `data` to `path` atomically and durably: a temporary file in the same directory is
/// written and fsynced, renamed over `path`, and the directory fsynced. After a crash at any
/// instant, `path` holds the old contents or the new ones.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), FsError> {
    put_in_place(path, data, true)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Replaces `path` with `data` atomically (a reader sees the old contents or the new ones),
/// leaving the fsyncs to the caller ([`Unsynced::sync`]): for a caller that must have the file
/// in place within microseconds and can make it durable a moment later (a VMM that handed its
/// VM over writes its result, then lets go of its lock, then syncs). A crash before the sync
/// may leave the old contents, the new ones, or an empty file.
pub fn write_replace(path: &Path, data: &[u8]) -> Result<Unsynced, FsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir_file = File::open(dir).map_err(io_err("open", dir))?;
    let f = put_in_place(path, data, false)?;
    Ok(Unsynced {
        file: f,
        dir: dir_file,
        path: path.to_owned(),
    })
}

/// Writes `data` to a new temporary file beside `path` (fsynced first with `sync_first`) and
/// renames it over `path`; the file, still open. The temporary file goes on any failure.
fn put_in_place(path: &Path, data: &[u8], sync_first: bool) -> Result<File, FsError> {
    let tmp = temp_name(path);
    // New, never one another process left: in a PID namespace of its own every VMM is pid 1,
    // and the next one to write here (a live upgrade's) has another uid.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    let written = f.write_all(data).map_err(io_err("write", &tmp));
    let synced = written.and_then(|()| {
        if sync_first {
            f.sync_all().map_err(io_err("fsync", &tmp))
        } else {
            Ok(())
        }
    });
    let renamed = synced.and_then(|()| std::fs::rename(&tmp, path).map_err(io_err("rename", path)));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed.map(|()| f)
}

/// A file [`write_replace`] put in place, not yet durable.
#[derive(Debug)]
pub struct Unsynced {
    file: File,
    dir: File,
    path: PathBuf,
}

impl Unsynced {
    /// Makes it durable: the file's data, then the directory's entry (through descriptors
    /// opened before, so it works where the path can no longer be opened).
    pub fn sync(self) -> Result<(), FsError> {
        self.file.sync_all().map_err(io_err("fsync", &self.path))?;
        self.dir
            .sync_all()
            .map_err(io_err("fsync the directory of", &self.path))
    }
}

/// A name beside `path` for a temporary file no other process picks: the pid and 64 random
/// bits.
pub fn temp_name(path: &Path) -> std::path::PathBuf {
    let mut r = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `r`.
    let n = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    let r = if n == 8 {
        u64::from_ne_bytes(r)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default()
    };
    path.with_extension(format!("tmp.{}.{r:016x}", std::process::id()))
}

/// fsyncs a directory, making renames and unlinks in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Tries to take an exclusive flock on `path` (created if missing). `Ok(None)` if someone
/// else holds it. The lock lasts as long as the returned file is open.
pub fn try_lock(path: &Path) -> Result<Option<File>, FsError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(Some(f));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(FsError {
            what: "flock",
            path: path.to_owned(),
            err,
        })
    }
}

/// The ranges `(offset, len)` of `file`'s first `size` bytes that hold data (holes read as
/// zeros and need no copy). Moves the descriptor's offset, which no user of these files
/// relies on: guest RAM is read through its mapping, disk images with positioned I/O.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let fd = file.as_raw_fd();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a descriptor `file` owns, with integer arguments.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (data, end) = (data as u64, (hole as u64).min(size));
        if data >= size {
            break;
        }
        out.push((data, end - data));
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bexar-util-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let d = dir("atomic");
        let p = d.join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_replace_is_in_place_at_once_and_synced_later_through_its_descriptors() {
        let d = dir("replace");
        let p = d.join("x.json");
        write_atomic(&p, b"one").unwrap();
        let pending = write_replace(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        // The directory may go away meanwhile: the sync needs no path.
        let moved = d.with_extension("moved");
        let _ = std::fs::remove_dir_all(&moved);
        std::fs::rename(&d, &moved).unwrap();
        pending.sync().unwrap();
        let _ = std::fs::remove_dir_all(&moved);
    }

    #[test]
    fn a_lock_has_one_holder_at_a_time() {
        let d = dir("lock");
        let p = d.join("lock");
        let a = try_lock(&p).unwrap().expect("free");
        assert!(try_lock(&p).unwrap().is_none());
        drop(a);
        assert!(try_lock(&p).unwrap().is_some());
        let _ = std::fs::remove_dir_all(&d);
    }
}
