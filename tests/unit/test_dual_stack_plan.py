"""
Dual stack in the pure layers: a topology whose proxies, relays and VIPs have
IPv4 and IPv6 addresses validates into per-family relay and proxy arguments,
and the planner decides once what each family needs. No root, no Salt.
"""

import copy

import pytest

from relayroute_core import family, model, planner, topology

DUAL = {
    "lan_networks": ["192.0.2.0/24", "2001:db8:2::/64"],
    "mark_mask": 0xFF,
    "ports": [25, 587],
    "proxies": {
        "master-relay": {
            "address": ["192.0.2.2", "2001:db8:2::2"],
            "mac": "02:00:c0:00:02:02",
            "mark": 254,
            "table": 1000254,
            "priority": 1000,
            "vip": ["198.51.100.25", "2001:db8:100::25"],
        },
        "master-relay-2": {
            "address": "192.0.2.3",
            "mac": "02:00:c0:00:02:03",
            "mark": 250,
            "table": 1000250,
            "priority": 1001,
            "vip": "198.51.100.26",
        },
    },
    "relays": {
        "relay1": {"address": ["2001:db8:2::11", "192.0.2.11"]},
        "relay2": {"address": "192.0.2.12"},
    },
}


def test_family_data_is_one_place_for_what_differs():
    assert family.of("192.0.2.2") is family.IPV4
    assert family.of("2001:db8:2::/64") is family.IPV6
    assert family.BY_AF[family.IPV6.af] is family.IPV6
    assert {f.any for f in family.FAMILIES} == {"0.0.0.0/0", "::/0"}
    assert family.contains("2001:db8:2::/64", "2001:db8:2::11")
    assert not family.contains("192.0.2.0/24", "2001:db8:2::11")


def test_dual_stack_topology_gives_each_role_both_families():
    got = topology.topology(copy.deepcopy({**DUAL}), minion_id="master-relay")
    assert got["errors"] == []
    proxies = got["relay"]["proxies"]
    # IPv4 first, whatever order the pillar lists them in; one address stays plain.
    assert proxies["master-relay"]["address"] == ["192.0.2.2", "2001:db8:2::2"]
    assert proxies["master-relay-2"]["address"] == "192.0.2.3"
    proxy = got["proxy"]
    assert proxy["vip"] == ["198.51.100.25", "2001:db8:100::25"]
    assert proxy["families"] == [4, 6]
    relays = {r["name"]: r["address"] for r in proxy["relays"]}
    assert relays == {"relay1": ["192.0.2.11", "2001:db8:2::11"], "relay2": "192.0.2.12"}


def test_ipv4_only_topology_keeps_its_plain_arguments():
    pillar = copy.deepcopy(DUAL)
    pillar["lan_networks"] = ["192.0.2.0/24"]
    pillar["proxies"]["master-relay"]["address"] = "192.0.2.2"
    pillar["proxies"]["master-relay"]["vip"] = "198.51.100.25"
    pillar["relays"]["relay1"]["address"] = "192.0.2.11"
    got = topology.topology(pillar, minion_id="master-relay")
    assert got["errors"] == []
    assert got["relay"]["proxies"]["master-relay"]["address"] == "192.0.2.2"
    assert got["proxy"]["vip"] == "198.51.100.25"
    assert got["proxy"]["families"] == [4]


def _relay_plan():
    args = topology.topology(copy.deepcopy(DUAL))["relay"]
    spec = model.relay_spec(args["lan_networks"], args["mark_mask"], args["proxies"])
    return planner.relay_plan(spec)


