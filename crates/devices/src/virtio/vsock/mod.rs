//! virtio-vsock bridged to Unix sockets, with the convention Firecracker users know:
//!
//! * host to guest: a host process connects to the VM's socket `uds`, writes `CONNECT <port>\n`
//!   and, once the guest accepts, reads `OK <host port>\n`; then the stream is the connection;
//! * guest to host: a guest connection to CID 2 port P is connected to the Unix socket
//!   `<uds>_P`, which a host service listens on.
//!
//! Stream sockets only. Credit-based flow control both ways: the device never reads more from a
//! host socket than the guest has room for, and advertises its own buffer so the guest never
//! sends more than the device holds. A socket is unwatched while it cannot make progress (no
//! guest credit, too many packets waiting for rx buffers), so nothing spins.
//!
//! One concern per file: [`packet`] (the header and its operations), [`connection`] (one
//! stream's credit and shutdown state), [`device`] (the queues and the host sockets), and
//! [`event_handler`] (its place on the event loop).

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod packet;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use device::{Vsock, VsockError, VsockState, QUEUE_SIZE};

/// How the vsock device is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u32,
    /// The host-side Unix socket.
    pub uds: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = String;
    /// Parses `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(v.parse::<u32>().ok().filter(|c| *c >= 3).ok_or_else(|| {
                        format!("invalid cid {v:?}: a number from 3 to 4294967295")
                    })?)
                }
                Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
                _ => {
                    return Err(format!(
                        "unknown vsock option {opt:?}: expected cid=N,uds=PATH"
                    ))
                }
            }
        }
        Ok(VsockConfig {
            cid: cid.ok_or("vsock needs cid=N")?,
            uds: uds.ok_or("vsock needs uds=PATH")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses() {
        let c: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!((c.cid, c.uds.to_str().unwrap()), (3, "/tmp/v.sock"));
        assert!("cid=2,uds=/x".parse::<VsockConfig>().is_err());
        assert!("cid=3".parse::<VsockConfig>().is_err());
        assert!("uds=/x".parse::<VsockConfig>().is_err());
    }
}
