//! virtio-net transmit throughput to a TAP peer, driven by the test guest (`net-blast`: it keeps
//! the tx ring full), side by side with the host writing the same frames straight into a TAP,
//! in the same run, inside a network namespace the bench creates (and removes).
//!
//! Prints frames per second and Gbit/s at 64 and 1514-byte frames, and the ratio guest/host.
//! The guest counts TSC cycles; the bench calibrates the TSC (PVM hides its frequency from the
//! guest). Needs root (netns, TAP). Asserts nothing about speed.

mod common;
use common::tsc_hz;

use std::process::Command;
use std::time::Instant;

const FRAMES: u64 = 200_000;

fn ip(args: &[&str]) {
    let ok = Command::new("ip").args(args).status().map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "ip {args:?} failed");
}

/// Inside the namespace: write `count` frames of `size` bytes (plus a zero virtio-net header)
/// into TAP `name` as fast as possible; print the elapsed seconds.
fn host_blast(name: &str, size: usize, count: u64) {
    use std::io::Write;
    let tap = bexar_devices::tap::Tap::open(name).expect("open the TAP");
    let mut frame = vec![0u8; bexar_devices::tap::VNET_HDR_LEN + size];
    let eth = &mut frame[bexar_devices::tap::VNET_HDR_LEN..];
    eth[..6].fill(0xff);
    eth[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    eth[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    let mut f = tap.file();
    let t = Instant::now();
    let mut sent = 0;
    while sent < count {
        match f.write(&frame) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => panic!("write to the TAP: {e}"),
        }
    }
    println!("{}", t.elapsed().as_secs_f64());
}

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--host-blast") {
        host_blast(&args[2], args[3].parse().unwrap(), args[4].parse().unwrap());
        return;
    }
    let bexar = common::bexar();
    let guest = common::testguest();
    let me = std::env::current_exe().unwrap();
    let ns = format!("bexar-bench-{}", std::process::id());
    ip(&["netns", "add", &ns]);
    for tap in ["tap0", "tap1"] {
        ip(&[
            "-n", &ns, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
        ]);
        ip(&["-n", &ns, "link", "set", tap, "up"]);
    }
    // Host IPv6 chatter on the TAP would skew the guest's timing.
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
        ])
        .status();
    let hz = tsc_hz();
    let mut rows = Vec::new();
    for size in [64usize, 1514] {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                bexar.to_str().expect("a UTF-8 path"),
                "run",
                "--no-stdin",
                "--timeout",
                "120",
            ])
            .arg("--kernel")
            .arg(&guest)
            .args([
                "--net",
                "tap=tap0",
                "--cmdline",
                &format!("bexar.test=net-blast bexar.frames={FRAMES} bexar.frame-size={size}"),
            ])
            .env("BEXAR_LOG", "warn")
            .output()
            .expect("run bexar");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("net-blast: tx"))
            .unwrap_or_else(|| panic!("no net-blast line:\n{text}"))
            .to_owned();
        let g_secs = field(&line, "cycles") / hz;
        let g_frames = field(&line, "frames");
        let host = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&me)
            .args([
                "--host-blast",
                "tap1",
                &size.to_string(),
                &FRAMES.to_string(),
            ])
            .output()
            .expect("host blast");
        let h_secs: f64 = String::from_utf8_lossy(&host.stdout)
            .trim()
            .parse()
            .unwrap_or(f64::NAN);
        rows.push((size, g_frames / g_secs, FRAMES as f64 / h_secs));
    }
    ip(&["netns", "del", &ns]);
    println!(
        "virtio-net transmit benchmark: {FRAMES} frames per run into a TAP, TSC {:.0} MHz",
        hz / 1e6
    );
    println!(
        "{:<12} {:>16} {:>10} {:>16} {:>10} {:>7}",
        "frame size", "guest frames/s", "Gbit/s", "host frames/s", "Gbit/s", "ratio"
    );
    for (size, g, h) in rows {
        let gbit = |fps: f64| fps * size as f64 * 8.0 / 1e9;
        println!(
            "{:<12} {:>16.0} {:>10.2} {:>16.0} {:>10.2} {:>7.2}",
            format!("{size} B"),
            g,
            gbit(g),
            h,
            gbit(h),
            g / h
        );
    }
}
