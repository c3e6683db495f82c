//! `migrant`: the guest a live-migration test moves from host to host and back, busy with
//! everything a migration must carry at once. In one spinning loop it
//!
//! - writes memory at a steady rate and checks every page kept its last write ([`Dirtier`],
//!   `bexar.dirty-mib`, `bexar.dirty-rate`);
//! - writes every block device it has (up to four), `bexar.disk-rate` writes a second each
//!   (default 20), at places and lengths drawn like `blk-scatter`'s from seed `bexar.seed` + the
//!   disk's index, each holding the seed's pattern; each write is read back and checked before
//!   the next one starts, with one request in flight per disk (so a migration catches requests
//!   in the middle). Overlapping writes agree (the pattern depends only on the sector), so the
//!   host's tests rebuild the whole disk from the number of writes;
//! - pings `bexar.peer` (IPv4, optional) every `bexar.ping-ms` (default 100) and answers ARP
//!   and echo requests, counting replies and requests left unanswered;
//! - measures the pauses it sees: every gap in the loop longer than `bexar.gap-report-us`
//!   (default 2000) is printed at once, `migrant: paused X us`.
//!
//! Every second it prints `migrant: T s: P pages, disks W/W writes, pings S sent R replied,
//! longest gap X us (last second Y us)`. On the console, `m` fetches the metadata service's
//! `hostname` (`bexar.imds`, default 169.254.169.254) and prints `migrant: imds hostname ->
//! STATUS BODY`; `q` lets the requests in flight finish, flushes every disk, prints one
//! `migrant: disk I: seed S, W writes, capacity C sectors` line per disk and ends with PASS.

use crate::dirty::{due, Dirtier, Every, Gaps};
use crate::imds;
use crate::net::stack::{self, param_ip4};
use crate::net::wire::{self, Addr};
use crate::net::{Escaped, Fail, Stack};
use crate::nettests::{echo_request, is_echo_reply};
use crate::vtests::{alloc, check_pattern, fail, fill_pattern, param, report_mismatch, scatter_next, splitmix64};
use crate::{code, TestResult, P};
use rt::arch::{ms_to_cycles, rdtsc, tsc_hz};
use rt::bootparams::BootParams;
use rt::virtio::blk::{self, Blk, SECTOR_SIZE};
use rt::virtio::{device_id, mmio};
use rt::{dma, println, uart};

const MAX_DISKS: usize = 4;
/// The longest write `scatter_next` draws.
const MAX_SECTORS: usize = 128;

/// The request in flight: (first sector, sectors, its tag, when it was submitted).
enum Io {
    Idle,
    Writing(u64, u64, u16, u64),
    Reading(u64, u64, u16, u64),
}

/// How long one request may take (a migration's pause included) before it counts as lost.
const IO_TIMEOUT_MS: u64 = 30_000;

/// One disk written at a steady rate, one request in flight.
struct Disk {
    d: Blk,
    seed: u64,
    x: u64,
    cap: u64,
    buf: &'static mut [u8],
    rbuf: &'static mut [u8],
    io: Io,
    /// Writes started (and so drawn from the seed's stream).
    started: u64,
    /// Writes read back and found right.
    verified: u64,
}

impl Disk {
    fn open(index: usize, seed: u64) -> Result<Option<Disk>, Fail> {
        let Some(t) = mmio::find(device_id::BLOCK, index) else { return Ok(None) };
        let d = Blk::open(t).map_err(|e| fail("migrant: disk init failed", e))?;
        if d.read_only() || d.capacity() == 0 || !d.has(blk::feature::FLUSH) {
            println!("{P}: migrant: disk {index} is read-only, empty or without flush: not written");
            return Ok(None);
        }
        let cap = d.capacity();
        println!("{P}: migrant: disk {index}: slot {}, {cap} sectors, seed {seed}", t.slot);
        Ok(Some(Disk {
            d,
            seed,
            x: splitmix64(seed) | 1,
            cap,
            buf: alloc(MAX_SECTORS * SECTOR_SIZE)?,
            rbuf: alloc(MAX_SECTORS * SECTOR_SIZE)?,
            io: Io::Idle,
            started: 0,
            verified: 0,
        }))
    }

