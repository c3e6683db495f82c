//! What the agent does for each VMM's sandbox: the jail the VMM enters (written into its
//! launch, see `bexar_vmm::jail`), its cgroups (made, limited and joined before the VMM runs
//! any code of its own, read for metrics, checked for an out-of-memory kill), the record a
//! seccomp violation leaves, and snapshot directories staged in the jail's root.
//!
//! cgroups: v2 where the host has it (a `cgroup2` mount with the controllers), else the v1
//! hierarchies (this machine: cpu, cpuacct, memory, pids and blkio on v1, the v2 mount empty).
//! Each VM gets `PARENT/vm-ID` in every hierarchy used; the VMM joins them between fork and
//! exec, so it never runs unlimited.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use bexar_vmm::jail::JailConfig;
use bexar_vmm::launch::files;

/// How the agent sandboxes its VMMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Jail every VMM (off only for debugging, with a loud warning).
    pub jail: bool,
    /// First uid of the VMMs' range (each runs as this plus its pid).
    pub uid_base: u32,
    /// cgroup directory (relative to each hierarchy's root) the VMs' cgroups are made in;
    /// `None`: no cgroups.
    pub cgroup_parent: Option<PathBuf>,
    /// Memory allowed to a VM's cgroup beyond its guest memory (the VMM's own, page cache of
    /// its disks), MiB.
    pub memory_headroom_mib: u64,
    /// Turn on cgroup2's `favordynmods` at start (see [`favor_dynmods`]), so a VMM joins its
    /// cgroups in microseconds rather than an RCU grace period.
    pub favor_dynmods: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            jail: true,
            uid_base: bexar_vmm::jail::DEFAULT_UID_BASE,
            cgroup_parent: Some(PathBuf::from("bexar")),
            memory_headroom_mib: DEFAULT_MEMORY_HEADROOM_MIB,
            favor_dynmods: true,
        }
    }
}

/// Default memory a VM's cgroup allows beyond guest memory, MiB.
pub const DEFAULT_MEMORY_HEADROOM_MIB: u64 = 64;

/// Threads a VMM may have beyond one per vCPU (main, virtio loop, remote-disk workers, the
/// reaper, io_uring's workers).
const PIDS_HEADROOM: u64 = 256;

/// The jail for a VMM of the VM in `dir`. Its network namespace is empty even with remote
/// disks: the agent connects those ([`Dialer`]).
pub fn jail_for(cfg: &SandboxConfig, dir: &Path) -> Option<JailConfig> {
    if !cfg.jail {
        return None;
    }
    let mut j = JailConfig::new(cfg.uid_base, dir.join(files::JAIL_ROOT));
    j.own_root = true;
    Some(j)
}

/// How many connections one VMM's dialer makes at a time: each holds a blocking thread of the
/// agent while it waits (for the request, at most 5 s, and for the server), so a VMM a guest
/// took over cannot tie up the pool every VM shares.
const DIALS_PER_VM: usize = 4;

