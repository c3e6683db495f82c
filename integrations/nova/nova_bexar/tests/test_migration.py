"""Live migration with block migration through nova (``os-migrateLive``): two compute services
in one process, each driving its own real agent in its own network namespace, the two agents
joined by a veth underlay and taking migrations from each other over mutual TLS (a test CA).
No shared storage: the VM's root disk (a copy-on-write overlay on a glance image) is copied by
the agents while the guest runs.

``NovaServerMovingTests`` runs 22 of nova's own server-moving tests
(``nova/tests/functional/test_servers.py``, ``ServerMovingTests``) unchanged on the Bexar
driver: they boot on one host, live-migrate with ``block_migration``, evacuate or shelve and
unshelve, and check placement's allocations and usages on both hosts.
``BexarLiveMigrationTest`` moves a guest that is busy writing its disk there and back and
checks the disk byte for byte, keeps two guests of one network talking across hosts while they
move, and covers the refusals, the abort and the force-complete.
"""

import io
import os
import subprocess
import tempfile
import time

import numpy
from nova import context as nova_context
from nova import objects
from nova.tests.fixtures import neutron as neutron_fixture
from nova import utils
from nova.tests.functional import integrated_helpers
from nova.tests.functional import test_servers

from nova_bexar import driver  # noqa: F401  (registers the [bexar] options)
from nova_bexar import tests
from nova_bexar.tests import agents

# The migrant test guest (firmware/README.md): writes its disk 10 times a second, each write
# read back and checked, one request in flight; rewrites 2 MiB of memory at 2,000 pages a
# second; `q` on its console flushes the disk and reports how many writes it made.
SEED = 4242
MIGRANT_CMDLINE = ("console=ttyS0 bexar.test=migrant bexar.seed=%d bexar.disk-rate=10 "
                   "bexar.dirty-mib=2 bexar.dirty-rate=2000 bexar.gap-report-us=1000000" % SEED)
DIRTY_CMDLINE = "console=ttyS0 bexar.test=dirty bexar.dirty-mib=16 bexar.dirty-rate=2000"
BASE_BYTES = 1 << 20
SECTOR = 512


class _TwoAgents:
    """Starts the two agents (hosts ``AGENT_HOSTS``) with the first compute service."""

    AGENT_HOSTS = ()
    agents = None

    def _start_compute(self, host, cell_name=None):
        if self.agents is None:
            self.agents = self.useFixture(agents.MigratingAgents(self.AGENT_HOSTS))
            self.flags(compute_driver="bexar.BexarDriver")
            self.flags(shutdown_timeout=10)
            self.flags(agent_socket=self.agents.socket_pattern, kernel=agents.TESTGUEST,
                       cmdline=agents.TESTGUEST_CMDLINE, request_timeout=30,
                       soft_reboot_timeout=10, group="bexar")
        return super()._start_compute(host, cell_name=cell_name)

    def _agent(self, host):
        return self.agents.agents[host]

    def _assert_agent_clean(self, host):
        agent = self._agent(host)
        self.assertEqual([], agent.vms())
        self.assertEqual([], agent.api("GET", "/v1/segments")["items"])
        self.assertEqual(["lo", "ul0"], sorted(agent.interfaces()))
        vms_dir = os.path.join(agent.dir, "state", "vms")
        self.assertEqual([], os.listdir(vms_dir) if os.path.isdir(vms_dir) else [])


# nova's server-moving tests that apply to a driver with live migration, evacuation and shelve
# but no resize or cold migration: each boots on host1 and moves the server to host2.
NOVA_TESTS = {
    "test_live_migrate",
    "test_live_migrate_force",
    "test_live_migrate_forced_v268",
    "test_live_migration_after_server_created_with_host",
    "test_evacuate_with_no_compute",
    "test_evacuate_instance_kept_on_the_hypervisor",
    "test_evacuate_clean_hypervisor",
    "test_evacuate_forced_host_instance_kept_on_the_hypervisor",
    "test_evacuate_forced_host_clean_hypervisor",
    "test_evacuate_forced_host_v268",
    "test_evacuate_host_specified_but_not_forced",
    "test_evacuate_claim_on_dest_fails_instance_kept_on_the_hypervisor",
    "test_evacuate_claim_on_dest_fails_clean_hypervisor",
    "test_evacuate_rebuild_on_dest_fails_instance_kept_on_the_hypervisor",
    "test_evacuate_rebuild_on_dest_fails_clean_hypervisor",
    "test_evacuate_after_server_created_with_host",
    "test_shelve_unshelve",
    "test_shelve_unshelve_to_host",
    "test_shelve_unshelve_to_host_instance_not_offloaded",
    "test_shelve_offload_unshelve_diff_host",
    "test_shelve_offload_unshelve_same_host",
    "test_shelve_unshelve_after_server_created_with_host",
}


