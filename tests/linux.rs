//! A real Linux kernel (guest-images/linux) on real KVM: the client nobody here wrote. Few boots
//! per run, because on a PVM host each takes tens of seconds (PLATFORM.md, docs/platform.md):
//! the ELF vmlinux through its PVH entry under `bexar boot-test` (uncompressed initramfs); the
//! bzImage through the 64-bit Linux boot protocol on two vCPUs under `bexar run` (gzip
//! initramfs), snapshotted mid-boot and restored in a new process that takes it to its orderly
//! end; the virtio witness, whose ext4 root is a qcow2 overlay on a raw base; and an ext4
//! root on an NBD export, which the kernel mounts read-write over the network.

mod common;

use common::*;

const INIT: &str = "Run /init as init process";

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
    // The kernel found the machine we described: our MP table, our SMBIOS tables (the kernel's
    // own decoder prints the system's maker and product), the e820 map, the serial port, the
    // initramfs, and on PVM the parameters the VMM added by itself.
    for needle in [
        "MPTABLE: OEM ID: BEXAR",
        "SMBIOS 3.0.0 present.",
        "DMI: Bexar Bexar microVM, BIOS",
        "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable",
        "ttyS0 at I/O 0x3f8 (irq = 4",
        "Unpacking initramfs",
        INIT,
    ] {
        assert!(xml.contains(needle), "console lacks {needle:?}");
    }
    if is_pvm() {
        assert!(
            xml.contains("Clearing CPUID bits: popcnt cx16 smap"),
            "PVM parameters missing"
        );
    }
    std::fs::remove_file(junit).ok();
    std::fs::remove_dir_all(logs).ok();
}

/// The bzImage on two vCPUs, snapshotted in the middle of its boot (once both CPUs are up)
/// and restored in a new process, which must carry the kernel on to init and its orderly end:
/// the kernel is the witness of every vCPU, interrupt controller, timer and device state.
#[test]
fn bzimage_on_two_vcpus_snapshotted_mid_boot_continues_in_a_new_process() {
    let img = linux_image();
    let before = tmp("bzimage-before.log");
    let after = tmp("bzimage-after.log");
    let socket = tmp("bzimage.sock");
    let dir = tmp("bzimage-snapshot");
    let mut first = bexar()
        // Snapshots to a path the test chooses: a jailed run sees only its empty root.
        .args(["run", "--no-jail"])
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
        .arg("--control")
        .arg(&socket)
        .arg("--console")
        .arg(format!("file:{}", before.display()))
        .spawn()
        .unwrap();
    const MID_BOOT: &str = "smp: Brought up 1 node, 2 CPUs";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !std::fs::read_to_string(&before)
        .unwrap_or_default()
        .contains(MID_BOOT)
    {
        assert!(std::time::Instant::now() < deadline, "{}", read(&before));
        assert!(first.try_wait().unwrap().is_none(), "{}", read(&before));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let reply = vmm_control(
        &socket,
        &serde_json::json!({"op": "snapshot", "dir": dir, "then": "stop"}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(first.wait().unwrap().success());
    let early = read(&before);
    assert!(!early.contains(INIT), "the snapshot came too late: {early}");

    let o = bexar()
        .arg("run")
        .arg("--restore")
        .arg(&dir)
        .args(["--timeout", "600", "--no-stdin"])
        .arg("--console")
        .arg(format!("file:{}", after.display()))
        .output()
        .unwrap();
    let console = read(&after);
    let (_, err) = text(&o);
    assert!(console.contains(INIT), "{console}");
    if is_pvm() {
        // User space cannot make system calls here: init dies, the kernel panics and, with
        // panic=1 reboot=k, resets through the i8042, which the VMM reports as an orderly exit.
        assert!(console.contains("Attempted to kill init"), "{console}");
    } else {
        assert!(console.contains("BEXAR-GUEST-INIT-OK"), "{console}");
    }
    assert_exit(&o, 0);
    assert!(err.contains("guest reset"), "{err}");
    std::fs::remove_file(before).ok();
    std::fs::remove_file(after).ok();
    std::fs::remove_dir_all(dir).ok();
}

/// Builds a small ext4 root file system with no init on it, so the kernel's own end is the
/// witness: it mounts the root, fails to exec every init it knows, and panics with
/// "No working init found".
fn ext4_root() -> std::path::PathBuf {
    let dir = tmp("rootfs");
    for d in ["dev", "proc", "sys", "tmp", "sbin", "etc", "bin"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let img = tmp("root.ext4");
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "bexar-root", "-d"])
        .arg(&dir)
        .arg(&img)
        .arg("32M")
        .status()
        .expect("run mkfs.ext4 (e2fsprogs)")
        .success();
    assert!(ok, "mkfs.ext4 failed");
    std::fs::remove_dir_all(dir).ok();
    img
}

/// A network namespace with a TAP (vnet headers) at 10.0.2.1/24 and a DHCP server on it,
/// removed with everything in it when dropped.
struct DhcpNetns {
    ns: TapNetns,
    server: std::process::Child,
    leases: std::path::PathBuf,
    conf: std::path::PathBuf,
}

impl DhcpNetns {
    fn new() -> Self {
        let ns = TapNetns::new("it");
        let leases = tmp("udhcpd.leases");
        let conf = tmp("udhcpd.conf");
        std::fs::write(&leases, b"").unwrap();
        std::fs::write(
            &conf,
            format!(
                "start 10.0.2.15\nend 10.0.2.20\ninterface tap0\nlease_file {}\n\
                 option subnet 255.255.255.0\noption router 10.0.2.1\n",
                leases.display()
            ),
        )
        .unwrap();
        let server = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "busybox", "udhcpd", "-f"])
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start udhcpd");
        Self {
            ns,
            server,
            leases,
            conf,
        }
    }
}

