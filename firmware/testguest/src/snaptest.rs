//! `snapshot`: a guest that keeps changing every kind of state a VMM must carry through a
//! snapshot and restore, and checks after each step that nothing was lost or repeated.
//!
//! The boot CPU sleeps between ticks of its local APIC timer (periodic, `bexar.tick-ms`,
//! default 10 ms). On each tick it takes one step `n`:
//!
//! * the step counter in memory goes to `n`;
//! * every AP's spin counter must keep moving (the APs run; a second of steps without a spin
//!   fails);
//! * disk sector `(n - 1) % S` must still hold step `n - 1`'s pattern, then sector `n % S` gets
//!   step `n`'s pattern and is read back (S = `bexar.sectors`, default 256);
//! * a frame carrying `n` goes out on the first NIC to `bexar.dst-mac` (EtherType 0x88b6);
//!   frames that came in (the host echoes them) must carry strictly increasing step numbers no
//!   larger than `n`;
//! * with a vsock device and `bexar.vsock-port=P`, the next value of a counter goes to the host's
//!   port P as 8 bytes: the host answers each new connection with the value it expects next,
//!   and the guest goes on from there, so after a restore (which resets every connection) the
//!   stream resumes with nothing lost or repeated, as an application on vsock would;
//! * every 10 steps, console input is drained: it must be `a`, `b`, ... `z`, `a`... with no byte
//!   lost or repeated; `Q` asks the guest to finish;
//! * `bexar-testguest: snap: step n ...` goes to the console.
//!
//! On `Q` it checks the last S sectors once more and passes. The host checks that the step
//! lines and the frames it received count up by one with no gap or repeat across every
//! restore.
use crate::net::wire::Mac;
use crate::vtests::{alloc, check_pattern, fail, fill_pattern, open_disk, param, parse_mac};
use crate::{code, TestResult, P};
use core::sync::atomic::{AtomicU64, Ordering};
use rt::arch::{ms_to_cycles, rdtsc};
use rt::bootparams::BootParams;
use rt::mptable::MpTable;
use rt::virtio::blk::SECTOR_SIZE;
use rt::virtio::vsock::{self, op as vop, Conn, Vsock};
use rt::virtio::{device_id, mmio, Error};
use rt::{irq, println, smp, uart, MAX_CPUS};

const ETH_SNAP: [u8; 2] = [0x88, 0xb6];
/// Receive buffer space the guest advertises on its vsock connections.
const VSOCK_BUF: u32 = 64 * 1024;
/// The IRQ line whose vector the LAPIC timer uses (no IOAPIC pin routed to it).
const TIMER_LINE: u8 = 23;
/// Steps an AP may go without spinning before it counts as stopped.
const AP_PATIENCE: u64 = 100;
/// Steps between two drains of the console input, so that input waits in the UART's FIFO
/// (and behind it, in the VMM) most of the time: a snapshot carries it there.
const INPUT_EVERY: u64 = 10;

static AP_SPINS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn ap_spin(index: usize) {
    loop {
        if let Some(c) = AP_SPINS.get(index) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        core::hint::spin_loop();
    }
}

fn frame_step(f: &[u8]) -> Option<u64> {
    if f.len() < 14 + 18 || f[12..14] != ETH_SNAP || &f[14..24] != b"bexar-snap" {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&f[24..32]);
    Some(u64::from_le_bytes(b))
}

#[derive(PartialEq, Eq)]
enum Phase {
    Idle,
    Connecting,
    /// Connected; waiting for the host's word on where to go on from.
    Resuming,
    Streaming,
}

/// The counter stream to the host over vsock, resumed after every reset.
struct Stream {
    v: Vsock,
    port: u32,
    conn: Conn,
    phase: Phase,
    local_port: u32,
    /// The next value to send.
    next: u64,
    resets: u64,
    payload: &'static mut [u8],
}

fn vs(what: &'static str) -> impl Fn(Error) -> (u32, &'static str) {
    move |e| fail(what, e)
}

