//! The `bexar` command line.

pub mod agent;
pub mod boot_test;
pub mod ctl;
pub mod junit;
pub mod run;
pub mod vmm;
pub mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use bexar_devices::serial::ConsoleConfig;

/// Exit status of `bexar run`, one per way a VM can end (documented in docs/operators-guide.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RunStatus {
    /// The guest powered off, reset, or reported status 0 on the exit port.
    Clean = 0,
    /// The guest reported a non-zero status or a crash.
    GuestFailure = 1,
    /// Bad input: flags, files, sizes.
    BadInput = 2,
    /// Triple fault.
    TripleFault = 3,
    /// KVM could not run the guest (internal error, failed entry) or the VMM failed.
    KvmError = 4,
    /// The timeout expired.
    Timeout = 5,
}

impl From<RunStatus> for ExitCode {
    fn from(s: RunStatus) -> Self {
        ExitCode::from(s as u8)
    }
}

/// One binary per host: an embedded KVM microVM monitor and the host agent that runs VMs for a
/// scheduler.
#[derive(Debug, Parser)]
#[command(name = "bexar", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot one VM in the foreground; the exit status says how the guest ended.
    Run(RunArgs),
    /// Boot one or more images in parallel, wait for a console pattern, write a JUnit report.
    BootTest(BootTestArgs),
    /// Run the host agent: the API socket and every VM on this host.
    Agent(agent::AgentArgs),
    /// Show the host: facts, capacity, health (through the agent).
    Host {
        /// Client options.
        #[command(flatten)]
        opts: ctl::ClientOpts,
    },
    /// Manage VMs through the agent.
    Vm {
        /// Client options.
        #[command(flatten)]
        opts: ctl::ClientOpts,
        /// What to do.
        #[command(subcommand)]
        cmd: ctl::VmCommand,
    },
    /// Manage network segments through the agent.
    Segment {
        /// Client options.
        #[command(flatten)]
        opts: ctl::ClientOpts,
        /// What to do.
        #[command(subcommand)]
        cmd: ctl::SegmentCommand,
    },
    /// Manage base images through the agent.
    Image {
        /// Client options.
        #[command(flatten)]
        opts: ctl::ClientOpts,
        /// What to do.
        #[command(subcommand)]
        cmd: ctl::ImageCommand,
    },
    /// Print lifecycle events (and follow them with -f).
    Events {
        /// Client options.
        #[command(flatten)]
        opts: ctl::ClientOpts,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep printing new events.
        #[arg(short, long)]
        follow: bool,
        /// Only events of this VM.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Run one VM for the agent (internal: the agent starts these).
    #[command(hide = true)]
    Vmm {
        /// The VM's directory (holds launch.json).
        #[arg(long)]
        dir: PathBuf,
    },
}

/// VM flags shared by `run` and `boot-test`.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Initramfs to load.
    #[arg(long, value_name = "PATH")]
    pub initrd: Vec<PathBuf>,
    /// Kernel command line (the VMM may append platform parameters; see --no-platform-params).
    #[arg(long, value_name = "STR")]
    pub cmdline: Vec<String>,
    /// Number of vCPUs (1-32).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    pub memory: u64,
    /// CPU template: host, x86-64-v2 (alias baseline).
    #[arg(long, default_value = "host", value_name = "NAME")]
    pub cpu_template: String,
    /// Stop the VM after this many seconds (exit status 5).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Do not add the platform's kernel parameters (PVM hosts) to the command line.
    #[arg(long)]
    pub no_platform_params: bool,
    /// Add a legacy i8254 PIT (guests without a LAPIC timer or kvm-clock need one).
    #[arg(long)]
    pub legacy_pit: bool,
    /// A virtio-blk disk: PATH[,ro][,serial=ID] (repeatable; the first is /dev/vda).
    #[arg(long, value_name = "PATH[,ro]")]
    pub disk: Vec<bexar_devices::virtio::block::DiskConfig>,
    /// A virtio-net NIC on an existing TAP: tap=NAME[,mac=MAC][,ip=ADDR...] (repeatable; the
    /// guest's addresses, announced after a migration).
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,ip=ADDR]")]
    pub net: Vec<bexar_devices::virtio::net::NicConfig>,
    /// Attach a virtio-rng fed from the host's getrandom.
    #[arg(long)]
    pub rng: bool,
    /// A virtio-vsock device: cid=N,uds=PATH (host connects to PATH and writes "CONNECT <port>";
    /// guest connections to port P reach PATH_P).
    #[arg(long, value_name = "cid=N,uds=PATH")]
    pub vsock: Option<bexar_devices::virtio::vsock::VsockConfig>,
    /// What the guest's SMBIOS tables say of it: serial=S,uuid=U,asset-tag=T (each optional).
    #[arg(long, value_name = "serial=S,uuid=U,asset-tag=T")]
    pub smbios: Option<bexar_vmm::boot::smbios::SmbiosIdentity>,
}

