//! The VMM's threads, and the one place they are made.
//!
//! A VMM process has exactly these threads, all made before the guest runs its first
//! instruction (no thread is made per connection or per client):
//!
//! * [`ThreadKind::Vmm`]: the thread that built the VM. It then runs the main event loop: the
//!   control socket, the console's input side, and the wait for the VM's end;
//! * [`ThreadKind::Vcpu`]: one per vCPU, in `KVM_RUN`, dispatching port and MMIO exits;
//! * [`ThreadKind::Virtio`]: the virtio event loop (queue notifications, backend completions,
//!   TAP and vsock sockets), only when the VM has virtio devices.
//!
//! [`spawn`] names each thread after its kind and installs the kind's seccomp filter
//! ([`crate::seccomp`]) before the thread runs any of its code. It also turns a panic
//! into the VM's end with a reason, so a bug never leaves a VM half-running.
//!
//! One process, not a thread, comes after the guest: the reaper ([`crate::teardown`]), forked by
//! the `Vmm` thread once the guest has ended. That thread's filter must allow `fork` and
//! `pidfd_open`, or the reaper goes and the VMM's exit waits for KVM's teardown again.

use std::thread::JoinHandle;

use crate::{ExitHandle, ExitReason};

/// What a VMM thread does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: build, then the control/console/exit event loop.
    Vmm,
    /// vCPU N.
    Vcpu(u8),
    /// The virtio event loop.
    Virtio,
}

impl ThreadKind {
    /// The thread's name (as `ps -L` shows it).
    pub fn name(self) -> String {
        match self {
            Self::Vmm => "vmm".into(),
            Self::Vcpu(n) => format!("vcpu{n}"),
            Self::Virtio => "virtio".into(),
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Starts a thread of `kind` running `body`. If `body` panics, the VM ends through `exit` with
/// a VMM error naming the thread.
pub fn spawn<F>(kind: ThreadKind, exit: ExitHandle, body: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    debug_assert!(kind != ThreadKind::Vmm, "the main thread is not spawned");
    std::thread::Builder::new()
        .name(kind.name())
        .spawn(move || {
            // The kind's seccomp filter, before the thread touches guest input. A thread that
            // cannot be filtered must not run: it ends the VM instead.
            if let Err(e) = crate::seccomp::install(kind) {
                exit.request(ExitReason::VmmError(e.to_string()));
                return;
            }
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
                exit.request(ExitReason::VmmError(format!("the {kind} thread panicked")));
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_named_and_a_panic_ends_the_vm() {
        let exit = ExitHandle::new().unwrap();
        let t = spawn(ThreadKind::Vcpu(3), exit.clone(), || {
            assert_eq!(std::thread::current().name(), Some("vcpu3"));
        })
        .unwrap();
        t.join().unwrap();
        assert!(!exit.requested());
        let t = spawn(ThreadKind::Virtio, exit.clone(), || panic!("a device bug")).unwrap();
        t.join().unwrap();
        assert_eq!(
            exit.reason(),
            Some(ExitReason::VmmError("the virtio thread panicked".into()))
        );
    }
}
