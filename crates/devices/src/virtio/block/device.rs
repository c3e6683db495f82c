//! The virtio-blk device: requests parsed by [`super::request`], carried out by a
//! [`DiskBackend`], answered on the used ring as their completions come back. The device owns
//! the virtio side (status bytes, used lengths, counters); the backend only moves data.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::request::{Limits, Refused, Request, RequestType, Status};
use crate::block::{
    dirty::DirtyMap, open_disk, BlockError, BlockOp, BlockRequest, Completion, DiskBackend,
    DiskConfig, DiskInfo, SECTOR, SERIAL_MAX,
};
use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::{LimitedPath, RateLimitConfig, RateLimiter};
use crate::virtio::{
    read_config_bytes, ActivateError, ActivationContext, Counters, PersistError, Round,
    VirtioCommon, VirtioDevice, VirtioState, POLL, TURN,
};

/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The configuration space we fill in (the start of `struct virtio_blk_config`, up to and
/// including write_zeroes_may_unmap).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct ConfigSpace {
    capacity: u64,
    size_max: u32,
    seg_max: u32,
    geometry: [u8; 4],
    blk_size: u32,
    topology: [u8; 8],
    writeback: u8,
    unused0: u8,
    num_queues: u16,
    max_discard_sectors: u32,
    max_discard_seg: u32,
    discard_sector_alignment: u32,
    max_write_zeroes_sectors: u32,
    max_write_zeroes_seg: u32,
    write_zeroes_may_unmap: u8,
    unused1: [u8; 3],
}

// SAFETY: a packed struct of plain integers and byte arrays: no padding, every byte pattern is
// a valid value.
unsafe impl ByteValued for ConfigSpace {}

impl ConfigSpace {
    fn new(sectors: u64) -> Self {
        Self {
            capacity: sectors.to_le(),
            seg_max: u32::from(QUEUE_SIZE - 2).to_le(),
            blk_size: (SECTOR as u32).to_le(),
            num_queues: 1u16.to_le(),
            max_discard_sectors: (u32::MAX >> 9).to_le(),
            max_discard_seg: 1u32.to_le(),
            // 4 KiB.
            discard_sector_alignment: 8u32.to_le(),
            max_write_zeroes_sectors: (u32::MAX >> 9).to_le(),
            max_write_zeroes_seg: 1u32.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }
}

/// A request in the backend's hands.
struct Pending {
    head: u16,
    status: GuestAddress,
    op: BlockOp,
    /// The bytes it covers (marked dirty again when it completes).
    offset: u64,
    len: u64,
}

/// The unit a disk copy tracks and re-sends: 64 KiB, qcow2's default cluster; a guest's 4 KiB
/// write costs 64 KiB again, a 16 MiB disk's map is 32 words.
const COPY_BLOCK: u64 = 64 << 10;

/// A virtio-blk device.
pub struct Block {
    pub(super) common: VirtioCommon,
    disk: DiskConfig,
    info: DiskInfo,
    serial: [u8; SERIAL_MAX],
    config: ConfigSpace,
    pub(super) backend: Box<dyn DiskBackend>,
    pending: HashMap<u64, Pending>,
    next_tag: u64,
    done: Vec<Completion>,
    dirty: Option<std::sync::Arc<DirtyMap>>,
    pub(super) limiter: RateLimiter,
}

/// What a virtio-blk saves: its queue and the identity of its disk (the disk's contents are
/// not part of a device's state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The virtio part.
    pub virtio: VirtioState,
    /// The disk as attached.
    pub disk: DiskConfig,
    /// Its size in bytes when saved (a restore onto a disk of another size is refused).
    pub capacity: u64,
}

impl Block {
    /// Opens the disk and builds the device around it.
    pub fn new(cfg: &DiskConfig) -> Result<Self, BlockError> {
        Self::with_backend(cfg, open_disk(cfg)?)
    }

    /// Builds the device around an opened backend.
    pub fn with_backend(
        cfg: &DiskConfig,
        backend: Box<dyn DiskBackend>,
    ) -> Result<Self, BlockError> {
        let info = backend.info();
        let mut features = bit(vb::VIRTIO_BLK_F_SEG_MAX)
            | bit(vb::VIRTIO_BLK_F_BLK_SIZE)
            | bit(vb::VIRTIO_BLK_F_FLUSH);
        if info.read_only {
            features |= bit(vb::VIRTIO_BLK_F_RO);
        }
        if info.discard {
            features |= bit(vb::VIRTIO_BLK_F_DISCARD);
        }
        if info.write_zeroes {
            features |= bit(vb::VIRTIO_BLK_F_WRITE_ZEROES);
        }
        Ok(Self {
            common: VirtioCommon::new(VIRTIO_ID_BLOCK, "block", features, &[QUEUE_SIZE])
                .map_err(BlockError::EventFd)?,
            disk: cfg.clone(),
            info,
            serial: cfg.serial_bytes(),
            config: ConfigSpace::new(info.capacity / SECTOR),
            backend,
            pending: HashMap::new(),
            next_tag: 0,
            done: Vec::new(),
            dirty: None,
            limiter: RateLimiter::new(cfg.rate_limit.unwrap_or_default())
                .map_err(BlockError::EventFd)?,
        })
    }

