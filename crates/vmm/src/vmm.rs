//! [`Vmm`]: one VM while it exists, driven by methods.
//!
//! A `Vmm` comes from [`crate::builder`] with every thread made and every vCPU paused. Its
//! owner may watch the console ([`Vmm::observe_console`]), then [`Vmm::run_until_exit`]: the
//! vCPUs start, and this thread serves the main event loop (the control socket, the console's
//! input, the VM's end) until the guest ends or the time is up. Control requests become method
//! calls: [`Vmm::pause`], [`Vmm::resume`], [`Vmm::info`], [`Vmm::shutdown`],
//! [`Vmm::save_vcpus`]...

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::SubscriberOps;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::BootEntry;
use crate::config::VmConfig;
use crate::control::{ControlServer, Info, Reply, Request, RunState};
use crate::device_manager::{DeviceManager, DevicesState};
use crate::memory::{memory_use, save_ram, GuestRam};
use crate::platform::Platform;
use crate::snapshot::{self, AfterSnapshot, MemoryInfo, SnapshotError, SnapshotReport};
use crate::teardown::Reaper;
use crate::threads::{self, ThreadKind};
use crate::vcpu::{SaveSpec, VcpuHandle, VcpuRequest, VcpuResponse, VcpuState, XsaveSize};
use crate::vm_state::VmState;
use crate::{ExitHandle, ExitReason, VmOutcome, VmmError};
use bexar_devices::serial::{ConsoleObserver, ConsoleStats};
use bexar_util::sync::lock;

/// How long `pause` waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A migration's throttle: pages per slice (1 MiB), and how the share of slices sent with the
/// guest's vCPUs parked grows, round by round, while the pre-copy does not converge.
const THROTTLE_SLICE: usize = 256;
const THROTTLE_STEP: u32 = 20;
const THROTTLE_MAX: u32 = 95;
/// Pages left that take less than this to send are not worth another pre-copy round: it would
/// shorten the pause by less than the switch-over's own fixed cost (parking the vCPUs, saving
/// and restoring the devices: 2-3 ms here).
const WORTHLESS_ROUND: Duration = Duration::from_millis(1);
/// Pre-copy rounds at most after the first whose rest fitted the downtime budget.
const ROUNDS_AFTER_FIT: u32 = 3;
/// A pause short enough to take once pre-copy stops halving what is left; a longer one (within
/// the budget) gets up to [`ROUNDS_AFTER_FIT`] rounds more, with the throttle growing.
const SHORT_PAUSE: Duration = Duration::from_millis(10);
/// How long a stopping VM waits for its vCPUs to leave the guest.
const STOP_TIMEOUT: Duration = Duration::from_millis(200);
/// How often console input waiting for FIFO room is retried (for a guest that left the UART
/// in loopback mode and so never empties the FIFO).
const CONSOLE_RETRY_MS: i32 = 50;

/// Where the VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmState {
    /// Built; the vCPUs have not run yet.
    Created,
    /// The vCPUs run the guest.
    Running,
    /// The vCPUs are parked.
    Paused,
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes a loop when its eventfd is written (the VM's end, or a stop), so it does not wait out
/// its poll timeout. The eventfd is shared, not duplicated.
struct Waker<E>(E);

impl<E: AsRef<EventFd> + Send> MutEventSubscriber for Waker<E> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.as_ref().read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.as_ref(), EventSet::IN)) {
            tracing::warn!("cannot watch an event loop's waker: {e:?}");
        }
    }
}

/// The virtio event loop's thread. It runs until the VM's end has been asked for and it is
/// woken ([`VirtioLoop::stop`]).
pub(crate) struct VirtioLoop {
    thread: JoinHandle<()>,
    waker: Arc<EventFd>,
}

impl VirtioLoop {
    /// Runs the devices' subscribers on their own thread until the VM ends.
    pub(crate) fn spawn(subscribers: Vec<Subscriber>, exit: &ExitHandle) -> Result<Self, VmmError> {
        let start = |err| VmmError::Start {
            what: "virtio event loop",
            err,
        };
        let mut manager = EventManager::<Subscriber>::new()
            .map_err(|e| start(std::io::Error::other(format!("{e:?}"))))?;
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let waker = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(start)?);
        manager.add_subscriber(Arc::new(Mutex::new(Waker(waker.clone()))));
        let exit2 = exit.clone();
        let thread = threads::spawn(ThreadKind::Virtio, exit.clone(), move || {
            while !exit2.requested() {
                if let Err(e) = manager.run_with_timeout(1000) {
                    // Devices without their loop are dead: end the VM with the reason.
                    exit2.request(ExitReason::VmmError(format!(
                        "virtio event loop failed: {e:?}"
                    )));
                    return;
                }
            }
        })
        .map_err(start)?;
        Ok(Self { thread, waker })
    }

    /// Wakes the loop and waits for its thread; the VM's end must have been asked for.
    fn stop(self) {
        let _ = self.waker.write(1);
        let _ = self.thread.join();
    }
}

/// An I/O error about `path`, as a snapshot error.
fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |err| SnapshotError::Io { path, err }
}

/// A snapshot read from a paused VM, not yet durable.
struct Captured {
    memory_tmp: std::path::PathBuf,
    memory_file: std::fs::File,
    state: snapshot::SnapshotState,
}

/// One VM.
pub struct Vmm {
    pub(crate) kvm: Kvm,
    pub(crate) config: VmConfig,
    pub(crate) platform: Platform,
    pub(crate) start: Instant,
    pub(crate) entry: BootEntry,
    pub(crate) cmdline: String,
    pub(crate) vm: VmFd,
    pub(crate) ram: GuestRam,
    pub(crate) devices: DeviceManager,
    pub(crate) vcpus: Vec<VcpuHandle>,
    /// Refused instructions the VMM completed for the guest ([`crate::vcpu`]), all vCPUs.
    pub(crate) completed: Arc<AtomicU64>,
    pub(crate) virtio_loop: Option<VirtioLoop>,
    pub(crate) main_loop: EventManager<Subscriber>,
    pub(crate) console_input: Option<SubscriberId>,
    pub(crate) control: Option<Arc<Mutex<ControlServer>>>,
    pub(crate) exit: ExitHandle,
    pub(crate) console: Arc<ConsoleStats>,
    pub(crate) state: VmmState,
    /// When the vCPUs were first let run.
    pub(crate) running: Option<Instant>,
    /// Guest memory to send with the reply being made (a handover), then the TAPs and
    /// listening sockets the reply's report names.
    pub(crate) handoff_memory: Option<(std::fs::File, Vec<std::os::fd::RawFd>)>,
    /// The VM was handed to a new VMM: this one only ends.
    pub(crate) handed_off: bool,
    /// For a VM handed over by another VMM: when that one paused it (`CLOCK_MONOTONIC`, ns),
    /// then, once this one let it run, the pause the guest saw.
    pub(crate) handed_over: Option<(u64, Option<f64>)>,
    /// When the NICs announce themselves again after a live migration (the first went before
    /// the guest ran): a frame lost, or sent before a bridge on the way was ready, is made up
    /// for.
    pub(crate) announce_at: std::collections::VecDeque<Instant>,
    /// A migration ended in doubt: the guest is paused and its devices frozen until a resume
    /// says the VM is this VMM's after all.
    pub(crate) in_doubt: bool,
}