impl Drop for DhcpNetns {
    fn drop(&mut self) {
        // The server first; the namespace goes with `ns`.
        let _ = self.server.kill();
        let _ = self.server.wait();
        std::fs::remove_file(&self.leases).ok();
        std::fs::remove_file(&self.conf).ok();
    }
}

#[test]
fn vmlinux_drives_all_four_virtio_devices_ext4_root_on_qcow2_dhcp_rng_vsock() {
    let img = linux_image();
    let netns = DhcpNetns::new();
    // The root file system is a qcow2 overlay on the raw ext4 image: the kernel mounts it
    // read-write through the qcow2 backend, and its writes land in the overlay only.
    let base = ext4_root();
    let base_bytes = std::fs::read(&base).unwrap();
    let root = tmp("root.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        root.to_str().unwrap(),
    ]);
    let scratch = tmp("scratch.img");
    std::fs::File::create(&scratch)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let log = tmp("virtio-linux.log");
    let vsock = tmp("virtio-linux.vsock");
    let result = tmp("virtio-linux.json");
    // bexar runs inside the namespace, where the TAP lives.
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", &netns.ns.name, env!("CARGO_BIN_EXE_bexar")])
        .arg("run")
        .arg("--kernel")
        .arg(img.join("vmlinux"))
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 root=/dev/vda rw ip=dhcp",
            "--net",
            "tap=tap0,mac=02:00:00:00:00:2a",
            "--vsock",
        ])
        .arg(format!("cid=3,uds={}", vsock.display()))
        .arg("--disk")
        .arg(format!("{},serial=bexar-root", root.display()))
        .arg("--disk")
        .arg(format!("{},ro", scratch.display()))
        .args(["--rng", "--memory", "128", "--timeout", "300", "--no-stdin"])
        .arg("--console")
        .arg(format!("file:{}", log.display()))
        .arg("--result-json")
        .arg(&result)
        .output()
        .unwrap();
    let console = read(&log);
    assert_exit(&o, 0);
    for needle in [
        "virtio-mmio: Registering device virtio-mmio.0 at 0xd0000000-0xd0000fff, IRQ 5",
        "[vda] 65536 512-byte logical blocks",
        "[vdb] 16384 512-byte logical blocks",
        "EXT4-fs (vda): mounted filesystem",
        "VFS: Mounted root (ext4 filesystem) on device 254:0",
        // DHCP over virtio-net: the answer proves frames crossed the TAP both ways.
        "IP-Config: Got DHCP answer from 10.0.2.1",
        "hwaddr=02:00:00:00:00:2a",
        "Run /sbin/init as init process",
        // The kernel's own end, after every failed exec: not a KVM error.
        "Kernel panic - not syncing: No working init found",
    ] {
        assert!(
            console.contains(needle),
            "console lacks {needle:?}\n{console}"
        );
    }
    // The root was mounted read-write (the kernel says "readonly" otherwise).
    assert!(
        !console.contains("Mounted root (ext4 filesystem) readonly"),
        "{console}"
    );
    let (_, err) = text(&o);
    // panic=1 reboot=k: the panic resets the machine through the i8042, an orderly end.
    assert!(err.contains("guest reset"), "{err}");
    let json: serde_json::Value = serde_json::from_str(&read(&result)).unwrap();
    // Not a KVM error: where this platform refused an fwait on the way (a task's exit runs one
    // in fpu__drop), the VMM completed it; the count is in the report.
    assert!(!err.contains("KVM internal error"), "{err}");
    assert!(json["completed_instructions"].is_u64(), "{json}");
    if !is_pvm() {
        assert_eq!(json["completed_instructions"], 0, "{json}");
    }
    let devices = json["devices"].as_array().unwrap();
    let rng = devices.iter().find(|d| d["kind"] == "rng").unwrap();
    assert!(
        rng["read_bytes"].as_u64().unwrap() > 0,
        "the kernel took no entropy: {rng}"
    );
    // Linux's own drivers brought up every device: two disks, the NIC, the rng and vsock.
    assert_eq!(devices.len(), 5, "{json}");
    for d in devices {
        assert_eq!(d["activations"], 1, "{d}");
    }
    let net = devices.iter().find(|d| d["kind"] == "net").unwrap();
    assert!(
        net["read_bytes"].as_u64().unwrap() > 0 && net["written_bytes"].as_u64().unwrap() > 0,
        "{net}"
    );
    let vda = &devices[0];
    assert!(vda["read_bytes"].as_u64().unwrap() > 0);
    assert!(vda["written_bytes"].as_u64().unwrap() > 0, "{vda}");
    assert_eq!(vda["refused"], 0, "{vda}");
    // The overlay checks clean, holds the kernel's writes (the superblock's mount count at
    // least), and the base is untouched.
    qemu_img_ok(&["check", root.to_str().unwrap()]);
    let map = qemu_img_ok(&["map", "--output=json", root.to_str().unwrap()]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .any(|e| e["depth"] == 0 && e["data"] == true),
        "nothing was written to the overlay: {map}"
    );
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base changed"
    );
    for p in [base, root, scratch, log, result, vsock] {
        std::fs::remove_file(p).ok();
    }
}

