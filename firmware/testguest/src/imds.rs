//! `imds`: HTTP/1.1 against an EC2-style instance metadata service at
//! `bexar.imds` (default 169.254.169.254, treated as on-link) port 80, one TCP
//! connection per request (`Connection: close`): a GET without a token, the
//! token PUT (unless `bexar.imds-token` gives one), then a GET with the token
//! for every path of `bexar.imds-paths`.
use crate::net::stack::{self, param_ip4, NetError};
use crate::net::tcp::{self, TcpError};
use crate::net::wire::{Addr, Ip4, Mac};
use crate::net::{ByteWriter, Escaped, Fail, Stack};
use crate::{code, TestResult, P};
use core::fmt::Write;
use rt::bootparams::{cmdline_param, BootParams};
use rt::{dma, println};

const DEFAULT_PATHS: &str = "/latest/meta-data/instance-id,/latest/meta-data/local-ipv4,/latest/meta-data/hostname";
const INSTANCE_ID: &str = "/latest/meta-data/instance-id";
const TOKEN_PATH: &str = "/latest/api/token";
/// Bytes of a response kept (the rest is acknowledged and dropped).
const RESPONSE_MAX: usize = 16 * 1024;
/// Bytes of a body printed.
const BODY_SHOWN: usize = 512;

struct Imds<'a> {
    st: &'a mut Stack,
    addr: [u8; 4],
    buf: &'a mut [u8],
}

/// A parsed response: status and the body's range in the buffer.
struct Response {
    status: u16,
    body: (usize, usize),
    min_ttl: Option<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    crate::net::wire::find(hay, needle)
}

fn parse_num(s: &[u8], radix: u32) -> Option<usize> {
    let s = core::str::from_utf8(s).ok()?.trim();
    usize::from_str_radix(s, radix).ok()
}

/// Decode a chunked body in place; returns its length, None if malformed.
fn dechunk(b: &mut [u8]) -> Option<usize> {
    let (mut rd, mut wr) = (0, 0);
    loop {
        let eol = find(&b[rd..], b"\r\n")?;
        let line = &b[rd..rd + eol];
        let size_part = line.split(|&c| c == b';').next()?;
        let size = parse_num(size_part, 16)?;
        rd += eol + 2;
        if size == 0 {
            return Some(wr);
        }
        let take = size.min(b.len() - rd);
        b.copy_within(rd..rd + take, wr);
        wr += take;
        rd += take;
        if take < size || b.len() < rd + 2 {
            return Some(wr); // cut short by our buffer or the connection
        }
        rd += 2;
    }
}

/// `HTTP/1.x NNN ...`, headers, body (Content-Length / chunked / to the end).
fn parse_response(b: &mut [u8]) -> Option<(u16, (usize, usize))> {
    if !b.starts_with(b"HTTP/") {
        return None;
    }
    let line_end = find(b, b"\r\n")?;
    let status_line = &b[..line_end];
    let sp = status_line.iter().position(|&c| c == b' ')?;
    let code = status_line.get(sp + 1..sp + 4)?;
    if !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let status = parse_num(code, 10)? as u16;
    let head_end = find(b, b"\r\n\r\n")? + 4;
    let (mut length, mut chunked) = (None, false);
    for line in b[line_end + 2..head_end - 4].split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&c| c == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            length = Some(parse_num(value, 10)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = core::str::from_utf8(value).ok()?.trim().eq_ignore_ascii_case("chunked");
        }
    }
    let rest = b.len() - head_end;
    let body_len = if chunked { dechunk(&mut b[head_end..])? } else { length.map_or(rest, |l| l.min(rest)) };
    Some((status, (head_end, head_end + body_len)))
}

impl Imds<'_> {
    /// One request; failures are test failures with the documented codes.
    fn request(
        &mut self,
        what: &str,
        method: &str,
        path: &str,
        header: Option<(&str, &str)>,
    ) -> Result<Response, Fail> {
        let mut req = [0u8; 1024];
        let mut w = ByteWriter::new(&mut req);
        let _ = write!(w, "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bexar-testguest\r\n", Ip4(self.addr));
        let _ = write!(w, "Accept: */*\r\nConnection: close\r\n");
        if let Some((k, v)) = header {
            let _ = write!(w, "{k}: {v}\r\n");
        }
        if method == "PUT" {
            let _ = write!(w, "Content-Length: 0\r\n");
        }
        let _ = write!(w, "\r\n");
        if w.overflow {
            println!("{P}: imds: request for {path} too long");
            return Err((code::BAD_PARAM, "request too long"));
        }
        let n = w.len;
        let x = match tcp::exchange(self.st, Addr::V4(self.addr), 80, &req[..n], self.buf) {
            Ok(x) => x,
            Err(e) => {
                println!("{P}: imds: {what}: {e}");
                return Err(match e {
                    TcpError::NoConnection { .. } | TcpError::NotAcked => {
                        (code::IMDS_NO_CONNECTION, "no TCP connection to the metadata service")
                    }
                    TcpError::Net(NetError::NoNeighbour(_)) => {
                        (code::IMDS_NO_ARP, "no ARP reply from the metadata service")
                    }
                    TcpError::Net(e) => stack::fail("imds", "network", e),
                });
            }
        };
        if x.dropped > 0 || x.out_of_order > 0 || x.end != tcp::End::Fin {
            println!(
                "{P}: imds: {what}: {} bytes kept, {} dropped, {} out of order, end {}",
                x.len,
                x.dropped,
                x.out_of_order,
                x.end.as_str()
            );
        }
        let raw = &mut self.buf[..x.len];
        match parse_response(raw) {
            Some((status, body)) => Ok(Response { status, body, min_ttl: x.min_ttl }),
            None => {
                let shown = &self.buf[..x.len.min(120)];
                println!("{P}: imds: {what}: malformed response ({} bytes): {}", x.len, Escaped(shown));
                Err((code::IMDS_BAD_RESPONSE, "malformed HTTP response"))
            }
        }
    }

    fn body(&self, r: &Response) -> &[u8] {
        &self.buf[r.body.0..r.body.1]
    }
}

