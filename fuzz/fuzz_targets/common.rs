//! What the fuzz targets share: one small disk image and one guest memory per process, and
//! the confined thread each target runs its device code on.
#![allow(dead_code)] // not every target uses every piece

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use bexar_vmm::threads::ThreadKind;

use bexar_devices::block::DiskConfig;
use bexar_devices::memory::{test_memory, GuestMemoryMmap};

/// The jail's root while this process is jailed ([`jail_process`]).
static JAILED: OnceLock<std::path::PathBuf> = OnceLock::new();

/// Where a file of this process's goes: the jail's root once jailed (where it is `/name`),
/// else the temporary directory.
pub fn own_path(name: &str) -> std::path::PathBuf {
    match JAILED.get() {
        Some(_) => std::path::Path::new("/").join(name),
        None => std::env::temp_dir().join(format!("bexar-fuzz-{}-{name}", std::process::id())),
    }
}

/// Jails this whole process as a VMM is jailed (`bexar_vmm::jail`): namespaces of its own
/// (mount, network, IPC, UTS), `pivot_root` into an empty directory of its own, a uid of the
/// VMMs' range, no capabilities, `no_new_privs`, the VMM's rlimits, Landlock beneath that root.
/// What libFuzzer and its sanitizer need there is added: the corpus directories and the
/// directory of crash files (from its command line), bound in at the same paths, and a `/proc`
/// that shows this process alone. The device code runs on a thread confined further
/// ([`confined`]), which reaches no path at all. Run from the
/// target's `init`, before libFuzzer starts its threads (the jail wants one). Only as root
/// (CI); otherwise the device code still runs on the confined thread alone.
pub fn jail_process() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bexar fuzz: not root, so not jailed: device code runs on a confined thread only");
        return;
    }
    let binds = match fuzzing_dirs() {
        Ok(dirs) => dirs,
        Err(why) => {
            eprintln!("bexar fuzz: not jailed ({why}): device code runs on a confined thread only");
            return;
        }
    };
    let root = std::env::temp_dir().join(format!("bexar-fuzz-jail-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("make the fuzz jail's root");
    let mut j = bexar_vmm::jail::JailConfig::new(bexar_vmm::jail::DEFAULT_UID_BASE, root.clone());
    // Its corpus entries and crash files, and the small disk image.
    j.max_file_bytes = 64 << 20;
    j.binds = binds.clone();
    // LeakSanitizer lists this process's threads in /proc, and stops them with ptrace from a
    // helper of its own, which a process that changed its uid may only do once it is dumpable
    // again (below; its core limit stays 0).
    j.proc = true;
    let uid = j.uid();
    // The jailed uid writes its own files in its root and libFuzzer's in the bound directories.
    for d in std::iter::once(&root).chain(&binds) {
        std::os::unix::fs::chown(d, Some(uid), Some(uid)).expect("chown a fuzz directory");
    }
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
    let disk = root.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * 1024)
        .unwrap();
    std::os::unix::fs::chown(&disk, Some(uid), Some(uid)).unwrap();
    bexar_vmm::jail::arm(j).expect("arm the fuzz jail");
    let t = bexar_vmm::jail::enter_armed(64 << 20)
        .expect("enter the fuzz jail")
        .expect("the jail was armed");
    JAILED.set(root.clone()).unwrap();
    // SAFETY: prctl with integer arguments; it changes only this process.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    eprintln!(
        "bexar fuzz: jailed as uid {uid} in {} (bound: {binds:?}; landlock {})",
        root.display(),
        if t.landlock { "on" } else { "not offered" }
    );
}

/// The directories libFuzzer reads and writes in a fuzzing run (its corpus directories and
/// the one its crash files go to), from its command line; each must be a directory beneath
/// this fuzz project's, since the jail binds it in and gives it to the jailed uid. Any other
/// use (a file to reproduce, merging, forks, a dictionary, paths elsewhere) is refused: that
/// run is not jailed.
fn fuzzing_dirs() -> Result<Vec<std::path::PathBuf>, String> {
    let project = std::fs::canonicalize(env!("CARGO_MANIFEST_DIR")).map_err(|e| e.to_string())?;
    let mut dirs = Vec::new();
    for a in std::env::args().skip(1) {
        let dir = match a.strip_prefix("-artifact_prefix=") {
            Some(p) if p.ends_with('/') => std::path::PathBuf::from(p),
            Some(p) => return Err(format!("an artifact prefix that is not a directory: {p}")),
            None if a.starts_with('-') => {
                let flag = a.trim_start_matches('-').split('=').next().unwrap_or("");
                // The flags that make libFuzzer open other paths or start other processes.
                if matches!(
                    flag,
                    "merge" | "set_cover_merge" | "fork" | "jobs" | "workers" | "dict"
                        | "exact_artifact_path" | "minimize_crash" | "cleanse_crash"
                        | "features_dir" | "create_missing_dirs" | "seed_inputs" | "runs_file"
                ) {
                    return Err(format!("{a} is not supported jailed"));
                }
                continue;
            }
            None => std::path::PathBuf::from(&a),
        };
        let dir = std::fs::canonicalize(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !dir.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        if !dir.starts_with(&project) || dir == project {
            return Err(format!("{} is outside {}", dir.display(), project.display()));
        }
        dirs.push(dir);
    }
    Ok(dirs)
}

/// A 64 KiB raw image: in the jail's root (made by [`jail_process`]), else in the temporary
/// directory.
pub fn disk() -> &'static DiskConfig {
    static D: OnceLock<DiskConfig> = OnceLock::new();
    D.get_or_init(|| {
        let path = own_path("disk.img");
        if JAILED.get().is_none() {
            std::fs::File::create(&path)
                .unwrap()
                .set_len(64 * 1024)
                .unwrap();
        }
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
