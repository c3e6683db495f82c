//! Live migration between two VMM processes: the pre-copy of guest memory while the guest runs,
//! then the switch-over (the last dirty pages and the VM's state while it is paused), over one
//! stream. The sender is [`crate::Vmm::migrate`]; the receiver is [`receive`], whose result a
//! new VMM builds from as after a live upgrade ([`crate::build_from_migration`]).
//!
//! The stream, after an 8-byte magic and the memory size, is records:
//! `PAGES first count` + `count` pages (a run of pages, by their index in the memfd),
//! `DISK index offset len` + `len` bytes of the VM's disk `index` (when disks are copied),
//! `ZERO index offset len` (a range of a disk that reads as zeros), `SYNC` (the receiver puts
//! the disk blocks so far on stable storage and answers [`SYNCED`]: the sender waits for it
//! before it pauses the guest, so the pause holds no pre-copy writeback), `PROGRESS` + the sender's
//! [`MigrationProgress`] (at each round's start and the switch-over's: what a relaying agent
//! reports, [`StreamWatch`]), `STATE len` + a state file's bytes ([`crate::snapshot::encode`]),
//! `DONE paused_at_ns sent_at_ns` (the sender's `CLOCK_MONOTONIC` when it paused the guest
//! and when it wrote this record: the receiver carries the pause and the state's age over to
//! its own clock with them, so the two hosts' clocks need not agree).
//! The receiver answers one byte once it holds the VM (`R`), or `F` and a reason: the answer is
//! the commit point, before it the sender can resume the guest, after it the guest is the
//! receiver's. While the pre-copy runs the sender also listens on that direction: a relaying
//! agent cancels the migration with one [`CANCEL`] byte (the guest goes on at the sender; once
//! the switch-over has begun the byte is ignored). Everything read is checked (sizes, ranges, the state's checksum): a malformed
//! stream is an error, never a panic.
//!
//! Disks: with `disks` on, every writable local disk is copied like memory: first what it holds
//! (all of a raw disk, its holes and zero blocks as `ZERO` records; only what a qcow2 overlay
//! itself holds, since the receiver's overlay sits on the same base image), then, round by
//! round, the 64 KiB blocks the guest wrote meanwhile (the device records them as it submits
//! them, [`bexar_devices::block::dirty`]), the last ones while the guest is paused. Both ends
//! go through the disk as the guest sees it ([`bexar_devices::block::copy`]): a qcow2 image is
//! read through the device's own open chain, whose cached metadata a second reader of the file
//! would miss. Without `disks` the receiver reopens the sender's disk files by path (both on
//! one host), which a writable qcow2 image cannot share (refused).
//!
//! A guest that dirties memory about as fast as the stream carries it is throttled (its vCPUs
//! parked for a growing share of each round, `Vmm::send_throttled`). Between hosts the agents
//! relay the stream over TLS (`bexar_agent::migrate`). The guest's recent console output goes
//! too (`CONSOLE` records: what the console kept when the copy began, then what came after,
//! at the switch-over), so the receiver's console log and attach replay go on where they were;
//! the receiver moves the guest's clocks on by the pause
//! ([`crate::vm_state::VmState::advance`]). Not yet: post-copy.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bexar_devices::block::copy::{CopyTarget, Extent};
use bexar_devices::block::raw::Bounce;
use serde::{Deserialize, Serialize};

/// The stream's first bytes.
pub const MAGIC: &[u8; 8] = b"BXMIG02\n";
/// Every version's magic begins so: another version is refused as such, not as noise.
const MAGIC_FAMILY: &[u8; 5] = b"BXMIG";
/// Bytes per page.
pub const PAGE: u64 = 4096;
const PAGES: u8 = 1;
const STATE: u8 = 2;
const DONE: u8 = 3;
const DISK: u8 = 4;
const ZERO: u8 = 5;
const PROGRESS: u8 = 6;
const SYNC: u8 = 7;
const CONSOLE: u8 = 8;
/// The receiver's answer to a `SYNC` record: every disk block sent so far is on its stable
/// storage.
pub const SYNCED: u8 = b'S';
/// A [`PROGRESS`] record's bytes after its tag.
const PROGRESS_LEN: usize = 49;
/// The byte an agent relaying the stream sends the sender to cancel the pre-copy.
pub const CANCEL: u8 = b'C';
/// The byte an agent relaying the stream sends the sender to end the pre-copy now (nova's
/// "force complete"): the round under way goes on without the bandwidth limit, and the
/// switch-over follows it, whatever the downtime budget says.
pub const COMPLETE: u8 = b'N';
/// How often the sender looks for a word from the other end while it sends.
const LISTEN_EVERY: Duration = Duration::from_millis(10);
/// The most pages one record carries (1 MiB).
const MAX_RUN: u64 = 256;
/// The most time a bandwidth-limited sender may be behind its limit and catch up at once.
const PACE_WINDOW: Duration = Duration::from_millis(100);
/// The largest state the receiver takes.
const MAX_STATE: u64 = 64 << 20;

/// Migration failures.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream broke or could not be written or read.
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
    /// The other end sent something that is not a migration stream, or not a sound one.
    #[error("migration stream: {0}")]
    Protocol(String),
    /// A disk to copy into could not be opened.
    #[error("a disk to receive into: {0}")]
    Disk(#[from] bexar_devices::block::BlockError),
    /// The receiver could not take the VM (or this VMM would not send it).
    #[error("the receiving VMM refused the VM: {0}")]
    Refused(String),
    /// Cancelled (a [`CANCEL`] from the relaying agent) before the switch-over: the guest goes
    /// on here.
    #[error("cancelled before the switch-over: the guest goes on here")]
    Cancelled,
    /// Everything was sent and no answer came: the receiver may hold the VM. The guest stays
    /// paused here.
    #[error("no answer from the receiving VMM after the whole VM was sent: the migration is in doubt and the guest stays paused here")]
    InDoubt,
}

/// How long one write to the stream may block before the migration fails (the guest goes on
/// where it was).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the sender waits for the receiver's answer once everything is sent.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn bad(why: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(why.into())
}

