"""
Planning through the nftables backend: rendering, the kernel's JSON read back,
transactions, rollback payloads, boot lines. Pure, no root: the kernel listings
below are what ``nft -j list table`` printed on Debian 12 (nft 1.0.6, Linux
6.18) for the seed's relay plan and the default proxy plan.
"""

import json

import pytest

from relayroute_core import engine, iptables, model, netlink, nftables, persist, planner, topology
from tests.support.specs import MAC, MAC2, seed_spec

# nft -j list table inet relayroute_relay, after applying the seed's plan.
KERNEL_RELAY = """\
{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"table":
{"family": "inet", "name": "relayroute_relay", "handle": 2}}, {"chain": {"family": "inet",
"table": "relayroute_relay", "name": "OUT", "handle": 1, "type": "route", "hook": "output",
"prio": -151, "policy": "accept"}}, {"chain": {"family": "inet", "table":
"relayroute_relay", "name": "PRE", "handle": 2, "type": "filter", "hook": "prerouting",
"prio": -151, "policy": "accept"}}, {"rule": {"family": "inet", "table": "relayroute_relay",
"chain": "OUT", "handle": 3, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value":
{"&": [{"meta": {"key": "mark"}}, 4294967040]}}}]}}, {"rule": {"family": "inet", "table":
"relayroute_relay", "chain": "OUT", "handle": 4, "expr": [{"match": {"op": "==", "left":
{"&": [{"ct": {"key": "mark"}}, 255]}, "right": 254}}, {"mangle": {"key": {"meta": {"key":
"mark"}}, "value": {"|": [{"&": [{"meta": {"key": "mark"}}, 4294967294]}, 254]}}}]}},
{"rule": {"family": "inet", "table": "relayroute_relay", "chain": "PRE", "handle": 5,
"expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [{"meta": {"key":
"mark"}}, 4294967040]}}}]}}, {"rule": {"family": "inet", "table": "relayroute_relay",
"chain": "PRE", "handle": 6, "expr": [{"match": {"op": "==", "left": {"&": [{"ct": {"key":
"mark"}}, 255]}, "right": 254}}, {"mangle": {"key": {"meta": {"key": "mark"}}, "value":
{"|": [{"&": [{"meta": {"key": "mark"}}, 4294967294]}, 254]}}}]}}, {"rule": {"family":
"inet", "table": "relayroute_relay", "chain": "PRE", "handle": 7, "expr": [{"match": {"op":
"!=", "left": {"&": [{"meta": {"key": "mark"}}, 255]}, "right": 0}}, {"return": null}]}},
{"rule": {"family": "inet", "table": "relayroute_relay", "chain": "PRE", "handle": 8,
"expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
"right": {"prefix": {"addr": "192.0.2.0", "len": 24}}}}, {"return": null}]}}, {"rule":
{"family": "inet", "table": "relayroute_relay", "chain": "PRE", "handle": 9, "expr":
[{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right":
{"prefix": {"addr": "fe80::", "len": 10}}}}, {"return": null}]}}, {"rule": {"family":
"inet", "table": "relayroute_relay", "chain": "PRE", "handle": 10, "expr": [{"match": {"op":
"==", "left": {"payload": {"protocol": "icmpv6", "field": "type"}}, "right":
"nd-router-solicit"}}, {"return": null}]}}, {"rule": {"family": "inet", "table":
"relayroute_relay", "chain": "PRE", "handle": 11, "expr": [{"match": {"op": "==", "left":
{"payload": {"protocol": "icmpv6", "field": "type"}}, "right": "nd-router-advert"}},
{"return": null}]}}, {"rule": {"family": "inet", "table": "relayroute_relay", "chain":
"PRE", "handle": 12, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol":
"icmpv6", "field": "type"}}, "right": "nd-neighbor-solicit"}}, {"return": null}]}}, {"rule":
{"family": "inet", "table": "relayroute_relay", "chain": "PRE", "handle": 13, "expr":
[{"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6", "field": "type"}},
"right": "nd-neighbor-advert"}}, {"return": null}]}}, {"rule": {"family": "inet", "table":
"relayroute_relay", "chain": "PRE", "handle": 14, "expr": [{"match": {"op": "==", "left":
{"payload": {"protocol": "icmpv6", "field": "type"}}, "right": "nd-redirect"}}, {"return":
null}]}}, {"rule": {"family": "inet", "table": "relayroute_relay", "chain": "PRE", "handle":
15, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field":
"saddr"}}, "right": "02:00:c0:00:02:02"}}, {"counter": {"packets": 3, "bytes": 180}},
{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"&": [{"meta": {"key":
"mark"}}, 4294967294]}, 254]}}}]}}, {"rule": {"family": "inet", "table": "relayroute_relay",
"chain": "PRE", "handle": 16, "expr": [{"match": {"op": "==", "left": {"&": [{"meta":
{"key": "mark"}}, 255]}, "right": 254}}, {"mangle": {"key": {"ct": {"key": "mark"}},
"value": {"|": [{"&": [{"ct": {"key": "mark"}}, 4294967294]}, 254]}}}]}}, {"rule":
{"family": "inet", "table": "relayroute_relay", "chain": "PRE", "handle": 17, "expr":
[{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 255]}, "right": 0}},
{"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"&": [{"ct": {"key": "mark"}},
4294967040]}}}]}}]}
"""
# The same, as relayroute wrote it before 2026-11-30: restore and save through
# verdict maps to a chain per mark value (what a host upgraded from it holds).
KERNEL_RELAY_VMAP = """\
{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"table":
{"family": "inet", "name": "relayroute_relay", "handle": 2}}, {"chain": {"family": "inet",
"table": "relayroute_relay", "name": "OUT", "handle": 1, "type": "route", "hook": "output",
"prio": -151, "policy": "accept"}}, {"chain": {"family": "inet", "table":
"relayroute_relay", "name": "PRE", "handle": 2, "type": "filter", "hook": "prerouting",
"prio": -151, "policy": "accept"}}, {"chain": {"family": "inet", "table":
"relayroute_relay", "name": "ctmark-0xfe-0xff", "handle": 3}}, {"chain": {"family": "inet",
"table": "relayroute_relay", "name": "mark-0xfe-0xff", "handle": 4}}, {"rule": {"family":
"inet", "table": "relayroute_relay", "chain": "OUT", "handle": 5, "expr": [{"mangle":
{"key": {"meta": {"key": "mark"}}, "value": {"&": [{"meta": {"key": "mark"}},
4294967040]}}}]}}, {"rule": {"family": "inet", "table": "relayroute_relay", "chain": "OUT",
"handle": 7, "expr": [{"vmap": {"key": {"&": [{"ct": {"key": "mark"}}, 255]}, "data":
{"set": [[254, {"jump": {"target": "mark-0xfe-0xff"}}]]}}}]}}, {"rule": {"family": "inet",
"table": "relayroute_relay", "chain": "PRE", "handle": 8, "expr": [{"mangle": {"key":
{"meta": {"key": "mark"}}, "value": {"&": [{"meta": {"key": "mark"}}, 4294967040]}}}]}},
{"rule": {"family": "inet", "table": "relayroute_relay", "chain": "PRE", "handle": 10,
"expr": [{"vmap": {"key": {"&": [{"ct": {"key": "mark"}}, 255]}, "data": {"set": [[254,
{"jump": {"target": "mark-0xfe-0xff"}}]]}}}]}}, {"rule": {"family": "inet", "table":
"relayroute_relay", "chain": "PRE", "handle": 11, "expr": [{"match": {"op": "!=", "left":
{"&": [{"meta": {"key": "mark"}}, 255]}, "right": 0}}, {"return": null}]}}, {"rule":
{"family": "inet", "table": "relayroute_relay", "chain": "PRE", "handle": 12, "expr":
[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right":
{"prefix": {"addr": "192.0.2.0", "len": 24}}}}, {"return": null}]}}, {"rule": {"family":
"inet", "table": "relayroute_relay", "chain": "PRE", "handle": 13, "expr": [{"match": {"op":
"==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": {"prefix":
{"addr": "fe80::", "len": 10}}}}, {"return": null}]}}, {"rule": {"family": "inet", "table":
"relayroute_relay", "chain": "PRE", "handle": 15, "expr": [{"match": {"op": "==", "left":
{"payload": {"protocol": "icmpv6", "field": "type"}}, "right": {"set": ["nd-router-solicit",
"nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert", "nd-redirect"]}}},
{"return": null}]}}, {"rule": {"family": "inet", "table": "relayroute_relay", "chain":
"PRE", "handle": 16, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol":
"ether", "field": "saddr"}}, "right": "02:00:c0:00:02:02"}},
{"counter": {"packets": 3, "bytes": 180}}, {"mangle": {"key": {"meta":
{"key": "mark"}}, "value": {"|": [{"&": [{"meta": {"key": "mark"}}, 4294967294]},
254]}}}]}}, {"rule": {"family": "inet", "table": "relayroute_relay", "chain": "PRE",
"handle": 17, "expr": [{"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"&": [{"ct":
{"key": "mark"}}, 4294967040]}}}]}}, {"rule": {"family": "inet", "table":
"relayroute_relay", "chain": "PRE", "handle": 19, "expr": [{"vmap": {"key": {"&": [{"meta":
{"key": "mark"}}, 255]}, "data": {"set": [[254, {"jump": {"target":
"ctmark-0xfe-0xff"}}]]}}}]}}, {"rule": {"family": "inet", "table": "relayroute_relay",
"chain": "ctmark-0xfe-0xff", "handle": 20, "expr": [{"mangle": {"key": {"ct": {"key":
"mark"}}, "value": {"|": [{"&": [{"ct": {"key": "mark"}}, 4294967294]}, 254]}}}]}}, {"rule":
{"family": "inet", "table": "relayroute_relay", "chain": "mark-0xfe-0xff", "handle": 21,
"expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"&": [{"meta":
{"key": "mark"}}, 4294967294]}, 254]}}}]}}]}
"""
# nft -j list table inet relayroute_proxy, after applying the default proxy plan.
KERNEL_PROXY = """\
{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"table":
{"family": "inet", "name": "relayroute_proxy", "handle": 4}}, {"chain": {"family": "inet",
"table": "relayroute_proxy", "name": "PRE", "handle": 1, "type": "filter", "hook":
"prerouting", "prio": -151, "policy": "accept"}}, {"chain": {"family": "inet", "table":
"relayroute_proxy", "name": "DIVERT", "handle": 2}}, {"chain": {"family": "inet", "table":
"relayroute_proxy", "name": "socket-DIVERT", "handle": 3}}, {"rule": {"family": "inet",
"table": "relayroute_proxy", "chain": "PRE", "handle": 4, "expr": [{"match": {"op": "==",
"left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"match": {"op": "==", "left":
{"socket": {"key": "transparent"}}, "right": 1}}, {"jump": {"target": "socket-DIVERT"}}]}},
{"rule": {"family": "inet", "table": "relayroute_proxy", "chain": "DIVERT", "handle": 5,
"expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"&": [{"meta":
{"key": "mark"}}, 4294967041]}, 1]}}}]}}, {"rule": {"family": "inet", "table":
"relayroute_proxy", "chain": "DIVERT", "handle": 6, "expr": [{"accept": null}]}}, {"rule":
{"family": "inet", "table": "relayroute_proxy", "chain": "socket-DIVERT", "handle": 7,
"expr": [{"match": {"op": "==", "left": {"socket": {"key": "wildcard"}}, "right": 1}},
{"return": null}]}}, {"rule": {"family": "inet", "table": "relayroute_proxy", "chain":
"socket-DIVERT", "handle": 8, "expr": [{"jump": {"target": "DIVERT"}}]}}]}
"""


