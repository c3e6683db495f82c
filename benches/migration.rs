//! Live migration between two VMM processes on this host (`bexar run --incoming`), against a
//! stop-and-copy of the same guest measured in the same run (`max_rounds: 0`: every page sent
//! while the guest is paused), at several dirty rates of the test guest's `dirty` mode:
//!
//! * the blackout: the pause the guest saw, measured by the receiving VMM from the sender's
//!   pause to its own resume (both on this host's monotonic clock), p50 over the runs, and its
//!   ratio to stop-and-copy's; and the longest gap the guest's own TSC loop saw with pre-copy
//!   (the receiver moves the guest's clocks on by the pause; on PVM the guest reads the host's
//!   TSC anyway), which holds the blackout and any other stall the guest saw;
//! * the whole migration's time;
//! * bytes sent against the guest's memory touched (what stop-and-copy sends, every touched
//!   page once): the pre-copy's price.
//!
//! Then the same against the guest's memory size (64 MiB to 1 GiB, half of it written at
//! 10,000 pages a second: the first round grows with it, the pause should not).
//!
//! Then the same with a disk copied in the stream (`"disks": true`): a guest idle and one writing
//! its disk continuously, pre-copy against stop-and-copy, and the pause while writing against
//! the pause idle; and last the pause against the rate the guest writes that disk (0 to 5,000
//! writes a second): the disk's write rate must not lengthen the pause.
//!
//! `cargo bench --bench migration` (BEXAR_BENCH_ITERS=N runs per case, default 5). Prints
//! medians and ratios; it asserts nothing about time. Both processes run unjailed (`--no-jail`);
//! the agents' migration between hosts is measured in `tests/network.rs` (it prints its figures).

mod common;
use common::{bexar, env_count, percentile, testguest};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 128;
const DIRTY_MIB: u64 = 64;