/// The socket in a jailed VMM's root on which the agent connects its remote disks to their
/// servers (`Launch::dialer`): one per launch (named by the launch's token), so a live
/// upgrade's new VMM has its own while the old one keeps its own, and a failed upgrade leaves
/// the old one's served.
#[derive(Debug)]
pub struct Dialer {
    /// Relative to the jail's root.
    pub name: PathBuf,
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl Dialer {
    /// Binds the dialer of the launch with `token` of the VM in `dir` (replacing a stale
    /// one): root's, in the VM's jail root, mode 0666 so that the VMM's own uid can connect
    /// after it drops root (the VM's directory is root's alone, mode 0700: no other host user
    /// reaches it).
    pub fn bind(dir: &Path, token: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let name = PathBuf::from(format!("dialer-{}.sock", &token[..token.len().min(12)]));
        let path = dir.join(files::JAIL_ROOT).join(&name);
        let listener = bexar_util::unix::bind_owner_only(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        Ok(Self {
            name,
            path,
            listener,
        })
    }

    /// Removes every dialer socket in the VM's jail root: run when no VMM runs the VM.
    pub fn remove_stale(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir.join(files::JAIL_ROOT)) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("dialer-") && name.ends_with(".sock") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Serves it for the VMM behind `pidfd`, whose launch names its remote disks, in the
    /// background until that VMM ends ([`serve_dialer`]).
    pub fn spawn(self, launch: &bexar_vmm::launch::Launch, pidfd: &OwnedFd) {
        let allowed = launch
            .config
            .disks
            .iter()
            .filter_map(|d| d.remote_server())
            .collect();
        match pidfd.try_clone() {
            Ok(fd) => drop(tokio::spawn(serve_dialer(self, allowed, fd))),
            Err(e) => tracing::warn!(
                "cannot duplicate a pidfd: {e}; the VM's remote disks cannot reconnect"
            ),
        }
    }
}

impl Drop for Dialer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves `dialer` for a VMM (`pidfd`) whose remote disks' servers are `allowed`, until it
/// ends: each connection asks for one TCP connection, made here (on a blocking thread, at
/// most [`DIALS_PER_VM`] at a time) and handed back
/// ([`bexar_devices::block::remote::serve_dial`]); a server the VM's disks do not name is
/// refused, and logged.
async fn serve_dialer(dialer: Dialer, allowed: Vec<(String, u16)>, pidfd: OwnedFd) {
    let allowed = std::sync::Arc::new(allowed);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(DIALS_PER_VM));
    let serve = async {
        let l = dialer.listener.try_clone()?;
        l.set_nonblocking(true)?;
        let l = tokio::net::UnixListener::from_std(l)?;
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return Ok(());
            };
            let conn = match l.accept().await {
                Ok((c, _)) => c.into_std().and_then(|c| {
                    c.set_nonblocking(false)?;
                    Ok(c)
                }),
                Err(e) => Err(e),
            };
            match conn {
                Ok(c) => {
                    let a = allowed.clone();
                    drop(tokio::task::spawn_blocking(move || {
                        if let Err(e) = bexar_devices::block::remote::serve_dial(c, &a) {
                            tracing::warn!("a remote disk's connection for its VMM: {e}");
                        }
                        drop(permit);
                    }));
                }
                Err(e) => {
                    tracing::warn!("the dialer socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    };
    tokio::select! {
        r = serve => if let Err(e) = r {
            let e: std::io::Error = e;
            tracing::warn!("cannot serve the dialer socket: {e}");
        },
        () = super::vmm_process::wait_exit(pidfd) => {}
    }
    drop(dialer);
}

/// The descriptor number a VMM finds its ready-made network namespace at (set between fork
/// and exec).
pub const NETNS_FD: i32 = 100;

/// The descriptor number a jailed VMM finds its keeper's socket at: it sends its VM's
/// descriptor there, and the agent drops the VM once the VMM has ended
/// ([`bexar_vmm::teardown`]).
pub const KEEPER_FD: i32 = 101;

/// Keeps [`NETNS_FD`] and [`KEEPER_FD`] taken in the agent (by `/dev/null`, close-on-exec), so
/// that nothing it opens lands there: between fork and exec they are overwritten with what a
/// VMM is passed, which would cover, for one, the pipe through which the standard library
/// reports a failed exec. Run at the agent's start.
pub fn reserve_passed_fds() {
    let Ok(null) = std::fs::File::open("/dev/null") else {
        return;
    };
    for fd in [NETNS_FD, KEEPER_FD] {
        // SAFETY: fcntl probes a descriptor number; dup3 makes `fd` a copy of /dev/null only
        // where the probe found nothing open, so no descriptor of this process is replaced.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) < 0 {
                libc::dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC);
            }
        }
    }
}

/// Empty network namespaces made ahead of time, one per VMM start: making one costs about
/// 0.5 ms of kernel time here, the dearest part of the jail, and is done off the start path.
/// None is ever used twice, so no two VMMs share one.
#[derive(Debug, Default)]
pub struct NetnsPool {
    ready: std::sync::Mutex<Vec<OwnedFd>>,
    filling: std::sync::atomic::AtomicBool,
}

/// Namespaces kept ready.
const NETNS_READY: usize = 4;

/// A new empty network namespace, made on a thread of its own (which leaves it at once).
fn new_netns() -> std::io::Result<OwnedFd> {
    bexar_vmm::jail::netns_on_thread()?
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

impl NetnsPool {
    /// One ready namespace (a fresh one if none is ready), and a refill in the background.
    pub fn take(self: &std::sync::Arc<Self>) -> std::io::Result<OwnedFd> {
        let ready = bexar_util::sync::lock(&self.ready).pop();
        self.refill();
        match ready {
            Some(fd) => Ok(fd),
            None => new_netns(),
        }
    }

    /// Tops the pool up on a blocking thread, one refill at a time.
    pub fn refill(self: &std::sync::Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            while bexar_util::sync::lock(&me.ready).len() < NETNS_READY {
                match new_netns() {
                    Ok(fd) => bexar_util::sync::lock(&me.ready).push(fd),
                    Err(e) => {
                        tracing::warn!("cannot make a network namespace ahead of time: {e}");
                        break;
                    }
                }
            }
            me.filling.store(false, Ordering::Release);
        });
    }
}

