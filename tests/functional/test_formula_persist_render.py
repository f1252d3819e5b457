"""
The role's persistence as the formula renders it (state.show_sls, nothing
applied): the relayroute state alone, with the ``persist`` and ``watcher``
settings it keeps the restore script, the boot unit and the watcher with
(engine-written boot files, tests/unit/test_units.py); no file state, no
unit state, in a role or in its clean.
"""

import pytest

from tests.functional.test_pillar_example import example, rendered

pytestmark = pytest.mark.root


def args(states, state_id, function):
    items = states[state_id][function.split(".")[0]]
    assert function.split(".")[1] in items, items
    return {key: value for item in items if isinstance(item, dict) for key, value in item.items()}


def with_settings(persist=None, watch=None, as_proxy=None):
    data = example(as_proxy)
    if persist:
        data["relayroute"].setdefault("persist", {}).update(persist)
    if watch:
        data["relayroute"].setdefault("watch", {}).update(watch)
    return data


def test_the_relay_is_its_relayroute_state_with_the_boot_and_watcher_settings(loaders):
    states = rendered(loaders, "relayroute.relay", with_settings())
    assert set(states) == {"relayroute-relay-policy-routing", "relayroute-relay-not-in-pillar"}
    present = args(states, "relayroute-relay-policy-routing", "relayroute.relay_present")
    assert present["persist"]["mechanism"] == "unit"
    assert present["persist"]["systemd_dir"] == "/etc/systemd/system"
    assert present["persist"]["wanted_by"] == "multi-user.target"
    assert present["watcher"] == {"enabled": True, "debounce": 0.2, "shell": "/bin/bash"}


def test_the_watcher_switched_off_reaches_the_state(loaders):
    states = rendered(loaders, "relayroute.relay", with_settings(watch={"enabled": False}))
    present = args(states, "relayroute-relay-policy-routing", "relayroute.relay_present")
    assert present["watcher"]["enabled"] is False


def test_network_scripts_is_the_same_state_with_another_mechanism(loaders):
    data = with_settings(persist={"mechanism": "network-scripts"})
    data["relayroute"]["backend"] = "iptables"  # the mechanism keeps iptables' saved file
    states = rendered(loaders, "relayroute.relay", data)
    assert set(states) == {"relayroute-relay-policy-routing", "relayroute-relay-not-in-pillar"}
    present = args(states, "relayroute-relay-policy-routing", "relayroute.relay_present")
    assert present["persist"]["mechanism"] == "network-scripts"
    assert "watcher" in present  # the units go: the state keeps them


def test_clean_passes_the_watcher_settings_to_each_roles_removal(loaders):
    relay = rendered(loaders, "relayroute.relay.clean", with_settings())
    assert set(relay) == {"relayroute-relay-policy-routing-clean"}
    absent = args(relay, "relayroute-relay-policy-routing-clean", "relayroute.relay_absent")
    assert absent["watcher"]["enabled"] is True
    proxy = rendered(loaders, "relayroute.proxy.clean", with_settings(as_proxy="master-relay"))
    absent = args(proxy, "relayroute-proxy-tproxy-divert-clean", "relayroute.proxy_absent")
    assert absent["watcher"]["enabled"] is True
    assert not [name for name in proxy if "unit" in name or "watch" in name]


def test_the_proxy_passes_the_watcher_settings(loaders):
    states = rendered(loaders, "relayroute.proxy", with_settings(as_proxy="master-relay"))
    present = args(states, "relayroute-proxy-tproxy-divert", "relayroute.proxy_present")
    assert present["watcher"]["enabled"] is True
    assert not [name for name in states if "unit" in name or "watch" in name]


def test_a_bad_pillar_renders_only_the_failure(loaders):
    data = with_settings()
    data["relayroute"]["mark_mask"] = "not a mask"
    states = rendered(loaders, "relayroute.relay", data)
    assert set(states) == {"relayroute-relay-invalid-pillar"}