fn wait_for(file: &Path, pattern: &str) {
    let t = Instant::now();
    while !std::fs::read_to_string(file)
        .unwrap_or_default()
        .contains(pattern)
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{pattern} not in {}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `bexar run` (unjailed, no stdin) with its console and log in `dir/NAME.out`, `.err`.
fn run_in(dir: &Path, name: &str, args: &[&str]) -> Child {
    let out = |ext: &str| std::fs::File::create(dir.join(format!("{name}.{ext}"))).unwrap();
    Command::new(bexar())
        .args(["run", "--no-jail", "--no-stdin", "--timeout", "120"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out("out"))
        .stderr(out("err"))
        .spawn()
        .unwrap()
}

/// The receiver's measure of the pause (the same clock as the sender's pause time).
fn receiver_pause_ms(dir: &Path) -> f64 {
    wait_for(&dir.join("dest.err"), "the guest was paused");
    let err = std::fs::read_to_string(dir.join("dest.err")).unwrap();
    err.split("the guest was paused ")
        .nth(1)
        .and_then(|s| s.split(" ms").next())
        .and_then(|s| s.trim().parse().ok())
        .expect("the receiver's pause")
}

struct Run {
    guest_gap_ms: f64,
    paused_ms: f64,
    total_ms: f64,
    bytes: f64,
    rounds: f64,
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// One migration of a fresh guest dirtying `rate` pages a second (0: flat out) of a
/// `DIRTY_MIB` region in `MEMORY_MIB`.
fn migrate_once(dir: &Path, rate: u64, precopy: bool) -> Run {
    migrate_sized(dir, MEMORY_MIB, DIRTY_MIB, rate, precopy)
}

/// One migration of a fresh `memory_mib` guest dirtying `rate` pages a second of `dirty_mib`.
fn migrate_sized(dir: &Path, memory_mib: u64, dirty_mib: u64, rate: u64, precopy: bool) -> Run {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let (incoming, ctl) = (dir.join("in.sock"), dir.join("ctl.sock"));
    let run = |name: &str, args: &[&str]| run_in(dir, name, args);
    let dest = run("dest", &["--incoming", incoming.to_str().unwrap()]);
    let cmdline = format!(
        "console=ttyS0 bexar.test=dirty bexar.dirty-mib={dirty_mib} bexar.dirty-rate={rate}"
    );
    let src = run(
        "src",
        &[
            "--kernel",
            testguest().to_str().unwrap(),
            "--memory",
            &memory_mib.to_string(),
            "--control",
            ctl.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ],
    );
    // A second of writes: every page of its region touched at least once at 10,000/s and up.
    wait_for(&dir.join("src.out"), "pages written");
    while !incoming.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut req = serde_json::json!({"op": "migrate", "to": incoming});
    if !precopy {
        req["max_rounds"] = 0.into();
    }
    let reply = common::vmm_control(&ctl, &req);
    assert_eq!(reply["ok"], true, "{reply}");
    let m = &reply["migration"];
    let paused_ms = receiver_pause_ms(dir);
    // The guest's own measure: the longest gap in its TSC loop since it started, from its
    // first whole report here (the first line may be the end of one the sender began).
    let report = |text: &str| {
        text.lines()
            .filter_map(|l| {
                l.split("longest gap ")
                    .nth(1)?
                    .split(" us")
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .next()
    };
    let t = Instant::now();
    let guest_gap_ms = loop {
        let out = std::fs::read_to_string(dir.join("dest.out")).unwrap_or_default();
        if let Some(us) = report(&out) {
            break us / 1e3;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no report from the guest:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    kill(dest);
    kill(src);
    Run {
        guest_gap_ms,
        paused_ms,
        total_ms: m["total_ms"].as_f64().unwrap(),
        bytes: m["bytes_sent"].as_f64().unwrap(),
        rounds: m["rounds"].as_f64().unwrap(),
    }
}

/// Pause and time against the guest's memory size: half of it written at 10,000 pages a
/// second, pre-copy against stop-and-copy of the same guest, and each size's pause against the
/// smallest's (pre-copy's should stay flat while stop-and-copy's grows with the memory).
fn size_cases(dir: &Path, iters: usize) {
    const RATE: u64 = 10_000;
    println!(
        "\nagainst the guest's memory size, half of it written at {RATE} pages/s, {iters} runs per \
         case (p50)"
    );
    println!(
        "{:>10} {:>12} {:>12} {:>8} {:>10} {:>10} {:>12} {:>12} {:>7}",
        "memory",
        "pause pre",
        "pause stop",
        "ratio",
        "total pre",
        "total stop",
        "bytes/touch",
        "pause/64MiB",
        "rounds"
    );
    let mut smallest = None;
    for mib in [64u64, 256, 1024] {
        let pre: Vec<Run> = (0..iters)
            .map(|_| migrate_sized(dir, mib, mib / 2, RATE, true))
            .collect();
        let stop: Vec<Run> = (0..iters)
            .map(|_| migrate_sized(dir, mib, mib / 2, RATE, false))
            .collect();
        let (pp, sp) = (
            median(&pre, |r| r.paused_ms),
            median(&stop, |r| r.paused_ms),
        );
        let first = *smallest.get_or_insert(pp);
        println!(
            "{:>6} MiB {:>9.2} ms {:>9.2} ms {:>8.3} {:>7.1} ms {:>7.1} ms {:>12.3} {:>12.2} {:>7.1}",
            mib,
            pp,
            sp,
            pp / sp,
            median(&pre, |r| r.total_ms),
            median(&stop, |r| r.total_ms),
            median(&pre, |r| r.bytes) / median(&stop, |r| r.bytes),
            pp / first.max(1e-3),
            median(&pre, |r| r.rounds)
        );
    }
}

fn median<T>(runs: &[T], f: impl Fn(&T) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    percentile(&mut v, 0.5)
}

/// The disk of the disk cases, and the data on it before the guest starts.
const DISK_MIB: u64 = 256;
const DISK_DATA_MIB: u64 = 64;

struct DiskRun {
    paused_ms: f64,
    total_ms: f64,
    bytes: f64,
    disk_bytes: f64,
    final_disk_bytes: f64,
}

/// The disk cases' guests: idle, or writing its disk as fast as it can (`blk-scatter`: 8
/// scattered writes of up to 64 KiB and a flush, over and over): its command line and the
/// console line that says it is under way.
fn disk_guest(writing: bool) -> (String, &'static str) {
    if writing {
        (
            "console=ttyS0 bexar.test=blk-scatter bexar.rounds=100000000 bexar.writes=8".into(),
            "round 20 flushed",
        )
    } else {
        ("console=ttyS0 bexar.test=idle".into(), "idle: ready")
    }
}

/// One migration with the disk copied, of the guest booted with `cmdline` once its console
/// showed `under_way`, on a 256 MiB raw disk holding 64 MiB of data.
fn migrate_disk_once(dir: &Path, cmdline: &str, under_way: &str, precopy: bool) -> DiskRun {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let (incoming, ctl) = (dir.join("in.sock"), dir.join("ctl.sock"));
    let (a, b) = (dir.join("a.raw"), dir.join("b.raw"));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&a).unwrap();
        f.set_len(DISK_MIB << 20).unwrap();
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        for i in 0..DISK_DATA_MIB {
            f.write_all_at(&chunk, i * 4 * (1 << 20)).unwrap();
        }
        std::fs::File::create(&b)
            .unwrap()
            .set_len(DISK_MIB << 20)
            .unwrap();
    }
    let run = |name: &str, args: &[&str]| run_in(dir, name, args);
    let dest = run(
        "dest",
        &[
            "--incoming",
            incoming.to_str().unwrap(),
            "--disk",
            b.to_str().unwrap(),
        ],
    );
    let src = run(
        "src",
        &[
            "--kernel",
            testguest().to_str().unwrap(),
            "--memory",
            &MEMORY_MIB.to_string(),
            "--disk",
            a.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
            "--cmdline",
            cmdline,
        ],
    );
    wait_for(&dir.join("src.out"), under_way);
    while !incoming.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut req = serde_json::json!({"op": "migrate", "to": incoming, "disks": true});
    if !precopy {
        req["max_rounds"] = 0.into();
    }
    let reply = common::vmm_control(&ctl, &req);
    assert_eq!(reply["ok"], true, "{reply}");
    let m = &reply["migration"];
    let paused_ms = receiver_pause_ms(dir);
    kill(dest);
    kill(src);
    DiskRun {
        paused_ms,
        total_ms: m["total_ms"].as_f64().unwrap(),
        bytes: m["bytes_sent"].as_f64().unwrap(),
        disk_bytes: m["disk_bytes"].as_f64().unwrap(),
        final_disk_bytes: m["final_disk_bytes"].as_f64().unwrap(),
    }
}

/// The pause against the rate the guest writes its disk (`migrant`: writes of up to 64 KiB,
/// each read back, one in flight, at 0 to 5,000 a second, memory written at 100 pages a
/// second): it should not grow with the rate, since the disk's blocks go before the pause and
/// are synced there, and only what the guest writes during the last round's few milliseconds
/// is left for the pause.
fn write_rate_cases(dir: &Path, iters: usize) {
    println!(
        "\nthe pause against the disk's write rate ({MEMORY_MIB} MiB guest, {DISK_MIB} MiB raw disk), \
         {iters} runs per case (p50)"
    );
    println!(
        "{:>16} {:>12} {:>10} {:>12} {:>14} {:>12}",
        "writes/s", "pause pre", "total pre", "disk MB pre", "disk KB paused", "pause/idle"
    );
    let mut idle = None;
    for rate in [0u64, 50, 500, 5000] {
        let cmdline = format!(
            "console=ttyS0 bexar.test=migrant bexar.dirty-mib=8 bexar.dirty-rate=100 bexar.disk-rate={rate}"
        );
        let runs: Vec<DiskRun> = (0..iters)
            .map(|_| migrate_disk_once(dir, &cmdline, "migrant: 1 s:", true))
            .collect();
        let pp = median(&runs, |r| r.paused_ms);
        let first = *idle.get_or_insert(pp);
        println!(
            "{:>16} {:>9.2} ms {:>7.1} ms {:>12.1} {:>14.1} {:>12.2}",
            rate,
            pp,
            median(&runs, |r| r.total_ms),
            median(&runs, |r| r.disk_bytes) / 1e6,
            median(&runs, |r| r.final_disk_bytes) / 1e3,
            pp / first.max(1e-3)
        );
    }
}

fn disk_cases(dir: &Path, iters: usize) {
    println!(
        "\nwith a {DISK_MIB} MiB raw disk holding {DISK_DATA_MIB} MiB copied too ({MEMORY_MIB} MiB \
         guest), {iters} runs per case (p50)"
    );
    println!(
        "{:>16} {:>12} {:>12} {:>8} {:>10} {:>10} {:>12} {:>12}",
        "guest",
        "pause pre",
        "pause stop",
        "ratio",
        "total pre",
        "total stop",
        "disk MB pre",
        "bytes/stop"
    );
    let mut idle_pause = 0.0;
    for writing in [false, true] {
        let (cmdline, under_way) = disk_guest(writing);
        let pre: Vec<DiskRun> = (0..iters)
            .map(|_| migrate_disk_once(dir, &cmdline, under_way, true))
            .collect();
        let stop: Vec<DiskRun> = (0..iters)
            .map(|_| migrate_disk_once(dir, &cmdline, under_way, false))
            .collect();
        let (pp, sp) = (
            median(&pre, |r| r.paused_ms),
            median(&stop, |r| r.paused_ms),
        );
        if !writing {
            idle_pause = pp;
        }
        println!(
            "{:>16} {:>9.2} ms {:>9.2} ms {:>8.3} {:>7.1} ms {:>7.1} ms {:>12.1} {:>12.3}",
            if writing { "writing its disk" } else { "idle" },
            pp,
            sp,
            pp / sp,
            median(&pre, |r| r.total_ms),
            median(&stop, |r| r.total_ms),
            median(&pre, |r| r.disk_bytes) / 1e6,
            median(&pre, |r| r.bytes) / median(&stop, |r| r.bytes)
        );
        if writing {
            println!(
                "pause with the disk written continuously / idle: {:.2}",
                pp / idle_pause.max(1e-3)
            );
        }
    }
}

fn main() {
    let iters = env_count("BEXAR_BENCH_ITERS", 5);
    let dir: PathBuf = std::env::temp_dir().join(format!("bexar-bench-mig-{}", std::process::id()));
    println!(
        "live migration between two VMM processes, {MEMORY_MIB} MiB guest dirtying a {DIRTY_MIB} MiB \
         region, {iters} runs per case (p50)"
    );
    println!(
        "{:>14} {:>12} {:>12} {:>8} {:>14} {:>10} {:>10} {:>12} {:>7}",
        "dirty pages/s",
        "pause pre",
        "pause stop",
        "ratio",
        "guest TSC gap",
        "total pre",
        "total stop",
        "bytes/touch",
        "rounds"
    );
    for rate in [100u64, 10_000, 0] {
        let pre: Vec<Run> = (0..iters).map(|_| migrate_once(&dir, rate, true)).collect();
        let stop: Vec<Run> = (0..iters)
            .map(|_| migrate_once(&dir, rate, false))
            .collect();
        let (pp, sp) = (
            median(&pre, |r| r.paused_ms),
            median(&stop, |r| r.paused_ms),
        );
        // Stop-and-copy sends every touched page once: the guest's memory touched.
        let touched = median(&stop, |r| r.bytes);
        println!(
            "{:>14} {:>9.2} ms {:>9.2} ms {:>8.3} {:>11.2} ms {:>7.1} ms {:>7.1} ms {:>12.3} {:>7.1}",
            if rate == 0 { "flat out".to_owned() } else { rate.to_string() },
            pp,
            sp,
            pp / sp,
            median(&pre, |r| r.guest_gap_ms),
            median(&pre, |r| r.total_ms),
            median(&stop, |r| r.total_ms),
            median(&pre, |r| r.bytes) / touched,
            median(&pre, |r| r.rounds)
        );
    }
    size_cases(&dir, iters);
    disk_cases(&dir, iters);
    write_rate_cases(&dir, iters);
    let _ = std::fs::remove_dir_all(&dir);
}
