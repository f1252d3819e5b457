"""
IPv6 end to end on the real kernel: a dual-stack relay whose proxy has an
address in each family and no MAC in its inputs (relayroute discovers it
through the IPv4 and the IPv6 neighbour tables), routes and rules in both
families, the kernel's own lookups, a no-op re-apply, a removal that leaves
other tools' IPv6 rules and routes alone, and IPv6 TCP traffic answered by
the way it came (the reply-path hosts of test_reply_path with an IPv6 layer):

    client 2001:db8:203::10 (direct)  --+                +-- gw (stateful)  --+
    client 2001:db8:203::20 (proxied) --+-- inet router -+                    +-- LAN -- relay
                                                         +-- proxy (router) --+

Addresses never wait for duplicate address detection (``nodad``, and
``accept_dad = 0`` before any link exists): a tentative address cannot be
bound or used as a source.
"""

import pytest

from tests.functional.test_watch_repairs import start_watcher, wait_for
from tests.support import rh7boot
from tests.support.hosts import (
    DIRECT,
    PROXIED,
    RELAY,
    dropped,
    internet,
    lose_runtime_state,
    make_stateful,
    relay_lan,
)
from tests.support.netns import mac_of, veth
from tests.support.tcp import connect, start_server

pytestmark = [pytest.mark.root, pytest.mark.slow]

LAN6 = "2001:db8:2::/64"
GATEWAY6, PROXY6, RELAY6 = "2001:db8:2::1", "2001:db8:2::2", "2001:db8:2::11"
DIRECT6, PROXIED6 = "2001:db8:203::10", "2001:db8:203::20"
MARK, TABLE, PRIORITY = 254, 1000254, 1000
RULE = f"{PRIORITY}:\tfrom all fwmark 0xfe/0xff lookup {TABLE} proto 210"
# Another tool's IPv6 policy routing (a VPN's), which relayroute must leave alone.
FOREIGN_RULE6 = "900:\tfrom all fwmark 0x10000/0xff0000 lookup 51820"


def _iptables_renders_ipv6():
    """Whether the iptables backend renders ip6tables (issue 11's backend work)."""
    from relayroute_core import iptables

    return 6 in getattr(iptables, "TOOLS", {})


BACKENDS = [
    "nftables",
    pytest.param(
        "iptables",
        marks=pytest.mark.skipif(
            not _iptables_renders_ipv6(),
            reason="the iptables backend does not render ip6tables yet (issue 11's backend part)",
        ),
    ),
]


def no_dad(*hosts):
    """New links of ``hosts`` get no duplicate address detection (set before they exist)."""
    for host in hosts:
        for key in ("all", "default"):
            host.sysctl(f"net.ipv6.conf.{key}.accept_dad", 0)


def add6(host, address, dev):
    host.ip(f"-6 addr add {address} dev {dev} nodad")


def dual_args(backend, proxy_address=("192.0.2.2", PROXY6), **changes):
    proxy = {
        "address": list(proxy_address),
        "mark": MARK,
        "table": TABLE,
        "priority": PRIORITY,
        **changes,
    }
    return {
        "lan_networks": ["192.0.2.0/24", LAN6],
        "mark_mask": 0xFF,
        "proxies": {"master-relay": proxy},
        "backend": backend,
    }


@pytest.fixture
def dual(make_netns):
    """
    A dual-stack relay on a bridged LAN: the proxy holds 192.0.2.2 and
    2001:db8:2::2, the default gateway 192.0.2.1 and 2001:db8:2::1 (each in a
    namespace of its own, the gateway with its own NIC).
    """
    lan, relay, proxy, gw = (make_netns(name) for name in ("lan", "relay", "proxy", "gw"))
    no_dad(lan, relay, proxy, gw)
    lan.ip("link add br0 type bridge")
    lan.ip("link set br0 up")
    for host, port in ((relay, "l-relay"), (proxy, "l-px"), (gw, "l-gw")):
        veth(host, "eth0", lan, port)
        lan.ip(f"link set {port} master br0")
    relay.ip(f"addr add {RELAY}/24 dev eth0")
    add6(relay, f"{RELAY6}/64", "eth0")
    proxy.ip("addr add 192.0.2.2/24 dev eth0")
    add6(proxy, f"{PROXY6}/64", "eth0")
    gw.ip("addr add 192.0.2.1/24 dev eth0")
    add6(gw, f"{GATEWAY6}/64", "eth0")
    relay.ip("route add default via 192.0.2.1")
    relay.ip(f"-6 route add default via {GATEWAY6}")
    return {"relay": relay, "proxy": proxy, "gw": gw, "lan": lan}


