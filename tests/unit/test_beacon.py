"""
Following a proxy's MAC: which proxies are followed, what the rules mark,
and the beacon's decisions (when it reads the packet filter, when it fires),
with the execution module's functions stubbed. Pure, no root.
"""

import importlib.util
import pathlib

import pytest

from relayroute_core import follow, iptables, model, planner

OLD, NEW, PINNED = "02:00:c0:00:02:02", "02:00:c0:00:02:99", "02:00:c0:00:02:03"


def relay_args():
    return {
        "lan_networks": ["192.0.2.0/24"],
        "mark_mask": 0xFF,
        "proxies": {
            "master-relay": {
                "address": "192.0.2.2",
                "mark": 254,
                "table": 1000254,
                "priority": 1000,
            },
            "pinned": {
                "address": "192.0.2.3",
                "mark": 250,
                "table": 1000250,
                "priority": 1001,
                "mac": PINNED,
            },
            "pair": {
                "address": "192.0.2.4",
                "mark": 251,
                "table": 1000251,
                "priority": 1002,
                "macs": [PINNED],
            },
        },
    }


def test_only_proxies_without_mac_or_macs_are_followed():
    assert follow.discovered(relay_args()) == {
        "master-relay": {"address": "192.0.2.2", "addresses": ["192.0.2.2"], "mark": 254}
    }
    assert follow.discovered(None) == {}


def test_a_dual_stack_proxy_is_followed_by_both_of_its_addresses():
    args = relay_args()
    args["proxies"]["master-relay"]["address"] = ["192.0.2.2", "2001:db8:2::2"]
    assert follow.discovered(args)["master-relay"] == {
        "address": "192.0.2.2",
        "addresses": ["192.0.2.2", "2001:db8:2::2"],
        "mark": 254,
    }


@pytest.mark.parametrize(
    ("macs", "expected"),
    [
        ({"192.0.2.2": OLD, "2001:db8:2::2": OLD}, [OLD]),
        ({"192.0.2.2": OLD, "2001:db8:2::2": NEW}, [OLD, NEW]),
        ({"192.0.2.2": None, "2001:db8:2::2": NEW}, [NEW]),
        ({"192.0.2.2": None, "2001:db8:2::2": None}, []),
    ],
    ids=["same-nic", "two-macs", "ipv6-only", "none"],
)
def test_neighbours_of_both_families_each_once_ipv4_first(macs, expected):
    found = follow.neighbours(["192.0.2.2", "2001:db8:2::2"], macs)
    assert found == {"neighbours": expected, "neighbour": expected[0] if expected else None}


def test_marked_macs_reads_the_owners_chains_only():
    proxies = {
        "master-relay": {
            "address": "192.0.2.2",
            "mark": 254,
            "table": 1000254,
            "priority": 1000,
            "macs": [OLD, NEW],
        }
    }
    plan = planner.relay_plan(model.relay_spec(["192.0.2.0/24"], 0xFF, proxies))
    chains, jumps = iptables.desired(plan)
    ruleset = iptables.Ruleset(
        {**chains, "OTHER": [f"-m mac --mac-source {PINNED.upper()} -j MARK --set-xmark 0x7/0xff"]}
    )
    assert iptables.marked_macs(ruleset, planner.RELAY.chain_prefix) == {254: [OLD, NEW]}
    # iptables-save prints MACs in capitals.
    upper = iptables.Ruleset(
        {
            "RELAYROUTE-RELAY-PRE": [
                s.replace(OLD, OLD.upper()) for s in chains["RELAYROUTE-RELAY-PRE"]
            ]
        }
    )
    assert iptables.marked_macs(upper, "RELAYROUTE-RELAY-PRE") == {254: [OLD, NEW]}


def load_beacon(salt, clock):
    path = pathlib.Path(__file__).parents[2] / "_beacons" / "relayroute.py"
    spec = importlib.util.spec_from_file_location("relayroute_beacon", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__salt__ = salt
    module.__context__ = {}
    module.time = type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])})
    return module


class Host:
    """What the stubbed execution module answers, and how often it was asked."""

    def __init__(self, neighbour, marked):
        self.neighbour, self.marked, self.reads = neighbour, marked, 0

    def salt(self):
        return {
            "relayroute.discovered_proxies": lambda: {
                "master-relay": {"address": "192.0.2.2", "mark": 254, "neighbour": self.neighbour}
            },
            "relayroute.marked_macs": self.read,
        }

    def read(self):
        self.reads += 1
        return {254: list(self.marked)}


