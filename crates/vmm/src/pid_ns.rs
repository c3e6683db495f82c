//! `bexar run` in a PID namespace of its own.
//!
//! A process cannot move itself into a new PID namespace: `unshare(CLONE_NEWPID)` puts only
//! the children it makes afterwards there, the first of which is the namespace's pid 1. The
//! agent starts its VMMs that way. `bexar run` is itself the process its caller (a shell, a CI
//! job) waits for, so as it enters its jail it forks ([`fork_into_new`]): the child goes on as
//! the VMM, pid 1 of the new namespace, and the parent waits outside it.
//!
//! The parent holds nothing of the VM's: it closes every descriptor but the standard ones and
//! its ends of two sockets, gives up root (the child's uid, so it may still signal it) and
//! confines itself ([`crate::jail::confine_waiter`]: no capabilities, `no_new_privs`, no file
//! by path, its own seccomp filter). It stays in the host's network namespace, and connects the
//! child's remote disks to their servers for it (`remote::serve_dials_over`), so the child's
//! network namespace is empty. The child hands it the VM's descriptor as soon as it has made
//! the VM ([`crate::teardown::hand_to_keeper`]), so the child's exit does not wait for KVM's
//! teardown (a namespace's first process could not leave that to a child of its own: the
//! kernel holds its exit until the rest of its namespace has gone). The parent leaves the VM to
//! a reaper ([`crate::teardown::Reaper`]) at once, which holds it until the parent has gone;
//! once the child has ended the parent exits as the child did: the same exit code, or the same
//! signal.
//!
//! The parent forwards what ends a process (SIGTERM, SIGINT, SIGHUP, SIGQUIT) to the child
//! and waits for it, relays Ctrl+Z as SIGSTOP and SIGCONT, and the child dies with the parent
//! (`PR_SET_PDEATHSIG`) should the parent be killed. A jailed `bexar run` does so unless
//! `--no-pid-namespace`: the process a caller started is then not the VMM but its parent.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};

use crate::jail::{nix_step, step as io_step, JailError};

/// Forks this process, which must have one thread, into a new PID namespace. Returns in the
/// child (the namespace's pid 1, which goes on as the VMM); the parent never returns. Both
/// take the uid `uid_base` plus the child's pid.
pub(crate) fn fork_into_new(uid_base: u32, dial_for: &[(String, u16)]) -> Result<(), JailError> {
    use nix::unistd::{fork, ForkResult};
    let (outside, inside) = UnixStream::pair().map_err(io_step("the keeper socket"))?;
    let dial = match dial_for {
        [] => None,
        _ => Some(UnixDatagram::pair().map_err(io_step("the dial channel"))?),
    };
    // SAFETY: pidfd_open takes a pid and flags; on success the descriptor is ours alone.
    let parent = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if parent < 0 {
        return Err(io_step("pidfd_open")(std::io::Error::last_os_error()));
    }
    // SAFETY: pidfd_open returned a fresh descriptor (CLOEXEC) owned by nobody else.
    let parent = unsafe { OwnedFd::from_raw_fd(parent as RawFd) };
    // A SIGCHLD ignored since exec would reap the child unseen, and its status with it.
    // SAFETY: SIG_DFL installs no handler code.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(nix_step("unshare the PID namespace"))?;
    // SAFETY: the caller checked that this process has one thread, so the child is a full
    // copy of it and may run any code.
    match unsafe { fork() }.map_err(nix_step("fork into the PID namespace"))? {
        ForkResult::Child => {
            drop(outside);
            // The terminal's job-control signals are dropped for a namespace's pid 1 while
            // their action is the default, and a read of the terminal from the background
            // would then be retried for ever: ignored, such a read fails (EIO) instead, and a
            // write goes through. Ctrl+Z is relayed by the parent as SIGSTOP.
            // SAFETY: SIG_IGN installs no handler code.
            unsafe {
                libc::signal(libc::SIGTTIN, libc::SIG_IGN);
                libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            }
            *bexar_util::sync::lock(&PARENT) = Some(parent);
            if let Some((inside, outside)) = dial {
                drop(outside);
                bexar_devices::block::remote::dial_over(inside);
            }
            crate::jail::learn_host_pid();
            crate::jail::set_keeper(OwnedFd::from(inside));
            Ok(())
        }
        ForkResult::Parent { child } => {
            drop(inside);
            // Back to this process's own PID namespace for the children it makes from now on
            // (the reaper): the new one ends with the VMM, and a fork into it would fail. As
            // root, before the drop. Without it, the VM is dropped here instead.
            let back = nix::sched::setns(&parent, nix::sched::CloneFlags::CLONE_NEWPID);
            if let Err(e) = &back {
                // (Linux 5.8+ takes a pidfd here.) A reaper forked now would be the child's
                // namespace's, which could not end before it; nor can this process start a
                // thread then: the kernel refuses one whose namespace for children differs.
                tracing::warn!(
                    "cannot return to the host's PID namespace: {e}; the VM is released by \
                     this process as it exits, and remote disks cannot reconnect"
                );
            }
            drop(parent);
            forward_signals(child);
            let dial = dial.map(|(_, outside)| (outside, dial_for.to_vec()));
            wait_outside(child, outside, uid_base, dial, back.is_ok())
        }
    }
}

