//! Tests of the VMM's virtio-mmio devices, driven by the polling drivers of
//! `rt::virtio` from ring 3: `virtio-scan`, `blk-rw`, `blk-verify`,
//! `blk-discard`, `blk-scatter`, `rng`, `hostile`, `blk-bench`, `net-blast`, `vsock` (`net` and
//! the other network modes are in `nettests.rs`).
//!
//! Parameters (command line): `bexar.disk=N` the N-th block device in slot
//! order (default 0), `bexar.disk-slot=S` the block device in slot S instead,
//! `bexar.seed=N` the pattern seed (default 1), `bexar.iters=N` random reads
//! of `blk-bench` (default 20000), `bexar.mib=N` MiB written by `blk-bench`
//! (default 64, at most the disk), `bexar.qd=N` queue depth of the random
//! reads (default 32), `bexar.wqd=N` of the writes (default 4), `bexar.w4k=N`
//! random 4 KiB writes of `blk-bench` at the reads' queue depth (default 0),
//! `bexar.strict=1` makes `hostile` fail when a bad request is not refused.
use crate::net::wire::Mac;
use crate::{code, TestResult, P};
use rt::arch::{self, ms_to_cycles, rdtsc};
use rt::bootparams::{cmdline_param, BootParams};
use rt::dma;
use rt::println;
use rt::virtio::blk::{self, req, status as bst, Blk, SECTOR_SIZE};
use rt::virtio::mmio::{self, reg, status as dst, Transport};
use rt::virtio::queue::{Buf, Desc, DESC_F_NEXT, DESC_F_WRITE};
use rt::virtio::rng::Rng;
use rt::virtio::vsock::{self, op as vop, shutdown as vshut, Conn, Hdr, Vsock};
use rt::virtio::{device_id, Error};

// ---------------------------------------------------------------- helpers

/// A decimal or 0x-hex command-line number, `default` if absent.
pub(crate) fn param(bp: &BootParams, key: &str, default: u64) -> Result<u64, (u32, &'static str)> {
    match cmdline_param(bp.cmdline(), key) {
        None => Ok(default),
        Some(v) => {
            let r = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse::<u64>(),
            };
            r.map_err(|_| {
                println!("{P}: bad value for {key}: {v}");
                (code::BAD_PARAM, "bad command-line parameter")
            })
        }
    }
}

/// Exit status for a driver error.
pub(crate) fn err_code(e: Error) -> u32 {
    match e {
        Error::NoDevice => code::VIRTIO_NO_DEVICE,
        Error::NoMemory => code::VIRTIO_NO_MEMORY,
        Error::NotVirtio
        | Error::ResetTimeout
        | Error::NoVersion1
        | Error::FeaturesRejected
        | Error::QueueUnavailable
        | Error::QueueInUse
        | Error::QueueNotReady
        | Error::DriverOkRejected => code::VIRTIO_INIT,
        _ => code::VIRTIO_IO,
    }
}

/// Print `what: <error>` and turn it into a test failure.
pub(crate) fn fail(what: &'static str, e: Error) -> (u32, &'static str) {
    println!("{P}: {what}: {e}");
    (err_code(e), what)
}

pub(crate) fn features_str(f: u64) -> FeatureBits {
    FeatureBits(f)
}

/// Prints a feature word as hex and the list of set bit numbers.
pub(crate) struct FeatureBits(u64);

impl core::fmt::Display for FeatureBits {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#x} [", self.0)?;
        let mut first = true;
        for b in 0..64 {
            if self.0 & (1 << b) != 0 {
                write!(f, "{}{b}", if first { "" } else { "," })?;
                first = false;
            }
        }
        write!(f, "]")
    }
}

struct Hex<'a>(&'a [u8]);

impl core::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

pub(crate) fn alloc(len: usize) -> Result<&'static mut [u8], (u32, &'static str)> {
    dma::alloc_bytes(len, 4096).ok_or_else(|| {
        println!("{P}: out of DMA memory ({len} bytes wanted, {} free)", dma::available());
        (code::VIRTIO_NO_MEMORY, "out of DMA memory")
    })
}

/// The block device picked by `bexar.disk-slot=S` or `bexar.disk=N`.
fn find_disk(bp: &BootParams) -> Result<Transport, (u32, &'static str)> {
    if cmdline_param(bp.cmdline(), "bexar.disk-slot").is_some() {
        let slot = param(bp, "bexar.disk-slot", 0)? as usize;
        return match mmio::scan().find(|t| t.slot == slot) {
            Some(t) if t.device_id == device_id::BLOCK => Ok(t),
            _ => {
                println!("{P}: no block device in slot {slot}");
                Err((code::VIRTIO_NO_DEVICE, "no block device"))
            }
        };
    }
    let n = param(bp, "bexar.disk", 0)? as usize;
    mmio::find(device_id::BLOCK, n).ok_or_else(|| {
        println!("{P}: no block device #{n} (bexar.disk={n})");
        (code::VIRTIO_NO_DEVICE, "no block device")
    })
}

pub(crate) fn open_disk(bp: &BootParams) -> Result<Blk, (u32, &'static str)> {
    let t = find_disk(bp)?;
    let d = Blk::open(t).map_err(|e| fail("blk: device init failed", e))?;
    let c = &d.config;
    println!(
        "{P}: blk: slot {} at {:#x}: capacity {} sectors ({} MiB), queue size {}{}",
        t.slot,
        t.base,
        c.capacity,
        c.capacity >> 11,
        d.q.size(),
        if d.read_only() { ", read-only" } else { "" }
    );
    println!("{P}: blk: features offered {}", features_str(d.offered));
    println!("{P}: blk: features accepted {}", features_str(d.features));
    println!(
        "{P}: blk: size_max {} seg_max {} blk_size {} discard max {} seg {} align {} write-zeroes max {} seg {} may-unmap {}",
        c.size_max,
        c.seg_max,
        c.blk_size,
        c.max_discard_sectors,
        c.max_discard_seg,
        c.discard_sector_alignment,
        c.max_write_zeroes_sectors,
        c.max_write_zeroes_seg,
        c.write_zeroes_may_unmap
    );
    if c.capacity == 0 {
        println!("{P}: blk: capacity is 0");
        return Err((code::VIRTIO_IO, "disk has no sectors"));
    }
    Ok(d)
}

pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pattern word `w` (0..64) of `sector` for `seed`: depends only on
/// (seed, sector, word), so overlapping writes agree.
fn pattern_word(seed: u64, sector: u64, w: usize) -> u64 {
    splitmix64(splitmix64(seed) ^ (sector << 6) ^ w as u64)
}

pub(crate) fn fill_pattern(buf: &mut [u8], seed: u64, first: u64) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let sector = first + (i / 64) as u64;
        chunk.copy_from_slice(&pattern_word(seed, sector, i % 64).to_le_bytes());
    }
}

/// Byte offset of the first difference from the pattern, if any.
pub(crate) fn check_pattern(buf: &[u8], seed: u64, first: u64) -> Option<usize> {
    for (i, chunk) in buf.chunks_exact(8).enumerate() {
        let sector = first + (i / 64) as u64;
        let want = pattern_word(seed, sector, i % 64).to_le_bytes();
        if chunk != want {
            let j = chunk.iter().zip(want.iter()).position(|(a, b)| a != b).unwrap_or(0);
            return Some(i * 8 + j);
        }
    }
    None
}

pub(crate) fn report_mismatch(what: &str, buf: &[u8], seed: u64, first: u64, off: usize) {
    let sector = first + (off / SECTOR_SIZE) as u64;
    let w = (off % SECTOR_SIZE) / 8;
    let want = pattern_word(seed, sector, w).to_le_bytes()[off % 8];
    println!(
        "{P}: {what}: mismatch at sector {sector} byte {}: got {:#04x}, want {want:#04x}",
        off % SECTOR_SIZE,
        buf[off]
    );
}

/// The regions `blk-rw` writes and `blk-verify` checks: (label, first
/// sector, sectors): first, middle and last sector, and one 64 KiB request.
fn rw_regions(cap: u64) -> [(&'static str, u64, u64); 4] {
    let big = cap.min(128);
    let big_at = ((cap / 4) & !7).min(cap - big);
    [("first", 0, 1), ("middle", cap / 2, 1), ("last", cap - 1, 1), ("64k", big_at, big)]
}

// ---------------------------------------------------------------- virtio-scan

pub fn test_virtio_scan(_: &BootParams) -> TestResult {
    let mut n = 0;
    for t in mmio::scan() {
        let f = t.device_features();
        println!(
            "{P}: virtio-scan: slot {} at {:#x}: device id {} ({}), version {}, vendor {:#x}, features {}",
            t.slot,
            t.base,
            t.device_id,
            device_id::name(t.device_id),
            t.version,
            t.vendor_id,
            features_str(f)
        );
        n += 1;
    }
    let (ps, pe) = dma::pool();
    println!("{P}: virtio-scan: {n} device(s); dma pool [{ps:#x}-{pe:#x})");
    Ok(())
}

// ---------------------------------------------------------------- blk-rw / blk-verify

pub fn test_blk_rw(bp: &BootParams) -> TestResult {
    let seed = param(bp, "bexar.seed", 1)?;
    let mut d = open_disk(bp)?;
    let cap = d.capacity();
    let buf = alloc(128 * SECTOR_SIZE)?;
    let rbuf = alloc(128 * SECTOR_SIZE)?;
    if d.read_only() {
        println!("{P}: blk: read-only");
        return blk_read_only(&mut d, buf, rbuf);
    }
    for (label, first, n) in rw_regions(cap) {
        let len = n as usize * SECTOR_SIZE;
        fill_pattern(&mut buf[..len], seed, first);
        d.write(first, &buf[..len]).map_err(|e| fail("blk: write failed", e))?;
        rbuf[..len].fill(0xa5);
        d.read(first, &mut rbuf[..len]).map_err(|e| fail("blk: read failed", e))?;
        if let Some(off) = check_pattern(&rbuf[..len], seed, first) {
            report_mismatch("blk-rw", &rbuf[..len], seed, first, off);
            return Err((code::VERIFY, "read-back differs from what was written"));
        }
        println!("{P}: blk: {label}: wrote and read back {n} sector(s) at {first}: ok (seed {seed})");
    }
    if d.has(blk::feature::FLUSH) {
        d.flush().map_err(|e| fail("blk: flush failed", e))?;
        println!("{P}: blk: flush ok");
    } else {
        println!("{P}: blk: flush not offered");
    }
    print_id(&mut d)?;
    Ok(())
}

fn print_id(d: &mut Blk) -> TestResult {
    match d.get_id() {
        Ok(id) => {
            let n = id.iter().position(|&b| b == 0).unwrap_or(id.len());
            let s = &id[..n];
            if s.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
                println!("{P}: blk: serial \"{}\"", core::str::from_utf8(s).unwrap_or("?"));
            } else {
                println!("{P}: blk: serial (hex) {}", Hex(s));
            }
            Ok(())
        }
        Err(Error::Status(s)) => {
            println!("{P}: blk: get-id: status {s} ({})", bst::name(s));
            Ok(())
        }
        Err(e) => Err(fail("blk: get-id failed", e)),
    }
}

