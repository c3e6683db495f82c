//! What the VMM's sandbox costs, measured against the same work without it in the same run:
//!
//! * `bexar run` of the test guest (`minimal`: the guest reports and ends at once), exec to
//!   exit and exec to the guest's first console byte (the start alone), jailed (the default)
//!   against `--no-jail`, samples interleaved; with the cost of each
//!   layer as the VMM measured it (its `--result-json`): the fork into a PID namespace of its
//!   own (the parent waits outside), the other namespaces, pivot_root, the drop of
//!   uid and capabilities, Landlock, building the seccomp filters, installing the main
//!   thread's;
//! * the kernel's part of the namespaces, alone: `unshare` of a new network namespace against
//!   the mount, IPC and UTS ones (the network namespace is the dear one);
//! * cgroup placement: a VM's cgroups made and limited, and a child joining them between fork
//!   and exec, against the same fork and exec without;
//! * the PID namespace: fork+exec of `/bin/true` as the first process of a new one (the
//!   agent's way: a thread that unshares, then spawns) against the same fork and exec;
//! * the agent's start rate (create and start through the API until the guest's ready line)
//!   with the jail and cgroups on, against `--no-jail --cgroup-parent off` (four agents, one
//!   per configuration, their VMs started in turn), and its forced
//!   stops (API call to answer, which waits for the VMM's exit): a jailed VMM is the first
//!   process of its own PID namespace and hands its VM to the agent, so KVM's teardown (about
//!   14 ms here) is in neither's exit.
//!
//! `cargo bench --bench jail` (BEXAR_BENCH_ITERS=N samples, default 40). Needs root and the
//! test guest. Prints medians and ratios; asserts nothing about time.

mod common;
use common::percentile;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One `bexar run` of the minimal guest: milliseconds from exec to its exit and to the
/// guest's first console byte on its standard output (the guest runs), and the jail's layers
/// (µs) if jailed.
fn run_once(bexar: &Path, guest: &Path, jailed: bool, result: &Path) -> (f64, f64, Option<Value>) {
    use std::io::Read;
    let mut cmd = Command::new(bexar);
    cmd.args(["run", "--no-stdin", "--memory", "32", "--console", "stdio"])
        .args(["--cmdline", "bexar.test=minimal"])
        .arg("--kernel")
        .arg(guest)
        .arg("--result-json")
        .arg(result)
        .env("BEXAR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if !jailed {
        cmd.arg("--no-jail");
    }
    let t = Instant::now();
    let mut child = cmd.spawn().expect("run bexar");
    let mut out = child.stdout.take().expect("its standard output");
    let mut byte = [0u8; 1];
    assert_eq!(
        out.read(&mut byte).expect("the guest's output"),
        1,
        "no console byte"
    );
    let first = t.elapsed().as_secs_f64() * 1e3;
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).expect("the guest's output");
    let s = child.wait().expect("wait for bexar");
    let took = t.elapsed().as_secs_f64() * 1e3;
    assert!(s.success(), "bexar run failed: {s}");
    let out: Value = serde_json::from_slice(&std::fs::read(result).unwrap()).unwrap();
    (took, first, out.get("jail").cloned())
}

/// Median µs of `unshare(flags)` on a fresh thread each time.
fn unshare_us(flags: libc::c_int, n: usize) -> f64 {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                let t = Instant::now();
                // SAFETY: unshare with namespace flags only; this short-lived thread alone
                // moves (CLONE_FS with CLONE_NEWNS: its own filesystem context).
                let r = unsafe { libc::unshare(flags) };
                assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
                t.elapsed().as_secs_f64() * 1e6
            })
            .join()
            .unwrap()
        })
        .collect();
    percentile(&mut v, 0.5)
}

/// fork+exec of /bin/true, joining the cgroups open as `procs` in between.
fn spawn_true(procs: &[i32]) -> f64 {
    use std::os::unix::process::CommandExt;
    let procs = procs.to_vec();
    let mut cmd = Command::new("/bin/true");
    // SAFETY: join_in_child only writes to descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || bexar_agent::sandbox::join_in_child(&procs));
    }
    let t = Instant::now();
    assert!(cmd.status().unwrap().success());
    t.elapsed().as_secs_f64() * 1e6
}

