"""
IPv6 through each packet-filter backend on the real kernel: a relay with a
dual-stack proxy, applied through Salt's loaders, then real IPv6 traffic.

    client 2001:db8:203::10 (direct)  -- gw (stateful, IPv6) --+
    client 2001:db8:203::20 (proxied) -- proxy (forwards)  ----+-- LAN 2001:db8:2::/64 -- relay

- TCP from the proxy's MAC gets the proxy's mark in conntrack, direct TCP 0,
  and the proxied client is answered through the proxy (the gateway, which
  never saw the connection begin, would drop the replies);
- neighbour discovery (a DAD solicitation from ``::``, which no source
  network returns) and link-local traffic (an echo to the relay's fe80::
  address) are never marked: an observer table that runs after relayroute's
  chains counts those packets and those of them carrying relayroute's bits;
- a second apply is a no-op; removal leaves nothing in ip6tables or nft,
  while another tool's ip6tables mangle rules and another nft table stay.
"""

import os
import re
import textwrap

import pytest

from tests.support.hosts import make_stateful
from tests.support.netns import mac_of, veth
from tests.support.tcp import connect, start_server, transparent_server

pytestmark = [pytest.mark.root, pytest.mark.slow]

BACKENDS = ["iptables", "nftables"]
# The iptables backend on both of its flavours (iptables-nft, the host's; iptables-legacy).
FLAVOURS = ["iptables", "iptables-legacy", "nftables"]
RELAY6, PROXY6, GW6 = "2001:db8:2::11", "2001:db8:2::2", "2001:db8:2::1"
DIRECT6, PROXIED6 = "2001:db8:203::10", "2001:db8:203::20"
MARK = 254

# Another tool's IPv6 mangle state, bits 0xff0000 of the mark; never matches the test's traffic.
FOREIGN_MANGLE6 = """\
*mangle
:OTHER-V6 - [0:0]
-A PREROUTING -j OTHER-V6
-A OTHER-V6 -s 2001:db8:9::/48 -j MARK --set-xmark 0x10000/0xff0000
COMMIT
"""
# Another nft table, which also observes: it runs after relayroute's chains
# (priority mangle + 10) and counts ND and link-local packets, and those of
# them that carry relayroute's bits of the mark.
ND = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect"
OBSERVER = textwrap.dedent(
    f"""\
    table inet observer {{
        chain pre {{
            type filter hook prerouting priority mangle + 10; policy accept;
            icmpv6 type {{ {ND} }} counter comment "nd seen"
            icmpv6 type {{ {ND} }} meta mark & 0xff != 0 counter comment "nd marked"
            ip6 saddr fe80::/10 counter comment "link-local seen"
            ip6 saddr fe80::/10 meta mark & 0xff != 0 counter comment "link-local marked"
        }}
    }}
    """
)

# An ICMPv6 echo to a link-local address, answered or not (no ping on the host).
ECHO = """
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.settimeout(5)
s.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x1234, 1) + b"relayroute", (sys.argv[1], 0, 0,
         socket.if_nametoindex(sys.argv[2])))
while True:
    data, peer = s.recvfrom(1500)
    if data[0] == 129:
        print("reply from", peer[0])
        break
"""


def shim(directory, links):
    """A directory of tools (``{name: target}``) to put first on PATH."""
    directory.mkdir()
    for name, target in links.items():
        (directory / name).symlink_to(target)
    return directory


@pytest.fixture
def flavour(request, tmp_path, monkeypatch):
    """
    The backend a test runs (the parameter), and with ``iptables-legacy`` every
    iptables tool, IPv4's and IPv6's, is legacy's for the test, with an xtables
    lock of the test's own.
    """
    name = request.param
    if name == "iptables-legacy":
        tools = [
            f"{base}{suffix}"
            for base in ("iptables", "ip6tables")
            for suffix in ("", "-save", "-restore")
        ]
        links = {tool: f"/usr/sbin/{tool.replace('tables', 'tables-legacy', 1)}" for tool in tools}
        directory = shim(tmp_path / "legacy-bin", links)
        monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")
        monkeypatch.setenv("XTABLES_LOCKFILE", str(tmp_path / "xtables.lock"))
        return "iptables"
    return name


