//! Lifecycle events: a numbered, append-only log the scheduler can follow and resume from a
//! cursor (`since=SEQ`). Kept in memory (the last [`BACKLOG`]) and appended to
//! `events.ndjson`, so sequence numbers keep growing across agent restarts.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::spec::Phase;
use crate::wire::wire_enum;
use bexar_util::sync::lock;

/// Events kept for replay.
pub const BACKLOG: usize = 10_000;

wire_enum! {
    /// What happened.
    pub enum EventKind {
        /// A VM was defined.
        Created = "created",
        /// A VM was started on request.
        Started = "started",
        /// A VM was started again by its restart policy.
        Restarted = "restarted",
        /// A VM's VMM ended in an orderly way or as asked.
        Stopped = "stopped",
        /// A VM was paused.
        Paused = "paused",
        /// A VM was resumed.
        Resumed = "resumed",
        /// A VM's guest or VMM ended unexpectedly, or it failed to start.
        Failed = "failed",
        /// A restart by the restart policy is scheduled.
        Restarting = "restarting",
        /// A running VMM was re-adopted after an agent restart.
        Adopted = "adopted",
        /// A VM was deleted.
        Deleted = "deleted",
        /// A snapshot of a VM was taken.
        Snapshotted = "snapshotted",
        /// A VM was handed to a new VMM process (live upgrade).
        Upgraded = "upgraded",
        /// The agent started (and recovered its VMs).
        AgentStarted = "agent-started",
        /// A segment was defined.
        SegmentCreated = "segment-created",
        /// A segment was deleted.
        SegmentDeleted = "segment-deleted",
        /// A remote disk's connection broke (the VMM is making it again), or its retry time
        /// ran out (the guest's requests fail).
        DiskDown = "disk-down",
        /// A remote disk's connection is back.
        DiskUp = "disk-up",
        /// A VM moved to another host (on the sender: the message names the host, the pause
        /// and the bytes sent; the VM is deleted here next) or arrived from one (on the
        /// receiver: the message gives the pause the guest saw).
        Migrated = "migrated",
        /// A live migration's progress on the sender: a round of the copy began (what is
        /// left, the rates, the pause expected), the switch-over began, or it was cancelled.
        Migrating = "migrating",
    }
}

/// One lifecycle change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number, strictly increasing (the resume cursor).
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// VM concerned (empty for agent events).
    pub vm: String,
    /// What happened.
    pub kind: EventKind,
    /// The VM's state after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Phase>,
    /// Details for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

struct Inner {
    backlog: VecDeque<Event>,
    next: u64,
    file: Option<File>,
}

/// The event log.
pub struct Events {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
    path: PathBuf,
}

