//! The console watch of `bexar run --expect` (and so of `bexar boot-test`): ends the VM
//! successfully when a pattern appears on its console. A test harness's concern, so it lives
//! here and not in the UART: the VMM only offers its console to observers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bexar_devices::serial::ConsoleObserver;
use bexar_vmm::{ExitHandle, ExitReason};

/// Looks for `pattern` in the console output, across writes; the first match ends the VM with
/// [`ExitReason::PatternMatched`].
pub struct PatternWatch {
    pattern: Vec<u8>,
    window: VecDeque<u8>,
    exit: ExitHandle,
    start: Instant,
    matched: Arc<AtomicU64>,
}

/// When the pattern was seen, readable after the VM ended.
#[derive(Clone, Default)]
pub struct Matched(Arc<AtomicU64>);

impl Matched {
    /// Time from the VMM's start to the match.
    pub fn at(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

impl PatternWatch {
    /// A watch for `pattern` that ends the VM through `exit`; times count from `start`.
    pub fn new(pattern: &str, exit: ExitHandle, start: Instant) -> (Self, Matched) {
        let matched = Matched::default();
        (
            Self {
                pattern: pattern.as_bytes().to_vec(),
                window: VecDeque::with_capacity(pattern.len()),
                exit,
                start,
                matched: matched.0.clone(),
            },
            matched,
        )
    }
}

impl ConsoleObserver for PatternWatch {
    fn observe(&mut self, bytes: &[u8]) {
        if self.pattern.is_empty() || self.matched.load(Ordering::Relaxed) != 0 {
            return;
        }
        for b in bytes {
            if self.window.len() == self.pattern.len() {
                self.window.pop_front();
            }
            self.window.push_back(*b);
            if self.window.len() == self.pattern.len() && self.window.iter().eq(&self.pattern) {
                let ns = self.start.elapsed().as_nanos().max(1) as u64;
                self.matched.store(ns, Ordering::Relaxed);
                self.exit.request(ExitReason::PatternMatched);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_is_found_across_writes_and_ends_the_vm_once() {
        let exit = ExitHandle::new().unwrap();
        let (mut w, matched) = PatternWatch::new("Run /init", exit.clone(), Instant::now());
        for b in b"xx Run /i" {
            w.observe(&[*b]);
        }
        assert!(matched.at().is_none());
        assert!(!exit.requested());
        w.observe(b"nit as init");
        let first = matched.at().unwrap();
        assert_eq!(exit.reason(), Some(ExitReason::PatternMatched));
        w.observe(b"Run /init again");
        assert_eq!(matched.at(), Some(first), "the first match counts");
    }
}
