"""nova.virt.bexar: where nova-compute finds the driver (``compute_driver = bexar.BexarDriver``).

Installed as ``nova/virt/bexar/`` next to nova's own drivers by ``integrations/nova/install``;
the driver itself lives in the ``nova_bexar`` package.
"""

from nova_bexar.driver import *  # noqa: F401,F403
from nova_bexar.driver import BexarDriver  # noqa: F401
