//! The VMM's sandbox: what a process gives up before its guest runs.
//!
//! The agent (or `bexar run`) arms a [`JailConfig`] with [`arm`]; the builder enters it in
//! [`enter_armed`] once every file, TAP and socket is open (and before it reads the kernel, a
//! disk image's metadata or a saved state) and before the first thread exists (new namespaces and a changed uid are per-thread in the kernel, so a second
//! thread would keep the host's). From then on the process:
//!
//! * lives in new mount, IPC, UTS and network namespaces: its network namespace holds only a
//!   down `lo` (its TAPs came in as descriptors, which keep working across the move);
//! * has the empty per-VM jail directory as its root (`pivot_root`, the old root detached), and
//!   the same directory as its working directory, so the relative paths it was given (the vsock
//!   socket, snapshot staging, its result) mean the same file before and after;
//! * runs as the VM's own unprivileged uid and gid with no supplementary groups, no capability in
//!   any set (the bounding and ambient sets cleared too), `no_new_privs`, and resource limits
//!   (open files, file size, no core dumps);
//! * has Landlock (where the kernel has it) restricting every path lookup to beneath the jail,
//!   a second fence should the first have a hole;
//! * then installs a seccomp filter per thread ([`crate::seccomp`]) as each thread starts.
//!
//! What the VMM needs of `/proc` afterwards (its own status and pagemap, for memory reports) is
//! opened here, before the root goes.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How a VMM process is jailed. Written by the agent into `launch.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// The VMM runs as uid and gid `uid_base + its pid`: unique among live processes without
    /// any allocation to keep, so two VMMs never share an identity. The range
    /// `[uid_base, uid_base + pid_max)` must belong to no one else on the host.
    pub uid_base: u32,
    /// The empty directory that becomes the root.
    pub root: PathBuf,
    /// The root is this VM's alone: the VMM makes its `out` directory its own (owner uid, mode
    /// 0700) to write its result and snapshots there; the root itself stays root's (mode 0711).
    /// A shared root (`bexar run`) stays read-only.
    #[serde(default)]
    pub own_root: bool,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
    /// RLIMIT_FSIZE in bytes: the largest file the VMM may write or grow (disk images and
    /// snapshot memory included). 0 means the builder sets it from the VM's memory and disks.
    #[serde(default)]
    pub max_file_bytes: u64,
    /// A new, empty network namespace. Off only for a VM whose remote disks (NBD, iSCSI) must
    /// be able to reconnect to their servers by themselves (`bexar run`; the agent's VMMs get
    /// their connections from the agent, `Launch::dialer`).
    #[serde(default = "yes")]
    pub network: bool,
    /// The TCP ports the VMM may connect to: its remote disks' servers'. Landlock (ABI 4,
    /// Linux 6.7+) refuses a connect to any other port and every bind, so a VMM that keeps the
    /// host's network (`network` off) reaches its storage servers' ports and no other service.
    /// Not in the launch file: the VMM sets it from its own disks as it arms the jail, so a
    /// launch written by an agent of another version cannot leave it without its ports.
    #[serde(skip)]
    pub tcp_ports: Vec<u16>,
    /// A network namespace made ahead of time, empty, this process's alone: its descriptor
    /// (inherited across exec). Joined instead of making one at start, the dearest part of
    /// the jail (about 0.5 ms here); `None` makes a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_fd: Option<i32>,
    /// A socket (inherited across exec) to which the VMM sends its VM's descriptor as soon as
    /// it has made the VM, so that the VM's last reference is dropped by whoever holds the
    /// other end, after this process has gone. Set by the agent, which starts the VMM as the
    /// first process of a PID namespace of its own: the exit of such a process waits until
    /// every other process of its namespace has gone, so the reaper child of
    /// [`crate::teardown`] would put KVM's teardown back into the VMM's exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keeper_fd: Option<i32>,
    /// Fork as the jail is entered, so that the VMM goes on as the first process of a new PID
    /// namespace while the parent waits outside it, holds the VM for its teardown and exits
    /// as the VMM did ([`crate::pid_ns`]). For `bexar run`, the process its caller waits for;
    /// the agent starts its VMMs in a namespace of their own instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fork_pid_namespace: bool,
    /// Host directories (absolute paths, which must exist) bound read-write at the same paths
    /// beneath the root before the jail enters it. For the fuzz targets, whose process is
    /// jailed as a VMM is while libFuzzer goes on writing its corpus and crash files; empty for
    /// every VMM, and not in the launch file.
    #[serde(skip)]
    pub binds: Vec<PathBuf>,
    /// Mount a `/proc` of this process's own in the root (`hidepid=invisible`: it shows the
    /// processes of this uid alone). For the fuzz targets, whose sanitizer lists the process's
    /// threads there; never for a VMM, and not in the launch file.
    #[serde(skip)]
    pub proc: bool,
    /// A file on which a mount namespace is kept whose only mount is `root` (read-only,
    /// nosuid, nodev, noexec), shared by every jail of this root: joined instead of making a
    /// mount namespace and pivoting into the root for each VMM. That costs about 1 ms here
    /// (the copy of the host's mount table, then its detach and again the namespace's end as
    /// the VMM exits, each waiting for an RCU grace period), joining about 50 µs. Made on
    /// first use ([`shared_mount_ns`]). For `bexar run`, whose VMMs share their empty root
    /// anyway; not with `binds`, `proc` or `own_root`; not in the launch file.
    #[serde(skip)]
    pub shared_mount_ns: Option<PathBuf>,
    /// Install the per-thread seccomp filters.
    #[serde(default = "yes")]
    pub seccomp: bool,
    /// Add Landlock where the kernel has it.
    #[serde(default = "yes")]
    pub landlock: bool,
}