def relayroute(loaders, ns, function, **kwargs):
    with ns.entered():
        return getattr(loaders.modules.relayroute, function)(**kwargs)


def neighbour(ns, address):
    """The MAC of ``address``'s entry in ``ns``'s neighbour table of its family (None: none)."""
    words = ns.exec(f"ip neigh show to {address}").stdout.split()
    return words[words.index("lladdr") + 1] if "lladdr" in words else None


def ours(ns, flag):
    """relayroute's rules and routes of one family (``-4``/``-6``), as ip prints them."""
    rules = [
        line for line in ns.exec(f"ip {flag} rule show").stdout.splitlines() if "proto 21" in line
    ]
    routes = ns.exec(f"ip {flag} route show table all proto 210").stdout.splitlines()
    return rules + routes


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_stack_relay_state_lookups_noop_and_removal(loaders, dual, backend):
    relay = dual["relay"]
    relay.ip("-6 route add default via 2001:db8:2::1 table 51820")
    relay.ip("-6 rule add priority 900 fwmark 0x10000/0xff0000 lookup 51820")
    # Another tool's IPv4 rule at relayroute's priority would conflict in IPv4
    # only: an IPv6-only proxy takes that priority in IPv6 beside it.
    ret = relayroute(loaders, relay, "relay_apply", **dual_args(backend))
    assert set(ret["changes"]) >= {"routes", "rules", backend}, ret
    mac = mac_of(dual["proxy"], "eth0")

    # Discovered through both neighbour tables (the proxy answered ARP and NS).
    assert neighbour(relay, "192.0.2.2") == mac
    assert neighbour(relay, PROXY6) == mac
    marked = relayroute(loaders, relay, "marked_macs", backend=backend)
    assert marked == {MARK: [mac]}

    assert RULE in relay.exec("ip -6 rule show").stdout
    assert RULE in relay.exec("ip -4 rule show").stdout
    table6 = relay.exec(f"ip -6 route show table {TABLE}").stdout.strip()
    assert table6.startswith(f"default via {PROXY6} dev eth0 proto 210"), table6
    table4 = relay.exec(f"ip -4 route show table {TABLE}").stdout.strip()
    assert table4 == "default via 192.0.2.2 dev eth0 proto 210"

    # The kernel's own lookups, both families: marked via the proxy from its
    # table (also from the relay's own address), unmarked via the main table.
    marked6 = relay.exec("ip -6 route get 2001:db8:ffff:ffff::fe mark 0xfe").stdout
    assert f"via {PROXY6}" in marked6, marked6
    assert f"table {TABLE}" in marked6, marked6
    from_own = relay.exec(f"ip -6 route get 2001:db8:ffff:ffff::fe from {RELAY6} mark 0xfe").stdout
    assert f"via {PROXY6}" in from_own, from_own
    unmarked6 = relay.exec("ip -6 route get 2001:db8:ffff:ffff::fe").stdout
    assert f"via {GATEWAY6}" in unmarked6, unmarked6
    args = dual_args(backend)
    check_args = {key: args[key] for key in ("lan_networks", "mark_mask", "proxies", "backend")}
    verdict = relayroute(loaders, relay, "check", retcode=False, **check_args)
    assert verdict["ok"], verdict
    # Per family: the proxy's lookup, from the relay's own address, and unmarked.
    assert verdict["summary"].endswith("1 proxies, 2 table routes, 6 route lookups as planned")

    # A re-apply is a no-op.
    again = relayroute(loaders, relay, "relay_apply", **dual_args(backend))
    assert again == {"changes": {}}

    shown = relayroute(loaders, relay, "show", role="relay", backend=backend)["relay"]
    assert shown["rules"] == [
        f"{PRIORITY}: from all fwmark 0xfe/0xff lookup {TABLE} proto 210",
        f"ipv6 {PRIORITY}: from all fwmark 0xfe/0xff lookup {TABLE} proto 210",
    ]

    before_foreign = relay.exec("ip -6 route show table 51820").stdout
    removed = relayroute(loaders, relay, "relay_remove", backend=backend)
    assert set(removed["changes"]) >= {"routes", "rules"}
    assert ours(relay, "-4") == []
    assert ours(relay, "-6") == []
    assert FOREIGN_RULE6 in relay.exec("ip -6 rule show").stdout
    assert relay.exec("ip -6 route show table 51820").stdout == before_foreign != ""
    assert relayroute(loaders, relay, "marked_macs", backend=backend) == {}