/// Prepares the jail's root for a launch: made if missing, the last run's result gone.
/// (Everything else in it belongs to a VMM that may still run: a live upgrade's old one. The
/// VMM makes the root root's and its `out` its own as it enters the jail.)
pub fn prepare_root(dir: &Path) -> std::io::Result<()> {
    let root = dir.join(files::JAIL_ROOT);
    std::fs::create_dir_all(&root)?;
    match std::fs::remove_file(root.join(files::JAIL_OUT).join(files::RESULT)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let _ = std::fs::remove_file(dir.join(files::FAULT));
    Ok(())
}

/// Most bytes of a result file read.
pub const MAX_RESULT_BYTES: u64 = 1 << 20;

/// Reads at most `max` bytes of `path`, a file a jailed VMM could have written or replaced: a
/// link is not followed, a FIFO or device not waited on (non-blocking), anything but a regular
/// file not read.
pub fn read_untrusted(path: &Path, max: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut out = Vec::new();
    f.take(max).read_to_end(&mut out).ok()?;
    Some(out)
}

/// What a seccomp violation recorded for the VMM of `dir`: "forbidden system call N (name) on
/// thread T".
pub fn seccomp_fault(dir: &Path) -> Option<String> {
    let bytes = read_untrusted(&dir.join(files::FAULT), 4096)?;
    let text = String::from_utf8_lossy(&bytes);
    let line = text.lines().next()?.trim();
    let what = line.strip_prefix("bexar vmm: seccomp: ").unwrap_or(line);
    (!what.is_empty()).then(|| format!("killed by its seccomp filter: {what}"))
}

/// The jail's root (as the host sees it) if the VMM `pid` of the VM in `dir` is jailed there.
pub fn jail_root_of(pid: u32, dir: &Path) -> Option<PathBuf> {
    let root = dir.join(files::JAIL_ROOT);
    bexar_vmm::jail::is_root_of(pid, &root).then_some(root)
}

/// Moves a snapshot a jailed VMM wrote into its root (`staged`) to `dest`, then makes it the
/// agent's: it must be a directory of regular files only (a VMM could leave a symlink to make
/// the agent write elsewhere), and it is handed to root, out of the VMM's reach.
pub fn adopt_staged(staged: &Path, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(staged)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            staged.display()
        )));
    }
    std::fs::rename(staged, dest)?;
    // Looked at again once moved: it could have been swapped for a symlink meanwhile.
    if !std::fs::symlink_metadata(dest)?.is_dir() {
        let _ = std::fs::remove_file(dest);
        return Err(std::io::Error::other(format!(
            "{} was replaced while it was moved",
            staged.display()
        )));
    }
    std::os::unix::fs::lchown(dest, Some(0), Some(0))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(dest)? {
        let e = e?;
        let m = std::fs::symlink_metadata(e.path())?;
        if !m.file_type().is_file() {
            let _ = std::fs::remove_dir_all(dest);
            return Err(std::io::Error::other(format!(
                "{} is not a regular file",
                e.path().display()
            )));
        }
        std::os::unix::fs::lchown(e.path(), Some(0), Some(0))?;
    }
    Ok(())
}

/// Which cgroup version the host offers for VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2 at this mount, with these controllers.
    V2(PathBuf),
    /// cgroup v1: the mount of each controller used.
    V1 {
        /// `cpu` (quota).
        cpu: Option<PathBuf>,
        /// `cpuacct` (usage).
        cpuacct: Option<PathBuf>,
        /// `memory`.
        memory: Option<PathBuf>,
        /// `pids`.
        pids: Option<PathBuf>,
        /// `blkio`.
        blkio: Option<PathBuf>,
    },
}

