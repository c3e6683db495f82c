//! The VMM driven in-process through its methods, on real KVM: vCPUs paused through their
//! request channels, their state read and loaded back, and the guest running on afterwards.

mod common;

use std::time::{Duration, Instant};

use bexar_vmm::config::{ConsoleConfig, VmConfig};
use bexar_vmm::vcpu::VcpuState;
use bexar_vmm::{build_for_boot, ExitReason, VmmState};
use common::*;

const MSR_IA32_TSC: u32 = 0x10;

fn tsc(s: &VcpuState) -> u64 {
    s.msrs
        .iter()
        .find(|(i, _)| *i == MSR_IA32_TSC)
        .map(|(_, v)| *v)
        .expect("the TSC is among the saved MSRs")
}

#[test]
fn paused_vcpus_save_and_restore_their_state_and_the_guest_runs_on() {
    let config = VmConfig {
        cmdline: format!("console=ttyS0 bexar.test=hang{}", guest_platform_params()),
        vcpus: 2,
        memory_mib: 64,
        console: ConsoleConfig::None,
        ..VmConfig::new(testguest())
    };
    let mut vmm = build_for_boot(&config).expect("build the VM");
    assert_eq!(vmm.state(), VmmState::Created);
    assert!(vmm.save_vcpus().is_err(), "only a paused VM is saved");
    vmm.resume().unwrap();
    assert!(!vmm.serve_until(Some(Instant::now() + Duration::from_millis(200))));

    vmm.pause().unwrap();
    assert_eq!(vmm.state(), VmmState::Paused);
    let first = vmm.save_vcpus().unwrap();
    let first_at = Instant::now();
    assert_eq!(first.len(), 2);
    // The boot vCPU spins in ring 3 (CS.DPL 3, long mode).
    assert_eq!(first[0].sregs.cs.dpl, 3, "{:?}", first[0].sregs.cs);
    assert_ne!(first[0].sregs.efer & (1 << 10), 0, "long mode active");
    let json = serde_json::to_string(&first[0]).unwrap();
    let back: VcpuState = serde_json::from_str(&json).unwrap();
    assert_eq!(back.regs.rip, first[0].regs.rip);

    // Time passes in the guest...
    vmm.resume().unwrap();
    assert!(!vmm.serve_until(Some(Instant::now() + Duration::from_millis(100))));
    vmm.pause().unwrap();
    let later = vmm.save_vcpus().unwrap();
    assert!(
        tsc(&later[0]) > tsc(&first[0]),
        "the TSC moved on while the guest ran"
    );
    // Its rate, roughly (it ran only part of the time: a lower bound).
    let per_sec = (tsc(&later[0]) - tsc(&first[0])) as f64 / first_at.elapsed().as_secs_f64();

    // ...and the first state goes back in, with a mark the spinning guest never touches (its
    // loop is `pause; jmp`): reading it back shows the state was loaded. (The TSC is not
    // rewound by this: KVM takes a host's IA32_TSC write within a second of the current value
    // as a synchronisation of vCPUs and keeps its offset.)
    // The XSAVE area (x87, SSE, AVX...) travels too, where the host has XSAVE: a mark in XMM7
    // (bytes 272-287 of the legacy area; the guest's loop uses no vector register) comes back.
    // The header's XSTATE_BV (byte 512) says which components the area holds: with the SSE
    // bit clear, a load would take SSE as its initial (all zero) state.
    let mut marked = first.clone();
    for (i, s) in marked.iter_mut().enumerate() {
        s.regs.rbx = 0xb0a7_0000 + i as u64;
        if let Some(x) = s.xsave.as_mut() {
            x[68..72].copy_from_slice(&[0x5eed_0000 + i as u32, 1, 2, 3]);
            x[128] |= 1 << 1;
        }
    }
    // A state that cannot be loaded is refused before any vCPU loads anything.
    let mut bad = marked.clone();
    match bad[1].xsave.as_mut() {
        Some(x) => x.truncate(10),
        None => bad[1].fpu.xmm.truncate(3),
    }
    assert!(vmm.restore_vcpus(bad, 0).is_err());
    assert_eq!(vmm.save_vcpus().unwrap()[0].regs.rbx, first[0].regs.rbx);
    vmm.restore_vcpus(marked, 0).unwrap();
    let again = vmm.save_vcpus().unwrap();
    for (i, (a, f)) in again.iter().zip(&first).enumerate() {
        assert_eq!(a.regs.rbx, 0xb0a7_0000 + i as u64);
        assert_eq!(a.xsave.is_some(), f.xsave.is_some());
        if let Some(x) = &a.xsave {
            assert_eq!(
                x[68..72],
                [0x5eed_0000 + i as u32, 1, 2, 3],
                "XMM7 of vCPU {i}"
            );
            assert_eq!(a.fpu.xmm[7][..4], (0x5eed_0000 + i as u32).to_le_bytes());
        }
        assert_eq!(
            (a.regs.rip, a.regs.rsp, a.regs.rflags),
            (f.regs.rip, f.regs.rsp, f.regs.rflags)
        );
        assert_eq!(a.sregs.cr3, f.sregs.cr3);
        assert_eq!(a.mp_state.mp_state, f.mp_state.mp_state);
        assert_eq!(
            a.lapic.regs[..0x40],
            f.lapic.regs[..0x40],
            "LAPIC ID and version"
        );
    }
    assert!(
        vmm.restore_vcpus(first[..1].to_vec(), 0).is_err(),
        "one state per vCPU"
    );
    // Loaded with 3 s of pause to count (as after a migration), the TSCs move on by that much
    // of this host's TSC time (the rate above is a lower bound: at least 1.5 s of it). Not on
    // PVM: there the guest's ring 3 reads the host's own TSC (no offset, no scaling), so a
    // loaded IA32_TSC changes nothing and the TSC counts every pause by itself.
    let before = vmm.save_vcpus().unwrap();
    vmm.restore_vcpus(before.clone(), 3_000_000_000).unwrap();
    let after = vmm.save_vcpus().unwrap();
    for (b, a) in before.iter().zip(&after) {
        let moved = tsc(a).wrapping_sub(tsc(b)) as f64 / per_sec;
        if is_pvm() {
            assert!(moved < 1.0, "PVM took a TSC write: {moved:.2} s");
        } else {
            assert!(moved > 1.5, "the TSC moved on {moved:.2} s of 3");
        }
    }
    // The kvmclock likewise: 2 s of pause counted come back as 2-3 s more through real KVM.
    let mut vm = vmm.save_vm_state().unwrap();
    let clock = vm.clock.clock;
    assert!(vm.saved_at_ns.is_some(), "a state says when it was saved");
    assert_eq!(vm.advance(2_000_000_000), 2_000_000_000);
    vmm.restore_vm_state(&vm).unwrap();
    let now = vmm.save_vm_state().unwrap().clock.clock;
    assert!(now >= clock + 2_000_000_000, "{clock} -> {now}");
    assert!(now < clock + 3_000_000_000, "{clock} -> {now}");

    // The guest runs on from there, and ends only when stopped.
    vmm.resume().unwrap();
    assert!(!vmm.serve_until(Some(Instant::now() + Duration::from_millis(100))));
    let outcome = vmm.finish();
    assert_eq!(outcome.reason, ExitReason::Stopped);
    assert!(outcome.vcpu_exits > 0);
}

