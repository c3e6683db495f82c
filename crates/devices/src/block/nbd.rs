//! A disk served over the network by an NBD server: our own client of the protocol
//! (docs/storage.md says why no library), needing no kernel module on the host.
//!
//! The connection is the fixed newstyle handshake with `NBD_OPT_GO` (the server's error for
//! an export it does not have is reported by name), structured replies when the server offers
//! them (data and holes in chunks, errors with messages) and simple replies otherwise. Requests
//! are pipelined on one connection, tagged by a handle.
//!
//! The connection, the table of outstanding requests, reconnection and the retry policy
//! are [`super::remote`]'s, on one thread per disk (`nbd`); this module speaks the protocol.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::remote::{
    be16, be32, be64, check_policy, default_retry, default_timeout, dial, gather, proto, put,
    split_host_port, unblock, Outcome, Pending, Protocol, RemoteDisk,
};
use super::{BlockError, BlockOp, DiskInfo, SECTOR};

/// Where an NBD disk is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdTarget {
    /// Server host name or address.
    pub host: String,
    /// TCP port (10809 is NBD's).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Export name.
    #[serde(default)]
    pub export: String,
    /// Seconds a broken connection is retried before the guest's requests fail with EIO.
    #[serde(default = "default_retry")]
    pub retry_s: u32,
    /// Seconds a request may go unanswered before the connection is taken for dead.
    #[serde(default = "default_timeout")]
    pub timeout_s: u32,
}

fn default_port() -> u16 {
    10809
}

impl NbdTarget {
    /// Checks it; returns the field and the problem.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.host.is_empty() || self.host.len() > 255 {
            return Err(("host".into(), "must be a host name or address".into()));
        }
        if self.port == 0 {
            return Err(("port".into(), "must be 1-65535".into()));
        }
        if self.export.len() > 4096 {
            return Err(("export".into(), "must be at most 4096 bytes".into()));
        }
        check_policy(self.retry_s, self.timeout_s)
    }

    /// Parses `HOST[:PORT]/EXPORT` (what follows `nbd://`; `[V6]:PORT` for an IPv6 address).
    pub fn from_url(rest: &str) -> Result<Self, String> {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = split_host_port(hostport, default_port())?;
        let t = Self {
            host: host.to_owned(),
            port,
            export: export.to_owned(),
            retry_s: default_retry(),
            timeout_s: default_timeout(),
        };
        t.check().map_err(|(f, m)| format!("nbd {f}: {m}"))?;
        Ok(t)
    }

    /// `nbd://host:port/export`, for logs and serials.
    pub fn url(&self) -> String {
        format!("nbd://{}:{}/{}", self.host, self.port, self.export)
    }
}

// Protocol constants (the NBD protocol document, "fixed newstyle negotiation").
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const INFO_EXPORT: u16 = 0;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
const CHUNK_DONE: u16 = 1;
const CHUNK_NONE: u16 = 0;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_OFFSET_HOLE: u16 = 2;
const CHUNK_ERROR: u16 = 32769;
const CHUNK_ERROR_OFFSET: u16 = 32770;
/// Largest reply payload we accept: bigger than any request we send (a virtio request is at
/// most 254 segments of 64 KiB), so anything larger is a broken server.
const MAX_PAYLOAD: u32 = 32 << 20;

/// What the handshake learnt.
#[derive(Debug, Clone, Copy)]
struct Export {
    size: u64,
    flags: u16,
    structured: bool,
}

fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// One option reply: (type, data).
fn read_opt_reply(s: &mut TcpStream, opt: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    if be64(&h) != REPLY_MAGIC || be32(&h[8..]) != opt {
        return Err(proto("the server's option reply is malformed"));
    }
    let len = be32(&h[16..]);
    if len > 1 << 20 {
        return Err(proto("the server's option reply is too long"));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((be32(&h[12..]), data))
}

/// Connects and negotiates; a refusal of the export is `NotFound` with the server's words.
fn connect(t: &NbdTarget, deadline: Duration) -> io::Result<(TcpStream, Export)> {
    let mut s = dial(&t.host, t.port, deadline)?;
    let mut h = [0u8; 18];
    s.read_exact(&mut h)?;
    if be64(&h) != NBDMAGIC || be64(&h[8..]) != IHAVEOPT {
        return Err(proto("not a newstyle NBD server"));
    }
    let hflags = be16(&h[16..]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("the server does not speak fixed newstyle"));
    }
    let cflags = u32::from(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES));
    s.write_all(&cflags.to_be_bytes())?;
    // Structured replies if the server has them.
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[])?;
    let (rep, _) = read_opt_reply(&mut s, OPT_STRUCTURED_REPLY)?;
    let structured = rep == REP_ACK;
    // GO: the export, no information requests beyond the mandatory export info.
    let mut go = Vec::new();
    go.extend_from_slice(&(t.export.len() as u32).to_be_bytes());
    go.extend_from_slice(t.export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, OPT_GO, &go)?;
    let mut export = None;
    loop {
        let (rep, data) = read_opt_reply(&mut s, OPT_GO)?;
        match rep {
            REP_ACK => break,
            REP_INFO if data.len() >= 12 && be16(&data) == INFO_EXPORT => {
                export = Some((be64(&data[2..]), be16(&data[10..])));
            }
            REP_INFO => {}
            e if e & (1 << 31) != 0 => {
                let msg = String::from_utf8_lossy(&data).into_owned();
                let kind = if e == REP_ERR_UNKNOWN {
                    io::ErrorKind::NotFound
                } else {
                    io::ErrorKind::PermissionDenied
                };
                return Err(io::Error::new(
                    kind,
                    format!(
                        "the server refused export {:?} (error {:#x}){}{msg}",
                        t.export,
                        e,
                        if msg.is_empty() { "" } else { ": " }
                    ),
                ));
            }
            other => return Err(proto(format!("unexpected option reply {other}"))),
        }
    }
    let (size, flags) = export.ok_or_else(|| proto("the server sent no export information"))?;
    unblock(&s)?;
    Ok((
        s,
        Export {
            size,
            flags,
            structured,
        },
    ))
}

/// The NBD side of a [`RemoteDisk`].
struct Nbd {
    target: NbdTarget,
    export: Export,
}

/// Connects to `target` (an unreachable server or an unknown export is an error now) and
/// starts the disk's thread.
pub fn open(target: &NbdTarget, read_only: bool) -> Result<RemoteDisk, BlockError> {
    let err = |reason: String| BlockError::Remote {
        url: target.url(),
        reason,
    };
    let (sock, export) = connect(target, Duration::from_secs(5)).map_err(|e| err(e.to_string()))?;
    if export.size % SECTOR != 0 {
        return Err(err(format!(
            "the export is {} bytes, not whole sectors",
            export.size
        )));
    }
    let ro = read_only || export.flags & TF_READ_ONLY != 0;
    tracing::info!(
        "{}: connected, {} bytes, {}{}",
        target.url(),
        export.size,
        if export.structured {
            "structured replies"
        } else {
            "simple replies"
        },
        if export.flags & TF_READ_ONLY != 0 {
            ", read-only export"
        } else {
            ""
        }
    );
    let info = DiskInfo {
        capacity: export.size,
        read_only: ro,
        discard: !ro && export.flags & TF_SEND_TRIM != 0,
        write_zeroes: !ro && export.flags & TF_SEND_WRITE_ZEROES != 0,
    };
    let engine = if export.structured {
        "nbd-structured"
    } else {
        "nbd"
    };
    let proto = Nbd {
        target: target.clone(),
        export,
    };
    RemoteDisk::start(proto, sock, info, engine, "nbd")
}