/// On a read-only disk: reads work, a write is refused and changes nothing.
fn blk_read_only(d: &mut Blk, buf: &mut [u8], rbuf: &mut [u8]) -> TestResult {
    let cap = d.capacity();
    for (label, first, n) in rw_regions(cap) {
        let len = n as usize * SECTOR_SIZE;
        d.read(first, &mut rbuf[..len]).map_err(|e| fail("blk: read failed", e))?;
        println!("{P}: blk: {label}: read {n} sector(s) at {first}: ok");
    }
    d.read(0, &mut buf[..SECTOR_SIZE]).map_err(|e| fail("blk: read failed", e))?;
    let mut w = [0u8; SECTOR_SIZE];
    for (i, b) in w.iter_mut().enumerate() {
        *b = !buf[i];
    }
    let outcome = d.request(req::OUT, 0, Some(Buf::out(w.as_ptr(), SECTOR_SIZE)));
    match outcome {
        Ok(c) if c.status == bst::IOERR || c.status == bst::UNSUPP => {
            println!("{P}: blk: write refused with status {} ({})", c.status, bst::name(c.status))
        }
        Ok(c) => {
            println!("{P}: blk: write to a read-only disk: status {} ({})", c.status, bst::name(c.status));
            return Err((code::RO_WRITE_ACCEPTED, "read-only disk accepted a write"));
        }
        Err(e @ (Error::NeedsReset | Error::Timeout)) => {
            println!("{P}: blk: write refused by the VMM ({e}); resetting the device");
            d.reopen().map_err(|e| fail("blk: re-init failed", e))?;
        }
        Err(e) => return Err(fail("blk: write request failed", e)),
    }
    d.read(0, &mut rbuf[..SECTOR_SIZE]).map_err(|e| fail("blk: read failed", e))?;
    if rbuf[..SECTOR_SIZE] != buf[..SECTOR_SIZE] {
        println!("{P}: blk: sector 0 changed after the refused write");
        return Err((code::RO_WRITE_ACCEPTED, "refused write changed the disk"));
    }
    println!("{P}: blk: sector 0 unchanged after the refused write");
    print_id(d)
}

pub fn test_blk_verify(bp: &BootParams) -> TestResult {
    let seed = param(bp, "bexar.seed", 1)?;
    let mut d = open_disk(bp)?;
    let cap = d.capacity();
    let rbuf = alloc(128 * SECTOR_SIZE)?;
    for (label, first, n) in rw_regions(cap) {
        let len = n as usize * SECTOR_SIZE;
        rbuf[..len].fill(0xa5);
        d.read(first, &mut rbuf[..len]).map_err(|e| fail("blk: read failed", e))?;
        if let Some(off) = check_pattern(&rbuf[..len], seed, first) {
            report_mismatch("blk-verify", &rbuf[..len], seed, first, off);
            return Err((code::VERIFY, "disk does not hold the pattern"));
        }
        println!("{P}: blk: {label}: {n} sector(s) at {first} hold the pattern (seed {seed})");
    }
    Ok(())
}

// ---------------------------------------------------------------- blk-scatter

/// The `i`-th write of `blk-scatter` on a disk of `cap` sectors: (first sector,
/// sectors), from an xorshift stream seeded by the seed; the host's tests
/// compute the same list to build the image they expect.
pub(crate) fn scatter_next(x: &mut u64, cap: u64) -> (u64, u64) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    let n = 1 + (*x >> 40) % 128;
    let n = n.min(cap);
    let first = (*x & 0xff_ffff_ffff) % (cap - n + 1);
    (first, n)
}

/// `blk-scatter`: `bexar.rounds` rounds (default 4) of `bexar.writes` writes
/// (default 64) of 1-128 sectors at places drawn from `bexar.seed`, each holding
/// the seed's pattern and read back; a flush ends each round and is reported,
/// so a test that kills the VMM knows what must be on the disk. A request may
/// take `bexar.io-timeout-ms` (default 30000, as long as Linux waits: a remote
/// disk whose server restarts pauses the guest's I/O).
pub fn test_blk_scatter(bp: &BootParams) -> TestResult {
    let seed = param(bp, "bexar.seed", 1)?;
    let rounds = param(bp, "bexar.rounds", 4)?;
    let writes = param(bp, "bexar.writes", 64)?;
    let io_timeout = param(bp, "bexar.io-timeout-ms", 30_000)?;
    let mut d = open_disk(bp)?;
    d.timeout_cycles = ms_to_cycles(io_timeout);
    if d.read_only() || !d.has(blk::feature::FLUSH) {
        return Err((code::BAD_PARAM, "blk-scatter needs a writable disk with flush"));
    }
    let cap = d.capacity();
    let buf = alloc(128 * SECTOR_SIZE)?;
    let rbuf = alloc(128 * SECTOR_SIZE)?;
    let mut x = splitmix64(seed) | 1;
    let mut bytes = 0u64;
    for r in 0..rounds {
        for _ in 0..writes {
            let (first, n) = scatter_next(&mut x, cap);
            let len = n as usize * SECTOR_SIZE;
            fill_pattern(&mut buf[..len], seed, first);
            d.write(first, &buf[..len]).map_err(|e| fail("blk-scatter: write failed", e))?;
            d.read(first, &mut rbuf[..len]).map_err(|e| fail("blk-scatter: read failed", e))?;
            if let Some(off) = check_pattern(&rbuf[..len], seed, first) {
                report_mismatch("blk-scatter", &rbuf[..len], seed, first, off);
                return Err((code::VERIFY, "read-back differs from what was written"));
            }
            bytes += len as u64;
        }
        d.flush().map_err(|e| fail("blk-scatter: flush failed", e))?;
        println!("{P}: blk-scatter: round {r} flushed ({bytes} bytes so far)");
    }
    println!("{P}: blk-scatter: {rounds} rounds of {writes} writes, {bytes} bytes, seed {seed}");
    Ok(())
}

// ---------------------------------------------------------------- blk-discard

pub fn test_blk_discard(bp: &BootParams) -> TestResult {
    let seed = param(bp, "bexar.seed", 1)?;
    let mut d = open_disk(bp)?;
    if d.read_only() {
        println!("{P}: blk: read-only");
        return Err((code::VIRTIO_IO, "disk is read-only"));
    }
    let cap = d.capacity();
    let n = cap.min(64);
    let base = ((cap / 8) & !7).min(cap - n);
    let len = n as usize * SECTOR_SIZE;
    let buf = alloc(len)?;
    let rbuf = alloc(len)?;
    let write_pattern = |d: &mut Blk, buf: &mut [u8]| -> TestResult {
        fill_pattern(buf, seed, base);
        d.write(base, buf).map_err(|e| fail("blk: write failed", e))
    };
    write_pattern(&mut d, buf)?;
    println!("{P}: blk-discard: wrote the pattern to sectors {base}..{}", base + n);
    let (wz, dc) = (d.has(blk::feature::WRITE_ZEROES), d.has(blk::feature::DISCARD));
    if !wz && !dc {
        println!("{P}: blk-discard: neither DISCARD nor WRITE_ZEROES offered: nothing to test");
        return Ok(());
    }
    // The middle quarter of the region.
    let (zs, zn) = (base + n / 4, (n / 4).max(1) as u32);
    let in_range = |s: u64| s >= zs && s < zs + zn as u64;
    for unmap in [false, true] {
        if !wz {
            println!("{P}: blk-discard: WRITE_ZEROES not offered");
            break;
        }
        if unmap && d.config.write_zeroes_may_unmap == 0 {
            break;
        }
        d.write_zeroes(zs, zn, unmap).map_err(|e| fail("blk: write-zeroes failed", e))?;
        d.read(base, rbuf).map_err(|e| fail("blk: read failed", e))?;
        for s in 0..n {
            let sec = &rbuf[s as usize * SECTOR_SIZE..][..SECTOR_SIZE];
            let abs = base + s;
            if in_range(abs) {
                if sec.iter().any(|&b| b != 0) {
                    println!("{P}: blk-discard: sector {abs} not zero after WRITE_ZEROES");
                    return Err((code::NOT_ZERO, "WRITE_ZEROES range does not read back as zeros"));
                }
            } else if let Some(off) = check_pattern(sec, seed, abs) {
                report_mismatch("blk-discard (outside the write-zeroes range)", sec, seed, abs, off);
                return Err((code::VERIFY, "WRITE_ZEROES changed sectors outside its range"));
            }
        }
        println!("{P}: blk-discard: write-zeroes (unmap={unmap}) of {zn} sectors at {zs}: zeros read back, neighbours intact");
        write_pattern(&mut d, buf)?;
    }
    if dc {
        d.discard(zs, zn).map_err(|e| fail("blk: discard failed", e))?;
        d.read(base, rbuf).map_err(|e| fail("blk: read failed", e))?;
        let mut zeros = 0;
        for s in 0..n {
            let sec = &rbuf[s as usize * SECTOR_SIZE..][..SECTOR_SIZE];
            let abs = base + s;
            if in_range(abs) {
                if sec.iter().all(|&b| b == 0) {
                    zeros += 1;
                } else if check_pattern(sec, seed, abs).is_some() {
                    println!("{P}: blk-discard: sector {abs} neither zeros nor the old data after DISCARD");
                    return Err((code::VERIFY, "DISCARD left garbage"));
                }
            } else if let Some(off) = check_pattern(sec, seed, abs) {
                report_mismatch("blk-discard (outside the discard range)", sec, seed, abs, off);
                return Err((code::VERIFY, "DISCARD changed sectors outside its range"));
            }
        }
        println!("{P}: blk-discard: discard of {zn} sectors at {zs}: ok ({zeros}/{zn} read back as zeros), neighbours intact");
    } else {
        println!("{P}: blk-discard: DISCARD not offered");
    }
    Ok(())
}

