"""nova's in-process functional harness (real nova API, conductor, scheduler and compute,
in-process placement) driving the Bexar driver and a real agent that runs the test guest.

Faked by nova's harness: neutron (NeutronFixture), glance (GlanceFixture, which here holds the
real test guest as a kernel image), cinder and keystone. Everything from the compute manager
down is real: the driver, the agent, the VMM, KVM and the guest.
"""

import io
import os
import signal
import subprocess
import tempfile
import time

from nova.tests.fixtures import neutron as neutron_fixture
from nova.tests.functional import integrated_helpers

from nova_bexar import driver  # noqa: F401  (registers the [bexar] options)
from nova_bexar import tests
from nova_bexar.tests import agents

HOST = "bexar1"


class BexarServerTest(tests.ConsoleHelpers, integrated_helpers._IntegratedTestBase):
    microversion = "latest"
    ADMIN_API = True

    def setUp(self):
        self.agent = agents.RealAgent("functional")
        super().setUp()
        self.flavor_id = self._create_flavor(memory_mb=64, vcpu=1, disk=1, ephemeral=0)
        ctxt = None
        with open(agents.TESTGUEST, "rb") as f:
            kernel = f.read()
        # A kernel image, booted directly.
        self.kernel_image = self.glance.create(ctxt, {
            "name": "bexar-testguest", "disk_format": "aki", "container_format": "aki",
            "size": len(kernel),
            "properties": {"os_command_line": agents.TESTGUEST_CMDLINE},
        }, data=io.BytesIO(kernel))["id"]
        # A disk image whose kernel is that one (what the compute API copies to the instance).
        self.disk_image = self.glance.create(ctxt, {
            "name": "bexar-disk", "disk_format": "raw", "container_format": "bare",
            "size": 1 << 20,
            "properties": {"kernel_id": self.kernel_image,
                           "os_command_line": agents.TESTGUEST_CMDLINE},
        }, data=io.BytesIO(b"\x5a" * (1 << 20)))["id"]

    def _setup_services(self):
        self.useFixture(self.agent)
        self.flags(compute_driver="bexar.BexarDriver")
        # The test guest answers Ctrl-Alt-Del at once; nova's 60 s default is for real guests.
        self.flags(shutdown_timeout=10)
        self.flags(agent_socket=self.agent.socket, soft_reboot_timeout=10, group="bexar")
        super()._setup_services()

    def _setup_compute_service(self):
        return self._start_compute(HOST)

    # -- helpers ---------------------------------------------------------------------------

    def _agent_vm(self, server):
        return self.agent.api("GET", "/v1/vms/%s" % server["id"])

    def _wait_status(self, server, status, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            server = self.api.get_server(server["id"])
            if server["status"] == status:
                return server
            self.assertLess(time.monotonic(), deadline,
                            "server %s stayed %s" % (server["id"], server["status"]))
            time.sleep(0.1)

    def _assert_host_clean(self):
        self.assertEqual([], self.agent.vms())
        self.assertEqual([], self.agent.api("GET", "/v1/segments")["items"])
        self.assertEqual(["lo"], self.agent.interfaces())
        vms_dir = os.path.join(self.agent.dir, "state", "vms")
        self.assertEqual([], os.listdir(vms_dir) if os.path.isdir(vms_dir) else [])

    # -- the tests -------------------------------------------------------------------------

    def test_lifecycle_on_a_real_agent(self):
        """Boot, console, stop/start, soft and hard reboot, a restart of nova-compute that
        re-adopts the running VM, and a delete that leaves nothing on the host."""
        server = self._create_server(image_uuid=self.kernel_image, flavor_id=self.flavor_id,
                                     networks="none", host=HOST)
        vm = self._agent_vm(server)
        self.assertEqual("running", vm["state"])
        self.assertEqual(server["id"], vm["uuid"])
        self.assertEqual(1, vm["spec"]["vcpus"])
        self.assertEqual(64, vm["spec"]["memory_mib"])
        self.assertEqual(server["OS-EXT-SRV-ATTR:instance_name"],
                         vm["spec"]["labels"]["nova.name"])
        self._wait_console(server, "idle: ready")
        self.assertIn(agents.BANNER, self._console(server))

        # Stop: a graceful shutdown the guest itself carries out.
        self._stop_server(server)
        self.assertEqual("stopped", self._agent_vm(server)["state"])
        self.assertIn("ctrl-alt-del, shutting down", self._console(server))
        self._start_server(server)
        self.assertEqual("running", self._agent_vm(server)["state"])
        self._wait_console(server, "idle: ready", count=2)

        # Soft reboot: the guest shuts down and a new VMM boots it.
        pid = self._agent_vm(server)["status"]["pid"]
        self._reboot_server(server, hard=False)
        vm = self._agent_vm(server)
        self.assertEqual("running", vm["state"])
        self.assertNotEqual(pid, vm["status"]["pid"])
        self.assertEqual(2, self._console(server).count("ctrl-alt-del, shutting down"))
        self._wait_console(server, "idle: ready", count=3)

        # Hard reboot: ended at once, booted again.
        pid = self._agent_vm(server)["status"]["pid"]
        self._reboot_server(server, hard=True)
        vm = self._agent_vm(server)
        self.assertEqual("running", vm["state"])
        self.assertNotEqual(pid, vm["status"]["pid"])
        self.assertEqual(2, self._console(server).count("ctrl-alt-del, shutting down"))
        self._wait_console(server, "idle: ready", count=4)

        # nova-compute restarts with a new driver; the VM runs on, the same VMM.
        pid = self._agent_vm(server)["status"]["pid"]
        self.compute = self.restart_compute_service(self.compute, keep_hypervisor_state=False)
        self.assertEqual([server["id"]], self.compute.manager.driver.list_instance_uuids())
        self._run_periodics()
        server = self.api.get_server(server["id"])
        self.assertEqual("ACTIVE", server["status"])
        self.assertEqual(1, server["OS-EXT-STS:power_state"])  # RUNNING
        self.assertEqual(pid, self._agent_vm(server)["status"]["pid"])
        # ... and is still nova's to drive.
        self._stop_server(server)
        self._start_server(server)

        self._delete_server(server)
        self._assert_host_clean()

    def test_disk_image_network_and_metadata(self):
        """A raw disk image with a kernel_id, a neutron port and user data: the VM gets an
        overlay on the registered image, a NIC on the network's segment with the port's MAC
        and address, and the agent's metadata service holds nova's data."""
        body = self._build_server(image_uuid=self.disk_image, flavor_id=self.flavor_id,
                                  networks=[{"port": neutron_fixture.NeutronFixture.port_1["id"]}])
        body["host"] = HOST
        body["user_data"] = "I2Nsb3VkLWNvbmZpZwpob3N0bmFtZTogYmV4YXIK"  # "#cloud-config..."
        body["metadata"] = {"team": "web"}
        server = self.api.post_server({"server": body})
        server = self._wait_for_state_change(server, "ACTIVE")
        vm = self._agent_vm(server)

        disk = vm["spec"]["disks"][0]
        self.assertEqual("glance-" + self.disk_image, disk["image"])
        self.assertEqual(1024, disk["size_mib"])
        self.assertTrue(os.path.exists(vm["disks"][0]["path"]))
        self.assertIn("root=/dev/vda", vm["spec"]["boot"]["cmdline"])

        port = neutron_fixture.NeutronFixture.port_1
        nic = vm["nics"][0]
        self.assertEqual("n-" + port["network_id"], nic["segment"])
        self.assertEqual(port["mac_address"], nic["mac"])
        self.assertEqual(port["fixed_ips"][0]["ip_address"], nic["ipv4"])
        self.assertIn(nic["tap"], self.agent.interfaces())

        md = self.agent.api("GET", "/v1/vms/%s/metadata" % server["id"])
        self.assertEqual("#cloud-config\nhostname: bexar\n", md["user_data"])
        self.assertEqual({"team": "web"}, md["tags"])
        self._wait_console(server, "idle: ready")

        self._delete_server(server)
        self._assert_host_clean()
        # The registered image stays for the next VM; the agent lists it.
        self.assertEqual(["glance-" + self.disk_image],
                         [i["id"] for i in self.agent.api("GET", "/v1/images")["items"]])

    def test_a_vm_that_dies_is_reported_shutoff(self):
        """The VMM is killed behind nova's back: the agent's event reaches the driver, and
        nova's power-state sync stops the instance (SHUTOFF), as with any crashed guest."""
        server = self._create_server(image_uuid=self.kernel_image, flavor_id=self.flavor_id,
                                     networks="none", host=HOST)
        pid = self._agent_vm(server)["status"]["pid"]
        os.kill(pid, signal.SIGKILL)
        server = self._wait_status(server, "SHUTOFF")
        self.assertEqual("stopped", self._agent_vm(server)["state"])
        self._start_server(server)
        self._delete_server(server)
        self._assert_host_clean()

    def test_suspend_resume_and_an_image_snapshot(self):
        """nova's suspend saves the guest and ends its VMM; resume brings it back where it was
        (no boot). createImage uploads the root disk flattened onto its base, and a server
        booted from that image runs."""
        uploads = tests.keep_glance_uploads(self.glance)
        server = self._create_server(image_uuid=self.disk_image, flavor_id=self.flavor_id,
                                     networks="none", host=HOST)
        self._wait_console(server, "idle: ready")

        self.api.post_server_action(server["id"], {"suspend": None})
        server = self._wait_for_state_change(server, "SUSPENDED")
        self.assertEqual(7, server["OS-EXT-STS:power_state"])  # SUSPENDED
        vm = self._agent_vm(server)
        self.assertEqual(("stopped", True), (vm["state"], vm.get("restore_pending")))
        self.assertNotIn("pid", vm["status"])
        self.api.post_server_action(server["id"], {"resume": None})
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual("running", self._agent_vm(server)["state"])
        self.assertEqual(1, self._console(server).count("idle: ready"))
        self.assertEqual([], self.agent.api(
            "GET", "/v1/vms/%s/snapshots" % server["id"])["items"])

        # An image of the running server: one short suspend, then it runs on (not rebooted).
        image_id = self.api.post_server_action(
            server["id"], {"createImage": {"name": "snap"}})["image_id"]
        deadline = time.monotonic() + 60
        while self.glance.show(None, image_id)["status"] != "active" or image_id not in uploads:
            self.assertLess(time.monotonic(), deadline, "no upload")
            time.sleep(0.1)
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual(1, self._console(server).count("idle: ready"))
        image = self.glance.show(None, image_id)
        self.assertEqual("qcow2", image["disk_format"])
        self.assertEqual(self.kernel_image, image["properties"]["kernel_id"])
        with tempfile.TemporaryDirectory() as tmp:
            snap = os.path.join(tmp, "snap.qcow2")
            with open(snap, "wb") as f:
                f.write(uploads[image_id])
            raw = os.path.join(tmp, "snap.raw")
            subprocess.run(["qemu-img", "convert", "-O", "raw", snap, raw], check=True)
            self.assertEqual(1024 << 20, os.path.getsize(raw))
            with open(raw, "rb") as f:
                self.assertEqual(b"\x5a" * (1 << 20), f.read(1 << 20))
                self.assertEqual(b"\0" * 4096, f.read(4096))

        # A server from the snapshot boots on its own overlay of it.
        clone = self._create_server(image_uuid=image_id, flavor_id=self.flavor_id,
                                    networks="none", host=HOST)
        self.assertEqual("glance-" + image_id, self._agent_vm(clone)["spec"]["disks"][0]["image"])
        self._wait_console(clone, "idle: ready")
        self._delete_server(clone)
        self._delete_server(server)
        self._assert_host_clean()