#[test]
fn the_vm_wide_state_is_saved_and_loaded() {
    let config = VmConfig {
        cmdline: format!("console=ttyS0 bexar.test=hang{}", guest_platform_params()),
        memory_mib: 64,
        legacy_pit: true,
        console: ConsoleConfig::None,
        ..VmConfig::new(testguest())
    };
    let mut vmm = build_for_boot(&config).expect("build the VM");
    vmm.resume().unwrap();
    assert!(vmm.save_vm_state().is_err(), "only a paused VM is saved");
    assert!(!vmm.serve_until(Some(Instant::now() + Duration::from_millis(100))));
    vmm.pause().unwrap();
    let first = vmm.save_vm_state().unwrap();
    assert_eq!(first.irqchips.len(), 3);
    assert!(first.pit.is_some());
    assert!(first.clock.clock > 0);
    let json = serde_json::to_string(&first).unwrap();
    let back: bexar_vmm::vm_state::VmState = serde_json::from_str(&json).unwrap();
    assert_eq!(back.clock.clock, first.clock.clock);

    // A state that does not fit is refused before anything is loaded.
    let mut marked = first.clone();
    let pit = marked.pit.as_mut().unwrap();
    pit.channels[1].count = 0x1234;
    marked.clock.clock = first.clock.clock + 10_000_000_000;
    let mut bad = marked.clone();
    bad.irqchips.pop();
    assert!(vmm.restore_vm_state(&bad).is_err());
    let mut no_pit = marked.clone();
    no_pit.pit = None;
    assert!(vmm.restore_vm_state(&no_pit).is_err());
    let now = vmm.save_vm_state().unwrap();
    assert_ne!(now.pit.unwrap().channels[1].count, 0x1234);
    assert!(now.clock.clock < marked.clock.clock);

    // Loaded: the PIT's reload value is back, and guest time jumped 10 s ahead with the clock.
    vmm.restore_vm_state(&marked).unwrap();
    let again = vmm.save_vm_state().unwrap();
    assert_eq!(again.pit.unwrap().channels[1].count, 0x1234);
    assert!(
        again.clock.clock >= marked.clock.clock,
        "{} < {}",
        again.clock.clock,
        marked.clock.clock
    );
    assert!(again.clock.clock < marked.clock.clock + 5_000_000_000);

    vmm.resume().unwrap();
    assert!(!vmm.serve_until(Some(Instant::now() + Duration::from_millis(100))));
    assert_eq!(vmm.finish().reason, ExitReason::Stopped);
}
