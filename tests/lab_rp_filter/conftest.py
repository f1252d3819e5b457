"""
The rp_filter variant of the lab: the same salt-master, minions, HAProxy and
Postfix, on relays that reach master-relay on a second interface with strict
reverse-path filtering (see ``TwoLeggedLab``).
"""

import pytest

from tests.lab.conftest import *  # noqa: F403 - the lab's fixtures, for this package
from tests.support import seedlab

pytestmark = [pytest.mark.lab, pytest.mark.root]


@pytest.fixture(scope="package")
def lab():
    built = seedlab.TwoLeggedLab()
    try:
        yield built
    finally:
        built.teardown()
