//! Shared helpers for the integration tests: the bexar binary, the test guest (built on first
//! use), the Linux guest image, and small ELF images made on the fly.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bexar binary under test.
pub fn bexar() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bexar"));
    c.env("BEXAR_LOG", "info");
    c
}

/// The test guest ELF, built once per test process (cargo's lock serialises concurrent builds;
/// a built tree makes this a no-op).
pub fn testguest() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = root().join("firmware");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&dir)
            .args(["build", "--release", "--quiet"]);
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
        ] {
            cmd.env_remove(var);
        }
        let st = cmd.status().expect("run cargo for the firmware");
        assert!(st.success(), "building the test guest failed");
        let p = dir.join("target/release/testguest");
        assert!(p.is_file(), "{} missing after build", p.display());
        p
    })
    .clone()
}

/// Whether /dev/kvm is PVM (software-assisted nested KVM), as the VMM detects it.
pub fn is_pvm() -> bool {
    bexar_vmm::platform::Platform::detect() == bexar_vmm::platform::Platform::Pvm
}

/// What the test guest must be told about this platform: on PVM, CPUID is the host's and not
/// the VM's (see the guest's smp test), `bexar.cpuid=native`.
pub fn guest_platform_params() -> &'static str {
    if is_pvm() {
        " bexar.cpuid=native"
    } else {
        ""
    }
}

/// Runs `bexar run` on the test guest with `test` selected and extra args (which may carry
/// their own `--cmdline` and `--timeout`).
pub fn run_testguest(test: &str, extra: &[&str]) -> Output {
    let guest = testguest();
    let mut c = bexar();
    c.arg("run")
        .arg("--kernel")
        .arg(&guest)
        .args(["--no-stdin", "--memory", "64"])
        .args(extra)
        .stdin(Stdio::null());
    if !extra.contains(&"--timeout") {
        c.args(["--timeout", "30"]);
    }
    if !extra.contains(&"--cmdline") {
        c.args([
            "--cmdline",
            &format!("console=ttyS0 bexar.test={test}{}", guest_platform_params()),
        ]);
    }
    c.output().expect("run bexar")
}

/// Stdout and stderr as text.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Asserts the process did not panic and exited with `code`, showing its output otherwise.
pub fn assert_exit(o: &Output, code: i32) {
    let (out, err) = text(o);
    assert!(!err.contains("panicked"), "bexar panicked:\n{err}");
    assert_eq!(
        o.status.code(),
        Some(code),
        "unexpected exit status\n--- stdout\n{out}\n--- stderr\n{err}"
    );
}

/// A unique temporary path.
pub fn tmp(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("bexar-it-{}-{n}-{name}", std::process::id()))
}

/// Writes a minimal x86_64 ELF: one PT_LOAD of `code` (plus `bss` zero bytes) at `paddr`.
pub fn tiny_elf(name: &str, paddr: u64, code: &[u8], bss: u64) -> PathBuf {
    let mut e = vec![0u8; 120];
    e[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    e[16..18].copy_from_slice(&2u16.to_le_bytes());
    e[18..20].copy_from_slice(&62u16.to_le_bytes());
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&paddr.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes());
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut e[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&7u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64 + bss).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(code);
    let p = tmp(name);
    std::fs::File::create(&p).unwrap().write_all(&e).unwrap();
    p
}

/// The Linux guest image directory (kernel, initramfs), built by guest-images/linux/build.sh
/// (which caches by content hash, so this is instant once built).
pub fn linux_image() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(root().join("guest-images/linux/build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run guest-images/linux/build.sh");
        assert!(
            out.status.success(),
            "building the Linux guest image failed"
        );
        let s = String::from_utf8_lossy(&out.stdout);
        let dir = PathBuf::from(
            s.lines()
                .last()
                .expect("build.sh printed its directory")
                .trim(),
        );
        assert!(
            dir.join("vmlinux").is_file(),
            "{} has no vmlinux",
            dir.display()
        );
        dir
    })
    .clone()
}

