//! `bexar agent`: the host agent in the foreground (systemd runs it; see
//! docs/contrib/bexar-agent.service).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use bexar_agent::host::CapacityConfig;
use bexar_agent::{Agent, AgentConfig, DEFAULT_SOCKET, DEFAULT_STATE_DIR};

/// Flags of `bexar agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// API socket (owner-only; root and the agent's user may connect).
    #[arg(long, env = "BEXAR_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Also serve the API read-only (GET only, no interactive console) on this socket, mode
    /// 0660: give its group to the people who may inspect the host.
    #[arg(long, value_name = "PATH")]
    pub debug_socket: Option<PathBuf>,
    /// State directory: VM records, logs, VMM sockets.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Host CPUs kept for the host.
    #[arg(long, default_value_t = 0)]
    pub reserved_vcpus: u32,
    /// vCPUs per host CPU.
    #[arg(long, default_value_t = 16.0)]
    pub cpu_allocation_ratio: f64,
    /// Host memory kept for the host, MiB.
    #[arg(long, default_value_t = 512)]
    pub reserved_memory_mib: u64,
    /// Guest memory per MiB of host memory.
    #[arg(long, default_value_t = 1.0)]
    pub memory_allocation_ratio: f64,
    /// Disk space of the state directory's file system kept for the host, MiB.
    #[arg(long, default_value_t = 0)]
    pub reserved_disk_mib: u64,
    /// Disk MiB that overlays may be provisioned per MiB of that file system (they are
    /// thin: they grow as guests write).
    #[arg(long, default_value_t = 1.0)]
    pub disk_allocation_ratio: f64,
    /// Host memory (MiB) counted for each VM beyond its guest memory: its VMM and the kernel's
    /// state for it (measured 1.1 MiB for an idle VM; see the operator's guide on sizing).
    #[arg(long, default_value_t = bexar_agent::host::VM_OVERHEAD_MIB)]
    pub vm_overhead_mib: u64,
    /// Seconds a graceful stop waits before forcing.
    #[arg(long, default_value_t = 10.0)]
    pub stop_timeout: f64,
    /// Seconds between network repair passes: the kernel's links and nftables tables are
    /// compared with the records and what differs is put back. A pass on a host where nothing
    /// changed costs one netlink round trip for the filter and one link listing.
    #[arg(long, default_value_t = 30.0)]
    pub network_repair: f64,
    /// First restart delay of restart policies, seconds (doubles per restart, at most 60).
    #[arg(long, default_value_t = 1.0)]
    pub restart_backoff: f64,
    /// Interface that carries bridged segments off the host, each tagged with its VLAN id
    /// (the agent adds an 802.1Q interface per segment on it).
    #[arg(long, value_name = "IFACE")]
    pub uplink: Option<String>,
    /// This host's IPv4 address on the network between hosts (the underlay): segments created
    /// with `overlay: vxlan` reach the other hosts through VXLAN sent from it.
    #[arg(long, value_name = "ADDR")]
    pub overlay_local: Option<std::net::Ipv4Addr>,
    /// Another host's underlay address, for segments that span hosts (repeat for each host).
    #[arg(long = "overlay-peer", value_name = "ADDR", requires = "overlay_local")]
    pub overlay_peers: Vec<std::net::Ipv4Addr>,
    /// UDP port of the overlay's VXLAN (the same on every host).
    #[arg(long, default_value_t = 4789, value_name = "PORT")]
    pub overlay_port: u16,
    /// Where the instance metadata service listens, or `off`.
    #[arg(
        long,
        default_value = "169.254.169.254:80",
        value_name = "ADDR:PORT|off"
    )]
    pub imds_listen: String,
    /// Availability zone (and region) the metadata service reports.
    #[arg(long, default_value = "bexar")]
    pub zone: String,
    /// Run VMMs without their jail and seccomp filters. For hosts where the jail cannot be set
    /// up, and for debugging: a guest that escapes through a device bug then owns the host.
    #[arg(long)]
    pub no_jail: bool,
    /// First uid of the VMMs' range: each VMM runs as this plus its pid, so the range
    /// [UID, UID + pid_max) must belong to no one else.
    #[arg(long, value_name = "UID", default_value_t = bexar_vmm::jail::DEFAULT_UID_BASE)]
    pub jail_uid_base: u32,
    /// cgroup (relative to each hierarchy's root) the VMs' cgroups are made in, or `off`.
    /// Under systemd, the unit's delegated subtree (Delegate=yes; docs/operators-guide.md).
    #[arg(long, default_value = "bexar", value_name = "PATH|off")]
    pub cgroup_parent: String,
    /// Memory a VM's cgroup allows beyond its guest memory (its VMM, page cache of its
    /// disks), MiB.
    #[arg(long, default_value_t = bexar_agent::sandbox::DEFAULT_MEMORY_HEADROOM_MIB)]
    pub vm_memory_headroom_mib: u64,
    /// Leave the host's cgroup2 mount as it is. By default the agent remounts it with
    /// `favordynmods` (Linux 6.0+), which makes moving a VMM into its cgroups cost microseconds
    /// instead of an RCU grace period (3-20 ms per VM start), at a small cost to every fork
    /// and exit on the host (docs/operators-guide.md).
    #[arg(long)]
    pub no_cgroup_favordynmods: bool,
    /// Take live migrations from other hosts on this TCP address (HOST:PORT); needs the three
    /// --migration-* certificate flags. Off by default.
    #[arg(long, value_name = "ADDR", requires = "migration_cert")]
    pub migration_listen: Option<std::net::SocketAddr>,
    /// This host's certificate chain (PEM), signed by the migration CA: shown to the hosts it
    /// sends VMs to and takes them from.
    #[arg(long, value_name = "PEM", requires_all = ["migration_key", "migration_ca"])]
    pub migration_cert: Option<PathBuf>,
    /// The private key of --migration-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "migration_cert")]
    pub migration_key: Option<PathBuf>,
    /// The migration CA (PEM): only hosts whose certificates it signed may send or take VMs.
    #[arg(long, value_name = "PEM", requires = "migration_cert")]
    pub migration_ca: Option<PathBuf>,
}

