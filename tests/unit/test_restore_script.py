"""The restore script boot and repairs run: under the engine's lock, idempotent, deletes nothing."""

import os

from relayroute_core import engine, iptables, model, persist, planner


def relay_plan():
    proxies = {
        "master-relay": {
            "address": "192.0.2.2",
            "mac": "02:00:c0:00:02:02",
            "mark": 254,
            "table": 1000254,
            "priority": 1000,
        }
    }
    return planner.relay_plan(model.relay_spec(["192.0.2.0/24"], 0xFF, proxies))


def test_the_script_takes_the_lock_every_apply_holds():
    script = persist.restore_script(relay_plan(), iptables)
    # Same file as the engine's, same override, same wait.
    expected = os.environ.get("RELAYROUTE_LOCK", persist.DEFAULT_LOCK)
    assert expected == engine.LOCK_PATH
    assert f"lock=${{RELAYROUTE_LOCK:-{persist.DEFAULT_LOCK}}}" in script
    assert f'exec flock -w {persist.LOCK_WAIT} "$lock"' in script
    # The lock comes before any change.
    first_change = min(
        script.index(word)
        for word in ("ip -4 route", "ip -4 rule", "iptables", "sysctl -qw")
        if word in script
    )
    assert script.index("flock") < first_change


def test_the_script_adds_a_missing_rule_and_leaves_one_in_place():
    script = persist.restore_script(relay_plan(), iptables)
    spec = "priority 1000 fwmark 0xfe/0xff lookup 1000254 proto 210"
    assert f"ip -4 rule show {spec} | grep -q . || ip -4 rule add {spec}" in script.splitlines()
    assert "rule del" not in script
    assert "ip -4 route replace default via 192.0.2.2 table 1000254 proto 210" in script


def test_an_empty_plan_has_no_script():
    assert persist.restore_script(planner.empty_plan(planner.RELAY), iptables) is None
