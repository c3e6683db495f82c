//! Helpers the benchmarks share: where the binaries are, sample statistics, knobs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The bexar binary under test.
pub fn bexar() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bexar"))
}

/// The ring-3 test guest; exits with a message if it has not been built.
pub fn testguest() -> PathBuf {
    let guest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("firmware/target/release/testguest");
    if !guest.exists() {
        eprintln!(
            "{} is missing: build it with `cd firmware && cargo build --release`",
            guest.display()
        );
        std::process::exit(1);
    }
    guest
}

/// Sends one request on a VMM's control socket (waiting up to 10 s for it to appear) and
/// returns the reply.
pub fn vmm_control(socket: &Path, req: &serde_json::Value) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("connect {}: {e}", socket.display()),
        }
    };
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

/// A count from the environment variable `name`, or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0..=1) of `v`, which it sorts.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The TSC frequency, measured against the monotonic clock over 200 ms (the guests report
/// cycle counts).
pub fn tsc_hz() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let w = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / w.elapsed().as_secs_f64()
}

/// `bexar run` of the idle test guest (`vcpus`, `memory_mib`) until it prints its ready line, in
/// milliseconds from exec: the baseline for one cold start.
pub fn cold_start(bexar: &Path, guest: &Path, vcpus: u8, memory_mib: u64) -> f64 {
    let t = Instant::now();
    let s = Command::new(bexar)
        .args([
            "run",
            "--no-stdin",
            "--expect",
            "idle: ready",
            "--console",
            "none",
        ])
        .args([
            "--vcpus",
            &vcpus.to_string(),
            "--memory",
            &memory_mib.to_string(),
        ])
        .args(["--cmdline", "console=ttyS0 bexar.test=idle", "--kernel"])
        .arg(guest)
        .env("BEXAR_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("run bexar");
    assert!(s.success());
    t.elapsed().as_secs_f64() * 1e3
}

/// A network namespace of its own (`PREFIX-PID`) and a scratch directory for a benchmark that
/// runs an agent inside it; the caller removes both.
pub fn netns_and_dir(prefix: &str) -> (String, PathBuf) {
    let ns = format!("{prefix}-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("bexar-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    (ns, dir)
}

/// Starts `bexar agent` with its API socket and state in `dir` (run through `wrap`, such as
/// `ip netns exec NS`, when given), with `flags` after its own, and waits until it listens.
/// Returns the process and the socket.
pub fn start_agent(
    bexar: &Path,
    dir: &Path,
    wrap: &[&str],
    flags: &[&str],
    log: &str,
) -> (std::process::Child, PathBuf) {
    let socket = dir.join("api.sock");
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bexar);
            c
        }
        None => Command::new(bexar),
    };
    let child = cmd
        .arg("agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(flags)
        .env("BEXAR_LOG", log)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    (child, socket)
}

/// A benchmark's agent: on drop it is killed with every VMM it started (found by their state
/// directory on the command line), and its scratch directory goes.
pub struct BenchAgent {
    /// Its scratch directory (socket, state).
    pub dir: PathBuf,
    /// The agent process.
    pub child: std::process::Child,
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("pkill")
            .arg("-9")
            .arg("-f")
            .arg(self.dir.join("state").display().to_string())
            .status();
        // The reapers that release the killed VMs end a few ms later.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The integration tests' helpers, for the benches that drive the same guests.
#[path = "../../tests/common/mod.rs"]
#[allow(unused_imports)]
pub mod tests_common;
/// The VMM of the `bexar run` process `pid` (the tests' helper).
#[allow(unused_imports)] // not every bench looks at the VMM's process
pub use tests_common::vmm_of_run;
