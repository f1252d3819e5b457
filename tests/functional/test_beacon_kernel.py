"""
The relayroute beacon through Salt's own loaders, on the real kernel: a proxy
whose MAC relayroute discovers moves to another MAC (its address taken over
by another box, announced by a gratuitous ARP). The beacon reads the moved
neighbour entry, finds the MAC unmarked and fires; after the re-apply the
reactor would run, the rules mark the new MAC and the beacon is quiet.
"""

import pytest
import salt.loader

from tests.functional.test_ha_macs import FLOATING, fail_over, pair  # noqa: F401 - a fixture
from tests.support.netns import mac_of

pytestmark = pytest.mark.root

PILLAR = {
    "relayroute": {
        "lan_networks": ["192.0.2.0/24"],
        "proxies": {
            "master-relay": {
                "address": FLOATING,
                "mark": 254,
                "table": 1000254,
                "priority": 1000,
                "vip": "198.51.100.25",
            }
        },
        "relays": {"relay1": {"address": "192.0.2.11"}},
    }
}


# The relay state's arguments: the pillar's proxy without the proxy role's 'vip'.
RELAY_PROXIES = {
    name: {key: value for key, value in proxy.items() if key != "vip"}
    for name, proxy in PILLAR["relayroute"]["proxies"].items()
}


@pytest.fixture
def relay_minion(loaders):
    """The loaders as a relay minion with the pillar above."""
    # Beacons get the unfiltered inner loader as __salt__ (salt.loader.beacons).
    packs = [loaders.modules.pack]
    inner = getattr(loaders.modules, "_dunder_salt", None)
    if inner is not None and inner is not loaders.modules:
        packs.append(inner.pack)
    saved = [(pack["__pillar__"], pack["__grains__"]) for pack in packs]
    for pack in packs:
        pack["__pillar__"] = PILLAR
        pack["__grains__"] = {**loaders.grains, "roles": ["relay"], "id": "relay1"}
    try:
        yield loaders
    finally:
        for pack, (pillar, grains) in zip(packs, saved):
            pack["__pillar__"], pack["__grains__"] = pillar, grains


def apply(loaders, relay):
    with relay.entered():
        ret = loaders.states.relayroute.relay_present(
            name="relay", lan_networks=["192.0.2.0/24"], mark_mask=0xFF,
            proxies=RELAY_PROXIES,
        )  # fmt: skip
    assert ret.result is True, ret.comment


def test_the_beacon_fires_for_a_moved_proxy_mac_and_is_quiet_once_followed(
    relay_minion,
    pair,  # noqa: F811 - the fixture imported above
):
    relay, mac_a, mac_b = pair["relay"], mac_of(pair["a"], "lan0"), mac_of(pair["b"], "lan0")
    modules = relay_minion.modules
    beacons = salt.loader.beacons(relay_minion.opts, modules)
    config = [{"refire": 60}]
    assert beacons["relayroute.validate"](config) == (True, "valid")
    apply(relay_minion, relay)
    with relay.entered():
        assert modules.relayroute.marked_macs() == {254: [mac_a]}
        assert modules.relayroute.discovered_proxies() == {
            "master-relay": {
                "address": FLOATING,
                "addresses": [FLOATING],
                "mark": 254,
                "neighbour": mac_a,
                "neighbours": [mac_a],
            }
        }
        assert beacons["relayroute.beacon"](config) == []

    fail_over(pair)  # node B takes the address: the relay's entry moves to B's MAC
    with relay.entered():
        events = beacons["relayroute.beacon"](config)
        assert events == [
            {
                "tag": "mac",
                "proxy": "master-relay",
                "address": FLOATING,
                "mark": 254,
                "mac": mac_b,
                "marked": [mac_a],
            }
        ]
        assert beacons["relayroute.beacon"](config) == []  # not again within refire

    apply(relay_minion, relay)  # what the reactor's state.apply does
    with relay.entered():
        assert modules.relayroute.marked_macs() == {254: [mac_b]}
    fail_over(pair, "b", "a")
    with relay.entered():
        assert [e["mac"] for e in beacons["relayroute.beacon"](config)] == [mac_a]


def test_a_relay_without_the_role_or_with_pinned_macs_is_not_followed(
    relay_minion,
    pair,  # noqa: F811 - the fixture imported above
):
    modules = relay_minion.modules
    with pair["relay"].entered():
        modules.pack["__grains__"] = {**modules.pack["__grains__"], "roles": ["proxy"]}
        assert modules.relayroute.discovered_proxies() == {}
        modules.pack["__grains__"] = {**modules.pack["__grains__"], "roles": ["relay"]}
        pinned = {"relayroute": {**PILLAR["relayroute"]}}
        pinned["relayroute"]["proxies"] = {
            "master-relay": {
                **PILLAR["relayroute"]["proxies"]["master-relay"],
                "macs": ["02:00:c0:00:02:aa"],
            }
        }
        modules.pack["__pillar__"] = pinned
        assert modules.relayroute.discovered_proxies() == {}