/// How a migration went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Pre-copy rounds (the first sends every page that holds data).
    pub rounds: u32,
    /// Pages sent in all.
    pub pages_sent: u64,
    /// Bytes sent in all (pages, state and framing).
    pub bytes_sent: u64,
    /// Pages sent while the guest was paused.
    pub final_pages: u64,
    /// Disk bytes sent in all (0 when disks are not copied).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Disk bytes sent while the guest was paused.
    #[serde(default)]
    pub final_disk_bytes: u64,
    /// The largest share of a round (percent) the guest's vCPUs were parked for, because it
    /// wrote memory about as fast as the stream carried it (0: never throttled).
    #[serde(default)]
    pub throttle_pct: u32,
    /// From the pause to the receiver's answer, milliseconds (the blackout as the sender saw
    /// it; the receiver resumes the guest right after answering).
    pub paused_ms: f64,
    /// The whole migration, milliseconds.
    pub total_ms: f64,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Copying memory and disks while the guest runs (pre-copy); can be cancelled.
    #[default]
    Copying,
    /// The guest is paused and the rest goes; no longer cancellable.
    SwitchOver,
}

/// A migration's progress as the sender reports it in the stream, at the start of each round
/// and of the switch-over (a relaying agent reads it with [`StreamWatch`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// Copying or switching over.
    pub phase: MigrationPhase,
    /// The round that begins (1: the first copy of everything the guest holds).
    pub round: u32,
    /// Bytes sent so far (pages, disk blocks, framing).
    pub bytes_sent: u64,
    /// Bytes the round (or the switch-over) has to send: memory and disk blocks.
    pub left_bytes: u64,
    /// The rate the last round was sent at, bytes a second (0 before the first).
    pub rate_bytes_per_sec: u64,
    /// The rate the guest dirtied memory at during the last round, pages a second.
    pub dirty_pages_per_sec: u64,
    /// The pause if the switch-over began now: what is left, at the rate measured,
    /// microseconds.
    pub expected_blackout_us: u64,
    /// The share of the round the guest's vCPUs are parked for (percent).
    pub throttle_pct: u32,
}

impl MigrationProgress {
    fn encode(&self) -> [u8; PROGRESS_LEN] {
        let mut b = [0u8; PROGRESS_LEN];
        b[0] = match self.phase {
            MigrationPhase::Copying => 0,
            MigrationPhase::SwitchOver => 1,
        };
        b[1..5].copy_from_slice(&self.round.to_le_bytes());
        b[5..9].copy_from_slice(&self.throttle_pct.to_le_bytes());
        for (i, v) in [
            self.bytes_sent,
            self.left_bytes,
            self.rate_bytes_per_sec,
            self.dirty_pages_per_sec,
            self.expected_blackout_us,
        ]
        .into_iter()
        .enumerate()
        {
            b[9 + 8 * i..17 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8; PROGRESS_LEN]) -> Result<Self, MigrationError> {
        let phase = match b[0] {
            0 => MigrationPhase::Copying,
            1 => MigrationPhase::SwitchOver,
            other => return Err(bad(format!("progress phase {other}"))),
        };
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(Self {
            phase,
            round: u32_at(1),
            throttle_pct: u32_at(5),
            bytes_sent: u64_at(9),
            left_bytes: u64_at(17),
            rate_bytes_per_sec: u64_at(25),
            dirty_pages_per_sec: u64_at(33),
            expected_blackout_us: u64_at(41),
        })
    }
}

/// Follows a migration stream as it passes (an agent relaying it between hosts): the sender's
/// last [`MigrationProgress`], the bytes seen, and whether the whole VM went (`DONE`). Only
/// the records' framing is read; the receiver checks everything else. A stream it cannot
/// follow sets `lost` and is passed on untouched all the same.
#[derive(Debug, Default)]
pub struct StreamWatch {
    /// The last progress the sender reported.
    pub progress: Option<MigrationProgress>,
    /// Bytes seen.
    pub bytes: u64,
    /// The whole VM went past (the receiver may hold it from here on).
    pub done: bool,
    /// The stream was not one this can follow.
    pub lost: bool,
    /// The header being gathered: its tag (0 for the stream's own 16 bytes) and bytes.
    head: Option<(u8, Vec<u8>)>,
    /// Payload bytes to pass over.
    skip: u64,
    started: bool,
}

impl StreamWatch {
    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        self.bytes += data.len() as u64;
        while !data.is_empty() && !self.done && !self.lost {
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64);
                self.skip -= n;
                data = &data[n as usize..];
                continue;
            }
            let (tag, mut head) = match self.head.take() {
                Some(h) => h,
                None if !self.started => (0, Vec::new()),
                None => {
                    let tag = data[0];
                    data = &data[1..];
                    (tag, Vec::new())
                }
            };
            let need = match tag {
                0 => 16,
                PAGES => 12,
                DISK => 16,
                ZERO => 20,
                STATE | CONSOLE => 4,
                DONE => 16,
                PROGRESS => PROGRESS_LEN,
                SYNC => 0,
                _ => {
                    self.lost = true;
                    return;
                }
            };
            let n = (need - head.len()).min(data.len());
            head.extend_from_slice(&data[..n]);
            data = &data[n..];
            if head.len() < need {
                self.head = Some((tag, head));
                continue;
            }
            match tag {
                0 => {
                    self.started = true;
                    self.lost = &head[..8] != MAGIC;
                }
                PAGES => {
                    let n = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
                    self.skip = u64::from(n) * PAGE;
                }
                DISK => {
                    self.skip = u64::from(u32::from_le_bytes(
                        head[12..16].try_into().expect("4 bytes"),
                    ));
                }
                STATE | CONSOLE => {
                    self.skip = u64::from(u32::from_le_bytes(head[..4].try_into().expect("4")));
                }
                DONE => self.done = true,
                PROGRESS => {
                    let b: &[u8; PROGRESS_LEN] = head[..].try_into().expect("its length");
                    match MigrationProgress::decode(b) {
                        Ok(p) => self.progress = Some(p),
                        Err(_) => self.lost = true,
                    }
                }
                _ => {}
            }
        }
    }
}