class NovaServerMovingTests(_TwoAgents, test_servers.ServerMovingTests):
    """nova's own ``ServerMovingTests`` (the subset above), unchanged, on the Bexar driver."""

    compute_driver = "bexar.BexarDriver"
    AGENT_HOSTS = ("host1", "host2")

    def setUp(self):
        super().setUp()
        # GlanceFixture's image1 (what these tests boot) has no bytes: give it a small raw
        # disk, so that each server has a root disk made from it that must move.
        self.glance._imagedata[self.glance.image1["id"]] = b"\x5a" * BASE_BYTES
        # Shelving uploads a snapshot that unshelving boots.
        tests.keep_glance_uploads(self.glance)

    def _delete_and_check_allocations(self, server):
        super()._delete_and_check_allocations(server)
        for host in self.AGENT_HOSTS:
            self._assert_agent_clean(host)


for _name in dir(test_servers.ServerMovingTests):
    if _name.startswith("test_") and _name not in NOVA_TESTS:
        setattr(NovaServerMovingTests, _name, None)


class BexarLiveMigrationTest(_TwoAgents, tests.ConsoleHelpers,
                             integrated_helpers.ProviderUsageBaseTestCase):
    compute_driver = "bexar.BexarDriver"
    AGENT_HOSTS = ("bexar-a", "bexar-b")

    def setUp(self):
        super().setUp()
        self.computes = {host: self._start_compute(host) for host in self.AGENT_HOSTS}
        self.flavor_id = self._create_flavor(memory_mb=64, vcpu=1, disk=1, ephemeral=0)
        with open(agents.TESTGUEST, "rb") as f:
            kernel = f.read()
        self.kernel_image = self.glance.create(None, {
            "name": "bexar-testguest", "disk_format": "aki", "container_format": "aki",
            "size": len(kernel), "properties": {"os_command_line": agents.TESTGUEST_CMDLINE},
        }, data=io.BytesIO(kernel))["id"]
        self.base = bytes(range(256)) * (BASE_BYTES // 256)
        self.migrant_image = self.glance.create(None, {
            "name": "bexar-migrant", "disk_format": "raw", "container_format": "bare",
            "size": BASE_BYTES,
            "properties": {"kernel_id": self.kernel_image, "os_command_line": MIGRANT_CMDLINE},
        }, data=io.BytesIO(self.base))["id"]

    # -- helpers ---------------------------------------------------------------------------

    def _host_of(self, server):
        return self.api.get_server(server["id"])["OS-EXT-SRV-ATTR:host"]

    def _live_migrate_to(self, server, host):
        """Live-migrates `server` to `host`; returns it and its (completed) migration record
        (this move's: nova's own helper returns the first of the server's that matches)."""
        before = {m["id"] for m in self.api.get_migrations()}
        self.api.post_server_action(server["id"], {
            "os-migrateLive": {"host": host, "block_migration": True}})
        server = self._wait_for_server_parameter(
            server, {"OS-EXT-SRV-ATTR:host": host, "status": "ACTIVE",
                     "OS-EXT-STS:task_state": None})
        deadline = time.monotonic() + 30
        while True:
            new = [m for m in self.api.get_migrations()
                   if m["instance_uuid"] == server["id"] and m["id"] not in before]
            if new and new[0]["status"] == "completed":
                return server, new[0]
            self.assertLess(time.monotonic(), deadline, new)
            time.sleep(0.2)

    def _boot_dirty_guest(self):
        """A guest rewriting 16 MiB at 2,000 pages a second (8 MB/s): at 1 MiB/s its first
        copy alone takes 16 s, and it never converges."""
        with open(agents.TESTGUEST, "rb") as f:
            kernel = f.read()
        busy = self.glance.create(None, {
            "name": "bexar-dirty", "disk_format": "aki", "container_format": "aki",
            "size": len(kernel), "properties": {"os_command_line": DIRTY_CMDLINE},
        }, data=io.BytesIO(kernel))["id"]
        server = self._create_server(image_uuid=busy, flavor_id=self.flavor_id,
                                     networks="none", host="bexar-a")
        self._wait_console(server, " pages written, round ")
        return server

    def _assert_same_boot_goes_on(self, server):
        """The dirty guest was started once (no second boot) and goes on writing and checking
        its memory."""
        out = self._console(server)
        self.assertEqual(1, out.count("test: dirty"))
        self.assertNotIn("FAIL", out)
        reports = out.count(" pages written, round ")
        self._wait_console(server, " pages written, round ", count=reports + 2)

    def _wait_copying(self, server, host):
        """Until the agent on `host` copies the server (its first round: what it has to send)."""
        deadline = time.monotonic() + 30
        while True:
            vm = self._agent(host).api("GET", "/v1/vms/%s" % server["id"])
            progress = (vm.get("operation") or {}).get("progress")
            if progress and progress["left_bytes"] > 0:
                return progress
            self.assertLess(time.monotonic(), deadline, vm)
            time.sleep(0.1)

    def _writes_so_far(self, server):
        """The disk writes the guest's last per-second report counts."""
        lines = [line for line in self._console(server).splitlines()
                 if "migrant: " in line and " disks " in line]
        return int(lines[-1].split(" disks ")[1].split(" ")[0].split("/")[0]) if lines else 0

    # -- the tests -------------------------------------------------------------------------

    def test_a_busy_guest_moves_there_and_back_with_its_disk(self):
        """A guest writing its root disk (an overlay on a glance image) ten times a second,
        each write read back, with a neutron port, is live-migrated a -> b -> a. Each time:
        it runs only where nova says, its NIC (MAC, address) and segment went along, the
        host it left keeps nothing, placement holds the flavor on the new host only, its
        console output came along, and it goes on writing. At the end its disk is, byte for
        byte, the image plus every write it made, as qemu-img reads the overlay."""
        port = neutron_fixture.NeutronFixture.port_1
        server = self._create_server(image_uuid=self.migrant_image, flavor_id=self.flavor_id,
                                     networks=[{"port": port["id"]}], host="bexar-a")
        self._wait_console(server, "migrant: ready")
        self._wait_console(server, " disks ", count=2)
        flavor = self.api.get_flavor(self.flavor_id)
        for there in ("bexar-b", "bexar-a"):
            here = self._host_of(server)
            before = self._writes_so_far(server)
            server, migration = self._live_migrate_to(server, there)
            self.assertEqual(here, migration["source_compute"])
            self.assertEqual(there, migration["dest_compute"])
            vm = self._agent(there).api("GET", "/v1/vms/%s" % server["id"])
            self.assertEqual("running", vm["state"])
            self.assertEqual(port["mac_address"], vm["nics"][0]["mac"])
            self.assertEqual(port["fixed_ips"][0]["ip_address"], vm["nics"][0]["ipv4"])
            self.assertEqual("n-" + port["network_id"], vm["nics"][0]["segment"])
            self.assertIn(vm["nics"][0]["tap"], self._agent(there).interfaces())
            self._assert_agent_clean(here)
            self._run_periodics()
            self.assertFlavorMatchesAllocation(
                flavor, server["id"], self._get_provider_uuid_by_host(there))
            self.assertRequestMatchesUsage(
                {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0},
                self._get_provider_uuid_by_host(here))
            # The console output nova shows comes from the new host and begins at the boot.
            out = self._console(server)
            self.assertEqual(1, out.count("migrant: ready"))
            self.assertNotIn("FAIL", out)
            # It goes on writing there (each write read back and checked by the guest).
            deadline = time.monotonic() + 60
            while self._writes_so_far(server) < before + 20:
                self.assertLess(time.monotonic(), deadline, self._console(server)[-2000:])
                time.sleep(0.5)

        # The metadata service of the host it is on now answers the guest (a token, then its
        # host name: the guest's own TCP to 169.254.169.254 through its NIC).
        agent = self._agent(self._host_of(server))
        agent.console_send(server["id"], b"m")
        out = self._wait_console(server, "migrant: imds hostname -> ")
        self.assertIn("migrant: imds hostname -> 200 " + server["name"].lower(), out)
        # nova's diagnostics (the legacy form; the new one names the driver from a closed
        # list): the VMM it runs in now counts the disk it writes and reads back, the NIC that
        # carried the metadata request and its answer, and the memory it was given.
        with utils.temporary_mutation(self.api, microversion="2.47"):
            diags = self.api.get_server_diagnostics(server["id"])
        self.assertEqual(64 * 1024, diags["memory"])
        self.assertGreater(diags["vda_write"], 0, diags)
        self.assertGreater(diags["vda_read"], 0, diags)
        tap = vm["nics"][0]["tap"]
        self.assertGreater(diags[tap + "_tx"], 0, diags)
        self.assertGreater(diags[tap + "_rx"], 0, diags)
        self.assertGreater(diags["uptime"], 0, diags)
        # block_stats, which nova's volume usage polling calls: the same disk's bytes.
        instance = objects.Instance.get_by_uuid(nova_context.get_admin_context(), server["id"])
        stats = self.computes[self._host_of(server)].manager.driver.block_stats(instance, "vda")
        self.assertEqual(5, len(stats))
        self.assertGreaterEqual(stats[1], diags["vda_read"])
        self.assertGreaterEqual(stats[3], diags["vda_write"])
        self.assertEqual([None] * 5,
                         self.computes["bexar-a"].manager.driver.block_stats(instance, "vdz"))

        # The guest finishes its writes, flushes and says how many it made.
        agent.console_send(server["id"], b"q")
        out = self._wait_console(server, "migrant: done")
        tag = "migrant: disk 0: seed %d, " % SEED
        line = next(line for line in out.splitlines() if tag in line)
        writes = int(line.split(tag)[1].split(" ")[0])
        self.assertGreater(writes, 40, line)
        vm = agent.api("GET", "/v1/vms/%s" % server["id"])
        overlay = vm["disks"][0]["path"]
        with tempfile.TemporaryDirectory() as tmp:
            expected = os.path.join(tmp, "expected.raw")
            capacity = vm["disks"][0]["size"]
            _expected_disk(expected, self.base, capacity, SEED, writes)
            subprocess.run(["qemu-img", "compare", "-q", "-U", overlay, expected], check=True)
        subprocess.run(["qemu-img", "check", "-q", "-U", overlay], check=True)
        self._delete_server(server)
        for host in self.AGENT_HOSTS:
            self._assert_agent_clean(host)

    def test_one_network_across_hosts_before_and_after_moves(self):
        """With ``segment_overlay = vxlan``, a neutron network is one layer-2 domain across
        the hosts: its segment has the network's segmentation id as its VXLAN id on both. A
        guest on host a pings one on host b at its neutron address; the pinging guest moves
        to b (both on one host), then the answering one moves to a (apart again, the other
        way round): the pings are answered all along but for a few around each switch-over."""
        self.flags(segment_overlay="vxlan", group="bexar")
        port_1, port_2 = (neutron_fixture.NeutronFixture.port_1,
                          neutron_fixture.NeutronFixture.port_2)
        self.neutron.create_port({"port": port_2})
        peer_image = self._kernel_image("bexar-net-peer", "console=ttyS0 bexar.test=net-peer")
        pinger_image = self._kernel_image(
            "bexar-pinger", "console=ttyS0 bexar.test=migrant bexar.dirty-mib=1 "
            "bexar.dirty-rate=100 bexar.gap-report-us=1000000 bexar.peer=%s"
            % port_2["fixed_ips"][0]["ip_address"])
        peer = self._create_server(image_uuid=peer_image, flavor_id=self.flavor_id,
                                   networks=[{"port": port_2["id"]}], host="bexar-b")
        self._wait_console(peer, "net-peer: ready")
        pinger = self._create_server(image_uuid=pinger_image, flavor_id=self.flavor_id,
                                     networks=[{"port": port_1["id"]}], host="bexar-a")
        self._wait_console(pinger, "migrant: ready")
        segs = [self._agent(h).api("GET", "/v1/segments")["items"] for h in self.AGENT_HOSTS]
        self.assertEqual([["vxlan"], ["vxlan"]], [[s["overlay"] for s in h] for h in segs])
        # NeutronFixture's network_1 is a VXLAN network with segmentation id 24.
        self.assertEqual([[24], [24]], [[s["vlan"] for s in h] for h in segs])
        replied = self._pings_answered(pinger, 0)
        for server, there in ((pinger, "bexar-b"), (peer, "bexar-a")):
            self._live_migrate_to(server, there)
            replied = self._pings_answered(pinger, replied)
        self._delete_server(pinger)
        self._delete_server(peer)
        for host in self.AGENT_HOSTS:
            self._assert_agent_clean(host)

    def _kernel_image(self, name, cmdline):
        with open(agents.TESTGUEST, "rb") as f:
            kernel = f.read()
        return self.glance.create(None, {
            "name": name, "disk_format": "aki", "container_format": "aki",
            "size": len(kernel), "properties": {"os_command_line": cmdline},
        }, data=io.BytesIO(kernel))["id"]

    def _pings_answered(self, pinger, before, more=10, timeout=60):
        """Waits until the migrant guest's reports count `more` answered pings than `before`;
        returns the count."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self._console(pinger).splitlines()
                     if " pings " in line and " replied" in line]
            replied = int(lines[-1].split(" sent ")[1].split(" ")[0]) if lines else 0
            if replied >= before + more:
                return replied
            self.assertLess(time.monotonic(), deadline,
                            "%d pings answered:\n%s" % (replied, "\n".join(lines[-5:])))
            time.sleep(0.3)

    def test_an_aborted_migration_leaves_the_guest_where_it_was(self):
        """A migration held to 1 MiB/s is aborted through nova's API while it copies: the
        migration ends ``cancelled``, the guest runs on at the source, untouched (no second
        boot), the destination keeps nothing, and placement holds it on the source only.
        nova's migration record shows the progress the agent reported before the abort."""
        self.flags(live_migration_bandwidth=1, group="bexar")
        server = self._boot_dirty_guest()
        pid = self._agent("bexar-a").api("GET", "/v1/vms/%s" % server["id"])["status"]["pid"]
        self.api.post_server_action(server["id"], {
            "os-migrateLive": {"host": "bexar-b", "block_migration": "auto"}})
        migration = self._wait_for_migration_status(server, ["running"])
        self._wait_copying(server, "bexar-a")
        # The driver copies the agent's progress into nova's migration record.
        deadline = time.monotonic() + 30
        while not self.api.get_active_migrations(server["id"])[0]["memory_total_bytes"]:
            self.assertLess(time.monotonic(), deadline, "no progress in the migration record")
            time.sleep(0.2)
        self.api.delete_migration(server["id"], migration["id"])
        self._wait_for_migration_status(server, ["cancelled"])
        server = self._wait_for_server_parameter(
            server, {"OS-EXT-SRV-ATTR:host": "bexar-a", "status": "ACTIVE",
                     "OS-EXT-STS:task_state": None})
        vm = self._agent("bexar-a").api("GET", "/v1/vms/%s" % server["id"])
        self.assertEqual(("running", pid), (vm["state"], vm["status"]["pid"]))
        self._assert_same_boot_goes_on(server)
        self._assert_agent_clean("bexar-b")
        self._run_periodics()
        self.assertRequestMatchesUsage(
            {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}, self._get_provider_uuid_by_host("bexar-b"))
        self._delete_server(server)
        self._assert_agent_clean("bexar-a")

    def test_force_complete_ends_a_migration_that_would_not(self):
        """A guest rewriting 16 MiB at 2,000 pages a second, sent at 1 MiB/s, would never
        converge: nova's force-complete has it switch over after the round under way (the
        rest of it unlimited), and it runs on the destination, the same boot."""
        self.flags(live_migration_bandwidth=1, group="bexar")
        server = self._boot_dirty_guest()
        self.api.post_server_action(server["id"], {
            "os-migrateLive": {"host": "bexar-b", "block_migration": "auto"}})
        migration = self._wait_for_migration_status(server, ["running"])
        self._wait_copying(server, "bexar-a")
        self.api.force_complete_migration(server["id"], migration["id"])
        server = self._wait_for_server_parameter(
            server, {"OS-EXT-SRV-ATTR:host": "bexar-b", "status": "ACTIVE",
                     "OS-EXT-STS:task_state": None})
        self._wait_for_migration_status(server, ["completed"])
        vm = self._agent("bexar-b").api("GET", "/v1/vms/%s" % server["id"])
        self.assertEqual("running", vm["state"])
        self._assert_same_boot_goes_on(server)
        self._assert_agent_clean("bexar-a")
        self._delete_server(server)
        self._assert_agent_clean("bexar-b")

    def test_refusals_leave_the_guest_where_it_was(self):
        """A paused guest, and a destination whose agent takes no migrations: nova's
        pre-checks refuse (migration ``error``), the guest stays as it was on its host and
        the other host holds nothing."""
        server = self._create_server(image_uuid=self.kernel_image, flavor_id=self.flavor_id,
                                     networks="none", host="bexar-a")
        self._wait_console(server, "idle: ready")
        self.api.post_server_action(server["id"], {"pause": None})
        server = self._wait_for_state_change(server, "PAUSED")
        self.api.post_server_action(server["id"], {
            "os-migrateLive": {"host": "bexar-b", "block_migration": "auto"}})
        self._wait_for_migration_status(server, ["error"])
        server = self._wait_for_server_parameter(
            server, {"status": "PAUSED", "OS-EXT-STS:task_state": None})
        self.assertEqual("bexar-a", self._host_of(server))
        self.assertEqual("paused", self._agent("bexar-a").api(
            "GET", "/v1/vms/%s" % server["id"])["state"])
        self._assert_agent_clean("bexar-b")
        self.api.post_server_action(server["id"], {"unpause": None})
        server = self._wait_for_state_change(server, "ACTIVE")

        # Host b's agent restarted without a migration listener.
        b = self._agent("bexar-b")
        b.stop()
        b.extra_args = []
        b.start()
        self.api.post_server_action(server["id"], {
            "os-migrateLive": {"host": "bexar-b", "block_migration": "auto"}})
        migrations = self._wait_for_migration_status(server, ["error"])
        self.assertIsNone(migrations["dest_compute"])
        server = self._wait_for_server_parameter(
            server, {"status": "ACTIVE", "OS-EXT-STS:task_state": None})
        self.assertEqual("bexar-a", self._host_of(server))
        self.assertEqual("running", self._agent("bexar-a").api(
            "GET", "/v1/vms/%s" % server["id"])["state"])
        self._assert_agent_clean("bexar-b")
        self._delete_server(server)
        self._assert_agent_clean("bexar-a")


def _splitmix64(z):
    """The test guest's splitmix64, on numpy uint64 arrays (wrapping as the guest's does)."""
    z = z + numpy.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> numpy.uint64(30))) * numpy.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> numpy.uint64(27))) * numpy.uint64(0x94D049BB133111EB)
    return z ^ (z >> numpy.uint64(31))