// ---------------------------------------------------------------- rng

pub fn test_rng(_: &BootParams) -> TestResult {
    let t = mmio::find(device_id::ENTROPY, 0).ok_or_else(|| {
        println!("{P}: rng: no entropy device");
        (code::VIRTIO_NO_DEVICE, "no entropy device")
    })?;
    let mut r = Rng::open(t).map_err(|e| fail("rng: device init failed", e))?;
    println!("{P}: rng: slot {} at {:#x}, features {}", t.slot, t.base, features_str(r.features));
    let a = alloc(64)?;
    let b = alloc(64)?;
    r.fill(a).map_err(|e| fail("rng: read failed", e))?;
    r.fill(b).map_err(|e| fail("rng: read failed", e))?;
    println!("{P}: rng: {}", Hex(a));
    println!("{P}: rng: {}", Hex(b));
    if a.iter().all(|&x| x == 0) || b.iter().all(|&x| x == 0) {
        return Err((code::RNG_BAD, "entropy is all zeros"));
    }
    if a == b {
        return Err((code::RNG_BAD, "two reads returned the same bytes"));
    }
    Ok(())
}

// ---------------------------------------------------------------- hostile

/// What the device did with a bad request.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// Used entry for the request: length and status byte.
    Done { len: u32, status: u8 },
    /// Used entry with an id that was not the request's head.
    WrongId(u32),
    /// Used length larger than the writable buffers.
    BadLen(u32),
    /// DEVICE_NEEDS_RESET set in Status.
    NeedsReset,
    /// Nothing in the used ring within the time limit.
    Nothing,
    /// The driver itself could not send it.
    Driver(Error),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Refused,
    NotRefused,
    Garbage,
}

struct Hostile {
    d: Blk,
    hdr: *mut blk::ReqHeader,
    status: *mut u8,
    data: *mut u8,
    wait: u64,
    refused: u32,
    not_refused: u32,
    garbage: u32,
    cases: u32,
}

impl Hostile {
    /// A request through the normal driver path (tracked chain).
    fn tracked(&mut self, type_: u32, sector: u64, data: Option<Buf>) -> Outcome {
        if let Err(e) = self.d.submit(type_, sector, data) {
            return Outcome::Driver(e);
        }
        self.d.kick();
        match self.d.wait(self.wait) {
            Ok(c) => Outcome::Done { len: c.used_len, status: c.status },
            Err(Error::NeedsReset) => Outcome::NeedsReset,
            Err(Error::Timeout) => Outcome::Nothing,
            Err(Error::BadUsedId(id)) => Outcome::WrongId(id),
            Err(Error::BadUsedLen(l)) => Outcome::BadLen(l),
            Err(e) => Outcome::Driver(e),
        }
    }

    /// Descriptors written by hand on an idle queue, `head` published.
    /// `status_at`: where the chain's status byte is (its last writable byte).
    fn raw(&mut self, descs: &[(u16, Desc)], head: u16, status_at: *mut u8) -> Outcome {
        for &(i, d) in descs {
            self.d.q.write_desc(i, d);
        }
        unsafe { core::ptr::write_bytes(self.data, 0xee, 1024) };
        unsafe { status_at.write_volatile(bst::UNWRITTEN) };
        let before = self.d.q.used_idx();
        self.d.q.publish(head);
        self.d.q.kick();
        let t0 = rdtsc();
        loop {
            if self.d.q.used_idx() != before {
                let u = self.d.q.used_entry(before);
                if u.id != head {
                    return Outcome::WrongId(u.id as u32);
                }
                return Outcome::Done { len: u.len, status: unsafe { status_at.read_volatile() } };
            }
            if rdtsc().wrapping_sub(t0) > self.wait {
                return if self.d.t.needs_reset() { Outcome::NeedsReset } else { Outcome::Nothing };
            }
            core::hint::spin_loop();
        }
    }

    fn hdr(&self, type_: u32, sector: u64) -> u64 {
        unsafe { self.hdr.write_volatile(blk::ReqHeader { type_, reserved: 0, sector }) };
        self.hdr as u64
    }

    /// Judge and print one case; reset the device when its queue may be in
    /// an unknown state. `ok_is_garbage`: an OK status would be a lie.
    fn judge(&mut self, name: &str, o: Outcome, ok_is_garbage: bool, raw: bool) -> Result<(), (u32, &'static str)> {
        self.cases += 1;
        let needs_reset = self.d.t.needs_reset();
        let (v, what): (Verdict, &str) = match o {
            Outcome::Done { status: s @ (bst::IOERR | bst::UNSUPP), .. } => {
                (Verdict::Refused, if s == bst::IOERR { "status IOERR" } else { "status UNSUPP" })
            }
            Outcome::Done { status: bst::OK, .. } if ok_is_garbage => (Verdict::Garbage, "status OK"),
            Outcome::Done { status: bst::OK, .. } => (Verdict::NotRefused, "status OK"),
            Outcome::Done { status: bst::UNWRITTEN, .. } => (Verdict::Refused, "used, status byte not written"),
            Outcome::Done { .. } => (Verdict::Garbage, "invalid status byte"),
            Outcome::WrongId(_) => (Verdict::Garbage, "used entry with a wrong id"),
            Outcome::BadLen(_) => (Verdict::Garbage, "used length beyond the buffers"),
            Outcome::NeedsReset => (Verdict::Refused, "DEVICE_NEEDS_RESET"),
            Outcome::Nothing => (Verdict::Refused, "nothing used"),
            Outcome::Driver(_) => (Verdict::NotRefused, "driver could not send it"),
        };
        let detail = match o {
            Outcome::Done { len, status } => Detail::Used(len, status),
            Outcome::WrongId(id) => Detail::Id(id),
            Outcome::BadLen(l) => Detail::Len(l),
            Outcome::Driver(e) => Detail::Err(e),
            _ => Detail::None,
        };
        let verdict = match v {
            Verdict::Refused => "refused",
            Verdict::NotRefused => "NOT refused",
            Verdict::Garbage => "GARBAGE",
        };
        let nr = if needs_reset { ", status NEEDS_RESET" } else { "" };
        // Raw cases poison 1 KiB of data buffer: did the device write into it?
        let poisoned = unsafe { core::slice::from_raw_parts(self.data, 1024) };
        let wrote_data = match poisoned.iter().enumerate().rposition(|(i, &b)| b != 0xee && !(i == 511 && b == 0xff)) {
            Some(i) if raw => Detail::Data(i as u32, poisoned[i]),
            _ => Detail::None,
        };
        let must_reset = raw || needs_reset || !matches!(o, Outcome::Done { .. });
        println!(
            "{P}: hostile: {name}: {what}{detail}{wrote_data}{nr} -> {verdict}{}",
            if must_reset { " (device reset)" } else { "" }
        );
        match v {
            Verdict::Refused => self.refused += 1,
            Verdict::NotRefused => self.not_refused += 1,
            Verdict::Garbage => self.garbage += 1,
        }
        if must_reset {
            self.d.reopen().map_err(|e| fail("hostile: device re-init failed", e))?;
        }
        Ok(())
    }
}

enum Detail {
    None,
    Used(u32, u8),
    Id(u32),
    Len(u32),
    Err(Error),
    Data(u32, u8),
}

impl core::fmt::Display for Detail {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Detail::None => Ok(()),
            Detail::Used(len, st) => write!(f, " (used len {len}, status byte {st:#x})"),
            Detail::Id(id) => write!(f, " ({id})"),
            Detail::Len(l) => write!(f, " ({l})"),
            Detail::Err(e) => write!(f, " ({e})"),
            Detail::Data(off, b) => write!(f, " (data buffer written up to byte {off}: {b:#04x})"),
        }
    }
}

