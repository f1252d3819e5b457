"""
The relay role on the real kernel, through Salt's loaders: execution module and
states, one namespace per test.
"""

import sys

import pytest

from tests.support.hosts import plant_foreign_state
from tests.support.netns import mac_of

pytestmark = pytest.mark.root

MAC = "02:00:c0:00:02:02"
PROXIES = {
    "master-relay": {
        "address": "192.0.2.2",
        "mac": MAC,
        "mark": 254,
        "table": 1000254,
        "priority": 1000,
    }
}
SECOND = {
    "master-relay-2": {
        "address": "192.0.2.3",
        "mac": "02:00:c0:00:02:03",
        "mark": 250,
        "table": 1000250,
        "priority": 1001,
    }
}
ARGS = {"lan_networks": ["192.0.2.0/24"], "mark_mask": "0xff", "proxies": PROXIES}

EXPECTED_MANGLE = [
    "-A PREROUTING -j RELAYROUTE-RELAY-PRE",
    "-A OUTPUT -j RELAYROUTE-RELAY-OUT",
    "-A RELAYROUTE-RELAY-OUT -j CONNMARK --restore-mark --nfmask 0xff --ctmask 0xff",
    "-A RELAYROUTE-RELAY-PRE -j CONNMARK --restore-mark --nfmask 0xff --ctmask 0xff",
    "-A RELAYROUTE-RELAY-PRE -m mark ! --mark 0x0/0xff -j RETURN",
    "-A RELAYROUTE-RELAY-PRE -s 192.0.2.0/24 -j RETURN",
    f"-A RELAYROUTE-RELAY-PRE -m mac --mac-source {MAC} -j MARK --set-xmark 0xfe/0xff",
    "-A RELAYROUTE-RELAY-PRE -j CONNMARK --save-mark --nfmask 0xff --ctmask 0xff",
]


def mangle_rules(ns):
    out = ns.exec("iptables-save -t mangle").stdout
    return [line for line in out.splitlines() if line.startswith("-A")]


def test_apply_produces_exactly_the_seed_state(loaders, relay_ns):
    with relay_ns.entered():
        ret = loaders.modules.relayroute.relay_apply(**ARGS)
    assert set(ret["changes"]) == {"routes", "rules", "iptables"}
    rules = relay_ns.exec("ip rule show").stdout
    assert "1000:\tfrom all fwmark 0xfe/0xff lookup 1000254 proto 210" in rules
    table = relay_ns.exec("ip route show table 1000254").stdout.strip()
    assert table == "default via 192.0.2.2 dev eth0 proto 210"
    assert mangle_rules(relay_ns) == EXPECTED_MANGLE


def test_state_is_idempotent_and_test_mode_touches_nothing(loaders, relay_ns):
    with relay_ns.entered():
        before = relay_ns.snapshot()
        dry = loaders.states.relayroute.relay_present(name="relay", test=True, **ARGS)
        assert dry.result is None
        assert dry.changes["rules"]["new"] == [
            "1000: from all fwmark 0xfe/0xff lookup 1000254 proto 210"
        ]
        assert relay_ns.snapshot() == before
        first = loaders.states.relayroute.relay_present(name="relay", **ARGS)
        assert first.result is True
        assert first.changes["iptables"]["old"] == []
        second = loaders.states.relayroute.relay_present(name="relay", **ARGS)
        assert second.result is True
        assert second.changes == {}
        dry_again = loaders.states.relayroute.relay_present(name="relay", test=True, **ARGS)
        assert dry_again.result is True
        assert dry_again.changes == {}


def test_two_proxies_then_back_to_one(loaders, relay_ns):
    both = {**ARGS, "proxies": {**PROXIES, **SECOND}}
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(**both)
        assert (
            "1001:\tfrom all fwmark 0xfa/0xff lookup 1000250 proto 210"
            in relay_ns.exec("ip rule show").stdout
        )
        assert "default via 192.0.2.3" in relay_ns.exec("ip route show table 1000250").stdout
        pre = [line for line in mangle_rules(relay_ns) if "MARK --set-xmark" in line]
        assert len(pre) == 2
        ret = loaders.modules.relayroute.relay_apply(**ARGS)
    assert ret["changes"]["rules"]["old"] == [
        "1000: from all fwmark 0xfe/0xff lookup 1000254 proto 210",
        "1001: from all fwmark 0xfa/0xff lookup 1000250 proto 210",
    ]
    assert relay_ns.exec("ip route show table 1000250").stdout == ""
    assert mangle_rules(relay_ns) == EXPECTED_MANGLE