/// Reads a file to text, empty if missing.
pub fn read(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The cgroup parent of the test agent whose directory is `dir`.
pub fn agent_cgroup_parent(dir: &Path) -> String {
    format!(
        "bexar-test/{}",
        dir.file_name().unwrap_or_default().to_string_lossy()
    )
}

/// Removes the cgroups of the test agent whose directory is `dir` (each hierarchy, leaves
/// first); cgroups still holding a process stay.
pub fn remove_agent_cgroups(dir: &Path) {
    fn rm(d: &Path) {
        if let Ok(entries) = std::fs::read_dir(d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rm(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(d);
    }
    let parent = agent_cgroup_parent(dir);
    for h in ["cpu", "cpuacct", "memory", "pids", "blkio", "unified", ""] {
        rm(&Path::new("/sys/fs/cgroup").join(h).join(&parent));
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(h).join("bexar-test"));
    }
}

/// Starts `cmd` (a `bexar agent` command line, possibly wrapped) with its output appended to
/// `dir/agent.log`, and waits until the agent listens on `socket`.
pub fn spawn_agent(mut cmd: Command, dir: &Path, socket: &Path) -> std::process::Child {
    // Its VMs' cgroups under a parent of its own (agents of tests running at once may use the
    // same VM ids); removed by remove_agent_cgroups.
    cmd.arg("--cgroup-parent").arg(agent_cgroup_parent(dir));
    let log_path = dir.join("agent.log");
    // The log is appended to across restarts: this agent is up once it has added both lines
    // (it answers reads before it has re-adopted its VMs; the tests want it settled).
    const READY: &str = "agent API listening";
    const RECOVERED: &str = "agent recovered";
    let count = |what: &str| {
        std::fs::read_to_string(&log_path)
            .map(|l| l.matches(what).count())
            .unwrap_or(0)
    };
    let (ready_before, recovered_before) = (count(READY), count(RECOVERED));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start bexar agent");
    let t = std::time::Instant::now();
    // A socket left by a killed agent can still accept connections for a moment (through its
    // children that have not exec'd yet), so connecting alone does not prove this agent is up.
    while count(READY) <= ready_before
        || count(RECOVERED) <= recovered_before
        || std::os::unix::net::UnixStream::connect(socket).is_err()
    {
        assert!(
            child.try_wait().map(|s| s.is_none()).unwrap_or(false),
            "agent exited; log:\n{}",
            read(&log_path)
        );
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "agent did not listen; log:\n{}",
            read(&log_path)
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child
}

/// The VM's interactive console, attached through the agent (the upgraded connection).
pub async fn console_attach(
    c: &bexar_agent::api::client::Client,
    id: &str,
) -> impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {
    c.upgrade(
        &format!("/v1/vms/{id}/console/attach"),
        bexar_agent::api::CONSOLE_PROTOCOL,
    )
    .await
    .unwrap()
    .expect("attach upgrades the connection")
}

/// A single-threaded tokio runtime for the API client.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Asserts an API reply's status (showing the body if it differs) and returns its JSON.
#[track_caller]
pub fn expect_status(r: &bexar_agent::api::client::Reply, status: u16) -> serde_json::Value {
    assert_eq!(
        r.status.as_u16(),
        status,
        "unexpected status; body: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// The guest's SMBIOS tables as the test guest read them from its own memory (`smbios`
/// test), in dmidecode's `--dump-bin` layout: the entry point at 0 naming the table at 32.
pub fn smbios_dump(console: &str) -> Vec<u8> {
    let bytes = |tag: &str| -> Vec<u8> {
        console
            .lines()
            .filter_map(|l| l.split(&format!("bexar-testguest: {tag}:")).nth(1))
            .flat_map(|l| {
                l.split_whitespace()
                    .map(|b| u8::from_str_radix(b, 16).unwrap())
            })
            .collect()
    };
    let (mut entry, table) = (bytes("smbios-entry"), bytes("smbios-table"));
    assert_eq!(entry.len(), 24, "{console}");
    assert!(!table.is_empty(), "{console}");
    entry[16..24].copy_from_slice(&32u64.to_le_bytes());
    entry[5] = 0;
    entry[5] = entry.iter().fold(0u8, |a, b| a.wrapping_sub(*b));
    let mut dump = entry;
    dump.resize(32, 0);
    dump.extend_from_slice(&table);
    dump
}

/// A reproducible random source for a randomised test: xorshift64 from a seed taken from the
/// clock and printed (with `what`) so a failing run can be told apart. `next(n)` is in 0..n.
pub fn seeded_rng(what: &str) -> (u64, impl FnMut(u64) -> u64) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("{what} seed {seed}");
    let mut state = seed | 1;
    let next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n.max(1)
    };
    (seed, next)
}

/// A network namespace holding a TAP at 10.0.2.1/24; removed when dropped.
pub struct TapNetns {
    /// The namespace.
    pub name: String,
}

impl TapNetns {
    /// Makes it (`tag` names it, with this process id).
    pub fn new(tag: &str) -> Self {
        let name = format!("bexar-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &name, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr",
        ]);
        ip(&["-n", &name, "addr", "add", "10.0.2.1/24", "dev", "tap0"]);
        ip(&["-n", &name, "link", "set", "tap0", "up"]);
        Self { name }
    }
}

/// Moves the calling thread into network namespace `name` (for a thread that serves a TAP in
/// it).
pub fn enter_netns(name: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    // SAFETY: setns on a descriptor we hold open; it changes only this thread's namespace.
    let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for TapNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Sends one request on a VMM's control socket (waiting up to 10 s for it to appear) and
/// returns the reply.
pub fn vmm_control(socket: &Path, req: &serde_json::Value) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("connect {}: {e}", socket.display()),
        }
    };
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

// ---------------------------------------------------------------- disks

/// Sector size of virtio-blk.
pub const SECTOR: u64 = 512;

pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The test guest's pattern (firmware/testguest/src/vtests.rs): word `w` of `sector`.
pub fn pattern(seed: u64, first: u64, sectors: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((sectors * SECTOR) as usize);
    for s in first..first + sectors {
        for w in 0..64u64 {
            let word = splitmix64(splitmix64(seed) ^ (s << 6) ^ w);
            out.extend_from_slice(&word.to_le_bytes());
        }
    }
    out
}

/// The writes `blk-scatter` makes, round by round: (first sector, sectors).
pub fn scatter_writes(seed: u64, rounds: u64, writes: u64, cap: u64) -> Vec<Vec<(u64, u64)>> {
    let mut x = splitmix64(seed) | 1;
    (0..rounds)
        .map(|_| {
            (0..writes)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = (1 + (x >> 40) % 128).min(cap);
                    ((x & 0xff_ffff_ffff) % (cap - n + 1), n)
                })
                .collect()
        })
        .collect()
}

