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
    count_forwarded,
    dropped,
    forwarded,
)
from tests.support.netns import mac_of
from tests.support.tcp import NEGATIVE_TIMEOUT, HeldSession, Ticker, connect

pytestmark = [pytest.mark.root, pytest.mark.slow]


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


# Each step of the engine is held this long, so that live traffic crosses every
# state the kernel passes through during an apply.
STEP_PAUSE = 0.8
STALL = 2.0  # an exchange slower than this (seconds) counts as stalled


def paced_engine(loaders, monkeypatch, steps):
    """
    Make the relayroute module loaded by ``loaders`` record each netlink
    operation and packet-filter transaction it applies, as ``(time, label)``
    in ``steps``, and hold each for ``STEP_PAUSE`` seconds.
    """
    engine = loaders.modules.relayroute.relay_apply.__globals__["engine"]
    run_ops, backend = engine.netlink.run_ops, engine.backend()
    apply = backend.apply

    def paced_run_ops(ops):
        done = []
        for verb, obj in ops:
            done += run_ops([(verb, obj)])
            steps.append((time.monotonic(), label(verb, obj)))
            time.sleep(STEP_PAUSE)
        return done

    def paced_apply(payload):
        apply(payload)
        steps.append((time.monotonic(), backend.NAME))
        time.sleep(STEP_PAUSE)

    monkeypatch.setattr(engine.netlink, "run_ops", paced_run_ops)
    monkeypatch.setattr(backend, "apply", paced_apply)


def label(verb, obj):
    if verb == "connmark_move":
        old, old_mask, new, new_mask = obj
        return f"{verb} {old:#x}/{old_mask:#x} -> {new:#x}/{new_mask:#x}"
    return f"{verb} {obj.line()}" if hasattr(obj, "line") else f"{verb} {obj!r}"


def test_mark_change_moves_live_connections_with_their_proxy(loaders, net, monkeypatch):
    """
    A proxy's mark and table change while its connections exchange data: they
    follow it to the new mark (their connmark is moved after the new rule and
    chains are in place and before the old rule and table go), so their
    replies leave through the proxy at every moment of the change. Each step of
    the apply is held for a while, and two connections exchange a line every
    0.15 s throughout: every state the kernel passes through carries traffic,
    and a reply that took the wrong router even once would be counted there
    (and dropped: the routers pick up nothing mid-stream).
    """
    relay, gw, proxy = net["relay"], net["gw"], net["proxy"]
    assert relayroute_applied(loaders, net).result is True
    for router in (gw, proxy):
        count_forwarded(router, "to proxied", f"-p tcp -s {RELAY} --sport 25 -d {PROXIED}")
        count_forwarded(router, "to direct", f"-p tcp -s {RELAY} --sport 25 -d {DIRECT}")
    steps = []
    proxied = Ticker(net["client"], RELAY, 25, PROXIED)
    direct = Ticker(net["client"], RELAY, 25, DIRECT)
    try:
        assert proxied.banner == f"220 hello {PROXIED}"
        assert direct.banner == f"220 hello {DIRECT}"
        assert proxied.wait_for(3)
        assert direct.wait_for(3)
        changed = proxies(net)
        changed["master-relay"].update(mark=253, table=1000253)
        paced_engine(loaders, monkeypatch, steps)
        with relay.entered():
            # The execution module itself: a state runs through state.single,
            # whose fresh loader would load the module again, unpaced.
            ret = loaders.modules.relayroute.relay_apply(
                lan_networks=["192.0.2.0/24"], mark_mask=0xFF, proxies=changed
            )
        steps.append((time.monotonic(), "returned"))
        with relay.entered():
            flows = loaders.modules.relayroute.flows(mark_mask=0xFF, port=25)
        time.sleep(STEP_PAUSE)
        ended = time.monotonic()
    finally:
        proxied.stop()
        direct.stop()
    assert ret["changes"]["connmarks"] == ["0xfe/0xff -> 0xfd/0xff"]
    # The open connections: the proxied one moved to the new mark, the direct one unmarked.
    assert any(f"src={PROXIED}" in f and f.endswith("mark=253") for f in flows), flows
    assert any(f"src={DIRECT}" in f and f.endswith("mark=0") for f in flows), flows

    # The order: new table and rule, chains, connmark move, then the old ones go.
    labels = [step for _, step in steps]
    assert labels[:4] == [
        "route_replace default via 192.0.2.2 table 1000253 proto 210",
        "rule_add 1000: from all fwmark 0xfd/0xff lookup 1000253 proto 210",
        "iptables",
        "connmark_move 0xfe/0xff -> 0xfd/0xff",
    ], labels
    assert sorted(labels[4:-1]) == [
        "route_del default via 192.0.2.2 table 1000254 proto 210",
        "rule_del 1000: from all fwmark 0xfe/0xff lookup 1000254 proto 210",
    ], labels

    # Every reply left through its own router: none went the wrong way, none
    # was dropped, and the counters do count (positive control).
    wrong_way = {
        "gw: replies to the proxied client": forwarded(gw, "to proxied"),
        "proxy: replies to the direct client": forwarded(proxy, "to direct"),
        "gw: dropped": dropped(gw),
        "proxy: dropped": dropped(proxy),
    }
    assert set(wrong_way.values()) == {0}, wrong_way
    assert forwarded(proxy, "to proxied") >= len(proxied.exchanges)
    assert forwarded(gw, "to direct") >= len(direct.exchanges)
    # No exchange was lost or stalled, and traffic crossed every state: while
    # each step's result stood (until the next step), both connections
    # completed at least one exchange.
    spans = list(zip([t for t, _ in steps], [t for t, _ in steps[1:]] + [ended], labels))
    for ticker in (proxied, direct):
        assert not ticker.errors, ticker.errors
        assert not ticker.lost(), ticker.lost()
        assert not [e for e in ticker.exchanges if e.rtt > STALL], ticker.exchanges
        unprobed = [
            step
            for begin, end, step in spans
            if not any(begin <= e.sent and e.answered <= end for e in ticker.exchanges)
        ]
        assert not unprobed, (ticker.banner, unprobed)

    assert relay.exec("ip route show table 1000254").stdout == ""
    assert connect(net["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    assert connect(net["client"], RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