def test_mac_found_through_neighbour_table(loaders, relay_ns, make_netns):
    lan_mac = mac_of(make_netns.__self__ if False else _lan_of(relay_ns), "eth0")
    proxies = {"master-relay": {k: v for k, v in PROXIES["master-relay"].items() if k != "mac"}}
    with relay_ns.entered():
        assert loaders.modules.relayroute.lookup_mac("192.0.2.2", resolve=False) is None
        loaders.modules.relayroute.relay_apply(**{**ARGS, "proxies": proxies})
        assert loaders.modules.relayroute.lookup_mac("192.0.2.2") == lan_mac
    assert f"--mac-source {lan_mac} " in "\n".join(mangle_rules(relay_ns))


def _lan_of(relay_ns):
    from tests.support.netns import Netns

    lan = Netns.__new__(Netns)
    lan.name = relay_ns.name.rsplit("-", 1)[0] + "-lan"
    return lan


def test_unanswered_mac_fails_clearly_and_changes_nothing(loaders, relay_ns):
    proxies = {"m": {"address": "192.0.2.77", "mark": 254, "table": 1000254, "priority": 1000}}
    with relay_ns.entered():
        before = relay_ns.snapshot()
        ret = loaders.states.relayroute.relay_present(name="r", **{**ARGS, "proxies": proxies})
        assert ret.result is False
        assert "proxies:m:mac: not given, and 192.0.2.77 did not answer ARP" in ret.comment
        assert relay_ns.snapshot() == before


@pytest.mark.parametrize(
    ("proxies", "message"),
    [
        (
            {"m": {**PROXIES["master-relay"], "address": "198.51.100.2"}},
            "relayroute:proxies:m:address: is not on a connected network",
        ),
        (
            {"m": {**PROXIES["master-relay"], "address": "192.0.2.11"}},
            "relayroute:proxies:m:address: is an address of this host",
        ),
        (
            {"m": {**PROXIES["master-relay"], "priority": 900}},
            "relayroute:proxies:m:priority: priority 900 is already used by another tool's rule",
        ),
        (
            {"m": {**PROXIES["master-relay"], "table": 51820}},
            "relayroute:proxies:m:table: table 51820 already holds another tool's route",
        ),
        (
            {"m": {**PROXIES["master-relay"], "mark": 0x100}},
            "relayroute:proxies:m:mark: has bits outside mark_mask 0xff (got 256)",
        ),
    ],
)
def test_bad_input_and_conflicts_change_nothing(loaders, relay_ns, proxies, message):
    plant_foreign_state(relay_ns)
    with relay_ns.entered():
        before = relay_ns.snapshot()
        ret = loaders.states.relayroute.relay_present(
            name="r", prefix="relayroute", **{**ARGS, "proxies": proxies}
        )
        assert ret.result is False
        assert message in ret.comment
        assert relay_ns.snapshot() == before


def test_absent_restores_the_namespace_byte_for_byte(loaders, relay_ns):
    plant_foreign_state(relay_ns)
    before = relay_ns.snapshot()
    with relay_ns.entered():
        loaders.states.relayroute.relay_present(
            name="r", **{**ARGS, "proxies": {**PROXIES, **SECOND}}
        )
        assert relay_ns.snapshot() != before
        # Foreign rules survive an apply and re-apply untouched and in order.
        foreign = [line for line in mangle_rules(relay_ns) if "RELAYROUTE" not in line]
        assert foreign == [
            line for line in before["iptables"].splitlines() if line.startswith("-A")
        ]
        gone = loaders.states.relayroute.relay_absent(name="r")
        assert gone.result is True
        assert "rules" in gone.changes
        assert relay_ns.snapshot() == before
        again = loaders.states.relayroute.relay_absent(name="r")
        assert again.changes == {}


def test_failed_transaction_rolls_back_netlink_changes(loaders, relay_ns, monkeypatch):
    """A test double fails the packet-filter transaction at the backend boundary."""
    plant_foreign_state(relay_ns)
    before = relay_ns.snapshot()
    with relay_ns.entered():
        loaders.modules.relayroute.show()  # make sure the package is loaded
        backend = next(
            mod
            for name, mod in sys.modules.items()
            if name.endswith(".relayroute_core.iptables") and hasattr(mod, "apply")
        )

        def failing_apply(payload):
            raise backend.BackendError("iptables-restore --noflush failed (1): injected")

        monkeypatch.setattr(backend, "apply", failing_apply)
        ret = loaders.states.relayroute.relay_present(name="r", **ARGS)
    assert ret.result is False
    assert "injected" in ret.comment
    assert "previous state was restored" in ret.comment
    assert relay_ns.snapshot() == before


