"""
Reboot and reverse-path filtering on the real kernel.

- The relay's restore script, run on a namespace whose runtime state was
  flushed as a reboot would, brings back exactly what relayroute applied.
- A relay that reaches its proxy on a second interface, with strict rp_filter:
  proxied traffic is dropped unless that interface's reverse-path check uses
  the packet mark (src_valid_mark), which relayroute manages and, on removal,
  puts back as it was.
"""

import pytest

from tests.functional.test_relay import ARGS, plant_foreign_state
from tests.support.netns import mac_of, veth
from tests.support.tcp import connect, start_server

pytestmark = pytest.mark.root

DIRECT, PROXIED, RELAY = "203.0.113.10", "203.0.113.20", "192.0.2.11"


def flush_like_a_reboot(ns, tables=(1000254,)):
    """What a reboot loses: the whole mangle table, policy rules and tables, conntrack."""
    ns.exec("iptables -t mangle -F")
    ns.exec("iptables -t mangle -X")
    for line in ns.exec("ip -4 rule show").stdout.splitlines():
        priority = line.split(":")[0]
        if priority not in ("0", "32766", "32767"):
            ns.ip(f"rule del priority {priority}")
    for table in tables:
        ns.ip(f"route flush table {table}")
    ns.exec("conntrack -F", check=False)


def test_restore_script_brings_back_what_was_applied(loaders, relay_ns, tmp_path):
    persist = tmp_path / "relayroute"
    with relay_ns.entered():
        ret = loaders.modules.relayroute.relay_apply(persist_dir=str(persist), **ARGS)
        assert ret["changes"]["persist"] == {"old": None, "new": str(persist / "relay.restore")}
        applied = relay_ns.snapshot()
        flush_like_a_reboot(relay_ns)
        assert relay_ns.snapshot() != applied
        relay_ns.exec(["/bin/sh", str(persist / "relay.restore")])
        assert relay_ns.snapshot() == applied
        # Idempotent: running it again changes nothing, and Salt finds nothing to do.
        relay_ns.exec(["/bin/sh", str(persist / "relay.restore")])
        assert relay_ns.snapshot() == applied
        assert loaders.modules.relayroute.relay_apply(persist_dir=str(persist), **ARGS) == {
            "changes": {}
        }
        gone = loaders.modules.relayroute.relay_remove(persist_dir=str(persist))
    assert gone["changes"]["persist"] == {"old": str(persist / "relay.restore"), "new": None}
    assert not (persist / "relay.restore").exists()


def test_restore_script_keeps_other_tools_state(loaders, relay_ns, tmp_path):
    plant_foreign_state(relay_ns)
    persist = tmp_path / "relayroute"
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(persist_dir=str(persist), **ARGS)
    applied = relay_ns.snapshot()
    # A partial loss (someone flushed relayroute's chains only): the script repairs it
    # without touching the rest.
    relay_ns.exec("iptables -t mangle -F RELAYROUTE-RELAY-PRE")
    relay_ns.exec(["/bin/sh", str(persist / "relay.restore")])
    assert relay_ns.snapshot() == applied


@pytest.fixture
def two_legged(make_netns):
    """
    The relay reaches the gateway on lan0 (192.0.2.0/25) and the proxy on px0
    (192.0.2.128/25), with strict reverse-path filtering everywhere.
    """
    client, inet, gw, proxy, relay = (
        make_netns(name) for name in ("client", "inet", "gw", "proxy", "relay")
    )
    veth(client, "eth0", inet, "c0")
    client.ip(f"addr add {DIRECT}/24 dev eth0")
    client.ip(f"addr add {PROXIED}/24 dev eth0")
    client.ip("route add default via 203.0.113.1")
    inet.ip("addr add 203.0.113.1/24 dev c0")
    veth(inet, "g0", gw, "up0")
    inet.ip("addr add 198.51.100.1/30 dev g0")
    gw.ip("addr add 198.51.100.2/30 dev up0")
    veth(inet, "p0", proxy, "up0")
    inet.ip("addr add 198.51.100.5/30 dev p0")
    proxy.ip("addr add 198.51.100.6/30 dev up0")
    inet.ip("route add 192.0.2.0/24 via 198.51.100.2")
    inet.ip("route add default via 198.51.100.6 table 100")
    inet.ip(f"rule add priority 100 from {PROXIED} lookup 100")
    veth(gw, "lan0", relay, "lan0")
    gw.ip("addr add 192.0.2.1/25 dev lan0")
    relay.ip(f"addr add {RELAY}/25 dev lan0")
    veth(proxy, "lan0", relay, "px0")
    proxy.ip("addr add 192.0.2.130/25 dev lan0")
    relay.ip("addr add 192.0.2.131/25 dev px0")
    gw.ip("route add 192.0.2.128/25 via 192.0.2.11")
    relay.ip("route add default via 192.0.2.1")
    for router, uplink in ((gw, "198.51.100.1"), (proxy, "198.51.100.5")):
        router.sysctl("net.ipv4.ip_forward", 1)
        router.ip(f"route add default via {uplink}")
        router.exec("iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP")
    proxy.ip("route add 192.0.2.0/24 via 192.0.2.131")
    inet.sysctl("net.ipv4.ip_forward", 1)
    for host in (gw, proxy, inet):
        host.sysctl("net.ipv4.conf.all.rp_filter", 0)
    for key in ("all", "default", "lan0", "px0"):
        relay.sysctl(f"net.ipv4.conf.{key}.rp_filter", 1)
    start_server(relay, RELAY, 25)
    return {"client": client, "relay": relay, "proxy": proxy}


def test_strict_rp_filter_on_a_second_interface(loaders, two_legged, tmp_path):
    relay = two_legged["relay"]
    persist = str(tmp_path / "relayroute")
    args = {
        "lan_networks": ["192.0.2.0/25", "192.0.2.128/25"],
        "mark_mask": 0xFF,
        "proxies": {
            "master-relay": {
                "address": "192.0.2.130",
                "mac": mac_of(two_legged["proxy"], "lan0"),
                "mark": 254,
                "table": 1000254,
                "priority": 1000,
            }
        },
        "persist_dir": persist,
    }
    valid_mark = "sysctl -n net.ipv4.conf.px0.src_valid_mark"
    with relay.entered():
        ret = loaders.modules.relayroute.relay_apply(**args)
    assert ret["changes"]["sysctls"] == {
        "old": ["net.ipv4.conf.px0.src_valid_mark = 0"],
        "new": ["net.ipv4.conf.px0.src_valid_mark = 1"],
    }
    assert connect(two_legged["client"], RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    assert connect(two_legged["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    # The control: the same routing without the mark-aware check drops proxied traffic.
    relay.sysctl("net.ipv4.conf.px0.src_valid_mark", 0)
    assert connect(two_legged["client"], RELAY, 25, PROXIED, timeout=2) is None
    assert connect(two_legged["client"], RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    with relay.entered():
        again = loaders.modules.relayroute.relay_apply(**args)
        assert set(again["changes"]) == {"sysctls"}
        assert connect(two_legged["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
        assert (
            "sysctl -qw net.ipv4.conf.px0.src_valid_mark=1"
            in (tmp_path / "relayroute" / "relay.restore").read_text()
        )
        loaders.modules.relayroute.relay_remove(persist_dir=persist)
    # Removal puts back the value the interface had before relayroute.
    assert relay.exec(valid_mark).stdout.strip() == "0"
    assert relay.exec("sysctl -n net.ipv4.conf.px0.rp_filter").stdout.strip() == "1"
