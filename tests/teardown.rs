//! The VMM leaves KVM's slow VM teardown to a child process (src/vmm/teardown.rs) and exits
//! as soon as the guest has ended. A file of its own: the test makes its process a
//! child subreaper, so that the orphaned reaper becomes its child and can be waited for.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Waits for any child of this process; None once there are none left.
fn wait_any() -> Option<(libc::pid_t, i32)> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            return Some((pid, status));
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// How many children of this process (live or zombie) are named `comm`.
fn children_named(comm: &str) -> usize {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // "pid (comm) state ppid ...": the name may hold spaces, so split at the last ')'.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                return false;
            };
            let ppid = stat[close + 1..].split_whitespace().nth(1);
            &stat[open + 1..close] == comm && ppid == Some(me.as_str())
        })
        .count()
}

#[test]
fn the_vm_is_released_by_a_reaper_after_the_vmm_exits() {
    // SAFETY: prctl with an integer argument changes only this process's reaping.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    for (test, device) in [("minimal", None), ("rng", Some("--rng"))] {
        // With a virtio device there are ioeventfds on KVM's I/O bus: the slow teardown case.
        let o = bexar()
            .args(["run", "--no-stdin", "--memory", "32", "--timeout", "30"])
            .args(["--cmdline", &format!("bexar.test={test}")])
            .args(device)
            .arg("--kernel")
            .arg(testguest())
            .output()
            .expect("run bexar");
        let vmm_done = Instant::now();
        assert_exit(&o, 0);
        // Named apart from the VMM whose command line it shares (a zombie keeps its name).
        assert_eq!(
            children_named("bexar-reaper"),
            1,
            "the reaper does not name itself"
        );
        // The VMM is gone (output() reaped it); what is left is its reaper, now ours. It ends
        // by itself, cleanly, once it has dropped the VM.
        let (pid, status) = wait_any().expect("a reaper outlived the VMM");
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert!(pid > 0);
        let released = vmm_done.elapsed();
        assert!(wait_any().is_none(), "exactly one reaper per VMM");
        assert!(
            released < Duration::from_secs(10),
            "reaper took {released:?}"
        );
        eprintln!("{test}: VM released {released:?} after the VMM exited");
    }
}
