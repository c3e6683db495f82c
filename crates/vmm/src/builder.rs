//! The boot recipe: KVM VM, memory, interrupt controllers, guest image, devices, vCPU threads;
//! then wait for the first reason to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::boot::{self, mptable::MAX_VCPUS};
use super::control::{self, Controls, PauseGate, VcpuKicker};
use super::cpuid;
use super::layout::{KVM_TSS_ADDR, VIRTIO_GSI_BASE, VIRTIO_MMIO_BASE, VIRTIO_SLOTS};
use super::memory::{create_guest_memory, GuestRam};
use super::platform::{adjust_cmdline, Platform};
use super::teardown::Reaper;
use super::vcpu::{self, VcpuContext, VcpuStats};
use super::{ExitHandle, ExitReason, ExitTrigger, VmConfig, VmOutcome, VmmError};
use bexar_devices::bus::Bus;
use bexar_devices::legacy::{
    ExitPort, EXIT_PORT, EXIT_PORT_LEN, I8042, I8042_BASE, I8042_KBD_IRQ, I8042_LEN,
};
use bexar_devices::serial::{self, ConsoleObserver, ConsoleSetup, ConsoleStats, SerialDevice};
use bexar_devices::virtio::block::Block;
use bexar_devices::virtio::mmio::{MmioTransport, MMIO_LEN, QUEUE_NOTIFY};
use bexar_devices::virtio::net::Net;
use bexar_devices::virtio::rng::Rng;
use bexar_devices::virtio::vsock::Vsock;
use bexar_devices::virtio::{Counters, DeviceReport, VirtioDevice};
use bexar_devices::IrqTrigger;
use bexar_util::sync::lock;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::EventFd;

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn register_memory(vm: &VmFd, ram: &GuestRam) -> Result<(), VmmError> {
    for (slot, region) in ram.mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmmError::Setup(format!("guest region without host mapping: {e}")))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `ram`, which
        // outlives the VM's use of it (the process exits or the VM is dropped first).
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| VmmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

/// Memory of this process in KiB, split into the guest's part and the VMM's own.
#[derive(Debug, Clone, Copy)]
pub struct MemoryUse {
    /// Resident set minus guest RAM (includes shared library and binary pages).
    pub vmm_rss: u64,
    /// Anonymous memory (heap, stacks, device state): what one more VM costs the host, since
    /// binary and library pages are shared by every VMM process.
    pub vmm_private: u64,
    /// Resident guest RAM.
    pub guest: u64,
}

/// Reads this process's memory use. Guest RAM is a memfd, so it is exactly the shared-memory
/// (RssShmem) part of the resident set.
pub fn memory_use() -> Option<MemoryUse> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss = bexar_util::procfs::kib_field(&status, "VmRSS:")?;
    let guest = bexar_util::procfs::kib_field(&status, "RssShmem:")?;
    Some(MemoryUse {
        vmm_rss: rss.saturating_sub(guest),
        vmm_private: bexar_util::procfs::kib_field(&status, "RssAnon:")?,
        guest,
    })
}

/// Makes a console observer for a VM, given how to end it and when its VMM started.
pub type ConsoleHook<'a> = &'a dyn Fn(&ExitHandle, Instant) -> Box<dyn ConsoleObserver>;