/// When pre-copy stops and the switch-over begins.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Convergence {
    /// The largest blackout wanted: pre-copy goes on while the pages left would take longer
    /// to send at the rate measured so far, and, once they would not, up to a few rounds more
    /// while each still halves them or they would take over 10 ms (the budget is the longest
    /// pause allowed, not the target).
    pub downtime: Duration,
    /// The most pre-copy rounds, whatever is left (0: no pre-copy, a stop-and-copy).
    pub max_rounds: u32,
    /// The most bytes a second the pre-copy sends (`None`: no limit); the switch-over is not
    /// limited.
    pub bandwidth: Option<u64>,
}

impl Default for Convergence {
    fn default() -> Self {
        Self {
            downtime: Duration::from_millis(100),
            max_rounds: 30,
            bandwidth: None,
        }
    }
}

/// The sending end: counts what it writes.
pub(crate) struct Sender<W: Write> {
    out: W,
    pub(crate) bytes: u64,
    pub(crate) pages: u64,
    /// At most this many bytes a second, counted from `since` and `since_bytes`.
    limit: Option<u64>,
    since: Instant,
    since_bytes: u64,
    /// The stream's other direction, listened to while the pre-copy runs: a relaying agent's
    /// [`CANCEL`], or an early refusal from the receiver.
    listen: Option<std::os::unix::net::UnixStream>,
    listened: Instant,
    /// A [`COMPLETE`] was heard: switch over after this round.
    pub(crate) forced: bool,
}

impl<W: Write> Sender<W> {
    pub(crate) fn new(mut out: W, memory_bytes: u64) -> Result<Self, MigrationError> {
        out.write_all(MAGIC)?;
        out.write_all(&memory_bytes.to_le_bytes())?;
        Ok(Self {
            out,
            bytes: 16,
            pages: 0,
            limit: None,
            since: Instant::now(),
            since_bytes: 16,
            listen: None,
            listened: Instant::now(),
            forced: false,
        })
    }

    /// A [`COMPLETE`] came: no limit from now on, and the switch-over after this round.
    fn force(&mut self) {
        if !self.forced {
            tracing::info!("migration: asked to complete now: the pre-copy ends after this round");
        }
        self.forced = true;
        self.limit = None;
    }

    /// Sends at most `bytes_per_sec` from now on (`None`: as fast as the stream takes it).
    /// The switch-over is sent unlimited: a limit there would only lengthen the pause.
    pub(crate) fn limit(&mut self, bytes_per_sec: Option<u64>) {
        self.limit = bytes_per_sec.filter(|b| *b > 0);
        self.since = Instant::now();
        self.since_bytes = self.bytes;
    }

    /// Listens to `back` (the stream's other direction) while sending, until
    /// [`Self::stop_listening`]: a [`CANCEL`] there ends the send with
    /// [`MigrationError::Cancelled`], an early refusal from the receiver with
    /// [`MigrationError::Refused`].
    pub(crate) fn listen(&mut self, back: std::os::unix::net::UnixStream) {
        self.listen = Some(back);
    }

    /// Stops listening (the switch-over begins: a cancel is too late, and the receiver's
    /// answer is read after the end), after a last look: a cancel already there is honoured.
    pub(crate) fn stop_listening(&mut self) -> Result<(), MigrationError> {
        self.listened = Instant::now()
            .checked_sub(LISTEN_EVERY)
            .unwrap_or(self.listened);
        let last = self.heard();
        self.listen = None;
        last
    }

    /// Looks, without waiting, for a word from the other end.
    fn heard(&mut self) -> Result<(), MigrationError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        if self.listened.elapsed() < LISTEN_EVERY {
            return Ok(());
        }
        self.listened = Instant::now();
        let Some(back) = &self.listen else {
            return Ok(());
        };
        let mut fds = [PollFd::new(back.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::ZERO).map_err(std::io::Error::from)? == 0 {
            return Ok(());
        }
        // Everything waiting is read at once: a cancel behind a complete is not left for a
        // later look (the last one, before the pause, would then miss it).
        let mut b = [0u8; 64];
        let n = (&mut &*back).read(&mut b)?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        // What comes after a refusal's `F` is its reason, not words of the agent's.
        let words = b[..n].iter().position(|&w| w == b'F').map_or(n, |f| f + 1);
        if b[..words].contains(&CANCEL) {
            return Err(MigrationError::Cancelled);
        }
        for &w in &b[..words] {
            if w == b'F' {
                // The receiver's refusal: its reason begins with what was read after it.
                return Err(self.refused(&b[words..n])?);
            }
            self.word(w, "before the end")?;
        }
        Ok(())
    }

    /// What a byte from the other end does while the pre-copy runs: a [`CANCEL`] ends it, a
    /// [`COMPLETE`] hurries it, an `F` is the receiver's refusal (its reason follows).
    /// The receiver's refusal whose reason begins with `read` and goes on, on the way back,
    /// until the receiver closes it.
    fn refused(&self, read: &[u8]) -> Result<MigrationError, MigrationError> {
        let Some(back) = &self.listen else {
            return Err(bad("a refusal with no way back"));
        };
        let mut back = back;
        let mut why = read.to_vec();
        if let MigrationError::Refused(more) = refusal(&mut back)? {
            why.extend_from_slice(more.as_bytes());
        }
        Ok(MigrationError::Refused(
            String::from_utf8_lossy(&why).into_owned(),
        ))
    }

    fn word(&mut self, b: u8, when: &str) -> Result<(), MigrationError> {
        match b {
            CANCEL => Err(MigrationError::Cancelled),
            COMPLETE => {
                self.force();
                Ok(())
            }
            b'F' => Err(self.refused(&[])?),
            other => Err(bad(format!("answer byte {other:#04x} {when}"))),
        }
    }

    /// Asks the receiver to put every disk block sent so far on stable storage, and waits for
    /// its [`SYNCED`] (the guest still runs here): so that the switch-over's pause syncs only
    /// its own last blocks, not a pre-copy's worth. A [`CANCEL`] meanwhile cancels; a
    /// [`COMPLETE`] is taken note of.
    pub(crate) fn sync_barrier(&mut self) -> Result<(), MigrationError> {
        self.out.write_all(&[SYNC])?;
        self.out.flush()?;
        self.bytes += 1;
        loop {
            let Some(back) = &self.listen else {
                return Ok(());
            };
            let mut back = back;
            let mut b = [0u8; 1];
            back.read_exact(&mut b)?;
            if b[0] == SYNCED {
                return Ok(());
            }
            self.word(b[0], "to a sync")?;
        }
    }

