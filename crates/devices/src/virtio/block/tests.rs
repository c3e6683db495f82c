//! virtio-blk driven through real rings in guest memory, on a real image file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk as vb;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::block::DiskBackend;
use crate::memory::{test_memory, GuestMemoryMmap};
use crate::virtio::ring::{Desc, DriverRing, F_NEXT};
use crate::virtio::test_utils::{activate, restored_context, TestInterrupt};
use crate::virtio::VirtioDevice;

const RING: u64 = 0x10000;
const HDR: u64 = 0x20000;
const DATA: u64 = 0x30000;
const STATUS: u64 = 0x40000;
const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

struct Rig {
    mem: GuestMemoryMmap,
    dev: Block,
    path: PathBuf,
    irq: Arc<TestInterrupt>,
}

fn image(sectors: u64) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "bexar-blk-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    File::create(&path).unwrap().set_len(sectors * 512).unwrap();
    path
}

fn rig_with(sectors: u64, read_only: bool, direct: bool) -> Rig {
    let path = image(sectors);
    let cfg = DiskConfig {
        path: path.clone(),
        read_only,
        serial: Some("disk-serial-1".into()),
        direct,
        format: None,
        rate_limit: None,
        nbd: None,
        iscsi: None,
        backing: None,
    };
    Rig {
        mem: test_memory(4),
        dev: Block::new(&cfg).unwrap(),
        path,
        irq: TestInterrupt::new(),
    }
}

fn rig(sectors: u64, read_only: bool) -> Rig {
    rig_with(sectors, read_only, false)
}

impl Rig {
    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }
    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
    fn counter(&self, f: impl Fn(&crate::virtio::Counters) -> &AtomicU64) -> u64 {
        f(self.dev.counters()).load(Ordering::Relaxed)
    }
    fn file(&self) -> File {
        File::options()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        std::fs::remove_file(&self.path).ok();
    }
}

/// Makes a chain available and runs the device until it has answered.
fn submit(r: &mut Rig, ring: &mut DriverRing<'_>, first: u16, bufs: &[(u64, u32, bool)]) {
    ring.push_chain(first, bufs);
    r.dev.process_queue();
    r.dev.settle();
}

#[test]
fn write_then_read_back_through_the_ring() {
    let mut r = rig(64, false);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    r.header(T_OUT, 5);
    let mem = r.mem.clone();
    let mut ring = DriverRing::new(&mem, RING, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);
    submit(
        &mut r,
        &mut ring,
        0,
        &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_OK);
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(ring.used_entry(0), (0, 1));
    // The bytes are in the file at sector 5.
    let mut on_disk = vec![0u8; 1024];
    r.file().read_exact_at(&mut on_disk, 5 * 512).unwrap();
    assert_eq!(on_disk, pattern);
    // Read them back into a clean buffer.
    r.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    r.header(T_IN, 5);
    submit(
        &mut r,
        &mut ring,
        3,
        &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_OK);
    assert_eq!(ring.used_entry(1), (3, 1025));
    let mut back = vec![0u8; 1024];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    assert_eq!(r.counter(|c| &c.requests), 2);
    assert_eq!(r.counter(|c| &c.read_bytes), 1024);
    assert_eq!(r.counter(|c| &c.written_bytes), 1024);
    assert_eq!(r.irq.queue_interrupts(), 2);
}

#[test]
fn direct_io_round_trip() {
    let mut r = rig_with(64, false, true);
    assert_eq!(
        r.dev.backend.engine(),
        "sync",
        "O_DIRECT takes the bounce buffer"
    );
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
    r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let mem = r.mem.clone();
    let mut ring = DriverRing::new(&mem, RING, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);
    r.header(T_OUT, 8);
    submit(
        &mut r,
        &mut ring,
        0,
        &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_OK);
    r.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    r.header(T_IN, 8);
    submit(
        &mut r,
        &mut ring,
        3,
        &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_OK);
    let mut back = vec![0u8; 4096];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn reads_and_writes_take_io_uring_when_the_host_has_it() {
    let mut r = rig(64, false);
    if r.dev.backend.engine() != "io_uring" {
        // io_uring disabled on this host (e.g. kernel.io_uring_disabled): the synchronous
        // backend is what the other tests cover.
        eprintln!("io_uring unavailable here; only the synchronous backend is tested");
        return;
    }
    r.file().write_all_at(&[0x5au8; 4096], 2 * 512).unwrap();
    let mem = r.mem.clone();
    let mut ring = DriverRing::new(&mem, RING, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);
    r.header(T_IN, 2);
    submit(
        &mut r,
        &mut ring,
        0,
        &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_OK);
    assert_eq!(ring.used_entry(0), (0, 4097));
    let mut back = vec![0u8; 4096];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|b| *b == 0x5a));
    assert_eq!(r.counter(|c| &c.read_bytes), 4096);
}

