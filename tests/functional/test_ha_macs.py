"""
An HA pair on the real kernel: two HAProxy nodes behind one floating LAN
address, each connecting to the relay from its own NIC (its physical MAC).
The relay lists both MACs under one proxy; connections from either node get
the proxy's one mark and are answered through the floating address, before
and after it moves from node A to node B (gratuitous ARP, as keepalived does),
with no re-apply on the relay.

    node A  192.0.2.5, floating 192.0.2.2 (then none)  --+
    node B  192.0.2.6, (then) floating 192.0.2.2        --+-- LAN bridge -- relay 192.0.2.11
                          (default route: 192.0.2.1, nobody)

Each node stands in for HAProxy's ``usesrc clientip`` connection: it holds the
client's address (on lo) and connects from it. The relay's default gateway
answers nobody, so a reply that does not take the proxy's table is lost.
"""

import time

import pytest

from tests.support.arp import send_garp
from tests.support.hosts import RELAY
from tests.support.netns import mac_of, veth
from tests.support.tcp import HeldSession, connect, start_server

pytestmark = [pytest.mark.root, pytest.mark.slow]

CLIENT = "203.0.113.20"  # the client's address, HAProxy's source towards the relay
FLOATING = "192.0.2.2"
NODES = {"a": "192.0.2.5", "b": "192.0.2.6"}


@pytest.fixture
def pair(make_netns):
    lan, relay = make_netns("lan"), make_netns("relay")
    nodes = {name: make_netns(f"node{name}") for name in NODES}
    lan.ip("link add br0 type bridge")
    lan.ip("link set br0 up")
    for host, port in ((relay, "l-relay"), *((ns, f"l-{name}") for name, ns in nodes.items())):
        veth(host, "lan0", lan, port)
        lan.ip(f"link set {port} master br0")
    relay.ip(f"addr add {RELAY}/24 dev lan0")
    relay.ip("route add default via 192.0.2.1")
    for name, ns in nodes.items():
        ns.ip(f"addr add {NODES[name]}/24 dev lan0")
        ns.ip(f"addr add {CLIENT}/32 dev lo")
    nodes["a"].ip(f"addr add {FLOATING}/24 dev lan0")
    start_server(relay, RELAY, 25)
    return {"relay": relay, **nodes}


def proxies(pair, names=("a", "b")):
    return {
        "master-relay": {
            "address": FLOATING,
            "macs": [mac_of(pair[name], "lan0") for name in names],
            "mark": 254,
            "table": 1000254,
            "priority": 1000,
        }
    }


def applied(loaders, pair, names=("a", "b")):
    with pair["relay"].entered():
        return loaders.states.relayroute.relay_present(
            name="relay",
            lan_networks=["192.0.2.0/24"],
            mark_mask=0xFF,
            proxies=proxies(pair, names),
        )


def fail_over(pair, source="a", target="b"):
    """Move the floating address from node ``source`` to ``target``, as keepalived does."""
    pair[source].ip(f"addr del {FLOATING}/24 dev lan0")
    pair[target].ip(f"addr add {FLOATING}/24 dev lan0")
    time.sleep(1.1)  # the relay ignores an ARP update within locktime (1 s) of the last
    send_garp(pair[target], "lan0", FLOATING)


def neighbour_mac(relay):
    return relay.ip(f"neigh show {FLOATING}").stdout.split("lladdr")[1].split()[0]


def marked_flows(loaders, relay):
    with relay.entered():
        return [line for line in loaders.modules.relayroute.flows(0xFF, 25) if "mark=254" in line]


def test_both_nodes_macs_are_marked_with_the_proxys_one_mark(loaders, pair):
    ret = applied(loaders, pair)
    assert ret.result is True, ret.comment
    rules = pair["relay"].exec("iptables-save -t mangle").stdout.splitlines()
    for name in NODES:
        line = (
            f"-A RELAYROUTE-RELAY-PRE -m mac --mac-source {mac_of(pair[name], 'lan0')} "
            "-j MARK --set-xmark 0xfe/0xff"
        )
        assert line in rules
    assert pair["relay"].exec("ip rule show").stdout.count("lookup 1000254") == 1


def test_a_failover_needs_no_reapply_and_node_a_sessions_die(loaders, pair):
    relay = pair["relay"]
    assert applied(loaders, pair).result is True
    # Node A holds the floating address: its connections are answered through it.
    assert connect(pair["a"], RELAY, 25, CLIENT) == f"220 hello {CLIENT}"
    assert neighbour_mac(relay) == mac_of(pair["a"], "lan0")
    held = HeldSession(pair["a"], RELAY, 25, CLIENT, timeout=5.0)
    try:
        assert held.banner == f"220 hello {CLIENT}"
        fail_over(pair)
        # The relay now sends the proxy's replies to node B ...
        assert neighbour_mac(relay) == mac_of(pair["b"], "lan0")
        # ... and every new connection, from node B's own MAC, is answered.
        for _ in range(3):
            assert connect(pair["b"], RELAY, 25, CLIENT) == f"220 hello {CLIENT}"
        # A session through node A dies: its replies reach node B, which has no
        # socket for it (and answers with a reset). Connection state is per node.
        held.send("NOOP after the failover")
        answer = held.reply(timeout=8.0)
        assert answer is None or answer.startswith("FAIL"), answer
    finally:
        held.close()
    assert len(marked_flows(loaders, relay)) >= 4  # every one of them took the mark


def test_control_a_node_whose_mac_is_not_listed_is_not_answered(loaders, pair):
    """Positive control: with only node A's MAC, node B's connections get no mark."""
    assert applied(loaders, pair, names=("a",)).result is True
    fail_over(pair)
    assert connect(pair["b"], RELAY, 25, CLIENT) is None
    # Listing node B's MAC too (no other change) makes the same probe answer.
    assert applied(loaders, pair).result is True
    assert connect(pair["b"], RELAY, 25, CLIENT) == f"220 hello {CLIENT}"