@pytest.fixture
def net6(make_netns):
    """The hosts above; the LAN also carries IPv4 (192.0.2.0/24), as a dual-stack relay's does."""
    client, gw, proxy, lan, relay = (
        make_netns(name) for name in ("client", "gw", "proxy", "lan", "relay")
    )
    lan.ip("link add br0 type bridge mcast_snooping 0")
    lan.ip("link set br0 up")
    for host, port, v4, v6 in (
        (gw, "l-gw", "192.0.2.1", GW6),
        (proxy, "l-px", "192.0.2.2", PROXY6),
        (relay, "l-relay", "192.0.2.11", RELAY6),
    ):
        veth(host, "lan0", lan, port)
        lan.ip(f"link set {port} master br0")
        host.ip(f"addr add {v4}/24 dev lan0")
        host.ip(f"addr add {v6}/64 dev lan0 nodad")
    # The client's two addresses, each reaching the LAN its own way.
    for address in (DIRECT6, PROXIED6):
        client.ip(f"addr add {address}/128 dev lo")
    for router, link, net in ((gw, "c-gw", "2001:db8:51"), (proxy, "c-px", "2001:db8:52")):
        veth(client, link, router, "up0")
        client.ip(f"addr add {net}::2/64 dev {link} nodad")
        router.ip(f"addr add {net}::1/64 dev up0 nodad")
        router.ip(f"route add 2001:db8:203::/64 via {net}::2")
        router.sysctl("net.ipv6.conf.all.forwarding", 1)
    client.ip("route add 2001:db8:2::/64 via 2001:db8:51::1")
    client.ip("route add 2001:db8:2::/64 via 2001:db8:52::1 table 100")
    client.ip(f"-6 rule add priority 100 from {PROXIED6} lookup 100")
    make_stateful(gw, "ip6tables")
    relay.ip(f"route add default via {GW6}")
    relay.ip("route add default via 192.0.2.1")
    for host in (client, gw, proxy, relay):
        link_local_ready(host)
    start_server(relay, RELAY6, 25)
    return {"client": client, "gw": gw, "proxy": proxy, "relay": relay}


def link_local_ready(host):
    """Wait until no address of ``host`` is tentative (its link-local ones do DAD)."""
    host.exec(
        [
            "sh", "-c",
            "for i in $(seq 100); do ip -6 addr show tentative | grep -q inet6 || exit 0; "
            "sleep 0.1; done; exit 1",
        ]
    )  # fmt: skip


def relay_args(net, backend):
    proxy = {
        "address": ["192.0.2.2", PROXY6],
        "mac": mac_of(net["proxy"], "lan0"),
        "mark": MARK,
        "table": 1000254,
        "priority": 1000,
    }
    return {
        "backend": backend,
        "lan_networks": ["192.0.2.0/24", "2001:db8:2::/64"],
        "mark_mask": 0xFF,
        "proxies": {"master-relay": proxy},
    }


COUNTER = r'counter packets (\d+) bytes \d+ comment "([^"]+)"'


def observed(relay):
    text = relay.exec("nft list table inet observer").stdout
    return {comment: int(packets) for packets, comment in re.findall(COUNTER, text)}


def flows(relay, protocol):
    return relay.exec(f"conntrack -L -f ipv6 -p {protocol}", check=False).stdout.splitlines()


def link_local(ns, dev="lan0"):
    text = ns.exec(f"ip -6 -o addr show dev {dev} scope link").stdout
    return text.split("inet6 ")[1].split("/")[0]


def ours(relay):
    """relayroute's part of the packet filter: ip6tables' and iptables' lines, nft's table."""
    v6 = relay.exec("ip6tables-save -t mangle").stdout
    v4 = relay.exec("iptables-save -t mangle").stdout
    table = relay.exec("nft list table inet relayroute_relay", check=False)
    return {
        "ip6tables": [line for line in v6.splitlines() if "RELAYROUTE" in line],
        "iptables": [line for line in v4.splitlines() if "RELAYROUTE" in line],
        "nft": table.stdout if table.returncode == 0 else None,
    }