def kernel_ruleset(relay=KERNEL_RELAY, proxy=None):
    return nftables.Ruleset(
        {
            "relayroute_relay": nftables.parse(json.loads(relay)) if relay else None,
            "relayroute_proxy": nftables.parse(json.loads(proxy)) if proxy else None,
            "relayroute_policy": None,
        }
    )


T = "inet relayroute_relay"
SEED_LINES = [
    f"add table {T}",
    f"add chain {T} OUT {{ type route hook output priority mangle - 1; policy accept; }}",
    f"add chain {T} PRE {{ type filter hook prerouting priority mangle - 1; policy accept; }}",
    f"add rule {T} OUT meta mark set meta mark & 0xffffff00",
    f"add rule {T} OUT ct mark & 0xff == 0xfe meta mark set meta mark & 0xfffffffe | 0xfe",
    f"add rule {T} PRE meta mark set meta mark & 0xffffff00",
    f"add rule {T} PRE ct mark & 0xff == 0xfe meta mark set meta mark & 0xfffffffe | 0xfe",
    f"add rule {T} PRE meta mark & 0xff != 0x0 return",
    f"add rule {T} PRE ip saddr 192.0.2.0/24 return",
    f"add rule {T} PRE ip6 saddr fe80::/10 return",
    *(f"add rule {T} PRE icmpv6 type {nd} return" for nd in nftables.ND_TYPES),
    f"add rule {T} PRE ether saddr {MAC} counter meta mark set meta mark & 0xfffffffe | 0xfe",
    f"add rule {T} PRE meta mark & 0xff == 0xfe ct mark set ct mark & 0xfffffffe | 0xfe",
    f"add rule {T} PRE meta mark & 0xff == 0x0 ct mark set ct mark & 0xffffff00",
]
# What relayroute wrote before 2026-11-30 (KERNEL_RELAY_VMAP), as the reports print it.
ND = "nd-neighbor-advert, nd-neighbor-solicit, nd-redirect, nd-router-advert, nd-router-solicit"
VMAP_LINES = [
    f"add table {T}",
    f"add chain {T} OUT {{ type route hook output priority mangle - 1; policy accept; }}",
    f"add chain {T} PRE {{ type filter hook prerouting priority mangle - 1; policy accept; }}",
    f"add chain {T} ctmark-0xfe-0xff",
    f"add chain {T} mark-0xfe-0xff",
    f"add rule {T} OUT meta mark set meta mark & 0xffffff00",
    f"add rule {T} OUT ct mark & 0xff vmap {{ 0xfe : jump mark-0xfe-0xff }}",
    f"add rule {T} PRE meta mark set meta mark & 0xffffff00",
    f"add rule {T} PRE ct mark & 0xff vmap {{ 0xfe : jump mark-0xfe-0xff }}",
    f"add rule {T} PRE meta mark & 0xff != 0x0 return",
    f"add rule {T} PRE ip saddr 192.0.2.0/24 return",
    f"add rule {T} PRE ip6 saddr fe80::/10 return",
    f"add rule {T} PRE icmpv6 type {{ {ND} }} return",
    f"add rule {T} PRE ether saddr {MAC} counter meta mark set meta mark & 0xfffffffe | 0xfe",
    f"add rule {T} PRE ct mark set ct mark & 0xffffff00",
    f"add rule {T} PRE meta mark & 0xff vmap {{ 0xfe : jump ctmark-0xfe-0xff }}",
    f"add rule {T} ctmark-0xfe-0xff ct mark set ct mark & 0xfffffffe | 0xfe",
    f"add rule {T} mark-0xfe-0xff meta mark set meta mark & 0xfffffffe | 0xfe",
]


