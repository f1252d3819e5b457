"""
firewalld (the real daemon, Debian 12's 1.3.3) on the relay, in its network
namespace with a private system bus (tests/support/firewalld.py), a zone that
allows SMTP.

With relayroute's nftables backend, firewalld's start, ``--reload``,
``--complete-reload`` and restart replace firewalld's own ``table inet
firewalld`` only: relayroute's ``table inet relayroute_relay`` stays the same
object (same rule handles), and connections through both paths, opened
continuously during each event and held open across all of them, all get
their answers; the connmarks still say which path each flow took.

With relayroute's iptables backend (iptables-nft), firewalld, whichever its
own backend, flushes iptables' tables on every start and reload
(``iptables-restore`` of ``-F -X -Z`` per table, firewalld's ``flush()`` over
all its backends): relayroute's mangle chains are gone and the proxied path
with them. That is why the network-scripts mechanism (iptables backend)
refuses a host where firewalld.service is enabled.

IPv6 has no rp_filter sysctl; firewalld's ``IPv6_rpfilter=yes`` (its default)
does that job with a lookup that includes the packet mark. On a relay whose
proxy is on another interface than the route back to the client, proxied IPv6
passes it with relayroute's IPv6 rule in place (the mark is set at mangle - 1,
before firewalld's chains), and is dropped by it without that rule.
"""

import re
import threading
import time

import pytest

from tests.functional.test_nftables_backend import nft, our_table, relay_args
from tests.support.firewalld import Firewalld
from tests.support.hosts import DIRECT, PROXIED, RELAY
from tests.support.netns import mac_of, veth
from tests.support.tcp import CLIENT, NEGATIVE_TIMEOUT, SERVER, Ticker, connect

pytestmark = [pytest.mark.root, pytest.mark.slow]

PATHS = {"direct": DIRECT, "proxied": PROXIED}


@pytest.fixture
def firewalld(tmp_path):
    """``start(ns, **conf)``: firewalld running in ``ns``; each stopped (by pid) at the end."""
    made = []

    def start(ns, **conf):
        fw = Firewalld(ns, tmp_path / f"firewalld{len(made)}", **conf)
        made.append(fw)
        fw.start()
        return fw

    yield start
    for fw in made:
        fw.stop()


class Opener:
    """
    New connections from ``source``, one after the other until ``stop``: each
    attempt's start, end and banner (None: no banner within the probe's
    timeout), so an event can be checked against the attempts in flight.
    """

    def __init__(self, client, source):
        self.client, self.source = client, source
        self.attempts = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            start = time.monotonic()
            banner = connect(self.client, RELAY, 25, self.source)
            self.attempts.append((start, time.monotonic(), banner))

    def wait_for(self, count, after=0.0):
        """Wait (bounded) until ``count`` attempts started after ``after`` have ended."""
        deadline = time.monotonic() + 4 * NEGATIVE_TIMEOUT
        while time.monotonic() < deadline:
            if sum(1 for start, _end, _b in list(self.attempts) if start > after) >= count:
                return True
            time.sleep(0.05)
        return False

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2 * NEGATIVE_TIMEOUT + 10)
        return self.attempts


def conntrack_marks(relay):
    """``{source: {marks}}`` of the relay's flows to port 25 from the two clients."""
    marks = {DIRECT: set(), PROXIED: set()}
    for line in relay.exec("conntrack -L -p tcp --dport 25").stdout.splitlines():
        fields = {}
        for item in line.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)  # the original direction's src, not the reply's
        if fields.get("src") in marks:
            marks[fields["src"]].add(int(fields["mark"]))
    return marks


def ours_now(relay):
    """relayroute's table with handles; the marking rule's counter without its values."""
    text = nft(relay, "-a list table inet relayroute_relay").stdout
    return re.sub(r"counter packets \d+ bytes \d+", "counter", text)