/// Builds and runs one VM to its end; `hook`, if given, watches its console.
pub fn run(config: &VmConfig, hook: Option<ConsoleHook<'_>>) -> Result<VmOutcome, VmmError> {
    let start = Instant::now();
    let phase = |name: &str| {
        tracing::debug!(
            "boot phase {name}: {:.3} ms",
            start.elapsed().as_secs_f64() * 1e3
        )
    };
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(boot::BootError::TooManyVcpus(config.vcpus).into());
    }
    let platform = Platform::detect();
    let cmdline = if config.platform_params {
        adjust_cmdline(platform, &config.cmdline)
    } else {
        config.cmdline.clone()
    };
    if cmdline != config.cmdline {
        tracing::info!(
            "{} host detected: CPUID masks have no effect here, so the guest kernel gets: {}",
            platform.name(),
            cmdline[config.cmdline.len()..].trim()
        );
    }

    let cmdline = with_virtio_devices(cmdline, config)?;
    let ram = create_guest_memory(config.memory_mib)?;
    let entry = boot::prepare(
        &ram.mem,
        &config.kernel,
        config.initrd.as_deref(),
        &cmdline,
        config.vcpus,
    )?;
    phase("guest memory and kernel loaded");
    tracing::debug!(?entry, "kernel loaded");

    let kvm = Kvm::new().map_err(VmmError::Kvm0)?;
    let vm = kvm
        .create_vm()
        .map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;
    // Memory first: registering a slot after KVM_CREATE_IRQCHIP waits for an expedited SRCU
    // grace period behind the irqchip's own (measured 5-11 ms on PVM, ~0.03 ms this way round).
    register_memory(&vm, &ram)?;
    phase("memory registered");
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    if config.legacy_pit {
        // Only for guests that need an i8254: KVM's PIT runs a kernel worker whose shutdown
        // costs ~15 ms of VM teardown on PVM, and Linux guests use the LAPIC TSC-deadline timer
        // and kvm-clock without it.
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;
    }
    phase("VM and interrupt controllers created");

    let stop = Arc::new(AtomicBool::new(false));
    let (exit, exit_rx) = ExitHandle::new();
    let console = ConsoleStats::new(start);
    let (uart, uart_irq) = serial::build(ConsoleSetup {
        config: &config.console,
        stdin: config.stdin,
        stats: console.clone(),
    })?;
    if let Some(hook) = hook {
        lock(&uart).writer_mut().add_observer(hook(&exit, start));
    }
    vm.register_irqfd(&uart_irq, serial::COM1_IRQ)
        .map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;

    let mut pio = Bus::new();
    let bus_err = |e: bexar_devices::bus::BusError| VmmError::Setup(e.to_string());
    pio.insert(
        Arc::new(Mutex::new(SerialDevice(uart.clone()))),
        serial::COM1_BASE,
        serial::COM1_LEN,
    )
    .map_err(bus_err)?;
    let i8042_irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| VmmError::Setup(format!("cannot create the i8042 interrupt eventfd: {e}")))?;
    vm.register_irqfd(&i8042_irq, I8042_KBD_IRQ)
        .map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        IrqTrigger(i8042_irq),
        ExitTrigger {
            exit: exit.clone(),
            reason: ExitReason::Reset,
        },
    )));
    pio.insert(i8042.clone(), I8042_BASE, I8042_LEN)
        .map_err(bus_err)?;
    let status_exit = exit.clone();
    pio.insert(
        Arc::new(Mutex::new(ExitPort(move |code| {
            status_exit.request(ExitReason::GuestStatus(code))
        }))),
        EXIT_PORT,
        EXIT_PORT_LEN,
    )
    .map_err(bus_err)?;
    let pio = Arc::new(pio);
    let mut mmio = Bus::new();
    let virtio = attach_virtio(&vm, &ram, &mut mmio, config)?;
    let mmio = Arc::new(mmio);
    // No devices, no loop: a thread to start and to join costs ~0.1 ms here.
    let event_loop = if virtio.devices.is_empty() {
        None
    } else {
        Some(spawn_event_loop(
            virtio.manager,
            stop.clone(),
            exit.clone(),
        )?)
    };
    phase("virtio devices attached");

    let mut supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    let hidden = match platform {
        Platform::Pvm => cpuid::PVM_HIDDEN_KVM_FEATURES,
        Platform::Hardware => 0,
    };
    cpuid::adjust_supported(
        &mut supported,
        kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        hidden,
    );
    register_signal_handler(SIGRTMIN(), kick_handler)
        .map_err(|e| VmmError::Setup(format!("cannot install the vCPU kick handler: {e}")))?;

    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
        let cpuid = cpuid::for_vcpu(&supported, config.cpu_template, id, config.vcpus);
        vcpu::configure(
            &fd,
            &ram.mem,
            &cpuid,
            config.cpu_template.msrs(),
            (id == 0).then_some(&entry),
        )?;
        vcpus.push(fd);
    }

    phase("devices and vCPUs configured");
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let stats: Vec<Arc<VcpuStats>> = (0..config.vcpus)
        .map(|_| Arc::new(VcpuStats::default()))
        .collect();
    let gate = Arc::new(PauseGate::default());
    let kicker = Arc::new(VcpuKicker::default());
    if let Some(cc) = &config.control {
        let kbd = i8042.clone();
        let shutdown: Box<dyn Fn() -> bool + Send + Sync> =
            Box::new(move || lock(&kbd).send_ctrl_alt_del());
        let controls = Controls {
            config: cc.clone(),
            gate: gate.clone(),
            kicker: kicker.clone(),
            stats: stats.clone(),
            exit: exit.clone(),
            shutdown,
            watch: console.clone(),
            devices: virtio.devices.clone(),
            start,
        };
        control::serve(Arc::new(controls)).map_err(|e| {
            VmmError::Setup(format!(
                "cannot serve the control socket {}: {e}",
                cc.socket.display()
            ))
        })?;
    }
    for (id, fd) in vcpus.into_iter().enumerate() {
        let s = stats[id].clone();
        let ctx = VcpuContext {
            id: id as u8,
            mem: ram.mem.clone(),
            pio: pio.clone(),
            mmio: mmio.clone(),
            stop: stop.clone(),
            exit: exit.clone(),
            stats: s,
            pause: gate.clone(),
        };
        let t = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // A bug in the VMM must end the VM with a report, not leave it half-running.
                let exit = ctx.exit.clone();
                let done = ctx.stats.clone();
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu::run(fd, ctx)))
                    .is_err()
                {
                    done.done.store(true, Ordering::Release);
                    exit.request(ExitReason::VmmError(format!("vCPU {id} thread panicked")));
                }
            })
            .map_err(|e| VmmError::Setup(format!("cannot start vCPU thread: {e}")))?;
        kicker.add(std::os::unix::thread::JoinHandleExt::as_pthread_t(&t));
        threads.push(t);
    }

    phase("vCPU threads started");
    let reason = match config.timeout {
        Some(t) => exit_rx
            .recv_timeout(t.saturating_sub(start.elapsed()))
            .unwrap_or(ExitReason::Timeout),
        None => exit_rx.recv().unwrap_or(ExitReason::Timeout),
    };
    let elapsed = start.elapsed();
    stop_vcpus(&stop, &threads, &stats);
    kicker.clear();
    if let Some(l) = event_loop {
        l.stop();
    }
    if reason == ExitReason::Timeout {
        // Where each vCPU was is the first thing to know about a hung guest.
        for (id, s) in stats.iter().enumerate() {
            match (
                s.done.load(Ordering::Acquire),
                s.stopped_rip.load(Ordering::Relaxed),
            ) {
                (true, rip) => tracing::warn!("at the timeout vCPU {id} was at rip {rip:#x}"),
                (false, _) => tracing::warn!("at the timeout vCPU {id} did not leave KVM_RUN"),
            }
        }
    }
    let mem_use = memory_use();
    // The VM's last reference goes to a child, so this process can exit without waiting for
    // KVM's teardown (teardown.rs).
    if let Some(reaper) = Reaper::spawn(&vm) {
        reaper.wait();
    }
    {
        use std::io::Write;
        let _ = lock(&uart).writer_mut().flush();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(VmOutcome {
        reason,
        elapsed_ms: ms(elapsed),
        first_console_byte_ms: console.first_byte().map(ms),
        pattern_ms: None,
        console_bytes: console.bytes(),
        vcpu_exits: stats.iter().map(|s| s.exits.load(Ordering::Relaxed)).sum(),
        unhandled_io: pio.unhandled() + mmio.unhandled(),
        vmm_rss_kib: mem_use.map(|m| m.vmm_rss),
        vmm_private_kib: mem_use.map(|m| m.vmm_private),
        guest_rss_kib: mem_use.map(|m| m.guest),
        platform: platform.name(),
        entry: format!("{:?}/{:?}", entry.format, entry.mode),
        cmdline,
        devices: virtio
            .devices
            .iter()
            .map(|(kind, slot, c)| DeviceReport::new(kind, *slot, c))
            .collect(),
    })
}

