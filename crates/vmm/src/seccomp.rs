//! seccomp filters, one per thread kind, built with rust-vmm's `seccompiler`.
//!
//! Each thread installs its kind's filter itself ([`install`]): a vCPU or the virtio loop as the
//! first thing its body does ([`crate::threads::spawn`]), the main thread once the VM is built
//! and every other thread exists (a filter is inherited by threads made later, and filters
//! stack, so the main thread's would otherwise narrow the others'). No guest instruction runs
//! before all of them are in place: the vCPUs only run once the main thread resumes them.
//!
//! A call outside the list traps (`SIGSYS`); [`sigsys_handler`] writes the call's number and
//! name to standard error (the VMM's log) and to the fault file the VMM opened before its jail
//! (`DIR/vmm.fault`, read by the agent), then lets the signal kill the process. `clone3` is
//! answered with ENOSYS instead, so the C library falls back to `clone`, whose flags a filter
//! can read: only the main thread may make a process (the reaper, [`crate::teardown`]); the
//! others may make threads only.
//!
//! The lists were taken from `strace -f` of the test guest's device, snapshot, network, vsock
//! and hostile runs, thread by thread, and are kept by the whole test suite running jailed.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::threads::ThreadKind;

/// A filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Building the BPF program failed (a bug in the lists).
    #[error("seccomp filter for {kind}: {err}")]
    Build {
        /// The thread kind.
        kind: String,
        /// Why.
        err: String,
    },
    /// The kernel refused it.
    #[error("cannot install the seccomp filter for {kind}: {err}")]
    Install {
        /// The thread kind.
        kind: String,
        /// Why.
        err: String,
    },
}

/// The filters (or why they could not be built), once built after the jail was armed with
/// seccomp on. An error stays: every later install fails too, none goes on unfiltered.
static FILTERS: OnceLock<Result<Filters, String>> = OnceLock::new();

pub(crate) struct Filters {
    vmm: Vec<BpfProgram>,
    vcpu: Vec<BpfProgram>,
    virtio: Vec<BpfProgram>,
}

/// Where the SIGSYS handler records a violation (-1: nowhere but standard error).
static FAULT_FD: AtomicI32 = AtomicI32::new(-1);

/// Builds every kind's filter and installs the SIGSYS handler; later [`install`] calls apply
/// them. `fault` is the file a violation is recorded in; `inet`: the VMM has remote disks
/// (TCP sockets allowed, for their reconnection).
///
/// The filters are built on a thread of their own (about 0.15 ms here, while the VMM opens
/// what it needs and asks KVM what it supports), joined by [`built`] before the first use.
pub fn arm(fault: Option<OwnedFd>, inet: bool) -> Result<(), SeccompError> {
    INET.store(inet, Ordering::Relaxed);
    if let Some(fd) = fault {
        // Kept open for the process's life: the handler may need it at any moment.
        FAULT_FD.store(fd.as_raw_fd(), Ordering::Relaxed);
        std::mem::forget(fd);
    }
    install_handler();
    let build_all = move || -> Result<Filters, SeccompError> {
        let t = std::time::Instant::now();
        let f = Filters {
            vmm: build(ThreadKind::Vmm, inet)?,
            vcpu: build(ThreadKind::Vcpu(0), inet)?,
            virtio: build(ThreadKind::Virtio, inet)?,
        };
        BUILD_US.store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(f)
    };
    let mut building = bexar_util::sync::lock(&BUILDING);
    ARMED.store(true, Ordering::Relaxed);
    match std::thread::Builder::new()
        .name("seccomp-build".into())
        .spawn(build_all)
    {
        Ok(h) => *building = Some(h),
        Err(e) => {
            tracing::debug!("no thread to build the seccomp filters on: {e}");
            let _ = FILTERS.set(build_all().map_err(|e| e.to_string()));
        }
    }
    Ok(())
}

/// Set by [`arm`]: filters are (being) built, and each thread installs its own.
static ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The thread building the filters ([`arm`]), until [`built`] joins it.
#[allow(clippy::type_complexity)]
static BUILDING: std::sync::Mutex<Option<std::thread::JoinHandle<Result<Filters, SeccompError>>>> =
    std::sync::Mutex::new(None);

