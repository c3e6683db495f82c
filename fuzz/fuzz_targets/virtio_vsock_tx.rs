//! Hostile packets on virtio-vsock's transmit queue: the fuzzer writes up to eight packets
//! (headers, payloads and how they are cut into descriptors), with a host service listening on
//! port 5000 so that requests open real connections and data reaches a real socket. The
//! device must answer, reset or refuse each one, never panic or hang.
//!
//! Each packet is a control byte, a 44-byte header and its payload. Control bit 0 makes the
//! addressing valid (guest CID 3 to host CID 2, a stream, source port 1024-1027, destination
//! 5000 or the unserved 5001), so that the fuzzer spends its time on operations, lengths and
//! credit rather than on finding the CIDs; bits 1-2 choose the descriptor layout.
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use bexar_devices::memory::{test_memory, GuestMemoryMmap};
use bexar_devices::virtio::ring::DriverRing;
use bexar_devices::virtio::test_utils::{activate_all, TestInterrupt};
use bexar_devices::virtio::vsock::{Vsock, VsockConfig};
use bexar_devices::virtio::VirtioDevice;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const HDR: usize = 44;
const PACKETS: usize = 8;
const TX: usize = 1;

/// The VM's socket path, and the host service on port 5000 (per process).
fn host() -> &'static (PathBuf, UnixListener) {
    static H: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    H.get_or_init(|| {
        let uds = std::env::temp_dir().join(format!("bexar-fuzz-vsock-{}", std::process::id()));
        let service = format!("{}_5000", uds.display());
        let _ = std::fs::remove_file(&service);
        let l = UnixListener::bind(&service).unwrap();
        l.set_nonblocking(true).unwrap();
        (uds, l)
    })
}

fn mem() -> &'static GuestMemoryMmap {
    static M: OnceLock<GuestMemoryMmap> = OnceLock::new();
    M.get_or_init(|| test_memory(2))
}

fuzz_target!(|data: &[u8]| {
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
        rx.push_chain(i * 2, &[(at, 0x1000, true)]);
    }
    let mut loop_ = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    loop_.add_subscriber(dev.clone());

    let mut rest = data;
    for i in 0..PACKETS {
        if rest.len() < 1 + HDR {
            break;
        }
        let ctl = rest[0];
        let mut h = [0u8; HDR];
        h.copy_from_slice(&rest[1..=HDR]);
        rest = &rest[1 + HDR..];
        if ctl & 1 != 0 {
            h[0..8].copy_from_slice(&3u64.to_le_bytes());
            h[8..16].copy_from_slice(&2u64.to_le_bytes());
            let src = 1024 + u32::from(h[16] & 3);
            h[16..20].copy_from_slice(&src.to_le_bytes());
            let dst = 5000 + u32::from(h[20] & 1);
            h[20..24].copy_from_slice(&dst.to_le_bytes());
            h[28..30].copy_from_slice(&1u16.to_le_bytes());
        }
        let claimed = u32::from_le_bytes([h[24], h[25], h[26], h[27]]) as usize;
        let n = claimed.min(rest.len()).min(0x1000 - HDR);
        let (payload, tail) = rest.split_at(n);
        rest = tail;
        let at = 0x3_0000 + i as u64 * 0x2000;
        let d = (i * 2) as u16;
        mem.write_slice(&h, GuestAddress(at)).unwrap();
        match (ctl >> 1) & 3 {
            // Header and payload in one buffer.
            0 => {
                mem.write_slice(payload, GuestAddress(at + HDR as u64))
                    .unwrap();
                tx.push_chain(d, &[(at, (HDR + n) as u32, false)]);
            }
            // Header, then payload in a second buffer.
            1 => {
                mem.write_slice(payload, GuestAddress(at + 0x1000)).unwrap();
                tx.push_chain(
                    d,
                    &[(at, HDR as u32, false), (at + 0x1000, n as u32, false)],
                );
            }
            // The header cut in two.
            2 => {
                let cut = (ctl >> 3) as usize % HDR;
                mem.write_slice(&h[cut..], GuestAddress(at + 0x1000))
                    .unwrap();
                mem.write_slice(payload, GuestAddress(at + 0x1000 + (HDR - cut) as u64))
                    .unwrap();
                tx.push_chain(
                    d,
                    &[
                        (at, cut as u32, false),
                        (at + 0x1000, (HDR - cut + n) as u32, false),
                    ],
                );
            }
            // A buffer the device may write (a driver bug), and a length past the payload.
            _ => {
                mem.write_slice(payload, GuestAddress(at + HDR as u64))
                    .unwrap();
                tx.push_chain(d, &[(at, (HDR + n) as u32 + u32::from(ctl >> 3), true)]);
            }
        }
    }
    dev.lock().unwrap().queue_events()[TX].write(1).unwrap();
    for _ in 0..4 {
        loop_.run_with_timeout(0).unwrap();
    }
    drop(loop_);
    drop(dev);
    // Connections the device made are closed; take them off the service's backlog.
    while let Ok((s, _)) = service.accept() {
        drop(s);
    }
});
