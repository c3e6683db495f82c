//! The host agent end to end: a real `bexar agent` on a Unix socket in a temporary directory,
//! real VMM processes running the test guest (idle: it sleeps in HLT until Ctrl-Alt-Del or
//! console input), driven through the HTTP API.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use bexar_agent::api::client::Client;
use common::{bexar, expect_status, rt, seeded_rng, testguest, tmp};
use serde_json::{json, Value};

const READY: &str = "idle: ready";

/// A `bexar agent` under test. Dropping it kills the agent and every VMM it started.
struct TestAgent {
    dir: PathBuf,
    child: Option<Child>,
    stop_timeout: &'static str,
    /// Soft and hard open-file limits to start it with (the test's own otherwise).
    nofile: Option<(u64, u64)>,
}

impl TestAgent {
    fn start(name: &str) -> Self {
        Self::start_with_stop_timeout(name, "10")
    }

    fn start_with_stop_timeout(name: &str, stop_timeout: &'static str) -> Self {
        let dir = tmp(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = Self {
            dir,
            child: None,
            stop_timeout,
            nofile: None,
        };
        a.spawn();
        a
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn spawn(&mut self) {
        let mut cmd = bexar();
        cmd.arg("agent")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state())
            .args([
                "--restart-backoff",
                "0.2",
                "--stop-timeout",
                self.stop_timeout,
            ])
            .arg("--debug-socket")
            .arg(self.dir.join("debug.sock"));
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(common::spawn_agent(cmd, &self.dir, &self.socket()));
    }

    /// SIGKILL, as a crash would.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    fn client(&self) -> Client {
        Client::new(&self.socket())
    }

    /// VMM processes running VMs of this agent, by VM directory name.
    fn vmm_processes(&self) -> Vec<(u32, String)> {
        vmm_processes(&self.state())
    }
}

