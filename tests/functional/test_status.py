"""
``relayroute.status`` on the real kernel, through Salt's loaders, with each
backend: after a proxied and a direct connection, the proxy's row shows its
rule and route ok, its MAC marked, the packet that marked the connection and
the connection itself; ``(direct)`` counts the direct one; the relay's last
apply is its memory file's time; after relayroute's route is deleted, the row
says MISSING and the drift column the check's verdict. Reading changes nothing.
"""

import time

import pytest

from tests.functional.test_reply_path import proxies
from tests.support.hosts import DIRECT, PROXIED, RELAY
from tests.support.tcp import connect

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_status_rows_after_traffic_and_after_drift(loaders, net, backend, tmp_path, monkeypatch):
    relay = net["relay"]
    args = proxies(net)
    pillar = {
        "relayroute": {
            "lan_networks": ["192.0.2.0/24"],
            "mark_mask": 0xFF,
            "backend": backend,
            "persist": {"dir": str(tmp_path)},
            "proxies": {"master-relay": {**args["master-relay"], "vip": "198.51.100.25"}},
            "relays": {"relayroute-functional": {"address": RELAY}},
        }
    }
    monkeypatch.setitem(loaders.modules.pack, "__pillar__", pillar)
    before_apply = time.time()
    with relay.entered():
        ret = loaders.states.relayroute.relay_present(
            name="relay",
            lan_networks=["192.0.2.0/24"],
            mark_mask=0xFF,
            proxies=args,
            backend=backend,
            prefix="relayroute",
            persist={"dir": str(tmp_path)},
        )
    assert ret.result is True, ret.comment
    assert connect(net["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    assert connect(net["client"], RELAY, 25, DIRECT) == f"220 hello {DIRECT}"

    snapshot = relay.snapshot()
    with relay.entered():
        rows = loaders.modules.relayroute.status()
    assert relay.snapshot() == snapshot
    assert [row["proxy"] for row in rows] == ["master-relay", "(direct)"]
    proxy, direct = rows
    assert proxy["mark"] == "0xfe"
    assert proxy["rule"] == "IPv4 1000 ok"
    assert proxy["route"] == "IPv4 via 192.0.2.2 ok"
    assert proxy["macs_marked"] == args["master-relay"]["mac"]
    # The SYN of the proxied connection was marked; later packets carry the
    # restored mark and are not counted again.
    assert proxy["marked_packets"] >= 1
    assert proxy["flows"] >= 1
    assert direct["flows"] >= 1
    assert proxy["drift"] == "ok"
    applied = proxy["last_apply"]
    stamp = time.strptime(applied.split(" (")[0], "%Y-%m-%d %H:%M:%S UTC")
    assert time.mktime(stamp) - time.timezone >= int(before_apply) - 1, applied

    relay.ip("route del default table 1000254")
    with relay.entered():
        proxy = loaders.modules.relayroute.status()[0]
    assert proxy["route"] == "IPv4 via 192.0.2.2 MISSING"
    assert proxy["drift"].startswith("relayroute DRIFT:"), proxy
