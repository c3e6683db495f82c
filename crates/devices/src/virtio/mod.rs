//! virtio 1.x devices, independent of the transport that carries them.
//!
//! One contract for every device ([`VirtioDevice`]): each owns its queues and their
//! notification eventfds from the moment it is made, keeps what every device keeps in one
//! [`VirtioCommon`] (counters, the NEEDS_RESET flag, one [`DeviceState`]), and is activated
//! with an [`ActivationContext`]: guest memory, the interrupt line of whatever transport
//! carries it ([`transport::VirtioInterrupt`]) and the features the driver accepted. The
//! transport ([`transport::mmio`] today, virtio-pci later) holds register state only.
//!
//! A device is shared between two threads: the vCPU thread drives its registers through the
//! transport (feature negotiation, queue set-up, status, reset), and the virtio event loop
//! thread runs its queues when the guest's notifications arrive on ioeventfds. Guest-controlled
//! input never panics the VMM: bad requests are refused and counted, and a device whose rings
//! are corrupt marks itself DEVICE_NEEDS_RESET and stops until the driver resets it.
//!
//! Every device and the transport save and restore their state ([`VirtioState`], built on
//! virtio-queue's `QueueState`), so a snapshot can take a device out of one VMM and put it back
//! in another.

pub mod block;
pub mod net;
#[cfg(any(test, feature = "fuzzing"))]
pub mod ring;
pub mod rng;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
pub mod transport;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1 as F_VERSION_1;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;
use transport::{VirtioInterrupt, VirtioInterruptType};

/// VIRTIO_F_VERSION_1: the only transport generation we speak.
pub const VIRTIO_F_VERSION_1: u64 = 1 << F_VERSION_1;

/// Device status bits (virtio 1.2 §2.1), from virtio-bindings.
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Counters every device keeps; exported in the VM outcome, on the control socket and as
/// metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests completed successfully.
    pub requests: AtomicU64,
    /// Requests refused because they were malformed or out of bounds.
    pub refused: AtomicU64,
    /// Requests that failed in the backend (I/O errors).
    pub io_errors: AtomicU64,
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub written_bytes: AtomicU64,
    /// Queue notifications that arrived before DRIVER_OK or after a failure.
    pub spurious_notifies: AtomicU64,
    /// Times the device marked itself DEVICE_NEEDS_RESET.
    pub needs_reset: AtomicU64,
    /// Times a driver brought the device up (DRIVER_OK accepted).
    pub activations: AtomicU64,
    /// Times a rate limiter held the device back (it then waited on its timer).
    pub throttled: AtomicU64,
}

impl Counters {
    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// A snapshot of a device's counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Device kind.
    pub kind: String,
    /// MMIO slot.
    pub slot: u32,
    /// Requests completed.
    pub requests: u64,
    /// Requests refused.
    pub refused: u64,
    /// Backend I/O errors.
    pub io_errors: u64,
    /// Bytes the guest read.
    pub read_bytes: u64,
    /// Bytes the guest wrote.
    pub written_bytes: u64,
    /// Notifications before DRIVER_OK.
    pub spurious_notifies: u64,
    /// Times the device needed a reset.
    pub needs_reset: u64,
    /// Times a driver brought the device up.
    pub activations: u64,
    /// Times a rate limiter held the device back.
    #[serde(default)]
    pub throttled: u64,
    /// For a remote disk: its connection, `up`, `reconnecting` or `failing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl DeviceReport {
    /// Snapshot of `c`.
    pub fn new(kind: &str, slot: u32, c: &Counters) -> Self {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Self {
            kind: kind.to_owned(),
            slot,
            requests: g(&c.requests),
            refused: g(&c.refused),
            io_errors: g(&c.io_errors),
            read_bytes: g(&c.read_bytes),
            written_bytes: g(&c.written_bytes),
            spurious_notifies: g(&c.spurious_notifies),
            needs_reset: g(&c.needs_reset),
            activations: g(&c.activations),
            throttled: g(&c.throttled),
            link: None,
        }
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not make a queue ready.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// The device's backend refused (a TAP that cannot take the offloads, ...).
    #[error("{0}")]
    Backend(String),
}

/// What a device needs to start serving its queues, handed over by the transport at DRIVER_OK
/// (or at restore).
#[derive(Clone)]
pub struct ActivationContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The transport's interrupt line.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Activated by a restore (snapshot, live upgrade, migration), not by the driver: the
    /// device serves nothing and raises no interrupt at activation. A restore activates
    /// devices before the VMM enters its jail and before the VM's interrupt controllers hold
    /// their saved state, so a request served then would run as root and an interrupt raised
    /// then could be overwritten; the VMM notifies every queue once both are done
    /// (`notify_restored`).
    pub restored: bool,
}