impl Vmm {
    /// Ends the VM (the owner's `run_until_exit` returns with this reason, if it is the first).
    pub fn exit_handle(&self) -> ExitHandle {
        self.exit.clone()
    }

    /// When the VMM started (the clock of every time in the outcome).
    pub fn start_time(&self) -> Instant {
        self.start
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Where the VM is.
    pub fn state(&self) -> VmmState {
        self.state
    }

    /// Guest memory (the memfd behind it lives as long as the VM).
    pub fn memory(&self) -> &GuestRam {
        &self.ram
    }

    /// The devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Adds an observer of the guest's console output (before the guest runs, to see all of
    /// it).
    pub fn observe_console(&self, o: Box<dyn ConsoleObserver>) {
        if let Some(uart) = self.devices.uart() {
            lock(uart).writer_mut().add_observer(o);
        }
    }

    /// Sends each vCPU still running its request (the n-th of `reqs` to vCPU n) and waits for
    /// each answer; returns the answers (`None` for a vCPU that has left its loop).
    fn all_vcpus(
        &self,
        reqs: impl IntoIterator<Item = VcpuRequest>,
        timeout: Duration,
    ) -> Result<Vec<Option<VcpuResponse>>, crate::vcpu::VcpuError> {
        let live: Vec<bool> = self.vcpus.iter().map(|v| !v.done()).collect();
        for ((v, live), req) in self.vcpus.iter().zip(&live).zip(reqs) {
            if *live {
                v.send(req)?;
            }
        }
        let deadline = Instant::now() + timeout;
        self.vcpus
            .iter()
            .zip(live)
            .map(|(v, live)| match live {
                false => Ok(None),
                true => match v.answer(deadline) {
                    Ok(r) => Ok(Some(r)),
                    // A vCPU that ended meanwhile has nothing to answer.
                    Err(_) if v.done() => Ok(None),
                    Err(e) => Err(e),
                },
            })
            .collect()
    }

    /// Lets the vCPUs run the guest (the first time, or after a pause). Nothing waits for
    /// them to get there.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        if self.state == VmmState::Running {
            return Ok(());
        }
        for v in self.vcpus.iter().filter(|v| !v.done()) {
            v.send(VcpuRequest::Resume)?;
        }
        if self.running.is_none() {
            self.running = Some(Instant::now());
            if let Some((at, pause)) = &mut self.handed_over {
                let ms = crate::control::monotonic_ns().saturating_sub(*at) as f64 / 1e6;
                tracing::info!("running again after a handover: the guest was paused {ms:.2} ms");
                *pause = Some(ms);
            }
        }
        self.state = VmmState::Running;
        Ok(())
    }

    /// Parks every vCPU between two guest instructions; returns once all are parked. If one
    /// does not park within [`PAUSE_TIMEOUT`], the others run on and the pause fails.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        if self.state == VmmState::Paused {
            return Ok(());
        }
        if self.state == VmmState::Created {
            return Err(VmmError::State("not started"));
        }
        if self
            .all_vcpus(std::iter::repeat_with(|| VcpuRequest::Pause), PAUSE_TIMEOUT)
            .is_err()
        {
            // Release whichever did park (and the late one, when it gets there).
            for v in &self.vcpus {
                let _ = v.send(VcpuRequest::Resume);
            }
            return Err(VmmError::PauseTimeout(PAUSE_TIMEOUT));
        }
        self.state = VmmState::Paused;
        Ok(())
    }

    /// Every vCPU's state (the VM must be paused).
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, VmmError> {
        // Read here, not at boot: ioctls a snapshot needs and a boot does not.
        let spec = Arc::new(SaveSpec {
            msrs: self
                .kvm
                .get_msr_index_list()
                .map_err(|e| VmmError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?
                .as_slice()
                .to_vec(),
            xsave: XsaveSize::of(&self.kvm, &self.vm),
        });
        self.ask_paused(
            std::iter::repeat_with(|| VcpuRequest::SaveState(spec.clone())),
            |r| match r {
                VcpuResponse::Saved(s) => Ok(*s),
                other => Err(other),
            },
        )
    }

    /// The VM-wide state: clock, interrupt controllers, PIT (the VM must be paused).
    pub fn save_vm_state(&self) -> Result<VmState, VmmError> {
        if self.state != VmmState::Paused {
            return Err(VmmError::State("not paused"));
        }
        Ok(VmState::save(&self.vm, self.config.legacy_pit)?)
    }

    /// Loads a VM-wide state (the VM must be paused).
    pub fn restore_vm_state(&self, state: &VmState) -> Result<(), VmmError> {
        if self.state != VmmState::Paused {
            return Err(VmmError::State("not paused"));
        }
        Ok(state.restore(&self.vm, self.config.legacy_pit)?)
    }

    /// Loads a state into each vCPU (the VM must be paused; one state per vCPU), their TSCs
    /// moved on by `advance_ns` of guest time (see [`VmState::advance`]).
    pub fn restore_vcpus(&self, states: Vec<VcpuState>, advance_ns: u64) -> Result<(), VmmError> {
        if states.len() != self.vcpus.len() {
            return Err(VmmError::State("given a state for another number of vCPUs"));
        }
        let host = XsaveSize::of(&self.kvm, &self.vm);
        // Every state is checked before any vCPU loads one, so a bad one loads none.
        for s in &states {
            s.check(host).map_err(VmmError::Vcpu)?;
        }
        self.ask_paused(
            states
                .into_iter()
                .map(|s| VcpuRequest::RestoreState(Box::new(s), host, advance_ns)),
            |r| match r {
                VcpuResponse::Restored => Ok(()),
                other => Err(other),
            },
        )
        .map(drop)
    }

    /// Sends every vCPU of the paused VM its request (the n-th of `reqs` to vCPU n) and takes
    /// each answer with `take`; a vCPU that has left, or answers otherwise, fails the whole.
    fn ask_paused<T>(
        &self,
        reqs: impl IntoIterator<Item = VcpuRequest>,
        take: impl Fn(VcpuResponse) -> Result<T, VcpuResponse>,
    ) -> Result<Vec<T>, VmmError> {
        if self.state != VmmState::Paused {
            return Err(VmmError::State("not paused"));
        }
        self.all_vcpus(reqs, PAUSE_TIMEOUT)?
            .into_iter()
            .enumerate()
            .map(|(id, r)| {
                let refused = |why: String| crate::vcpu::VcpuError::Refused { id: id as u8, why };
                match r {
                    None => Err(refused("the vCPU has left".into()).into()),
                    Some(r) => take(r).map_err(|other| refused(format!("{other:?}")).into()),
                }
            })
            .collect()
    }

    /// Saves the VM into snapshot directory `dir` ([`crate::snapshot`]), then resumes it, keeps
    /// it paused or ends it as `then` says. The vCPUs are paused only while the state is read
    /// and guest memory copied into the page cache; making the files durable (fsync, rename)
    /// happens after a resumed VM runs again. A VM to be stopped is stopped only once its
    /// snapshot is durable. If the save fails the VM goes on as it was (running if it ran) and
    /// the error is returned.
    pub fn snapshot(
        &mut self,
        dir: &std::path::Path,
        then: AfterSnapshot,
    ) -> Result<SnapshotReport, VmmError> {
        if self.state == VmmState::Created {
            return Err(VmmError::State("not started"));
        }
        let t0 = Instant::now();
        let was_running = self.state == VmmState::Running;
        self.pause()?;
        tracing::debug!(
            "snapshot: paused in {:.2} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
        let stop = then.ends_vmm();
        let captured = self.capture(dir, stop);
        let paused_ms = t0.elapsed().as_secs_f64() * 1e3;
        let resume = match &captured {
            Err(_) => was_running,
            Ok(_) => then == AfterSnapshot::Resume,
        };
        if resume {
            self.resume()?;
        }
        let mut report = captured.and_then(|c| self.make_durable(dir, c));
        if stop {
            match &report {
                Ok(_) => self.exit.request(ExitReason::Stopped),
                Err(_) => {
                    self.devices.set_frozen(false);
                    if was_running {
                        self.resume()?;
                    }
                }
            }
        }
        if let Ok(r) = &mut report {
            r.paused_ms = paused_ms;
            tracing::info!(
                dir = %dir.display(),
                "snapshot written: {} bytes of state, {} of {} bytes of memory, paused {:.1} ms, \
                 {:.1} ms in all",
                r.state_bytes,
                r.memory_saved_bytes,
                r.memory_bytes,
                r.paused_ms,
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        report
    }

    /// Starts logging which pages of guest memory are written, by the vCPUs (KVM's dirty log)
    /// and by the VMM's devices (guest memory's bitmaps), from a clean slate: the pre-copy of a
    /// live migration sends what [`Vmm::take_dirty`] says changed, round after round.
    pub fn start_dirty_log(&self) -> Result<(), VmmError> {
        crate::memory::set_dirty_logging(&self.vm, &self.ram, true)?;
        crate::memory::take_dirty(&self.vm, &self.ram)?;
        Ok(())
    }

    /// The pages written since the log started or was last taken; clears them.
    pub fn take_dirty(&self) -> Result<crate::memory::PageSet, VmmError> {
        Ok(crate::memory::take_dirty(&self.vm, &self.ram)?)
    }

    /// Stops the dirty log (KVM then stops write-protecting guest pages).
    pub fn stop_dirty_log(&self) -> Result<(), VmmError> {
        Ok(crate::memory::set_dirty_logging(
            &self.vm, &self.ram, false,
        )?)
    }

    /// Moves the VM to another VMM process through `stream` (a connected socket to
    /// [`crate::migration::receive`]): guest memory while the guest runs, then round after
    /// round what it wrote meanwhile, until what is left would take less than
    /// `convergence.downtime` at the rate measured (or `max_rounds` passed); then the guest is
    /// paused, its devices saved and frozen, and the last pages and the state go. Once the
    /// receiver answers that it holds the VM, this VMM ends (`Stopped`). If anything fails
    /// before that answer, the guest goes on here as it was.
    pub fn migrate(
        &mut self,
        stream: std::os::unix::net::UnixStream,
        convergence: crate::migration::Convergence,
        copy_disks: bool,
    ) -> Result<crate::migration::MigrationReport, VmmError> {
        use crate::migration::{
            read_answer, MigrationError, MigrationPhase, MigrationProgress, MigrationReport, Sender,
        };
        if self.state == VmmState::Created {
            return Err(VmmError::State("not started"));
        }
        if let Some(disk) = self.writable_qcow2().filter(|_| !copy_disks) {
            // Without a copy the receiver reopens the disk files; a qcow2 image's metadata
            // cached here (and written back when this VMM closes it) would be stale there and
            // clobber it later. With one, the receiver writes its own overlay.
            return Err(MigrationError::Refused(format!(
                "{} is a writable qcow2 disk: it moves only with its blocks copied (`disks`)",
                disk.display()
            ))
            .into());
        }
        // A receiver that stops reading must not hold the guest (or this VMM) forever: before
        // the state is sent, a stalled stream is a failed migration and the guest goes on here.
        let io_timeout = Some(crate::migration::IO_TIMEOUT);
        stream
            .set_write_timeout(io_timeout)
            .and_then(|()| stream.set_read_timeout(Some(crate::migration::ANSWER_TIMEOUT)))
            .map_err(MigrationError::Io)?;
        let t0 = Instant::now();
        let was_running = self.state == VmmState::Running;
        let mut report = MigrationReport::default();
        // Disks first: a write the guest makes from here on is recorded before it reaches the
        // image, so no copy below can miss it.
        let disks = if copy_disks {
            self.devices
                .start_disk_copies()
                .map_err(|e| MigrationError::Refused(format!("cannot copy the disks: {e}")))?
        } else {
            Vec::new()
        };
        if let Err(e) = self.start_dirty_log() {
            self.devices.stop_disk_copies();
            return Err(e);
        }
        let mut disk_buf = bexar_devices::block::raw::Bounce::default();
        let ram = &self.ram;
        let read = |p: u64, b: &mut [u8]| crate::memory::read_page(ram, p, b);
        // Disk blocks sent that the receiver may not have on stable storage yet.
        let mut unsynced = false;
        // How far the console output went across (what it kept at the start; the rest at the
        // switch-over).
        let mut console_mark = 0u64;
        let precopy = (|| {
            let mut tx = Sender::new(std::io::BufWriter::new(&stream), ram.size)?;
            tx.limit(convergence.bandwidth);
            tx.listen(stream.try_clone().map_err(MigrationError::Io)?);
            if let Some((recent, mark)) = self.console_since(0) {
                tx.console(&recent)?;
                console_mark = mark;
            }
            // Every page that may hold anything (the log covers what the guest writes after).
            let touched = crate::memory::touched_pages(ram).map_err(MigrationError::Io)?;
            if convergence.max_rounds > 0 {
                let pages = touched.iter().filter(|t| **t).count() as u64;
                let disk_bytes: u64 = disks.iter().map(|(_, c)| c.capacity).sum();
                tx.progress(&MigrationProgress {
                    round: 1,
                    left_bytes: pages * crate::migration::PAGE + disk_bytes,
                    ..Default::default()
                })?;
                // Round 0 of each disk: what its image holds (holes and zeros stay behind).
                for (i, copy) in &disks {
                    report.disk_bytes += tx.disk_all(*i, copy, &mut disk_buf)?;
                }
                unsynced = !disks.is_empty();
            }
            // Round 0: every page that may hold anything.
            if convergence.max_rounds == 0 {
                // No pre-copy (stop-and-copy): everything goes while the guest is paused (the
                // disks' data too, below).
                let mut all = crate::memory::PageSet::empty(ram.size / crate::migration::PAGE);
                for (i, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
                    all.insert(i as u64);
                }
                return Ok::<_, VmmError>((tx, all));
            }
            let r0 = Instant::now();
            let mut round_start = r0;
            let sent = tx.pages(
                read,
                touched
                    .iter()
                    .enumerate()
                    .filter(|(_, &t)| t)
                    .map(|(i, _)| i as u64),
            )?;
            report.rounds = 1;
            let (mut throttle, mut last_left) = (0u32, u64::MAX);
            // The first round whose rest fitted the budget, and whether one after it did not.
            let (mut fitted, mut overshot): (Option<u32>, bool) = (None, false);
            // Bytes per second, from the last round (at least a page's worth of time).
            let mut rate =
                (sent * crate::migration::PAGE) as f64 / r0.elapsed().as_secs_f64().max(1e-4);
            loop {
                // The disks' blocks written since the last round go now; what the guest writes
                // while they go is the next round's.
                let r = Instant::now();
                let disk_sent =
                    self.send_disks_throttled(&mut tx, &disks, &mut disk_buf, throttle)?;
                report.disk_bytes += disk_sent;
                unsynced |= disk_sent > 0;
                let mut dirty = self.take_dirty()?;
                let estimate = |dirty: &crate::memory::PageSet| {
                    let disk_left = dirty_disk_bytes(&disks);
                    let left = dirty.count() * crate::migration::PAGE + disk_left;
                    (left, Duration::from_secs_f64(left as f64 / rate.max(1.0)))
                };
                let (mut left, mut eta) = estimate(&dirty);
                // The budget is the longest pause allowed, not the one aimed at: while a round
                // still halves what is left, another one costs the guest nothing and shortens
                // the pause (a guest rewriting an 8 MiB set 5 times a second paused 35-63 ms
                // under a 100 ms budget after one round; 2-4 rounds more bring it to the fixed
                // cost). A guest that writes about as fast as the link carries stops halving:
                // then the budget decides, and the throttle below.
                // A rest that stopped halving is taken as it is if its pause is short; a longer
                // one (within the budget) gets a few rounds more, throttled, first: a guest
                // writing its disk 160 MB/s here paused 26-45 ms under the 100 ms budget after
                // two rounds. A few rounds at most after the first that fitted, in any case; and
                // a rest that went over the budget after one fitted (a burst of writes) is
                // taken at the first that fits again, halving or not.
                let converged = |eta: Duration,
                                 left: u64,
                                 last_left: u64,
                                 rounds: u32,
                                 fitted: Option<u32>,
                                 overshot: bool| {
                    let halving = left.saturating_mul(2) <= last_left;
                    rounds >= convergence.max_rounds
                        || (eta <= convergence.downtime
                            && (eta <= WORTHLESS_ROUND
                                || overshot
                                || (!halving && eta <= SHORT_PAUSE)
                                || fitted.is_some_and(|f| rounds >= f + ROUNDS_AFTER_FIT)))
                };
                if eta <= convergence.downtime {
                    fitted.get_or_insert(report.rounds);
                } else if fitted.is_some() {
                    overshot = true;
                }
                // Asked to complete now (the relaying agent's COMPLETE): this is the last round.
                let switch_now =
                    |eta, left, last_left, rounds, fitted, overshot, tx: &Sender<_>| {
                        tx.forced || converged(eta, left, last_left, rounds, fitted, overshot)
                    };
                if switch_now(eta, left, last_left, report.rounds, fitted, overshot, &tx)
                    && unsynced
                {
                    // Before the pause, the receiver puts the disks' blocks so far on stable
                    // storage (the guest runs meanwhile): else the switch-over would wait for
                    // a pre-copy's worth of its writeback (20-30 ms for 9 MiB here). A guest
                    // writing its disk meanwhile gets those blocks sent and synced the same
                    // way (a few times at most), so the pause syncs only a remainder, whatever
                    // the guest's write rate. What it wrote to memory joins this round.
                    for tries in 1.. {
                        tx.sync_barrier()?;
                        let disk_dirty = dirty_disk_bytes(&disks);
                        if disk_dirty <= SYNCED_REMAINDER || tries == SYNC_TRIES {
                            break;
                        }
                        report.disk_bytes += tx.disks_written(&disks, &mut disk_buf)?;
                    }
                    unsynced = false;
                    dirty.union(&self.take_dirty()?);
                    (left, eta) = estimate(&dirty);
                }
                let round_time = round_start.elapsed().as_secs_f64().max(1e-4);
                round_start = Instant::now();
                tracing::debug!(
                    "migration round {}: {} pages dirty, {:.1} MB/s, {:.1} ms to send",
                    report.rounds,
                    dirty.count(),
                    rate / 1e6,
                    eta.as_secs_f64() * 1e3
                );
                if switch_now(eta, left, last_left, report.rounds, fitted, overshot, &tx) {
                    if tx.forced {
                        tracing::info!(
                            "migration: completing as asked after {} rounds: the rest needs {:.1} ms",
                            report.rounds,
                            eta.as_secs_f64() * 1e3
                        );
                    } else if eta > convergence.downtime {
                        tracing::warn!(
                            "migration: {} rounds and the rest still needs {:.1} ms, over the {} ms budget: switching over anyway",
                            report.rounds,
                            eta.as_secs_f64() * 1e3,
                            convergence.downtime.as_millis()
                        );
                    }
                    // Not sent now: the switch-over sends them with whatever comes after.
                    return Ok::<_, VmmError>((tx, dirty));
                }
                tx.progress(&MigrationProgress {
                    phase: MigrationPhase::Copying,
                    round: report.rounds + 1,
                    bytes_sent: tx.bytes,
                    left_bytes: left,
                    rate_bytes_per_sec: rate as u64,
                    dirty_pages_per_sec: (dirty.count() as f64 / round_time) as u64,
                    expected_blackout_us: eta.as_micros() as u64,
                    throttle_pct: throttle,
                })?;
                // The guest writes about as fast as the stream carries (what is left did not
                // shrink by a tenth), or a rest that fits the budget stopped halving above a
                // short pause: its vCPUs are parked for a growing share of the sending.
                let stuck = left.saturating_mul(10) >= last_left.saturating_mul(9)
                    || (fitted.is_some() && left.saturating_mul(2) > last_left);
                if report.rounds >= 2 && stuck {
                    throttle = (throttle + THROTTLE_STEP).min(THROTTLE_MAX);
                    report.throttle_pct = throttle;
                }
                last_left = left;
                let n = self.send_throttled(&mut tx, &read, &dirty, throttle)?;
                rate = (n * crate::migration::PAGE + disk_sent) as f64
                    / r.elapsed().as_secs_f64().max(1e-4);
                report.rounds += 1;
            }
        })();
        let (mut tx, pending) = match precopy {
            Ok(x) => x,
            Err(e) => {
                let _ = self.stop_dirty_log();
                self.devices.stop_disk_copies();
                return Err(e);
            }
        };
        // The switch-over: the guest stops here, and goes on here unless the receiver answers.
        // Sent as fast as the stream goes: a limit would only lengthen the pause. A cancel from
        // here on is too late.
        tx.limit(None);
        if let Err(e) = tx.stop_listening() {
            let _ = self.stop_dirty_log();
            self.devices.stop_disk_copies();
            return Err(e.into());
        }
        let paused_at_ns = crate::control::monotonic_ns();
        let paused = Instant::now();
        if let Err(e) = self.pause() {
            let _ = self.stop_dirty_log();
            self.devices.stop_disk_copies();
            return Err(e);
        }
        // Where the pause goes, for the log: (step, ms since the pause).
        let mut steps: Vec<(&str, f64)> = vec![("paused", ms_since(paused))];
        let ram = &self.ram;
        let read = |p: u64, b: &mut [u8]| crate::memory::read_page(ram, p, b);
        let sent = (|| {
            let state = self.devices.save_with(|devices| {
                let state = self.state_with(devices, 0)?;
                self.devices.set_frozen(true);
                Ok::<_, VmmError>(state)
            })??;
            steps.push(("saved", ms_since(paused)));
            // What the guest and the devices wrote since the last look, up to the freeze.
            let mut last = self.take_dirty()?;
            last.union(&pending);
            let disk_left = dirty_disk_bytes(&disks);
            tx.progress(&MigrationProgress {
                phase: MigrationPhase::SwitchOver,
                round: report.rounds,
                bytes_sent: tx.bytes,
                left_bytes: last.count() * crate::migration::PAGE + disk_left,
                throttle_pct: report.throttle_pct,
                ..Default::default()
            })?;
            report.final_pages = tx.pages(read, last.iter())?;
            if let Some((recent, _)) = self.console_since(console_mark) {
                tx.console(&recent)?;
            }
            steps.push(("pages", ms_since(paused)));
            // The devices are quiesced: every write the guest was told is done is in the
            // images, and recorded.
            for (i, copy) in &disks {
                let sent = if convergence.max_rounds == 0 {
                    tx.disk_all(*i, copy, &mut disk_buf)?
                } else {
                    tx.disk_ranges(*i, copy, copy.dirty.take().into_iter(), &mut disk_buf)?
                };
                report.final_disk_bytes += sent;
                report.disk_bytes += sent;
            }
            steps.push(("disks", ms_since(paused)));
            tx.state(&crate::snapshot::encode(&state)?)?;
            tx.done(paused_at_ns)?;
            steps.push(("sent", ms_since(paused)));
            report.pages_sent = tx.pages;
            report.bytes_sent = tx.bytes;
            drop(tx.into_inner());
            Ok::<_, VmmError>(())
        })();
        // Everything is sent: from here only the receiver's answer says who holds the VM.
        let answered = sent.and_then(|()| match read_answer(&mut &stream) {
            Err(MigrationError::Io(e)) => {
                // No answer (in time, or at all: a relay between hosts may break after the
                // receiver took the VM): the receiver may be running the guest. Resuming here
                // could make two; the guest stays paused and frozen until someone who can ask
                // the receiver decides. Only an explicit refusal resumes it here.
                tracing::error!(
                    "migration in doubt: no answer from the receiver ({e}, waited at most \
                     {:?}); the guest stays paused here",
                    crate::migration::ANSWER_TIMEOUT
                );
                Err(VmmError::Migration(MigrationError::InDoubt))
            }
            other => other.map_err(VmmError::from),
        });
        let _ = self.stop_dirty_log();
        self.devices.stop_disk_copies();
        if let Err(VmmError::Migration(MigrationError::InDoubt)) = answered {
            self.in_doubt = true;
            return Err(VmmError::Migration(MigrationError::InDoubt));
        }
        if let Err(e) = answered {
            tracing::warn!("migration failed before the receiver took the VM: {e}; going on here");
            self.devices.set_frozen(false);
            if was_running {
                self.resume()?;
            }
            return Err(e);
        }
        report.paused_ms = paused.elapsed().as_secs_f64() * 1e3;
        steps.push(("answered", report.paused_ms));
        report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            "migrated: {} rounds, {} pages ({} while paused), {} bytes, paused {:.2} ms ({}), {:.1} ms in all",
            report.rounds,
            report.pages_sent,
            report.final_pages,
            report.bytes_sent,
            report.paused_ms,
            steps
                .iter()
                .map(|(what, ms)| format!("{what} at {ms:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            report.total_ms
        );
        // Like a handover: the VM goes on in the receiver.
        self.handed_off = true;
        self.exit.request(ExitReason::Stopped);
        Ok(report)
    }

    /// The guest's console output since `mark` and the next mark
    /// ([`bexar_devices::serial::ConsoleOut::output_since`]); `None` for a console that keeps
    /// none.
    fn console_since(&self, mark: u64) -> Option<(Vec<u8>, u64)> {
        let uart = self.devices.uart()?;
        let out = lock(uart).writer().output_since(mark);
        out
    }

    /// Sends `pages` in slices of [`THROTTLE_SLICE`] pages with the vCPUs parked during
    /// `throttle` percent of them, spread evenly (a guest that dirties memory faster than the
    /// stream carries it: the longest stall it sees is a few slices). Returns the pages sent.
    fn send_throttled<W: std::io::Write>(
        &self,
        tx: &mut crate::migration::Sender<W>,
        read: &impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
        pages: &crate::memory::PageSet,
        throttle: u32,
    ) -> Result<u64, VmmError> {
        // A paused VM stays paused: parking and releasing its vCPUs would run it.
        if throttle == 0 || self.state != VmmState::Running {
            return Ok(tx.pages(read, pages.iter())?);
        }
        let all: Vec<u64> = pages.iter().collect();
        let mut gate = Parking::new(self, throttle);
        let mut sent = 0;
        for slice in all.chunks(THROTTLE_SLICE) {
            gate.slice();
            sent += tx.pages(read, slice.iter().copied())?;
        }
        Ok(sent)
    }

    /// Sends the blocks the disks recorded as written since the last round, like
    /// [`Self::send_throttled`]: in 1 MiB pieces with the vCPUs parked during `throttle`
    /// percent of them. A guest that writes its disk faster than the stream carries it is
    /// slowed this way (parking during the memory's slices alone barely touches a guest whose
    /// writes go to its disk: 5,000 writes a second went on to 30 rounds and a 35 ms pause).
    fn send_disks_throttled<W: std::io::Write>(
        &self,
        tx: &mut crate::migration::Sender<W>,
        disks: &[(u32, bexar_devices::virtio::DiskCopy)],
        buf: &mut bexar_devices::block::raw::Bounce,
        throttle: u32,
    ) -> Result<u64, VmmError> {
        if throttle == 0 || self.state != VmmState::Running {
            return Ok(tx.disks_written(disks, buf)?);
        }
        let piece = THROTTLE_SLICE as u64 * crate::migration::PAGE;
        let mut gate = Parking::new(self, throttle);
        // Bytes since the gate last decided: once per piece, however scattered the blocks.
        let (mut sent, mut since_gate) = (0, piece);
        for (i, copy) in disks {
            for (offset, len) in copy.dirty.take() {
                let end = offset.saturating_add(len);
                let mut at = offset;
                while at < end {
                    if since_gate >= piece {
                        gate.slice();
                        since_gate = 0;
                    }
                    let n = (end - at).min(piece - since_gate);
                    sent += tx.disk_ranges(*i, copy, std::iter::once((at, n)), buf)?;
                    since_gate += n;
                    at += n;
                }
            }
        }
        Ok(sent)
    }

    /// The first writable qcow2 disk of this VM, if any (by its format, or its first bytes).
    fn writable_qcow2(&self) -> Option<std::path::PathBuf> {
        use bexar_devices::block::DiskFormat;
        self.config
            .disks
            .iter()
            .filter(|d| !d.read_only && d.nbd.is_none() && d.iscsi.is_none())
            .find(|d| {
                d.format
                    .or_else(|| bexar_devices::block::qcow2::probe(&d.path).ok())
                    == Some(DiskFormat::Qcow2)
            })
            .map(|d| d.path.clone())
    }

    /// Readies the VM for a new VMM process (live upgrade): pauses it, writes its state into
    /// `dir` (without memory), freezes its devices, and returns guest memory's descriptor for
    /// the new VMM to map: the VM's own memfd, or, for a VM restored from a memory file (mapped
    /// privately), a new memfd holding a copy. The caller sends it, then ends this VMM. On an
    /// error the VM goes on here as it was.
    pub fn handoff(
        &mut self,
        dir: &std::path::Path,
    ) -> Result<(crate::control::HandoffReport, std::fs::File), VmmError> {
        if self.state == VmmState::Created {
            return Err(VmmError::State("not started"));
        }
        let was_running = self.state == VmmState::Running;
        let paused_at_ns = crate::control::monotonic_ns();
        self.pause()?;
        let done = self.write_handoff(dir);
        if done.is_err() {
            self.devices.set_frozen(false);
            if was_running {
                self.resume()?;
            }
        }
        let memory = done?;
        Ok((
            crate::control::HandoffReport {
                paused_at_ns,
                memory_bytes: self.ram.size,
                descriptors: Vec::new(),
            },
            memory,
        ))
    }

    /// What of the host this VMM holds that the VMM taking its VM over gets as it is, rather
    /// than open again after this one has ended: the control socket, the console's socket,
    /// each TAP, the vsock socket (each with what it stands for; the descriptors stay this
    /// VMM's).
    fn host_descriptors(&self) -> Vec<(bexar_util::handed::What, std::os::fd::RawFd)> {
        use bexar_devices::serial::ConsoleConfig;
        let mut out = Vec::new();
        if let (Some(ctl), Some(c)) = (&self.control, &self.config.control) {
            out.push((
                bexar_util::handed::What::Listener {
                    path: c.socket.clone(),
                },
                lock(ctl).listener_fd(),
            ));
        }
        let console = match &self.config.console {
            ConsoleConfig::Socket { path } => Some(path.as_path()),
            ConsoleConfig::SocketWithLog { socket, .. } => Some(socket.as_path()),
            _ => None,
        };
        out.extend(self.devices.host_descriptors(console));
        out
    }

    fn write_handoff(&self, dir: &std::path::Path) -> Result<std::fs::File, VmmError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let state = self.devices.save_with(|devices| {
            let state = self.state_with(devices, 0)?;
            self.devices.set_frozen(true);
            Ok::<_, VmmError>(state)
        })??;
        let memory = if self.ram.private {
            let copy = crate::memory::create_guest_memory(self.ram.size >> 20)?;
            save_ram(&self.ram, &copy.file).map_err(io(dir))?;
            copy.file
        } else {
            self.ram.file.try_clone().map_err(io(dir))?
        };
        snapshot::write_state_now(dir, &state)?;
        Ok(memory)
    }

    /// Reads the paused VM's state and copies its memory into a temporary file in `dir`;
    /// with `freeze`, the devices do nothing more once saved (the VM goes on elsewhere).
    fn capture(&self, dir: &std::path::Path, freeze: bool) -> Result<Captured, VmmError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let memory_tmp = bexar_util::fs::temp_name(&snapshot::memory_path(dir));
        // Devices first, held still while the rest is read: completing a disk request raises
        // an interrupt, which must be in the interrupt controllers and LAPICs saved after it.
        let t0 = Instant::now();
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        let captured = self.devices.save_with(|devices| {
            tracing::debug!("snapshot: devices saved in {:.2} ms", ms(t0));
            let mut state = self.state_with(devices, 0)?;
            tracing::debug!("snapshot: vCPUs saved at {:.2} ms", ms(t0));
            let file = std::fs::File::create(&memory_tmp).map_err(io(&memory_tmp))?;
            state.memory.saved = save_ram(&self.ram, &file).map_err(io(&memory_tmp))?;
            tracing::debug!("snapshot: memory copied at {:.2} ms", ms(t0));
            if freeze {
                self.devices.set_frozen(true);
            }
            Ok::<_, VmmError>(Captured {
                memory_tmp: memory_tmp.clone(),
                memory_file: file,
                state,
            })
        });
        let captured = captured.map_err(VmmError::from).and_then(|c| c);
        if captured.is_err() {
            let _ = std::fs::remove_file(&memory_tmp);
        }
        captured
    }

    /// Makes a captured snapshot the one in `dir`: no state file while the memory file is
    /// replaced (a crash leaves no snapshot rather than this memory under an earlier state),
    /// the memory file synced and renamed into place, then the state file written atomically.
    fn make_durable(&self, dir: &std::path::Path, c: Captured) -> Result<SnapshotReport, VmmError> {
        let done = (|| {
            c.memory_file.sync_data().map_err(io(&c.memory_tmp))?;
            let state = snapshot::state_path(dir);
            match std::fs::remove_file(&state) {
                Ok(()) => bexar_util::fs::sync_dir(dir)
                    .map_err(|e| io(dir)(std::io::Error::other(e.to_string())))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&state)(e).into()),
            }
            let memory = snapshot::memory_path(dir);
            std::fs::rename(&c.memory_tmp, &memory).map_err(io(&memory))?;
            Ok::<_, VmmError>(snapshot::write_state(dir, &c.state)?)
        })();
        let state_bytes = match done {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&c.memory_tmp);
                return Err(e);
            }
        };
        Ok(SnapshotReport {
            state_bytes,
            memory_bytes: c.state.memory.size,
            memory_saved_bytes: c.state.memory.saved,
            paused_ms: 0.0,
        })
    }

    /// The paused VM's whole state around the devices' (`saved` bytes of memory in its file):
    /// its vCPUs and VM-wide state read now, its configuration and boot entry.
    fn state_with(
        &self,
        devices: DevicesState,
        saved: u64,
    ) -> Result<snapshot::SnapshotState, VmmError> {
        Ok(snapshot::SnapshotState {
            config: self.config.clone(),
            entry: self.entry,
            cmdline: self.cmdline.clone(),
            memory: MemoryInfo {
                size: self.ram.size,
                saved,
            },
            vm: self.save_vm_state()?,
            vcpus: self.save_vcpus()?,
            devices,
        })
    }

    /// Asks the guest to shut down (Ctrl+Alt+Del on the i8042), running it first if it was
    /// paused. False if the keyboard controller's buffer had no room.
    pub fn shutdown(&mut self) -> Result<bool, VmmError> {
        self.resume()?;
        Ok(self.devices.send_ctrl_alt_del())
    }

    /// Identity, state and counters.
    pub fn info(&self) -> Info {
        let (id, token) = self
            .config
            .control
            .as_ref()
            .map_or((String::new(), String::new()), |c| {
                (c.id.clone(), c.token.clone())
            });
        Info {
            id,
            token,
            pid: crate::jail::host_pid(),
            state: if self.state == VmmState::Paused {
                RunState::Paused
            } else {
                RunState::Running
            },
            uptime_ms: self.start.elapsed().as_millis() as u64,
            vcpu_exits: self
                .vcpus
                .iter()
                .map(|v| v.stats().exits.load(Ordering::Relaxed))
                .collect(),
            completed_instructions: self.completed.load(Ordering::Relaxed),
            console_bytes: self.console.bytes(),
            handoff_pause_ms: self.handed_over.and_then(|(_, p)| p),
            devices: self.devices.reports(),
        }
    }

    /// Carries out one control request.
    pub fn handle(&mut self, req: &Request) -> Reply {
        match req {
            Request::Info => Reply::info(self.info()),
            Request::Pause => match self.pause() {
                Ok(()) => {
                    tracing::info!("VM paused");
                    Reply::ok()
                }
                Err(e) => Reply::error(e.to_string()),
            },
            Request::Resume => {
                if std::mem::take(&mut self.in_doubt) {
                    // Whoever asks has found the receiver does not run the VM: it is this
                    // VMM's again, devices and all.
                    tracing::warn!("resumed after a migration in doubt: the VM goes on here");
                    self.devices.set_frozen(false);
                }
                match self.resume() {
                    Ok(()) => {
                        tracing::info!("VM resumed");
                        Reply::ok()
                    }
                    Err(e) => Reply::error(e.to_string()),
                }
            }
            Request::Shutdown => match self.shutdown() {
                Ok(true) => {
                    tracing::info!("shutdown requested (Ctrl-Alt-Del)");
                    Reply::ok()
                }
                Ok(false) => Reply::error("the guest's keyboard controller buffer is full"),
                Err(e) => Reply::error(e.to_string()),
            },
            Request::Stop => {
                tracing::info!("stop requested on the control socket");
                self.exit.request(ExitReason::Stopped);
                Reply::ok()
            }
            Request::Handoff { dir } => match self.handoff(dir) {
                Ok((mut report, memory)) => {
                    let (what, fds) = self.host_descriptors().into_iter().unzip();
                    report.descriptors = what;
                    self.handoff_memory = Some((memory, fds));
                    Reply::handoff(report)
                }
                Err(e) => Reply::error(e.to_string()),
            },
            Request::Migrate {
                to,
                downtime_ms,
                max_rounds,
                disks,
                max_bandwidth_mib,
            } => {
                let mut c = crate::migration::Convergence {
                    bandwidth: max_bandwidth_mib.map(|m| u64::from(m) << 20),
                    ..Default::default()
                };
                if let Some(ms) = downtime_ms {
                    c.downtime = Duration::from_millis(u64::from(*ms));
                }
                if let Some(n) = max_rounds {
                    c.max_rounds = *n;
                }
                match std::os::unix::net::UnixStream::connect(to) {
                    Err(e) => Reply::error(format!("cannot reach {}: {e}", to.display())),
                    Ok(stream) => match self.migrate(stream, c, *disks) {
                        Ok(r) => Reply::migration(r),
                        Err(e) => Reply::error(e.to_string()),
                    },
                }
            }
            Request::Snapshot { dir, then } => match self.snapshot(dir, *then) {
                Ok(r) => Reply::snapshot(r),
                Err(e) => Reply::error(e.to_string()),
            },
            #[cfg(debug_assertions)]
            Request::Fault { fault } => fault_for_tests(*fault),
            Request::SetRateLimit {
                device,
                path,
                limit,
            } => match self.devices.set_rate_limit(device, *path, *limit) {
                Ok(()) => {
                    tracing::info!("rate limit of {device} ({path:?}) set to {limit:?}");
                    Reply::ok()
                }
                Err(e) => Reply::error(e),
            },
        }
    }

    fn serve_control(&mut self) {
        let Some(ctl) = self.control.clone() else {
            return;
        };
        let requests = lock(&ctl).take_requests();
        for (conn, req) in requests {
            let reply = match req {
                Ok(r) => self.handle(&r),
                Err(e) => Reply::error(format!("bad request: {e}")),
            };
            match self.handoff_memory.take() {
                None => lock(&ctl).reply(conn, &reply),
                Some((memory, host)) => {
                    // The VM is the new VMM's once it holds the memory: this one ends. If the
                    // descriptor did not get there, the VM goes on here.
                    let fds: Vec<_> = std::iter::once(memory.as_raw_fd()).chain(host).collect();
                    match lock(&ctl).reply_with_fds(conn, &reply, &fds) {
                        Ok(()) => {
                            tracing::info!("VM handed over to a new VMM");
                            self.handed_off = true;
                            self.exit.request(ExitReason::Stopped);
                        }
                        Err(e) => {
                            tracing::error!("the handover failed ({e}); the VM goes on here");
                            self.devices.set_frozen(false);
                            let _ = self.resume();
                        }
                    }
                }
            }
        }
        lock(&ctl).finish();
    }

    fn console_pending(&self) -> bool {
        self.devices
            .console_input()
            .is_some_and(|c| lock(c).has_pending())
    }

    fn retry_console(&mut self) {
        let (Some(id), Some(input)) = (self.console_input, self.devices.console_input()) else {
            return;
        };
        if let Ok(mut ops) = self.main_loop.event_ops(id) {
            lock(input).retry(&mut ops);
        }
    }

    /// Runs the VM until the guest ends, a control request stops it, or `timeout` (counted
    /// from the VMM's start) passes; then stops every thread and reports.
    pub fn run_until_exit(mut self, timeout: Option<Duration>) -> Result<VmOutcome, VmmError> {
        // A built VM (or a restored one, which comes paused) starts running here.
        if self.state != VmmState::Running {
            self.resume()?;
        }
        let deadline = timeout.map(|t| self.start + t);
        if !self.serve_until(deadline) {
            self.exit.request(ExitReason::Timeout);
        }
        Ok(self.finish())
    }

    /// Serves the main event loop (control requests, console input) until the VM's end is
    /// asked for, or until `until` passes. Returns whether the VM is ending.
    pub fn serve_until(&mut self, until: Option<Instant>) -> bool {
        while !self.exit.requested() {
            let mut wait = match until {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
                }
            };
            let pending = self.console_pending();
            if pending && !(0..=CONSOLE_RETRY_MS).contains(&wait) {
                wait = CONSOLE_RETRY_MS;
            }
            if let Some(at) = self.announce_at.front() {
                let left = at.saturating_duration_since(Instant::now());
                let left = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
                if !(0..=left).contains(&wait) {
                    wait = left;
                }
            }
            if let Err(e) = self.main_loop.run_with_timeout(wait) {
                self.exit.request(ExitReason::VmmError(format!(
                    "the VMM's event loop failed: {e:?}"
                )));
                break;
            }
            self.serve_control();
            if pending {
                self.retry_console();
            }
            if self
                .announce_at
                .front()
                .is_some_and(|at| *at <= Instant::now())
            {
                self.announce_at.pop_front();
                self.devices.announce();
            }
        }
        true
    }

    /// Ends the VM (with [`ExitReason::Stopped`] unless another reason came first), stops
    /// the vCPUs and the virtio loop, hands the VM to the reaper, and reports.
    pub fn finish(mut self) -> VmOutcome {
        let elapsed = self.start.elapsed();
        self.stop_threads();
        let reason = self.exit.reason().unwrap_or(ExitReason::Stopped);
        if reason == ExitReason::Timeout {
            // Where each vCPU was is the first thing to know about a hung guest.
            for (id, v) in self.vcpus.iter().enumerate() {
                let s = v.stats();
                match (v.done(), s.stopped_rip.load(Ordering::Relaxed)) {
                    (true, rip) => tracing::warn!("at the timeout vCPU {id} was at rip {rip:#x}"),
                    (false, _) => tracing::warn!("at the timeout vCPU {id} did not leave KVM_RUN"),
                }
            }
        }
        let mem_use = memory_use();
        // The VM's last reference goes to its keeper or to a child, so this process can exit
        // without waiting for KVM's teardown (teardown.rs). A keeper that has gone (an agent
        // restarted) took its copy with it: then a child too, even in a PID namespace of its
        // own, where the kernel makes this process's end wait for the child's. Its descriptors
        // (its lock, the TAPs) still close at the start of its exit, which is what a live
        // upgrade's new VMM waits for.
        if !crate::teardown::kept() {
            if let Some(reaper) = Reaper::spawn(&self.vm) {
                reaper.wait();
            }
        }
        if let Some(uart) = self.devices.uart() {
            use std::io::Write;
            let _ = lock(uart).writer_mut().flush();
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        VmOutcome {
            reason,
            elapsed_ms: ms(elapsed),
            running_ms: self.running.map(|t| ms(t.duration_since(self.start))),
            handed_off: self.handed_off,
            first_console_byte_ms: self.console.first_byte().map(ms),
            pattern_ms: None,
            console_bytes: self.console.bytes(),
            vcpu_exits: self
                .vcpus
                .iter()
                .map(|v| v.stats().exits.load(Ordering::Relaxed))
                .sum(),
            completed_instructions: self.completed.load(Ordering::Relaxed),
            unhandled_io: self.devices.unhandled(),
            vmm_rss_kib: mem_use.map(|m| m.vmm_rss),
            vmm_private_kib: mem_use.map(|m| m.vmm_private),
            guest_rss_kib: mem_use.map(|m| m.guest),
            platform: self.platform.name(),
            entry: format!("{:?}/{:?}", self.entry.format, self.entry.mode),
            cmdline: std::mem::take(&mut self.cmdline),
            devices: self.devices.reports(),
            jail: crate::jail::times(),
        }
    }
}

