//! The VMM on real KVM with the ring-3 test guest: boot, SMP, every way a guest can end, the
//! console destinations, CPU templates, and bad input.

mod common;

use std::io::{Read, Write};
use std::process::Stdio;

use common::*;

#[test]
fn test_guest_boots_to_ring3_on_one_vcpu() {
    let o = run_testguest("banner", &[]);
    assert_exit(&o, 0);
    let (out, err) = text(&o);
    assert!(out.contains("ring 3 reached"), "{out}");
    assert!(out.contains("PASS banner"), "{out}");
    // The guest saw our command line and the memory we gave it.
    assert!(out.contains("bexar.test=banner"), "{out}");
    assert!(err.contains("guest reported status 0"), "{err}");
}

#[test]
fn test_guest_brings_up_two_vcpus() {
    let o = run_testguest("smp", &["--vcpus", "2"]);
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(out.contains("2/2 cpus online"), "{out}");
    assert!(out.contains("PASS smp"), "{out}");
}

#[test]
fn test_guest_brings_up_four_vcpus_on_a_two_core_host() {
    let o = run_testguest("smp", &["--vcpus", "4"]);
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(out.contains("4/4 cpus online"), "{out}");
}

#[test]
fn guest_failure_status_is_exit_code_1() {
    let o = run_testguest("fail", &[]);
    assert_exit(&o, 1);
    let (_, err) = text(&o);
    assert!(err.contains("status 3"), "{err}");
}

#[test]
fn triple_fault_is_reported_as_such() {
    let o = run_testguest("triple-fault", &[]);
    assert_exit(&o, 3);
    let (_, err) = text(&o);
    assert!(err.contains("triple fault"), "{err}");
}

#[test]
fn guest_reset_is_an_orderly_exit() {
    let o = run_testguest("reset", &[]);
    assert_exit(&o, 0);
    let (_, err) = text(&o);
    assert!(err.contains("guest reset"), "{err}");
}

#[test]
fn timeout_stops_a_spinning_guest() {
    let o = run_testguest("hang", &["--timeout", "1"]);
    assert_exit(&o, 5);
    let (_, err) = text(&o);
    assert!(err.contains("timed out"), "{err}");
}

#[test]
fn four_spinning_vcpus_still_stop_at_the_timeout() {
    let o = run_testguest("hang", &["--timeout", "1", "--vcpus", "4"]);
    assert_exit(&o, 5);
}

#[test]
fn kvm_internal_error_reports_rip_and_instruction_bytes() {
    // nop; int3 (refused by the PVM emulator in ring 0); on hardware KVM, int3 with no IDT
    // triple-faults instead. Either way the report is precise and bexar does not panic.
    let elf = tiny_elf("int3.elf", 0x10_0000, &[0x90, 0xcc, 0xf4], 0);
    let o = bexar()
        .args(["run", "--no-stdin", "--timeout", "10", "--kernel"])
        .arg(&elf)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    if is_pvm() {
        assert_exit(&o, 4);
        assert!(err.contains("KVM internal error"), "{err}");
        assert!(err.contains("at rip 0x100001"), "{err}");
        assert!(err.contains("instruction bytes [cc f4"), "{err}");
    } else {
        assert_exit(&o, 3);
    }
}

/// `mov al, 42; out 0xf4, al`: the exit port ends the VM with status 42.
const EXIT_42: [u8; 4] = [0xb0, 0x2a, 0xe6, 0xf4];

#[test]
fn fwait_refused_by_the_platform_is_completed_by_the_vmm() {
    // nop; fwait; fwait; exit 42, all in ring 0. On PVM the emulator refuses each fwait (as in
    // Linux's fpu__drop) and the VMM steps over it; on hardware it runs natively.
    let mut code = vec![0x90, 0x9b, 0x9b];
    code.extend_from_slice(&EXIT_42);
    let elf = tiny_elf("fwait.elf", 0x10_0000, &code, 0);
    let json = tmp("fwait.json");
    let o = bexar()
        .args(["run", "--no-stdin", "--timeout", "10", "--kernel"])
        .arg(&elf)
        .arg("--result-json")
        .arg(&json)
        .output()
        .unwrap();
    assert_exit(&o, 1);
    let (_, err) = text(&o);
    assert!(err.contains("guest reported status 42"), "{err}");
    let r: serde_json::Value = serde_json::from_str(&read(&json)).unwrap();
    let completed = r["completed_instructions"].as_u64().unwrap();
    if is_pvm() {
        assert_eq!(completed, 2, "{r}");
        // Logged once per VM, not once per instruction.
        assert_eq!(err.matches("refused fwait").count(), 1, "{err}");
    } else {
        assert_eq!(completed, 0, "{r}");
    }
    std::fs::remove_file(json).ok();
}