pub fn test_hostile(bp: &BootParams) -> TestResult {
    let strict = param(bp, "bexar.strict", 0)? != 0;
    let d = open_disk(bp)?;
    let cap = d.capacity();
    let page = alloc(4096)?;
    let data = alloc(8192)?;
    let mut h = Hostile {
        d,
        hdr: page.as_mut_ptr() as *mut blk::ReqHeader,
        status: unsafe { page.as_mut_ptr().add(64) },
        data: data.as_mut_ptr(),
        wait: ms_to_cycles(param(bp, "bexar.hostile-ms", 300)?),
        refused: 0,
        not_refused: 0,
        garbage: 0,
        cases: 0,
    };
    let dptr = h.data;
    let far = 0xffff_0000_0000u64;
    let ram_top = bp.ram_top();
    // In the looping chains the status byte would be the last byte of the data buffer.
    let last_writable = unsafe { dptr.add(511) };

    // 1. A descriptor chain with a loop: header -> data -> header -> ...
    let hd = h.hdr(req::IN, 0);
    let o = h.raw(
        &[
            (0, Desc { addr: hd, len: 16, flags: DESC_F_NEXT, next: 1 }),
            (1, Desc { addr: dptr as u64, len: 512, flags: DESC_F_NEXT | DESC_F_WRITE, next: 0 }),
        ],
        0,
        last_writable,
    );
    h.judge("descriptor loop (0 -> 1 -> 0)", o, false, true)?;

    // 2. A chain longer than the queue: every descriptor points to the next, the last back to 0.
    let qs = h.d.q.size();
    let hd = h.hdr(req::IN, 0);
    h.d.q.write_desc(0, Desc { addr: hd, len: 16, flags: DESC_F_NEXT, next: 1 });
    for i in 1..qs {
        h.d.q
            .write_desc(i, Desc { addr: dptr as u64, len: 512, flags: DESC_F_NEXT | DESC_F_WRITE, next: (i + 1) % qs });
    }
    let o = h.raw(&[], 0, last_writable);
    h.judge("chain through the whole table and back", o, false, true)?;

    // 3. Data descriptor outside guest RAM (device writes it).
    let o = h.tracked(req::IN, 0, Some(Buf { addr: far, len: 512, device_writes: true }));
    h.judge("read into 0xffff00000000 (outside RAM)", o, true, false)?;

    // 4. Data descriptor outside guest RAM (device reads it).
    let o = h.tracked(req::OUT, cap - 1, Some(Buf { addr: far, len: 512, device_writes: false }));
    h.judge("write from 0xffff00000000 (outside RAM)", o, true, false)?;

    // 5. Data straddling the end of RAM.
    if (4096..0xc000_0000).contains(&ram_top) {
        let o = h.tracked(req::IN, 0, Some(Buf { addr: ram_top - 256, len: 512, device_writes: true }));
        h.judge("read into a buffer straddling the end of RAM", o, true, false)?;
    }

    // 6. Header outside RAM.
    let sp = h.status as u64;
    let o = h.raw(
        &[
            (0, Desc { addr: far, len: 16, flags: DESC_F_NEXT, next: 1 }),
            (1, Desc { addr: dptr as u64, len: 512, flags: DESC_F_NEXT | DESC_F_WRITE, next: 2 }),
            (2, Desc { addr: sp, len: 1, flags: DESC_F_WRITE, next: 0 }),
        ],
        0,
        h.status,
    );
    h.judge("request header at 0xffff00000000", o, true, true)?;

    // 7. Read beyond the capacity, straddling the end, and a sector number whose byte offset overflows.
    let o = h.tracked(req::IN, cap, Some(Buf::inp(dptr, 512)));
    h.judge("read of sector = capacity", o, true, false)?;
    let o = h.tracked(req::IN, cap - 1, Some(Buf::inp(dptr, 1024)));
    h.judge("read of 2 sectors at capacity - 1", o, true, false)?;
    let o = h.tracked(req::IN, 1 << 55, Some(Buf::inp(dptr, 512)));
    h.judge("read of sector 2^55 (offset overflows u64)", o, true, false)?;
    let o = h.tracked(req::OUT, cap, Some(Buf::out(dptr, 512)));
    h.judge("write of sector = capacity", o, true, false)?;

    // 8. Zero-length data descriptor.
    let o = h.tracked(req::IN, 0, Some(Buf::inp(dptr, 0)));
    h.judge("zero-length data descriptor", o, false, false)?;

    // 9. Data length not a multiple of 512.
    let o = h.tracked(req::IN, 0, Some(Buf::inp(dptr, 100)));
    h.judge("read of 100 bytes (not a sector multiple)", o, false, false)?;

    // 10. Bogus request type.
    let o = h.tracked(0xdead_beef, 0, Some(Buf::inp(dptr, 512)));
    h.judge("request type 0xdeadbeef", o, true, false)?;

    // 11. Header shorter than 16 bytes.
    let hd = h.hdr(req::IN, 0);
    let o = h.raw(
        &[
            (0, Desc { addr: hd, len: 8, flags: DESC_F_NEXT, next: 1 }),
            (1, Desc { addr: dptr as u64, len: 512, flags: DESC_F_NEXT | DESC_F_WRITE, next: 2 }),
            (2, Desc { addr: sp, len: 1, flags: DESC_F_WRITE, next: 0 }),
        ],
        0,
        h.status,
    );
    h.judge("8-byte request header", o, true, true)?;

    // 12. Avail ring entry naming a descriptor beyond the table.
    let o = h.raw(&[], qs + 7, h.status);
    h.judge("avail entry = queue size + 7", o, true, true)?;

    // 13. QueueNum larger than QueueNumMax.
    queue_num_too_big(&mut h)?;

    // 14. QueueNotify before DRIVER_OK.
    notify_before_driver_ok(&mut h)?;

    // The device must still work.
    println!(
        "{P}: hostile: {} cases: {} refused, {} not refused, {} garbage",
        h.cases, h.refused, h.not_refused, h.garbage
    );
    final_round_trip(&mut h.d)?;
    if h.garbage > 0 {
        return Err((code::HOSTILE_GARBAGE, "device answered a bad request with garbage"));
    }
    if strict && h.not_refused > 0 {
        return Err((code::HOSTILE_NOT_REFUSED, "a bad request was not refused (bexar.strict=1)"));
    }
    Ok(())
}

fn queue_num_too_big(h: &mut Hostile) -> TestResult {
    let t = h.d.t;
    let name = "QueueNum = QueueNumMax + 1";
    t.negotiate(h.d.features).map_err(|e| fail("hostile: negotiate failed", e))?;
    t.write(reg::QUEUE_SEL, 0);
    let max = t.read(reg::QUEUE_NUM_MAX);
    let num = max + 1;
    let (dl, al, ul) = rt::virtio::queue::ring_sizes(num as usize);
    let ring = alloc(dl + al + ul + 64)?;
    let base = ring.as_mut_ptr() as u64;
    let (da, aa, ua) = (base, base + dl as u64, (base + (dl + al) as u64 + 3) & !3);
    t.write(reg::QUEUE_NUM, num);
    t.write(reg::QUEUE_DESC_LOW, da as u32);
    t.write(reg::QUEUE_DESC_HIGH, (da >> 32) as u32);
    t.write(reg::QUEUE_DRIVER_LOW, aa as u32);
    t.write(reg::QUEUE_DRIVER_HIGH, (aa >> 32) as u32);
    t.write(reg::QUEUE_DEVICE_LOW, ua as u32);
    t.write(reg::QUEUE_DEVICE_HIGH, (ua >> 32) as u32);
    t.write(reg::QUEUE_READY, 1);
    let ready = t.read(reg::QUEUE_READY);
    let s0 = t.status();
    t.add_status(dst::DRIVER_OK);
    let s = t.status();
    let driver_ok = s & dst::DRIVER_OK != 0 && s & (dst::DEVICE_NEEDS_RESET | dst::FAILED) == 0;
    h.cases += 1;
    let mut refused = ready == 0 || s0 & dst::DEVICE_NEEDS_RESET != 0 || !driver_ok;
    let mut used = "not tried";
    if !refused {
        // The device took it: does it use the oversized ring? One read of sector 0.
        let hd = h.hdr(req::IN, 0);
        unsafe { h.status.write_volatile(bst::UNWRITTEN) };
        let descs = da as *mut Desc;
        let avail = aa as *mut u16;
        unsafe {
            descs.write_volatile(Desc { addr: hd, len: 16, flags: DESC_F_NEXT, next: 1 });
            descs.add(1).write_volatile(Desc {
                addr: h.data as u64,
                len: 512,
                flags: DESC_F_NEXT | DESC_F_WRITE,
                next: 2,
            });
            descs.add(2).write_volatile(Desc { addr: h.status as u64, len: 1, flags: DESC_F_WRITE, next: 0 });
            avail.add(2).write_volatile(0);
            arch::mb();
            avail.add(1).write_volatile(1);
        }
        arch::mb();
        t.notify(0);
        let t0 = rdtsc();
        let used_idx = (ua + 2) as *const u16;
        used = loop {
            if unsafe { used_idx.read_volatile() } != 0 {
                let st = unsafe { h.status.read_volatile() };
                break if st == bst::OK {
                    "a read on it completed OK (QueueNum is write-only: ignored or accepted, the driver cannot tell)"
                } else {
                    "a read on it was used with an error"
                };
            }
            if t.needs_reset() {
                refused = true;
                break "a read on it set DEVICE_NEEDS_RESET";
            }
            if rdtsc().wrapping_sub(t0) > h.wait {
                refused = true;
                break "a read on it was never used";
            }
            core::hint::spin_loop();
        };
    }
    println!(
        "{P}: hostile: {name} ({num}): QueueReady reads {ready}, Status {s0:#x} before and {:#x} after DRIVER_OK, {used} -> {} (device reset)",
        s,
        if refused { "refused" } else { "NOT refused" }
    );
    if refused {
        h.refused += 1;
    } else {
        h.not_refused += 1;
    }
    h.d.reopen().map_err(|e| fail("hostile: device re-init failed", e))
}