/// Appends what Linux needs to find the virtio-mmio devices to the command line.
fn with_virtio_devices(mut cmdline: String, config: &VmConfig) -> Result<String, VmmError> {
    let count = config.disks.len() as u32
        + config.nics.len() as u32
        + u32::from(config.rng)
        + u32::from(config.vsock.is_some());
    if count > VIRTIO_SLOTS {
        return Err(VmmError::Setup(format!(
            "{count} virtio devices requested; at most {VIRTIO_SLOTS} fit"
        )));
    }
    for slot in 0..count {
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            VIRTIO_MMIO_BASE + u64::from(slot) * MMIO_LEN,
            VIRTIO_GSI_BASE + slot
        ));
    }
    Ok(cmdline)
}

/// The virtio devices of a VM and the event loop that runs them.
struct Virtio {
    manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    devices: Vec<(&'static str, u32, Arc<Counters>)>,
}

/// Creates each virtio device in its slot: irqfd on its GSI, ioeventfd on QueueNotify (one per
/// queue, matched on the queue index), the transport on the MMIO bus, the device on the loop.
fn attach_virtio(
    vm: &VmFd,
    ram: &GuestRam,
    mmio: &mut Bus,
    config: &VmConfig,
) -> Result<Virtio, VmmError> {
    let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| VmmError::Setup(format!("cannot create the virtio event loop: {e:?}")))?;
    let mut devices: Vec<Arc<Mutex<dyn VirtioDevice>>> = Vec::new();
    let mut subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> = Vec::new();
    let new_irqfd = || {
        EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::Setup(format!("cannot create an eventfd: {e}")))
    };
    let clone_fd = |fd: &EventFd| {
        fd.try_clone()
            .map_err(|e| VmmError::Setup(format!("cannot clone an eventfd: {e}")))
    };
    for disk in &config.disks {
        let irq = new_irqfd()?;
        let dev = Arc::new(Mutex::new(Block::new(disk, clone_fd(&irq)?)?));
        devices.push(dev.clone());
        subscribers.push(dev);
    }
    for nic in &config.nics {
        let irq = new_irqfd()?;
        let dev = Arc::new(Mutex::new(Net::new(nic, clone_fd(&irq)?)?));
        devices.push(dev.clone());
        subscribers.push(dev);
    }
    if config.rng {
        let irq = new_irqfd()?;
        let dev =
            Arc::new(Mutex::new(Rng::new(clone_fd(&irq)?).map_err(|e| {
                VmmError::Setup(format!("cannot create virtio-rng: {e}"))
            })?));
        devices.push(dev.clone());
        subscribers.push(dev);
    }
    if let Some(v) = &config.vsock {
        let irq = new_irqfd()?;
        let dev = Arc::new(Mutex::new(Vsock::new(v, clone_fd(&irq)?)?));
        devices.push(dev.clone());
        subscribers.push(dev);
    }
    let mut reports = Vec::new();
    for (slot, (dev, sub)) in devices.into_iter().zip(subscribers).enumerate() {
        let slot = slot as u32;
        let base = VIRTIO_MMIO_BASE + u64::from(slot) * MMIO_LEN;
        let gsi = VIRTIO_GSI_BASE + slot;
        {
            let d = lock(&dev);
            vm.register_irqfd(d.interrupt().irqfd(), gsi)
                .map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
            for (q, evt) in d.queue_events().iter().enumerate() {
                vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                    .map_err(|e| VmmError::Kvm("KVM_IOEVENTFD", e))?;
            }
            reports.push((d.kind(), slot, d.counters().clone()));
        }
        let transport = MmioTransport::new(dev, ram.mem.clone());
        mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_LEN)
            .map_err(|e| VmmError::Setup(e.to_string()))?;
        manager.add_subscriber(sub);
    }
    Ok(Virtio {
        manager,
        devices: reports,
    })
}