    /// The device's state. Nothing may be in flight: [`VirtioDevice::quiesce`] first.
    pub fn save(&self) -> BlockState {
        debug_assert!(self.pending.is_empty(), "saved with requests in flight");
        BlockState {
            virtio: self.common.save(),
            disk: self.disk.clone(),
            capacity: self.info.capacity,
        }
    }

    /// A device in `state` on its disk, opened again (activated by its transport's restore).
    pub fn restore(state: &BlockState) -> Result<Self, PersistError> {
        let mut d = Self::new(&state.disk).map_err(|e| PersistError::Backend(e.to_string()))?;
        d.restore_state(state)?;
        Ok(d)
    }

    /// Puts `state` on this device, made afresh on the disk the state names (which must be
    /// as big as it was).
    pub fn restore_state(&mut self, state: &BlockState) -> Result<(), PersistError> {
        if self.info.capacity != state.capacity {
            return Err(PersistError::Backend(format!(
                "{} is {} bytes, it was {} when saved",
                state.disk.path.display(),
                self.info.capacity,
                state.capacity
            )));
        }
        self.common.restore(&state.virtio)
    }

    /// Records, from now on, every block a guest request changes in `map` (a disk copy while
    /// the guest runs); `None` stops recording.
    pub fn track_writes(&mut self, map: Option<std::sync::Arc<DirtyMap>>) {
        self.dirty = map;
    }

    /// Takes every request the driver made available (within the in-flight budget) and
    /// starts it. A corrupt ring marks the device DEVICE_NEEDS_RESET.
    pub fn process_queue(&mut self) {
        self.process(true);
    }

    /// Submits what the ring holds and answers what completes at once, round after round
    /// while completions make room for requests still waiting in the ring. A loop, not
    /// recursion: with a page-cache-hot image io_uring completes as fast as the guest queues,
    /// and the rounds of a 100 000-request run overflowed the virtio thread's 2 MiB stack
    /// when submit and completion called each other.
    ///
    /// While it works, the driver's kicks are off ([`crate::virtio::Serving::quiet`]). Once
    /// every request is answered (a page-cache-hot image: each answered as it was taken), it
    /// watches the available ring for [`POLL`] before it sleeps, as an iothread of QEMU polls
    /// (up to 32 µs by default): a driver at queue depth refills within microseconds of the
    /// answers it sees, and catching that spares it a kick (an exit) and this thread a
    /// wake-up. At queue depth 32 from the test guest, the thread slept and woke 9,300 times
    /// a second here and was idle 37 % of the time. With requests in flight it sleeps at once
    /// (their completions wake it, and a spin would only delay their answers). One turn holds
    /// the thread at most [`TURN`] ([`crate::virtio::Serving::next_round`]).
    fn process(&mut self, notified: bool) {
        let turn = std::time::Instant::now();
        let mut notified = notified;
        loop {
            if let Some(mut s) = self.common.serving_quiet() {
                s.quiet(0);
            }
            // Rounds while completions make room, within the turn (a guest that refills as
            // fast as the page cache answers would otherwise keep this loop going).
            while self.submit_available(notified)
                && self.answer_completed()
                && turn.elapsed() < TURN
            {
                notified = false;
            }
            notified = false;
            // The limiter's timer brings it back; so do completions, with the ring's slots
            // all in flight.
            if self.limiter.waiting() || self.pending.len() >= usize::from(QUEUE_SIZE) {
                return;
            }
            let spin = if self.pending.is_empty() {
                POLL
            } else {
                std::time::Duration::ZERO
            };
            let Some(mut s) = self.common.serving_quiet() else {
                return;
            };
            match s.next_round(0, turn, spin) {
                Round::Now => {}
                Round::Later => {
                    let _ = self.common.queue_evts[0].write(1);
                    return;
                }
                Round::Done => return,
            }
        }
    }

