//! A disk on an iSCSI target: our own initiator (RFC 7143), needing no kernel module and no C
//! library on the host (docs/storage.md says why not libiscsi).
//!
//! What it speaks: a normal session of one connection; login with CHAP (MD5, RFC 1994) or
//! none; operational negotiation of burst lengths, immediate data and unsolicited data
//! (no digests, error recovery level 0); then READ(16), WRITE(16) (immediate data,
//! unsolicited Data-Out up to the first burst, Data-Out on the target's R2Ts),
//! SYNCHRONIZE CACHE(16) and UNMAP, with the command window (CmdSN up to MaxCmdSN)
//! respected, NOP-In pings answered, and commands the target bounces (UNIT ATTENTION, BUSY,
//! TASK SET FULL) sent again. At open it reads the LUN's size with READ CAPACITY(16) (its
//! thin-provisioning bit says whether UNMAP works) and its write protection with MODE SENSE.
//!
//! The connection, the outstanding requests, reconnection (a new login with the same ISID,
//! which reinstates the session on the target) and the retry policy are
//! [`super::remote`]'s, on one thread per disk (`iscsi`).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use super::remote::{
    be32, be64, check_policy, default_retry, default_timeout, dial, gather, proto, put,
    split_host_port, unblock, Outcome, Pending, Protocol, RemoteDisk,
};
use super::{BlockError, BlockOp, DiskInfo, SECTOR};

/// CHAP credentials the target checks (one-way: the initiator proves itself).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chap {
    /// The CHAP name.
    pub user: String,
    /// The shared secret.
    pub secret: String,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("secret", &"(hidden)")
            .finish()
    }
}

/// Where an iSCSI disk is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IscsiTarget {
    /// The portal: `HOST[:PORT]` (`[V6]:PORT` for an IPv6 address; the port defaults to 3260).
    pub portal: String,
    /// The target's name (an IQN).
    pub target: String,
    /// The logical unit.
    #[serde(default)]
    pub lun: u16,
    /// CHAP credentials, when the target asks for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<Chap>,
    /// Our initiator name (the target's ACLs match it); a Bexar name by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    /// Seconds a broken connection is retried before the guest's requests fail with EIO.
    #[serde(default = "default_retry")]
    pub retry_s: u32,
    /// Seconds a command may go unanswered before the connection is taken for dead.
    #[serde(default = "default_timeout")]
    pub timeout_s: u32,
}

/// The initiator name used when a target gives none.
pub const DEFAULT_INITIATOR: &str = "iqn.2026-12.dev.bexar:initiator";
const DEFAULT_PORT: u16 = 3260;

/// Checks an iSCSI name (RFC 3722: `iqn.`, `eui.` or `naa.`, at most 223 bytes, no spaces).
fn name_ok(n: &str) -> bool {
    (n.starts_with("iqn.") || n.starts_with("eui.") || n.starts_with("naa."))
        && n.len() <= 223
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
}

impl IscsiTarget {
    /// The portal's TCP port (3260 unless it names one); `None` for a portal that does not
    /// parse (refused by [`Self::check`]).
    pub fn port(&self) -> Option<u16> {
        self.server().map(|(_, p)| p)
    }

    /// The portal's host and TCP port, as [`Self::port`].
    pub fn server(&self) -> Option<(String, u16)> {
        split_host_port(&self.portal, DEFAULT_PORT)
            .ok()
            .map(|(h, p)| (h.to_owned(), p))
    }

    /// Checks it; returns the field and the problem.
    pub fn check(&self) -> Result<(), (String, String)> {
        let (host, _) =
            split_host_port(&self.portal, DEFAULT_PORT).map_err(|m| ("portal".to_string(), m))?;
        if host.is_empty() || host.len() > 255 {
            return Err(("portal".into(), "must be HOST[:PORT]".into()));
        }
        if !name_ok(&self.target) {
            return Err((
                "target".into(),
                "must be an iSCSI name (iqn., eui. or naa.; letters, digits, '-', '.', ':')".into(),
            ));
        }
        if self.lun > 16383 {
            return Err(("lun".into(), "must be 0-16383".into()));
        }
        if let Some(i) = &self.initiator {
            if !name_ok(i) {
                return Err(("initiator".into(), "must be an iSCSI name".into()));
            }
        }
        if let Some(c) = &self.chap {
            if c.user.is_empty() || c.user.len() > 255 || c.user.contains('\0') {
                return Err(("chap.user".into(), "must be 1-255 bytes".into()));
            }
            // RFC 7143 wants at least 96 bits of secret; tgt takes any length.
            if c.secret.len() < 12 || c.secret.len() > 255 || c.secret.contains('\0') {
                return Err(("chap.secret".into(), "must be 12-255 bytes".into()));
            }
        }
        check_policy(self.retry_s, self.timeout_s)
    }

    /// Parses `[USER%SECRET@]HOST[:PORT]/TARGET/LUN` (what follows `iscsi://`, libiscsi's
    /// form).
    pub fn from_url(rest: &str) -> Result<Self, String> {
        let (chap, rest) = match rest.rsplit_once('@') {
            Some((cred, r)) => {
                let (user, secret) = cred
                    .split_once('%')
                    .ok_or("iscsi credentials must be USER%SECRET")?;
                (
                    Some(Chap {
                        user: user.into(),
                        secret: secret.into(),
                    }),
                    r,
                )
            }
            None => (None, rest),
        };
        let mut parts = rest.splitn(3, '/');
        let portal = parts.next().unwrap_or_default();
        let target = parts.next().ok_or("iscsi URL needs /TARGET/LUN")?;
        let lun = match parts.next() {
            Some(l) => l.parse().map_err(|_| format!("{l:?} is not a LUN"))?,
            None => 0,
        };
        let t = Self {
            portal: portal.into(),
            target: target.into(),
            lun,
            chap,
            initiator: None,
            retry_s: default_retry(),
            timeout_s: default_timeout(),
        };
        t.check().map_err(|(f, m)| format!("iscsi {f}: {m}"))?;
        Ok(t)
    }

    /// `iscsi://portal/target/lun` (no credentials), for logs and serials.
    pub fn url(&self) -> String {
        format!("iscsi://{}/{}/{}", self.portal, self.target, self.lun)
    }
}