/// An NBD session as if `qemu-nbd` had just answered the handshake (structured replies, every
/// command), for the fuzzer.
#[cfg(any(test, feature = "fuzzing"))]
pub(super) fn for_fuzzing() -> impl Protocol {
    Nbd {
        target: NbdTarget::from_url("127.0.0.1/x").expect("a valid target"),
        export: Export {
            size: 1 << 20,
            flags: TF_SEND_FLUSH | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES,
            structured: true,
        },
    }
}

impl Protocol for Nbd {
    fn url(&self) -> String {
        self.target.url()
    }
    fn policy(&self) -> (u32, u32) {
        (self.target.retry_s, self.target.timeout_s)
    }
    fn connect(&mut self, timeout: Duration) -> io::Result<TcpStream> {
        let (sock, export) = connect(&self.target, timeout)?;
        if export.size != self.export.size {
            return Err(io::Error::other(format!(
                "the export is {} bytes now, it was {}: not using it",
                export.size, self.export.size
            )));
        }
        self.export = export;
        Ok(sock)
    }
    fn local(&self, op: BlockOp) -> Option<io::Result<u64>> {
        // A server without flush writes through; a discard it cannot do is a no-op (virtio
        // allows it); write-zeroes is not offered to the guest then.
        let f = self.export.flags;
        match op {
            BlockOp::Flush if f & TF_SEND_FLUSH == 0 => Some(Ok(0)),
            BlockOp::Discard if f & TF_SEND_TRIM == 0 => Some(Ok(0)),
            BlockOp::WriteZeroes { .. } if f & TF_SEND_WRITE_ZEROES == 0 => {
                Some(Err(io::Error::other("the server cannot write zeroes")))
            }
            _ => None,
        }
    }
    fn send(&mut self, tag: u64, p: &mut Pending, o: &mut Vec<u8>) -> bool {
        let (cmd, flags, len) = match p.req.op {
            BlockOp::Read => (CMD_READ, 0, p.req.len),
            BlockOp::Write => (CMD_WRITE, 0, p.req.len),
            BlockOp::Flush => (CMD_FLUSH, 0, 0),
            BlockOp::Discard => (CMD_TRIM, 0, p.req.len),
            BlockOp::WriteZeroes { unmap } => (
                CMD_WRITE_ZEROES,
                if unmap { 0 } else { CMD_FLAG_NO_HOLE },
                p.req.len,
            ),
        };
        o.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        o.extend_from_slice(&flags.to_be_bytes());
        o.extend_from_slice(&cmd.to_be_bytes());
        o.extend_from_slice(&tag.to_be_bytes());
        o.extend_from_slice(&p.req.offset.to_be_bytes());
        o.extend_from_slice(&(len as u32).to_be_bytes());
        if cmd == CMD_WRITE && !gather(p, 0, p.req.len as usize, o) {
            p.error = Some("a buffer left guest memory".into());
        }
        true
    }
    fn goodbye(&mut self, m: &mut Vec<u8>) {
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_DISC.to_be_bytes());
        m.extend_from_slice(&[0u8; 16]);
        m.extend_from_slice(&0u32.to_be_bytes());
    }

    fn parse(
        &mut self,
        inb: &[u8],
        at: &mut usize,
        table: &mut BTreeMap<u64, Pending>,
        _out: &mut Vec<u8>,
        done: &mut Vec<(u64, Outcome)>,
    ) -> Result<(), String> {
        parse_replies(inb, at, table, done)
    }
}

/// The request a reply is for: one in flight and not already answered in this batch.
fn answerable<'a>(
    table: &'a BTreeMap<u64, Pending>,
    done: &[(u64, Outcome)],
    tag: u64,
) -> Result<&'a Pending, String> {
    if done.iter().any(|(t, _)| *t == tag) {
        return Err(format!("a second reply for handle {tag}"));
    }
    table
        .get(&tag)
        .ok_or_else(|| format!("a reply for unknown handle {tag}"))
}