impl Hierarchy {
    /// What this host has: v2 when its mount offers cpu and memory, else the v1 mounts.
    pub fn detect() -> Option<Self> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        let v1 = |name: &str| -> Option<PathBuf> {
            mounts.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 4 && f[2] == "cgroup" && f[3].split(',').any(|o| o == name))
                    .then(|| PathBuf::from(f[1]))
            })
        };
        for l in mounts.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 3 && f[2] == "cgroup2" {
                let ctl = std::fs::read_to_string(Path::new(f[1]).join("cgroup.controllers"))
                    .unwrap_or_default();
                let has = |c: &str| ctl.split_whitespace().any(|x| x == c);
                if has("cpu") && has("memory") {
                    return Some(Self::V2(PathBuf::from(f[1])));
                }
            }
        }
        let h = Self::V1 {
            cpu: v1("cpu"),
            cpuacct: v1("cpuacct"),
            memory: v1("memory"),
            pids: v1("pids"),
            blkio: v1("blkio"),
        };
        match &h {
            Self::V1 {
                cpu: None,
                memory: None,
                ..
            } => None,
            _ => Some(h),
        }
    }

    /// The directories of the VM's cgroup, one per hierarchy (deduplicated for co-mounted v1
    /// controllers).
    fn dirs(&self, rel: &Path) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = match self {
            Self::V2(root) => vec![root.join(rel)],
            Self::V1 {
                cpu,
                cpuacct,
                memory,
                pids,
                blkio,
            } => [cpu, cpuacct, memory, pids, blkio]
                .into_iter()
                .flatten()
                .map(|m| m.join(rel))
                .collect(),
        };
        out.sort();
        out.dedup();
        out
    }

    /// Short name for logs and docs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::V2(_) => "v2",
            Self::V1 { .. } => "v1",
        }
    }
}

/// What [`favor_dynmods`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DynMods {
    /// The host's cgroup2 mount already had `favordynmods`.
    AlreadyOn(PathBuf),
    /// The agent remounted this cgroup2 mount with it.
    TurnedOn(PathBuf),
    /// It could not be turned on: why (no cgroup2 mount, an old kernel, not permitted).
    Unavailable(String),
}

/// One line of /proc/self/mountinfo, the fields used here.
struct MountLine<'a> {
    mount_point: String,
    mount_options: &'a str,
    fs_type: &'a str,
    super_options: &'a str,
}

/// A mountinfo path with its octal escapes (`\040` for a space...) undone.
fn unescape_mountinfo(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mountinfo_line(l: &str) -> Option<MountLine<'_>> {
    // "ID PARENT MAJ:MIN ROOT MOUNT_POINT MOUNT_OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS"
    let (head, tail) = l.split_once(" - ")?;
    let h: Vec<&str> = head.split(' ').collect();
    let t: Vec<&str> = tail.split(' ').collect();
    (h.len() >= 6 && t.len() >= 3).then(|| MountLine {
        mount_point: unescape_mountinfo(h[4]),
        mount_options: h[5],
        fs_type: t[0],
        super_options: t[2],
    })
}

/// The host's cgroup2 mount if it has `favordynmods` on.
pub fn favor_dynmods_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(mountinfo_line)
        .find(|m| m.fs_type == "cgroup2" && m.super_options.split(',').any(|o| o == "favordynmods"))
        .map(|m| PathBuf::from(m.mount_point))
}

/// The flags and data of a remount that adds `favordynmods` to a cgroup2 mount with these
/// per-mount and super-block options, changing nothing else; `Err` if that cannot be done.
///
/// A legacy remount sets the mount's flags from its arguments (so nosuid, nodev and noexec are
/// passed again; the atime mode is kept when none is given) and cgroup2 sets every root option
/// from its data (so `nsdelegate`, `memory_recursiveprot`... are passed again). A read-only
/// mount is refused: `MS_RDONLY` on a remount applies to the super block too, which is the
/// whole host's cgroup2, and a read-only view of it is not the agent's to change.
fn dynmods_remount(
    mount_options: &str,
    super_options: &str,
) -> Result<(nix::mount::MsFlags, String), String> {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::MS_REMOUNT;
    for o in mount_options.split(',') {
        flags |= match o {
            "rw" | "relatime" | "noatime" | "strictatime" | "nodiratime" => MsFlags::empty(),
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            other => {
                return Err(format!(
                    "the mount is {other}; the agent leaves it as it is"
                ))
            }
        };
    }
    let mut data: Vec<&str> = super_options
        .split(',')
        .filter(|o| !o.is_empty() && *o != "rw")
        .collect();
    if data.contains(&"ro") {
        return Err("the cgroup2 file system is read-only".into());
    }
    data.push("favordynmods");
    Ok((flags, data.join(",")))
}