// Opcodes (RFC 7143 section 11).
const OP_NOP_OUT: u8 = 0x00;
const OP_SCSI_CMD: u8 = 0x01;
const OP_LOGIN: u8 = 0x03;
const OP_DATA_OUT: u8 = 0x05;
const OP_LOGOUT: u8 = 0x06;
const OP_NOP_IN: u8 = 0x20;
const OP_SCSI_RSP: u8 = 0x21;
const OP_LOGIN_RSP: u8 = 0x23;
const OP_DATA_IN: u8 = 0x25;
const OP_LOGOUT_RSP: u8 = 0x26;
const OP_R2T: u8 = 0x31;
const OP_ASYNC: u8 = 0x32;
const OP_REJECT: u8 = 0x3f;
const IMMEDIATE: u8 = 0x40;
const FINAL: u8 = 0x80;
const NO_TAG: u32 = 0xffff_ffff;
const BHS: usize = 48;
/// The most data per PDU we accept from the target (we declare it at login).
const OUR_MAX_RECV: u32 = 256 * 1024;
/// Larger data segments are a broken target.
const MAX_SEGMENT: usize = 4 << 20;
/// Most bytes queued for the target before it must have read some: bounds what R2Ts can make
/// us queue.
const MAX_QUEUED_OUT: usize = 64 << 20;
/// Times a command the target bounced is sent again before it fails.
const MAX_RETRIES: u8 = 20;

// SCSI (SBC-4, SPC-5).
const READ_16: u8 = 0x88;
const WRITE_16: u8 = 0x8a;
const SYNC_CACHE_16: u8 = 0x91;
const UNMAP: u8 = 0x42;
const TEST_UNIT_READY: u8 = 0x00;
const INQUIRY: u8 = 0x12;
const MODE_SENSE_6: u8 = 0x1a;
const SERVICE_ACTION_IN_16: u8 = 0x9e;
const READ_CAPACITY_16: u8 = 0x10;
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const BUSY: u8 = 0x08;
const TASK_SET_FULL: u8 = 0x28;
const UNIT_ATTENTION: u8 = 0x06;

fn be24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}
/// `a <= b` in the serial arithmetic of sequence numbers (RFC 1982).
fn sn_le(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) >= 0
}

/// The 8-byte LUN field (SAM: peripheral addressing below 256, flat above).
fn lun_field(lun: u16) -> [u8; 8] {
    let mut f = [0u8; 8];
    if lun < 256 {
        f[1] = lun as u8;
    } else {
        f[0] = 0x40 | (lun >> 8) as u8;
        f[1] = lun as u8;
    }
    f
}

/// Appends a PDU: the 48-byte header, then `data` padded to a multiple of 4.
fn push_pdu(out: &mut Vec<u8>, bhs: [u8; BHS], data: &[u8]) {
    push_pdu_with(out, bhs, data.len(), |o| {
        o.extend_from_slice(data);
        true
    });
}

/// Appends a PDU whose `len` bytes of data `fill` appends straight to `out` (no copy in
/// between); returns what `fill` returned. The PDU stays well-formed if `fill` fails (its
/// data is then zeros).
fn push_pdu_with(
    out: &mut Vec<u8>,
    mut bhs: [u8; BHS],
    len: usize,
    fill: impl FnOnce(&mut Vec<u8>) -> bool,
) -> bool {
    bhs[5..8].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&bhs);
    let start = out.len();
    let ok = fill(out);
    out.resize(start + len, 0);
    out.resize(start + len + (4 - len % 4) % 4, 0);
    ok
}

/// The length of the whole PDU at the start of `b` and where its data is, once `b` holds it
/// all (`Ok(None)` until then).
fn split_pdu(b: &[u8]) -> Result<Option<(usize, std::ops::Range<usize>)>, String> {
    if b.len() < BHS {
        return Ok(None);
    }
    let ahs = usize::from(b[4]) * 4;
    let dlen = be24(&b[5..8]);
    if dlen > MAX_SEGMENT {
        return Err(format!("a PDU with {dlen} bytes of data"));
    }
    let start = BHS + ahs;
    let total = start + dlen + (4 - dlen % 4) % 4;
    if b.len() < total {
        return Ok(None);
    }
    Ok(Some((total, start..start + dlen)))
}

/// Reads one whole PDU from a blocking socket (login and the checks at open).
fn read_pdu(s: &mut TcpStream) -> io::Result<([u8; BHS], Vec<u8>)> {
    let mut h = [0u8; BHS];
    s.read_exact(&mut h)?;
    let ahs = usize::from(h[4]) * 4;
    let dlen = be24(&h[5..8]);
    if dlen > MAX_SEGMENT {
        return Err(proto(format!("a PDU with {dlen} bytes of data")));
    }
    let mut rest = vec![0u8; ahs + dlen + (4 - dlen % 4) % 4];
    s.read_exact(&mut rest)?;
    Ok((h, rest[ahs..ahs + dlen].to_vec()))
}

/// The text keys of a login or text PDU (`key=value` NUL-terminated).
fn parse_keys(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn key<'a>(keys: &'a [(String, String)], k: &str) -> Option<&'a str> {
    keys.iter()
        .rev()
        .find(|(kk, _)| kk == k)
        .map(|(_, v)| v.as_str())
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    // Byte-indexed below: a target's non-ASCII text must not split a character.
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// The CHAP response (RFC 1994): MD5 over the identifier, the secret and the challenge.
fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// What a login settled.
#[derive(Debug, Clone, Copy)]
struct Params {
    /// Most data per PDU the target takes.
    target_max_recv: usize,
    first_burst: usize,
    immediate_data: bool,
    initial_r2t: bool,
}

/// Sequence numbers of the session.
#[derive(Debug, Clone, Copy, Default)]
struct Seq {
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
}

impl Seq {
    /// Takes ExpCmdSN/MaxCmdSN from a target PDU that carries them (RFC 7143 4.2.2.1: a
    /// MaxCmdSN below ExpCmdSN - 1 is ignored).
    fn window(&mut self, h: &[u8]) {
        let exp = be32(&h[28..]);
        let max = be32(&h[32..]);
        if sn_le(exp.wrapping_sub(1), max) && sn_le(self.max_cmd_sn, max) {
            self.max_cmd_sn = max;
        }
    }
    fn status(&mut self, h: &[u8]) {
        self.exp_stat_sn = be32(&h[24..]).wrapping_add(1);
    }
}

/// A logged-in connection.
struct Session {
    sock: TcpStream,
    params: Params,
    seq: Seq,
}