fn notify_before_driver_ok(h: &mut Hostile) -> TestResult {
    let name = "QueueNotify before DRIVER_OK";
    let mut d2 = Blk::open_stage(h.d.t, h.d.features, 16, false).map_err(|e| fail("hostile: init failed", e))?;
    let o = match d2.submit_read(0, h.data, 512) {
        Err(e) => Outcome::Driver(e),
        Ok(_) => {
            d2.kick();
            match d2.wait(h.wait) {
                Ok(c) => Outcome::Done { len: c.used_len, status: c.status },
                Err(Error::NeedsReset) => Outcome::NeedsReset,
                Err(Error::Timeout) => Outcome::Nothing,
                Err(e) => Outcome::Driver(e),
            }
        }
    };
    h.cases += 1;
    let (refused, what) = match o {
        Outcome::Nothing => (true, "nothing used"),
        Outcome::NeedsReset => (true, "DEVICE_NEEDS_RESET"),
        Outcome::Done { status, .. } if status != bst::OK => (true, "used with an error status"),
        Outcome::Done { .. } => (false, "processed (status OK)"),
        _ => (false, "driver error"),
    };
    println!(
        "{P}: hostile: {name}: {what}, Status {:#x} -> {} (device reset)",
        d2.t.status(),
        if refused { "refused" } else { "NOT refused" }
    );
    if refused {
        h.refused += 1;
    } else {
        h.not_refused += 1;
    }
    h.d.reopen().map_err(|e| fail("hostile: device re-init failed", e))
}

/// Write and read back one sector (read only on a read-only disk).
fn final_round_trip(d: &mut Blk) -> TestResult {
    let cap = d.capacity();
    let sector = (cap / 4) * 3;
    let mut w = [0u8; SECTOR_SIZE];
    let mut r = [0u8; SECTOR_SIZE];
    let seed = rdtsc();
    let rt_err = |e: Error| {
        println!("{P}: hostile: final round trip: {e}");
        (code::HOSTILE_ROUND_TRIP, "device does not work after the bad requests")
    };
    if d.read_only() {
        d.read(sector, &mut r).map_err(rt_err)?;
        println!("{P}: hostile: final read of sector {sector} (read-only disk): ok");
        return Ok(());
    }
    fill_pattern(&mut w, seed, sector);
    d.write(sector, &w).map_err(rt_err)?;
    d.read(sector, &mut r).map_err(rt_err)?;
    if r != w {
        println!("{P}: hostile: final round trip: sector {sector} reads back different data");
        return Err((code::HOSTILE_ROUND_TRIP, "device does not work after the bad requests"));
    }
    println!("{P}: hostile: final write + read of sector {sector}: ok");
    Ok(())
}

// ---------------------------------------------------------------- blk-bench

fn rate(count: u64, scale: u64, cycles: u64, hz: u64) -> u64 {
    if cycles == 0 {
        return 0;
    }
    ((count as u128 * hz as u128) / (cycles as u128 * scale as u128)) as u64
}

/// `n` 4 KiB reads or writes at random 4 KiB-aligned places of a disk of `blocks` 4 KiB
/// blocks, `qd` in flight, into or from the buffers in `bufs`; returns (completed, TSC
/// cycles).
fn rand_4k(
    d: &mut Blk,
    write: bool,
    bufs: &mut [u8],
    qd: usize,
    n: u64,
    blocks: u64,
    seed: u64,
) -> Result<(u64, u64), (u32, &'static str)> {
    if write {
        for (i, b) in bufs.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(13) ^ 0xa7;
        }
    }
    let base = bufs.as_mut_ptr();
    let submit = |d: &mut Blk, sector: u64, i: usize| {
        let at = unsafe { base.add(i * 4096) };
        if write { d.submit_write(sector, at, 4096) } else { d.submit_read(sector, at, 4096) }
            .map_err(|e| fail("blk-bench: submit", e))
    };
    let what = if write { "blk-bench: write" } else { "blk-bench: read" };
    let mut slot_of = [0u16; 256];
    let mut x = splitmix64(seed) | 1;
    let mut next_sector = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * 8
    };
    let (mut sent, mut done) = (0u64, 0u64);
    let stall = ms_to_cycles(2000);
    let t0 = rdtsc();
    for i in 0..qd.min(n as usize) {
        let h = submit(d, next_sector(), i)?;
        slot_of[h as usize] = i as u16;
        sent += 1;
    }
    d.kick();
    let mut last = rdtsc();
    while done < n {
        let mut refill = false;
        let mut progress = false;
        while let Some(c) = d.poll().map_err(|e| fail("blk-bench: poll", e))? {
            c.ok().map_err(|e| fail(what, e))?;
            done += 1;
            progress = true;
            if sent < n {
                let i = slot_of[c.head as usize] as usize;
                let h = submit(d, next_sector(), i)?;
                slot_of[h as usize] = i as u16;
                sent += 1;
                refill = true;
            }
        }
        let now = rdtsc();
        // As Linux's driver: no kick while the device watches the ring.
        if refill {
            d.kick_if_wanted();
        }
        if progress {
            last = now;
        } else if now.wrapping_sub(last) > stall {
            println!("{P}: blk-bench: no completion for 2 s ({done}/{n} done)");
            return Err(fail("blk-bench: stalled", if d.t.needs_reset() { Error::NeedsReset } else { Error::Timeout }));
        } else {
            core::hint::spin_loop();
        }
    }
    Ok((done, rdtsc().wrapping_sub(t0)))
}

pub fn test_blk_bench(bp: &BootParams) -> TestResult {
    let iters = param(bp, "bexar.iters", 20000)?;
    let mib = param(bp, "bexar.mib", 64)?;
    let qd = param(bp, "bexar.qd", 32)?.max(1);
    let wqd = param(bp, "bexar.wqd", 4)?.max(1);
    let seed = param(bp, "bexar.seed", 1)?;
    let mut d = open_disk(bp)?;
    let cap = d.capacity();
    let (hz, src) = arch::tsc_hz_info();
    println!("{P}: blk-bench: tsc {hz} Hz ({})", src.as_str());

    // 4 KiB random reads.
    let per = d.descs_per_request(4096) as u64;
    let qd = qd.min(d.q.size() as u64 / per).max(1) as usize;
    let blocks = cap / 8;
    if blocks == 0 {
        return Err((code::BAD_PARAM, "disk smaller than 4 KiB"));
    }
    let bufs = alloc(qd * 4096)?;
    let (done, cycles) = rand_4k(&mut d, false, bufs, qd, iters, blocks, seed)?;
    println!(
        "{P}: blk-bench: randread4k iops={} ; requests={done} bytes={} cycles={cycles} tsc_hz={hz} tsc_src={} qd={qd}",
        rate(done, 1, cycles, hz),
        done * 4096,
        src.as_str()
    );

    // 4 KiB random writes (bexar.w4k of them, at the reads' queue depth).
    let w4k = param(bp, "bexar.w4k", 0)?;
    if w4k > 0 && !d.read_only() {
        let (done, cycles) = rand_4k(&mut d, true, bufs, qd, w4k, blocks, seed ^ 0x5555)?;
        println!(
            "{P}: blk-bench: randwrite4k iops={} ; requests={done} bytes={} cycles={cycles} tsc_hz={hz} tsc_src={} qd={qd}",
            rate(done, 1, cycles, hz),
            done * 4096,
            src.as_str()
        );
    }

    // 128 KiB sequential writes.
    if d.read_only() {
        println!("{P}: blk-bench: seqwrite128k skipped: read-only disk");
        return Ok(());
    }
    const WSZ: usize = 128 * 1024;
    let wsec = (WSZ / SECTOR_SIZE) as u64;
    let total = (mib << 20).min((cap / wsec) * WSZ as u64);
    let nreq = total / WSZ as u64;
    if nreq == 0 {
        println!("{P}: blk-bench: seqwrite128k skipped: disk smaller than 128 KiB");
        return Ok(());
    }
    let per = d.descs_per_request(WSZ) as u64;
    let wqd = wqd.min(d.q.size() as u64 / per).max(1) as usize;
    let wbufs = alloc(wqd * WSZ)?;
    for (i, b) in wbufs.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    let wbase = wbufs.as_ptr();
    let mut slot_of = [0u16; 256];
    let stall = ms_to_cycles(2000);
    let (mut sent, mut done) = (0u64, 0u64);
    let t0 = rdtsc();
    for i in 0..wqd.min(nreq as usize) {
        let h = d
            .submit_write(sent * wsec, unsafe { wbase.add(i * WSZ) }, WSZ)
            .map_err(|e| fail("blk-bench: submit", e))?;
        slot_of[h as usize] = i as u16;
        sent += 1;
    }
    d.kick();
    let mut last = rdtsc();
    while done < nreq {
        let mut refill = false;
        let mut progress = false;
        while let Some(c) = d.poll().map_err(|e| fail("blk-bench: poll", e))? {
            c.ok().map_err(|e| fail("blk-bench: write", e))?;
            done += 1;
            progress = true;
            if sent < nreq {
                let i = slot_of[c.head as usize] as usize;
                let h = d
                    .submit_write(sent * wsec, unsafe { wbase.add(i * WSZ) }, WSZ)
                    .map_err(|e| fail("blk-bench: submit", e))?;
                slot_of[h as usize] = i as u16;
                sent += 1;
                refill = true;
            }
        }
        let now = rdtsc();
        // As Linux's driver: no kick while the device watches the ring.
        if refill {
            d.kick_if_wanted();
        }
        if progress {
            last = now;
        } else if now.wrapping_sub(last) > stall {
            println!("{P}: blk-bench: no completion for 2 s ({done}/{nreq} done)");
            return Err(fail("blk-bench: stalled", if d.t.needs_reset() { Error::NeedsReset } else { Error::Timeout }));
        } else {
            core::hint::spin_loop();
        }
    }
    let cycles = rdtsc().wrapping_sub(t0);
    let bytes = done * WSZ as u64;
    println!(
        "{P}: blk-bench: seqwrite128k mbps={} ; requests={done} bytes={bytes} cycles={cycles} tsc_hz={hz} tsc_src={} qd={wqd}",
        rate(bytes, 1_000_000, cycles, hz),
        src.as_str()
    );
    if d.has(blk::feature::FLUSH) {
        let t0 = rdtsc();
        d.flush().map_err(|e| fail("blk-bench: flush", e))?;
        println!("{P}: blk-bench: flush cycles={} tsc_hz={hz}", rdtsc().wrapping_sub(t0));
    }
    Ok(())
}