/// The waiting parent's pidfd, in the child, until [`die_with_parent`].
static PARENT: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

/// In a child of [`fork_into_new`]: dies with the parent from now on (SIGKILL). Called once
/// the jail has changed the uid, which clears a parent-death signal set before. If the parent
/// has already gone (getppid cannot say: it is 0 here, the parent being outside the
/// namespace), exits at once.
pub(crate) fn die_with_parent() -> Result<(), JailError> {
    let Some(parent) = bexar_util::sync::lock(&PARENT).take() else {
        return Ok(());
    };
    // SAFETY: prctl with integer arguments; it changes only this process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io_step("PR_SET_PDEATHSIG")(std::io::Error::last_os_error()));
    }
    let mut p = libc::pollfd {
        fd: parent.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid descriptor, no wait; _exit ends this process at once.
    unsafe {
        if libc::poll(&mut p, 1, 0) > 0 {
            libc::_exit(1);
        }
    }
    Ok(())
}

/// The parent: gives up what it holds, hands the VM the child sends to a reaper (if `reaper`:
/// this process is back in the host's PID namespace), connects the child's remote disks to
/// their servers (`dial`: the channel and the servers), waits for the child and exits as it
/// did.
fn wait_outside(
    child: nix::unistd::Pid,
    sock: UnixStream,
    uid_base: u32,
    dial: Option<(UnixDatagram, Vec<(String, u16)>)>,
    reaper: bool,
) -> ! {
    use nix::sys::wait::{waitpid, WaitStatus};
    let mut keep = vec![sock.as_raw_fd()];
    keep.extend(dial.as_ref().map(|(c, _)| c.as_raw_fd()));
    crate::teardown::close_all_but(3, &mut keep);
    drop_root(uid_base.saturating_add(child.as_raw() as u32));
    let ports: Vec<u16> = dial
        .as_ref()
        .map(|(_, servers)| servers.iter().map(|(_, p)| *p).collect())
        .unwrap_or_default();
    if let Err(e) = crate::jail::confine_waiter(&ports) {
        // The child is jailed all the same; this process only waits, with no root.
        tracing::warn!("the waiting parent is not confined: {e}");
    }
    if let Some((channel, servers)) = dial {
        let serving = std::thread::Builder::new()
            .name("dialer".into())
            .spawn(move || bexar_devices::block::remote::serve_dials_over(&channel, &servers));
        if let Err(e) = serving {
            tracing::warn!("no dialer for the VMM's remote disks: {e}");
        }
    }
    // The VM goes to a reaper at once, while the guest runs, rather than once the child has
    // ended: its fork is then off the path from the guest's end to this process's exit, which
    // is what a caller waits for. The reaper holds the VM until this process has gone.
    let vm = crate::teardown::receive_vm(&sock).ok().flatten();
    let vm = match vm
        .as_ref()
        .filter(|_| reaper)
        .map(crate::teardown::Reaper::spawn)
    {
        Some(Some(reaper)) => {
            drop(vm);
            reaper.wait();
            None
        }
        _ => vm,
    };
    let status = loop {
        match waitpid(child, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r,
        }
    };
    // Open until the child has ended: it tells the child the VM is held outside its
    // namespace.
    drop(sock);
    // No reaper (a failed fork): the VM is released in this process's exit.
    drop(vm);
    match status {
        Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
        Ok(WaitStatus::Signaled(_, sig, _)) => die_of(sig as i32),
        _ => std::process::exit(1),
    }
}