#[test]
fn pages_a_read_fills_are_marked_dirty_whatever_the_backend() {
    let mut r = rig(64, false);
    r.mem = crate::memory::tracked_test_memory(4);
    let mem = r.mem.clone();
    let mut ring = DriverRing::new(&mem, RING, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);
    r.header(T_IN, 0);
    assert!(!crate::memory::is_dirty(&mem, DATA + 0x1000));
    submit(
        &mut r,
        &mut ring,
        0,
        &[(HDR, 16, false), (DATA, 8192, true), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_OK);
    assert!(crate::memory::is_dirty(&mem, DATA));
    assert!(
        crate::memory::is_dirty(&mem, DATA + 0x1000),
        "{} filled it",
        r.dev.backend.engine()
    );
    assert!(!crate::memory::is_dirty(&mem, DATA + 0x2000));
}

#[test]
fn flush_get_id_discard_and_unknown_types() {
    let mut r = rig(64, false);
    let mem = r.mem.clone();
    let mut ring = DriverRing::new(&mem, RING, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);
    r.header(T_FLUSH, 0);
    submit(&mut r, &mut ring, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(r.status(), S_OK);

    r.header(T_GET_ID, 0);
    submit(
        &mut r,
        &mut ring,
        2,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_OK);
    assert_eq!(ring.used_entry(1), (2, 21));
    let mut id = [0u8; 13];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"disk-serial-1");

    // Fill sectors 8..16 with ones, then discard them: they read back as zeros.
    r.file().write_all_at(&[1u8; 4096], 8 * 512).unwrap();
    r.header(T_DISCARD, 0);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&8u64.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    submit(
        &mut r,
        &mut ring,
        5,
        &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_OK);
    let mut back = [0xaau8; 4096];
    r.file().read_exact_at(&mut back, 8 * 512).unwrap();
    assert!(back.iter().all(|b| *b == 0));

    r.header(99, 0);
    submit(&mut r, &mut ring, 8, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(r.status(), S_UNSUPP);
    assert_eq!(r.counter(|c| &c.refused), 1);
}

#[test]
fn hostile_requests_are_refused_and_counted() {
    let mut r = rig(16, false);
    let mem = r.mem.clone();
    let mut ring = DriverRing::new(&mem, RING, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);

    // Beyond the end of the disk.
    r.header(T_IN, 15);
    submit(
        &mut r,
        &mut ring,
        0,
        &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_IOERR);

    // Not a whole number of sectors.
    r.header(T_OUT, 0);
    submit(
        &mut r,
        &mut ring,
        3,
        &[(HDR, 16, false), (DATA, 100, false), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_IOERR);

    // A data buffer outside guest memory.
    r.header(T_IN, 0);
    submit(
        &mut r,
        &mut ring,
        6,
        &[
            (HDR, 16, false),
            (0xffff_0000_0000, 512, true),
            (STATUS, 1, true),
        ],
    );
    // Refused, and the valid status descriptor says so.
    assert_eq!(ring.used_entry(2).1, 1);
    assert_eq!(r.status(), S_IOERR);

    // A descriptor that loops onto itself: the walk is bounded.
    ring.set_desc(
        9,
        Desc {
            addr: HDR,
            len: 16,
            flags: F_NEXT,
            next: 9,
        },
    );
    ring.publish(9);
    r.dev.process_queue();
    r.dev.settle();

    // No writable byte for the status.
    r.header(T_FLUSH, 0);
    submit(&mut r, &mut ring, 10, &[(HDR, 16, false)]);

    // A head index outside the ring: refused as a request, and the used ring cannot name
    // it, so the device fails the ring.
    ring.publish(200);
    r.dev.process_queue();
    r.dev.settle();
    assert_eq!(r.counter(|c| &c.refused), 6);
    assert!(
        r.dev.common().needs_reset(),
        "a bad head must fail the ring"
    );
    assert_eq!(r.counter(|c| &c.needs_reset), 1);
    assert_eq!(r.irq.config_interrupts(), 1, "the driver is told");
    // While it needs a reset, notifications are not served.
    r.dev.process_queue();
    assert_eq!(r.counter(|c| &c.spurious_notifies), 1);
}

#[test]
fn a_runaway_available_index_needs_a_reset_and_reset_recovers() {
    let mut r = rig(16, false);
    let mem = r.mem.clone();
    let ring = DriverRing::new(&mem, RING, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);
    ring.set_avail_idx(1000);
    r.dev.process_queue();
    r.dev.settle();
    assert!(r.dev.common().needs_reset());
    r.dev.reset();
    assert!(!r.dev.common().needs_reset());
    let mut ring = DriverRing::new(&mem, 0x60000, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);
    r.header(T_FLUSH, 0);
    submit(&mut r, &mut ring, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(r.status(), S_OK);
}

#[test]
fn read_only_disks_refuse_writes_and_discards() {
    let mut r = rig(16, true);
    let f = r.dev.avail_features();
    assert_ne!(f & (1 << vb::VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & (1 << vb::VIRTIO_BLK_F_DISCARD | 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
    let mem = r.mem.clone();
    let mut ring = DriverRing::new(&mem, RING, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);
    r.header(T_OUT, 0);
    submit(
        &mut r,
        &mut ring,
        0,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_IOERR);
    r.header(T_IN, 0);
    submit(
        &mut r,
        &mut ring,
        3,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert_eq!(r.status(), S_OK);
}

#[test]
fn notifications_before_activation_are_counted_not_served() {
    let mut r = rig(16, false);
    r.dev.process_queue();
    r.dev.settle();
    assert_eq!(r.counter(|c| &c.spurious_notifies), 1);
}

#[test]
fn config_layout() {
    let r = rig(2048, false);
    let mut b = [0u8; 8];
    r.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 2048);
    let mut w = [0u8; 4];
    r.dev.read_config(12, &mut w);
    assert_eq!(u32::from_le_bytes(w), 254, "seg_max");
    r.dev.read_config(20, &mut w);
    assert_eq!(u32::from_le_bytes(w), 512, "blk_size");
    r.dev.read_config(40, &mut w);
    assert_eq!(u32::from_le_bytes(w), 1, "max_discard_seg");
    let mut tail = [0xffu8; 8];
    r.dev.read_config(58, &mut tail);
    assert_eq!(tail, [0; 8]);
    let mut unmap = [0u8];
    r.dev.read_config(56, &mut unmap);
    assert_eq!(unmap[0], 1, "write_zeroes_may_unmap");
}

#[test]
fn state_round_trips_and_the_restored_device_continues_the_ring() {
    let mut r = rig(64, false);
    let mem = r.mem.clone();
    let mut ring = DriverRing::new(&mem, RING, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);
    r.mem.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
    r.header(T_OUT, 1);
    submit(
        &mut r,
        &mut ring,
        0,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    // A request left in the ring when the VM is paused is served after the restore.
    r.header(T_IN, 1);
    ring.push_chain(3, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    r.mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
    r.dev.quiesce();
    let saved = r.dev.save();
    assert_eq!(saved.virtio.queues[0].next_avail, 1);
    assert_eq!(saved.capacity, 64 * 512);
    let json = serde_json::to_string(&saved).unwrap();
    let back: BlockState = serde_json::from_str(&json).unwrap();

    let mut dev2 = Block::restore(&back).unwrap();
    // Restored inactive: its transport's restore activates it again.
    assert_eq!(dev2.save().virtio.queues, saved.virtio.queues);
    assert_eq!(dev2.save().disk, saved.disk);
    dev2.activate(restored_context(&mem, &r.irq)).unwrap();
    assert!(dev2.save().virtio.activated);
    // A restore's activation serves nothing and notifies nothing (it comes before the VMM's
    // jail and the interrupt controllers' state): the VMM notifies the queue after both, and
    // the device's event loop serves the queued read.
    assert_eq!(ring.used_idx(), 1, "served at a restore's activation");
    assert!(
        dev2.queue_events()[0].read().is_err(),
        "notified at a restore's activation"
    );
    dev2.queue_events()[0].write(1).unwrap();
    dev2.process_queue();
    assert_eq!(ring.used_idx(), 2, "the queued read was not served");
    assert_eq!(ring.used_entry(1), (3, 513));
    let mut back = [0u8; 512];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [7u8; 512]);

    // A disk that changed size is refused.
    r.file().set_len(32 * 512).unwrap();
    assert!(Block::restore(&saved).is_err());
}

/// A backend that completes at once and, as it hands each completion back, plays a driver
/// that queues the next request straight away (re-publishing the same chain), `left` times.
struct EagerGuest {
    inner: crate::block::Immediate<crate::block::raw::RawFile>,
    mem: GuestMemoryMmap,
    avail: GuestAddress,
    size: u16,
    left: u64,
}

impl DiskBackend for EagerGuest {
    fn engine(&self) -> &'static str {
        "eager-guest"
    }
    fn info(&self) -> crate::block::DiskInfo {
        self.inner.info()
    }
    fn submit(
        &mut self,
        mem: &GuestMemoryMmap,
        req: crate::block::BlockRequest,
        user_data: u64,
    ) -> Result<(), crate::block::BlockError> {
        self.inner.submit(mem, req, user_data)
    }
    fn kick(&mut self) -> std::io::Result<()> {
        self.inner.kick()
    }
    fn reap(&mut self, out: &mut Vec<crate::block::Completion>) {
        let before = out.len();
        self.inner.reap(out);
        for _ in before..out.len() {
            if self.left == 0 {
                break;
            }
            self.left -= 1;
            let idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
            let slot = 4 + 2 * u64::from(idx % self.size);
            self.mem
                .write_obj(0u16, self.avail.unchecked_add(slot))
                .unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), self.avail.unchecked_add(2))
                .unwrap();
        }
    }
    fn notifier(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.inner.notifier()
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn drain(&mut self, out: &mut Vec<crate::block::Completion>) {
        self.inner.drain(out)
    }
}

#[test]
fn a_driver_as_fast_as_the_disk_is_served_in_rounds_not_by_recursion() {
    // On a page-cache-hot image the guest re-queues as fast as requests complete; when
    // submitting and completing called each other, 100 000 requests overflowed the virtio
    // thread's stack. Here that driver is the backend itself, on a thread with a small stack.
    const REQUESTS: u64 = 50_000;
    let path = image(64);
    let cfg = DiskConfig {
        path: path.clone(),
        ..Default::default()
    };
    let mem = test_memory(4);
    let ring_mem = mem.clone();
    let served = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut ring = DriverRing::new(&ring_mem, RING, 16);
            let file = File::options()
                .read(true)
                .write(true)
                .open(&cfg.path)
                .unwrap();
            let info = crate::block::DiskInfo {
                capacity: 64 * 512,
                read_only: false,
                discard: false,
                write_zeroes: false,
            };
            let backend = EagerGuest {
                inner: crate::block::Immediate::wrap(crate::block::raw::RawFile::new(file, info))
                    .unwrap(),
                mem: ring_mem.clone(),
                avail: ring.avail_addr(),
                size: 16,
                left: REQUESTS,
            };
            let mut dev = Block::with_backend(&cfg, Box::new(backend)).unwrap();
            let irq = TestInterrupt::new();
            activate(&mut dev, &ring, &ring_mem, &irq);
            ring_mem.write_obj(T_IN, GuestAddress(HDR)).unwrap();
            ring_mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            ring_mem.write_obj(1u64, GuestAddress(HDR + 8)).unwrap();
            ring.push_chain(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
            dev.process_queue();
            // A turn ends after 1 ms with the queue's eventfd written: the event loop's part.
            let mut turns = 1;
            while dev.common.queue_evts[0].read().is_ok() {
                dev.process_queue();
                turns += 1;
            }
            dev.settle();
            assert!(turns > 1, "50 000 requests in one turn");
            // Served to the end, with the driver's kicks back on.
            assert_eq!(ring.used_flags() & 1, 0, "VIRTQ_USED_F_NO_NOTIFY left set");
            dev.counters().requests.load(Ordering::Relaxed)
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(served, REQUESTS + 1);
    std::fs::remove_file(&path).ok();
}

#[test]
fn a_rate_limit_holds_requests_in_the_ring_until_it_allows_them() {
    use crate::rate_limiter::{LimitedPath, RateLimitConfig, TokenBucketConfig};
    let mut r = rig(64, false);
    let mem = r.mem.clone();
    let mut ring = DriverRing::new(&mem, RING, 16);
    activate(&mut r.dev, &ring, &mem, &r.irq);
    // Two requests per hour.
    let slow = RateLimitConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 2,
            one_time_burst: 0,
            refill_time_ms: 3_600_000,
        }),
    };
    r.dev.set_rate_limit(LimitedPath::Disk, slow).unwrap();
    assert!(r.dev.set_rate_limit(LimitedPath::Rx, slow).is_err());
    r.header(T_FLUSH, 0);
    for i in 0..6u16 {
        ring.push_chain(i * 2, &[(HDR, 16, false), (STATUS, 1, true)]);
    }
    r.dev.process_queue();
    r.dev.settle();
    // The bucket's two, and one more into debt; the rest wait in the available ring.
    assert_eq!(ring.used_idx(), 3);
    assert_eq!(r.counter(|c| &c.throttled), 1);
    // Notifications while blocked serve nothing and do not spin.
    r.dev.process_queue();
    assert_eq!(ring.used_idx(), 3);
    // Lifting the limit wakes the device through its timer; the rest are served in order.
    r.dev
        .set_rate_limit(LimitedPath::Disk, RateLimitConfig::default())
        .unwrap();
    r.dev.on_rate_limit_timer();
    r.dev.settle();
    assert_eq!(ring.used_idx(), 6);
    assert_eq!(r.counter(|c| &c.requests), 6);
    assert_eq!(r.dev.save().disk.rate_limit, None);
}
