"""
Traffic on the real kernel: a relay reached both through a stateful default
gateway and through a proxy that forwards. Replies must leave by the way their
connection came in, or the stateful firewall (which drops conntrack INVALID
packets, picking nothing up mid-stream: ``hosts.make_stateful``) kills them.

    client 203.0.113.10 (direct)  --+                +-- gw (stateful)  --+
    client 203.0.113.20 (proxied) --+-- inet router -+                    +-- LAN -- relay
                                                     +-- proxy (router) --+
"""

import time

import pytest

from tests.support.hosts import (
    DIRECT,
    PROXIED,
    RELAY,
    dropped,
    internet,
)
from tests.support.netns import mac_of, veth
from tests.support.tcp import NEGATIVE_TIMEOUT, HeldSession, connect, start_server

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


def relayroute_applied(loaders, net, **proxy_changes):
    args = proxies(net)
    args["master-relay"].update(proxy_changes)
    with net["relay"].entered():
        return loaders.states.relayroute.relay_present(
            name="relay", lan_networks=["192.0.2.0/24"], mark_mask=0xFF, proxies=args
        )


def wait_until(condition, timeout=NEGATIVE_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_without_relayroute_the_proxied_path_fails(net):
    client, relay, gw = net["client"], net["relay"], net["gw"]
    assert connect(client, RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    assert dropped(gw) == 0
    # The relay answers the proxied client through the gateway, which never saw
    # the connection begin: its SYN-ACKs are dropped.
    assert connect(client, RELAY, 25, PROXIED) is None
    assert dropped(gw) > 0
    # Positive control: the same probe answers, under the same load, once the
    # relay's replies go back through the proxy.
    relay.ip("route replace default via 192.0.2.2")
    assert connect(client, RELAY, 25, PROXIED) == f"220 hello {PROXIED}"


def test_without_relayroute_proxy_as_default_breaks_the_direct_path(net):
    client, relay, proxy = net["client"], net["relay"], net["proxy"]
    relay.ip("route replace default via 192.0.2.2")
    assert connect(client, RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    assert dropped(proxy) == 0
    assert connect(client, RELAY, 25, DIRECT) is None
    assert dropped(proxy) > 0
    # Positive control: the same probe, with the relay's default route back.
    relay.ip("route replace default via 192.0.2.1")
    assert connect(client, RELAY, 25, DIRECT) == f"220 hello {DIRECT}"


def test_with_relayroute_both_paths_answer_by_the_way_they_came(loaders, net):
    relay = net["relay"]
    assert relayroute_applied(loaders, net).result is True
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


@pytest.mark.parametrize(
    ("source", "router", "wrong", "right"),
    [
        (PROXIED, "gw", "via 192.0.2.1 table 1000254", "via 192.0.2.2 table 1000254"),
        (DIRECT, "proxy", "via 192.0.2.2", "via 192.0.2.1"),
    ],
    ids=["proxied-replies-via-gateway", "direct-replies-via-proxy"],
)
def test_stateful_routers_catch_a_reply_misrouted_mid_stream(
    loaders, net, source, router, wrong, right
):
    """
    The control behind every "replies keep their path" claim: a connection
    established on the right path, whose replies are switched to the other
    router in mid-stream, stalls (the router drops them: it picks no
    connection up mid-stream), and carries on once they are switched back.
    """
    assert relayroute_applied(loaders, net).result is True
    relay, router = net["relay"], net[router]
    session = HeldSession(net["client"], RELAY, 25, source)
    try:
        assert session.banner == f"220 hello {source}"
        assert session.say("NOOP on the right path") == "250 NOOP on the right path"
        assert dropped(router) == 0
        relay.ip(f"route replace default {wrong}")
        session.send("NOOP misrouted")
        # The answer and its retransmissions reach the wrong router, which drops them.
        assert wait_until(lambda: dropped(router) >= 2), dropped(router)
        assert not session.pending()
        relay.ip(f"route replace default {right}")
        # The relay retransmits the answer, now through the right router.
        assert session.reply() == "250 NOOP misrouted"
        assert session.say("NOOP after") == "250 NOOP after"
    finally:
        session.close()


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
