//! Network wiring benchmark, inside a network namespace of its own (so it needs root), against
//! baselines measured in the same run:
//!
//! * create+start through the API (`POST /v1/vms?start=true`, until the VMM runs the guest) of
//!   VMs with a NIC on a routed segment (a TAP made, bridged and filtered, the nftables ruleset
//!   replaced) against the same VMs without a NIC;
//! * the nftables ruleset written whole (both tables, one transaction each) with 100 NICs against
//!   an empty ruleset (the cost of running nft at all).
//!
//! `cargo bench --bench network` (BEXAR_BENCH_VMS=N per kind, default 30). The test guest must be
//! built (`cd firmware && cargo build --release`). Prints figures; asserts nothing about time.

mod common;
use common::percentile;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bexar_agent::api::client::Client;
use bexar_hostnet::nft::{NicRule, Ruleset, SegmentRule, MARK_BASE};
use serde_json::{json, Value};

struct Cleanup {
    ns: String,
    dir: PathBuf,
    agent: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("pkill")
            .args(["-9", "-f", &self.dir.display().to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(100));
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spec(id: &str, guest: &str, nic: bool) -> Value {
    let mut v = json!({
        "id": id, "vcpus": 1, "memory_mib": 32,
        "boot": {"kernel": guest, "cmdline": "console=ttyS0 bexar.test=idle"}
    });
    if nic {
        v["nics"] = json!([{"segment": "bench"}]);
    }
    v
}

fn ruleset(n: u32) -> Ruleset {
    Ruleset {
        nics: (0..n)
            .map(|i| NicRule {
                tap: format!("bxt{i:08x}0"),
                mac: format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff),
                ipv4: Some(std::net::Ipv4Addr::from(0x0a00_0002 + i)),
                ipv6: vec![std::net::Ipv6Addr::from(
                    (0x2001_0db8_u128 << 96) | (u128::from(i) + 2),
                )],
                mark: MARK_BASE | (i + 10),
            })
            .collect(),
        segments: vec![SegmentRule {
            port: "bxg00000000".into(),
            routed: true,
            ipv4: Some("10.0.0.0/16".parse().unwrap()),
            ipv6: Some("2001:db8::/64".parse().unwrap()),
        }],
    }
}

fn main() {
    let bexar = common::bexar();
    let guest = common::testguest();
    let n = common::env_count("BEXAR_BENCH_VMS", 30);
    let (ns, dir) = common::netns_and_dir("bxbench");
    let mut clean = Cleanup {
        ns: ns.clone(),
        dir: dir.clone(),
        agent: None,
    };
    let (child, socket) = common::start_agent(
        &bexar,
        &dir,
        &["ip", "netns", "exec", &ns],
        &["--cpu-allocation-ratio", "200", "--stop-timeout", "0"],
        "warn",
    );
    clean.agent = Some(child);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = Client::new(&socket);
    let g = guest.display().to_string();
    let (plain, wired) = rt.block_on(async {
        let r = c
            .post(
                "/v1/segments",
                &json!({"id": "bench", "vlan": 10, "mode": "routed",
                        "ipv4": {"subnet": "10.0.0.0/16"}, "ipv6": {"prefix": "2001:db8::/64"}}),
            )
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 201, "{}", String::from_utf8_lossy(&r.body));
        let mut plain = Vec::new();
        let mut wired = Vec::new();
        // Interleaved, so both kinds see the same number of VMs already defined.
        for i in 0..n {
            for (nic, out) in [(false, &mut plain), (true, &mut wired)] {
                let id = format!("{}-{i:03}", if nic { "w" } else { "p" });
                let t = Instant::now();
                let r = c.post("/v1/vms?start=true", &spec(&id, &g, nic)).await.unwrap();
                assert_eq!(r.status.as_u16(), 201, "{}", String::from_utf8_lossy(&r.body));
                out.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let t = Instant::now();
        for i in 0..n {
            let _ = c.delete(&format!("/v1/vms/w-{i:03}")).await.unwrap();
        }
        let del_wired = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        let t = Instant::now();
        for i in 0..n {
            let _ = c.delete(&format!("/v1/vms/p-{i:03}")).await.unwrap();
        }
        let del_plain = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        println!(
            "network: delete per VM: with a NIC {del_wired:.1} ms, without {del_plain:.1} ms (ratio {:.2})",
            del_wired / del_plain
        );
        (plain, wired)
    });
    let (mut plain, mut wired) = (plain, wired);
    let (p50p, p50w) = (percentile(&mut plain, 0.5), percentile(&mut wired, 0.5));
    let (p99p, p99w) = (percentile(&mut plain, 0.99), percentile(&mut wired, 0.99));
    println!(
        "network: create+start ({n} VMs each, up to {} defined): without a NIC p50 {p50p:.1} ms p99 {p99p:.1} ms; \
         with a segment NIC p50 {p50w:.1} ms p99 {p99w:.1} ms; ratio p50 {:.2}",
        2 * n,
        p50w / p50p
    );

    // The ruleset replace alone, in the namespace (this thread only).
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: setns on this thread with a namespace file we opened; child processes (nft)
    // inherit it.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    let time = |r: &Ruleset| {
        let mut v: Vec<f64> = (0..15)
            .map(|_| {
                let t = Instant::now();
                r.apply().expect("nft");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        percentile(&mut v, 0.5)
    };
    let empty = time(&Ruleset::default());
    let hundred = time(&ruleset(100));
    println!(
        "network: nftables replace p50: 100 NICs {hundred:.1} ms, empty ruleset {empty:.1} ms (ratio {:.2})",
        hundred / empty
    );
    let _ = bexar_hostnet::nft::remove_tables();
    drop(clean);
}