    /// Starts every request the driver made available, within the in-flight budget; answers
    /// the ones that need no backend or that it refuses. Returns whether any was submitted.
    fn submit_available(&mut self, notified: bool) -> bool {
        let Self {
            common,
            info,
            serial,
            backend,
            pending,
            next_tag,
            dirty,
            limiter,
            ..
        } = self;
        let Some(mut s) = common.serving_for(notified) else {
            return false;
        };
        // Never more requests in flight than the ring has slots: the rest stay in the
        // available ring until completions make room (completions come back here).
        let budget = usize::from(QUEUE_SIZE).saturating_sub(pending.len());
        if budget == 0 {
            return false;
        }
        let mem = s.mem;
        let limits = Limits {
            capacity: info.capacity,
            read_only: info.read_only,
        };
        let mut used = Vec::new();
        let mut submitted = false;
        // Under a rate limit, chains are taken one at a time and the limiter asked before
        // each: a request it holds back stays in the ring (the full ring back-pressures the
        // driver) until its timer says the budget allows more. Unlimited, they come in one
        // batch.
        let batch = if limiter.limits() { 1 } else { budget };
        let mut left = budget;
        while left > 0 && !limiter.blocked_counting(&s.counters.throttled) {
            let Some(chains) = s.chains(0, batch.min(left)) else {
                break;
            };
            if chains.is_empty() {
                break;
            }
            left -= chains.len();
            for chain in chains {
                let head = chain.head_index();
                let req = match Request::parse(&chain, mem, limits) {
                    Ok(r) => r,
                    Err(Refused { error, status }) => {
                        Counters::inc(&s.counters.refused);
                        tracing::debug!("virtio-blk: refused a request: {error}");
                        used.push((head, answer(mem, status, error.status(), 0)));
                        continue;
                    }
                };
                let Some((op, offset, len)) = req.op else {
                    // GET_ID: answered here, the backend has no part in it.
                    debug_assert_eq!(req.kind, RequestType::GetId);
                    let mut n = 0;
                    for (addr, l) in &req.data {
                        let l = *l as usize;
                        if mem.write_slice(&serial[n..n + l], *addr).is_err() {
                            break;
                        }
                        n += l;
                    }
                    Counters::inc(&s.counters.requests);
                    used.push((head, answer(mem, Some(req.status), Status::Ok, n as u32)));
                    continue;
                };
                limiter.consume(if matches!(op, BlockOp::Read | BlockOp::Write) {
                    len
                } else {
                    0
                });
                let tag = *next_tag;
                *next_tag = next_tag.wrapping_add(1);
                if let (Some(map), false) =
                    (dirty.as_ref(), matches!(op, BlockOp::Read | BlockOp::Flush))
                {
                    map.mark(offset, len);
                }
                let breq = BlockRequest {
                    op,
                    offset,
                    len,
                    segments: req.data,
                };
                match backend.submit(mem, breq, tag) {
                    Ok(()) => {
                        pending.insert(
                            tag,
                            Pending {
                                head,
                                status: req.status,
                                op,
                                offset,
                                len,
                            },
                        );
                        submitted = true;
                    }
                    Err(e) => {
                        tracing::warn!("virtio-blk: {e}");
                        Counters::inc(&s.counters.io_errors);
                        used.push((head, answer(mem, Some(req.status), Status::IoErr, 0)));
                    }
                }
            }
        }
        if submitted {
            if let Err(e) = backend.kick() {
                tracing::debug!("virtio-blk: the backend's submit failed: {e}");
            }
        }
        s.complete(0, &used);
        submitted
    }

    /// The rate limiter's timer fired: take requests again.
    pub fn on_rate_limit_timer(&mut self) {
        self.limiter.on_timer();
        self.process(false);
    }

    /// Answers the requests the backend finished, then starts requests that were waiting in
    /// the ring for room.
    pub fn complete(&mut self) {
        if self.answer_completed() {
            self.process(false);
        }
    }