@pytest.mark.parametrize("flavour", FLAVOURS, indirect=True)
def test_ipv6_traffic_is_marked_by_the_proxys_mac_alone(loaders, flavour, net6):
    backend = flavour
    client, relay, proxy = net6["client"], net6["relay"], net6["proxy"]
    relay.exec(["ip6tables-restore", "--noflush"], input=FOREIGN_MANGLE6)
    relay.exec(["nft", "-f", "-"], input=OBSERVER)
    foreign = relay.exec("ip6tables-save -t mangle").stdout
    foreign_lines = [line for line in foreign.splitlines() if "OTHER-V6" in line]
    # Control: without relayroute the stateful gateway drops the proxied client's replies.
    assert connect(client, RELAY6, 25, PROXIED6, timeout=4) is None

    with relay.entered():
        ret = loaders.states.relayroute.relay_present(name="r", **relay_args(net6, backend))
    assert ret.result is True, ret.comment
    held = ours(relay)
    if backend == "iptables":
        assert "-A PREROUTING -j RELAYROUTE-RELAY-PRE" in held["ip6tables"]
        assert "-A RELAYROUTE-RELAY-PRE -s fe80::/10 -j RETURN" in held["ip6tables"]
        assert "-A PREROUTING -j RELAYROUTE-RELAY-PRE" in held["iptables"]
        assert "ip6tables: -A PREROUTING -j RELAYROUTE-RELAY-PRE" in ret.changes["iptables"]["new"]
        assert held["nft"] is None
        # In the flavour the tools on PATH speak, and nothing in the other one.
        kind = "legacy" if "legacy" in relay.exec("ip6tables -V").stdout else "nft"
        other = {"legacy": "nft", "nft": "legacy"}[kind]
        for tool in ("iptables", "ip6tables"):
            assert "RELAYROUTE" not in relay.exec(f"{tool}-{other}-save -t mangle").stdout
    else:
        assert "ip6 saddr 2001:db8:2::/64 return" in held["nft"]
        assert "icmpv6 type nd-neighbor-solicit return" in held["nft"]
        assert held["ip6tables"] == held["iptables"] == []

    # Real IPv6 TCP: direct through the gateway, proxied through the proxy.
    assert connect(client, RELAY6, 25, DIRECT6) == f"220 hello {DIRECT6}"
    assert connect(client, RELAY6, 25, PROXIED6) == f"220 hello {PROXIED6}"
    tcp = flows(relay, "tcp")
    assert any(f"src={PROXIED6}" in line and f"mark={MARK}" in line for line in tcp), tcp
    assert any(f"src={DIRECT6}" in line and "mark=0" in line for line in tcp), tcp

    # Link-local: an echo from the proxy (its MAC) to the relay's fe80:: address.
    before = observed(relay)
    target = link_local(relay)
    answer = proxy.exec(["python3", "-c", ECHO, target, "lan0"], timeout=30).stdout
    assert answer.startswith(f"reply from {target}"), answer
    echo = [line for line in flows(relay, "icmpv6") if "src=fe80::" in line]
    assert echo, flows(relay, "icmpv6")
    assert all("mark=0" in line for line in echo), echo
    # Neighbour discovery from the proxy's MAC with a source no network returns:
    # the DAD solicitation (from ::) of a new address.
    proxy.ip("addr add 2001:db8:2::99/64 dev lan0")
    link_local_ready(proxy)
    after = observed(relay)
    assert after["nd seen"] > before["nd seen"], after
    assert after["link-local seen"] > before["link-local seen"], after
    assert after["nd marked"] == 0, after
    assert after["link-local marked"] == 0, after

    # A second apply changes nothing, on either family.
    with relay.entered():
        again = loaders.states.relayroute.relay_present(name="r", **relay_args(net6, backend))
    assert again.result is True, again.comment
    assert again.changes == {}

    # Removal: nothing of relayroute's in either tool or in nft; others' state stays.
    with relay.entered():
        gone = loaders.states.relayroute.relay_absent(name="r", backend=backend)
    assert gone.result is True, gone.comment
    assert ours(relay) == {"ip6tables": [], "iptables": [], "nft": None}
    after_removal = relay.exec("ip6tables-save -t mangle").stdout
    assert [line for line in after_removal.splitlines() if "OTHER-V6" in line] == foreign_lines
    assert "table inet observer" in relay.exec("nft list tables").stdout
    assert relay.exec("ip -6 rule show").stdout.count("lookup 1000254") == 0