/// Makes moving a process into a cgroup cheap, host-wide, with cgroup2's `favordynmods`
/// mount option (Linux 6.0+).
///
/// Why: every write to a `cgroup.procs` file takes `cgroup_threadgroup_rwsem` for writing,
/// and without the option that waits for an RCU grace period each time: 3-15 ms on this
/// 2-core host, 20 ms from the busy agent, so about ten times the jail's whole 2 ms budget
/// for a VM start. With it the write takes about 50 µs. The price, in the kernel's words, is
/// that forks and exits take the read side's slow path (a shared atomic instead of a per-CPU
/// counter): on a host whose work is long-lived VMMs that is not measurable, and it is the
/// trade the option exists for. The lock is one for all hierarchies, so the cgroup2 mount's
/// option speeds up v1 controllers too (this host's case).
///
/// The remount changes nothing else ([`dynmods_remount`]), and is checked: the kernel applies
/// root options only from the initial cgroup namespace and says nothing otherwise.
pub fn favor_dynmods() -> DynMods {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return DynMods::Unavailable("cannot read /proc/self/mountinfo".into());
    };
    let Some(m) = info
        .lines()
        .filter_map(mountinfo_line)
        .find(|m| m.fs_type == "cgroup2")
    else {
        return DynMods::Unavailable(
            "the host has no cgroup2 mount (a v1 hierarchy cannot change it on a remount)".into(),
        );
    };
    let target = PathBuf::from(&m.mount_point);
    if m.super_options.split(',').any(|o| o == "favordynmods") {
        return DynMods::AlreadyOn(target);
    }
    if info
        .lines()
        .filter_map(mountinfo_line)
        .filter(|x| x.mount_point == m.mount_point)
        .count()
        > 1
    {
        // A remount by path would change what is mounted on top, with this one's flags.
        return DynMods::Unavailable(format!("{} is mounted over", target.display()));
    }
    let features = std::fs::read_to_string("/sys/kernel/cgroup/features").unwrap_or_default();
    if !features.lines().any(|f| f.trim() == "favordynmods") {
        return DynMods::Unavailable("this kernel has no favordynmods (Linux 6.0+)".into());
    }
    let (flags, data) = match dynmods_remount(m.mount_options, m.super_options) {
        Ok(a) => a,
        Err(why) => return DynMods::Unavailable(why),
    };
    if let Err(e) = nix::mount::mount(
        None::<&str>,
        &target,
        None::<&str>,
        flags,
        Some(data.as_str()),
    ) {
        return DynMods::Unavailable(format!("remount {}: {e}", target.display()));
    }
    match favor_dynmods_mount() {
        Some(_) => DynMods::TurnedOn(target),
        None => DynMods::Unavailable(format!(
            "remounted {} but the option did not take (the agent is not in the initial cgroup \
             namespace?)",
            target.display()
        )),
    }
}

/// A VM's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per 100 ms period, µs.
    pub cpu_quota_us: u64,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Tasks (threads).
    pub pids: u64,
}

/// CFS period used for the quota, µs.
pub const CPU_PERIOD_US: u64 = 100_000;

impl Limits {
    /// The limits of a VM of `vcpus` and `memory_mib`: its vCPUs' worth of CPU plus a quarter
    /// of a CPU for its event loops; guest memory plus `headroom_mib`; a thread per vCPU plus
    /// room for the VMM's own.
    pub fn of(vcpus: u8, memory_mib: u64, headroom_mib: u64) -> Self {
        Self {
            cpu_quota_us: u64::from(vcpus) * CPU_PERIOD_US + CPU_PERIOD_US / 4,
            memory_bytes: (memory_mib + headroom_mib) << 20,
            pids: u64::from(vcpus) + PIDS_HEADROOM,
        }
    }
}

/// A cgroup error, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {err}")]
pub struct CgroupError {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    pub err: std::io::Error,
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|err| CgroupError {
            path: path.to_owned(),
            err,
        })
}

/// The cgroups of the agent's VMs.
#[derive(Debug, Clone)]
pub struct Cgroups {
    hierarchy: Hierarchy,
    parent: PathBuf,
}

/// A VM's cgroup, made and limited, with its `cgroup.procs` files open for the VMM to join.
#[derive(Debug)]
pub struct VmCgroup {
    /// Open `cgroup.procs` of each hierarchy: the child writes "0" to each before exec.
    pub procs: Vec<OwnedFd>,
}

impl VmCgroup {
    /// The raw descriptors, for the child between fork and exec.
    pub fn raw(&self) -> Vec<i32> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }
}

