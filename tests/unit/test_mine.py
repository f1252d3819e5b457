"""
The mine-fed topology (``relayroute_core.mine``), without Salt: what a
minion publishes, what a topology takes from the records, what the pillar
keeps, and stale records ignored.
"""

import pytest

from relayroute_core import mine, topology

NOW = 1_000_000.0
PROXY_MAC, NODE_B_MAC = "02:00:c0:00:02:02", "02:00:c0:00:02:12"


def rec(roles, *addresses, age=10):
    return mine.record(list(addresses), roles, now=NOW - age)


RECORDS = {
    "master-relay": rec(
        ["proxy"],
        ("192.0.2.2", 24, "eth0", PROXY_MAC.upper()),
        ("203.0.113.25", 24, "eth1", "02:00:cb:00:71:19"),
        ("fe80::2", 64, "eth0", PROXY_MAC),
        ("127.0.0.1", 8, "lo", ""),
    ),
    "relay1": rec(["relay"], ("192.0.2.11", 24, "eth0", "02:00:c0:00:02:0b")),
    "relay2": rec(
        ["relay"],
        ("192.0.2.12", 24, "eth0", "02:00:c0:00:02:0c"),
        ("2001:db8:2::12", 64, "eth0", "02:00:c0:00:02:0c"),
    ),
    "relay3": rec(["relay"], ("192.0.2.13", 24, "eth0", "02:00:c0:00:02:0d")),
}


def pillar(**changes):
    data = {
        "lan_networks": ["192.0.2.0/24", "2001:db8:2::/64"],
        "proxies": {
            "master-relay": {
                "address": "192.0.2.2",
                "vip": "203.0.113.25",
                "mark": 254,
                "table": 1000254,
            }
        },
        "relays": {"relay1": {"address": "192.0.2.11"}},
        "mine": {"enabled": True},
    }
    data.update(changes)
    return data


def test_a_record_keeps_global_unicast_addresses_with_their_interface_and_mac():
    item = RECORDS["master-relay"]
    assert item["roles"] == ["proxy"]
    assert item["published"] == NOW - 10
    assert [entry["address"] for entry in item["addresses"]] == ["192.0.2.2", "203.0.113.25"]
    assert item["addresses"][0] == {
        "address": "192.0.2.2",
        "prefixlen": 24,
        "dev": "eth0",
        "mac": PROXY_MAC,
    }


def test_a_proxy_without_macs_takes_its_minions_mac_on_the_lan():
    merged, notes = mine.merge(pillar(), RECORDS, now=NOW)
    assert merged["proxies"]["master-relay"]["macs"] == [PROXY_MAC]
    assert any("proxies:master-relay:macs" in note for note in notes)
    # The pillar's data is not changed.
    assert "macs" not in pillar()["proxies"]["master-relay"]


def test_an_ha_pair_takes_every_nodes_mac():
    records = {
        **RECORDS,
        "haproxy-b": rec(["proxy"], ("192.0.2.4", 24, "eth0", NODE_B_MAC)),
    }
    data = pillar()
    data["proxies"]["master-relay"]["nodes"] = ["master-relay", "haproxy-b"]
    merged, _notes = mine.merge(data, records, now=NOW)
    assert merged["proxies"]["master-relay"]["macs"] == sorted([PROXY_MAC, NODE_B_MAC])


@pytest.mark.parametrize("written", [{"mac": "02:00:00:00:00:99"}, {"macs": ["02:00:00:00:00:99"]}])
def test_the_pillars_mac_wins(written):
    data = pillar()
    data["proxies"]["master-relay"].update(written)
    merged, _notes = mine.merge(data, RECORDS, now=NOW)
    assert merged["proxies"]["master-relay"] == data["proxies"]["master-relay"]


def test_relays_are_added_only_when_the_pillar_allows_it():
    merged, _notes = mine.merge(pillar(), RECORDS, now=NOW)
    assert set(merged["relays"]) == {"relay1"}
    merged, notes = mine.merge(pillar(relays_from_mine=True), RECORDS, now=NOW)
    assert merged["relays"] == {
        "relay1": {"address": "192.0.2.11"},
        "relay2": {"address": ["192.0.2.12", "2001:db8:2::12"]},
        "relay3": {"address": "192.0.2.13"},
    }
    assert "mine: relays:relay3 192.0.2.13 added from the mine" in notes
    # Draining by pillar alone: globs that leave relay3 out.
    merged, _notes = mine.merge(pillar(relays_from_mine=["relay2"]), RECORDS, now=NOW)
    assert set(merged["relays"]) == {"relay1", "relay2"}