# A transparent IPv6 listener (IPV6_TRANSPARENT, as HAProxy's ``bind ... transparent``
# on an IPv6 VIP) on an address the host does not have, or on the wildcard.
VIP6, CLIENT6 = "2001:db8:100::25", "2001:db8:203::10"
# Counts the proxy's TCP packets to the VIP carrying the divert mark, after relayroute's chains.
DIVERT_OBSERVER = """\
table inet observer {
    chain pre {
        type filter hook prerouting priority mangle + 10; policy accept;
        ip6 daddr 2001:db8:100::25 tcp dport 25 meta mark & 0xff == 0x1 \
            counter comment "divert marked"
        ip6 daddr 2001:db8:100::25 tcp dport 2525 meta mark & 0xff == 0x1 \
            counter comment "wildcard marked"
    }
}
"""


@pytest.fixture
def proxy_net6(make_netns):
    """A client routed through the proxy; the IPv6 VIP is on no host; the proxy does not forward."""
    client, proxy = make_netns("client"), make_netns("proxy")
    veth(client, "eth0", proxy, "eth0")
    client.ip(f"addr add {CLIENT6}/64 dev eth0 nodad")
    client.ip("route add default via 2001:db8:203::1")
    proxy.ip("addr add 2001:db8:203::1/64 dev eth0 nodad")
    proxy.sysctl("net.ipv6.conf.all.forwarding", 0)
    for host in (client, proxy):
        link_local_ready(host)
    transparent_server(proxy, VIP6, 25)  # HAProxy's transparent frontend on the IPv6 VIP
    transparent_server(proxy, "::", 2525)  # a transparent socket on the wildcard
    proxy.exec(["nft", "-f", "-"], input=DIVERT_OBSERVER)
    return {"client": client, "proxy": proxy}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ipv6_vip_is_diverted_to_its_transparent_listener(loaders, proxy_net6, backend):
    client, proxy = proxy_net6["client"], proxy_net6["proxy"]
    assert connect(client, VIP6, 25, CLIENT6, timeout=4) is None
    with proxy.entered():
        ret = loaders.states.relayroute.proxy_present(name="p", backend=backend, families=[4, 6])
        assert ret.result is True, ret.comment
        again = loaders.states.relayroute.proxy_present(name="p", backend=backend, families=[4, 6])
        assert again.changes == {}
    if backend == "iptables":
        v6 = proxy.exec("ip6tables-save -t mangle").stdout
        divert = "-p tcp -m socket --transparent -j RELAYROUTE-PROXY-DIVERT"
        assert f"-A RELAYROUTE-PROXY-PRE {divert}" in v6
    # The VIP's connection reaches the transparent listener, which sees the client's address.
    assert connect(client, VIP6, 25, CLIENT6) == f"220 diverted {CLIENT6}"
    counted = observed(proxy)
    assert counted["divert marked"] > 0, counted
    # A transparent listener on the wildcard address is not taken (xt_socket's rule).
    assert connect(client, VIP6, 2525, CLIENT6, timeout=4) is None
    assert observed(proxy)["wildcard marked"] == 0
    with proxy.entered():
        gone = loaders.states.relayroute.proxy_absent(name="p", backend=backend)
        assert gone.result is True, gone.comment
    assert "RELAYROUTE" not in proxy.exec("ip6tables-save -t mangle").stdout
    assert "relayroute_proxy" not in proxy.exec("nft list tables").stdout
    assert "table inet observer" in proxy.exec("nft list tables").stdout
    assert connect(client, VIP6, 25, CLIENT6, timeout=4) is None


FAILING_RESTORE = """#!/bin/sh
cat >/dev/null
echo "ip6tables-restore: line 4 failed (injected)" >&2
exit 1
"""


def mangle6(ns):
    """
    ``ip6tables-save -t mangle`` without its comments (they carry the time) and
    chain counters (traffic, not state: legacy counts ND and MLD packets there).
    """
    lines = ns.exec("ip6tables-save -t mangle").stdout.splitlines()
    return [re.sub(r" \[\d+:\d+\]$", "", line) for line in lines if not line.startswith("#")]


