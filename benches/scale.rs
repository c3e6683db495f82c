//! Scale benchmark: one agent filled with idle test-guest VMs (16 MiB, one vCPU), half of them
//! with a NIC on a routed segment, measured at N = 10, 100, 300 and 1,000 VMs, inside a network
//! namespace of its own (so it needs root). At each N:
//!
//! * create+start (`POST /v1/vms?start=true`) of the VMs added since the last N: rate and p99;
//! * `GET /v1/vms` (the whole list, one page) and `GET /v1/vms/{id}` p99;
//! * a metrics scrape (p50 of 10, after the first);
//! * the agent's resident memory, and its idle CPU with `nft` (its reaped children) over a
//!   window in which the network repair runs every 5 s (six times as often as by default);
//! * a full network repair: both nftables tables deleted by hand, the time the agent's repair
//!   pass takes to put them back (from its log);
//! * kill -9 and restart of the agent: to the API answering (`GET /v1/host`), and to every VM
//!   re-adopted (`recovered` in its health checks);
//! * delete (a tenth of the VMs, put back at the next N): rate.
//!
//! It prints a table, and for every figure its growth from N=100 to N=1,000 (the ratio of the
//! two; linear growth is 10x, constant 1x). Baselines are the same figures at the smaller N of
//! the same run. Asserts nothing about time.
//!
//! `cargo bench --bench scale` (BEXAR_SCALE_LEVELS=10,100 for a shorter run,
//! BEXAR_SCALE_IDLE_S=S for the idle window, default 10). The test guest must be built.

mod common;
use common::percentile;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bexar_agent::api::client::Client;
use serde_json::{json, Value};

struct Host {
    ns: String,
    dir: PathBuf,
    agent: Option<Child>,
}

