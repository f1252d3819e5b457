"""
Functional tests: the execution and state modules loaded by Salt's own loaders
(pytest-salt-factories), run on the real kernel inside a namespace per test.

The modules are synced the way an operator's minion gets them:
``saltutil.sync_all`` from a ``file_roots`` that is this checkout.
"""

import pytest
from saltfactories.utils.functional import Loaders

pytestmark = pytest.mark.root


@pytest.fixture(scope="session")
def minion_opts(salt_factories, formula_tree):
    factory = salt_factories.salt_minion_daemon(
        "relayroute-functional",
        overrides={
            "file_client": "local",
            "file_roots": {"base": [str(formula_tree)]},
            "enable_fqdns_grains": False,
            "grains_cache": True,
        },
    )
    return factory.config.copy()


@pytest.fixture(scope="session")
def loaders(minion_opts):
    return Loaders(minion_opts)


@pytest.fixture(autouse=True)
def _reset_loaders_state(loaders):
    try:
        yield
    finally:
        loaders.reset_state()


@pytest.fixture
def relay_ns(make_netns):
    """A relay namespace on 192.0.2.0/24 with a peer namespace holding the proxy's address."""
    from tests.support.netns import veth

    relay = make_netns("relay")
    lan = make_netns("lan")
    veth(relay, "eth0", lan, "eth0")
    relay.ip("addr add 192.0.2.11/24 dev eth0")
    lan.ip("addr add 192.0.2.2/24 dev eth0")
    lan.ip("addr add 192.0.2.3/24 dev eth0")
    relay.ip("route add default via 192.0.2.1")
    return relay


@pytest.fixture
def two_legged(make_netns):
    """
    The relay reaches the gateway on lan0 (192.0.2.0/25) and the proxy on px0
    (192.0.2.128/25), with strict reverse-path filtering everywhere.
    """
    from tests.support.hosts import DIRECT, PROXIED, RELAY, internet
    from tests.support.netns import veth
    from tests.support.tcp import start_server

    client, inet, gw, proxy, relay = (
        make_netns(name) for name in ("client", "inet", "gw", "proxy", "relay")
    )
    internet(client, inet, gw, proxy, DIRECT, PROXIED)
    veth(gw, "lan0", relay, "lan0")
    gw.ip("addr add 192.0.2.1/25 dev lan0")
    relay.ip(f"addr add {RELAY}/25 dev lan0")
    veth(proxy, "lan0", relay, "px0")
    proxy.ip("addr add 192.0.2.130/25 dev lan0")
    relay.ip("addr add 192.0.2.131/25 dev px0")
    gw.ip("route add 192.0.2.128/25 via 192.0.2.11")
    relay.ip("route add default via 192.0.2.1")
    proxy.ip("route add 192.0.2.0/24 via 192.0.2.131")
    for key in ("all", "default", "lan0", "px0"):
        relay.sysctl(f"net.ipv4.conf.{key}.rp_filter", 1)
    start_server(relay, RELAY, 25)
    return {"client": client, "relay": relay, "proxy": proxy}


@pytest.fixture
def net(make_netns):
    """
    The reply-path tests' hosts (test_reply_path): direct clients through a
    stateful default gateway, proxied ones through a proxy that forwards, a
    relay on the LAN with a server on 25.
    """
    from tests.support.hosts import DIRECT, PROXIED, RELAY, internet, relay_lan
    from tests.support.tcp import start_server

    client, inet, gw, proxy, lan, relay = (
        make_netns(name) for name in ("client", "inet", "gw", "proxy", "lan", "relay")
    )
    internet(client, inet, gw, proxy, DIRECT, PROXIED)
    relay_lan(lan, gw, proxy, relay)
    relay.ip("route add default via 192.0.2.1")
    start_server(relay, RELAY, 25)
    return {"client": client, "relay": relay, "proxy": proxy, "gw": gw}