/// The armed filters, once their thread has built them (waited for here): `None` if none are
/// armed. The jail calls this before it checks that the process has one thread left.
pub(crate) fn built() -> Result<Option<&'static Filters>, SeccompError> {
    let done = |r: &'static Result<Filters, String>| {
        r.as_ref().map(Some).map_err(|e| SeccompError::Build {
            kind: "every thread".into(),
            err: e.clone(),
        })
    };
    if let Some(r) = FILTERS.get() {
        return done(r);
    }
    let mut building = bexar_util::sync::lock(&BUILDING);
    if let Some(h) = building.take() {
        let r = h
            .join()
            .unwrap_or_else(|_| {
                Err(SeccompError::Build {
                    kind: "every thread".into(),
                    err: "the thread building the filters panicked".into(),
                })
            })
            .map_err(|e| e.to_string());
        let _ = FILTERS.set(r);
    }
    match FILTERS.get() {
        Some(r) => done(r),
        // Armed, yet neither built nor building: refused rather than run unfiltered.
        None if armed() => Err(SeccompError::Build {
            kind: "every thread".into(),
            err: "armed but never built".into(),
        }),
        None => Ok(None),
    }
}

static BUILD_US: AtomicU64 = AtomicU64::new(0);
static MAIN_INSTALL_US: AtomicU64 = AtomicU64::new(0);

/// What building the filters and installing the main thread's took, µs.
pub fn times_us() -> (u64, u64) {
    (
        BUILD_US.load(Ordering::Relaxed),
        MAIN_INSTALL_US.load(Ordering::Relaxed),
    )
}

/// Whether the armed filters let the VMM make TCP sockets (its remote disks' reconnections).
static INET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process may connect its remote disks itself: no filters armed, or armed with
/// TCP sockets.
pub fn allows_tcp() -> bool {
    !armed() || INET.load(Ordering::Relaxed)
}

/// Whether filters are armed (and so installed by each thread).
pub fn armed() -> bool {
    ARMED.load(Ordering::Relaxed)
}

