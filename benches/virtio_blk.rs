//! virtio-blk throughput driven by the test guest's polling driver, side by side with the same
//! pattern run by fio on the host on the same file, in the same run:
//!
//! * 4 KiB random reads at queue depth 32,
//! * 128 KiB sequential writes (queue depth 4 in the guest; fio the same).
//!
//! The image (256 MiB of random bytes) sits in the host page cache for both (fio runs with
//! `--invalidate=0`, its default would drop the cache first), and the device uses
//! buffered I/O, so this measures the VMM's request path rather than the disk. The guest counts
//! TSC cycles; the bench calibrates the TSC on the host (PVM hides its frequency from the guest).
//! Prints IOPS, MB/s and the ratio guest/host; asserts nothing about speed.

mod common;
use common::tsc_hz;

use std::path::Path;
use std::process::Command;

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn fio(file: &Path, engine: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new("fio")
        .args([
            "--output-format=json",
            "--name=host",
            "--direct=0",
            "--invalidate=0",
        ])
        .arg(format!("--ioengine={engine}"))
        .arg(format!("--filename={}", file.display()))
        .args(args)
        .output()
        .expect("run fio (scripts/deps installs it)");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    v["jobs"][0].clone()
}

fn main() {
    let bexar = common::bexar();
    let guest = common::testguest();
    let img = std::env::temp_dir().join(format!("bexar-bench-blk-{}.img", std::process::id()));
    let mib = 256usize;
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&img, &data).expect("write the image");
    drop(data);
    // Written back before either side measures: the kernel's writeback of this image (and of
    // a build just before, in CI) otherwise runs on the same two cores as the guest's first
    // run, which got a third of its rate right after a build here.
    nix::unistd::sync();
    // Long enough that both sides run for about half a second here (100 000 ran for a tenth,
    // and the ratio moved by a third between runs).
    let iters = 300_000;

    let hz = tsc_hz();
    let out = Command::new(&bexar)
        .args(["run", "--no-stdin", "--timeout", "300", "--memory", "256"])
        .arg("--kernel")
        .arg(&guest)
        .arg("--disk")
        .arg(&img)
        .args([
            "--cmdline",
            &format!("bexar.test=blk-bench bexar.iters={iters} bexar.mib={mib}"),
        ])
        .env("BEXAR_LOG", "warn")
        .output()
        .expect("run bexar");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "guest benchmark failed:\n{text}");
    let line = |tag: &str| {
        text.lines()
            .find(|l| l.contains(tag))
            .unwrap_or_else(|| panic!("no {tag} line in:\n{text}"))
            .to_owned()
    };
    let rr = line("randread4k");
    let sw = line("seqwrite128k");
    let g_iops = field(&rr, "requests") / (field(&rr, "cycles") / hz);
    let g_mbps = field(&sw, "bytes") / (field(&sw, "cycles") / hz) / 1e6;

    // Two host baselines: io_uring at the guest's queue depth, and psync: the plain
    // pread/pwrite the device itself issues, one at a time.
    let n = format!("--number_ios={iters}");
    let iops = |engine: &str, qd: &str| {
        let args = ["--rw=randread", "--bs=4k", n.as_str(), "--size=256M", qd];
        fio(&img, engine, &args)["read"]["iops"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let mbps = |engine: &str, qd: &str| {
        let args = ["--rw=write", "--bs=128k", "--size=256M", qd];
        fio(&img, engine, &args)["write"]["bw_bytes"]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1e6
    };
    let (u_iops, p_iops) = (
        iops("io_uring", "--iodepth=32"),
        iops("psync", "--iodepth=1"),
    );
    let (u_mbps, p_mbps) = (
        mbps("io_uring", "--iodepth=4"),
        mbps("psync", "--iodepth=1"),
    );
    let _ = std::fs::remove_file(&img);

    println!(
        "virtio-blk benchmark: 256 MiB image in the host page cache, buffered I/O, TSC {:.0} MHz",
        hz / 1e6
    );
    println!(
        "{:<28} {:>14} {:>20} {:>7} {:>20} {:>7}",
        "pattern", "guest", "host fio io_uring", "ratio", "host fio psync", "ratio"
    );
    println!(
        "{:<28} {:>9.0} IOPS {:>15.0} IOPS {:>7.2} {:>15.0} IOPS {:>7.2}",
        "4 KiB random reads, QD 32",
        g_iops,
        u_iops,
        g_iops / u_iops,
        p_iops,
        g_iops / p_iops
    );
    println!(
        "{:<28} {:>9.0} MB/s {:>15.0} MB/s {:>7.2} {:>15.0} MB/s {:>7.2}",
        "128 KiB sequential writes",
        g_mbps,
        u_mbps,
        g_mbps / u_mbps,
        p_mbps,
        g_mbps / p_mbps
    );
}