/// Whether a device runs: one shape for every device.
pub enum DeviceState {
    /// Not activated (after creation, and after a driver reset).
    Inactive,
    /// Activated by the driver.
    Active(ActivationContext),
}

/// What every virtio device has: its identity, its queues with their notification eventfds,
/// its counters, the NEEDS_RESET flag the transport reports, and whether it runs.
pub struct VirtioCommon {
    device_type: u32,
    kind: &'static str,
    avail_features: u64,
    /// The queues, owned by the device. The transport sets them up through the device while
    /// the driver configures them; the device serves them once active.
    pub queues: Vec<Queue>,
    /// The notification eventfd of each queue (ioeventfds on a VMM).
    pub queue_evts: Vec<EventFd>,
    counters: Arc<Counters>,
    needs_reset: Arc<AtomicBool>,
    /// Set when the VM's state has been saved to go on elsewhere: the device touches neither
    /// guest memory nor its backend again (what the guest queued is the restored VM's to do).
    frozen: Arc<AtomicBool>,
    state: DeviceState,
}

impl VirtioCommon {
    /// A device of `device_type` (virtio-bindings' `VIRTIO_ID_*`) offering `avail_features`
    /// (VIRTIO_F_VERSION_1 is added), with one queue of each maximum size.
    pub fn new(
        device_type: u32,
        kind: &'static str,
        avail_features: u64,
        queue_sizes: &[u16],
    ) -> std::io::Result<Self> {
        let queues = queue_sizes
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| std::io::Error::other(e.to_string())))
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            device_type,
            kind,
            avail_features: avail_features | VIRTIO_F_VERSION_1,
            queues,
            queue_evts: queue_sizes
                .iter()
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<std::io::Result<_>>()?,
            counters: Arc::new(Counters::default()),
            needs_reset: Arc::new(AtomicBool::new(false)),
            frozen: Arc::new(AtomicBool::new(false)),
            state: DeviceState::Inactive,
        })
    }

    /// Starts the device: every queue must be ready.
    pub fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if let Some(i) = self.queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        self.state = DeviceState::Active(ctx);
        Ok(())
    }

    /// Notifies every queue, as the guest's kick would: activation leaves requests the driver
    /// queued before DRIVER_OK to the device's event loop rather than serving them on the
    /// vCPU thread that wrote the status.
    pub fn notify_queues(&self) {
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
    }

    /// Stops the device and forgets the driver's queue set-up (driver reset).
    pub fn reset(&mut self) {
        self.state = DeviceState::Inactive;
        for q in &mut self.queues {
            q.reset();
        }
        self.needs_reset.store(false, Ordering::Release);
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        matches!(self.state, DeviceState::Active(_))
    }

    /// The activation context, while active.
    pub fn context(&self) -> Option<&ActivationContext> {
        match &self.state {
            DeviceState::Active(ctx) => Some(ctx),
            DeviceState::Inactive => None,
        }
    }

    /// Whether the device stopped itself until the driver resets it.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// What a queue notification may work with: `None` (and the notification counted as
    /// spurious) unless the device is active and not broken.
    pub fn serving(&mut self) -> Option<Serving<'_>> {
        if self.needs_reset() || !self.is_active() {
            Counters::inc(&self.counters.spurious_notifies);
            return None;
        }
        self.serving_quiet()
    }

    /// [`Self::serving`] if the guest `notified` the device, [`Self::serving_quiet`] if the
    /// device started the work itself.
    pub fn serving_for(&mut self, notified: bool) -> Option<Serving<'_>> {
        if notified {
            self.serving()
        } else {
            self.serving_quiet()
        }
    }

    /// [`Self::serving`] without counting a missed call as a spurious notification (for work the
    /// device starts itself: completions, retries).
    pub fn serving_quiet(&mut self) -> Option<Serving<'_>> {
        let Self {
            queues,
            counters,
            needs_reset,
            frozen,
            state: DeviceState::Active(ctx),
            ..
        } = self
        else {
            return None;
        };
        if needs_reset.load(Ordering::Acquire) || frozen.load(Ordering::Acquire) {
            return None;
        }
        Some(Serving {
            queues,
            mem: &ctx.mem,
            interrupt: &*ctx.interrupt,
            counters,
            needs_reset,
        })
    }

    /// The device's state for a snapshot.
    pub fn save(&self) -> VirtioState {
        VirtioState {
            device_type: self.device_type,
            avail_features: self.avail_features,
            acked_features: self.context().map_or(0, |c| c.acked_features),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            activated: self.is_active(),
            needs_reset: self.needs_reset(),
        }
    }

    /// Puts the queues and flags of `state` back (the device stays inactive: the transport
    /// activates it again with a context once it is restored itself). Nothing changes if the
    /// state does not fit this device.
    pub fn restore(&mut self, state: &VirtioState) -> Result<(), PersistError> {
        if state.device_type != self.device_type {
            return Err(PersistError::Mismatch(format!(
                "a state of device type {} for a device of type {}",
                state.device_type, self.device_type
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(PersistError::Mismatch(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(PersistError::Mismatch(format!(
                "acked features {:#x} beyond the offered {:#x}",
                state.acked_features, self.avail_features
            )));
        }
        let queues = state
            .queues
            .iter()
            .zip(&self.queues)
            .enumerate()
            .map(|(i, (s, q))| {
                if s.max_size != q.max_size() {
                    return Err(PersistError::Mismatch(format!(
                        "queue {i}: maximum size {} saved, the device offers {}",
                        s.max_size,
                        q.max_size()
                    )));
                }
                // virtio-queue treats a saved state as untrusted and validates it here.
                Queue::try_from(QueueState::from(s))
                    .map_err(|e| PersistError::Mismatch(format!("queue {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.state = DeviceState::Inactive;
        self.needs_reset.store(state.needs_reset, Ordering::Release);
        Ok(())
    }
}

/// Marks a device DEVICE_NEEDS_RESET (once: counted, logged and told to the driver with a
/// configuration interrupt). The device and its transport both fail a device this one way.
pub(crate) fn needs_reset(
    flag: &AtomicBool,
    counters: &Counters,
    interrupt: &dyn VirtioInterrupt,
    why: &str,
) {
    if !flag.swap(true, Ordering::AcqRel) {
        tracing::debug!("virtio device failed: {why}: it needs a reset");
        Counters::inc(&counters.needs_reset);
        if let Err(e) = interrupt.trigger(VirtioInterruptType::Config) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }
}

/// A queue's ring is corrupt, and the device has been marked DEVICE_NEEDS_RESET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed;

/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: a driver without EVENT_IDX asks for no used-buffer interrupt.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether a driver without EVENT_IDX set `VIRTQ_AVAIL_F_NO_INTERRUPT` (read after the fence
/// `needs_notification` makes once the index is stored).
fn driver_polls(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    !queue.event_idx_enabled()
        && mem
            .load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Relaxed)
            .is_ok_and(|f| u16::from_le(f) & VIRTQ_AVAIL_F_NO_INTERRUPT != 0)
}

/// How long a queue whose driver streams is watched for more after a round
/// ([`Serving::next_round`]): a driver refills within microseconds of the used entries it
/// sees, while a wake-up by its kick costs tens here.
pub const POLL: std::time::Duration = std::time::Duration::from_micros(50);
/// The longest a queue keeps the virtio thread at once; the other devices and the VMM's
/// requests (a pause) then get theirs.
pub const TURN: std::time::Duration = std::time::Duration::from_millis(1);

/// What [`Serving::next_round`] says to do after a round on a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// More is available: serve it now (the driver's kicks are still off).
    Now,
    /// More is available but the turn is over: come back once the event loop has gone round
    /// (the caller writes the queue's eventfd; the kicks stay off).
    Later,
    /// Nothing more: the kicks are back on.
    Done,
}

/// What [`Serving::publish_used`] did.
enum Published {
    /// The entries are on the used ring; whether the driver wants an interrupt for them.
    Done { interrupt: bool },
    /// A head outside the ring: nothing of the batch was published.
    BadHead(u16),
}

/// An active device's queues with what serving them takes: memory, interrupt, counters.
pub struct Serving<'a> {
    /// The queues.
    pub queues: &'a mut [Queue],
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    interrupt: &'a dyn VirtioInterrupt,
    /// The device's counters.
    pub counters: &'a Counters,
    needs_reset: &'a AtomicBool,
}

impl<'a> Serving<'a> {
    /// Up to `budget` chains the driver made available on queue `q`. `None` if the ring is
    /// corrupt (an available index running past the ring): the device then needs a reset.
    pub fn chains(
        &mut self,
        q: usize,
        budget: usize,
    ) -> Option<Vec<DescriptorChain<&'a GuestMemoryMmap>>> {
        let mem: &'a GuestMemoryMmap = self.mem;
        match self.queues.get_mut(q)?.iter(mem) {
            Ok(it) => Some(it.take(budget).collect()),
            Err(e) => {
                self.fail(&format!("corrupt available ring of queue {q} ({e})"));
                None
            }
        }
    }

    /// Puts `used` (descriptor head, bytes written into the guest's buffers) on queue `q`'s
    /// used ring and interrupts the driver if it wants to be. A head the ring cannot name
    /// fails the device. Returns false if the device failed.
    ///
    /// The entries are written straight into the used ring and its index once for the batch
    /// ([`Self::publish_used`]): virtio-queue's `add_used` looks the ring up in guest memory,
    /// copies the entry and stores the index for each one, 7 % of a virtio-net thread that
    /// streams frames (perf, the test guest's `net-blast`). A ring that is not one aligned
    /// piece of guest memory takes that way.
    pub fn complete(&mut self, q: usize, used: &[(u16, u32)]) -> bool {
        if used.is_empty() {
            return true;
        }
        match self.publish_used(q, used) {
            Some(Published::Done { interrupt }) => {
                if interrupt {
                    self.signal(VirtioInterruptType::Queue(q as u16));
                }
                true
            }
            Some(Published::BadHead(head)) => {
                self.fail(&format!("cannot return descriptor {head} on queue {q}"));
                false
            }
            None => {
                for (head, len) in used {
                    if !self.add_used(q, *head, *len) {
                        return false;
                    }
                }
                self.notify(q);
                true
            }
        }
    }

    /// [`Self::complete`]'s used ring writes, when the ring is one piece of guest memory with
    /// its entries 4-aligned (as the specification requires): the entries, then the index
    /// (release: a driver that sees the index sees them), then whether the driver wants an
    /// interrupt for them: with EVENT_IDX, whether the batch passed its `used_event`; without,
    /// unless it set `VIRTQ_AVAIL_F_NO_INTERRUPT` (a polling driver: the specification says
    /// the device should not interrupt it). Both read after a full fence, so a driver that
    /// turned interrupts back on just before the index moved is interrupted. `None` before
    /// anything is written if the ring is not so laid out.
    fn publish_used(&mut self, q: usize, used: &[(u16, u32)]) -> Option<Published> {
        use std::num::Wrapping;
        use std::sync::atomic::{AtomicU16, AtomicU32};
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileMemory};
        let mem = self.mem;
        let queue = self.queues.get_mut(q)?;
        let size = queue.size();
        if size == 0 {
            return None;
        }
        // flags, idx, `size` entries of 8 bytes, avail_event.
        let ring = mem
            .get_slice(GuestAddress(queue.used_ring()), 6 + 8 * usize::from(size))
            .ok()?;
        // flags, idx, `size` entries of 2 bytes, used_event.
        let avail = mem
            .get_slice(GuestAddress(queue.avail_ring()), 6 + 2 * usize::from(size))
            .ok()?;
        let idx = ring.get_atomic_ref::<AtomicU16>(2).ok()?;
        let entry = |slot: u16| -> Option<(&AtomicU32, &AtomicU32)> {
            let off = 4 + 8 * usize::from(slot);
            Some((
                ring.get_atomic_ref::<AtomicU32>(off).ok()?,
                ring.get_atomic_ref::<AtomicU32>(off + 4).ok()?,
            ))
        };
        // What the driver's wishes are read from, every entry's place and every head, checked
        // before the first write: a `None` after it would have the fallback publish the batch
        // again.
        let used_event = avail
            .get_atomic_ref::<AtomicU16>(4 + 2 * usize::from(size))
            .ok()?;
        let flags = avail.get_atomic_ref::<AtomicU16>(0).ok()?;
        entry(0)?;
        entry(size - 1)?;
        if let Some(&(head, _)) = used.iter().find(|(head, _)| *head >= size) {
            return Some(Published::BadHead(head));
        }
        let old = Wrapping(queue.next_used());
        let mut at = old;
        for &(head, len) in used {
            let (id_at, len_at) = entry(at.0 % size)?;
            id_at.store(u32::from(head).to_le(), Ordering::Relaxed);
            len_at.store(len.to_le(), Ordering::Relaxed);
            // Stores through references are not in the dirty-page log by themselves.
            ring.bitmap()
                .mark_dirty(4 + 8 * usize::from(at.0 % size), 8);
            at += Wrapping(1);
        }
        queue.set_next_used(at.0);
        idx.store(at.0.to_le(), Ordering::Release);
        ring.bitmap().mark_dirty(2, 2);
        std::sync::atomic::fence(Ordering::SeqCst);
        let interrupt = if queue.event_idx_enabled() {
            // No queue mixes this with virtio-queue's `add_used` and `needs_notification`
            // (whose `num_added` this does not count): rx queues use those; tx, event and rng
            // queues this. EVENT_IDX is not offered yet.
            let event = used_event.load(Ordering::Relaxed);
            // The driver wants an interrupt once the index passes `used_event`: whether it
            // lies in old..at (as Linux's virtio_ring and virtio-queue reckon it).
            at - Wrapping(u16::from_le(event)) - Wrapping(1) < at - old
        } else {
            u16::from_le(flags.load(Ordering::Relaxed)) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        };
        Some(Published::Done { interrupt })
    }

    /// The next chain the driver made available on queue `q`, if any. `Err` if the ring is
    /// corrupt: the device has then been failed.
    pub fn next_chain(
        &mut self,
        q: usize,
    ) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, Failed> {
        let mem: &'a GuestMemoryMmap = self.mem;
        let Some(queue) = self.queues.get_mut(q) else {
            return Ok(None);
        };
        match queue.iter(mem) {
            Ok(mut it) => Ok(it.next()),
            Err(e) => {
                self.fail(&format!("corrupt available ring of queue {q} ({e})"));
                Err(Failed)
            }
        }
    }

    /// Interrupts the driver for queue `q`, unless it asked not to be (event index).
    pub fn notify(&mut self, q: usize) {
        let mem = self.mem;
        let Some(queue) = self.queues.get_mut(q) else {
            return;
        };
        if !matches!(queue.needs_notification(mem), Ok(false)) && !driver_polls(queue, mem) {
            self.signal(VirtioInterruptType::Queue(q as u16));
        }
    }

    /// Puts one chain on queue `q`'s used ring without interrupting the driver (the caller
    /// signals once for a batch). Returns false if the device failed.
    pub fn add_used(&mut self, q: usize, head: u16, len: u32) -> bool {
        let mem = self.mem;
        let Some(queue) = self.queues.get_mut(q) else {
            return false;
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            self.fail(&format!(
                "cannot return descriptor {head} on queue {q} ({e})"
            ));
            return false;
        }
        true
    }

    /// Turns the driver's notifications for queue `q` off (while the device works through it,
    /// a driver that adds chains need not kick: each kick is an exit from the guest).
    pub fn quiet(&mut self, q: usize) {
        let mem = self.mem;
        if let Some(queue) = self.queues.get_mut(q) {
            let _ = queue.disable_notification(mem);
        }
    }

    /// After a batch on queue `q` (its notifications off, [`Serving::quiet`]): watches the
    /// available ring for up to `spin` for the driver to add more. A driver that streams
    /// refills the ring within microseconds of the used entries it sees, and catching that
    /// here spares it a kick and this thread a wake-up (tens of microseconds each, per batch).
    /// Returns whether more came; if not, notifications are back on (a chain added as they
    /// came back on counts as more). An idle driver costs one `spin` after its last batch.
    pub fn more_soon(&mut self, q: usize, spin: std::time::Duration) -> bool {
        let mem = self.mem;
        // A device the batch failed serves nothing more until a reset.
        if self.needs_reset.load(Ordering::Acquire) {
            return false;
        }
        let Some(queue) = self.queues.get_mut(q) else {
            return false;
        };
        let t0 = std::time::Instant::now();
        loop {
            match queue.avail_idx(mem, Ordering::Acquire) {
                Ok(idx) if idx.0 != queue.next_avail() => return true,
                Ok(_) if t0.elapsed() < spin => std::hint::spin_loop(),
                _ => break,
            }
        }
        matches!(queue.enable_notification(mem), Ok(true))
    }

    /// After a round on queue `q` that began its turn at `turn`: watches the ring for `spin`
    /// ([`Self::more_soon`]), or only looks once the turn has lasted [`TURN`].
    pub fn next_round(
        &mut self,
        q: usize,
        turn: std::time::Instant,
        spin: std::time::Duration,
    ) -> Round {
        let over = turn.elapsed() >= TURN;
        match self.more_soon(
            q,
            if over {
                std::time::Duration::ZERO
            } else {
                spin
            },
        ) {
            false => Round::Done,
            true if over => Round::Later,
            true => Round::Now,
        }
    }

    /// Serves every chain available on queue `q` with `handle`, which returns the bytes it
    /// wrote into the chain's buffers; then completes them. Returns how many were served.
    pub fn serve(
        &mut self,
        q: usize,
        mut handle: impl FnMut(DescriptorChain<&'a GuestMemoryMmap>, &Counters) -> u32,
    ) -> usize {
        let Some(chains) = self.chains(q, usize::MAX) else {
            return 0;
        };
        let counters = self.counters;
        let used: Vec<(u16, u32)> = chains
            .into_iter()
            .map(|c| (c.head_index(), handle(c, counters)))
            .collect();
        self.complete(q, &used);
        used.len()
    }

    /// Serves chains available on queue `q` one at a time while `limiter` allows, then
    /// completes them. `handle` returns the bytes it wrote into the chain's buffers and the
    /// bytes the limiter charges. Returns how many were served.
    pub fn serve_limited(
        &mut self,
        q: usize,
        limiter: &mut crate::rate_limiter::RateLimiter,
        mut handle: impl FnMut(DescriptorChain<&'a GuestMemoryMmap>, &Counters) -> (u32, u64),
    ) -> usize {
        let counters = self.counters;
        let mut used = Vec::new();
        loop {
            if limiter.blocked_counting(&counters.throttled) {
                break;
            }
            match self.next_chain(q) {
                Ok(Some(c)) => {
                    let head = c.head_index();
                    let (len, cost) = handle(c, counters);
                    limiter.consume(cost);
                    used.push((head, len));
                }
                _ => break,
            }
        }
        self.complete(q, &used);
        used.len()
    }

    /// Marks the device DEVICE_NEEDS_RESET (once) and tells the driver with a configuration
    /// interrupt. The device serves nothing until the driver resets it.
    pub fn fail(&self, why: &str) {
        needs_reset(self.needs_reset, self.counters, self.interrupt, why);
    }

    /// Raises an interrupt.
    pub fn signal(&self, t: VirtioInterruptType) {
        if let Err(e) = self.interrupt.trigger(t) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }
}

/// A queue as saved: virtio-queue's `QueueState`, in a form serde can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver made it ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(s: &QueueSnapshot) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// What every device saves: identity, features, queues, and whether it ran or had failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// virtio device type.
    pub device_type: u32,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted (0 if never activated).
    pub acked_features: u64,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
    /// Whether the driver had activated the device.
    pub activated: bool,
    /// Whether the device had failed (DEVICE_NEEDS_RESET).
    pub needs_reset: bool,
}

/// A virtio device's saved state, by kind: what a snapshot holds for each device, and what the
/// VMM builds the device again from ([`block::Block::restore`], ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DeviceSnapshot {
    /// virtio-blk.
    Block(block::BlockState),
    /// virtio-net.
    Net(net::NetState),
    /// virtio-rng.
    Rng(rng::RngState),
    /// virtio-vsock.
    Vsock(vsock::VsockState),
}

impl DeviceSnapshot {
    /// The virtio part every device saves.
    pub fn virtio(&self) -> &VirtioState {
        match self {
            Self::Block(s) => &s.virtio,
            Self::Net(s) => &s.virtio,
            Self::Rng(s) => &s.virtio,
            Self::Vsock(s) => &s.virtio,
        }
    }
}

/// A saved state that does not fit.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The state belongs to another kind or shape of device.
    #[error("state does not fit the device: {0}")]
    Mismatch(String),
    /// The device's backend cannot be brought back (a disk that changed size, ...).
    #[error("cannot restore the backend: {0}")]
    Backend(String),
}

/// A disk being copied: see [`VirtioDevice::start_disk_copy`].
#[derive(Debug)]
pub struct DiskCopy {
    /// Reads the disk as the guest sees it (through the device's open image, so O_DIRECT
    /// images need aligned buffers).
    pub source: crate::block::copy::CopySource,
    /// The disk's size in bytes.
    pub capacity: u64,
    /// Blocks written since the copy started.
    pub dirty: Arc<crate::block::dirty::DirtyMap>,
}

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// The parts every device has.
    fn common(&self) -> &VirtioCommon;
    /// The same, mutable.
    fn common_mut(&mut self) -> &mut VirtioCommon;
    /// Reads the device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queue set-up.
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        self.common_mut().activate(ctx)
    }
    /// Stops the device and forgets the queues (driver reset).
    fn reset(&mut self) {
        self.common_mut().reset();
    }
    /// Finishes whatever is in flight (a snapshot is about to be taken; the vCPUs are
    /// paused). Most devices have nothing in flight between events.
    fn quiesce(&mut self) {}
    /// The device's whole state, for a snapshot ([`Self::quiesce`] first); `None` for a device
    /// that cannot be saved (a snapshot of its VM is then refused).
    fn save_state(&self) -> Option<DeviceSnapshot> {
        None
    }
    /// The connection of a remote backend (`None` for local ones).
    fn link(&self) -> Option<Arc<crate::block::LinkState>> {
        None
    }
    /// A disk to copy while the guest runs (live migration without shared storage): a reader
    /// of the device's image and its size, with every block the guest writes from now on
    /// recorded in `map`, which the call makes. `None` for devices that are not writable
    /// local disks (nothing to copy, or nothing this can copy).
    fn start_disk_copy(&mut self) -> Option<std::io::Result<DiskCopy>> {
        None
    }
    /// Stops what [`Self::start_disk_copy`] started.
    fn stop_disk_copy(&mut self) {}
    /// Tells the network the device is here now (a NIC after a live migration: see
    /// [`net::announcement`]); whether it sent anything.
    fn announce(&mut self) -> bool {
        false
    }
    /// Replaces one of the device's rate limits (a running VM's disk, or a NIC's rx or tx).
    fn set_rate_limit(
        &mut self,
        path: crate::rate_limiter::LimitedPath,
        _limit: crate::rate_limiter::RateLimitConfig,
    ) -> Result<(), String> {
        Err(format!(
            "a {} device has no {path:?} rate limit",
            self.kind()
        ))
    }

    /// virtio device type.
    fn device_type(&self) -> u32 {
        self.common().device_type
    }
    /// Short name for logs and reports.
    fn kind(&self) -> &'static str {
        self.common().kind
    }
    /// Features offered (including VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64 {
        self.common().avail_features
    }
    /// The queues.
    fn queues(&self) -> &[Queue] {
        &self.common().queues
    }
    /// The queues, to set them up.
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.common_mut().queues
    }
    /// The notification eventfd of each queue (registered with KVM as ioeventfds).
    fn queue_events(&self) -> &[EventFd] {
        &self.common().queue_evts
    }
    /// The counters.
    fn counters(&self) -> &Arc<Counters> {
        self.common().counters()
    }
    /// The NEEDS_RESET flag, which the transport shows in its status register.
    fn needs_reset_flag(&self) -> Arc<AtomicBool> {
        self.common().needs_reset.clone()
    }
    /// The flag that freezes the device once its VM's state has gone elsewhere (set by the VMM
    /// without the device's lock, while it holds that lock for the save).
    fn frozen_flag(&self) -> Arc<AtomicBool> {
        self.common().frozen.clone()
    }
    /// What of the host the device holds that a VMM taking its VM over should get as it is
    /// (a TAP, a listening socket), rather than open again: each with what it stands for
    /// ([`bexar_util::handed`]). The descriptors stay the device's.
    fn host_descriptors(&self) -> Vec<(bexar_util::handed::What, std::os::fd::RawFd)> {
        Vec::new()
    }
}