/// Installs `kind`'s filter on the calling thread, if filters are armed.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(f) = built()? else {
        return Ok(());
    };
    let prog = match kind {
        ThreadKind::Vmm => &f.vmm,
        ThreadKind::Vcpu(_) => &f.vcpu,
        ThreadKind::Virtio => &f.virtio,
    };
    let t = std::time::Instant::now();
    for p in prog {
        seccompiler::apply_filter(p.as_slice()).map_err(|e| SeccompError::Install {
            kind: kind.to_string(),
            err: e.to_string(),
        })?;
    }
    if kind == ThreadKind::Vmm {
        MAIN_INSTALL_US.store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Installs the filter of `bexar run`'s waiting parent ([`crate::pid_ns`]) on the calling
/// thread, if filters are armed: it waits for its child, forwards signals to it, receives the
/// VM and forks the reaper for it; with `dialing`, a thread it starts next also connects the
/// VMM's remote disks to their servers (the filter is the whole process's: the thread inherits
/// it). No file is opened (an open fails with EACCES, for a library that copes), no socket but
/// a TCP one when dialing, no namespace.
pub(crate) fn install_waiter(dialing: bool) -> Result<(), SeccompError> {
    if !armed() {
        return Ok(());
    }
    let kind = "waiting parent";
    let mut rules = BTreeMap::new();
    add(&mut rules, BASICS);
    add(&mut rules, WAITER);
    if dialing {
        add(&mut rules, DIALING);
        // TCP alone: AF_INET or AF_INET6, SOCK_STREAM (with its flags), never a Unix socket.
        let stream = |family: i32| {
            rule(vec![
                cond(0, Len::Dword, Op::Eq, family as u64),
                cond(
                    1,
                    Len::Dword,
                    Op::MaskedEq(!((libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u32) as u64),
                    libc::SOCK_STREAM as u64,
                ),
            ])
        };
        rules.insert(
            libc::SYS_socket,
            vec![stream(libc::AF_INET), stream(libc::AF_INET6)],
        );
        let req = |v: u64| rule(vec![cond(1, Len::Dword, Op::Eq, v)]);
        rules.insert(
            libc::SYS_ioctl,
            vec![req(libc::FIONBIO), req(libc::FIOCLEX)],
        );
    }
    // A process (the reaper) or a thread (the dialer), in no new namespace.
    rules.insert(libc::SYS_clone, clone_rules(ThreadKind::Vmm));
    rules.insert(libc::SYS_prctl, prctl_rules());
    let programs = programs(
        kind,
        rules,
        &[
            (libc::SYS_clone3, libc::ENOSYS),
            (libc::SYS_openat, libc::EACCES),
        ],
    )?;
    for p in &programs {
        seccompiler::apply_filter(p.as_slice()).map_err(|e| SeccompError::Install {
            kind: kind.into(),
            err: e.to_string(),
        })?;
    }
    Ok(())
}

/// The waiting parent's calls beyond [`BASICS`]: signals to the child (forwarded, Ctrl+Z
/// relayed), the wait, receiving the VM, the reaper's fork (pidfd, pipe, `close_range` in the
/// child) and its own end by the child's signal (the core limit).
const WAITER: &[i64] = &[
    libc::SYS_kill,
    libc::SYS_recvmsg,
    libc::SYS_wait4,
    libc::SYS_pidfd_open,
    libc::SYS_pipe2,
    libc::SYS_close_range,
    libc::SYS_prlimit64,
];

/// The waiting parent's dialer thread: TCP connects with a timeout, the exchange with the VMM.
const DIALING: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
];

/// Allowed for every VMM thread beyond [`BASICS`]: vectored and positioned I/O on descriptors
/// it has, event loops, timers, io_uring.
const COMMON: &[i64] = &[
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_dup,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_mremap,
    libc::SYS_sched_yield,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_io_uring_enter,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// What any thread of any Bexar process under a filter needs (in [`COMMON`] and [`WAITER`]'s
/// lists both): reading and writing descriptors it has, memory, futexes, signals, time, a
/// thread's start, and its end.
const BASICS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_sched_getaffinity,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_restart_syscall,
    // Only ever narrows (seccompiler's install; a filter stacked later can only refuse more).
    libc::SYS_seccomp,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// A vCPU's: the serial console's output to a console socket, and the shut-down of a client
/// that went away or fell behind (found by the vCPU's own write: a detached `bexar vm
/// attach` killed the VMM at the guest's next console line before `shutdown` was here).
const VCPU: &[i64] = &[libc::SYS_sendto, libc::SYS_sendmsg, libc::SYS_shutdown];

/// The virtio loop's and remote disks' sockets (TAPs, vsock, NBD and iSCSI connections), and
/// the disk backends' file calls.
const IO: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    // A connection of its own for each request to `bexar run`'s dialer (Unix sockets only).
    libc::SYS_socketpair,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_sync_file_range,
];

/// The main thread's own: the control socket (with descriptors passed), snapshots and
/// handovers written beneath the jail, the reaper.
const MAIN: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_mkdirat,
    libc::SYS_mkdir,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rename,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_getdents64,
    libc::SYS_memfd_create,
    libc::SYS_pipe2,
    libc::SYS_pidfd_open,
    libc::SYS_close_range,
    libc::SYS_prlimit64,
    libc::SYS_readlink,
    libc::SYS_wait4,
    libc::SYS_sched_setaffinity,
];

fn add(rules: &mut BTreeMap<i64, Vec<SeccompRule>>, calls: &[i64]) {
    for c in calls {
        rules.insert(*c, Vec::new());
    }
}

fn cond(arg: u8, len: Len, op: Op, val: u64) -> SeccompCondition {
    // The conditions here are constants of this file: a failure is a bug caught by the tests.
    SeccompCondition::new(arg, len, op, val).expect("a valid seccomp condition")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).expect("a non-empty seccomp rule")
}

