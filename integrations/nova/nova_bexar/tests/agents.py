"""Real Bexar agents for the tests, and one misbehaving stand-in for the cases a real agent
cannot produce on cue.

``RealAgent`` runs the project's own ``bexar agent`` binary in a network namespace of its own
(so the segments the driver makes for neutron networks, their bridges, TAPs and nftables rules
never touch the host's interfaces), with its own socket and state directory, and removes it all
afterwards: every VM deleted through the API, the agent stopped, anything left in the
namespace killed, the namespace and the directory removed.

``FaultyAgent`` is a socket that answers every request with a fixed status, never answers, or
closes at once: the driver's mapping of those to nova's exceptions is checked against it.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse

import fixtures

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
BEXAR_BIN = os.path.abspath(os.environ.get(
    "BEXAR_BIN", os.path.join(REPO, "target/x86_64-unknown-linux-gnu/release/bexar")))
TESTGUEST = os.path.abspath(os.environ.get(
    "BEXAR_TESTGUEST", os.path.join(REPO, "firmware/target/release/testguest")))
# The test guest's idle mode: prints its banner and "idle: ready", then sleeps in hlt until
# Ctrl-Alt-Del, which it answers with an orderly power-off (a graceful stop works).
TESTGUEST_CMDLINE = "console=ttyS0 bexar.test=idle"
BANNER = "bexar-testguest: test: idle"

_counter = [0]


def _run(*cmd, check=True, cwd=None):
    return subprocess.run(cmd, check=check, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=cwd)


class RealAgent(fixtures.Fixture):
    """``bexar agent`` in its own network namespace, socket at ``self.socket``."""

    def __init__(self, name="agent", extra_args=(), socket_path=None, start=True):
        super().__init__()
        self.name = name
        self.extra_args = list(extra_args)
        self.socket_path = socket_path
        self.start_at_setup = start
        self.proc = None

    def _setUp(self):
        _counter[0] += 1
        # Directly under /tmp, not nova's per-test TMPDIR: a VMM's sockets live under the
        # state directory, and a Unix socket's path has at most 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="bexar-nova-%s-" % self.name, dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.netns = "bexar-nova-%d-%d" % (os.getpid(), _counter[0])
        _run("ip", "netns", "add", self.netns)
        self.addCleanup(self._remove_netns)
        _run("ip", "-n", self.netns, "link", "set", "lo", "up")
        self.socket = self.socket_path or os.path.join(self.dir, "agent.sock")
        self.log_path = os.path.join(self.dir, "agent.log")
        self.addCleanup(self._teardown)
        if self.start_at_setup:
            self.start()

    def start(self):
        log = open(self.log_path, "ab")
        cmd = ["ip", "netns", "exec", self.netns, BEXAR_BIN, "agent",
               "--socket", self.socket, "--state-dir", os.path.join(self.dir, "state"),
               # Nova's test flavors are larger than this 2-core machine: over-commit freely.
               "--cpu-allocation-ratio", "64", "--memory-allocation-ratio", "4",
               "--disk-allocation-ratio", "100", "--cgroup-parent", "off",
               "--stop-timeout", "5"] + self.extra_args
        before = self._log().count("agent recovered")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("bexar agent exited:\n" + self._log())
            if self._log().count("agent recovered") > before and self._connects():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("bexar agent did not come up:\n" + self._log())
            time.sleep(0.02)

    def stop(self, sig=signal.SIGTERM):
        """Stops the agent process only (its VMMs keep running, as in production)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _connects(self):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def api(self, method, path, body=None):
        """A raw request, for the tests' own look at what the agent holds."""
        from nova_bexar import agent
        client = agent.Client(self.socket, timeout=30)
        return client.json(method, path, body=body)

    def console_send(self, vm_id, data):
        """Types `data` on the VM's console (``console/attach``, an HTTP upgrade)."""
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        try:
            s.connect(self.socket)
            s.sendall(b"GET /v1/vms/%s/console/attach HTTP/1.1\r\nHost: bexar\r\n"
                      b"Connection: Upgrade\r\nUpgrade: bexar-console\r\n\r\n"
                      % urllib.parse.quote(vm_id).encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError("console attach refused: %r" % head[:300])
            s.sendall(data)
            # Held a moment: the agent passes what it read on before it sees the close.
            time.sleep(0.5)
        finally:
            s.close()

    def vms(self):
        return self.api("GET", "/v1/vms")["items"]

    def _teardown(self):
        if self.proc and self.proc.poll() is None:
            try:
                for vm in self.vms():
                    self.api("DELETE", "/v1/vms/%s" % urllib.parse.quote(vm["id"]))
                for seg in self.api("GET", "/v1/segments")["items"]:
                    self.api("DELETE", "/v1/segments/%s" % urllib.parse.quote(seg["id"]))
            except Exception:  # noqa: BLE001 - best effort; the namespace goes anyway
                pass
        self.stop()

    def _remove_netns(self):
        # The VMMs run in network namespaces of their own (the jail), so they are found by
        # their state directory, which is this fixture's.
        pids = _run("ip", "netns", "pids", self.netns, check=False).stdout.split()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open("/proc/%s/cmdline" % entry, "rb") as f:
                        if self.dir.encode() in f.read():
                            pids.append(entry)
                except OSError:
                    pass
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _run("ip", "netns", "del", self.netns, check=False)

    def interfaces(self):
        out = _run("ip", "-n", self.netns, "-j", "link", "show").stdout
        return [link["ifname"] for link in json.loads(out)]


class MigratingAgents(fixtures.Fixture):
    """Two real agents that take live migrations from each other, as two hosts would: each
    in its own network namespace, the two joined by a veth pair (10.77.0.1 and 10.77.0.2, the
    hosts' underlay, which also carries their segments' VXLAN overlay), each with a
    certificate naming its address, signed by one test CA (made with the openssl tool, as an
    operator would), taking migrations on port 7400.

    ``hosts`` names them (nova's compute hosts); the agent of host H listens on
    ``<dir>/H.sock``, so ``[bexar] agent_socket = <dir>/%(host)s.sock`` reaches each.
    """

    PORT = 7400

    def __init__(self, hosts, net=77):
        super().__init__()
        self.hosts = list(hosts)
        self.net = net

    def _setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bexar-nova-mig-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.socket_pattern = os.path.join(self.dir, "%(host)s.sock")
        addrs = ["10.%d.0.%d" % (self.net, i + 1) for i in range(len(self.hosts))]
        self._certs(addrs)
        self.agents = {}
        for host, addr in zip(self.hosts, addrs):
            peers = [arg for a in addrs if a != addr for arg in ("--overlay-peer", a)]
            agent = RealAgent(
                host, socket_path=os.path.join(self.dir, host + ".sock"), start=False,
                extra_args=["--overlay-local", addr] + peers + [
                            "--migration-listen", "%s:%d" % (addr, self.PORT),
                            "--migration-cert", os.path.join(self.dir, host + ".pem"),
                            "--migration-key", os.path.join(self.dir, host + ".key"),
                            "--migration-ca", os.path.join(self.dir, "ca.pem")])
            self.useFixture(agent)
            agent.address = addr
            self.agents[host] = agent
        a, b = (self.agents[h] for h in self.hosts[:2])
        _run("ip", "link", "add", "ul0", "netns", a.netns, "type", "veth", "peer", "name",
             "ul0", "netns", b.netns)
        for agent in (a, b):
            _run("ip", "-n", agent.netns, "addr", "add", agent.address + "/24", "dev", "ul0")
            # Room for the VXLAN header on the underlay.
            _run("ip", "-n", agent.netns, "link", "set", "ul0", "mtu", "1600", "up")
        for agent in self.agents.values():
            agent.start()

    def _certs(self, addrs):
        def openssl(*args):
            _run("openssl", *args, cwd=self.dir)

        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                "-subj", "/CN=bexar nova test CA")
        for host, addr in zip(self.hosts, addrs):
            with open(os.path.join(self.dir, host + ".ext"), "w") as f:
                f.write("subjectAltName=IP:%s\nextendedKeyUsage=serverAuth,clientAuth\n"
                        % addr)
            openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", host + ".key", "-out", host + ".csr", "-subj", "/CN=" + host)
            openssl("x509", "-req", "-in", host + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", host + ".pem", "-days", "2",
                    "-extfile", host + ".ext")


class FaultyAgent(fixtures.Fixture):
    """A Unix socket that misbehaves: ``mode`` is ``("status", code, body)``, ``"hang"`` or
    ``"close"``."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.requests = []

    def _setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bexar-nova-faulty-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.socket = os.path.join(self.dir, "agent.sock")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.socket)
        self.sock.listen(16)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.addCleanup(self._stop)

    def _serve(self):
        held = self.held = []
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                head = conn.recv(65536).decode("latin-1")
            except OSError:
                head = ""
            self.requests.append(head.split("\r\n", 1)[0])
            if self.mode == "hang":
                held.append(conn)
                continue
            if self.mode == "close":
                conn.close()
                continue
            _, status, body = self.mode
            data = json.dumps(body).encode()
            conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (status, len(data), data))
            conn.close()

    def _stop(self):
        self.stopping = True
        for c in getattr(self, "held", []):
            c.close()
        # Wakes the accept (closing alone does not), then lets the thread end.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