impl Cgroups {
    /// The agent's VM cgroups under `parent` in `hierarchy`: makes the parent (and, on v2,
    /// enables the controllers down to it).
    pub fn new(hierarchy: Hierarchy, parent: &Path) -> Result<Self, CgroupError> {
        let parent = parent.strip_prefix("/").unwrap_or(parent).to_path_buf();
        for d in hierarchy.dirs(&parent) {
            std::fs::create_dir_all(&d).map_err(|err| CgroupError {
                path: d.clone(),
                err,
            })?;
        }
        if let Hierarchy::V2(root) = &hierarchy {
            // A delegated subtree (systemd's Delegate=yes): a v2 cgroup with processes cannot
            // hand controllers down, so the agent moves itself into a leaf of its own cgroup.
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
                });
            if let Some(own) = own {
                let own = root.join(own.trim_start_matches('/'));
                if own != *root && root.join(&parent).starts_with(&own) {
                    let leaf = own.join("agent");
                    std::fs::create_dir_all(&leaf).map_err(|err| CgroupError {
                        path: leaf.clone(),
                        err,
                    })?;
                    write_file(&leaf.join("cgroup.procs"), "0")?;
                }
            }
            // Controllers are enabled top-down: every ancestor's subtree_control, the parent's
            // included (the VM cgroups below it get them).
            let mut at = root.clone();
            let mut chain = vec![at.clone()];
            for c in parent.components() {
                at = at.join(c);
                chain.push(at.clone());
            }
            let offered =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let want: Vec<String> = ["cpu", "memory", "pids", "io"]
                .into_iter()
                .filter(|c| offered.split_whitespace().any(|x| x == *c))
                .map(|c| format!("+{c}"))
                .collect();
            for d in chain {
                write_file(&d.join("cgroup.subtree_control"), &want.join(" "))?;
            }
        }
        Ok(Self { hierarchy, parent })
    }

    /// The hierarchy in use.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    fn rel(&self, id: &str) -> PathBuf {
        self.parent.join(format!("vm-{id}"))
    }

    /// Makes (or reuses) VM `id`'s cgroup with `limits`, and opens its `cgroup.procs` files.
    pub fn prepare(&self, id: &str, limits: Limits) -> Result<VmCgroup, CgroupError> {
        let rel = self.rel(id);
        for d in self.hierarchy.dirs(&rel) {
            std::fs::create_dir_all(&d).map_err(|err| CgroupError {
                path: d.clone(),
                err,
            })?;
        }
        match &self.hierarchy {
            Hierarchy::V2(root) => {
                let d = root.join(&rel);
                write_file(
                    &d.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?;
                write_file(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                // Guest memory must not be swapped behind the guest's back, and an OOM kill
                // takes the whole VM, not one of its threads.
                let _ = write_file(&d.join("memory.swap.max"), "0");
                let _ = write_file(&d.join("memory.oom.group"), "1");
                write_file(&d.join("pids.max"), &limits.pids.to_string())?;
            }
            Hierarchy::V1 {
                cpu, memory, pids, ..
            } => {
                if let Some(m) = cpu {
                    let d = m.join(&rel);
                    write_file(&d.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write_file(
                        &d.join("cpu.cfs_quota_us"),
                        &limits.cpu_quota_us.to_string(),
                    )?;
                }
                if let Some(m) = memory {
                    let d = m.join(&rel);
                    write_file(
                        &d.join("memory.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    )?;
                    let _ = write_file(&d.join("memory.swappiness"), "0");
                }
                if let Some(m) = pids {
                    write_file(&m.join(&rel).join("pids.max"), &limits.pids.to_string())?;
                }
            }
        }
        let mut procs = Vec::new();
        for d in self.hierarchy.dirs(&rel) {
            let p = d.join("cgroup.procs");
            let f = OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|err| CgroupError { path: p, err })?;
            procs.push(OwnedFd::from(f));
        }
        Ok(VmCgroup { procs })
    }

    /// Removes VM `id`'s cgroups; those still holding a process (the reaper that waits for
    /// KVM's teardown for a few ms) are retried for up to two seconds.
    pub async fn remove(&self, id: &str) {
        let dirs = self.hierarchy.dirs(&self.rel(id));
        for _ in 0..40 {
            let left: Vec<&PathBuf> = dirs
                .iter()
                .filter(|d| match std::fs::remove_dir(d) {
                    Ok(()) => false,
                    Err(e) => e.kind() != std::io::ErrorKind::NotFound,
                })
                .collect();
            if left.is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tracing::warn!(
            vm = id,
            "a cgroup of the VM could not be removed (still in use)"
        );
    }

    /// Removes the VM cgroups under the parent whose VM `known` does not know: what a delete
    /// left when its cgroups would not go in time (a process still in them after 2 s: the
    /// record goes anyway), or an agent with other records left. Called at start, before any
    /// change is taken; the parent is this agent's alone (two agents must not share one). One
    /// still holding a process stays, with a warning. Returns how many were removed.
    pub fn sweep(&self, known: impl Fn(&str) -> bool) -> usize {
        let mut removed = 0;
        for d in self.hierarchy.dirs(&self.parent) {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_prefix("vm-")) else {
                    continue;
                };
                if known(id) || !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                match std::fs::remove_dir(e.path()) {
                    Ok(()) => removed += 1,
                    Err(err) => tracing::warn!(
                        vm = id,
                        "{} belongs to no VM the agent knows and stays: {err}",
                        e.path().display()
                    ),
                }
            }
        }
        removed
    }

    /// Out-of-memory kills in VM `id`'s cgroup so far.
    pub fn oom_kills(&self, id: &str) -> u64 {
        let rel = self.rel(id);
        let (file, key) = match &self.hierarchy {
            Hierarchy::V2(root) => (root.join(&rel).join("memory.events"), "oom_kill"),
            Hierarchy::V1 {
                memory: Some(m), ..
            } => (m.join(&rel).join("memory.oom_control"), "oom_kill"),
            Hierarchy::V1 { .. } => return 0,
        };
        keyed(&std::fs::read_to_string(file).unwrap_or_default(), key).unwrap_or(0)
    }

    /// The memory limit of VM `id`'s cgroup, bytes.
    pub fn memory_limit(&self, id: &str) -> Option<u64> {
        let rel = self.rel(id);
        let file = match &self.hierarchy {
            Hierarchy::V2(root) => root.join(&rel).join("memory.max"),
            Hierarchy::V1 {
                memory: Some(m), ..
            } => m.join(&rel).join("memory.limit_in_bytes"),
            Hierarchy::V1 { .. } => return None,
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// What VM `id`'s cgroup has used.
    pub fn usage(&self, id: &str) -> Usage {
        let rel = self.rel(id);
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let num = |p: PathBuf| read(p).trim().parse::<u64>().ok();
        match &self.hierarchy {
            Hierarchy::V2(root) => {
                let d = root.join(&rel);
                let cpu = read(d.join("cpu.stat"));
                Usage {
                    cpu_ns: keyed(&cpu, "usage_usec").map(|u| u * 1000),
                    memory_bytes: num(d.join("memory.current")),
                    pids: num(d.join("pids.current")),
                    throttled_ns: keyed(&cpu, "throttled_usec").map(|u| u * 1000),
                }
            }
            Hierarchy::V1 {
                cpu,
                cpuacct,
                memory,
                pids,
                ..
            } => Usage {
                cpu_ns: cpuacct
                    .as_ref()
                    .and_then(|m| num(m.join(&rel).join("cpuacct.usage"))),
                memory_bytes: memory
                    .as_ref()
                    .and_then(|m| num(m.join(&rel).join("memory.usage_in_bytes"))),
                pids: pids
                    .as_ref()
                    .and_then(|m| num(m.join(&rel).join("pids.current"))),
                throttled_ns: cpu
                    .as_ref()
                    .and_then(|m| keyed(&read(m.join(&rel).join("cpu.stat")), "throttled_time")),
            },
        }
    }
}

/// What a VM's cgroup has used (each `None` where the host lacks the controller).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time, ns.
    pub cpu_ns: Option<u64>,
    /// Memory charged now, bytes.
    pub memory_bytes: Option<u64>,
    /// Tasks now.
    pub pids: Option<u64>,
    /// Time throttled by the CPU quota, ns.
    pub throttled_ns: Option<u64>,
}

/// The value of `key` in a "key value" per line file.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// Puts each descriptor `from` at its number `to` (the ready-made network namespace at
/// [`NETNS_FD`], the keeper's socket at [`KEEPER_FD`]), inherited across exec: run in the
/// child between fork and exec (after [`join_in_child`], whose descriptors it may cover).
/// Each is first copied above every target, so that no source is covered by another's target.
pub fn pass_fds_in_child(fds: &[(i32, i32)]) -> std::io::Result<()> {
    // No allocation between fork and exec: a fixed array, enough for what a VMM is passed.
    let mut tmp = [-1; 4];
    if fds.len() > tmp.len() {
        return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
    }
    let above = fds.iter().map(|(_, to)| *to).max().unwrap_or(0) + 1;
    for ((from, _), t) in fds.iter().zip(tmp.iter_mut()) {
        // SAFETY: fcntl on a descriptor of this process, async-signal-safe; the copy is
        // close-on-exec.
        *t = unsafe { libc::fcntl(*from, libc::F_DUPFD_CLOEXEC, above) };
        if *t < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for ((_, to), t) in fds.iter().zip(tmp) {
        // SAFETY: dup2 on descriptors of this process, async-signal-safe; `to` is made
        // without close-on-exec, so it is inherited.
        if unsafe { libc::dup2(t, *to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Joins the cgroups whose `cgroup.procs` descriptors are `fds`: run in the child between fork
/// and exec, so only async-signal-safe calls.
pub fn join_in_child(fds: &[i32]) -> std::io::Result<()> {
    for fd in fds {
        // SAFETY: write(2) of a two-byte static buffer to a descriptor the parent opened.
        let n = unsafe { libc::write(*fd, b"0\n".as_ptr().cast(), 2) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_read_past_their_optional_fields() {
        // systemd's cgroup2 mount (one optional field), and this host's (none).
        let l = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - \
                 cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot";
        let m = mountinfo_line(l).unwrap();
        assert_eq!(
            (
                m.mount_point.as_str(),
                m.mount_options,
                m.fs_type,
                m.super_options
            ),
            (
                "/sys/fs/cgroup",
                "rw,nosuid,nodev,noexec,relatime",
                "cgroup2",
                "rw,nsdelegate,memory_recursiveprot"
            )
        );
        let l = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(mountinfo_line(l).unwrap().super_options, "rw");
        assert!(mountinfo_line("41 31 0:38 / /x rw").is_none());
        let l = "50 31 0:38 / /srv/my\\040cgroups rw - cgroup2 cgroup2 rw";
        assert_eq!(mountinfo_line(l).unwrap().mount_point, "/srv/my cgroups");
    }

    #[test]
    fn the_favordynmods_remount_keeps_every_other_option_and_flag() {
        use nix::mount::MsFlags;
        // systemd's mount: its flags and root options are passed again.
        let (flags, data) = dynmods_remount(
            "rw,nosuid,nodev,noexec,relatime",
            "rw,nsdelegate,memory_recursiveprot",
        )
        .unwrap();
        assert_eq!(
            flags,
            MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
        );
        assert_eq!(data, "nsdelegate,memory_recursiveprot,favordynmods");
        // This host's.
        let (flags, data) = dynmods_remount("rw,relatime", "rw").unwrap();
        assert_eq!(
            (flags, data.as_str()),
            (MsFlags::MS_REMOUNT, "favordynmods")
        );
        // A read-only view (a remount would make the host's cgroup2 read-only), a flag the
        // remount could not keep, and a read-only super block: left alone.
        assert!(dynmods_remount("ro,nosuid,nodev,noexec,relatime", "rw").is_err());
        assert!(dynmods_remount("rw,nosymfollow", "rw").is_err());
        assert!(dynmods_remount("rw", "ro,nsdelegate").is_err());
    }

    #[test]
    fn limits_follow_the_vm() {
        let l = Limits::of(2, 256, 64);
        assert_eq!(l.cpu_quota_us, 225_000);
        assert_eq!(l.memory_bytes, 320 << 20);
        assert_eq!(l.pids, 258);
    }

    #[test]
    fn keyed_values_are_found() {
        let t = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(t, "oom_kill"), Some(3));
        assert_eq!(keyed(t, "missing"), None);
    }

    #[test]
    fn a_staged_snapshot_with_a_symlink_is_refused() {
        let base = std::env::temp_dir().join(format!("bexar-stage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let staged = base.join("staged");
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join("state.json"), b"{}").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", staged.join("memory")).unwrap();
        let dest = base.join("dest");
        assert!(adopt_staged(&staged, &dest).is_err());
        assert!(!dest.exists(), "a refused snapshot is not kept");
        let staged = base.join("staged2");
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join("state.json"), b"{}").unwrap();
        adopt_staged(&staged, &dest).unwrap();
        assert!(dest.join("state.json").is_file());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