def test_the_beacon_fires_once_per_new_mac_and_reads_the_filter_only_when_needed():
    clock = [100.0]
    host = Host(OLD, [OLD])
    beacon = load_beacon(host.salt(), clock)
    config = [{"refire": 60}]
    assert beacon.validate(config) == (True, "valid")

    assert beacon.beacon(config) == []
    assert host.reads == 1  # the first look reads what is marked
    for _ in range(10):
        clock[0] += 5
        assert beacon.beacon(config) == []
    assert host.reads == 1  # nothing changed: netlink only

    host.neighbour = NEW  # the proxy's gratuitous ARP moved the neighbour entry
    clock[0] += 5
    events = beacon.beacon(config)
    assert events == [
        {
            "tag": "mac",
            "proxy": "master-relay",
            "address": "192.0.2.2",
            "mark": 254,
            "mac": NEW,
            "marked": [OLD],
        }
    ]
    assert host.reads == 2
    clock[0] += 5
    assert beacon.beacon(config) == []  # fired already; the filter is not read again
    assert host.reads == 2
    clock[0] += 60
    assert beacon.beacon(config)[0]["mac"] == NEW  # still not followed after refire: again
    assert host.reads == 3

    host.marked = [NEW]  # the reactor's apply followed
    clock[0] += 60
    assert beacon.beacon(config) == []
    assert host.reads == 4
    clock[0] += 5
    assert beacon.beacon(config) == []
    assert host.reads == 4

    # And back at once (a failed-over VM moved back): the moved entry is read
    # for, and fired for, at the next look.
    host.neighbour = OLD
    clock[0] += 5
    assert [e["mac"] for e in beacon.beacon(config)] == [OLD]
    assert host.reads == 5
    host.marked = [OLD]
    host.neighbour = NEW  # and away again within refire: not held back
    clock[0] += 5
    assert [e["mac"] for e in beacon.beacon(config)] == [NEW]
    assert host.reads == 6


def test_a_dual_stack_proxy_fires_for_a_mac_either_family_carries():
    clock = [0.0]
    entries = {"neighbours": [OLD]}
    salt = {
        "relayroute.discovered_proxies": lambda: {
            "master-relay": {
                "address": "192.0.2.2",
                "addresses": ["192.0.2.2", "2001:db8:2::2"],
                "mark": 254,
                "neighbour": entries["neighbours"][0],
                "neighbours": list(entries["neighbours"]),
            }
        },
        "relayroute.marked_macs": lambda: {254: [OLD]},
    }
    beacon = load_beacon(salt, clock)
    assert beacon.beacon([]) == []
    # The IPv6 entry moved (its neighbour advertisement came first), IPv4's not yet.
    entries["neighbours"] = [OLD, NEW]
    clock[0] += 5
    assert [(e["proxy"], e["mac"]) for e in beacon.beacon([])] == [("master-relay", NEW)]


def test_an_entry_without_mac_and_a_pillar_that_does_not_validate_fire_nothing():
    clock = [0.0]
    host = Host(None, [OLD])
    beacon = load_beacon(host.salt(), clock)
    assert beacon.beacon([]) == []

    def broken():
        raise ValueError("relayroute:proxies: must be a mapping (got 'x')")

    beacon.__salt__["relayroute.discovered_proxies"] = broken
    assert beacon.beacon([]) == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"refire": 1}, "must be a list"),
        ([{"refire": -1}], "refire must be seconds"),
        ([{"refire": True}], "refire must be seconds"),
        ([{"rfire": 5}], "unknown setting(s) ['rfire']"),
    ],
)
def test_bad_beacon_settings_are_named(config, message):
    beacon = load_beacon({}, [0.0])
    valid, comment = beacon.validate(config)
    assert not valid
    assert message in comment


def test_netlink_reads_work_inside_a_running_event_loop():
    # A beacon runs in the minion's main process, inside Salt's asyncio loop,
    # where pyroute2's synchronous API fails ("This event loop is already
    # running"); the netlink layer then works from a thread. A dump of the
    # neighbour table needs no root.
    import asyncio

    from relayroute_core import netlink

    async def inside():
        return netlink.neighbour_macs(["192.0.2.254"])

    assert asyncio.run(inside()) == {"192.0.2.254": None}
