"""
The boot unit's and the watcher's states as the formula renders them
(state.show_sls, nothing applied): persist.jinja on a re-apply, and the
removals from persist_clean.jinja, which a role imports only where a unit goes
(another mechanism, the watcher switched off, clean.sls).
"""

import pytest

from tests.functional.test_pillar_example import example, rendered

pytestmark = pytest.mark.root

UNIT_IDS = {
    "relayroute-{role}-boot-unit",
    "relayroute-{role}-boot-unit-enabled",
    "relayroute-{role}-watch-script",
    "relayroute-{role}-watch-unit",
    "relayroute-{role}-watch-unit-enabled",
}
CLEAN_IDS = {"relayroute-{role}-boot-unit-clean", "relayroute-{role}-watch-clean"}


def ids(template, role="relay"):
    return {name.format(role=role) for name in template}


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


def test_the_relay_installs_its_units_and_no_removal(loaders):
    states = rendered(loaders, "relayroute.relay", with_settings())
    assert ids(UNIT_IDS) <= set(states)
    assert not ids(CLEAN_IDS) & set(states)
    for state_id in ("relayroute-relay-boot-unit-enabled", "relayroute-relay-watch-unit-enabled"):
        link = args(states, state_id, "file.symlink")
        # The owner named: Salt looks no user up for it on every run.
        assert (link["user"], link["group"]) == ("root", "root")
        assert link["name"].startswith("/etc/systemd/system/multi-user.target.wants/")
    unit = args(states, "relayroute-relay-boot-unit", "file.managed")
    assert unit["require"] == [{"relayroute": "relayroute-relay-policy-routing"}]
    assert unit["context"]["script"] == "/etc/relayroute/relay.restore"


def test_network_scripts_removes_both_units_after_the_apply(loaders):
    data = with_settings(persist={"mechanism": "network-scripts"})
    data["relayroute"]["backend"] = "iptables"  # the mechanism keeps iptables' saved file
    states = rendered(loaders, "relayroute.relay", data)
    assert ids(CLEAN_IDS) <= set(states)
    assert not ids(UNIT_IDS) & set(states)
    for state_id in ids(CLEAN_IDS):
        removal = args(states, state_id, "file.absent")
        assert removal["require"] == [{"relayroute": "relayroute-relay-policy-routing"}]
    watch = args(states, "relayroute-relay-watch-clean", "file.absent")
    assert "/etc/relayroute/relay.watch" in watch["names"]


def test_the_watcher_switched_off_goes_and_the_boot_unit_stays(loaders):
    states = rendered(loaders, "relayroute.relay", with_settings(watch={"enabled": False}))
    assert {"relayroute-relay-boot-unit", "relayroute-relay-watch-clean"} <= set(states)
    assert "relayroute-relay-watch-unit" not in states
    assert "relayroute-relay-boot-unit-clean" not in states


def test_clean_removes_the_units_of_each_role(loaders):
    relay = rendered(loaders, "relayroute.relay.clean", with_settings())
    assert ids(CLEAN_IDS) <= set(relay)
    proxy = rendered(loaders, "relayroute.proxy.clean", with_settings(as_proxy="master-relay"))
    assert ids(CLEAN_IDS, "proxy") <= set(proxy)


def test_a_bad_pillar_renders_only_the_failure(loaders):
    data = with_settings()
    data["relayroute"]["mark_mask"] = "not a mask"
    states = rendered(loaders, "relayroute.relay", data)
    assert set(states) == {"relayroute-relay-invalid-pillar"}
