//! What the fuzz targets share: one small disk image and one guest memory per process, and
//! the confined thread each target runs its device code on.
#![allow(dead_code)] // not every target uses every piece

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use bexar_vmm::threads::ThreadKind;

use bexar_devices::block::DiskConfig;
use bexar_devices::memory::{test_memory, GuestMemoryMmap};

/// A 64 KiB raw image in the temporary directory.
pub fn disk() -> &'static DiskConfig {
    static D: OnceLock<DiskConfig> = OnceLock::new();
    D.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("bexar-fuzz-{}.img", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(64 * 1024)
            .unwrap();
        DiskConfig {
            path,
            ..Default::default()
        }
    })
}

/// 2 MiB of guest memory.
pub fn mem() -> &'static GuestMemoryMmap {
    static M: OnceLock<GuestMemoryMmap> = OnceLock::new();
    M.get_or_init(|| test_memory(2))
}

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    /// Set on the confined thread.
    static CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on this process's confined thread and waits for its answer. The thread is made on
/// the first call, confined as the VMM thread of `kind` is (`bexar_vmm::jail::confine_thread`:
/// that thread's seccomp filter, no capabilities, no file by path); `inet` arms the filters of
/// a VMM with remote disks. The target sets its device up outside (as a VMM does before its
/// jail) and hands it over: a system call the device makes that the VMM's filter does not
/// allow kills the process with SIGSYS, naming the call (rerun with the seed libFuzzer printed
/// to get the input). A panic there is raised again on the fuzzing thread, where libFuzzer
/// can still write the crashing input to a file.
pub fn confined<R: Send + 'static>(
    kind: ThreadKind,
    inet: bool,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    static WORKER: OnceLock<(ThreadKind, Mutex<mpsc::Sender<Job>>)> = OnceLock::new();
    let (made_for, jobs) = WORKER.get_or_init(|| {
        // libFuzzer's hook aborts where the panic happens; on the confined thread it could not
        // save the input, so there the panic is only printed and caught (below).
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONFINED.with(|c| c.get()) {
                eprintln!("{info}");
            } else {
                fuzzer_hook(info);
            }
        }));
        bexar_vmm::seccomp::arm(None, inet).expect("build the VMM's seccomp filters");
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(kind.name())
            .spawn(move || {
                CONFINED.with(|c| c.set(true));
                let confined = bexar_vmm::jail::confine_thread(kind).map_err(|e| e.to_string());
                let ok = confined.is_ok();
                let _ = ready_tx.send(confined);
                if ok {
                    for job in rx {
                        job();
                    }
                }
            })
            .expect("start the confined thread");
        if let Err(e) = ready_rx.recv().expect("the confined thread ended") {
            panic!("cannot confine the fuzzing thread: {e}");
        }
        (kind, Mutex::new(tx))
    });
    assert_eq!(*made_for, kind, "one confined thread kind per target");
    let (answer_tx, answer_rx) = mpsc::sync_channel(1);
    jobs.lock()
        .unwrap()
        .send(Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
                p.downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default()
            });
            let _ = answer_tx.send(r);
        }))
        .expect("the confined thread ended");
    match answer_rx.recv().expect("the confined thread ended") {
        Ok(r) => r,
        Err(msg) => panic!("the confined thread panicked: {msg}"),
    }
}