def test_relay_plan_renders_the_seed_with_the_mask_honoured():
    assert nftables.desired_lines(planner.relay_plan(seed_spec())) == SEED_LINES


def test_what_the_kernel_holds_reads_back_as_the_plan():
    plan = planner.relay_plan(seed_spec())
    ruleset = kernel_ruleset()
    assert ruleset.owned(planner.RELAY.chain_prefix) == nftables.desired(plan)
    assert nftables.owned_lines(ruleset, planner.RELAY.chain_prefix) == SEED_LINES
    assert nftables.transaction(plan, ruleset) is None
    proxy = planner.proxy_plan(model.proxy_spec())
    assert nftables.transaction(proxy, kernel_ruleset(None, KERNEL_PROXY)) is None


def test_every_mark_write_uses_constants_only_and_keeps_other_bits():
    """No ``meta mark set ... | ct mark ...``: nft < 1.1.2 refuses two variable operands."""
    plan = planner.relay_plan(seed_spec(second=True))
    for line in nftables.desired_lines(plan):
        if " set " in line:
            target, value = line.split(" set ", 1)
            assert target.split()[-1] == "mark"
            other = "ct mark" if target.endswith("meta mark") else "meta mark"
            assert other not in value, line
    pre = [line for line in nftables.desired_lines(plan) if " PRE " in line]
    assert pre[2:4] == [
        f"add rule {T} PRE ct mark & 0xff == 0xfa meta mark set meta mark & 0xfffffffa | 0xfa",
        f"add rule {T} PRE ct mark & 0xff == 0xfe meta mark set meta mark & 0xfffffffe | 0xfe",
    ]
    # Both MACs are marked before the save, each with its proxy's mark.
    assert [line.split(" meta mark set ")[1] for line in pre if "ether saddr" in line] == [
        "meta mark & 0xfffffffe | 0xfe",
        "meta mark & 0xfffffffa | 0xfa",
    ]
    # The save: one write of the connmark per packet, never a clear on the way to a value.
    assert pre[-3:] == [
        f"add rule {T} PRE meta mark & 0xff == 0xfa ct mark set ct mark & 0xfffffffa | 0xfa",
        f"add rule {T} PRE meta mark & 0xff == 0xfe ct mark set ct mark & 0xfffffffe | 0xfe",
        f"add rule {T} PRE meta mark & 0xff == 0x0 ct mark set ct mark & 0xffffff00",
    ]


