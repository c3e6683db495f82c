//! Releasing a VM without making this process wait for KVM.
//!
//! Once a VM has had any device on a KVM I/O bus (the in-kernel PIC and IOAPIC, every ioeventfd),
//! dropping its last reference waits for an SRCU grace period in `kvm_destroy_vm`: about 14 ms on
//! this 2-core PVM host (3.5 jiffies at HZ=250), milliseconds on hardware hosts with the same
//! kernel. In the VMM that wait would sit between the guest's end and the process's exit, which
//! is what the caller (the agent, a CI job) waits for.
//!
//! [`Reaper::spawn`] forks a child that keeps its copy of the VM descriptor and nothing else:
//! it closes every other descriptor it inherited at once, waits until this process has exited,
//! then drops the VM and exits, so the grace period is waited for there. Guest RAM is mapped
//! `MADV_DONTFORK`, so the child never maps it and the memory goes back to the host when this
//! process exits. The fork costs ~0.2 ms here (done after the guest ended: forking beside a
//! booting VM was measured to slow the boot more than that). If the child cannot be started, the
//! VM is simply dropped in this process.
//!
//! A VMM that is the first process of a PID namespace of its own (every jailed one) cannot
//! count on a child for this: the kernel holds such a process's exit until every other
//! process of its namespace has gone, the reaper and its wait included (measured: +10.6 ms
//! per VM end). Its keeper, outside the namespace, takes the VM instead: the VMM sends a copy
//! of the VM's descriptor to it over a socket as soon as the VM exists ([`hand_to_keeper`]),
//! and the keeper (the agent, or `bexar run`'s waiting parent: [`receive_vm`]) drops it once
//! the VMM's process has ended. A keeper that went away (an agent restarted) closes its end
//! of the socket; the VMM then falls back to a reaper ([`kept`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use kvm_ioctls::VmFd;

/// The keeper's socket, once it has taken the VM.
static KEEPER: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

/// Sends a copy of `vm` to this process's keeper, if it has one (the agent, or `bexar run`'s
/// waiting parent: [`crate::jail::take_keeper`]), as soon as the VM exists. One VM per
/// process; the socket stays open, so that [`kept`] can tell whether the keeper still is.
pub fn hand_to_keeper(vm: &VmFd) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let Some(keeper) = crate::jail::take_keeper() else {
        return;
    };
    let fds = [vm.as_raw_fd()];
    let iov = [std::io::IoSlice::new(&[1u8])];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    match sendmsg::<()>(
        keeper.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    ) {
        Ok(_) => {
            // Kept open: its end closing says the keeper has gone (an agent restarted), and
            // with it the copy of the VM ([`kept`]).
            *bexar_util::sync::lock(&KEEPER) = Some(keeper);
            tracing::debug!("the VM will be released by its keeper after this process");
        }
        // The VM is then released at this process's exit, as it would be with no keeper.
        Err(e) => tracing::warn!("cannot hand the VM to its keeper: {e}"),
    }
}

/// Whether a keeper holds the VM still (so this process's exit never waits for KVM's
/// teardown): it took it, and its end of the socket is open.
pub fn kept() -> bool {
    let keeper = bexar_util::sync::lock(&KEEPER);
    let Some(fd) = keeper.as_ref() else {
        return false;
    };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll on one valid descriptor, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    let there = n == 0 || p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) == 0;
    if !there {
        tracing::info!("its keeper has gone (an agent restarted): the VM goes to a reaper");
    }
    there
}

/// The keeper's side: the VM a VMM sent on `sock`, `None` if it closed the socket without
/// one (it ended before making its VM). Blocks unless `sock` is non-blocking.
pub fn receive_vm(sock: &UnixStream) -> std::io::Result<Option<File>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut b = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut b)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    // CLOEXEC as it arrives: the keeper (the agent) starts other VMMs from other threads, and
    // none of them may inherit this VM.
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        // This process is out of descriptors: the VM is then released in the VMM's exit.
        tracing::warn!("a VMM's VM did not arrive: out of descriptors");
    }
    let mut vm = None;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor in this process for us.
                let f = unsafe { File::from_raw_fd(fd) };
                // Only the first is the VM; any other (a VMM should send none) is closed.
                if vm.is_none() {
                    vm = Some(f);
                }
            }
        }
    }
    Ok(vm)
}