impl JailConfig {
    /// A jail in `root` with the defaults: seccomp, Landlock, a new network namespace, 4096
    /// open files.
    pub fn new(uid_base: u32, root: PathBuf) -> Self {
        Self {
            uid_base,
            root,
            own_root: false,
            max_open_files: 4096,
            max_file_bytes: 0,
            network: true,
            tcp_ports: Vec::new(),
            netns_fd: None,
            keeper_fd: None,
            fork_pid_namespace: false,
            binds: Vec::new(),
            proc: false,
            shared_mount_ns: None,
            seccomp: true,
            landlock: true,
        }
    }

    /// The uid (and gid) this process gets: from its pid as the host sees it (in a PID
    /// namespace of its own every VMM is pid 1).
    pub fn uid(&self) -> u32 {
        self.uid_base.saturating_add(host_pid())
    }
}

static HOST_PID: AtomicU32 = AtomicU32::new(0);

/// This process's pid in the host's PID namespace (the one `/proc` is mounted from), which is
/// what the agent and the host's tools know it by. Learnt before the jail (from `/proc/self`,
/// which names the reader as the mount's namespace sees it) and kept.
pub fn host_pid() -> u32 {
    match HOST_PID.load(Ordering::Relaxed) {
        0 => learn_host_pid(),
        pid => pid,
    }
}

/// Reads this process's host pid afresh (a forked child's differs from its parent's); without
/// `/proc`, the pid this process knows itself by.
pub(crate) fn learn_host_pid() -> u32 {
    let pid = read_host_pid().unwrap_or_else(std::process::id);
    HOST_PID.store(pid, Ordering::Relaxed);
    pid
}

fn read_host_pid() -> Option<u32> {
    std::fs::read_link("/proc/self")
        .ok()?
        .to_str()?
        .parse()
        .ok()
}

/// The keeper's socket (see [`JailConfig::keeper_fd`]), until taken.
static KEEPER: AtomicI32 = AtomicI32::new(-1);

/// Takes the socket this process hands its VM to, if it has one: the agent's (named by the
/// jail) or the waiting parent's ([`crate::pid_ns`]). Once.
pub fn take_keeper() -> Option<OwnedFd> {
    match KEEPER.swap(-1, Ordering::Relaxed) {
        -1 => None,
        // SAFETY: the descriptor was handed to this process for this alone (by the agent,
        // across exec, or made by the fork) and is owned from here on; the swap takes it once.
        fd => Some(unsafe { OwnedFd::from_raw_fd(fd) }),
    }
}

/// Makes `fd` the socket this process hands its VM to (owned by the slot until taken).
pub(crate) fn set_keeper(fd: OwnedFd) {
    use std::os::fd::IntoRawFd;
    let old = KEEPER.swap(fd.into_raw_fd(), Ordering::Relaxed);
    if old >= 0 {
        // SAFETY: the slot owned the descriptor it held.
        drop(unsafe { OwnedFd::from_raw_fd(old) });
    }
}

/// Whether this process is the first of a PID namespace of its own (the agent starts every
/// jailed VMM so): it can name no process outside it, and none of the host's can be named
/// from inside.
pub fn own_pid_namespace() -> bool {
    std::process::id() == 1
}

/// The lowest first uid accepted: below it live the host's own users and groups.
pub const MIN_UID_BASE: u32 = 65_536;

/// The default first uid of the VMMs' range (2^30: far above any host's users and the
/// subordinate ranges container tools hand out by default).
pub const DEFAULT_UID_BASE: u32 = 1 << 30;

fn yes() -> bool {
    true
}

/// The jail could not be set up. The VM does not start: running it unjailed by surprise is
/// worse than not running it.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step failed.
    #[error("jail: {step}: {err}")]
    Step {
        /// Which step.
        step: &'static str,
        /// Why.
        err: std::io::Error,
    },
    /// Other threads exist already (they would stay outside the namespaces and keep root).
    #[error("jail: the process has {0} threads ({1}); it must be entered with one")]
    Threaded(u64, String),
    /// The configuration is refused.
    #[error("jail: {0}")]
    Config(String),
}

pub(crate) fn step(step: &'static str) -> impl FnOnce(std::io::Error) -> JailError {
    move |err| JailError::Step { step, err }
}

pub(crate) fn nix_step(step: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    move |e| JailError::Step {
        step,
        err: std::io::Error::from_raw_os_error(e as i32),
    }
}

/// What entering the jail cost, by layer (µs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct JailTimes {
    /// `bexar run`'s fork into a new PID namespace (0 for a VMM started in one).
    #[serde(default)]
    pub pid_namespace_us: u64,
    /// unshare of the mount, IPC, UTS and network namespaces (with the wait for a network
    /// namespace made ahead, if it was not ready).
    pub namespaces_us: u64,
    /// The private mount tree, bind and pivot_root.
    pub pivot_root_us: u64,
    /// Resource limits, uid/gid, capabilities and no_new_privs.
    pub drop_us: u64,
    /// Landlock (0 when off or not offered).
    pub landlock_us: u64,
    /// Whether Landlock is in force.
    pub landlock: bool,
    /// Building every thread kind's seccomp filters (once per process).
    #[serde(default)]
    pub seccomp_build_us: u64,
    /// Installing the main thread's filters (each thread installs its own as it starts).
    #[serde(default)]
    pub seccomp_install_us: u64,
}

