//! VMM processes as the agent sees them: launching `bexar vmm --dir DIR` detached from the
//! agent, proving a running process is the one we launched (control socket + launch token +
//! the peer's pid from SO_PEERCRED + a pidfd + the process start time), waiting for it to end,
//! and finding strays.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::store::layout;
use bexar_vmm::control::{Info, Reply, Request};

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmProcessError {
    /// The process could not be started.
    #[error("cannot start the VMM: {0}")]
    Spawn(std::io::Error),
    /// The control socket did not answer.
    #[error("VMM control socket {path}: {err}")]
    Control {
        /// Socket path.
        path: PathBuf,
        /// Why.
        err: ControlFailure,
    },
    /// The process did not exit after SIGKILL.
    #[error("the VMM process did not exit after SIGKILL")]
    Unkillable,
    /// The VMM refused a request.
    #[error("VMM refused {op}: {err}")]
    Refused {
        /// The operation.
        op: String,
        /// Its message.
        err: String,
    },
}

/// How a control-socket exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlFailure {
    /// Connecting, writing or reading failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The VMM closed the connection without a reply.
    #[error("closed without a reply")]
    Closed,
    /// No reply within the time allowed.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The reply is not a control reply.
    #[error("bad reply: {0}")]
    BadReply(#[from] serde_json::Error),
    /// An `info` reply without the info.
    #[error("an info reply without the info")]
    NoInfo,
}

/// How long a VMM may take to answer on its control socket.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// A fresh random launch token.
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // getrandom cannot fail for 16 bytes once the pool is initialised; mix in the clock
        // anyway rather than hand out a constant.
        let t = super::spec::now_ms() ^ u64::from(std::process::id()) << 32;
        b[..8].copy_from_slice(&t.to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Starts `exe vmm --dir dir` in its own session, with its output going to `vmm.log` and no
/// tie to the agent: the agent can die or be upgraded while it runs. The child joins the
/// cgroups whose `cgroup.procs` are open as `cgroup_procs` before it execs, so the VMM never
/// runs a line outside them, and finds `netns` (a ready-made network namespace) at
/// [`super::sandbox::NETNS_FD`] and `keeper` (the socket it hands its VM to) at
/// [`super::sandbox::KEEPER_FD`], and inherits the descriptors `handed` at their numbers
/// (the launch lists them). With `pid_ns`, the VMM is the first process of a PID namespace of
/// its own. Returns its pid (as the agent's namespace sees it).
pub fn spawn(
    exe: &Path,
    dir: &Path,
    cgroup_procs: &[i32],
    (netns, keeper): (Option<&OwnedFd>, Option<&std::os::unix::net::UnixStream>),
    handed: &[i32],
    pid_ns: bool,
) -> Result<u32, VmmProcessError> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(layout::VMM_LOG))
        .map_err(VmmProcessError::Spawn)?;
    let log2 = log.try_clone().map_err(VmmProcessError::Spawn)?;
    let mut cmd = Command::new(exe);
    cmd.arg("vmm")
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .env_remove("BEXAR_SOCKET");
    let procs = cgroup_procs.to_vec();
    let passed: Vec<(i32, i32)> = netns
        .map(|f| (f.as_raw_fd(), super::sandbox::NETNS_FD))
        .into_iter()
        .chain(keeper.map(|f| (f.as_raw_fd(), super::sandbox::KEEPER_FD)))
        .collect();
    // The agent keeps those two numbers taken (sandbox::reserve_passed_fds), so nothing it
    // opens lands there; were one handed, the dup2 below would cover it.
    let reserved = [super::sandbox::NETNS_FD, super::sandbox::KEEPER_FD];
    if handed.iter().any(|fd| reserved.contains(fd)) {
        return Err(VmmProcessError::Spawn(std::io::Error::other(
            "a handed descriptor is at a number reserved for the VMM's namespace or keeper",
        )));
    }
    let handed = handed.to_vec();
    // SAFETY: setsid, write, fcntl and dup2 are async-signal-safe and allocate nothing
    // (`procs`, `passed` and `handed` were made before the fork); setsid detaches the VMM
    // from the agent's session and process group, so signals meant for the agent do not
    // reach it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            super::sandbox::join_in_child(&procs)?;
            super::sandbox::pass_fds_in_child(&passed)?;
            // Opened close-on-exec, as everything the agent opens (other threads fork
            // too): inherited by this child alone.
            for fd in &handed {
                if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = if pid_ns {
        // A process cannot move itself into a new PID namespace: unshare gives one to the
        // children its thread makes from then on, the first of which is the namespace's first
        // process. So a thread of its own, which asks once and ends.
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
                    .map_err(std::io::Error::from)?;
                cmd.spawn()
            })
            .join()
        })
        .map_err(|_| std::io::Error::other("the thread starting the VMM panicked"))
        .and_then(|r| r)
    } else {
        cmd.spawn()
    };
    let child = child.map_err(VmmProcessError::Spawn)?;
    // Not waited on here: the exit watcher reaps it (or init does, after an agent restart).
    Ok(child.id())
}