fn seconds(flag: &str, v: f64) -> Result<Duration, String> {
    if v.is_finite() && (0.0..=3600.0).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "--{flag}: {v} is not a number of seconds in 0-3600"
        ))
    }
}

fn ratio(flag: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() && v > 0.0 && v <= 1000.0 {
        Ok(v)
    } else {
        Err(format!("--{flag}: {v} is not a ratio in (0, 1000]"))
    }
}

fn iface(flag: &str, name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!("--{flag}: {name:?} is not an interface name"))
    }
}

fn config(a: &AgentArgs) -> Result<AgentConfig, String> {
    Ok(AgentConfig {
        state_dir: std::path::absolute(&a.state_dir).map_err(|e| format!("--state-dir: {e}"))?,
        exe: std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?,
        capacity: CapacityConfig {
            reserved_vcpus: a.reserved_vcpus,
            cpu_allocation_ratio: ratio("cpu-allocation-ratio", a.cpu_allocation_ratio)?,
            reserved_memory_mib: a.reserved_memory_mib,
            memory_allocation_ratio: ratio("memory-allocation-ratio", a.memory_allocation_ratio)?,
            reserved_disk_mib: a.reserved_disk_mib,
            disk_allocation_ratio: ratio("disk-allocation-ratio", a.disk_allocation_ratio)?,
            vm_overhead_mib: a.vm_overhead_mib,
        },
        restart_backoff: seconds("restart-backoff", a.restart_backoff)?,
        stop_timeout: seconds("stop-timeout", a.stop_timeout)?,
        network: bexar_agent::network::NetworkConfig {
            uplink: a
                .uplink
                .as_deref()
                .map(|u| iface("uplink", u))
                .transpose()?,
            overlay: a
                .overlay_local
                .map(|local| {
                    if a.overlay_peers.contains(&local) {
                        return Err("--overlay-peer: this host's own --overlay-local".to_owned());
                    }
                    if a.overlay_port == 0 {
                        return Err("--overlay-port: 0 is not a port".to_owned());
                    }
                    let mut peers = a.overlay_peers.clone();
                    peers.sort();
                    peers.dedup();
                    Ok(bexar_agent::netplan::OverlayConfig {
                        local,
                        peers,
                        port: a.overlay_port,
                    })
                })
                .transpose()?,
        },
        sandbox: bexar_agent::sandbox::SandboxConfig {
            jail: !a.no_jail,
            uid_base: a.jail_uid_base,
            cgroup_parent: (a.cgroup_parent != "off").then(|| PathBuf::from(&a.cgroup_parent)),
            memory_headroom_mib: a.vm_memory_headroom_mib,
            favor_dynmods: !a.no_cgroup_favordynmods,
        },
        migration: match (&a.migration_cert, &a.migration_key, &a.migration_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(bexar_agent::migrate::MigrationConfig {
                listen: a.migration_listen,
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        },
    })
}

/// Runs `bexar agent` until SIGTERM or SIGINT.
pub fn main(a: &AgentArgs) -> ExitCode {
    let config = match config(a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bexar agent: {e}");
            return ExitCode::from(2);
        }
    };
    let repair_every = match seconds("network-repair", a.network_repair) {
        Ok(d) if d >= Duration::from_millis(100) => d,
        Ok(_) => {
            eprintln!("bexar agent: --network-repair: at least 0.1 seconds");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("bexar agent: {e}");
            return ExitCode::from(2);
        }
    };
    // Before anything opens a hundred descriptors.
    bexar_agent::sandbox::reserve_passed_fds();
    // Four descriptors per running VM: a shell's default soft limit of 1024 would stop the
    // agent near 240 VMs however high the hard limit is.
    match bexar_agent::host::raise_open_files() {
        Ok((before, after)) if before < after => {
            tracing::info!("open-file limit raised from {before} to {after}")
        }
        Ok((_, limit)) => tracing::info!("open-file limit {limit}"),
        Err(e) => tracing::warn!("cannot read or raise the open-file limit: {e}"),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bexar agent: cannot start the runtime: {e}");
            return ExitCode::from(4);
        }
    };
    rt.block_on(async {
        // Reads are answered as soon as the records are loaded; re-adoption and the network
        // run beside the API (changes wait for re-adoption).
        let agent = match Agent::load(config) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("bexar agent: {e}");
                return ExitCode::from(2);
            }
        };
        if a.imds_listen != "off" {
            let addr: std::net::SocketAddr = match a.imds_listen.parse() {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("bexar agent: --imds-listen {}: {e}", a.imds_listen);
                    return ExitCode::from(2);
                }
            };
            match bexar_agent::imds::bind(addr) {
                Ok(l) => {
                    tracing::info!(%addr, "metadata service listening");
                    // Connections wait in the backlog until the first network pass has told the
                    // service which NIC is which: before that it could only refuse every guest.
                    let (imds, zone) = (agent.clone(), a.zone.clone());
                    tokio::spawn(async move {
                        imds.wired().await;
                        bexar_agent::imds::serve(imds, l, zone).await
                    });
                }
                Err(e) => tracing::error!("metadata service cannot listen on {addr}: {e}"),
            }
        }
        if let Some(addr) = a.migration_listen {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!(%addr, "taking live migrations");
                    tokio::spawn(agent.clone().serve_migrations(l));
                }
                Err(e) => {
                    eprintln!("bexar agent: --migration-listen {addr}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        let recovering = agent.clone();
        tokio::spawn(async move { recovering.recover_and_wire().await });
        // Repair: links or rules removed behind the agent's back come back.
        let repair = agent.clone();
        tokio::spawn(async move {
            repair.recovered().await;
            loop {
                tokio::time::sleep(repair_every).await;
                if let Err(e) = repair.sync_network().await {
                    tracing::warn!("network repair: {e}");
                }
            }
        });
        // Remote disks: their connections, as the VMMs see them, into records and events.
        let watch = agent.clone();
        tokio::spawn(async move {
            watch.recovered().await;
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                watch.watch_remote_disks().await;
            }
        });
        match bexar_agent::api::serve(agent, a.socket.clone(), a.debug_socket.clone()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bexar agent: {}: {e}", a.socket.display());
                ExitCode::from(2)
            }
        }
    })
}