/// Logs in to `t` with `isid`, up to the full-feature phase.
fn login(t: &IscsiTarget, isid: [u8; 6], timeout: Duration) -> io::Result<Session> {
    let (host, port) = split_host_port(&t.portal, DEFAULT_PORT).map_err(proto)?;
    let mut s = dial(host, port, timeout)?;
    let initiator = t.initiator.as_deref().unwrap_or(DEFAULT_INITIATOR);
    let mut seq = Seq {
        cmd_sn: 1,
        ..Default::default()
    };
    // (current stage, next stage, transit, keys)
    let mut stage = 0u8;
    let mut keys = vec![
        format!("InitiatorName={initiator}"),
        format!("TargetName={}", t.target),
        "SessionType=Normal".to_owned(),
        format!(
            "AuthMethod={}",
            if t.chap.is_some() {
                "CHAP,None"
            } else {
                "None"
            }
        ),
    ];
    let mut transit = t.chap.is_none();
    // The target's last answer had the C bit: its text continues.
    let mut more = false;
    let mut chap_state = 0; // 0: not asked, 1: CHAP_A sent, 2: response sent
    let mut tsih = [0u8; 2];
    let mut got: Vec<(String, String)> = Vec::new();
    for _ in 0..16 {
        let nsg = if stage == 0 { 1 } else { 3 };
        let mut h = [0u8; BHS];
        h[0] = IMMEDIATE | OP_LOGIN;
        // NSG means something only with the T bit; while the target's text continues, we
        // ask for the rest without transiting.
        h[1] = if transit && !more {
            0x80 | (stage << 2) | nsg
        } else {
            stage << 2
        };
        h[8..14].copy_from_slice(&isid);
        h[14..16].copy_from_slice(&tsih);
        h[16..20].copy_from_slice(&1u32.to_be_bytes());
        h[24..28].copy_from_slice(&seq.cmd_sn.to_be_bytes());
        h[28..32].copy_from_slice(&seq.exp_stat_sn.to_be_bytes());
        let mut data = Vec::new();
        for k in keys.drain(..) {
            data.extend_from_slice(k.as_bytes());
            data.push(0);
        }
        let mut out = Vec::new();
        push_pdu(&mut out, h, &data);
        s.write_all(&out)?;
        let (r, rdata) = read_pdu(&mut s)?;
        if r[0] & 0x3f != OP_LOGIN_RSP {
            return Err(proto(format!("a PDU {:#x} during login", r[0])));
        }
        let (class, detail) = (r[36], r[37]);
        if class != 0 {
            let why = match (class, detail) {
                (2, 1) => "authentication failed (CHAP user or secret)".to_owned(),
                (2, 2) => "the target does not allow this initiator".to_owned(),
                (2, 3) => format!("the portal has no target {}", t.target),
                (2, 4) => format!("target {} was removed", t.target),
                (1, _) => "the target moved (redirection is not followed)".to_owned(),
                (3, _) => format!("the target failed the login ({class}/{detail})"),
                _ => format!("login refused ({class}/{detail})"),
            };
            let kind = if class == 2 && detail == 3 {
                io::ErrorKind::NotFound
            } else {
                io::ErrorKind::PermissionDenied
            };
            return Err(io::Error::new(kind, why));
        }
        seq.status(&r);
        seq.window(&r);
        seq.cmd_sn = be32(&r[28..]);
        tsih.copy_from_slice(&r[14..16]);
        got.extend(parse_keys(&rdata));
        more = r[1] & 0x40 != 0;
        if more {
            continue;
        }
        let t_bit = r[1] & 0x80 != 0;
        let rnsg = r[1] & 3;
        if t_bit && rnsg == 3 {
            let params = settle(&got);
            unblock(&s)?;
            return Ok(Session {
                sock: s,
                params,
                seq,
            });
        }
        if t_bit && rnsg == 1 && stage == 0 {
            stage = 1;
            transit = true;
            got.clear();
            keys = vec![
                "HeaderDigest=None".into(),
                "DataDigest=None".into(),
                format!("MaxRecvDataSegmentLength={OUR_MAX_RECV}"),
                "InitialR2T=No".into(),
                "ImmediateData=Yes".into(),
                "MaxBurstLength=16776192".into(),
                "FirstBurstLength=262144".into(),
                "MaxOutstandingR2T=1".into(),
                "MaxConnections=1".into(),
                "DataPDUInOrder=Yes".into(),
                "DataSequenceInOrder=Yes".into(),
                "DefaultTime2Wait=0".into(),
                "DefaultTime2Retain=0".into(),
                "ErrorRecoveryLevel=0".into(),
            ];
            continue;
        }
        if stage == 0 {
            match (key(&got, "AuthMethod"), chap_state, &t.chap) {
                (Some("CHAP"), 0, Some(_)) => {
                    keys = vec!["CHAP_A=5".into()];
                    chap_state = 1;
                }
                (Some("CHAP"), 1, Some(c)) => {
                    if key(&got, "CHAP_A") != Some("5") {
                        return Err(proto("the target wants a CHAP digest other than MD5"));
                    }
                    // Decimal or 0x-hex (RFC 7143 6.1).
                    let id: u8 = key(&got, "CHAP_I")
                        .and_then(|v| match hex_decode(v) {
                            Some(b) if b.len() == 1 => Some(b[0]),
                            _ => v.parse().ok(),
                        })
                        .ok_or_else(|| proto("the target's CHAP_I is missing"))?;
                    let challenge = key(&got, "CHAP_C")
                        .and_then(hex_decode)
                        .ok_or_else(|| proto("the target's CHAP_C is not hex"))?;
                    let resp = chap_response(id, c.secret.as_bytes(), &challenge);
                    let hex: String = resp.iter().map(|b| format!("{b:02x}")).collect();
                    keys = vec![format!("CHAP_N={}", c.user), format!("CHAP_R=0x{hex}")];
                    chap_state = 2;
                    transit = true;
                }
                (Some("CHAP"), _, None) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "the target wants CHAP and the disk has no credentials",
                    ))
                }
                _ => transit = true,
            }
        }
    }
    Err(proto("the login did not finish in 16 exchanges"))
}

/// The session's parameters from the target's answers and our offers.
fn settle(got: &[(String, String)]) -> Params {
    let num = |k: &str, ours: usize, dflt: usize| {
        key(got, k)
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(dflt)
            .min(ours)
    };
    let max_burst = num("MaxBurstLength", 16_776_192, 262_144);
    let first_burst = num("FirstBurstLength", 262_144, 65_536).min(max_burst);
    Params {
        // Declarative: the target's own limit, 8192 when it says nothing.
        target_max_recv: key(got, "MaxRecvDataSegmentLength")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(8192)
            .clamp(512, MAX_SEGMENT),
        first_burst,
        immediate_data: key(got, "ImmediateData") == Some("Yes"),
        // The default is Yes, and Yes wins.
        initial_r2t: key(got, "InitialR2T") != Some("No"),
    }
}

/// The header of a SCSI command.
fn scsi_cmd(lun: u16, itt: u32, cdb: &[u8; 16], read: bool, write: bool, edtl: u32) -> [u8; BHS] {
    let mut h = [0u8; BHS];
    h[0] = OP_SCSI_CMD;
    h[1] = FINAL | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 1;
    h[8..16].copy_from_slice(&lun_field(lun));
    h[16..20].copy_from_slice(&itt.to_be_bytes());
    h[20..24].copy_from_slice(&edtl.to_be_bytes());
    h[32..48].copy_from_slice(cdb);
    h
}