def _pattern(seed, first, sectors):
    """The bytes the test guest writes to `sectors` sectors from `first` (firmware/testguest
    vtests.rs): word w of sector s is splitmix64(splitmix64(seed) ^ (s << 6) ^ w)."""
    with numpy.errstate(over="ignore"):
        key = _splitmix64(numpy.array([seed], dtype=numpy.uint64))[0]
        s = numpy.arange(first, first + sectors, dtype=numpy.uint64)[:, None]
        w = numpy.arange(64, dtype=numpy.uint64)[None, :]
        return _splitmix64(key ^ (s << numpy.uint64(6)) ^ w).astype("<u8").tobytes()


def _scatter_writes(seed, writes, capacity):
    """Where the migrant guest's writes go: (first sector, sectors), as ``blk-scatter`` draws
    them (tests/common/mod.rs ``scatter_writes``)."""
    mask = (1 << 64) - 1
    with numpy.errstate(over="ignore"):
        x = int(_splitmix64(numpy.array([seed], dtype=numpy.uint64))[0]) | 1
    out = []
    for _ in range(writes):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        n = min(1 + (x >> 40) % 128, capacity)
        out.append(((x & 0xFF_FFFF_FFFF) % (capacity - n + 1), n))
    return out


def _expected_disk(path, base, size, seed, writes):
    """A raw file of `size` bytes: `base`, then every write the guest made, in order."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(base)
        for first, n in _scatter_writes(seed, writes, size // SECTOR):
            f.seek(first * SECTOR)
            f.write(_pattern(seed, first, n))
