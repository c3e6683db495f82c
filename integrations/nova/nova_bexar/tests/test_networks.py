"""How the driver turns a neutron network into segments that span hosts (``[bexar]
segment_overlay = vxlan``): the network's VXLAN id must be the same on every host, so it is
never guessed. Against a real agent; neutron is nova's NeutronFixture, and a neutron that
fails is a stand-in (the fixture cannot fail on cue)."""

from unittest import mock

from nova import context as nova_context
from nova import exception
from nova.network import model as network_model
from nova import test
from nova.tests.fixtures import neutron as neutron_fixture

from nova_bexar import driver
from nova_bexar.tests import agents

NETWORK = neutron_fixture.NeutronFixture.network_1


def _network(net_id=NETWORK["id"]):
    subnet = network_model.Subnet(cidr="192.168.1.0/24",
                                  gateway=network_model.IP(address="192.168.1.1"))
    return network_model.Network(id=net_id, subnets=[subnet])


class SegmentOverlayTestCase(test.NoDBTestCase):

    def setUp(self):
        super().setUp()
        self.agent = self.useFixture(agents.RealAgent("networks", extra_args=[
            "--overlay-local", "10.78.0.1", "--overlay-peer", "10.78.0.2"]))
        self.neutron = self.useFixture(neutron_fixture.NeutronFixture(self))
        self.flags(agent_socket=self.agent.socket, segment_overlay="vxlan", group="bexar")
        self.driver = driver.BexarDriver(None)
        self.driver.init_host("networks")
        self.addCleanup(self.driver.cleanup_host, "networks")
        self.ctxt = nova_context.get_admin_context()

    def _segments(self):
        return {s["id"]: (s["vlan"], s.get("overlay"))
                for s in self.agent.api("GET", "/v1/segments")["items"]}

    def test_the_network_s_segmentation_id_is_the_vxlan_id(self):
        seg = self.driver._segment_for(self.ctxt, _network())
        self.assertEqual({seg: (24, "vxlan")}, self._segments())

    def test_a_neutron_that_cannot_answer_makes_no_segment(self):
        with mock.patch("nova.network.neutron.get_client",
                        side_effect=exception.NeutronAdminCredentialConfigurationInvalid()):
            self.assertRaises(exception.InvalidInput,
                              self.driver._segment_for, self.ctxt, _network())
        self.assertEqual({}, self._segments())

    def test_a_network_without_an_id_in_range_gets_the_same_one_everywhere(self):
        net = dict(NETWORK, id="0bd3a7d8-2f1e-4d5c-9e6e-1a2b3c4d5e6f")
        del net["provider:segmentation_id"]
        self.neutron._networks[net["id"]] = net
        # Pinned: every host (every version of this driver) must draw the same id, 1 plus
        # the network id's SHA-256 modulo 4094.
        seg = self.driver._segment_for(self.ctxt, _network(net["id"]))
        self.assertEqual({seg: (3284, "vxlan")}, self._segments())

    def test_a_segment_made_before_the_overlay_is_not_reused(self):
        self.agent.api("POST", "/v1/segments", {
            "id": "n-" + NETWORK["id"], "vlan": 5, "mode": "routed",
            "ipv4": {"subnet": "192.168.1.0/24"}})
        self.assertRaises(exception.InvalidInput,
                          self.driver._segment_for, self.ctxt, _network())
        self.assertEqual({"n-" + NETWORK["id"]: (5, None)}, self._segments())