    /// Reports where the migration is, in the stream.
    pub(crate) fn progress(&mut self, p: &MigrationProgress) -> Result<(), MigrationError> {
        self.out.write_all(&[PROGRESS])?;
        self.out.write_all(&p.encode())?;
        self.out.flush()?;
        self.bytes += 1 + PROGRESS_LEN as u64;
        self.heard()
    }

    /// Waits until what was sent is within the limit. Time spent not sending (reading a
    /// disk's zeros, taking the dirty log) earns at most [`PACE_WINDOW`] of credit, so no
    /// burst beyond the limit follows it.
    fn pace(&mut self) -> Result<(), MigrationError> {
        self.heard()?;
        if let Some(rate) = self.limit {
            let due = Duration::from_secs_f64((self.bytes - self.since_bytes) as f64 / rate as f64);
            let spent = self.since.elapsed();
            if spent > due + PACE_WINDOW {
                self.since = Instant::now() - PACE_WINDOW;
                self.since_bytes = self.bytes;
            } else if due > spent {
                // What is buffered goes first, so the wait is the link's, not the buffer's.
                self.out.flush()?;
                std::thread::sleep(due - spent);
            }
        }
        Ok(())
    }

    /// Sends the pages whose indexes `pages` yields (in increasing order), in runs, each read
    /// by `read(page, buf)`.
    pub(crate) fn pages(
        &mut self,
        read: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
        pages: impl Iterator<Item = u64>,
    ) -> Result<u64, MigrationError> {
        let mut sent = 0;
        let mut run: Option<(u64, u64)> = None;
        let mut buf = vec![0u8; (MAX_RUN * PAGE) as usize];
        let mut flush = |s: &mut Self, (first, n): (u64, u64)| -> Result<(), MigrationError> {
            let data = &mut buf[..(n * PAGE) as usize];
            for (i, page) in data.chunks_mut(PAGE as usize).enumerate() {
                read(first + i as u64, page)?;
            }
            s.out.write_all(&[PAGES])?;
            s.out.write_all(&first.to_le_bytes())?;
            s.out.write_all(&(n as u32).to_le_bytes())?;
            s.out.write_all(data)?;
            s.bytes += 13 + n * PAGE;
            s.pages += n;
            s.pace()
        };
        for p in pages {
            sent += 1;
            run = match run {
                Some((first, n)) if first + n == p && n < MAX_RUN => Some((first, n + 1)),
                Some(r) => {
                    flush(self, r)?;
                    Some((p, 1))
                }
                None => Some((p, 1)),
            };
        }
        if let Some(r) = run {
            flush(self, r)?;
        }
        Ok(sent)
    }

    /// Sends all of disk `index` the first pass covers ([`bexar_devices::block::copy::CopySource::extents`]): its data,
    /// and `ZERO` records for the zeros it records and for 64 KiB blocks of data that read as
    /// zeros (so the receiver's disk need not start empty, and zeros cost no bandwidth).
    /// Returns the data bytes sent.
    pub(crate) fn disk_all(
        &mut self,
        index: u32,
        copy: &bexar_devices::virtio::DiskCopy,
        buf: &mut Bounce,
    ) -> Result<u64, MigrationError> {
        const BLOCK: usize = 64 << 10;
        let extents = copy.source.extents(copy.capacity)?;
        let mut sent = 0;
        // (start, len) of zeros not yet announced, joined while they are adjacent.
        let mut zeros: Option<(u64, u64)> = None;
        // A run is sent once it reaches 64 MiB, so that a long stretch of zeros to read still
        // shows the receiver the stream is alive (it times out after 30 s of silence).
        const ZERO_FLUSH: u64 = 64 << 20;
        let zero = |s: &mut Self, z: &mut Option<(u64, u64)>, off: u64, len: u64| {
            match z {
                Some((o, l)) if *o + *l == off && *l < ZERO_FLUSH => *l += len,
                _ => {
                    if let Some((o, l)) = z.take() {
                        s.zero(index, o, l)?;
                    }
                    *z = Some((off, len));
                }
            }
            Ok::<_, MigrationError>(())
        };
        for (start, len, what) in extents {
            let end = (start + len).min(copy.capacity);
            if what == Extent::Zero {
                zero(self, &mut zeros, start, end.saturating_sub(start))?;
                continue;
            }
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(MAX_RUN * PAGE);
                let bytes = buf.get(n as usize);
                copy.source.read_at(bytes, pos)?;
                for (i, block) in bytes.chunks(BLOCK).enumerate() {
                    let off = pos + (i * BLOCK) as u64;
                    if block.iter().all(|b| *b == 0) {
                        zero(self, &mut zeros, off, block.len() as u64)?;
                    } else {
                        if let Some((o, l)) = zeros.take() {
                            self.zero(index, o, l)?;
                        }
                        self.disk_record(index, off, block)?;
                        sent += block.len() as u64;
                    }
                }
                pos += n;
            }
        }
        if let Some((o, l)) = zeros {
            self.zero(index, o, l)?;
        }
        Ok(sent)
    }

    /// Sends disk `index`'s bytes in `ranges` (offset, length; cut at the disk's end), read
    /// from its image in runs of at most 1 MiB. Returns the bytes sent.
    pub(crate) fn disk_ranges(
        &mut self,
        index: u32,
        copy: &bexar_devices::virtio::DiskCopy,
        ranges: impl Iterator<Item = (u64, u64)>,
        buf: &mut Bounce,
    ) -> Result<u64, MigrationError> {
        let mut sent = 0;
        for (offset, len) in ranges {
            let end = offset.saturating_add(len).min(copy.capacity);
            let mut at = offset;
            while at < end {
                let n = (end - at).min(MAX_RUN * PAGE);
                let data = buf.get(n as usize);
                copy.source.read_at(data, at)?;
                self.disk_record(index, at, data)?;
                sent += n;
                at += n;
            }
        }
        Ok(sent)
    }

    /// Sends the blocks each of `disks` recorded as written since it was last asked (and
    /// forgets them). Returns the bytes sent.
    pub(crate) fn disks_written(
        &mut self,
        disks: &[(u32, bexar_devices::virtio::DiskCopy)],
        buf: &mut Bounce,
    ) -> Result<u64, MigrationError> {
        let mut sent = 0;
        for (i, copy) in disks {
            sent += self.disk_ranges(*i, copy, copy.dirty.take().into_iter(), buf)?;
        }
        Ok(sent)
    }

    fn disk_record(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), MigrationError> {
        self.out.write_all(&[DISK])?;
        self.out.write_all(&index.to_le_bytes())?;
        self.out.write_all(&offset.to_le_bytes())?;
        self.out.write_all(&(data.len() as u32).to_le_bytes())?;
        self.out.write_all(data)?;
        self.bytes += 17 + data.len() as u64;
        self.pace()
    }

    fn zero(&mut self, index: u32, offset: u64, len: u64) -> Result<(), MigrationError> {
        self.out.write_all(&[ZERO])?;
        self.out.write_all(&index.to_le_bytes())?;
        self.out.write_all(&offset.to_le_bytes())?;
        self.out.write_all(&len.to_le_bytes())?;
        self.bytes += 21;
        // Sent now, not when a buffer fills: between long runs of zeros this is all the
        // receiver hears, and it gives up after 30 s of silence.
        self.out.flush()?;
        Ok(())
    }

    pub(crate) fn state(&mut self, data: &[u8]) -> Result<(), MigrationError> {
        self.out.write_all(&[STATE])?;
        self.out.write_all(&(data.len() as u32).to_le_bytes())?;
        self.out.write_all(data)?;
        self.bytes += 5 + data.len() as u64;
        Ok(())
    }

    /// The guest's console output (oldest first, at most [`bexar_devices::serial::RECENT_MAX`]
    /// bytes a record), for the receiver's console log and attach replay.
    pub(crate) fn console(&mut self, data: &[u8]) -> Result<(), MigrationError> {
        let data = &data[data.len().saturating_sub(bexar_devices::serial::RECENT_MAX)..];
        if data.is_empty() {
            return Ok(());
        }
        self.out.write_all(&[CONSOLE])?;
        self.out.write_all(&(data.len() as u32).to_le_bytes())?;
        self.out.write_all(data)?;
        self.bytes += 5 + data.len() as u64;
        Ok(())
    }

    pub(crate) fn done(&mut self, paused_at_ns: u64) -> Result<(), MigrationError> {
        self.out.write_all(&[DONE])?;
        self.out.write_all(&paused_at_ns.to_le_bytes())?;
        self.out
            .write_all(&crate::control::monotonic_ns().to_le_bytes())?;
        self.out.flush()?;
        self.bytes += 17;
        Ok(())
    }

    pub(crate) fn into_inner(self) -> W {
        self.out
    }
}

