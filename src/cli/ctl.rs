//! The client commands: `bexar host`, `bexar vm ...`, `bexar events`. Each is one or two API
//! calls; tables for people by default, the API's JSON with `--json`.
//!
//! Exit status: 0 done, 1 refused by the agent (4xx), 2 bad usage, 3 agent unreachable,
//! 4 agent or VMM error (5xx), 5 a wait timed out.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use bexar_agent::api::client::{Client, ClientError, Reply};
use bexar_agent::spec::{
    default_template, BootSpec, DiskSpec, NicSpec, RestartPolicy, RestoreSpec, VmSpec, VsockSpec,
};

/// Options every client command takes.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// The agent's API socket.
    #[arg(long, env = "BEXAR_SOCKET", default_value = bexar_agent::DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `bexar vm` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum VmCommand {
    /// Define a VM (and start it with --start).
    Create(Box<CreateArgs>),
    /// List VMs.
    Ls {
        /// Label selector: key=value[,key...].
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Only VMs in this state.
        #[arg(long)]
        state: Option<String>,
        /// One page of at most N VMs (1-1000); without it every page is fetched and shown.
        #[arg(long)]
        limit: Option<u32>,
        /// Only VMs whose id sorts after this one (the `next` a page printed).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one VM.
    Get {
        /// VM id.
        id: String,
    },
    /// Start a VM (a suspended one resumes where it was).
    Start {
        /// VM id.
        id: String,
        /// Boot even if a restore is pending (drops a suspended VM's saved state).
        #[arg(long)]
        fresh: bool,
    },
    /// Stop a VM: Ctrl-Alt-Del, then forced after the timeout.
    Stop {
        /// VM id.
        id: String,
        /// Seconds to wait for the guest to shut down.
        #[arg(long)]
        timeout: Option<f64>,
        /// Do not ask the guest; stop at once.
        #[arg(long)]
        force: bool,
    },
    /// Reboot a VM (graceful stop, then start).
    Reboot {
        /// VM id.
        id: String,
        /// Seconds to wait for the guest to shut down.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// VM id.
        id: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM id.
        id: String,
    },
    /// Snapshot a running or paused VM into NAME (listed under the VM).
    Snapshot {
        /// VM id.
        id: String,
        /// Snapshot name.
        name: String,
        /// Afterwards: resume, pause, stop, or suspend (stop; the next start restores it).
        #[arg(long, default_value = "resume")]
        then: String,
    },
    /// Hand a running VM to a new VMM process of the agent's binary (live upgrade).
    Upgrade {
        /// VM id.
        id: String,
    },
    /// Move a running VM to another host's agent (live migration; both agents need
    /// --migration-* certificates from one CA, the destination --migration-listen).
    Migrate {
        /// VM id.
        id: String,
        /// The destination agent's migration listener, HOST:PORT.
        #[arg(long)]
        to: String,
        /// The largest pause wanted, milliseconds.
        #[arg(long)]
        downtime_ms: Option<u32>,
        /// The most pre-copy rounds (0: stop-and-copy).
        #[arg(long)]
        max_rounds: Option<u32>,
        /// The most MiB a second the copy sends while the guest runs.
        #[arg(long)]
        max_bandwidth_mib: Option<u32>,
    },
    /// Cancel a VM's live migration before its switch-over (the VM goes on here).
    MigrateCancel {
        /// VM id.
        id: String,
    },
    /// Have a VM's live migration switch over after the round under way, whatever its
    /// downtime budget (the rest of the round goes without the bandwidth limit).
    MigrateComplete {
        /// VM id.
        id: String,
    },
    /// List a VM's snapshots.
    Snapshots {
        /// VM id.
        id: String,
    },
    /// Delete a VM's snapshot.
    RmSnapshot {
        /// VM id.
        id: String,
        /// Snapshot name.
        name: String,
    },
    /// Delete a VM and everything it owns.
    Rm {
        /// VM id.
        id: String,
    },
    /// Wait until a VM is in a state (or deleted).
    Wait {
        /// VM id.
        id: String,
        /// creating, stopped, running, paused, failed, deleting or deleted.
        #[arg(long)]
        state: String,
        /// Seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Attach to the VM's serial console (Ctrl-] detaches).
    Console {
        /// VM id.
        id: String,
    },
    /// Print the VM's console log.
    Logs {
        /// VM id.
        id: String,
        /// Keep printing while the VM runs.
        #[arg(short, long)]
        follow: bool,
        /// Start at this byte offset.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
}

/// `bexar vm create`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// VM id.
    pub id: Option<String>,
    /// The whole spec as a JSON file (`-` for stdin); the other flags are then not used.
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    /// Kernel (absolute path).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Memory, MiB.
    #[arg(long, default_value_t = 128)]
    pub memory: u64,
    /// CPU template.
    #[arg(long)]
    pub cpu_template: Option<String>,
    /// A disk: PATH[,ro][,direct][,serial=ID][,format=raw|qcow2], or a copy-on-write
    /// overlay on a registered image: image=ID[,size=MIB][,ro][,serial=ID] (repeatable).
    #[arg(long)]
    pub disk: Vec<String>,
    /// A NIC: segment=ID[,mac=MAC][,ip=A][,ip6=A] or tap=NAME[,mac=MAC] (repeatable).
    #[arg(long)]
    pub net: Vec<String>,
    /// Attach a virtio-rng.
    #[arg(long)]
    pub rng: bool,
    /// Attach a virtio-vsock with this guest CID.
    #[arg(long)]
    pub vsock_cid: Option<u32>,
    /// A label key=value (repeatable).
    #[arg(long = "label", short = 'L')]
    pub labels: Vec<String>,
    /// Restart policy: no, on-failure, always.
    #[arg(long)]
    pub restart: Option<String>,
    /// The VM's UUID (its SMBIOS system UUID); default: a random one.
    #[arg(long)]
    pub uuid: Option<String>,
    /// Start from a snapshot: VM/NAME (a snapshot of a VM on this host) or a snapshot
    /// directory. The spec must describe the snapshot's machine.
    #[arg(long, value_name = "VM/NAME|DIR")]
    pub from_snapshot: Option<String>,
    /// Start it too.
    #[arg(long)]
    pub start: bool,
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// A NIC from `--net`: `segment=ID[,mac=MAC][,ip=A][,ip6=A]` or `tap=NAME[,mac=MAC]`.
fn nic_from_flag(n: &str) -> Result<NicSpec, String> {
    let mut nic = NicSpec::default();
    for opt in n.split(',') {
        let bad = |what: &str, v: &str| format!("--net: {what} {v:?} is not an address");
        match opt.split_once('=') {
            Some(("segment", v)) => nic.segment = Some(v.to_owned()),
            Some(("tap", v)) => nic.tap = Some(v.to_owned()),
            Some(("mac", v)) => nic.mac = Some(v.to_owned()),
            Some(("ip", v)) => nic.ipv4 = Some(v.parse().map_err(|_| bad("ip", v))?),
            Some(("ip6", v)) => nic.ipv6 = Some(v.parse().map_err(|_| bad("ip6", v))?),
            _ => {
                return Err(format!(
                    "--net: unknown option {opt:?} (segment=ID, tap=NAME, mac=MAC, ip=A, ip6=A)"
                ))
            }
        }
    }
    Ok(nic)
}

/// The VM spec to send: the file as given (the agent checks it and names what it refuses),
/// or one built from the flags.
fn spec_from_flags(a: &CreateArgs) -> Result<Value, String> {
    if let Some(f) = &a.file {
        let text = if f.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).map_err(|e| format!("stdin: {e}"))?
        } else {
            std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?
        };
        let mut v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        if let (Some(id), Some(o)) = (&a.id, v.as_object_mut()) {
            o.insert("id".into(), json!(id));
        }
        return Ok(v);
    }
    let id = a.id.clone().ok_or("a VM id is needed (or --file)")?;
    let kernel = a.kernel.as_ref().ok_or("--kernel is needed (or --file)")?;
    let disks = a
        .disk
        .iter()
        .map(|d| {
            let mut disk: DiskSpec = d.parse().map_err(|e| format!("--disk: {e}"))?;
            disk.path = disk.path.as_deref().map(absolute);
            Ok(disk)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let labels = a
        .labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or(format!("--label {l:?}: expected key=value"))
        })
        .collect::<Result<_, String>>()?;
    let restart_policy = match &a.restart {
        None => RestartPolicy::default(),
        Some(r) => RestartPolicy::parse(r)
            .ok_or_else(|| format!("--restart {r:?}: expected no, on-failure or always"))?,
    };
    let spec = VmSpec {
        id,
        vcpus: a.vcpus,
        memory_mib: a.memory,
        cpu_template: a.cpu_template.clone().unwrap_or_else(default_template),
        boot: BootSpec {
            kernel: absolute(kernel),
            initrd: a.initrd.as_deref().map(absolute),
            cmdline: a.cmdline.clone(),
        },
        disks,
        nics: a
            .net
            .iter()
            .map(|n| nic_from_flag(n))
            .collect::<Result<_, _>>()?,
        rng: a.rng,
        vsock: a.vsock_cid.map(|cid| VsockSpec { cid }),
        labels,
        restart_policy,
        uuid: a
            .uuid
            .as_deref()
            .map(|u| u.parse().map_err(|e| format!("--uuid {u:?}: {e}")))
            .transpose()?,
        restore: a.from_snapshot.as_deref().map(|s| match s.split_once('/') {
            Some((vm, name)) if !vm.is_empty() && !name.contains('/') => RestoreSpec {
                vm: Some(vm.to_owned()),
                snapshot: Some(name.to_owned()),
                path: None,
            },
            _ => RestoreSpec {
                vm: None,
                snapshot: None,
                path: Some(absolute(std::path::Path::new(s))),
            },
        }),
    };
    serde_json::to_value(spec).map_err(|e| e.to_string())
}

