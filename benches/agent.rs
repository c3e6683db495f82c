//! Host agent benchmark, through the real API socket with real VMM processes (the ring-3 test
//! guest in its `idle` mode), against baselines measured in the same run:
//!
//! * VMs created and started per second (`POST /v1/vms?start=true`, sequential and 4 at a
//!   time); the sequential ones are timed until the guest's ready line is in its console log,
//!   against `bexar run` of the same guest started directly (exec to ready line and exit);
//! * API latency p50/p99 of `GET /v1/vms/{id}` and `GET /v1/vms` with 100 VMs defined, against
//!   a request to an unknown route (the transport and HTTP cost alone);
//! * the agent's resident memory with 100 VMs, against the same agent with none.
//!
//! `cargo bench --bench agent` (BEXAR_BENCH_VMS=N to change the VM count). The test guest must
//! be built (`cd firmware && cargo build --release`). Prints figures; asserts nothing about time.

mod common;
use common::percentile;

use std::path::Path;
use std::time::{Duration, Instant};

use bexar_agent::api::client::Client;
use serde_json::{json, Value};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| bexar_util::procfs::kib_field(&s, "VmRSS:"))
        .unwrap_or(0)
}

fn spec(id: &str, guest: &Path) -> Value {
    json!({
        "id": id, "vcpus": 1, "memory_mib": 32,
        "boot": {"kernel": guest.display().to_string(), "cmdline": "console=ttyS0 bexar.test=idle"}
    })
}

fn main() {
    let bexar = common::bexar();
    let guest = common::testguest();
    let n = common::env_count("BEXAR_BENCH_VMS", 100);
    let dir = std::env::temp_dir().join(format!("bexar-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (child, socket) = common::start_agent(
        &bexar,
        &dir,
        &[],
        &["--cpu-allocation-ratio", "200"],
        "warn",
    );
    let agent = common::BenchAgent { dir, child };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let c = Client::new(&socket);
    let idle_rss = rss_kib(agent.child.id());

    // Baseline: the same guest started directly, a few times.
    for _ in 0..2 {
        common::cold_start(&bexar, &guest, 1, 32);
    }
    let mut direct: Vec<f64> = (0..10)
        .map(|_| common::cold_start(&bexar, &guest, 1, 32))
        .collect();
    let direct_p50 = percentile(&mut direct, 0.5);

    rt.block_on(async {
        // Sequential create+start, then the rest 4 at a time.
        let half = n / 2;
        let mut per_vm = Vec::new();
        let t = Instant::now();
        for i in 0..half {
            let s = Instant::now();
            let r = c.post("/v1/vms?start=true", &spec(&format!("b-{i:03}"), &guest)).await.unwrap();
            assert_eq!(r.status.as_u16(), 201, "{}", String::from_utf8_lossy(&r.body));
            // Until the guest is up, as the baseline measures.
            let console = format!("/v1/vms/b-{i:03}/console");
            while !String::from_utf8_lossy(&c.get(&console).await.unwrap().body).contains("idle: ready") {
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            per_vm.push(s.elapsed().as_secs_f64() * 1e3);
        }
        let seq_rate = half as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let ids: Vec<String> = (half..n).map(|i| format!("b-{i:03}")).collect();
        for chunk in ids.chunks(4) {
            let futs = chunk.iter().map(|id| {
                let c = c.clone();
                let s = spec(id, &guest);
                async move {
                    let r = c.post("/v1/vms?start=true", &s).await.unwrap();
                    assert_eq!(r.status.as_u16(), 201);
                }
            });
            futures_util::future::join_all(futs).await;
        }
        let par_rate = (n - half) as f64 / t.elapsed().as_secs_f64();
        let api_p50 = percentile(&mut per_vm, 0.5);

        // Latencies with n VMs.
        let lat = |path: String| {
            let c = c.clone();
            async move {
                let mut v = Vec::new();
                for _ in 0..300 {
                    let t = Instant::now();
                    let r = c.get(&path).await.unwrap();
                    v.push(t.elapsed().as_secs_f64() * 1e3);
                    assert!(r.status.as_u16() < 500);
                }
                (percentile(&mut v, 0.5), percentile(&mut v, 0.99))
            }
        };
        let base = lat("/v1/no-such-route".into()).await;
        let get = lat("/v1/vms/b-042".into()).await;
        let list = lat("/v1/vms".into()).await;
        let full_rss = rss_kib(agent.child.id());
        let running = c.get("/v1/vms?state=running").await.unwrap().json()["items"]
            .as_array()
            .map_or(0, |a| a.len());

        println!("bexar agent benchmark: {n} VMs (test guest `idle`, 1 vCPU, 32 MiB), {running} running at the end");
        println!(
            "  create+start via API to guest ready  p50 {api_p50:7.2} ms/VM  ({seq_rate:.1} VMs/s sequential, {par_rate:.1} VMs/s 4 at a time)"
        );
        println!(
            "  baseline `bexar run` to guest ready  p50 {direct_p50:7.2} ms   ratio API/direct {:.2}",
            api_p50 / direct_p50
        );
        println!(
            "  GET /v1/vms/ID   p50 {:6.3} ms  p99 {:6.3} ms   (baseline unknown route p50 {:6.3} ms p99 {:6.3} ms, ratio p50 {:.2})",
            get.0, get.1, base.0, base.1, get.0 / base.0
        );
        println!(
            "  GET /v1/vms ({n})   p50 {:6.3} ms  p99 {:6.3} ms   (ratio p50 to baseline {:.2})",
            list.0, list.1, list.0 / base.0
        );
        println!(
            "  agent RSS {:.1} MiB with {n} VMs, {:.1} MiB with none (ratio {:.2})",
            full_rss as f64 / 1024.0,
            idle_rss as f64 / 1024.0,
            full_rss as f64 / idle_rss.max(1) as f64
        );
        let t = Instant::now();
        for i in 0..n {
            let _ = c.delete(&format!("/v1/vms/b-{i:03}")).await;
        }
        println!("  delete (forced stop + cleanup) {:.1} VMs/s", n as f64 / t.elapsed().as_secs_f64());
    });
}
