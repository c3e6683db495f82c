//! Rate limits measured against a real guest: the test guest's polling drivers make requests
//! (disk reads, NIC transmits) as fast as the device takes them while the VMM's token buckets
//! hold them back. The time is the host's, between the console line the guest prints before it
//! starts and the one it prints when done (the guest's own TSC frequency is a guess on some
//! hosts). A bucket starts full, so the first `size + burst` requests pass at once and the rest
//! at the configured rate; the rate is measured over the rest, across a few seconds, and must be
//! within 10 % of the limit. The VMM's virtio thread must sleep while it waits (no spinning).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// One measurement at a time: two busy guests on a 2-core host would share the cores and blur
/// the timings.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// CPU seconds the VMM thread named `name` of process `pid` has used.
fn thread_cpu(pid: u32, name: &str) -> f64 {
    let tick = 100.0; // USER_HZ
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
            // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
            return ticks / tick;
        }
    }
    panic!("no thread {name} in process {pid}");
}

/// Reads the guest's console until `done` appears, returning the line that holds `report`
/// and the host's seconds from the line holding `start` to that one.
fn wait_report(child: &mut Child, start: &str, report: &str, done: &str) -> (String, f64) {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let (mut t0, mut found) = (None, None);
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the guest stopped talking:\n{}", seen.join("\n")))
            .unwrap();
        let now = std::time::Instant::now();
        assert!(!line.contains("FAIL"), "{}\n{line}", seen.join("\n"));
        if t0.is_none() && line.contains(start) {
            t0 = Some(now);
        }
        if line.contains(report) {
            let t0 = t0.unwrap_or_else(|| panic!("{report:?} before {start:?}"));
            found = Some((line.clone(), now.duration_since(t0).as_secs_f64()));
        }
        let end = line.contains(done);
        seen.push(line);
        if end {
            break;
        }
    }
    found.unwrap_or_else(|| panic!("no {report:?} in:\n{}", seen.join("\n")))
}

/// `key=value` of a report line, as a number.
fn field(line: &str, key: &str) -> f64 {
    line.split([' ', ';'])
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        .parse()
        .unwrap()
}

fn within_10_percent(what: &str, measured: f64, limit: f64) {
    let ratio = measured / limit;
    eprintln!(
        "{what}: measured {measured:.0}/s against a limit of {limit:.0}/s (ratio {ratio:.3})"
    );
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: {measured:.0}/s is not within 10 % of {limit:.0}/s"
    );
}

/// Runs `blk-bench` (4 KiB random reads at QD32, no writes) on a disk with `limits`; returns
/// (requests, seconds, virtio thread CPU seconds).
fn disk_run(limits: &str, iters: u64) -> (f64, f64, f64) {
    let img = tmp("rl.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut child = bexar()
        .arg("run")
        .arg("--kernel")
        .arg(testguest())
        .args(["--no-stdin", "--memory", "64", "--timeout", "120"])
        .arg("--disk")
        .arg(format!("{},ro,{limits}", img.display()))
        .args([
            "--cmdline",
            &format!(
                "console=ttyS0 bexar.test=blk-bench bexar.iters={iters} bexar.mib=0 bexar.after=hang{}",
                guest_platform_params()
            ),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (line, secs) = wait_report(
        &mut child,
        "blk-bench: tsc",
        "randread4k iops=",
        "hanging after blk-bench",
    );
    let cpu = thread_cpu(vmm_of_run(child.id()), "virtio");
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(img).ok();
    (field(&line, "requests"), secs, cpu)
}

#[test]
fn disk_limits_hold_their_rate_honour_bursts_and_sleep_while_they_wait() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 1000 requests/s; the bucket (1000) passes at once.
    let (n, secs, cpu) = disk_run("iops=1000", 3500);
    within_10_percent("disk iops", (n - 1000.0) / secs, 1000.0);
    assert!(secs > 2.0, "{secs} s");
    eprintln!("virtio thread CPU at 1000 requests/s: {cpu:.2} s over {secs:.2} s");

    // The same with a one-time burst of 1500: those pass at once too.
    let (n, burst_secs, _) = disk_run("iops=1000,iops-burst=1500", 4500);
    within_10_percent("disk iops after a burst", (n - 2500.0) / burst_secs, 1000.0);
    // Without the burst 4500 requests would take 3.5 s.
    assert!(
        burst_secs < 2.5,
        "the burst was not honoured: {burst_secs} s"
    );

    // A throttled device waits on its timer: at 20 requests/s the guest's 32 requests wait
    // in the ring and the guest polls without notifying, so the VMM's virtio thread should
    // sleep all along but for 40 short wake-ups (a thread that spun would use all 2 s).
    let (n, secs, cpu) = disk_run("iops=20", 60);
    within_10_percent("disk iops, slow", (n - 20.0) / secs, 20.0);
    eprintln!("virtio thread CPU at 20 requests/s: {cpu:.2} s over {secs:.2} s");
    assert!(
        cpu <= 0.05,
        "the throttled device used {cpu} s of CPU in {secs} s"
    );

    // 4 MiB/s of reads.
    let (n, secs, _) = disk_run("bps=4194304", 3000);
    within_10_percent("disk bytes", (n * 4096.0 - 4194304.0) / secs, 4194304.0);
}

/// Runs `net-blast` (transmit only) on a NIC with `limits` in a namespace with a TAP; returns
/// (frames, bytes, seconds).
fn nic_run(limits: &str, frames: u64) -> (f64, f64, f64) {
    let ns = TapNetns::new("rl");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_bexar"), "run"])
        .arg("--kernel")
        .arg(testguest())
        .args(["--no-stdin", "--memory", "64", "--timeout", "120"])
        .arg("--net")
        .arg(format!("tap=tap0,mac=02:00:00:00:00:0f,{limits}"))
        .args([
            "--cmdline",
            &format!(
                "console=ttyS0 bexar.test=net-blast bexar.frames={frames} bexar.dst-mac=02:00:00:00:00:01{}",
                guest_platform_params()
            ),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (line, secs) = wait_report(
        &mut child,
        "frames of",
        "net-blast: tx frames=",
        "net-blast: tx notifies",
    );
    let _ = child.wait_timeout_or_kill(Duration::from_secs(10));
    (field(&line, "frames"), field(&line, "bytes"), secs)
}

trait WaitOrKill {
    fn wait_timeout_or_kill(&mut self, d: Duration) -> Option<std::process::ExitStatus>;
}

impl WaitOrKill for Child {
    fn wait_timeout_or_kill(&mut self, d: Duration) -> Option<std::process::ExitStatus> {
        let end = std::time::Instant::now() + d;
        while std::time::Instant::now() < end {
            if let Ok(Some(s)) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.kill();
        self.wait().ok()
    }
}

#[test]
fn nic_transmit_limits_hold_their_rate() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 1000 frames/s.
    let (frames, _, secs) = nic_run("tx-pps=1000", 3000);
    within_10_percent("NIC frames", (frames - 1000.0) / secs, 1000.0);
    // 2 MB/s of 1514-byte frames.
    let (_, bytes, secs) = nic_run("tx-bps=2000000", 4000);
    within_10_percent("NIC bytes", (bytes - 2_000_000.0) / secs, 2_000_000.0);
}
