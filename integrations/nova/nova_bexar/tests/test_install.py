"""The install script puts the driver where nova-compute loads it from: nova's own
``load_compute_driver`` finds ``bexar.BexarDriver`` in a fresh interpreter that sees only the
installed files (not this checkout)."""

import os
import subprocess
import sys
import tempfile

from nova import test

HERE = os.path.dirname(os.path.abspath(__file__))
INSTALL = os.path.join(HERE, "..", "..", "install")

PROBE = """
import sys
site = sys.argv[1]
sys.path.insert(0, site)
import nova.virt
nova.virt.__path__.insert(0, site + "/nova/virt")
import nova.conf
nova.conf.CONF([], default_config_files=[])
nova.conf.CONF.set_override("compute_driver", "bexar.BexarDriver")
from nova.virt import driver, fake
d = driver.load_compute_driver(fake.FakeVirtAPI())
import nova_bexar
print(type(d).__module__, type(d).__name__, nova_bexar.__file__)
"""


class InstallTest(test.NoDBTestCase):

    def test_installed_driver_loads_through_nova(self):
        with tempfile.TemporaryDirectory() as root:
            subprocess.run([INSTALL], check=True, env=dict(os.environ, DESTDIR=root),
                           stderr=subprocess.DEVNULL)
            site = os.path.join(root, "usr/lib/python3/dist-packages")
            out = subprocess.run([sys.executable, "-c", PROBE, site], check=True,
                                 cwd=root, capture_output=True, text=True).stdout.split()
        self.assertEqual(["nova_bexar.driver", "BexarDriver"], out[:2])
        self.assertTrue(out[2].startswith(site), out)