static ARMED: OnceLock<JailConfig> = OnceLock::new();
static PIVOTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process's root is its jail's (from `pivot_root` on, even if a later step of
/// the jail failed): paths of the host mean nothing here any more.
pub fn in_jail_root() -> bool {
    PIVOTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the process `pid` has `root` as its root directory (compared by device and inode:
/// a jailed process's `/proc/PID/root` link reads "/", its own view after `pivot_root`).
pub fn is_root_of(pid: u32, root: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(a), Ok(b)) = (
        std::fs::metadata(format!("/proc/{pid}/root")),
        std::fs::metadata(root),
    ) else {
        return false;
    };
    a.dev() == b.dev() && a.ino() == b.ino()
}
static ENTERED: OnceLock<JailTimes> = OnceLock::new();

/// A network namespace being made for this process on a thread of its own
/// ([`make_netns_ahead`]), until the jail joins it.
static NETNS_AHEAD: std::sync::Mutex<Option<std::thread::JoinHandle<std::io::Result<OwnedFd>>>> =
    std::sync::Mutex::new(None);

/// Starts making the empty network namespace the jail joins, on a thread of its own, so that
/// the process builds its VM meanwhile: the namespace is the dearest part of the jail (about
/// 0.4 ms here, `benches/jail.rs`), and joining one made ahead takes about 0.1 ms. A thread
/// may unshare its network namespace alone; it hands the namespace over as a descriptor and
/// ends. The agent makes its VMMs' ahead of time itself (`JailConfig::netns_fd`).
fn make_netns_ahead() {
    match netns_on_thread() {
        Ok(h) => *bexar_util::sync::lock(&NETNS_AHEAD) = Some(h),
        Err(e) => tracing::debug!("no thread to make the network namespace ahead: {e}"),
    }
}

/// Starts a thread that makes a new, empty network namespace and ends, handing it over as a
/// descriptor (a thread may unshare its network namespace alone): for a jail's
/// ([`make_netns_ahead`]) and the agent's pool of namespaces made ahead.
pub fn netns_on_thread() -> std::io::Result<std::thread::JoinHandle<std::io::Result<OwnedFd>>> {
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(|| -> std::io::Result<OwnedFd> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(File::open("/proc/thread-self/ns/net")?.into())
        })
}

/// The mount namespace [`JailConfig::shared_mount_ns`] keeps, and the device and inode its
/// root must have, until the jail joins it.
#[allow(clippy::type_complexity)]
static SHARED_MNTNS: std::sync::Mutex<Option<(OwnedFd, (u64, u64))>> = std::sync::Mutex::new(None);

/// The mount namespace kept on `keep` whose only mount is `root` ([`JailConfig::shared_mount_ns`]),
/// with the device and inode of `root` it was made of: opened, or made and kept there first. A
/// mount namespace outlives its processes while bound to a file, as `ip netns` keeps network
/// namespaces: until `umount KEEP` or the host's reboot. `keep`'s directory is made a private
/// mount of its own first (the kernel refuses to bind a mount namespace where the mount would
/// propagate, as `/run` does on a systemd host). The lock file beside `keep` (`KEEP.lock`,
/// taken while one is made, so two first VMMs do not each bind one) says which directory it was
/// made of: one made of a `root` since replaced, or anything else bound on `keep`, is replaced.
pub fn shared_mount_ns(keep: &Path, root: &Path) -> std::io::Result<(OwnedFd, (u64, u64))> {
    use nix::fcntl::{Flock, FlockArg};
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let meta = std::fs::metadata(root)?;
    let id = (meta.dev(), meta.ino());
    let stamp = format!("{} {}\n", id.0, id.1);
    let dir = keep
        .parent()
        .ok_or_else(|| std::io::Error::other("no directory to keep the namespace in"))?;
    let lock_path = keep.with_extension("lock");
    if std::fs::read_to_string(&lock_path).is_ok_and(|s| s == stamp) {
        if let Kept::Mount(ns) = kept_mount_ns(keep)? {
            return Ok((ns, id));
        }
    }
    std::fs::create_dir_all(dir)?;
    // Not through a link: these are root's files, written and mounted over as root.
    if std::fs::symlink_metadata(dir)?.file_type().is_symlink() {
        return Err(std::io::Error::other(format!(
            "{} is a symbolic link",
            dir.display()
        )));
    }
    let lock = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)?;
    let mut lock = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
    // Again under the lock: a VMM that held it may have made it meanwhile.
    let mut made_of = String::new();
    lock.read_to_string(&mut made_of)?;
    match kept_mount_ns(keep)? {
        Kept::Mount(ns) if made_of == stamp => return Ok((ns, id)),
        Kept::Missing => {}
        // Made of a directory replaced since, or not a mount namespace at all.
        Kept::Mount(_) | Kept::Other => {
            umount2(keep, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)?
        }
    }
    private_mount_of(dir)?;
    let owned = root.to_owned();
    let ns = std::thread::Builder::new()
        .name("mntns".into())
        .spawn(move || mount_ns_of(&owned))?
        .join()
        .map_err(|_| std::io::Error::other("the thread making the mount namespace panicked"))??;
    // The file the namespace is bound on (an empty regular file, as `ip netns` makes), named
    // by its descriptor for the mount; opened after `dir` became a private mount, so that the
    // descriptor is on that mount.
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(keep)?;
    mount(
        Some(format!("/proc/self/fd/{}", ns.as_raw_fd()).as_str()),
        format!("/proc/self/fd/{}", file.as_raw_fd()).as_str(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    lock.set_len(0)?;
    lock.write_all_at(stamp.as_bytes(), 0)?;
    tracing::info!(
        "made the jail's shared mount namespace of {} (inode {}), kept on {}",
        root.display(),
        meta.ino(),
        keep.display()
    );
    Ok((ns, id))
}

/// Whether this process is in another mount namespace than its parent's. Such a process
/// (`ip netns exec` makes one as it starts its command, as do a systemd unit's `PrivateTmp=`
/// and a container's first process) is in a copy of the mounts it came from, where the kept
/// namespace is not bound (the kernel copies no mount of a mount namespace file): one made
/// there would die with that namespace and be made again by every run. False when it cannot
/// be told (no parent in this PID namespace, or a parent whose `/proc` entry is not readable:
/// `/proc/1` is not, here, even for root): the kept namespace is then tried as before.
fn in_copied_mount_ns() -> bool {
    let Some(parent) = bexar_util::procfs::self_parent().filter(|p| *p > 0) else {
        return false;
    };
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link(format!("/proc/{parent}/ns/mnt")),
    ) {
        (Ok(me), Ok(theirs)) => me != theirs,
        (me, theirs) => {
            tracing::debug!(
                "cannot compare this mount namespace with the parent's ({:?}, {:?})",
                me.err(),
                theirs.err()
            );
            false
        }
    }
}

/// What is on a [`shared_mount_ns`] file.
enum Kept {
    /// No file, or the plain file a first VMM made before it was killed.
    Missing,
    /// A mount namespace.
    Mount(OwnedFd),
    /// Another kind of namespace.
    Other,
}

fn kept_mount_ns(keep: &Path) -> std::io::Result<Kept> {
    use std::os::unix::fs::OpenOptionsExt;
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703; // _IO(0xb7, 0x3), linux/nsfs.h
    let f = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(keep)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Kept::Missing),
        Err(e) => return Err(e),
    };
    let fs = nix::sys::statfs::fstatfs(&f)?;
    if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Ok(Kept::Missing);
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor's namespace.
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    Ok(if kind == libc::CLONE_NEWNS {
        Kept::Mount(f.into())
    } else {
        Kept::Other
    })
}

