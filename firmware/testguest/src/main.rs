//! The Bexar test guest. Entered by the VMM through the Linux 64-bit boot
//! protocol; `rt` sets up ring 0 and drops to ring 3, where everything here
//! runs. The command-line token `bexar.test=NAME` picks the test (default
//! `banner`); every test ends the VM through the exit port (0 = pass) after
//! printing `bexar-testguest: PASS <name>` or `bexar-testguest: FAIL <name>: <reason>`.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use rt::arch::{self, cpuid, rdtsc};
use rt::bootparams::{cmdline_param, BootParams};
use rt::mptable::MpTable;
use rt::{boot, exit, print, println, smp, uart, MAX_CPUS};

mod dirty;
mod idle;
mod imds;
mod migrant;
mod net;
mod nettests;
mod snaptest;
mod vtests;

rt::entry!(main);

const P: &str = "bexar-testguest";

/// Exit-port status codes (the ring-0 exception handler uses 0x100 + vector,
/// the runtime's panic handler 2).
mod code {
    pub const PASS: u32 = 0;
    pub const FAIL: u32 = 1;
    pub const FAIL_TEST: u32 = 3;
    pub const UNKNOWN_TEST: u32 = 4;
    pub const SMP_TIMEOUT: u32 = 5;
    pub const SMP_ID_MISMATCH: u32 = 6;
    pub const SMP_NO_MPTABLE: u32 = 7;
    pub const SMP_IPI: u32 = 8;
    pub const RESET_IGNORED: u32 = 9;
    pub const TRIPLE_FAULT_RETURNED: u32 = 10;
    pub const RING0_CALL: u32 = 11;
    pub const NOT_RING3: u32 = 12;
    // virtio tests (vtests.rs)
    pub const VIRTIO_NO_DEVICE: u32 = 20;
    pub const VIRTIO_INIT: u32 = 21;
    pub const VIRTIO_IO: u32 = 22;
    pub const VERIFY: u32 = 23;
    pub const RO_WRITE_ACCEPTED: u32 = 24;
    pub const RNG_BAD: u32 = 25;
    pub const HOSTILE_GARBAGE: u32 = 26;
    pub const HOSTILE_ROUND_TRIP: u32 = 27;
    pub const BAD_PARAM: u32 = 28;
    pub const VIRTIO_NO_MEMORY: u32 = 29;
    pub const NOT_ZERO: u32 = 30;
    pub const HOSTILE_NOT_REFUSED: u32 = 31;
    pub const NET_NO_REPLY: u32 = 32;
    // network stack modes (nettests.rs, imds.rs)
    pub const NET_NO_NDP: u32 = 33;
    pub const NET_NO_ECHO6: u32 = 34;
    pub const NET_REACHABLE: u32 = 35;
    pub const NET_NO_ROUTE: u32 = 36;
    pub const NET_UDP_V4: u32 = 37;
    pub const NET_UDP_V6: u32 = 38;
    pub const NET_UDP_BOTH: u32 = 39;
    // vsock (vtests.rs)
    pub const VSOCK_NO_RESPONSE: u32 = 40;
    pub const VSOCK_REFUSED: u32 = 41;
    pub const VSOCK_DATA: u32 = 42;
    pub const VSOCK_PROTOCOL: u32 = 43;
    pub const VSOCK_STALL: u32 = 44;
    pub const VSOCK_NO_REQUEST: u32 = 45;
    // net-blast (vtests.rs)
    pub const NET_BLAST_RX: u32 = 46;
    pub const NET_NO_ADDR6: u32 = 47;
    pub const IMDS_NO_ARP: u32 = 48;
    pub const IMDS_NO_CONNECTION: u32 = 49;
    pub const IMDS_BAD_RESPONSE: u32 = 50;
    // smbios
    pub const SMBIOS_NOT_FOUND: u32 = 51;
    pub const SMBIOS_BAD_ENTRY: u32 = 52;
    // dirty
    pub const MISMATCH: u32 = 53;
}

