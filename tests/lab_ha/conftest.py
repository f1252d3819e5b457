"""
The HA-pair variant of the lab: the same salt-master and Postfix relays, two
HAProxy nodes (haproxy-a, haproxy-b, both with the proxy role through the
pillar's ``nodes:``) behind one floating LAN address and the VIP, moved
between them by real keepalived (``HALab``).
"""

import pytest

from tests.lab.conftest import *  # noqa: F403 - the lab's fixtures, for this package
from tests.support.halab import HALab, wait_for
from tests.support.haproxy import HAProxyProcess
from tests.support.keepalived import Keepalived
from tests.support.seedlab import OUTSIDER, assert_states_succeeded, report, states_of

pytestmark = [pytest.mark.lab, pytest.mark.root]


@pytest.fixture(scope="package")
def lab():
    built = HALab()
    try:
        yield built
    finally:
        built.teardown()


@pytest.fixture(scope="package")
def applied(lab, minions, salt_cli, relays_postfix, tmp_path_factory):
    """The lab after one highstate of every minion, HAProxy running on both nodes."""
    lab.ns("client").ip(f"addr add {OUTSIDER}/24 dev eth0")
    first = salt_cli.run("state.highstate", minion_tgt="*", _timeout=300)
    assert first.returncode == 0, first.stdout
    results = states_of(first, minions=list(lab.roles()))
    assert_states_succeeded(results)
    report(
        "first highstate",
        [f"{m}: {sum(bool(s['changes']) for s in st)} states changed" for m, st in results.items()],
    )
    log_dir = tmp_path_factory.mktemp("haproxy")
    haproxies = {}
    try:
        for name in lab.nodes:
            haproxies[name] = HAProxyProcess(
                lab.ns(name), "/etc/haproxy/haproxy.cfg", log_path=log_dir / f"{name}.log"
            ).start()
        yield {"first": results, "haproxy": haproxies}
    finally:
        for haproxy in haproxies.values():
            haproxy.stop()


@pytest.fixture
def vrrp(lab, applied, tmp_path):
    """
    keepalived on both nodes, node A (the higher priority) master: it holds
    the floating address and the VIP when this returns. Both stopped after
    the test (which removes their addresses).
    """
    started = {}

    def start(name):
        workdir = tmp_path / f"keepalived-{name}"
        started[name] = Keepalived(lab.ns(name), workdir, lab.keepalived_config(name)).start()
        return started[name]

    try:
        a = start("haproxy-a")
        wait_for(lambda: all(lab.holds("haproxy-a").values()), 15, a.output)
        b = start("haproxy-b")
        wait_for(lambda: b.state() == "BACKUP", 15, b.output)
        yield started
    finally:
        for instance in started.values():
            instance.stop()
