"""The ``[bexar]`` section of nova.conf."""

from oslo_config import cfg

bexar_group = cfg.OptGroup("bexar", title="Bexar virt driver options")

bexar_opts = [
    cfg.StrOpt("agent_socket",
               default="/run/bexar/agent.sock",
               help="The local Bexar agent's API socket. ``%(host)s`` is replaced by the "
                    "compute host's name (the one nova-compute calls init_host with), so that "
                    "several compute services in one process (nova's functional tests) can "
                    "each have their own agent."),
    cfg.FloatOpt("request_timeout",
                 default=60.0,
                 min=1.0,
                 help="Seconds any one agent request may take before the agent is treated as "
                      "unavailable (HypervisorUnavailable). Stops and reboots get their "
                      "graceful timeout on top."),
    cfg.StrOpt("kernel",
               help="Kernel (absolute path on this host) for images that carry no "
                    "``kernel_id`` property and are not kernels themselves. Bexar boots a "
                    "kernel directly; it has no firmware to run a disk's boot loader. "
                    "Unset: such images are refused (ImageUnacceptable)."),
    cfg.StrOpt("initrd",
               help="Initramfs to go with ``kernel`` (absolute path), if any."),
    cfg.StrOpt("cmdline",
               default="console=ttyS0 reboot=k panic=1",
               help="Kernel command line when the image has no ``os_command_line`` "
                    "property. ``root=/dev/vda rw`` is appended when the VM has a root disk "
                    "and the line names no ``root=``."),
    cfg.StrOpt("cpu_template",
               default="host",
               choices=["host", "x86-64-v2"],
               help="CPU template of every VM: ``host`` passes the host's CPU through; "
                    "``x86-64-v2`` is a common baseline that lets VMs move between hosts "
                    "of different CPU generations."),
    cfg.StrOpt("image_cache_path",
               default="$instances_path/_bexar_kernels",
               help="Where kernels and initramfs images downloaded from glance are kept "
                    "(one file per image id). Disk images are handed to the agent's own "
                    "image store and are not kept here."),
    cfg.StrOpt("segment_mode",
               default="routed",
               choices=["routed", "bridged"],
               help="How a neutron network becomes a Bexar segment: ``routed`` (this host "
                    "holds the subnet's gateway address, NATs IPv4 out and routes IPv6) or "
                    "``bridged`` (a layer-2 segment on the agent's uplink; the network's own "
                    "router is the gateway)."),
    cfg.StrOpt("segment_overlay",
               choices=["vxlan"],
               help="Make each neutron network one layer-2 domain across the Bexar hosts "
                    "that have VMs on it: ``vxlan`` tunnels its segments to the other hosts "
                    "(``bexar agent --overlay-local/--overlay-peer``), with the network's "
                    "``provider:segmentation_id`` (1-4094) as the tunnel id on every host. "
                    "Unset: each host's segment is its own."),
    cfg.IntOpt("soft_reboot_timeout",
               default=120,
               min=0,
               help="Seconds a soft reboot waits for the guest to shut down after "
                    "Ctrl-Alt-Del before it is ended and started again (a hard reboot). "
                    "libvirt's driver waits as long (wait_soft_reboot_seconds)."),
    cfg.FloatOpt("stop_timeout_margin",
                 default=15.0,
                 min=0.0,
                 help="Seconds added to a graceful stop's timeout for the agent's own "
                      "escalation (stop request, then SIGKILL, 3 s each) before the request "
                      "is given up on."),
    cfg.StrOpt("migration_address",
               help="Where other hosts' agents send live migrations to this host: "
                    "``HOST:PORT`` (``[v6]:PORT``), an address this host's migration "
                    "certificate names. Unset: the agent's own ``--migration-listen``, with a "
                    "wildcard address replaced by ``my_ip``. A destination whose agent takes "
                    "no migrations fails nova's pre-check."),
    cfg.IntOpt("live_migration_downtime",
               default=100,
               min=1,
               help="Milliseconds: the longest pause of the guest at the switch-over of a "
                    "live migration (the agent's ``downtime_ms``). Pre-copy goes on while "
                    "the rest would take longer."),
    cfg.IntOpt("live_migration_bandwidth",
               default=0,
               min=0,
               help="MiB a second a live migration may send while the guest runs (0: no "
                    "limit). The switch-over itself is never limited."),
    cfg.IntOpt("live_migration_completion_timeout",
               default=800,
               min=0,
               help="Seconds per GiB of guest memory and local disk a live migration may "
                    "take before it is cancelled and the guest goes on where it was (as "
                    "libvirt's option of the same name, whose default this is). At most 29 "
                    "minutes, which 0 also means: the agent ends any one migration after 30."),
]


def register_opts(conf):
    conf.register_group(bexar_group)
    conf.register_opts(bexar_opts, group=bexar_group)


def list_opts():
    return {bexar_group: bexar_opts}