impl Stream {
    fn step(&mut self) -> TestResult {
        while self.v.poll_event().map_err(vs("snap: vsock event"))?.is_some() {
            // TRANSPORT_RESET: every connection is gone (a restore).
            self.phase = Phase::Idle;
            self.resets += 1;
        }
        while let Some(h) = self.v.recv(self.payload).map_err(vs("snap: vsock receive"))? {
            if self.phase == Phase::Idle || !self.conn.matches(&h) {
                if h.op != vop::RST {
                    self.v.send_rst_for(&h).map_err(vs("snap: vsock rst"))?;
                }
                continue;
            }
            self.conn.update_credit(&h);
            match h.op {
                vop::RESPONSE if self.phase == Phase::Connecting => self.phase = Phase::Resuming,
                vop::RW => {
                    let n = h.len;
                    self.conn.rx_cnt = self.conn.rx_cnt.wrapping_add(n);
                    self.conn.fwd_cnt = self.conn.fwd_cnt.wrapping_add(n);
                    if self.phase == Phase::Resuming && n >= 8 {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.payload[..8]);
                        let from = u64::from_le_bytes(b);
                        if from > self.next {
                            println!("{P}: snap: the host expects value {from}; only {} were sent", self.next);
                            return Err((code::VSOCK_DATA, "the host has more than the guest sent"));
                        }
                        self.next = from;
                        self.phase = Phase::Streaming;
                    }
                }
                vop::RST | vop::SHUTDOWN => self.phase = Phase::Idle,
                vop::CREDIT_REQUEST => {
                    self.v.send_conn(&mut self.conn, vop::CREDIT_UPDATE, 0, &[]).map_err(vs("snap: vsock credit"))?
                }
                _ => {}
            }
        }
        match self.phase {
            Phase::Idle => {
                self.local_port += 1;
                self.conn = Conn::new(self.v.guest_cid, self.local_port, vsock::CID_HOST, self.port, VSOCK_BUF);
                self.v.send_conn(&mut self.conn, vop::REQUEST, 0, &[]).map_err(vs("snap: vsock connect"))?;
                self.phase = Phase::Connecting;
            }
            Phase::Streaming if self.conn.credit() >= 8 => {
                let value = self.next.to_le_bytes();
                self.v.send_conn(&mut self.conn, vop::RW, 0, &value).map_err(vs("snap: vsock send"))?;
                self.next += 1;
            }
            _ => {}
        }
        Ok(())
    }

    /// Waits (up to 1 s) until the device has taken every packet queued.
    fn drain(&mut self) {
        let t0 = rdtsc();
        while self.v.tx.num_free() < self.v.tx.size() && rdtsc().wrapping_sub(t0) < ms_to_cycles(1000) {
            let _ = self.v.reclaim_tx();
            core::hint::spin_loop();
        }
    }
}