/// Makes `dir` a mount of its own (bound on itself, unless it is one already) and private, so
/// that what is mounted beneath it propagates nowhere.
fn private_mount_of(dir: &Path) -> std::io::Result<()> {
    use nix::mount::{mount, MsFlags};
    if !is_mount_root(dir)? {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    }
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    Ok(())
}

/// Whether `dir` is the root of a mount (statx's STATX_ATTR_MOUNT_ROOT, Linux 5.8+).
fn is_mount_root(dir: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))?;
    // SAFETY: a zeroed statx is a valid value for the kernel to fill.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx of a NUL-terminated path into `st`, which outlives the call.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            0,
            &mut st,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if st.stx_attributes_mask & bit == 0 {
        return Err(std::io::Error::other(
            "the kernel does not say where mounts begin",
        ));
    }
    Ok(st.stx_attributes & bit != 0)
}

/// Makes, on the calling thread (which it leaves in it), a mount namespace whose only mount
/// is `root`, bound read-only, nosuid, nodev and noexec; returns it. The thread must be one
/// of its own: it leaves the host's mounts.
fn mount_ns_of(root: &Path) -> std::io::Result<OwnedFd> {
    use nix::mount::MsFlags;
    // CLONE_NEWNS unshares this thread's root and working directory from the process's too.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    let ns: OwnedFd = File::open("/proc/thread-self/ns/mnt")?.into();
    private_tree()?;
    bind_with(
        root,
        root,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )?;
    pivot_to(root)?;
    Ok(ns)
}

/// Makes every mount of the calling thread's (new) mount namespace private: nothing done to
/// mounts from then on reaches the host's namespace.
fn private_tree() -> nix::Result<()> {
    use nix::mount::{mount, MsFlags};
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
}

/// Binds `from` on `to` with `flags` (nosuid and the like), which a bind mount takes only on a
/// remount.
fn bind_with(from: &Path, to: &Path, flags: nix::mount::MsFlags) -> nix::Result<()> {
    use nix::mount::{mount, MsFlags};
    mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    mount(
        None::<&str>,
        to,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
}

/// Makes `root` the calling thread's root and working directory, with nothing of the old root
/// left: pivot_root(".", ".") stacks the old root on top of the new one, and detaching "."
/// then leaves the new root alone, with no directory needed for the old one.
fn pivot_to(root: &Path) -> nix::Result<()> {
    use nix::mount::{umount2, MntFlags};
    use nix::unistd::{chdir, pivot_root};
    chdir(root)?;
    pivot_root(".", ".")?;
    umount2(".", MntFlags::MNT_DETACH)?;
    chdir("/")
}

/// The namespace [`make_netns_ahead`] made, once its thread has ended; `None` if it made none
/// (the jail then makes one itself).
fn netns_made_ahead() -> Option<OwnedFd> {
    let h = bexar_util::sync::lock(&NETNS_AHEAD).take()?;
    match h.join() {
        Ok(Ok(fd)) => Some(fd),
        Ok(Err(e)) => {
            tracing::debug!("the network namespace made ahead: {e}");
            None
        }
        Err(_) => None,
    }
}

/// Arms the jail the builder enters before the first thread. Once per process.
pub fn arm(config: JailConfig) -> Result<(), JailError> {
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 22);
    if config.uid_base < MIN_UID_BASE || u64::from(config.uid_base) + pid_max >= u64::from(u32::MAX)
    {
        return Err(JailError::Config(format!(
            "uid_base {} must be at least {MIN_UID_BASE} and leave room for pid_max {pid_max} uids below 2^32-1",
            config.uid_base
        )));
    }
    if !config.root.is_absolute() {
        return Err(JailError::Config(format!(
            "root {} is not an absolute path",
            config.root.display()
        )));
    }
    // Learnt while /proc is still there; without it every VMM of a PID namespace of its own
    // would take the same uid.
    if read_host_pid().is_none() {
        return Err(JailError::Config(
            "cannot read /proc/self: this process's pid on the host is unknown".into(),
        ));
    }
    learn_host_pid();
    if let Some(fd) = config.keeper_fd {
        // SAFETY: the agent passed this descriptor for this process alone (launch.json).
        set_keeper(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    if config.network && config.netns_fd.is_none() {
        make_netns_ahead();
    }
    if let Some(keep) = &config.shared_mount_ns {
        if in_copied_mount_ns() {
            // (Made here for every VMM, it would cost more than the jail's own namespace, and
            // one bind in four failed with EINVAL under `ip netns exec` here.)
            tracing::debug!(
                "not in the parent's mount namespace: {} is not used",
                keep.display()
            );
        } else if config.binds.is_empty() && !config.proc && !config.own_root {
            match shared_mount_ns(keep, &config.root) {
                Ok(kept) => *bexar_util::sync::lock(&SHARED_MNTNS) = Some(kept),
                // The jail then makes its own, as the agent's VMMs do (about 1 ms dearer).
                Err(e) => tracing::warn!(
                    "no shared mount namespace at {}: {e}; this VMM makes its own",
                    keep.display()
                ),
            }
        }
    }
    ARMED
        .set(config)
        .map_err(|_| JailError::Config("armed twice".into()))
}

/// The armed jail, if any.
pub fn armed() -> Option<&'static JailConfig> {
    ARMED.get()
}

/// What entering the jail cost, once entered.
pub fn entered() -> Option<JailTimes> {
    ENTERED.get().copied()
}

/// ", in the jail" once the process has entered one, for log lines that say what was read
/// only then; empty otherwise.
pub fn in_jail() -> &'static str {
    if ENTERED.get().is_some() {
        ", in the jail"
    } else {
        ""
    }
}