    /// The request in flight, if it finished (its tag checked, and that the device wrote at
    /// least `min_used` bytes: a read's data and the status byte); a request that takes
    /// longer than [`IO_TIMEOUT_MS`] is lost.
    fn finished(&mut self, tag: u16, min_used: usize, since: u64, what: &'static str) -> Result<bool, Fail> {
        match self.d.poll().map_err(|e| fail(what, e))? {
            Some(c) => {
                c.ok().map_err(|e| fail(what, e))?;
                if c.head != tag || (c.used_len as usize) < min_used {
                    println!("{P}: migrant: {what}: completion of {} ({} bytes), expected {tag}", c.head, c.used_len);
                    return Err((code::VIRTIO_IO, "a completion that is not the request's"));
                }
                Ok(true)
            }
            None if rdtsc().wrapping_sub(since) > ms_to_cycles(IO_TIMEOUT_MS) => {
                println!("{P}: migrant: {what}: no completion in {IO_TIMEOUT_MS} ms");
                Err((code::VIRTIO_IO, "a request was lost"))
            }
            None => Ok(false),
        }
    }

    /// Move the request in flight along; start the next write if `due`.
    fn step(&mut self, due: bool) -> TestResult {
        match self.io {
            Io::Idle if due => {
                let (first, n) = scatter_next(&mut self.x, self.cap);
                let len = n as usize * SECTOR_SIZE;
                fill_pattern(&mut self.buf[..len], self.seed, first);
                let tag = self.d.submit_write(first, self.buf.as_ptr(), len).map_err(|e| fail("migrant: write", e))?;
                self.d.kick();
                self.started += 1;
                self.io = Io::Writing(first, n, tag, rdtsc());
            }
            Io::Idle => {}
            Io::Writing(first, n, tag, since) => {
                let len = n as usize * SECTOR_SIZE;
                if self.finished(tag, 1, since, "migrant: write")? {
                    // Junk first: a read that brings no data cannot pass for one that did.
                    self.rbuf[..len].fill(0xa5);
                    let tag =
                        self.d.submit_read(first, self.rbuf.as_mut_ptr(), len).map_err(|e| fail("migrant: read", e))?;
                    self.d.kick();
                    self.io = Io::Reading(first, n, tag, rdtsc());
                }
            }
            Io::Reading(first, n, tag, since) => {
                let len = n as usize * SECTOR_SIZE;
                if self.finished(tag, len + 1, since, "migrant: read")? {
                    if let Some(off) = check_pattern(&self.rbuf[..len], self.seed, first) {
                        report_mismatch("migrant", &self.rbuf[..len], self.seed, first, off);
                        return Err((code::VERIFY, "read-back differs from what was written"));
                    }
                    self.verified += 1;
                    self.io = Io::Idle;
                }
            }
        }
        Ok(())
    }
}

/// Pings to one peer, one in flight.
struct Pinger {
    st: Stack,
    peer: Option<Addr>,
    imds: [u8; 4],
    seq: u16,
    awaiting: Option<u16>,
    sent: u64,
    replied: u64,
}

impl Pinger {
    fn ping(&mut self) -> TestResult {
        let Some(peer) = self.peer else { return Ok(()) };
        self.seq = self.seq.wrapping_add(1);
        self.st
            .send_ip(peer, wire::PROTO_ICMP, stack::DEFAULT_TTL, &echo_request(false, self.seq))
            .map_err(|e| stack::fail("migrant", "send failed", e))?;
        self.sent += 1;
        self.awaiting = Some(self.seq);
        Ok(())
    }

    /// Every frame waiting (ARP and echo requests are answered on the way).
    fn receive(&mut self, buf: &mut [u8]) -> TestResult {
        while let Some(n) = self.st.recv(buf).map_err(|e| stack::fail("migrant", "receive failed", e))? {
            if let (Some(peer), Some(seq)) = (self.peer, self.awaiting) {
                if is_echo_reply(&self.st, &buf[..n], peer, seq) {
                    self.replied += 1;
                    self.awaiting = None;
                }
            }
        }
        Ok(())
    }
}

