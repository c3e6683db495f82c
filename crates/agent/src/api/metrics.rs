//! Prometheus text exposition: the agent's request latencies and VM counts, and per-VM counters
//! the agent keeps from each VMM's control socket ([`VmCounters`]).
//!
//! A scrape renders what the agent holds and never waits for the VMMs (asking each one costs
//! about 0.1 ms: 100 ms a scrape at 1,000 VMs). When what it holds is older than
//! [`COUNTERS_FRESH`], the scrape starts one refresh in the background, so the counters are at
//! most one scrape interval old and a host nobody scrapes asks no VMM at all. Only the first
//! scrape after the agent starts waits for the VMMs. `bexar_vm_counters_age_seconds` says how
//! old the per-VM counters are.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::Agent;
use bexar_util::sync::lock;
use bexar_vmm::control::Info;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Request latencies per (method, route, status class).
#[derive(Debug, Default)]
pub struct RequestMetrics(Mutex<BTreeMap<(String, String, u16), Histogram>>);

impl RequestMetrics {
    /// Records one request.
    pub fn observe(&self, method: &str, route: &str, status: u16, took: Duration) {
        let s = took.as_secs_f64();
        let mut m = lock(&self.0);
        let h = m
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    fn render(&self, out: &mut String) {
        let m = lock(&self.0).clone();
        let _ = writeln!(
            out,
            "# HELP bexar_api_request_duration_seconds API request latency.\n# TYPE bexar_api_request_duration_seconds histogram"
        );
        for ((method, route, status), h) in m {
            let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "bexar_api_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "bexar_api_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "bexar_api_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "bexar_api_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
    }
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Per-VM counters older than this are refreshed (in the background) by the next scrape.
pub const COUNTERS_FRESH: Duration = Duration::from_secs(5);

/// VMMs asked at once by a refresh: each question holds a socket.
const ASK_AT_ONCE: usize = 32;

/// Each running VM's counters, by id, with what its cgroup has used.
type Counters = Arc<Vec<(String, Info, Option<crate::sandbox::Usage>)>>;

/// The VMMs' counters as last asked, by VM.
#[derive(Debug, Default)]
pub struct VmCounters {
    held: Mutex<Option<(Instant, Counters)>>,
    refreshing: AtomicBool,
}

impl VmCounters {
    /// Asks every running VMM (a few at a time) and keeps the answers.
    pub async fn refresh(&self, agent: &Agent) {
        let running = agent.running();
        let cgroups = agent.cgroups.as_ref();
        let mut infos: Vec<(String, Info, Option<crate::sandbox::Usage>)> =
            futures_util::stream::iter(running.into_iter().map(|(id, dir)| async move {
                let (info, _) = crate::vmm_process::info(&dir).await.ok()?;
                let usage = cgroups.map(|c| c.usage(&id));
                Some((id, info, usage))
            }))
            .buffer_unordered(ASK_AT_ONCE)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        infos.sort_by(|a, b| a.0.cmp(&b.0));
        *lock(&self.held) = Some((Instant::now(), Arc::new(infos)));
    }

    /// What is held and its age; starts a background refresh if it is stale (only the first
    /// call, with nothing held, waits for one).
    pub async fn get(self: &Arc<Self>, agent: &Arc<Agent>) -> (Counters, Duration) {
        let held = lock(&self.held).clone();
        match held {
            None => {
                self.refresh(agent).await;
                let held = lock(&self.held).clone().expect("just refreshed");
                (held.1, held.0.elapsed())
            }
            Some((at, infos)) => {
                if at.elapsed() > COUNTERS_FRESH && !self.refreshing.swap(true, Ordering::AcqRel) {
                    let (me, agent) = (self.clone(), agent.clone());
                    tokio::spawn(async move {
                        /// Lowers the flag however the refresh ends.
                        struct Lower<'a>(&'a AtomicBool);
                        impl Drop for Lower<'_> {
                            fn drop(&mut self) {
                                self.0.store(false, Ordering::Release);
                            }
                        }
                        let _lower = Lower(&me.refreshing);
                        me.refresh(&agent).await;
                    });
                }
                (infos, at.elapsed())
            }
        }
    }
}

/// Renders every metric.
pub async fn render(
    agent: &Arc<Agent>,
    requests: &RequestMetrics,
    counters: &Arc<VmCounters>,
) -> String {
    let mut out = String::new();
    requests.render(&mut out);
    let _ = writeln!(
        out,
        "# HELP bexar_vms VMs by state.\n# TYPE bexar_vms gauge"
    );
    for (state, n) in agent.counts() {
        let _ = writeln!(out, "bexar_vms{{state=\"{state}\"}} {n}");
    }
    let inv = agent.inventory();
    let _ = writeln!(
        out,
        "# TYPE bexar_host_vcpus_allocated gauge\nbexar_host_vcpus_allocated {}\n# TYPE bexar_host_vcpus_capacity gauge\nbexar_host_vcpus_capacity {}\n# TYPE bexar_host_memory_allocated_mib gauge\nbexar_host_memory_allocated_mib {}\n# TYPE bexar_host_memory_capacity_mib gauge\nbexar_host_memory_capacity_mib {}",
        inv.vcpus.allocated, inv.vcpus.capacity, inv.memory_mib.allocated, inv.memory_mib.capacity
    );
    if let Some(kib) = agent_rss_kib() {
        let _ = writeln!(
            out,
            "# TYPE bexar_agent_resident_bytes gauge\nbexar_agent_resident_bytes {}",
            kib * 1024
        );
    }
    // Per-VM counters, as held.
    let (held, age) = counters.get(agent).await;
    let _ = writeln!(
        out,
        "# HELP bexar_vm_counters_age_seconds How old the per-VM counters below are.\n# TYPE bexar_vm_counters_age_seconds gauge\nbexar_vm_counters_age_seconds {:.3}",
        age.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "# HELP bexar_vm_vcpu_exits_total Exits to user space per vCPU.\n# TYPE bexar_vm_vcpu_exits_total counter"
    );
    for (id, i, _) in held.iter() {
        for (n, exits) in i.vcpu_exits.iter().enumerate() {
            let _ = writeln!(
                out,
                "bexar_vm_vcpu_exits_total{{vm=\"{}\",vcpu=\"{n}\"}} {exits}",
                esc(id)
            );
        }
    }
    // One value per VM: (name, help line, value).
    type PerVm = (&'static str, Option<&'static str>, fn(&Info) -> u64);
    let per_vm: [PerVm; 2] = [
        ("bexar_vm_console_bytes_total", None, |i| i.console_bytes),
        (
            "bexar_vm_completed_instructions_total",
            Some("Instructions the platform's emulator refused that the VMM completed (fwait on PVM hosts)."),
            |i| i.completed_instructions,
        ),
    ];
    for (name, help, value) in per_vm {
        if let Some(h) = help {
            let _ = writeln!(out, "# HELP {name} {h}");
        }
        let _ = writeln!(out, "# TYPE {name} counter");
        for (id, i, _) in held.iter() {
            let _ = writeln!(out, "{name}{{vm=\"{}\"}} {}", esc(id), value(i));
        }
    }
    // What each VM's cgroup has used (absent where the host lacks the controller).
    type PerCgroup = (
        &'static str,
        &'static str,
        &'static str,
        fn(&crate::sandbox::Usage) -> Option<f64>,
    );
    let per_cgroup: [PerCgroup; 4] = [
        (
            "bexar_vm_cgroup_cpu_seconds_total",
            "counter",
            "CPU time of the VM's cgroup (VMM and vCPUs).",
            |u| u.cpu_ns.map(|n| n as f64 / 1e9),
        ),
        (
            "bexar_vm_cgroup_cpu_throttled_seconds_total",
            "counter",
            "Time the VM's cgroup was held back by its CPU quota.",
            |u| u.throttled_ns.map(|n| n as f64 / 1e9),
        ),
        (
            "bexar_vm_cgroup_memory_bytes",
            "gauge",
            "Memory charged to the VM's cgroup (guest memory it touched, the VMM, page cache).",
            |u| u.memory_bytes.map(|b| b as f64),
        ),
        (
            "bexar_vm_cgroup_tasks",
            "gauge",
            "Threads in the VM's cgroup.",
            |u| u.pids.map(|p| p as f64),
        ),
    ];
    for (name, kind, help, value) in per_cgroup {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, _, u) in held.iter() {
            if let Some(v) = u.as_ref().and_then(value) {
                let _ = writeln!(out, "{name}{{vm=\"{}\"}} {v}", esc(id));
            }
        }
    }
    let kills = &agent.sandbox_kills;
    let _ = writeln!(
        out,
        "# HELP bexar_vmm_sandbox_kills_total VMMs ended by their sandbox since the agent started: a system call their seccomp filter forbids, or their cgroup's memory limit.\n# TYPE bexar_vmm_sandbox_kills_total counter\nbexar_vmm_sandbox_kills_total{{by=\"seccomp\"}} {}\nbexar_vmm_sandbox_kills_total{{by=\"oom\"}} {}",
        kills.seccomp.load(Ordering::Relaxed),
        kills.oom.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP bexar_vm_device_total Virtio device counters.\n# TYPE bexar_vm_device_total counter"
    );
    for (id, i, _) in held.iter() {
        for d in &i.devices {
            for (name, v) in [
                ("requests", d.requests),
                ("refused", d.refused),
                ("io_errors", d.io_errors),
                ("read_bytes", d.read_bytes),
                ("written_bytes", d.written_bytes),
                ("activations", d.activations),
                ("throttled", d.throttled),
            ] {
                let _ = writeln!(
                    out,
                    "bexar_vm_device_total{{vm=\"{}\",device=\"{}\",slot=\"{}\",counter=\"{name}\"}} {v}",
                    esc(id),
                    d.kind,
                    d.slot
                );
            }
        }
    }
    out
}

/// The agent's resident memory in KiB.
pub fn agent_rss_kib() -> Option<u64> {
    bexar_util::procfs::self_status_kib("VmRSS:")
}