/// What the sandbox cost so far: the jail's layers and the seccomp filters (`None` for a
/// process with neither).
pub fn times() -> Option<JailTimes> {
    let (build, install) = crate::seccomp::times_us();
    match ENTERED.get() {
        None if !crate::seccomp::armed() => None,
        t => Some(JailTimes {
            seccomp_build_us: build,
            seccomp_install_us: install,
            ..t.copied().unwrap_or_default()
        }),
    }
}

/// The remote disks' servers (host and port as the disks name them) the VMM opened, for
/// [`JailConfig::fork_pid_namespace`]: the waiting parent, which stays in the host's network
/// namespace, connects to these for the VMM, whose own namespace is empty. Set by the builder
/// from the disks it opened (the command line's, a snapshot's), just before the jail.
static DIAL_FOR: std::sync::Mutex<Vec<(String, u16)>> = std::sync::Mutex::new(Vec::new());

/// Names the servers of the remote disks this process opened ([`DIAL_FOR`]). Refused when
/// no one would connect them once jailed: the jail forks no waiting parent to dial, the
/// process has no dialer of its own, and its filters allow no TCP socket (a `bexar run
/// --restore` without `--disk` of a snapshot with remote disks, not forking): its first
/// reconnection would otherwise die of its filter.
pub fn dial_for(servers: Vec<(String, u16)>) -> Result<(), JailError> {
    let forks = ARMED
        .get()
        .is_some_and(|c| c.fork_pid_namespace && !own_pid_namespace());
    if !servers.is_empty()
        && !forks
        && !bexar_devices::block::remote::has_dialer()
        && !crate::seccomp::allows_tcp()
    {
        let names: Vec<String> = servers.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        return Err(JailError::Config(format!(
            "remote disks on {} could not reconnect in this jail (no one connects them for it \
             and its filter has no TCP socket): name them on the command line (--disk)",
            names.join(", ")
        )));
    }
    *bexar_util::sync::lock(&DIAL_FOR) = servers;
    Ok(())
}

/// Enters the armed jail (if armed and not yet entered). `file_bytes` is the RLIMIT_FSIZE to
/// use when the configuration leaves it to the builder.
pub fn enter_armed(file_bytes: u64) -> Result<Option<JailTimes>, JailError> {
    let Some(c) = ARMED.get() else {
        return Ok(None);
    };
    if let Some(t) = ENTERED.get() {
        return Ok(Some(*t));
    }
    let t = enter(c, file_bytes)?;
    let _ = ENTERED.set(t);
    tracing::info!(
        uid = c.uid(),
        pid = host_pid(),
        "jailed in {}{}: namespaces {} µs, pivot_root {} µs, drop {} µs, landlock {} µs ({})",
        c.root.display(),
        if own_pid_namespace() {
            ", first process of its own PID namespace"
        } else {
            ""
        },
        t.namespaces_us,
        t.pivot_root_us,
        t.drop_us,
        t.landlock_us,
        if t.landlock { "on" } else { "not offered" }
    );
    Ok(Some(t))
}

/// Files of `/proc/self` opened before the root went.
struct ProcSelf {
    status: File,
    pagemap: File,
}

static PROC_SELF: OnceLock<ProcSelf> = OnceLock::new();

/// `/proc/self/status` as text, read through the descriptor kept from before the jail.
pub fn proc_self_status() -> std::io::Result<String> {
    match PROC_SELF.get() {
        None => std::fs::read_to_string("/proc/self/status"),
        Some(p) => {
            // A seq file regenerates from offset 0; positioned reads leave no shared offset.
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            loop {
                if len == buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
                let n = p.status.read_at(&mut buf[len..], len as u64)?;
                if n == 0 {
                    break;
                }
                len += n;
            }
            buf.truncate(len);
            String::from_utf8(buf).map_err(std::io::Error::other)
        }
    }
}

/// `/proc/self/pagemap` (for positioned reads).
pub fn proc_self_pagemap() -> std::io::Result<File> {
    match PROC_SELF.get() {
        None => File::open("/proc/self/pagemap"),
        Some(p) => p.pagemap.try_clone(),
    }
}

/// How many threads this process has.
fn threads() -> u64 {
    bexar_util::procfs::self_status_kib("Threads:").unwrap_or(0)
}

/// How long the jail waits for threads on their way out (a disk library's helper that ended,
/// the kernel's io_uring workers of a ring just closed: a migration's receiver has both).
const THREADS_SETTLE: Duration = Duration::from_millis(500);