/// Reads the receiver's answer: Ok once it holds the VM.
pub(crate) fn read_answer(r: &mut impl Read) -> Result<(), MigrationError> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    // A cancel (or a completion asked for) that came after the switch-over began is too late:
    // not the receiver's word.
    while b[0] == CANCEL || b[0] == COMPLETE || b[0] == SYNCED {
        r.read_exact(&mut b)?;
    }
    match b[0] {
        b'R' => Ok(()),
        b'F' => Err(refusal(r)?),
        other => Err(bad(format!("answer byte {other:#04x}"))),
    }
}

/// The receiver's reason after its `F` (at most 4 KiB, to the end of the stream).
fn refusal(r: &mut impl Read) -> Result<MigrationError, std::io::Error> {
    let mut why = Vec::new();
    r.take(4096).read_to_end(&mut why)?;
    Ok(MigrationError::Refused(
        String::from_utf8_lossy(&why).into_owned(),
    ))
}

/// What [`receive`] took in.
pub struct Received {
    /// Guest memory: a new memfd holding every page sent.
    pub memory: File,
    /// The VM's state.
    pub state: crate::snapshot::SnapshotState,
    /// The guest's memory size, MiB.
    pub memory_mib: u64,
    /// When the sender paused the guest, on this host's `CLOCK_MONOTONIC` (ns; carried over
    /// from the sender's clock through its readings in `DONE`).
    pub paused_at_ns: u64,
    /// When the sender saved the VM's state (its kvmclock), on this host's `CLOCK_MONOTONIC`
    /// likewise: what the guest's clocks are moved on from. `None` for a state that does not
    /// say.
    pub saved_at_ns: Option<u64>,
    /// Pages received (a page sent twice counts twice).
    pub pages: u64,
    /// Disk bytes received and written.
    pub disk_bytes: u64,
    /// How long the stream took, from its first byte.
    pub elapsed: Duration,
    /// The guest's recent console output on the sender (at most twice
    /// [`bexar_devices::serial::RECENT_MAX`] bytes), for this side's console to begin with.
    pub console: Vec<u8>,
}