def test_policy_route_states_stand_alone(loaders, relay_ns):
    route = {"table": 1000250, "gateway": "192.0.2.3", "fwmark": 250, "fwmask": 255}
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(**ARGS)
        relay_state = relay_ns.snapshot()
        ret = loaders.states.relayroute.policy_route_present(name="p", priority=1001, **route)
        assert ret.result is True
        assert ret.changes["routes"]["new"] == ["default via 192.0.2.3 table 1000250 proto 212"]
        again = loaders.states.relayroute.policy_route_present(name="p", priority=1001, **route)
        assert again.changes == {}
        # The relay role leaves the policy route alone and vice versa.
        assert loaders.modules.relayroute.relay_apply(**ARGS)["changes"] == {}
        gone = loaders.states.relayroute.policy_route_absent(name="p", priority=1001, **route)
        assert gone.result is True
        assert relay_ns.snapshot() == relay_state


def test_flows_show_marks(loaders, relay_ns):
    with relay_ns.entered():
        assert loaders.modules.relayroute.flows(mark_mask=0xFF, port=25) == []


def test_formula_relay_role_with_a_mask_other_than_0xff(loaders, relay_ns, tmp_path):
    """The relay component under mark_mask 0xf0: marks, masks and rules follow the mask."""
    pillar = {
        "relayroute": {
            "backend": "iptables",  # the iptables lines below (Debian 12's default: nftables)
            "lan_networks": ["192.0.2.0/24"],
            "mark_mask": 0xF0,
            "proxies": {
                "master-relay": {**PROXIES["master-relay"], "mark": 0x20, "vip": "198.51.100.25"},
                "master-relay-2": {
                    **SECOND["master-relay-2"],
                    "mark": 0x30,
                    "vip": "198.51.100.26",
                },
            },
            "relays": {"relayroute-functional": {"address": "192.0.2.11"}},
            "persist": {"dir": str(tmp_path / "relayroute"), "systemd_dir": str(tmp_path / "sd")},
        }
    }
    with relay_ns.entered():
        ret = loaders.modules.state.sls("relayroute.relay", pillar=pillar)
        states = list(ret.raw.values())
        assert states, ret.raw
        assert all(state["result"] is True for state in states), ret.raw
        rules = relay_ns.exec("ip rule show").stdout
        assert "1000:\tfrom all fwmark 0x20/0xf0 lookup 1000254 proto 210" in rules
        assert "1001:\tfrom all fwmark 0x30/0xf0 lookup 1000250 proto 210" in rules
        mangle = mangle_rules(relay_ns)
        assert (
            "-A RELAYROUTE-RELAY-PRE -j CONNMARK --restore-mark --nfmask 0xf0 --ctmask 0xf0"
            in mangle
        )
        assert (
            f"-A RELAYROUTE-RELAY-PRE -m mac --mac-source {MAC} -j MARK --set-xmark 0x20/0xf0"
            in (mangle)
        )
        again = loaders.modules.state.sls("relayroute.relay", pillar=pillar)
        assert all(state["changes"] == {} for state in again.raw.values()), again.raw


def test_a_foreign_rule_that_shadows_relayroute_fails_the_lookup_and_rolls_back(loaders, relay_ns):
    """
    Another tool's rule at a smaller priority number takes relayroute's mark
    to its own table: comparing rules sees nothing wrong, the kernel's own
    route lookup does. The state fails naming the rule; the host is as before.
    """
    plant_foreign_state(relay_ns, vpn_fwmark="0xfe/0xff")
    before = relay_ns.snapshot()
    with relay_ns.entered():
        ret = loaders.states.relayroute.relay_present(name="r", prefix="relayroute", **ARGS)
    assert ret.result is False
    assert "data-path verification failed" in ret.comment
    assert (
        "relayroute:proxies:master-relay: 'ip route get 203.0.113.254 mark 0xfe' answered via "
        "192.0.2.1 table 51820, expected via 192.0.2.2 table 1000254: a rule at priority 900"
    ) in ret.comment
    assert "from 192.0.2.11 mark 0xfe" in ret.comment  # the relay's own replies too
    assert "shadows relayroute's at priority 1000" in ret.comment
    assert "previous state was restored" in ret.comment
    assert relay_ns.snapshot() == before


def test_a_shadowing_rule_added_later_fails_the_no_op_reapply(loaders, relay_ns):
    with relay_ns.entered():
        assert loaders.states.relayroute.relay_present(name="r", **ARGS).result is True
        relay_ns.ip("route add default via 192.0.2.3 table 51820")
        relay_ns.ip("rule add priority 900 lookup 51820")
        before = relay_ns.snapshot()
        ret = loaders.states.relayroute.relay_present(name="r", **ARGS)
        assert ret.result is False
        assert "a rule at priority 900" in ret.comment
        assert "nothing was changed" in ret.comment
        assert relay_ns.snapshot() == before
        relay_ns.ip("rule del priority 900")
        again = loaders.states.relayroute.relay_present(name="r", **ARGS)
        assert again.result is True
        assert again.changes == {}
