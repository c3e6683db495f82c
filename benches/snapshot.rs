//! Snapshot and restore benchmark, each against a baseline measured in the same run:
//!
//! * **restore against boot**: `bexar run --restore` of a 128 MiB test guest (snapshotted while
//!   it waits for a console line) against a fresh `bexar run` of the same guest, from exec to
//!   the guest's first console byte (for the restored guest: its echo of the line the bench
//!   writes at once), and the VMM's own time from its start to the vCPUs' first run
//!   (`running_ms` in the outcome: the restore itself, the target is 5 ms at p50);
//! * **live upgrade against a cold start**: a running 128 MiB, 2-vCPU guest handed to a new VMM
//!   process through the agent ten times; the pause its guest saw (measured across the two
//!   processes) against `bexar run` of the same guest to its ready line;
//! * **snapshot size and time against memory touched**: a guest that writes N MiB is
//!   snapshotted; the memory file's data against the guest's resident memory just before
//!   (the target is within 5 %), and the snapshot's time against a host process writing and
//!   syncing the same bytes to the same file system.
//!
//! `cargo bench --bench snapshot` (BEXAR_BENCH_ITERS=N for the restore samples, default 20).
//! Prints medians and ratios; it asserts nothing about time.

mod common;
use common::percentile;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("bexar-bench-snap-{}-{name}", std::process::id()))
}

fn control(socket: &Path, req: serde_json::Value) -> serde_json::Value {
    let v = common::vmm_control(socket, &req);
    assert_eq!(v["ok"], true, "{v}");
    v
}

/// Starts `bexar run` of the test guest in `mode` with `mib` MiB and a control socket; returns
/// once its console printed `ready`.
fn boot_until(
    bexar: &Path,
    guest: &Path,
    mode: &str,
    mib: u64,
    socket: &Path,
    ready: &str,
) -> Child {
    let mut child = Command::new(bexar)
        .args([
            "run",
            // Snapshots to a path of the benchmark's: a jailed run sees only its empty root.
            "--no-jail",
            "--no-stdin",
            "--memory",
            &mib.to_string(),
            "--cmdline",
        ])
        .arg(format!("bexar.test={mode}"))
        .arg("--kernel")
        .arg(guest)
        .arg("--control")
        .arg(socket)
        .env("BEXAR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start bexar");
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains(ready) {
        match out.read(&mut b) {
            Ok(0) | Err(_) => panic!("the guest ended before {ready:?}"),
            Ok(n) => seen.extend_from_slice(&b[..n]),
        }
    }
    // Keep draining so the guest never blocks on a full pipe.
    std::thread::spawn(move || while matches!(out.read(&mut b), Ok(n) if n > 0) {});
    child
}

struct Start {
    first_byte_ms: f64,
    running_ms: f64,
}

fn run_sample(mut cmd: Command, input: Option<&[u8]>, result: &Path) -> Start {
    let t = Instant::now();
    let mut child = cmd
        .arg("--result-json")
        .arg(result)
        .env("BEXAR_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start bexar");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(i) = input {
        stdin.write_all(i).unwrap();
    }
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    assert_eq!(out.read(&mut b).unwrap(), 1, "the guest printed nothing");
    let first_byte_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success(), "bexar run: {status}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(result).unwrap()).unwrap();
    Start {
        first_byte_ms,
        running_ms: json["running_ms"].as_f64().unwrap_or(f64::NAN),
    }
}

fn restore_against_boot(bexar: &Path, guest: &Path, iters: usize) {
    let dir = tmp("echo");
    let socket = tmp("echo.sock");
    let result = tmp("result.json");
    let mut vm = boot_until(bexar, guest, "echo", 128, &socket, "echo: ready");
    control(
        &socket,
        serde_json::json!({"op": "snapshot", "dir": dir, "then": "stop"}),
    );
    vm.wait().unwrap();
    let boot = || {
        let mut c = Command::new(bexar);
        c.args([
            "run",
            "--memory",
            "128",
            "--cmdline",
            "bexar.test=minimal",
            "--kernel",
        ])
        .arg(guest);
        c
    };
    let restore = || {
        let mut c = Command::new(bexar);
        c.args(["run", "--restore"]).arg(&dir);
        c
    };
    for _ in 0..3 {
        run_sample(boot(), None, &result);
        run_sample(restore(), Some(b"x\n"), &result);
    }
    let (mut bf, mut br, mut rf, mut rr) = (vec![], vec![], vec![], vec![]);
    for _ in 0..iters {
        let b = run_sample(boot(), None, &result);
        bf.push(b.first_byte_ms);
        br.push(b.running_ms);
        let r = run_sample(restore(), Some(b"x\n"), &result);
        rf.push(r.first_byte_ms);
        rr.push(r.running_ms);
    }
    let (bf50, rf50) = (percentile(&mut bf, 0.5), percentile(&mut rf, 0.5));
    let (br50, rr50) = (percentile(&mut br, 0.5), percentile(&mut rr, 0.5));
    println!("restore of a 128 MiB test guest against a fresh boot of it ({iters} samples each):");
    println!(
        "  exec to the guest's first console byte: restore {rf50:.2} ms (p90 {:.2}), boot {bf50:.2} ms (p90 {:.2}), ratio {:.3}",
        percentile(&mut rf, 0.9),
        percentile(&mut bf, 0.9),
        rf50 / bf50
    );
    println!(
        "  VMM start to the vCPUs' first run: restore {rr50:.2} ms (p90 {:.2}), boot {br50:.2} ms (p90 {:.2}), ratio {:.3}",
        percentile(&mut rr, 0.9),
        percentile(&mut br, 0.9),
        rr50 / br50
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_file(&result).ok();
    std::fs::remove_file(&socket).ok();
}

/// Resident guest memory (the memfd's pages) of process `pid`, in bytes.
fn guest_resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    bexar_util::procfs::kib_field(&status, "RssShmem:").unwrap() << 10
}