/// fork+exec of /bin/true as the first process of a new PID namespace: a thread that unshares
/// and spawns, as the agent starts a VMM.
fn spawn_true_pid_ns() -> f64 {
    let t = Instant::now();
    std::thread::spawn(|| {
        // SAFETY: unshare with a namespace flag only, on this short-lived thread.
        let r = unsafe { libc::unshare(libc::CLONE_NEWPID) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        assert!(Command::new("/bin/true").status().unwrap().success());
    })
    .join()
    .unwrap();
    t.elapsed().as_secs_f64() * 1e6
}

/// What `agent_starts` measured, medians.
struct AgentRun {
    /// ms per VM, create and start to the guest's ready line.
    start_ms: f64,
    /// µs, the network namespace's part of each VMM's jail as its log says.
    ns_us: f64,
    /// ms per VM, a forced stop's API call.
    stop_ms: f64,
}

/// Starts one agent per configuration (`tag`, `flags`), then creates and starts `n` VMs on
/// them in turn (VM i on every agent before VM i + 1 on any, each round beginning with the
/// next agent), each until its guest's ready line, then stops each (forced) and deletes it, in turn too: a drift in the machine's speed
/// during the run falls on every configuration alike (run one after another, two runs of the
/// same build differed by 10 ms in which came out ahead).
fn agent_starts(
    bexar: &Path,
    guest: &Path,
    configs: &[(&str, &[&str])],
    n: usize,
) -> Vec<AgentRun> {
    let agents: Vec<(common::BenchAgent, bexar_agent::api::client::Client)> = configs
        .iter()
        .map(|(tag, flags)| {
            let dir =
                std::env::temp_dir().join(format!("bexar-bench-jail-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut all = vec!["--cpu-allocation-ratio", "200", "--imds-listen", "off"];
            all.extend_from_slice(flags);
            let (child, socket) = common::start_agent(bexar, &dir, &[], &all, "info");
            (
                common::BenchAgent { dir, child },
                bexar_agent::api::client::Client::new(&socket),
            )
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut starts = vec![Vec::new(); agents.len()];
    let mut stops = vec![Vec::new(); agents.len()];
    rt.block_on(async {
        for i in 0..n {
            // Each round begins with the next agent: none is always first.
            for j in 0..agents.len() {
                let k = (i + j) % agents.len();
                let c = &agents[k].1;
                let id = format!("j-{i:03}");
                let spec = json!({
                    "id": id, "vcpus": 1, "memory_mib": 32,
                    "boot": {"kernel": guest.display().to_string(), "cmdline": "console=ttyS0 bexar.test=idle"}
                });
                let t = Instant::now();
                let r = c.post("/v1/vms?start=true", &spec).await.unwrap();
                assert_eq!(r.status.as_u16(), 201, "{}", String::from_utf8_lossy(&r.body));
                let console = format!("/v1/vms/{id}/console");
                while !String::from_utf8_lossy(&c.get(&console).await.unwrap().body)
                    .contains("idle: ready")
                {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
                starts[k].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    });
    // "jailed in DIR: namespaces N µs, ..." in each VMM's log, read before the VMs go.
    let mut ns: Vec<Vec<f64>> = agents
        .iter()
        .map(|(agent, _)| {
            (0..n)
                .filter_map(|i| {
                    let log = std::fs::read_to_string(
                        agent.dir.join(format!("state/vms/j-{i:03}/vmm.log")),
                    )
                    .ok()?;
                    let at = log.find("namespaces ")? + "namespaces ".len();
                    log[at..].split_whitespace().next()?.parse().ok()
                })
                .collect()
        })
        .collect();
    rt.block_on(async {
        for i in 0..n {
            for (k, (_, c)) in agents.iter().enumerate() {
                let t = Instant::now();
                let r = c
                    .post(&format!("/v1/vms/j-{i:03}/stop?force=true"), &json!({}))
                    .await
                    .unwrap();
                assert_eq!(r.status, 200, "stop: {}", String::from_utf8_lossy(&r.body));
                stops[k].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        for i in 0..n {
            for (_, c) in &agents {
                // Deleted through the API: the VMs' cgroups go with them.
                let r = c.delete(&format!("/v1/vms/j-{i:03}")).await.unwrap();
                assert_eq!(
                    r.status,
                    204,
                    "delete j-{i:03}: {}",
                    String::from_utf8_lossy(&r.body)
                );
            }
        }
    });
    agents
        .into_iter()
        .zip(starts.iter_mut().zip(stops.iter_mut()).zip(ns.iter_mut()))
        .map(|(agent, ((start, stop), ns))| {
            drop(agent);
            AgentRun {
                start_ms: percentile(start, 0.5),
                ns_us: if ns.is_empty() {
                    f64::NAN
                } else {
                    percentile(ns, 0.5)
                },
                stop_ms: percentile(stop, 0.5),
            }
        })
        .collect()
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("jail benchmark: needs root (namespaces, cgroups); skipped");
        return;
    }
    let bexar = common::bexar();
    let guest = common::testguest();
    let n = common::env_count("BEXAR_BENCH_ITERS", 40);
    let result = std::env::temp_dir().join(format!("bexar-bench-jail-{}.json", std::process::id()));

    // 1. exec to exit, jailed against not, interleaved.
    for _ in 0..3 {
        run_once(&bexar, &guest, true, &result);
        run_once(&bexar, &guest, false, &result);
    }
    let (mut jailed, mut free) = (Vec::new(), Vec::new());
    let (mut jailed_start, mut free_start) = (Vec::new(), Vec::new());
    let mut layers: Vec<Vec<f64>> = vec![Vec::new(); 8];
    const LAYERS: [&str; 7] = [
        "pid_namespace_us",
        "namespaces_us",
        "pivot_root_us",
        "drop_us",
        "landlock_us",
        "seccomp_build_us",
        "seccomp_install_us",
    ];
    for _ in 0..n {
        let (ms, start, times) = run_once(&bexar, &guest, true, &result);
        jailed.push(ms);
        jailed_start.push(start);
        let times = times.expect("a jailed run reports its jail");
        let mut total = 0.0;
        for (i, k) in LAYERS.iter().enumerate() {
            let v = times[k].as_f64().unwrap_or(0.0);
            total += v;
            layers[i].push(v);
        }
        layers[7].push(total);
        let (ms, start, _) = run_once(&bexar, &guest, false, &result);
        free.push(ms);
        free_start.push(start);
    }
    let _ = std::fs::remove_file(&result);
    let (j, f) = (percentile(&mut jailed, 0.5), percentile(&mut free, 0.5));
    println!("bexar run, exec to exit of the minimal guest ({n} runs each, interleaved):");
    println!(
        "  jailed {j:.2} ms, --no-jail {f:.2} ms: ratio {:.3} ({:+.2} ms)",
        j / f,
        j - f
    );
    // The start alone: the exit paths differ (a jailed run's reaper is forked by its waiting
    // parent while the guest runs, a --no-jail run's by the VMM as it ends).
    let (js, fs) = (
        percentile(&mut jailed_start, 0.5),
        percentile(&mut free_start, 0.5),
    );
    println!(
        "  exec to the guest's first console byte: jailed {js:.2} ms, --no-jail {fs:.2} ms: \
         ratio {:.3} ({:+.2} ms)",
        js / fs,
        js - fs
    );
    println!("  the jail's layers as the VMM measured them (median µs):");
    for (i, k) in LAYERS.iter().enumerate() {
        println!(
            "    {:<20} {:>7.0}",
            k.trim_end_matches("_us"),
            percentile(&mut layers[i], 0.5)
        );
    }
    println!(
        "    {:<20} {:>7.0}",
        "total",
        percentile(&mut layers[7], 0.5)
    );

    // 2. The namespaces alone, in the kernel.
    let net = unshare_us(libc::CLONE_NEWNET, n);
    let rest = unshare_us(
        libc::CLONE_NEWNS | libc::CLONE_FS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        n,
    );
    println!("unshare, median of {n}: network namespace {net:.0} µs; mount+IPC+UTS {rest:.0} µs: ratio {:.1}", net / rest);

    // 3. cgroup placement.
    match bexar_agent::sandbox::Hierarchy::detect() {
        None => println!("cgroups: no usable hierarchy here; skipped"),
        Some(h) => {
            let kind = h.name();
            let parent = PathBuf::from(format!("bexar-bench-{}", std::process::id()));
            let cg =
                bexar_agent::sandbox::Cgroups::new(h, &parent).expect("make the parent cgroup");
            let limits = bexar_agent::sandbox::Limits::of(1, 32, 64);
            let (mut make, mut with, mut without) = (Vec::new(), Vec::new(), Vec::new());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            for i in 0..n {
                let id = format!("b{i}");
                let t = Instant::now();
                let g = cg.prepare(&id, limits).unwrap();
                make.push(t.elapsed().as_secs_f64() * 1e6);
                with.push(spawn_true(&g.raw()));
                without.push(spawn_true(&[]));
                drop(g);
                rt.block_on(cg.remove(&id));
            }
            let (w, wo) = (percentile(&mut with, 0.5), percentile(&mut without, 0.5));
            // The agent turns favordynmods on at its start (the agent tests before this ran
            // one); a host where it stayed off pays an RCU grace period per join (3-20 ms).
            let dynmods = match bexar_agent::sandbox::favor_dynmods_mount() {
                Some(m) => format!("favordynmods on at {}", m.display()),
                None => "favordynmods off".to_owned(),
            };
            println!(
                "cgroups ({kind}, {dynmods}): make and limit a VM's {:.0} µs; fork+exec joining them {w:.0} µs, without {wo:.0} µs: ratio {:.2} ({:+.0} µs)",
                percentile(&mut make, 0.5),
                w / wo,
                w - wo
            );
            for d in ["cpu", "cpuacct", "memory", "pids", "blkio", ""] {
                let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(d).join(&parent));
            }
        }
    }

    // 4. The PID namespace, at spawn (its end is in the agent's stops below).
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..n {
        with.push(spawn_true_pid_ns());
        without.push(spawn_true(&[]));
    }
    let (w, wo) = (percentile(&mut with, 0.5), percentile(&mut without, 0.5));
    println!(
        "PID namespace: fork+exec as the first process of a new one (thread, unshare, spawn) {w:.0} µs, plain fork+exec {wo:.0} µs: ratio {:.2} ({:+.0} µs)",
        w / wo,
        w - wo
    );

    // 5. The agent's start rate and stops, jail and cgroups on against off.
    let vms = (n / 2).max(5);
    let runs = agent_starts(
        &bexar,
        &guest,
        &[
            ("on", &[]),
            ("jail", &["--cgroup-parent", "off"]),
            ("cgroups", &["--no-jail"]),
            ("off", &["--no-jail", "--cgroup-parent", "off"]),
        ],
        vms,
    );
    let (on, jail_only, cgroups_only, off) = (&runs[0], &runs[1], &runs[2], &runs[3]);
    println!(
        "agent VMMs' namespaces step (joining a network namespace the agent made ahead), median: {:.0} µs",
        on.ns_us
    );
    println!("agent create+start to the guest's ready line, and forced stop, median of {vms}, the four agents taken in turn (ratio to neither):");
    let runs = [
        ("jail and cgroups", on),
        ("jail only", jail_only),
        ("cgroups only", cgroups_only),
        ("neither", off),
    ];
    for (what, r) in runs {
        println!(
            "  {what:<17} start {:>7.2} ms  ratio {:.3} ({:+.2} ms), {:.0} starts/s; stop {:>6.2} ms  ratio {:.3} ({:+.2} ms)",
            r.start_ms,
            r.start_ms / off.start_ms,
            r.start_ms - off.start_ms,
            1e3 / r.start_ms,
            r.stop_ms,
            r.stop_ms / off.stop_ms,
            r.stop_ms - off.stop_ms,
        );
    }
}
