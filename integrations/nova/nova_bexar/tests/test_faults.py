"""What nova sees when the agent refuses, hangs or dies.

The refusal and the death are real agents' (an agent whose own admission control turns a VM
away, an agent killed with SIGKILL); only a hang and a connection closed mid-request need a
stand-in (agents.FaultyAgent), since a real agent does neither on cue.
"""

import os
import shutil
import signal
import tempfile
import time

from nova import exception
from nova import objects
from nova import test
from nova.tests.functional.api import client
from nova.tests.functional import integrated_helpers
from nova.tests.unit import fake_instance

from nova_bexar import driver as bexar_driver
from nova_bexar.tests import agents


class AgentUnreachableTest(test.NoDBTestCase):
    """Every driver entry point that talks to the agent gives up within the request timeout
    and reports HypervisorUnavailable: nova records a compute failure, nothing hangs."""

    def setUp(self):
        super().setUp()
        self.flags(request_timeout=1, group="bexar")
        self.instance = fake_instance.fake_instance_obj(
            None, uuid="2b4c0a52-2e4b-4f47-9b36-d0e0c7f5d0a1")
        self.instance.flavor = objects.Flavor(vcpus=1, memory_mb=64, root_gb=0,
                                              ephemeral_gb=0, swap=0, name="t")

    def _driver(self, socket_path):
        self.flags(agent_socket=socket_path, group="bexar")
        d = bexar_driver.BexarDriver(None)
        d._host = "h"
        return d

    def _calls(self, d):
        inst = self.instance
        return [
            ("get_info", lambda: d.get_info(inst)),
            ("list_instances", d.list_instances),
            ("power_off", lambda: d.power_off(inst)),
            ("power_on", lambda: d.power_on(None, inst, [])),
            ("reboot", lambda: d.reboot(None, inst, [], "HARD")),
            ("pause", lambda: d.pause(inst)),
            ("destroy", lambda: d.destroy(None, inst, [])),
            ("get_console_output", lambda: d.get_console_output(None, inst)),
            ("get_available_resource", lambda: d.get_available_resource("h")),
        ]

    def _assert_unavailable(self, d, within):
        for name, call in self._calls(d):
            t = time.monotonic()
            self.assertRaises(exception.HypervisorUnavailable, call)
            self.assertLess(time.monotonic() - t, within, name)

    def test_agent_that_hangs(self):
        agent = self.useFixture(agents.FaultyAgent("hang"))
        self._assert_unavailable(self._driver(agent.socket), within=3)
        self.assertIn("GET /v1/vms/2b4c0a52-2e4b-4f47-9b36-d0e0c7f5d0a1 HTTP/1.1",
                      agent.requests)

    def test_agent_that_closes_the_connection(self):
        agent = self.useFixture(agents.FaultyAgent("close"))
        self._assert_unavailable(self._driver(agent.socket), within=1)

    def test_no_agent(self):
        d = tempfile.mkdtemp(prefix="bexar-nova-none-")
        self.addCleanup(shutil.rmtree, d)
        self._assert_unavailable(self._driver(os.path.join(d, "agent.sock")), within=1)

    def test_agent_errors_map_to_nova_exceptions(self):
        cases = [
            ((409, "over_capacity"), exception.ComputeResourcesUnavailable),
            ((400, "invalid_field"), exception.InvalidInput),
            ((409, "conflict"), exception.InvalidInput),
            ((500, "internal"), exception.InstanceDeployFailure),
        ]
        for (status, code), want in cases:
            err = bexar_driver.bexar_agent.AgentError("POST", "/v1/vms", status, code, "no")
            self.assertIsInstance(bexar_driver._build_error(self.instance, err), want)
        agent = self.useFixture(agents.FaultyAgent(
            ("status", 404, {"error": {"code": "not_found", "message": "no such VM"}})))
        d = self._driver(agent.socket)
        self.assertRaises(exception.InstanceNotFound, d.get_info, self.instance)
        d.destroy(None, self.instance, [])  # idempotent: nothing to delete is success