impl Vmm {
    /// Ends the VM (with [`ExitReason::Stopped`] unless another reason came first) and stops
    /// the vCPUs and the virtio loop. Idempotent: [`Vmm::finish`] and `drop` both call it.
    fn stop_threads(&mut self) {
        self.exit.request(ExitReason::Stopped);
        for v in &self.vcpus {
            v.begin_stop();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for v in &self.vcpus {
            v.finish_stop(deadline);
        }
        if let Some(l) = self.virtio_loop.take() {
            l.stop();
        }
    }
}

impl Drop for Vmm {
    /// A `Vmm` dropped without [`Vmm::finish`] (an error on the way, an owner that gave up)
    /// takes its threads with it: running vCPUs do not notice a dropped channel.
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Carries out a test's [`crate::control::Fault`] on the main thread.
#[cfg(debug_assertions)]
fn fault_for_tests(fault: crate::control::Fault) -> Reply {
    use crate::control::Fault;
    match fault {
        Fault::Syscall => {
            tracing::warn!("test fault: calling mount(2)");
            // SAFETY: mount with null arguments only fails (EFAULT) where it is allowed at all.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_mount,
                    std::ptr::null::<u8>(),
                    std::ptr::null::<u8>(),
                    std::ptr::null::<u8>(),
                    0,
                    std::ptr::null::<u8>(),
                )
            };
            Reply::error(format!(
                "mount returned {r}: {}",
                std::io::Error::last_os_error()
            ))
        }
        Fault::OpenHostFile => match std::fs::read("/etc/passwd") {
            Ok(b) => Reply::error(format!("opened /etc/passwd: {} bytes", b.len())),
            Err(e) => Reply::error(format!("cannot open /etc/passwd: {e}")),
        },
        Fault::Connect(port) => match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(_) => Reply::error(format!("connected to 127.0.0.1:{port}")),
            Err(e) => Reply::error(format!("cannot connect to 127.0.0.1:{port}: {e}")),
        },
        Fault::Leak => {
            tracing::warn!("test fault: leaking memory until stopped");
            let mut kept: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touched, so the pages are really charged.
                kept.push(vec![0x5a; 1 << 20]);
                std::hint::black_box(&kept);
            }
        }
    }
}