#[test]
fn fwait_that_would_fault_is_not_completed() {
    // CR0.TS and CR0.MP set: fwait must raise #NM, so the VMM must not step over it. On PVM
    // the VM ends with the emulator's report at the fwait; on hardware the #NM finds no IDT
    // and the guest triple-faults.
    let mut code = vec![
        0x0f, 0x20, 0xc0, // mov rax, cr0
        0x48, 0x83, 0xc8, 0x0a, // or rax, CR0_TS | CR0_MP
        0x0f, 0x22, 0xc0, // mov cr0, rax
        0x9b, // fwait
    ];
    code.extend_from_slice(&EXIT_42);
    let elf = tiny_elf("fwait-ts.elf", 0x10_0000, &code, 0);
    let o = bexar()
        .args(["run", "--no-stdin", "--timeout", "10", "--kernel"])
        .arg(&elf)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!err.contains("status 42"), "{err}");
    if is_pvm() {
        assert_exit(&o, 4);
        assert!(err.contains("at rip 0x10000a"), "{err}");
        assert!(err.contains("instruction bytes [9b b0 2a"), "{err}");
    } else {
        assert_exit(&o, 3);
    }
}

#[test]
fn console_input_reaches_the_guest() {
    let guest = testguest();
    let mut child = bexar()
        .arg("run")
        .arg("--kernel")
        .arg(&guest)
        .args(["--cmdline", "bexar.test=echo", "--timeout", "30"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello from the host\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(out.contains("hello from the host"), "{out}");
    assert!(out.contains("PASS echo"), "{out}");
}

#[test]
fn console_to_a_file() {
    let log = tmp("console.log");
    let o = run_testguest("banner", &["--console", &format!("file:{}", log.display())]);
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(!out.contains("ring 3 reached"), "console leaked to stdout");
    assert!(read(&log).contains("PASS banner"));
    std::fs::remove_file(log).ok();
}

/// `bexar run` of the test guest with `extra` flags and its console on a Unix socket, and a
/// connection to that socket.
fn spawn_with_console_socket(
    name: &str,
    extra: &[&str],
) -> (std::process::Child, std::os::unix::net::UnixStream) {
    spawn_with_console_socket_logging(name, extra, "info")
}

/// [`spawn_with_console_socket`] with the VMM logging at `level` (BEXAR_LOG).
fn spawn_with_console_socket_logging(
    name: &str,
    extra: &[&str],
    level: &str,
) -> (std::process::Child, std::os::unix::net::UnixStream) {
    let sock = tmp(name);
    let mut child = bexar()
        .env("BEXAR_LOG", level)
        .arg("run")
        .arg("--kernel")
        .arg(testguest())
        .args(["--timeout", "30", "--no-stdin"])
        .args(extra)
        .arg("--console")
        .arg(format!("socket:{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Generous: on a loaded 2-core host a debug build beside other VMs can take seconds.
    for _ in 0..3000 {
        if let Ok(c) = std::os::unix::net::UnixStream::connect(&sock) {
            return (child, c);
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let o = child.wait_with_output().unwrap();
    panic!(
        "console socket never appeared: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn console_on_a_unix_socket_with_input() {
    let (child, mut conn) =
        spawn_with_console_socket("console.sock", &["--cmdline", "bexar.test=echo"]);
    conn.write_all(b"via the socket\n").unwrap();
    let mut got = String::new();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let _ = conn.read_to_string(&mut got);
    let o = child.wait_with_output().unwrap();
    assert_exit(&o, 0);
    assert!(
        got.contains("ring 3 reached"),
        "replayed banner missing: {got}"
    );
    assert!(got.contains("via the socket"), "{got}");
}

/// Host CPU time (user + system, clock ticks) the process `pid` has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Reads the console socket until the idle guest says it is ready (30 s at most); returns what
/// was read.
fn wait_idle_ready(conn: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("idle: ready") {
        let n = conn.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "console closed before ready: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[test]
fn idle_guest_sleeps_without_host_cpu_and_echoes_console_input() {
    let (child, mut conn) = spawn_with_console_socket(
        "idle.sock",
        &["--cmdline", "bexar.test=idle", "--expect", "idle-echo-7f3a"],
    );
    let mut got = wait_idle_ready(&mut conn);
    // Asleep in hlt: the VMM's threads use (almost) no CPU. A spinning vCPU would use a whole
    // core: 2 s, 200 ticks at the usual 100 Hz.
    let before = cpu_ticks(common::vmm_of_run(child.id()));
    std::thread::sleep(std::time::Duration::from_secs(2));
    let used = cpu_ticks(common::vmm_of_run(child.id())) - before;
    assert!(
        used <= 10,
        "idle guest used {used} clock ticks of host CPU in 2 s"
    );
    // The echo ends the VM through --expect (the pattern appears only in the echo).
    conn.write_all(b"idle-echo-7f3a\n").unwrap();
    let _ = conn.read_to_end(&mut got);
    let o = child.wait_with_output().unwrap();
    assert_exit(&o, 0);
    let (_, err) = text(&o);
    assert!(err.contains("expected console pattern seen"), "{err}");
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("idle-echo-7f3a"), "{got}");
}

#[test]
fn baseline_cpu_template_boots_and_hides_avx_from_cpuid() {
    let o = run_testguest("cpuid", &["--cpu-template", "x86-64-v2", "--vcpus", "2"]);
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(out.contains("PASS cpuid"), "{out}");
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let corrupt = tmp("corrupt.elf");
    let mut bytes = std::fs::read(testguest()).unwrap();
    bytes.truncate(80);
    std::fs::write(&corrupt, &bytes).unwrap();
    let big = tiny_elf("big.elf", 0x100_0000, &[0xf4], 32 << 20);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), "/nonexistent/vmlinux".into()],
            "/nonexistent/vmlinux",
        ),
        (
            vec!["--kernel".into(), corrupt.display().to_string()],
            "kernel",
        ),
        (
            vec!["--kernel".into(), "/etc/hostname".into()],
            "not a kernel",
        ),
        (
            vec![
                "--kernel".into(),
                big.display().to_string(),
                "--memory".into(),
                "32".into(),
            ],
            "MiB of guest memory",
        ),
        (
            vec![
                "--kernel".into(),
                testguest().display().to_string(),
                "--cpu-template".into(),
                "pentium".into(),
            ],
            "unknown CPU template",
        ),
        (
            vec![
                "--kernel".into(),
                testguest().display().to_string(),
                "--vcpus".into(),
                "0".into(),
            ],
            "--vcpus",
        ),
        (
            vec![
                "--kernel".into(),
                testguest().display().to_string(),
                "--memory".into(),
                "4".into(),
            ],
            "--memory",
        ),
        (
            vec![
                "--kernel".into(),
                testguest().display().to_string(),
                "--console".into(),
                "tcp:1".into(),
            ],
            "console",
        ),
        (
            vec![
                "--kernel".into(),
                testguest().display().to_string(),
                "--initrd".into(),
                "/nonexistent/initrd".into(),
            ],
            "--initrd",
        ),
    ];
    for (args, needle) in cases {
        let o = bexar()
            .arg("run")
            .args(&args)
            .args(["--no-stdin", "--timeout", "5"])
            .output()
            .unwrap();
        assert_exit(&o, 2);
        let (_, err) = text(&o);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    std::fs::remove_file(corrupt).ok();
    std::fs::remove_file(big).ok();
}

#[test]
fn boot_test_runs_images_in_parallel_and_writes_junit() {
    let junit = tmp("junit.xml");
    let guest = testguest();
    let o = bexar()
        .arg("boot-test")
        .arg("--kernel")
        .arg(&guest)
        .arg("--kernel")
        .arg(&guest)
        .arg("--kernel")
        .arg(&guest)
        .args([
            "--cmdline",
            "bexar.test=banner",
            "--cmdline",
            &format!("bexar.test=smp{}", guest_platform_params()),
            "--cmdline",
            "bexar.test=hang",
        ])
        .args([
            "--expect",
            "PASS banner",
            "--expect",
            "PASS smp",
            "--expect",
            "PASS hang",
        ])
        .args(["--vcpus", "2", "--timeout", "3"])
        .arg("--junit")
        .arg(&junit)
        .output()
        .unwrap();
    // The third image never prints its pattern: boot-test fails overall, and says which.
    assert_exit(&o, 1);
    let (out, _) = text(&o);
    assert!(out.contains("2 passed, 1 failed"), "{out}");
    let xml = read(&junit);
    assert!(xml.contains("tests=\"3\" failures=\"1\""), "{xml}");
    assert!(
        xml.contains("ring 3 reached"),
        "console missing from the report"
    );
    assert!(
        xml.contains("<failure message=\"pattern &quot;PASS hang&quot; not seen"),
        "{xml}"
    );
    std::fs::remove_file(junit).ok();
}

#[test]
fn boot_test_passes_when_all_images_pass() {
    let guest = testguest();
    let o = bexar()
        .arg("boot-test")
        .arg("--kernel")
        .arg(&guest)
        .args(["--cmdline", "bexar.test=banner", "--timeout", "20"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(out.contains("1 passed, 0 failed"), "{out}");
}

#[test]
fn smbios_tables_carry_the_identity_given_and_a_real_decoder_reads_them() {
    // The test guest finds the tables in its own memory and prints them; dmidecode decodes
    // that copy.
    let seed = "ds=nocloud-net;s=http://10.0.0.1/seed/";
    let uuid = "5f0e1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    let o = run_testguest(
        "smbios",
        &[
            "--smbios",
            &format!("serial={seed},uuid={uuid},asset-tag=ci-42"),
        ],
    );
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    let dump = tmp("smbios.bin");
    std::fs::write(&dump, smbios_dump(&out)).unwrap();
    let decode = |key: &str| {
        let o = std::process::Command::new("dmidecode")
            .arg("--from-dump")
            .arg(&dump)
            .args(["-s", key])
            .output()
            .expect("run dmidecode (scripts/deps installs it)");
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    assert_eq!(decode("system-serial-number"), seed);
    assert_eq!(decode("system-uuid"), uuid);
    assert_eq!(decode("chassis-asset-tag"), "ci-42");
    assert_eq!(decode("system-manufacturer"), "Bexar");
    assert_eq!(decode("system-product-name"), "Bexar microVM");
    std::fs::remove_file(dump).ok();
    // What the tables cannot hold is refused as bad input (exit status 2), naming the key.
    let o = run_testguest("smbios", &["--smbios", "serial=tab\there"]);
    assert_exit(&o, 2);
    assert!(text(&o).1.contains("serial"), "{}", text(&o).1);
}

#[test]
fn bexar_run_is_jailed_by_default_and_not_with_no_jail() {
    use std::os::unix::fs::MetadataExt;
    for jailed in [true, false] {
        let extra: &[&str] = if jailed {
            &["--cmdline", "bexar.test=idle"]
        } else {
            &["--cmdline", "bexar.test=idle", "--no-jail"]
        };
        let (mut child, mut conn) = spawn_with_console_socket_logging(
            if jailed { "jail.sock" } else { "nojail.sock" },
            extra,
            "debug",
        );
        let run_pid = child.id();
        // Checked in a closure so that a failure shows what the VMM said.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_idle_ready(&mut conn);
            // The process started forks as it enters the jail: the VMM goes on as pid 1 of a PID
            // namespace of its own, the parent waits outside, without root, under a filter.
            let pid = if jailed {
                // Two children: the VMM, and the reaper that holds the VM for its teardown
                // (forked as soon as the VMM handed the VM over), holding nothing else.
                let kids = bexar_util::procfs::children(run_pid);
                let (reapers, vmms): (Vec<u32>, Vec<u32>) = kids
                    .iter()
                    .partition(|&&c| bexar_vmm::teardown::is_reaper(c));
                assert_eq!((reapers.len(), vmms.len()), (1, 1), "{kids:?}");
                let reaper_fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", reapers[0]))
                    .unwrap()
                    .flatten()
                    .map(|e| std::fs::read_link(e.path()).unwrap().display().to_string())
                    .collect();
                assert!(
                    reaper_fds.len() == 2 && reaper_fds.iter().any(|l| l == "anon_inode:kvm-vm"),
                    "the reaper holds the VM and its parent's pidfd: {reaper_fds:?}"
                );
                let s = std::fs::read_to_string(format!("/proc/{run_pid}/status")).unwrap();
                let uid = common::status_field(&s, "Uid:");
                assert!(uid.split_whitespace().all(|u| u != "0"), "{s}");
                assert_eq!(
                    common::status_field(&s, "CapEff:"),
                    "0000000000000000",
                    "{s}"
                );
                assert_eq!(common::status_field(&s, "NoNewPrivs:"), "1", "{s}");
                assert_eq!(common::status_field(&s, "Seccomp:"), "2", "{s}");
                assert_eq!(
                    common::status_field(&s, "CapBnd:"),
                    "0000000000000000",
                    "{s}"
                );
                let fds = std::fs::read_dir(format!("/proc/{run_pid}/fd")).unwrap();
                let held: Vec<String> = fds
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().parse::<u32>().unwrap() > 2)
                    .map(|e| std::fs::read_link(e.path()).unwrap().display().to_string())
                    .collect();
                assert!(
                    held.iter().all(|l| l.starts_with("socket:")),
                    "the waiting parent holds only its socket: {held:?}"
                );
                let vmm = vmms[0];
                let s = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
                assert_eq!(
                    common::status_field(&s, "NSpid:"),
                    format!("{vmm}\t1"),
                    "{s}"
                );
                vmm
            } else {
                run_pid
            };
            let mut seen = 0;
            for t in std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .flatten()
            {
                // A task that ended since the listing is not one to check.
                let Ok(s) = std::fs::read_to_string(t.path().join("status")) else {
                    continue;
                };
                seen += 1;
                let uid = common::status_field(&s, "Uid:");
                if jailed {
                    assert!(uid.split_whitespace().all(|u| u != "0"), "{s}");
                    assert_eq!(
                        common::status_field(&s, "CapEff:"),
                        "0000000000000000",
                        "{s}"
                    );
                    assert_eq!(common::status_field(&s, "Seccomp:"), "2", "{s}");
                    assert_eq!(common::status_field(&s, "NoNewPrivs:"), "1", "{s}");
                } else {
                    assert_eq!(common::status_field(&s, "Seccomp:"), "0", "{s}");
                }
            }
            assert!(seen >= 2, "the VMM and its vCPU thread: {seen} tasks");
            let root = std::fs::metadata(format!("/proc/{pid}/root")).unwrap();
            let empty = std::fs::metadata("/run/bexar/empty");
            let host = std::fs::metadata("/").unwrap();
            if jailed {
                let empty = empty.unwrap();
                assert_eq!((root.dev(), root.ino()), (empty.dev(), empty.ino()));
                assert_eq!(
                    std::fs::read_dir(format!("/proc/{pid}/root"))
                        .unwrap()
                        .count(),
                    0
                );
                let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
                assert_eq!(dev.lines().count(), 3, "only lo: {dev}");
                // Every jailed `bexar run` joins the one mount namespace kept on
                // /run/bexar/ns/empty.mntns, whose only mount is that root, read-only.
                // (This test's process is the run's parent, so the run keeps it in this
                // test's mount namespace, whichever that is.)
                let ns = std::fs::metadata(format!("/proc/{pid}/ns/mnt")).unwrap();
                let kept = std::fs::metadata("/run/bexar/ns/empty.mntns").unwrap();
                assert_eq!(ns.ino(), kept.ino(), "the shared mount namespace");
                let table = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
                assert_eq!(table.lines().count(), 1, "the root alone: {table}");
                let opts = table.split_whitespace().nth(5).unwrap_or_default();
                for opt in ["ro", "nosuid", "nodev", "noexec"] {
                    assert!(opts.split(',').any(|o| o == opt), "{opt}: {table}");
                }
            } else {
                assert_eq!((root.dev(), root.ino()), (host.dev(), host.ino()));
            }
            pid
        }));
        // A SIGTERM ends the VMM even as pid 1 of its namespace (which ignores a signal left
        // at its default action), and `bexar run` exits as it did. Sent to `bexar run`, the
        // parent: it forwards it and waits, so the VMM is gone when it has exited.
        let termed = match &checked {
            Ok(vmm) if jailed => {
                let vmm = *vmm;
                // SAFETY: kill(2) of the process this test started.
                unsafe { libc::kill(run_pid as i32, libc::SIGTERM) };
                Some(vmm)
            }
            _ => {
                let _ = child.kill();
                None
            }
        };
        let o = child.wait_with_output().unwrap();
        if let Err(p) = checked {
            eprintln!("the VMM said: {}", String::from_utf8_lossy(&o.stderr));
            std::panic::resume_unwind(p);
        }
        if let Some(vmm) = termed {
            assert_eq!(o.status.code(), Some(128 + libc::SIGTERM), "{o:?}");
            assert!(
                !std::path::Path::new(&format!("/proc/{vmm}")).exists(),
                "the VMM outlived bexar run"
            );
        }
        // The kernel (which may be a tenant's) is read and parsed only once the VMM is jailed.
        let log = String::from_utf8_lossy(&o.stderr);
        let loaded = log
            .find("kernel loaded, in the jail")
            .expect("no kernel-loaded line");
        if jailed {
            let entered = log.find("jailed in").expect("no jail line");
            assert!(
                entered < loaded,
                "the kernel was read before the jail: {log}"
            );
        }
    }
}

/// Runs `bexar vmm --dir dir` on `launch`, which inherits `fds` (what the launch hands it),
/// until it ends; its exit status and its result's reason.
fn run_launch(
    dir: &std::path::Path,
    launch: &bexar_vmm::launch::Launch,
    fds: &[(bexar_util::handed::What, std::os::fd::OwnedFd)],
) -> (Option<i32>, String) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let mut launch = launch.clone();
    launch.handed = Some(bexar_util::handed::Handed {
        fds: fds
            .iter()
            .map(|(what, fd)| bexar_util::handed::HandedFd {
                what: what.clone(),
                fd: fd.as_raw_fd(),
            })
            .collect(),
        strict: true,
    });
    std::fs::write(
        dir.join("launch.json"),
        serde_json::to_vec(&launch).unwrap(),
    )
    .unwrap();
    let _ = std::fs::remove_file(dir.join("result.json"));
    let raw: Vec<i32> = fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let mut c = bexar();
    c.arg("vmm").arg("--dir").arg(dir).stdin(Stdio::null());
    // SAFETY: fcntl is async-signal-safe; `raw` was made before the fork.
    unsafe {
        c.pre_exec(move || {
            for fd in &raw {
                if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let o = c.output().unwrap();
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("result.json")).unwrap_or_default())
            .unwrap_or_default();
    let (_, err) = text(&o);
    assert!(!err.contains("panicked"), "{err}");
    (
        o.status.code(),
        format!("{} / {err}", result["reason"].as_str().unwrap_or("")),
    )
}

/// `bexar vmm` as the agent starts it, handed /dev/kvm, the kernel, its disk's file, the
/// console's log and the control socket: it runs the guest on them. One left out of the list
/// and the VMM fails naming it: it opens nothing by path.
#[test]
fn a_vmm_handed_what_it_needs_opens_nothing_by_path() {
    use bexar_util::handed::What;
    let dir = tmp("handed");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut config = bexar_vmm::VmConfig::new(testguest());
    config.cmdline = format!("console=ttyS0 bexar.test=banner{}", guest_platform_params());
    config.memory_mib = 64;
    config.console = bexar_devices::serial::ConsoleConfig::File {
        path: dir.join("console.log"),
    };
    config.disks = vec![bexar_devices::block::DiskConfig {
        path: disk.clone(),
        ..Default::default()
    }];
    config.control = Some(bexar_vmm::config::ControlConfig {
        socket: dir.join("control.sock"),
        id: "handed".into(),
        token: "t".into(),
    });
    let launch = bexar_vmm::launch::Launch::new(config);
    let fds = launch.open_handed().unwrap();
    let kinds: Vec<&What> = fds.iter().map(|(w, _)| w).collect();
    assert!(kinds.contains(&&What::Kvm), "{kinds:?}");
    assert!(
        kinds.contains(&&What::File {
            path: disk.clone(),
            writable: true
        }),
        "{kinds:?}"
    );

    let (code, why) = run_launch(&dir, &launch, &fds);
    assert_eq!(code, Some(0), "{why}");
    let console = read(&dir.join("console.log"));
    assert!(console.contains("PASS banner"), "{console}");

    for left_out in [
        What::Kvm,
        What::File {
            path: disk.clone(),
            writable: true,
        },
        What::File {
            path: testguest(),
            writable: false,
        },
    ] {
        let fewer: Vec<_> = launch
            .open_handed()
            .unwrap()
            .into_iter()
            .filter(|(w, _)| *w != left_out)
            .collect();
        let (code, why) = run_launch(&dir, &launch, &fewer);
        assert_ne!(code, Some(0), "{left_out:?}: {why}");
        assert!(why.contains("was not handed"), "{left_out:?}: {why}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