type TestResult = Result<(), (u32, &'static str)>;

type Test = fn(&BootParams) -> TestResult;

const TESTS: &[(&str, Test)] = &[
    ("banner", test_banner),
    ("fail", test_fail),
    ("smp", test_smp),
    ("triple-fault", test_triple_fault),
    ("reset", test_reset),
    ("hang", test_hang),
    ("echo", test_echo),
    ("cpuid", test_cpuid),
    ("ring0-call", test_ring0_call),
    ("exception", test_exception),
    ("panic", test_panic),
    ("idle", idle::test_idle),
    ("virtio-scan", vtests::test_virtio_scan),
    ("blk-rw", vtests::test_blk_rw),
    ("blk-verify", vtests::test_blk_verify),
    ("blk-discard", vtests::test_blk_discard),
    ("blk-scatter", vtests::test_blk_scatter),
    ("rng", vtests::test_rng),
    ("hostile", vtests::test_hostile),
    ("blk-bench", vtests::test_blk_bench),
    ("net", nettests::test_net),
    ("net-udp", nettests::test_net_udp),
    ("net-peer", nettests::test_net_peer),
    ("net-spoof", nettests::test_net_spoof),
    ("imds", imds::test_imds),
    ("net-blast", vtests::test_net_blast),
    ("vsock", vtests::test_vsock),
    ("smbios", test_smbios),
    ("snapshot", snaptest::test_snapshot),
    ("touch", test_touch),
    ("dirty", dirty::test_dirty),
    ("migrant", migrant::test_migrant),
    ("generation", test_generation),
];

fn main(bp: BootParams) -> ! {
    if cmdline_param(bp.cmdline(), "bexar.test") == Some("minimal") {
        // The trivial guest of the start-up benchmark: three bytes, then the exit port, and no
        // other port access (the UART is not initialised). Every port access costs an exit, and
        // on PVM a trip through the ring-0 #GP handler too.
        rt::uart::write_raw(b"ok\n");
        exit::exit(code::PASS)
    }
    let (cpl, iopl) = (arch::cpl(), arch::iopl());
    println!("{P}: ring 3 reached (cpl={cpl}, iopl={iopl})");
    let cmdline = bp.cmdline();
    println!("{P}: cmdline: {cmdline}");
    let name = cmdline_param(cmdline, "bexar.test").unwrap_or("banner");
    println!("{P}: test: {name}");
    if iopl != 3 {
        // PVM runs guest ring 3 with the hardware IOPL=0 whatever we asked
        // for: `in`/`out` then trap and the ring-0 #GP handler performs them.
        println!("{P}: note: RFLAGS.IOPL reads {iopl}: port I/O is emulated by the ring-0 #GP handler");
    }
    let result = if cpl != 3 {
        Err((code::NOT_RING3, "not running in ring 3"))
    } else {
        match TESTS.iter().find(|(n, _)| *n == name) {
            Some((_, f)) => f(&bp),
            None => Err((code::UNKNOWN_TEST, "unknown test")),
        }
    };
    match result {
        Ok(()) => {
            println!("{P}: PASS {name}");
            if cmdline_param(cmdline, "bexar.after") == Some("hang") {
                // For tests that kill the VMM at a known point (e.g. after a flushed write).
                println!("{P}: hanging after {name} (bexar.after=hang)");
                loop {
                    core::hint::spin_loop();
                }
            }
            exit::exit(code::PASS)
        }
        Err((status, reason)) => {
            println!("{P}: FAIL {name}: {reason} (status {status})");
            exit::exit(status)
        }
    }
}

fn print_memory(bp: &BootParams) {
    for e in bp.e820_iter() {
        println!("{P}: e820: [{:#012x}-{:#012x}) type {}", e.addr, e.addr.wrapping_add(e.size), e.kind);
    }
    let ram = bp.ram_bytes();
    let mib = (ram + (1 << 19)) >> 20;
    println!("{P}: memory: {mib} MiB RAM ({ram} bytes in {} e820 entries, top {:#x})", bp.e820_count(), bp.ram_top());
}

fn test_banner(bp: &BootParams) -> TestResult {
    println!("{P}: boot_params at {:#x}", bp.addr());
    print_memory(bp);
    match MpTable::find() {
        Ok(mp) => {
            let bsp = mp.bsp().map(|c| c.apic_id as i32).unwrap_or(-1);
            println!(
                "{P}: cpus: {} in the MP table (bsp apic id {bsp}, lapic {:#x}, {} ioapic(s))",
                mp.enabled_cpus().count(),
                mp.lapic_addr,
                mp.nioapics
            );
            for io in mp.ioapics() {
                println!("{P}: ioapic: id {} at {:#x}", io.id, io.addr);
            }
        }
        Err(e) => println!("{P}: cpus: no MP table ({e})"),
    }
    Ok(())
}

fn test_fail(_: &BootParams) -> TestResult {
    println!("{P}: fail: failing on purpose");
    Err((code::FAIL_TEST, "requested failure"))
}

// ---------------------------------------------------------------- smp

/// Per CPU index: CPUID APIC id + 1 (0 = not checked in).
static CHECKIN: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Per CPU index: local APIC ID register + 1.
static LAPIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static CHECKED_IN: AtomicUsize = AtomicUsize::new(0);
/// Whether CPUID is the host's (PVM), so the LAPIC ID register stands in for it.
static CPUID_NATIVE: AtomicBool = AtomicBool::new(false);

/// This CPU's APIC id as the test trusts it: CPUID's, or the LAPIC ID register's where CPUID
/// is the host's.
fn apic_id() -> u32 {
    if CPUID_NATIVE.load(Ordering::Relaxed) {
        smp::lapic_id()
    } else {
        arch::cpuid_apic_id()
    }
}

fn check_in(index: usize) {
    let lapic = smp::lapic_id();
    let id = apic_id();
    if index < MAX_CPUS {
        LAPIC_IDS[index].store(lapic + 1, Ordering::Relaxed);
        CHECKIN[index].store(id + 1, Ordering::Release);
    }
    CHECKED_IN.fetch_add(1, Ordering::AcqRel);
}

fn ap_main(index: usize) {
    check_in(index);
}

fn test_smp(bp: &BootParams) -> TestResult {
    // On PVM hosts CPUID is not virtualised: it returns the host's answer for whichever host
    // CPU the vCPU thread runs on (measured: the BSP saw APIC id 0 or 1 from run to run on a
    // 2-core host). There, `bexar.cpuid=native` says so, and identities are checked with the
    // LAPIC ID register (which KVM does virtualise) against the MP table instead.
    let cpuid_native = cmdline_param(bp.cmdline(), "bexar.cpuid") == Some("native");
    CPUID_NATIVE.store(cpuid_native, Ordering::Relaxed);
    let mp = match MpTable::find() {
        Ok(mp) => mp,
        Err(e) => {
            println!("{P}: smp: {e}");
            return Err((code::SMP_NO_MPTABLE, "no usable MP table"));
        }
    };
    let expected = mp.enabled_cpus().count();
    let bsp_id = apic_id();
    println!("{P}: smp: MP table lists {expected} cpus; bsp apic id {bsp_id}");
    if cpuid_native {
        println!("{P}: smp: CPUID is the host's here: apic ids come from the LAPIC ID register");
    }
    if mp.cpus_dropped > 0 {
        println!("{P}: smp: {} more cpus than supported ({MAX_CPUS})", mp.cpus_dropped);
        return Err((code::SMP_ID_MISMATCH, "too many cpus in the MP table"));
    }
    match mp.bsp() {
        Some(b) if b.apic_id as u32 == bsp_id => {}
        Some(b) => {
            println!("{P}: smp: MP table bsp apic id {} != apic id {bsp_id}", b.apic_id);
            return Err((code::SMP_ID_MISMATCH, "bsp apic id differs from the MP table"));
        }
        None => return Err((code::SMP_ID_MISMATCH, "no bsp in the MP table")),
    }
    check_in(0);

    let t0 = rdtsc();
    let sent = match smp::start_aps(&mp, ap_main) {
        Ok(n) => n,
        Err(e) => {
            println!("{P}: smp: IPI failed: {e:?}");
            return Err((code::SMP_IPI, "INIT/SIPI delivery failed"));
        }
    };
    let hz = arch::tsc_hz();
    let timeout = hz.saturating_mul(5);
    while CHECKED_IN.load(Ordering::Acquire) < sent + 1 && rdtsc().wrapping_sub(t0) < timeout {
        core::hint::spin_loop();
    }
    let online = CHECKED_IN.load(Ordering::Acquire);
    let ms = rdtsc().wrapping_sub(t0) / (hz / 1000).max(1);

    let mut ids = [0u32; MAX_CPUS];
    let mut n = 0;
    let mut mismatch = false;
    for i in 0..MAX_CPUS {
        let v = CHECKIN[i].load(Ordering::Acquire);
        if v != 0 {
            let l = LAPIC_IDS[i].load(Ordering::Relaxed);
            if l != v {
                println!("{P}: smp: cpu {i}: cpuid apic id {} but LAPIC ID register {}", v - 1, l.wrapping_sub(1));
                mismatch = true;
            }
            ids[n] = v - 1;
            n += 1;
        }
    }
    let ids = &mut ids[..n];
    ids.sort_unstable();
    {
        let mut g = uart::Console::lock();
        use core::fmt::Write;
        let _ = write!(g, "{P}: smp: {online}/{expected} cpus online, apic ids [");
        for (i, id) in ids.iter().enumerate() {
            let _ = write!(g, "{}{id}", if i > 0 { ", " } else { "" });
        }
        let _ = writeln!(g, "]");
    }
    println!("{P}: smp: {sent} APs started, {} arrived in long mode, {ms} ms", smp::aps_arrived());
    if online < expected {
        return Err((code::SMP_TIMEOUT, "not every cpu came online"));
    }
    if online > expected || n != online {
        return Err((code::SMP_ID_MISMATCH, "more check-ins than cpus"));
    }
    if mismatch {
        return Err((code::SMP_ID_MISMATCH, "cpuid apic id differs from the LAPIC ID register"));
    }
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err((code::SMP_ID_MISMATCH, "duplicate apic ids"));
    }
    let mut want = [0u32; MAX_CPUS];
    let mut m = 0;
    for c in mp.enabled_cpus() {
        want[m] = c.apic_id as u32;
        m += 1;
    }
    let want = &mut want[..m];
    want.sort_unstable();
    if want != ids {
        return Err((code::SMP_ID_MISMATCH, "apic ids differ from the MP table"));
    }
    Ok(())
}

