"""
Which packet-filter backend runs, and where an apply looks for the role's
part in the other one. Pure: the formula's parameter layers as map.jinja
merges them, the engine's decision and the removal it plans. No root.
"""

import pytest

from relayroute_core import engine, iptables, model, netlink, nftables, planner, topology
from tests.unit.test_bad_topologies import MINION, as_map_jinja, pillar_for

NAMES = ["iptables", "nftables"]


@pytest.mark.parametrize(
    ("os_family", "osfinger", "backend"),
    [
        ("Debian", "Debian-11", "nftables"),
        ("Debian", "Debian-12", "nftables"),
        ("Debian", "Debian-13", "nftables"),  # a release osfinger.yaml does not name
        ("Debian", "Ubuntu-20.04", "nftables"),
        ("Debian", "Ubuntu-24.04", "nftables"),
        ("Debian", "Debian-10", "iptables"),
        ("Debian", "Ubuntu-18.04", "iptables"),
        ("RedHat", "AlmaLinux-8", "nftables"),
        ("RedHat", "AlmaLinux-9", "nftables"),
        ("RedHat", "Rocky Linux-9", "nftables"),
        ("RedHat", "Red Hat Enterprise Linux-9", "nftables"),
        ("RedHat", "CentOS Linux-7", "iptables"),
        ("RedHat", "Red Hat Enterprise Linux Server-7", "iptables"),
    ],
)
def test_the_default_backend_follows_the_platform_and_pillar_wins(os_family, osfinger, backend):
    # pillar.example names its backend; without it the parameters decide.
    without = {"patch": {"relayroute": {"backend": "__delete__"}}}
    config = as_map_jinja(pillar_for(without), os_family, osfinger)
    assert config["backend"] == backend
    assert topology.topology(config, MINION)["errors"] == []
    # The formula's states get it as it is (relay/init.sls: backend: {{ config.backend }}).
    other = {"iptables": "nftables", "nftables": "iptables"}[backend]
    for where in ({"backend": other}, {"lookup": {"backend": other}}):
        chosen = {"patch": {"relayroute": {"backend": "__delete__", **where}}}
        assert as_map_jinja(pillar_for(chosen), os_family, osfinger)["backend"] == other


def test_a_bad_backend_is_named_after_the_platform_default():
    case = {"patch": {"relayroute": {"backend": "nft"}}}
    errors = topology.topology(as_map_jinja(pillar_for(case)), MINION)["errors"]
    assert errors == [
        "relayroute:backend: is not a packet-filter backend of relayroute "
        "(iptables, nftables) (got 'nft')"
    ]


def test_centos_7_keeps_iptables_with_its_network_scripts():
    """nftables with network-scripts is refused; the CentOS 7 defaults never ask for it."""
    without = {"patch": {"relayroute": {"backend": "__delete__"}}}
    for osfinger in ("CentOS Linux-7", "Red Hat Enterprise Linux Server-7"):
        config = as_map_jinja(pillar_for(without), "RedHat", osfinger)
        assert (config["backend"], config["persist"]["mechanism"]) == (
            "iptables",
            "network-scripts",
        )


# --- where an apply looks for the role's part in the other backend ----------


@pytest.mark.parametrize(
    ("memory", "has_work", "looked_at"),
    [
        ({"backend": "nftables"}, False, []),  # the no-op: no iptables-save
        ({"backend": "nftables"}, True, []),
        ({"backend": "iptables"}, False, ["iptables"]),  # a switch, even with nftables in place
        ({"backend": "iptables"}, True, ["iptables"]),
        ({}, False, []),  # no memory, nothing to do: look nowhere else
        ({}, True, ["iptables"]),  # no memory, work anyway: look once
        ({"sysctls_before": {"net.ipv4.conf.all.rp_filter": "1"}}, True, ["iptables"]),
        ({"backend": "pf"}, False, []),  # a name no backend has counts as none
        ({"backend": "pf"}, True, ["iptables"]),
    ],
)
def test_an_apply_looks_at_the_other_backend_only_when_it_may_hold_the_role(
    memory, has_work, looked_at
):
    assert engine.backends_to_clear("nftables", memory, has_work, NAMES) == looked_at


def test_the_decision_is_the_same_the_other_way_round():
    assert engine.backends_to_clear("iptables", {"backend": "iptables"}, True, NAMES) == []
    assert engine.backends_to_clear("iptables", {"backend": "nftables"}, False, NAMES) == [
        "nftables"
    ]
    assert engine.backends_to_clear("iptables", {}, True, NAMES) == ["nftables"]


def relay_plan():
    spec = model.relay_spec(
        ["192.0.2.0/24"],
        0xFF,
        {
            "master-relay": {
                "address": "192.0.2.2",
                "mac": "02:00:c0:00:02:02",
                "mark": 254,
                "table": 1000254,
                "priority": 1000,
            }
        },
    )
    return planner.relay_plan(spec)


def iptables_ruleset(plan, foreign=()):
    chains, jumps = iptables.desired(plan)
    lines = ["*mangle", *(f":{name} - [0:0]" for name in chains), ":DOCKER-LIKE - [0:0]"]
    lines += [f"-A {builtin} {spec}" for builtin, spec in jumps]
    lines += [f"-A {name} {spec}" for name, specs in chains.items() for spec in specs]
    lines += list(foreign)
    return iptables.parse_save("\n".join([*lines, "COMMIT", ""]))


def test_clearing_removes_the_owners_part_alone_and_reports_it_under_the_old_backend():
    plan = relay_plan()
    ruleset = iptables_ruleset(plan, ["-A PREROUTING -j DOCKER-LIKE"])
    todo, changes = engine.clearing(planner.RELAY, [(iptables, ruleset)])
    ((backend, seen, payload),) = todo
    assert (backend, seen) == (iptables, ruleset)
    assert "-D PREROUTING -j RELAYROUTE-RELAY-PRE" in payload.text(4)
    assert "-X RELAYROUTE-RELAY-PRE" in payload.text(4)
    assert "DOCKER" not in str(payload)
    assert changes == {
        "iptables": {"old": iptables.owned_lines(ruleset, "RELAYROUTE-RELAY-"), "new": []}
    }
    # The proxy role's part is another owner's: not touched by the relay's clearing.
    assert engine.clearing(planner.PROXY, [(iptables, ruleset)]) == ([], {})


def test_clearing_an_nftables_table_replaces_it_with_nothing():
    plan = relay_plan()
    ruleset = nftables.Ruleset({"relayroute_relay": nftables.desired(plan)})
    todo, changes = engine.clearing(planner.RELAY, [(nftables, ruleset)])
    ((_backend, _seen, payload),) = todo
    assert payload == ("table inet relayroute_relay {}\ndelete table inet relayroute_relay\n")
    assert changes["nftables"]["new"] == []
    assert "add table inet relayroute_relay" in changes["nftables"]["old"]
    # A backend that holds nothing of the role: nothing to do, nothing reported.
    empty = nftables.Ruleset({"relayroute_relay": None})
    assert engine.clearing(planner.RELAY, [(nftables, empty)]) == ([], {})


def test_the_memory_names_the_backend_that_holds_the_chains():
    current = engine.Current(netlink.KernelState((), (), (), ()), None)
    assert engine.memory_after(relay_plan(), current, "nftables") == {"backend": "nftables"}
    # A role removed holds nothing anywhere: nothing to remember.
    assert engine.memory_after(planner.empty_plan(planner.RELAY), current, "nftables") == {}
