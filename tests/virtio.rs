//! virtio devices on real KVM, driven by the test guest's polling drivers (ring 3, so each run
//! takes milliseconds): data integrity on virtio-blk (also across a kill -9 of the VMM), read-only
//! disks, discard and write-zeroes, entropy, frames through a TAP in a network namespace the test
//! creates, and a hostile driver that must not hurt the VMM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;

fn disk(name: &str, mib: u64) -> std::path::PathBuf {
    let p = tmp(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    p
}

fn outcome(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&read(path)).expect("result json")
}

fn device<'a>(json: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    json["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} device in {json}"))
}

#[test]
fn test_guest_finds_every_device() {
    let d = disk("scan.img", 8);
    let o = run_testguest("virtio-scan", &["--disk", d.to_str().unwrap(), "--rng"]);
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(
        out.contains("slot 0 at 0xd0000000: device id 2 (block), version 2"),
        "{out}"
    );
    assert!(
        out.contains("slot 1 at 0xd0001000: device id 4 (entropy), version 2"),
        "{out}"
    );
    std::fs::remove_file(d).ok();
}

#[test]
fn written_data_reads_back_and_survives_a_killed_vmm() {
    let d = disk("persist.img", 64);
    // Write, verify and flush, then hang: the VMM is killed with SIGKILL, not stopped.
    let guest = testguest();
    let mut child = bexar()
        .arg("run")
        .arg("--kernel")
        .arg(&guest)
        .args([
            "--cmdline",
            "bexar.test=blk-rw bexar.seed=7 bexar.after=hang",
        ])
        .arg("--disk")
        .arg(&d)
        .args(["--timeout", "60", "--no-stdin"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines.next().expect("the guest stopped talking").unwrap();
        seen.push(line.clone());
        if line.contains("FAIL") {
            panic!("{}", seen.join("\n"));
        }
        if line.contains("hanging after blk-rw") {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.contains("blk: flush ok")), "{seen:?}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // A new VM on the same image finds every region.
    let o = run_testguest(
        "blk-verify",
        &[
            "--disk",
            d.to_str().unwrap(),
            "--cmdline",
            "bexar.test=blk-verify bexar.seed=7",
        ],
    );
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(out.contains("PASS blk-verify"), "{out}");
    // And the check can fail: another seed's pattern is not there.
    let o = run_testguest(
        "blk-verify",
        &[
            "--disk",
            d.to_str().unwrap(),
            "--cmdline",
            "bexar.test=blk-verify bexar.seed=8",
        ],
    );
    assert_exit(&o, 1);
    std::fs::remove_file(d).ok();
}

#[test]
fn a_read_only_disk_refuses_writes_with_ioerr() {
    let d = disk("ro.img", 8);
    let result = tmp("ro.json");
    let spec = format!("{},ro", d.display());
    let o = run_testguest(
        "blk-rw",
        &["--disk", &spec, "--result-json", result.to_str().unwrap()],
    );
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(out.contains("blk: read-only"), "{out}");
    let blk = device(&outcome(&result), "block").clone();
    assert!(blk["refused"].as_u64().unwrap() >= 1, "{blk}");
    assert_eq!(blk["written_bytes"], 0, "{blk}");
    // The image is untouched.
    assert!(std::fs::read(&d).unwrap().iter().all(|b| *b == 0));
    std::fs::remove_file(d).ok();
    std::fs::remove_file(result).ok();
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let d = disk("discard.img", 16);
    let o = run_testguest("blk-discard", &["--disk", d.to_str().unwrap()]);
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(out.contains("discard of 16 sectors"), "{out}");
    std::fs::remove_file(d).ok();
}

#[test]
fn entropy_arrives() {
    let result = tmp("rng.json");
    let o = run_testguest("rng", &["--rng", "--result-json", result.to_str().unwrap()]);
    assert_exit(&o, 0);
    let rng = device(&outcome(&result), "rng").clone();
    assert!(rng["read_bytes"].as_u64().unwrap() >= 128, "{rng}");
    std::fs::remove_file(result).ok();
}

#[test]
fn a_hostile_driver_is_refused_and_counted_and_the_vmm_survives() {
    let d = disk("hostile.img", 64);
    let result = tmp("hostile.json");
    let o = run_testguest(
        "hostile",
        &[
            "--disk",
            d.to_str().unwrap(),
            "--rng",
            "--vcpus",
            "2",
            "--cmdline",
            "bexar.test=hostile bexar.strict=1",
            "--result-json",
            result.to_str().unwrap(),
        ],
    );
    // The guest checks every case was refused (strict), that no answer was garbage, and that
    // the device works again after its reset; the VMM exits cleanly afterwards.
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(
        out.contains("17 refused, 0 not refused, 0 garbage"),
        "{out}"
    );
    assert!(out.contains("final write + read of sector"), "{out}");
    let json = outcome(&result);
    let blk = device(&json, "block");
    // Every case was counted: malformed requests and register writes as refused, the
    // notification before DRIVER_OK as spurious.
    let refused = blk["refused"].as_u64().unwrap();
    let spurious = blk["spurious_notifies"].as_u64().unwrap();
    assert!(refused + spurious >= 17 && spurious >= 1, "{blk}");
    assert!(blk["needs_reset"].as_u64().unwrap() >= 1, "{blk}");
    std::fs::remove_file(d).ok();
    std::fs::remove_file(result).ok();
}

#[test]
fn frames_cross_a_tap_both_ways() {
    let ns = TapNetns::new("net");
    let guest = testguest();
    let result = tmp("net.json");
    // The host kernel in the namespace answers the guest's ARP and pings.
    let o = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_bexar"),
            "run",
        ])
        .arg("--kernel")
        .arg(&guest)
        .args([
            "--cmdline",
            "bexar.test=net bexar.ip=10.0.2.15 bexar.peer=10.0.2.1 bexar.count=20",
            "--net",
            "tap=tap0,mac=02:00:00:00:00:0f",
            "--timeout",
            "30",
            "--no-stdin",
            "--result-json",
            result.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(out.contains("PASS net"), "{out}");
    let net = device(&outcome(&result), "net").clone();
    assert!(net["read_bytes"].as_u64().unwrap() > 0, "{net}");
    assert!(net["written_bytes"].as_u64().unwrap() > 0, "{net}");
    std::fs::remove_file(result).ok();
}