/// `ioctl`: KVM's requests (type 0xAE) on every thread; the two TUN requests a NIC makes when
/// the guest activates it (from a vCPU's MMIO write, or the main thread's restore); and, for
/// the main thread, the terminal requests of a stdio console.
fn ioctl_rules(kind: ThreadKind) -> Vec<SeccompRule> {
    use bexar_devices::tap::{TUNSETOFFLOAD, TUNSETVNETHDRSZ};
    let req = |op: Op, v: u64| rule(vec![cond(1, Len::Dword, op, v)]);
    let mut rules = vec![
        req(Op::MaskedEq(0xff00), 0xAE << 8),
        req(Op::Eq, TUNSETOFFLOAD()),
        req(Op::Eq, TUNSETVNETHDRSZ()),
        // Sockets made non-blocking (a remote disk's reconnection) and close-on-exec.
        req(Op::Eq, libc::FIONBIO),
        req(Op::Eq, libc::FIOCLEX),
    ];
    if kind == ThreadKind::Vmm {
        for r in [libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TIOCGWINSZ] {
            rules.push(req(Op::Eq, r));
        }
    }
    rules
}

/// Every `CLONE_NEW*` flag: an unprivileged process may still make a user namespace, and with
/// it the capabilities of that namespace (netlink, nftables: a wide kernel surface).
const CLONE_NEW_ANY: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64
    | 0x80; // CLONE_NEWTIME

/// `clone` with no new namespace: a thread (CLONE_THREAD) anywhere, a process (the reaper)
/// only from the main thread.
fn clone_rules(kind: ThreadKind) -> Vec<SeccompRule> {
    let no_new_ns = cond(0, Len::Qword, Op::MaskedEq(CLONE_NEW_ANY), 0);
    match kind {
        ThreadKind::Vmm => vec![rule(vec![no_new_ns])],
        _ => vec![rule(vec![
            no_new_ns,
            cond(
                0,
                Len::Qword,
                Op::MaskedEq(libc::CLONE_THREAD as u64),
                libc::CLONE_THREAD as u64,
            ),
        ])],
    }
}

/// `socket` for Unix sockets (vsock's host side), and for TCP only in a VMM with remote disks
/// (their reconnection); no other family (netlink, packet, AF_VSOCK, AF_ALG...).
fn socket_rules(inet: bool) -> Vec<SeccompRule> {
    let mut families = vec![libc::AF_UNIX];
    if inet {
        families.extend([libc::AF_INET, libc::AF_INET6]);
    }
    families
        .into_iter()
        .map(|f| rule(vec![cond(0, Len::Dword, Op::Eq, f as u64)]))
        .collect()
}

/// `prctl` for thread names (the C library and std set them) and for no_new_privs, which
/// `seccompiler` sets before each filter it installs (a thread installs two).
fn prctl_rules() -> Vec<SeccompRule> {
    [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_SET_NO_NEW_PRIVS,
    ]
    .into_iter()
    .map(|op| rule(vec![cond(0, Len::Dword, Op::Eq, op as u64)]))
    .collect()
}

/// The allow-list of `kind`; `inet`: the VMM has remote disks.
fn rules_of(kind: ThreadKind, inet: bool) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = BTreeMap::new();
    add(&mut rules, BASICS);
    add(&mut rules, COMMON);
    match kind {
        ThreadKind::Vcpu(_) => add(&mut rules, VCPU),
        ThreadKind::Virtio => {
            add(&mut rules, IO);
            rules.insert(libc::SYS_socket, socket_rules(inet));
        }
        ThreadKind::Vmm => {
            add(&mut rules, IO);
            add(&mut rules, MAIN);
            rules.insert(libc::SYS_socket, socket_rules(inet));
        }
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules(kind));
    rules.insert(libc::SYS_clone, clone_rules(kind));
    rules.insert(libc::SYS_prctl, prctl_rules());
    rules
}

fn build(kind: ThreadKind, inet: bool) -> Result<Vec<BpfProgram>, SeccompError> {
    // Answered with an error rather than a kill:
    // * clone3: its flags sit behind a pointer, so no filter can tell a thread from a process;
    //   ENOSYS makes the C library fall back to clone, whose flags the list checks;
    // * openat outside the main thread: the C library's malloc opens
    //   /proc/sys/vm/overcommit_memory the first time a thread's arena shrinks, and copes with
    //   a failure; nothing else on those threads opens files.
    let mut errors = vec![(libc::SYS_clone3, libc::ENOSYS)];
    if kind != ThreadKind::Vmm {
        errors.push((libc::SYS_openat, libc::EACCES));
    }
    programs(&kind.to_string(), rules_of(kind, inet), &errors)
}

