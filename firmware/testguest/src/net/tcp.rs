//! A minimal TCP client for one request / response exchange per connection
//! (HTTP with `Connection: close`): SYN with MSS 1460 (retransmitted after
//! 1 s, 3 tries), the request in one segment (same), every in-order data
//! segment acknowledged (out-of-order ones dropped with a duplicate ACK so the
//! sender retransmits), up to the caller's buffer collected (the rest
//! acknowledged and counted), finished by the peer's FIN (acknowledged, own
//! FIN sent) or RST, or 5 s of silence.
use super::stack::{NetError, Stack, DEFAULT_TTL};
use super::wire::{self, Addr, TcpHdr};
use rt::arch::{ms_to_cycles, rdtsc};

const MSS: u16 = 1460;
const WINDOW: u16 = 65535;
const RETRANSMIT_MS: u64 = 1000;
const TRIES: u32 = 3;
const SILENCE_MS: u64 = 5000;

/// How the exchange ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The peer closed (FIN), we acknowledged and closed too.
    Fin,
    /// The peer reset the connection after it was established.
    Reset,
    /// Nothing from the peer for 5 s.
    Silence,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Fin => "fin",
            End::Reset => "reset",
            End::Silence => "silence",
        }
    }
}

/// The result of [`exchange`].
#[derive(Debug)]
pub struct Exchange {
    /// Bytes stored in the caller's buffer.
    pub len: usize,
    /// Bytes received beyond the buffer (acknowledged, dropped).
    pub dropped: usize,
    pub end: End,
    /// Smallest TTL / hop limit of the packets that carried data.
    pub min_ttl: Option<u8>,
    /// Data segments received out of order (dropped).
    pub out_of_order: u32,
}

#[derive(Clone, Copy, Debug)]
pub enum TcpError {
    Net(NetError),
    /// No SYN-ACK to 3 SYNs (`refused`: a RST came back).
    NoConnection {
        refused: bool,
    },
    /// The request was not acknowledged after 3 tries and nothing came back.
    NotAcked,
}

impl From<NetError> for TcpError {
    fn from(e: NetError) -> TcpError {
        TcpError::Net(e)
    }
}

impl core::fmt::Display for TcpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TcpError::Net(e) => e.fmt(f),
            TcpError::NoConnection { refused: true } => f.write_str("connection refused (RST)"),
            TcpError::NoConnection { refused: false } => f.write_str("no SYN-ACK after 3 SYNs"),
            TcpError::NotAcked => f.write_str("request not acknowledged after 3 tries"),
        }
    }
}

enum Ev {
    Established,
    Reset,
    Fin,
    Closed,
}

struct Conn<'a> {
    dst: Addr,
    dport: u16,
    lport: u16,
    iss: u32,
    snd_nxt: u32,
    snd_una: u32,
    rcv_nxt: u32,
    established: bool,
    fin_sent: bool,
    last_rx: u64,
    out: &'a mut [u8],
    len: usize,
    dropped: usize,
    min_ttl: Option<u8>,
    out_of_order: u32,
}

/// a > b in sequence space.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

static NEXT_PORT: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

fn local_port() -> u16 {
    use core::sync::atomic::Ordering;
    let mut n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    if n == 0 {
        n = (rdtsc() >> 8) as u32 % 8192;
        NEXT_PORT.store(n + 1, Ordering::Relaxed);
    }
    49152 + (n % 16384) as u16
}