/// The names of this process's threads other than the caller's, for the error.
fn other_threads() -> String {
    // The thread's id as /proc names it ("PID/task/TID"): gettid says 1 in a PID namespace.
    let me = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy() != me)
                .map(|e| {
                    let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                    format!("{} {}", e.file_name().to_string_lossy(), comm.trim())
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.join(", ")
}

fn enter(c: &JailConfig, file_bytes: u64) -> Result<JailTimes, JailError> {
    use nix::sched::{unshare, CloneFlags};
    use nix::sys::resource::{setrlimit, Resource};
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

    // The filters' thread ends here, before the count of threads below.
    crate::seccomp::built()
        .map_err(|e| step("seccomp filters")(std::io::Error::other(e.to_string())))?;
    // Waiting for the namespace made ahead counts as the namespaces' cost.
    let joined = Instant::now();
    let netns_ahead = netns_made_ahead();
    let netns_wait = joined.elapsed();
    // Threads that are ending are waited for; one that stays is refused.
    let settle = Instant::now();
    let mut n = threads();
    while n != 1 && settle.elapsed() < THREADS_SETTLE {
        // A thread just joined (the network namespace's, the filters') is counted until its
        // exit ends a few microseconds later: short naps first.
        std::thread::sleep(if settle.elapsed() < Duration::from_millis(5) {
            Duration::from_micros(20)
        } else {
            Duration::from_millis(1)
        });
        n = threads();
    }
    if n != 1 {
        return Err(JailError::Threaded(n, other_threads()));
    }
    if settle.elapsed() > Duration::from_millis(5) {
        // Inside a migration's or handover's pause when the receiver is jailed: worth seeing.
        tracing::info!(
            "jail: waited {:.1} ms for threads to end",
            settle.elapsed().as_secs_f64() * 1e3
        );
    }
    let mut t = JailTimes::default();
    let us = |since: Instant| since.elapsed().as_micros() as u64;
    if c.fork_pid_namespace && !own_pid_namespace() {
        let t0 = Instant::now();
        // Returns in the child only (one thread: checked above).
        let dial_for = bexar_util::sync::lock(&DIAL_FOR).clone();
        crate::pid_ns::fork_into_new(c.uid_base, &dial_for)?;
        t.pid_namespace_us = us(t0);
    }
    if own_pid_namespace() {
        crate::pid_ns::end_on_signals();
    }
    let _ = PROC_SELF.set(ProcSelf {
        status: File::open("/proc/self/status").map_err(step("open /proc/self/status"))?,
        pagemap: File::open("/proc/self/pagemap").map_err(step("open /proc/self/pagemap"))?,
    });

    let uid = c.uid();
    if c.own_root {
        use std::os::unix::fs::PermissionsExt;
        let out = c.root.join(crate::launch::files::JAIL_OUT);
        std::os::unix::fs::lchown(&c.root, Some(0), Some(0)).map_err(step("chown the root"))?;
        std::fs::set_permissions(&c.root, std::fs::Permissions::from_mode(0o711))
            .map_err(step("chmod the root"))?;
        match std::fs::create_dir(&out) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(step("make the root's out directory")(e))
            }
            _ => {}
        }
        // Only root can make or replace entries of the root, so `out` is the directory made
        // here or by an earlier VMM of this VM, never a link.
        std::os::unix::fs::lchown(&out, Some(uid), Some(uid)).map_err(step("chown out"))?;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o700))
            .map_err(step("chmod out"))?;
    }
    let t0 = Instant::now();
    // Only for a jail whose root is the shared one's alone (no binds, no /proc, no `out`).
    let shared_mount_ns = bexar_util::sync::lock(&SHARED_MNTNS)
        .take()
        .filter(|_| c.binds.is_empty() && !c.proc && !c.own_root);
    let mut flags = CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if shared_mount_ns.is_none() {
        flags |= CloneFlags::CLONE_NEWNS;
    }
    match (c.network, c.netns_fd) {
        (true, Some(fd)) => {
            // SAFETY: the agent handed this descriptor over for this process alone; it is
            // owned here from now on and closed once joined.
            let ns = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(nix_step("join the network namespace"))?;
        }
        (true, None) => match netns_ahead {
            Some(ns) => nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(nix_step("join the network namespace made ahead"))?,
            None => flags |= CloneFlags::CLONE_NEWNET,
        },
        (false, fd) => {
            // SAFETY: as above; not needed, so closed.
            drop(fd.map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }));
        }
    }
    unshare(flags).map_err(nix_step("unshare"))?;
    t.namespaces_us = us(t0) + netns_wait.as_micros() as u64;

    let t0 = Instant::now();
    if let Some((ns, id)) = shared_mount_ns {
        use std::os::unix::fs::MetadataExt;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNS)
            .map_err(nix_step("join the jail's shared mount namespace"))?;
        // Joining put the root and the working directory at the namespace's root, which must
        // be the jail root: that directory, empty, read-only, nosuid, nodev and noexec.
        let bad = |why: &str| {
            let remedy = c
                .shared_mount_ns
                .as_deref()
                .map(|k| format!(" (umount {}: the next VMM makes it again)", k.display()))
                .unwrap_or_default();
            step("the shared mount namespace")(std::io::Error::other(format!("{why}{remedy}")))
        };
        let m = std::fs::metadata("/").map_err(step("stat the shared root"))?;
        if (m.dev(), m.ino()) != id {
            return Err(bad("its root is not the jail root"));
        }
        use nix::sys::statvfs::FsFlags;
        let want = FsFlags::ST_RDONLY | FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_NOEXEC;
        let vfs = nix::sys::statvfs::statvfs("/").map_err(nix_step("statvfs the shared root"))?;
        if !vfs.flags().contains(want) {
            return Err(bad("its root is not read-only, nosuid, nodev and noexec"));
        }
        if std::fs::read_dir("/")
            .map_err(step("list the shared root"))?
            .count()
            != 0
        {
            return Err(bad("its root is not empty"));
        }
        PIVOTED.store(true, std::sync::atomic::Ordering::Relaxed);
    } else {
        pivot_into(c)?;
    }
    t.pivot_root_us = us(t0);

    let t0 = Instant::now();
    let _ = nix::unistd::sethostname("bexar-vmm");
    // Never above the limit the VMM was started with (the agent's, which may be lower).
    let (_, hard) = nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(nix_step("RLIMIT_NOFILE"))?;
    let files = c.max_open_files.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, files, files).map_err(nix_step("RLIMIT_NOFILE"))?;
    let fsize = if c.max_file_bytes > 0 {
        c.max_file_bytes
    } else {
        file_bytes
    };
    setrlimit(Resource::RLIMIT_FSIZE, fsize, fsize).map_err(nix_step("RLIMIT_FSIZE"))?;
    // A write past the limit (a disk, the log) fails with EFBIG rather than killing the VMM.
    // SAFETY: SIG_IGN installs no handler code.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGXFSZ,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .map_err(nix_step("ignore SIGXFSZ"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(nix_step("RLIMIT_CORE"))?;
    // The bounding set needs CAP_SETPCAP to shrink: before the uid changes.
    caps::clear(None, caps::CapSet::Bounding)
        .map_err(|e| step("clear the bounding set")(std::io::Error::other(e.to_string())))?;
    setgroups(&[]).map_err(nix_step("setgroups"))?;
    let (g, u) = (Gid::from_raw(uid), Uid::from_raw(uid));
    setresgid(g, g, g).map_err(nix_step("setresgid"))?;
    // From uid 0 to another uid everywhere: the kernel clears the permitted and effective sets.
    setresuid(u, u, u).map_err(nix_step("setresuid"))?;
    for set in [
        caps::CapSet::Ambient,
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set)
            .map_err(|e| step("clear capabilities")(std::io::Error::other(e.to_string())))?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(nix_step("no_new_privs"))?;
    // After the uid changed, which clears a parent-death signal.
    crate::pid_ns::die_with_parent()?;
    t.drop_us = us(t0);

    if c.landlock {
        let t0 = Instant::now();
        t.landlock = landlock_beneath_root(&c.tcp_ports).map_err(step("landlock"))?;
        t.landlock_us = us(t0);
    }
    Ok(t)
}