impl Host {
    fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        // `ip netns exec` execs the agent: its pid is the agent's.
        self.agent = Some(
            Command::new("ip")
                .args(["netns", "exec", &self.ns])
                .arg(common::bexar())
                .arg("agent")
                .arg("--socket")
                .arg(self.socket())
                .arg("--state-dir")
                .arg(self.dir.join("state"))
                .args(["--cpu-allocation-ratio", "1000", "--stop-timeout", "0"])
                .args(["--network-repair", "5", "--imds-listen", "off"])
                .env("BEXAR_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start the agent"),
        );
    }

    fn pid(&self) -> u32 {
        self.agent.as_ref().unwrap().id()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn nft(&self, args: &str) {
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.ns, "sh", "-c"])
            .arg(format!("nft {args}"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "nft {args}");
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new("pkill")
            .args(["-9", "-f", &self.dir.display().to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// CPU time of `pid` and its reaped children, seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at index 2 (state).
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    f.iter().sum::<u64>() as f64 / hz
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| bexar_util::procfs::kib_field(&s, "VmRSS:"))
        .unwrap_or(0) as f64
        / 1024.0
}

fn spec(i: usize, guest: &Path) -> Value {
    let mut v = json!({
        "id": format!("vm-{i:05}"), "vcpus": 1, "memory_mib": 16,
        "boot": {"kernel": guest.display().to_string(), "cmdline": "console=ttyS0 bexar.test=idle"}
    });
    if i % 2 == 1 {
        v["nics"] = json!([{"segment": "scale"}]);
    }
    v
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The `ms=` of the last log line holding `what`, once there are more than `before` of them.
fn logged_ms(host: &Host, what: &str, before: usize, within: Duration) -> Option<f64> {
    let t = Instant::now();
    while t.elapsed() < within {
        let log = host.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(what)).collect();
        if lines.len() > before {
            return lines.last().and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("ms="))
                    .and_then(|v| v.parse().ok())
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

type Row = BTreeMap<&'static str, f64>;

/// Asserts a reply's status, showing its body if it differs.
fn expect(r: &bexar_agent::api::client::Reply, status: u16) {
    assert_eq!(
        r.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

/// Each GET's time, ms (each must answer 200).
async fn timed_gets(c: &Client, paths: impl Iterator<Item = String>) -> Vec<f64> {
    let mut out = Vec::new();
    for p in paths {
        let t = Instant::now();
        expect(&c.get(&p).await.unwrap(), 200);
        out.push(ms(t));
    }
    out
}

fn main() {
    let guest = common::testguest();
    let levels: Vec<usize> = std::env::var("BEXAR_SCALE_LEVELS")
        .unwrap_or_else(|_| "10,100,300,1000".into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    let idle = Duration::from_secs(common::env_count("BEXAR_SCALE_IDLE_S", 10) as u64);
    let (ns, dir) = common::netns_and_dir("bxscale");
    let mut host = Host {
        ns,
        dir,
        agent: None,
    };
    host.spawn();
    while std::os::unix::net::UnixStream::connect(host.socket()).is_err() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = Client::new(&host.socket());
    rt.block_on(async {
        let r = c
            .post(
                "/v1/segments",
                &json!({"id": "scale", "vlan": 10, "mode": "routed",
                        "ipv4": {"subnet": "10.0.0.0/16"}, "ipv6": {"prefix": "2001:db8::/64"}}),
            )
            .await
            .unwrap();
        expect(&r, 201);
    });

    let mut rows: Vec<(usize, Row)> = Vec::new();
    let mut made: Vec<bool> = Vec::new();
    for &n in &levels {
        let mut row = Row::new();
        // Grow to n (putting back the VMs deleted at the last level first).
        if made.len() < n {
            made.resize(n, false);
        }
        let todo: Vec<usize> = (0..n).filter(|i| !made[*i]).collect();
        let mut lat = Vec::new();
        let t = Instant::now();
        rt.block_on(async {
            for &i in &todo {
                let t = Instant::now();
                let r = c
                    .post("/v1/vms?start=true", &spec(i, &guest))
                    .await
                    .unwrap();
                expect(&r, 201);
                lat.push(ms(t));
                made[i] = true;
            }
        });
        row.insert(
            "create+start /s",
            todo.len() as f64 / t.elapsed().as_secs_f64(),
        );
        row.insert("create+start p99 ms", percentile(&mut lat, 0.99));

        // Idle: memory, and CPU with repair passes (and their nft, if any), before any scrape
        // (a scrape may start a refresh of the VMMs' counters, which is not idling).
        // The creates' own after-effects (VMMs reconciled, TAPs announced) settle first.
        std::thread::sleep(Duration::from_secs(10));
        let pid = host.pid();
        row.insert("agent RSS MiB", rss_mib(pid));
        let (c0, t0) = (cpu_s(pid), Instant::now());
        std::thread::sleep(idle);
        row.insert(
            "idle CPU % (agent+nft)",
            (cpu_s(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0,
        );

        // Reads.
        rt.block_on(async {
            // VMs picked across the host (7,919 is prime, so k * 7919 % n walks all of them).
            let some = |k: usize| format!("vm-{:05}", (k * 7919) % n);
            let mut list = timed_gets(&c, (0..50).map(|_| "/v1/vms".to_owned())).await;
            row.insert("list p50 ms", percentile(&mut list, 0.5));
            row.insert("list p99 ms", percentile(&mut list, 0.99));
            let pages = (0..50).map(|k| format!("/v1/vms?limit=100&after={}", some(k)));
            let mut page = timed_gets(&c, pages).await;
            row.insert("list page of 100 p99 ms", percentile(&mut page, 0.99));
            let gets = (0..100).map(|k| format!("/v1/vms/{}", some(k)));
            let mut get = timed_gets(&c, gets).await;
            row.insert("get p99 ms", percentile(&mut get, 0.99));
            let _ = c.get("/v1/metrics").await.unwrap();
            let mut scrape = timed_gets(&c, (0..10).map(|_| "/v1/metrics".to_owned())).await;
            row.insert("metrics scrape p50 ms", percentile(&mut scrape, 0.5));
        });

        // A full network repair: both tables gone.
        let before = host
            .log()
            .matches("network brought in line with the records")
            .count();
        host.nft("'delete table bridge bexar; delete table inet bexar'");
        let repair = logged_ms(
            &host,
            "network brought in line with the records",
            before,
            Duration::from_secs(30),
        );
        row.insert("full network repair ms", repair.unwrap_or(f64::NAN));

        // Restart.
        let before = host
            .log()
            .matches("network in line with the records")
            .count();
        host.kill9();
        let t = Instant::now();
        host.spawn();
        let (api, adopted) = rt.block_on(async {
            let mut api = None;
            loop {
                if let Ok(r) = c.get("/v1/host").await {
                    if r.status.as_u16() == 200 {
                        let v: Value = r.json();
                        api.get_or_insert(ms(t));
                        let recovered = v["health"]["checks"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["name"] == "recovered" && c["ok"] == true);
                        if recovered {
                            return (api.unwrap(), ms(t));
                        }
                    }
                }
                assert!(t.elapsed() < Duration::from_secs(120), "no recovery");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        row.insert("restart to API ms", api);
        row.insert("restart to all adopted ms", adopted);
        let wired = logged_ms(
            &host,
            "network in line with the records",
            before,
            Duration::from_secs(60),
        );
        row.insert("restart network sync ms", wired.unwrap_or(f64::NAN));

        // Deletes: the newest tenth, put back at the next level.
        let k = (n / 10).max(1);
        let victims: Vec<usize> = (n - k..n).collect();
        let mut del = Vec::new();
        let t = Instant::now();
        rt.block_on(async {
            for &i in &victims {
                let t = Instant::now();
                let r = c.delete(&format!("/v1/vms/vm-{i:05}")).await.unwrap();
                assert_eq!(r.status.as_u16(), 204);
                del.push(ms(t));
                made[i] = false;
            }
        });
        row.insert("delete /s", k as f64 / t.elapsed().as_secs_f64());
        row.insert("delete p99 ms", percentile(&mut del, 0.99));
        eprintln!("scale: N={n} done: {row:?}");
        rows.push((n, row));
    }

    // The table, and growth from N=100 to N=1,000.
    let names: Vec<&'static str> = rows[0].1.keys().copied().collect();
    print!("scale: {:<28}", "figure \\ N");
    for (n, _) in &rows {
        print!("{n:>10}");
    }
    let (lo, hi) = (
        rows.iter().find(|(n, _)| *n == 100),
        rows.iter().find(|(n, _)| *n == 1000),
    );
    if lo.is_some() && hi.is_some() {
        print!("{:>14}", "1000/100");
    }
    println!();
    for name in names {
        print!("scale: {name:<28}");
        for (_, r) in &rows {
            print!("{:>10.2}", r[name]);
        }
        if let (Some((_, a)), Some((_, b))) = (lo, hi) {
            print!("{:>13.2}x", b[name] / a[name]);
        }
        println!();
    }
    println!("scale: (linear growth from 100 to 1,000 is 10x; N VMs, N/2 of them with a NIC)");
    drop(host);
}