/// The reaper's name (`/proc/PID/comm`), NUL-terminated.
const REAPER_COMM: &[u8] = b"bexar-reaper\0";

/// Whether process `pid` is a VMM's reaper (a process with the VMM's command line that holds
/// only its VM, for a moment after the VMM ended).
pub fn is_reaper(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim_ascii_end() == &REAPER_COMM[..REAPER_COMM.len() - 1])
}

/// The parent's side of a started reaper.
#[derive(Debug)]
pub struct Reaper {
    /// Read end of a pipe whose only write end is the child's: EOF once the child has closed
    /// what it inherited.
    closed: OwnedFd,
}

impl Reaper {
    /// Forks the reaper for `vm`. The caller then drops its own reference (and waits with
    /// [`Reaper::wait`] before exiting).
    pub fn spawn(vm: &impl AsRawFd) -> Option<Self> {
        let vm_fd = vm.as_raw_fd();
        // SAFETY: pidfd_open takes a pid and flags; on success the new descriptor is ours alone.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        if pidfd < 0 {
            return None;
        }
        // SAFETY: pidfd_open returned a fresh descriptor (CLOEXEC) owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        let mut pipe = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return None;
        }
        // SAFETY: pipe2 succeeded, so both descriptors are fresh and owned by nobody else.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
        // SAFETY: the child runs only async-signal-safe system calls and never returns into
        // Rust code, as fork in a multi-threaded process requires.
        match unsafe { libc::fork() } {
            0 => child(vm_fd, pidfd.as_raw_fd()),
            -1 => {
                tracing::debug!("fork failed: {}", std::io::Error::last_os_error());
                None
            }
            pid => {
                tracing::debug!(pid, "the VM will be released by a child after this process");
                drop(tx);
                Some(Self { closed: rx })
            }
        }
    }

    /// Waits until the child has closed the descriptors it inherited (TAPs, disks, the
    /// console), so none of them outlives this process.
    pub fn wait(self) {
        let mut b = [0u8; 1];
        // SAFETY: reading into a one-byte stack buffer from a descriptor we own.
        while unsafe { libc::read(self.closed.as_raw_fd(), b.as_mut_ptr().cast(), 1) } < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
}

/// Closes every descriptor of this process from `from` up but those in `keep` (sorted here,
/// in place). Allocates nothing, so a child forked from a threaded process may call it.
pub(crate) fn close_all_but(from: u32, keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut from = from;
    for &fd in keep.iter() {
        let fd = fd as u32;
        if fd > from {
            // SAFETY: close_range on this process's own descriptors in [from, fd), which
            // nothing here uses any more (the caller keeps what it needs in `keep`).
            unsafe { libc::close_range(from, fd - 1, 0) };
        }
        from = from.max(fd + 1);
    }
    // SAFETY: as above, above the last kept.
    unsafe { libc::close_range(from, u32::MAX, 0) };
}

/// The child: keep only the VM and the parent's pidfd, wait for the parent to end, exit.
fn child(vm: RawFd, pidfd: RawFd) -> ! {
    // SAFETY: prctl reads a static NUL-terminated name. Named apart from the VMM (whose
    // command line it shares), so that whoever looks for VMMs in /proc (the agent, at its
    // start and after a live upgrade) can skip it; before the VMM goes on (it waits for the
    // descriptors closed next).
    unsafe { libc::prctl(libc::PR_SET_NAME, REAPER_COMM.as_ptr()) };
    close_all_but(0, &mut [vm, pidfd]);
    // SAFETY: system calls only, in this single-threaded child: signal() changes this
    // process's dispositions, poll gets a valid one-element array, _exit never returns.
    unsafe {
        // A Ctrl+C in the terminal is for the VMM, not for this.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        let mut p = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        while libc::poll(&mut p, 1, -1) < 0 && *libc::__errno_location() == libc::EINTR {}
        libc::close(vm);
        libc::_exit(0)
    }
}
