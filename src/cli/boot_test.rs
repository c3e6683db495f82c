//! `bexar boot-test`: the CI use case. Each image boots in its own `bexar run` process (a crash
//! of one cannot take the others down), all in parallel; each passes when its console shows the
//! expected pattern (or, without a pattern, when the guest ends cleanly) before the timeout.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use super::junit::{self, Case};
use super::run::{plan, Plan};
use super::BootTestArgs;
use bexar_devices::virtio::net::mac_string;

struct Job {
    name: String,
    plan: Plan,
    expect: Option<String>,
    log: PathBuf,
    result: PathBuf,
}

fn child_command(job: &Job) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("bexar"));
    let c = &job.plan.config;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&c.kernel)
        .arg("--cmdline")
        .arg(&c.cmdline)
        .arg("--vcpus")
        .arg(c.vcpus.to_string())
        .arg("--memory")
        .arg(c.memory_mib.to_string())
        .arg("--cpu-template")
        .arg(c.cpu_template.name())
        .arg("--console")
        .arg(format!("file:{}", job.log.display()))
        .arg("--result-json")
        .arg(&job.result)
        .arg("--no-stdin");
    if let Some(i) = &c.initrd {
        cmd.arg("--initrd").arg(i);
    }
    if let Some(t) = job.plan.timeout {
        cmd.arg("--timeout").arg(t.as_secs_f64().to_string());
    }
    if let Some(e) = &job.expect {
        cmd.arg("--expect").arg(e);
    }
    if !c.platform_params {
        cmd.arg("--no-platform-params");
    }
    if c.legacy_pit {
        cmd.arg("--legacy-pit");
    }
    for d in &c.disks {
        let mut spec = d.path.display().to_string();
        if d.read_only {
            spec.push_str(",ro");
        }
        if d.direct {
            spec.push_str(",direct");
        }
        if let Some(s) = &d.serial {
            spec.push_str(&format!(",serial={s}"));
        }
        cmd.arg("--disk").arg(spec);
    }
    for n in &c.nics {
        cmd.arg("--net")
            .arg(format!("tap={},mac={}", n.tap, mac_string(&n.mac)));
    }
    if c.rng {
        cmd.arg("--rng");
    }
    if let Some(v) = &c.vsock {
        // Each image gets its own socket: the same path would collide between parallel VMs.
        cmd.arg("--vsock").arg(format!(
            "cid={},uds={}.{}",
            v.cid,
            v.uds.display(),
            job.name
        ));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn judge(job: &Job, status: Option<i32>, stderr: &str, seconds: f64) -> Case {
    let console = std::fs::read(&job.log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let result: Option<serde_json::Value> = std::fs::read(&job.result)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let kind = result
        .as_ref()
        .and_then(|r| r["reason"]["kind"].as_str().map(str::to_owned));
    let boot_ms = result.as_ref().and_then(|r| r["pattern_ms"].as_f64());
    let failure = match (&job.expect, kind.as_deref(), status) {
        (Some(_), Some("pattern-matched"), _) => None,
        (Some(p), _, _) => Some(format!(
            "pattern {p:?} not seen: {}",
            tail(stderr.trim(), 1)
        )),
        (None, _, Some(0)) => None,
        (None, _, s) => Some(format!(
            "guest did not end cleanly (exit status {s:?}): {}",
            tail(stderr.trim(), 1)
        )),
    };
    let shown = boot_ms.map(|ms| ms / 1e3).unwrap_or(seconds);
    Case {
        name: job.name.clone(),
        seconds: shown,
        failure,
        output: console,
    }
}

fn image_name(kernel: &Path, index: usize) -> String {
    let base = kernel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kernel".into());
    format!("{index}-{base}")
}

/// Runs `bexar boot-test`.
pub fn main(args: &BootTestArgs) -> ExitCode {
    let count = args.kernel.len();
    let dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("bexar-boot-test-{}", std::process::id())),
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("bexar boot-test: --log-dir {}: {e}", dir.display());
        return ExitCode::from(2);
    }
    let mut jobs = Vec::new();
    for (i, kernel) in args.kernel.iter().enumerate() {
        let plan = match plan(kernel, &args.vm, i, count) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("bexar boot-test: {e}");
                return ExitCode::from(2);
            }
        };
        let expect = match args.expect.len() {
            0 => None,
            1 => Some(args.expect[0].clone()),
            n if n == count => Some(args.expect[i].clone()),
            n => {
                eprintln!("bexar boot-test: --expect given {n} times for {count} images: give it once or once per image");
                return ExitCode::from(2);
            }
        };
        let name = image_name(kernel, i);
        jobs.push(Job {
            log: dir.join(format!("{name}.console.log")),
            result: dir.join(format!("{name}.result.json")),
            name,
            plan,
            expect,
        });
    }
    for j in &jobs {
        let _ = std::fs::remove_file(&j.log);
        let _ = std::fs::remove_file(&j.result);
    }

    let width = args.jobs.unwrap_or(count).max(1);
    let mut cases = Vec::new();
    for chunk in jobs.chunks(width) {
        let mut running = Vec::new();
        for job in chunk {
            let start = Instant::now();
            match child_command(job).spawn() {
                Ok(child) => running.push((job, start, Some(child))),
                Err(e) => {
                    eprintln!("bexar boot-test: cannot start a VM for {}: {e}", job.name);
                    running.push((job, start, None));
                }
            }
        }
        for (job, start, child) in running {
            let (status, stderr) = match child.map(|c| c.wait_with_output()) {
                Some(Ok(out)) => (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ),
                Some(Err(e)) => (None, e.to_string()),
                None => (None, "not started".into()),
            };
            let case = judge(job, status, &stderr, start.elapsed().as_secs_f64());
            match &case.failure {
                None => println!("PASS {:<40} {:>10.3} s", case.name, case.seconds),
                Some(f) => println!("FAIL {:<40} {:>10.3} s  {f}", case.name, case.seconds),
            }
            cases.push(case);
        }
    }
    let failed = cases.iter().filter(|c| c.failure.is_some()).count();
    println!("{} passed, {} failed", cases.len() - failed, failed);
    if args.log_dir.is_none() {
        // Its own directory: kept only when there is a failure to look into.
        if failed == 0 {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            println!("console logs: {}", dir.display());
        }
    }
    if let Some(path) = &args.junit {
        if let Err(e) = std::fs::write(path, junit::render("bexar boot-test", &cases)) {
            eprintln!(
                "bexar boot-test: cannot write --junit {}: {e}",
                path.display()
            );
            return ExitCode::from(2);
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
