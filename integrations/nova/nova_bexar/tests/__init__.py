"""The driver's tests, run with nova's own runner (stestr) and nova's own harness.

``nova.monkey_patch`` must be imported before anything else of nova's, as nova's own functional
tests do: otherwise greenthreads get their own in-memory databases and lose writes.
"""

import nova.monkey_patch  # noqa: F401  (first, see above)

import os
import shutil
import tempfile
import time

import nova.virt
from nova.tests.fixtures import conf as conf_fixture

HERE = os.path.dirname(os.path.abspath(__file__))
# Where ``nova.virt.bexar`` comes from in a checkout: the shim the install script installs.
SHIM = os.path.join(HERE, "..", "..", "shim")
if SHIM not in nova.virt.__path__:
    nova.virt.__path__.append(SHIM)

# nova's API paste pipeline ships in nova-common, which the tests do not install:
# integrations/nova/setup-tests extracts it from that package into this cache.
API_PASTE = os.environ.get("BEXAR_NOVA_API_PASTE",
                           "/var/cache/bexar/nova/api-paste.ini")

_conf_setup = conf_fixture.ConfFixture.setUp


def _setup_with_api_paste(self):
    _conf_setup(self)
    self.conf.set_default("api_paste_config", API_PASTE, group="wsgi")
    # nova's default instances_path is under its own package directory; the driver caches
    # kernels there. Each test gets its own, removed afterwards.
    instances = tempfile.mkdtemp(prefix="bexar-nova-instances-")
    self.addCleanup(shutil.rmtree, instances, True)
    self.conf.set_default("instances_path", instances)


conf_fixture.ConfFixture.setUp = _setup_with_api_paste


def keep_glance_uploads(glance):
    """Makes nova's GlanceFixture keep what is uploaded to an image, as glance does (the
    fixture drops the bytes, and keeps ``min_disk``/``min_ram`` as the strings nova's snapshot
    passed where glance stores integers). Returns {image id: bytes uploaded}."""
    uploads = {}
    real_update = glance.update

    def update(context, image_id, metadata, data=None, purge_props=False):
        if data is not None:
            uploads[image_id] = glance._imagedata[image_id] = data.read()
        image = real_update(context, image_id, metadata, purge_props=purge_props)
        for key in ("min_disk", "min_ram"):
            if isinstance(image.get(key), str):
                image[key] = int(image[key])
        return image

    glance.update = update
    return uploads


class ConsoleHelpers:
    """A server's console output through nova's API (``os-getConsoleOutput``), for tests on
    nova's harness (``self.api``)."""

    def _console(self, server):
        return self.api.post_server_action(
            server["id"], {"os-getConsoleOutput": {}})["output"]

    def _wait_console(self, server, text, count=1, timeout=60):
        """Until `text` shows `count` times; returns the output."""
        deadline = time.monotonic() + timeout
        while True:
            out = self._console(server)
            if out.count(text) >= count:
                return out
            self.assertLess(time.monotonic(), deadline,
                            "%r (x%d) not in the console:\n%s" % (text, count, out[-3000:]))
            time.sleep(0.2)