/// One metadata GET of `path` the way IMDSv2 clients ask (a token PUT first), for modes that
/// ask now and then on a configured stack (`migrant`). `addr` must be resolvable (on-link).
/// Returns the status, and copies the body's start into `body_out` (its length).
pub(crate) fn get_with_token(
    st: &mut Stack,
    addr: [u8; 4],
    buf: &mut [u8],
    path: &str,
    body_out: &mut [u8],
) -> Result<(u16, usize), Fail> {
    let mut m = Imds { st, addr, buf };
    let r = m.request("PUT token", "PUT", TOKEN_PATH, Some(("X-aws-ec2-metadata-token-ttl-seconds", "60")))?;
    let mut token = [0u8; 256];
    let t = m.body(&r).trim_ascii();
    let n = t.len().min(token.len());
    token[..n].copy_from_slice(&t[..n]);
    let token = core::str::from_utf8(&token[..n]).unwrap_or("");
    let header = (r.status == 200 && !token.is_empty()).then_some(("X-aws-ec2-metadata-token", token));
    let r = m.request("GET", "GET", path, header)?;
    let body = m.body(&r);
    let n = body.len().min(body_out.len());
    body_out[..n].copy_from_slice(&body[..n]);
    Ok((r.status, n))
}

/// Bytes a metadata response may take (the rest is acknowledged and dropped).
pub(crate) const IMDS_RESPONSE_MAX: usize = RESPONSE_MAX;

pub fn test_imds(bp: &BootParams) -> TestResult {
    let addr = param_ip4(bp, "bexar.imds")?.unwrap_or([169, 254, 169, 254]);
    let token_param = cmdline_param(bp.cmdline(), "bexar.imds-token");
    let paths = cmdline_param(bp.cmdline(), "bexar.imds-paths").unwrap_or(DEFAULT_PATHS);
    let buf = dma::alloc_bytes(RESPONSE_MAX, 4096).ok_or((code::VIRTIO_NO_MEMORY, "out of DMA memory"))?;
    let mut st = Stack::open(bp, "imds")?;
    st.print_device();
    st.configure(bp)?;
    st.onlink4 = Some(addr);
    let mac = match st.resolve(Addr::V4(addr)) {
        Ok(m) => m,
        Err(NetError::NoNeighbour(_)) => {
            println!("{P}: imds: no ARP reply from {}", Ip4(addr));
            return Err((code::IMDS_NO_ARP, "no ARP reply from the metadata service"));
        }
        Err(e) => return Err(stack::fail("imds", "cannot reach the metadata service", e)),
    };
    println!("{P}: imds: {} is at {}", Ip4(addr), Mac(mac));
    let mut m = Imds { st: &mut st, addr, buf };

    let r = m.request("no-token GET", "GET", INSTANCE_ID, None)?;
    println!("{P}: imds: no-token GET {INSTANCE_ID} -> {}", r.status);

    let mut token_buf = [0u8; 256];
    let token: Option<&str> = match token_param {
        Some(t) => {
            println!("{P}: imds: token {t} (bexar.imds-token)");
            Some(t)
        }
        None => {
            let r = m.request("PUT token", "PUT", TOKEN_PATH, Some(("X-aws-ec2-metadata-token-ttl-seconds", "60")))?;
            println!("{P}: imds: PUT {TOKEN_PATH} -> {}", r.status);
            match r.min_ttl {
                Some(t) => println!("{P}: imds: token response ttl {t}"),
                None => println!("{P}: imds: token response ttl none"),
            }
            let body = m.body(&r);
            let body = body.trim_ascii();
            if (200..300).contains(&r.status)
                && !body.is_empty()
                && body.len() <= token_buf.len()
                && body.iter().all(|b| b.is_ascii_graphic())
            {
                token_buf[..body.len()].copy_from_slice(body);
                let t = core::str::from_utf8(&token_buf[..body.len()]).unwrap_or("");
                println!("{P}: imds: token {t}");
                Some(t)
            } else {
                println!("{P}: imds: token none ({} body bytes: {})", body.len(), Escaped(&body[..body.len().min(80)]));
                None
            }
        }
    };

    for path in paths.split(',').filter(|p| !p.is_empty()) {
        let header = token.map(|t| ("X-aws-ec2-metadata-token", t));
        let r = m.request("GET", "GET", path, header)?;
        let body = m.body(&r);
        let shown = &body[..body.len().min(BODY_SHOWN)];
        println!("{P}: imds: GET {path} -> {} {}", r.status, Escaped(shown));
    }
    Ok(())
}