/// The program of a filter: `rules` allowed and everything else trapped, and each of `errors`
/// answered with its errno instead. One program, not one per action: every system call a
/// thread makes runs every filter stacked on it (a virtio thread's write to a TAP, once per
/// frame, ran three). `seccompiler` gives a filter one action for all its rules, so the errno
/// answers are a short prefix written here ([`errno_prefix`]), ahead of its program.
fn programs(
    kind: &str,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    errors: &[(i64, i32)],
) -> Result<Vec<BpfProgram>, SeccompError> {
    let err = |e: &dyn std::fmt::Display| SeccompError::Build {
        kind: kind.to_owned(),
        err: e.to_string(),
    };
    let allow = dispatched(rules).map_err(|e| err(&e))?;
    let mut program = errno_prefix(errors);
    program.extend(allow);
    // BPF_MAXINSNS: the kernel refuses a longer filter.
    if program.len() > 4096 {
        return Err(err(&format!(
            "the program is {} instructions long, over the kernel's 4096",
            program.len()
        )));
    }
    Ok(vec![program])
}

/// System calls per part of a [`dispatched`] program.
const PART: usize = 8;

/// `seccompiler`'s own program for `rules` (allowed, everything else trapped): every listed
/// call compared in turn. A part of [`dispatched`].
fn linear(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, String> {
    SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?
    .try_into()
    .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// `seccompiler`'s program for `rules` (allowed, everything else trapped), laid out so that
/// installing it is cheap. The kernel works out, as a filter is installed, which system
/// calls it allows whatever their arguments, by running the program for every call number
/// (about 460) as far as it can without the arguments. `seccompiler` compares the number
/// with each listed call in turn, so every unlisted number walks the whole list: two
/// instructions per listed call, 180 for the main thread's. That walk was most of the
/// 0.45 ms its install took here, on every thread at every VMM start (measured: 500 such
/// compares install in 1.8 ms, the same 500 instructions jumped over in 0.12 ms).
///
/// So the list is cut into parts of [`PART`] calls, in number order, each a whole
/// `seccompiler` program of its own (its architecture check, its calls, its default), and a
/// binary search on the call number leads to the part whose range holds it: a walk of about
/// 25 instructions whatever the number. Each part decides exactly as the whole list would
/// for the numbers of its range (the calls outside its range are none of them), and a
/// number outside every listed call's is trapped by the part it lands in, as by the list.
fn dispatched(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, String> {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const JA: u16 = 0x05; // BPF_JMP | BPF_JA
    const NR: u32 = 0; // offsetof(struct seccomp_data, nr)
    if rules.len() <= PART {
        return linear(rules);
    }
    let mut firsts = Vec::new();
    let mut parts = Vec::new();
    let mut calls = rules.into_iter().peekable();
    while let Some(&(first, _)) = calls.peek() {
        firsts.push(u32::try_from(first).map_err(|_| format!("system call {first}"))?);
        parts.push(linear(calls.by_ref().take(PART).collect())?);
    }
    // The search: parts [lo, hi) below a node; "number >= the middle part's first" jumps to
    // the right half, else falls through to the left one, which follows. A leaf jumps to its
    // part (patched once the search's length is known).
    fn search(
        firsts: &[u32],
        lo: usize,
        hi: usize,
        out: &mut Vec<sock_filter>,
        leaves: &mut Vec<(usize, usize)>,
    ) -> Result<(), String> {
        if hi - lo == 1 {
            leaves.push((out.len(), lo));
            out.push(sock_filter {
                code: JA,
                jt: 0,
                jf: 0,
                k: 0,
            });
            return Ok(());
        }
        let mid = (lo + hi) / 2;
        let node = out.len();
        out.push(sock_filter {
            code: JGE_K,
            jt: 0,
            jf: 0,
            k: firsts[mid],
        });
        search(firsts, lo, mid, out, leaves)?;
        out[node].jt =
            u8::try_from(out.len() - node - 1).map_err(|_| "too many parts".to_string())?;
        search(firsts, mid, hi, out, leaves)
    }
    let mut program = vec![sock_filter {
        code: LD_W_ABS,
        jt: 0,
        jf: 0,
        k: NR,
    }];
    let mut leaves = Vec::new();
    search(&firsts, 0, parts.len(), &mut program, &mut leaves)?;
    let mut starts = Vec::with_capacity(parts.len());
    for part in parts {
        starts.push(program.len());
        program.extend(part);
    }
    for (at, part) in leaves {
        program[at].k = u32::try_from(starts[part] - at - 1).map_err(|e| e.to_string())?;
    }
    Ok(program)
}

/// Classic BPF that answers each of `errors` (system call, errno) on x86_64 with its errno
/// and falls through to what follows for everything else (the instructions after it, whose
/// own first check is the architecture: a call of another one is refused there).
fn errno_prefix(errors: &[(i64, i32)]) -> BpfProgram {
    use seccompiler::sock_filter;
    // linux/filter.h and linux/seccomp.h, linux/audit.h.
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ERRNO: u32 = 0x0005_0000; // SECCOMP_RET_ERRNO
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const NR: u32 = 0; // offsetof(struct seccomp_data, nr)
    const ARCH: u32 = 4; // offsetof(struct seccomp_data, arch)
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    if errors.is_empty() {
        return Vec::new();
    }
    // After the arch check: a load, then two instructions per call.
    let rest = (1 + 2 * errors.len()) as u8;
    let mut p = vec![
        op(LD_W_ABS, 0, 0, ARCH),
        op(JEQ_K, 0, rest, AUDIT_ARCH_X86_64),
        op(LD_W_ABS, 0, 0, NR),
    ];
    for &(call, errno) in errors {
        p.push(op(JEQ_K, 0, 1, call as u32));
        p.push(op(RET_K, 0, 0, RET_ERRNO | (errno as u32 & 0xffff)));
    }
    p
}

/// `si_code` of a SIGSYS a seccomp filter raised.
const SYS_SECCOMP: libc::c_int = 1;

/// SIGSYS: record the call, then die of the signal.
extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // The kernel fills `si_syscall` (an int at offset 24 of siginfo_t on x86_64, after
    // si_signo, si_errno, si_code, the padding and si_call_addr) for SIGSYS from seccomp.
    // SAFETY: `info` is the siginfo the kernel passed to this SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code != SYS_SECCOMP {
        // Sent by a process (`kill -SYS`), not by a filter: no call to report or to repeat.
        // SAFETY: write and _exit are async-signal-safe, as is `raise_default`.
        unsafe {
            let msg = b"bexar vmm: SIGSYS from outside\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
            raise_default(libc::SIGSYS);
            // A namespace's first process ignores that one (see below).
            libc::_exit(128 + libc::SIGSYS);
        }
    }
    // SAFETY: as above; a SYS_SECCOMP siginfo carries the call's number.
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    let name = syscalls::Sysno::new(nr as usize).map_or("unknown", |s| s.name());
    let mut buf = [0u8; 160];
    let mut w = Writer {
        buf: &mut buf,
        len: 0,
    };
    w.put(b"bexar vmm: seccomp: forbidden system call ");
    w.num(nr as u64);
    w.put(b" (");
    w.put(name.as_bytes());
    w.put(b") on thread ");
    let mut comm = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `comm`.
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
    let clen = comm.iter().position(|b| *b == 0).unwrap_or(16);
    w.put(&comm[..clen]);
    w.put(b"\n");
    let len = w.len;
    let fault = FAULT_FD.load(Ordering::Relaxed);
    // SAFETY: write, sigaction, sigprocmask, tgkill, a refused system call and _exit are
    // async-signal-safe; the buffers are on this stack and the descriptors ours; `_ctx` is the
    // ucontext the kernel passed to this SA_SIGINFO handler.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        if fault >= 0 {
            libc::pwrite(fault, buf.as_ptr().cast(), len, 0);
        }
        raise_default(libc::SIGSYS);
        // Still here: this process is the first of its own PID namespace, which ignores a
        // signal it sends itself while that signal's action is the default. The same call
        // made again is refused by the same filter, and the kernel's own SIGSYS, with the
        // default action now, ends any process.
        let g = &(*_ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        let arg = |r: libc::c_int| g[r as usize];
        libc::syscall(
            libc::c_long::from(nr),
            arg(libc::REG_RDI),
            arg(libc::REG_RSI),
            arg(libc::REG_RDX),
            arg(libc::REG_R10),
            arg(libc::REG_R8),
            arg(libc::REG_R9),
        );
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Gives `sig` its default action, unblocks it and sends it to the calling thread: the way a
/// handler ends its process by the signal it handles. Async-signal-safe.
///
/// # Safety
///
/// Changes the whole process's disposition of `sig`; meant for a handler that is ending it.
pub(crate) unsafe fn raise_default(sig: libc::c_int) {
    // SAFETY: sigaction, sigprocmask and tgkill with values built here; the caller accepts
    // the change of disposition.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), sig);
    }
}

/// A fixed buffer filled without allocating (inside a signal handler).
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }
    fn num(&mut self, mut v: u64) {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.put(&d[i..]);
    }
}