// ---------------------------------------------------------------- others

fn test_triple_fault(_: &BootParams) -> TestResult {
    println!("{P}: triple-fault: asking ring 0 (int 0x80) to load an empty IDT and fault");
    boot::ring0_call(boot::SYS_TRIPLE_FAULT);
    Err((code::TRIPLE_FAULT_RETURNED, "still running after the triple fault request"))
}

fn test_reset(_: &BootParams) -> TestResult {
    println!("{P}: reset: writing 0xfe to port 0x64");
    exit::reset();
    arch::delay_us(1_000_000);
    Err((code::RESET_IGNORED, "still running 1 s after the reset request"))
}

fn test_hang(_: &BootParams) -> TestResult {
    println!("{P}: hang: spinning forever in ring 3");
    loop {
        core::hint::spin_loop();
    }
}

/// `touch`: writes a distinct non-zero word into every page of `bexar.touch-mib` MiB (default
/// 16) of free memory, says so, and spins: a guest whose touched memory a snapshot must hold.
fn test_touch(bp: &BootParams) -> TestResult {
    let mib = vtests::param(bp, "bexar.touch-mib", 16)? as usize;
    let region = vtests::alloc(mib << 20)?;
    for (i, page) in region.chunks_exact_mut(4096).enumerate() {
        page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    }
    println!("{P}: touch: {} pages written", region.len() / 4096);
    loop {
        core::hint::spin_loop();
    }
}