/// The child, for the parent's signal handlers.
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// In the parent: what is sent to it to end it goes on to the child, and the parent waits for
/// the child to end (so a caller's `kill` then `wait` still sees the VMM gone, its disks and
/// TAPs closed); Ctrl+Z stops the child with it and `fg` resumes both. SIGKILL cannot be
/// forwarded: the child then dies by its parent-death signal, a moment after the parent.
fn forward_signals(child: nix::unistd::Pid) {
    extern "C" fn forward(sig: libc::c_int) {
        let child = CHILD.load(std::sync::atomic::Ordering::Relaxed);
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, sig) };
    }
    extern "C" fn stop(_: libc::c_int) {
        let child = CHILD.load(std::sync::atomic::Ordering::Relaxed);
        // SAFETY: kill, signal, sigprocmask and raise are async-signal-safe. The child cannot be stopped
        // by SIGTSTP (pid 1 drops it), so by SIGSTOP; this process then stops by the default
        // action and, once continued, continues the child and takes the signal again.
        // SIGTSTP is blocked while this handler runs: unblocked for the raise, or it would
        // stay pending and run this handler again as it returns, for ever. (A process group
        // with no parent in its session, which has no job control, discards the stop: the
        // child is then continued at once.)
        unsafe {
            libc::kill(child, libc::SIGSTOP);
            libc::signal(libc::SIGTSTP, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTSTP);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(libc::SIGTSTP);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGTSTP, stop as *const () as libc::sighandler_t);
            libc::kill(child, libc::SIGCONT);
        }
    }
    CHILD.store(child.as_raw(), std::sync::atomic::Ordering::Relaxed);
    for (sig, handler) in [
        (libc::SIGTERM, forward as *const ()),
        (libc::SIGINT, forward as *const ()),
        (libc::SIGHUP, forward as *const ()),
        (libc::SIGQUIT, forward as *const ()),
        (libc::SIGTSTP, stop as *const ()),
    ] {
        // SAFETY: a zeroed sigaction with a handler that makes async-signal-safe calls only,
        // restarting interrupted calls (the wait).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            if old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The child's uid (so that it may still signal the child: the child cannot name this process,
/// which is outside its PID namespace), no groups, an empty bounding set (the rest of its
/// capabilities go with root, and in [`crate::jail::confine_waiter`]), no way back.
fn drop_root(id: u32) {
    // SAFETY: plain system calls on this process's credentials; each failure leaves it with
    // more rights, never fewer than it needs (it only waits, signals the child and forks a
    // reaper).
    unsafe {
        if libc::geteuid() != 0 {
            return;
        }
        // Needs CAP_SETPCAP: before the uid changes.
        let _ = caps::clear(None, caps::CapSet::Bounding);
        libc::setgroups(0, std::ptr::null());
        libc::setresgid(id, id, id);
        libc::setresuid(id, id, id);
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    }
}

/// Ends this process by signal `sig`, as the child ended (no core: it holds nothing).
fn die_of(sig: i32) -> ! {
    // SAFETY: the core limit, then `sig`'s default action for this process, which is ending.
    unsafe {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        crate::seccomp::raise_default(sig);
    }
    std::process::exit(128 + sig)
}

/// The signals that end a process by default and that people and service managers send to
/// end one (`kill PID`, systemd's shutdown, a terminal's Ctrl+C and hang-up).
const ENDING: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// In the first process of a PID namespace: makes [`ENDING`] end it again. The kernel drops a
/// signal whose action is the default when it is sent to a namespace's first process (only
/// SIGKILL and SIGSTOP from outside get through), so without a handler `kill PID` would do
/// nothing and a host's shutdown would wait for its SIGKILL. The handler exits at once with
/// 128 + the signal, as a shell reports a process the signal ended.
pub(crate) fn end_on_signals() {
    extern "C" fn end(sig: libc::c_int) {
        // SAFETY: _exit is async-signal-safe and never returns.
        unsafe { libc::_exit(128 + sig) }
    }
    for sig in ENDING {
        // SAFETY: a zeroed sigaction with a handler that only calls _exit.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = end as *const () as usize;
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            // One the process was started with ignored stays ignored (nohup, a shell's
            // background job).
            if old.sa_sigaction != libc::SIG_IGN {
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    }
}
