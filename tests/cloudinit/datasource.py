#!/usr/bin/python3
"""Runs one of cloud-init's own datasources (Debian's cloud-init package) the way cloud-init
does at boot, and prints what it obtained as one JSON line.

    datasource.py ec2|ec2-aws|nocloud WORKDIR

Any cloud-init from 22.4 on: Debian 12's package, or a newer one put first on PYTHONPATH (the
test takes Debian unstable's, which follows upstream releases).

Run inside the network namespace that plays the guest (its eth0 is the VM's NIC). DMI data
comes from `dmidecode` on PATH: the test puts a wrapper first that decodes the guest's own
SMBIOS tables (dumped by the test guest) instead of this machine's. `ec2-aws` makes the EC2
datasource treat the platform as AWS, which is when cloud-init asks for an IMDSv2 token.
"""
import json
import logging
import os
import sys

from cloudinit import distros, dmi, helpers
from cloudinit.sources import DataSourceEc2, DataSourceNoCloud

mode, work = sys.argv[1], sys.argv[2]
try:  # cloud-init 23.4 and later
    from cloudinit.log import loggers

    loggers.setup_basic_logging(logging.DEBUG)
except ImportError:  # 22.4 (Debian 12)
    from cloudinit import log as ci_log

    ci_log.setupBasicLogging(logging.DEBUG)
# Never this machine's own /sys/class/dmi: only what dmidecode reads from the guest's tables.
dmi.DMI_SYS_PATH = os.path.join(work, "no-sysfs-dmi")
# cloud-init ignores DMI inside a container (it would describe the host). The machine running
# the test may be one; the guest this stands in for is a VM, whose DMI is its own.
dmi.is_container = lambda: False
paths = helpers.Paths({"cloud_dir": os.path.join(work, "cloud"), "run_dir": os.path.join(work, "run")})
distro = distros.fetch("debian")("debian", {}, paths)
sys_cfg = {
    "datasource": {
        "Ec2": {"metadata_urls": ["http://169.254.169.254"], "timeout": 5, "max_wait": 20},
        "NoCloud": {"fs_label": None},
    }
}
if mode.startswith("ec2"):
    ds = DataSourceEc2.DataSourceEc2(sys_cfg, distro, paths)
    if mode == "ec2-aws":
        ds._cloud_name = DataSourceEc2.CloudNames.AWS
elif mode == "nocloud":
    ds = DataSourceNoCloud.DataSourceNoCloudNet(sys_cfg, distro, paths)
else:
    sys.exit("unknown mode " + mode)

ok = ds.get_data()
from cloudinit import version  # noqa: E402

out = {
    "ok": bool(ok),
    "version": version.version_string(),
    "cloud_name": ds.cloud_name,
    "platform": ds.platform_type,
}
if ok:
    host = ds.get_hostname()
    ud = ds.get_userdata_raw()
    out.update(
        {
            "instance_id": ds.get_instance_id(),
            "hostname": getattr(host, "hostname", host),
            "keys": ds.get_public_ssh_keys(),
            "user_data": ud.decode() if isinstance(ud, bytes) else ud,
            "subplatform": ds.subplatform,
            "token_used": bool(getattr(ds, "_api_token", None)),
            "dmi_serial": dmi.read_dmi_data("system-serial-number"),
            "dmi_uuid": dmi.read_dmi_data("system-uuid"),
            "dmi_manufacturer": dmi.read_dmi_data("system-manufacturer"),
            "dmi_asset_tag": dmi.read_dmi_data("chassis-asset-tag"),
        }
    )
print(json.dumps(out, default=str))
