"""nova's own driver contract (``nova/tests/unit/virt/test_virt_drivers.py``,
``_VirtDriverTestCase``) run against the Bexar driver and a real agent running the test guest.

nova's contract logs a method that raises NotImplementedError instead of failing. Here that is
strict: every such method must be in ``EXPECTED_NOT_IMPLEMENTED`` (docs/nova.md explains each),
and a listed one that starts working fails the run too, so the table stays true.
"""

import io

import fixtures
from nova import test
from nova.tests.unit.virt import test_virt_drivers as tvd

from nova_bexar.tests import agents

# test name -> the driver method that is deliberately not implemented (docs/nova.md).
EXPECTED_NOT_IMPLEMENTED = {
    "test_set_admin_password": "set_admin_password",
    "test_rescue": "rescue",
    "test_unrescue_unrescued_instance": "unrescue",
    "test_unrescue_rescued_instance": "rescue",
    "test_migrate_disk_and_power_off": "migrate_disk_and_power_off",
    "test_trigger_crash_dump": "trigger_crash_dump",
    "test_soft_delete": "soft_delete",
    "test_restore_running": "restore",
    "test_restore_soft_deleted": "soft_delete",
    "test_get_volume_connector": "get_volume_connector",
    "test_get_volume_connector_storage_ip": "get_volume_connector",
    "test_attach_detach_volume": "attach_volume",
    "test_swap_volume": "attach_volume",
    "test_attach_detach_different_power_states": "attach_volume",
    "test_get_instance_diagnostics": "get_instance_diagnostics",
    "test_get_vnc_console": "get_vnc_console",
    "test_get_spice_console": "get_spice_console",
    "test_get_rdp_console": "get_rdp_console",
    "test_get_serial_console": "get_serial_console",
    "test_get_mks_console": "get_mks_console",
    "test_set_host_enabled": "set_host_enabled",
    "test_host_power_action_reboot": "host_power_action",
    "test_host_power_action_shutdown": "host_power_action",
    "test_host_power_action_startup": "host_power_action",
    "test_get_device_name_for_instance": "get_device_name_for_instance",
}

# The image _get_running_instance boots (GlanceFixture's image4, an "ami" with no data):
# given a small raw disk here so that the VM really has a root disk from glance.
CONTRACT_IMAGE = "cedef40a-ed67-4d10-800e-17455edce175"


class BexarContractTestCase(tvd._VirtDriverTestCase, test.TestCase):

    def setUp(self):
        self.driver_module = "nova_bexar.driver.BexarDriver"
        self.agent = agents.RealAgent("contract")
        super().setUp()
        self.useFixture(self.agent)
        self.flags(agent_socket=self.agent.socket, kernel=agents.TESTGUEST,
                   cmdline=agents.TESTGUEST_CMDLINE, request_timeout=30,
                   soft_reboot_timeout=5, group="bexar")
        image = self.image_service.show(self.ctxt, CONTRACT_IMAGE)
        self.image_service.delete(self.ctxt, CONTRACT_IMAGE)
        self.image_service.create(self.ctxt, image, data=io.BytesIO(b"\0" * (1 << 20)))
        self.not_implemented = []
        real_error = tvd.LOG.error

        def spy(msg, *args, **kwargs):
            if "does not implement" in msg and args and isinstance(args[0], dict):
                self.not_implemented.append(args[0]["method"])
            return real_error(msg, *args, **kwargs)

        self.useFixture(fixtures.MockPatchObject(tvd.LOG, "error", side_effect=spy))
        self.addCleanup(self._check_not_implemented)

    def _check_not_implemented(self):
        name = self._testMethodName
        expected = EXPECTED_NOT_IMPLEMENTED.get(name)
        got = self.not_implemented[0] if self.not_implemented else None
        self.assertEqual(expected, got,
                         "%s: NotImplementedError from %r, the table says %r"
                         % (name, got, expected))

    def test_live_migration(self):
        """nova's own test hands the driver data with no destination address (a destination
        that is not a Bexar host): nothing is sent, nova's rollback is called and the VM runs
        on here. (Moves between real agents: test_migration.)"""
        recovered = []
        real = self.connection.live_migration

        def live_migration(ctxt, instance, dest, post, recover, *args, **kwargs):
            def recover_spy(*a, **k):
                recovered.append(dest)
                return recover(*a, **k)
            return real(ctxt, instance, dest, post, recover_spy, *args, **kwargs)

        self.connection.live_migration = live_migration
        super().test_live_migration()
        self.assertEqual(["otherhost"], recovered)
        self.assertEqual("running", self.agent.vms()[0]["state"])