/// Receives a migration stream from `input` (see the module's description): guest memory into a
/// new memfd, disk blocks into `disks` (the VM's disks in order, `None` for one that is not
/// copied: a raw file may hold anything beforehand, a qcow2 overlay must sit on the sender's
/// base image and hold nothing of its own), and the VM's state. Returns once
/// `DONE` arrived; the caller builds the VM ([`crate::build_from_migration`]) and then answers
/// with [`answer`].
pub fn receive(
    input: &mut impl Read,
    acks: &mut impl Write,
    disks: &[Option<CopyTarget>],
) -> Result<Received, MigrationError> {
    let sizes = disks
        .iter()
        .map(|d| d.as_ref().map(CopyTarget::size).transpose())
        .collect::<Result<Vec<_>, _>>()?;
    let mut disk_bytes = 0u64;
    let mut disks_unsynced = false;
    let t0 = Instant::now();
    // The stream began before the sender paused or saved anything: its times are not earlier.
    let began = crate::control::monotonic_ns();
    let mut head = [0u8; 16];
    input.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        if head.starts_with(MAGIC_FAMILY) {
            return Err(bad(format!(
                "stream version {:?}; this VMM reads {:?} (both hosts need the same Bexar)",
                String::from_utf8_lossy(&head[5..7]),
                String::from_utf8_lossy(&MAGIC[5..7])
            )));
        }
        return Err(bad("not a migration stream (magic)"));
    }
    let size = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
    if size == 0 || size % (1 << 20) != 0 || size > crate::config::MAX_MEMORY_MIB << 20 {
        return Err(bad(format!("memory size {size} bytes")));
    }
    let memory = crate::memory::new_memfd(size).map_err(|e| bad(e.to_string()))?;
    let total_pages = size / PAGE;
    let mut buf = vec![0u8; (MAX_RUN * PAGE) as usize];
    let mut pages = 0u64;
    let mut state = None;
    let mut console = Vec::new();
    loop {
        let mut tag = [0u8; 1];
        input.read_exact(&mut tag)?;
        match tag[0] {
            PAGES => {
                // A round's disk blocks are in: on stable storage now, while the guest still
                // runs on the sender, so the switch-over syncs only its own few.
                sync_disks(disks, &mut disks_unsynced)?;
                let mut h = [0u8; 12];
                input.read_exact(&mut h)?;
                let first = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
                let n = u64::from(u32::from_le_bytes(h[8..].try_into().expect("4 bytes")));
                if n == 0 || n > MAX_RUN || first.checked_add(n).is_none_or(|e| e > total_pages) {
                    return Err(bad(format!(
                        "pages {first}+{n} outside the guest's {total_pages}"
                    )));
                }
                let data = &mut buf[..(n * PAGE) as usize];
                input.read_exact(data)?;
                memory.write_all_at(data, first * PAGE)?;
                pages += n;
            }
            DISK => {
                let mut h = [0u8; 16];
                input.read_exact(&mut h)?;
                let index = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
                let offset = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
                let len = u64::from(u32::from_le_bytes(h[12..].try_into().expect("4 bytes")));
                let (Some(Some(file)), Some(Some(size))) = (disks.get(index), sizes.get(index))
                else {
                    return Err(bad(format!("blocks of disk {index}, which is not copied")));
                };
                if len == 0
                    || len > MAX_RUN * PAGE
                    || offset.checked_add(len).is_none_or(|e| e > *size)
                {
                    return Err(bad(format!(
                        "disk {index} bytes {offset}+{len} outside its {size}"
                    )));
                }
                let data = &mut buf[..len as usize];
                input.read_exact(data)?;
                file.write_at(data, offset)?;
                disk_bytes += len;
                disks_unsynced = true;
            }
            ZERO => {
                let mut h = [0u8; 20];
                input.read_exact(&mut h)?;
                let index = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
                let offset = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
                let len = u64::from_le_bytes(h[12..].try_into().expect("8 bytes"));
                let (Some(Some(file)), Some(Some(size))) = (disks.get(index), sizes.get(index))
                else {
                    return Err(bad(format!("zeros for disk {index}, which is not copied")));
                };
                if len == 0 || offset.checked_add(len).is_none_or(|e| e > *size) {
                    return Err(bad(format!(
                        "disk {index} zeros {offset}+{len} outside its {size}"
                    )));
                }
                file.zero(offset, len, &mut buf)?;
                disks_unsynced = true;
            }
            PROGRESS => {
                let mut h = [0u8; PROGRESS_LEN];
                input.read_exact(&mut h)?;
                MigrationProgress::decode(&h)?;
            }
            SYNC => {
                disks_unsynced = true;
                sync_disks(disks, &mut disks_unsynced)?;
                acks.write_all(&[SYNCED])?;
                acks.flush()?;
            }
            CONSOLE => {
                let mut h = [0u8; 4];
                input.read_exact(&mut h)?;
                let len = u32::from_le_bytes(h) as usize;
                if len == 0 || len > bexar_devices::serial::RECENT_MAX {
                    return Err(bad(format!("{len} bytes of console output")));
                }
                let from = console.len();
                console.resize(from + len, 0);
                input.read_exact(&mut console[from..])?;
                let excess = console
                    .len()
                    .saturating_sub(2 * bexar_devices::serial::RECENT_MAX);
                console.drain(..excess);
            }
            STATE => {
                let mut h = [0u8; 4];
                input.read_exact(&mut h)?;
                let len = u64::from(u32::from_le_bytes(h));
                if len > MAX_STATE {
                    return Err(bad(format!("a state of {len} bytes")));
                }
                let mut data = vec![0u8; len as usize];
                input.read_exact(&mut data)?;
                // Checked (header, length, CRC) and parsed: a bad state is the stream's fault.
                let decoded = crate::snapshot::decode(Path::new("the migration stream"), &data)
                    .map_err(|e| bad(e.to_string()))?;
                state = Some(decoded);
            }
            DONE => {
                let mut h = [0u8; 16];
                input.read_exact(&mut h)?;
                let here = crate::control::monotonic_ns();
                let Some(state) = state else {
                    return Err(bad("DONE before the state"));
                };
                // The sender's times, as ages at the moment it wrote this record, put on this
                // host's clock (the record's own way here is not counted: well under 1 ms).
                let paused_at = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
                let sent_at = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
                let local =
                    |then: u64| here.saturating_sub(sent_at.saturating_sub(then)).max(began);
                let saved_at_ns = state.vm.saved_at_ns.map(local);
                // The guest runs on these next: what it was told is on disk must be.
                sync_disks(disks, &mut disks_unsynced)?;
                return Ok(Received {
                    memory,
                    state,
                    memory_mib: size >> 20,
                    saved_at_ns,
                    paused_at_ns: local(paused_at),
                    pages,
                    disk_bytes,
                    elapsed: t0.elapsed(),
                    console,
                });
            }
            other => return Err(bad(format!("record type {other:#04x}"))),
        }
    }
}

/// Syncs the receiver's disks if anything was written to them since the last time.
fn sync_disks(disks: &[Option<CopyTarget>], unsynced: &mut bool) -> std::io::Result<()> {
    if std::mem::take(unsynced) {
        for d in disks.iter().flatten() {
            d.sync()?;
        }
    }
    Ok(())
}