/// Sense key, ASC and ASCQ of a CHECK CONDITION's data segment (a 2-byte length, then
/// fixed or descriptor format sense).
fn sense(data: &[u8]) -> Option<(u8, u8, u8)> {
    let len = usize::from(*data.first()?) << 8 | usize::from(*data.get(1)?);
    let s = data.get(2..2 + len)?;
    match s.first()? & 0x7f {
        0x70 | 0x71 if s.len() >= 14 => Some((s[2] & 0xf, s[12], s[13])),
        0x72 | 0x73 if s.len() >= 4 => Some((s[1] & 0xf, s[2], s[3])),
        _ => None,
    }
}

/// What a finished command means: done, or to be sent again.
fn verdict(status: u8, data: &[u8], p: &Pending) -> Outcome {
    match status {
        // A read is whole only if Data-In covered it (a target that sends less would leave
        // stale guest memory reported as disk data).
        GOOD if p.req.op == BlockOp::Read && p.received != p.req.len => {
            Outcome::Done(Err(io::Error::other(format!(
                "the target sent {} of {} bytes",
                p.received, p.req.len
            ))))
        }
        GOOD => Outcome::Done(Ok(match p.req.op {
            BlockOp::Read | BlockOp::Write => p.req.len,
            _ => 0,
        })),
        BUSY | TASK_SET_FULL if p.retries < MAX_RETRIES => Outcome::Resend,
        CHECK_CONDITION => match sense(data) {
            Some((UNIT_ATTENTION, ..)) if p.retries < MAX_RETRIES => Outcome::Resend,
            Some((key, asc, ascq)) => Outcome::Done(Err(io::Error::other(format!(
                "the target failed it: sense key {key:#x}, ASC/ASCQ {asc:#04x}/{ascq:#04x}"
            )))),
            None => Outcome::Done(Err(io::Error::other(
                "the target failed it (CHECK CONDITION without sense)",
            ))),
        },
        s => Outcome::Done(Err(io::Error::other(format!(
            "the target failed it: SCSI status {s:#04x}"
        )))),
    }
}

/// A command the target ran and failed.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    status: u8,
    /// Sense key, ASC, ASCQ.
    sense: Option<(u8, u8, u8)>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.sense {
            Some((k, a, q)) => write!(f, "sense key {k:#x}, ASC/ASCQ {a:#04x}/{q:#04x}"),
            None => write!(f, "SCSI status {:#04x}", self.status),
        }
    }
}

/// Runs one command on a blocking, logged-in connection (the checks at open): its Data-In,
/// or how the target refused it.
fn exchange(
    sess: &mut Session,
    lun: u16,
    cdb: [u8; 16],
    want: u32,
) -> io::Result<Result<Vec<u8>, Refusal>> {
    sess.sock.set_nonblocking(false)?;
    sess.sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let itt = 0x4000_0000;
    let mut h = scsi_cmd(lun, itt, &cdb, want > 0, false, want);
    h[24..28].copy_from_slice(&sess.seq.cmd_sn.to_be_bytes());
    h[28..32].copy_from_slice(&sess.seq.exp_stat_sn.to_be_bytes());
    sess.seq.cmd_sn = sess.seq.cmd_sn.wrapping_add(1);
    let mut out = Vec::new();
    push_pdu(&mut out, h, &[]);
    sess.sock.write_all(&out)?;
    let mut got = Vec::new();
    let r = loop {
        let (r, data) = read_pdu(&mut sess.sock)?;
        match r[0] & 0x3f {
            OP_DATA_IN if be32(&r[16..]) == itt => {
                got.extend_from_slice(&data);
                if r[1] & 1 != 0 {
                    sess.seq.status(&r);
                    sess.seq.window(&r);
                    break (r[3], Vec::new());
                }
            }
            OP_SCSI_RSP if be32(&r[16..]) == itt => {
                sess.seq.status(&r);
                sess.seq.window(&r);
                if r[2] != 0 {
                    return Err(proto(format!("the target's response {:#x}", r[2])));
                }
                break (r[3], data);
            }
            OP_NOP_IN | OP_ASYNC => sess.seq.window(&r),
            op => return Err(proto(format!("an unexpected PDU {op:#x}"))),
        }
    };
    unblock(&sess.sock)?;
    Ok(match r {
        (GOOD, _) => Ok(got),
        (status, data) => Err(Refusal {
            status,
            sense: sense(&data),
        }),
    })
}

/// A 6-byte CDB (in the 16 bytes a command carries) with an allocation length.
fn cdb6(op: u8, alloc: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[4] = alloc;
    c
}

/// What the LUN is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lun {
    capacity: u64,
    thin: bool,
    write_protected: bool,
}

/// Reads the LUN's size and abilities; the first command after a login usually meets a
/// UNIT ATTENTION, so TEST UNIT READY goes first, a few times.
fn inspect(sess: &mut Session, lun: u16) -> io::Result<Lun> {
    let mut ready = exchange(sess, lun, cdb6(TEST_UNIT_READY, 0), 0)?;
    for _ in 0..3 {
        match ready {
            Err(Refusal {
                sense: Some((UNIT_ATTENTION, ..)),
                ..
            }) => ready = exchange(sess, lun, cdb6(TEST_UNIT_READY, 0), 0)?,
            _ => break,
        }
    }
    match ready {
        Ok(_) => {}
        // LOGICAL UNIT NOT SUPPORTED.
        Err(Refusal {
            sense: Some((_, 0x25, _)),
            ..
        }) => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the target has no LUN {lun}"),
            ))
        }
        Err(r) => return Err(io::Error::other(format!("LUN {lun} is not ready: {r}"))),
    }
    let refused =
        |what: &str, r: Refusal| io::Error::other(format!("LUN {lun}: {what} failed: {r}"));
    // A disk is peripheral device type 0 (tgt's LUN 0 is its controller, type 0x0c).
    let inq = exchange(sess, lun, cdb6(INQUIRY, 36), 36)?.map_err(|r| refused("INQUIRY", r))?;
    match inq.first().map(|b| b & 0x1f) {
        Some(0) => {}
        t => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "LUN {lun} is not a disk (peripheral device type {:#04x})",
                    t.unwrap_or(0x1f)
                ),
            ))
        }
    }
    let mut cdb = [0u8; 16];
    cdb[0] = SERVICE_ACTION_IN_16;
    cdb[1] = READ_CAPACITY_16;
    cdb[13] = 32;
    let c = exchange(sess, lun, cdb, 32)?.map_err(|r| refused("READ CAPACITY", r))?;
    if c.len() < 16 {
        return Err(proto("READ CAPACITY returned too little"));
    }
    let block = be32(&c[8..]);
    if u64::from(block) != SECTOR {
        return Err(io::Error::other(format!(
            "LUN {lun} has {block}-byte blocks; only 512-byte blocks are supported"
        )));
    }
    let capacity = be64(&c)
        .checked_add(1)
        .and_then(|b| b.checked_mul(SECTOR))
        .ok_or_else(|| proto("READ CAPACITY gave an impossible size"))?;
    let mut cdb = cdb6(MODE_SENSE_6, 192);
    cdb[1] = 0x08; // no block descriptors
    cdb[2] = 0x3f; // all pages
    let m = exchange(sess, lun, cdb, 192)?.unwrap_or_default();
    unblock(&sess.sock)?;
    Ok(Lun {
        capacity,
        thin: c[14] & 0x80 != 0,
        write_protected: m.get(2).is_some_and(|b| b & 0x80 != 0),
    })
}

