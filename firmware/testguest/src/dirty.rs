//! `dirty`: a guest that writes memory at a steady rate, checks that none of its writes is ever
//! lost, and measures the pauses it sees: the guest a live migration moves.
//!
//! It takes `bexar.dirty-mib` MiB (default 8) of free memory and writes `bexar.dirty-rate`
//! pages a second (default 10,000; 0: as fast as it can), in order, round and round. Each write
//! puts the next generation number in the page's first word, after checking that the word still
//! holds the page's previous one: a page that lost a write, or went back to an older content, is
//! a failure. Between writes it spins reading the TSC; the longest time between two turns of that
//! loop is the longest pause it saw (a VMM pausing it, a migration's blackout).
//!
//! It prints `dirty: region GPA+LEN` first, then every second `dirty: N pages written, round R,
//! longest gap X us (last second Y us)`. `q` on the console ends it with PASS.
//!
//! [`Dirtier`] and [`Gaps`] are the two halves, shared with `migrant` (migrant.rs).

use crate::vtests::{alloc, param};
use crate::{code, TestResult, P};
use rt::arch::{rdtsc, tsc_hz};
use rt::bootparams::BootParams;
use rt::{println, uart};

const PAGE: usize = 4096;

/// How many events are due by `now` at `rate` a second from `start` (TSC cycles at `hz`).
pub(crate) fn due(start: u64, now: u64, rate: u64, hz: u64) -> u64 {
    (now.wrapping_sub(start) as u128 * rate as u128 / hz.max(1) as u128) as u64
}

/// Something a spinning loop does every `every` TSC cycles (a report, a look at the console).
pub(crate) struct Every {
    next: u64,
    every: u64,
}

impl Every {
    /// First due at `first`.
    pub fn new(first: u64, every: u64) -> Every {
        Every { next: first, every }
    }

    /// Whether it is due at `now` (then it is next due `every` cycles later).
    pub fn due(&mut self, now: u64) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.every;
        true
    }
}

/// Pages written at a steady rate, each checked before it is written again.
pub(crate) struct Dirtier {
    base: *mut u8,
    pages: usize,
    rate: u64,
    hz: u64,
    start: u64,
    /// Page writes so far.
    pub written: u64,
    next: usize,
}

impl Dirtier {
    /// `bexar.dirty-mib` MiB written `bexar.dirty-rate` pages a second from now; prints
    /// `<tag>: region GPA+LEN, N pages at R pages/s`.
    pub fn new(bp: &BootParams, tag: &str) -> Result<Dirtier, (u32, &'static str)> {
        let mib = param(bp, "bexar.dirty-mib", 8)? as usize;
        let rate = param(bp, "bexar.dirty-rate", 10_000)?;
        if mib == 0 {
            return Err((code::BAD_PARAM, "bexar.dirty-mib must be at least 1"));
        }
        let region = alloc(mib << 20)?;
        let pages = region.len() / PAGE;
        println!(
            "{P}: {tag}: region {:#x}+{:#x}, {pages} pages at {rate} pages/s",
            region.as_ptr() as usize,
            region.len()
        );
        let mut d =
            Dirtier { base: region.as_mut_ptr(), pages, rate, hz: tsc_hz(), start: rdtsc(), written: 0, next: 0 };
        for p in 0..pages {
            // SAFETY: the region is ours alone (allocated above, never freed); every access
            // is a whole aligned u64 at one of its pages' start.
            unsafe { core::ptr::write_volatile(d.word(p), 0) };
        }
        d.start = rdtsc();
        Ok(d)
    }

    fn word(&self, p: usize) -> *mut u64 {
        // SAFETY: p < pages: inside the region (see `new`).
        unsafe { self.base.add(p * PAGE).cast::<u64>() }
    }

    /// Rounds over the whole region so far.
    pub fn round(&self) -> u64 {
        self.written / self.pages as u64
    }

    /// The writes due by `now` at the steady rate (one round at most per call).
    pub fn step(&mut self, now: u64) -> TestResult {
        let due =
            if self.rate == 0 { self.written + self.pages as u64 } else { due(self.start, now, self.rate, self.hz) };
        let mut n = 0;
        while self.written < due && n < self.pages {
            let round = self.round();
            let w = self.word(self.next);
            // SAFETY: see `new`.
            let held = unsafe { core::ptr::read_volatile(w) };
            if held != round {
                println!("{P}: dirty: page {} ({:#x}) holds {held}, expected {round}", self.next, w as usize);
                return Err((code::MISMATCH, "a page lost a write"));
            }
            // SAFETY: see `new`.
            unsafe { core::ptr::write_volatile(w, round + 1) };
            self.written += 1;
            n += 1;
            self.next = (self.next + 1) % self.pages;
        }
        Ok(())
    }
}

/// The longest time between two turns of a spinning loop: the pauses the guest saw.
pub(crate) struct Gaps {
    hz: u64,
    last: u64,
    /// Longest gap since the start, in TSC cycles.
    pub longest: u64,
    /// Longest gap since the last [`Gaps::take_recent`].
    recent: u64,
}

impl Gaps {
    pub fn new() -> Gaps {
        let now = rdtsc();
        Gaps { hz: tsc_hz(), last: now, longest: 0, recent: 0 }
    }

    /// One turn of the loop at `now`; returns the gap since the last turn, in cycles.
    pub fn turn(&mut self, now: u64) -> u64 {
        let gap = now.wrapping_sub(self.last);
        self.last = now;
        self.longest = self.longest.max(gap);
        self.recent = self.recent.max(gap);
        gap
    }

    /// Forget the time since the last turn: the loop did something slow of its own (a
    /// print through port I/O, a blocking exchange), not a pause of the VM's making.
    pub fn skip(&mut self) {
        self.last = rdtsc();
    }

    /// The longest gap since the last call, in cycles.
    pub fn take_recent(&mut self) -> u64 {
        core::mem::take(&mut self.recent)
    }

    /// `cycles` in microseconds.
    pub fn us(&self, cycles: u64) -> u64 {
        cycles / (self.hz / 1_000_000).max(1)
    }
}

pub fn test_dirty(bp: &BootParams) -> TestResult {
    let mut d = Dirtier::new(bp, "dirty")?;
    let hz = tsc_hz();
    let mut gaps = Gaps::new();
    let start = rdtsc();
    let (mut report, mut console) = (Every::new(start + hz, hz), Every::new(start + hz / 10, hz / 10));
    loop {
        let now = rdtsc();
        gaps.turn(now);
        d.step(now)?;
        if report.due(now) {
            let recent = gaps.take_recent();
            println!(
                "{P}: dirty: {} pages written, round {}, longest gap {} us (last second {} us)",
                d.written,
                d.round(),
                gaps.us(gaps.longest),
                gaps.us(recent)
            );
            gaps.skip();
        }
        // Port I/O is slow on some hosts: the console is looked at ten times a second.
        if console.due(now) {
            if uart::try_getb() == Some(b'q') {
                println!("{P}: dirty: done, {} pages written, longest gap {} us", d.written, gaps.us(gaps.longest));
                return Ok(());
            }
            gaps.skip();
        }
    }
}