/// Reads `data.len()` bytes of a configuration structure at `offset`; bytes past its end read
/// as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off < config.len() {
        let n = data.len().min(config.len() - off);
        data[..n].copy_from_slice(&config[off..off + n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let c = [1u8, 2, 3, 4];
        let mut b = [0xffu8; 4];
        read_config_bytes(&c, 2, &mut b);
        assert_eq!(b, [3, 4, 0, 0]);
        read_config_bytes(&c, u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }

    /// A device with one queue of 8 on a ring laid out from `base`, activated on `mem`.
    fn one_queue<'m>(
        mem: &'m GuestMemoryMmap,
        base: u64,
        irq: &Arc<crate::virtio::test_utils::TestInterrupt>,
    ) -> (crate::virtio::ring::DriverRing<'m>, VirtioCommon) {
        let ring = crate::virtio::ring::DriverRing::new(mem, base, 8);
        let mut common = VirtioCommon::new(4, "test", 0, &[8]).unwrap();
        ring.configure(&mut common.queues[0]);
        common
            .activate(crate::virtio::test_utils::context(mem, irq))
            .unwrap();
        (ring, common)
    }

    #[test]
    fn a_batch_is_published_at_once_and_interrupts_as_the_driver_asks() {
        use crate::virtio::test_utils::TestInterrupt;
        use vm_memory::{Address, Bytes};
        let mem = crate::memory::test_memory(1);
        let irq = TestInterrupt::new();
        let (ring, mut common) = one_queue(&mem, 0x1000, &irq);
        let avail = ring.avail_addr();
        let set_flags = |v: u16| mem.write_obj(v.to_le(), avail).unwrap();
        let set_used_event = |v: u16| {
            mem.write_obj(v.to_le(), avail.unchecked_add(4 + 16))
                .unwrap()
        };
        let complete = |common: &mut VirtioCommon, used: &[(u16, u32)]| {
            common.serving().unwrap().complete(0, used)
        };

        // No EVENT_IDX, interrupts wanted.
        assert!(complete(&mut common, &[(0, 10), (1, 11), (2, 12)]));
        assert_eq!(ring.used_idx(), 3);
        assert_eq!(
            (0..3).map(|i| ring.used_entry(i)).collect::<Vec<_>>(),
            [(0, 10), (1, 11), (2, 12)]
        );
        assert_eq!(irq.queue_interrupts(), 1);
        // VIRTQ_AVAIL_F_NO_INTERRUPT: none, through either way of completing; six entries wrap
        // past the ring's end.
        set_flags(1);
        let six: Vec<(u16, u32)> = (3..9).map(|i| (i % 8, 100 + u32::from(i))).collect();
        assert!(complete(&mut common, &six));
        assert_eq!(ring.used_idx(), 9);
        assert_eq!(ring.used_entry(7), (7, 107));
        assert_eq!(ring.used_entry(8), (0, 108));
        let mut s = common.serving().unwrap();
        assert!(s.add_used(0, 1, 1));
        s.notify(0);
        assert_eq!(irq.queue_interrupts(), 1);
        assert_eq!(ring.used_idx(), 10);

        // EVENT_IDX: an interrupt once the index passes `used_event`, not before.
        set_flags(0);
        common.queues[0].set_event_idx(true);
        set_used_event(11);
        assert!(complete(&mut common, &[(2, 0)]));
        assert_eq!(irq.queue_interrupts(), 1, "index 11 has not passed 11");
        assert!(complete(&mut common, &[(3, 0), (4, 0)]));
        assert_eq!(irq.queue_interrupts(), 2, "index 13 passed 11");
        set_used_event(20);
        assert!(complete(&mut common, &[(5, 0); 5]));
        assert_eq!(irq.queue_interrupts(), 2, "index 18 has not passed 20");
        // The flag means nothing with EVENT_IDX.
        set_flags(1);
        assert!(complete(&mut common, &[(6, 0); 3]));
        assert_eq!(irq.queue_interrupts(), 3, "index 21 passed 20");
        assert!(complete(&mut common, &[(7, 0)]));
        assert_eq!(irq.queue_interrupts(), 3, "20 was passed before this batch");
        assert_eq!(ring.used_idx(), 22);

        // A head the ring cannot name: nothing published, the device failed.
        assert!(!complete(&mut common, &[(1, 0), (8, 0)]));
        assert_eq!(ring.used_idx(), 22);
        assert!(common.needs_reset());
    }

    #[test]
    fn published_entries_and_index_are_in_the_dirty_page_log() {
        use crate::memory::is_dirty;
        use vm_memory::GuestMemoryBackend;
        let mem = crate::memory::tracked_test_memory(1);
        // Laid out so that the used ring's index is on page 0x2000 and its second entry
        // (bytes 0x3004-0x300b) on page 0x3000 alone.
        let irq = crate::virtio::test_utils::TestInterrupt::new();
        let (ring, mut common) = one_queue(&mem, 0x2f60, &irq);
        assert!(common.serving().unwrap().complete(0, &[(0, 1)]));
        for r in mem.iter() {
            // The region's whole bitmap (the trait's `bitmap()` is a view without a reset).
            let mapping: &vm_memory::mmap::MmapRegion<_> = r;
            mapping.bitmap().as_ref().expect("tracked").reset();
        }
        assert!(common.serving().unwrap().complete(0, &[(5, 7)]));
        assert_eq!(ring.used_entry(1), (5, 7));
        assert!(is_dirty(&mem, 0x2000), "the index's page");
        assert!(is_dirty(&mem, 0x3000), "the entry's page");
        assert!(!is_dirty(&mem, 0x4000));
    }

    #[test]
    fn queue_snapshots_round_trip_and_bad_ones_are_refused() {
        let mut common = VirtioCommon::new(4, "test", 0, &[16, 8]).unwrap();
        common.queues[0].set_size(8);
        common.queues[0].set_desc_table_address(Some(0x1000), Some(0));
        common.queues[0].set_avail_ring_address(Some(0x2000), Some(0));
        common.queues[0].set_used_ring_address(Some(0x3000), Some(0));
        common.queues[0].set_ready(true);
        common.queues[0].set_next_avail(5);
        common.queues[0].set_next_used(4);
        let saved = common.save();
        let json = serde_json::to_string(&saved).unwrap();
        let back: VirtioState = serde_json::from_str(&json).unwrap();
        let mut fresh = VirtioCommon::new(4, "test", 0, &[16, 8]).unwrap();
        fresh.restore(&back).unwrap();
        assert_eq!(fresh.save(), saved);
        assert_eq!(fresh.queues[0].next_avail(), 5);

        // Another device type, another shape, features never offered, a size the device does
        // not offer: refused, and the device is left as it was.
        let mut other = VirtioCommon::new(2, "test", 0, &[16, 8]).unwrap();
        assert!(other.restore(&back).is_err());
        let mut one = VirtioCommon::new(4, "test", 0, &[16]).unwrap();
        assert!(one.restore(&back).is_err());
        let mut greedy = back.clone();
        greedy.acked_features = 1 << 60;
        assert!(fresh.restore(&greedy).is_err());
        let mut bad = back.clone();
        bad.queues[0].size = 7; // not a power of two
        assert!(fresh.restore(&bad).is_err());
        let mut big = back;
        big.queues[1].max_size = 32;
        assert!(fresh.restore(&big).is_err());
        assert_eq!(fresh.queues[0].next_avail(), 5);
    }
}