/// The iSCSI side of a [`RemoteDisk`].
struct Iscsi {
    target: IscsiTarget,
    isid: [u8; 6],
    lun: Lun,
    params: Params,
    seq: Seq,
    /// Task tags of the commands in flight on this connection, to the worker's tags.
    itts: HashMap<u32, u64>,
    next_itt: u32,
}

/// Logs in to `target` (an unreachable portal, an unknown target, refused credentials or a
/// missing LUN is an error now) and starts the disk's thread.
pub fn open(target: &IscsiTarget, read_only: bool) -> Result<RemoteDisk, BlockError> {
    let err = |e: io::Error| BlockError::Remote {
        url: target.url(),
        reason: e.to_string(),
    };
    // ISID of the random type (RFC 7143 10.12.5): the same one on every reconnect, so a new
    // login replaces the session the target may still hold.
    // Random: two VMMs logging in to one target must not share it (every jailed VMM is pid 1
    // of its own PID namespace, so the pid tells none apart).
    let mut isid = [0x80, 0, 0, 0, 0, 0];
    // SAFETY: getrandom writes at most 4 bytes into the ISID's last four.
    let n = unsafe { libc::getrandom(isid[2..6].as_mut_ptr().cast(), 4, 0) };
    if n != 4 {
        let r = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        isid[2..6].copy_from_slice(&r.to_be_bytes());
    }
    let mut sess = login(target, isid, Duration::from_secs(5)).map_err(err)?;
    let lun = inspect(&mut sess, target.lun).map_err(err)?;
    let ro = read_only || lun.write_protected;
    tracing::info!(
        "{}: logged in, {} bytes{}{}, first burst {}, target takes {} bytes per PDU",
        target.url(),
        lun.capacity,
        if lun.thin { ", thin (UNMAP)" } else { "" },
        if lun.write_protected {
            ", write-protected"
        } else {
            ""
        },
        sess.params.first_burst,
        sess.params.target_max_recv,
    );
    let info = DiskInfo {
        capacity: lun.capacity,
        read_only: ro,
        discard: !ro && lun.thin,
        write_zeroes: false,
    };
    let proto = Iscsi {
        target: target.clone(),
        isid,
        lun,
        params: sess.params,
        seq: sess.seq,
        itts: HashMap::new(),
        next_itt: 1,
    };
    RemoteDisk::start(proto, sess.sock, info, "iscsi", "iscsi")
}

impl Iscsi {
    fn itt(&mut self, tag: u64) -> u32 {
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1) & 0x3fff_ffff;
        self.itts.insert(itt, tag);
        itt
    }

    /// `len` bytes of a write-direction command's data from `at`: the guest's buffers for a
    /// write, the parameter list for UNMAP.
    fn payload(&self, p: &Pending, at: u64, len: usize, out: &mut Vec<u8>) -> bool {
        match p.req.op {
            BlockOp::Discard => {
                let list = unmap_list(p.req.offset, p.req.len);
                match list.get(at as usize..at as usize + len) {
                    Some(b) => {
                        out.extend_from_slice(b);
                        true
                    }
                    None => false,
                }
            }
            _ => gather(p, at, len, out),
        }
    }

    /// Data-Out PDUs for `len` bytes from `at`, each within the target's PDU size.
    fn data_out(
        &self,
        p: &Pending,
        itt: u32,
        ttt: u32,
        at: u64,
        len: usize,
        o: &mut Vec<u8>,
    ) -> bool {
        let mut sent = 0;
        let mut sn = 0u32;
        let max = self.params.target_max_recv;
        while sent < len {
            let n = (len - sent).min(max);
            let mut h = [0u8; BHS];
            h[0] = OP_DATA_OUT;
            h[1] = if sent + n == len { FINAL } else { 0 };
            h[8..16].copy_from_slice(&lun_field(self.target.lun));
            h[16..20].copy_from_slice(&itt.to_be_bytes());
            h[20..24].copy_from_slice(&ttt.to_be_bytes());
            h[28..32].copy_from_slice(&self.seq.exp_stat_sn.to_be_bytes());
            h[36..40].copy_from_slice(&sn.to_be_bytes());
            h[40..44].copy_from_slice(&((at as usize + sent) as u32).to_be_bytes());
            if !push_pdu_with(o, h, n, |o| self.payload(p, at + sent as u64, n, o)) {
                return false;
            }
            sent += n;
            sn += 1;
        }
        true
    }
}

/// UNMAP's parameter list for one range (SBC-4 5.32.2), split in descriptors of at most
/// 2^32 - 1 blocks.
fn unmap_list(offset: u64, len: u64) -> Vec<u8> {
    let mut descs = Vec::new();
    let (mut lba, mut blocks) = (offset / SECTOR, len / SECTOR);
    while blocks > 0 {
        let n = blocks.min(u64::from(u32::MAX));
        descs.extend_from_slice(&lba.to_be_bytes());
        descs.extend_from_slice(&(n as u32).to_be_bytes());
        descs.extend_from_slice(&[0; 4]);
        lba += n;
        blocks -= n;
    }
    let mut l = Vec::with_capacity(8 + descs.len());
    l.extend_from_slice(&((descs.len() + 6) as u16).to_be_bytes());
    l.extend_from_slice(&(descs.len() as u16).to_be_bytes());
    l.extend_from_slice(&[0; 4]);
    l.extend_from_slice(&descs);
    l
}

/// An iSCSI session as tgt negotiates it (8 KiB PDUs, 64 KiB first burst, immediate data,
/// InitialR2T), on a 1 MiB thin LUN, for the fuzzer.
#[cfg(any(test, feature = "fuzzing"))]
pub(super) fn for_fuzzing() -> impl Protocol {
    Iscsi {
        target: IscsiTarget::from_url("127.0.0.1/iqn.2026-12.dev.bexar:fuzz/1")
            .expect("a valid target"),
        isid: [0x80, 0, 0, 0, 0, 1],
        lun: Lun {
            capacity: 1 << 20,
            thin: true,
            write_protected: false,
        },
        params: Params {
            target_max_recv: 8192,
            first_burst: 65536,
            immediate_data: true,
            initial_r2t: true,
        },
        seq: Seq {
            cmd_sn: 1,
            exp_stat_sn: 1,
            max_cmd_sn: 64,
        },
        itts: HashMap::new(),
        next_itt: 1,
    }
}