fn vmm_processes(state: &Path) -> Vec<(u32, String)> {
    let vms = state.join("vms");
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.len() >= 4 && args[1] == "vmm" && args[2] == "--dir" {
            let d = PathBuf::from(&args[3]);
            // A VMM's reaper (teardown.rs) shares its command line; it names itself apart.
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            if d.parent() == Some(vms.as_path()) && comm.trim_end() != "bexar-reaper" {
                // A zombie has an empty cmdline, so this is a live process.
                out.push((pid, d.file_name().unwrap().to_string_lossy().into_owned()));
            }
        }
    }
    out
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill9();
        for (pid, _) in self.vmm_processes() {
            // SAFETY: kill(2) on a pid we just found running a VMM of this test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let t = std::time::Instant::now();
        while !self.vmm_processes().is_empty() && t.elapsed().as_secs() < 3 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The reapers that wait for KVM's teardown leave a few ms later.
        std::thread::sleep(std::time::Duration::from_millis(100));
        common::remove_agent_cgroups(&self.dir);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn spec(id: &str) -> Value {
    json!({
        "id": id,
        "vcpus": 1,
        "memory_mib": 32,
        "boot": {
            "kernel": testguest().display().to_string(),
            "cmdline": "console=ttyS0 bexar.test=idle"
        }
    })
}

async fn console_text(c: &Client, id: &str) -> String {
    let r = c.get(&format!("/v1/vms/{id}/console")).await.unwrap();
    String::from_utf8_lossy(&r.body).into_owned()
}

async fn wait_console(c: &Client, id: &str, pattern: &str, secs: u64) {
    let t = Instant::now();
    loop {
        let text = console_text(c, id).await;
        if text.contains(pattern) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{id}: {pattern:?} not on the console after {secs} s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_state(c: &Client, id: &str, state: &str) -> Value {
    let r = c
        .get(&format!("/v1/vms/{id}/wait?state={state}&timeout=30"))
        .await
        .unwrap();
    expect_status(&r, 200)
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && !std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .is_empty()
}

/// Attaches to the console, types a line, and returns what came back.
async fn console_echo(c: &Client, id: &str, line: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = common::console_attach(c, id).await;
    conn.write_all(line.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(line.trim()) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// A console client that leaves (or stops reading) is dropped by the vCPU that next writes the
/// console; the guest goes on. (The vCPU's seccomp filter once lacked `shutdown`, so the
/// guest's first line after a detach killed its VMM.)
#[test]
fn a_guest_goes_on_printing_after_its_console_client_left() {
    let agent = TestAgent::start("detach");
    rt().block_on(async {
        let c = agent.client();
        let mut s = spec("talker");
        s["boot"]["cmdline"] =
            json!("console=ttyS0 bexar.test=dirty bexar.dirty-mib=1 bexar.dirty-rate=100");
        expect_status(&c.post("/v1/vms?start=true", &s).await.unwrap(), 201);
        wait_console(&c, "talker", "pages written", 30).await;
        drop(common::console_attach(&c, "talker").await);
        let lines = |t: &str| t.matches("pages written").count();
        let left = lines(&console_text(&c, "talker").await);
        let t = Instant::now();
        while lines(&console_text(&c, "talker").await) < left + 3 {
            let v = expect_status(&c.get("/v1/vms/talker").await.unwrap(), 200);
            assert_eq!(v["state"], "running", "{v}");
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the guest went quiet"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let v = expect_status(&c.get("/v1/vms/talker").await.unwrap(), 200);
        assert_eq!(v["state"], "running", "{v}");
        expect_status(&c.delete("/v1/vms/talker").await.unwrap(), 204);
    });
}

#[test]
fn twenty_vms_through_their_whole_lifecycle() {
    let agent = TestAgent::start("twenty");
    rt().block_on(async {
        let c = agent.client();
        let ids: Vec<String> = (0..20).map(|i| format!("vm-{i:02}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let mut s = spec(id);
            s["labels"] = json!({"team": if i % 2 == 0 { "even" } else { "odd" }});
            let v = expect_status(&c.post("/v1/vms?start=true", &s).await.unwrap(), 201);
            assert_eq!(v["state"], "running", "{v}");
            assert_eq!(v["spec"]["id"], id.as_str());
        }
        for id in &ids {
            wait_console(&c, id, READY, 60).await;
        }
        let list = expect_status(&c.get("/v1/vms").await.unwrap(), 200);
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 20);
        assert!(items.iter().all(|v| v["state"] == "running"));
        let odd = expect_status(&c.get("/v1/vms?selector=team%3Dodd").await.unwrap(), 200);
        assert_eq!(odd["items"].as_array().unwrap().len(), 10);
        // Pages of 7 by id, each continuing after the last, while VMs are made between pages
        // (one sorting among those already seen, one after): no VM twice, none of the twenty
        // missed, and fields cut each VM down to what was asked.
        let all: Vec<String> = items
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        let mut seen: Vec<String> = Vec::new();
        let mut after = String::new();
        for page in 0.. {
            let q = if after.is_empty() {
                "/v1/vms?limit=7&fields=id,state".to_owned()
            } else {
                format!("/v1/vms?limit=7&fields=id,state&after={after}")
            };
            let p = expect_status(&c.get(&q).await.unwrap(), 200);
            for v in p["items"].as_array().unwrap() {
                assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
                seen.push(v["id"].as_str().unwrap().to_owned());
            }
            if page == 0 {
                for id in [format!("{}-0", all[0]), "zz-late".to_owned()] {
                    expect_status(&c.post("/v1/vms", &spec(&id)).await.unwrap(), 201);
                }
            }
            match p["next"].as_str() {
                Some(n) => after = n.to_owned(),
                None => break,
            }
        }
        let mut unique = seen.clone();
        unique.dedup();
        assert_eq!(unique, seen, "a VM seen twice");
        assert!(all.iter().all(|id| seen.contains(id)), "{seen:?}");
        assert!(
            seen.contains(&"zz-late".to_owned()),
            "a VM made after the cursor is missing"
        );
        for id in [format!("{}-0", all[0]), "zz-late".to_owned()] {
            expect_status(&c.delete(&format!("/v1/vms/{id}")).await.unwrap(), 204);
        }
        assert_eq!(agent.vmm_processes().len(), 20, "one VMM per VM");

        // Retrying a create is idempotent; another spec under the same id is a conflict.
        let first = expect_status(&c.get("/v1/vms/vm-00").await.unwrap(), 200);
        let mut again = spec("vm-00");
        again["labels"] = json!({"team": "even"});
        let same = expect_status(&c.post("/v1/vms", &again).await.unwrap(), 200);
        assert_eq!(same["status"]["pid"], first["status"]["pid"]);
        let mut other = again.clone();
        other["memory_mib"] = json!(48);
        let e = expect_status(&c.post("/v1/vms", &other).await.unwrap(), 409);
        assert_eq!(e["error"]["code"], "already_exists");

        // Admission control: more memory than the host has is refused, and nothing is left.
        let mut big = spec("too-big");
        big["memory_mib"] = json!(1 << 20);
        let e = expect_status(&c.post("/v1/vms", &big).await.unwrap(), 409);
        assert_eq!(e["error"]["code"], "over_capacity");
        assert!(e["error"]["message"].as_str().unwrap().contains("memory"));
        expect_status(&c.get("/v1/vms/too-big").await.unwrap(), 404);

        // Pause and resume every VM.
        for id in &ids {
            let v = expect_status(
                &c.post(&format!("/v1/vms/{id}/pause"), &Value::Null)
                    .await
                    .unwrap(),
                200,
            );
            assert_eq!(v["state"], "paused");
        }
        let paused = expect_status(&c.get("/v1/vms?state=paused").await.unwrap(), 200);
        assert_eq!(paused["items"].as_array().unwrap().len(), 20);
        for id in &ids {
            let v = expect_status(
                &c.post(&format!("/v1/vms/{id}/resume"), &Value::Null)
                    .await
                    .unwrap(),
                200,
            );
            assert_eq!(v["state"], "running");
        }

        // The console is interactive: the idle guest echoes what is typed.
        let echoed = console_echo(&c, "vm-03", "hello-bexar\r").await;
        assert!(echoed.contains("hello-bexar"), "no echo: {echoed:?}");

        // Half stop gracefully (the guest sees Ctrl-Alt-Del and powers off by itself), half
        // are forced.
        for (i, id) in ids.iter().enumerate() {
            let path = if i % 2 == 0 {
                format!("/v1/vms/{id}/stop?timeout=20")
            } else {
                format!("/v1/vms/{id}/stop?force=true")
            };
            let v = expect_status(&c.post(&path, &Value::Null).await.unwrap(), 200);
            assert_eq!(v["state"], "stopped", "{v}");
            let reason = v["status"]["exit_reason"].as_str().unwrap_or("");
            if i % 2 == 0 {
                assert!(
                    reason.contains("status 0"),
                    "{id} did not shut down gracefully: {reason}"
                );
                assert!(console_text(&c, id).await.contains("ctrl-alt-del"));
            } else {
                assert_eq!(reason, "stopped on request");
            }
        }
        assert!(agent.vmm_processes().is_empty(), "stopped VMs keep no VMM");
        // Stopping a stopped VM is a no-op.
        expect_status(
            &c.post("/v1/vms/vm-00/stop", &Value::Null).await.unwrap(),
            200,
        );

        // Start them again, then reboot one.
        for id in &ids {
            let v = expect_status(
                &c.post(&format!("/v1/vms/{id}/start"), &Value::Null)
                    .await
                    .unwrap(),
                200,
            );
            assert_eq!(v["state"], "running");
        }
        let before = expect_status(&c.get("/v1/vms/vm-05").await.unwrap(), 200);
        wait_console(&c, "vm-05", READY, 60).await;
        let after = expect_status(
            &c.post("/v1/vms/vm-05/reboot", &Value::Null).await.unwrap(),
            200,
        );
        assert_eq!(after["state"], "running");
        assert_ne!(after["status"]["pid"], before["status"]["pid"]);

        // Metrics carry per-VM counters and the API's latencies.
        let m = String::from_utf8_lossy(&c.get("/v1/metrics").await.unwrap().body).into_owned();
        assert!(
            m.contains("bexar_vm_vcpu_exits_total{vm=\"vm-00\",vcpu=\"0\"}"),
            "{m}"
        );
        assert!(m.contains(
            "bexar_api_request_duration_seconds_count{method=\"POST\",route=\"/v1/vms\""
        ));
        assert!(m.contains("bexar_vms{state=\"running\"} 20"));
        // A second scrape renders what the agent holds: the same VMs, as old as the first.
        let m2 = String::from_utf8_lossy(&c.get("/v1/metrics").await.unwrap().body).into_owned();
        let age = |m: &str| -> f64 {
            m.lines()
                .find_map(|l| l.strip_prefix("bexar_vm_counters_age_seconds "))
                .expect("the counters' age")
                .parse()
                .unwrap()
        };
        assert!(age(&m2) >= age(&m) && age(&m2) < 60.0, "{m2}");
        assert!(m2.contains("bexar_vm_vcpu_exits_total{vm=\"vm-19\",vcpu=\"0\"}"));

        // Delete everything; deleting twice is fine.
        for id in &ids {
            let r = c.delete(&format!("/v1/vms/{id}")).await.unwrap();
            assert_eq!(r.status.as_u16(), 204);
        }
        assert_eq!(
            c.delete("/v1/vms/vm-00").await.unwrap().status.as_u16(),
            204
        );
        let list = expect_status(&c.get("/v1/vms").await.unwrap(), 200);
        assert!(list["items"].as_array().unwrap().is_empty());
        assert!(agent.vmm_processes().is_empty(), "no VMM left behind");
        assert_eq!(
            std::fs::read_dir(agent.state().join("vms"))
                .unwrap()
                .count(),
            0
        );

        // The event log tells the story of each VM, in order.
        let r = c.get("/v1/events?vm=vm-05").await.unwrap();
        let kinds: Vec<String> = String::from_utf8_lossy(&r.body)
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "created", "started", "paused", "resumed", "stopped", "started", "stopped",
                "started", "deleted"
            ],
        );
    });
}

#[test]
fn the_agent_survives_kill_9_and_finds_every_vm_as_it_was() {
    let mut agent = TestAgent::start("crash");
    rt().block_on(async {
        let c = agent.client();
        for (id, policy) in [("keep", "no"), ("victim", "no"), ("phoenix", "on-failure")] {
            let mut s = spec(id);
            s["restart_policy"] = json!(policy);
            expect_status(&c.post("/v1/vms?start=true", &s).await.unwrap(), 201);
            wait_console(&c, id, READY, 60).await;
        }
        expect_status(
            &c.post("/v1/vms", &spec("idle-stopped")).await.unwrap(),
            201,
        );
        let get = |id: &'static str| {
            let c = c.clone();
            async move { expect_status(&c.get(&format!("/v1/vms/{id}")).await.unwrap(), 200) }
        };
        let keep_pid = get("keep").await["status"]["pid"].as_u64().unwrap();
        let victim_pid = get("victim").await["status"]["pid"].as_u64().unwrap();
        let phoenix_pid = get("phoenix").await["status"]["pid"].as_u64().unwrap();

        // The agent dies; while it is down two VMMs die too.
        agent.kill9();
        assert!(pid_alive(keep_pid), "killing the agent killed a guest");
        for pid in [victim_pid, phoenix_pid] {
            // SAFETY: kill(2) on a VMM pid of this test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
        // A VM whose cgroups would not go when it was deleted (a process still in them) leaves
        // them: the restarted agent removes those of VMs it has no record of, and only those.
        let parent = common::agent_cgroup_parent(&agent.dir);
        let cgroups = |id: &str| -> Vec<PathBuf> {
            // Each hierarchy once (cpu and cpuacct may be links to one), v2 at the top or not.
            let mut dirs: Vec<PathBuf> =
                ["cpu", "cpuacct", "memory", "pids", "blkio", "unified", ""]
                    .iter()
                    .filter_map(|h| {
                        Path::new("/sys/fs/cgroup")
                            .join(h)
                            .join(&parent)
                            .canonicalize()
                            .ok()
                    })
                    .map(|p| p.join(format!("vm-{id}")))
                    .collect();
            dirs.sort();
            dirs.dedup();
            dirs
        };
        let ghost = cgroups("ghost");
        for d in &ghost {
            match std::fs::create_dir(d) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    panic!("{}: {e}", d.display())
                }
                _ => {}
            }
        }
        let keep_cgroups = cgroups("keep");
        agent.spawn();
        if !ghost.is_empty() {
            // spawn() returns once the agent has recovered, which is when it sweeps.
            for d in &ghost {
                assert!(!d.exists(), "{} stays after the restart", d.display());
            }
            for d in &keep_cgroups {
                assert!(d.exists(), "{} of a running VM went", d.display());
            }
        }

        // Re-adopted: same process, console and stop still work.
        let keep = get("keep").await;
        assert_eq!(keep["state"], "running", "{keep}");
        assert_eq!(keep["status"]["pid"].as_u64(), Some(keep_pid));
        assert!(console_text(&c, "keep").await.contains(READY));
        let echoed = console_echo(&c, "keep", "still-here\r").await;
        assert!(echoed.contains("still-here"), "{echoed:?}");

        // Died while the agent was down: reported failed, with the reason.
        let victim = get("victim").await;
        assert_eq!(victim["state"], "failed", "{victim}");
        assert!(victim["status"]["exit_reason"]
            .as_str()
            .unwrap()
            .contains("agent was not running"));
        // ... and restarted if its policy says so.
        let phoenix = wait_state(&c, "phoenix", "running").await;
        assert_ne!(phoenix["status"]["pid"].as_u64(), Some(phoenix_pid));
        assert_eq!(phoenix["status"]["restarts"], 1);
        assert_eq!(get("idle-stopped").await["state"], "stopped");

        let stopped = expect_status(
            &c.post("/v1/vms/keep/stop?timeout=20", &Value::Null)
                .await
                .unwrap(),
            200,
        );
        assert_eq!(stopped["state"], "stopped");
        assert!(!pid_alive(keep_pid));

        // A VMM killed under a running agent: failed, then restarted by policy.
        let p = get("phoenix").await["status"]["pid"].as_u64().unwrap();
        // SAFETY: kill(2) on a VMM pid of this test.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
        let t = Instant::now();
        loop {
            let v = get("phoenix").await;
            if v["state"] == "running" && v["status"]["pid"].as_u64() != Some(p) {
                assert_eq!(v["status"]["restarts"], 2);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "phoenix not restarted: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // Operations in flight: concurrent creates+starts, starts, stops and deletes, and the agent
    // is killed in the middle of them.
    let flight: Vec<String> = (0..6).map(|i| format!("fly-{i}")).collect();
    rt().block_on(async {
        let c = agent.client();
        for id in &flight[3..] {
            expect_status(&c.post("/v1/vms?start=true", &spec(id)).await.unwrap(), 201);
        }
    });
    let socket = agent.socket();
    let mut threads = Vec::new();
    for (i, id) in flight.iter().enumerate() {
        let (socket, id) = (socket.clone(), id.clone());
        threads.push(std::thread::spawn(move || {
            rt().block_on(async {
                let c = Client::new(&socket);
                let _ = match i {
                    0..=2 => c.post("/v1/vms?start=true", &spec(&id)).await,
                    3 => {
                        c.post(&format!("/v1/vms/{id}/stop?force=true"), &Value::Null)
                            .await
                    }
                    4 => c.delete(&format!("/v1/vms/{id}")).await,
                    _ => {
                        c.post(&format!("/v1/vms/{id}/reboot?timeout=0"), &Value::Null)
                            .await
                    }
                };
            })
        }));
    }
    std::thread::sleep(Duration::from_millis(30));
    agent.restart();
    for t in threads {
        let _ = t.join();
    }
    rt().block_on(async {
        let c = agent.client();
        // Let interrupted operations settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let list = expect_status(&c.get("/v1/vms").await.unwrap(), 200);
        let procs = agent.vmm_processes();
        let events = String::from_utf8_lossy(&c.get("/v1/events").await.unwrap().body).into_owned();
        eprintln!("after the crash:\n{events}");
        for v in list["items"].as_array().unwrap() {
            let id = v["id"].as_str().unwrap();
            let n = procs.iter().filter(|(_, d)| d == id).count();
            let running = matches!(v["state"].as_str(), Some("running" | "paused"));
            assert_eq!(
                n,
                usize::from(running),
                "{id}: {n} VMMs for a VM that is {}",
                v["state"]
            );
            if running {
                assert_eq!(
                    procs
                        .iter()
                        .find(|(_, d)| d == id)
                        .map(|(p, _)| u64::from(*p)),
                    v["status"]["pid"].as_u64(),
                    "{id}: the recorded pid is not the VMM's"
                );
            }
            assert!(
                v["operation"].is_null(),
                "{id}: an operation is still recorded: {v}"
            );
        }
        // Every VMM process belongs to a VM that says it is running.
        for (pid, d) in &procs {
            assert!(
                list["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["id"] == d.as_str()),
                "VMM {pid} runs {d}, which no VM owns"
            );
        }
        // "keep"'s VMM outlived the agent that held its VM (teardown.rs): it sees the keeper
        // socket closed and leaves the VM to a reaper of its own.
        expect_status(
            &c.post("/v1/vms/keep/stop?force=true", &json!({}))
                .await
                .unwrap(),
            200,
        );
        let log = common::read(&agent.state().join("vms/keep/vmm.log"));
        assert!(log.contains("its keeper has gone"), "{log}");
        for v in list["items"].as_array().unwrap() {
            let id = v["id"].as_str().unwrap();
            assert_eq!(
                c.delete(&format!("/v1/vms/{id}"))
                    .await
                    .unwrap()
                    .status
                    .as_u16(),
                204
            );
        }
        assert!(agent.vmm_processes().is_empty());
    });
}

#[test]
fn bad_requests_get_a_4xx_naming_the_problem_and_change_nothing() {
    let agent = TestAgent::start("bad");
    rt().block_on(async {
        let c = agent.client();
        expect_status(&c.post("/v1/vms", &spec("s1")).await.unwrap(), 201);
        let r1 = expect_status(&c.post("/v1/vms?start=true", &spec("r1")).await.unwrap(), 201);
        let before = expect_status(&c.get("/v1/vms").await.unwrap(), 200);

        let with = |f: &dyn Fn(&mut Value)| {
            let mut s = spec("new-vm");
            f(&mut s);
            serde_json::to_vec(&s).unwrap()
        };
        let huge = vec![b' '; 100 * 1024];
        #[rustfmt::skip]
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, &str, Vec<u8>, u16, &str, Option<&str>)> = vec![
            ("POST", "/v1/vms", b"{".to_vec(), 400, "invalid_json", Some("body")),
            ("POST", "/v1/vms", b"[]".to_vec(), 400, "invalid_field", Some("body")),
            // serde reads a struct from an array of its fields: not here.
            ("PUT", "/v1/vms/s1/metadata", b"[]".to_vec(), 400, "invalid_field", Some("body")),
            ("POST", "/v1/vms", with(&|s| s["boot"] = json!(["/k"])), 400, "invalid_field", Some("boot")),
            ("POST", "/v1/vms", with(&|s| s["disks"] = json!([["/d"]])), 400, "invalid_field", Some("disks[0]")),
            // null is leaving the field out: refused for a required field, naming it...
            ("POST", "/v1/vms", with(&|s| s["vcpus"] = json!(null)), 400, "invalid_field", Some("vcpus")),
            ("POST", "/v1/vms", with(&|s| s["boot"]["kernel"] = json!(null)), 400, "invalid_field", Some("boot.kernel")),
            // ...and integers are JSON Schema's: 1.0 is 1, 1.5 is not an integer.
            ("POST", "/v1/vms", with(&|s| s["vcpus"] = json!(1.5)), 400, "invalid_field", Some("vcpus")),
            // What the VM could never start with is refused at create.
            ("POST", "/v1/vms", with(&|s| s["boot"]["cmdline"] = json!("console=ttyS0\tquiet")), 400, "invalid_field", Some("boot.cmdline")),
            ("POST", "/v1/vms", with(&|s| s["boot"]["cmdline"] = json!("console=ttyS0 é")), 400, "invalid_field", Some("boot.cmdline")),
            ("POST", "/v1/vms", with(&|s| s["nics"] = json!([{"tap": ".."}])), 400, "invalid_field", Some("nics[0].tap")),
            ("POST", "/v1/vms", with(&|s| s["nics"] = json!([{"tap": "tapé12345678"}])), 400, "invalid_field", Some("nics[0].tap")),
            ("POST", "/v1/vms/r1/stop?force=maybe&force=1", vec![], 400, "invalid_parameter", Some("force")),
            ("POST", "/v1/vms/r1/stop?force=1&force=maybe", vec![], 400, "invalid_parameter", Some("force")),
            ("POST", "/v1/vms", b"".to_vec(), 400, "invalid_json", Some("body")),
            ("POST", "/v1/vms", with(&|s| s["vcpus"] = json!("two")), 400, "invalid_field", Some("vcpus")),
            ("POST", "/v1/vms", with(&|s| s["vcpus"] = json!(300)), 400, "invalid_field", Some("vcpus")),
            ("POST", "/v1/vms", with(&|s| s["vcpus"] = json!(0)), 400, "invalid_field", Some("vcpus")),
            ("POST", "/v1/vms", with(&|s| s["memory_mib"] = json!(-1)), 400, "invalid_field", Some("memory_mib")),
            ("POST", "/v1/vms", with(&|s| s["memory_mib"] = json!(8)), 400, "invalid_field", Some("memory_mib")),
            ("POST", "/v1/vms", with(&|s| s["colour"] = json!("red")), 400, "invalid_field", Some("colour")),
            ("POST", "/v1/vms", with(&|s| s["boot"]["x"] = json!(1)), 400, "invalid_field", Some("boot.x")),
            ("POST", "/v1/vms", with(&|s| { s.as_object_mut().unwrap().remove("memory_mib"); }), 400, "invalid_field", Some("memory_mib")),
            ("POST", "/v1/vms", with(&|s| s["id"] = json!("Bad/Id")), 400, "invalid_field", Some("id")),
            ("POST", "/v1/vms", with(&|s| s["boot"]["kernel"] = json!("relative/vmlinux")), 400, "invalid_field", Some("boot.kernel")),
            ("POST", "/v1/vms", with(&|s| s["boot"]["kernel"] = json!("/nonexistent/vmlinux")), 400, "invalid_field", Some("boot.kernel")),
            ("POST", "/v1/vms", with(&|s| s["disks"] = json!([{"path": "/nonexistent.img"}])), 400, "invalid_field", Some("disks[0].path")),
            ("POST", "/v1/vms", with(&|s| s["disks"] = json!([{"path": 3}])), 400, "invalid_field", Some("disks[0].path")),
            ("POST", "/v1/vms", with(&|s| s["nics"] = json!([{"tap": "t0", "mac": "zz"}])), 400, "invalid_field", Some("nics[0].mac")),
            ("POST", "/v1/vms", with(&|s| s["restart_policy"] = json!("sometimes")), 400, "invalid_field", Some("restart_policy")),
            ("POST", "/v1/vms", with(&|s| s["uuid"] = json!("not-a-uuid")), 400, "invalid_field", Some("uuid")),
            ("PUT", "/v1/vms/s1/metadata", b"{\"http_tokens\":\"sometimes\"}".to_vec(), 400, "invalid_field", Some("http_tokens")),
            ("POST", "/v1/vms", with(&|s| s["labels"] = json!({"k": 1})), 400, "invalid_field", Some("labels.k")),
            ("POST", "/v1/vms", with(&|s| s["cpu_template"] = json!("pentium")), 400, "invalid_field", Some("cpu_template")),
            ("POST", "/v1/vms", with(&|s| s["memory_mib"] = json!(1 << 20)), 409, "over_capacity", None),
            ("POST", "/v1/vms", with(&|s| { s["id"] = json!("s1"); s["vcpus"] = json!(2); }), 409, "already_exists", None),
            ("POST", "/v1/vms", huge, 413, "body_too_large", None),
            ("POST", "/v1/vms?start=perhaps", with(&|_| {}), 400, "invalid_parameter", Some("start")),
            ("GET", "/v1/vms?colour=red", vec![], 400, "invalid_parameter", Some("colour")),
            ("GET", "/v1/vms?state=dancing", vec![], 400, "invalid_parameter", Some("state")),
            ("GET", "/v1/vms?limit=0", vec![], 400, "invalid_parameter", Some("limit")),
            ("GET", "/v1/vms?limit=1001", vec![], 400, "invalid_parameter", Some("limit")),
            ("GET", "/v1/vms?limit=ten", vec![], 400, "invalid_parameter", Some("limit")),
            ("GET", "/v1/vms?fields=id,colour", vec![], 400, "invalid_parameter", Some("fields")),
            ("GET", "/v1/vms?fields=", vec![], 400, "invalid_parameter", Some("fields")),
            ("GET", "/v1/vms/nope", vec![], 404, "not_found", None),
            ("GET", "/v1/vms/..%2Fetc", vec![], 404, "not_found", None),
            ("GET", "/v1/segments/..%2Fetc", vec![], 404, "not_found", None),
            ("POST", "/v1/vms/nope/start", vec![], 404, "not_found", None),
            ("POST", "/v1/vms/s1/pause", vec![], 409, "illegal_transition", None),
            ("POST", "/v1/vms/s1/resume", vec![], 409, "illegal_transition", None),
            ("POST", "/v1/vms/s1/reboot", vec![], 409, "illegal_transition", None),
            ("POST", "/v1/vms/s1/explode", vec![], 404, "no_route", None),
            ("POST", "/v1/vms/r1/stop?timeout=soon", vec![], 400, "invalid_parameter", Some("timeout")),
            ("POST", "/v1/vms/r1/stop?timeout=-1", vec![], 400, "invalid_parameter", Some("timeout")),
            ("POST", "/v1/vms/r1/stop?force=maybe", vec![], 400, "invalid_parameter", Some("force")),
            ("POST", "/v1/vms/r1/stop", b"{\"force\":true}".to_vec(), 400, "invalid_field", Some("body")),
            ("GET", "/v1/vms/s1/start", vec![], 405, "method_not_allowed", None),
            ("PUT", "/v1/vms", vec![], 405, "method_not_allowed", None),
            ("GET", "/v2/vms", vec![], 404, "no_route", None),
            ("GET", "/v1/vms/r1/wait", vec![], 400, "invalid_parameter", Some("state")),
            ("GET", "/v1/vms/r1/wait?state=asleep", vec![], 400, "invalid_parameter", Some("state")),
            ("GET", "/v1/vms/s1/wait?state=running&timeout=0.2", vec![], 408, "timeout", None),
            ("GET", "/v1/vms/s1/console/attach", vec![], 409, "illegal_transition", None),
            ("GET", "/v1/vms/r1/console/attach", vec![], 426, "upgrade_required", None),
            ("GET", "/v1/vms/r1/console?offset=x", vec![], 400, "invalid_parameter", Some("offset")),
            ("GET", "/v1/events?since=-1", vec![], 400, "invalid_parameter", Some("since")),
            // Parameters are checked before the path's id, on every route.
            ("GET", "/v1/vms/..%2Fetc/metadata?x=1", vec![], 400, "invalid_parameter", Some("x")),
            ("DELETE", "/v1/segments/nope?force=1", vec![], 400, "invalid_parameter", Some("force")),
            ("GET", "/v1/openapi.json?v=2", vec![], 400, "invalid_parameter", Some("v")),
        ];
        for (method, path, body, status, code, field) in cases {
            let m = axum::http::Method::from_bytes(method.as_bytes()).unwrap();
            let r = c.request(m, path, body).await.unwrap();
            let v = r.json();
            let what = format!("{method} {path} -> {} {v}", r.status);
            assert_eq!(r.status.as_u16(), status, "{what}");
            assert_eq!(v["error"]["code"], code, "{what}");
            assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty(), "{what}");
            if let Some(f) = field {
                assert_eq!(v["error"]["field"], f, "{what}");
                assert!(v["error"]["message"].as_str().unwrap().contains(f), "{what}");
            }
        }
        // Rust's names never reach the caller.
        let r = c.post("/v1/vms", &serde_json::from_slice(&with(&|s| s["vcpus"] = json!(300))).unwrap()).await.unwrap();
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(!msg.contains("u8"), "{msg}");
        // An upgrade without `Connection: upgrade` is not an upgrade (RFC 9110 7.8).
        let reply = raw_request(
            &agent.socket(),
            "GET /v1/vms/r1/console/attach HTTP/1.1\r\nHost: b\r\nUpgrade: bexar-console\r\n\r\n",
            Duration::from_secs(5),
        )
        .expect("a reply");
        assert!(reply.starts_with("HTTP/1.1 426"), "{reply}");
        // Nothing was half-applied: the same VMs, in the same states, the same VMM.
        let after = expect_status(&c.get("/v1/vms").await.unwrap(), 200);
        let summary = |v: &Value| -> Vec<(String, String, Value)> {
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| (x["id"].to_string(), x["state"].to_string(), x["status"]["pid"].clone()))
                .collect()
        };
        assert_eq!(summary(&before), summary(&after));
        assert_eq!(after["items"][0]["status"]["pid"], r1["status"]["pid"]);
        let files: Vec<String> = std::fs::read_dir(agent.state().join("vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 2, "{files:?}");

        // Every documented route exists (answers with something other than "no such route").
        let doc: Value = serde_json::from_str(bexar_agent::api::OPENAPI).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if !["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                    continue;
                }
                let m = axum::http::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let p = path.replace("{id}", "no-such-vm");
                let r = c.request(m, &p, vec![]).await.unwrap();
                let code = r.json()["error"]["code"].clone();
                assert!(
                    code != "no_route" && code != "method_not_allowed",
                    "{method} {path} is documented but not served: {code}"
                );
            }
        }

        // What the document allows is taken: an integer written 1.0, null for optional fields.
        let mut s = spec("lenient");
        s["vcpus"] = json!(1.0);
        s["rng"] = Value::Null;
        s["labels"] = Value::Null;
        s["boot"]["initrd"] = Value::Null;
        let v = expect_status(&c.post("/v1/vms", &s).await.unwrap(), 201);
        assert_eq!(v["spec"]["vcpus"], 1);
        assert_eq!(v["spec"]["rng"], false);
        expect_status(&c.delete("/v1/vms/lenient").await.unwrap(), 204);
    });
}

#[test]
fn the_cli_drives_the_agent() {
    let agent = TestAgent::start("cli");
    let run = |args: &[&str]| {
        let o = bexar()
            .env("BEXAR_SOCKET", agent.socket())
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            common::text(&o).0,
            common::text(&o).1,
        )
    };
    let kernel = testguest().display().to_string();
    let (code, out, err) = run(&[
        "vm",
        "create",
        "c1",
        "--kernel",
        &kernel,
        "--cmdline",
        "console=ttyS0 bexar.test=idle",
        "--memory",
        "32",
        "-L",
        "role=test",
        "--start",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("c1") && out.contains("running"), "{out}");
    let (code, out, _) = run(&["vm", "ls", "-l", "role=test", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["items"][0]["id"], "c1");
    // Pages: one at a time says where to go on; without a limit every page is shown.
    let (code, out, err) = run(&["vm", "create", "c2", "--kernel", &kernel, "--memory", "32"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run(&["vm", "ls", "--limit", "1"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("c1") && !out.contains("c2") && out.contains("--after c1"),
        "{out}"
    );
    let (code, out, _) = run(&["vm", "ls", "--after", "c1"]);
    assert_eq!(code, 0);
    assert!(!out.contains("c1") && out.contains("c2"), "{out}");
    let (code, _, err) = run(&["vm", "ls", "--limit", "0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("limit"), "{err}");
    let (code, _, _) = run(&["vm", "rm", "c2"]);
    assert_eq!(code, 0);
    let (code, out, _) = run(&["host"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("vcpus") && out.contains("1 allocated"),
        "{out}"
    );
    let (code, _, err) = run(&["vm", "pause", "nope"]);
    assert_eq!(code, 1, "refused requests exit 1");
    assert!(err.contains("no VM with id"), "{err}");
    let (code, _, _) = run(&["vm", "wait", "c1", "--state", "stopped", "--timeout", "0.2"]);
    assert_eq!(code, 5, "a wait that times out exits 5");
    let t = Instant::now();
    loop {
        let (_, out, _) = run(&["vm", "logs", "c1"]);
        if out.contains(READY) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, out, _) = run(&["vm", "stop", "c1"]);
    assert_eq!(code, 0);
    assert!(out.contains("stopped"), "{out}");
    let (code, out, _) = run(&["events", "--vm", "c1"]);
    assert_eq!(code, 0);
    assert!(out.contains("created") && out.contains("stopped"), "{out}");
    let (code, _, _) = run(&["vm", "rm", "c1"]);
    assert_eq!(code, 0);
    let o = bexar()
        .env("BEXAR_SOCKET", "/nonexistent/agent.sock")
        .arg("host")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "an unreachable agent exits 3");
}

#[test]
fn a_linux_guest_boots_under_the_agent() {
    let agent = TestAgent::start("linux");
    rt().block_on(async {
        let c = agent.client();
        let s = common::linux_vm_spec("linux");
        let v = expect_status(&c.post("/v1/vms?start=true", &s).await.unwrap(), 201);
        assert_eq!(v["state"], "running");
        wait_console(&c, "linux", "Run /init as init process", 600).await;
        let v = expect_status(
            &c.post("/v1/vms/linux/stop?timeout=2", &Value::Null)
                .await
                .unwrap(),
            200,
        );
        assert_eq!(v["state"], "stopped");
        assert_eq!(
            c.delete("/v1/vms/linux").await.unwrap().status.as_u16(),
            204
        );
    });
}

#[test]
fn the_vm_spec_carries_devices_to_the_guest() {
    let agent = TestAgent::start("devices");
    let disk = agent.dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    rt().block_on(async {
        let c = agent.client();
        // The test guest writes and verifies a pattern on vda, takes entropy, and reports status
        // 0 on the exit port, which ends the VM cleanly.
        for (id, test, extra) in [
            (
                "blk",
                "blk-rw",
                json!({"disks": [{"path": disk.display().to_string(), "serial": "data-1"}]}),
            ),
            ("rng", "rng", json!({"rng": true})),
        ] {
            let mut s = spec(id);
            s["boot"]["cmdline"] = json!(format!("console=ttyS0 bexar.test={test} bexar.seed=3"));
            for (k, v) in extra.as_object().unwrap() {
                s[k] = v.clone();
            }
            expect_status(&c.post("/v1/vms?start=true", &s).await.unwrap(), 201);
            let v = wait_state(&c, id, "stopped").await;
            let console = console_text(&c, id).await;
            assert!(
                v["status"]["exit_reason"]
                    .as_str()
                    .unwrap()
                    .contains("status 0"),
                "{v}\n{console}"
            );
            assert!(console.contains(&format!("PASS {test}")), "{console}");
        }
        assert!(
            std::fs::read(&disk).unwrap().iter().any(|b| *b != 0),
            "nothing reached the disk"
        );
    });
}

#[test]
fn events_and_console_can_be_followed_and_resumed_from_a_cursor() {
    let agent = TestAgent::start("follow");
    rt().block_on(async {
        let c = agent.client();
        let last = |body: &[u8]| -> u64 {
            String::from_utf8_lossy(body)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|e| e["seq"].as_u64())
                .max()
                .unwrap_or(0)
        };
        let cursor = last(&c.get("/v1/events").await.unwrap().body);
        assert!(cursor >= 1, "the agent's start is an event");

        // A follower from the cursor sees what happens next, live.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
        let follower = {
            let c = c.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let _ = c
                    .stream(&format!("/v1/events?since={cursor}&follow=true"), |chunk| {
                        pending.extend_from_slice(chunk);
                        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = pending.drain(..=i).collect();
                            if let Ok(v) = serde_json::from_slice(&line) {
                                if tx.send(v).is_err() {
                                    return false;
                                }
                            }
                        }
                        true
                    })
                    .await;
            })
        };
        expect_status(
            &c.post("/v1/vms?start=true", &spec("f1")).await.unwrap(),
            201,
        );
        let mut kinds = Vec::new();
        while kinds.len() < 2 {
            let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a followed event within 10 s")
                .unwrap();
            assert!(e["seq"].as_u64().unwrap() > cursor);
            kinds.push(e["kind"].as_str().unwrap().to_owned());
        }
        assert_eq!(kinds, ["created", "started"]);
        follower.abort();

        // Resuming from a cursor replays exactly what came after it.
        let r = c
            .get(&format!("/v1/events?since={}", cursor + 1))
            .await
            .unwrap();
        let replay: Vec<Value> = String::from_utf8_lossy(&r.body)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(replay.len(), 1, "{replay:?}");
        assert_eq!(replay[0]["kind"], "started");

        // The console log resumes from a byte offset, and a follower sees new output.
        wait_console(&c, "f1", READY, 60).await;
        let full = console_text(&c, "f1").await;
        let offset = full.len() as u64;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let follower = {
            let c = c.clone();
            tokio::spawn(async move {
                let _ = c
                    .stream(
                        &format!("/v1/vms/f1/console?offset={offset}&follow=true"),
                        |chunk| tx.send(chunk.to_vec()).is_ok(),
                    )
                    .await;
            })
        };
        let echoed = console_echo(&c, "f1", "after-offset\r").await;
        assert!(echoed.contains("after-offset"));
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("after-offset") {
            let chunk = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("followed console output within 10 s")
                .unwrap();
            seen.extend(chunk);
        }
        assert!(
            !String::from_utf8_lossy(&seen).contains(READY),
            "the offset was not honoured"
        );
        // The follow ends when the VM stops.
        expect_status(
            &c.post("/v1/vms/f1/stop?force=true", &Value::Null)
                .await
                .unwrap(),
            200,
        );
        tokio::time::timeout(Duration::from_secs(10), follower)
            .await
            .expect("the console follow ends with the VM")
            .unwrap();
    });
}

#[test]
fn the_debug_socket_is_read_only() {
    use std::os::unix::fs::PermissionsExt;
    let agent = TestAgent::start("debug");
    let debug = agent.dir.join("debug.sock");
    assert_eq!(
        std::fs::metadata(agent.socket())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&debug).unwrap().permissions().mode() & 0o777,
        0o660
    );
    rt().block_on(async {
        let c = agent.client();
        expect_status(
            &c.post("/v1/vms?start=true", &spec("d1")).await.unwrap(),
            201,
        );
        let d = Client::new(&debug);
        let v = expect_status(&d.get("/v1/vms/d1").await.unwrap(), 200);
        assert_eq!(v["state"], "running");
        expect_status(&d.get("/v1/host").await.unwrap(), 200);
        for r in [
            d.post("/v1/vms/d1/stop", &Value::Null).await.unwrap(),
            d.delete("/v1/vms/d1").await.unwrap(),
            d.post("/v1/vms", &spec("d2")).await.unwrap(),
            d.get("/v1/vms/d1/console/attach").await.unwrap(),
        ] {
            assert_eq!(expect_status(&r, 403)["error"]["code"], "read_only");
        }
        let v = expect_status(&c.get("/v1/vms").await.unwrap(), 200);
        assert_eq!(
            v["items"].as_array().unwrap().len(),
            1,
            "the debug socket changed nothing"
        );
        assert_eq!(v["items"][0]["state"], "running");
    });
}

/// Sends a raw request and returns the start of the reply (None if any step fails, the agent
/// being killed meanwhile for one).
fn raw_request(socket: &Path, request: &str, timeout: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Sends `method path` on a raw connection and hangs up after `delay`, without reading the
/// answer: a scheduler's request timeout, a Ctrl-C.
fn hang_up(socket: &Path, method: &str, path: &str, body: &str, delay: Duration) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: bexar\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(delay);
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// Waits until the VM has no operation in flight, and returns its record.
async fn settled(c: &Client, id: &str) -> Option<Value> {
    let t = Instant::now();
    loop {
        let r = c.get(&format!("/v1/vms/{id}")).await.unwrap();
        if r.status == 404 {
            return None;
        }
        let v = expect_status(&r, 200);
        if v.get("operation").is_none() {
            return Some(v);
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{id}: an operation never ended: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every action, asked by a client that hangs up at a random moment (from before the agent
/// has read the request to after it answered), runs to its end: once it settles, the VM is in
/// the state the action leads to, with exactly one VMM when it runs (the one its record
/// names) and none when it does not, and the next action is accepted.
#[test]
fn clients_that_hang_up_mid_action_leave_nothing_half_done() {
    let agent = TestAgent::start("hangup");
    let c = agent.client();
    let (seed, mut next) = seeded_rng("hang-up test");
    let id = "hup";
    rt().block_on(async {
        let mut exists = false;
        for round in 0..60 {
            let delay = Duration::from_micros(next(40_000));
            let rec = if exists { settled(&c, id).await } else { None };
            let state = rec
                .as_ref()
                .map(|r| r["state"].as_str().unwrap().to_owned());
            let (method, path, body, expect) = match state.as_deref() {
                None => {
                    let body = spec(id).to_string();
                    ("POST", "/v1/vms?start=true".to_owned(), body, "running")
                }
                Some("stopped") | Some("failed") => match next(2) {
                    0 => (
                        "POST",
                        format!("/v1/vms/{id}/start"),
                        String::new(),
                        "running",
                    ),
                    _ => ("DELETE", format!("/v1/vms/{id}"), String::new(), "deleted"),
                },
                Some("running") => match next(3) {
                    0 => (
                        "POST",
                        format!("/v1/vms/{id}/stop?timeout=1"),
                        String::new(),
                        "stopped",
                    ),
                    1 => (
                        "POST",
                        format!("/v1/vms/{id}/reboot?timeout=1"),
                        String::new(),
                        "running",
                    ),
                    _ => (
                        "POST",
                        format!("/v1/vms/{id}/pause"),
                        String::new(),
                        "paused",
                    ),
                },
                Some("paused") => match next(2) {
                    0 => (
                        "POST",
                        format!("/v1/vms/{id}/resume"),
                        String::new(),
                        "running",
                    ),
                    _ => (
                        "POST",
                        format!("/v1/vms/{id}/stop?force=true"),
                        String::new(),
                        "stopped",
                    ),
                },
                Some(other) => panic!("round {round}: unexpected settled state {other}"),
            };
            let socket = agent.socket();
            let b = body.clone();
            let p = path.clone();
            tokio::task::spawn_blocking(move || hang_up(&socket, method, &p, &b, delay))
                .await
                .unwrap();
            let what = format!("round {round} (seed {seed}): {method} {path} cut after {delay:?}");
            // The request may have been cut before the agent read it all: then nothing
            // happened, which is fine too. Otherwise the action's end state is reached.
            let after = settled(&c, id).await;
            exists = after.is_some();
            let vmms = agent.vmm_processes();
            match &after {
                None => {
                    assert!(vmms.is_empty(), "{what}: VMMs of a deleted VM: {vmms:?}");
                    continue;
                }
                Some(v) => {
                    let now = v["state"].as_str().unwrap();
                    assert!(
                        now == expect || Some(now) == state.as_deref() || (expect == "deleted"),
                        "{what}: settled in {now}: {v}"
                    );
                    if expect == "deleted" {
                        assert_eq!(Some(now), state.as_deref(), "{what}: {v}");
                    }
                    // The desired state agrees with the observed one.
                    let desired = v["desired"].as_str().unwrap();
                    let ok = matches!(
                        (now, desired),
                        ("running", "running") | ("paused", "paused") | ("stopped", "stopped")
                    );
                    assert!(ok, "{what}: state {now} but desired {desired}: {v}");
                    let pid = v["status"]["pid"].as_u64();
                    if matches!(now, "running" | "paused") {
                        let pid = pid.unwrap_or_else(|| panic!("{what}: no pid: {v}"));
                        assert_eq!(vmms, [(pid as u32, id.to_owned())], "{what}: {v}");
                    } else {
                        assert!(
                            vmms.is_empty(),
                            "{what}: a VMM outlived its VM's stop: {vmms:?} {v}"
                        );
                    }
                }
            }
        }
        // Whatever state it ended in, the VM still obeys.
        if exists {
            let r = c
                .post(&format!("/v1/vms/{id}/stop?force=true"), &Value::Null)
                .await
                .unwrap();
            assert!(r.status == 200 || r.status == 409, "{r:?}");
            let r = c.delete(&format!("/v1/vms/{id}")).await.unwrap();
            expect_status(&r, 204);
        }
        assert!(agent.vmm_processes().is_empty());
    });
}

/// Sends `sig` to `pid`.
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a VMM process of this test's own agent.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Waits (up to 60 s) until every VM has settled: nothing in flight and in the state it is
/// wanted in; returns them. `what` says where, if they never do.
async fn all_settled(c: &Client, what: &str) -> Vec<Value> {
    let t = Instant::now();
    loop {
        let v = expect_status(&c.get("/v1/vms").await.unwrap(), 200);
        let items = v["items"].as_array().unwrap().clone();
        let unsettled = items
            .iter()
            .find(|vm| vm.get("operation").is_some() || vm["state"] != vm["desired"]);
        match unsettled {
            None => return items,
            Some(vm) => assert!(
                t.elapsed() < Duration::from_secs(60),
                "{what}: not settled after 60 s: {} is {} (desired {}): {vm}",
                vm["id"],
                vm["state"],
                vm["desired"]
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The agent killed (-9) at random instants during random actions, hundreds of times, with
/// VMMs killed (their restart waiting out its back-off), and VMMs stopped (SIGSTOP) across the
/// agent's restart, as a starved or stuck process would be, and let go later. After every
/// restart, once settled: every VM is in its desired state, nothing is in flight, every VM
/// that runs has exactly the one VMM its record names, no VMM runs that no VM owns, and a VM
/// that no action touched (stopped VMMs included) kept its VMM.
#[test]
fn agent_killed_at_random_keeps_every_promise() {
    let mut agent = TestAgent::start_with_stop_timeout("chaos", "1");
    let (seed, mut next) = seeded_rng("chaos test");
    const VMS: usize = 6;
    const CYCLES: usize = 200;
    let ids: Vec<String> = (0..VMS).map(|i| format!("chaos-{i}")).collect();
    let rt = rt();
    rt.block_on(async {
        let c = agent.client();
        for (i, id) in ids.iter().enumerate() {
            let mut s = spec(id);
            s["restart_policy"] = json!(if i % 2 == 0 { "on-failure" } else { "always" });
            expect_status(&c.post("/v1/vms?start=true", &s).await.unwrap(), 201);
        }
    });
    let (mut reboots, mut pauses, mut killed, mut stopped_vmms, mut creates) = (0, 0, 0, 0, 0);
    let (mut upgrades, mut snapshots) = (0, 0);
    for cycle in 0..CYCLES {
        let c = agent.client();
        let before = rt.block_on(all_settled(&c, &format!("cycle {cycle} (seed {seed})")));
        let what = format!("cycle {cycle} (seed {seed})");
        // What runs now, by VM.
        let pids: std::collections::BTreeMap<String, u64> = before
            .iter()
            .filter_map(|v| Some((v["id"].as_str()?.to_owned(), v["status"]["pid"].as_u64()?)))
            .collect();
        let mut expected: Vec<(u32, String)> =
            pids.iter().map(|(k, v)| (*v as u32, k.clone())).collect();
        expected.sort();
        // A VMM that just ended leaves its reaper (teardown.rs: a child with the same command
        // line that releases the VM once the VMM has exited) behind for a moment. It names
        // itself `bexar-reaper` at once, but not in the same instant as the fork: looked at
        // again for up to 2 s.
        let t = Instant::now();
        let vmms = loop {
            let mut vmms: Vec<(u32, String)> = agent.vmm_processes();
            vmms.sort();
            if vmms == expected || t.elapsed() > Duration::from_secs(2) {
                break vmms;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            vmms, expected,
            "{what}: VMM processes do not match the records"
        );

        // One action on one VM, cut by the agent's death at a random instant.
        let target = &before[next(VMS as u64) as usize];
        let id = target["id"].as_str().unwrap().to_owned();
        let state = target["state"].as_str().unwrap();
        // Restarts by the policy back off (0.2 s doubled per restart); a VMM is killed only
        // while that stays short, and a reboot (which resets the count) is asked instead.
        let may_kill = target["status"]["restarts"].as_u64().unwrap_or(0) < 3;
        let fresh = format!("chaos-new-{cycle}");
        let action = match (state, next(10)) {
            _ if next(10) == 0 => "create-start",
            ("running", 0 | 1) => "stop?timeout=1",
            ("running", 2 | 3) => "reboot?timeout=1",
            ("running", 4 | 5) => "pause",
            ("running", 6) => "upgrade",
            ("running", 7) => "snapshot",
            ("running", _) if may_kill => "kill-vmm",
            ("running", _) => "reboot?timeout=1",
            ("paused", 0..=3) => "resume",
            ("paused", 4 | 5) => "stop?force=true",
            ("paused", _) if may_kill => "kill-vmm",
            ("paused", _) => "resume",
            _ => "start",
        };
        match action {
            "reboot?timeout=1" => reboots += 1,
            "pause" => pauses += 1,
            "upgrade" => upgrades += 1,
            "snapshot" => snapshots += 1,
            _ => {}
        }
        let delay = Duration::from_micros(next(30_000));
        let socket = agent.socket();
        let request = if action == "kill-vmm" {
            killed += 1;
            signal(pids[&id] as u32, libc::SIGKILL);
            None
        } else {
            let (path, body) = if action == "create-start" {
                creates += 1;
                ("/v1/vms?start=true".to_owned(), spec(&fresh).to_string())
            } else if action == "snapshot" {
                (
                    format!("/v1/vms/{id}/snapshot"),
                    json!({ "name": format!("c{cycle}") }).to_string(),
                )
            } else {
                (format!("/v1/vms/{id}/{action}"), String::new())
            };
            Some(std::thread::spawn(move || {
                // The agent may die at any moment of this exchange: whatever fails, fails.
                let req = format!(
                    "POST {path} HTTP/1.1\r\nHost: b\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let reply = raw_request(&socket, &req, Duration::from_secs(30))?;
                Some((path, reply))
            }))
        };
        std::thread::sleep(delay);
        // Sometimes a VMM is stopped across the restart: slow, not dead.
        let frozen = (next(4) == 0).then(|| {
            let (vm, pid) = pids.iter().nth(next(pids.len().max(1) as u64) as usize)?;
            stopped_vmms += 1;
            signal(*pid as u32, libc::SIGSTOP);
            Some((vm.clone(), *pid))
        });
        let frozen = frozen.flatten();
        agent.restart();
        if let Some((_, pid)) = &frozen {
            std::thread::sleep(Duration::from_millis(next(1500)));
            signal(*pid as u32, libc::SIGCONT);
        }
        if let Some((path, reply)) = request.and_then(|r| r.join().unwrap()) {
            // A reply that came before the agent died is never a server error.
            assert!(!reply.starts_with("HTTP/1.1 5"), "{what}: {path}: {reply}");
        }
        let c = agent.client();
        let after = rt.block_on(all_settled(
            &c,
            &format!("{what}: {action} on {id}, frozen {frozen:?}"),
        ));
        // Every VM no action touched kept its VMM, a frozen one included. A create with start
        // that got as far as a record is finished: the VM runs.
        for v in &after {
            let vm = v["id"].as_str().unwrap();
            if vm == fresh {
                assert_eq!(v["state"], "running", "{what}: {v}");
                continue;
            }
            if vm == id {
                continue;
            }
            assert_eq!(
                v["status"]["pid"].as_u64(),
                pids.get(vm).copied(),
                "{what}: {action} on {id}, frozen {frozen:?}: {vm} lost its VMM: {v}"
            );
        }
        if after.iter().any(|v| v["id"] == fresh.as_str()) {
            let c = agent.client();
            rt.block_on(async {
                expect_status(&c.delete(&format!("/v1/vms/{fresh}")).await.unwrap(), 204);
            });
        }
    }
    eprintln!(
        "chaos: {CYCLES} agent kills, {reboots} reboots, {pauses} pauses, {upgrades} live upgrades, {snapshots} snapshots and {creates} creates with start cut, {killed} VMMs killed, {stopped_vmms} VMMs stopped across a restart"
    );
    rt.block_on(async {
        let c = agent.client();
        for id in &ids {
            expect_status(&c.delete(&format!("/v1/vms/{id}")).await.unwrap(), 204);
        }
    });
    assert!(agent.vmm_processes().is_empty());
}

/// Values that break assumptions: types, sizes, YAML look-alikes, nulls, floats for integers.
fn weird(n: u64) -> Value {
    let all = [
        Value::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(1.0),
        json!(1.5),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e308),
        json!(""),
        json!("x".repeat(300)),
        json!("é\t\n\u{0}"),
        json!("on"),
        json!("017"),
        json!([]),
        json!([null]),
        json!([[1]]),
        json!({}),
        json!({"x": 1}),
    ];
    all[(n % all.len() as u64) as usize].clone()
}

/// Replaces one value somewhere in `v` (or drops a field, or adds one) by the random source.
fn mutate(v: &Value, next: &mut dyn FnMut(u64) -> u64) -> Value {
    match v {
        Value::Object(m) if !m.is_empty() && next(5) > 0 => {
            let mut m = m.clone();
            let keys: Vec<String> = m.keys().cloned().collect();
            match next(10) {
                0 => {
                    m.remove(&keys[next(keys.len() as u64) as usize]);
                }
                1 => {
                    m.insert("extra".into(), weird(next(100)));
                }
                _ => {
                    let k = &keys[next(keys.len() as u64) as usize];
                    let inner = mutate(&m[k], next);
                    m.insert(k.clone(), inner);
                }
            }
            Value::Object(m)
        }
        Value::Array(a) if !a.is_empty() && next(2) == 0 => {
            let mut a = a.clone();
            let i = next(a.len() as u64) as usize;
            a[i] = mutate(&a[i], next);
            Value::Array(a)
        }
        _ => weird(next(100)),
    }
}

/// Thousands of randomly broken bodies for the routes that take one: every answer is a 2xx or
/// a 4xx with an error code, never a server error, and what was created is cleaned up.
#[test]
fn random_bodies_never_get_a_server_error() {
    let agent = TestAgent::start("randbody");
    let (seed, mut next) = seeded_rng("random body test");
    rt().block_on(async {
        let c = agent.client();
        expect_status(&c.post("/v1/vms", &spec("target")).await.unwrap(), 201);
        let mut vm = spec("x");
        vm["labels"] = json!({"a": "b"});
        vm["disks"] = json!([{"path": testguest().display().to_string(), "read_only": true}]);
        vm["restart_policy"] = json!("no");
        let md = json!({"hostname": "h", "user_data": "u", "public_keys": ["k"],
                        "tags": {"a": "b"}, "http_tokens": "optional"});
        let mut seen = std::collections::BTreeMap::new();
        for i in 0..2000 {
            let (method, path, mut body) = if next(2) == 0 {
                ("POST", "/v1/vms", mutate(&vm, &mut next))
            } else {
                ("PUT", "/v1/vms/target/metadata", mutate(&md, &mut next))
            };
            if method == "POST" && body.is_object() && next(4) > 0 {
                body["id"] = json!(format!("r{i}"));
            }
            let m = axum::http::Method::from_bytes(method.as_bytes()).unwrap();
            let r = c
                .request(m, path, serde_json::to_vec(&body).unwrap())
                .await
                .unwrap();
            let status = r.status.as_u16();
            *seen.entry(status).or_insert(0) += 1;
            let what = format!("seed {seed}, request {i}: {method} {path} {body} -> {status}");
            assert!(status < 500, "{what}: {:?}", r.json());
            if status >= 400 {
                assert!(r.json()["error"]["code"].is_string(), "{what}");
            }
            if method == "POST" && status == 201 {
                let id = r.json()["id"].as_str().unwrap().to_owned();
                expect_status(&c.delete(&format!("/v1/vms/{id}")).await.unwrap(), 204);
            }
        }
        eprintln!("random bodies: {seen:?}");
        assert!(seen.keys().any(|s| *s == 400), "{seen:?}");
    });
}

/// The error a 4xx reply names: (code, field).
fn error_of(v: &Value) -> (String, String) {
    (
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
        v["error"]["field"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A suspend (`then: suspend`, what nova's suspend maps to): the VMM ends, the VM is `stopped`
/// with a restore pending, and its next start brings the guest back where it was (no boot) on
/// its own copy-on-write overlay; `start?fresh=true` drops the saved state and boots.
#[test]
fn a_suspended_vm_resumes_where_it_was_and_a_fresh_start_boots() {
    let agent = TestAgent::start("suspend");
    let raw = agent.dir.join("base.raw");
    std::fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    rt().block_on(async {
        let c = agent.client();
        let r = c
            .post(
                "/v1/images",
                &json!({"id": "base", "path": raw.display().to_string()}),
            )
            .await
            .unwrap();
        expect_status(&r, 201);
        let mut s = spec("sus");
        s["disks"] = json!([{"image": "base", "size_mib": 4}]);
        expect_status(&c.post("/v1/vms?start=true", &s).await.unwrap(), 201);
        wait_console(&c, "sus", "idle: ready", 30).await;
        let boots = |t: &str| t.matches("idle: ready").count();

        let r = c
            .post(
                "/v1/vms/sus/snapshot",
                &json!({"name": "z", "then": "suspend"}),
            )
            .await
            .unwrap();
        expect_status(&r, 201);
        let v = wait_state(&c, "sus", "stopped").await;
        assert_eq!(v["restore_pending"], true, "{v}");
        assert_eq!(v["desired"], "stopped", "{v}");
        // The overlay was closed cleanly when the VMM ended: qemu-img finds it consistent.
        let overlay = v["disks"][0]["path"].as_str().unwrap().to_owned();
        common::qemu_img_ok(&["check", "-q", &overlay]);

        // Resume: restored, not booted; the guest is alive (it answers Ctrl-Alt-Del).
        let v = expect_status(
            &c.post("/v1/vms/sus/start", &Value::Null).await.unwrap(),
            200,
        );
        assert_eq!(v["state"], "running", "{v}");
        assert!(v.get("restore_pending").is_none(), "{v}");
        assert_eq!(boots(&console_text(&c, "sus").await), 1);
        expect_status(
            &c.post("/v1/vms/sus/stop", &Value::Null).await.unwrap(),
            200,
        );
        let text = console_text(&c, "sus").await;
        assert_eq!(boots(&text), 1, "{text}");
        assert!(text.contains("ctrl-alt-del, shutting down"), "{text}");
        // Later starts boot.
        expect_status(
            &c.post("/v1/vms/sus/start", &Value::Null).await.unwrap(),
            200,
        );
        let t = Instant::now();
        while boots(&console_text(&c, "sus").await) < 2 {
            assert!(t.elapsed() < Duration::from_secs(30), "no second boot");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Suspended again, then started fresh: the saved state is dropped and the kernel boots.
        let r = c
            .post(
                "/v1/vms/sus/snapshot",
                &json!({"name": "z2", "then": "suspend"}),
            )
            .await
            .unwrap();
        expect_status(&r, 201);
        assert_eq!(
            wait_state(&c, "sus", "stopped").await["restore_pending"],
            true
        );
        let r = c
            .post("/v1/vms/sus/start?fresh=maybe", &Value::Null)
            .await
            .unwrap();
        assert_eq!(
            error_of(&expect_status(&r, 400)),
            ("invalid_parameter".to_owned(), "fresh".to_owned())
        );
        let v = expect_status(
            &c.post("/v1/vms/sus/start?fresh=true", &Value::Null)
                .await
                .unwrap(),
            200,
        );
        assert!(v.get("restore_pending").is_none(), "{v}");
        let t = Instant::now();
        while boots(&console_text(&c, "sus").await) < 3 {
            assert!(t.elapsed() < Duration::from_secs(30), "no fresh boot");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!agent.dir.join("state/vms/sus/restore").exists());
        expect_status(&c.delete("/v1/vms/sus").await.unwrap(), 204);
    });
}

#[test]
fn snapshots_through_the_api_and_vms_created_from_them() {
    let agent = TestAgent::start("snapshots");
    rt().block_on(async {
        let c = agent.client();
        let r = c.post("/v1/vms?start=true", &spec("src")).await.unwrap();
        expect_status(&r, 201);
        wait_console(&c, "src", "idle: ready", 30).await;

        // Bad requests: named, nothing made.
        for (body, status, code, field) in [
            (json!({"name": "Bad Name"}), 400, "invalid_field", "name"),
            (
                json!({"name": "s", "then": "later"}),
                400,
                "invalid_field",
                "then",
            ),
            (json!({"then": "stop"}), 400, "invalid_field", "name"),
            (
                json!({"name": "s", "extra": 1}),
                400,
                "invalid_field",
                "extra",
            ),
        ] {
            let r = c.post("/v1/vms/src/snapshot", &body).await.unwrap();
            let v = expect_status(&r, status);
            assert_eq!(
                error_of(&v),
                (code.to_owned(), field.to_owned()),
                "{body}: {v}"
            );
        }
        let r = c
            .post("/v1/vms/nope/snapshot", &json!({"name": "s"}))
            .await
            .unwrap();
        expect_status(&r, 404);

        // A snapshot that leaves the VM paused.
        let r = c
            .post(
                "/v1/vms/src/snapshot",
                &json!({"name": "s1", "then": "pause"}),
            )
            .await
            .unwrap();
        let snap = expect_status(&r, 201);
        assert_eq!(snap["memory_bytes"], 32 << 20, "{snap}");
        let saved = snap["memory_saved_bytes"].as_u64().unwrap();
        assert!(saved > 0 && saved < 32 << 20, "{snap}");
        let v = expect_status(&c.get("/v1/vms/src").await.unwrap(), 200);
        assert_eq!(v["state"], "paused", "{v}");
        let r = c
            .post("/v1/vms/src/snapshot", &json!({"name": "s1"}))
            .await
            .unwrap();
        assert_eq!(error_of(&expect_status(&r, 409)).0, "already_exists");
        // An agent that died between the VMM's last write and its own finds the snapshot whole
        // from its files: listed, its name taken.
        let info = Path::new(snap["path"].as_str().unwrap()).join("snapshot.json");
        std::fs::remove_file(&info).unwrap();
        let list = expect_status(&c.get("/v1/vms/src/snapshots").await.unwrap(), 200);
        assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
        assert_eq!(list["items"][0]["name"], "s1");
        assert_eq!(list["items"][0]["memory_saved_bytes"], saved, "{list}");
        assert!(info.exists(), "recorded again");
        // A directory with no whole snapshot in it is none.
        let partial = info.parent().unwrap().with_file_name("half");
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("memory"), b"").unwrap();
        let list = expect_status(&c.get("/v1/vms/src/snapshots").await.unwrap(), 200);
        assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
        let r = c.delete("/v1/vms/src/snapshots/half").await.unwrap();
        expect_status(&r, 404);
        let events =
            String::from_utf8_lossy(&c.get("/v1/events?vm=src").await.unwrap().body).into_owned();
        assert!(events.contains("\"snapshotted\""), "{events}");

        // VMs from it: a spec that is not the snapshot's machine, a snapshot that does not
        // exist, a restore named two ways: refused, nothing made.
        let from = |id: &str, restore: Value, memory: u64| {
            let mut s = spec(id);
            s["memory_mib"] = json!(memory);
            s["restore"] = restore;
            s
        };
        for (body, field, needle) in [
            (
                from("x1", json!({"vm": "src", "snapshot": "s1"}), 64),
                "restore.snapshot",
                "the snapshot has 32 MiB of memory, the spec 64",
            ),
            (
                from("x2", json!({"vm": "src", "snapshot": "s9"}), 32),
                "restore.snapshot",
                "has no snapshot",
            ),
            (
                from("x3", json!({"path": "relative"}), 32),
                "restore.path",
                "absolute",
            ),
            (
                from(
                    "x4",
                    json!({"vm": "src", "snapshot": "s1", "path": "/x"}),
                    32,
                ),
                "restore",
                "either",
            ),
            (
                from("x5", json!({"path": "/nonexistent"}), 32),
                "restore.path",
                "vm.state",
            ),
        ] {
            let r = c.post("/v1/vms", &body).await.unwrap();
            let v = expect_status(&r, 400);
            assert_eq!(
                error_of(&v),
                ("invalid_field".to_owned(), field.to_owned()),
                "{v}"
            );
            assert!(
                v["error"]["message"].as_str().unwrap().contains(needle),
                "{v}"
            );
            expect_status(
                &c.get(&format!("/v1/vms/{}", body["id"].as_str().unwrap()))
                    .await
                    .unwrap(),
                404,
            );
        }

        // A clone on this host: it does not boot (no ready line), it runs on from the
        // snapshot, and its guest answers Ctrl-Alt-Del with its orderly end.
        let r = c
            .post(
                "/v1/vms?start=true",
                &from("clone", json!({"vm": "src", "snapshot": "s1"}), 32),
            )
            .await
            .unwrap();
        let v = expect_status(&r, 201);
        assert_eq!(v["state"], "running", "{v}");
        assert!(v.get("restore_pending").is_none(), "{v}");
        // The source stays paused and untouched; the snapshot can go (the clone has its own
        // links to the files).
        let r = c.delete("/v1/vms/src/snapshots/s1").await.unwrap();
        expect_status(&r, 204);
        let r = c.delete("/v1/vms/src/snapshots/s1").await.unwrap();
        expect_status(&r, 404);
        let r = c.post("/v1/vms/clone/stop", &Value::Null).await.unwrap();
        expect_status(&r, 200);
        let text = console_text(&c, "clone").await;
        assert!(!text.contains("idle: ready"), "the clone booted: {text}");
        assert!(text.contains("ctrl-alt-del, shutting down"), "{text}");
        // The snapshot's state (which the source's VMM wrote) was read by a jailed VMM.
        common::assert_read_in_jail(
            &common::read(&agent.state().join("vms/clone/vmm.log")),
            "snapshot state read, in the jail",
        );
        let v = wait_state(&c, "clone", "stopped").await;
        assert_eq!(v["state"], "stopped", "{v}");
        // Its next start boots the kernel.
        expect_status(
            &c.post("/v1/vms/clone/start", &Value::Null).await.unwrap(),
            200,
        );
        wait_console(&c, "clone", "idle: ready", 30).await;

        // A snapshot that stops the VM, copied elsewhere and brought back from its path.
        expect_status(
            &c.post("/v1/vms/src/resume", &Value::Null).await.unwrap(),
            200,
        );
        let r = c
            .post(
                "/v1/vms/src/snapshot",
                &json!({"name": "last", "then": "stop"}),
            )
            .await
            .unwrap();
        let snap = expect_status(&r, 201);
        let v = wait_state(&c, "src", "stopped").await;
        assert_eq!(v["desired"], "stopped", "{v}");
        let copy = agent.dir.join("copied-snapshot");
        std::fs::create_dir_all(&copy).unwrap();
        for f in ["vm.state", "memory"] {
            std::fs::copy(
                Path::new(snap["path"].as_str().unwrap()).join(f),
                copy.join(f),
            )
            .unwrap();
        }
        let r = c
            .post(
                "/v1/vms?start=true",
                &from("moved", json!({"path": copy}), 32),
            )
            .await
            .unwrap();
        assert_eq!(expect_status(&r, 201)["state"], "running");
        expect_status(
            &c.post("/v1/vms/moved/stop", &Value::Null).await.unwrap(),
            200,
        );
        assert!(console_text(&c, "moved")
            .await
            .contains("ctrl-alt-del, shutting down"));
        // A stopped VM is not snapshotted.
        let r = c
            .post("/v1/vms/src/snapshot", &json!({"name": "late"}))
            .await
            .unwrap();
        assert_eq!(error_of(&expect_status(&r, 409)).0, "illegal_transition");
    });
}

#[test]
fn a_running_vm_is_handed_to_a_new_vmm_process() {
    let agent = TestAgent::start("upgrade");
    rt().block_on(async {
        let c = agent.client();
        let mut s = spec("up");
        s["vcpus"] = json!(2);
        s["vsock"] = json!({"cid": 9});
        let r = c.post("/v1/vms?start=true", &s).await.unwrap();
        let before = expect_status(&r, 201);
        wait_console(&c, "up", "idle: ready", 30).await;
        let old_pid = before["status"]["pid"].as_u64().unwrap();

        let mut pauses = Vec::new();
        let mut pid = old_pid;
        for round in 0..3 {
            let r = c.post("/v1/vms/up/upgrade", &Value::Null).await.unwrap();
            let v = expect_status(&r, 200);
            assert_eq!(v["state"], "running", "round {round}: {v}");
            let new_pid = v["status"]["pid"].as_u64().unwrap();
            assert_ne!(new_pid, pid, "a new VMM process");
            let t = Instant::now();
            while pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(!pid_alive(pid), "the old VMM ended");
            pid = new_pid;
            let events = String::from_utf8_lossy(&c.get("/v1/events?vm=up").await.unwrap().body)
                .into_owned();
            let line = events
                .lines()
                .filter(|l| l.contains("\"upgraded\""))
                .nth(round)
                .unwrap_or_else(|| panic!("no upgraded event: {events}"))
                .to_owned();
            let ms: f64 = line
                .split("paused ")
                .nth(1)
                .and_then(|s| s.split(' ').next()?.parse().ok())
                .unwrap_or_else(|| panic!("{line}"));
            pauses.push(ms);
        }
        eprintln!("live upgrade: the guest was paused {pauses:?} ms");
        // Each new VMM read the state its predecessor wrote only once jailed.
        let log = common::read(&agent.state().join("vms/up/vmm.log"));
        // And opened nothing of the host by path: the agent handed it /dev/kvm and the disks,
        // the old VMM its sockets (control, console, vsock) and TAPs, as they were. (What it
        // opens itself is its predecessor's state, in the VM's own directory.)
        // Each old VMM wrote its result (read by an agent that restarted during the
        // upgrade) before the new one made the jail's `out` its own.
        assert!(!log.contains("cannot write the result"), "{log}");
        let by_path: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("opened by path"))
            .collect();
        assert_eq!(by_path.len(), 3, "{log}");
        for l in by_path {
            let rest = l.split("not handed: ").nth(1).unwrap_or_default();
            assert!(
                rest.starts_with("[File { path: ")
                    && rest.ends_with("/handoff/vm.state\", writable: false }]"),
                "{l}"
            );
        }
        assert_eq!(
            log.matches("handed-over state read, in the jail").count(),
            3,
            "{log}"
        );
        // The boot's VMM entered its jail once, and each new one once before it read: the
        // k-th read follows at least k + 1 jail lines.
        for (k, (at, _)) in log.match_indices("handed-over state read").enumerate() {
            let jails = log[..at].matches("jailed in").count();
            assert!(jails > k + 1, "read {k} before its jail: {log}");
        }
        // The guest never rebooted, and it still answers: Ctrl-Alt-Del ends it in order.
        expect_status(&c.post("/v1/vms/up/stop", &Value::Null).await.unwrap(), 200);
        let text = console_text(&c, "up").await;
        assert_eq!(text.matches("idle: ready").count(), 1, "{text}");
        assert!(text.contains("ctrl-alt-del, shutting down"), "{text}");
        let v = wait_state(&c, "up", "stopped").await;
        assert_eq!(
            v["status"]["exit_reason"]
                .as_str()
                .map(|r| r.contains("status 0")),
            Some(true),
            "{v}"
        );
        // The agent held each VMM's VM to the end (teardown.rs): none fell back to a reaper.
        let log = common::read(&agent.state().join("vms/up/vmm.log"));
        assert!(!log.contains("its keeper has gone"), "{log}");
        // Only a running VM is handed over.
        let r = c.post("/v1/vms/up/upgrade", &Value::Null).await.unwrap();
        assert_eq!(error_of(&expect_status(&r, 409)).0, "illegal_transition");
    });
}

#[test]
fn images_give_each_vm_its_own_overlay_and_bad_disks_are_refused_by_field() {
    let agent = TestAgent::start("images");
    let src = tmp("images-src");
    std::fs::create_dir_all(&src).unwrap();
    const SIZE: u64 = 16 << 20;
    let raw = src.join("base.raw");
    common::random_file(&raw, SIZE, 0xba5e);
    let q = src.join("base.qcow2");
    common::qemu_img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    // Images that must be refused.
    let chained = src.join("chained.qcow2");
    common::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        chained.to_str().unwrap(),
    ]);
    let junk = src.join("junk.qcow2");
    let mut j = b"QFI\xfb".to_vec();
    j.extend(std::iter::repeat_n(0xee, 4092));
    std::fs::write(&junk, j).unwrap();
    let orphan = src.join("orphan.qcow2");
    common::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.raw",
        "-F",
        "raw",
        orphan.to_str().unwrap(),
        "1M",
    ]);
    let s = |p: &Path| p.display().to_string();

    rt().block_on(async {
        let c = agent.client();
        let host0 = expect_status(&c.get("/v1/host").await.unwrap(), 200);
        let img = expect_status(&c.post("/v1/images", &json!({"id": "base", "path": s(&raw)})).await.unwrap(), 201);
        assert_eq!(img["format"], "raw");
        assert_eq!(img["virtual_size"], SIZE);
        assert_eq!(img["sha256"].as_str().unwrap().len(), 64);
        // The same again is a no-op; the same id from another file is a conflict.
        let again = expect_status(&c.post("/v1/images", &json!({"id": "base", "path": s(&raw)})).await.unwrap(), 200);
        assert_eq!(again, img);
        let img_q = expect_status(&c.post("/v1/images", &json!({"id": "base-q", "path": s(&q)})).await.unwrap(), 201);
        assert_eq!(img_q["format"], "qcow2");
        assert_eq!(img_q["virtual_size"], SIZE);
        let list = expect_status(&c.get("/v1/images").await.unwrap(), 200);
        assert_eq!(list["items"].as_array().unwrap().len(), 2);
        let blobs = agent.state().join("images/blobs");
        let blob_count = || std::fs::read_dir(&blobs).unwrap().count();
        assert_eq!(blob_count(), 2);

        // Bad registrations and bad disks: each a 4xx naming the field, nothing left behind.
        let with_disk = |d: Value| {
            let mut v = spec("bad-disk");
            v["disks"] = json!([d]);
            serde_json::to_vec(&v).unwrap()
        };
        let body = |v: Value| serde_json::to_vec(&v).unwrap();
        #[rustfmt::skip]
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, &str, Vec<u8>, u16, &str, Option<&str>)> = vec![
            ("POST", "/v1/images", body(json!({"id": "base", "path": s(&q)})), 409, "already_exists", None),
            ("POST", "/v1/images", body(json!({"id": "x", "path": "rel/base.raw"})), 400, "invalid_field", Some("path")),
            ("POST", "/v1/images", body(json!({"id": "x", "path": "/nonexistent/base.raw"})), 400, "invalid_field", Some("path")),
            ("POST", "/v1/images", body(json!({"id": "x", "path": s(&src)})), 400, "invalid_field", Some("path")),
            ("POST", "/v1/images", body(json!({"id": "x", "path": s(&chained)})), 400, "invalid_field", Some("path")),
            ("POST", "/v1/images", body(json!({"id": "x", "path": s(&junk)})), 400, "invalid_field", Some("path")),
            ("POST", "/v1/images", body(json!({"id": "x", "path": s(&raw), "format": "vmdk"})), 400, "invalid_field", Some("format")),
            ("POST", "/v1/images", body(json!({"id": "Bad/Id", "path": s(&raw)})), 400, "invalid_field", Some("id")),
            ("POST", "/v1/images", body(json!({"id": "x", "path": s(&raw), "colour": 1})), 400, "invalid_field", Some("colour")),
            ("GET", "/v1/images/nope", vec![], 404, "not_found", None),
            ("GET", "/v1/images/..%2Fetc", vec![], 404, "not_found", None),
            ("POST", "/v1/vms", with_disk(json!({"image": "nope"})), 400, "invalid_field", Some("disks[0].image")),
            ("POST", "/v1/vms", with_disk(json!({"image": "Bad/Id"})), 400, "invalid_field", Some("disks[0].image")),
            ("POST", "/v1/vms", with_disk(json!({"image": "base", "path": s(&raw)})), 400, "invalid_field", Some("disks[0].path")),
            ("POST", "/v1/vms", with_disk(json!({})), 400, "invalid_field", Some("disks[0].path")),
            ("POST", "/v1/vms", with_disk(json!({"image": "base", "format": "raw"})), 400, "invalid_field", Some("disks[0].format")),
            ("POST", "/v1/vms", with_disk(json!({"image": "base", "size_mib": 0})), 400, "invalid_field", Some("disks[0].size_mib")),
            ("POST", "/v1/vms", with_disk(json!({"image": "base", "size_mib": 8})), 400, "invalid_field", Some("disks[0].size_mib")),
            ("POST", "/v1/vms", with_disk(json!({"path": s(&raw), "size_mib": 64})), 400, "invalid_field", Some("disks[0].size_mib")),
            ("POST", "/v1/vms", with_disk(json!({"path": s(&junk)})), 400, "invalid_field", Some("disks[0].path")),
            ("POST", "/v1/vms", with_disk(json!({"path": s(&orphan)})), 400, "invalid_field", Some("disks[0].path")),
            ("POST", "/v1/vms", with_disk(json!({"path": s(&raw), "format": "vmdk"})), 400, "invalid_field", Some("disks[0].format")),
            ("POST", "/v1/vms", with_disk(json!({"image": "base", "size_mib": 1u64 << 26})), 409, "over_capacity", None),
            ("POST", "/v1/vms", with_disk(json!({"image": "base", "rate_limit": {"ops": {"size": 0, "refill_time_ms": 10}}})), 400, "invalid_field", Some("disks[0].rate_limit.ops.size")),
            ("POST", "/v1/vms", with_disk(json!({"nbd": {"host": "127.0.0.1", "port": 1, "export": "x"}})), 400, "invalid_field", Some("disks[0].nbd")),
            ("POST", "/v1/vms", with_disk(json!({"nbd": {"host": "127.0.0.1", "port": 0}})), 400, "invalid_field", Some("disks[0].nbd.port")),
            ("POST", "/v1/vms", with_disk(json!({"nbd": {"host": "127.0.0.1"}, "image": "base"})), 400, "invalid_field", Some("disks[0].path")),
            ("POST", "/v1/vms", with_disk(json!({"iscsi": {"portal": "127.0.0.1:1", "target": "iqn.2026-12.dev.bexar:x", "lun": 1}})), 400, "invalid_field", Some("disks[0].iscsi")),
            ("POST", "/v1/vms", with_disk(json!({"iscsi": {"portal": "127.0.0.1", "target": "not an iqn"}})), 400, "invalid_field", Some("disks[0].iscsi.target")),
            ("POST", "/v1/vms", with_disk(json!({"iscsi": {"portal": "127.0.0.1:0", "target": "iqn.2026-12.dev.bexar:x"}})), 400, "invalid_field", Some("disks[0].iscsi.portal")),
            ("POST", "/v1/vms", with_disk(json!({"iscsi": {"portal": "h", "target": "iqn.2026-12.dev.bexar:x", "lun": 16384}})), 400, "invalid_field", Some("disks[0].iscsi.lun")),
            ("POST", "/v1/vms", with_disk(json!({"iscsi": {"portal": "h", "target": "iqn.2026-12.dev.bexar:x", "chap": {"user": "u", "secret": "short"}}})), 400, "invalid_field", Some("disks[0].iscsi.chap.secret")),
            ("POST", "/v1/vms", with_disk(json!({"iscsi": {"portal": "h", "target": "iqn.2026-12.dev.bexar:x"}, "nbd": {"host": "h"}})), 400, "invalid_field", Some("disks[0].path")),
            ("POST", "/v1/vms", with_disk(json!({"iscsi": {"portal": "h", "target": "iqn.2026-12.dev.bexar:x"}, "format": "qcow2"})), 400, "invalid_field", Some("disks[0].format")),
            ("POST", "/v1/vms", { let mut v: Value = serde_json::from_slice(&with_disk(json!({"image": "base"}))).unwrap(); v["restore"] = json!({"path": "/snap"}); body(v) }, 400, "invalid_field", Some("restore")),
            ("POST", "/v1/vms", with_disk(json!({"image": "base", "rate_limit": {"bandwidth": {"size": 10}}})), 400, "invalid_field", Some("disks[0].rate_limit.bandwidth.refill_time_ms")),
        ];
        for (method, path, body, status, code, field) in cases {
            let m = axum::http::Method::from_bytes(method.as_bytes()).unwrap();
            let r = c.request(m, path, body).await.unwrap();
            let v = r.json();
            let what = format!("{method} {path} -> {} {v}", r.status);
            assert_eq!(r.status.as_u16(), status, "{what}");
            assert_eq!(v["error"]["code"], code, "{what}");
            if let Some(f) = field {
                assert_eq!(v["error"]["field"], f, "{what}");
            }
        }
        assert_eq!(blob_count(), 2, "a refused registration left a file");
        assert_eq!(std::fs::read_dir(agent.state().join("vms")).unwrap().count(), 0, "a refused VM left a directory");
        assert_eq!(expect_status(&c.get("/v1/images").await.unwrap(), 200)["items"].as_array().unwrap().len(), 2);

        // 20 VMs on the two bases, each writing its own pattern through its own overlay.
        let n = 20u64;
        for i in 0..n {
            let mut v = spec(&format!("img{i}"));
            v["boot"]["cmdline"] = json!(format!(
                "console=ttyS0 bexar.test=blk-scatter bexar.seed={} bexar.rounds=1 bexar.writes=16{}",
                100 + i,
                common::guest_platform_params()
            ));
            v["disks"] = json!([{"image": if i % 2 == 0 { "base" } else { "base-q" }}]);
            let vm = expect_status(&c.post("/v1/vms?start=true", &v).await.unwrap(), 201);
            assert_eq!(vm["disks"][0]["format"], "qcow2");
            assert_eq!(vm["disks"][0]["size"], SIZE);
        }
        let host = expect_status(&c.get("/v1/host").await.unwrap(), 200);
        // This agent takes no live migrations (no --migration-listen).
        assert_eq!(
            host["info"].get("migration_listen"),
            Some(&Value::Null),
            "{host}"
        );
        let alloc = |h: &Value| h["inventory"]["disk"]["allocated_mib"].as_u64().unwrap();
        let images_mib = host["inventory"]["disk"]["images_mib"].as_u64().unwrap();
        // The raw base is 16 MiB; the qcow2 one a little more (its tables).
        assert!((32..=34).contains(&images_mib), "{host}");
        assert_eq!(alloc(&host), alloc(&host0) + images_mib + n * 16, "{host}");
        // An image in use cannot go.
        let r = c.delete("/v1/images/base").await.unwrap();
        assert_eq!(r.status.as_u16(), 409, "{}", r.json());
        assert_eq!(r.json()["error"]["code"], "in_use");
        for i in 0..n {
            let id = format!("img{i}");
            let vm = wait_state(&c, &id, "stopped").await;
            let text = console_text(&c, &id).await;
            assert!(
                vm["status"]["exit_reason"].as_str().unwrap_or("").contains("status 0"),
                "{vm}\n{text}"
            );
            assert!(text.contains("blk-scatter: round 0 flushed"), "{id}: {text}");
            let overlay = PathBuf::from(vm["disks"][0]["path"].as_str().unwrap());
            assert!(overlay.starts_with(agent.state().join("vms").join(&id)), "{overlay:?}");
            common::qemu_img_ok(&["check", overlay.to_str().unwrap()]);
            // What the guest wrote is in its overlay, over its base.
            let want = src.join(format!("want{i}.raw"));
            std::fs::copy(&raw, &want).unwrap();
            for round in common::scatter_writes(100 + i, 1, 16, SIZE / common::SECTOR) {
                common::apply(&want, 100 + i, &round);
            }
            let same = common::qemu_img_ok(&["compare", "-F", "raw", overlay.to_str().unwrap(), want.to_str().unwrap()]);
            assert!(same.contains("identical"), "{id}: {same}");
            std::fs::remove_file(&want).unwrap();
        }
        // A VMM a guest took over rewrote its overlay's header to name a host file as its
        // backing data: the next VMM refuses the disk, by name, and opens nothing; put back,
        // the VM starts again.
        let secret = src.join("secret.raw");
        common::random_file(&secret, SIZE, 0x5ec);
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let vm = expect_status(&c.get("/v1/vms/img0").await.unwrap(), 200);
        let overlay = vm["disks"][0]["path"].as_str().unwrap().to_owned();
        let base = vm["disks"][0]["backing"]["file"].as_str().unwrap().to_owned();
        assert!(base.starts_with(blobs.to_str().unwrap()), "{vm}");
        assert_eq!(vm["disks"][0]["backing"]["format"], "raw", "{vm}");
        let rebase = |to: &str, format: &str| {
            if to.is_empty() {
                common::qemu_img_ok(&["rebase", "-u", "-b", "", &overlay]);
            } else {
                common::qemu_img_ok(&["rebase", "-u", "-b", to, "-F", format, &overlay]);
            }
        };
        // Another file; the blob as qcow2 (whose first bytes a tenant chose); no backing file.
        let secret = secret.to_str().unwrap().to_owned();
        for ((to, format), needle) in [
            ((secret.as_str(), "raw"), "secret.raw"),
            ((base.as_str(), "qcow2"), "format"),
            (("", "raw"), "no backing file"),
        ] {
            rebase(to, format);
            let r = c.post("/v1/vms/img0/start", &Value::Null).await.unwrap();
            assert!(!r.status.is_success(), "{to} {format}: {}", r.json());
            let vm = expect_status(&c.get("/v1/vms/img0").await.unwrap(), 200);
            let why = vm["status"]["exit_reason"].as_str().unwrap_or("").to_owned();
            assert!(why.contains(needle) && why.contains("refused"), "{vm}");
        }
        rebase(&base, "raw");
        expect_status(&c.post("/v1/vms/img0/start", &Value::Null).await.unwrap(), 200);
        wait_state(&c, "img0", "stopped").await;

        // The bases are as registered.
        let blob = blobs.join(format!("{}.raw", img["sha256"].as_str().unwrap()));
        assert_eq!(std::fs::read(&blob).unwrap(), std::fs::read(&raw).unwrap());

        // Deleting the VMs leaves only the bases; then the bases go too.
        for i in 0..n {
            expect_status(&c.delete(&format!("/v1/vms/img{i}")).await.unwrap(), 204);
        }
        assert_eq!(std::fs::read_dir(agent.state().join("vms")).unwrap().count(), 0);
        assert_eq!(blob_count(), 2);
        expect_status(&c.delete("/v1/images/base").await.unwrap(), 204);
        expect_status(&c.delete("/v1/images/base").await.unwrap(), 204);
        assert_eq!(blob_count(), 1);
        expect_status(&c.delete("/v1/images/base-q").await.unwrap(), 204);
        assert_eq!(blob_count(), 0);
        let host = expect_status(&c.get("/v1/host").await.unwrap(), 200);
        assert_eq!(alloc(&host), alloc(&host0));
    });
    let _ = std::fs::remove_dir_all(&src);
}

#[test]
fn rate_limits_change_on_a_running_vm_through_the_api() {
    let agent = TestAgent::start("ratelimit");
    let img = tmp("rl-disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    rt().block_on(async {
        let c = agent.client();
        // 2000 reads at 10 a second would take over three minutes.
        let mut v = spec("rl");
        v["boot"]["cmdline"] = json!(format!(
            "console=ttyS0 bexar.test=blk-bench bexar.iters=2000 bexar.mib=0{}",
            common::guest_platform_params()
        ));
        v["disks"] = json!([{
            "path": img.display().to_string(),
            "read_only": true,
            "rate_limit": {"ops": {"size": 10, "refill_time_ms": 1000}}
        }]);
        let vm = expect_status(&c.post("/v1/vms?start=true", &v).await.unwrap(), 201);
        assert_eq!(vm["disks"][0]["rate_limit"]["ops"]["size"], 10);
        wait_console(&c, "rl", "blk-bench: tsc", 30).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(expect_status(&c.get("/v1/vms/rl").await.unwrap(), 200)["state"], "running");

        // Bad changes: refused by field, nothing changed.
        #[rustfmt::skip]
        let cases: Vec<(&str, Value, u16, &str, Option<&str>)> = vec![
            ("/v1/vms/rl/disks/0/rate-limit", json!({"ops": {"size": 0, "refill_time_ms": 1}}), 400, "invalid_field", Some("ops.size")),
            ("/v1/vms/rl/disks/0/rate-limit", json!({"ops": {"size": 1, "refill_time_ms": 0}}), 400, "invalid_field", Some("ops.refill_time_ms")),
            ("/v1/vms/rl/disks/0/rate-limit", json!({"iops": 5}), 400, "invalid_field", Some("iops")),
            ("/v1/vms/rl/disks/1/rate-limit", json!({}), 404, "not_found", None),
            ("/v1/vms/rl/disks/x/rate-limit", json!({}), 404, "not_found", None),
            ("/v1/vms/rl/nics/0/rate-limit", json!({}), 404, "not_found", None),
            ("/v1/vms/nope/disks/0/rate-limit", json!({}), 404, "not_found", None),
        ];
        for (path, body, status, code, field) in cases {
            let r = c.request(axum::http::Method::PUT, path, serde_json::to_vec(&body).unwrap()).await.unwrap();
            let e = r.json();
            assert_eq!(r.status.as_u16(), status, "{path} {body}: {e}");
            assert_eq!(e["error"]["code"], code, "{path} {body}: {e}");
            if let Some(f) = field {
                assert_eq!(e["error"]["field"], f, "{path} {body}: {e}");
            }
        }
        assert_eq!(expect_status(&c.get("/v1/vms/rl").await.unwrap(), 200)["disks"][0]["rate_limit"]["ops"]["size"], 10);

        // Lifting the limit on the running VM lets the guest finish in moments.
        let t = Instant::now();
        let r = c
            .request(axum::http::Method::PUT, "/v1/vms/rl/disks/0/rate-limit", b"{}".to_vec())
            .await
            .unwrap();
        let vm = expect_status(&r, 200);
        assert!(vm["disks"][0].get("rate_limit").is_none(), "{vm}");
        let vm = wait_state(&c, "rl", "stopped").await;
        let console = console_text(&c, "rl").await;
        assert!(console.contains("PASS blk-bench"), "{console}");
        assert!(vm["status"]["exit_reason"].as_str().unwrap().contains("status 0"), "{vm}");
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        // The record keeps the change for the next start.
        assert!(vm["disks"][0].get("rate_limit").is_none(), "{vm}");
        // A stopped VM's limit changes in its record only.
        let r = c
            .request(
                axum::http::Method::PUT,
                "/v1/vms/rl/disks/0/rate-limit",
                serde_json::to_vec(&json!({"bandwidth": {"size": 1048576, "refill_time_ms": 1000}})).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(expect_status(&r, 200)["disks"][0]["rate_limit"]["bandwidth"]["size"], 1048576);
    });
    std::fs::remove_file(img).ok();
}

/// The server of a remote disk, NBD or iSCSI.
enum Remote {
    Nbd(common::NbdServer),
    Iscsi(common::Tgt),
}

impl Remote {
    fn kill(&mut self) {
        match self {
            Remote::Nbd(s) => s.kill(),
            Remote::Iscsi(s) => s.kill(),
        }
    }
    fn spawn(&mut self) {
        match self {
            Remote::Nbd(s) => s.spawn(),
            Remote::Iscsi(s) => s.spawn(),
        }
    }
    /// The disk's body in a VM spec.
    fn disk(&self) -> Value {
        match self {
            Remote::Nbd(s) => {
                json!({"nbd": {"host": "127.0.0.1", "port": s.port, "export": "disk0", "retry_s": 60}})
            }
            Remote::Iscsi(s) => json!({"iscsi": {
                "portal": format!("127.0.0.1:{}", s.port),
                "target": common::Tgt::IQN,
                "lun": 1,
                "chap": {"user": "bexar", "secret": "secret-of-16-bytes"},
                "retry_s": 60,
            }}),
        }
    }
}

#[test]
fn a_remote_disk_that_goes_away_shows_in_the_vm_and_its_events() {
    let mut agent = TestAgent::start("remote");
    for kind in ["nbd", "iscsi"] {
        let dir = tmp(&format!("agent-{kind}"));
        std::fs::create_dir_all(&dir).unwrap();
        let export = dir.join("export.raw");
        std::fs::File::create(&export)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let mut server = if kind == "nbd" {
            Remote::Nbd(common::NbdServer::start("nbd-server", &export, &dir))
        } else {
            Remote::Iscsi(common::Tgt::start(
                &export,
                Some(("bexar", "secret-of-16-bytes")),
                false,
            ))
        };
        remote_disk_goes_away(&mut agent, &mut server);
        server.kill();
        std::fs::remove_dir_all(dir).ok();
    }
}

fn remote_disk_goes_away(agent: &mut TestAgent, server: &mut Remote) {
    let c = agent.client();
    rt().block_on(async {
        let mut v = spec("remote");
        v["boot"]["cmdline"] = json!(format!(
            "console=ttyS0 bexar.test=blk-scatter bexar.rounds=100000 bexar.writes=8{}",
            common::guest_platform_params()
        ));
        v["disks"] = json!([server.disk()]);
        let vm = expect_status(&c.post("/v1/vms?start=true", &v).await.unwrap(), 201);
        assert_eq!(vm["disks"][0]["size"], 16 << 20);
        if let Remote::Iscsi(_) = server {
            // The record keeps the CHAP secret (the VMM logs in again with it); the API
            // never shows it.
            assert_eq!(
                vm["spec"]["disks"][0]["iscsi"]["chap"]["secret"], "(hidden)",
                "{vm}"
            );
            let got = c.get("/v1/vms/remote").await.unwrap();
            let listed = c.get("/v1/vms").await.unwrap();
            for body in [&got.body, &listed.body] {
                let text = String::from_utf8_lossy(body);
                assert!(!text.contains("secret-of-16"), "{text}");
                assert!(text.contains("(hidden)"), "{text}");
            }
            let rec = std::fs::read_to_string(agent.state().join("vms/remote/vm.json")).unwrap();
            assert!(rec.contains("secret-of-16-bytes"));
        }
        wait_console(&c, "remote", "round 1 flushed", 30).await;
        // Its VMM's network namespace is as empty as any other's: the agent connects its disk
        // to the server (through the VM's dialer socket) and hands the socket over.
        let pid = vm["status"]["pid"].as_u64().unwrap();
        let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
        let ifaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .collect();
        assert_eq!(
            ifaces.iter().map(|i| i.trim()).collect::<Vec<_>>(),
            ["lo"],
            "{dev}"
        );
        let launch: Value = serde_json::from_slice(
            &std::fs::read(agent.state().join("vms/remote/launch.json")).unwrap(),
        )
        .unwrap();
        // Its dialer socket, this launch's own, in its jail's root.
        let dialer = launch["dialer"].as_str().unwrap_or_default();
        assert!(dialer.starts_with("dialer-"), "{launch}");
        assert!(agent.state().join("vms/remote/root").join(dialer).exists());
    });
    // The agent's dialer goes with it: the one it starts with serves the VM's reconnections.
    agent.kill9();
    agent.spawn();
    rt().block_on(async {
        let link = |v: &Value| v["disks"][0]["link"].as_str().unwrap_or("").to_owned();
        let wait_link = |want: &'static str| {
            let c = &c;
            async move {
                let t = Instant::now();
                loop {
                    let v = expect_status(&c.get("/v1/vms/remote").await.unwrap(), 200);
                    if link(&v) == want {
                        return v;
                    }
                    assert!(
                        t.elapsed() < Duration::from_secs(15),
                        "link not {want}: {v}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        wait_link("up").await;
        server.kill();
        let v = wait_link("reconnecting").await;
        assert_eq!(v["state"], "running");
        server.spawn();
        wait_link("up").await;
        let r = c.get("/v1/events?vm=remote").await.unwrap();
        let events: Vec<Value> = String::from_utf8_lossy(&r.body)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        let down = kinds
            .iter()
            .position(|k| *k == "disk-down")
            .expect("a disk-down event");
        let up = kinds
            .iter()
            .position(|k| *k == "disk-up")
            .expect("a disk-up event");
        assert!(down < up, "{kinds:?}");
        // The guest went on writing after the server came back.
        let before = console_text(&c, "remote").await.matches("flushed").count();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = console_text(&c, "remote").await.matches("flushed").count();
        assert!(
            after > before,
            "the guest made no progress after the reconnection"
        );
        expect_status(&c.delete("/v1/vms/remote").await.unwrap(), 204);
    });
}

#[test]
fn a_low_open_file_limit_is_raised_then_refuses_cleanly() {
    // Started as from a shell with a low soft limit and a hard limit that fits a few VMs.
    let mut agent = TestAgent::start("nofile");
    agent.kill9();
    agent.nofile = Some((40, 110));
    agent.spawn();
    rt().block_on(async {
        let c = agent.client();
        let files = |h: &Value| h["inventory"]["files"].clone();
        // The agent makes its jails' network namespaces ahead of time on a thread of its
        // own, four descriptors it then keeps: count from when that is done (the count held
        // still for a second), or they would be charged to the VMs (a CI run saw 3 too many).
        let mut f0 = files(&expect_status(&c.get("/v1/host").await.unwrap(), 200));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut still = 0;
        while still < 10 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let f = files(&expect_status(&c.get("/v1/host").await.unwrap(), 200));
            still = if f["open"] == f0["open"] {
                still + 1
            } else {
                0
            };
            f0 = f;
        }
        assert_eq!(f0["limit"], 110, "the soft limit was not raised: {f0}");
        assert_eq!(f0["per_vm"], 4);
        let room = f0["vms_more"].as_u64().unwrap();
        assert!((2..30).contains(&room), "{f0}");
        // Create and start VMs until the agent says no.
        let mut made = 0u64;
        let refusal = loop {
            let r = c
                .post("/v1/vms?start=true", &spec(&format!("f{made}")))
                .await
                .unwrap();
            if r.status == 409 {
                break serde_json::from_slice::<Value>(&r.body).unwrap();
            }
            expect_status(&r, 201);
            made += 1;
            assert!(made <= 2 * room, "never refused");
        };
        assert_eq!(refusal["error"]["code"], "over_capacity", "{refusal}");
        assert!(
            refusal["error"]["message"]
                .as_str()
                .unwrap()
                .contains("open files"),
            "{refusal}"
        );
        // It refused no earlier than it promised, give or take a descriptor the agent opens
        // once (on its first VM) and the few that work in flight holds at the moment of a
        // create (the network-namespace pool's refill, a VMM's control connection): under a
        // loaded CI those cost up to two VMs' worth (10 made of 12 promised, once). And a VM
        // costs what it says.
        assert!(made + 3 >= room, "{made} VMs, {room} promised: {f0}");
        // Once what was in flight has let go (within 10 s), a VM holds its four (its VMM's
        // pidfd, a copy waiting for its exit, the VM its jailed VMM handed over and the socket
        // it came on).
        let deadline = Instant::now() + Duration::from_secs(10);
        let (grew, f1) = loop {
            let f1 = files(&expect_status(&c.get("/v1/host").await.unwrap(), 200));
            let grew = f1["open"].as_u64().unwrap() - f0["open"].as_u64().unwrap();
            if grew <= 4 * made + 2 || Instant::now() > deadline {
                break (grew, f1);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            grew <= 4 * made + 2,
            "{grew} descriptors for {made} VMs: {f0} -> {f1}"
        );
        // Nothing of the refused VM, and every VM made runs.
        assert!(!agent.state().join(format!("vms/f{made}")).exists());
        for i in 0..made {
            let v = expect_status(&c.get(&format!("/v1/vms/f{i}")).await.unwrap(), 200);
            assert_eq!(v["state"], "running", "{v}");
        }
        for i in 0..made {
            expect_status(&c.delete(&format!("/v1/vms/f{i}")).await.unwrap(), 204);
        }
        // Room again: a delete answers before each VM's watcher task has dropped its
        // process handle and control connection, so give those a moment; what stays is at
        // most the descriptors the agent opens once (the first VM's), never a VM's worth.
        let deadline = Instant::now() + Duration::from_secs(10);
        let f2 = loop {
            let f2 = files(&expect_status(&c.get("/v1/host").await.unwrap(), 200));
            let open = f2["open"].as_u64().unwrap();
            if open <= f0["open"].as_u64().unwrap() + 1 || Instant::now() > deadline {
                break f2;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            f2["open"].as_u64().unwrap() <= f0["open"].as_u64().unwrap() + 2,
            "{made} VMs deleted but descriptors stay: {f0} -> {f1} -> {f2}"
        );
        assert!(f2["vms_more"].as_u64().unwrap() + 1 >= room, "{f2}");
    });
}

/// How many KVM VMs process `pid` holds a descriptor of.
fn kvm_vms_held_by(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:kvm-vm")
        })
        .count()
}

/// The file of `controller`'s cgroup of process `pid` (v1 here, v2 on a pure-v2 host).
fn cgroup_file(pid: u64, controller: &str, file: &str) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1 = cgroups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        ctl.split(',').any(|c| c == controller).then(|| {
            Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path.trim_start_matches('/'))
        })
    });
    let dir = v1.unwrap_or_else(|| {
        let path = cgroups.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'))
    });
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .trim()
        .to_owned()
}

/// Asserts that VMM `pid` of VM `id` is in its jail and its cgroups: for every thread, not
/// root, no capability, seccomp filtering, no_new_privs; its root the VM's empty jail; its
/// network namespace empty but for lo; its cgroup limits those of a VM of `vcpus` and
/// `memory_mib`.
fn assert_jailed(
    state: &Path,
    id: &str,
    pid: u64,
    root_holds: &[&str],
    vcpus: u64,
    memory_mib: u64,
) {
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        tasks.len() >= 3,
        "{id}: main, vCPU and virtio threads: {}",
        tasks.len()
    );
    for t in tasks {
        let s = std::fs::read_to_string(t.path().join("status")).unwrap();
        let name = common::status_field(&s, "Name:");
        let uid = common::status_field(&s, "Uid:");
        assert!(
            uid.split_whitespace().all(|u| u != "0"),
            "{id}/{name}: uid {uid}"
        );
        assert_eq!(
            common::status_field(&s, "CapEff:"),
            "0000000000000000",
            "{id}/{name}"
        );
        assert_eq!(
            common::status_field(&s, "CapPrm:"),
            "0000000000000000",
            "{id}/{name}"
        );
        assert_eq!(
            common::status_field(&s, "CapBnd:"),
            "0000000000000000",
            "{id}/{name}"
        );
        assert_eq!(common::status_field(&s, "Seccomp:"), "2", "{id}/{name}");
        assert_eq!(common::status_field(&s, "NoNewPrivs:"), "1", "{id}/{name}");
    }
    // The agent opened for it what it needs of the host, and it opens nothing by path: a
    // strict list (the VMM fails on anything not in it; tests/vmm.rs).
    let launch: Value = serde_json::from_slice(
        &std::fs::read(state.join("vms").join(id).join("launch.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(launch["handed"]["strict"], true, "{id}: {launch}");
    let handed = launch["handed"]["fds"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let has = |f: &dyn Fn(&Value) -> bool| handed.iter().any(|h| f(&h["what"]));
    assert!(has(&|w| *w == "kvm"), "{id}: {handed:?}");
    assert!(
        has(&|w| w["file"]["path"] == launch["config"]["kernel"]),
        "{id}: the kernel: {handed:?}"
    );
    assert!(
        has(&|w| w["listener"]["path"] == launch["config"]["control"]["socket"]),
        "{id}: the control socket: {handed:?}"
    );
    for nic in launch["config"]["nics"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        assert!(
            has(&|w| w["tap"]["name"] == nic["tap"]),
            "{id}: {nic}: {handed:?}"
        );
    }
    // What it took it holds once: the handed originals were closed as it entered the jail.
    let open_to = |target: &str| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new(target)))
            .count()
    };
    assert_eq!(open_to("/dev/kvm"), 1, "{id}: /dev/kvm");
    // Its root is the VM's jail directory, holding only what the VMM put there.
    use std::os::unix::fs::MetadataExt;
    let jail = state.join("vms").join(id).join("root");
    let (a, b) = (
        std::fs::metadata(format!("/proc/{pid}/root")).unwrap(),
        std::fs::metadata(&jail).unwrap(),
    );
    assert_eq!(
        (a.dev(), a.ino()),
        (b.dev(), b.ino()),
        "{id}: its root is not {jail:?}"
    );
    let mut seen: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, root_holds, "{id}: its root holds more than expected");
    // The root is root's (nothing in it can be replaced from inside); `out` is the VMM's, and
    // empty while it runs.
    assert_eq!(
        (b.uid(), b.mode() & 0o777),
        (0, 0o711),
        "{id}: the jail's root"
    );
    let out = std::fs::metadata(jail.join("out")).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vmm_uid = common::status_field(&status, "Uid:");
    assert_eq!(
        Some(out.uid().to_string().as_str()),
        vmm_uid.split_whitespace().next()
    );
    assert_eq!(out.mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::read_dir(jail.join("out")).unwrap().count(),
        0,
        "{id}: out"
    );
    // It is the first process of a PID namespace of its own: pid 1 there.
    let nspid = common::status_field(&status, "NSpid:");
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        [pid.to_string().as_str(), "1"],
        "{id}: NSpid"
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap(),
        std::fs::read_link("/proc/self/ns/pid").unwrap()
    );
    // Its network namespace has lo and nothing else.
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{id}: interfaces in the VMM's namespace");
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "{id}: the VMM shares the host's network namespace"
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    // Its cgroups hold it, with the VM's limits (64 MiB headroom, a quarter CPU for the VMM).
    let memory = (memory_mib + 64) << 20;
    let quota = vcpus * 100_000 + 25_000;
    if Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists() {
        assert_eq!(
            cgroup_file(pid, "memory", "memory.limit_in_bytes"),
            memory.to_string()
        );
        assert_eq!(
            cgroup_file(pid, "cpu", "cpu.cfs_quota_us"),
            quota.to_string()
        );
        assert_eq!(
            cgroup_file(pid, "pids", "pids.max"),
            (vcpus + 256).to_string()
        );
        assert!(cgroup_file(pid, "memory", "cgroup.procs")
            .lines()
            .any(|p| p == pid.to_string()));
    } else {
        assert_eq!(cgroup_file(pid, "memory", "memory.max"), memory.to_string());
        assert_eq!(
            cgroup_file(pid, "cpu", "cpu.max"),
            format!("{quota} 100000")
        );
        assert_eq!(
            cgroup_file(pid, "pids", "pids.max"),
            (vcpus + 256).to_string()
        );
    }
}

/// The host's cgroup2 mount: its per-mount flags and its super-block options.
fn cgroup2_mount() -> Option<(String, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let h: Vec<&str> = head.split(' ').collect();
            let t: Vec<&str> = tail.split(' ').collect();
            (t[0] == "cgroup2").then(|| (h[5].to_owned(), t[2].to_owned()))
        })
}

#[test]
fn every_vmm_is_jailed_and_a_vmm_that_breaks_out_is_stopped_and_named() {
    let cgroup2_before = cgroup2_mount();
    let agent = TestAgent::start("sandbox");
    // The agent turns on cgroup2's favordynmods where the kernel has it, and keeps the
    // mount's own flags and options.
    let kernel_has = std::fs::read_to_string("/sys/kernel/cgroup/features")
        .unwrap_or_default()
        .lines()
        .any(|l| l == "favordynmods");
    if let (Some((flags, opts)), true) = (&cgroup2_before, kernel_has) {
        let (flags_now, opts_now) = cgroup2_mount().unwrap();
        assert_eq!(&flags_now, flags, "the cgroup2 mount's flags changed");
        for o in opts.split(',').chain(["favordynmods"]) {
            assert!(
                opts_now.split(',').any(|x| x == o),
                "cgroup2 mount options {opts} -> {opts_now}: {o} missing"
            );
        }
    }
    rt().block_on(async {
        let c = agent.client();
        let mut a = spec("plain");
        a["vcpus"] = json!(2);
        expect_status(&c.post("/v1/vms", &a).await.unwrap(), 201);
        let mut v = spec("vsock");
        v["vsock"] = json!({"cid": 7});
        expect_status(&c.post("/v1/vms", &v).await.unwrap(), 201);
        let mut o = spec("oom");
        o["restart_policy"] = json!("on-failure");
        expect_status(&c.post("/v1/vms", &o).await.unwrap(), 201);
        for id in ["plain", "vsock", "oom"] {
            expect_status(
                &c.post(&format!("/v1/vms/{id}/start"), &json!({}))
                    .await
                    .unwrap(),
                200,
            );
            wait_console(&c, id, "idle: ready", 30).await;
        }
        let pid = |v: &Value| v["status"]["pid"].as_u64().unwrap();
        let plain = expect_status(&c.get("/v1/vms/plain").await.unwrap(), 200);
        let vsock = expect_status(&c.get("/v1/vms/vsock").await.unwrap(), 200);
        assert_jailed(&agent.state(), "plain", pid(&plain), &["out"], 2, 32);
        assert_jailed(
            &agent.state(),
            "vsock",
            pid(&vsock),
            &["out", "vsock.sock"],
            1,
            32,
        );
        // Each in a network namespace of its own (made ahead of time, never shared), and in
        // a PID namespace of its own.
        let netns = |v: &Value| std::fs::read_link(format!("/proc/{}/ns/net", pid(v))).unwrap();
        assert_ne!(netns(&plain), netns(&vsock));
        let pidns = |v: &Value| std::fs::read_link(format!("/proc/{}/ns/pid", pid(v))).unwrap();
        assert_ne!(pidns(&plain), pidns(&vsock));
        // Each VMM handed its VM to the agent, which drops it once the VMM has gone (so KVM's
        // teardown is not in the VMM's exit, teardown.rs): one per running VM.
        let agent_pid = agent.child.as_ref().unwrap().id();
        assert_eq!(kvm_vms_held_by(agent_pid), 3, "the agent holds every VM");
        // The vsock socket is where the API says, through the link to the jail.
        assert!(agent.state().join("vms/vsock/vsock.sock").exists());
        let m = c.get("/v1/metrics").await.unwrap();
        let text = String::from_utf8_lossy(&m.body).into_owned();
        assert!(
            text.contains("bexar_vm_cgroup_memory_bytes{vm=\"plain\"}"),
            "{text}"
        );
        assert!(
            text.contains("bexar_vm_cgroup_cpu_seconds_total{vm=\"plain\"}"),
            "{text}"
        );

        // A compromised VMM (the test build's fault requests) cannot open a host file, and
        // dies of the first system call its filter forbids; the agent names the call.
        let socket = agent.state().join("vms/plain/control.sock");
        let r = common::vmm_control(&socket, &json!({"op": "fault", "fault": "open-host-file"}));
        let err = r["error"].as_str().unwrap_or_default().to_owned();
        assert!(err.starts_with("cannot open /etc/passwd"), "{r}");
        let _ = std::thread::spawn(move || {
            let _ = std::panic::catch_unwind(|| {
                common::vmm_control(&socket, &json!({"op": "fault", "fault": "syscall"}))
            });
        });
        let failed = wait_state(&c, "plain", "failed").await;
        let reason = failed["status"]["exit_reason"].as_str().unwrap().to_owned();
        assert!(
            reason.contains("seccomp") && reason.contains("system call 165 (mount)"),
            "{reason}"
        );
        // What the failed VMM handed over is let go once it has ended.
        let t = Instant::now();
        while kvm_vms_held_by(agent_pid) != 2 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the agent still holds {} VMs",
                kvm_vms_held_by(agent_pid)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The other VMs did not notice.
        let again = expect_status(&c.get("/v1/vms/vsock").await.unwrap(), 200);
        assert_eq!(
            (again["state"].clone(), pid(&again)),
            (json!("running"), pid(&vsock))
        );

        // A VMM that leaks is stopped by its cgroup's memory limit, reported as such, and its
        // restart policy brings the VM back.
        let oom = expect_status(&c.get("/v1/vms/oom").await.unwrap(), 200);
        let socket = agent.state().join("vms/oom/control.sock");
        let _ = std::thread::spawn(move || {
            let _ = std::panic::catch_unwind(|| {
                common::vmm_control(&socket, &json!({"op": "fault", "fault": "leak"}))
            });
        });
        let t = Instant::now();
        let restarted = loop {
            let v = expect_status(&c.get("/v1/vms/oom").await.unwrap(), 200);
            if v["status"]["restarts"].as_u64() == Some(1) && v["state"] == "running" {
                break v;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "not restarted: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_ne!(pid(&restarted), pid(&oom));
        let events = c.get("/v1/events?vm=oom").await.unwrap();
        let events = String::from_utf8_lossy(&events.body).into_owned();
        assert!(events.contains("out-of-memory killer"), "{events}");
        let m = c.get("/v1/metrics").await.unwrap();
        let text = String::from_utf8_lossy(&m.body).into_owned();
        assert!(
            text.contains("bexar_vmm_sandbox_kills_total{by=\"seccomp\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bexar_vmm_sandbox_kills_total{by=\"oom\"} 1"),
            "{text}"
        );
    });
}
