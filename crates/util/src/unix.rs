//! Unix sockets only their owner may use.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds an owner-only (0600) Unix socket at `path`, replacing a stale socket file.
pub fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
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
}
