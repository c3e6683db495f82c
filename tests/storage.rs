//! The block layer under a real guest: the test guest's polling virtio-blk driver writes
//! random patterns through qcow2 overlays (over a raw base and over a qcow2 base), and
//! qemu-img, the outside witness, checks the images and compares them with the image the
//! test expects; the same with the VMM killed (SIGKILL) in the middle of the writes.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// A base image with random contents, and a directory that goes away with the test.
struct Images {
    dir: PathBuf,
}

impl Images {
    fn new(tag: &str) -> Self {
        let dir = tmp(tag);
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }
    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
    fn s(&self, f: &str) -> String {
        self.path(f).to_string_lossy().into_owned()
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const SIZE: u64 = 24 << 20;

/// `raw` base, or a `qcow2` base (itself over a raw file, with qemu-io's writes in it), and
/// the raw image of what the base reads as.
fn base(img: &Images, kind: &str) -> (PathBuf, &'static str, PathBuf) {
    let raw = img.path("base.raw");
    random_file(&raw, SIZE, 0x5eed);
    let want = img.path("want.raw");
    std::fs::copy(&raw, &want).unwrap();
    if kind == "raw" {
        return (raw, "raw", want);
    }
    let q = img.path("base.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &img.s("base.qcow2"),
    ]);
    let o = Command::new("qemu-io")
        .args(["-c", "write -P 0x77 2M 1M", "-c", "write -z 9M 256k"])
        .arg(&q)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let f = std::fs::OpenOptions::new().write(true).open(&want).unwrap();
    f.write_all_at(&vec![0x77; 1 << 20], 2 << 20).unwrap();
    f.write_all_at(&vec![0; 256 << 10], 9 << 20).unwrap();
    (q, "qcow2", want)
}

fn overlay(img: &Images, base: &Path, fmt: &str) -> PathBuf {
    let top = img.path("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.file_name().unwrap().to_str().unwrap(),
        "-F",
        fmt,
        top.to_str().unwrap(),
    ]);
    top
}

#[test]
fn the_guest_writes_through_overlays_and_qemu_img_agrees() {
    for kind in ["raw", "qcow2"] {
        let img = Images::new(&format!("scatter-{kind}"));
        let (b, fmt, want) = base(&img, kind);
        let top = overlay(&img, &b, fmt);
        let seed = 0x1000 + kind.len() as u64;
        let o = run_testguest(
            "blk-scatter",
            &[
                "--disk",
                top.to_str().unwrap(),
                "--cmdline",
                &format!(
                    "console=ttyS0 bexar.test=blk-scatter bexar.seed={seed} bexar.rounds=4 bexar.writes=64{}",
                    guest_platform_params()
                ),
            ],
        );
        assert_exit(&o, 0);
        let (out, _) = text(&o);
        assert!(out.contains("blk-scatter: round 3 flushed"), "{out}");
        for round in scatter_writes(seed, 4, 64, SIZE / SECTOR) {
            apply(&want, seed, &round);
        }
        qemu_img_ok(&["check", top.to_str().unwrap()]);
        let same = qemu_img_ok(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            top.to_str().unwrap(),
            want.to_str().unwrap(),
        ]);
        assert!(same.contains("identical"), "{kind}: {same}");
        // And the comparison can fail: the base alone is not what the guest wrote.
        let (code, _) = qemu_img(&[
            "compare",
            "-F",
            "raw",
            top.to_str().unwrap(),
            img.path("base.raw").to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{kind}: the overlay reads like the base");
    }
}

#[test]
fn what_was_flushed_survives_a_kill_9_in_the_middle_of_writes() {
    let img = Images::new("kill9");
    let (b, fmt, base_raw) = base(&img, "raw");
    let top = overlay(&img, &b, fmt);
    let seed = 0x2222;
    let (rounds, writes) = (10_000u64, 16u64);
    let mut child = scatter_cmd(&top.to_string_lossy(), seed, rounds, writes, &[])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut flushed = None;
    while flushed.is_none_or(|r| r < 5) {
        let line = lines.next().expect("the guest stopped talking").unwrap();
        assert!(!line.contains("FAIL"), "{line}");
        if let Some(rest) = line.split("blk-scatter: round ").nth(1) {
            flushed = rest.split(' ').next().and_then(|r| r.parse::<u64>().ok());
        }
    }
    // The guest is writing round 6 (or later) now.
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let flushed = flushed.unwrap();

    // qemu-img finds no corruption; leaked clusters (allocated by writes after the last
    // flush, whose tables never reached the file) are allowed: they waste space, no data.
    let (code, report) = qemu_img(&["check", top.to_str().unwrap()]);
    assert!(
        code == 0 || code == 3,
        "qemu-img check after kill -9: {report}"
    );
    eprintln!("qemu-img check after kill -9 (exit {code}): {report}");

    // Every sector written in a flushed round holds the pattern; every other sector holds
    // the pattern (an unflushed write that landed) or the base.
    let got = img.path("got.raw");
    qemu_img_ok(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        top.to_str().unwrap(),
        got.to_str().unwrap(),
    ]);
    let got = std::fs::read(&got).unwrap();
    let base = std::fs::read(&base_raw).unwrap();
    let all = scatter_writes(seed, rounds, writes, SIZE / SECTOR);
    let mut must = vec![false; (SIZE / SECTOR) as usize];
    for round in &all[..=flushed as usize] {
        for &(first, n) in round {
            for s in first..first + n {
                must[s as usize] = true;
            }
        }
    }
    let mut checked = 0;
    for s in 0..SIZE / SECTOR {
        let at = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
        let p = pattern(seed, s, 1);
        if must[s as usize] {
            assert_eq!(
                &got[at],
                &p[..],
                "sector {s}, flushed in round <= {flushed}, lost"
            );
            checked += 1;
        } else {
            assert!(
                got[at.clone()] == base[at.clone()] || got[at] == p[..],
                "sector {s} holds neither the base nor the pattern"
            );
        }
    }
    assert!(checked > 1000, "only {checked} sectors were checked");

    // The image is usable again: another run writes and reads back, and checks clean.
    let o = run_testguest(
        "blk-scatter",
        &[
            "--disk",
            top.to_str().unwrap(),
            "--cmdline",
            &format!(
                "console=ttyS0 bexar.test=blk-scatter bexar.seed=3 bexar.rounds=2{}",
                guest_platform_params()
            ),
        ],
    );
    assert_exit(&o, 0);
    let (code, report) = qemu_img(&["check", top.to_str().unwrap()]);
    assert!(
        code == 0 || code == 3,
        "qemu-img check after reuse: {report}"
    );
}

