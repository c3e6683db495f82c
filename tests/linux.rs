//! A real Linux kernel (guest-images/linux) on real KVM: the client nobody here wrote. Two boots
//! per run, because on a PVM host each takes tens of seconds (PLATFORM.md, docs/platform.md):
//! the ELF vmlinux through its PVH entry under `bexar boot-test` (uncompressed initramfs), and
//! the bzImage through the 64-bit Linux boot protocol on two vCPUs under `bexar run` (gzip
//! initramfs), to its orderly end.

mod common;

use common::*;

const INIT: &str = "Run /init as init process";

fn on_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn vmlinux_reaches_init_under_boot_test() {
    let img = linux_image();
    let junit = tmp("linux-junit.xml");
    let logs = tmp("linux-logs");
    let o = bexar()
        .arg("boot-test")
        .arg("--kernel")
        .arg(img.join("vmlinux"))
        .arg("--initrd")
        .arg(img.join("initramfs.cpio"))
        .args(["--expect", INIT, "--timeout", "600", "--memory", "128"])
        .arg("--junit")
        .arg(&junit)
        .arg("--log-dir")
        .arg(&logs)
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let (out, _) = text(&o);
    assert!(out.contains("1 passed, 0 failed"), "{out}");
    let xml = read(&junit);
    assert!(xml.contains("failures=\"0\""), "{xml}");
    // The kernel found the machine we described: our MP table, the e820 map, the serial port,
    // the initramfs, and on PVM the parameters the VMM added by itself.
    for needle in [
        "MPTABLE: OEM ID: BEXAR",
        "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable",
        "ttyS0 at I/O 0x3f8 (irq = 4",
        "Unpacking initramfs",
        INIT,
    ] {
        assert!(xml.contains(needle), "console lacks {needle:?}");
    }
    if on_pvm() {
        assert!(
            xml.contains("Clearing CPUID bits: popcnt cx16 smap"),
            "PVM parameters missing"
        );
    }
    std::fs::remove_file(junit).ok();
    std::fs::remove_dir_all(logs).ok();
}

#[test]
fn bzimage_on_two_vcpus_boots_and_ends_cleanly() {
    let img = linux_image();
    let log = tmp("bzimage.log");
    let o = bexar()
        .arg("run")
        .arg("--kernel")
        .arg(img.join("bzImage"))
        .arg("--initrd")
        .arg(img.join("initramfs.cpio.gz"))
        .args([
            "--vcpus",
            "2",
            "--memory",
            "192",
            "--timeout",
            "600",
            "--no-stdin",
        ])
        .arg("--console")
        .arg(format!("file:{}", log.display()))
        .output()
        .unwrap();
    let console = read(&log);
    let (_, err) = text(&o);
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "{console}"
    );
    assert!(console.contains(INIT), "{console}");
    if on_pvm() {
        // User space cannot make system calls here: init dies, the kernel panics and, with
        // panic=1 reboot=k, resets through the i8042, which the VMM reports as an orderly exit.
        assert!(console.contains("Attempted to kill init"), "{console}");
    } else {
        assert!(console.contains("BEXAR-GUEST-INIT-OK"), "{console}");
    }
    assert_exit(&o, 0);
    assert!(err.contains("guest reset"), "{err}");
    std::fs::remove_file(log).ok();
}
