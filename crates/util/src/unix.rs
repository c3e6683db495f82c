//! Unix sockets only their owner may use.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds an owner-only (0600) Unix socket at `path`, replacing a stale socket file; or takes
/// the one listening there that this process was handed ([`crate::handed`]).
pub fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    let what = crate::handed::What::Listener {
        path: path.to_owned(),
    };
    if let Some(fd) = crate::handed::take(&what) {
        let fd = fd?;
        // Listening here (again, if it was already) makes a client's SO_PEERCRED name this
        // process, not the one that bound it: the agent tells its VMM by that pid.
        // SAFETY: listen on a socket descriptor this process owns; no memory is passed.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(UnixListener::from(fd));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// A Unix socket bound owner-only (0600) at `path`, replacing a stale socket file, and not
/// listening yet: for another process, which listens on it ([`bind_owner_only`] takes it
/// from [`crate::handed`]), so that until then a client is refused, as if nothing were
/// there, and afterwards its SO_PEERCRED names that process.
pub fn bind_for_another(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: not a Unix socket path (at most 107 bytes)",
                path.display()
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // SAFETY: socket takes constants and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned `fd`; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: bind reads `len` bytes of `addr`, a sockaddr_un on this stack at least that long.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_owner_only_and_replaces_a_stale_one() {
        let p = std::env::temp_dir().join(format!("bexar-util-sock-{}", std::process::id()));
        let a = bind_owner_only(&p).unwrap();
        drop(a);
        let _b = bind_owner_only(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn a_socket_bound_for_another_refuses_until_it_listens() {
        let p = std::env::temp_dir().join(format!("bexar-util-for-{}", std::process::id()));
        let fd = bind_for_another(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = std::os::unix::net::UnixStream::connect(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        // SAFETY: listen on the socket `fd` owns.
        assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 1) }, 0);
        let l = UnixListener::from(fd);
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        l.accept().unwrap();
        std::fs::remove_file(&p).ok();
        assert!(bind_for_another(Path::new(&"x".repeat(108))).is_err());
    }
}