/// Makes the calling process's (new) mount namespace private, binds the jail root nosuid and
/// nodev (with `binds` and `/proc` beneath it if asked) and pivots into it, leaving nothing of
/// the host's mounts.
fn pivot_into(c: &JailConfig) -> Result<(), JailError> {
    use nix::mount::{mount, MsFlags};
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    private_tree().map_err(nix_step("make / private"))?;
    let root: &Path = &c.root;
    bind_with(root, root, nosuid_nodev).map_err(nix_step("bind the jail root nosuid,nodev"))?;
    for b in &c.binds {
        let inside = root.join(b.strip_prefix("/").unwrap_or(b));
        std::fs::create_dir_all(&inside).map_err(step("make a bound directory's place"))?;
        bind_with(b, &inside, nosuid_nodev)
            .map_err(nix_step("bind a directory into the jail nosuid,nodev"))?;
    }
    if c.proc {
        let at = root.join("proc");
        std::fs::create_dir_all(&at).map_err(step("make /proc's place"))?;
        mount(
            Some("proc"),
            &at,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("hidepid=invisible"),
        )
        .map_err(nix_step("mount /proc in the jail"))?;
    }
    pivot_to(root).map_err(nix_step("pivot_root into the jail root"))?;
    PIVOTED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Confines the calling thread alone, as far as one thread can be confined without the rest
/// of its process: no capabilities (every set, the bounding one included), no_new_privs, no
/// file reachable by path (a Landlock ruleset with no rule, where the kernel has Landlock),
/// and `kind`'s seccomp filter (built by [`crate::seccomp::arm`] first). Namespaces, the root
/// and the uid belong to the whole process and are left alone.
///
/// For the fuzz targets: they run device code on such a thread, under the filter of the VMM
/// thread that runs that code, so a system call the filter lacks is found by the fuzzer
/// rather than in a tenant's VM, and a device that tries to open a path fails as it would in
/// the jail.
pub fn confine_thread(kind: crate::threads::ThreadKind) -> Result<(), JailError> {
    use landlock::{Access, AccessFs, Ruleset, RulesetAttr, ABI};
    let caps_err = |e: caps::errors::CapsError| std::io::Error::other(e.to_string());
    // The bounding set shrinks only with CAP_SETPCAP; a thread without it has none to use.
    if caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false)
    {
        caps::clear(None, caps::CapSet::Bounding).map_err(|e| step("bounding set")(caps_err(e)))?;
    }
    for set in [
        caps::CapSet::Ambient,
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| step("capabilities")(caps_err(e)))?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(nix_step("no_new_privs"))?;
    Ruleset::default()
        .handle_access(AccessFs::from_all(ABI::V3))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map_err(|e| step("landlock")(std::io::Error::other(e.to_string())))?;
    crate::seccomp::install(kind).map_err(|e| step("seccomp")(std::io::Error::other(e.to_string())))
}

/// Confines `bexar run`'s waiting parent ([`crate::pid_ns`]), which stays in the host's
/// namespaces and gave up root already: no capability in any set, no file by path (Landlock, a
/// ruleset with no rule), TCP only to connect to `tcp_ports` (its remote disks' servers, for
/// the VMM), and its own seccomp filter ([`crate::seccomp::install_waiter`]).
pub(crate) fn confine_waiter(tcp_ports: &[u16]) -> Result<(), JailError> {
    use landlock::{
        Access, AccessFs, AccessNet, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr, ABI,
    };
    // Each layer is put in place even if one before failed; the first failure is returned.
    let mut first = Ok(());
    for set in [
        caps::CapSet::Ambient,
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        if let Err(e) = caps::clear(None, set) {
            first = first.and(Err(step("clear capabilities")(std::io::Error::other(
                e.to_string(),
            ))));
        }
    }
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        first = first.and(Err(nix_step("no_new_privs")(e)));
    }
    let landlock = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI::V3))
        .and_then(|r| r.handle_access(AccessNet::from_all(ABI::V4)))
        .and_then(|r| r.create())
        .and_then(|r| {
            r.add_rules(
                tcp_ports
                    .iter()
                    .map(|&p| Ok(NetPort::new(p, AccessNet::ConnectTcp))),
            )
        })
        .and_then(|r| r.restrict_self());
    if let Err(e) = landlock {
        first = first.and(Err(step("landlock")(std::io::Error::other(e.to_string()))));
    }
    let filter = crate::seccomp::install_waiter(!tcp_ports.is_empty())
        .map_err(|e| step("seccomp")(std::io::Error::other(e.to_string())));
    first.and(filter)
}