fn install_handler() {
    // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO; the handler only makes
    // async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

/// The name of system call `nr` (x86_64), for reports.
pub fn syscall_name(nr: u64) -> &'static str {
    syscalls::Sysno::new(nr as usize).map_or("unknown", |s| s.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errno prefix answers its calls with their errno, on a thread under a filter built
    /// the way every thread's is, and leaves the rest to the allow-list.
    #[test]
    fn the_errno_prefix_answers_its_calls_and_the_list_the_rest() {
        let t = std::thread::spawn(|| {
            let mut rules = BTreeMap::new();
            add(&mut rules, BASICS);
            let prog = programs(
                "test",
                rules,
                &[
                    (libc::SYS_clone3, libc::ENOSYS),
                    (libc::SYS_openat, libc::EACCES),
                ],
            )
            .unwrap();
            assert_eq!(prog.len(), 1, "one program per thread");
            seccompiler::apply_filter(&prog[0]).unwrap();
            let open = std::fs::File::open("/proc/self/status").unwrap_err();
            // SAFETY: clone3 with a null argument and size 0 fails before doing anything.
            let clone3 = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            let clone3_err = std::io::Error::last_os_error().raw_os_error();
            // Allowed by the list: getpid goes through.
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            (open.raw_os_error(), clone3, clone3_err, pid)
        });
        let (open, clone3, clone3_err, pid) = t.join().unwrap();
        assert_eq!(open, Some(libc::EACCES));
        assert_eq!((clone3, clone3_err), (-1, Some(libc::ENOSYS)));
        assert_eq!(pid as u32, std::process::id());
    }

    /// Runs classic BPF as the kernel does for seccomp (the instructions `seccompiler` and
    /// this file emit) on a call `nr` of `arch` with `args`; the action and the instructions
    /// run. With `without_args`, stops (`None`) where the program first reads an argument, as
    /// the kernel's walk at install does.
    fn run(
        prog: &[seccompiler::sock_filter],
        (nr, arch, args): (u32, u32, [u64; 6]),
        without_args: bool,
    ) -> (Option<u32>, usize) {
        let (mut pc, mut a, mut steps) = (0usize, 0u32, 0usize);
        loop {
            let i = &prog[pc];
            steps += 1;
            let jump = |c: bool| 1 + usize::from(if c { i.jt } else { i.jf });
            pc += match i.code {
                0x20 => {
                    a = match i.k {
                        0 => nr,
                        4 => arch,
                        k @ 16..=63 if !without_args => {
                            let arg = args[(k as usize - 16) / 8];
                            if k % 8 == 4 {
                                (arg >> 32) as u32
                            } else {
                                arg as u32
                            }
                        }
                        16..=63 => return (None, steps),
                        k => panic!("load of offset {k}"),
                    };
                    1
                }
                0x05 => 1 + i.k as usize,
                0x15 => jump(a == i.k),
                0x25 => jump(a > i.k),
                0x35 => jump(a >= i.k),
                0x54 => {
                    a &= i.k;
                    1
                }
                0x06 => return (Some(i.k), steps),
                c => panic!("instruction {c:#x}"),
            };
        }
    }

    /// Every thread kind's program, as installed (errno answers, then the list cut into parts
    /// behind a search), decides every call as seccompiler's own program of the same list
    /// does: each call number of x86_64 and past it, x32's, another architecture's, with the
    /// arguments the lists compare against and others around them.
    #[test]
    fn the_dispatched_list_decides_as_seccompilers_own() {
        use bexar_devices::tap::{TUNSETOFFLOAD, TUNSETVNETHDRSZ};
        const X86_64: u32 = 0xC000_003E;
        const I386: u32 = 0x4000_0003;
        let mut values: Vec<u64> = vec![
            0,
            1,
            libc::AF_UNIX as u64,
            libc::AF_INET as u64,
            libc::AF_INET6 as u64,
            libc::AF_NETLINK as u64,
            libc::AF_PACKET as u64,
            libc::SOCK_STREAM as u64,
            libc::SOCK_DGRAM as u64,
            (libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64,
            libc::PR_SET_NAME as u64,
            libc::PR_GET_NAME as u64,
            libc::PR_SET_NO_NEW_PRIVS as u64,
            libc::PR_SET_SECCOMP as u64,
            0x003d_0f00, // a pthread's clone flags
            0x003d_0f00 | libc::CLONE_NEWNET as u64,
            libc::SIGCHLD as u64,
            libc::CLONE_NEWUSER as u64 | libc::SIGCHLD as u64,
            0x80 | libc::SIGCHLD as u64, // CLONE_NEWTIME
            0xAE80,                      // KVM_RUN
            0x4020_AE46,                 // KVM_SET_USER_MEMORY_REGION
            0xAF00,
            TUNSETOFFLOAD(),
            TUNSETVNETHDRSZ(),
            libc::FIONBIO,
            libc::FIOCLEX,
            libc::TCGETS,
            libc::TIOCGWINSZ,
            libc::TIOCSTI,
            u64::from(u32::MAX),
            u64::MAX,
        ];
        // The same with high bits set, which a Dword comparison ignores and a Qword one sees.
        let high: Vec<u64> = values.iter().map(|v| v | (1 << 40)).collect();
        values.extend(high);
        let with_args = [
            libc::SYS_ioctl,
            libc::SYS_clone,
            libc::SYS_socket,
            libc::SYS_prctl,
        ];
        let errors = [
            (libc::SYS_clone3, libc::ENOSYS),
            (libc::SYS_openat, libc::EACCES),
        ];
        let mut checked = 0u64;
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu(0), ThreadKind::Virtio] {
            for inet in [false, true] {
                let installed = programs("test", rules_of(kind, inet), &errors).unwrap();
                let mut theirs = errno_prefix(&errors);
                theirs.extend(linear(rules_of(kind, inet)).unwrap());
                let mut numbers: Vec<u32> = (0..520).collect();
                numbers.extend([0x4000_0000, 0x4000_0001, 0x4000_0010, u32::MAX]);
                for nr in numbers {
                    for arch in [X86_64, I386] {
                        let argsets: Vec<[u64; 6]> = if with_args.contains(&i64::from(nr)) {
                            values
                                .iter()
                                .flat_map(|&a0| values.iter().map(move |&a1| [a0, a1, 0, 0, 0, 0]))
                                .collect()
                        } else {
                            vec![[0; 6], [u64::MAX; 6]]
                        };
                        for args in argsets {
                            let call = (nr, arch, args);
                            assert_eq!(
                                run(&installed[0], call, false).0,
                                run(&theirs, call, false).0,
                                "{kind} inet={inet}: call {nr} arch {arch:#x} args {args:x?}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    /// What the kernel walks as it installs a filter (each call number, as far as the
    /// arguments): a few dozen instructions per number, not the whole list.
    #[test]
    fn a_dispatched_list_is_walked_briefly_at_install() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu(0), ThreadKind::Virtio] {
            let installed = programs("test", rules_of(kind, true), &[]).unwrap();
            let theirs = linear(rules_of(kind, true)).unwrap();
            let walk = |p: &[seccompiler::sock_filter]| -> usize {
                (0..460)
                    .map(|nr| run(p, (nr, 0xC000_003E, [0; 6]), true).1)
                    .sum()
            };
            let (ours, seccompilers) = (walk(&installed[0]), walk(&theirs));
            eprintln!(
                "{kind}: {ours} instructions walked at install ({seccompilers} in seccompiler's \
                 layout), {} in the program ({})",
                installed[0].len(),
                theirs.len()
            );
            assert!(ours * 4 < seccompilers, "{ours} against {seccompilers}");
            assert!(ours < 460 * 30, "{ours}");
        }
    }
}