def test_reload_complete_reload_and_restart_leave_relayroutes_table_and_both_paths(
    loaders, net, firewalld
):
    relay, client = net["relay"], net["client"]
    fw = firewalld(relay)
    # Control: firewalld in place, relayroute not yet: the proxied path has no answer.
    assert "tcp dport 25 accept" in nft(relay, "list table inet firewalld").stdout
    assert connect(client, RELAY, 25, PROXIED, timeout=4) is None
    assert connect(client, RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    with relay.entered():
        ret = loaders.states.relayroute.relay_present(name="r", backend="nftables",
                                                      **relay_args(net))  # fmt: skip
    assert ret.result is True, ret.comment
    ours = ours_now(relay)
    assert "priority mangle - 1" in ours
    relay.exec("conntrack -F")  # the control's flow (mark 0, SYN_RECV) would linger

    held = {name: Ticker(client, RELAY, 25, source) for name, source in PATHS.items()}
    openers = {name: Opener(client, source) for name, source in PATHS.items()}
    events = []
    try:
        for name, action in (
            ("reload", fw.reload),
            ("complete-reload", fw.complete_reload),
            ("restart", fw.restart),
        ):
            # Traffic flowing on both paths before the event ...
            now = time.monotonic()
            assert all(o.wait_for(2, after=now) for o in openers.values()), name
            assert all(t.wait_for(len(t.exchanges) + 2) for t in held.values()), name
            firewall_before = nft(relay, "-a list table inet firewalld").stdout
            start = time.monotonic()
            action()
            end = time.monotonic()
            events.append((name, start, end))
            # ... and after it, firewalld's table rebuilt, relayroute's the very same.
            assert ours_now(relay) == ours, name
            assert "tcp dport 25 accept" in nft(relay, "list table inet firewalld").stdout
            if name != "complete-reload":
                # reload and restart delete firewalld's table and make it anew
                assert nft(relay, "-a list table inet firewalld").stdout != firewall_before
            assert all(o.wait_for(2, after=end) for o in openers.values()), name
            assert all(t.wait_for(len(t.exchanges) + 2) for t in held.values()), name
    finally:
        attempts = {name: o.stop() for name, o in openers.items()}
        exchanges = {name: t.stop() for name, t in held.items()}

    for name, source in PATHS.items():
        failed = [a for a in attempts[name] if a[2] != f"220 hello {source}"]
        assert not failed, (name, failed, fw.log_tail())
        # Connections were being opened while each event ran.
        for event, start, end in events:
            during = [a for a in attempts[name] if a[0] < end and a[1] > start]
            assert during, (name, event, start, end)
        # The held session exchanged before, across and after every event.
        ticker = held[name]
        assert ticker.banner == f"220 hello {source}"
        assert not ticker.errors, (name, ticker.errors)
        assert not ticker.lost(), (name, ticker.lost())
        for event, start, end in events:
            assert any(e.sent < start for e in exchanges[name]), (name, event)
            assert any(e.sent > end for e in exchanges[name]), (name, event)

    assert ours_now(relay) == ours
    # The marks: the proxy's on every proxied flow, 0 on every direct one.
    marks = conntrack_marks(relay)
    assert marks[PROXIED] == {254}, marks
    assert marks[DIRECT] == {0}, marks
    with relay.entered():
        gone = loaders.states.relayroute.relay_absent(name="r", backend="nftables")
    assert gone.result is True, gone.comment
    assert our_table(relay) is None
    assert "tcp dport 25 accept" in nft(relay, "list table inet firewalld").stdout


@pytest.mark.parametrize("firewalld_backend", ["nftables", "iptables"])
def test_firewalld_flushes_iptables_mangle_and_relayroutes_iptables_chains_with_it(
    loaders, net, firewalld, firewalld_backend
):
    """The contrast: relayroute's iptables backend (iptables-nft) loses its chains."""
    relay, client = net["relay"], net["client"]
    fw = firewalld(relay, FirewallBackend=firewalld_backend)
    with relay.entered():
        ret = loaders.modules.relayroute.relay_apply(backend="iptables", **relay_args(net))
    assert "iptables" in ret["changes"]
    assert "RELAYROUTE-RELAY-PRE" in relay.exec("iptables-save -t mangle").stdout
    assert connect(client, RELAY, 25, PROXIED) == f"220 hello {PROXIED}"

    fw.reload()
    mangle = relay.exec("iptables-save -t mangle").stdout
    assert "RELAYROUTE" not in mangle, mangle
    assert connect(client, RELAY, 25, PROXIED, timeout=4) is None
    assert connect(client, RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    # The policy routing is netlink's, not firewalld's: it is all still there.
    assert "lookup 1000254" in relay.exec("ip rule show").stdout

    # A re-apply puts the chains back; the next reload takes them again.
    with relay.entered():
        again = loaders.modules.relayroute.relay_apply(backend="iptables", **relay_args(net))
    assert "iptables" in again["changes"]
    assert connect(client, RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    fw.restart()
    assert "RELAYROUTE" not in relay.exec("iptables-save -t mangle").stdout
    with relay.entered():
        loaders.modules.relayroute.relay_remove(backend="iptables")


# --- IPv6: firewalld's reverse-path filter and relayroute's mark -------------
#
# The relay reaches the gateway on lan0 and the proxy on px0 (the proxy on its
# own leg: with both on one link reverse-path filtering passes either way). A
# proxied client's SYN comes in on px0, its source routed (main table) out of
# lan0. firewalld's IPv6 rpfilter looks the source up with the packet's mark:
# nftables backend ``meta nfproto ipv6 fib saddr . mark . iif oif missing drop``
# (filter_PREROUTING, priority filter + 10), iptables backend ``ip6tables -t
# mangle -I PREROUTING -m rpfilter --invert --validmark -j DROP`` (iptables-nft:
# mangle, -150). relayroute's PRE chain (mangle - 1) has marked the packet by
# then, and its IPv6 fwmark rule sends that lookup to the proxy's table, out of
# px0: it passes. The mark without the rule is not enough.

V6 = {
    "direct": "2001:db8:c::10",
    "proxied": "2001:db8:c::20",
    "relay": "2001:db8:a::11",
    "proxy_leg": "2001:db8:b::2",
}

# Counters around firewalld's filter_PREROUTING (filter + 10): a SYN from the
# proxied client counted before it and not after it was dropped there, and
# whether it carried relayroute's mark when it got there. (firewalld's
# iptables backend drops at -150, before both.)
AROUND = """\
table inet rpfwatch {
	chain before {
		type filter hook prerouting priority filter + 5; policy accept;
		ip6 saddr 2001:db8:c::20 tcp flags syn counter comment "before"
		ip6 saddr 2001:db8:c::20 tcp flags syn meta mark & 0xff == 0xfe counter comment "marked"
	}
	chain after {
		type filter hook prerouting priority filter + 15; policy accept;
		ip6 saddr 2001:db8:c::20 tcp flags syn counter comment "after"
	}
}
"""

RPFILTER = {
    "nftables": ("nft list chain inet firewalld filter_PREROUTING",
                 "meta nfproto ipv6 fib saddr . mark . iif oif missing drop"),
    "iptables": ("ip6tables-save -t mangle",
                 "-A PREROUTING -m rpfilter --validmark --invert -j DROP"),
}  # fmt: skip


def v6_args(proxy_mac):
    """The relay's pillar in IPv6 alone: the proxy on px0's network."""
    return {
        "lan_networks": ["2001:db8:a::/64", "2001:db8:b::/64"],
        "mark_mask": 0xFF,
        "proxies": {
            "m": {"address": V6["proxy_leg"], "mac": proxy_mac, "mark": 254,
                  "table": 1000254, "priority": 1000},
        },
        "backend": "nftables",
    }  # fmt: skip


def _v6(ns, address, dev):
    ns.ip(f"-6 addr add {address} dev {dev} nodad")


@pytest.fixture
def two_legged_v6(make_netns):
    """client - inet - (gw | proxy) - relay, IPv6 only; inet sends the proxied client's
    traffic through the proxy, the relay's default route is the gateway's."""
    client, inet, gw, proxy, relay = (
        make_netns(name) for name in ("client", "inet", "gw", "proxy", "relay")
    )
    veth(client, "eth0", inet, "c0")
    _v6(client, f"{V6['direct']}/64", "eth0")
    _v6(client, f"{V6['proxied']}/64", "eth0")
    client.ip("-6 route add default via 2001:db8:c::1")
    _v6(inet, "2001:db8:c::1/64", "c0")
    veth(inet, "g0", gw, "up0")
    _v6(inet, "2001:db8:1::1/64", "g0")
    _v6(gw, "2001:db8:1::2/64", "up0")
    veth(inet, "p0", proxy, "up0")
    _v6(inet, "2001:db8:2::1/64", "p0")
    _v6(proxy, "2001:db8:2::2/64", "up0")
    inet.ip("-6 route add 2001:db8:a::/64 via 2001:db8:1::2")
    inet.ip("-6 route add default via 2001:db8:2::2 table 100")
    inet.ip(f"-6 rule add priority 100 from {V6['proxied']} lookup 100")
    veth(gw, "lan0", relay, "lan0")
    _v6(gw, "2001:db8:a::1/64", "lan0")
    _v6(relay, f"{V6['relay']}/64", "lan0")
    gw.ip("-6 route add default via 2001:db8:1::1")
    veth(proxy, "lan0", relay, "px0")
    _v6(proxy, f"{V6['proxy_leg']}/64", "lan0")
    _v6(relay, "2001:db8:b::11/64", "px0")
    proxy.ip("-6 route add default via 2001:db8:2::1")
    proxy.ip("-6 route add 2001:db8:a::/64 via 2001:db8:b::11")
    relay.ip("-6 route add default via 2001:db8:a::1")
    for router in (inet, gw, proxy):
        router.sysctl("net.ipv6.conf.all.forwarding", 1)
    server = SERVER.replace("socket.socket()", "socket.socket(socket.AF_INET6)")
    proc = relay.popen(["python3", "-u", "-c", server, V6["relay"], "25"], stdout=-1, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return {"client": client, "relay": relay, "proxy": proxy}


def connect6(client, source, timeout=NEGATIVE_TIMEOUT):
    code = CLIENT.replace("socket.socket()", "socket.socket(socket.AF_INET6)")
    proc = client.exec(["python3", "-c", code, V6["relay"], "25", source, str(timeout)],
                       check=False, timeout=timeout + 10)  # fmt: skip
    return proc.stdout.strip() if proc.returncode == 0 else None


def syn_counts(relay):
    text = nft(relay, "list table inet rpfwatch").stdout
    return {
        name: int(packets)
        for packets, name in re.findall(r'counter packets (\d+) bytes \d+ comment "(\w+)"', text)
    }


@pytest.mark.parametrize("firewalld_backend", ["nftables", "iptables"])
def test_ipv6_rpfilter_passes_proxied_traffic_relayroute_marks_with_its_ipv6_rule(
    loaders, two_legged_v6, firewalld, firewalld_backend
):
    relay, client = two_legged_v6["relay"], two_legged_v6["client"]
    fw = firewalld(relay, FirewallBackend=firewalld_backend)
    listing, rpfilter = RPFILTER[firewalld_backend]
    assert rpfilter in relay.exec(listing).stdout
    nft(relay, "-f -", input=AROUND)
    on_nft = firewalld_backend == "nftables"
    assert connect6(client, V6["direct"]) == f"220 hello {V6['direct']}"

    # 1. Without relayroute the proxied SYN is dropped by the rpfilter.
    assert connect6(client, V6["proxied"], timeout=4) is None
    seen = syn_counts(relay)
    assert seen["after"] == 0, seen
    if on_nft:
        assert seen["before"] >= 1, seen
        assert seen["marked"] == 0, seen

    # 2. relayroute (nftables, IPv6): marked at mangle - 1, looked up through
    # its fwmark rule: it passes; the connmarks tell the paths apart.
    args = v6_args(mac_of(two_legged_v6["proxy"], "lan0"))
    with relay.entered():
        ret = loaders.states.relayroute.relay_present(name="r", **args)
    assert ret.result is True, ret.comment
    rule = "1000:\tfrom all fwmark 0xfe/0xff lookup 1000254 proto 210"
    assert rule in relay.exec("ip -6 rule show").stdout
    relay.exec("conntrack -F")  # the control's flow (mark 0) would linger
    assert connect6(client, V6["proxied"]) == f"220 hello {V6['proxied']}"
    assert connect6(client, V6["direct"]) == f"220 hello {V6['direct']}"
    assert syn_counts(relay)["after"] >= 1
    flows = relay.exec("conntrack -L -f ipv6 -p tcp --dport 25").stdout.splitlines()
    assert any(V6["proxied"] in line and "mark=254" in line for line in flows), flows
    assert any(V6["direct"] in line and "mark=0" in line for line in flows), flows

    # 3. The mark alone, without the IPv6 rule: the lookup ends in the main
    # table, out of lan0: dropped again.
    relay.ip("-6 rule del priority 1000")
    before = syn_counts(relay)
    assert connect6(client, V6["proxied"], timeout=4) is None
    seen = syn_counts(relay)
    assert seen["after"] == before["after"], seen
    if on_nft:
        assert seen["marked"] > before["marked"], seen

    # 4. A re-apply puts the rule back; firewalld's reload changes nothing of it.
    with relay.entered():
        ret = loaders.states.relayroute.relay_present(name="r", **args)
    assert ret.result is True, ret.comment
    assert set(ret.changes) == {"rules"}, ret.changes
    ours = ours_now(relay)
    fw.reload()
    assert connect6(client, V6["proxied"]) == f"220 hello {V6['proxied']}"
    assert ours_now(relay) == ours
    with relay.entered():
        gone = loaders.states.relayroute.relay_absent(name="r", backend="nftables")
    assert gone.result is True, gone.comment