def test_no_rule_looks_anything_up_in_a_set_or_jumps_by_a_map():
    """
    A packet that began its walk before a table replacement is committed runs
    the previous rules but looks sets up in the new generation, where the
    previous table's anonymous sets hold nothing: a mark restored through a
    map was lost (an established flow's connmark cleared; tests/functional/
    test_replace_race.py). Relay and proxy tables use none.
    """
    for plan in (
        planner.relay_plan(seed_spec(second=True)),
        planner.proxy_plan(model.proxy_spec()),
    ):
        for name, chain in nftables.desired(plan).items():
            for rule in chain.rules:
                text = json.dumps(json.loads(rule))
                for word in ('"set"', '"vmap"', '"map"'):
                    assert word not in text, (name, nftables.rule_text(rule))


def test_other_masks():
    lines = nftables.desired_lines(planner.relay_plan(seed_spec(mask=0xF0, mark=0x20)))
    assert f"add rule {T} PRE meta mark set meta mark & 0xffffff0f" in lines
    assert (
        f"add rule {T} PRE ct mark & 0xf0 == 0x20 meta mark set meta mark & 0xffffff2f | 0x20"
        in lines
    )
    # The whole mark: nft drops "& 0xffffffff" and "x & 0 | v"; so does the renderer.
    full = nftables.desired_lines(planner.relay_plan(seed_spec(mask=0xFFFFFFFF)))
    assert f"add rule {T} PRE meta mark set 0x0" in full
    assert f"add rule {T} PRE ct mark 0xfe meta mark set 0xfe" in full
    assert f"add rule {T} PRE meta mark 0x0 ct mark set 0x0" in full
    assert f"add rule {T} PRE meta mark != 0x0 return" in full
    assert not [line for line in full if "0xffffffff |" in line or "& 0xffffffff" in line]