/// The kernel mounts its ext4 root read-write from a disk on Debian's nbd-server: the
/// kernel's own writes (the superblock's mount count and time, the journal) go over NBD.
#[test]
fn vmlinux_mounts_its_ext4_root_read_write_from_an_nbd_export() {
    let img = linux_image();
    let root = ext4_root();
    let before = std::fs::read(&root).unwrap();
    let dir = tmp("nbd-root");
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = NbdServer::start("nbd-server", &root, &dir);
    let log = tmp("nbd-root.log");
    let o = bexar()
        .arg("run")
        .arg("--kernel")
        .arg(img.join("vmlinux"))
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 root=/dev/vda rw",
            "--disk",
            &server.url(",serial=nbd-root"),
            "--memory",
            "128",
            "--timeout",
            "300",
            "--no-stdin",
        ])
        .arg("--console")
        .arg(format!("file:{}", log.display()))
        .output()
        .unwrap();
    let console = read(&log);
    assert_exit(&o, 0);
    for needle in [
        "[vda] 65536 512-byte logical blocks",
        "EXT4-fs (vda): mounted filesystem",
        "VFS: Mounted root (ext4 filesystem) on device 254:0",
        "Kernel panic - not syncing: No working init found",
    ] {
        assert!(
            console.contains(needle),
            "console lacks {needle:?}\n{console}"
        );
    }
    let (_, err) = text(&o);
    assert!(err.contains("simple replies"), "{err}");
    server.kill();
    // The kernel wrote to the export: its superblock changed (mount count, times), and the
    // file system checks clean.
    let after = std::fs::read(&root).unwrap();
    assert!(after != before, "nothing was written over NBD");
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    std::fs::remove_file(root).ok();
    std::fs::remove_file(log).ok();
    std::fs::remove_dir_all(dir).ok();
}
