"""
The dual-stack variant of the lab: the seed's network in both families
(``SeedLab(dual_stack=True)``: every host and link of the IPv4 layout mirrored
in 2001:db8::/32), the same salt-master, minions and HAProxy, and Postfix on
every relay listening on its IPv4 and its IPv6 address. The pillar gives
master-relay, its VIP and every relay one address per family and names no
backend: the platform's default runs first.
"""

import pytest

from tests.lab.conftest import *  # noqa: F403 - the lab's fixtures, for this package
from tests.support import seedlab
from tests.support.postfix import PostfixInstance

pytestmark = [pytest.mark.lab, pytest.mark.root]


@pytest.fixture(scope="package")
def lab():
    built = seedlab.SeedLab(dual_stack=True)
    try:
        yield built
    finally:
        built.teardown()


@pytest.fixture(scope="package")
def relays_postfix(lab, tmp_path_factory):
    """
    Real Postfix on 25 and 587 in every relay, on its address of each family;
    mynetworks: the LANs and each family's mail client (not its external MTA).
    """
    base = tmp_path_factory.mktemp("postfix")
    sides = list(lab.sides.values())
    instances = {}
    try:
        for name in lab.relay_addresses:
            instance = PostfixInstance(
                lab.ns(name),
                base / name,
                myhostname=f"{name}.lab.example",
                mynetworks=[
                    "127.0.0.0/8",
                    "::1/128",
                    *(side.lan for side in sides),
                    *(side.trusted_clients for side in sides),
                ],
                inet_interfaces=[side.relays[name] for side in sides],
            )
            instance.start()
            instances[name] = instance
        yield instances
    finally:
        for instance in instances.values():
            instance.stop()