/// `bexar run` of `blk-scatter` (`rounds` rounds of `writes` writes from `seed`) on `disk`,
/// with `extra` flags, its stdout piped.
fn scatter_cmd(disk: &str, seed: u64, rounds: u64, writes: u64, extra: &[&str]) -> Command {
    let mut c = bexar();
    c.arg("run")
        .args(extra)
        .arg("--kernel")
        .arg(testguest())
        .args(["--no-stdin", "--memory", "64", "--timeout", "120", "--disk", disk])
        .args([
            "--cmdline",
            &format!(
                "console=ttyS0 bexar.test=blk-scatter bexar.seed={seed} bexar.rounds={rounds} bexar.writes={writes}{}",
                guest_platform_params()
            ),
        ])
        .stdout(Stdio::piped());
    c
}

/// [`scatter_cmd`] with 32 writes a round, its stderr piped too.
fn scatter_on(disk: &str, seed: u64, rounds: u64) -> std::process::Child {
    scatter_cmd(disk, seed, rounds, 32, &[])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `blk-scatter` (`rounds` rounds from `seed`) on the disk `url`, calls `meanwhile`
/// once the guest has flushed its first round; returns how the run ended, the guest's lines
/// after that point, and the VMM's log.
fn scatter_with(
    label: &str,
    url: &str,
    seed: u64,
    rounds: u64,
    meanwhile: impl FnOnce(),
) -> (std::process::ExitStatus, Vec<String>, String) {
    let mut child = scatter_on(url, seed, rounds);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the guest stopped talking").unwrap();
        assert!(!line.contains("FAIL"), "{label}: {line}");
        if line.contains("round 0 flushed") {
            break;
        }
    }
    // The VMM is `bexar run`'s child, pid 1 of a PID namespace of its own, and its network
    // namespace holds only lo: every connection its disk makes, the reconnection included,
    // comes from the waiting parent, which stays in the host's.
    let vmm = vmm_of_run(child.id());
    assert_ne!(vmm, child.id(), "{label}: bexar run has no VMM child");
    let dev = std::fs::read_to_string(format!("/proc/{vmm}/net/dev")).unwrap();
    assert_eq!(
        dev.lines().count(),
        3,
        "{label}: the VMM's interfaces: {dev}"
    );
    meanwhile();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, rest, err)
}

/// [`scatter_with`] a restart of the server: checks that the guest passed and the VMM
/// connected again; returns the VMM's log.
fn scatter_across_restart(
    label: &str,
    url: &str,
    seed: u64,
    rounds: u64,
    restart: impl FnOnce(),
) -> String {
    let (status, rest, err) = scatter_with(label, url, seed, rounds, restart);
    assert!(status.success(), "{label}: {}\n{err}", rest.join("\n"));
    assert!(
        rest.iter().any(|l| l.contains("PASS blk-scatter")),
        "{label}: {rest:?}"
    );
    assert!(
        err.contains("connected again"),
        "{label}: no reconnection in:\n{err}"
    );
    err
}