def test_a_route_and_a_rule_per_proxy_and_family_it_has_an_address_in():
    plan = _relay_plan()
    routes = {(r.family, r.table, r.dst, r.gateway) for r in plan.routes}
    assert routes == {
        (4, 1000254, "0.0.0.0/0", "192.0.2.2"),
        (6, 1000254, "::/0", "2001:db8:2::2"),
        (4, 1000250, "0.0.0.0/0", "192.0.2.3"),
    }
    rules = {(r.family, r.priority, r.fwmark, r.fwmask, r.table) for r in plan.rules}
    assert rules == {
        (4, 1000, 254, 0xFF, 1000254),
        (6, 1000, 254, 0xFF, 1000254),
        (4, 1001, 250, 0xFF, 1000250),
    }
    # Same priority in both families: two rules, told apart by their family.
    assert len({r.ident for r in plan.rules}) == 3
    assert plan.families == (4, 6)
    assert [r.line() for r in plan.rules if r.family == 6] == [
        "ipv6 1000: from all fwmark 0xfe/0xff lookup 1000254 proto 210"
    ]
    assert "default via 2001:db8:2::2 table 1000254 proto 210" in [r.line() for r in plan.routes]


def test_lookups_prove_each_family_and_the_unmarked_path_of_each():
    plan = _relay_plan()
    seen = {(lk.name, lk.family, lk.dst, lk.gateway) for lk in plan.lookups}
    assert ("master-relay", 6, family.IPV6.lookup_dst, "2001:db8:2::2") in seen
    assert ("master-relay", 4, family.IPV4.lookup_dst, "192.0.2.2") in seen
    assert ("master-relay-2", 4, family.IPV4.lookup_dst, "192.0.2.3") in seen
    assert not any(name == "master-relay-2" and fam == 6 for name, fam, _d, _g in seen)
    assert {fam for name, fam, _d, _g in seen if name == "unmarked"} == {4, 6}


def test_neighbour_discovery_and_link_local_are_never_marked():
    pre = next(chain for chain in _relay_plan().chains if chain.name == "PRE")
    kinds = [rule[0] for rule in pre.rules]
    first_mark = kinds.index("mark_from_mac")
    assert kinds.index("return_if_neighbour_discovery") < first_mark
    assert pre.rules.index(("return_if_source", "fe80::/10")) < first_mark
    assert ("return_if_source", "2001:db8:2::/64") in pre.rules


@pytest.mark.parametrize("versions", [(4,), (6,), (4, 6)])
def test_the_proxy_divert_is_made_in_each_family_of_its_vips(versions):
    spec = model.proxy_spec(families=versions)
    plan = planner.proxy_plan(spec)
    assert {(r.family, r.dst, r.kind) for r in plan.routes} == {
        (v, family.BY_VERSION[v].any, "local") for v in versions
    }
    assert {(r.family, r.fwmark, r.table) for r in plan.rules} == {(v, 1, 100) for v in versions}
    assert plan.families == versions


def test_proxy_spec_refuses_an_unknown_family():
    with pytest.raises(model.InputError, match=r"families: must list address families 4 and/or 6"):
        model.proxy_spec(families=(5,))


def test_a_policy_route_takes_a_gateway_of_either_family():
    spec = model.policy_route_spec(200, "2001:db8:2::1", 7, priority=500)
    plan = planner.policy_route_plan(spec)
    assert [(r.family, r.dst) for r in plan.routes] == [(6, "::/0")]
    assert planner.plan_scope(plan) == ({(200, "::/0", "unicast")}, {(6, 500)})
    with pytest.raises(model.InputError, match="gateway: is a link-local address"):
        model.policy_route_spec(200, "fe80::1", 7, priority=500)


def test_addresses_are_one_or_one_per_family():
    errors = model._Errors()
    assert model.to_addresses(["2001:db8::1", "192.0.2.1"], errors, "a") == (
        "192.0.2.1",
        "2001:db8::1",
    )
    assert model.to_addresses("2001:DB8::0001", errors, "a") == ("2001:db8::1",)
    assert errors.items == []
    assert model.to_addresses(["192.0.2.1", "192.0.2.2"], errors, "a") == ()
    assert errors.items == [
        "a:1: is a second IPv4 address (also 192.0.2.1); give one address per family "
        "(got '192.0.2.2')"
    ]
