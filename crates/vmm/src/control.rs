//! The VMM's private control socket: how the host agent (or an operator) pauses, resumes,
//! shuts down and inspects a running VM.
//!
//! The protocol is one JSON object per line each way: a request `{"op": "..."}` and a reply
//! `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. Operations:
//!
//! * `info`: identity (VM id, launch token, pid), state, uptime and counters;
//! * `pause` / `resume`: park or release every vCPU (replies once all are parked);
//! * `shutdown`: ask the guest to shut down (Ctrl-Alt-Del on the i8042);
//! * `stop`: end the VM now (the VMM writes its outcome and exits).
//!
//! The socket is created owner-only (0600) in the VM's private directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::SIGRTMIN;

use super::vcpu::VcpuStats;
use super::{ExitHandle, ExitReason};
use bexar_devices::serial::ConsoleStats;
use bexar_devices::virtio::{Counters, DeviceReport};
use bexar_util::sync::lock;

/// Where the control socket goes and what the VMM says about itself.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// VM id.
    pub id: String,
    /// Launch token: proves to the agent that this process is the VMM it started.
    pub token: String,
}

/// Parks vCPU threads between KVM_RUN calls while the VM is paused.
#[derive(Debug, Default)]
pub struct PauseGate {
    requested: AtomicBool,
    parked: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl PauseGate {
    /// Whether a pause is requested (checked by each vCPU before entering the guest).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Called by a vCPU thread: waits while paused, or until `stop` is set.
    pub fn park(&self, stop: &AtomicBool) {
        let mut guard = lock(&self.lock);
        self.parked.fetch_add(1, Ordering::AcqRel);
        while self.requested() && !stop.load(Ordering::Acquire) {
            guard = match self.wake.wait_timeout(guard, Duration::from_millis(100)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }

    /// Releases parked vCPUs.
    fn release(&self) {
        let _guard = lock(&self.lock);
        self.requested.store(false, Ordering::Release);
        self.wake.notify_all();
    }
}

/// The vCPU threads, as far as kicking them out of KVM_RUN is concerned. Emptied before the
/// threads are joined, so a kick never targets a thread that no longer exists.
#[derive(Debug, Default)]
pub struct VcpuKicker(Mutex<Vec<libc::pthread_t>>);

impl VcpuKicker {
    /// Records a vCPU thread.
    pub fn add(&self, thread: libc::pthread_t) {
        lock(&self.0).push(thread);
    }

    /// Forgets every thread (call before joining them).
    pub fn clear(&self) {
        lock(&self.0).clear();
    }

    fn kick(&self) {
        for t in lock(&self.0).iter() {
            // SAFETY: the pthread_t values are live, unjoined threads: `clear` runs (under the
            // same lock) before any of them is joined.
            unsafe { libc::pthread_kill(*t, SIGRTMIN()) };
        }
    }
}

/// Everything the control socket acts on.
pub struct Controls {
    /// Identity and socket path.
    pub config: ControlConfig,
    /// vCPU pause gate.
    pub gate: Arc<PauseGate>,
    /// vCPU threads.
    pub kicker: Arc<VcpuKicker>,
    /// Per-vCPU counters.
    pub stats: Vec<Arc<VcpuStats>>,
    /// Ends the VM.
    pub exit: ExitHandle,
    /// Asks the guest to shut down; false if the request could not be delivered.
    pub shutdown: Box<dyn Fn() -> bool + Send + Sync>,
    /// Console counters.
    pub watch: Arc<ConsoleStats>,
    /// Virtio devices (kind, slot, counters).
    pub devices: Vec<(&'static str, u32, Arc<Counters>)>,
    /// When the VMM started.
    pub start: Instant,
}

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Identity, state and counters.
    Info,
    /// Park every vCPU.
    Pause,
    /// Release the vCPUs.
    Resume,
    /// Ask the guest to shut down.
    Shutdown,
    /// End the VM now.
    Stop,
}

/// What `info` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    /// VM id.
    pub id: String,
    /// Launch token.
    pub token: String,
    /// Process id of the VMM.
    pub pid: u32,
    /// `running` or `paused`.
    pub state: String,
    /// Milliseconds since the VMM started.
    pub uptime_ms: u64,
    /// Exits to user space per vCPU.
    pub vcpu_exits: Vec<u64>,
    /// Console bytes written by the guest.
    pub console_bytes: u64,
    /// Virtio device counters.
    pub devices: Vec<DeviceReport>,
}

/// How long `pause` waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

impl Controls {
    fn info(&self) -> Info {
        let paused =
            self.gate.requested() && self.gate.parked.load(Ordering::Acquire) >= self.stats.len();
        Info {
            id: self.config.id.clone(),
            token: self.config.token.clone(),
            pid: std::process::id(),
            state: if paused { "paused" } else { "running" }.into(),
            uptime_ms: self.start.elapsed().as_millis() as u64,
            vcpu_exits: self
                .stats
                .iter()
                .map(|s| s.exits.load(Ordering::Relaxed))
                .collect(),
            console_bytes: self.watch.bytes(),
            devices: self
                .devices
                .iter()
                .map(|(kind, slot, c)| DeviceReport::new(kind, *slot, c))
                .collect(),
        }
    }

    fn pause(&self) -> Result<(), String> {
        self.gate.requested.store(true, Ordering::Release);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let all_parked = || {
            self.stats.iter().all(|s| s.done.load(Ordering::Acquire))
                || self.gate.parked.load(Ordering::Acquire) >= self.stats.len()
        };
        while !all_parked() {
            if Instant::now() >= deadline {
                self.gate.release();
                return Err("vCPUs did not park within 2 s; VM left running".into());
            }
            // A kick that lands just before KVM_RUN is lost, so keep kicking until parked.
            self.kicker.kick();
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Handles one request.
    pub fn handle(&self, req: &Request) -> serde_json::Value {
        let ok = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"ok": true});
            if let (Some(m), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
                m.extend(e);
            }
            v
        };
        let err = |e: String| serde_json::json!({"ok": false, "error": e});
        match req {
            Request::Info => ok(serde_json::json!({ "info": self.info() })),
            Request::Pause => match self.pause() {
                Ok(()) => {
                    tracing::info!("VM paused");
                    ok(serde_json::json!({}))
                }
                Err(e) => err(e),
            },
            Request::Resume => {
                self.gate.release();
                tracing::info!("VM resumed");
                ok(serde_json::json!({}))
            }
            Request::Shutdown => {
                // A paused guest cannot react: let it run first.
                self.gate.release();
                let sent = (self.shutdown)();
                tracing::info!(sent, "shutdown requested (Ctrl-Alt-Del)");
                if sent {
                    ok(serde_json::json!({}))
                } else {
                    err("the guest's keyboard controller buffer is full".into())
                }
            }
            Request::Stop => {
                tracing::info!("stop requested on the control socket");
                self.gate.release();
                self.exit.request(ExitReason::Stopped);
                ok(serde_json::json!({}))
            }
        }
    }
}

/// Binds the control socket (owner-only) and serves it on a background thread for the life of
/// the process.
pub fn serve(controls: Arc<Controls>) -> std::io::Result<()> {
    let listener = bexar_util::unix::bind_owner_only(&controls.config.socket)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let c = controls.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_conn(&c, conn));
            }
        })?;
    Ok(())
}

/// Longest request line accepted.
const MAX_LINE: u64 = 4096;

fn serve_conn(controls: &Controls, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => controls.handle(&req),
            Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        let mut text = reply.to_string();
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_their_wire_form() {
        let r: Request = serde_json::from_str(r#"{"op":"pause"}"#).unwrap();
        assert_eq!(r, Request::Pause);
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Shutdown).unwrap(),
            r#"{"op":"shutdown"}"#
        );
    }

    #[test]
    fn a_parked_vcpu_leaves_the_gate_on_release_or_stop() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        gate.requested.store(true, Ordering::Release);
        let (g, s) = (gate.clone(), stop.clone());
        let t = std::thread::spawn(move || g.park(&s));
        while gate.parked.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        gate.release();
        t.join().unwrap();
        assert_eq!(gate.parked.load(Ordering::Acquire), 0);

        gate.requested.store(true, Ordering::Release);
        let (g, s) = (gate.clone(), stop.clone());
        let t = std::thread::spawn(move || g.park(&s));
        stop.store(true, Ordering::Release);
        t.join().unwrap();
    }
}