/// Keeps the VM a VMM sends on `sock` (its end of the keeper socket) until the VMM's process
/// (`pidfd`) has ended, then drops it on a blocking thread: KVM's teardown of the VM (an SRCU
/// grace period) waits there, not in the VMM's exit ([`bexar_vmm::teardown`]). Ends at once
/// if the VMM closes the socket without a VM.
pub async fn keep_vm(sock: std::os::unix::net::UnixStream, pidfd: std::sync::Arc<OwnedFd>) {
    let vm = async {
        sock.set_nonblocking(true)?;
        // SAFETY: the AsyncFd owns the socket, so the descriptor stays open and the same for
        // its whole life.
        let afd =
            unsafe { tokio::io::unix::AsyncFd::register(sock) }.map_err(|e| e.into_parts().1)?;
        loop {
            let mut ready = afd.readable().await?;
            if let Ok(r) = ready.try_io(|s| bexar_vmm::teardown::receive_vm(s.get_ref())) {
                break r.map(|vm| vm.map(|vm| (vm, afd)));
            }
        }
    };
    match vm.await {
        Ok(Some((vm, sock))) => {
            // The socket stays open while the agent holds the VM: the VMM sees it close if
            // the agent goes, and then releases the VM its own way.
            wait_exit(pidfd).await;
            drop(sock);
            let _ = tokio::task::spawn_blocking(move || drop(vm)).await;
        }
        Ok(None) => {}
        Err(e) => tracing::debug!("no VM from the VMM's keeper socket: {e}"),
    }
}

/// Reaps `pid` if it is our child and has ended; harmless otherwise.
pub fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on one pid; it only writes `status`.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
}

/// Opens a pidfd for `pid`.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: the pidfd_open syscall takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `sig` through a pidfd (cannot hit a recycled pid).
pub fn pidfd_kill(fd: &OwnedFd, sig: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until the process behind `fd` ends.
pub async fn wait_exit<F: AsRawFd + Send + 'static>(fd: F) {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for its
    // whole life.
    match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(e) => {
            // Registration with the reactor failed (should not happen): block a pool thread.
            let (fd, err) = e.into_parts();
            tracing::warn!("cannot watch a pidfd: {err}; waiting on a thread");
            let _ = tokio::task::spawn_blocking(move || {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll on one valid descriptor, infinite timeout.
                while unsafe { libc::poll(&mut p, 1, -1) } < 0 {}
            })
            .await;
        }
    }
}

/// SIGKILLs `pid` through a pidfd, waits for it to end and reaps it if it is our child.
pub async fn kill_and_wait(pid: u32) {
    if let Ok(fd) = pidfd_open(pid) {
        let _ = pidfd_kill(&fd, libc::SIGKILL);
        wait_exit(fd).await;
        reap(pid);
    }
}

/// Sends one request to a VMM's control socket and returns its answer (the info, for `info`),
/// plus the peer's pid as the kernel reports it.
pub async fn call(dir: &Path, req: &Request) -> Result<(Option<Info>, u32), VmmProcessError> {
    let (reply, pid) = exchange(dir, req, CONTROL_TIMEOUT).await?;
    Ok((reply.info, pid))
}

/// Sends one request to a VMM's control socket and waits up to `timeout` for its reply, which
/// must say the request was carried out; returns it with the peer's pid as the kernel reports
/// it.
pub async fn exchange(
    dir: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<(Reply, u32), VmmProcessError> {
    let path = dir.join(layout::CONTROL_SOCKET);
    let err = |e: ControlFailure| VmmProcessError::Control {
        path: path.clone(),
        err: e,
    };
    let fut = async {
        let io = |e: std::io::Error| err(e.into());
        let mut s = UnixStream::connect(&path).await.map_err(io)?;
        let pid = s.peer_cred().map_err(io)?.pid().unwrap_or(0) as u32;
        let mut line = serde_json::to_string(req).map_err(|e| err(e.into()))?;
        line.push('\n');
        s.write_all(line.as_bytes()).await.map_err(io)?;
        let mut reply = String::new();
        BufReader::new(&mut s)
            .read_line(&mut reply)
            .await
            .map_err(io)?;
        if reply.is_empty() {
            return Err(err(ControlFailure::Closed));
        }
        let r: Reply = serde_json::from_str(&reply).map_err(|e| err(e.into()))?;
        Ok((r, pid))
    };
    let (reply, pid) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| err(ControlFailure::Timeout(timeout)))??;
    if !reply.ok {
        return Err(VmmProcessError::Refused {
            op: serde_json::to_string(req).unwrap_or_default(),
            err: reply.error.unwrap_or_else(|| "unknown error".into()),
        });
    }
    Ok((reply, pid))
}

/// Asks a VMM who it is.
pub async fn info(dir: &Path) -> Result<(Info, u32), VmmProcessError> {
    let (info, pid) = call(dir, &Request::Info).await?;
    let info = info.ok_or_else(|| VmmProcessError::Control {
        path: dir.join(layout::CONTROL_SOCKET),
        err: ControlFailure::NoInfo,
    })?;
    Ok((info, pid))
}

/// Pids of every `bexar vmm --dir D` process whose D is under `vms_root`, with D.
pub fn find_vmms(vms_root: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, vmm_dir_of(pid)?)))
        .filter(|(_, dir)| dir.parent() == Some(vms_root))
        .collect()
}

/// The directory D if `pid` is a live `bexar vmm --dir D` process (a zombie's command line is
/// empty), and not a VMM's reaper (which shares its command line and holds only the VM, for a
/// moment after the VMM ended).
pub fn vmm_dir_of(pid: u32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    if args.len() < 4 || args[1] != b"vmm" || args[2] != b"--dir" {
        return None;
    }
    if bexar_vmm::teardown::is_reaper(pid) {
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(args[3]).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
