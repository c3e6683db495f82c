//! The VM-wide state KVM holds outside the vCPUs: the kvmclock, the in-kernel interrupt
//! controllers (the two PICs and the IOAPIC) and, when the VM has one, the PIT. What a snapshot
//! stores besides each vCPU's [`crate::vcpu::VcpuState`] and the devices' own state.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Errors saving or loading the VM's state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// The state does not fit this VM.
    #[error("a VM state that does not fit this VM: {0}")]
    Mismatch(&'static str),
}

/// The chips `KVM_GET_IRQCHIP` knows, in the order they are saved.
const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// The VM-wide state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The kvmclock: guest time in ns, as KVM keeps it.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC (their registers and pin states).
    pub irqchips: Vec<kvm_irqchip>,
    /// The i8254 PIT, for a VM that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pit: Option<kvm_pit_state2>,
    /// The saving host's `CLOCK_MONOTONIC` (ns) when the kvmclock was read: what the pause a
    /// handover or migration adds to the guest's clocks is measured from
    /// ([`VmState::advance`]; a migration carries it to the receiver's clock through the
    /// sender's readings in its `DONE` record, so the two hosts' clocks need not agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_at_ns: Option<u64>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The chips are unions KVM fills by chip id; their bytes say little to a reader.
        f.debug_struct("VmState")
            .field("clock_ns", &self.clock.clock)
            .field("irqchips", &self.irqchips.len())
            .field("pit", &self.pit.is_some())
            .finish()
    }
}

impl VmState {
    /// Reads the state of `vm` (the vCPUs paused, so nothing changes it meanwhile but time).
    pub fn save(vm: &VmFd, has_pit: bool) -> Result<Self, VmStateError> {
        let kvm = |what: &'static str| move |e| VmStateError::Kvm(what, e);
        let mut irqchips = Vec::with_capacity(CHIPS.len());
        for chip_id in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        Ok(Self {
            pit: if has_pit {
                Some(vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?)
            } else {
                None
            },
            irqchips,
            // Last: the clock is what moves while the others are read.
            clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
            saved_at_ns: Some(crate::control::monotonic_ns()),
        })
    }

    /// For a VM that goes on after a pause (a handover, a live migration): moves the kvmclock
    /// on by `elapsed` ns, the time since the state was saved, and returns it for the vCPUs'
    /// TSCs ([`crate::vcpu::VcpuState::advance_tsc`]). The guest then sees the pause as the time
    /// it took, as on real hardware that stalled: its clocks stay right and its own measure of
    /// the pause is true; without this, its time would fall behind by every pause. A snapshot
    /// restored later is not advanced (its guest did not live through the time in between).
    pub fn advance(&mut self, elapsed: u64) -> u64 {
        self.clock.clock = self.clock.clock.wrapping_add(elapsed);
        elapsed
    }

    /// Loads the state into `vm`. Everything that can be refused without KVM (a chip list or a
    /// PIT that does not match this VM) is refused before anything is loaded.
    pub fn restore(&self, vm: &VmFd, has_pit: bool) -> Result<(), VmStateError> {
        let kvm = |what: &'static str| move |e| VmStateError::Kvm(what, e);
        let ids: Vec<u32> = self.irqchips.iter().map(|c| c.chip_id).collect();
        if ids != CHIPS {
            return Err(VmStateError::Mismatch(
                "the interrupt controllers are not PIC master, PIC slave and IOAPIC",
            ));
        }
        if self.pit.is_some() != has_pit {
            return Err(VmStateError::Mismatch(
                "a PIT state for a VM without one, or none for a VM with one",
            ));
        }
        if let Some(pit) = &self.pit {
            vm.set_pit2(pit).map_err(kvm("KVM_SET_PIT2"))?;
        }
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        // KVM_SET_CLOCK takes only the time (and, with KVM_CLOCK_REALTIME, the host time it
        // was read at); the flags KVM_GET_CLOCK reports about the host's clock are not inputs.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> VmState {
        VmState {
            clock: kvm_clock_data {
                clock: 5_000_000_000,
                ..Default::default()
            },
            irqchips: Vec::new(),
            pit: None,
            saved_at_ns: None,
        }
    }

    #[test]
    fn the_clock_advances_by_the_pause_and_old_states_still_read() {
        let mut s = state();
        assert_eq!(s.advance(40_000_000), 40_000_000);
        assert_eq!(s.clock.clock, 5_040_000_000);
        // A state written before the field existed still reads.
        let json = serde_json::to_value(state()).unwrap();
        assert!(json.get("saved_at_ns").is_none());
        let back: VmState = serde_json::from_value(json).unwrap();
        assert_eq!(back.saved_at_ns, None);
    }
}