/// Checks that `export` holds `want` with the guest's scatter writes applied.
fn assert_scattered(label: &str, export: &Path, want: &Path, seed: u64, rounds: u64) {
    for round in scatter_writes(seed, rounds, 32, SIZE / SECTOR) {
        apply(want, seed, &round);
    }
    assert!(
        std::fs::read(export).unwrap() == std::fs::read(want).unwrap(),
        "{label}: the export differs from what the guest wrote"
    );
}

#[test]
fn nbd_servers_serve_a_disk_byte_for_byte_across_a_restart_during_io() {
    for kind in ["nbd-server", "qemu-nbd"] {
        let img = Images::new(&format!("nbd-{kind}"));
        let export = img.path("export.raw");
        random_file(&export, SIZE, 0xabc);
        let want = img.path("want.raw");
        std::fs::copy(&export, &want).unwrap();
        let mut server = NbdServer::start(kind, &export, &img.dir);
        let (seed, rounds) = (0x3000 + kind.len() as u64, 10);
        // Kill the server while the guest writes its second round, bring it back a second
        // later on the same port: the VMM resends what was outstanding. One server is named
        // by host name: the jailed VMM reconnects to the address it resolved before its jail
        // (its root has no /etc/hosts).
        let url = match kind {
            "nbd-server" => server.url("").replace("127.0.0.1", "localhost"),
            _ => server.url(""),
        };
        let err = scatter_across_restart(kind, &url, seed, rounds, || {
            server.kill();
            std::thread::sleep(std::time::Duration::from_secs(1));
            server.spawn();
        });
        let replies = if kind == "qemu-nbd" {
            "structured replies"
        } else {
            "simple replies"
        };
        assert!(err.contains(replies), "{kind}: {err}");
        server.kill();
        assert_scattered(kind, &export, &want, seed, rounds);
    }
}