/// The VM generation ID in the SMBIOS tables (the OEM string after its mark), read from memory.
fn read_generation() -> Option<[u8; 32]> {
    const MARK: &[u8] = b"bexar-vm-generation=";
    let region = unsafe { core::slice::from_raw_parts(0xf0000 as *const u8, 0x10000) };
    let at = region.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
    let mut g = [0u8; 32];
    g.copy_from_slice(region.get(at..at + 32)?);
    Some(g)
}

/// `generation`: prints the VM generation ID, and again after each console byte until `q`: a
/// guest restored from a snapshot reads a new one.
fn test_generation(_: &BootParams) -> TestResult {
    loop {
        let g = read_generation().ok_or((code::SMBIOS_NOT_FOUND, "no VM generation ID"))?;
        println!("{P}: generation: {}", core::str::from_utf8(&g).unwrap_or("?"));
        if uart::getb() == b'q' {
            return Ok(());
        }
    }
}

fn test_echo(_: &BootParams) -> TestResult {
    println!("{P}: echo: ready, type a line");
    let mut buf = [0u8; 256];
    let mut n = 0;
    loop {
        let b = uart::getb();
        if b == b'\n' || b == b'\r' {
            if n == 0 && b == b'\n' {
                continue; // the \n of a \r\n pair
            }
            break;
        }
        if n < buf.len() {
            buf[n] = b;
            n += 1;
        }
    }
    let line = core::str::from_utf8(&buf[..n]).unwrap_or("<non-UTF-8 input>");
    println!("{P}: echo: {line}");
    Ok(())
}