/// The agent's spec of the Linux witness (vmlinux and its initramfs, one vCPU, 128 MiB), as VM
/// `id`.
pub fn linux_vm_spec(id: &str) -> serde_json::Value {
    let image = linux_image();
    serde_json::json!({
        "id": id,
        "vcpus": 1,
        "memory_mib": 128,
        "boot": {
            "kernel": image.join("vmlinux").display().to_string(),
            "initrd": image.join("initramfs.cpio").display().to_string(),
            "cmdline": "console=ttyS0 reboot=k panic=1"
        },
        "rng": true
    })
}

pub fn qemu_img(args: &[&str]) -> (i32, String) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (scripts/deps installs qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

pub fn qemu_img_ok(args: &[&str]) -> String {
    let (code, text) = qemu_img(args);
    assert_eq!(code, 0, "qemu-img {args:?}: {text}");
    text
}

/// A file of `len` bytes of xorshift output from `seed`.
pub fn random_file(path: &Path, len: u64, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; len as usize];
    for chunk in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, data).unwrap();
}

/// Writes the pattern of each `(first sector, sectors)` of `writes` into the raw file
/// `expected`, as the guest wrote it into its disk.
pub fn apply(expected: &Path, seed: u64, writes: &[(u64, u64)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(expected)
        .unwrap();
    for &(first, n) in writes {
        f.write_all_at(&pattern(seed, first, n), first * SECTOR)
            .unwrap();
    }
}

/// A free TCP port on loopback (bound and released; a test's servers take it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An NBD server in a process group of its own: Debian's `nbd-server` (simple replies) or
/// `qemu-nbd` (structured replies), serving `file` as export `name` on a loopback port.
pub struct NbdServer {
    kind: &'static str,
    file: PathBuf,
    /// The port it listens on.
    pub port: u16,
    conf: PathBuf,
    child: Option<std::process::Child>,
}

impl NbdServer {
    pub fn start(kind: &'static str, file: &Path, conf_dir: &Path) -> Self {
        let mut s = Self {
            kind,
            file: file.to_owned(),
            port: free_port(),
            conf: conf_dir.join(format!("{kind}-{}.conf", std::process::id())),
            child: None,
        };
        s.spawn();
        s
    }

    /// Starts it (again).
    pub fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        let mut cmd = if self.kind == "nbd-server" {
            std::fs::write(
                &self.conf,
                format!(
                    "[generic]\n    port = {}\n    listenaddr = 127.0.0.1\n[disk0]\n    exportname = {}\n    flush = true\n    trim = true\n",
                    self.port,
                    self.file.display()
                ),
            )
            .unwrap();
            // It daemonizes and forks a child per connection; all carry the config's path.
            let mut c = Command::new("nbd-server");
            c.arg("-C").arg(&self.conf);
            c
        } else {
            let mut c = Command::new("qemu-nbd");
            c.args(["-f", "raw", "-x", "disk0", "-b", "127.0.0.1", "-t", "-p"])
                .arg(self.port.to_string())
                .arg(&self.file);
            c
        };
        let child = cmd
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} (scripts/deps installs it): {e}", self.kind));
        self.child = Some(child);
        // Ready when it accepts.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not listen",
                self.kind
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGKILL to the server and everything it forked.
    pub fn kill(&mut self) {
        kill_group(&mut self.child);
        if self.kind == "nbd-server" {
            // The daemon and its connection children, which left our process group.
            let _ = Command::new("pkill")
                .args(["-9", "-f"])
                .arg(self.conf.as_os_str())
                .status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while Command::new("pgrep")
                .args(["-f"])
                .arg(self.conf.as_os_str())
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "nbd-server survived SIGKILL"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    /// `nbd://127.0.0.1:PORT/disk0` and `opts`.
    pub fn url(&self, opts: &str) -> String {
        format!("nbd://127.0.0.1:{}/disk0{opts}", self.port)
    }
}

/// SIGKILL to a server started in its own process group, and everything in that group.
fn kill_group(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        // SAFETY: kill(2) on the process group of a child we started in its own group.
        unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
        let _ = c.wait();
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Debian's tgtd (a userspace iSCSI target) serving one file as LUN 1 of one target, on
/// 127.0.0.1 and a port of its own, with its own control socket (`-C`), so tests run side by
/// side. It keeps no state across a restart: `spawn` configures it again.
pub struct Tgt {
    file: PathBuf,
    /// The port of its portal.
    pub port: u16,
    /// CHAP user and secret the target demands, if any.
    pub chap: Option<(String, String)>,
    /// Whether the LUN offers UNMAP (tgt's thin provisioning).
    pub thin: bool,
    child: Option<std::process::Child>,
}

impl Tgt {
    /// The target's name.
    pub const IQN: &'static str = "iqn.2026-12.dev.bexar:test";

    pub fn start(file: &Path, chap: Option<(&str, &str)>, thin: bool) -> Self {
        let mut t = Self {
            file: file.to_owned(),
            port: free_port(),
            chap: chap.map(|(u, s)| (u.to_owned(), s.to_owned())),
            thin,
            child: None,
        };
        t.spawn();
        t
    }

    /// Its control socket's number: tgtd takes at most 32767, ports go to 65535.
    fn ctl(&self) -> String {
        (self.port % 32768).to_string()
    }

    /// `tgtadm` on this daemon with `args` (split at spaces: no value here has one).
    fn adm(&self, args: &str) {
        let o = Command::new("tgtadm")
            .args(["-C", &self.ctl(), "--lld", "iscsi"])
            .args(args.split_whitespace())
            .output()
            .expect("tgtadm (scripts/deps installs tgt)");
        assert!(o.status.success(), "tgtadm {args}: {}", text(&o).1);
    }

    /// Starts it (again) and configures the target, its LUN and its ACL.
    pub fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        let child = Command::new("tgtd")
            .args(["-f", "-C", &self.ctl(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{}", self.port))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tgtd (scripts/deps installs tgt)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !Command::new("tgtadm")
            .args(["-C", &self.ctl(), "--op", "show", "--mode", "sys"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(std::time::Instant::now() < deadline, "tgtd did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let iqn = Self::IQN;
        self.adm(&format!("--op new --mode target --tid 1 -T {iqn}"));
        let file = self.file.display();
        self.adm(&format!(
            "--op new --mode logicalunit --tid 1 --lun 1 -b {file}"
        ));
        if self.thin {
            let lun = "--mode logicalunit --tid 1 --lun 1";
            self.adm(&format!("--op update {lun} --params thin_provisioning=1"));
        }
        if let Some((user, secret)) = &self.chap {
            self.adm(&format!(
                "--op new --mode account --user {user} --password {secret}"
            ));
            self.adm(&format!("--op bind --mode account --tid 1 --user {user}"));
        }
        self.adm("--op bind --mode target --tid 1 -I ALL");
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        kill_group(&mut self.child);
    }

    /// `iscsi://[USER%SECRET@]127.0.0.1:PORT/IQN/1` and `opts`.
    pub fn url(&self, opts: &str) -> String {
        let cred = self
            .chap
            .as_ref()
            .map(|(u, s)| format!("{u}%{s}@"))
            .unwrap_or_default();
        format!(
            "iscsi://{cred}127.0.0.1:{}/{}/1{opts}",
            self.port,
            Self::IQN
        )
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of `Key:` in a `/proc/PID/status` (or a thread's) text.
pub fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// Whether the host kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Asserts that a VMM's log (`log`) has it enter its jail before it says `read` (the line it
/// writes once it has read what a guest, or a VMM a guest may have compromised, wrote).
pub fn assert_read_in_jail(log: &str, read: &str) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: no jail to check the order against");
        return;
    }
    let entered = log
        .find("jailed in")
        .unwrap_or_else(|| panic!("no jail line: {log}"));
    let at = log
        .find(read)
        .unwrap_or_else(|| panic!("no {read:?} line: {log}"));
    assert!(entered < at, "read before the jail ({read:?}): {log}");
}

/// The VMM of the `bexar run` process `pid`: jailed (the default, as root), its only child but
/// the reaper that holds its VM, pid 1 of a PID namespace of its own; otherwise `pid` itself.
#[allow(dead_code)] // not every test file looks at the VMM's process
pub fn vmm_of_run(pid: u32) -> u32 {
    let vmms: Vec<u32> = bexar_util::procfs::children(pid)
        .into_iter()
        .filter(|&c| !bexar_vmm::teardown::is_reaper(c))
        .collect();
    match vmms[..] {
        [vmm] => vmm,
        _ => pid,
    }
}
