//! Unix sockets only their owner may use.

use std::io;
use std::os::fd::OwnedFd;
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
        socket2::SockRef::from(&fd).listen(128)?;
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
    // Checked here for a clear error: the kernel's limit is 107 bytes and a NUL.
    let addr = socket2::SockAddr::unix(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{}: not a Unix socket path ({e})", path.display()),
        )
    })?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Close-on-exec, as socket2 makes every socket.
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    s.bind(&addr)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(s.into())
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
        socket2::SockRef::from(&fd).listen(1).unwrap();
        let l = UnixListener::from(fd);
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        l.accept().unwrap();
        std::fs::remove_file(&p).ok();
        assert!(bind_for_another(Path::new(&"x".repeat(108))).is_err());
    }
}
