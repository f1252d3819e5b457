"""
What a minion publishes to the mine, read from the real kernel through Salt's
loader, and the topology taking records (``validate_topology(records=...)``);
the lab (tests/lab_mine/test_fleet_mine.py) runs the real mine of a salt-master.
"""

import pytest

from tests.functional.test_relay import MAC

pytestmark = pytest.mark.root


def test_a_record_holds_the_hosts_lan_addresses_with_interface_and_mac(loaders, relay_ns):
    relay_ns.ip("-6 addr add 2001:db8:2::11/64 dev eth0 nodad")
    mac = relay_ns.exec("cat /sys/class/net/eth0/address").stdout.strip()
    with relay_ns.entered():
        record = loaders.modules.relayroute.mine_record()
    assert record["version"] == 1
    by_address = {entry["address"]: entry for entry in record["addresses"]}
    assert by_address["192.0.2.11"] == {
        "address": "192.0.2.11",
        "prefixlen": 24,
        "dev": "eth0",
        "mac": mac,
    }
    assert by_address["2001:db8:2::11"]["mac"] == mac
    # No loopback, no link-local address.
    assert set(by_address) == {"192.0.2.11", "2001:db8:2::11"}


MINE_FUNCTIONS = {"mine_functions": {"relayroute": {"mine_function": "relayroute.mine_record"}}}


def test_the_topology_takes_macs_and_relays_from_records(loaders, relay_ns, monkeypatch):
    monkeypatch.setitem(loaders.modules.pack, "__pillar__", MINE_FUNCTIONS)
    with relay_ns.entered():
        record = loaders.modules.relayroute.mine_record()
    proxy_record = {**record, "roles": ["proxy"]}
    proxy_record["addresses"] = [
        {"address": "192.0.2.2", "prefixlen": 24, "dev": "eth0", "mac": MAC}
    ]
    relay_record = {**record, "roles": ["relay"]}
    config = {
        "lan_networks": ["192.0.2.0/24"],
        "proxies": {
            "master-relay": {
                "address": "192.0.2.2",
                "vip": "203.0.113.25",
                "mark": 254,
                "table": 1000254,
            }
        },
        "mine": {"enabled": True},
        "relays_from_mine": True,
    }
    result = loaders.modules.relayroute.validate_topology(
        config, "master-relay", records={"master-relay": proxy_record, "relay7": relay_record}
    )
    assert result["errors"] == []
    assert result["relay"]["proxies"]["master-relay"]["mac"] == MAC
    assert result["proxy"]["relays"] == [
        {"name": "relay7", "address": "192.0.2.11", "ports": [25, 587]}
    ]
    assert any("relays:relay7" in note for note in result["mine"])


def test_reading_the_mine_while_nothing_publishes_is_an_error(loaders):
    config = {"lan_networks": ["192.0.2.0/24"], "relays_from_mine": True}
    result = loaders.modules.relayroute.validate_topology(config, "relay1", records={})
    assert result["errors"][0].startswith("mine_functions:relayroute: is not set, but ")
    assert result["relay"] is None