/// Finds the SMBIOS 3.0 entry point where a guest without EFI looks for it (a 16-byte boundary
/// in 0xf0000-0xfffff), checks it, and prints it and the structure table in hex, 32 bytes a
/// line (`smbios-entry: ...`, `smbios-table: ...`), so the host can hand the guest's own view
/// of its tables to a real decoder.
fn test_smbios(_: &BootParams) -> TestResult {
    fn rd8(a: usize) -> u8 {
        // SAFETY: the BIOS area below 1 MiB is guest RAM, identity-mapped and user-readable.
        unsafe { (a as *const u8).read_volatile() }
    }
    fn hex(tag: &str, start: usize, len: usize) {
        let mut a = start;
        while a < start + len {
            print!("{P}: {tag}:");
            for i in a..(a + 32).min(start + len) {
                print!(" {:02x}", rd8(i));
            }
            println!();
            a += 32;
        }
    }
    let ep = (0xf_0000..0x10_0000)
        .step_by(16)
        .find(|&a| (0..5).all(|i| rd8(a + i) == b"_SM3_"[i]))
        .ok_or((code::SMBIOS_NOT_FOUND, "no _SM3_ entry point in 0xf0000-0xfffff"))?;
    let ep_len = usize::from(rd8(ep + 6));
    if !(24..=32).contains(&ep_len) || (0..ep_len).fold(0u8, |s, i| s.wrapping_add(rd8(ep + i))) != 0 {
        return Err((code::SMBIOS_BAD_ENTRY, "entry point length or checksum wrong"));
    }
    let le = |a: usize, n: usize| (0..n).fold(0u64, |v, i| v | u64::from(rd8(a + i)) << (8 * i));
    let (len, addr) = (le(ep + 12, 4) as usize, le(ep + 16, 8) as usize);
    if len == 0 || addr < 0x1000 || addr + len > 0x10_0000 {
        return Err((code::SMBIOS_BAD_ENTRY, "table outside the BIOS area"));
    }
    println!(
        "{P}: smbios: {}.{}.{} entry point at {ep:#x}, table of {len} bytes at {addr:#x}",
        rd8(ep + 7),
        rd8(ep + 8),
        rd8(ep + 9)
    );
    hex("smbios-entry", ep, ep_len);
    hex("smbios-table", addr, len);
    Ok(())
}

fn test_cpuid(_: &BootParams) -> TestResult {
    let (max, b, c, d) = cpuid(0, 0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&b.to_le_bytes());
    vendor[4..8].copy_from_slice(&d.to_le_bytes());
    vendor[8..12].copy_from_slice(&c.to_le_bytes());
    let vendor = core::str::from_utf8(&vendor).unwrap_or("?");
    let (sig, _, _, _) = cpuid(1, 0);
    let base_family = (sig >> 8) & 0xf;
    let family = if base_family == 0xf { base_family + ((sig >> 20) & 0xff) } else { base_family };
    let model = if base_family == 0x6 || base_family == 0xf {
        ((sig >> 4) & 0xf) | (((sig >> 16) & 0xf) << 4)
    } else {
        (sig >> 4) & 0xf
    };
    let stepping = sig & 0xf;
    let (hv_max, hb, hc, hd) = cpuid(0x4000_0000, 0);
    let mut hv = [0u8; 12];
    hv[0..4].copy_from_slice(&hb.to_le_bytes());
    hv[4..8].copy_from_slice(&hc.to_le_bytes());
    hv[8..12].copy_from_slice(&hd.to_le_bytes());
    let hv: &str = core::str::from_utf8(&hv).unwrap_or("?").trim_end_matches('\0');
    println!("{P}: cpuid: vendor {vendor}, max leaf {max:#x}");
    println!("{P}: cpuid: family {family:#x} model {model:#x} stepping {stepping}");
    println!("{P}: cpuid: apic id {}", arch::cpuid_apic_id());
    match arch::cpuid_x2apic_id() {
        Some(x) => println!("{P}: cpuid: x2apic id {x}"),
        None => println!("{P}: cpuid: x2apic id n/a (no leaf 0xb)"),
    }
    println!("{P}: cpuid: hypervisor \"{hv}\" (max leaf {hv_max:#x})");
    println!("{P}: cpuid: tsc {} MHz (estimated)", arch::tsc_hz() / 1_000_000);
    Ok(())
}

fn test_ring0_call(_: &BootParams) -> TestResult {
    println!("{P}: ring0-call: int 0x80 (ping)");
    let before = boot::int80_fallbacks();
    let r = boot::ring0_call(boot::SYS_PING);
    let via = if boot::int80_fallbacks() != before {
        "the exception handler (int 0x80 from ring 3 faulted)"
    } else {
        "the DPL3 gate"
    };
    println!("{P}: ring0-call: returned {r:#x}, served by {via}");
    if r != boot::SYS_PING_MAGIC {
        return Err((code::RING0_CALL, "wrong value from the ring-0 gate"));
    }
    Ok(())
}

fn test_exception(_: &BootParams) -> TestResult {
    println!("{P}: exception: executing ud2 in ring 3 (expect exit status 0x106)");
    unsafe { core::arch::asm!("ud2") };
    Err((code::FAIL, "ud2 did not fault"))
}

fn test_panic(_: &BootParams) -> TestResult {
    println!("{P}: panic: panicking in ring 3 (expect exit status 2)");
    panic!("requested panic");
}