// ---------------------------------------------------------------- net-blast

/// `bexar.dst-mac=aa:bb:cc:dd:ee:ff`, broadcast if absent.
pub(crate) fn parse_mac(bp: &BootParams, key: &str) -> Result<[u8; 6], (u32, &'static str)> {
    let Some(v) = cmdline_param(bp.cmdline(), key) else {
        return Ok([0xff; 6]);
    };
    crate::net::wire::parse_mac(v).ok_or_else(|| {
        println!("{P}: bad value for {key}: {v}");
        (code::BAD_PARAM, "bad command-line parameter")
    })
}

/// EtherType of the blast frames (IEEE 802 local experimental 1).
const ETH_BLAST: [u8; 2] = [0x88, 0xb5];

/// `net-blast`: `bexar.frames` (default 200000) frames of `bexar.frame-size` bytes (60-1514,
/// default 1514) to `bexar.dst-mac` (default broadcast), keeping the tx ring full; then, if
/// `bexar.rx-frames` > 0, receives that many frames (waiting up to `bexar.rx-wait-ms`, default
/// 30000, for the first). Prints raw counts and TSC cycles.
pub fn test_net_blast(bp: &BootParams) -> TestResult {
    let frames = param(bp, "bexar.frames", 200_000)?;
    let size = param(bp, "bexar.frame-size", 1514)? as usize;
    let rx_frames = param(bp, "bexar.rx-frames", 0)?;
    let rx_wait_ms = param(bp, "bexar.rx-wait-ms", 30_000)?;
    let dst = parse_mac(bp, "bexar.dst-mac")?;
    let idx = param(bp, "bexar.net", 0)? as usize;
    if !(60..=rt::virtio::net::MAX_FRAME).contains(&size) {
        println!("{P}: net-blast: bexar.frame-size must be 60..=1514, not {size}");
        return Err((code::BAD_PARAM, "bad frame size"));
    }
    let t = mmio::find(device_id::NET, idx).ok_or_else(|| {
        println!("{P}: net-blast: no network device #{idx}");
        (code::VIRTIO_NO_DEVICE, "no network device")
    })?;
    let mut n = rt::virtio::net::Net::open(t, 256).map_err(|e| fail("net-blast: device init failed", e))?;
    let hz = arch::tsc_hz();
    println!(
        "{P}: net-blast: slot {} mac {} -> {}, queues {}/{}, {frames} frames of {size} bytes",
        t.slot,
        Mac(n.mac),
        Mac(dst),
        n.rx.size(),
        n.tx.size()
    );
    let mut frame = [0u8; rt::virtio::net::MAX_FRAME];
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&n.mac);
    frame[12..14].copy_from_slice(&ETH_BLAST);
    frame[14..19].copy_from_slice(b"bexar");
    for (i, b) in frame[19..].iter_mut().enumerate() {
        *b = i as u8;
    }
    n.prepare_tx(&frame[..size]).map_err(|e| fail("net-blast: prepare", e))?;

    let (mut sent, mut done, mut kicks) = (0u64, 0u64, 0u64);
    let stall = ms_to_cycles(2000);
    let t0 = rdtsc();
    let mut last = t0;
    let mut last_kick = t0;
    while done < frames {
        let r = n.reclaim_tx_count().map_err(|e| fail("net-blast: tx used ring", e))?;
        done += r;
        let mut added = 0u64;
        while sent < frames && n.submit_prepared(size).map_err(|e| fail("net-blast: submit", e))? {
            sent += 1;
            added += 1;
        }
        let now = rdtsc();
        // Notify unless the device asked not to; after 1 ms without progress, notify anyway.
        let quiet = now.wrapping_sub(last) > stall / 2000;
        if (added > 0 && n.tx.device_wants_notify()) || (quiet && now.wrapping_sub(last_kick) > stall / 2000) {
            n.tx.kick();
            kicks += 1;
            last_kick = now;
        }
        if r > 0 || added > 0 {
            last = now;
        } else if now.wrapping_sub(last) > stall {
            println!("{P}: net-blast: no tx completion for 2 s ({done}/{frames} done, {sent} queued)");
            return Err(fail(
                "net-blast: tx stalled",
                if n.t.needs_reset() { Error::NeedsReset } else { Error::Timeout },
            ));
        } else {
            core::hint::spin_loop();
        }
    }
    let cycles = rdtsc().wrapping_sub(t0);
    println!("{P}: net-blast: tx frames={done} bytes={} cycles={cycles} tsc_hz={hz}", done * size as u64);
    println!("{P}: net-blast: tx notifies={kicks}");

    if rx_frames > 0 {
        // Frames received during the blast (host chatter) do not count.
        while n.recv_batch(|_| {}).map_err(|e| fail("net-blast: rx", e))? > 0 {}
        println!("{P}: net-blast: rx ready: waiting for {rx_frames} frames");
        let (mut got, mut bytes) = (0u64, 0u64);
        let wait0 = rdtsc();
        let mut t0 = 0u64;
        let mut last = wait0;
        while got < rx_frames {
            let k = n.recv_batch(|f| bytes += f.len() as u64).map_err(|e| fail("net-blast: rx", e))? as u64;
            let now = rdtsc();
            if k > 0 {
                if got == 0 {
                    t0 = now;
                }
                got += k;
                last = now;
            } else if got == 0 && now.wrapping_sub(wait0) > ms_to_cycles(rx_wait_ms) {
                println!("{P}: net-blast: no frame within {rx_wait_ms} ms");
                return Err((code::NET_BLAST_RX, "no frames received"));
            } else if got > 0 && now.wrapping_sub(last) > stall {
                println!("{P}: net-blast: rx frames={got} bytes={bytes} cycles={} (incomplete)", last.wrapping_sub(t0));
                println!("{P}: net-blast: only {got}/{rx_frames} frames, none for 2 s");
                return Err((code::NET_BLAST_RX, "fewer frames received than expected"));
            } else {
                core::hint::spin_loop();
            }
        }
        // Cycles from the first frame seen to the last.
        println!("{P}: net-blast: rx frames={got} bytes={bytes} cycles={}", last.wrapping_sub(t0));
        if n.rx_bad > 0 {
            println!("{P}: net-blast: {} malformed rx buffers", n.rx_bad);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- vsock

/// Receive buffer space the guest advertises on every connection.
const VSOCK_BUF_ALLOC: u32 = 64 * 1024;
/// Local port of the guest-initiated connection.
const VSOCK_LOCAL_PORT: u32 = 49152;

/// The stream pattern of `vsock`: byte `o` of the stream is byte `o % 8` of
/// `splitmix64(o / 8)` (little-endian). `buf` gets the bytes from offset `off`.
fn vsock_pattern(off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let o = off + i as u64;
        *b = (splitmix64(o >> 3) >> ((o & 7) * 8)) as u8;
    }
}

/// A vsock driver error as a test failure (malformed packets and credit
/// violations are protocol errors).
fn vfail(what: &'static str, e: Error) -> (u32, &'static str) {
    println!("{P}: {what}: {e}");
    let c = match e {
        Error::BadPacket(_) | Error::NoCredit => code::VSOCK_PROTOCOL,
        e => err_code(e),
    };
    (c, what)
}

fn vs_hdr_str(h: &Hdr) -> VsHdr<'_> {
    VsHdr(h)
}

struct VsHdr<'a>(&'a Hdr);

impl core::fmt::Display for VsHdr<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let h = self.0;
        write!(
            f,
            "{}({}) {}:{} -> {}:{} type {} len {} flags {:#x} buf_alloc {} fwd_cnt {}",
            vop::name(h.op),
            h.op,
            h.src_cid,
            h.src_port,
            h.dst_cid,
            h.dst_port,
            h.type_,
            h.len,
            h.flags,
            h.buf_alloc,
            h.fwd_cnt
        )
    }
}

struct VsockTest {
    v: Vsock,
    listen: u32,
    /// A REQUEST for the listen port that arrived while the guest was busy (backlog of 1).
    pending: Option<Hdr>,
    /// Payload of the last received packet.
    payload: &'static mut [u8],
    /// Packets for no connection of ours (answered with RST).
    stray: u64,
}