impl Events {
    /// Opens the log in `dir`, continuing its numbering. The file is compacted to the backlog
    /// when it holds twice that, or ends in a torn line.
    pub fn open(dir: &Path) -> Self {
        let path = dir.join("events.ndjson");
        let mut backlog = VecDeque::new();
        // The numbering goes on from the highest number in the file, also one on a line this
        // version cannot read (a kind a newer agent wrote): numbers are never given twice.
        let mut last = 0;
        let mut lines = 0;
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                lines += 1;
                #[derive(Deserialize)]
                struct Numbered {
                    seq: u64,
                }
                match serde_json::from_str::<Event>(&line) {
                    Ok(e) => {
                        last = last.max(e.seq);
                        if backlog.len() == BACKLOG {
                            backlog.pop_front();
                        }
                        backlog.push_back(e);
                    }
                    // A torn last line (crash mid-append) is skipped.
                    Err(_) => {
                        if let Ok(n) = serde_json::from_str::<Numbered>(&line) {
                            last = last.max(n.seq);
                        }
                    }
                }
            }
        }
        let next = last + 1;
        // Compacted to the backlog once it holds twice that: rewriting (and syncing) 10,000
        // lines at every start would delay the API for nothing.
        // A torn last line (no newline) is dropped by a compaction too, or the next event
        // would be appended to it.
        let torn = (|| -> std::io::Result<bool> {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = File::open(&path)?;
            if f.seek(SeekFrom::End(0))? == 0 {
                return Ok(false);
            }
            f.seek(SeekFrom::End(-1))?;
            let mut b = [0u8; 1];
            f.read_exact(&mut b)?;
            Ok(b[0] != b'\n')
        })()
        .unwrap_or(false);
        if lines > 2 * BACKLOG || torn {
            let mut text = Vec::new();
            for e in &backlog {
                if let Ok(mut l) = serde_json::to_vec(e) {
                    l.push(b'\n');
                    text.extend(l);
                }
            }
            if let Err(e) = super::store::write_atomic(&path, &text) {
                tracing::warn!("cannot compact the event log: {e}");
                if torn {
                    // At least end the torn line, so the next event is a line of its own.
                    if let Ok(mut f) = OpenOptions::new().append(true).open(&path) {
                        let _ = f.write_all(b"\n");
                    }
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ok();
        let (tx, _) = broadcast::channel(4096);
        Self {
            inner: Mutex::new(Inner {
                backlog,
                next,
                file,
            }),
            tx,
            path,
        }
    }

    /// Records an event and tells the followers.
    pub fn emit(
        &self,
        vm: &str,
        kind: EventKind,
        state: Option<Phase>,
        message: impl Into<String>,
    ) {
        let mut i = lock(&self.inner);
        let e = Event {
            seq: i.next,
            time_ms: super::spec::now_ms(),
            vm: vm.to_owned(),
            kind,
            state,
            message: message.into(),
        };
        i.next += 1;
        if let (Some(f), Ok(mut line)) = (i.file.as_mut(), serde_json::to_vec(&e)) {
            line.push(b'\n');
            if let Err(err) = f.write_all(&line) {
                tracing::warn!("cannot append to {}: {err}", self.path.display());
            }
        }
        if i.backlog.len() == BACKLOG {
            i.backlog.pop_front();
        }
        i.backlog.push_back(e.clone());
        tracing::info!(vm = %e.vm, kind = %e.kind, state = ?e.state, "{}", e.message);
        // Sent under the lock, so followers see events in sequence order.
        let _ = self.tx.send(e);
    }

    /// Events after `since`, and a receiver for the ones that follow (subscribed before the
    /// backlog is read, so nothing falls between the two). The bool is false when events
    /// after `since` were already dropped from the backlog.
    pub fn since(&self, since: u64) -> (Vec<Event>, broadcast::Receiver<Event>, bool) {
        let i = lock(&self.inner);
        let rx = self.tx.subscribe();
        let complete = i
            .backlog
            .front()
            .is_none_or(|f| f.seq <= since.saturating_add(1));
        let list = i
            .backlog
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect();
        (list, rx, complete)
    }

    /// The last sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        lock(&self.inner).next - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_survives_a_restart_and_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("bexar-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            let ev = Events::open(&dir);
            ev.emit("a", EventKind::Created, Some(Phase::Stopped), "");
            ev.emit("a", EventKind::Started, Some(Phase::Running), "");
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join("events.ndjson"))
            .unwrap();
        f.write_all(b"{\"seq\":3,\"ti").unwrap();
        let ev = Events::open(&dir);
        assert_eq!(ev.last_seq(), 2);
        ev.emit("a", EventKind::Stopped, Some(Phase::Stopped), "");
        let (list, _, complete) = ev.since(1);
        assert!(complete);
        assert_eq!(list.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_line_of_a_newer_kind_still_counts_for_the_numbering() {
        let dir = std::env::temp_dir().join(format!("bexar-events-new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("events.ndjson"),
            b"{\"seq\":7,\"time_ms\":1,\"vm\":\"a\",\"kind\":\"teleported\",\"message\":\"\"}\n",
        )
        .unwrap();
        let ev = Events::open(&dir);
        ev.emit("a", EventKind::Stopped, Some(Phase::Stopped), "");
        let (list, _, _) = ev.since(0);
        assert_eq!(list.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![8]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