def test_an_ipv6_only_proxy_shares_a_priority_with_another_tools_ipv4_rule(loaders, dual):
    relay = dual["relay"]
    relay.ip("route add default via 192.0.2.1 table 51820")
    relay.ip(f"rule add priority {PRIORITY} fwmark 0x10000/0xff0000 lookup 51820")
    args = dual_args("nftables", proxy_address=(PROXY6,))
    ret = relayroute(loaders, relay, "relay_apply", **args)
    assert "rules" in ret["changes"], ret
    assert RULE in relay.exec("ip -6 rule show").stdout
    assert RULE not in relay.exec("ip -4 rule show").stdout
    # The same priority in IPv4 is the other tool's: refused, nothing changed.
    before = relay.snapshot()
    with pytest.raises(Exception, match=f"priority {PRIORITY} is already used by another tool"):
        relayroute(loaders, relay, "relay_apply", **dual_args("nftables"))
    assert relay.snapshot() == before
    relayroute(loaders, relay, "relay_remove", backend="nftables")
    assert ours(relay, "-6") == []
    assert (
        f"{PRIORITY}:\tfrom all fwmark 0x10000/0xff0000 lookup 51820"
        in relay.exec("ip -4 rule show").stdout
    )


def test_each_familys_neighbour_table_is_asked(loaders, dual, make_netns):
    """
    A proxy whose IPv6 address answers from another NIC than its IPv4 one
    (both are marked): the MAC came from the IPv6 neighbour table, solicited
    since the relay had never talked to that address.
    """
    relay, proxy = dual["relay"], dual["proxy"]
    other = make_netns("proxy6")
    no_dad(other)
    proxy.ip(f"-6 addr del {PROXY6}/64 dev eth0")
    veth(other, "eth0", dual["lan"], "l-px6")
    dual["lan"].ip("link set l-px6 master br0")
    add6(other, f"{PROXY6}/64", "eth0")
    ret = relayroute(loaders, relay, "relay_apply", **dual_args("nftables"))
    assert "rules" in ret["changes"]
    macs = sorted([mac_of(proxy, "eth0"), mac_of(other, "eth0")])
    marked = relayroute(loaders, relay, "marked_macs", backend="nftables")
    assert {mark: sorted(found) for mark, found in marked.items()} == {MARK: macs}
    relayroute(loaders, relay, "relay_remove", backend="nftables")


@pytest.fixture
def net6(make_netns):
    """
    test_reply_path's hosts (``hosts.internet``, ``hosts.relay_lan``), dual
    stack: the same links carry IPv6 too, with IPv6 clients behind the inet
    router (the proxied one routed through the proxy), both routers stateful
    in IPv6 as well, and a server on the relay's IPv6 address.
    """
    client, inet, gw, proxy, lan, relay = (
        make_netns(name) for name in ("client", "inet", "gw", "proxy", "lan", "relay")
    )
    no_dad(client, inet, gw, proxy, lan, relay)
    internet(client, inet, gw, proxy, DIRECT, PROXIED)
    relay_lan(lan, gw, proxy, relay)
    relay.ip("route add default via 192.0.2.1")
    # The internet side: client -- inet -- gw / proxy.
    for address in (DIRECT6, PROXIED6):
        add6(client, f"{address}/64", "eth0")
    client.ip("-6 route add default via 2001:db8:203::1")
    add6(inet, "2001:db8:203::1/64", "c0")
    add6(inet, "2001:db8:51::1/64", "g0")
    add6(gw, "2001:db8:51::2/64", "up0")
    add6(inet, "2001:db8:52::1/64", "p0")
    add6(proxy, "2001:db8:52::2/64", "up0")
    inet.ip(f"-6 route add {LAN6} via 2001:db8:51::2")
    inet.ip("-6 route add default via 2001:db8:52::2 table 100")
    inet.ip(f"-6 rule add priority 100 from {PROXIED6} lookup 100")
    for router, uplink in ((gw, "2001:db8:51::1"), (proxy, "2001:db8:52::1")):
        router.ip(f"-6 route add default via {uplink}")
        make_stateful(router, "ip6tables")
    for host in (inet, gw, proxy):
        host.sysctl("net.ipv6.conf.all.forwarding", 1)
    # The LAN.
    add6(gw, f"{GATEWAY6}/64", "lan0")
    add6(proxy, f"{PROXY6}/64", "lan0")
    add6(relay, f"{RELAY6}/64", "lan0")
    relay.ip(f"-6 route add default via {GATEWAY6}")
    start_server(relay, RELAY, 25)
    start_server(relay, RELAY6, 25)
    return {"client": client, "relay": relay, "proxy": proxy, "gw": gw}