type VsResult<T> = Result<T, (u32, &'static str)>;

impl VsockTest {
    /// The next packet, if any; fails on a TRANSPORT_RESET event, a malformed
    /// packet, a packet for another CID or of another type than STREAM.
    fn next(&mut self) -> VsResult<Option<Hdr>> {
        if let Some(id) = self.v.poll_event().map_err(|e| vfail("vsock: event queue", e))? {
            println!("{P}: vsock: event id {id}");
            if id == vsock::EVENT_TRANSPORT_RESET {
                return Err((code::VSOCK_PROTOCOL, "transport reset event"));
            }
        }
        let Some(h) = self.v.recv(self.payload).map_err(|e| vfail("vsock: receive", e))? else {
            return Ok(None);
        };
        if h.dst_cid != self.v.guest_cid || h.type_ != vsock::TYPE_STREAM {
            println!("{P}: vsock: bad packet (guest cid {}): {}", self.v.guest_cid, vs_hdr_str(&h));
            return Err((code::VSOCK_PROTOCOL, "packet for another cid or not STREAM"));
        }
        Ok(Some(h))
    }

    /// A packet for no current connection: queue a REQUEST for the listen
    /// port from the host, answer anything else but RST with RST.
    fn stray(&mut self, h: &Hdr) -> VsResult<()> {
        if h.op == vop::REQUEST && h.dst_port == self.listen && h.src_cid == vsock::CID_HOST && self.pending.is_none() {
            self.pending = Some(*h);
            return Ok(());
        }
        self.stray += 1;
        println!("{P}: vsock: packet for no connection: {} (answered with RST)", vs_hdr_str(h));
        if h.op != vop::RST {
            self.v.send_rst_for(h).map_err(|e| vfail("vsock: send RST", e))?;
        }
        Ok(())
    }

    fn send(&mut self, c: &mut Conn, op: u16, flags: u32, payload: &[u8]) -> VsResult<()> {
        self.v.send_conn(c, op, flags, payload).map_err(|e| vfail("vsock: send", e))
    }

    /// Tell the peer our fwd_cnt once a quarter of the buffer was consumed
    /// since it last heard it (or, with `force`, whenever anything was).
    fn credit_update(&mut self, c: &mut Conn, force: bool) -> VsResult<bool> {
        let owed = c.credit_owed();
        if owed >= VSOCK_BUF_ALLOC / 4 || (force && owed > 0) {
            self.send(c, vop::CREDIT_UPDATE, 0, &[])?;
            return Ok(true);
        }
        Ok(false)
    }

    /// RW payload of a packet of `c`: enforce our credit, count it.
    fn take_rw(&mut self, c: &mut Conn, h: &Hdr) -> VsResult<usize> {
        if c.overruns(h.len) {
            println!(
                "{P}: vsock: peer exceeded our credit: {} with {} bytes unconsumed",
                vs_hdr_str(h),
                c.unconsumed()
            );
            return Err((code::VSOCK_PROTOCOL, "peer exceeded our credit"));
        }
        c.rx_cnt = c.rx_cnt.wrapping_add(h.len);
        Ok(h.len as usize)
    }

    /// SHUTDOWN (both directions), then wait up to 3 s for the peer's RST
    /// (a SHUTDOWN from the peer is answered with RST); after that, RST.
    fn close(&mut self, c: &mut Conn, what: &str) -> VsResult<()> {
        self.send(c, vop::SHUTDOWN, vshut::BOTH, &[])?;
        let t0 = rdtsc();
        let mut late = 0u64;
        while rdtsc().wrapping_sub(t0) < ms_to_cycles(3000) {
            let Some(h) = self.next()? else {
                core::hint::spin_loop();
                continue;
            };
            if !c.matches(&h) {
                self.stray(&h)?;
                continue;
            }
            match h.op {
                vop::RST => {
                    println!("{P}: vsock: {what}: closed (RST from the peer{})", Late(late));
                    return Ok(());
                }
                vop::SHUTDOWN => {
                    self.send(c, vop::RST, 0, &[])?;
                    println!(
                        "{P}: vsock: {what}: closed (SHUTDOWN flags {} from the peer, RST sent{})",
                        h.flags,
                        Late(late)
                    );
                    return Ok(());
                }
                vop::RW => late += h.len as u64,
                _ => {}
            }
        }
        self.send(c, vop::RST, 0, &[])?;
        println!("{P}: vsock: {what}: note: no RST within 3 s of our SHUTDOWN; sent RST{}", Late(late));
        Ok(())
    }

    /// Guest-initiated half: connect to host port `port`, send `total`
    /// pattern bytes, check the echo, close.
    fn out(&mut self, port: u32, total: u64) -> TestResult {
        let mut c = Conn::new(self.v.guest_cid, VSOCK_LOCAL_PORT, vsock::CID_HOST, port, VSOCK_BUF_ALLOC);
        let what = "guest->host";
        println!("{P}: vsock: {what}: connecting to {}:{port} from port {VSOCK_LOCAL_PORT}", vsock::CID_HOST);
        self.send(&mut c, vop::REQUEST, 0, &[])?;
        let t0 = rdtsc();
        loop {
            if rdtsc().wrapping_sub(t0) > ms_to_cycles(5000) {
                println!("{P}: vsock: {what}: no RESPONSE to our REQUEST within 5 s");
                return Err((code::VSOCK_NO_RESPONSE, "no RESPONSE to REQUEST"));
            }
            let Some(h) = self.next()? else {
                core::hint::spin_loop();
                continue;
            };
            if !c.matches(&h) {
                self.stray(&h)?;
                continue;
            }
            match h.op {
                vop::RESPONSE => {
                    c.update_credit(&h);
                    break;
                }
                vop::RST => {
                    println!("{P}: vsock: {what}: connection to port {port} refused (RST)");
                    return Err((code::VSOCK_REFUSED, "connection refused"));
                }
                _ => {
                    println!("{P}: vsock: {what}: unexpected answer to REQUEST: {}", vs_hdr_str(&h));
                    return Err((code::VSOCK_PROTOCOL, "unexpected answer to REQUEST"));
                }
            }
        }
        let us = rdtsc().wrapping_sub(t0) / (arch::tsc_hz() / 1_000_000).max(1);
        println!(
            "{P}: vsock: {what}: connected in {us} us, peer buf_alloc {} fwd_cnt {}",
            c.peer_buf_alloc, c.peer_fwd_cnt
        );

        let chunk = alloc(vsock::MAX_PAYLOAD)?;
        let expect = alloc(vsock::MAX_PAYLOAD)?;
        let (mut sent, mut got) = (0u64, 0u64);
        let (mut pkts_out, mut pkts_in, mut credit_waits) = (0u64, 0u64, 0u64);
        let t0 = rdtsc();
        let mut last = t0;
        let mut credit_requested = false;
        while got < total {
            let mut progress = false;
            // At most 64 packets per pass, so a flooding peer cannot starve transmission.
            for _ in 0..64 {
                let Some(h) = self.next()? else { break };
                if !c.matches(&h) {
                    self.stray(&h)?;
                    continue;
                }
                c.update_credit(&h);
                progress = true;
                match h.op {
                    vop::RW => {
                        let n = self.take_rw(&mut c, &h)?;
                        if got + n as u64 > total {
                            println!("{P}: vsock: {what}: {} bytes echoed, only {total} sent", got + n as u64);
                            return Err((code::VSOCK_DATA, "more bytes echoed than sent"));
                        }
                        vsock_pattern(got, &mut expect[..n]);
                        if let Some(i) = (0..n).find(|&i| self.payload[i] != expect[i]) {
                            println!(
                                "{P}: vsock: {what}: echo differs at stream offset {}: got {:#04x}, expected {:#04x}",
                                got + i as u64,
                                self.payload[i],
                                expect[i]
                            );
                            return Err((code::VSOCK_DATA, "echoed data differs"));
                        }
                        got += n as u64;
                        pkts_in += 1;
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    }
                    vop::CREDIT_UPDATE => {}
                    vop::CREDIT_REQUEST => self.send(&mut c, vop::CREDIT_UPDATE, 0, &[])?,
                    vop::SHUTDOWN => {
                        c.peer_shutdown |= h.flags;
                        println!("{P}: vsock: {what}: peer SHUTDOWN flags {} after {got}/{total} bytes", h.flags);
                        if h.flags & vshut::SEND != 0 {
                            return Err((code::VSOCK_PROTOCOL, "host shut down before echoing everything"));
                        }
                    }
                    vop::RST => {
                        println!("{P}: vsock: {what}: RST after {sent} bytes sent, {got} echoed");
                        return Err((code::VSOCK_PROTOCOL, "connection reset during the transfer"));
                    }
                    _ => {
                        println!("{P}: vsock: {what}: unexpected packet: {}", vs_hdr_str(&h));
                        return Err((code::VSOCK_PROTOCOL, "unexpected packet"));
                    }
                }
            }
            while sent < total && c.peer_shutdown & vshut::RCV == 0 {
                let n = (total - sent).min(vsock::MAX_PAYLOAD as u64).min(c.credit() as u64) as usize;
                if n == 0 {
                    credit_waits += 1;
                    break;
                }
                if !self.v.tx_ready().map_err(|e| vfail("vsock: transmit", e))? {
                    break;
                }
                vsock_pattern(sent, &mut chunk[..n]);
                self.send(&mut c, vop::RW, 0, &chunk[..n])?;
                sent += n as u64;
                pkts_out += 1;
                progress = true;
            }
            let now = rdtsc();
            if progress {
                last = now;
                credit_requested = false;
                self.credit_update(&mut c, false)?;
            } else {
                let idle = now.wrapping_sub(last);
                if idle > ms_to_cycles(200) && self.credit_update(&mut c, true)? {
                    continue;
                }
                if idle > ms_to_cycles(500) && !credit_requested && sent < total && c.credit() == 0 {
                    println!("{P}: vsock: {what}: no credit for 500 ms (peer buf_alloc {} fwd_cnt {}, sent {sent}): CREDIT_REQUEST", c.peer_buf_alloc, c.peer_fwd_cnt);
                    self.send(&mut c, vop::CREDIT_REQUEST, 0, &[])?;
                    credit_requested = true;
                }
                if idle > ms_to_cycles(5000) {
                    println!(
                        "{P}: vsock: {what}: stalled: sent {sent}, echoed {got} of {total}; credit {} (peer buf_alloc {} fwd_cnt {}), our fwd_cnt {}",
                        c.credit(),
                        c.peer_buf_alloc,
                        c.peer_fwd_cnt,
                        c.fwd_cnt
                    );
                    return Err((code::VSOCK_STALL, "transfer stalled"));
                }
                core::hint::spin_loop();
            }
        }
        let cycles = rdtsc().wrapping_sub(t0);
        println!("{P}: vsock: guest->host port {port}: {total} bytes echoed ok");
        println!(
            "{P}: vsock: guest->host: bytes={total} cycles={cycles} tsc_hz={} packets out={pkts_out} in={pkts_in} credit-waits={credit_waits}",
            arch::tsc_hz()
        );
        self.close(&mut c, what)
    }

    /// Host-initiated half: wait up to `wait_ms` for a REQUEST to the listen
    /// port, accept it and echo everything until the host shuts down.
    fn inbound(&mut self, wait_ms: u64) -> TestResult {
        let what = "host->guest";
        let listen = self.listen;
        println!("{P}: vsock: {what}: listening on port {listen} (cid {})", self.v.guest_cid);
        let t0 = rdtsc();
        while self.pending.is_none() {
            if rdtsc().wrapping_sub(t0) > ms_to_cycles(wait_ms) {
                println!("{P}: vsock: {what}: no REQUEST to port {listen} within {wait_ms} ms");
                return Err((code::VSOCK_NO_REQUEST, "no connection request"));
            }
            match self.next()? {
                Some(h) => self.stray(&h)?,
                None => core::hint::spin_loop(),
            }
        }
        let req = self.pending.take().unwrap_or_default();
        let mut c = Conn::new(self.v.guest_cid, listen, req.src_cid, req.src_port, VSOCK_BUF_ALLOC);
        c.update_credit(&req);
        self.send(&mut c, vop::RESPONSE, 0, &[])?;
        println!(
            "{P}: vsock: {what}: accepted {}:{} (peer buf_alloc {} fwd_cnt {})",
            req.src_cid, req.src_port, c.peer_buf_alloc, c.peer_fwd_cnt
        );
        // Unconsumed data is ring[fwd_cnt .. rx_cnt) (mod VSOCK_BUF_ALLOC).
        let ring = alloc(VSOCK_BUF_ALLOC as usize)?;
        let size = VSOCK_BUF_ALLOC as usize;
        let (mut echoed, mut received) = (0u64, 0u64);
        let t0 = rdtsc();
        let mut last = t0;
        let mut credit_requested = false;
        let mut repeats = 0u64;
        let mut last_echo = t0;
        let how = loop {
            let mut progress = false;
            let mut reset = false;
            // At most 64 packets per pass, so a flooding peer cannot starve transmission.
            for _ in 0..64 {
                let Some(h) = self.next()? else { break };
                if !c.matches(&h) {
                    self.stray(&h)?;
                    continue;
                }
                c.update_credit(&h);
                progress = true;
                match h.op {
                    vop::RW => {
                        let at = c.rx_cnt as usize % size;
                        let n = self.take_rw(&mut c, &h)?;
                        let first = n.min(size - at);
                        ring[at..at + first].copy_from_slice(&self.payload[..first]);
                        ring[..n - first].copy_from_slice(&self.payload[first..n]);
                        received += n as u64;
                    }
                    vop::CREDIT_UPDATE => {}
                    vop::CREDIT_REQUEST => self.send(&mut c, vop::CREDIT_UPDATE, 0, &[])?,
                    vop::SHUTDOWN => {
                        if c.peer_shutdown | h.flags != c.peer_shutdown || c.peer_shutdown == 0 {
                            println!("{P}: vsock: {what}: peer SHUTDOWN flags {} after {received} bytes", h.flags);
                        } else {
                            repeats += 1;
                        }
                        c.peer_shutdown |= h.flags;
                    }
                    vop::RST => {
                        reset = true;
                        break;
                    }
                    _ => println!("{P}: vsock: {what}: unexpected packet ignored: {}", vs_hdr_str(&h)),
                }
            }
            if reset {
                break "RST from the peer";
            }
            if c.peer_shutdown & vshut::RCV != 0 {
                // The peer takes no more data: what is left cannot be echoed.
                self.send(&mut c, vop::RST, 0, &[])?;
                break "peer stopped receiving; RST sent";
            }
            while c.unconsumed() > 0 {
                let at = c.fwd_cnt as usize % size;
                let n = (c.unconsumed() as usize).min(size - at).min(vsock::MAX_PAYLOAD).min(c.credit() as usize);
                if n == 0 || !self.v.tx_ready().map_err(|e| vfail("vsock: transmit", e))? {
                    break;
                }
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                self.send(&mut c, vop::RW, 0, &ring[at..at + n])?;
                echoed += n as u64;
                progress = true;
                last_echo = rdtsc();
            }
            if c.peer_shutdown & vshut::SEND != 0 && c.unconsumed() == 0 {
                self.close(&mut c, what)?;
                break "peer shut down sending; echo complete";
            }
            let now = rdtsc();
            if progress {
                last = now;
                credit_requested = false;
                self.credit_update(&mut c, false)?;
            } else {
                let idle = now.wrapping_sub(last);
                if idle > ms_to_cycles(200) && self.credit_update(&mut c, true)? {
                    continue;
                }
                if idle > ms_to_cycles(500) && !credit_requested && c.unconsumed() > 0 && c.credit() == 0 {
                    println!(
                        "{P}: vsock: {what}: no credit for 500 ms with {} bytes to echo: CREDIT_REQUEST",
                        c.unconsumed()
                    );
                    self.send(&mut c, vop::CREDIT_REQUEST, 0, &[])?;
                    credit_requested = true;
                }
                if idle > ms_to_cycles(10_000) {
                    println!(
                        "{P}: vsock: {what}: nothing happened for 10 s: received {received}, echoed {echoed}; credit {} (peer buf_alloc {} fwd_cnt {})",
                        c.credit(),
                        c.peer_buf_alloc,
                        c.peer_fwd_cnt
                    );
                    return Err((code::VSOCK_STALL, "connection idle (no SHUTDOWN/RST from the host)"));
                }
                core::hint::spin_loop();
            }
        };
        let cycles = rdtsc().wrapping_sub(t0);
        if repeats > 0 {
            println!("{P}: vsock: {what}: note: the peer repeated its SHUTDOWN {repeats} time(s)");
        }
        if received != echoed {
            println!(
                "{P}: vsock: {what}: note: {} received bytes not echoed (the peer stopped receiving)",
                received - echoed
            );
        }
        println!("{P}: vsock: host->guest port {listen}: echoed {echoed} bytes");
        println!(
            "{P}: vsock: host->guest: received={received} echoed={echoed} cycles={cycles} data_cycles={} tsc_hz={} end: {how}",
            last_echo.wrapping_sub(t0),
            arch::tsc_hz()
        );
        Ok(())
    }
}

/// ", N bytes after our SHUTDOWN" when N > 0.
struct Late(u64);

impl core::fmt::Display for Late {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 > 0 {
            write!(f, "; {} data bytes after our SHUTDOWN ignored", self.0)
        } else {
            Ok(())
        }
    }
}

