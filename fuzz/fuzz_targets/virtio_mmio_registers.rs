//! Arbitrary register accesses on the virtio-mmio transport (any offset, width, order): feature
//! negotiation, queue set-up, status changes and resets in any sequence must never panic. The
//! accesses run on a thread confined as a VMM's vCPU thread (its seccomp filter, no file by
//! path), where a VMM takes them.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::{Arc, Mutex};

use bexar_devices::bus::BusDevice;
use bexar_devices::virtio::block::Block;
use bexar_devices::virtio::transport::mmio::{MmioInterrupt, MmioTransport};
use bexar_devices::virtio::VirtioDevice;
use bexar_vmm::threads::ThreadKind;
use common::{confined, disk, mem};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

fuzz_target!(init: common::jail_process(), |data: &[u8]| {
    let dev: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Block::new(disk()).unwrap()));
    let irq = Arc::new(MmioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(dev, mem().clone(), irq);
    let data = data.to_vec();
    confined(ThreadKind::Vcpu(0), false, move || accesses(&mut t, &data));
});

/// Each 8-byte record: offset (u16), width selector, write flag, value (u32).
fn accesses(t: &mut MmioTransport, data: &[u8]) {
    for op in data.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]]) & 0x1ff);
        let width = [1usize, 2, 4, 8][usize::from(op[2] & 3)];
        let value = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&value.to_le_bytes());
        if op[3] & 1 == 1 {
            t.write(offset, &buf[..width]);
        } else {
            t.read(offset, &mut buf[..width]);
        }
    }
}
