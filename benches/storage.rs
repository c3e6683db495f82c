//! Storage benchmark: the test guest's polling virtio-blk driver against each backend, with a
//! baseline measured in the same run, printed as ratios (asserts nothing about speed).
//!
//! * qcow2 against raw on the same file system, all images in the host page cache: 4 KiB random
//!   reads at QD 32 and 4 KiB random writes at QD 32, on a raw file, on a fully allocated qcow2
//!   (the writes overwrite), and on a fresh overlay over the raw file (the reads fall through to
//!   the base, the writes allocate clusters and copy the rest of each from the base; their
//!   baseline is raw writes into a sparse file, which allocate blocks in the file system);
//!   every image is put in the page cache the same way first (`cache_alike`);
//! * NBD: the same random reads through the VMM's NBD client against fio's own NBD engine
//!   (libnbd) on the same `nbd-server` export;
//! * iSCSI: the same random reads through the VMM's initiator against libiscsi's `iscsi-perf`
//!   (random 4 KiB reads, 32 in flight) on the same tgt LUN;
//! * images through the agent: 20 VMs created and started (to the idle guest's ready line),
//!   each with its own qcow2 overlay on one registered base image, against 20 VMs with no disk.
//!
//! `cargo bench --bench storage`. The guest counts TSC cycles; the bench calibrates the TSC on
//! the host.

mod common;
use common::tests_common as tc;

use std::process::Command;

const MIB: u64 = 256;
const READS: u64 = 50_000;
const WRITES: u64 = 20_000;

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Random 4 KiB reads then writes on `disk`; (read IOPS, write IOPS; NaN where not run).
fn guest(disk: &str, reads: u64, writes: u64, hz: f64) -> (f64, f64) {
    let out = Command::new(common::bexar())
        .args(["run", "--no-stdin", "--timeout", "600", "--memory", "256"])
        .arg("--kernel")
        .arg(common::testguest())
        .args(["--disk", disk])
        .args([
            "--cmdline",
            &format!("bexar.test=blk-bench bexar.iters={reads} bexar.w4k={writes} bexar.mib=0"),
        ])
        .env("BEXAR_LOG", "warn")
        .output()
        .expect("run bexar");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "guest benchmark on {disk} failed:\n{text}"
    );
    let rate = |tag: &str| {
        text.lines()
            .find(|l| l.contains(tag))
            .map(|l| field(l, "requests") / (field(l, "cycles") / hz))
            .unwrap_or(f64::NAN)
    };
    (rate("randread4k"), rate("randwrite4k"))
}