/// Flags of `bexar run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Kernel: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "incoming"])]
    pub kernel: Option<PathBuf>,
    /// Restore the VM saved in this snapshot directory instead of booting a kernel. The VM
    /// comes as saved; the console, stdin, control and timeout flags apply, and --disk, --net
    /// and --vsock, if given, replace the saved backends of their kind (one per saved device).
    #[arg(long, value_name = "DIR", conflicts_with = "kernel")]
    pub restore: Option<PathBuf>,
    /// Receive a VM another VMM migrates here (its control request
    /// {"op":"migrate","to":"PATH"}): listen on this Unix socket, take the guest's memory while
    /// it still runs there, then its state, and run it here. As with --restore, the console,
    /// stdin, control and timeout flags apply.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["kernel", "restore"])]
    pub incoming: Option<PathBuf>,
    /// Serve a control socket here: JSON lines such as {"op":"pause"},
    /// {"op":"snapshot","dir":"DIR","then":"stop"} or {"op":"migrate","to":"PATH"}
    /// (docs/operators-guide.md).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// VM flags.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Console: stdio, none, file:PATH or socket:PATH.
    #[arg(long, default_value = "stdio", value_name = "DEST")]
    pub console: ConsoleConfig,
    /// End the VM successfully when this text appears on the console.
    #[arg(long, value_name = "PATTERN")]
    pub expect: Option<String>,
    /// Write the outcome (reason, timings, memory) as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub result_json: Option<PathBuf>,
    /// Do not feed stdin to the guest's console.
    #[arg(long)]
    pub no_stdin: bool,
    /// Run without the jail (namespaces, empty root, own uid, no capabilities) and without
    /// seccomp. For debugging only: a guest that escapes through a device bug then owns the
    /// host.
    #[arg(long)]
    pub no_jail: bool,
    /// Jailed, keep the VMM in this process and the host's PID namespace. By default the VMM
    /// goes on as pid 1 of a PID namespace of its own: this process forks as it enters the
    /// jail and waits outside (without root, under its own seccomp filter, holding only the
    /// VM), forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and Ctrl+Z to the VMM, connects its
    /// remote disks to their servers (so the VMM's network namespace stays empty), and exits
    /// as the VMM did. With this flag a VMM with remote disks keeps the host's network
    /// namespace, fenced by Landlock to its servers' ports.
    #[arg(long)]
    pub no_pid_namespace: bool,
    /// First uid of the jail's range: the VMM runs as this plus its pid.
    #[arg(long, value_name = "UID", default_value_t = bexar_vmm::jail::DEFAULT_UID_BASE)]
    pub jail_uid_base: u32,
}

/// Flags of `bexar boot-test`.
#[derive(Debug, Clone, Args)]
pub struct BootTestArgs {
    /// Kernel of each image to test (repeat for several images, run in parallel).
    #[arg(long, value_name = "PATH", required = true)]
    pub kernel: Vec<PathBuf>,
    /// VM flags. --initrd and --cmdline are given once for all images or once per image.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Console text that means the image booted (once for all, or once per image). Without it, an
    /// image passes when its guest ends cleanly (power-off, reset, exit-port status 0).
    #[arg(long, value_name = "PATTERN")]
    pub expect: Vec<String>,
    /// Write a JUnit XML report here.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Directory for console logs and results (default: a temporary directory, removed when
    /// every image passed and kept, with its path printed, when one failed).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Images booted at the same time (default: all).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
}

// `bexar run` alone, so that a one-VM process builds only its own flags' parser.
#[derive(Debug, Parser)]
#[command(
    name = "bexar run",
    bin_name = "bexar run",
    version,
    about = "Boot one VM in the foreground; the exit status says how the guest ended."
)]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

// `bexar vmm` alone (the agent's VMM processes).
#[derive(Debug, Parser)]
#[command(
    name = "bexar vmm",
    bin_name = "bexar vmm",
    version,
    about = "Run one VM for the agent (internal: the agent starts these)."
)]
struct VmmOnly {
    /// The VM's directory (holds launch.json).
    #[arg(long)]
    dir: PathBuf,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    init_logging();
    // The processes that run a VM parse only their own flags: the whole command tree (every
    // subcommand's flags and help) is some 30 KiB of heap that a VMM would keep resident for
    // its whole life, once per VM (measured with benches/boot's anonymous memory).
    let mut argv = std::env::args_os();
    let exe = argv.next().unwrap_or_default();
    match argv.next().as_deref().and_then(|a| a.to_str()) {
        Some("run") => {
            let only = RunOnly::parse_from(std::iter::once(exe).chain(argv));
            return run::main(&only.args).into();
        }
        Some("vmm") => {
            let only = VmmOnly::parse_from(std::iter::once(exe).chain(argv));
            return vmm::main(&only.dir);
        }
        _ => {}
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::main(&args).into(),
        Command::BootTest(args) => boot_test::main(&args),
        Command::Agent(args) => agent::main(&args),
        Command::Host { opts } => ctl::host(&opts),
        Command::Vm { opts, cmd } => ctl::vm(&opts, &cmd),
        Command::Segment { opts, cmd } => ctl::segment(&opts, &cmd),
        Command::Image { opts, cmd } => ctl::image(&opts, &cmd),
        Command::Events {
            opts,
            since,
            follow,
            vm,
        } => ctl::events(&opts, since, follow, vm.as_deref()),
        Command::Vmm { dir } => vmm::main(&dir),
    }
}

fn init_logging() {
    use tracing_subscriber::filter::LevelFilter;
    // BEXAR_LOG is a level: error, warn, info (default), debug or trace.
    let level = std::env::var("BEXAR_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