class _TwoAgents(integrated_helpers._IntegratedTestBase):
    microversion = "latest"
    ADMIN_API = True
    # bexar1's agent reserves all but this much memory (x4, the test agents' memory
    # allocation ratio: 300 MiB to allocate).
    TIGHT_MIB = 75

    def setUp(self):
        self.sockets = tempfile.mkdtemp(prefix="bexar-nova-sock-")
        self.addCleanup(shutil.rmtree, self.sockets, True)
        with open("/proc/meminfo") as f:
            total_mib = int(f.readline().split()[1]) // 1024
        # bexar1: placement sees 300 MiB free (its inventory is the agent's), but the agent
        # also counts 512 MiB of VMM overhead per VM, which placement cannot express: it
        # refuses a 64 MiB VM that placement let through.
        self.tight = agents.RealAgent(
            "tight", socket_path=os.path.join(self.sockets, "bexar1.sock"),
            extra_args=["--reserved-memory-mib", str(total_mib - self.TIGHT_MIB),
                        "--vm-overhead-mib", "512"])
        self.roomy = agents.RealAgent(
            "roomy", socket_path=os.path.join(self.sockets, "bexar2.sock"))
        super().setUp()

    def _setup_services(self):
        self.useFixture(self.tight)
        self.useFixture(self.roomy)
        self.flags(compute_driver="bexar.BexarDriver")
        self.flags(agent_socket=os.path.join(self.sockets, "%(host)s.sock"),
                   kernel=agents.TESTGUEST, cmdline=agents.TESTGUEST_CMDLINE,
                   request_timeout=5, group="bexar")
        self.flags(shutdown_timeout=5)
        super()._setup_services()

    def _setup_compute_service(self):
        self._start_compute("bexar1")
        return self._start_compute("bexar2")

    def _raw_image(self):
        import io
        return self.glance.create(None, {
            "name": "disk", "disk_format": "raw", "container_format": "bare",
            "size": 1 << 20}, data=io.BytesIO(b"\0" * (1 << 20)))["id"]


class RefusedAdmissionTest(_TwoAgents):

    def test_refused_admission_is_rescheduled(self):
        image = self._raw_image()
        # The scheduler weighs hosts by free memory as nova's resource tracker counts it
        # (flavors, not the agent's reserve): a first VM on bexar2 makes bexar1 the first
        # choice for the next.
        big = self._create_flavor(memory_mb=128, vcpu=1, disk=1, ephemeral=0)
        filler = self._create_server(image_uuid=image, flavor_id=big, networks="none",
                                     host="bexar2")
        flavor = self._create_flavor(memory_mb=64, vcpu=1, disk=1, ephemeral=0)
        server = self._create_server(image_uuid=image, flavor_id=flavor, networks="none")
        self.assertEqual("bexar2", server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual([], self.tight.vms())
        self.assertEqual(sorted([server["id"], filler["id"]]),
                         sorted(vm["id"] for vm in self.roomy.vms()))
        # bexar1 was tried first and refused: the build was rescheduled, not failed.
        log = self.stdlog.logger.output
        self.assertIn("over_capacity", log)
        self.assertIn("re-scheduled", log)
        self._delete_server(server)
        self._delete_server(filler)
        self.assertEqual([], self.roomy.vms())


class AgentDiesTest(_TwoAgents):

    def test_a_dead_agent_fails_the_action_and_a_restarted_one_carries_on(self):
        flavor = self._create_flavor(memory_mb=64, vcpu=1, disk=1, ephemeral=0)
        server = self._create_server(image_uuid=self._raw_image(), flavor_id=flavor,
                                     networks="none", host="bexar2")
        pid = self.roomy.vms()[0]["status"]["pid"]
        self.roomy.stop(signal.SIGKILL)
        # The VM runs on without its agent; nova's stop fails promptly and says why. (The
        # harness turns RPC casts into calls, so the compute failure also reaches the API
        # caller here; in a deployment the API has answered 202 already.)
        t = time.monotonic()
        self.assertRaises(client.OpenStackApiException, self.api.post_server_action,
                          server["id"], {"os-stop": None})
        self.assertLess(time.monotonic() - t, 15)
        server = self._wait_for_server_parameter(
            server, {"OS-EXT-STS:task_state": None, "status": "ACTIVE"}, max_retries=40)
        actions = self.api.get_instance_actions(server["id"])
        stop = [a for a in actions if a["action"] == "stop"][0]
        events = self.api.get_instance_action_details(
            server["id"], stop["request_id"])["events"]
        self.assertEqual("Error", events[0]["result"])
        os.kill(pid, 0)  # still running
        # The agent comes back, re-adopts the VMM, and nova drives the VM again.
        self.roomy.start()
        self.assertEqual(pid, self.roomy.vms()[0]["status"]["pid"])
        self._stop_server(server)
        self.assertEqual("stopped", self.roomy.vms()[0]["state"])
        self._delete_server(server)
        self.assertEqual([], self.roomy.vms())
