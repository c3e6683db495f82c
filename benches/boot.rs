//! Start-up benchmark of `bexar run` with the ring-3 test guest, against an empty process start
//! measured in the same run:
//!
//! * exec to the guest's first UART byte (read off the VMM's stdout pipe),
//! * exec to the VMM's exit after the guest reported its status,
//! * the VMM's own resident memory beyond guest memory (VmRSS - RssShmem at exit), and, with
//!   ten idle VMMs running together, each one's proportional share (PSS, so the binary's pages
//!   shared by all count once), its unique pages (USS) and the kernel memory each one adds.
//!
//! With `BEXAR_BENCH_BASELINE_BIN=PATH` (another bexar, `scripts/baseline` builds one of an
//! earlier commit), that binary is measured the same way in the same run, its samples
//! interleaved with this one's, and both are printed with their ratio.
//!
//! `cargo bench --bench boot` (BEXAR_BENCH_ITERS=N to change the sample count). The test guest
//! must be built (`cd firmware && cargo build --release`). Prints medians, p90s and the ratio to
//! the baseline; it asserts nothing about time.

mod common;
use common::percentile;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn time_true() -> Duration {
    let t = Instant::now();
    let s = Command::new("/bin/true").status().expect("run /bin/true");
    assert!(s.success());
    t.elapsed()
}

struct Sample {
    first_byte: Duration,
    exit: Duration,
    vmm_rss_kib: f64,
    vmm_private_kib: f64,
}