impl Conn<'_> {
    fn send(&mut self, st: &mut Stack, flags: u8, seq: u32, payload: &[u8]) -> Result<(), NetError> {
        let mut seg = [0u8; wire::MAX_FRAME];
        let h = TcpHdr {
            sport: self.lport,
            dport: self.dport,
            seq,
            ack: if flags & wire::TCP_ACK != 0 { self.rcv_nxt } else { 0 },
            flags,
            window: WINDOW,
            mss: (flags & wire::TCP_SYN != 0).then_some(MSS),
        };
        let n = wire::tcp_seg(&mut seg, &h, payload);
        st.send_ip(self.dst, wire::PROTO_TCP, DEFAULT_TTL, &seg[..n])
    }

    fn ack(&mut self, st: &mut Stack) -> Result<(), NetError> {
        self.send(st, wire::TCP_ACK, self.snd_nxt, &[])
    }

    /// One received frame: None unless it ends a wait. Send errors end the
    /// wait too (they are reported by the next send).
    fn handle(&mut self, st: &mut Stack, f: &[u8]) -> Option<Ev> {
        let e = wire::parse_eth(f)?;
        let p = wire::parse_ip(&e)?;
        if p.src != self.dst || p.dst != st.src_for(self.dst) {
            return None;
        }
        let t = wire::parse_tcp(&p)?;
        if t.sport != self.dport || t.dport != self.lport {
            return None;
        }
        if !p.csum_ok() {
            st.stats.bad_csum += 1;
            return None;
        }
        self.last_rx = rdtsc();
        if t.flags & wire::TCP_RST != 0 {
            let ok = if self.established {
                t.seq.wrapping_sub(self.rcv_nxt) < WINDOW as u32
            } else {
                t.flags & wire::TCP_ACK != 0 && t.ack == self.iss.wrapping_add(1)
            };
            return ok.then_some(Ev::Reset);
        }
        if !self.established {
            let synack = wire::TCP_SYN | wire::TCP_ACK;
            if t.flags & synack == synack && t.ack == self.iss.wrapping_add(1) {
                self.rcv_nxt = t.seq.wrapping_add(1);
                self.snd_una = t.ack;
                self.established = true;
                let _ = self.ack(st);
                return Some(Ev::Established);
            }
            return None;
        }
        if t.flags & wire::TCP_ACK != 0 && after(t.ack, self.snd_una) && !after(t.ack, self.snd_nxt) {
            self.snd_una = t.ack;
        }
        if t.flags & wire::TCP_SYN != 0 {
            let _ = self.ack(st); // a retransmitted SYN-ACK: our ACK was lost
            return None;
        }
        let fin = t.flags & wire::TCP_FIN != 0;
        if t.payload.is_empty() && !fin {
            return (self.fin_sent && self.snd_una == self.snd_nxt).then_some(Ev::Closed);
        }
        let off = self.rcv_nxt.wrapping_sub(t.seq) as i32;
        if off < 0 {
            self.out_of_order += 1;
            let _ = self.ack(st);
            return None;
        }
        let off = off as usize;
        // Entirely old: data we have (and a FIN we consumed: it sits at seq + len).
        if off > t.payload.len() || (off == t.payload.len() && !fin) {
            let _ = self.ack(st);
            return None;
        }
        let data = &t.payload[off..];
        if !data.is_empty() {
            let room = self.out.len() - self.len;
            let k = data.len().min(room);
            self.out[self.len..self.len + k].copy_from_slice(&data[..k]);
            self.len += k;
            self.dropped += data.len() - k;
            self.rcv_nxt = self.rcv_nxt.wrapping_add(data.len() as u32);
            self.min_ttl = Some(self.min_ttl.map_or(p.ttl, |m| m.min(p.ttl)));
        }
        if fin {
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
        }
        let _ = self.ack(st);
        fin.then_some(Ev::Fin)
    }
}

/// Connect to `dst`:`port`, send `req`, collect the answer into `out` until
/// the peer closes. See the module comment.
pub fn exchange(st: &mut Stack, dst: Addr, port: u16, req: &[u8], out: &mut [u8]) -> Result<Exchange, TcpError> {
    assert!(req.len() <= MSS as usize);
    let iss = (rdtsc() as u32).wrapping_mul(2654435761);
    let mut c = Conn {
        dst,
        dport: port,
        lport: local_port(),
        iss,
        snd_nxt: iss.wrapping_add(1),
        snd_una: iss,
        rcv_nxt: 0,
        established: false,
        fin_sent: false,
        last_rx: rdtsc(),
        out,
        len: 0,
        dropped: 0,
        min_ttl: None,
        out_of_order: 0,
    };
    let mut refused = false;
    for _ in 0..TRIES {
        c.send(st, wire::TCP_SYN, iss, &[])?;
        match st.wait_for(RETRANSMIT_MS, |st, f| c.handle(st, f))? {
            Some(Ev::Established) => break,
            Some(Ev::Reset) => {
                refused = true;
                break;
            }
            _ => {}
        }
    }
    if !c.established {
        return Err(TcpError::NoConnection { refused });
    }
    let data_seq = iss.wrapping_add(1);
    c.snd_nxt = data_seq.wrapping_add(req.len() as u32);
    c.send(st, wire::TCP_ACK | wire::TCP_PSH, data_seq, req)?;
    let mut tries = 1;
    let mut sent_at = rdtsc();
    let end = loop {
        match st.wait_for(50, |st, f| c.handle(st, f))? {
            Some(Ev::Fin) => {
                c.fin_sent = true;
                let seq = c.snd_nxt;
                c.snd_nxt = seq.wrapping_add(1);
                c.send(st, wire::TCP_FIN | wire::TCP_ACK, seq, &[])?;
                // The last ACK (not required: the peer's retransmitted FIN is acknowledged meanwhile).
                st.wait_for(RETRANSMIT_MS, |st, f| match c.handle(st, f) {
                    Some(Ev::Closed | Ev::Reset) => Some(()),
                    _ => None,
                })?;
                break End::Fin;
            }
            Some(Ev::Reset) => break End::Reset,
            _ => {}
        }
        let now = rdtsc();
        if after(c.snd_nxt, c.snd_una) && now.wrapping_sub(sent_at) > ms_to_cycles(RETRANSMIT_MS) {
            if tries >= TRIES {
                if c.len == 0 && c.dropped == 0 {
                    return Err(TcpError::NotAcked);
                }
            } else {
                c.send(st, wire::TCP_ACK | wire::TCP_PSH, data_seq, req)?;
                tries += 1;
                sent_at = now;
            }
        }
        if now.wrapping_sub(c.last_rx) > ms_to_cycles(SILENCE_MS) {
            break End::Silence;
        }
    };
    Ok(Exchange { len: c.len, dropped: c.dropped, end, min_ttl: c.min_ttl, out_of_order: c.out_of_order })
}
