"""A nova virt driver that runs instances as Bexar microVMs.

The driver keeps no state of its own: the local Bexar agent is the source of truth. A nova
instance is the agent VM whose id is the instance's UUID; its labels say it is nova's
(``nova``) and carry the instance's name (``nova.name``), so ``list_instances`` and a restarted
nova-compute find every instance again from the agent alone.

What maps to what (docs/nova.md has the operator's view):

- flavor vCPUs and memory -> ``vcpus``, ``memory_mib``; instance UUID -> the VM's id and its
  SMBIOS UUID (what cloud-init reads as the machine's identity);
- the image: a kernel image (``aki``) is booted directly; a disk image (``raw``, ``ami``,
  ``qcow2``) is registered with the agent's image store once (``glance-<image id>``) and the VM
  gets its own copy-on-write overlay on it, sized to the flavor's root disk; its kernel is the
  image's ``kernel_id`` (downloaded from glance once) or ``[bexar] kernel``;
- each VIF of ``network_info`` -> a NIC on the Bexar segment of its neutron network
  (``n-<network id>``, made on first use and removed with its last NIC), with the port's MAC and
  fixed addresses; the agent then filters spoofed frames and serves DHCP-less addressing;
- user data, the key pair, the host name and the instance's metadata -> the agent's instance
  metadata service (``PUT /v1/vms/{id}/metadata``), which cloud-init reads unmodified.
"""

import base64
import hashlib
import os
import re
import tempfile
import time

import netaddr
from oslo_concurrency import lockutils
from oslo_concurrency import processutils
from oslo_log import log as logging
from oslo_utils import versionutils

from nova.compute import power_state
from nova.compute import task_states
from nova import exception
from nova.image import glance
from nova.objects import fields as obj_fields
from nova.objects import migrate_data as migrate_data_obj
from nova.virt import driver
from nova.virt import event as virtevent
from nova.virt import hardware

import nova.conf

from nova_bexar import agent as bexar_agent
from nova_bexar import conf as bexar_conf

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF
bexar_conf.register_opts(CONF)

# The label every nova-made VM carries, and the one holding the instance's name.
LABEL = "nova"
NAME_LABEL = "nova.name"
# Segments the driver makes for neutron networks: "n-" and the network's UUID.
SEGMENT_PREFIX = "n-"
# Images the driver registers with the agent: "glance-" and the glance image's UUID.
IMAGE_PREFIX = "glance-"
# The snapshot a suspend saves the guest into (one per VM, deleted once it has resumed).
SUSPEND_SNAPSHOT = "nova-suspend"
# Time allowed per GiB of guest memory to write a suspend, on top of the request timeout.
SNAPSHOT_SECONDS_PER_GIB = 30
# nova's own limit for console output (what libvirt returns at most).
MAX_CONSOLE_BYTES = 100 * 1024
# How long a live migration whose answer was lost is followed, until the agents have settled
# where the VM runs (the agent asks the destination for 30 s itself, then in the background,
# the guest held paused): nova's record must not point at one host while the VM ends up on the
# other, so this waits about as long as a destination agent's restart could take.
IN_DOUBT_SECONDS = 1800
# The agent's own limit on one migration request (MIGRATE_TIMEOUT in crates/agent/src/
# migrate.rs); the completion timeout is kept under it, so that a slow copy is cancelled (the
# guest goes on here) rather than cut off.
AGENT_MIGRATE_SECONDS = 30 * 60
# How often a live migration's progress is copied into nova's migration record.
MIGRATION_POLL_SECONDS = 2
# How soon an abort or force-complete asked before the agent took the migration is passed on.
STEER_POLL_SECONDS = 0.25

POWER_STATES = {
    "running": power_state.RUNNING,
    "paused": power_state.PAUSED,
    "stopped": power_state.SHUTDOWN,
    # No VMM runs a failed VM: it is off. (CRASHED would not match the STOPPED lifecycle event
    # nova is sent, and nova drops an event whose state the driver does not confirm.)
    "failed": power_state.SHUTDOWN,
    "creating": power_state.NOSTATE,
    "deleting": power_state.NOSTATE,
}

# Agent events that change a VM's power state, and the lifecycle transition nova is told of.
# Each is emitted only if the VM is still in the matching state when the event is read, so a
# stale "stopped" of a reboot that has already started the VM again is not passed on.
EVENT_TRANSITIONS = {
    "started": ("running", virtevent.EVENT_LIFECYCLE_STARTED),
    "restarted": ("running", virtevent.EVENT_LIFECYCLE_STARTED),
    "adopted": ("running", virtevent.EVENT_LIFECYCLE_STARTED),
    "resumed": ("running", virtevent.EVENT_LIFECYCLE_RESUMED),
    "paused": ("paused", virtevent.EVENT_LIFECYCLE_PAUSED),
    "stopped": ("stopped", virtevent.EVENT_LIFECYCLE_STOPPED),
    "failed": ("failed", virtevent.EVENT_LIFECYCLE_STOPPED),
}

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# One sample of Prometheus' text format with labels, and one label in it.
_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_HOSTNAME_BAD = re.compile(r"[^A-Za-z0-9-]")
_TAG_KEY_BAD = re.compile(r"[/\n\x00]")