def test_the_pillars_relays_win_and_may_take_their_address_from_the_mine():
    data = pillar(relays={"relay1": {"address": "192.0.2.99"}, "relay2": {"ports": [25]}})
    merged, _notes = mine.merge(data, RECORDS, now=NOW)
    assert merged["relays"]["relay1"] == {"address": "192.0.2.99"}
    assert merged["relays"]["relay2"] == {
        "ports": [25],
        "address": ["192.0.2.12", "2001:db8:2::12"],
    }


def test_the_relays_may_all_come_from_the_mine():
    data = pillar(relays_from_mine=True)
    del data["relays"]
    merged, _notes = mine.merge(data, RECORDS, now=NOW)
    assert set(merged["relays"]) == {"relay1", "relay2", "relay3"}
    checked = topology.topology(merged, "master-relay")
    assert checked["errors"] == []
    assert [relay["name"] for relay in checked["proxy"]["relays"]] == ["relay1", "relay2", "relay3"]


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        (
            {"mine": {"enabled": "yes"}},
            "relayroute:mine:enabled: must be true or false (got 'yes')",
        ),
        ({"mine": {"max_age": 0}}, "relayroute:mine:max_age: must be a number of seconds above 0"),
        ({"mine": {"maxage": 5}}, "relayroute:mine:maxage: is not a known key; did you mean"),
        ({"relays_from_mine": "yes"}, "relayroute:relays_from_mine: must be true, false or"),
        ({"relays_from_mine": ["relay*", ""]}, "relayroute:relays_from_mine:1: must be a minion"),
    ],
)
def test_bad_mine_settings_are_named(changes, error):
    errors = topology.topology(pillar(**changes), "relay1")["errors"]
    assert any(item.startswith(error) for item in errors), errors


def test_stale_records_are_ignored_and_named():
    records = {**RECORDS, "relay3": rec(["relay"], ("192.0.2.13", 24, "eth0", "x"), age=9000)}
    merged, notes = mine.merge(pillar(relays_from_mine=True), records, now=NOW)
    assert "relay3" not in merged["relays"]
    assert "mine: relay3's record is 9000 s old (mine:max_age 7200): ignored" in notes
    old_proxy = {**RECORDS, "master-relay": {**RECORDS["master-relay"], "published": NOW - 8000}}
    merged, _notes = mine.merge(pillar(), old_proxy, now=NOW)
    # No fresh record: the relay resolves the MAC through its neighbour table.
    assert "macs" not in merged["proxies"]["master-relay"]
    merged, _notes = mine.merge(pillar(mine={"enabled": True, "max_age": 9000}), old_proxy, now=NOW)
    assert merged["proxies"]["master-relay"]["macs"] == [PROXY_MAC]


def test_records_of_another_kind_are_ignored():
    records = {"relay9": "not a record", "relay8": {"version": 1}}
    merged, notes = mine.merge(pillar(relays_from_mine=True), records, now=NOW)
    assert set(merged["relays"]) == {"relay1"}
    assert len(notes) == 2


def test_without_mine_settings_nothing_is_read():
    data = pillar()
    del data["mine"]
    assert mine.wanted(data) is False
    assert mine.merge(data, RECORDS, now=NOW) == (data, [])


def test_a_new_fleet_with_an_empty_mine_is_told_what_to_run():
    data = pillar(relays_from_mine=True)
    del data["relays"]
    merged, _notes = mine.merge(data, {}, now=NOW)
    errors = topology.topology(merged, "master-relay")["errors"]
    assert errors == [
        "relayroute:relays: has no relay: none in the pillar and no relay-role minion with a "
        "fresh record in the mine (relays_from_mine); on a new fleet run saltutil.sync_all and "
        "mine.update on every minion before the first highstate (README, 'The fleet from the "
        "mine') (got None)"
    ]