/// `vsock`: guest-initiated echo through host port `bexar.vsock-port` (default 5000) with
/// `bexar.vsock-bytes` (default 65536) bytes, then a host-initiated connection to
/// `bexar.vsock-listen` (default 6000) that is echoed back; `bexar.vsock-only=out|in`
/// runs one half, `bexar.vsock-wait-ms` (default 20000) bounds the wait for the host.
pub fn test_vsock(bp: &BootParams) -> TestResult {
    let port = param(bp, "bexar.vsock-port", 5000)?;
    let listen = param(bp, "bexar.vsock-listen", 6000)?;
    let total = param(bp, "bexar.vsock-bytes", 65536)?;
    let wait_ms = param(bp, "bexar.vsock-wait-ms", 20000)?;
    if port > u32::MAX as u64 || listen > u32::MAX as u64 {
        return Err((code::BAD_PARAM, "port out of range"));
    }
    let (do_out, do_in) = match cmdline_param(bp.cmdline(), "bexar.vsock-only") {
        None => (true, true),
        Some("out") => (true, false),
        Some("in") => (false, true),
        Some(v) => {
            println!("{P}: bad value for bexar.vsock-only: {v}");
            return Err((code::BAD_PARAM, "bad command-line parameter"));
        }
    };
    let t = mmio::find(device_id::VSOCK, 0).ok_or_else(|| {
        println!("{P}: vsock: no vsock device");
        (code::VIRTIO_NO_DEVICE, "no vsock device")
    })?;
    let v = Vsock::open(t, 64).map_err(|e| vfail("vsock: device init failed", e))?;
    println!(
        "{P}: vsock: slot {} at {:#x}: guest cid {}, queues rx {} tx {} event {}",
        t.slot,
        t.base,
        v.guest_cid,
        v.rx.size(),
        v.tx.size(),
        v.ev.size()
    );
    println!("{P}: vsock: features offered {}", features_str(v.offered));
    println!("{P}: vsock: features accepted {}", features_str(v.features));
    if v.guest_cid <= vsock::CID_HOST || v.guest_cid >= 0xffff_ffff {
        return Err((code::VSOCK_PROTOCOL, "invalid guest cid in config space"));
    }
    let payload = alloc(vsock::MAX_PAYLOAD)?;
    let mut s = VsockTest { v, listen: listen as u32, pending: None, payload, stray: 0 };
    if do_out {
        s.out(port as u32, total)?;
    }
    if do_in {
        s.inbound(wait_ms)?;
    }
    if s.stray > 0 {
        println!("{P}: vsock: {} packet(s) for no connection (answered with RST)", s.stray);
    }
    Ok(())
}