/// Wakes the event loop when the VM ends, so it does not wait out its poll timeout.
struct Waker(EventFd);

impl MutEventSubscriber for Waker {
    fn process(&mut self, _events: event_manager::Events, _ops: &mut event_manager::EventOps) {
        let _ = self.0.read();
    }
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        if let Err(e) = ops.add(event_manager::Events::new(
            &self.0,
            event_manager::EventSet::IN,
        )) {
            tracing::warn!("cannot watch the event loop's waker: {e:?}");
        }
    }
}

/// The virtio event loop thread and how to stop it.
struct EventLoop {
    thread: JoinHandle<()>,
    waker: EventFd,
}

impl EventLoop {
    /// Stops the loop (after `stop` was set) and waits for it.
    fn stop(self) {
        let _ = self.waker.write(1);
        let _ = self.thread.join();
    }
}

/// Runs the virtio event loop until `stop`.
fn spawn_event_loop(
    mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    stop: Arc<AtomicBool>,
    exit: ExitHandle,
) -> Result<EventLoop, VmmError> {
    let waker = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| VmmError::Setup(format!("cannot create an eventfd: {e}")))?;
    let theirs = waker
        .try_clone()
        .map_err(|e| VmmError::Setup(format!("cannot clone an eventfd: {e}")))?;
    manager.add_subscriber(Arc::new(Mutex::new(Waker(theirs))));
    let thread = std::thread::Builder::new()
        .name("virtio".into())
        .spawn(move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while !stop.load(Ordering::Acquire) {
                    if let Err(e) = manager.run_with_timeout(1000) {
                        return Err(format!("{e:?}"));
                    }
                }
                Ok(())
            }));
            // Devices without their loop are dead: end the VM with the reason.
            match run {
                Ok(Ok(())) => {}
                Ok(Err(e)) => exit.request(ExitReason::VmmError(format!(
                    "virtio event loop failed: {e}"
                ))),
                Err(_) => exit.request(ExitReason::VmmError("virtio event loop panicked".into())),
            }
        })
        .map_err(|e| VmmError::Setup(format!("cannot start the virtio thread: {e}")))?;
    Ok(EventLoop { thread, waker })
}

/// Asks every vCPU thread to leave KVM_RUN and waits briefly for them. A vCPU blocked in the
/// kernel that misses the kick is left behind: the caller is about to end the VM anyway.
fn stop_vcpus(stop: &AtomicBool, threads: &[JoinHandle<()>], stats: &[Arc<VcpuStats>]) {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_millis(200);
    loop {
        let running: Vec<_> = threads
            .iter()
            .zip(stats)
            .filter(|(_, s)| !s.done.load(Ordering::Acquire))
            .collect();
        if running.is_empty() || Instant::now() >= deadline {
            break;
        }
        for (t, _) in running {
            let _ = t.kill(SIGRTMIN());
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}
