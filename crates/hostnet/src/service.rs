//! A background thread that serves one segment (router advertisements, DHCP) until it is
//! dropped: its serve function runs again a second after each failure.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A running service; dropping it stops the thread (within its socket's read timeout).
pub struct Service {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Service {
    /// Runs `serve` on a thread called `name`. `serve` returns when the flag it is given is
    /// set, or with an error (retried after a second).
    pub fn spawn(
        name: String,
        mut serve: impl FnMut(&AtomicBool) -> io::Result<()> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    if let Err(e) = serve(&flag) {
                        tracing::debug!("{name}: {e}; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            })
            .expect("spawn a thread");
        Self { stop, thread }
    }

    /// Whether the thread still runs.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Whether a read error is only the socket's read timeout (time to look at the stop flag).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