def test_source_networks_render_by_their_family():
    def render(net):
        rules = nftables.render_rule(("return_if_source", net), set(), {})
        return nftables.rule_text(nftables._rule(rules[0]))

    assert render("192.0.2.0/24") == "ip saddr 192.0.2.0/24 return"
    assert render("192.0.2.7/32") == "ip saddr 192.0.2.7 return"
    assert render("2001:db8:0:1::/64") == "ip6 saddr 2001:db8:0:1::/64 return"
    assert render("2001:db8::25/128") == "ip6 saddr 2001:db8::25 return"


def test_proxy_plan_is_the_tproxy_recipe_with_wildcard_listeners_skipped():
    """
    As xt_socket: a listener on a wildcard address is skipped, every other
    transparent socket (also a handshake's request socket, which ``socket
    wildcard`` cannot match) diverted.
    """
    lines = nftables.desired_lines(planner.proxy_plan(model.proxy_spec()))
    p = "inet relayroute_proxy"
    assert lines == [
        f"add table {p}",
        f"add chain {p} PRE {{ type filter hook prerouting priority mangle - 1; policy accept; }}",
        f"add chain {p} DIVERT",
        f"add chain {p} socket-DIVERT",
        f"add rule {p} PRE meta l4proto tcp socket transparent 1 jump socket-DIVERT",
        f"add rule {p} DIVERT meta mark set meta mark & 0xffffff01 | 0x1",
        f"add rule {p} DIVERT accept",
        f"add rule {p} socket-DIVERT socket wildcard 1 return",
        f"add rule {p} socket-DIVERT jump DIVERT",
    ]


def test_the_transaction_replaces_only_the_owners_table_whole():
    plan = planner.relay_plan(seed_spec(second=True))
    payload = nftables.transaction(plan, kernel_ruleset(proxy=KERNEL_PROXY))
    lines = payload.splitlines()
    assert lines[:3] == [
        "table inet relayroute_relay {}",
        "delete table inet relayroute_relay",
        "table inet relayroute_relay {",
    ]
    assert lines[-1] == "}"
    assert not [line for line in lines if "table" in line and "relayroute_relay" not in line]
    assert "\t\ttype route hook output priority mangle - 1; policy accept;" in lines
    # A fresh host: the same batch (declaring the table first makes the delete safe).
    assert nftables.transaction(plan, nftables.Ruleset()) == payload