/// Writes `bytes` to a file in `dir` and syncs it: what the host's own writer takes.
fn host_write(dir: &Path, bytes: u64) -> f64 {
    let path = dir.join("host-write");
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_data().unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    std::fs::remove_file(&path).ok();
    ms
}

fn snapshot_against_touched(bexar: &Path, guest: &Path) {
    println!("snapshot of a 256 MiB test guest that wrote N MiB (3 samples each, medians):");
    for mib in [16u64, 64] {
        let (mut size, mut time, mut paused, mut host) = (vec![], vec![], vec![], vec![]);
        for _ in 0..3 {
            let dir = tmp(&format!("touch{mib}"));
            let socket = tmp("touch.sock");
            let mode = format!("touch bexar.touch-mib={mib}");
            let mut vm = boot_until(bexar, guest, &mode, 256, &socket, "pages written");
            let touched = guest_resident(common::vmm_of_run(vm.id()));
            let t = Instant::now();
            let r = control(
                &socket,
                serde_json::json!({"op": "snapshot", "dir": dir, "then": "stop"}),
            );
            time.push(t.elapsed().as_secs_f64() * 1e3);
            vm.wait().unwrap();
            let saved = r["snapshot"]["memory_saved_bytes"].as_u64().unwrap();
            size.push(saved as f64 / touched as f64);
            paused.push(r["snapshot"]["paused_ms"].as_f64().unwrap());
            host.push(host_write(&dir, saved));
            std::fs::remove_dir_all(&dir).ok();
            std::fs::remove_file(&socket).ok();
        }
        let (t50, h50) = (percentile(&mut time, 0.5), percentile(&mut host, 0.5));
        println!(
            "  {mib} MiB: memory file data / guest resident memory {:.3}; snapshot {t50:.1} ms (vCPUs paused {:.1} ms) against a host write of the same bytes {h50:.1} ms, ratio {:.2}",
            percentile(&mut size, 0.5),
            percentile(&mut paused, 0.5),
            t50 / h50
        );
    }
}

fn live_upgrade_against_cold_start(bexar: &Path, guest: &Path) {
    use bexar_agent::api::client::Client;
    let dir = tmp("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let mut agent = Command::new(bexar)
        .arg("agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("BEXAR_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    while UnixStream::connect(&socket).is_err() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    const UPGRADES: usize = 10;
    let mut pauses = rt.block_on(async {
        let c = Client::new(&socket);
        let spec = serde_json::json!({
            "id": "up", "vcpus": 2, "memory_mib": 128,
            "boot": {"kernel": guest, "cmdline": "console=ttyS0 bexar.test=idle"}
        });
        let r = c.post("/v1/vms?start=true", &spec).await.unwrap();
        assert_eq!(
            r.status.as_u16(),
            201,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        while !String::from_utf8_lossy(&c.get("/v1/vms/up/console").await.unwrap().body)
            .contains("idle: ready")
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for _ in 0..UPGRADES {
            let r = c
                .post("/v1/vms/up/upgrade", &serde_json::Value::Null)
                .await
                .unwrap();
            assert_eq!(
                r.status.as_u16(),
                200,
                "{}",
                String::from_utf8_lossy(&r.body)
            );
        }
        let events =
            String::from_utf8_lossy(&c.get("/v1/events?vm=up").await.unwrap().body).into_owned();
        let _ = c.delete("/v1/vms/up").await;
        events
            .lines()
            .filter(|l| l.contains("\"upgraded\""))
            .filter_map(|l| l.split("paused ").nth(1)?.split(' ').next()?.parse().ok())
            .collect::<Vec<f64>>()
    });
    let _ = agent.kill();
    let _ = agent.wait();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(pauses.len(), UPGRADES, "every upgrade reported its pause");
    for _ in 0..2 {
        common::cold_start(bexar, guest, 2, 128);
    }
    let mut cold: Vec<f64> = (0..10)
        .map(|_| common::cold_start(bexar, guest, 2, 128))
        .collect();
    let (p50, cold50) = (percentile(&mut pauses, 0.5), percentile(&mut cold, 0.5));
    println!(
        "live upgrade of a running 128 MiB, 2-vCPU test guest ({UPGRADES} handovers): guest paused p50 {p50:.2} ms (p90 {:.2}); a cold start to ready p50 {cold50:.2} ms; ratio {:.3}",
        percentile(&mut pauses, 0.9),
        p50 / cold50
    );
}

fn main() {
    let bexar = common::bexar();
    let guest = common::testguest();
    let iters = common::env_count("BEXAR_BENCH_ITERS", 20);
    restore_against_boot(&bexar, &guest, iters);
    live_upgrade_against_cold_start(&bexar, &guest);
    snapshot_against_touched(&bexar, &guest);
}