pub fn test_migrant(bp: &BootParams) -> TestResult {
    let seed = param(bp, "bexar.seed", 1)?;
    let disk_rate = param(bp, "bexar.disk-rate", 20)?;
    let ping_ms = param(bp, "bexar.ping-ms", 100)?.max(1);
    let report_gap = param(bp, "bexar.gap-report-us", 2000)?;
    let mut disks: [Option<Disk>; MAX_DISKS] = [const { None }; MAX_DISKS];
    for (i, slot) in disks.iter_mut().enumerate() {
        *slot = Disk::open(i, seed + i as u64)?;
    }
    let mut net = None;
    if mmio::find(device_id::NET, 0).is_some() {
        let mut st = Stack::open(bp, "migrant")?;
        st.configure(bp)?;
        st.verbose = false;
        let peer = param_ip4(bp, "bexar.peer")?.map(Addr::V4);
        if let Some(p) = peer {
            st.resolve(p).map_err(|e| stack::fail("migrant", "cannot reach the peer", e))?;
        }
        let imds = param_ip4(bp, "bexar.imds")?.unwrap_or([169, 254, 169, 254]);
        st.onlink4 = Some(imds);
        net = Some(Pinger { st, peer, imds, seq: 0, awaiting: None, sent: 0, replied: 0 });
    }
    let http = dma::alloc_bytes(imds::IMDS_RESPONSE_MAX, 4096).ok_or((code::VIRTIO_NO_MEMORY, "out of DMA memory"))?;
    let mut dirt = Dirtier::new(bp, "migrant")?;
    let hz = tsc_hz();
    let mut frame = [0u8; wire::MAX_FRAME + 4];
    println!("{P}: migrant: ready");

    let start = rdtsc();
    let mut gaps = Gaps::new();
    let every = |cycles: u64| Every::new(start + cycles, cycles);
    let (mut report, mut console, mut ping) = (every(hz), every(hz / 10), every(hz / 1000 * ping_ms));
    let mut paused = 0u64;
    let mut quitting = false;
    loop {
        let now = rdtsc();
        let gap = gaps.turn(now);
        if gaps.us(gap) > report_gap {
            paused += 1;
            println!("{P}: migrant: paused {} us", gaps.us(gap));
            gaps.skip();
        }
        dirt.step(now)?;
        let writes_due = due(start, now, disk_rate, hz);
        for d in disks.iter_mut().flatten() {
            d.step(!quitting && d.started < writes_due)?;
        }
        if let Some(n) = net.as_mut() {
            n.receive(&mut frame)?;
            if ping.due(now) && !quitting {
                n.ping()?;
            }
        }
        if quitting && disks.iter().flatten().all(|d| matches!(d.io, Io::Idle)) {
            for (i, d) in disks.iter_mut().enumerate() {
                let Some(d) = d else { continue };
                d.d.flush().map_err(|e| fail("migrant: flush failed", e))?;
                println!(
                    "{P}: migrant: disk {i}: seed {}, {} writes, {} verified, capacity {} sectors",
                    d.seed, d.started, d.verified, d.cap
                );
            }
            let (sent, replied) = net.as_ref().map_or((0, 0), |n| (n.sent, n.replied));
            println!(
                "{P}: migrant: done, {} pages written, {sent} pings {replied} replied, {paused} pauses, longest gap {} us",
                dirt.written,
                gaps.us(gaps.longest)
            );
            return Ok(());
        }
        if report.due(now) {
            let recent = gaps.take_recent();
            let mut writes = [0u64; MAX_DISKS];
            for (w, d) in writes.iter_mut().zip(disks.iter()) {
                *w = d.as_ref().map_or(0, |d| d.verified);
            }
            let (sent, replied) = net.as_ref().map_or((0, 0), |n| (n.sent, n.replied));
            println!(
                "{P}: migrant: {} s: {} pages, disks {}/{}/{}/{} writes, pings {sent} sent {replied} replied, longest gap {} us (last second {} us)",
                now.wrapping_sub(start) / hz,
                dirt.written,
                writes[0],
                writes[1],
                writes[2],
                writes[3],
                gaps.us(gaps.longest),
                gaps.us(recent)
            );
            gaps.skip();
        }
        // Port I/O is slow on some hosts: the console is looked at ten times a second.
        if console.due(now) {
            match uart::try_getb() {
                Some(b'q') => quitting = true,
                Some(b'm') => match net.as_mut() {
                    Some(n) => {
                        let mut body = [0u8; 128];
                        let path = "/latest/meta-data/hostname";
                        let (status, len) = imds::get_with_token(&mut n.st, n.imds, http, path, &mut body)?;
                        println!("{P}: migrant: imds hostname -> {status} {}", Escaped(&body[..len]));
                        // The exchange read every frame meanwhile: the ping in flight is not
                        // counted either way (its reply may have gone to the exchange; a ping
                        // really lost then is forgiven too).
                        if n.awaiting.take().is_some() {
                            n.sent -= 1;
                        }
                    }
                    None => println!("{P}: migrant: imds: no network device"),
                },
                _ => {}
            }
            gaps.skip();
        }
    }
}