/// Maps an API reply to an exit status, printing errors.
fn check(reply: &Reply) -> Result<(), ExitCode> {
    if reply.status.is_success() {
        return Ok(());
    }
    let v = reply.json();
    let msg = v["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&reply.body).into_owned());
    eprintln!("bexar: {msg} ({})", reply.status);
    Err(ExitCode::from(match reply.status.as_u16() {
        408 => 5,
        s if s >= 500 => 4,
        _ => 1,
    }))
}

fn unreachable(e: ClientError) -> ExitCode {
    eprintln!("bexar: {e}");
    ExitCode::from(3)
}

/// The exit status of a call whose reply body has nothing more to print.
fn status_of(r: Result<Reply, ClientError>) -> ExitCode {
    match r {
        Ok(r) => check(&r).err().unwrap_or(ExitCode::SUCCESS),
        Err(e) => unreachable(e),
    }
}

fn age(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let s = bexar_agent::spec::now_ms().saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn print_vms(items: &[Value]) {
    println!(
        "{:<24} {:<9} {:>5} {:>8} {:>8} {:>7}  {:<24} REASON",
        "ID", "STATE", "VCPUS", "MEMORY", "PID", "UPTIME", "LABELS"
    );
    for v in items {
        let labels: Vec<String> = v["spec"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        let running = matches!(v["state"].as_str(), Some("running" | "paused"));
        println!(
            "{:<24} {:<9} {:>5} {:>7}M {:>8} {:>7}  {:<24} {}",
            v["id"].as_str().unwrap_or(""),
            v["state"].as_str().unwrap_or(""),
            v["spec"]["vcpus"].as_u64().unwrap_or(0),
            v["spec"]["memory_mib"].as_u64().unwrap_or(0),
            v["status"]["pid"]
                .as_u64()
                .map_or("-".into(), |p| p.to_string()),
            if running {
                age(v["status"]["started_ms"].as_u64())
            } else {
                "-".into()
            },
            labels.join(","),
            if running {
                ""
            } else {
                v["status"]["exit_reason"].as_str().unwrap_or("")
            }
        );
    }
}

/// Prints a reply's JSON (an answer with no table form), or the error.
fn print_json(r: Result<Reply, ClientError>) -> ExitCode {
    match r {
        Ok(r) => {
            if let Err(code) = check(&r) {
                return code;
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&r.json()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => unreachable(e),
    }
}

fn show(opts: &ClientOpts, reply: &Reply, table: impl FnOnce(&Value)) {
    show_value(opts, &reply.json(), table)
}

fn show_value(opts: &ClientOpts, v: &Value, table: impl FnOnce(&Value)) {
    if opts.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        table(v);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a single-threaded tokio runtime")
}

/// `bexar host`.
pub fn host(opts: &ClientOpts) -> ExitCode {
    runtime().block_on(async {
        let c = Client::new(&opts.socket);
        let r = match c.get("/v1/host").await {
            Ok(r) => r,
            Err(e) => return unreachable(e),
        };
        if let Err(code) = check(&r) {
            return code;
        }
        show(opts, &r, |v| {
            let i = &v["info"];
            let inv = &v["inventory"];
            println!("host      {} (bexar {}, kernel {})", i["hostname"].as_str().unwrap_or(""), i["version"].as_str().unwrap_or(""), i["kernel"].as_str().unwrap_or(""));
            println!("cpu       {}", i["cpu_model"].as_str().unwrap_or(""));
            println!("kvm       {} (API {})", i["kvm"]["flavour"].as_str().unwrap_or(""), i["kvm"]["api_version"]);
            println!("health    {}", v["health"]["status"].as_str().unwrap_or(""));
            for (name, key, unit) in [("vcpus", "vcpus", ""), ("memory", "memory_mib", " MiB")] {
                let r = &inv[key];
                println!(
                    "{name:<9} {}{unit} allocated of {}{unit} (total {}, reserved {}, ratio {}), {}{unit} free",
                    r["allocated"], r["capacity"], r["total"], r["reserved"], r["allocation_ratio"], r["free"]
                );
            }
            println!(
                "disk      {} MiB available of {} MiB, VM images {} MiB",
                inv["disk"]["available_mib"], inv["disk"]["total_mib"], inv["disk"]["allocated_mib"]
            );
            let f = &inv["files"];
            println!(
                "files     {} open of {} ({} per VM, {} kept free): room for {} more VMs",
                f["open"], f["limit"], f["per_vm"], f["reserved"], f["vms_more"]
            );
            println!("vms       {}", v["vms"]);
        });
        ExitCode::SUCCESS
    })
}

/// `bexar events`.
pub fn events(opts: &ClientOpts, since: u64, follow: bool, vm: Option<&str>) -> ExitCode {
    runtime().block_on(async {
        let c = Client::new(&opts.socket);
        let mut path = format!("/v1/events?since={since}&follow={follow}");
        if let Some(v) = vm {
            path.push_str(&format!("&vm={v}"));
        }
        let mut pending = Vec::new();
        let json = opts.json;
        let r = c
            .stream(&path, |chunk| {
                pending.extend_from_slice(chunk);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let text = String::from_utf8_lossy(&line);
                    if json {
                        print!("{text}");
                    } else if let Ok(e) = serde_json::from_str::<Value>(&text) {
                        println!(
                            "{:>6}  {:<20} {:<14} {:<9} {}",
                            e["seq"],
                            e["vm"].as_str().unwrap_or(""),
                            e["kind"].as_str().unwrap_or(""),
                            e["state"].as_str().unwrap_or(""),
                            e["message"].as_str().unwrap_or("")
                        );
                    }
                    let _ = std::io::stdout().flush();
                }
                true
            })
            .await;
        status_of(r)
    })
}

/// `bexar segment` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum SegmentCommand {
    /// Define a segment.
    Create {
        /// Segment id.
        id: String,
        /// VLAN id (1-4094).
        #[arg(long)]
        vlan: u16,
        /// `routed` (the host is the gateway: IPv4 NAT, IPv6 routed) or `bridged`.
        #[arg(long, default_value = "routed")]
        mode: String,
        /// IPv4 subnet, e.g. 10.1.0.0/24.
        #[arg(long)]
        ipv4: Option<String>,
        /// IPv4 gateway (default for routed: the first address).
        #[arg(long)]
        gateway: Option<String>,
        /// IPv6 /64 prefix, e.g. 2001:db8:1::/64.
        #[arg(long)]
        ipv6: Option<String>,
    },
    /// List segments.
    Ls,
    /// Show one segment.
    Get {
        /// Segment id.
        id: String,
    },
    /// Delete a segment no NIC uses.
    Rm {
        /// Segment id.
        id: String,
    },
}

fn print_segments(items: &[Value]) {
    println!(
        "{:<24} {:>5} {:<8} {:<20} {:<16} IPV6",
        "ID", "VLAN", "MODE", "IPV4", "GATEWAY"
    );
    for s in items {
        println!(
            "{:<24} {:>5} {:<8} {:<20} {:<16} {}",
            s["id"].as_str().unwrap_or(""),
            s["vlan"].as_u64().unwrap_or(0),
            s["mode"].as_str().unwrap_or(""),
            s["ipv4"]["subnet"].as_str().unwrap_or("-"),
            s["ipv4"]["gateway"].as_str().unwrap_or("-"),
            s["ipv6"]["prefix"].as_str().unwrap_or("-"),
        );
    }
}

/// `bexar segment ...`.
pub fn segment(opts: &ClientOpts, cmd: &SegmentCommand) -> ExitCode {
    runtime().block_on(async {
        let c = Client::new(&opts.socket);
        let r = match cmd {
            SegmentCommand::Create {
                id,
                vlan,
                mode,
                ipv4,
                gateway,
                ipv6,
            } => {
                let mut body = json!({"id": id, "vlan": vlan, "mode": mode});
                if let Some(n) = ipv4 {
                    body["ipv4"] = json!({"subnet": n});
                    if let Some(g) = gateway {
                        body["ipv4"]["gateway"] = json!(g);
                    }
                }
                if let Some(p) = ipv6 {
                    body["ipv6"] = json!({"prefix": p});
                }
                c.post("/v1/segments", &body).await
            }
            SegmentCommand::Ls => c.get("/v1/segments").await,
            SegmentCommand::Get { id } => c.get(&format!("/v1/segments/{id}")).await,
            SegmentCommand::Rm { id } => {
                return status_of(c.delete(&format!("/v1/segments/{id}")).await)
            }
        };
        match r {
            Ok(r) => {
                if let Err(code) = check(&r) {
                    return code;
                }
                show(opts, &r, |v| match v["items"].as_array() {
                    Some(items) => print_segments(items),
                    None => print_segments(std::slice::from_ref(v)),
                });
                ExitCode::SUCCESS
            }
            Err(e) => unreachable(e),
        }
    })
}

/// `bexar image` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ImageCommand {
    /// Register a base image (the agent copies and hashes the file).
    Add {
        /// Image id.
        id: String,
        /// The file (raw or qcow2, self-contained).
        path: PathBuf,
        /// `raw` or `qcow2` (default: probed).
        #[arg(long)]
        format: Option<String>,
    },
    /// List images.
    Ls,
    /// Show one image.
    Get {
        /// Image id.
        id: String,
    },
    /// Delete an image no VM uses.
    Rm {
        /// Image id.
        id: String,
    },
}

fn print_images(items: &[Value]) {
    println!(
        "{:<24} {:<6} {:>10} {:>10} SHA256",
        "ID", "FORMAT", "SIZE_MIB", "FILE_MIB"
    );
    for i in items {
        let mib = |k: &str| i[k].as_u64().unwrap_or(0).div_ceil(1 << 20);
        println!(
            "{:<24} {:<6} {:>10} {:>10} {}",
            i["id"].as_str().unwrap_or(""),
            i["format"].as_str().unwrap_or(""),
            mib("virtual_size"),
            mib("file_size"),
            i["sha256"].as_str().unwrap_or(""),
        );
    }
}

/// `bexar image ...`.
pub fn image(opts: &ClientOpts, cmd: &ImageCommand) -> ExitCode {
    runtime().block_on(async {
        let c = Client::new(&opts.socket);
        let r = match cmd {
            ImageCommand::Add { id, path, format } => {
                let mut body = json!({"id": id, "path": absolute(path)});
                if let Some(f) = format {
                    body["format"] = json!(f);
                }
                c.post("/v1/images", &body).await
            }
            ImageCommand::Ls => c.get("/v1/images").await,
            ImageCommand::Get { id } => c.get(&format!("/v1/images/{id}")).await,
            ImageCommand::Rm { id } => {
                return status_of(c.delete(&format!("/v1/images/{id}")).await)
            }
        };
        match r {
            Ok(r) => {
                if let Err(code) = check(&r) {
                    return code;
                }
                show(opts, &r, |v| match v["items"].as_array() {
                    Some(items) => print_images(items),
                    None => print_images(std::slice::from_ref(v)),
                });
                ExitCode::SUCCESS
            }
            Err(e) => unreachable(e),
        }
    })
}

/// `bexar vm ...`.
pub fn vm(opts: &ClientOpts, cmd: &VmCommand) -> ExitCode {
    runtime().block_on(vm_async(opts, cmd))
}

async fn vm_async(opts: &ClientOpts, cmd: &VmCommand) -> ExitCode {
    let c = Client::new(&opts.socket);
    let one = |r: &Reply| {
        show(opts, r, |v| print_vms(std::slice::from_ref(v)));
    };
    let reply = match cmd {
        VmCommand::Create(a) => {
            let spec = match spec_from_flags(a) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bexar vm create: {e}");
                    return ExitCode::from(2);
                }
            };
            c.post(&format!("/v1/vms?start={}", a.start), &spec).await
        }
        VmCommand::Ls {
            selector,
            state,
            limit,
            after,
        } => {
            // Pages are fetched one after another (following `next`) unless one was asked for.
            let mut after = after.clone();
            let mut items: Vec<Value> = Vec::new();
            loop {
                let mut q: Vec<(&str, String)> = Vec::new();
                if let Some(s) = selector {
                    q.push(("selector", s.clone()));
                }
                if let Some(s) = state {
                    q.push(("state", s.clone()));
                }
                if let Some(n) = limit {
                    q.push(("limit", n.to_string()));
                }
                if let Some(a) = &after {
                    q.push(("after", a.clone()));
                }
                let qs = serde_urlencoded::to_string(&q).unwrap_or_default();
                let r = match c.get(&format!("/v1/vms?{qs}")).await {
                    Ok(r) => r,
                    Err(e) => return unreachable(e),
                };
                if let Err(code) = check(&r) {
                    return code;
                }
                let page: Value = r.json();
                items.extend(page["items"].as_array().cloned().unwrap_or_default());
                let next = page["next"].as_str().map(str::to_owned);
                if limit.is_some() || next.is_none() {
                    let mut all = serde_json::json!({ "items": items });
                    if let (Some(n), Some(_)) = (&next, limit) {
                        all["next"] = n.clone().into();
                    }
                    show_value(opts, &all, |v| {
                        print_vms(v["items"].as_array().map_or(&[][..], |a| a.as_slice()));
                        if let Some(n) = v["next"].as_str() {
                            println!("(more: --after {n})");
                        }
                    });
                    return ExitCode::SUCCESS;
                }
                after = next;
            }
        }
        VmCommand::Get { id } => c.get(&format!("/v1/vms/{id}")).await,
        VmCommand::Start { id, fresh } => {
            let p = format!(
                "/v1/vms/{id}/start{}",
                if *fresh { "?fresh=true" } else { "" }
            );
            c.post(&p, &Value::Null).await
        }
        VmCommand::Stop { id, timeout, force } => {
            let mut p = format!("/v1/vms/{id}/stop?force={force}");
            if let Some(t) = timeout {
                p.push_str(&format!("&timeout={t}"));
            }
            c.post(&p, &Value::Null).await
        }
        VmCommand::Reboot { id, timeout } => {
            let mut p = format!("/v1/vms/{id}/reboot");
            if let Some(t) = timeout {
                p.push_str(&format!("?timeout={t}"));
            }
            c.post(&p, &Value::Null).await
        }
        VmCommand::Pause { id } => c.post(&format!("/v1/vms/{id}/pause"), &Value::Null).await,
        VmCommand::Resume { id } => c.post(&format!("/v1/vms/{id}/resume"), &Value::Null).await,
        VmCommand::Rm { id } => return status_of(c.delete(&format!("/v1/vms/{id}")).await),
        VmCommand::Snapshot { id, name, then } => {
            let body = serde_json::json!({ "name": name, "then": then });
            return print_json(c.post(&format!("/v1/vms/{id}/snapshot"), &body).await);
        }
        VmCommand::Upgrade { id } => c.post(&format!("/v1/vms/{id}/upgrade"), &Value::Null).await,
        VmCommand::Migrate {
            id,
            to,
            downtime_ms,
            max_rounds,
            max_bandwidth_mib,
        } => {
            let mut body = serde_json::json!({ "destination": to });
            if let Some(m) = max_bandwidth_mib {
                body["max_bandwidth_mib"] = (*m).into();
            }
            if let Some(ms) = downtime_ms {
                body["downtime_ms"] = (*ms).into();
            }
            if let Some(n) = max_rounds {
                body["max_rounds"] = (*n).into();
            }
            return print_json(c.post(&format!("/v1/vms/{id}/migrate"), &body).await);
        }
        VmCommand::MigrateCancel { id } => {
            c.post(&format!("/v1/vms/{id}/migrate/cancel"), &Value::Null)
                .await
        }
        VmCommand::MigrateComplete { id } => {
            c.post(&format!("/v1/vms/{id}/migrate/complete"), &Value::Null)
                .await
        }
        VmCommand::Snapshots { id } => {
            return print_json(c.get(&format!("/v1/vms/{id}/snapshots")).await)
        }
        VmCommand::RmSnapshot { id, name } => {
            return status_of(c.delete(&format!("/v1/vms/{id}/snapshots/{name}")).await)
        }
        VmCommand::Wait { id, state, timeout } => {
            c.get(&format!(
                "/v1/vms/{id}/wait?state={state}&timeout={timeout}"
            ))
            .await
        }
        VmCommand::Logs { id, follow, offset } => {
            let mut out = std::io::stdout();
            let r = c
                .stream(
                    &format!("/v1/vms/{id}/console?offset={offset}&follow={follow}"),
                    |chunk| out.write_all(chunk).and_then(|_| out.flush()).is_ok(),
                )
                .await;
            return status_of(r);
        }
        VmCommand::Console { id } => return attach(&c, id).await,
    };
    match reply {
        Ok(r) => {
            if let Err(code) = check(&r) {
                return code;
            }
            if matches!(cmd, VmCommand::Wait { state, .. } if state == "deleted") {
                return ExitCode::SUCCESS;
            }
            one(&r);
            ExitCode::SUCCESS
        }
        Err(e) => unreachable(e),
    }
}