/// Builds the main event loop: the VM's end, the console's input side, the control socket.
pub(crate) fn main_loop(
    exit: &ExitHandle,
    devices: &DeviceManager,
    control: Option<&Arc<Mutex<ControlServer>>>,
) -> Result<(EventManager<Subscriber>, Option<SubscriberId>), VmmError> {
    let start = |err| VmmError::Start {
        what: "main event loop",
        err,
    };
    let mut m = EventManager::<Subscriber>::new()
        .map_err(|e| start(std::io::Error::other(format!("{e:?}"))))?;
    m.add_subscriber(Arc::new(Mutex::new(Waker(exit.clone()))));
    let console = devices
        .console_input()
        .map(|c| m.add_subscriber(c.clone() as Subscriber));
    if let Some(c) = control {
        m.add_subscriber(c.clone() as Subscriber);
    }
    Ok((m, console))
}

/// Disk bytes written by the guest during a sync barrier that may wait for the switch-over
/// (their sync is then in the pause): about 2 ms of writeback here.
const SYNCED_REMAINDER: u64 = 256 << 10;
/// The most sync barriers before a switch-over (each one's wait lets a writing guest dirty
/// more blocks; they shrink as the waits do).
const SYNC_TRIES: u32 = 3;

/// Milliseconds since `t`.
fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Disk bytes written since the copies' last look, in all of `disks`.
/// A migration's throttle at work: before each slice it sends, the running VM's vCPUs are
/// parked or let go so that they are parked for `pct` percent of the slices, spread evenly;
/// they go on when it is dropped (an error on the way included).
struct Parking<'a> {
    vmm: &'a Vmm,
    pct: u32,
    share: u32,
    parked: bool,
}

