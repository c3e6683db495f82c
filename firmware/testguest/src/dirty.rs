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

use crate::vtests::{alloc, param};
use crate::{code, TestResult, P};
use rt::arch::{rdtsc, tsc_hz};
use rt::bootparams::BootParams;
use rt::{println, uart};

const PAGE: usize = 4096;

pub fn test_dirty(bp: &BootParams) -> TestResult {
    let mib = param(bp, "bexar.dirty-mib", 8)? as usize;
    let rate = param(bp, "bexar.dirty-rate", 10_000)?;
    if mib == 0 {
        return Err((code::BAD_PARAM, "bexar.dirty-mib must be at least 1"));
    }
    let region = alloc(mib << 20)?;
    let pages = region.len() / PAGE;
    println!("{P}: dirty: region {:#x}+{:#x}, {pages} pages at {rate} pages/s", region.as_ptr() as usize, region.len());
    // SAFETY: the region is ours alone (allocated above, never freed); every access is a
    // whole aligned u64 at a page's start.
    let base = region.as_mut_ptr();
    let word = |p: usize| unsafe { base.add(p * PAGE).cast::<u64>() };
    for p in 0..pages {
        // SAFETY: see above.
        unsafe { core::ptr::write_volatile(word(p), 0) };
    }
    let hz = tsc_hz();
    let us = |cycles: u64| cycles / (hz / 1_000_000).max(1);
    let start = rdtsc();
    let (mut written, mut next) = (0u64, 0usize);
    let (mut last, mut longest, mut longest_now) = (start, 0u64, 0u64);
    let mut report = start + hz;
    let mut console_at = start;
    loop {
        let now = rdtsc();
        let gap = now.wrapping_sub(last);
        last = now;
        longest = longest.max(gap);
        longest_now = longest_now.max(gap);
        // Writes due by now at the steady rate (all of one round at most per turn).
        let due =
            if rate == 0 { written + pages as u64 } else { ((now - start) as u128 * rate as u128 / hz as u128) as u64 };
        let mut n = 0;
        while written < due && n < pages {
            let round = written / pages as u64;
            // SAFETY: see above.
            let held = unsafe { core::ptr::read_volatile(word(next)) };
            if held != round {
                println!("{P}: dirty: page {next} ({:#x}) holds {held}, expected {round}", word(next) as usize);
                return Err((code::MISMATCH, "a page lost a write"));
            }
            // SAFETY: see above.
            unsafe { core::ptr::write_volatile(word(next), round + 1) };
            written += 1;
            n += 1;
            next = (next + 1) % pages;
        }
        if now >= report {
            println!(
                "{P}: dirty: {written} pages written, round {}, longest gap {} us (last second {} us)",
                written / pages as u64,
                us(longest),
                us(longest_now)
            );
            longest_now = 0;
            report = now + hz;
            // The print itself is slow (port I/O): not a pause of the VM's making.
            last = rdtsc();
        }
        // Port I/O is slow on some hosts: the console is looked at ten times a second.
        if now.wrapping_sub(console_at) > hz / 10 {
            console_at = now;
            if uart::try_getb() == Some(b'q') {
                println!("{P}: dirty: done, {written} pages written, longest gap {} us", us(longest));
                return Ok(());
            }
            last = rdtsc();
        }
    }
}