/// `bexar run` of the test guest in mode `test` with 32 MiB, its console on a pipe.
fn bexar_run(bexar: &Path, guest: &Path, test: &str) -> Command {
    let mut cmd = Command::new(bexar);
    cmd.args(["run", "--no-stdin", "--memory", "32", "--cmdline"])
        .arg(format!("bexar.test={test}"))
        .arg("--kernel")
        .arg(guest)
        .env("BEXAR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd
}

fn time_bexar(bexar: &Path, guest: &Path, result: &Path) -> Sample {
    let t = Instant::now();
    let mut child = bexar_run(bexar, guest, "minimal")
        .arg("--result-json")
        .arg(result)
        .spawn()
        .expect("start bexar");
    let mut out = child.stdout.take().expect("stdout");
    let mut b = [0u8; 1];
    let first_byte = match out.read(&mut b) {
        Ok(1) => t.elapsed(),
        _ => panic!("the guest printed nothing"),
    };
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let status = child.wait().expect("wait bexar");
    let exit = t.elapsed();
    assert!(status.success(), "bexar run failed: {status}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(result).expect("result json")).expect("json");
    Sample {
        first_byte,
        exit,
        vmm_rss_kib: json["vmm_rss_kib"].as_f64().unwrap_or(f64::NAN),
        vmm_private_kib: json["vmm_private_kib"].as_f64().unwrap_or(f64::NAN),
    }
}

/// What `vms` idle VMMs running side by side cost, per VM, beyond guest RAM.
struct Fleet {
    vms: usize,
    /// Proportional set size minus the guest's shared-memory pages: the binary's pages are
    /// shared by every VMM and counted once in all.
    pss_kib: f64,
    /// Unique set size (pages mapped by this VMM alone) minus the guest's pages: what the
    /// host gets back when this one VMM exits.
    uss_kib: f64,
    /// Growth of the kernel's own memory per VM: page tables, KVM's secondary (shadow or EPT)
    /// page tables, kernel stacks and unreclaimable slab (vCPU state, KVM structures).
    kernel_kib: f64,
}

fn kernel_kib() -> f64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    [
        "PageTables:",
        "SecPageTables:",
        "KernelStack:",
        "SUnreclaim:",
    ]
    .iter()
    .filter_map(|f| bexar_util::procfs::kib_field(&text, f))
    .sum::<u64>() as f64
}

fn fleet_memory(bexar: &Path, guest: &Path, vms: usize) -> Fleet {
    let before = kernel_kib();
    let mut children = Vec::new();
    for _ in 0..vms {
        let mut child = bexar_run(bexar, guest, "idle")
            .args(["--timeout", "60"])
            .spawn()
            .expect("start bexar");
        // Wait for the guest's ready line, so its boot-time pages are all there.
        let mut out = child.stdout.take().expect("stdout");
        let mut seen = Vec::new();
        let mut b = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("idle: ready") {
            match out.read(&mut b) {
                Ok(0) | Err(_) => panic!("the idle guest ended before it was ready"),
                Ok(n) => seen.extend_from_slice(&b[..n]),
            }
        }
        children.push((child, out));
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = kernel_kib();
    let (mut pss, mut uss) = (0.0, 0.0);
    for (child, _) in &children {
        let rollup = std::fs::read_to_string(format!(
            "/proc/{}/smaps_rollup",
            common::vmm_of_run(child.id())
        ))
        .expect("smaps_rollup");
        let field = |name| bexar_util::procfs::kib_field(&rollup, name).unwrap_or(0) as f64;
        pss += field("Pss:") - field("Pss_Shmem:");
        // The guest's memfd pages are mapped by this VMM alone, so its Pss_Shmem is all private.
        uss += field("Private_Clean:") + field("Private_Dirty:") - field("Pss_Shmem:");
    }
    for (mut child, _) in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    Fleet {
        vms,
        pss_kib: pss / vms as f64,
        uss_kib: uss / vms as f64,
        kernel_kib: (after - before) / vms as f64,
    }
}

/// How many idle VMMs the memory measures run together.
const FLEET_VMS: usize = 10;

/// One binary's samples.
#[derive(Default)]
struct Series {
    first: Vec<f64>,
    exit: Vec<f64>,
    rss: Vec<f64>,
    private: Vec<f64>,
}

impl Series {
    fn push(&mut self, s: Sample) {
        self.first.push(s.first_byte.as_secs_f64() * 1e3);
        self.exit.push(s.exit.as_secs_f64() * 1e3);
        self.rss.push(s.vmm_rss_kib);
        self.private.push(s.vmm_private_kib);
    }
}

fn main() {
    let bexar = common::bexar();
    let guest = common::testguest();
    let iters = common::env_count("BEXAR_BENCH_ITERS", 50);
    let result = std::env::temp_dir().join(format!("bexar-bench-{}.json", std::process::id()));
    let previous = std::env::var_os("BEXAR_BENCH_BASELINE_BIN")
        .map(std::path::PathBuf::from)
        .filter(|p| {
            let ok = p.is_file();
            if !ok && !p.as_os_str().is_empty() {
                eprintln!(
                    "BEXAR_BENCH_BASELINE_BIN {} is not a file: ignored",
                    p.display()
                );
            }
            ok
        });

    // Warm up the page cache for all.
    for _ in 0..3 {
        time_true();
        time_bexar(&bexar, &guest, &result);
        if let Some(p) = &previous {
            time_bexar(p, &guest, &result);
        }
    }
    let mut base = Vec::new();
    let mut now = Series::default();
    let mut before = Series::default();
    for _ in 0..iters {
        // Interleave so all see the same machine load.
        base.push(time_true().as_secs_f64() * 1e3);
        now.push(time_bexar(&bexar, &guest, &result));
        if let Some(p) = &previous {
            before.push(time_bexar(p, &guest, &result));
        }
    }
    let _ = std::fs::remove_file(&result);
    let b50 = percentile(&mut base, 0.5);
    let b90 = percentile(&mut base, 0.9);
    println!(
        "bexar boot benchmark: {iters} runs, test guest `minimal`, 1 vCPU, 32 MiB, {}",
        bexar.display()
    );
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "measure", "p50", "p90", "x base"
    );
    println!(
        "{:<44} {:>7.3} ms {:>7.3} ms {:>8}",
        "baseline: exec to exit of /bin/true", b50, b90, "1.0"
    );
    for (name, v) in [
        ("bexar: exec to first guest UART byte", &mut now.first),
        ("bexar: exec to VMM exit (guest status 0)", &mut now.exit),
    ] {
        let p50 = percentile(v, 0.5);
        let p90 = percentile(v, 0.9);
        println!("{name:<44} {p50:>7.3} ms {p90:>7.3} ms {:>8.1}", p50 / b50);
    }
    let r50 = percentile(&mut now.rss, 0.5);
    println!(
        "{:<44} {:>7.0} KiB {:>6.0} KiB",
        "bexar: VMM RSS beyond guest memory (all pages)",
        r50,
        percentile(&mut now.rss, 0.9)
    );
    let p50 = percentile(&mut now.private, 0.5);
    println!(
        "{:<44} {:>7.0} KiB {:>6.0} KiB",
        "bexar: VMM anonymous memory (per-VM cost)",
        p50,
        percentile(&mut now.private, 0.9)
    );
    let fleet = fleet_memory(&bexar, &guest, FLEET_VMS);
    println!(
        "{:<44} {:>7.0} KiB   (Pss - Pss_Shmem, mean of {} idle VMMs running together)",
        "bexar: VMM proportional memory beyond guest", fleet.pss_kib, fleet.vms
    );
    println!(
        "{:<44} {:>7.0} KiB   (private pages, freed when that one VMM exits)",
        "bexar: VMM unique memory beyond guest (USS)", fleet.uss_kib
    );
    println!(
        "{:<44} {:>7.0} KiB   (page tables, KVM page tables, kernel stacks, unreclaimable slab)",
        "bexar: kernel memory per VM", fleet.kernel_kib
    );
    println!("targets on this machine: exec to exit < 4 ms (p50), VMM memory < 2048 KiB");
    let Some(prev) = previous else {
        return;
    };
    let old_fleet = fleet_memory(&prev, &guest, FLEET_VMS);
    println!(
        "against the previous binary {} (same run; timings interleaved, fleets one after the other):",
        prev.display()
    );
    println!(
        "{:<44} {:>11} {:>11} {:>8}",
        "measure (p50)", "this", "previous", "ratio"
    );
    let row = |name: &str, this: f64, prev: f64, unit: &str| {
        println!(
            "{name:<44} {this:>8.3} {unit:<2} {prev:>8.3} {unit:<2} {:>8.3}",
            this / prev
        );
    };
    type Pick = fn(&mut Series) -> &mut Vec<f64>;
    let timed: [(&str, Pick, f64, &str); 4] = [
        ("exec to first guest UART byte", |s| &mut s.first, 0.5, "ms"),
        ("exec to VMM exit", |s| &mut s.exit, 0.5, "ms"),
        ("exec to VMM exit, p90", |s| &mut s.exit, 0.9, "ms"),
        ("VMM anonymous memory", |s| &mut s.private, 0.5, "KiB"),
    ];
    for (name, pick, q, unit) in timed {
        let (this, prev) = (
            percentile(pick(&mut now), q),
            percentile(pick(&mut before), q),
        );
        row(name, this, prev, unit);
    }
    let uss = format!("VMM unique memory (USS, {FLEET_VMS} idle VMMs)");
    row(&uss, fleet.uss_kib, old_fleet.uss_kib, "KiB");
    let pss = format!("VMM proportional memory (PSS, {FLEET_VMS} idle VMMs)");
    row(&pss, fleet.pss_kib, old_fleet.pss_kib, "KiB");
}