impl<'a> Parking<'a> {
    fn new(vmm: &'a Vmm, pct: u32) -> Self {
        Self {
            vmm,
            pct,
            share: 0,
            parked: false,
        }
    }

    /// Before the next slice.
    fn slice(&mut self) {
        self.share += self.pct;
        let park = self.share >= 100;
        if park {
            self.share -= 100;
        }
        if park && !self.parked {
            self.parked = self
                .vmm
                .all_vcpus(std::iter::repeat_with(|| VcpuRequest::Pause), PAUSE_TIMEOUT)
                .is_ok();
            if !self.parked {
                // The ones that parked go on; the throttle is only a help.
                self.release();
            }
        } else if !park && self.parked {
            self.parked = false;
            self.release();
        }
    }

    fn release(&self) {
        for v in &self.vmm.vcpus {
            let _ = v.send(VcpuRequest::Resume);
        }
    }
}

impl Drop for Parking<'_> {
    fn drop(&mut self) {
        if std::mem::take(&mut self.parked) {
            self.release();
        }
    }
}

fn dirty_disk_bytes(disks: &[(u32, bexar_devices::virtio::DiskCopy)]) -> u64 {
    disks
        .iter()
        .map(|(_, c)| c.dirty.count() * c.dirty.block_size())
        .sum()
}