/// Puts a terminal in raw mode for the life of the guard.
struct RawMode(Option<libc::termios>);

impl RawMode {
    fn new() -> Self {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a termios we own.
        unsafe {
            if libc::isatty(0) != 1 {
                return Self(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Self(None);
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Self(Some(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings saved from fd 0.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// Ctrl-] ends an interactive console session.
const DETACH: u8 = 0x1d;

async fn attach(c: &Client, id: &str) -> ExitCode {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let conn = match c
        .upgrade(
            &format!("/v1/vms/{id}/console/attach"),
            bexar_agent::api::CONSOLE_PROTOCOL,
        )
        .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(reply)) => return check(&reply).err().unwrap_or(ExitCode::from(4)),
        Err(e) => return unreachable(e),
    };
    eprintln!("bexar: attached to {id}'s console; Ctrl-] detaches\r");
    let _raw = RawMode::new();
    let (mut rd, mut wr) = tokio::io::split(conn);
    let to_guest = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if let Some(i) = buf[..n].iter().position(|b| *b == DETACH) {
                let _ = wr.write_all(&buf[..i]).await;
                return;
            }
            if wr.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let from_guest = async {
        let mut out = tokio::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if out.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    let _ = out.flush().await;
                }
            }
        }
    };
    tokio::select! {
        _ = to_guest => {}
        _ = from_guest => {}
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        create: CreateArgs,
    }

    fn spec(args: &[&str]) -> Result<Value, String> {
        let c = Cmd::try_parse_from(std::iter::once("create").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        spec_from_flags(&c.create)
    }

    #[test]
    fn flags_make_the_same_spec_the_api_takes() {
        let v = spec(&[
            "web-1",
            "--kernel",
            "/boot/vmlinux",
            "--disk",
            "/img/root.ext4,ro,serial=root",
            "--net",
            "segment=web,ip=10.0.0.5",
            "--net",
            "tap=tap7,mac=02:00:00:00:00:07",
            "-L",
            "tier=web",
            "--restart",
            "on-failure",
            "--vsock-cid",
            "5",
        ])
        .unwrap();
        let typed: VmSpec = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(typed.disks[0].serial.as_deref(), Some("root"));
        assert!(typed.disks[0].read_only);
        assert_eq!(typed.nics[0].ipv4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(typed.nics[1].tap.as_deref(), Some("tap7"));
        assert_eq!(typed.restart_policy, RestartPolicy::OnFailure);
        assert_eq!(v["vsock"]["cid"], 5);
        assert_eq!(v["cpu_template"], "host");
        // Refusals name the flag.
        assert!(spec(&["a", "--kernel", "/k", "--disk", "/d,rx"])
            .unwrap_err()
            .contains("--disk"));
        assert!(
            spec(&["a", "--kernel", "/k", "--net", "segment=s,ip=1.2.3"])
                .unwrap_err()
                .contains("--net")
        );
        assert!(spec(&["a", "--kernel", "/k", "--restart", "sometimes"])
            .unwrap_err()
            .contains("--restart"));
    }
}
