//! Hostile virtqueues for virtio-blk: the fuzzer writes the descriptor table, the available
//! ring and the request buffers; the device must answer or refuse, never panic or hang. It
//! serves them on a thread confined as a VMM's virtio thread (its seccomp filter, no file by
//! path): a system call that filter lacks is a crash here.
#![no_main]

#[path = "common.rs"]
mod common;

use bexar_devices::virtio::block::Block;
use bexar_devices::virtio::ring::DriverRing;
use bexar_devices::virtio::test_utils::{context, TestInterrupt};
use bexar_devices::virtio::VirtioDevice;
use bexar_vmm::threads::ThreadKind;
use common::{confined, disk, mem};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Address, Bytes, GuestAddress};

const RING: u64 = 0x10000;
const QUEUE: u16 = 16;

fuzz_target!(init: common::jail_process(), |data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mem = mem();
    let ring = DriverRing::new(mem, RING, QUEUE);
    // Layout the fuzzer controls: the descriptor table (16 x 16 bytes) and the available ring
    // entries where the driver model put them, and everything else from 0x30000 as request
    // buffers.
    let (avail_idx, rest) = data.split_at(2);
    let desc_len = rest.len().min(16 * 16);
    mem.write_slice(&[0u8; 16 * 16], ring.desc_table_addr())
        .unwrap();
    mem.write_slice(&rest[..desc_len], ring.desc_table_addr())
        .unwrap();
    let rest = &rest[desc_len..];
    let ring_len = rest.len().min(2 * QUEUE as usize);
    mem.write_slice(&rest[..ring_len], ring.avail_addr().unchecked_add(4))
        .unwrap();
    let bufs = &rest[ring_len..];
    mem.write_slice(&bufs[..bufs.len().min(0x10000)], GuestAddress(0x30000))
        .unwrap();

    // Opened outside, as a VMM opens its disks before its jail.
    let mut dev = Block::new(disk()).unwrap();
    ring.configure(&mut dev.queues_mut()[0]);
    ring.set_avail_idx(u16::from_le_bytes([avail_idx[0], avail_idx[1]]));
    confined(ThreadKind::Virtio, false, move || {
        dev.activate(context(mem, &TestInterrupt::new())).unwrap();
        dev.process_queue();
        dev.process_queue();
        dev.settle();
    });
});