impl Protocol for Iscsi {
    fn url(&self) -> String {
        self.target.url()
    }
    fn policy(&self) -> (u32, u32) {
        (self.target.retry_s, self.target.timeout_s)
    }
    fn connect(&mut self, timeout: Duration) -> io::Result<TcpStream> {
        let mut sess = login(&self.target, self.isid, timeout)?;
        let lun = inspect(&mut sess, self.target.lun)?;
        if lun.capacity != self.lun.capacity {
            return Err(io::Error::other(format!(
                "the LUN is {} bytes now, it was {}: not using it",
                lun.capacity, self.lun.capacity
            )));
        }
        self.params = sess.params;
        self.seq = sess.seq;
        self.itts.clear();
        Ok(sess.sock)
    }
    fn local(&self, op: BlockOp) -> Option<io::Result<u64>> {
        match op {
            // A LUN without thin provisioning cannot deallocate; virtio allows a no-op.
            BlockOp::Discard if !self.lun.thin => Some(Ok(0)),
            BlockOp::WriteZeroes { .. } => Some(Err(io::Error::other(
                "write-zeroes is not offered on iSCSI disks",
            ))),
            _ => None,
        }
    }
    fn send(&mut self, tag: u64, p: &mut Pending, o: &mut Vec<u8>) -> bool {
        if !sn_le(self.seq.cmd_sn, self.seq.max_cmd_sn) {
            return false;
        }
        let lba = p.req.offset / SECTOR;
        let blocks = (p.req.len / SECTOR) as u32;
        let mut cdb = [0u8; 16];
        let (read, write, edtl) = match p.req.op {
            BlockOp::Read | BlockOp::Write => {
                cdb[0] = if p.req.op == BlockOp::Read {
                    READ_16
                } else {
                    WRITE_16
                };
                cdb[2..10].copy_from_slice(&lba.to_be_bytes());
                cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
                let w = p.req.op == BlockOp::Write;
                (!w, w, p.req.len as u32)
            }
            BlockOp::Flush => {
                cdb[0] = SYNC_CACHE_16;
                (false, false, 0)
            }
            BlockOp::Discard => {
                let n = unmap_list(p.req.offset, p.req.len).len() as u16;
                cdb[0] = UNMAP;
                cdb[7..9].copy_from_slice(&n.to_be_bytes());
                // UNMAP is a 10-byte CDB; the rest stays zero.
                (false, true, u32::from(n))
            }
            BlockOp::WriteZeroes { .. } => {
                p.error = Some("write-zeroes is not offered on iSCSI disks".into());
                cdb[0] = TEST_UNIT_READY;
                (false, false, 0)
            }
        };
        let itt = self.itt(tag);
        let mut h = scsi_cmd(self.target.lun, itt, &cdb, read, write, edtl);
        h[24..28].copy_from_slice(&self.seq.cmd_sn.to_be_bytes());
        h[28..32].copy_from_slice(&self.seq.exp_stat_sn.to_be_bytes());
        self.seq.cmd_sn = self.seq.cmd_sn.wrapping_add(1);
        let len = edtl as usize;
        let pr = self.params;
        // Immediate data, then unsolicited Data-Out up to the first burst; R2Ts ask for the
        // rest.
        let imm = if write && pr.immediate_data {
            len.min(pr.first_burst).min(pr.target_max_recv)
        } else {
            0
        };
        let unsolicited = if write && !pr.initial_r2t {
            len.min(pr.first_burst) - imm
        } else {
            0
        };
        if unsolicited > 0 {
            h[1] &= !FINAL;
        }
        if !push_pdu_with(o, h, imm, |o| imm == 0 || self.payload(p, 0, imm, o)) {
            p.error = Some("a buffer left guest memory".into());
        }
        if unsolicited > 0 && !self.data_out(p, itt, NO_TAG, imm as u64, unsolicited, o) {
            p.error = Some("a buffer left guest memory".into());
        }
        true
    }
    fn goodbye(&mut self, o: &mut Vec<u8>) {
        let mut h = [0u8; BHS];
        h[0] = IMMEDIATE | OP_LOGOUT;
        h[1] = FINAL; // close the session
        h[16..20].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        h[24..28].copy_from_slice(&self.seq.cmd_sn.to_be_bytes());
        h[28..32].copy_from_slice(&self.seq.exp_stat_sn.to_be_bytes());
        push_pdu(o, h, &[]);
    }

    fn parse(
        &mut self,
        inb: &[u8],
        at: &mut usize,
        table: &mut BTreeMap<u64, Pending>,
        out: &mut Vec<u8>,
        done: &mut Vec<(u64, Outcome)>,
    ) -> Result<(), String> {
        self.parse_pdus(inb, at, table, out, done)
    }
}