pub fn test_snapshot(bp: &BootParams) -> TestResult {
    let tick_ms = param(bp, "bexar.tick-ms", 10)?.clamp(1, 1000);
    let sectors = param(bp, "bexar.sectors", 256)?;
    let dst = parse_mac(bp, "bexar.dst-mac")?;

    let aps = match MpTable::find() {
        Ok(mp) => smp::start_aps(&mp, ap_spin).unwrap_or(0),
        Err(_) => 0,
    };
    // Every AP spinning before the first step (an AP's way to long mode is slow on PVM).
    let t0 = rdtsc();
    while (1..=aps).any(|i| AP_SPINS.get(i).is_some_and(|c| c.load(Ordering::Relaxed) == 0)) {
        if rdtsc().wrapping_sub(t0) > ms_to_cycles(5000) {
            return Err((code::SMP_TIMEOUT, "an AP did not start"));
        }
        core::hint::spin_loop();
    }
    let mut d = open_disk(bp)?;
    let sectors = sectors.min(d.capacity()).max(1);
    let buf = alloc(SECTOR_SIZE)?;
    let t = mmio::find(device_id::NET, 0).ok_or((code::VIRTIO_NO_DEVICE, "no network device"))?;
    let mut n = rt::virtio::net::Net::open(t, 64).map_err(|e| fail("snap: net init failed", e))?;

    let vsock_port = param(bp, "bexar.vsock-port", 0)? as u32;
    let mut stream = match mmio::find(device_id::VSOCK, 0) {
        Some(t) if vsock_port != 0 => Some(Stream {
            v: Vsock::open(t, 64).map_err(vs("snap: vsock init failed"))?,
            port: vsock_port,
            conn: Conn::default(),
            phase: Phase::Idle,
            local_port: 1 << 20,
            next: 0,
            resets: 0,
            payload: alloc(vsock::MAX_PAYLOAD)?,
        }),
        _ => None,
    };

    irq::lapic_enable();
    irq::lapic_timer_periodic(TIMER_LINE, (tick_ms * 62_500) as u32);
    println!("{P}: snap: ready: {aps} APs, {sectors} sectors, mac {} -> {}, tick {tick_ms} ms", Mac(n.mac), Mac(dst));

    let mut frame = [0u8; 64];
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&n.mac);
    frame[12..14].copy_from_slice(&ETH_SNAP);
    frame[14..24].copy_from_slice(b"bexar-snap");

    let mut last_spins = [(0u64, 0u64); MAX_CPUS];
    let (mut step, mut input, mut echoes, mut last_echo) = (0u64, 0u64, 0u64, 0u64);
    let mut quit = false;
    while !quit {
        if irq::wait() & (1 << TIMER_LINE) == 0 {
            continue;
        }
        step += 1;
        for (i, (last, since)) in last_spins.iter_mut().enumerate().take(aps + 1).skip(1) {
            let now = AP_SPINS[i].load(Ordering::Relaxed);
            if now != *last {
                (*last, *since) = (now, step);
            } else if step - *since > AP_PATIENCE {
                // A host short of CPU may not run the AP's thread for a tick or a few; a
                // second of steps without a spin is an AP that stopped.
                println!("{P}: snap: step {step}: AP {i} did not move since step {since} ({now} spins)");
                return Err((code::FAIL_TEST, "an AP stopped"));
            }
        }
        if step > 1 {
            let prev = step - 1;
            d.read(prev % sectors, buf).map_err(|e| fail("snap: read failed", e))?;
            if check_pattern(buf, prev, prev % sectors).is_some() {
                println!("{P}: snap: step {step}: sector {} lost step {prev}'s write", prev % sectors);
                return Err((code::VERIFY, "a disk write was lost"));
            }
        }
        fill_pattern(buf, step, step % sectors);
        d.write(step % sectors, buf).map_err(|e| fail("snap: write failed", e))?;
        buf.fill(0);
        d.read(step % sectors, buf).map_err(|e| fail("snap: read failed", e))?;
        if check_pattern(buf, step, step % sectors).is_some() {
            return Err((code::VERIFY, "a disk write did not read back"));
        }
        frame[24..32].copy_from_slice(&step.to_le_bytes());
        n.send(&frame).map_err(|e| fail("snap: send failed", e))?;
        let mut bad = None;
        n.recv_batch(|f| match frame_step(f) {
            Some(s) if s > last_echo && s <= step => {
                last_echo = s;
                echoes += 1;
            }
            Some(s) => bad = Some(s),
            None => {}
        })
        .map_err(|e| fail("snap: receive failed", e))?;
        if let Some(s) = bad {
            println!("{P}: snap: step {step}: echo of step {s} after step {last_echo}'s");
            return Err((code::FAIL_TEST, "a frame came in twice or out of order"));
        }
        if let Some(s) = &mut stream {
            s.step()?;
        }
        if step % INPUT_EVERY == 0 {
            while let Some(b) = uart::try_getb() {
                if b == b'Q' {
                    quit = true;
                    continue;
                }
                let want = b'a' + (input % 26) as u8;
                if b != want {
                    println!("{P}: snap: console input byte {input} is {b:#x}, not {want:#x}");
                    return Err((code::FAIL_TEST, "console input lost or repeated"));
                }
                input += 1;
            }
        }
        let spins = AP_SPINS.get(1).map_or(0, |c| c.load(Ordering::Relaxed));
        println!("{P}: snap: step {step} input {input} echoes {echoes} ap {spins}");
    }
    irq::lapic_timer_stop();
    if let Some(s) = &mut stream {
        // Connected again if a restore had just reset the stream, so that the host has every
        // value counted as sent.
        let t0 = rdtsc();
        while s.phase != Phase::Streaming && rdtsc().wrapping_sub(t0) < ms_to_cycles(2000) {
            s.step()?;
            rt::arch::delay_us(1000);
        }
        s.drain();
        println!("{P}: snap: vsock: {} values sent, {} resets", s.next, s.resets);
    }
    for s in step.saturating_sub(sectors - 1).max(1)..=step {
        d.read(s % sectors, buf).map_err(|e| fail("snap: read failed", e))?;
        if check_pattern(buf, s, s % sectors).is_some() {
            println!("{P}: snap: sector {} does not hold step {s}'s write", s % sectors);
            return Err((code::VERIFY, "a disk write was lost"));
        }
    }
    println!("{P}: snap: done: {step} steps, {input} input bytes, {echoes} echoes");
    Ok(())
}