fn fio_nbd_iops(url: &str) -> f64 {
    let out = Command::new("fio")
        .args([
            "--output-format=json",
            "--name=host",
            "--ioengine=nbd",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=32",
            "--size=256M",
        ])
        .arg(format!("--uri={url}"))
        .arg(format!("--number_ios={READS}"))
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio's nbd engine failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The engine prints a line of its own before the JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find('{').unwrap_or(0)..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
    v["jobs"][0]["read"]["iops"].as_f64().unwrap_or(f64::NAN)
}

/// libiscsi's own benchmark: random 4 KiB reads, 32 in flight, for 5 s; its average IOPS.
fn iscsi_perf_iops(url: &str) -> f64 {
    let out = Command::new("iscsi-perf")
        .args(["-m", "32", "-b", "8", "-r", "-t", "5", url])
        .output()
        .expect("run iscsi-perf (scripts/deps installs libiscsi-bin)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iscsi-perf failed: {text}");
    text.rsplit("iops average ")
        .next()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Puts `path` in the page cache the same way for every file: written back, dropped, then
/// read once in order. Buffered 4 KiB writes cost several times more or less depending on how
/// the cached pages got there (a file qemu-img wrote took 10x the writes per second of one
/// `cp` wrote, here), so without this the ratios would measure the writers, not the disks.
fn cache_alike(path: &std::path::Path) {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: advice on a descriptor we own; no memory involved.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
}

fn qemu_img(args: &[&str]) {
    let (code, text) = tc::qemu_img(args);
    assert_eq!(code, 0, "qemu-img {args:?}: {text}");
}

fn main() {
    let dir = std::env::temp_dir().join(format!("bexar-bench-storage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |f: &str| dir.join(f).display().to_string();
    let hz = common::tsc_hz();

    // The same bytes three ways; each run gets its own copy, so one run's writes do not
    // change the next one's reads.
    tc::random_file(&dir.join("base.raw"), MIB << 20, 0x5eed);
    std::fs::copy(dir.join("base.raw"), dir.join("raw.raw")).unwrap();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &p("base.raw"),
        &p("full.qcow2"),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &p("overlay.qcow2"),
    ]);

    for f in ["base.raw", "raw.raw", "full.qcow2", "overlay.qcow2"] {
        cache_alike(&dir.join(f));
    }
    // Allocating writes have their own baseline: raw writes that allocate too, into a
    // sparse file of the same size (the file system finds blocks, as qcow2 finds clusters).
    std::fs::File::create(dir.join("sparse.raw"))
        .unwrap()
        .set_len(MIB << 20)
        .unwrap();
    let (_, sparse_w) = guest(&p("sparse.raw"), 1, WRITES, hz);
    let (raw_r, raw_w) = guest(&p("raw.raw"), READS, WRITES, hz);
    let (full_r, full_w) = guest(&p("full.qcow2"), READS, WRITES, hz);
    let (ovl_r, ovl_w) = guest(&p("overlay.qcow2"), READS, WRITES, hz);

    // NBD: the guest through the VMM's client, fio through libnbd, one export.
    let mut server = tc::NbdServer::start("nbd-server", &dir.join("base.raw"), &dir);
    let (nbd_r, _) = guest(&format!("{},ro", server.url("")), READS, 0, hz);
    let fio_r = fio_nbd_iops(&server.url(""));
    server.kill();
    // iSCSI: the guest through the VMM's initiator, iscsi-perf through libiscsi, one LUN.
    let mut tgt = tc::Tgt::start(&dir.join("base.raw"), None, false);
    let (iscsi_r, _) = guest(&tgt.url(",ro"), READS, 0, hz);
    let perf_r = iscsi_perf_iops(&tgt.url(""));
    tgt.kill();
    let (with_image, without) = images_through_the_agent(&dir);
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "storage benchmark: {MIB} MiB images in the host page cache, 4 KiB requests at QD 32, TSC {:.0} MHz",
        hz / 1e6
    );
    println!(
        "{:<44} {:>12} {:>12} {:>7}",
        "pattern", "IOPS", "baseline", "ratio"
    );
    let row = |what: &str, v: f64, base: f64| {
        println!("{what:<44} {v:>12.0} {base:>12.0} {:>7.2}", v / base);
    };
    row("qcow2 reads (allocated) vs raw", full_r, raw_r);
    row("qcow2 overlay reads (from a raw base) vs raw", ovl_r, raw_r);
    row("qcow2 overwrites vs raw writes", full_w, raw_w);
    row(
        "qcow2 allocating writes vs raw into a hole",
        ovl_w,
        sparse_w,
    );
    row("NBD reads (VMM client) vs fio nbd engine", nbd_r, fio_r);
    row("iSCSI reads (VMM initiator) vs iscsi-perf", iscsi_r, perf_r);
    println!(
        "20 VMs created+started through the agent: {with_image:.2} s with an overlay each on one image, {without:.2} s with no disk (ratio {:.2})",
        with_image / without
    );
}

/// Seconds to create and start 20 VMs (until each guest is ready) with a disk made from a
/// registered image, and without a disk.
fn images_through_the_agent(dir: &std::path::Path) -> (f64, f64) {
    use serde_json::json;
    let socket = dir.join("api.sock");
    let mut cmd = tc::bexar();
    cmd.arg("agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--cpu-allocation-ratio", "200"]);
    let mut agent = tc::spawn_agent(cmd, dir, &socket);
    let c = bexar_agent::api::client::Client::new(&socket);
    let guest = common::testguest();
    let times = tc::rt().block_on(async {
        let r = c
            .post(
                "/v1/images",
                &json!({"id": "base", "path": dir.join("base.raw").display().to_string()}),
            )
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 201, "{}", String::from_utf8_lossy(&r.body));
        let mut times = Vec::new();
        for with_disk in [true, false] {
            let t = std::time::Instant::now();
            for i in 0..20 {
                let id = format!("{}-{i}", if with_disk { "img" } else { "bare" });
                let mut spec = json!({
                    "id": id, "vcpus": 1, "memory_mib": 32,
                    "boot": {"kernel": guest.display().to_string(), "cmdline": "console=ttyS0 bexar.test=idle"}
                });
                if with_disk {
                    spec["disks"] = json!([{"image": "base"}]);
                }
                let r = c.post("/v1/vms?start=true", &spec).await.unwrap();
                assert_eq!(r.status.as_u16(), 201, "{}", String::from_utf8_lossy(&r.body));
                let console = format!("/v1/vms/{id}/console");
                while !String::from_utf8_lossy(&c.get(&console).await.unwrap().body).contains("idle: ready") {
                    tokio::time::sleep(std::time::Duration::from_micros(500)).await;
                }
            }
            times.push(t.elapsed().as_secs_f64());
            for i in 0..20 {
                let id = format!("{}-{i}", if with_disk { "img" } else { "bare" });
                let _ = c.delete(&format!("/v1/vms/{id}")).await;
            }
        }
        times
    });
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = Command::new("pkill")
        .args(["-9", "-f"])
        .arg(dir.join("state").as_os_str())
        .status();
    // The VMs' cgroups, once their processes are gone.
    std::thread::sleep(std::time::Duration::from_millis(200));
    tc::remove_agent_cgroups(dir);
    (times[0], times[1])
}