class BexarDriver(driver.ComputeDriver):
    """nova-compute's driver for a Bexar host."""

    capabilities = {
        "has_imagecache": False,
        "supports_evacuate": True,
        "supports_migrate_to_same_host": False,
        "supports_attach_interface": False,
        "supports_device_tagging": False,
        "supports_tagged_attach_interface": False,
        "supports_tagged_attach_volume": False,
        "supports_extend_volume": False,
        "supports_multiattach": False,
        "supports_trusted_certs": False,
        "supports_pcpus": False,
        "supports_accelerators": False,
        "supports_bfv_rescue": False,
        "supports_vtpm": False,
        "supports_socket_pci_numa_affinity": False,
        "supports_remote_managed_ports": False,
        "supports_address_space_passthrough": False,
        "supports_address_space_emulated": False,
        "supports_image_type_aki": True,
        "supports_image_type_ami": True,
        "supports_image_type_raw": True,
        "supports_image_type_qcow2": True,
        "supports_image_type_ari": False,
        "supports_image_type_iso": False,
        "supports_image_type_vdi": False,
        "supports_image_type_vhd": False,
        "supports_image_type_vhdx": False,
        "supports_image_type_vmdk": False,
        "supports_image_type_ploop": False,
    }

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi)
        self._host = None
        self._client = None
        self._events = None
        self._events_stop = False
        # nova's contract and live-migration code look here for migrations in flight.
        self.active_migrations = {}
        # Aborts and force-completes asked of a migration the agent has not taken yet.
        self._pending_steer = {}

    # ---- the agent ------------------------------------------------------------------------

    @property
    def agent(self):
        if self._client is None:
            self._client = self._make_client(self._host or CONF.host)
        return self._client

    @staticmethod
    def _make_client(host):
        path = CONF.bexar.agent_socket.replace("%(host)s", host or "")
        return bexar_agent.Client(path, timeout=CONF.bexar.request_timeout)

    def _call(self, fn, *args, instance=None, **kwargs):
        """Runs one agent call, turning its failures into nova's exceptions.

        404 on a VM is InstanceNotFound; an agent that cannot be reached, or does not answer
        within ``[bexar] request_timeout``, is HypervisorUnavailable; other refusals are left
        as AgentError for the caller to map where nova expects something specific.
        """
        try:
            return fn(*args, **kwargs)
        except bexar_agent.AgentUnavailable as e:
            LOG.error("Bexar agent unavailable: %s", e.reason, instance=instance)
            raise exception.HypervisorUnavailable(host=self._host or CONF.host) from e
        except bexar_agent.AgentError as e:
            if e.status == 404 and e.code == "not_found" and instance is not None:
                raise exception.InstanceNotFound(instance_id=instance.uuid) from e
            raise

    # ---- host ----------------------------------------------------------------------------

    def init_host(self, host):
        self._host = host
        self._client = self._make_client(host)
        try:
            info = self.agent.host()
        except bexar_agent.AgentUnavailable as e:
            # nova-compute still starts; the resource tracker reports the node as failing
            # until the agent answers.
            LOG.error("Bexar agent not reachable at start: %s", e.reason)
            info = None
        self._start_event_watch(info["last_event"] if info else None)

    def cleanup_host(self, host):
        self._events_stop = True
        if self._events is not None:
            self._events.kill()
            self._events = None

    def _host_info(self):
        return self._call(self.agent.host)

    def get_available_nodes(self, refresh=False):
        return [self._host or CONF.host]

    def node_is_available(self, nodename):
        return nodename in self.get_available_nodes()

    def get_available_resource(self, nodename):
        host = self._host_info()
        inv = host["inventory"]
        mib_per_gib = 1024
        disk = inv["disk"]
        cpu_info = {
            "arch": obj_fields.Architecture.X86_64,
            "model": host["info"].get("cpu_model", ""),
            "vendor": "",
            "features": [],
            "topology": {"cores": inv["vcpus"]["total"], "threads": 1, "sockets": 1},
        }
        return {
            "vcpus": inv["vcpus"]["total"],
            "memory_mb": inv["memory_mib"]["total"],
            "local_gb": disk["total_mib"] // mib_per_gib,
            "vcpus_used": inv["vcpus"]["allocated"],
            "memory_mb_used": inv["memory_mib"]["allocated"],
            "local_gb_used": disk["allocated_mib"] // mib_per_gib,
            "hypervisor_type": "bexar",
            "hypervisor_version": _version_int(host["info"].get("version", "0")),
            "hypervisor_hostname": nodename,
            "cpu_info": _json(cpu_info),
            "disk_available_least": disk["available_mib"] // mib_per_gib,
            "supported_instances": [(obj_fields.Architecture.X86_64,
                                     obj_fields.HVType.KVM,
                                     obj_fields.VMMode.HVM)],
            "numa_topology": None,
        }

    def update_provider_tree(self, provider_tree, nodename, allocations=None):
        """The agent's inventory, as it counts it: totals, reserves and allocation ratios.

        nova's own ``*_allocation_ratio`` and ``reserved_host_*`` options are not used: the
        agent's admission control applies its own (``bexar agent --cpu-allocation-ratio``...),
        and placement must not promise what the agent would refuse.
        """
        inv = self._host_info()["inventory"]
        vcpus, mem, disk = inv["vcpus"], inv["memory_mib"], inv["disk"]
        disk_total = disk["total_mib"] // 1024
        inventory = {
            "VCPU": {
                "total": vcpus["total"],
                "reserved": vcpus["reserved"],
                "min_unit": 1,
                "max_unit": max(1, min(vcpus["total"], 32)),
                "step_size": 1,
                "allocation_ratio": vcpus["allocation_ratio"],
            },
            "MEMORY_MB": {
                "total": mem["total"],
                # The agent also counts a few MiB per VM for its VMM (per_vm), which placement
                # cannot express; a VM that placement lets through and the agent then refuses is
                # rescheduled (over_capacity -> ComputeResourcesUnavailable).
                "reserved": mem["reserved"],
                "min_unit": 16,
                "max_unit": max(16, min(mem["total"], 1048576)),
                "step_size": 1,
                "allocation_ratio": mem["allocation_ratio"],
            },
        }
        if disk_total > 0:
            inventory["DISK_GB"] = {
                "total": disk_total,
                "reserved": min(disk_total, -(-disk["reserved_mib"] // 1024)),
                "min_unit": 1,
                "max_unit": disk_total,
                "step_size": 1,
                "allocation_ratio": disk["allocation_ratio"],
            }
        provider_tree.update_inventory(nodename, inventory)

    def get_host_ip_addr(self):
        return CONF.my_ip

    def get_host_uptime(self):
        with open("/proc/uptime") as f:
            seconds = float(f.read().split()[0])
        load = os.getloadavg()
        return "up %d days %02d:%02d, load average: %.2f, %.2f, %.2f" % (
            seconds // 86400, seconds % 86400 // 3600, seconds % 3600 // 60, *load)

    def get_host_cpu_stats(self):
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        ticks = os.sysconf("SC_CLK_TCK")
        ns = [int(v) * 1_000_000_000 // ticks for v in fields]
        mhz = 0
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("cpu MHz"):
                        mhz = int(float(line.split(":")[1]))
                        break
        except OSError:
            pass
        return {"kernel": ns[2], "idle": ns[3], "user": ns[0] + ns[1], "iowait": ns[4],
                "frequency": mhz}

    # ---- listing --------------------------------------------------------------------------

    def _nova_vms(self):
        return self._call(self.agent.list_vms, selector=LABEL)

    def list_instances(self):
        return [vm["spec"].get("labels", {}).get(NAME_LABEL, vm["id"])
                for vm in self._nova_vms()]

    def list_instance_uuids(self):
        return [vm["id"] for vm in self._nova_vms()]

    def get_num_instances(self):
        return len(self._nova_vms())

    def instance_exists(self, instance):
        try:
            self._vm(instance)
            return True
        except exception.InstanceNotFound:
            return False

    def _vm(self, instance):
        return self._call(self.agent.get_vm, instance.uuid, instance=instance)

    def get_info(self, instance, use_cache=True):
        vm = self._vm(instance)
        return hardware.InstanceInfo(state=_power_state(vm), internal_id=vm["status"].get("pid"))

    # ---- spawn and destroy ----------------------------------------------------------------

    def spawn(self, context, instance, image_meta, injected_files, admin_password,
              allocations, network_info=None, block_device_info=None, power_on=True,
              accel_info=None):
        if block_device_info and driver.block_device_info_get_mapping(block_device_info):
            raise exception.InvalidInput(
                reason="Bexar does not attach cinder volumes yet")
        try:
            spec = self._vm_spec(context, instance, image_meta, network_info)
        except bexar_agent.AgentError as e:
            raise _build_error(instance, e) from e
        try:
            self._call(self.agent.create_vm, spec, False, instance=instance)
        except bexar_agent.AgentError as e:
            self._cleanup_segments(spec)
            raise _build_error(instance, e) from e
        self._put_metadata(instance, admin_password)
        if power_on:
            try:
                self._call(self.agent.action, instance.uuid, "start", instance=instance)
            except bexar_agent.AgentError as e:
                raise exception.InstanceDeployFailure(reason=str(e)) from e
        LOG.info("Bexar VM created%s", " and started" if power_on else "", instance=instance)

    def _vm_spec(self, context, instance, image_meta, network_info):
        if not _ID_RE.match(instance.uuid):
            raise exception.InvalidInput(reason="instance UUID %s is not a Bexar VM id"
                                         % instance.uuid)
        flavor = instance.flavor
        boot, disks = self._boot_and_disks(context, instance, image_meta)
        spec = {
            "id": instance.uuid,
            "uuid": instance.uuid,
            "vcpus": flavor.vcpus,
            "memory_mib": flavor.memory_mb,
            "cpu_template": CONF.bexar.cpu_template,
            "boot": boot,
            "disks": disks,
            "nics": self._nics(context, instance, network_info or []),
            "rng": True,
            "labels": {LABEL: "1", NAME_LABEL: instance.name},
        }
        if flavor.ephemeral_gb or flavor.swap:
            LOG.warning("Flavor %s asks for ephemeral (%s GB) or swap (%s MB) disks; Bexar "
                        "gives only the root disk", flavor.name, flavor.ephemeral_gb,
                        flavor.swap, instance=instance)
        return spec

    def _boot_and_disks(self, context, instance, image_meta):
        props = image_meta.properties
        fmt = image_meta.disk_format if "disk_format" in image_meta else None
        image_id = image_meta.id if "id" in image_meta else instance.image_ref
        cmdline = (props.os_command_line if "os_command_line" in props else None) \
            or CONF.bexar.cmdline
        disks = []
        if fmt == "aki":
            kernel = self._cached_image(context, image_id)
            initrd = None
        else:
            if fmt not in ("raw", "ami", "qcow2", None):
                raise exception.ImageUnacceptable(
                    image_id=image_id,
                    reason="disk format %s: Bexar takes raw, ami, qcow2 or aki images" % fmt)
            disks.append(self._root_disk(context, instance, image_id, fmt))
            # The compute API copies the image's kernel_id/ramdisk_id properties here.
            kernel_id, ramdisk_id = instance.kernel_id, instance.ramdisk_id
            if kernel_id and kernel_id != "nokernel":
                kernel = self._cached_image(context, kernel_id)
                initrd = (self._cached_image(context, ramdisk_id)
                          if ramdisk_id and ramdisk_id != "nokernel" else None)
            elif CONF.bexar.kernel:
                kernel, initrd = CONF.bexar.kernel, CONF.bexar.initrd
            else:
                raise exception.ImageUnacceptable(
                    image_id=image_id,
                    reason="the image has no kernel_id and [bexar] kernel is not set")
            if "root=" not in cmdline:
                cmdline += " root=/dev/vda rw"
        boot = {"kernel": kernel, "cmdline": cmdline}
        if initrd:
            boot["initrd"] = initrd
        return boot, disks

    def _root_disk(self, context, instance, image_id, fmt):
        agent_image = IMAGE_PREFIX + image_id
        if not _ID_RE.match(agent_image):
            raise exception.ImageUnacceptable(image_id=image_id, reason="id is not usable")
        with lockutils.lock("bexar-image-" + image_id):
            try:
                image = self._call(self.agent.get_image, agent_image)
            except bexar_agent.AgentError as e:
                if e.status != 404:
                    raise
                image = self._register_image(context, image_id, agent_image, fmt)
        disk = {"image": agent_image}
        root_mib = instance.flavor.root_gb * 1024
        if root_mib:
            if root_mib * 1024 * 1024 < image["virtual_size"]:
                raise exception.FlavorDiskSmallerThanImage(
                    flavor_size=root_mib * 1024 * 1024, image_size=image["virtual_size"])
            disk["size_mib"] = root_mib
        return disk

    def _register_image(self, context, image_id, agent_image, fmt):
        tmp = _download(context, image_id)
        try:
            agent_fmt = {"raw": "raw", "ami": "raw", "qcow2": "qcow2"}.get(fmt)
            # The agent copies and hashes the whole image inside the request: allow for
            # 50 MB/s on top of the usual timeout.
            size_mb = os.path.getsize(tmp) / 1e6
            try:
                return self._call(self.agent.json, "POST", "/v1/images",
                                  body={"id": agent_image, "path": tmp, "format": agent_fmt},
                                  timeout=CONF.bexar.request_timeout + size_mb / 50)
            except bexar_agent.AgentError as e:
                if e.status == 400:
                    raise exception.ImageUnacceptable(image_id=image_id, reason=e.message)
                if e.code == "already_exists":
                    return self._call(self.agent.get_image, agent_image)
                raise
        finally:
            os.unlink(tmp)

    def _cached_image(self, context, image_id):
        """A kernel or initramfs from glance, downloaded once into ``[bexar] image_cache_path``."""
        if not re.match(r"^[A-Za-z0-9._-]+$", image_id or ""):
            raise exception.ImageUnacceptable(image_id=image_id, reason="bad image id")
        path = os.path.join(os.path.abspath(CONF.bexar.image_cache_path), image_id)
        with lockutils.lock("bexar-image-" + image_id):
            if not os.path.exists(path):
                tmp = _download(context, image_id)
                try:
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())
                    os.rename(tmp, path)
                except BaseException:
                    os.unlink(tmp)
                    raise
        return path

    def _nics(self, context, instance, network_info):
        nics = []
        for vif in network_info:
            network = vif.get("network") or {}
            segment = self._segment_for(context, network)
            nic = {"segment": segment}
            if vif.get("address"):
                nic["mac"] = vif["address"]
            for subnet in network.get("subnets", []):
                ips = subnet.get("ips") or []
                if not ips:
                    continue
                key = "ipv6" if _ip_version(subnet) == 6 else "ipv4"
                nic.setdefault(key, ips[0]["address"])
            nics.append(nic)
        return nics

    def _segment_for(self, context, network):
        seg_id = SEGMENT_PREFIX + str(network.get("id", ""))
        if not _ID_RE.match(seg_id):
            raise exception.InvalidInput(reason="network id %r is not usable" % network.get("id"))
        body = {"id": seg_id, "mode": CONF.bexar.segment_mode}
        overlay = CONF.bexar.segment_overlay
        for subnet in network.get("subnets", []):
            gateway = subnet.get("gateway") or {}
            gw = gateway.get("address") if gateway else None
            if _ip_version(subnet) == 4 and "ipv4" not in body:
                body["ipv4"] = {"subnet": _network(subnet)}
                if gw:
                    body["ipv4"]["gateway"] = gw
            elif _ip_version(subnet) == 6 and "ipv6" not in body:
                body["ipv6"] = {"prefix": _network(subnet)}
                if gw:
                    body["ipv6"]["gateway"] = gw
        if body["mode"] == "routed" and "ipv4" not in body and "ipv6" not in body:
            body["mode"] = "bridged"
        if overlay:
            # One layer-2 domain across hosts: the tunnel's id (the segment's VLAN) must be
            # the same on every host, so it is the network's, never the first one free here.
            body["overlay"] = overlay
            body["vlan"] = self._network_vni(context, network)
        with lockutils.lock("bexar-segments"):
            segments = self._call(self.agent.segments)
            for seg in segments:
                if seg["id"] == seg_id:
                    # Made earlier here: it must be what this network is now everywhere.
                    if overlay and (seg.get("overlay") != overlay
                                    or seg.get("vlan") != body["vlan"]):
                        raise exception.InvalidInput(
                            reason="segment %s exists here as VLAN %s, overlay %s, not as "
                                   "this network's VXLAN id %d: remove it (with its VMs) "
                                   "first" % (seg_id, seg.get("vlan"), seg.get("overlay"),
                                              body["vlan"]))
                    return seg_id
            used = {seg["vlan"]: seg["id"] for seg in segments}
            if overlay and body["vlan"] in used:
                clash = (network.get("id"), used[body["vlan"]], body["vlan"])
                raise exception.InvalidInput(
                    reason="network %s and segment %s would share VXLAN id %d on this host; "
                           "give the network a provider:segmentation_id of 1-4094 that no "
                           "other network here has" % clash)
            if not overlay:
                vlan = network.get_meta("vlan") if hasattr(network, "get_meta") else None
                if not vlan or vlan in used:
                    vlan = next(v for v in range(1, 4095) if v not in used)
                body["vlan"] = int(vlan)
            try:
                self._call(self.agent.create_segment, body)
            except bexar_agent.AgentError as e:
                raise exception.InvalidInput(
                    reason="network %s cannot be a Bexar segment: %s" % (network.get("id"), e)
                ) from e
        return seg_id

    @staticmethod
    def _network_vni(context, network):
        """The VXLAN id of a neutron network on every host: its ``provider:segmentation_id``
        when that is 1-4094 (the agent's range: a segment's VXLAN id is its VLAN), else one
        drawn from its UUID (the same everywhere; a clash with another network on a host is
        refused there)."""
        from nova import context as nova_context
        from nova.network import neutron
        net_id = str(network.get("id", ""))
        try:
            client = neutron.get_client(context or nova_context.get_admin_context(),
                                        admin=True)
            net = client.show_network(net_id).get("network", {})
        except Exception as e:
            # Never a guess: another host that reached neutron would use the network's own
            # id, and the network would be split in two. The spawn or move fails instead.
            raise exception.InvalidInput(
                reason="network %s: its segmentation id could not be read from neutron: %s"
                       % (net_id, e)) from e
        ids = [net.get("provider:segmentation_id")] + [
            seg.get("provider:segmentation_id") for seg in net.get("segments") or []]
        for vni in ids:
            if isinstance(vni, int) and 1 <= vni <= 4094:
                return vni
        LOG.info("Network %s has no segmentation id of 1-4094; one is drawn from its UUID",
                 net_id)
        return 1 + int(hashlib.sha256(net_id.encode()).hexdigest(), 16) % 4094

    def _cleanup_segments(self, spec):
        """Removes the segments of these NICs that no other VM uses (409 in_use: kept)."""
        for seg in {nic["segment"] for nic in spec.get("nics", []) if nic.get("segment")}:
            if not seg.startswith(SEGMENT_PREFIX):
                continue
            with lockutils.lock("bexar-segments"):
                try:
                    self._call(self.agent.delete_segment, seg)
                except bexar_agent.AgentError as e:
                    if e.code not in ("in_use", "not_found"):
                        LOG.warning("Could not remove segment %s: %s", seg, e)

    def _put_metadata(self, instance, admin_password):
        md = {"hostname": _hostname(instance)}
        if instance.user_data:
            try:
                md["user_data"] = base64.b64decode(instance.user_data).decode("utf-8")
            except (ValueError, UnicodeDecodeError) as e:
                raise exception.InvalidInput(
                    reason="user data must be UTF-8 text for Bexar's metadata service") from e
        if instance.key_data:
            md["public_keys"] = [line for line in instance.key_data.splitlines() if line]
        tags = {}
        for k, v in (instance.metadata or {}).items():
            if k and not _TAG_KEY_BAD.search(k) and len(k) <= 253 and len(v or "") <= 253 \
                    and "\n" not in (v or ""):
                tags[k] = v or ""
        if tags:
            md["tags"] = dict(list(tags.items())[:64])
        try:
            self._call(self.agent.put_metadata, instance.uuid, md, instance=instance)
        except bexar_agent.AgentError as e:
            raise exception.InvalidInput(reason="metadata refused: %s" % e) from e

    def destroy(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        """Deletes the VM, its overlay disks and the segments it alone used. Idempotent."""
        try:
            vm = self._vm(instance)
        except exception.InstanceNotFound:
            LOG.debug("Bexar VM already gone", instance=instance)
            return
        try:
            self._call(self.agent.delete_vm, instance.uuid, instance=instance)
        except exception.InstanceNotFound:
            pass  # deleted meanwhile: gone either way
        except bexar_agent.AgentError as e:
            raise exception.InstanceTerminationFailure(reason=str(e)) from e
        self._cleanup_segments(vm.get("spec", {}))

    def cleanup(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, migrate_data=None, destroy_vifs=True,
                destroy_secrets=True):
        self.destroy(context, instance, network_info, block_device_info, destroy_disks)

    # ---- power ----------------------------------------------------------------------------

    def _action(self, instance, verb, query=None, timeout=None, failure=None):
        try:
            return self._call(self.agent.action, instance.uuid, verb, query=query,
                              timeout=timeout, instance=instance)
        except bexar_agent.AgentError as e:
            if e.code == "illegal_transition":
                raise exception.InstanceInvalidState(
                    attr="state", instance_uuid=instance.uuid, state=e.message,
                    method=verb) from e
            if failure is not None:
                raise failure(reason=str(e)) from e
            raise

    def power_off(self, instance, timeout=0, retry_interval=0):
        """Stops the guest: Ctrl-Alt-Del and up to ``timeout`` s to shut down, then it is ended."""
        if timeout:
            self._action(instance, "stop", query={"timeout": timeout},
                         timeout=timeout + CONF.bexar.stop_timeout_margin +
                         CONF.bexar.request_timeout,
                         failure=exception.InstancePowerOffFailure)
        else:
            self._action(instance, "stop", query={"force": True},
                         failure=exception.InstancePowerOffFailure)

    def power_on(self, context, instance, network_info, block_device_info=None,
                 accel_info=None):
        vm = self._vm(instance)
        if vm["state"] == "running":
            return
        if vm["state"] == "paused":
            self._action(instance, "resume", failure=exception.InstancePowerOnFailure)
            return
        if vm["state"] == "failed":
            self._action(instance, "stop", query={"force": True})
        self._action(instance, "start", failure=exception.InstancePowerOnFailure)

    def reboot(self, context, instance, network_info, reboot_type, block_device_info=None,
               bad_volumes_callback=None, accel_info=None):
        """SOFT: the guest is asked to shut down (``reboot_timeout``), then it is ended and
        started again. HARD: ended at once and started again; also brings back a stopped or
        failed VM, and re-creates it if the agent has lost it, as nova expects of a hard reboot.
        """
        if reboot_type == "SOFT":
            timeout = CONF.bexar.soft_reboot_timeout
            self._action(instance, "reboot", query={"timeout": timeout},
                         timeout=timeout + CONF.bexar.stop_timeout_margin +
                         CONF.bexar.request_timeout,
                         failure=exception.InstanceRebootFailure)
            return
        try:
            self._vm(instance)
        except exception.InstanceNotFound:
            LOG.warning("Hard reboot of a VM the agent does not have: creating it again",
                        instance=instance)
            from nova import context as nova_context
            ctx = context or nova_context.get_admin_context()
            self.spawn(ctx, instance, instance.image_meta, [], None, {},
                       network_info=network_info, block_device_info=block_device_info)
            return
        self._action(instance, "stop", query={"force": True},
                     failure=exception.InstanceRebootFailure)
        # Fresh: a suspended VM's saved state is dropped, as libvirt drops a managed save.
        self._action(instance, "start", query={"fresh": True},
                     failure=exception.InstanceRebootFailure)
        self._forget_suspend(instance)

    def pause(self, instance):
        self._action(instance, "pause", failure=_failure("pause"))

    def unpause(self, instance):
        self._action(instance, "resume", failure=_failure("unpause"))

    def suspend(self, context, instance):
        """Saves the guest's state (memory, vCPUs, devices) under the VM and ends its VMM: it
        holds no CPU or memory until ``resume`` restores it, where it was."""
        self._forget_suspend(instance)
        try:
            self._call(self.agent.json, "POST", "/v1/vms/%s/snapshot" % instance.uuid,
                       body={"name": SUSPEND_SNAPSHOT, "then": "suspend"}, instance=instance,
                       timeout=CONF.bexar.request_timeout + SNAPSHOT_SECONDS_PER_GIB *
                       max(1, instance.flavor.memory_mb // 1024))
            # The agent answers once the snapshot is durable; the VMM's end is recorded a
            # moment later. nova reads the power state right after this returns.
            self._call(self.agent.json, "GET", "/v1/vms/%s/wait" % instance.uuid,
                       query={"state": "stopped", "timeout": CONF.bexar.request_timeout},
                       instance=instance, timeout=CONF.bexar.request_timeout + 5)
        except bexar_agent.AgentError as e:
            if e.code == "illegal_transition":
                raise exception.InstanceInvalidState(
                    attr="state", instance_uuid=instance.uuid, state=e.message,
                    method="suspend") from e
            raise exception.NovaException("suspend failed: %s" % e) from e

    def resume(self, context, instance, network_info, block_device_info=None):
        """Restores a suspended VM; brings back a stopped one; a running one is left alone."""
        vm = self._vm(instance)
        if vm["state"] in ("stopped", "failed"):
            self._action(instance, "start", failure=exception.InstanceResumeFailure)
        elif vm["state"] == "paused":
            self._action(instance, "resume", failure=exception.InstanceResumeFailure)
        self._forget_suspend(instance)

    def _forget_suspend(self, instance):
        """Deletes the suspend snapshot once it is no longer needed (the VM keeps its own links
        while a restore is pending, so this never takes a resume's state away)."""
        try:
            self._call(self.agent.request, "DELETE",
                       "/v1/vms/%s/snapshots/%s" % (instance.uuid, SUSPEND_SNAPSHOT),
                       instance=instance)
        except (bexar_agent.AgentError, exception.InstanceNotFound):
            pass

    def snapshot(self, context, instance, image_id, update_task_state):
        """A glance image of the VM's root disk: its overlay flattened onto its base image.

        A running or paused VM is suspended for the moment its overlay is copied (its VMM
        flushes the overlay as it ends) and restored at once, so the guest sees one pause of
        about a suspend, a copy of what it wrote and a restore; the slow part, flattening and
        uploading, runs while it runs on. A stopped VM's overlay is read as it is.
        """
        try:
            vm = self._vm(instance)
        except exception.InstanceNotFound as e:
            raise exception.InstanceNotRunning(instance_id=instance.uuid) from e
        disks = vm.get("disks") or []
        if not disks or not disks[0].get("path"):
            raise exception.InvalidInput(reason="the VM has no root disk to snapshot")
        update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
        was = vm["state"]
        with tempfile.TemporaryDirectory(prefix="bexar-snapshot-",
                                         dir=CONF.bexar.image_cache_path
                                         if os.path.isdir(CONF.bexar.image_cache_path)
                                         else None) as tmp:
            copy = os.path.join(tmp, "root.copy")
            if was in ("running", "paused"):
                t0 = time.monotonic()
                try:
                    self.suspend(context, instance)
                    _copy_disk(disks[0]["path"], copy)
                finally:
                    self._bring_back(instance, was)
                    LOG.info("Snapshot: the guest was stopped for %.0f ms (suspend, copy of "
                             "its overlay, restore)", (time.monotonic() - t0) * 1000,
                             instance=instance)
            else:
                _copy_disk(disks[0]["path"], copy)
            out = os.path.join(tmp, "root.qcow2")
            processutils.execute("qemu-img", "convert", "-q", "-O", "qcow2", copy, out)
            update_task_state(task_state=task_states.IMAGE_UPLOADING,
                              expected_state=task_states.IMAGE_PENDING_UPLOAD)
            image_api = glance.API()
            snapshot = image_api.get(context, image_id)
            props = {"image_location": "snapshot", "image_state": "available",
                     "owner_id": instance.project_id}
            for key in ("kernel_id", "ramdisk_id"):
                if instance.get(key):
                    props[key] = instance[key]
            cmdline = vm["spec"]["boot"].get("cmdline")
            if cmdline:
                props["os_command_line"] = cmdline
            metadata = {"name": snapshot["name"], "status": "active",
                        "disk_format": "qcow2", "container_format": "bare",
                        "properties": props}
            with open(out, "rb") as f:
                image_api.update(context, image_id, metadata, f, purge_props=False)
        LOG.info("Snapshot image upload complete", instance=instance)

    def _bring_back(self, instance, was):
        """After a snapshot's suspend: restores the VM if (and only if) it is suspended, as it
        was (running or paused). Logs what fails rather than hiding the snapshot's own error."""
        try:
            vm = self._vm(instance)
            if vm["state"] == "stopped" and vm.get("restore_pending"):
                self._action(instance, "start")
                if was == "paused":
                    self._action(instance, "pause")
            self._forget_suspend(instance)
        except Exception as e:  # noqa: BLE001 - reported, the caller's error wins
            LOG.error("Snapshot: could not bring the VM back as it was (%s): %s", was, e,
                      instance=instance)

    def resume_state_on_host_boot(self, context, instance, network_info,
                                  block_device_info=None):
        """After the host rebooted: the VM runs again if nova says it should."""
        vm = self._vm(instance)
        if vm["state"] in ("stopped", "failed"):
            self.power_on(context, instance, network_info, block_device_info)

    def poll_rebooting_instances(self, timeout, instances):
        # A reboot is one agent request that ends with the VM running or failed; nothing to poll.
        pass

    def get_instance_disk_info(self, instance, block_device_info=None):
        """The VM's disks as nova's block migration describes them (JSON list)."""
        disks = []
        for disk in self._vm(instance).get("disks", []):
            path = disk.get("path")
            if not path:
                continue
            try:
                used = os.stat(path).st_blocks * 512
            except OSError:
                used = 0
            size = int(disk.get("size") or 0)
            disks.append({"type": disk.get("format", "raw"), "path": path,
                          "virt_disk_size": size, "backing_file": "",
                          "disk_size": used,
                          "over_committed_disk_size": max(0, size - used)})
        return _json(disks)

    # ---- live migration -------------------------------------------------------------------

    def _migration_address(self):
        """Where other hosts' agents send this host VMs: ``[bexar] migration_address``, else
        the agent's own listener (a wildcard address replaced by ``my_ip``); None if the agent
        takes no migrations."""
        if CONF.bexar.migration_address:
            return CONF.bexar.migration_address
        listen = self._host_info()["info"].get("migration_listen")
        if not listen:
            return None
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        if netaddr.IPAddress(host).format() in ("0.0.0.0", "::"):
            host = CONF.my_ip
        return "[%s]:%s" % (host, port) if ":" in host else "%s:%s" % (host, port)

    def check_can_live_migrate_destination(self, context, instance, src_compute_info,
                                           dst_compute_info, block_migration=False,
                                           disk_over_commit=False):
        """On the destination: this host's agent must take migrations. Bexar hosts share no
        storage, so the answer is always a block migration ("auto" becomes one); capacity,
        CPU features and base images are checked by the agent itself when the VM is offered.

        nova's LibvirtLiveMigrateData carries the answer (a driver's own type could not cross
        nova-conductor, which loads no virt driver); ``target_connect_addr`` is the agent's
        migration address."""
        address = self._migration_address()
        if not address:
            raise exception.MigrationPreCheckError(
                reason="the Bexar agent on %s takes no live migrations (bexar agent "
                       "--migration-listen, with its certificates)" % (self._host or CONF.host))
        data = migrate_data_obj.LibvirtLiveMigrateData()
        data.block_migration = block_migration is not False
        data.disk_over_commit = bool(disk_over_commit)
        data.is_shared_block_storage = False
        data.is_shared_instance_path = False
        data.target_connect_addr = address
        data.graphics_listen_addr_vnc = None
        data.graphics_listen_addr_spice = None
        data.serial_listen_addr = None
        return data

    def cleanup_live_migration_destination_check(self, context, dest_check_data):
        pass

    def check_can_live_migrate_source(self, context, instance, dest_check_data,
                                      block_device_info=None):
        """On the source: the VM must be running here (the agent moves running VMs), and its
        local disks can only move as a block migration."""
        vm = self._vm(instance)
        if vm["state"] != "running" or vm.get("operation"):
            raise exception.MigrationPreCheckError(
                reason="Bexar moves running VMs only; this one is %s%s" % (
                    vm["state"], " (%s under way)" % vm["operation"]["kind"]
                    if vm.get("operation") else ""))
        if block_device_info and driver.block_device_info_get_mapping(block_device_info):
            raise exception.MigrationPreCheckError(reason="Bexar VMs have no cinder volumes")
        local = [d.get("path") for d in vm.get("disks", []) if d.get("path")]
        if local and not dest_check_data.block_migration:
            raise exception.InvalidLocalStorage(
                path=local[0],
                reason="Bexar hosts share no storage: the VM's disks move only with block "
                       "migration")
        return dest_check_data

    def pre_live_migration(self, context, instance, block_device_info, network_info,
                           disk_info, migrate_data):
        """On the destination, before the VM is sent: what its agent checks the VM against is
        made ready here, as a spawn would make it: the base image of its root disk registered
        with the agent, its kernel and initramfs in the image cache, and the segments of its
        networks."""
        if block_device_info and driver.block_device_info_get_mapping(block_device_info):
            raise exception.MigrationError(reason="Bexar does not attach cinder volumes")
        try:
            self._boot_and_disks(context, instance, instance.image_meta)
            for vif in network_info or []:
                self._segment_for(context, vif.get("network") or {})
        except bexar_agent.AgentError as e:
            raise exception.MigrationError(reason=str(e)) from e
        return migrate_data

    def live_migration(self, context, instance, dest, post_method, recover_method,
                       block_migration=False, migrate_data=None):
        """On the source: the agent sends the running VM, with its memory, local disks, NICs,
        metadata and console log, to the destination's agent and answers when it runs there
        (``post_method``) or goes on here (``recover_method``).

        While it runs, its progress goes into nova's migration record, and one that takes
        longer than ``[bexar] live_migration_completion_timeout`` is cancelled. A migration
        in doubt (the answer lost: the agents settle it between them, the guest held paused
        meanwhile) is followed until the VM runs on one host or the other."""
        address = None
        if migrate_data is not None and "target_connect_addr" in migrate_data:
            address = migrate_data.target_connect_addr
        if not address:
            LOG.error("Live migration to %s: no Bexar migration address from the destination; "
                      "the VM goes on here", dest, instance=instance)
            recover_method(context, instance, dest, migrate_data)
            return
        # From here on an abort or force-complete is this migration's, even before the agent
        # has taken it (the driver passes it on then: _watch_migration).
        self.active_migrations[instance.uuid] = migrate_data
        self._pending_steer[instance.uuid] = set()
        body = {"destination": address, "downtime_ms": CONF.bexar.live_migration_downtime}
        if CONF.bexar.live_migration_bandwidth:
            body["max_bandwidth_mib"] = CONF.bexar.live_migration_bandwidth
        try:
            vm = self._vm(instance)
        except Exception:
            self.active_migrations.pop(instance.uuid, None)
            self._pending_steer.pop(instance.uuid, None)
            raise
        gib = max(1.0, (instance.flavor.memory_mb * (1 << 20) +
                        sum(int(d.get("size") or 0) for d in vm.get("disks", []))) / (1 << 30))
        limit = CONF.bexar.live_migration_completion_timeout * gib
        cap = AGENT_MIGRATE_SECONDS - 60
        if not limit or limit > cap:
            limit = cap
        migration = migrate_data.migration if migrate_data.obj_attr_is_set("migration") \
            else None
        monitor = _spawn(self._watch_migration, instance, migration, limit)
        outcome, failure = None, None
        try:
            outcome = self._call(
                self.agent.json, "POST", "/v1/vms/%s/migrate" % instance.uuid, body=body,
                instance=instance,
                # The agent ends the request itself (the stream's own timeouts, a cancel);
                # this only keeps a lost agent from holding the migration for ever.
                timeout=CONF.bexar.request_timeout + AGENT_MIGRATE_SECONDS + 120)
        except bexar_agent.AgentError as e:
            LOG.warning("Live migration to %s (%s) ended: %s", dest, address, e,
                        instance=instance)
            failure = e
        except exception.HypervisorUnavailable as e:
            failure = e
        finally:
            if monitor is not None:
                monitor.kill()
            self.active_migrations.pop(instance.uuid, None)
            self._pending_steer.pop(instance.uuid, None)
        if outcome is not None:
            LOG.info("Live migration to %s done: %s", dest, outcome.get("migration"),
                     instance=instance)
            self._migration_done(migration, outcome)
            post_method(context, instance, dest, block_migration, migrate_data)
            return
        # A refusal (4xx: the VM, the destination or a cancel) left the VM as it was here; a
        # failure on the way (502) or an agent lost may have left it in doubt.
        definite = isinstance(failure, bexar_agent.AgentError) and failure.status < 500
        where = "here" if definite else self._where_is(instance)
        if where == "here":
            status = "cancelled" if getattr(failure, "code", None) == "migration_cancelled" \
                else "failed"
            recover_method(context, instance, dest, migrate_data, migration_status=status)
        elif where == "gone":
            LOG.warning("Live migration to %s: the answer was lost, but the VM left this host",
                        dest, instance=instance)
            post_method(context, instance, dest, block_migration, migrate_data)
        else:
            raise exception.MigrationError(
                reason="live migration to %s not settled (%s): the VM may run there or be "
                       "held paused here; see both hosts' agents (GET /v1/vms/%s) before "
                       "acting on it" % (dest, failure, instance.uuid))

    def _where_is(self, instance):
        """After a migration request that did not answer "moved": "here" once the VM runs (or
        is paused) here with no migration under way, "gone" once this agent no longer has it,
        None if its VMM ended mid-move (it may run there) or nothing is settled within
        ``IN_DOUBT_SECONDS``."""
        deadline = time.monotonic() + IN_DOUBT_SECONDS
        while True:
            try:
                vm = self._vm(instance)
                if not vm.get("operation"):
                    # No migration under way any more: the guest goes on here (paused if it
                    # could not be resumed after the agents settled it; stopped if it shut
                    # itself down meanwhile).
                    if vm["state"] in ("running", "paused", "stopped"):
                        return "here"
                    # Its VMM ended mid-move without saying it handed the VM over: it may
                    # run on the destination. Neither rollback nor post-migration is safe.
                    if vm["state"] == "failed":
                        return None
            except exception.InstanceNotFound:
                return "gone"
            except (exception.HypervisorUnavailable, bexar_agent.AgentError):
                pass
            if time.monotonic() > deadline:
                return None
            time.sleep(1)

    def _watch_migration(self, instance, migration, limit):
        """Copies the agent's progress into nova's migration record (``memory_*`` count the
        memory and disk bytes together: the agent reports them as one stream) and cancels a
        migration that outlasts ``limit`` seconds."""
        start = time.monotonic()
        progress_at = start
        timed_out = False
        while True:
            time.sleep(STEER_POLL_SECONDS)
            pending = self._pending_steer.get(instance.uuid, set())
            if not timed_out and time.monotonic() - start > limit:
                timed_out = True
                LOG.warning("Live migration took over %d s "
                            "([bexar] live_migration_completion_timeout): cancelling it",
                            limit, instance=instance)
                pending.add("cancel")
            for verb in sorted(pending):
                try:
                    self.agent.action(instance.uuid, "migrate/" + verb)
                    pending.discard(verb)
                except bexar_agent.AgentError as e:
                    if e.code != "illegal_transition":
                        # Too late (the switch-over has begun): it completes.
                        LOG.warning("migrate/%s refused: %s", verb, e, instance=instance)
                        pending.discard(verb)
                except Exception as e:  # noqa: BLE001 - asked again at the next look
                    LOG.debug("migrate/%s not passed on yet: %s", verb, e)
            if time.monotonic() - progress_at < MIGRATION_POLL_SECONDS:
                continue
            progress_at = time.monotonic()
            try:
                vm = self.agent.get_vm(instance.uuid)
                progress = (vm.get("operation") or {}).get("progress")
                if progress and migration is not None:
                    migration.memory_processed = progress["bytes_sent"]
                    migration.memory_remaining = progress["left_bytes"]
                    migration.memory_total = progress["bytes_sent"] + progress["left_bytes"]
                    migration.save()
            except Exception as e:  # noqa: BLE001 - progress only; the watch goes on
                LOG.debug("migration progress not read or saved: %s", e)

    @staticmethod
    def _migration_done(migration, outcome):
        report = outcome.get("migration") or {}
        if migration is None or "bytes_sent" not in report:
            return
        migration.memory_total = migration.memory_processed = report["bytes_sent"]
        migration.memory_remaining = 0
        try:
            migration.save()
        except Exception as e:  # noqa: BLE001 - progress only
            LOG.debug("migration progress not saved: %s", e)

    def live_migration_abort(self, instance):
        """Cancels the migration before its switch-over: the guest goes on here, untouched, and
        the agent's migration request ends "cancelled" (nova rolls back). Once the switch-over
        has begun it completes (MigrationError)."""
        self._steer_migration(instance, "cancel", "aborted")

    def live_migration_force_complete(self, instance):
        """Has the migration switch over after the round it is copying, whatever its downtime
        budget (the rest of that round without the bandwidth limit): the guest's pause may be
        longer than ``live_migration_downtime``, as with libvirt's forced completion."""
        self._steer_migration(instance, "complete", "completed now")

    def _steer_migration(self, instance, verb, done):
        """``POST /v1/vms/{id}/migrate/<verb>``. No migration under way (it has just ended) is
        nothing to do; another refusal is nova's MigrationError."""
        try:
            self._call(self.agent.action, instance.uuid, "migrate/" + verb, instance=instance)
        except bexar_agent.AgentError as e:
            if e.code == "illegal_transition":
                pending = self._pending_steer.get(instance.uuid)
                if pending is not None:
                    # This driver is migrating it, and the agent has not taken it yet: passed
                    # on as soon as it has.
                    pending.add(verb)
                    LOG.info("Live migration to be %s once the agent has taken it", done,
                             instance=instance)
                    return
                LOG.warning("No live migration to be %s: %s", done, e.message,
                            instance=instance)
                return
            raise exception.MigrationError(
                reason="the live migration cannot be %s: %s" % (done, e.message)) from e

    def post_live_migration(self, context, instance, block_device_info, migrate_data=None):
        # The source agent deleted the VM (and its disks) itself once it ran there.
        pass

    def post_live_migration_at_source(self, context, instance, network_info):
        """The VM left: the segments of its networks go if no other VM here uses them."""
        self._cleanup_segments({"nics": self._nic_segments(network_info)})

    def post_live_migration_at_destination(self, context, instance, network_info,
                                           block_migration=False, block_device_info=None):
        vm = self._vm(instance)
        LOG.info("Live migration arrived: the VM is %s here", vm["state"], instance=instance)

    def rollback_live_migration_at_source(self, context, instance, migrate_data):
        # The agent let the guest go on here untouched; nothing to undo.
        pass

    def rollback_live_migration_at_destination(self, context, instance, network_info,
                                               block_device_info, destroy_disks=True,
                                               migrate_data=None):
        """The VM stayed on the source. The agent here already removed any copy it was
        receiving; what pre_live_migration made for it (segments) goes if unused. A VM that
        runs here is never touched: that would be the agents' in-doubt case, theirs to settle."""
        try:
            vm = self._vm(instance)
            if vm["state"] in ("running", "paused"):
                LOG.error("Rollback of a live migration, but the VM runs here: left alone",
                          instance=instance)
                return
            # A copy still arriving, or being removed, is the agent's to remove: waited for
            # (its segments can go only after it).
            deadline = time.monotonic() + CONF.bexar.request_timeout
            while (vm["state"] == "deleting" or vm.get("operation")) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
                vm = self._vm(instance)
            if vm["state"] != "deleting" and not vm.get("operation"):
                self._call(self.agent.delete_vm, instance.uuid, instance=instance)
        except exception.InstanceNotFound:
            pass
        except (bexar_agent.AgentError, exception.HypervisorUnavailable) as e:
            LOG.warning("Rollback of a live migration: the copy here not removed: %s", e,
                        instance=instance)
        self._cleanup_segments({"nics": self._nic_segments(network_info)})

    def _nic_segments(self, network_info):
        return [{"segment": SEGMENT_PREFIX + str((vif.get("network") or {}).get("id", ""))}
                for vif in network_info or []]

    # ---- diagnostics ----------------------------------------------------------------------

    def _vm_figures(self, instance):
        """The VM's figures from the agent's ``/v1/metrics`` (what its VMM and cgroup count):
        ``{"cpu_ns", "memory_bytes", "disks": [...], "nics": [...]}``, devices in the VM's
        order (each a dict of the device's counters)."""
        vm = self._vm(instance)
        _, _, data = self._call(self.agent.request, "GET", "/v1/metrics", instance=instance)
        figures = {"vm": vm, "cpu_ns": None, "memory_bytes": None, "devices": {}}
        for line in data.decode("utf-8", "replace").splitlines():
            m = _METRIC_RE.match(line)
            if not m:
                continue
            name, labels, value = m.group(1), dict(_LABEL_RE.findall(m.group(2))), m.group(3)
            if labels.get("vm") != instance.uuid:
                continue
            if name == "bexar_vm_cgroup_cpu_seconds_total":
                figures["cpu_ns"] = int(float(value) * 1e9)
            elif name == "bexar_vm_cgroup_memory_bytes":
                figures["memory_bytes"] = int(float(value))
            elif name == "bexar_vm_device_total" and labels.get("device") in ("block", "net"):
                key = (labels["device"], int(labels.get("slot", 0)))
                figures["devices"].setdefault(key, {})[labels.get("counter")] = \
                    int(float(value))
        for kind, name in (("block", "disks"), ("net", "nics")):
            figures[name] = [c for (k, _), c in sorted(figures["devices"].items()) if k == kind]
        return figures

    def get_diagnostics(self, instance):
        """nova's legacy diagnostics (``GET /servers/{id}/diagnostics`` before microversion
        2.48): the VM's CPU time and memory from its cgroup (absent without one), and each
        disk's (``vda``...) and NIC's (its TAP's name) byte and request counts from its VMM.
        Requests are counted per device, not per direction: ``_requests`` is their sum."""
        f = self._vm_figures(instance)
        vm = f["vm"]
        out = {"memory": vm["spec"]["memory_mib"] * 1024}
        if f["cpu_ns"] is not None:
            out["cpu_time"] = f["cpu_ns"]
        if f["memory_bytes"] is not None:
            out["memory_used"] = f["memory_bytes"] // 1024
        started = vm["status"].get("started_ms")
        if vm["state"] in ("running", "paused") and started:
            out["uptime"] = max(0, int(time.time() - started / 1000))
        for i, c in enumerate(f["disks"]):
            name = "vd" + chr(ord("a") + i) if i < 26 else "vd%d" % i
            out.update({name + "_read": c.get("read_bytes", 0),
                        name + "_write": c.get("written_bytes", 0),
                        name + "_requests": c.get("requests", 0),
                        name + "_errors": c.get("io_errors", 0) + c.get("refused", 0)})
        for nic, c in zip(vm.get("nics") or [], f["nics"]):
            name = nic.get("tap") or nic.get("mac")
            # The guest reads what the host received for it, and writes what it sends.
            out.update({name + "_rx": c.get("read_bytes", 0),
                        name + "_tx": c.get("written_bytes", 0),
                        name + "_requests": c.get("requests", 0),
                        name + "_errors": c.get("io_errors", 0) + c.get("refused", 0)})
        return out

    def block_stats(self, instance, disk_id):
        """``[rd_req, rd_bytes, wr_req, wr_bytes, errors]`` of disk ``vda``, ``vdb``...: the
        VMM counts requests per device, not per direction, so the request counts are None."""
        m = re.match(r"^(?:/dev/)?vd([a-z])$", disk_id or "")
        f = self._vm_figures(instance)
        index = ord(m.group(1)) - ord("a") if m else -1
        if not 0 <= index < len(f["disks"]):
            return [None, None, None, None, None]
        c = f["disks"][index]
        return [None, c.get("read_bytes", 0), None, c.get("written_bytes", 0),
                c.get("io_errors", 0) + c.get("refused", 0)]

    # ---- console --------------------------------------------------------------------------

    def get_console_output(self, context, instance):
        _, data = self._call(self.agent.console, instance.uuid, instance=instance)
        return data[-MAX_CONSOLE_BYTES:].decode("utf-8", "replace")

    # ---- events ---------------------------------------------------------------------------

    def _start_event_watch(self, since):
        try:
            import eventlet
        except ImportError:  # pragma: no cover - nova always has eventlet
            return
        self._events_stop = False
        self._events = eventlet.spawn(self._watch_events, since)

    def _watch_events(self, since):
        """Follows the agent's event stream and tells nova of power-state changes it did not
        cause itself (a guest that shut down or crashed). Reconnects with backoff."""
        backoff = 1.0
        while not self._events_stop:
            try:
                if since is None:
                    since = self.agent.host()["last_event"]
                conn, resp = self.agent.events(since, timeout=None)
                backoff = 1.0
                try:
                    for line in resp:
                        since = self._handle_event_line(line, since)
                        if self._events_stop:
                            return
                finally:
                    conn.close()
            except Exception as e:  # noqa: BLE001 - the watch must survive anything
                if self._events_stop:
                    return
                LOG.warning("Bexar event stream: %s; again in %.0f s", e, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _handle_event_line(self, line, since):
        try:
            ev = __import__("json").loads(line)
        except ValueError:
            return since
        since = max(since or 0, int(ev.get("seq", 0)))
        mapping = EVENT_TRANSITIONS.get(ev.get("kind"))
        if mapping is None or not ev.get("vm"):
            return since
        state, transition = mapping
        try:
            vm = self.agent.get_vm(ev["vm"])
        except (bexar_agent.AgentError, bexar_agent.AgentUnavailable):
            return since
        if LABEL not in vm.get("spec", {}).get("labels", {}) or vm.get("state") != state:
            return since
        LOG.info("Bexar VM %s is %s (%s)", vm["id"], state, ev.get("message", ev["kind"]))
        self.emit_event(virtevent.LifecycleEvent(vm["id"], transition))
        return since


def _spawn(fn, *args):
    """Runs `fn` in a greenthread (nova-compute's), or not at all without eventlet."""
    try:
        import eventlet
    except ImportError:  # pragma: no cover - nova always has eventlet
        return None
    return eventlet.spawn(fn, *args)


def _download(context, image_id):
    """Downloads glance image `image_id` into a new file in ``[bexar] image_cache_path``;
    returns its path (the caller renames or removes it)."""
    cache = os.path.abspath(CONF.bexar.image_cache_path)
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=cache)
    os.close(fd)
    try:
        glance.API().download(context, image_id, dest_path=tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _copy_disk(overlay, dest):
    """Copies a qcow2 overlay (sparse, reflinked where the file system can) and points the copy
    at its base by absolute path, so it reads the same from anywhere."""
    processutils.execute("cp", "--reflink=auto", "--sparse=always", overlay, dest)
    out, _ = processutils.execute("qemu-img", "info", "--output=json", "-U", dest)
    info = __import__("json").loads(out)
    backing = info.get("full-backing-filename")
    if backing and not os.path.isabs(info.get("backing-filename", "")):
        if not os.path.isabs(backing):
            backing = os.path.join(os.path.dirname(os.path.abspath(overlay)), backing)
        processutils.execute("qemu-img", "rebase", "-u", "-b", backing, "-F",
                             info.get("backing-filename-format", "raw"), dest)


def _power_state(vm):
    # A suspended VM is stopped with its saved state waiting for the next start.
    if vm["state"] == "stopped" and vm.get("restore_pending"):
        return power_state.SUSPENDED
    return POWER_STATES.get(vm["state"], power_state.NOSTATE)


def _failure(verb):
    """A nova exception class for an agent refusal of `verb` (nova has none of its own)."""
    def make(reason):
        return exception.NovaException("%s failed: %s" % (verb, reason))
    return make


def _build_error(instance, e):
    """An agent refusal at create, as the nova exception that makes nova do the right thing:
    reschedule to another host when this one is full, abort when the request cannot work."""
    if e.code == "over_capacity":
        return exception.ComputeResourcesUnavailable(reason=e.message)
    if e.status == 400 or e.code == "conflict":
        return exception.InvalidInput(reason=str(e))
    if e.code == "already_exists":
        return exception.InstanceExists(name=instance.name)
    return exception.InstanceDeployFailure(reason=str(e))


def _ip_version(subnet):
    return netaddr.IPNetwork(str(subnet["cidr"])).version


def _network(subnet):
    """The subnet in CIDR notation with its host bits cleared (neutron keeps what it was given,
    "192.168.1.1/24" included; the agent wants the network)."""
    return str(netaddr.IPNetwork(str(subnet["cidr"])).cidr)


def _hostname(instance):
    name = _HOSTNAME_BAD.sub("-", instance.hostname or instance.uuid)[:63].lstrip("-")
    return name or instance.uuid[:63]


def _version_int(version):
    try:
        return versionutils.convert_version_to_int(version.split("-")[0].split("+")[0])
    except Exception:  # noqa: BLE001 - a version nova cannot parse counts as 0
        return 0


def _json(value):
    from oslo_serialization import jsonutils
    return jsonutils.dumps(value)