def test_removal_deletes_the_table_or_does_nothing():
    empty = planner.empty_plan(planner.RELAY)
    assert nftables.transaction(empty, kernel_ruleset()) == (
        "table inet relayroute_relay {}\ndelete table inet relayroute_relay\n"
    )
    assert nftables.transaction(empty, kernel_ruleset(relay=None)) is None
    assert nftables.desired_lines(empty) == []
    assert nftables.restore_commands(empty) == []


def test_rollback_goes_back_to_the_snapshot_or_to_no_table():
    before = kernel_ruleset()
    chains, jumps = nftables.snapshot(before, planner.RELAY.chain_prefix)
    changed = nftables.Ruleset(
        {"relayroute_relay": nftables.desired(planner.relay_plan(seed_spec(second=True)))}
    )
    payload = nftables.transaction_to(chains, jumps, changed, planner.RELAY.chain_prefix)
    assert payload == nftables.transaction(planner.relay_plan(seed_spec()), changed)
    assert nftables.transaction_to(chains, jumps, before, planner.RELAY.chain_prefix) is None
    none, jumps = nftables.snapshot(kernel_ruleset(relay=None), planner.RELAY.chain_prefix)
    assert none is None
    assert nftables.transaction_to(none, jumps, changed, planner.RELAY.chain_prefix) == (
        "table inet relayroute_relay {}\ndelete table inet relayroute_relay\n"
    )


def test_a_changed_table_is_seen_and_rewritten():
    document = json.loads(KERNEL_RELAY)
    # Someone changed the mark our rule sets: the table differs from the plan.
    for item in document["nftables"]:
        rule = item.get("rule")
        if rule and rule["chain"] == "PRE" and "ether" in json.dumps(rule["expr"]):
            rule["expr"][2]["mangle"]["value"]["|"][1] = 0xFD
    ruleset = nftables.Ruleset({"relayroute_relay": nftables.parse(document)})
    assert nftables.transaction(planner.relay_plan(seed_spec()), ruleset)
    assert nftables.marked_macs(ruleset, planner.RELAY.chain_prefix) == {0xFD: [MAC]}


def test_marked_packets_are_the_marking_rules_counters():
    assert nftables._packets_by_mac(json.loads(KERNEL_RELAY)) == {MAC: 3}


def test_marked_macs_as_the_iptables_backend_gives_them():
    ruleset = kernel_ruleset()
    assert nftables.marked_macs(ruleset, planner.RELAY.chain_prefix) == {254: [MAC]}
    assert nftables.marked_macs(ruleset, "relay") == {254: [MAC]}
    assert nftables.marked_macs(kernel_ruleset(relay=None), planner.RELAY.chain_prefix) == {}
    two = nftables.Ruleset(
        {"relayroute_relay": nftables.desired(planner.relay_plan(seed_spec(second=True)))}
    )
    assert nftables.marked_macs(two, planner.RELAY.chain_prefix) == {254: [MAC], 250: [MAC2]}


def test_restore_commands_replace_the_table_in_one_here_doc():
    plan = planner.relay_plan(seed_spec())
    lines = nftables.restore_commands(plan)
    assert lines[0] == "nft -f - <<'RULES'"
    assert lines[-1] == "RULES"
    assert "\n".join(lines[1:-1]) + "\n" == nftables.transaction(plan, nftables.Ruleset())
    script = persist.restore_script(plan, nftables)
    assert script.index("ip -4 rule show") < script.index("nft -f - <<'RULES'")


