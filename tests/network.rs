//! Segments end to end: a real `bexar agent` inside a network namespace of its own (the
//! simulated host), an "outside" namespace joined to it by a veth pair (the rest of the
//! network, behind NAT), real TAPs, bridges and nftables rules made by the agent, and test
//! guests that ping, send UDP, spoof frames and ask the metadata service. Nothing here touches
//! the machine's own interfaces; every namespace is deleted afterwards.
//!
//! Needs root (network namespaces, TAPs) and the `nft` binary (scripts/deps installs it).

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bexar_agent::api::client::Client;
use common::{bexar, expect_status, qemu_img_ok, random_file, rt, smbios_dump, testguest, tmp};
use serde_json::{json, Value};

/// A network namespace, deleted (with whatever runs in it) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("bxt-{}-{n}-{tag}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "-n", &self.name];
        a.extend_from_slice(args);
        sh(&a)
    }

    /// Frames the host side of link `dev` received (a TAP: what its VMM wrote into it).
    fn rx_packets(&self, dev: &str) -> u64 {
        let v: Value =
            serde_json::from_str(&self.ip(&["-j", "-s", "link", "show", "dev", dev])).unwrap();
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
    }

    /// Link names in the namespace.
    fn links(&self) -> BTreeSet<String> {
        let v: Value = serde_json::from_str(&self.ip(&["-j", "link"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The agent's nftables rules and set elements, without handles (which change on every replace), sorted
    /// (chains are listed in the order they were made).
    fn rules(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for fam in ["bridge", "inet"] {
            let o = Command::new("ip")
                .args([
                    "netns", "exec", &self.name, "nft", "-j", "list", "table", fam, "bexar",
                ])
                .output()
                .unwrap();
            if !o.status.success() {
                continue;
            }
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            for item in v["nftables"].as_array().unwrap() {
                if let Some(r) = item.get("rule") {
                    out.push(json!([r["family"], r["chain"], r["expr"]]));
                }
                if let Some(m) = item.get("map").or_else(|| item.get("set")) {
                    let mut elems: Vec<String> = m["elem"]
                        .as_array()
                        .map(|a| a.iter().map(Value::to_string).collect())
                        .unwrap_or_default();
                    elems.sort();
                    out.push(json!([m["family"], m["name"], elems]));
                }
            }
        }
        out.sort_by_key(|v| v.to_string());
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                if let Ok(p) = pid.parse::<i32>() {
                    // SAFETY: kill(2) on a process inside this test's own namespace.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

#[track_caller]
fn sh(args: &[&str]) -> String {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `bexar agent` running inside `ns`.
struct NsAgent {
    dir: PathBuf,
    ns: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl NsAgent {
    fn start(ns: &Netns, name: &str) -> Self {
        Self::start_with(ns, name, &[])
    }

    fn start_with(ns: &Netns, name: &str, args: &[&str]) -> Self {
        let dir = tmp(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = Self {
            dir,
            ns: ns.name.clone(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        a.spawn();
        a
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(bexar().get_program())
            .arg("agent")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--stop-timeout", "2", "--network-repair", "1"])
            .args(&self.args)
            .env("BEXAR_LOG", "info");
        self.child = Some(common::spawn_agent(cmd, &self.dir, &self.socket()));
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.socket())
    }
}

impl Drop for NsAgent {
    fn drop(&mut self) {
        self.kill9();
        // VMMs outlive their agent by design (and run in network namespaces of their own): a
        // test that failed before deleting its VMs leaves them, found by their state directory.
        let dir = self.dir.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir) {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
                    // SAFETY: kill(2) on a process id read from /proc; a process that already
                    // ended makes it fail harmlessly.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        common::remove_agent_cgroups(&self.dir);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn segment(id: &str, vlan: u16, mode: &str, n: u8) -> Value {
    json!({
        "id": id, "vlan": vlan, "mode": mode,
        "ipv4": {"subnet": format!("10.{n}.0.0/24")},
        "ipv6": {"prefix": format!("2001:db8:{n}::/64")},
    })
}

fn vm(id: &str, seg: &str, test: &str) -> Value {
    json!({
        "id": id, "vcpus": 1, "memory_mib": 32,
        "boot": {
            "kernel": testguest().display().to_string(),
            "cmdline": format!("console=ttyS0 bexar.test={test}"),
        },
        "nics": [{"segment": seg}],
    })
}

async fn console(c: &Client, id: &str) -> String {
    let r = c.get(&format!("/v1/vms/{id}/console")).await.unwrap();
    String::from_utf8_lossy(&r.body).into_owned()
}

async fn wait_console(c: &Client, id: &str, pattern: &str) -> String {
    wait_console_for(c, id, pattern, Duration::from_secs(30)).await
}

async fn wait_console_for(c: &Client, id: &str, pattern: &str, limit: Duration) -> String {
    let t = Instant::now();
    loop {
        let text = console(c, id).await;
        if text.contains(pattern) {
            return text;
        }
        assert!(
            t.elapsed() < limit,
            "{id}: {pattern:?} not on the console after {limit:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Creates and starts a VM running `test`, waits until its guest ended, and returns its
/// record and console. The guest must PASS.
async fn run_guest(c: &Client, id: &str, seg: &str, test: &str) -> (Value, String) {
    let r = c
        .post("/v1/vms?start=true", &vm(id, seg, test))
        .await
        .unwrap();
    let rec = expect_status(&r, 201);
    let text = wait_console(c, id, "bexar-testguest: PASS").await;
    let _ = c
        .get(&format!("/v1/vms/{id}/wait?state=stopped&timeout=10"))
        .await
        .unwrap();
    (rec, text)
}

fn nic(rec: &Value, f: &str) -> String {
    rec["nics"][0][f].as_str().unwrap_or_default().to_owned()
}

/// Frames arriving on link `dev` of namespace `ns` (an AF_PACKET socket on a thread of its own
/// in that namespace), from now until `stop` is set; the thread returns them.
fn capture(
    ns: &Netns,
    dev: &str,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<Vec<Vec<u8>>>,
) {
    use std::os::fd::AsRawFd;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (path, dev, done) = (
        format!("/var/run/netns/{}", ns.name),
        std::ffi::CString::new(dev).unwrap(),
        stop.clone(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on this thread only, with a namespace file we opened; the socket calls
        // take buffers and structures of the sizes given.
        unsafe {
            assert_eq!(libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET), 0, "setns");
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
            assert!(fd >= 0, "AF_PACKET socket");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
            assert!(sll.sll_ifindex > 0, "no link {dev:?}");
            let r = libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind");
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            tx.send(()).unwrap();
            let mut frames = Vec::new();
            let mut buf = [0u8; 2048];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                } else if n < 0 {
                    let e = std::io::Error::last_os_error().raw_os_error();
                    if e != Some(libc::EAGAIN) && e != Some(libc::EINTR) {
                        // The link went away: nothing more will come.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            libc::close(fd);
            frames
        }
    });
    rx.recv().unwrap();
    (stop, t)
}

/// A UDP echo server on port 7 (one dual-stack socket) inside `ns`, recording who sent what.
fn udp_echo(ns: &Netns) -> Arc<Mutex<Vec<IpAddr>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let addr = "[::]:7";
        let path = format!("/var/run/netns/{}", ns.name);
        let seen = seen.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only, with a namespace file we opened.
            let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns");
            let s = UdpSocket::bind(addr).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                seen.lock().unwrap().push(from.ip().to_canonical());
                let _ = s.send_to(&buf[..n], from);
            }
        });
        rx.recv().unwrap();
    }
    seen
}

/// The scenario of the networking issue on one simulated host: isolation between segments,
/// NAT and IPv6 routing to the outside, anti-spoofing, the metadata service, an agent crash,
/// and clean removal.
#[test]
fn segments_route_filter_and_serve_metadata() {
    let host = Netns::new("host");
    let out = Netns::new("out");
    // The host's uplink to the outside.
    sh(&[
        "ip", "link", "add", "up0", "netns", &host.name, "type", "veth", "peer", "name", "out0",
        "netns", &out.name,
    ]);
    host.ip(&["addr", "add", "192.0.2.1/24", "dev", "up0"]);
    host.ip(&["addr", "add", "2001:db8:ff::1/64", "dev", "up0", "nodad"]);
    host.ip(&["link", "set", "up0", "up"]);
    out.ip(&["addr", "add", "192.0.2.2/24", "dev", "out0"]);
    out.ip(&["addr", "add", "2001:db8:ff::2/64", "dev", "out0", "nodad"]);
    out.ip(&["link", "set", "out0", "up"]);
    // The upstream router's route to segment a's prefix.
    out.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8:10::/64",
        "via",
        "2001:db8:ff::1",
    ]);
    let udp = udp_echo(&out);

    let mut agent = NsAgent::start(&host, "net");
    let c = agent.client();
    rt().block_on(async {
        for (id, vlan, n) in [("seg-a", 10, 10), ("seg-b", 20, 20)] {
            let r = c.post("/v1/segments", &segment(id, vlan, "routed", n)).await.unwrap();
            let s = expect_status(&r, 201);
            assert_eq!(s["ipv4"]["gateway"], format!("10.{n}.0.1"));
        }
        // Retrying an identical create is a no-op.
        let r = c.post("/v1/segments", &segment("seg-a", 10, "routed", 10)).await.unwrap();
        expect_status(&r, 200);

        // Two VMs on one segment reach each other, over IPv4 and IPv6.
        let r = c.post("/v1/vms?start=true", &vm("peer-a", "seg-a", "net-peer")).await.unwrap();
        let peer = expect_status(&r, 201);
        let (peer4, peer6) = (nic(&peer, "ipv4"), nic(&peer, "ipv6"));
        assert_eq!(peer4, "10.10.0.2", "first free address after the gateway");
        wait_console(&c, "peer-a", "net-peer: ready").await;
        let (_, text) = run_guest(
            &c,
            "ping-a",
            "seg-a",
            &format!("net bexar.peer={peer4} bexar.peer6={peer6}"),
        )
        .await;
        assert!(text.contains("3/3 echo replies"), "{text}");
        assert!(text.contains(&format!("echo6 reply from {peer6}")), "{text}");

        // A VM on another segment cannot reach them.
        let (_, text) = run_guest(
            &c,
            "ping-b",
            "seg-b",
            &format!("net bexar.peer={peer4} bexar.peer6={peer6} bexar.expect=unreachable"),
        )
        .await;
        assert!(text.contains("unreachable as expected"), "{text}");

        // The outside: IPv4 through NAT (it sees the host's address), IPv6 routed as is (it
        // sees the VM's own address).
        let (rec, text) = run_guest(
            &c,
            "nat-a",
            "seg-a",
            "net-udp bexar.peer=192.0.2.2 bexar.peer6=2001:db8:ff::2",
        )
        .await;
        assert!(text.contains("net-udp: v4 reply from 192.0.2.2:7"), "{text}");
        assert!(text.contains("net-udp: v6 reply from [2001:db8:ff::2]:7"), "{text}");
        let sources: Vec<String> = udp.lock().unwrap().iter().map(|a| a.to_string()).collect();
        assert!(sources.contains(&"192.0.2.1".to_owned()), "{sources:?}");
        assert!(!sources.iter().any(|s| s.starts_with("10.10.")), "IPv4 not NATed: {sources:?}");
        assert!(sources.contains(&nic(&rec, "ipv6")), "{sources:?}");

        // Anti-spoofing: the peer gets the honest frames only.
        let (_, text) =
            run_guest(&c, "spoof-a", "seg-a", &format!("net-spoof bexar.peer={peer4}")).await;
        assert!(text.contains("net-spoof: sent spoof-ra"), "{text}");
        let seen = wait_console(&c, "peer-a", "marker legit-end").await;
        for legit in ["legit-v4", "legit-v6", "legit-arp", "legit-end"] {
            assert!(seen.contains(&format!("marker {legit} ")), "{legit} lost:\n{seen}");
        }
        for spoof in [
            "spoof-mac",
            "spoof-ip",
            "spoof-arp-reply",
            "spoof-garp",
            "spoof-arp-sha",
            "spoof-ip6",
            "spoof-ra",
            "spoof-na",
            "spoof-dhcp",
            "spoof-vlan",
        ] {
            assert!(!seen.contains(&format!("marker {spoof} ")), "{spoof} got through:\n{seen}");
        }

        // Metadata: set through the API, served to the VM's own interface with a token.
        let r = c
            .put(
                "/v1/vms/md-a/metadata",
                &json!({"hostname": "md-host"}),
            )
            .await
            .unwrap();
        expect_status(&r, 404);
        let r = c.post("/v1/vms", &vm("md-a", "seg-a", "imds")).await.unwrap();
        let md = expect_status(&r, 201);
        let r = c
            .put(
                "/v1/vms/md-a/metadata",
                &json!({"hostname": "md-host", "user_data": "#cloud-config\n", "public_keys": ["ssh-ed25519 AAAAC3 k@x"],
                        "http_tokens": "required"}),
            )
            .await
            .unwrap();
        expect_status(&r, 200);
        let r = c.post("/v1/vms/md-a/start", &Value::Null).await.unwrap();
        expect_status(&r, 200);
        let text = wait_console(&c, "md-a", "bexar-testguest: PASS").await;
        assert!(text.contains("imds: no-token GET /latest/meta-data/instance-id -> 401"), "{text}");
        assert!(text.contains("imds: PUT /latest/api/token -> 200"), "{text}");
        assert!(text.contains("imds: token response ttl 1"), "{text}");
        assert!(text.contains("imds: GET /latest/meta-data/instance-id -> 200 md-a"), "{text}");
        assert!(
            text.contains(&format!("imds: GET /latest/meta-data/local-ipv4 -> 200 {}", nic(&md, "ipv4"))),
            "{text}"
        );
        assert!(text.contains("imds: GET /latest/meta-data/hostname -> 200 md-host"), "{text}");
        let token = text
            .lines()
            .find_map(|l| l.split("imds: token ").nth(1))
            .expect("token printed")
            .trim()
            .to_owned();
        // Another VM presenting md-a's token from its own interface is refused, even under the
        // default `optional` policy, which answers it without a token.
        let (_, text) = run_guest(
            &c,
            "md-b",
            "seg-b",
            &format!("imds bexar.imds-token={token}"),
        )
        .await;
        assert!(text.contains("imds: GET /latest/meta-data/instance-id -> 401"), "{text}");
        assert!(
            text.contains("imds: no-token GET /latest/meta-data/instance-id -> 200"),
            "{text}"
        );
        assert!(!text.contains("md-a"), "md-b saw md-a's data:\n{text}");

        // A bridged segment (the host is not its router): its VMs share an L2 domain and still
        // get metadata.
        let r = c
            .post(
                "/v1/segments",
                &json!({"id": "seg-c", "vlan": 30, "mode": "bridged",
                        "ipv4": {"subnet": "10.30.0.0/24", "gateway": "10.30.0.254"}}),
            )
            .await
            .unwrap();
        expect_status(&r, 201);
        let r = c.post("/v1/vms?start=true", &vm("peer-c", "seg-c", "net-peer bexar.slaac=0")).await.unwrap();
        let peer_c = nic(&expect_status(&r, 201), "ipv4");
        assert_eq!(peer_c, "10.30.0.1", "a bridged segment's gateway is not the host");
        wait_console(&c, "peer-c", "net-peer: ready").await;
        let (_, text) = run_guest(
            &c,
            "ping-c",
            "seg-c",
            &format!("net bexar.slaac=0 bexar.peer={peer_c}"),
        )
        .await;
        assert!(text.contains("3/3 echo replies"), "{text}");
        let (_, text) = run_guest(&c, "md-c", "seg-c", "imds bexar.slaac=0").await;
        assert!(text.contains("imds: GET /latest/meta-data/instance-id -> 200 md-c"), "{text}");
        // ... and reach nothing routed by the host.
        let (_, text) = run_guest(
            &c,
            "ping-c2",
            "seg-c",
            &format!("net bexar.slaac=0 bexar.peer={peer4} bexar.expect=unreachable"),
        )
        .await;
        assert!(text.contains("unreachable as expected"), "{text}");

        // kill -9 of the agent: links and rules stay as they were, and so does connectivity.
        let links = host.links();
        let rules = host.rules();
        assert!(links.iter().filter(|l| l.starts_with("bxt")).count() >= 7, "{links:?}");
        agent.kill9();
        agent.spawn();
        let c = agent.client();
        assert_eq!(host.links(), links, "links changed across an agent restart");
        assert!(host.rules() == rules, "rules changed across an agent restart");
        // Repair, element by element: a NIC's filter entry deleted by hand comes back and one
        // the agent never made goes, on the next pass, with nothing else rewritten.
        let one = expect_status(&c.get("/v1/vms/ping-a").await.unwrap(), 200);
        let nft = |args: &str| {
            sh(&["ip", "netns", "exec", &host.name, "sh", "-c", &format!("nft {args}")]);
        };
        // One transaction, so that one repair pass sees both.
        nft(&format!(
            "'delete element bridge bexar macs {{ \"{}\" . {} }}; \
             add element bridge bexar v4 {{ \"bxt999999999\" . 10.10.0.99 }}'",
            nic(&one, "tap"),
            nic(&one, "mac")
        ));
        assert!(host.rules() != rules);
        let deadline = Instant::now() + Duration::from_secs(15);
        while host.rules() != rules {
            assert!(Instant::now() < deadline, "not repaired: {:?}", host.rules());
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = std::fs::read_to_string(agent.dir.join("agent.log")).unwrap_or_default();
        assert!(
            log.contains("rewrote=[] added=1 removed=1"),
            "the repair rewrote more than the difference:\n{log}"
        );
        // Repair: a TAP and the filter removed behind the agent's back come back when the VM
        // starts.
        let r = c.get("/v1/vms/ping-a").await.unwrap();
        let tap = nic(&expect_status(&r, 200), "tap");
        host.ip(&["link", "del", &tap]);
        sh(&["ip", "netns", "exec", &host.name, "nft", "delete", "table", "bridge", "bexar"]);
        let r = c.post("/v1/vms/ping-a/start", &Value::Null).await.unwrap();
        expect_status(&r, 200);
        let _ = c.get("/v1/vms/ping-a/wait?state=stopped&timeout=30").await.unwrap();
        let text = console(&c, "ping-a").await;
        assert_eq!(text.matches("3/3 echo replies").count(), 2, "{text}");
        let before = udp.lock().unwrap().len();
        let r = c.post("/v1/vms/nat-a/start", &Value::Null).await.unwrap();
        expect_status(&r, 200);
        let _ = c.get("/v1/vms/nat-a/wait?state=stopped&timeout=30").await.unwrap();
        assert!(udp.lock().unwrap().len() > before, "NAT broken after the restart");

        // Deleting VMs removes their TAPs and rules, and frees their addresses.
        let r = c.get("/v1/vms").await.unwrap();
        let ids: Vec<String> = expect_status(&r, 200)["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        for id in &ids {
            let r = c.delete(&format!("/v1/vms/{id}")).await.unwrap();
            expect_status(&r, 204);
        }
        let left: Vec<String> = host.links().into_iter().filter(|l| l.starts_with("bxt")).collect();
        assert!(left.is_empty(), "TAPs left: {left:?}");
        let rules = serde_json::to_string(&host.rules()).unwrap();
        assert!(
            !rules.contains("\"bxt0") && !rules.contains("nic-bxt"),
            "per-NIC elements left: {rules}"
        );
        let r = c.post("/v1/vms", &vm("again", "seg-a", "idle")).await.unwrap();
        assert_eq!(nic(&expect_status(&r, 201), "ipv4"), "10.10.0.2", "address freed");
        let r = c.delete("/v1/vms/again").await.unwrap();
        expect_status(&r, 204);

        // Deleting the segments removes their bridges, addresses and rules.
        for id in ["seg-a", "seg-b", "seg-c"] {
            let r = c.delete(&format!("/v1/segments/{id}")).await.unwrap();
            expect_status(&r, 204);
        }
        let left: Vec<String> = host.links().into_iter().filter(|l| l.starts_with("bx")).collect();
        assert!(left.is_empty(), "links left: {left:?}");
        assert!(host.rules().is_empty(), "rules left: {:?}", host.rules());
        let addrs = host.ip(&["-br", "addr"]);
        assert!(!addrs.contains("10.10.0.1") && !addrs.contains("169.254.169.254"), "{addrs}");
    });
}

/// One segment on two hosts (network namespaces joined by a veth underlay) with `overlay:
/// vxlan`: VMs on either host reach each other at their addresses over IPv4 and IPv6, each host
/// is the gateway of its own guests with the same addresses and MAC (nothing the hosts send
/// crosses the tunnel), and an agent without an underlay refuses such a segment.
#[test]
fn a_segment_spans_two_hosts_over_vxlan() {
    let a = Netns::new("ova");
    let b = Netns::new("ovb");
    sh(&[
        "ip", "link", "add", "ul0", "netns", &a.name, "type", "veth", "peer", "name", "ul0",
        "netns", &b.name,
    ]);
    for (ns, addr) in [(&a, "10.99.0.1/24"), (&b, "10.99.0.2/24")] {
        ns.ip(&["addr", "add", addr, "dev", "ul0"]);
        // VXLAN adds 50 bytes: an underlay that carries the guests' 1500-byte frames whole.
        ns.ip(&["link", "set", "ul0", "mtu", "1600", "up"]);
    }
    let agent_a = NsAgent::start_with(
        &a,
        "ova",
        &[
            "--overlay-local",
            "10.99.0.1",
            "--overlay-peer",
            "10.99.0.2",
        ],
    );
    let agent_b = NsAgent::start_with(
        &b,
        "ovb",
        &[
            "--overlay-local",
            "10.99.0.2",
            "--overlay-peer",
            "10.99.0.1",
        ],
    );
    let lonely_ns = Netns::new("ovc");
    let lonely = NsAgent::start(&lonely_ns, "ovc");
    let (ca, cb) = (agent_a.client(), agent_b.client());
    rt().block_on(async {
        let mut span = segment("span", 30, "routed", 30);
        span["overlay"] = json!("vxlan");
        let r = lonely.client().post("/v1/segments", &span).await.unwrap();
        let v = expect_status(&r, 400);
        assert_eq!(v["error"]["field"], "overlay", "{v}");
        for c in [&ca, &cb] {
            let r = c.post("/v1/segments", &span).await.unwrap();
            let v = expect_status(&r, 201);
            assert_eq!(v["overlay"], "vxlan", "{v}");
            assert_eq!(v["ipv4"]["gateway"], "10.30.0.1", "{v}");
        }
        // The same gateway MAC on both hosts, the bridge's; the tunnel is a port of it.
        let links = |ns: &Netns| -> Value {
            serde_json::from_str(&sh(&["ip", "-n", &ns.name, "-j", "-d", "link", "show"])).unwrap()
        };
        let (la, lb) = (links(&a), links(&b));
        let find = |l: &Value, p: &str| -> Value {
            l.as_array()
                .unwrap()
                .iter()
                .find(|x| x["ifname"].as_str().unwrap().starts_with(p))
                .cloned()
                .unwrap_or_else(|| panic!("no {p} link in {l}"))
        };
        assert_eq!(find(&la, "bxg")["address"], find(&lb, "bxg")["address"]);
        let vx = find(&la, "bxo");
        assert_eq!(vx["linkinfo"]["info_kind"], "vxlan", "{vx}");
        assert_eq!(vx["linkinfo"]["info_data"]["id"], 30, "{vx}");
        assert_eq!(vx["master"], find(&la, "bxg")["ifname"], "{vx}");
        let fdb = sh(&[
            "bridge",
            "-n",
            &a.name,
            "fdb",
            "show",
            "dev",
            vx["ifname"].as_str().unwrap(),
        ]);
        assert!(fdb.contains("00:00:00:00:00:00 dst 10.99.0.2"), "{fdb}");

        // A VM on host A; one on host B pings it. Addresses across hosts are the caller's.
        let mut peer = vm("peer-a", "span", "net-peer");
        peer["nics"][0]["ipv4"] = json!("10.30.0.10");
        let r = ca.post("/v1/vms?start=true", &peer).await.unwrap();
        let peer = expect_status(&r, 201);
        let peer6 = nic(&peer, "ipv6");
        wait_console(&ca, "peer-a", "net-peer: ready").await;
        let mut ping = vm(
            "ping-b",
            "span",
            &format!("net bexar.peer=10.30.0.10 bexar.peer6={peer6}"),
        );
        ping["nics"][0]["ipv4"] = json!("10.30.0.20");
        let r = cb.post("/v1/vms?start=true", &ping).await.unwrap();
        expect_status(&r, 201);
        let text = wait_console(&cb, "ping-b", "bexar-testguest: PASS").await;
        assert!(text.contains("3/3 echo replies"), "{text}");
        assert!(
            text.contains(&format!("echo6 reply from {peer6}")),
            "{text}"
        );
        // Host B's bridge learned where host A's guest is: behind the tunnel.
        let fdb = sh(&[
            "bridge",
            "-n",
            &b.name,
            "fdb",
            "show",
            "br",
            find(&lb, "bxg")["ifname"].as_str().unwrap(),
        ]);
        let peer_mac = peer["nics"][0]["mac"].as_str().unwrap();
        assert!(
            fdb.contains(&format!(
                "{peer_mac} dev {}",
                find(&lb, "bxo")["ifname"].as_str().unwrap()
            )),
            "{fdb}"
        );
        // A host talks to its own guests only: host A (the gateway of its guest) reaches it,
        // host B, with the same gateway address, does not: what it sends stays off the tunnel.
        let ping_from = |ns: &Netns| {
            std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns.name,
                    "ping",
                    "-c",
                    "1",
                    "-W",
                    "1",
                    "10.30.0.10",
                ])
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(ping_from(&a), "host A reaches its own guest");
        // Host B's attempt (its ARP for the guest, from the shared gateway MAC) never leaves
        // through its tunnel: the VXLAN interface sends nothing meanwhile.
        let bxo_b = find(&lb, "bxo")["ifname"].as_str().unwrap().to_owned();
        let tx = || -> u64 {
            let v: Value =
                serde_json::from_str(&b.ip(&["-s", "-j", "link", "show", "dev", &bxo_b])).unwrap();
            v[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
        };
        let before = tx();
        assert!(
            !ping_from(&b),
            "host B reached host A's guest through the tunnel"
        );
        assert_eq!(tx(), before, "host B's own frames went into the tunnel");

        // Deleting the segment on one host takes its tunnel away there only.
        expect_status(&cb.delete("/v1/vms/ping-b").await.unwrap(), 204);
        expect_status(&cb.delete("/v1/segments/span").await.unwrap(), 204);
        let lb = links(&b);
        assert!(
            lb.as_array()
                .unwrap()
                .iter()
                .all(|l| !l["ifname"].as_str().unwrap().starts_with("bxo")),
            "{lb}"
        );
        expect_status(&ca.delete("/v1/vms/peer-a").await.unwrap(), 204);
    });
}

/// Bad segment and NIC input gets a 4xx naming the problem and changes nothing.
#[test]
fn bad_network_input_is_refused_and_changes_nothing() {
    let host = Netns::new("bad");
    let agent = NsAgent::start(&host, "net-bad");
    let c = agent.client();
    rt().block_on(async {
        let r = c.post("/v1/segments", &segment("a", 10, "routed", 30)).await.unwrap();
        expect_status(&r, 201);
        let r = c.post("/v1/vms", &vm("one", "a", "idle")).await.unwrap();
        let one = expect_status(&r, 201);
        let mac = nic(&one, "mac");
        let before = (host.links(), host.rules());

        let cases: Vec<(Value, u16, &str, &str)> = vec![
            (segment("b", 11, "routed", 30), 409, "conflict", "ipv4.subnet"),
            (json!({"id": "b", "vlan": 11, "mode": "routed", "ipv4": {"subnet": "10.30.0.128/25"}}), 409, "conflict", "ipv4.subnet"),
            (segment("b", 10, "routed", 31), 409, "conflict", "vlan"),
            (segment("b", 0, "routed", 31), 400, "invalid_field", "vlan"),
            (segment("b", 4095, "routed", 31), 400, "invalid_field", "vlan"),
            (json!({"id": "b", "vlan": 11, "mode": "nat"}), 400, "invalid_field", "mode"),
            (json!({"id": "b", "vlan": 11, "mode": "routed", "ipv4": {"subnet": "10.31.0.0/33"}}), 400, "invalid_field", "ipv4.subnet"),
            (json!({"id": "b", "vlan": 11, "mode": "routed", "ipv4": {"subnet": "10.31.0.0/24", "gateway": "10.32.0.1"}}), 400, "invalid_field", "ipv4.gateway"),
            (json!({"id": "b", "vlan": 11, "mode": "routed", "ipv6": {"prefix": "2001:db8:31::/48"}}), 400, "invalid_field", "ipv6.prefix"),
            (json!({"id": "b", "vlan": 11, "mode": "routed", "ipv4": {"subnet": "10.31.0.0/24"}, "x": 1}), 400, "invalid_field", "x"),
            (json!({"id": "a", "vlan": 12, "mode": "bridged"}), 409, "already_exists", ""),
        ];
        for (body, status, code, field) in &cases {
            let r = c.post("/v1/segments", body).await.unwrap();
            let e = expect_status(&r, *status);
            assert_eq!(e["error"]["code"], *code, "{body}: {e}");
            if !field.is_empty() {
                assert_eq!(e["error"]["field"], *field, "{body}: {e}");
            }
        }
        let with_nic = |n: Value| {
            let mut v = vm("two", "a", "idle");
            v["nics"] = json!([n]);
            v
        };
        let vm_cases: Vec<(Value, u16, &str, &str)> = vec![
            (with_nic(json!({"segment": "nope"})), 400, "invalid_field", "nics[0].segment"),
            (with_nic(json!({"segment": "a", "mac": mac})), 409, "conflict", "nics[0].mac"),
            (with_nic(json!({"segment": "a", "ipv4": "10.30.0.2"})), 409, "conflict", "nics[0].ipv4"),
            (with_nic(json!({"segment": "a", "ipv4": "10.99.0.2"})), 400, "invalid_field", "nics[0].ipv4"),
            (with_nic(json!({"segment": "a", "ipv4": "10.30.0.1"})), 400, "invalid_field", "nics[0].ipv4"),
            (with_nic(json!({"segment": "a", "ipv6": "2001:db8:99::5"})), 400, "invalid_field", "nics[0].ipv6"),
            (with_nic(json!({"segment": "a", "tap": "t0"})), 400, "invalid_field", "nics[0].segment"),
            (with_nic(json!({"segment": "a", "ipv4": "x"})), 400, "invalid_field", "nics[0].ipv4"),
        ];
        for (body, status, code, field) in &vm_cases {
            let r = c.post("/v1/vms", body).await.unwrap();
            let e = expect_status(&r, *status);
            assert_eq!(e["error"]["code"], *code, "{}: {e}", body["nics"]);
            assert_eq!(e["error"]["field"], *field, "{}: {e}", body["nics"]);
        }
        let r = c.put("/v1/vms/one/metadata", &json!({"hostname": "-bad"})).await.unwrap();
        assert_eq!(expect_status(&r, 400)["error"]["field"], "hostname");
        let r = c.delete("/v1/segments/a").await.unwrap();
        assert_eq!(expect_status(&r, 409)["error"]["code"], "in_use");

        // Nothing changed: one segment, one VM, the same links and rules.
        let r = c.get("/v1/segments").await.unwrap();
        assert_eq!(expect_status(&r, 200)["items"].as_array().unwrap().len(), 1);
        let r = c.get("/v1/vms").await.unwrap();
        assert_eq!(expect_status(&r, 200)["items"].as_array().unwrap().len(), 1);
        assert_eq!((host.links(), host.rules()), before);
        let r = c.get("/v1/vms/one").await.unwrap();
        assert_eq!(expect_status(&r, 200)["nics"], one["nics"]);
    });
}

/// The DHCP server hands a segment NIC its allocated address, mask, gateway and host name,
/// and nothing to a MAC that is not a NIC on the segment. The client is busybox udhcpc in a
/// namespace of its own, plugged into the segment's bridge through a veth pair.
#[test]
fn dhcp_gives_a_nic_its_address() {
    let host = Netns::new("dhcp");
    let guest = Netns::new("dhcpc");
    let agent = NsAgent::start(&host, "net-dhcp");
    let c = agent.client();
    // The segment through the CLI client.
    let cli = |args: &[&str]| {
        let o = bexar()
            .arg("segment")
            .args(args)
            .arg("--socket")
            .arg(agent.socket())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "bexar segment {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    cli(&[
        "create",
        "d",
        "--vlan",
        "40",
        "--ipv4",
        "10.40.0.0/24",
        "--ipv6",
        "2001:db8:40::/64",
    ]);
    let table = cli(&["ls"]);
    assert!(
        table.contains("10.40.0.0/24") && table.contains("10.40.0.1"),
        "{table}"
    );
    let (mac, addr, bridge) = rt().block_on(async {
        let r = c.post("/v1/vms", &vm("dh", "d", "idle")).await.unwrap();
        let rec = expect_status(&r, 201);
        let r = c
            .put("/v1/vms/dh/metadata", &json!({"hostname": "dh-host"}))
            .await
            .unwrap();
        expect_status(&r, 200);
        // The segment's bridge is the master of the VM's TAP.
        let tap = nic(&rec, "tap");
        let v: Value =
            serde_json::from_str(&host.ip(&["-j", "link", "show", "dev", &tap])).unwrap();
        let bridge = v[0]["master"].as_str().unwrap().to_owned();
        (nic(&rec, "mac"), nic(&rec, "ipv4"), bridge)
    });
    sh(&[
        "ip",
        "link",
        "add",
        "vh",
        "netns",
        &host.name,
        "type",
        "veth",
        "peer",
        "name",
        "vg",
        "netns",
        &guest.name,
    ]);
    host.ip(&["link", "set", "vh", "master", &bridge, "up"]);
    let udhcpc = |mac: &str| {
        guest.ip(&["link", "set", "vg", "down"]);
        guest.ip(&["link", "set", "vg", "address", mac, "up"]);
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &guest.name,
                "busybox",
                "udhcpc",
                "-i",
                "vg",
                "-f",
                "-q",
                "-n",
            ])
            .args(["-t", "4", "-T", "1", "-s", "/bin/true"])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let out = udhcpc(&mac);
    assert!(
        out.contains(&format!("lease of {addr} obtained from 10.40.0.1")),
        "{out}"
    );
    let out = udhcpc("02:99:99:99:99:99");
    assert!(!out.contains("obtained"), "a stranger got a lease: {out}");
}

/// Opens the TAP `name` in namespace `ns` (creating it there if it does not exist: then it
/// lives as long as the returned file).
fn tap_in(ns: &Netns, name: &str) -> bexar_devices::tap::Tap {
    let (path, name) = (format!("/var/run/netns/{}", ns.name), name.to_owned());
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this short-lived thread only, with a namespace file we opened.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns");
        bexar_devices::tap::Tap::open(&name).unwrap()
    })
    .join()
    .unwrap()
}

/// Passes frames both ways between two TAPs (both with virtio-net headers, no offloads, so
/// the headers pass through unchanged) until dropped: it stands where a VMM would, so a
/// Linux network stack behind the second TAP is the VM's guest.
struct Relay {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn new(a: bexar_devices::tap::Tap, b: bexar_devices::tap::Tap) -> Self {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 70_000];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let mut fds = [a.file(), b.file()].map(|f| libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                // SAFETY: poll(2) on two descriptors this thread owns, with their array's length.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
                for (i, (from, to)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
                    if fds[i].revents & libc::POLLIN == 0 {
                        continue;
                    }
                    while let Ok(n) = from.file().read(&mut buf) {
                        let _ = to.file().write(&buf[..n]);
                    }
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The cloud-inits the metadata tests run: Debian 12's package (22.4) and the newest Debian
/// has (unstable follows upstream releases), unpacked by tests/cloudinit/upstream.sh. Each is
/// (its PYTHONPATH, or none for the installed package).
fn cloud_inits() -> Vec<Option<String>> {
    let o = Command::new(common::root().join("tests/cloudinit/upstream.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run tests/cloudinit/upstream.sh");
    assert!(o.status.success(), "fetching upstream cloud-init failed");
    let path = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    vec![None, Some(path)]
}

/// Runs cloud-init's own datasource code (tests/cloudinit/datasource.py) in the guest
/// namespace, with DMI read by dmidecode from `dump`, and the cloud-init found at
/// `pythonpath` (the installed one if none); returns what it obtained.
fn cloud_init(
    guest: &Netns,
    mode: &str,
    dump: &std::path::Path,
    pythonpath: Option<&str>,
) -> Value {
    let work = tmp(&format!("cloud-init-{mode}"));
    let bin = work.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let wrapper = bin.join("dmidecode");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec /usr/sbin/dmidecode --from-dump {} \"$@\"\n",
            dump.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new("ip")
        .args(["netns", "exec", &guest.name, "/usr/bin/python3"])
        .arg(common::root().join("tests/cloudinit/datasource.py"))
        .arg(mode)
        .arg(&work)
        .env(
            "PATH",
            format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display()),
        )
        .env("PYTHONPATH", pythonpath.unwrap_or_default())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "cloud-init {mode} failed:\n{out}\n{err}"
    );
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("cloud-init {mode}: {e}\n{out}\n{err}"));
    assert_eq!(
        v["ok"], true,
        "cloud-init {mode} found no data:\n{v}\n{err}"
    );
    std::fs::remove_dir_all(work).ok();
    v
}

/// What one cloud-init (`pythonpath`, see [`cloud_inits`]) obtains from behind VM `id`'s NIC:
/// NoCloud seeded from the SMBIOS serial number and EC2 with IMDSv1 under the default token
/// policy, then EC2 as on AWS (IMDSv2) under the `required` policy, which refuses a request
/// without a token. Returns the cloud-init version that ran.
async fn check_cloud_init(
    c: &Client,
    guest: &Netns,
    (id, md, rec): (&str, &Value, &Value),
    dump: &std::path::Path,
    pythonpath: Option<&str>,
) -> String {
    let uuid = rec["uuid"].as_str().unwrap();
    let host = md["hostname"].as_str().unwrap();
    let key = md["public_keys"][0].as_str().unwrap();
    let user_data = md["user_data"].as_str().unwrap_or_default();
    let r = c.put(&format!("/v1/vms/{id}/metadata"), md).await.unwrap();
    expect_status(&r, 200);
    let nocloud = cloud_init(guest, "nocloud", dump, pythonpath);
    let version = nocloud["version"].as_str().unwrap().to_owned();
    assert_eq!(
        nocloud["dmi_serial"],
        bexar_agent::imds::NOCLOUD_SEED,
        "{nocloud}"
    );
    assert_eq!(nocloud["dmi_uuid"], uuid, "{nocloud}");
    assert_eq!(nocloud["dmi_manufacturer"], "Bexar", "{nocloud}");
    assert_eq!(nocloud["dmi_asset_tag"], id, "{nocloud}");
    let ec2 = cloud_init(guest, "ec2", dump, pythonpath);
    for (mode, v) in [("nocloud", nocloud), ("ec2", ec2)] {
        assert_eq!(v["version"], version.as_str(), "{mode}: {v}");
        assert_eq!(v["instance_id"], id, "{mode}: {v}");
        assert_eq!(v["hostname"], host, "{mode}: {v}");
        assert_eq!(v["keys"], json!([key]), "{mode}: {v}");
        assert_eq!(v["user_data"], user_data, "{mode}: {v}");
    }

    let mut required = md.clone();
    required["http_tokens"] = json!("required");
    let r = c
        .put(&format!("/v1/vms/{id}/metadata"), &required)
        .await
        .unwrap();
    expect_status(&r, 200);
    let o = Command::new("ip")
        .args(["netns", "exec", &guest.name, "/usr/bin/python3", "-c"])
        .arg(concat!(
            "import urllib.request as u, urllib.error as e\n",
            "try: u.urlopen('http://169.254.169.254/2009-04-04/meta-data/instance-id', timeout=5); print(200)\n",
            "except e.HTTPError as x: print(x.code)"
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "401", "{o:?}");
    let v = cloud_init(guest, "ec2-aws", dump, pythonpath);
    assert_eq!(v["token_used"], true, "{v}");
    assert_eq!(v["instance_id"], id, "{v}");
    assert_eq!(v["hostname"], host, "{v}");
    version
}

/// cloud-init's own datasources against the real metadata service, from behind a VM's TAP:
/// Debian 12's package and the current upstream release (see [`check_cloud_init`]). The
/// SMBIOS tables are the VMM's, read out of the guest's memory by the test guest and decoded by
/// dmidecode. One VM has user data and an ordinary hostname; the other has none, an id that
/// reads as a YAML number (`017`) and a hostname that reads as a YAML boolean (`on`).
#[test]
fn cloud_init_datasources_configure_the_guest() {
    let versions = cloud_inits();
    let host = Netns::new("ci");
    let guest = Netns::new("ciguest");
    // The guest's resolver: nothing answers, at once (`ip netns exec` mounts this file over
    // /etc/resolv.conf). cloud-init resolves two names that must not exist before it trusts
    // the metadata URL, which would otherwise wait for this machine's resolver to time out.
    let etc = format!("/etc/netns/{}", guest.name);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(format!("{etc}/resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
    sh(&[
        "ip",
        "netns",
        "exec",
        &guest.name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.default.disable_ipv6=1",
    ]);
    let agent = NsAgent::start(&host, "cloud-init");
    let c = agent.client();
    let mut seen = BTreeSet::new();
    rt().block_on(async {
        let r = c.post("/v1/segments", &segment("seg-ci", 40, "routed", 40)).await.unwrap();
        let gateway = expect_status(&r, 201)["ipv4"]["gateway"].as_str().unwrap().to_owned();
        let cases = [
            ("ci-a", json!({"hostname": "ci-host", "user_data": "#cloud-config\nbexar: ci-a\n",
                            "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA ci@a"]})),
            ("017", json!({"hostname": "on", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB ci@b"]})),
        ];
        for (id, md) in cases {
            // First the guest reads its SMBIOS tables out of its own memory...
            let r = c.put(&format!("/v1/vms/{id}/metadata"), &md).await.unwrap();
            expect_status(&r, 404);
            let r = c.post("/v1/vms", &vm(id, "seg-ci", "smbios")).await.unwrap();
            let rec = expect_status(&r, 201);
            let r = c.post(&format!("/v1/vms/{id}/start"), &Value::Null).await.unwrap();
            expect_status(&r, 200);
            let text = wait_console(&c, id, "bexar-testguest: PASS").await;
            let r = c
                .get(&format!("/v1/vms/{id}/wait?state=stopped&timeout=10"))
                .await
                .unwrap();
            expect_status(&r, 200);
            let dump = tmp(&format!("smbios-{id}.bin"));
            std::fs::write(&dump, smbios_dump(&text)).unwrap();

            // ...then a Linux network stack takes the VM's place behind its TAP.
            let (tap, mac, ipv4) = (nic(&rec, "tap"), nic(&rec, "mac"), nic(&rec, "ipv4"));
            let _relay = Relay::new(tap_in(&host, &tap), tap_in(&guest, "eth0"));
            guest.ip(&["link", "set", "eth0", "address", &mac]);
            guest.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"]);
            guest.ip(&["link", "set", "eth0", "up"]);
            guest.ip(&["route", "replace", "default", "via", &gateway]);
            for pythonpath in &versions {
                let v = check_cloud_init(&c, &guest, (id, &md, &rec), &dump, pythonpath.as_deref())
                    .await;
                seen.insert(v);
            }
            std::fs::remove_file(dump).ok();
        }
    });
    // Debian 12's 22.4 and the current upstream release both ran.
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().any(|v| v.starts_with("22.4")), "{seen:?}");
}

/// A test CA and a certificate for each host (its underlay address as its name), made with the
/// openssl command-line tool as an operator would; `rogue` is signed by another CA.
fn migration_certs(dir: &std::path::Path, hosts: &[(&str, &str)]) {
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    std::fs::create_dir_all(dir).unwrap();
    for ca in ["ca", "rogue-ca"] {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=bexar test {ca}"),
        ]);
    }
    for (name, ip) in hosts {
        let ca = if *name == "rogue" { "rogue-ca" } else { "ca" };
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )
        .unwrap();
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

/// Two hosts for live migration: network namespaces `{tag}a` and `{tag}b` joined by a veth
/// underlay 10.{net}.0.1-2, each with an agent overlaying segments on it and taking migrations
/// on port 7400 with certificates from one test CA (and a `rogue` one from another CA).
fn two_hosts(tag: &str, net: u8) -> (Netns, Netns, PathBuf, NsAgent, NsAgent) {
    let a = Netns::new(&format!("{tag}a"));
    let b = Netns::new(&format!("{tag}b"));
    sh(&[
        "ip", "link", "add", "ul0", "netns", &a.name, "type", "veth", "peer", "name", "ul0",
        "netns", &b.name,
    ]);
    let (ip_a, ip_b) = (format!("10.{net}.0.1"), format!("10.{net}.0.2"));
    for (ns, addr) in [(&a, &ip_a), (&b, &ip_b)] {
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "ul0"]);
        ns.ip(&["link", "set", "ul0", "mtu", "1600", "up"]);
    }
    let certs = tmp(&format!("{tag}-certs"));
    let _ = std::fs::remove_dir_all(&certs);
    migration_certs(
        &certs,
        &[("host-a", &ip_a), ("host-b", &ip_b), ("rogue", &ip_b)],
    );
    let agent = |ns: &Netns, me: &str, local: &str, peer: &str| {
        let c = |f: &str| certs.join(f).display().to_string();
        let args: Vec<String> = vec![
            "--overlay-local".into(),
            local.into(),
            "--overlay-peer".into(),
            peer.into(),
            "--migration-listen".into(),
            format!("{local}:7400"),
            "--migration-cert".into(),
            c(&format!("{me}.pem")),
            "--migration-key".into(),
            c(&format!("{me}.key")),
            "--migration-ca".into(),
            c("ca.pem"),
        ];
        NsAgent::start_with(
            ns,
            &format!("{tag}{me}"),
            &args.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        )
    };
    let agent_a = agent(&a, "host-a", &ip_a, &ip_b);
    let agent_b = agent(&b, "host-b", &ip_b, &ip_a);
    (a, b, certs, agent_a, agent_b)
}

/// Live migration between two hosts' agents (network namespaces joined by a veth underlay,
/// a VXLAN segment across them): a VM answering pings, with a raw disk, a qcow2 overlay on a
/// registered image and metadata, moves A -> B -> A. A peer VM that stays on host A reaches
/// it at the same address wherever it is; its disks arrive as they were (the overlay without
/// its base image, which each host has); the host it left keeps nothing of it. Refusals (a VM
/// that is not running, a destination that is not a known host, an id the destination has, a
/// destination without the overlay's base image, a writable qcow2 path disk) change nothing;
/// a migration held to a low bandwidth reports its progress and is cancelled midway.
#[test]
fn a_running_vm_moves_between_hosts_with_its_disk_addresses_and_metadata() {
    let (a, b, certs, agent_a, agent_b) = two_hosts("mg", 98);
    // A TLS server on host B with a certificate from another CA.
    let mut rogue = Command::new("ip")
        .args([
            "netns", "exec", &b.name, "openssl", "s_server", "-quiet", "-accept", "7401",
        ])
        .arg("-cert")
        .arg(certs.join("rogue.pem"))
        .arg("-key")
        .arg(certs.join("rogue.key"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (ca, cb) = (agent_a.client(), agent_b.client());
    let disk = agent_a.dir.join("mover.raw");
    let content: Vec<u8> = (0..8u64 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&disk, &content).unwrap();
    rt().block_on(async {
        // Each host says where it takes migrations (what a scheduler hands the sender).
        for (c, ip) in [(&ca, "10.98.0.1"), (&cb, "10.98.0.2")] {
            let host = expect_status(&c.get("/v1/host").await.unwrap(), 200);
            assert_eq!(host["info"]["migration_listen"], format!("{ip}:7400"));
        }
        let mut span = segment("span", 40, "routed", 40);
        span["overlay"] = json!("vxlan");
        for c in [&ca, &cb] {
            expect_status(&c.post("/v1/segments", &span).await.unwrap(), 201);
        }
        // The base image of its second disk, registered on host A only for now.
        let base = agent_a.dir.join("base.raw");
        random_file(&base, 4 << 20, 5);
        let image = json!({"id": "base", "path": base});
        expect_status(&ca.post("/v1/images", &image).await.unwrap(), 201);
        let mut mover = vm("mover", "span", "net-peer");
        mover["nics"][0]["ipv4"] = json!("10.40.0.10");
        mover["disks"] = json!([{"path": disk}, {"image": "base"}]);
        let r = ca.post("/v1/vms", &mover).await.unwrap();
        let made = expect_status(&r, 201);
        // The overlay holds data and zero clusters of its own (written before the VM starts);
        // `expected` is the disk the guest must see on every host.
        let overlay = agent_a.dir.join("state/vms/mover/disk1.qcow2");
        let io = Command::new("qemu-io")
            .arg("-c")
            .arg("write -P 0x44 512K 1M")
            .arg("-c")
            .arg("write -z 2M 1M")
            .arg(&overlay)
            .output()
            .unwrap();
        assert!(io.status.success(), "qemu-io: {io:?}");
        let expected = agent_a.dir.join("expected.raw");
        let mut want = std::fs::read(&base).unwrap();
        want[512 << 10..(512 + 1024) << 10].fill(0x44);
        want[2 << 20..3 << 20].fill(0);
        std::fs::write(&expected, &want).unwrap();
        let mac = nic(&made, "mac");
        let md = json!({"user_data": "#cloud-config\nhostname: mover\n", "hostname": "mover"});
        expect_status(&ca.put("/v1/vms/mover/metadata", &md).await.unwrap(), 200);

        // Refused, and nothing changes: a VM that is not running; a destination that is not
        // a known host; one without migration certificates on this side is covered by the
        // API's own field check.
        let go = |to: &str| json!({"destination": to, "downtime_ms": 50});
        let r = ca
            .post("/v1/vms/mover/migrate", &go("10.98.0.2:7400"))
            .await
            .unwrap();
        let v = expect_status(&r, 409);
        assert_eq!(v["error"]["code"], "illegal_transition", "{v}");
        expect_status(
            &ca.post("/v1/vms/mover/start", &json!({})).await.unwrap(),
            200,
        );
        wait_console(&ca, "mover", "net-peer: ready").await;
        let r = ca
            .post("/v1/vms/mover/migrate", &go("10.98.0.2:7401"))
            .await
            .unwrap();
        let v = expect_status(&r, 400);
        assert_eq!(v["error"]["field"], "destination", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not a known host"),
            "{v}"
        );
        let r = ca
            .post("/v1/vms/mover/migrate", &json!({"destination": "nowhere"}))
            .await
            .unwrap();
        let v = expect_status(&r, 400);
        assert_eq!(v["error"]["field"], "destination", "{v}");
        // The destination has a VM of that id.
        let r = cb
            .post("/v1/vms", &vm("mover", "span", "idle"))
            .await
            .unwrap();
        expect_status(&r, 201);
        let r = ca
            .post("/v1/vms/mover/migrate", &go("10.98.0.2:7400"))
            .await
            .unwrap();
        let v = expect_status(&r, 409);
        assert_eq!(v["error"]["field"], "destination", "{v}");
        expect_status(&cb.delete("/v1/vms/mover").await.unwrap(), 204);
        // The destination has no image with the content of the overlay's base.
        let r = ca
            .post("/v1/vms/mover/migrate", &go("10.98.0.2:7400"))
            .await
            .unwrap();
        let v = expect_status(&r, 409);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no image with the content of \"base\""),
            "{v}"
        );
        expect_status(&cb.get("/v1/vms/mover").await.unwrap(), 404);
        // A known host (openssl s_client with host A's certificate) offers the VM with a CPU
        // showing a feature this host lacks: refused, naming the template, nothing made.
        let rec = expect_status(&ca.get("/v1/vms/mover").await.unwrap(), 200);
        let prepare = json!({
            "record": rec,
            "disk_sizes": [8 << 20, null],
            "image_sha256": [null, null],
            "cpu": {"vendor": "GenuineIntel", "regs": [[7, 0, "ebx", 0xffff_ffffu32]]},
        });
        let answer = prepare_by_hand(&a, &certs, "10.98.0.2:7400", &prepare);
        assert!(
            answer.contains("spec.cpu_template") && answer.contains("lacks"),
            "{answer}"
        );
        expect_status(&cb.get("/v1/vms/mover").await.unwrap(), 404);
        assert!(!agent_b.dir.join("state/vms/mover").exists());
        // Now it has, under another id: the overlay goes onto that one.
        let image_b = json!({"id": "base-b", "path": base});
        expect_status(&cb.post("/v1/images", &image_b).await.unwrap(), 201);
        // A writable qcow2 path disk does not move: refused, naming the disk.
        let qcow2 = agent_a.dir.join("q.qcow2");
        let o = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow2)
            .arg("16M")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut q = vm("q", "span", "idle");
        q["nics"] = json!([]);
        q["disks"] = json!([{"path": qcow2}]);
        expect_status(&ca.post("/v1/vms?start=true", &q).await.unwrap(), 201);
        let r = ca
            .post("/v1/vms/q/migrate", &go("10.98.0.2:7400"))
            .await
            .unwrap();
        let v = expect_status(&r, 409);
        assert_eq!(v["error"]["field"], "spec.disks[0]", "{v}");
        expect_status(&cb.get("/v1/vms/q").await.unwrap(), 404);
        expect_status(&ca.delete("/v1/vms/q").await.unwrap(), 204);
        let v = expect_status(&ca.get("/v1/vms/mover").await.unwrap(), 200);
        assert_eq!(v["state"], "running", "{v}");

        // Progress, and a cancel before the switch-over: a copy held to 1 MiB/s takes seconds.
        let r = ca
            .post("/v1/vms/mover/migrate/cancel", &json!({}))
            .await
            .unwrap();
        let v = expect_status(&r, 409);
        assert_eq!(v["error"]["code"], "illegal_transition", "{v}");
        let slow = json!({"destination": "10.98.0.2:7400", "max_bandwidth_mib": 1});
        let client = ca.clone();
        let asked = tokio::spawn(async move { client.post("/v1/vms/mover/migrate", &slow).await });
        let t = Instant::now();
        let progress = loop {
            let v = expect_status(&ca.get("/v1/vms/mover").await.unwrap(), 200);
            let p = &v["operation"]["progress"];
            if p["phase"] == "copying" && p["round"] == 1 {
                break p.clone();
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no progress: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Round 1 sends the disks' capacity (12 MiB) and the memory the guest holds.
        assert!(
            progress["left_bytes"].as_u64().unwrap() > 12 << 20,
            "{progress}"
        );
        // Through the command-line client.
        let o = bexar()
            .args(["vm", "migrate-cancel", "mover", "--socket"])
            .arg(agent_a.socket())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = asked.await.unwrap().unwrap();
        let v = expect_status(&r, 409);
        assert_eq!(v["error"]["code"], "migration_cancelled", "{v}");
        let v = expect_status(&ca.get("/v1/vms/mover").await.unwrap(), 200);
        assert_eq!(v["state"], "running", "{v}");
        assert!(v["operation"].is_null(), "{v}");
        let t = Instant::now();
        while cb.get("/v1/vms/mover").await.unwrap().status != 404 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "host B kept its copy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let events = ca.get("/v1/events?vm=mover").await.unwrap();
        let events = String::from_utf8_lossy(&events.body).into_owned();
        assert!(events.contains("round 1 begins"), "{events}");
        assert!(
            events.contains("cancelled before the switch-over"),
            "{events}"
        );

        let tap_a = nic(&made, "tap");
        let hosts = [
            (&ca, &cb, &agent_b, "10.98.0.2:7400"),
            (&cb, &ca, &agent_a, "10.98.0.1:7400"),
        ];
        let bridge_a = a
            .links()
            .into_iter()
            .find(|l| l.starts_with("bxg"))
            .expect("host A's segment bridge");
        for (i, (from, to, to_agent, dest)) in hosts.into_iter().enumerate() {
            // What host A's bridge hears while the VM moves to B.
            let heard = (i == 0).then(|| capture(&a, &bridge_a));
            let r = from.post("/v1/vms/mover/migrate", &go(dest)).await.unwrap();
            let v = expect_status(&r, 200);
            let m = &v["migration"];
            eprintln!("migrated to {dest}: {m}");
            // The sender reported the switch-over before the VM went.
            let events = from.get("/v1/events?vm=mover").await.unwrap();
            let events = String::from_utf8_lossy(&events.body).into_owned();
            assert!(events.contains("switch-over after"), "{events}");
            assert!(m["disk_bytes"].as_u64().unwrap() >= 8 << 20, "{m}");
            // Gone from the host it left: its record and events say so, its TAP is gone.
            expect_status(&from.get("/v1/vms/mover").await.unwrap(), 404);
            let events = from.get("/v1/events?vm=mover").await.unwrap();
            let events = String::from_utf8_lossy(&events.body).into_owned();
            assert!(events.contains("\"migrated\""), "{events}");
            if i == 0 {
                assert!(!a.links().contains(&tap_a), "host A kept the TAP {tap_a}");
                // The mover announced itself from host B (it sent nothing of its own): host
                // A's bridge has its MAC behind the tunnel already.
                let t = Instant::now();
                loop {
                    let fdb = sh(&["bridge", "-n", &a.name, "fdb", "show"]);
                    if fdb
                        .lines()
                        .any(|l| l.starts_with(&format!("{mac} dev bxo")))
                    {
                        break;
                    }
                    assert!(
                        t.elapsed() < Duration::from_secs(2),
                        "host A did not learn where {mac} went:\n{fdb}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let there = expect_status(&to.get("/v1/vms/mover").await.unwrap(), 200);
            assert_eq!(there["state"], "running", "{there}");
            // The host it arrived on records the pause its guest saw.
            let events = to.get("/v1/events?vm=mover").await.unwrap();
            let events = String::from_utf8_lossy(&events.body).into_owned();
            let seen: f64 = events
                .rsplit("arrived from another host")
                .next()
                .and_then(|t| t.split("the guest was paused ").nth(1))
                .and_then(|t| t.split(' ').next())
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("no pause in the arrival event: {events}"));
            assert!(seen > 0.0 && seen < 1000.0, "{seen} ms: {events}");
            // It announced itself when it arrived, and four times more over 800 ms (the idle
            // guest sends nothing of its own).
            let ns = [&a, &b][1 - i];
            let tap = nic(&there, "tap");
            // Each time: its MAC (RARP), and each of its addresses (a gratuitous ARP, an
            // unsolicited neighbour advertisement).
            let v6 = nic(&there, "ipv6");
            let per = 2 + u64::from(!v6.is_empty());
            let t = Instant::now();
            while ns.rx_packets(&tap) < 5 * per {
                assert!(
                    t.elapsed() < Duration::from_secs(3),
                    "{} announcements from {tap}",
                    ns.rx_packets(&tap)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(nic(&there, "mac"), mac, "{there}");
            assert_eq!(nic(&there, "ipv4"), "10.40.0.10", "{there}");
            if let Some((stop, t)) = heard {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let frames = t.join().unwrap();
                let mac_b: Vec<u8> = mac
                    .split(':')
                    .map(|h| u8::from_str_radix(h, 16).unwrap())
                    .collect();
                // A gratuitous ARP over the tunnel: a request from its MAC for its own address.
                let garp = frames.iter().any(|f| {
                    f.len() >= 42
                        && f[12..14] == [0x08, 0x06]
                        && f[20..22] == [0, 1]
                        && f[22..28] == mac_b[..]
                        && f[28..32] == [10, 40, 0, 10]
                        && f[38..42] == [10, 40, 0, 10]
                });
                assert!(garp, "no gratuitous ARP among {} frames", frames.len());
                if !v6.is_empty() {
                    let addr: std::net::Ipv6Addr = v6.parse().unwrap();
                    // An unsolicited neighbour advertisement (ICMPv6 136, override set) of it.
                    let na = frames.iter().any(|f| {
                        f.len() >= 78
                            && f[12..14] == [0x86, 0xdd]
                            && f[20] == 58
                            && f[54] == 136
                            && f[58] & 0x20 != 0
                            && f[62..78] == addr.octets()
                    });
                    assert!(
                        na,
                        "no neighbour advertisement of {v6} among {} frames",
                        frames.len()
                    );
                }
            }
            let got = expect_status(&to.get("/v1/vms/mover/metadata").await.unwrap(), 200);
            assert_eq!(got["user_data"], md["user_data"], "{got}");
            let copy = to_agent.dir.join("state/vms/mover/disk0.raw");
            let bytes = std::fs::read(&copy).unwrap();
            assert!(
                bytes == content,
                "{} differs from the disk the VM had",
                copy.display()
            );
            // Its overlay reads as it did (qemu-img's view), and only the overlay went: the
            // raw disk's 8 MiB and less than the base image's 4 MiB.
            let overlay = to_agent.dir.join("state/vms/mover/disk1.qcow2");
            let (o, e) = (overlay.to_str().unwrap(), expected.to_str().unwrap());
            qemu_img_ok(&["compare", "-q", o, e]);
            qemu_img_ok(&["check", "-q", o]);
            assert!(
                m["disk_bytes"].as_u64().unwrap() < (8 << 20) + (3 << 20),
                "{m}"
            );
            // A VM on host A reaches it at its address, wherever it is now.
            let id = format!("peer{i}");
            let mut peer = vm(&id, "span", "net bexar.peer=10.40.0.10");
            peer["nics"][0]["ipv4"] = json!("10.40.0.20");
            expect_status(&ca.post("/v1/vms?start=true", &peer).await.unwrap(), 201);
            let text = wait_console(&ca, &id, "bexar-testguest: PASS").await;
            assert!(text.contains("3/3 echo replies"), "{text}");
            expect_status(&ca.delete(&format!("/v1/vms/{id}")).await.unwrap(), 204);
        }
        // Completing now: a copy held to 1 MiB/s (14 s for its first round alone) is told,
        // once it has begun, to switch over after the round under way; the rest of that
        // round goes unlimited and the VM arrives on B after one round, the disks intact.
        let slow = json!({"destination": "10.98.0.2:7400", "max_bandwidth_mib": 1});
        let client = ca.clone();
        let asked = tokio::spawn(async move { client.post("/v1/vms/mover/migrate", &slow).await });
        let t = Instant::now();
        loop {
            let v = expect_status(&ca.get("/v1/vms/mover").await.unwrap(), 200);
            if v["operation"]["progress"]["round"] == 1 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no progress: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let o = bexar()
            .args(["vm", "migrate-complete", "mover", "--socket"])
            .arg(agent_a.socket())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = asked.await.unwrap().unwrap();
        let v = expect_status(&r, 200);
        assert_eq!(v["migration"]["rounds"], 1, "{v}");
        let there = expect_status(&cb.get("/v1/vms/mover").await.unwrap(), 200);
        assert_eq!(there["state"], "running", "{there}");
        let copy = agent_b.dir.join("state/vms/mover/disk0.raw");
        assert!(
            std::fs::read(&copy).unwrap() == content,
            "the raw disk differs"
        );
        let overlay = agent_b.dir.join("state/vms/mover/disk1.qcow2");
        let (o, e) = (overlay.to_str().unwrap(), expected.to_str().unwrap());
        qemu_img_ok(&["compare", "-q", o, e]);
        // Nothing to complete any more.
        let r = cb
            .post("/v1/vms/mover/migrate/complete", &json!({}))
            .await
            .unwrap();
        let v = expect_status(&r, 409);
        assert_eq!(v["error"]["code"], "illegal_transition", "{v}");
        expect_status(&cb.delete("/v1/vms/mover").await.unwrap(), 204);
    });
    let _ = rogue.kill();
    let _ = rogue.wait();
    let _ = std::fs::remove_dir_all(&certs);
}

/// Types `key` on the VM's console (attached through the agent) and waits until `pattern`
/// shows once more than before; returns the console log.
async fn console_key(c: &Client, id: &str, key: u8, pattern: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let before = console(c, id).await.matches(pattern).count();
    let mut conn = common::console_attach(c, id).await;
    conn.write_all(&[key]).await.unwrap();
    conn.flush().await.unwrap();
    let t = Instant::now();
    loop {
        let text = console(c, id).await;
        if text.matches(pattern).count() > before {
            return text;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{id}: no new {pattern:?} after {:?}:\n{text}",
            key as char
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The last `pings S sent R replied` of the `migrant` guest's console.
fn pings(console: &str) -> (u64, u64) {
    let Some(l) = console
        .lines()
        .rev()
        .find(|l| l.contains(" replied, longest gap"))
    else {
        return (0, 0);
    };
    let n = |after: &str| -> u64 {
        l.split(after)
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|t| t.parse().ok())
            .unwrap()
    };
    (n("pings "), n(" sent "))
}

/// The acceptance's busy guest. `migrant` (firmware/testguest/src/migrant.rs) dirties 8 MiB at
/// 10,000 pages/s and checks every page, writes both its disks (a raw file, a qcow2 overlay
/// on a registered image) and reads each write back, pings a peer VM that stays on host A, and
/// reports every pause it sees. It moves A -> B -> A three times over. After every move: it runs on
/// exactly the host it went to, its pings reach the peer again from the same addresses, the
/// metadata service of that host answers its own request with its data, and while it is on B
/// host A keeps nothing of it (no record, no state, no TAP, its nftables rules as they were
/// before it existed). At the end its disks hold exactly what it wrote: the raw file compared
/// byte for byte with the original plus every write, the overlay through qemu-img.
#[test]
fn a_busy_guest_moves_back_and_forth_with_its_memory_disks_peer_and_metadata() {
    const SEED: u64 = 11;
    const MOVES: usize = 6;
    const RAW_SECTORS: u64 = 16 << 11;
    const IMAGE_SECTORS: u64 = 4 << 11;
    let (a, b, certs, agent_a, agent_b) = two_hosts("mb", 95);
    let (ca, cb) = (agent_a.client(), agent_b.client());
    let disk = agent_a.dir.join("busy.raw");
    random_file(&disk, RAW_SECTORS * 512, 7);
    let original = std::fs::read(&disk).unwrap();
    let base = agent_a.dir.join("base.raw");
    random_file(&base, IMAGE_SECTORS * 512, 5);
    rt().block_on(async {
        let mut span = segment("span", 41, "routed", 41);
        span["overlay"] = json!("vxlan");
        for c in [&ca, &cb] {
            expect_status(&c.post("/v1/segments", &span).await.unwrap(), 201);
            let image = json!({"id": "base", "path": base});
            expect_status(&c.post("/v1/images", &image).await.unwrap(), 201);
        }
        let mut peer = vm("peer", "span", "net-peer");
        peer["nics"][0]["ipv4"] = json!("10.41.0.20");
        expect_status(&ca.post("/v1/vms?start=true", &peer).await.unwrap(), 201);
        wait_console(&ca, "peer", "net-peer: ready").await;
        let (rules_a, links_a) = (a.rules(), a.links());

        let test = format!("migrant bexar.seed={SEED} bexar.peer=10.41.0.20");
        let mut busy = vm("busy", "span", &test);
        busy["nics"][0]["ipv4"] = json!("10.41.0.10");
        busy["disks"] = json!([{"path": disk}, {"image": "base"}]);
        expect_status(&ca.post("/v1/vms", &busy).await.unwrap(), 201);
        let md = json!({"hostname": "busy-bee"});
        expect_status(&ca.put("/v1/vms/busy/metadata", &md).await.unwrap(), 200);
        expect_status(
            &ca.post("/v1/vms/busy/start", &json!({})).await.unwrap(),
            200,
        );
        wait_console(&ca, "busy", "migrant: ready").await;
        let text = console_key(&ca, "busy", b'm', "imds hostname -> 200 busy-bee").await;
        assert!(pings(&text).1 > 0 || text.contains("imds"), "{text}");

        let hosts = [(&ca, &cb, "10.95.0.2:7400"), (&cb, &ca, "10.95.0.1:7400")];
        let go = |to: &str| json!({"destination": to});
        let (mut pauses, mut seen) = (Vec::new(), Vec::new());
        for round in 0..MOVES {
            let (from, to, dest) = hosts[round % 2];
            // It is busy on this host: pings answered since it came.
            let t = Instant::now();
            let before = loop {
                let text = console(from, "busy").await;
                let p = pings(&text);
                if p.1 > 0 {
                    break p;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "no ping replies:\n{text}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            // The last second it reported here.
            let last_second = |text: &str| -> u64 {
                text.lines()
                    .rev()
                    .find_map(|l| l.split("migrant: ").nth(1)?.split(" s: ").next()?.parse().ok())
                    .unwrap_or(0)
            };
            let here = last_second(&console(from, "busy").await);
            let r = from.post("/v1/vms/busy/migrate", &go(dest)).await.unwrap();
            let v = expect_status(&r, 200);
            eprintln!("move {round} to {dest}: {}", v["migration"]);
            pauses.push(v["migration"]["paused_ms"].clone());
            expect_status(&from.get("/v1/vms/busy").await.unwrap(), 404);
            let there = expect_status(&to.get("/v1/vms/busy").await.unwrap(), 200);
            assert_eq!(there["state"], "running", "{there}");
            assert_eq!(nic(&there, "ipv4"), "10.41.0.10", "{there}");
            // Its pings reach the peer on host A again: two reports written here, after the
            // log it brought along (and whatever it wrote before this look), a second apart
            // with replies in between.
            let mark = console(to, "busy").await.len();
            let t = Instant::now();
            loop {
                let text = console(to, "busy").await;
                // Whole lines only: the first may have begun before the mark.
                let after = text.get(mark..).unwrap_or_default();
                let fresh: Vec<(u64, u64)> = after
                    .split_once('\n')
                    .map_or("", |(_, rest)| rest)
                    .lines()
                    .filter(|l| l.contains(" replied, longest gap"))
                    .map(pings)
                    .collect();
                if let (Some(first), Some(last)) = (fresh.first(), fresh.last()) {
                    if last.1 >= first.1 + 2 {
                        eprintln!("move {round}: pings {before:?} before, {last:?} after");
                        break;
                    }
                }
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "move {round}: no ping replies after the move ({before:?} before): {fresh:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The metadata service of the host it is on answers it with its data.
            let text = console_key(to, "busy", b'm', "imds hostname -> 200 busy-bee").await;
            // Its console went with it: the log here holds its last report on the host it
            // left.
            assert!(
                text.contains(&format!("migrant: {here} s: ")),
                "no \"migrant: {here} s:\" here: {text}"
            );
            // The longest pause it saw in the two seconds after its last report before the
            // move: the blackout, as its own TSC loop measured it.
            let after = text
                .lines()
                .skip_while(|l| !l.contains(&format!("migrant: {here} s: ")))
                .take_while(|l| !l.contains(&format!("migrant: {} s: ", here + 3)));
            let gap = after
                .filter_map(|l| l.split("migrant: paused ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
                .max();
            seen.push(gap);
            if round % 2 == 0 {
                // On B: host A keeps nothing of it.
                assert!(!agent_a.dir.join("state/vms/busy").exists());
                expect_status(&ca.get("/v1/vms/busy/metadata").await.unwrap(), 404);
                assert_eq!(a.links(), links_a, "host A's links");
                assert_eq!(a.rules(), rules_a, "host A's nftables rules");
                assert!(!b.links().is_empty());
            }
        }
        // Back on A: it ends, and says what it wrote.
        let text = console_key(&ca, "busy", b'q', "bexar-testguest: PASS").await;
        let _ = ca
            .get("/v1/vms/busy/wait?state=stopped&timeout=10")
            .await
            .unwrap();
        eprintln!("the agents' pauses (ms) {pauses:?}; the guest's longest gap (us) around each move {seen:?}");
        let done = text
            .lines()
            .find(|l| l.contains("migrant: done"))
            .unwrap_or_else(|| panic!("no summary: {text}"));
        eprintln!("{done}");
        // Pings are 100 ms apart, one in flight: a move may cost the one in flight, not more.
        let count = |after: &str| -> u64 {
            done.split(after).nth(1).and_then(|t| t.split(' ').next()).and_then(|t| t.parse().ok()).unwrap()
        };
        let sent: u64 = done
            .split(" pings ")
            .next()
            .and_then(|t| t.rsplit(' ').next())
            .and_then(|t| t.parse().ok())
            .unwrap();
        let replied = count(" pings ");
        assert!(sent - replied <= 2 * MOVES as u64 + 1, "{done}");
        let writes = |i: u32| -> u64 {
            let tag = format!("migrant: disk {i}: seed {}, ", SEED + i as u64);
            text.lines()
                .find_map(|l| l.split(&tag).nth(1))
                .and_then(|t| t.split(' ').next())
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("no {tag:?}: {text}"))
        };
        let (w0, w1) = (writes(0), writes(1));
        assert!(w0 > 20 && w1 > 20, "{w0} and {w1} writes");
        // The raw disk: the original content and every write, byte for byte.
        let expected = agent_a.dir.join("expected0.raw");
        std::fs::write(&expected, &original).unwrap();
        let list = &common::scatter_writes(SEED, 1, w0, RAW_SECTORS)[0];
        common::apply(&expected, SEED, list);
        let got = std::fs::read(agent_a.dir.join("state/vms/busy/disk0.raw")).unwrap();
        assert!(
            got == std::fs::read(&expected).unwrap(),
            "the raw disk differs from what the guest wrote"
        );
        // The overlay: the base image and every write, as qemu-img reads it.
        let expected = agent_a.dir.join("expected1.raw");
        std::fs::copy(&base, &expected).unwrap();
        let list = &common::scatter_writes(SEED + 1, 1, w1, IMAGE_SECTORS)[0];
        common::apply(&expected, SEED + 1, list);
        let overlay = agent_a.dir.join("state/vms/busy/disk1.qcow2");
        let (o, e) = (overlay.to_str().unwrap(), expected.to_str().unwrap());
        qemu_img_ok(&["compare", "-q", o, e]);
        qemu_img_ok(&["check", "-q", o]);
        expect_status(&ca.delete("/v1/vms/busy").await.unwrap(), 204);
        expect_status(&ca.delete("/v1/vms/peer").await.unwrap(), 204);
    });
    let _ = std::fs::remove_dir_all(&certs);
}

/// A Linux kernel (the agent's Linux witness: vmlinux and initramfs, one vCPU) moved from host
/// A to host B in the middle of its boot, once its CPUs are up: it continues on B to init, with
/// no second boot, its console log going on from where it was, and host A keeps nothing of it.
/// Then stopped and deleted on B as any VM.
#[test]
fn a_linux_kernel_moved_mid_boot_reaches_init_on_the_other_host() {
    const INIT: &str = "Run /init as init process";
    const MID_BOOT: &str = "smp: Brought up";
    let s = common::linux_vm_spec("linux");
    let (_a, _b, certs, agent_a, agent_b) = two_hosts("ml", 96);
    let (ca, cb) = (agent_a.client(), agent_b.client());
    rt().block_on(async {
        let v = expect_status(&ca.post("/v1/vms?start=true", &s).await.unwrap(), 201);
        assert_eq!(v["state"], "running");
        let before = wait_console_for(&ca, "linux", MID_BOOT, Duration::from_secs(600)).await;
        let r = ca
            .post(
                "/v1/vms/linux/migrate",
                &json!({"destination": "10.96.0.2:7400", "downtime_ms": 50}),
            )
            .await
            .unwrap();
        let v = expect_status(&r, 200);
        eprintln!("Linux moved mid-boot: {}", v["migration"]);
        assert!(!before.contains(INIT), "moved too late: {before}");
        expect_status(&ca.get("/v1/vms/linux").await.unwrap(), 404);
        assert!(!agent_a.dir.join("state/vms/linux").exists());
        let after = wait_console_for(&cb, "linux", INIT, Duration::from_secs(600)).await;
        // Its console log came along (the boot so far is well under the 64 KiB carried): it
        // begins with what host A showed, and the kernel started once.
        assert!(
            after.starts_with(&before),
            "host A's output is not on B:\n{after}"
        );
        assert_eq!(
            after.matches("Linux version").count(),
            1,
            "booted again on host B:\n{after}"
        );
        let v = expect_status(
            &cb.post("/v1/vms/linux/stop?timeout=2", &Value::Null)
                .await
                .unwrap(),
            200,
        );
        assert_eq!(v["state"], "stopped");
        expect_status(&cb.delete("/v1/vms/linux").await.unwrap(), 204);
    });
    let _ = std::fs::remove_dir_all(&certs);
}

/// Sends `prepare` as the first line of a migration to `dest` from namespace `ns`, as host A
/// (openssl's own TLS client with host A's certificate), and returns the destination's answer.
fn prepare_by_hand(ns: &Netns, certs: &Path, dest: &str, prepare: &Value) -> String {
    use std::io::Write as _;
    let mut c = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "openssl", "s_client", "-quiet", "-connect",
        ])
        .arg(dest)
        .arg("-cert")
        .arg(certs.join("host-a.pem"))
        .arg("-key")
        .arg(certs.join("host-a.key"))
        .arg("-CAfile")
        .arg(certs.join("ca.pem"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = serde_json::to_vec(prepare).unwrap();
    line.push(b'\n');
    c.stdin.as_mut().unwrap().write_all(&line).unwrap();
    let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut out, &mut answer).unwrap();
    let _ = c.kill();
    let _ = c.wait();
    answer
}

/// The processes running a VMM of VM `id` under agent `agent`'s state directory.
fn vmm_pids(agent: &NsAgent, id: &str) -> Vec<i32> {
    let dir = agent.dir.join("state/vms").join(id);
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains(" vmm ") && cmd.contains(&dir)).then_some(pid)
        })
        .collect()
}

/// Chaos: migrations back and forth with a kill -9 of one of the four processes involved (the
/// sending or receiving agent, the sending or receiving VMM) at a pseudo-random moment. After
/// each, once both agents have settled: the VM runs on at most one host, and on none only if a
/// VMM was killed (its guest died with it) or the sender keeps it paused in doubt; the host
/// without it has no live record of it.
#[test]
fn migrations_with_a_process_killed_at_random_never_make_two_copies() {
    const ROUNDS: usize = 50;
    let (_a, _b, certs, agent_a, agent_b) = two_hosts("mc", 97);
    let mut agents = [agent_a, agent_b];
    let dests = ["10.97.0.1:7400", "10.97.0.2:7400"];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Restarted by the agent whenever it stops: a restart of a copy that moved away would be
    // the second copy this test looks for.
    // Its disk is an overlay on an image both hosts have: an overlay left behind on a host
    // would be a leak this test sees (the VM's directory stays).
    let mover = || {
        let mut v = vm("mover", "span", "idle");
        v["nics"][0]["ipv4"] = json!("10.50.0.10");
        v["restart_policy"] = json!("always");
        v["disks"] = json!([{"image": "base"}]);
        v
    };
    let base = agents[0].dir.join("base.raw");
    random_file(&base, 1 << 20, 3);
    let (mut lost, mut in_doubt, mut moved) = (0, 0, 0);
    rt().block_on(async {
        let mut span = segment("span", 50, "routed", 50);
        span["overlay"] = json!("vxlan");
        for ag in &agents {
            expect_status(&ag.client().post("/v1/segments", &span).await.unwrap(), 201);
            let image = json!({"id": "base", "path": base});
            expect_status(&ag.client().post("/v1/images", &image).await.unwrap(), 201);
        }
        let r = agents[0]
            .client()
            .post("/v1/vms?start=true", &mover())
            .await
            .unwrap();
        expect_status(&r, 201);
        let mut at = 0usize;
        for round in 0..ROUNDS {
            let to = 1 - at;
            let client = agents[at].client();
            let body = json!({"destination": dests[to]});
            let asked =
                tokio::spawn(async move { client.post("/v1/vms/mover/migrate", &body).await });
            tokio::time::sleep(Duration::from_millis(next() % 120)).await;
            let victim = round % 4;
            let what = match victim {
                0 | 1 => {
                    let i = if victim == 0 { at } else { to };
                    agents[i].kill9();
                    agents[i].spawn();
                    format!("agent {}", ["A", "B"][i])
                }
                _ => {
                    let i = if victim == 2 { at } else { to };
                    for pid in vmm_pids(&agents[i], "mover") {
                        // SAFETY: kill(2) on a pid read from /proc; one that ended fails.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    format!("the VMM on {}", ["A", "B"][i])
                }
            };
            let answer = asked.await.unwrap();
            // Settled: neither host migrating the VM any more.
            let t = Instant::now();
            let states = loop {
                let mut states = Vec::new();
                let mut busy = false;
                for ag in &agents {
                    let r = ag.client().get("/v1/vms/mover").await.unwrap();
                    let state = if r.status == 404 {
                        None
                    } else {
                        let v = expect_status(&r, 200);
                        busy |= v["operation"]["kind"]
                            .as_str()
                            .is_some_and(|k| matches!(k, "migrate" | "incoming" | "recover"))
                            || v["state"] == "deleting";
                        Some(v["state"].as_str().unwrap().to_owned())
                    };
                    // A VMM killed a moment ago may not be recorded yet, nor one just started.
                    let live = matches!(state.as_deref(), Some("running" | "paused"));
                    busy |= live == vmm_pids(ag, "mover").is_empty();
                    states.push(state);
                }
                if !busy {
                    break states;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "round {round} ({what} killed): not settled: {states:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let live = |s: &Option<String>| matches!(s.as_deref(), Some("running" | "paused"));
            let running: Vec<usize> = (0..2)
                .filter(|&i| states[i].as_deref() == Some("running"))
                .collect();
            eprintln!(
                "round {round}: {what} killed; answer {:?}; A {:?} B {:?}; settled in {:.1} s",
                answer.as_ref().map(|r| r.status),
                states[0],
                states[1],
                t.elapsed().as_secs_f64()
            );
            assert!(running.len() <= 1, "round {round}: running on both hosts");
            for i in 0..2 {
                let dir = agents[i].dir.join("state/vms/mover");
                assert!(
                    states[i].is_some() || !dir.exists(),
                    "round {round}: host {i} has no record of the VM but keeps {}",
                    dir.display()
                );
                let pids = vmm_pids(&agents[i], "mover");
                if live(&states[i]) {
                    assert_eq!(pids.len(), 1, "round {round}: host {i} {states:?} {pids:?}");
                } else {
                    assert!(
                        pids.is_empty(),
                        "round {round}: a VMM left on host {i}: {pids:?}"
                    );
                }
            }
            // Where it lives now. A migration in doubt was settled by the agents themselves
            // (the sender asked the destination): no copy is left paused.
            assert!(
                !states.iter().any(|s| s.as_deref() == Some("paused")),
                "round {round}: a copy left paused: {states:?}"
            );
            if let Ok(r) = &answer {
                let body = String::from_utf8_lossy(&r.body);
                if body.contains("settled") || body.contains("does not hold the VM") {
                    in_doubt += 1;
                }
            }
            let home = running.first().copied();
            match home {
                Some(i) => {
                    if i != at {
                        moved += 1;
                    }
                    at = i;
                }
                None => {
                    assert!(
                        victim >= 2,
                        "round {round}: lost with no VMM killed: {states:?}"
                    );
                    lost += 1;
                    at = 0;
                }
            }
            // What the other host (or both, if it was lost) keeps of it goes.
            for i in 0..2 {
                if home != Some(i) && states[i].is_some() {
                    let r = agents[i].client().delete("/v1/vms/mover").await.unwrap();
                    expect_status(&r, 204);
                }
            }
            if home.is_none() {
                let r = agents[0]
                    .client()
                    .post("/v1/vms?start=true", &mover())
                    .await
                    .unwrap();
                expect_status(&r, 201);
            }
        }
        eprintln!(
            "{ROUNDS} rounds: moved {moved}, guest lost with its VMM {lost}, in doubt {in_doubt}"
        );
        for ag in &agents {
            let _ = ag.client().delete("/v1/vms/mover").await;
        }
    });
    let _ = std::fs::remove_dir_all(&certs);
}