impl Iscsi {
    fn parse_pdus(
        &mut self,
        all: &[u8],
        at: &mut usize,
        table: &mut BTreeMap<u64, Pending>,
        out: &mut Vec<u8>,
        done: &mut Vec<(u64, Outcome)>,
    ) -> Result<(), String> {
        while let Some((total, range)) = split_pdu(&all[*at..])? {
            let b = &all[*at..*at + total];
            *at += total;
            let (h, data) = (&b[..BHS], &b[range]);
            let op = h[0] & 0x3f;
            let itt = be32(&h[16..]);
            // The command this PDU is about, if it is one of ours.
            let task = self.itts.get(&itt).copied();
            match op {
                OP_DATA_IN => {
                    self.seq.window(h);
                    let tag = task.ok_or_else(|| format!("Data-In for unknown task {itt:#x}"))?;
                    let p = table.get_mut(&tag).ok_or("Data-In for a finished task")?;
                    if p.req.op != BlockOp::Read {
                        return Err("Data-In for a command that reads nothing".into());
                    }
                    put(p, u64::from(be32(&h[40..])), data)?;
                    p.received += data.len() as u64;
                    if h[1] & 1 != 0 {
                        // Status with the last data.
                        self.seq.status(h);
                        self.itts.remove(&itt);
                        let outcome = verdict(h[3], &[], p);
                        if matches!(outcome, Outcome::Resend) {
                            p.retries += 1;
                        }
                        done.push((tag, outcome));
                    }
                }
                OP_SCSI_RSP => {
                    self.seq.status(h);
                    self.seq.window(h);
                    let tag =
                        task.ok_or_else(|| format!("a response for unknown task {itt:#x}"))?;
                    self.itts.remove(&itt);
                    let p = table
                        .get_mut(&tag)
                        .ok_or("a response for a finished task")?;
                    let outcome = if h[2] != 0 {
                        Outcome::Done(Err(io::Error::other(format!(
                            "the target could not run it (response {:#x})",
                            h[2]
                        ))))
                    } else if let Some(e) = p.error.take() {
                        Outcome::Done(Err(io::Error::other(e)))
                    } else {
                        verdict(h[3], data, p)
                    };
                    if matches!(outcome, Outcome::Resend) {
                        p.retries += 1;
                    }
                    done.push((tag, outcome));
                }
                OP_R2T => {
                    self.seq.window(h);
                    let tag = task.ok_or_else(|| format!("R2T for unknown task {itt:#x}"))?;
                    let p = table.get(&tag).ok_or("R2T for a finished task")?;
                    if !matches!(p.req.op, BlockOp::Write | BlockOp::Discard) {
                        // Data-Out would send the guest's read buffers.
                        return Err("R2T for a command that writes nothing".into());
                    }
                    let ttt = be32(&h[20..]);
                    let off = u64::from(be32(&h[40..]));
                    let len = be32(&h[44..]) as usize;
                    if len == 0 || ttt == NO_TAG {
                        return Err("an R2T for nothing (RFC 7143 11.8)".into());
                    }
                    if out.len() > MAX_QUEUED_OUT {
                        // A target that asks again and again without reading.
                        return Err("the target asks for more data than it takes".into());
                    }
                    let edtl = match p.req.op {
                        BlockOp::Discard => unmap_list(p.req.offset, p.req.len).len() as u64,
                        _ => p.req.len,
                    };
                    if off.checked_add(len as u64).is_none_or(|e| e > edtl) {
                        return Err("R2T outside its command".into());
                    }
                    if !self.data_out(p, itt, ttt, off, len, out) {
                        return Err("a buffer left guest memory".into());
                    }
                }
                OP_NOP_IN => {
                    self.seq.window(h);
                    if itt == NO_TAG {
                        // StatSN here is the next one, not advanced (RFC 7143 11.19.2).
                    } else {
                        self.seq.status(h);
                    }
                    let ttt = be32(&h[20..]);
                    if ttt != NO_TAG {
                        // The target pings: answer with its tag.
                        let mut r = [0u8; BHS];
                        r[0] = IMMEDIATE | OP_NOP_OUT;
                        r[1] = FINAL;
                        r[8..16].copy_from_slice(&h[8..16]);
                        r[16..20].copy_from_slice(&NO_TAG.to_be_bytes());
                        r[20..24].copy_from_slice(&ttt.to_be_bytes());
                        r[24..28].copy_from_slice(&self.seq.cmd_sn.to_be_bytes());
                        r[28..32].copy_from_slice(&self.seq.exp_stat_sn.to_be_bytes());
                        push_pdu(out, r, &[]);
                    }
                }
                OP_ASYNC => {
                    self.seq.status(h);
                    self.seq.window(h);
                    match h[36] {
                        0 | 4 => {}
                        e => return Err(format!("the target asked us to log out (event {e})")),
                    }
                }
                OP_REJECT => {
                    self.seq.status(h);
                    self.seq.window(h);
                    // The data is the rejected PDU's header: fail that command alone (sending
                    // it again would only be rejected again).
                    let rejected = (data.len() >= BHS)
                        .then(|| be32(&data[16..20]))
                        .and_then(|i| self.itts.remove(&i).map(|t| (i, t)));
                    match rejected {
                        Some((_, tag)) if table.contains_key(&tag) => done.push((
                            tag,
                            Outcome::Done(Err(io::Error::other(format!(
                                "the target rejected the command (reason {:#x})",
                                h[2]
                            )))),
                        )),
                        _ => return Err(format!("the target rejected a PDU (reason {:#x})", h[2])),
                    }
                }
                OP_LOGOUT_RSP => {}
                other => return Err(format!("an unexpected PDU {other:#x}")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_targets_are_named() {
        let t = IscsiTarget::from_url("10.0.0.1:3261/iqn.2026-12.dev.bexar:t1/1").unwrap();
        assert_eq!(
            (t.portal.as_str(), t.target.as_str(), t.lun),
            ("10.0.0.1:3261", "iqn.2026-12.dev.bexar:t1", 1)
        );
        assert_eq!(
            split_host_port(&t.portal, DEFAULT_PORT).unwrap(),
            ("10.0.0.1", 3261)
        );
        assert_eq!(split_host_port("h", DEFAULT_PORT).unwrap(), ("h", 3260));
        assert_eq!(
            split_host_port("[fd00::1]:99", DEFAULT_PORT).unwrap(),
            ("fd00::1", 99)
        );
        let t = IscsiTarget::from_url("alice%secretsecret1@h/iqn.2000-01.x:y/0").unwrap();
        assert_eq!(t.chap.as_ref().unwrap().user, "alice");
        assert!(!format!("{t:?}").contains("secretsecret1"));
        assert!(!t.url().contains("secretsecret1"));
        for (bad, field) in [
            ("h/notaniqn/0", "target"),
            ("h:0/iqn.2000-01.x:y/0", "portal"),
            ("h/iqn.2000-01.x:y/99999", "LUN"),
            ("a%short@h/iqn.2000-01.x:y/0", "chap.secret"),
        ] {
            let e = IscsiTarget::from_url(bad).unwrap_err();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn chap_response_is_rfc_1994_md5() {
        // md5(0x01 || "secret" || 0x0203) computed independently (`printf '\x01secret\x02\x03' | md5sum`).
        let r = chap_response(1, b"secret", &[2, 3]);
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let mut h = Md5::new();
        h.update(b"\x01secret\x02\x03");
        let want: [u8; 16] = h.finalize().into();
        assert_eq!(r, want, "{hex}");
        assert_eq!(hex_decode("0x0a0B"), Some(vec![10, 11]));
        assert_eq!(hex_decode("0a0b"), None);
        assert_eq!(hex_decode("0xabc"), None);
        // A target's text is not ASCII-checked before it gets here.
        assert_eq!(hex_decode("0xa\u{fffd}bc"), None);
    }

    #[test]
    fn pdus_split_only_when_whole_and_sizes_are_bounded() {
        let mut b = Vec::new();
        let mut h = [0u8; BHS];
        h[0] = OP_NOP_IN;
        push_pdu(&mut b, h, b"hello");
        assert_eq!(b.len(), BHS + 8);
        assert_eq!(split_pdu(&b[..BHS + 4]).unwrap(), None);
        assert_eq!(split_pdu(&b).unwrap(), Some((BHS + 8, BHS..BHS + 5)));
        let mut big = [0u8; BHS];
        big[5] = 0xff; // 16 MiB - 1: more than we ever declare
        big[6] = 0xff;
        big[7] = 0xff;
        assert!(split_pdu(&big).is_err());
    }

    #[test]
    fn sense_and_unmap_lists() {
        let mut fixed = vec![0, 18, 0x70, 0, UNIT_ATTENTION];
        fixed.extend_from_slice(&[0; 9]);
        fixed.extend_from_slice(&[0x29, 0x00]);
        fixed.extend_from_slice(&[0; 4]);
        assert_eq!(sense(&fixed), Some((UNIT_ATTENTION, 0x29, 0)));
        assert_eq!(sense(&[0, 4, 0x72, 5, 0x24, 0]), Some((5, 0x24, 0)));
        assert_eq!(sense(&[0, 40, 0x70]), None);
        let l = unmap_list(4096, 8192);
        assert_eq!(l.len(), 24);
        assert_eq!(&l[..4], &[0, 22, 0, 16]);
        assert_eq!(be64(&l[8..]), 8);
        assert_eq!(be32(&l[16..]), 16);
        assert_eq!(
            unmap_list(0, (u64::from(u32::MAX) + 1) * SECTOR).len(),
            8 + 32
        );
    }

    #[test]
    fn sequence_windows_follow_serial_arithmetic() {
        assert!(sn_le(u32::MAX, 0));
        assert!(!sn_le(1, 0));
        let mut s = Seq {
            cmd_sn: 10,
            exp_stat_sn: 0,
            max_cmd_sn: 20,
        };
        let mut h = [0u8; BHS];
        h[28..32].copy_from_slice(&30u32.to_be_bytes());
        h[32..36].copy_from_slice(&5u32.to_be_bytes()); // below ExpCmdSN - 1: ignored
        s.window(&h);
        assert_eq!(s.max_cmd_sn, 20);
        h[32..36].copy_from_slice(&40u32.to_be_bytes());
        s.window(&h);
        assert_eq!(s.max_cmd_sn, 40);
    }

    /// A target PDU: opcode, flags, the status byte, ITT, and fields at their offsets.
    fn pdu(
        op: u8,
        flags: u8,
        status: u8,
        itt: u32,
        fields: &[(usize, u32)],
        data: &[u8],
    ) -> Vec<u8> {
        let mut h = [0u8; BHS];
        h[0] = op;
        h[1] = flags;
        h[3] = status;
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[28..32].copy_from_slice(&2u32.to_be_bytes()); // ExpCmdSN
        h[32..36].copy_from_slice(&64u32.to_be_bytes()); // MaxCmdSN
        for &(at, v) in fields {
            h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        }
        let mut out = Vec::new();
        push_pdu(&mut out, h, data);
        out
    }

    #[test]
    fn target_answers_complete_the_right_requests() {
        use crate::block::remote::fuzz::{server_bytes, Kind};
        // Tags 1-6 got task tags 1-6 (the discard is sent too: the LUN is thin).
        let mut bytes = pdu(OP_DATA_IN, 0x81, GOOD, 1, &[(40, 0)], &[0xab; 4096]);
        // The write of 16 KiB sent 8 KiB as immediate data; the target asks for the rest.
        bytes.extend(pdu(
            OP_R2T,
            0x80,
            0,
            3,
            &[(20, 77), (40, 8192), (44, 8192)],
            &[],
        ));
        bytes.extend(pdu(OP_SCSI_RSP, 0x80, GOOD, 3, &[], &[]));
        let mut medium_error = vec![0, 18, 0x70, 0, 0x03];
        medium_error.extend_from_slice(&[0; 7]);
        medium_error.extend_from_slice(&[0, 0, 0x11, 0x00, 0, 0, 0, 0]);
        bytes.extend(pdu(
            OP_SCSI_RSP,
            0x80,
            CHECK_CONDITION,
            4,
            &[],
            &medium_error,
        ));
        // Data-In outside its request ends the conversation.
        bytes.extend(pdu(OP_DATA_IN, 0x81, GOOD, 2, &[(40, 4000)], &[0; 512]));
        bytes.extend(pdu(OP_SCSI_RSP, 0x80, GOOD, 6, &[], &[]));
        let got = server_bytes(Kind::Iscsi, &bytes);
        assert_eq!(got.len(), 3, "{got:?}");
        // An R2T for a read would make us send the guest's read buffers: the conversation
        // ends instead. A read answered with less data than asked fails.
        let r2t_for_read = pdu(OP_R2T, 0x80, 0, 1, &[(20, 5), (40, 0), (44, 4096)], &[]);
        assert!(server_bytes(Kind::Iscsi, &r2t_for_read).is_empty());
        let short = pdu(OP_DATA_IN, 0x81, GOOD, 1, &[(40, 0)], &[0xab; 512]);
        let cut = server_bytes(Kind::Iscsi, &short);
        assert!(
            cut[0].1.as_ref().unwrap_err().contains("512 of 4096"),
            "{cut:?}"
        );
        assert_eq!(got[0], (1, Ok(4096)));
        assert_eq!(got[1], (3, Ok(16384)));
        assert_eq!(got[2].0, 4);
        assert!(
            got[2].1.as_ref().unwrap_err().contains("sense key 0x3"),
            "{got:?}"
        );
    }

    #[test]
    fn a_hostile_target_never_panics_the_initiator() {
        use crate::block::remote::fuzz::{server_bytes, Kind};
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let n = (next() % 600) as usize;
            let mut data: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            // Half the time, start with a plausible header so the parser goes deeper.
            if next() % 2 == 0 && data.len() >= BHS {
                data[0] = [OP_DATA_IN, OP_SCSI_RSP, OP_R2T, OP_NOP_IN][(next() % 4) as usize];
                data[4] = 0;
                data[5] = 0;
                data[16..20].copy_from_slice(&((next() % 7) as u32).to_be_bytes());
            }
            server_bytes(Kind::Iscsi, &data);
            server_bytes(Kind::Nbd, &data);
        }
    }

    #[test]
    fn a_portal_that_does_not_speak_iscsi_is_refused_not_trusted() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming().take(2) {
                let Ok(mut s) = s else { continue };
                let mut sink = [0u8; 512];
                let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
                let _ = s.read(&mut sink);
                let _ = s.write_all(&[0x55; 100]);
            }
        });
        let t = IscsiTarget::from_url(&format!("127.0.0.1:{port}/iqn.2000-01.x:y/0")).unwrap();
        let e = open(&t, false).err().expect("opened");
        assert!(e.to_string().contains(&t.url()), "{e}");
        // Nobody listening at all.
        let t = IscsiTarget::from_url("127.0.0.1:1/iqn.2000-01.x:y/0").unwrap();
        assert!(open(&t, false).is_err());
    }
}