def test_network_scripts_mechanism_is_refused_clearly(tmp_path):
    plan = planner.relay_plan(seed_spec())
    with pytest.raises(ValueError, match="persist:mechanism: 'network-scripts'"):
        nftables.merge_saved("*mangle\nCOMMIT\n", plan)
    # Only cleaning relayroute's lines out of a file an earlier mechanism left is done.
    saved = iptables.merge_saved("*filter\nCOMMIT\n", plan)
    cleaned = nftables.merge_saved(saved, planner.empty_plan(planner.RELAY))
    assert "RELAYROUTE" not in cleaned
    assert "*filter" in cleaned
    # Through the engine, as an apply with that mechanism meets it: nothing written.
    path = tmp_path / "iptables"
    path.write_text("*mangle\nCOMMIT\n")
    target = persist.Target(
        str(tmp_path / "relayroute"),
        mechanism=persist.NETWORK_SCRIPTS,
        network_scripts_dir=str(tmp_path / "network-scripts"),
        iptables_file=str(path),
        sysctl_dir=str(tmp_path / "sysctl.d"),
        systemd_dir=str(tmp_path / "systemd"),
    )
    kernel = netlink.KernelState(
        (), (), ("192.0.2.0/24",), ("192.0.2.11",), (("192.0.2.0/24", "eth0"),), "eth0"
    )
    current = engine.Current(kernel, nftables.Ruleset())
    with pytest.raises(ValueError, match="persist:mechanism: 'network-scripts' restores"):
        engine._persist_changes(plan, current, nftables, target, "relayroute")
    assert path.read_text() == "*mangle\nCOMMIT\n"
    assert not (tmp_path / "relayroute").exists()


def test_the_engine_diff_speaks_nft():
    plan = planner.relay_plan(seed_spec())
    kernel = netlink.KernelState((), (), ("192.0.2.0/24",), ("192.0.2.11",))
    todo = engine.diff(plan, engine.Current(kernel, nftables.Ruleset()), nftables)
    assert todo.transaction.startswith("table inet relayroute_relay {}")
    assert todo.changes["nftables"] == {"old": [], "new": SEED_LINES}
    in_place = engine.diff(plan, engine.Current(kernel, kernel_ruleset()), nftables)
    assert in_place.transaction is None
    assert "nftables" not in in_place.changes


def test_backend_is_registered_and_selectable():
    assert engine.backend("nftables") is nftables
    assert "nftables" in topology.BACKENDS


def test_a_missing_library_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nftables, "_lib", None)
    monkeypatch.setattr(nftables, "LIBRARY", "libnftables-missing.so.0")
    with pytest.raises(nftables.BackendError, match="libnftables1"):
        nftables.read()
    with pytest.raises(RuntimeError, match="libnftables-missing"):
        nftables.apply("list tables")


def test_an_unknown_owner_prefix_is_refused():
    with pytest.raises(ValueError, match="no relayroute owner"):
        nftables.table_name("SOMEONE-ELSE-")


def test_a_table_written_with_verdict_maps_reads_prints_and_is_replaced():
    """
    A host upgraded from a relayroute that restored and saved through verdict
    maps: its table reads back (the maps' elements in any order), the reports
    print it, and the first apply replaces it whole with the constant rules.
    """
    document = json.loads(KERNEL_RELAY_VMAP)
    for item in document["nftables"]:
        for statement in (item.get("rule") or {}).get("expr", []):
            if "vmap" in statement:
                statement["vmap"]["data"]["set"].reverse()
    old = nftables.Ruleset({"relayroute_relay": nftables.parse(document)})
    prefix = planner.RELAY.chain_prefix
    assert old.owned(prefix) == kernel_ruleset(KERNEL_RELAY_VMAP).owned(prefix)
    assert nftables.owned_lines(old, prefix) == VMAP_LINES
    assert nftables.marked_macs(old, prefix) == {254: [MAC]}
    payload = nftables.transaction(planner.relay_plan(seed_spec()), old)
    assert payload
    assert "vmap" not in payload
    assert "delete table inet relayroute_relay" in payload


def test_neighbour_discovery_returns_type_by_type_before_any_mac_is_marked():
    """One rule per ICMPv6 type (no anonymous set), as the iptables backend; link-local too."""
    rules = nftables.render_rule(("return_if_neighbour_discovery",), set(), {})
    assert [nftables.rule_text(nftables._rule(rule)) for rule in rules] == [
        f"icmpv6 type {nd} return" for nd in nftables.ND_TYPES
    ]
    pre = [line for line in SEED_LINES if " PRE " in line]
    marking = next(i for i, line in enumerate(pre) if "ether saddr" in line)
    assert pre.index(f"add rule {T} PRE ip6 saddr fe80::/10 return") < marking
    for nd in nftables.ND_TYPES:
        assert pre.index(f"add rule {T} PRE icmpv6 type {nd} return") < marking