/// Restricts every path this process opens from now on to beneath its (new) root, and its TCP
/// to connecting to `tcp_ports` (no bind, no other port; none at all for an empty list) where
/// the kernel has Landlock's network rules (ABI 4). Returns whether the kernel enforces it
/// (false on a kernel without Landlock).
fn landlock_beneath_root(tcp_ports: &[u16]) -> std::io::Result<bool> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, AccessNet, NetPort, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, ABI,
    };
    let fs = AccessFs::from_all(ABI::V3);
    let status = Ruleset::default()
        .handle_access(fs)
        .and_then(|r| r.handle_access(AccessNet::from_all(ABI::V4)))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(["/"], fs)))
        .and_then(|r| {
            r.add_rules(
                tcp_ports
                    .iter()
                    .map(|&p| Ok(NetPort::new(p, AccessNet::ConnectTcp))),
            )
        })
        .and_then(|r| r.restrict_self())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(status.ruleset != RulesetStatus::NotEnforced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// What a thread that joins mount namespace `ns` sees: its root's device and inode, and
    /// how many entries are beneath it.
    fn inside(ns: &OwnedFd) -> ((u64, u64), usize) {
        let ns = ns.try_clone().unwrap();
        std::thread::spawn(move || {
            // A thread shares its root with the process until it unshares it.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            let m = std::fs::metadata("/").unwrap();
            ((m.dev(), m.ino()), std::fs::read_dir("/").unwrap().count())
        })
        .join()
        .unwrap()
    }

    /// `bexar run`'s shared mount namespace: made once, its only mount the (empty, read-only)
    /// root; the same one on the next call; made anew once the root directory is replaced or
    /// something else is bound on its file. Its directory lies on a shared mount with a peer
    /// in another mount namespace, as `/run` on a systemd host.
    #[test]
    fn the_shared_mount_namespace_is_the_root_alone_and_follows_a_replaced_root() {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (mount namespaces)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("bexar-mntns-test-{}", std::process::id()));
        let root = dir.join("empty");
        let keep = dir.join("ns/empty.mntns");
        std::fs::create_dir_all(&root).unwrap();
        /// Unmounts what the test mounted, also when it fails.
        struct Cleanup(PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                for p in [
                    self.0.join("ns/empty.mntns"),
                    self.0.join("ns"),
                    self.0.clone(),
                ] {
                    while nix::mount::umount2(&p, MntFlags::MNT_DETACH).is_ok() {}
                }
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(dir.clone());
        // The test's directory made a shared mount, with a peer kept alive by a namespace.
        mount(
            Some(&dir),
            &dir,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        mount(
            None::<&str>,
            &dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .unwrap();
        let peer: OwnedFd = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            OwnedFd::from(File::open("/proc/thread-self/ns/mnt").unwrap())
        })
        .join()
        .unwrap();
        let id = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        let ns_id = |f: &OwnedFd| File::from(f.try_clone().unwrap()).metadata().unwrap().ino();
        let (first, made_of) = shared_mount_ns(&keep, &root).unwrap();
        assert_eq!(made_of, id(&root));
        let (seen, entries) = inside(&first);
        assert_eq!(seen, id(&root), "the namespace's root is the jail root");
        assert_eq!(entries, 0);
        // Its mount table, as the kernel lists it for a thread in it: the root alone.
        let ns = first.try_clone().unwrap();
        let table = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).unwrap();
            let proc_dir = File::open("/proc").unwrap();
            let tid = nix::unistd::gettid();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            // /proc is gone from this thread's view: read through the directory opened before.
            let fd = nix::fcntl::openat(
                &proc_dir,
                format!("self/task/{tid}/mountinfo").as_str(),
                nix::fcntl::OFlag::O_RDONLY,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
            std::io::read_to_string(File::from(fd)).unwrap()
        })
        .join()
        .unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 1, "{table}");
        for opt in ["ro", "nosuid", "nodev", "noexec"] {
            assert!(
                lines[0]
                    .split_whitespace()
                    .nth(5)
                    .unwrap()
                    .split(',')
                    .any(|o| o == opt),
                "{opt}: {table}"
            );
        }
        // Kept: the next call joins the same namespace.
        let (again, _) = shared_mount_ns(&keep, &root).unwrap();
        assert_eq!(ns_id(&again), ns_id(&first));
        // The root replaced (removed and made again): a namespace of the new one.
        std::fs::remove_dir(&root).unwrap();
        std::fs::create_dir(&root).unwrap();
        let (remade, made_of) = shared_mount_ns(&keep, &root).unwrap();
        assert_ne!(ns_id(&remade), ns_id(&first));
        assert_eq!((inside(&remade).0, made_of), (id(&root), id(&root)));
        // A network namespace bound there instead (with the right stamp): replaced too.
        umount2(&keep, MntFlags::MNT_DETACH).unwrap();
        mount(
            Some("/proc/self/ns/net"),
            &keep,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let (fixed, _) = shared_mount_ns(&keep, &root).unwrap();
        assert_eq!(inside(&fixed).0, id(&root));
        drop(peer);
    }
}