/// Tells the sender whether this side holds the VM now (`Ok`) or not.
pub fn answer(out: &mut impl Write, result: Result<(), String>) -> std::io::Result<()> {
    match result {
        Ok(()) => out.write_all(b"R")?,
        Err(why) => {
            out.write_all(b"F")?;
            out.write_all(why.as_bytes())?;
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bexar_devices::block::copy::CopySource;

    fn memfd_with(pages: &[(u64, u8)], size: u64) -> File {
        let f = crate::memory::new_memfd(size).unwrap();
        for (p, b) in pages {
            f.write_all_at(&[*b; PAGE as usize], p * PAGE).unwrap();
        }
        f
    }

    #[test]
    fn pages_go_across_in_runs_and_land_where_they_were() {
        let size = 4 << 20;
        let src = memfd_with(&[(0, 1), (1, 2), (2, 3), (700, 9), (1023, 7)], size);
        let mut s = Sender::new(Vec::new(), size).unwrap();
        let read = |p: u64, b: &mut [u8]| src.read_exact_at(b, p * PAGE);
        assert_eq!(s.pages(read, [0, 1, 2, 700, 1023].into_iter()).unwrap(), 5);
        let bytes = s.into_inner();
        // Three runs: 0-2, 700, 1023.
        assert_eq!(bytes.len() as u64, 16 + 3 * 13 + 5 * PAGE);
        // No state yet: the receiver refuses to finish.
        let mut stream = bytes.clone();
        stream.push(DONE);
        stream.extend_from_slice(&[0u8; 16]);
        let e = receive(&mut stream.as_slice(), &mut std::io::sink(), &[])
            .err()
            .unwrap();
        assert!(e.to_string().contains("DONE before the state"), "{e}");
        // The pages themselves, on a stream cut after them: they arrived where they were.
        let e = receive(&mut bytes.as_slice(), &mut std::io::sink(), &[])
            .err()
            .unwrap();
        assert!(matches!(e, MigrationError::Io(_)), "{e}");
    }

    #[test]
    fn a_disk_goes_across_with_its_zeros_and_blocks_outside_it_are_refused() {
        let dir = std::env::temp_dir().join(format!("bexar-mig-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        let size = 4u64 << 20;
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&[7u8; 5000], 65536 * 3 + 100).unwrap();
        f.write_all_at(&[0u8; 65536], 0).unwrap(); // data, but zeros
        let g = std::fs::File::create(&dst).unwrap();
        g.write_all_at(&vec![0xa5u8; size as usize], 0).unwrap();
        let copy = bexar_devices::virtio::DiskCopy {
            source: CopySource::Raw(File::open(&src).unwrap()),
            capacity: size,
            dirty: std::sync::Arc::new(bexar_devices::block::dirty::DirtyMap::new(size, 65536)),
        };
        let mut s = Sender::new(Vec::new(), 1 << 20).unwrap();
        let mut buf = Bounce::default();
        // Only the file system blocks the 5000 bytes touch carry data (the zeros written at
        // the start are data to the file system, not to the copy).
        let sent = s.disk_all(0, &copy, &mut buf).unwrap();
        assert!((5000..=16384).contains(&sent), "{sent} bytes sent");
        s.state(&[]).unwrap();
        let mut stream = s.into_inner();
        stream.push(DONE);
        stream.extend_from_slice(&0u64.to_le_bytes());
        let disks = [Some(CopyTarget::Raw(
            std::fs::OpenOptions::new().write(true).open(&dst).unwrap(),
        ))];
        // The empty state is refused at the end, after the disk records were taken.
        let e = receive(&mut stream.as_slice(), &mut std::io::sink(), &disks)
            .err()
            .unwrap();
        assert!(e.to_string().contains("header"), "{e}");
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
        // A block past the disk's end.
        let mut s = Sender::new(Vec::new(), 1 << 20).unwrap();
        s.disk_record(0, size - 512, &[1u8; 1024]).unwrap();
        let e = receive(&mut s.into_inner().as_slice(), &mut std::io::sink(), &disks)
            .err()
            .unwrap();
        assert!(e.to_string().contains("outside"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_relay_follows_the_stream_in_any_cut_and_the_receiver_takes_its_progress() {
        let size = 4 << 20;
        let src = memfd_with(&[(3, 1), (4, 2), (900, 3)], size);
        let mut s = Sender::new(Vec::new(), size).unwrap();
        let p1 = MigrationProgress {
            round: 2,
            bytes_sent: 12345,
            left_bytes: 8192,
            rate_bytes_per_sec: 1 << 30,
            dirty_pages_per_sec: 777,
            expected_blackout_us: 1500,
            throttle_pct: 20,
            ..Default::default()
        };
        s.progress(&p1).unwrap();
        let read = |p: u64, b: &mut [u8]| src.read_exact_at(b, p * PAGE);
        s.pages(read, [3, 4, 900].into_iter()).unwrap();
        s.zero(0, 0, 4096).unwrap();
        // Nothing listens on the way back here: the barrier only writes its record.
        s.sync_barrier().unwrap();
        let p2 = MigrationProgress {
            phase: MigrationPhase::SwitchOver,
            round: 2,
            left_bytes: 4096,
            ..Default::default()
        };
        s.progress(&p2).unwrap();
        s.state(&[9u8; 100]).unwrap();
        s.done(42).unwrap();
        let stream = s.into_inner();
        for cut in [1, 7, 13, 4096, stream.len()] {
            let mut w = StreamWatch::default();
            let mut seen = Vec::new();
            for chunk in stream.chunks(cut) {
                w.feed(chunk);
                if let Some(p) = &w.progress {
                    if seen.last() != Some(p) {
                        seen.push(p.clone());
                    }
                }
            }
            assert!(!w.lost, "cut {cut}");
            assert!(w.done, "cut {cut}");
            assert_eq!(w.bytes, stream.len() as u64);
            // Fed at once, only the last is left to see.
            let want = if cut == stream.len() {
                vec![p2.clone()]
            } else {
                vec![p1.clone(), p2.clone()]
            };
            assert_eq!(seen, want, "cut {cut}");
        }
        // Not a stream: followed no further, never a panic.
        let mut w = StreamWatch::default();
        w.feed(b"NOTMAGIC\0\0\0\0\0\0\0\0\x01");
        assert!(w.lost);
        // The receiver reads the progress records, answers the sync once its disks are synced,
        // and goes on (to the bad state here).
        let disk = crate::memory::new_memfd(1 << 20).unwrap();
        let mut acks = Vec::new();
        let e = receive(
            &mut stream.as_slice(),
            &mut acks,
            &[Some(CopyTarget::Raw(disk))],
        )
        .err()
        .unwrap();
        assert_eq!(acks, [SYNCED]);
        assert!(e.to_string().contains("header"), "{e}");
    }

    #[test]
    fn a_complete_on_the_way_back_lifts_the_limit_and_marks_the_last_round() {
        use std::os::unix::net::UnixStream;
        let size = 4 << 20;
        let src = memfd_with(&[(1, 1), (2, 2)], size);
        let read = |p: u64, b: &mut [u8]| src.read_exact_at(b, p * PAGE);
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Sender::new(std::io::BufWriter::new(&a), size).unwrap();
        s.listen(a.try_clone().unwrap());
        s.limit(Some(4096));
        b.write_all(&[COMPLETE]).unwrap();
        std::thread::sleep(LISTEN_EVERY * 2);
        s.pages(read, [1, 2].into_iter()).unwrap();
        assert!(s.forced);
        assert_eq!(s.limit, None, "the rest of the round goes unlimited");
        // Heard in the middle of a sync barrier too, which still waits for its SYNCED.
        let mut s2 = Sender::new(std::io::BufWriter::new(&a), size).unwrap();
        s2.listen(a.try_clone().unwrap());
        b.write_all(&[COMPLETE, SYNCED]).unwrap();
        s2.sync_barrier().unwrap();
        assert!(s2.forced);
        // After the switch-over began, it is not the receiver's answer.
        let mut answer: &[u8] = &[COMPLETE, b'R'];
        read_answer(&mut answer).unwrap();
        // A cancel that came behind a complete wins, both read in one look (the last one
        // before the pause).
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s3 = Sender::new(std::io::BufWriter::new(&a), size).unwrap();
        s3.listen(a.try_clone().unwrap());
        b.write_all(&[COMPLETE, CANCEL]).unwrap();
        let e = s3.stop_listening().err().unwrap();
        assert!(matches!(&e, MigrationError::Cancelled), "{e}");
    }

    #[test]
    fn a_cancel_on_the_way_back_stops_the_pre_copy_and_a_late_one_is_ignored() {
        use std::os::unix::net::UnixStream;
        let size = 4 << 20;
        let src = memfd_with(&[(1, 1)], size);
        let read = |p: u64, b: &mut [u8]| src.read_exact_at(b, p * PAGE);
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Sender::new(std::io::BufWriter::new(&a), size).unwrap();
        s.listen(a.try_clone().unwrap());
        b.write_all(&[CANCEL]).unwrap();
        std::thread::sleep(LISTEN_EVERY * 2);
        let e = s.pages(read, [1].into_iter()).err().unwrap();
        assert!(matches!(&e, MigrationError::Cancelled), "{e}");
        // After the switch-over began, a cancel is not the receiver's answer.
        let mut answer: &[u8] = &[CANCEL, CANCEL, b'R'];
        read_answer(&mut answer).unwrap();
        // An early refusal from the receiver ends the pre-copy with its reason.
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Sender::new(std::io::BufWriter::new(&a), size).unwrap();
        s.listen(a.try_clone().unwrap());
        // A reason longer than one look's read, with a capital C in it (not a cancel).
        b.write_all(b"FCannot take it: no room for 64 MiB of guest memory and two disks here")
            .unwrap();
        drop(b);
        std::thread::sleep(LISTEN_EVERY * 2);
        let e = s.pages(read, [1].into_iter()).err().unwrap();
        assert!(
            matches!(&e, MigrationError::Refused(w)
                if w == "Cannot take it: no room for 64 MiB of guest memory and two disks here"),
            "{e}"
        );
    }

    #[test]
    fn a_malformed_stream_is_an_error_not_a_panic() {
        let mut good = MAGIC.to_vec();
        good.extend_from_slice(&(4u64 << 20).to_le_bytes());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"NOTMAGIC\0\0\0\0\0\0\0\0".to_vec(), "magic"),
            // Another version of the stream (this one's first, before the console records).
            (
                [b"BXMIG01\n".as_slice(), &(4u64 << 20).to_le_bytes()].concat(),
                "stream version \"01\"",
            ),
            (
                [MAGIC.as_slice(), &3u64.to_le_bytes()].concat(),
                "memory size",
            ),
            (
                [
                    good.as_slice(),
                    &[PAGES],
                    &1023u64.to_le_bytes(),
                    &2u32.to_le_bytes(),
                ]
                .concat(),
                "outside",
            ),
            (
                [
                    good.as_slice(),
                    &[PAGES],
                    &0u64.to_le_bytes(),
                    &0u32.to_le_bytes(),
                ]
                .concat(),
                "outside",
            ),
            (
                [
                    good.as_slice(),
                    &[PAGES],
                    &u64::MAX.to_le_bytes(),
                    &1u32.to_le_bytes(),
                ]
                .concat(),
                "outside",
            ),
            (
                [good.as_slice(), &[STATE], &u32::MAX.to_le_bytes()].concat(),
                "a state of",
            ),
            (
                [good.as_slice(), &[STATE], &5u32.to_le_bytes(), b"hello"].concat(),
                "header",
            ),
            ([good.as_slice(), &[9]].concat(), "record type"),
            (
                [good.as_slice(), &[CONSOLE], &0u32.to_le_bytes()].concat(),
                "console output",
            ),
            (
                [
                    good.as_slice(),
                    &[CONSOLE],
                    &(bexar_devices::serial::RECENT_MAX as u32 + 1).to_le_bytes(),
                ]
                .concat(),
                "console output",
            ),
            // Disk records for a disk this side does not copy.
            (
                [
                    good.as_slice(),
                    &[DISK],
                    &0u32.to_le_bytes(),
                    &0u64.to_le_bytes(),
                    &512u32.to_le_bytes(),
                ]
                .concat(),
                "not copied",
            ),
            (
                [
                    good.as_slice(),
                    &[ZERO],
                    &3u32.to_le_bytes(),
                    &0u64.to_le_bytes(),
                    &512u64.to_le_bytes(),
                ]
                .concat(),
                "not copied",
            ),
            // Cut short: an I/O error (unexpected end), also no panic.
            (
                [good.as_slice(), &[PAGES], &0u64.to_le_bytes()].concat(),
                "stream",
            ),
        ];
        for (stream, want) in cases {
            let e = receive(&mut stream.as_slice(), &mut std::io::sink(), &[])
                .err()
                .unwrap();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }
}