def test_without_relayroute_the_ipv6_proxied_path_fails(net6):
    client, gw = net6["client"], net6["gw"]
    assert connect(client, RELAY6, 25, DIRECT6) == f"220 hello {DIRECT6}"
    assert dropped(gw, "ip6tables") == 0
    # The relay answers the proxied client through the gateway, which never
    # saw the connection begin: it drops the SYN-ACKs.
    assert connect(client, RELAY6, 25, PROXIED6) is None
    assert dropped(gw, "ip6tables") > 0
    # Positive control: the same probe answers once replies go via the proxy.
    net6["relay"].ip(f"-6 route replace default via {PROXY6}")
    assert connect(client, RELAY6, 25, PROXIED6) == f"220 hello {PROXIED6}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_connections_are_answered_by_the_way_they_came(loaders, net6, backend):
    client, relay = net6["client"], net6["relay"]
    args = dual_args(backend)
    args["lan_networks"] = ["192.0.2.0/24", LAN6]
    ret = relayroute(loaders, relay, "relay_apply", **args)
    assert "rules" in ret["changes"], ret
    assert connect(client, RELAY6, 25, DIRECT6) == f"220 hello {DIRECT6}"
    assert connect(client, RELAY6, 25, PROXIED6) == f"220 hello {PROXIED6}"
    # IPv4 beside it, through the same proxy and gateway.
    assert connect(client, RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    assert connect(client, RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    assert dropped(net6["gw"], "ip6tables") == dropped(net6["proxy"], "ip6tables") == 0
    assert dropped(net6["gw"]) == dropped(net6["proxy"]) == 0
    flows = relayroute(loaders, relay, "flows", mark_mask=0xFF, port=25)
    by_source = {line.split("src=")[1].split()[0]: line for line in flows}
    assert by_source[PROXIED6].endswith(f"mark={MARK}"), flows
    assert by_source[DIRECT6].endswith("mark=0"), flows
    assert by_source[PROXIED].endswith(f"mark={MARK}"), flows
    assert by_source[DIRECT].endswith("mark=0"), flows
    # The same view as conntrack's own.
    listing = relay.exec("conntrack -L -f ipv6 -p tcp --dport 25").stdout.splitlines()
    assert any(f"src={PROXIED6}" in line and f"mark={MARK}" in line for line in listing)
    assert any(f"src={DIRECT6}" in line and "mark=0" in line for line in listing)
    relayroute(loaders, relay, "relay_remove", backend=backend)
    assert ours(relay, "-6") == []


def table6(relay):
    return f"default via {PROXY6}" in relay.exec(f"ip -6 route show table {TABLE}").stdout


def test_the_watcher_puts_ipv6_back(loaders, dual, tmp_path):
    """
    The restore script restores each family with its own ``ip`` switch, and
    the watcher runs it when IPv6 loses the relay's state: a deleted IPv6
    rule or route, and a link bounce, after which IPv6 (unlike IPv4) has
    lost the link's global address too: the route cannot come back until
    the address does (a network manager adds it again), and that address
    event is what triggers the repair.
    """
    relay = dual["relay"]
    persist = tmp_path / "relayroute"
    relayroute(loaders, relay, "relay_apply", persist_dir=str(persist), **dual_args("nftables"))
    script = (persist / "relay.restore").read_text()
    assert f"ip -6 route replace default via {PROXY6} table {TABLE} proto 210" in script
    assert f"ip -6 rule add priority {PRIORITY} fwmark 0xfe/0xff lookup {TABLE} proto 210" in script
    log = tmp_path / "watch.log"
    watcher = start_watcher(relay, persist / "relay.restore", log)
    try:
        relay.ip(f"-6 rule del priority {PRIORITY}")
        assert wait_for(lambda: RULE in relay.exec("ip -6 rule show").stdout, 10) is not None
        relay.ip(f"-6 route del default table {TABLE}")
        assert wait_for(lambda: table6(relay), 10) is not None

        relay.ip("link set eth0 down")
        assert not table6(relay)
        relay.ip("link set eth0 up")
        # IPv4's route is back with the link; IPv6's waits for the address.
        assert wait_for(
            lambda: "192.0.2.2" in relay.exec(f"ip -4 route show table {TABLE}").stdout, 10
        )
        relay.ip("route replace default via 192.0.2.1")
        assert not table6(relay)
        assert RELAY6 not in relay.exec("ip -6 addr show dev eth0").stdout
        add6(relay, f"{RELAY6}/64", "eth0")
        assert wait_for(lambda: table6(relay), 10) is not None, log.read_text()
        assert wait_for(lambda: "repaired (address added: eth0" in log.read_text(), 10), (
            log.read_text()
        )
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
    text = log.read_text()
    print(text)
    assert f"rule -6 {PRIORITY}: from all fwmark 0xfe/0xff lookup {TABLE} proto 210" in text
    assert f"put back route -6 default via {PROXY6} dev eth0 table {TABLE}" in text


def test_policy_routes_of_both_families_share_a_priority_and_stand_alone(loaders, dual):
    relay = dual["relay"]
    four = {"table": 1000250, "gateway": "192.0.2.2", "fwmark": 250, "fwmask": 0xFF}
    six = {"table": 1000250, "gateway": PROXY6, "fwmark": 250, "fwmask": 0xFF}
    assert relayroute(loaders, relay, "lookup_mac", address=PROXY6) == mac_of(dual["proxy"], "eth0")
    first = relayroute(loaders, relay, "policy_route_apply", priority=1001, **four)
    assert set(first["changes"]) == {"routes", "rules"}
    second = relayroute(loaders, relay, "policy_route_apply", priority=1001, **six)
    assert second["changes"]["rules"]["new"] == [
        "ipv6 1001: from all fwmark 0xfa/0xff lookup 1000250 proto 212"
    ]
    assert relayroute(loaders, relay, "policy_route_apply", priority=1001, **six) == {"changes": {}}
    assert relayroute(loaders, relay, "policy_route_apply", priority=1001, **four) == {
        "changes": {}
    }
    relayroute(loaders, relay, "policy_route_remove", priority=1001, **six)
    # The IPv4 one stands, untouched.
    assert (
        "1001:\tfrom all fwmark 0xfa/0xff lookup 1000250 proto 212"
        in relay.exec("ip -4 rule show").stdout
    )
    assert relay.exec("ip -4 route show table 1000250").stdout.startswith("default via 192.0.2.2")
    assert "proto 212" not in relay.exec("ip -6 rule show").stdout
    assert relay.exec("ip -6 route show table 1000250").stdout == ""
    relayroute(loaders, relay, "policy_route_remove", priority=1001, **four)
    assert "proto 212" not in relay.exec("ip -4 rule show").stdout


# ip6tables.service's saved file on a CentOS 7 relay ('service ip6tables save').
ADMIN_IP6TABLES = (
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
)


def routing_state(ns):
    """Both families' rules, relayroute's table and mangle rules, as the kernel lists them."""
    state = {}
    for flag, tool in (("-4", "iptables"), ("-6", "ip6tables")):
        state[f"rules {flag}"] = ns.exec(f"ip {flag} rule show").stdout
        state[f"table {flag}"] = ns.exec(f"ip {flag} route show table {TABLE}").stdout
        mangle = ns.exec(f"{tool}-save -t mangle").stdout.splitlines()
        state[tool] = [line for line in mangle if line.startswith("-A")]
    return state


def test_network_scripts_restore_both_families_at_boot(loaders, dual, tmp_path):
    """
    CentOS 7's boot from its own files (tests/support/rh7boot.py): IPv6's
    route and rule from route6-/rule6-eth0, its chains from
    /etc/sysconfig/ip6tables, beside IPv4's.
    """
    relay = dual["relay"]
    sysconfig = tmp_path / "sysconfig"
    scripts = sysconfig / "network-scripts"
    rh7boot.prepare_host(
        sysconfig, tmp_path / "systemd", rh7boot.ADMIN_SAVED_RULESET, ADMIN_IP6TABLES
    )
    settings = rh7boot.persist_settings(tmp_path)
    rh7boot.boot(relay, settings, ["eth0"])  # the host as it came up before relayroute
    args = dual_args("iptables")
    ret = relayroute(loaders, relay, "relay_apply", persist=settings, **args)
    assert str(scripts / "route6-eth0") in ret["changes"]["persist"], ret
    assert f"default via {PROXY6} dev eth0 table {TABLE} proto 210" in (
        (scripts / "route6-eth0").read_text()
    )
    assert f"priority {PRIORITY} fwmark 0xfe/0xff lookup {TABLE} proto 210" in (
        (scripts / "rule6-eth0").read_text()
    )
    assert "default via 192.0.2.2 dev eth0" in (scripts / "route-eth0").read_text()
    saved6 = (sysconfig / "ip6tables").read_text()
    assert saved6.startswith(ADMIN_IP6TABLES)  # the administrator's lines, byte for byte
    assert "-A PREROUTING -j RELAYROUTE-RELAY-PRE" in saved6
    applied = routing_state(relay)
    assert RULE in applied["rules -6"]
    assert "-A PREROUTING -j RELAYROUTE-RELAY-PRE" in applied["ip6tables"]

    # A reboot: the kernel keeps nothing of it, the boot brings it back.
    lose_runtime_state(relay, [TABLE])
    relay.ip(f"-6 rule del priority {PRIORITY}")
    relay.ip(f"-6 route flush table {TABLE}")
    for option in ("-F", "-X"):
        relay.exec(f"ip6tables -t mangle {option}")
    assert RULE not in relay.exec("ip -6 rule show").stdout
    rh7boot.boot(relay, settings, ["eth0"])
    assert routing_state(relay) == applied
    assert relayroute(loaders, relay, "relay_apply", persist=settings, **args) == {"changes": {}}
    relayroute(loaders, relay, "relay_remove", persist=settings, backend="iptables")
    assert not (scripts / "route6-eth0").exists()
    # relayroute's lines are gone (the mangle table it added to a file that had
    # none stays, with the built-in chains' ACCEPT policies: what it holds empty).
    left = (sysconfig / "ip6tables").read_text()
    assert left.startswith(ADMIN_IP6TABLES)
    assert "RELAYROUTE" not in left


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_boot_restore_script_brings_back_both_families(loaders, dual, tmp_path, backend):
    relay = dual["relay"]
    persist = tmp_path / "relayroute"
    relayroute(loaders, relay, "relay_apply", persist_dir=str(persist), **dual_args(backend))
    applied = routing_state(relay)
    ruleset = relay.exec("nft -s list ruleset").stdout
    # A reboot: nothing of it in the kernel.
    lose_runtime_state(relay, [TABLE])
    relay.ip(f"-6 rule del priority {PRIORITY}")
    relay.ip(f"-6 route flush table {TABLE}")
    for option in ("-F", "-X"):
        relay.exec(f"ip6tables -t mangle {option}")
    relay.exec("nft flush ruleset")
    assert ours(relay, "-6") == []
    relay.exec(["/bin/sh", str(persist / "relay.restore")])
    assert routing_state(relay) == applied
    assert relay.exec("nft -s list ruleset").stdout == ruleset
    again = relayroute(
        loaders, relay, "relay_apply", persist_dir=str(persist), **dual_args(backend)
    )
    assert again == {"changes": {}}


def test_check_sees_an_ipv6_neighbour_entry_with_a_mac_relayroute_does_not_mark(loaders, dual):
    relay = dual["relay"]
    # A MAC written in the inputs (a discovered one would follow the entry:
    # the check's plan would then want the moved MAC marked).
    args = dual_args("nftables", mac=mac_of(dual["proxy"], "eth0"))
    relayroute(loaders, relay, "relay_apply", **args)
    assert relayroute(loaders, relay, "check", retcode=False, **args)["ok"]
    moved = "02:00:c0:00:02:99"
    relay.ip(f"-6 neigh replace {PROXY6} lladdr {moved} dev eth0 nud reachable")
    verdict = relayroute(loaders, relay, "check", retcode=False, **args)
    assert verdict["differences"] == [
        f"proxies:master-relay: the neighbour entry of {PROXY6} carries {moved}, a MAC "
        f"relayroute does not mark (marks {mac_of(dual['proxy'], 'eth0')}): the proxy's MAC "
        f"changed (got '{moved}')"
    ]
    relayroute(loaders, relay, "relay_remove", backend="nftables")