/// Parses whole replies from `b[*at..]`, moving `at` past each.
fn parse_replies(
    b: &[u8],
    at: &mut usize,
    table: &mut BTreeMap<u64, Pending>,
    done: &mut Vec<(u64, Outcome)>,
) -> Result<(), String> {
    loop {
        let b = &b[*at..];
        if b.len() < 4 {
            return Ok(());
        }
        match be32(b) {
            SIMPLE_REPLY_MAGIC => {
                if b.len() < 16 {
                    return Ok(());
                }
                let err = be32(&b[4..]);
                let tag = be64(&b[8..]);
                let p = answerable(table, done, tag)?;
                let data = if err == 0 && p.req.op == BlockOp::Read {
                    p.req.len as usize
                } else {
                    0
                };
                if b.len() < 16 + data {
                    return Ok(());
                }
                *at += 16 + data;
                let result = if err != 0 {
                    Err(io::Error::from_raw_os_error(err as i32))
                } else {
                    put(p, 0, &b[16..16 + data])?;
                    Ok(p.req.len)
                };
                done.push((tag, Outcome::Done(result)));
            }
            STRUCTURED_REPLY_MAGIC => {
                if b.len() < 20 {
                    return Ok(());
                }
                let flags = be16(&b[4..]);
                let kind = be16(&b[6..]);
                let tag = be64(&b[8..]);
                let len = be32(&b[16..]);
                if len > MAX_PAYLOAD {
                    return Err(format!("a reply chunk of {len} bytes"));
                }
                if b.len() < 20 + len as usize {
                    return Ok(());
                }
                *at += 20 + len as usize;
                let body = &b[20..20 + len as usize];
                answerable(table, done, tag)?;
                let p = table
                    .get_mut(&tag)
                    .ok_or_else(|| format!("a reply for unknown handle {tag}"))?;
                let read = p.req.op == BlockOp::Read;
                match kind {
                    CHUNK_NONE => {}
                    // Data and holes answer reads only: for anything else they would write
                    // into the guest's pages behind the dirty log's back.
                    CHUNK_OFFSET_DATA | CHUNK_OFFSET_HOLE if !read => {
                        return Err(format!("data in the reply to a {:?}", p.req.op));
                    }
                    CHUNK_OFFSET_DATA if body.len() >= 8 => {
                        let at = be64(body).wrapping_sub(p.req.offset);
                        put(p, at, &body[8..])?;
                        p.received += body.len() as u64 - 8;
                    }
                    CHUNK_OFFSET_HOLE if body.len() >= 12 => {
                        let at = be64(body).wrapping_sub(p.req.offset);
                        let n = be32(&body[8..]) as usize;
                        if n as u64 > p.req.len {
                            return Err("a hole larger than its request".into());
                        }
                        put(p, at, &vec![0u8; n])?;
                        p.received += n as u64;
                    }
                    CHUNK_ERROR | CHUNK_ERROR_OFFSET if body.len() >= 6 => {
                        let code = be32(body);
                        let mlen = (be16(&body[4..]) as usize).min(body.len() - 6);
                        let msg = String::from_utf8_lossy(&body[6..6 + mlen]);
                        p.error = Some(format!(
                            "the server failed it: {} {msg}",
                            io::Error::from_raw_os_error(code as i32)
                        ));
                    }
                    other => return Err(format!("an unknown reply chunk type {other}")),
                }
                if flags & CHUNK_DONE != 0 {
                    let result = match &p.error {
                        Some(e) => Err(io::Error::other(e.clone())),
                        // Chunks may not overlap, so whole coverage is their sum.
                        None if read && p.received != p.req.len => Err(io::Error::other(format!(
                            "the server sent {} of {} bytes",
                            p.received, p.req.len
                        ))),
                        None if read => Ok(p.req.len),
                        None => Ok(0),
                    };
                    done.push((tag, Outcome::Done(result)));
                }
            }
            m => return Err(format!("a reply with magic {m:#x}")),
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_targets_are_named() {
        let t = NbdTarget::from_url("10.0.0.1:10900/disk0").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.export.as_str()),
            ("10.0.0.1", 10900, "disk0")
        );
        let t = NbdTarget::from_url("storage.example/").unwrap();
        assert_eq!((t.port, t.export.as_str()), (10809, ""));
        let t = NbdTarget::from_url("[fd00::1]:1234/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("fd00::1", 1234));
        assert!(NbdTarget::from_url("h:99999/x").is_err());
        assert!(NbdTarget::from_url("/x").is_err());
        let mut t = NbdTarget::from_url("h/x").unwrap();
        t.timeout_s = 0;
        assert_eq!(t.check().unwrap_err().0, "timeout_s");
    }

    #[test]
    fn replies_answer_only_what_was_asked_once() {
        use crate::block::remote::fuzz::{server_bytes, Kind};
        let simple = |err: u32, tag: u64| {
            let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&err.to_be_bytes());
            r.extend_from_slice(&tag.to_be_bytes());
            r
        };
        let chunk = |flags: u16, kind: u16, tag: u64, body: &[u8]| {
            let mut r = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&flags.to_be_bytes());
            r.extend_from_slice(&kind.to_be_bytes());
            r.extend_from_slice(&tag.to_be_bytes());
            r.extend_from_slice(&(body.len() as u32).to_be_bytes());
            r.extend_from_slice(body);
            r
        };
        // A flush (tag 4) answered twice in one batch (the harness cuts its input in pieces
        // of 7 * first byte + 1: 722 here, so both arrive at once): the second is a broken
        // server.
        let twice = [simple(0, 4), simple(0, 4)].concat();
        assert_eq!(server_bytes(Kind::Nbd, &twice).len(), 1);
        // Data in the reply to a write would land in the guest's source pages.
        let mut data = 4096u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[1; 512]);
        assert!(
            server_bytes(Kind::Nbd, &chunk(CHUNK_DONE, CHUNK_OFFSET_DATA, 3, &data)).is_empty()
        );
        // A read (tag 1, 4 KiB at 0) covered by data and a hole completes; one covered in
        // part fails.
        let mut first = 0u64.to_be_bytes().to_vec();
        first.extend_from_slice(&[7; 1024]);
        let mut hole = 1024u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&3072u32.to_be_bytes());
        let whole = [
            chunk(0, CHUNK_OFFSET_DATA, 1, &first),
            chunk(CHUNK_DONE, CHUNK_OFFSET_HOLE, 1, &hole),
        ]
        .concat();
        assert_eq!(server_bytes(Kind::Nbd, &whole), vec![(1, Ok(4096))]);
        let part = chunk(CHUNK_DONE, CHUNK_OFFSET_DATA, 1, &first);
        let got = server_bytes(Kind::Nbd, &part);
        assert!(
            got[0].1.as_ref().unwrap_err().contains("1024 of 4096"),
            "{got:?}"
        );
    }

    /// A "server" that answers the greeting with `greeting`, then hangs up.
    fn fake_server(greeting: Vec<u8>) -> NbdTarget {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(&greeting);
                let mut sink = [0u8; 256];
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = s.read(&mut sink);
            }
        });
        NbdTarget::from_url(&format!("127.0.0.1:{port}/x")).unwrap()
    }

    #[test]
    fn a_server_that_does_not_speak_the_protocol_is_refused_not_trusted() {
        for greeting in [
            b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            [NBDMAGIC.to_be_bytes(), IHAVEOPT.to_be_bytes()].concat(), // no flags, then EOF
            [
                &NBDMAGIC.to_be_bytes()[..],
                &IHAVEOPT.to_be_bytes(),
                &[0, 0],
            ]
            .concat(), // oldstyle
            vec![],
        ] {
            let t = fake_server(greeting.clone());
            let e = open(&t, false).err().expect("opened");
            assert!(e.to_string().contains(&t.url()), "{e}");
        }
    }
}