    /// Answers the requests the backend finished. Returns whether any was answered with room
    /// now free for requests left in the available ring.
    fn answer_completed(&mut self) -> bool {
        self.backend.reap(&mut self.done);
        if self.done.is_empty() {
            return false;
        }
        let done = std::mem::take(&mut self.done);
        // Marked again now that they are in the image: a copier that took a mark and read the
        // block while the request was in flight may have read the old bytes.
        if let Some(map) = &self.dirty {
            for p in done.iter().filter_map(|c| self.pending.get(&c.user_data)) {
                if !matches!(p.op, BlockOp::Read | BlockOp::Flush) {
                    map.mark(p.offset, p.len);
                }
            }
        }
        let Some(mut s) = self.common.serving_quiet() else {
            // Reset meanwhile: nothing to return (the reset drained the backend).
            for c in done {
                self.pending.remove(&c.user_data);
            }
            return false;
        };
        let mem = s.mem;
        let mut used = Vec::with_capacity(done.len());
        for c in &done {
            let Some(p) = self.pending.remove(&c.user_data) else {
                continue;
            };
            let (status, len) = match &c.result {
                Ok(bytes) => {
                    Counters::inc(&s.counters.requests);
                    match p.op {
                        // What the guest's buffers received (the backend filled them; one that
                        // bypasses vm-memory marks them dirty itself).
                        BlockOp::Read => {
                            Counters::add(&s.counters.read_bytes, *bytes);
                            (Status::Ok, *bytes as u32)
                        }
                        BlockOp::Write => {
                            Counters::add(&s.counters.written_bytes, *bytes);
                            (Status::Ok, 0)
                        }
                        _ => (Status::Ok, 0),
                    }
                }
                Err(e) => {
                    tracing::warn!("virtio-blk: I/O error: {e}");
                    Counters::inc(&s.counters.io_errors);
                    (Status::IoErr, 0)
                }
            };
            used.push((p.head, answer(mem, Some(p.status), status, len)));
        }
        s.complete(0, &used);
        // Requests left in the available ring while the in-flight budget was used up.
        !used.is_empty() && self.pending.len() < usize::from(QUEUE_SIZE)
    }

    /// Waits until no request is in flight, answering each (a reset, a snapshot, tests).
    pub fn settle(&mut self) {
        while !self.pending.is_empty() {
            self.backend.drain(&mut self.done);
            let before = self.pending.len();
            self.complete();
            if self.pending.len() == before && self.done.is_empty() {
                break;
            }
        }
    }

    /// The backend's completion eventfd (the event loop watches it).
    pub fn completion_fd(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.backend.notifier()
    }
}

/// Writes `status` to the driver's status byte (if it has one in memory); returns the bytes
/// to report on the used ring: `data` plus the status byte, or 0 if it could not be written.
fn answer(
    mem: &GuestMemoryMmap,
    status_at: Option<GuestAddress>,
    status: Status,
    data: u32,
) -> u32 {
    match status_at {
        Some(a) if mem.write_obj(status.byte(), a).is_ok() => data + 1,
        _ => 0,
    }
}

impl VirtioDevice for Block {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config.as_slice(), offset, data);
    }
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        let restored = ctx.restored;
        self.common.activate(ctx)?;
        // Requests the driver queued before DRIVER_OK are left to the device's event loop, as
        // if notified. A restored device serves nothing until the VMM notifies it (see
        // `ActivationContext::restored`): a write a migrated guest had queued once ran here
        // as root, and started an io_uring worker thread that kept the jail from being
        // entered.
        if !restored {
            self.common.notify_queues();
        }
        Ok(())
    }
    fn reset(&mut self) {
        // The kernel must be done with the driver's buffers before the driver reuses them.
        self.backend.drain(&mut self.done);
        self.done.clear();
        // What was in flight is in the image now: a disk copy sends it again.
        if let Some(map) = &self.dirty {
            for p in self.pending.values() {
                if !matches!(p.op, BlockOp::Read | BlockOp::Flush) {
                    map.mark(p.offset, p.len);
                }
            }
        }
        self.pending.clear();
        self.common.reset();
    }
    fn quiesce(&mut self) {
        self.settle();
    }
    fn save_state(&self) -> Option<crate::virtio::DeviceSnapshot> {
        Some(crate::virtio::DeviceSnapshot::Block(self.save()))
    }
    fn link(&self) -> Option<std::sync::Arc<crate::block::LinkState>> {
        self.backend.link()
    }
    fn start_disk_copy(&mut self) -> Option<std::io::Result<crate::virtio::DiskCopy>> {
        if self.info.read_only {
            return None;
        }
        let source = match self.backend.copy_source()? {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        let dirty = std::sync::Arc::new(DirtyMap::new(self.info.capacity, COPY_BLOCK));
        self.track_writes(Some(dirty.clone()));
        Some(Ok(crate::virtio::DiskCopy {
            source,
            capacity: self.info.capacity,
            dirty,
        }))
    }
    fn stop_disk_copy(&mut self) {
        self.track_writes(None);
    }
    fn set_rate_limit(&mut self, path: LimitedPath, limit: RateLimitConfig) -> Result<(), String> {
        if path != LimitedPath::Disk {
            return Err(format!("a disk has no {path:?} rate limit"));
        }
        limit
            .check()
            .map_err(|(f, m)| format!("rate_limit.{f}: {m}"))?;
        self.limiter.update(limit);
        self.disk.rate_limit = (!limit.is_empty()).then_some(limit);
        Ok(())
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // The kernel must not write into guest memory after the device (and the VM) is gone.
        self.backend.drain(&mut self.done);
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk)
            .field("in_flight", &self.pending.len())
            .finish()
    }
}
