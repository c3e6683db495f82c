//! Live migration between two VMM processes on this host: `bexar run --incoming` receives what
//! a running VMM sends on `{"op":"migrate"}`. The guest is the test guest's `dirty` mode, which
//! writes pages at a steady rate and checks every page still holds its last write: it must go
//! on in the new process with none lost, and a migration that fails must leave it running in
//! the old one.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const GUEST: &str = "console=ttyS0 bexar.test=dirty bexar.dirty-mib=8 bexar.dirty-rate=20000";

fn dir(name: &str) -> PathBuf {
    let d = tmp(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `bexar run` with its console in `out` (appended as it runs).
fn spawn(args: &[&str], out: &Path, stdin: bool) -> Child {
    spawn_in(false, args, out, stdin)
}

/// [`spawn`], in its jail if `jailed`.
fn spawn_in(jailed: bool, args: &[&str], out: &Path, stdin: bool) -> Child {
    let mut c = bexar();
    c.arg("run");
    if !jailed {
        c.arg("--no-jail");
    }
    c.args(["--timeout", "60"])
        .args(args)
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(std::fs::File::create(out.with_extension("err")).unwrap());
    if stdin {
        c.stdin(Stdio::piped());
    } else {
        c.arg("--no-stdin").stdin(Stdio::null());
    }
    c.spawn().unwrap()
}

/// A `bexar run --incoming DIR/in.sock` with its console in `DIR/dest.out`.
fn receiver(d: &Path, stdin: bool) -> (Child, PathBuf) {
    let incoming = d.join("in.sock");
    let child = spawn(
        &["--incoming", incoming.to_str().unwrap()],
        &d.join("dest.out"),
        stdin,
    );
    (child, incoming)
}

fn source(d: &Path) -> Child {
    let guest = testguest();
    let cmdline = format!("{GUEST}{}", guest_platform_params());
    let ctl = d.join("ctl.sock");
    spawn(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--memory",
            "64",
            "--cmdline",
            &cmdline,
            "--control",
            ctl.to_str().unwrap(),
        ],
        &d.join("src.out"),
        false,
    )
}

/// Waits until `file` holds `n` lines with `pattern`; returns its text.
fn wait_for(file: &Path, pattern: &str, n: usize) -> String {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.matches(pattern).count() >= n {
            return text;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{pattern:?} x{n} not in {}:\n{text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The page count of the last `dirty: N pages written` line.
fn last_count(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            l.split("dirty: ")
                .nth(1)?
                .split(" pages written")
                .next()?
                .parse()
                .ok()
        })
        .next_back()
        .unwrap_or(0)
}

/// Once the receiver listens, asks the sender's VMM (control socket `ctl`) to migrate to
/// it with the extra fields of `opts`; returns the migration's report.
fn migrate(ctl: &Path, incoming: &Path, opts: serde_json::Value) -> serde_json::Value {
    while !incoming.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut req = serde_json::json!({"op": "migrate", "to": incoming});
    for (k, v) in opts.as_object().unwrap() {
        req[k] = v.clone();
    }
    let reply = vmm_control(ctl, &req);
    assert_eq!(reply["ok"], true, "{reply}");
    reply["migration"].clone()
}

fn wait_exit(c: &mut Child) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = c.kill();
            panic!("bexar run did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_running_guest_moves_to_a_new_process_with_every_write_and_goes_on_there() {
    let d = dir("migrate");
    let (mut dest, incoming) = receiver(&d, true);
    let mut src = source(&d);
    // Running and writing for a while (two reports: a second of writes at least).
    let before = wait_for(&d.join("src.out"), "pages written", 2);
    let m = &migrate(
        &d.join("ctl.sock"),
        &incoming,
        serde_json::json!({"downtime_ms": 50}),
    );
    assert!(m["rounds"].as_u64().unwrap() >= 1, "{m}");
    // At least the pages the guest's region and its program hold, all in one stream.
    assert!(m["pages_sent"].as_u64().unwrap() >= 2048, "{m}");
    assert!(m["bytes_sent"].as_u64().unwrap() >= m["pages_sent"].as_u64().unwrap() * 4096);
    // The sender ends: the VM is the receiver's.
    assert_eq!(
        wait_exit(&mut src),
        0,
        "source: {}",
        read(&d.join("src.err"))
    );
    let src_text = read(&d.join("src.out"));
    assert!(src_text.len() >= before.len());
    let at_move = last_count(&src_text);

    // The guest goes on in the new process: its counts carry on from where they were (no
    // boot), with every page's last write there (it checks each before writing it again).
    let after = wait_for(&d.join("dest.out"), "pages written", 2);
    assert!(
        !after.contains("test: dirty"),
        "the guest booted again:\n{after}"
    );
    let first_here = after
        .lines()
        .find_map(|l| {
            l.split("dirty: ")
                .nth(1)?
                .split(" pages written")
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap();
    assert!(first_here > at_move, "{first_here} pages after {at_move}");
    dest.stdin.as_mut().unwrap().write_all(b"q").unwrap();
    assert_eq!(wait_exit(&mut dest), 0, "{}", read(&d.join("dest.err")));
    let text = read(&d.join("dest.out"));
    assert!(text.contains("PASS dirty"), "{text}");
    assert!(!text.contains(" holds "), "a write was lost:\n{text}");
    let err = read(&d.join("dest.err"));
    assert!(err.contains("running again after a handover"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_migration_that_fails_leaves_the_guest_running_where_it_was() {
    let d = dir("migrate-fail");
    let mut src = source(&d);
    wait_for(&d.join("src.out"), "pages written", 1);
    let ctl = d.join("ctl.sock");

    // Nobody listens there.
    let reply = vmm_control(
        &ctl,
        &serde_json::json!({"op": "migrate", "to": d.join("nobody.sock")}),
    );
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("cannot reach"),
        "{reply}"
    );

    // A receiver that takes part of the stream and goes away; then one that takes it all
    // and refuses the VM.
    for refuse in [false, true] {
        let sock = d.join(format!("rx-{refuse}.sock"));
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            if refuse {
                let got = bexar_vmm::migration::receive(&mut &s, &mut &s, &[]);
                assert!(got.is_ok(), "the stream is sound: {:?}", got.err());
                bexar_vmm::migration::answer(&mut s, Err("no room here".into())).unwrap();
            } else {
                let mut head = [0u8; 4096];
                s.read_exact(&mut head).unwrap();
            }
        });
        let n = std::fs::read_to_string(d.join("src.out"))
            .unwrap()
            .matches("pages written")
            .count();
        let reply = vmm_control(&ctl, &serde_json::json!({"op": "migrate", "to": sock}));
        peer.join().unwrap();
        assert_eq!(reply["ok"], false, "{reply}");
        if refuse {
            assert!(
                reply["error"].as_str().unwrap().contains("no room here"),
                "{reply}"
            );
        }
        // The guest runs on here, its writes all where they were.
        wait_for(&d.join("src.out"), "pages written", n + 2);
        let info = vmm_control(&ctl, &serde_json::json!({"op": "info"}));
        assert_eq!(info["info"]["state"], "running", "{info}");
    }
    let text = read(&d.join("src.out"));
    assert!(!text.contains(" holds "), "a write was lost:\n{text}");
    vmm_control(&ctl, &serde_json::json!({"op": "stop"}));
    wait_exit(&mut src);
    let _ = std::fs::remove_dir_all(&d);
}

/// The blk-scatter guest on `disk`: `rounds` rounds of 8 scattered writes (the sequence of
/// `seed`), each read back; its console in `out`, controlled on `ctl` if given.
fn scatter_guest(disk: &Path, rounds: u32, seed: u32, ctl: Option<&Path>, out: &Path) -> Child {
    let guest = testguest();
    let cmdline = format!(
        "console=ttyS0 bexar.test=blk-scatter bexar.rounds={rounds} bexar.writes=8 bexar.seed={seed}{}",
        guest_platform_params()
    );
    let mut args = vec![
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--disk",
        disk.to_str().unwrap(),
    ];
    if let Some(c) = ctl {
        args.extend(["--control", c.to_str().unwrap()]);
    }
    spawn(&args, out, false)
}

/// A receiver that takes the whole VM and goes away without a word: the sender cannot know
/// whether it runs the guest, so it keeps it paused (in doubt); a resume then (whoever asks
/// has found the receiver does not run it) gives it back its devices too: the guest goes on
/// reading and writing its disk to the end.
#[test]
fn a_migration_in_doubt_keeps_the_guest_paused_until_a_resume_gives_it_back_whole() {
    let d = dir("migrate-doubt");
    let disk = d.join("disk.raw");
    disk_file(&disk, None);
    let ctl = d.join("ctl.sock");
    let mut src = scatter_guest(&disk, 150, 9, Some(&ctl), &d.join("src.out"));
    wait_for(&d.join("src.out"), "flushed", 5);
    let sock = d.join("rx.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let peer = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let got = bexar_vmm::migration::receive(&mut &s, &mut &s, &[]);
        assert!(got.is_ok(), "the stream is sound: {:?}", got.err());
        // Gone without an answer.
    });
    let reply = vmm_control(&ctl, &serde_json::json!({"op": "migrate", "to": sock}));
    peer.join().unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("in doubt"),
        "{reply}"
    );
    // Paused: nothing more from the guest.
    let info = vmm_control(&ctl, &serde_json::json!({"op": "info"}));
    assert_eq!(info["info"]["state"], "paused", "{info}");
    let n = read(&d.join("src.out")).matches("flushed").count();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read(&d.join("src.out")).matches("flushed").count(), n);
    // Given back: it runs, and its disk answers again.
    let reply = vmm_control(&ctl, &serde_json::json!({"op": "resume"}));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(wait_exit(&mut src), 0, "{}", read(&d.join("src.err")));
    let text = read(&d.join("src.out"));
    assert!(text.contains("150 rounds of 8 writes"), "{text}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The disk of the migration test: large beside what the guest writes (about 100 MiB in
/// all), so that a write lost on the way is seldom written again by a later one.
const DISK_BYTES: u64 = 256 << 20;

/// A raw disk file of `DISK_BYTES`: sparse, or full of `fill` bytes.
fn disk_file(path: &Path, fill: Option<u8>) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    if let Some(b) = fill {
        let chunk = vec![b; 16 << 20];
        for i in 0..DISK_BYTES / (16 << 20) {
            std::os::unix::fs::FileExt::write_all_at(&f, &chunk, i * (16 << 20)).unwrap();
        }
    }
}

/// The guest of the disk tests: blk-scatter writes and reads back a fixed sequence (by its
/// seed) of scattered runs, so a run to the end without migration gives the disk every
/// migrated run must end with.
const SCATTER_ROUNDS: u32 = 400;

/// Runs the disk guest on `reference` to its end; then on `a` in one VMM, moved with its disk
/// mid-run to a second VMM on `b`, where it must finish its rounds reading back every write.
/// Returns the migration's report.
fn guest_moves_with_its_disk(d: &Path, reference: &Path, a: &Path, b: &Path) -> serde_json::Value {
    let mut whole = scatter_guest(reference, SCATTER_ROUNDS, 7, None, &d.join("reference.out"));
    assert_eq!(
        wait_exit(&mut whole),
        0,
        "{}",
        read(&d.join("reference.err"))
    );
    // The receiver is jailed: it opens its disk (and a qcow2 overlay's base) before, and
    // reads the stream and the overlay's metadata only in its jail.
    let incoming = d.join("in.sock");
    let mut dest = spawn_in(
        true,
        &[
            "--incoming",
            incoming.to_str().unwrap(),
            "--disk",
            b.to_str().unwrap(),
        ],
        &d.join("dest.out"),
        false,
    );
    let ctl = d.join("ctl.sock");
    let mut src = scatter_guest(a, SCATTER_ROUNDS, 7, Some(&ctl), &d.join("src.out"));
    wait_for(&d.join("src.out"), "flushed", 20);
    let m = migrate(
        &ctl,
        &incoming,
        serde_json::json!({"downtime_ms": 20, "disks": true}),
    );
    eprintln!("migration with the disk: {m}");
    assert_eq!(wait_exit(&mut src), 0, "{}", read(&d.join("src.err")));
    let at_move = read(&d.join("src.out")).matches("flushed").count() as u32;
    assert!(at_move < SCATTER_ROUNDS, "the guest ended before it moved");
    assert!(m["disk_bytes"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(wait_exit(&mut dest), 0, "{}", read(&d.join("dest.err")));
    common::assert_read_in_jail(&read(&d.join("dest.err")), "received");
    let text = read(&d.join("dest.out"));
    assert!(
        text.contains(&format!("{SCATTER_ROUNDS} rounds of 8 writes")),
        "{text}"
    );
    assert!(!text.contains("test: blk-scatter"), "booted again: {text}");
    m
}

#[test]
fn a_guest_writing_its_disk_moves_with_a_copy_of_it_and_no_write_is_lost() {
    let d = dir("migrate-disk");
    let reference = d.join("reference.raw");
    disk_file(&reference, None);
    // The receiver's disk starts full of junk: the copy must leave zeros where the guest's
    // disk has them (holes included).
    let (a, b) = (d.join("a.raw"), d.join("b.raw"));
    disk_file(&a, None);
    disk_file(&b, Some(0xa5));
    let m = guest_moves_with_its_disk(&d, &reference, &a, &b);
    // What the guest wrote went (holes and zeros did not).
    assert!(
        m["disk_bytes"].as_u64().unwrap() < DISK_BYTES / 4,
        "the whole disk went, holes and all: {m}"
    );
    // Byte for byte the disk of the run that never moved.
    let (want, got) = (
        std::fs::read(&reference).unwrap(),
        std::fs::read(&b).unwrap(),
    );
    let first_diff = want.iter().zip(&got).position(|(x, y)| x != y);
    assert_eq!(
        first_diff, None,
        "the receiver's disk differs from the reference at byte {first_diff:?} ({m})"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_qcow2_overlay_moves_without_its_base_image_and_reads_the_same_there() {
    // Three overlays on one base image full of data: the run that never moves, the source,
    // and the receiver's, new and empty. Before the guest starts, the source's and the
    // reference's overlays get the same data and zero clusters of their own (qemu-io), which
    // the copy must carry: the zero clusters hide base data the receiver's overlay would
    // otherwise show.
    let d = dir("migrate-qcow2");
    let base = d.join("base.raw");
    random_file(&base, DISK_BYTES, 11);
    let overlay = |name: &str, own: bool| {
        let p = d.join(name);
        let (b, p_s) = (base.to_str().unwrap(), p.to_str().unwrap());
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", p_s]);
        if own {
            let io = Command::new("qemu-io")
                .args(["-c", "write -P 0x33 1M 3M", "-c", "write -z 16M 8M", p_s])
                .output()
                .unwrap();
            assert!(io.status.success(), "qemu-io: {io:?}");
        }
        p
    };
    let reference = overlay("reference.qcow2", true);
    let (a, b) = (overlay("a.qcow2", true), overlay("b.qcow2", false));
    let m = guest_moves_with_its_disk(&d, &reference, &a, &b);
    // Only the overlay went: never the base image's 256 MiB under it.
    assert!(
        m["disk_bytes"].as_u64().unwrap() < DISK_BYTES / 2,
        "the base image went too: {m}"
    );
    // The disk as qemu sees it is the reference's, and the receiver's overlay is sound.
    let (r, b_s) = (reference.to_str().unwrap(), b.to_str().unwrap());
    qemu_img_ok(&["compare", "-q", r, b_s]);
    qemu_img_ok(&["check", "-q", b_s]);
    let map = qemu_img_ok(&["map", "--output=json", b_s]);
    assert!(
        map.contains("\"zero\": true, \"data\": false"),
        "the zero clusters did not come across: {map}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_bandwidth_limit_holds_the_copy_to_its_rate() {
    let d = dir("migrate-limit");
    let (mut dest, incoming) = receiver(&d, false);
    let mut src = source(&d);
    wait_for(&d.join("src.out"), "pages written", 1);
    const MIB_S: u64 = 16;
    let m = &migrate(
        &d.join("ctl.sock"),
        &incoming,
        serde_json::json!({"max_bandwidth_mib": MIB_S, "max_rounds": 2}),
    );
    // What went while the guest ran went no faster than the limit (the switch-over is not
    // limited, so its pages are left out).
    let precopy = m["bytes_sent"].as_u64().unwrap() - m["final_pages"].as_u64().unwrap() * 4096;
    let at_limit_ms = precopy as f64 / (MIB_S << 20) as f64 * 1e3;
    assert!(precopy >= 8 << 20, "{m}");
    assert!(
        m["total_ms"].as_f64().unwrap() >= at_limit_ms * 0.95,
        "{precopy} bytes in {} ms: faster than {MIB_S} MiB/s",
        m["total_ms"]
    );
    assert_eq!(wait_exit(&mut src), 0, "{}", read(&d.join("src.err")));
    wait_for(&d.join("dest.out"), "pages written", 1);
    let _ = dest.kill();
    let _ = dest.wait();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_guest_that_writes_faster_than_the_stream_is_throttled_until_it_converges() {
    let d = dir("migrate-throttle");
    let (mut dest, incoming) = receiver(&d, true);
    // Flat out over 32 MiB (hundreds of MB/s here), sent at 64 MiB/s: unthrottled, every round
    // finds the whole region written again. (A guest writing at a steady rate would not do:
    // it catches up on the writes it owes after each stall, whatever the throttle.)
    let guest = testguest();
    let cmdline = format!(
        "console=ttyS0 bexar.test=dirty bexar.dirty-mib=32 bexar.dirty-rate=0{}",
        guest_platform_params()
    );
    let ctl = d.join("ctl.sock");
    let mut src = spawn(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--memory",
            "128",
            "--cmdline",
            &cmdline,
            "--control",
            ctl.to_str().unwrap(),
        ],
        &d.join("src.out"),
        false,
    );
    wait_for(&d.join("src.out"), "pages written", 1);
    let m = &migrate(
        &ctl,
        &incoming,
        serde_json::json!({"max_bandwidth_mib": 64, "downtime_ms": 50}),
    );
    eprintln!("throttled migration: {m}");
    assert!(
        m["throttle_pct"].as_u64().unwrap() > 0,
        "never throttled: {m}"
    );
    assert!(
        m["rounds"].as_u64().unwrap() < 30,
        "did not converge before the last round: {m}"
    );
    assert_eq!(wait_exit(&mut src), 0, "{}", read(&d.join("src.err")));
    // The guest goes on there with every write it made.
    wait_for(&d.join("dest.out"), "pages written", 2);
    dest.stdin.as_mut().unwrap().write_all(b"q").unwrap();
    assert_eq!(wait_exit(&mut dest), 0, "{}", read(&d.join("dest.err")));
    let text = read(&d.join("dest.out"));
    assert!(text.contains("PASS dirty"), "{text}");
    let _ = std::fs::remove_dir_all(&d);
}
