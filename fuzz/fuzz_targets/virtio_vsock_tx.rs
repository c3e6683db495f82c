//! Hostile packets on virtio-vsock's transmit queue: the fuzzer writes up to eight packets
//! (headers, payloads and how they are cut into descriptors), with a host service listening on
//! port 5000 so that requests open real connections and data reaches a real socket. The
//! device must answer, reset or refuse each one, never panic or hang.
//!
//! Each packet is a control byte, a 44-byte header and its payload. Control bit 0 makes the
//! addressing valid (guest CID 3 to host CID 2, a stream, source port 1024-1027, destination
//! 5000 or the unserved 5001), so that the fuzzer spends its time on operations, lengths and
//! credit rather than on finding the CIDs; bits 1-2 choose the descriptor layout.
//!
//! The device's event loop runs on a thread confined as a VMM's virtio thread (its seccomp
//! filter, no file by path): a system call that filter lacks is a crash here.
#![no_main]

#[path = "common.rs"]
mod common;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use bexar_devices::virtio::ring::DriverRing;
use bexar_devices::virtio::test_utils::{activate_all, TestInterrupt};
use bexar_devices::virtio::vsock::device::HOST_CID;
use bexar_devices::virtio::vsock::packet::{Hdr, HDR_LEN, TYPE_STREAM};
use bexar_devices::virtio::vsock::{Vsock, VsockConfig};
use bexar_devices::virtio::VirtioDevice;
use bexar_vmm::threads::ThreadKind;
use common::{confined, mem};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const PACKETS: usize = 8;
const TX: usize = 1;

/// The VM's socket path, and the host service on port 5000 (per process).
fn host() -> &'static (PathBuf, UnixListener) {
    static H: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    H.get_or_init(|| {
        let uds = common::own_path("vsock");
        let service = format!("{}_5000", uds.display());
        let _ = std::fs::remove_file(&service);
        let l = UnixListener::bind(&service).unwrap();
        l.set_nonblocking(true).unwrap();
        (uds, l)
    })
}

fuzz_target!(init: common::jail_process(), |data: &[u8]| {
    let (uds, service) = host();
    let mem = mem();
    let dev = Arc::new(Mutex::new(
        Vsock::new(&VsockConfig {
            cid: 3,
            uds: uds.clone(),
        })
        .unwrap(),
    ));
    let mut rx = DriverRing::new(mem, 0x1_0000, 16);
    let mut tx = DriverRing::new(mem, 0x1_4000, 16);
    let ev = DriverRing::new(mem, 0x1_8000, 16);
    let irq = TestInterrupt::new();
    activate_all(&mut *dev.lock().unwrap(), &[&rx, &tx, &ev], mem, &irq);
    for i in 0..8u16 {
        let at = 0x10_0000 + u64::from(i) * 0x1000;
        rx.push_chain(i, &[(at, 0x1000, true)]);
    }
    let mut loop_ = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    loop_.add_subscriber(dev.clone());

    let mut rest = data;
    for i in 0..PACKETS {
        if rest.len() < 1 + HDR_LEN {
            break;
        }
        let ctl = rest[0];
        let mut raw = [0u8; HDR_LEN];
        raw.copy_from_slice(&rest[1..=HDR_LEN]);
        rest = &rest[1 + HDR_LEN..];
        let mut hdr = Hdr::parse(&raw);
        if ctl & 1 != 0 {
            hdr.src_cid = 3;
            hdr.dst_cid = HOST_CID;
            hdr.src_port = 1024 + (hdr.src_port & 3);
            hdr.dst_port = 5000 + (hdr.dst_port & 1);
            hdr.kind = TYPE_STREAM;
        }
        let h = hdr.bytes();
        let claimed = hdr.len as usize;
        let n = claimed.min(rest.len()).min(0x1000 - HDR_LEN);
        let (payload, tail) = rest.split_at(n);
        rest = tail;
        let at = 0x3_0000 + i as u64 * 0x2000;
        let d = (i * 2) as u16;
        mem.write_slice(&h, GuestAddress(at)).unwrap();
        match (ctl >> 1) & 3 {
            // Header and payload in one buffer.
            0 => {
                mem.write_slice(payload, GuestAddress(at + HDR_LEN as u64))
                    .unwrap();
                tx.push_chain(d, &[(at, (HDR_LEN + n) as u32, false)]);
            }
            // Header, then payload in a second buffer.
            1 => {
                mem.write_slice(payload, GuestAddress(at + 0x1000)).unwrap();
                tx.push_chain(
                    d,
                    &[(at, HDR_LEN as u32, false), (at + 0x1000, n as u32, false)],
                );
            }
            // The header cut in two.
            2 => {
                let cut = (ctl >> 3) as usize % HDR_LEN;
                mem.write_slice(&h[cut..], GuestAddress(at + 0x1000))
                    .unwrap();
                mem.write_slice(payload, GuestAddress(at + 0x1000 + (HDR_LEN - cut) as u64))
                    .unwrap();
                tx.push_chain(
                    d,
                    &[
                        (at, cut as u32, false),
                        (at + 0x1000, (HDR_LEN - cut + n) as u32, false),
                    ],
                );
            }
            // A buffer the device may write (a driver bug), and a length past the payload.
            _ => {
                mem.write_slice(payload, GuestAddress(at + HDR_LEN as u64))
                    .unwrap();
                tx.push_chain(d, &[(at, (HDR_LEN + n) as u32 + u32::from(ctl >> 3), true)]);
            }
        }
    }
    dev.lock().unwrap().queue_events()[TX].write(1).unwrap();
    confined(ThreadKind::Virtio, false, move || {
        for _ in 0..4 {
            loop_.run_with_timeout(0).unwrap();
        }
        drop(loop_);
        drop(dev);
    });
    // Connections the device made are closed; take them off the service's backlog.
    while let Ok((s, _)) = service.accept() {
        drop(s);
    }
});