def test_a_failing_ip6tables_restore_puts_iptables_back(loaders, net6, tmp_path, monkeypatch):
    """
    IPv4 is written first, then IPv6: when ip6tables-restore fails, the IPv4
    chains written a moment before are put back, the routes and rules undone,
    and the error names the tool that failed.
    """
    relay = net6["relay"]
    args = relay_args(net6, "iptables")
    with relay.entered():
        # The IPv4-only plan in place.
        first = {
            **args,
            "lan_networks": ["192.0.2.0/24"],
            "proxies": {
                "master-relay": {**args["proxies"]["master-relay"], "address": "192.0.2.2"}
            },
        }
        assert loaders.states.relayroute.relay_present(name="r", **first).result is True
        before = {**relay.snapshot(), "ip6tables": mangle6(relay)}
        failing = tmp_path / "failing-bin"
        failing.mkdir()
        (failing / "ip6tables-restore").write_text(FAILING_RESTORE)
        (failing / "ip6tables-restore").chmod(0o755)
        monkeypatch.setenv("PATH", f"{failing}:{os.environ['PATH']}")
        # Dual stack, and another IPv4 network of the relays': both tools have work.
        networks = [*args["lan_networks"], "198.51.100.0/24"]
        ret = loaders.states.relayroute.relay_present(
            name="r", **{**args, "lan_networks": networks}
        )
        monkeypatch.undo()
    assert ret.result is False
    assert "ip6tables-restore --noflush --wait 30 failed (1)" in ret.comment, ret.comment
    assert "injected" in ret.comment
    assert "iptables' part, already written, was put back as it was" in ret.comment
    assert "previous state was restored" in ret.comment
    after = {**relay.snapshot(), "ip6tables": mangle6(relay)}
    assert after == before


def state6(ns):
    """Both families' rules and routes, both tools' rulesets and the nft ruleset, as text."""
    return {
        **ns.snapshot(),
        "rules6": ns.exec("ip -6 rule show").stdout,
        "routes6": ns.exec("ip -6 route show table all").stdout,
        "ip6tables": mangle6(ns),
        "nft": ns.exec("nft list table inet relayroute_relay", check=False).stdout,
    }


@pytest.mark.parametrize("flavour", FLAVOURS, indirect=True)
def test_the_boot_restore_puts_both_families_back(loaders, flavour, net6, tmp_path):
    relay = net6["relay"]
    persist = tmp_path / "relayroute"
    with relay.entered():
        ret = loaders.modules.relayroute.relay_apply(
            persist_dir=str(persist), **relay_args(net6, flavour)
        )
    assert "routes" in ret["changes"], ret
    applied = state6(relay)
    assert "lookup 1000254" in applied["rules6"]
    assert f"default via {PROXY6}" in applied["routes6"]
    script = (persist / "relay.restore").read_text()
    if flavour == "iptables":
        assert "ip6tables-restore --noflush $w <<'RULES'" in script
        assert "-A RELAYROUTE-RELAY-PRE -s fe80::/10 -j RETURN" in applied["ip6tables"]
    else:
        assert "ip6 saddr fe80::/10 return" in applied["nft"]
    # What a reboot loses, in both families: filter state, rules, tables' routes.
    relay.exec("nft delete table inet relayroute_relay", check=False)
    for tool in ("iptables", "ip6tables"):
        relay.exec(f"{tool} -t mangle -F")
        relay.exec(f"{tool} -t mangle -X")
    for flag in ("-4", "-6"):
        relay.exec(f"ip {flag} rule del priority 1000", check=False)
        relay.exec(f"ip {flag} route flush table 1000254", check=False)
    assert state6(relay) != applied
    relay.exec(["/bin/sh", str(persist / "relay.restore")])
    assert state6(relay) == applied
    # Idempotent: run again on a host that has it all, nothing changes.
    relay.exec(["/bin/sh", str(persist / "relay.restore")])
    assert state6(relay) == applied
    with relay.entered():
        loaders.modules.relayroute.relay_remove(persist_dir=str(persist), backend=flavour)
