"""
Traffic on the real kernel: a relay reached both through a stateful default
gateway and through a proxy that forwards. Replies must leave by the way their
connection came in, or the stateful firewall (which drops conntrack INVALID
packets) kills them.

    client 203.0.113.10 (direct)  --+                +-- gw (stateful)  --+
    client 203.0.113.20 (proxied) --+-- inet router -+                    +-- LAN -- relay
                                                     +-- proxy (router) --+
"""

import pytest

from tests.support.hosts import DIRECT, PROXIED, RELAY, internet
from tests.support.netns import mac_of, veth
from tests.support.tcp import HeldSession, connect, start_server

pytestmark = pytest.mark.root


@pytest.fixture
def net(make_netns):
    client, inet, gw, proxy, lan, relay = (
        make_netns(name) for name in ("client", "inet", "gw", "proxy", "lan", "relay")
    )
    internet(client, inet, gw, proxy, DIRECT, PROXIED)
    # The LAN: a bridge joining gateway, proxy and relay.
    lan.ip("link add br0 type bridge")
    lan.ip("link set br0 up")
    for host, port in ((gw, "l-gw"), (proxy, "l-px"), (relay, "l-relay")):
        veth(host, "lan0", lan, port)
        lan.ip(f"link set {port} master br0")
    gw.ip("addr add 192.0.2.1/24 dev lan0")
    proxy.ip("addr add 192.0.2.2/24 dev lan0")
    relay.ip(f"addr add {RELAY}/24 dev lan0")
    relay.ip("route add default via 192.0.2.1")
    start_server(relay, RELAY, 25)
    return {"client": client, "relay": relay, "proxy": proxy, "gw": gw}


def proxies(net):
    return {
        "master-relay": {
            "address": "192.0.2.2",
            "mac": mac_of(net["proxy"], "lan0"),
            "mark": 254,
            "table": 1000254,
            "priority": 1000,
        }
    }


def test_without_relayroute_the_proxied_path_fails(net):
    assert connect(net["client"], RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    assert connect(net["client"], RELAY, 25, PROXIED, timeout=2) is None


def test_without_relayroute_proxy_as_default_breaks_the_direct_path(net):
    net["relay"].ip("route replace default via 192.0.2.2")
    assert connect(net["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    assert connect(net["client"], RELAY, 25, DIRECT, timeout=2) is None


def test_with_relayroute_both_paths_answer_by_the_way_they_came(loaders, net):
    relay = net["relay"]
    with relay.entered():
        ret = loaders.states.relayroute.relay_present(
            name="relay", lan_networks=["192.0.2.0/24"], mark_mask=0xFF, proxies=proxies(net)
        )
        assert ret.result is True
    assert connect(net["client"], RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    assert connect(net["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    with relay.entered():
        flows = loaders.modules.relayroute.flows(mark_mask=0xFF, port=25)
    by_source = {line.split("src=")[1].split()[0]: line for line in flows}
    assert by_source[DIRECT].endswith("mark=0")
    assert by_source[PROXIED].endswith("mark=254")
    # The same view as the seed's `conntrack -L`.
    listing = relay.exec("conntrack -L -p tcp --dport 25").stdout
    assert any(f"src={PROXIED}" in line and "mark=254" in line for line in listing.splitlines())
    assert any(f"src={DIRECT}" in line and "mark=0" in line for line in listing.splitlines())


def test_mark_change_moves_live_connections_with_their_proxy(loaders, net):
    """
    A proxy's mark changes while its connections are open: they follow it to
    the new mark (their connmark is moved after the new rule is in place and
    before the old one goes), so their replies keep leaving through the proxy.
    """
    relay = net["relay"]
    args = {"name": "relay", "lan_networks": ["192.0.2.0/24"], "mark_mask": 0xFF}
    with relay.entered():
        assert loaders.states.relayroute.relay_present(proxies=proxies(net), **args).result
    proxied = HeldSession(net["client"], RELAY, 25, PROXIED)
    direct = HeldSession(net["client"], RELAY, 25, DIRECT)
    try:
        assert proxied.banner == f"220 hello {PROXIED}"
        assert direct.banner == f"220 hello {DIRECT}"
        changed = proxies(net)
        changed["master-relay"].update(mark=253, table=1000253)
        with relay.entered():
            ret = loaders.states.relayroute.relay_present(proxies=changed, **args)
            assert ret.result is True
            assert ret.changes["connmarks"] == ["0xfe/0xff -> 0xfd/0xff"]
            flows = loaders.modules.relayroute.flows(mark_mask=0xFF, port=25)
        assert any(f"src={PROXIED}" in f and f.endswith("mark=253") for f in flows), flows
        assert any(f"src={DIRECT}" in f and f.endswith("mark=0") for f in flows), flows
        assert relay.exec("ip route show table 1000254").stdout == ""
        # Both sessions carry on after the change, each on its own path.
        assert proxied.say("NOOP after the change") == "250 NOOP after the change"
        assert direct.say("NOOP after the change") == "250 NOOP after the change"
    finally:
        proxied.close()
        direct.close()
    assert connect(net["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
