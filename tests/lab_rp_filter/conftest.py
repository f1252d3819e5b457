"""
The rp_filter variant of the lab: the same salt-master, minions, HAProxy and
Postfix, on relays that reach master-relay on a second interface with strict
reverse-path filtering (see ``TwoLeggedLab``). Its pillar uses a mark mask
other than the seed lab's 0xff (``MaskedTwoLeggedLab``), so the whole formula
runs, on both roles, with relayroute's bits in the upper half of the low byte.
"""

import pytest

from tests.lab.conftest import *  # noqa: F403 - the lab's fixtures, for this package
from tests.support import seedlab

pytestmark = [pytest.mark.lab, pytest.mark.root]


# relayroute's bits: 0xf0. The proxy's mark 0x20; no 'divert_mark' and no
# proxy mask are written, so master-relay's divert takes 0xf0's lowest bit, 0x10.
MASK = 0xF0
PROXY_MARK = 0x20
DIVERT_MARK = 0x10


class MaskedTwoLeggedLab(seedlab.TwoLeggedLab):
    def pillar(self):
        data = super().pillar()
        data["relayroute"]["mark_mask"] = MASK
        data["relayroute"]["proxies"]["master-relay"]["mark"] = PROXY_MARK
        assert "divert_mark" not in data["relayroute"].get("proxy", {})
        return data


@pytest.fixture(scope="package")
def lab():
    built = MaskedTwoLeggedLab()
    try:
        yield built
    finally:
        built.teardown()
