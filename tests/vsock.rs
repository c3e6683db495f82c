//! virtio-vsock on real KVM with the test guest: a guest connection to a host service on a Unix
//! socket, and a host connection into the guest through `CONNECT <port>`, both echoing data
//! byte for byte under the device's credit flow control.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Stdio;
use std::time::Duration;

use common::*;

const BYTES: usize = 256 * 1024;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn vsock_streams_in_both_directions() {
    let uds = tmp("v.sock");
    // The host service the guest connects to (port 5000): echoes everything back.
    let service = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = service.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 8192];
        let mut total = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    s.write_all(&buf[..n]).unwrap();
                    total += n;
                }
            }
        }
        total
    });

    let guest = testguest();
    let mut child = bexar()
        // The guest connects out to a socket at a path of the test's: a jailed run reaches
        // only sockets beneath its own (empty, shared) root. The agent's jailed VMMs keep
        // vsock.sock in their jail root, where those connections work (tests/agent.rs).
        .args(["run", "--no-jail"])
        .arg("--kernel")
        .arg(&guest)
        .args([
            "--cmdline",
            &format!(
                "bexar.test=vsock bexar.vsock-port=5000 bexar.vsock-listen=6000 bexar.vsock-bytes={BYTES}"
            ),
            "--vsock",
            &format!("cid=3,uds={}", uds.display()),
            "--timeout",
            "60",
            "--no-stdin",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Wait for the guest's outbound half before connecting in.
    loop {
        let Some(Ok(line)) = lines.next() else {
            panic!("guest stopped early:\n{}", seen.join("\n"));
        };
        seen.push(line.clone());
        assert!(!line.contains("FAIL"), "{}", seen.join("\n"));
        if line.contains("guest->host") {
            break;
        }
    }
    assert_eq!(
        echo.join().unwrap(),
        BYTES,
        "the host service echoed a different amount"
    );

    // Into the guest: CONNECT, OK, then an echo of a pattern larger than every buffer.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"CONNECT 6000\n").unwrap();
    let mut ok = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).unwrap();
        ok.push(b[0]);
    }
    let ok = String::from_utf8(ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    let data = pattern(BYTES, 7);
    // Write everything and half-close, then read to the end: the guest must see the host's
    // SHUTDOWN as "no more data" (not "stop talking"), echo it all, and close its side.
    let writer = {
        let mut w = s.try_clone().unwrap();
        let d = data.clone();
        std::thread::spawn(move || {
            w.write_all(&d).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), BYTES, "echoed {} of {BYTES} bytes", back.len());
    assert!(back == data, "echoed bytes differ");

    for line in lines.map_while(Result::ok) {
        seen.push(line);
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", seen.join("\n"));
    assert!(
        seen.iter().any(|l| l.contains("PASS vsock")),
        "{}",
        seen.join("\n")
    );
    std::fs::remove_file(&uds).ok();
    std::fs::remove_file(format!("{}_5000", uds.display())).ok();
}