/// A snapshot names its remote disk: restored jailed without `--disk`, its VMM has an empty
/// network namespace all the same (the waiting parent dials the snapshot's servers), and
/// reconnects through it when the server restarts.
#[test]
fn a_restored_remote_disk_reconnects_through_the_waiting_parent() {
    let img = Images::new("nbd-restore");
    let export = img.path("export.raw");
    random_file(&export, SIZE, 0x5e5);
    let want = img.path("want.raw");
    std::fs::copy(&export, &want).unwrap();
    let mut server = NbdServer::start("qemu-nbd", &export, &img.dir);
    let (seed, rounds) = (0x5e5, 400);
    let control = img.path("control.sock");
    let snapshot = img.path("snapshot");
    // Snapshotted after its first round (a jailed bexar run has nowhere to write one).
    let control_flag = format!("--control={}", control.display());
    let mut first = scatter_cmd(
        &server.url(""),
        seed,
        rounds,
        32,
        &["--no-jail", &control_flag],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    while !lines.next().unwrap().unwrap().contains("round 0 flushed") {}
    let reply = vmm_control(
        &control,
        &serde_json::json!({"op": "snapshot", "dir": snapshot, "then": "stop"}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(first.wait().unwrap().success());
    // Without the waiting parent, no one could connect the snapshot's disk for the jailed
    // VMM (and its filter has no TCP socket, the command line naming no remote disk): refused
    // before the guest runs, naming the server, rather than killed at its first reconnect.
    let o = bexar()
        .args(["run", "--no-stdin", "--no-pid-namespace", "--restore"])
        .arg(&snapshot)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("could not reconnect in this jail") && err.contains(&server.port.to_string()),
        "{err}"
    );
    let mut restored = bexar()
        .args(["run", "--no-stdin", "--timeout", "120", "--restore"])
        .arg(&snapshot)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(restored.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while !seen.last().is_some_and(|l: &String| l.contains("flushed")) {
        seen.push(
            lines
                .next()
                .expect("the restored guest stopped talking")
                .unwrap(),
        );
    }
    let vmm = vmm_of_run(restored.id());
    assert_ne!(vmm, restored.id(), "bexar run has no VMM child");
    let dev = std::fs::read_to_string(format!("/proc/{vmm}/net/dev")).unwrap();
    assert_eq!(dev.lines().count(), 3, "the VMM's interfaces: {dev}");
    server.kill();
    std::thread::sleep(std::time::Duration::from_secs(1));
    server.spawn();
    seen.extend(lines.map(|l| l.unwrap()));
    let status = restored.wait().unwrap();
    let mut err = String::new();
    restored
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{}\n{err}", seen.join("\n"));
    assert!(
        seen.iter().any(|l| l.contains("PASS blk-scatter")),
        "{seen:?}"
    );
    assert!(
        err.contains("connected again"),
        "no reconnection in:\n{err}"
    );
    server.kill();
    assert_scattered("restored", &export, &want, seed, rounds);
}

#[test]
fn tgt_serves_an_iscsi_disk_with_chap_byte_for_byte_across_a_restart_during_io() {
    let img = Images::new("iscsi");
    let export = img.path("lun1.raw");
    random_file(&export, SIZE, 0x15c5);
    let mut tgt = Tgt::start(&export, Some(("bexar", "secret-of-16-bytes")), true);
    // UNMAP on a thin LUN: the guest's discard reads back as zeros and tgt punches a hole.
    let blocks = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap());
    let before = blocks(&export);
    let o = run_testguest("blk-discard", &["--disk", &tgt.url("")]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("read back as zeros"), "{out}");
    assert!(err.contains("thin (UNMAP)"), "{err}");
    assert!(blocks(&export) < before, "UNMAP freed nothing");
    // Kill tgtd during the second round, bring it back a second later: the initiator logs
    // in again (CHAP again) and resends what was outstanding.
    let want = img.path("want.raw");
    std::fs::copy(&export, &want).unwrap();
    let (seed, rounds) = (0x15c5, 10);
    let url = tgt.url("");
    scatter_across_restart("tgt", &url, seed, rounds, || {
        tgt.kill();
        std::thread::sleep(std::time::Duration::from_secs(1));
        tgt.spawn();
    });
    tgt.kill();
    assert_scattered("tgt", &export, &want, seed, rounds);
}

#[test]
fn iscsi_targets_that_refuse_us_are_named() {
    let img = Images::new("iscsi-bad");
    let export = img.path("lun1.raw");
    random_file(&export, SIZE, 2);
    let tgt = Tgt::start(&export, Some(("bexar", "secret-of-16-bytes")), false);
    let p = tgt.port;
    let iqn = Tgt::IQN;
    for (disk, words) in [
        (
            format!("iscsi://127.0.0.1:{p}/{iqn}/1"),
            "authentication failed",
        ),
        (
            format!("iscsi://bexar%wrong-secret-16@127.0.0.1:{p}/{iqn}/1"),
            "authentication failed",
        ),
        (
            format!("iscsi://bexar%secret-of-16-bytes@127.0.0.1:{p}/{iqn}:nope/1"),
            "has no target",
        ),
        (
            format!("iscsi://bexar%secret-of-16-bytes@127.0.0.1:{p}/{iqn}/0"),
            "is not a disk",
        ),
        (
            format!("iscsi://bexar%secret-of-16-bytes@127.0.0.1:{p}/{iqn}/7"),
            "has no LUN 7",
        ),
        (
            format!("iscsi://127.0.0.1:{}/{iqn}/1", free_port()),
            "Connection refused",
        ),
    ] {
        // Named without the credentials, which appear nowhere.
        let shown = disk
            .split_once('@')
            .map_or(disk.clone(), |(_, r)| format!("iscsi://{r}"));
        let err = refused(&disk, &shown, words);
        assert!(
            !err.contains("secret-of-16"),
            "the secret was logged: {err}"
        );
    }
}

/// Runs the test guest on `disk`, which must be refused before the guest starts, with an
/// error naming `shown` and saying `words`; returns the error.
fn refused(disk: &str, shown: &str, words: &str) -> String {
    let o = run_testguest("blk-rw", &["--disk", disk]);
    let (_, err) = text(&o);
    assert_ne!(o.status.code(), Some(0), "{disk}: {err}");
    assert!(err.contains(shown) && err.contains(words), "{disk}: {err}");
    err
}

#[test]
fn remote_disks_that_fail_are_refused_or_fail_the_guest_not_the_vmm() {
    let img = Images::new("nbd-fail");
    let export = img.path("export.raw");
    random_file(&export, SIZE, 1);
    let mut server = NbdServer::start("nbd-server", &export, &img.dir);
    // An export the server does not have, and a port nobody listens on: refused at start,
    // naming the disk.
    for (disk, words) in [
        (
            format!("nbd://127.0.0.1:{}/nope", server.port),
            "refused export \"nope\"",
        ),
        (
            format!("nbd://127.0.0.1:{}/disk0", free_port()),
            "Connection refused",
        ),
    ] {
        refused(&disk, &disk, words);
    }
    // A server that goes away for longer than the disk's retry time: the guest's requests
    // fail with I/O errors, the VMM goes on and ends the way the guest says.
    let (status, rest, err) =
        scatter_with("nbd", &server.url(",retry=1"), 9, 10_000, || server.kill());
    assert_eq!(status.code(), Some(1), "{rest:?}\n{err}");
    assert!(rest.iter().any(|l| l.contains("FAIL")), "{rest:?}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
