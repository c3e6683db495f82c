//! Dirty-page logging on real KVM, the first step of a live migration's pre-copy: every page of
//! guest memory that changed between two looks is in the log, whoever wrote it (the guest, seen
//! by KVM's log; the VMM, seen by guest memory's bitmaps), and the log holds little else.

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use bexar_vmm::build_for_boot;
use bexar_vmm::config::{ConsoleConfig, VmConfig};
use common::*;
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;

/// Guest memory as it is now, read through its memfd (page `i` of the file is page `i` of the
/// log).
fn ram_copy(vmm: &bexar_vmm::Vmm) -> Vec<u8> {
    let ram = vmm.memory();
    let mut buf = vec![0u8; ram.size as usize];
    ram.file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

fn changed_pages(a: &[u8], b: &[u8]) -> Vec<u64> {
    a.chunks(PAGE as usize)
        .zip(b.chunks(PAGE as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

#[test]
fn every_page_that_changed_is_in_the_dirty_log_and_little_else() {
    let config = VmConfig {
        cmdline: format!(
            "console=ttyS0 bexar.test=dirty bexar.dirty-mib=8 bexar.dirty-rate=20000{}",
            guest_platform_params()
        ),
        memory_mib: 64,
        console: ConsoleConfig::None,
        ..VmConfig::new(testguest())
    };
    let mut vmm = build_for_boot(&config).expect("build the VM");
    vmm.resume().unwrap();
    // Let it boot and start writing.
    assert!(!vmm.serve_until(Some(Instant::now() + Duration::from_millis(300))));
    vmm.pause().unwrap();
    assert!(vmm.take_dirty().is_err(), "no log before it is started");
    vmm.start_dirty_log().unwrap();

    for round in 0..3 {
        let before = ram_copy(&vmm);
        vmm.resume().unwrap();
        assert!(!vmm.serve_until(Some(Instant::now() + Duration::from_millis(150))));
        vmm.pause().unwrap();
        // The VMM writes into guest memory too (as a device does): one page, through
        // vm-memory, somewhere the guest does not write.
        let mark = GuestAddress(60 << 20);
        vmm.memory()
            .mem
            .write_slice(&[0xa5, round as u8 + 1], mark)
            .unwrap();
        let after = ram_copy(&vmm);
        let dirty = vmm.take_dirty().unwrap();
        let changed = changed_pages(&before, &after);
        assert!(
            changed.len() > 100,
            "round {round}: the guest wrote {} pages",
            changed.len()
        );
        let missed: Vec<u64> = changed
            .iter()
            .copied()
            .filter(|p| !dirty.contains(*p))
            .collect();
        assert!(
            missed.is_empty(),
            "round {round}: {} pages changed but not logged, the first {:?}",
            missed.len(),
            &missed[..missed.len().min(16)]
        );
        assert!(
            dirty.contains(mark.0 / PAGE),
            "round {round}: the VMM's write is logged"
        );
        // Written without changing (the guest's stack, a timer's state...): a few pages.
        let extra = dirty.count() - changed.len() as u64;
        assert!(
            extra <= 64,
            "round {round}: {extra} pages logged that did not change ({} logged, {} changed)",
            dirty.count(),
            changed.len()
        );
        // Taking the log clears it: a paused guest writes nothing.
        assert_eq!(vmm.take_dirty().unwrap().count(), 0, "round {round}");
    }
    vmm.stop_dirty_log().unwrap();
    assert!(vmm.take_dirty().is_err(), "no log once it is stopped");
    // The guest runs on, its writes all where it left them (it checks each page's count).
    vmm.resume().unwrap();
    assert!(!vmm.serve_until(Some(Instant::now() + Duration::from_millis(100))));
}
