"""
The rtnetlink reader (``rtnl.Reader``: pyroute2's message classes on a plain
netlink socket) against pyroute2's ``IPRoute`` on the same kernel: a
namespace holding relayroute-like and other tools' rules and routes of both
families, tables above 255, addresses, neighbours of both families, and
route lookups by mark and source. The engine's reads then run without
importing ``IPRoute`` at all (what a no-op re-apply saves: see rtnl.py).
Each side runs in its own process inside the namespace.
"""

import json
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.netns import veth

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root

READ = textwrap.dedent(
    """
    import json, socket, sys
    sys.path.insert(0, sys.argv[1])
    from relayroute_core import netlink, planner, rtnl
    from pyroute2.netlink.rtnl.ndmsg import ndmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    NUD_PERMANENT, RTM_F_CLONED = 0x80, 0x200

    def pick(msgs, fields, attrs):
        # What the test planted: not the entries the kernel makes and ages by itself
        # meanwhile (multicast neighbours, IPv6's cached clones of a route get).
        return sorted(
            json.dumps([[msg[f] for f in fields], [msg.get(a) for a in attrs]])
            for msg in msgs
            if not (isinstance(msg, ndmsg) and not msg["state"] & NUD_PERMANENT)
            and not (isinstance(msg, rtmsg) and msg["flags"] & RTM_F_CLONED)
        )

    RULE = (["family", "table", "action", "src_len"],
            ["FRA_PRIORITY", "FRA_TABLE", "FRA_FWMARK", "FRA_FWMASK", "FRA_PROTOCOL", "FRA_SRC"])
    ROUTE = (["family", "table", "proto", "type", "dst_len", "flags"],
             ["RTA_TABLE", "RTA_DST", "RTA_GATEWAY", "RTA_OIF"])
    ADDR = (["family", "prefixlen", "index"], ["IFA_LOCAL", "IFA_ADDRESS"])
    NEIGH = (["family", "state", "ifindex"], ["NDA_DST", "NDA_LLADDR"])
    GETS = [
        (socket.AF_INET, "198.51.100.7", 0, None),
        (socket.AF_INET, "198.51.100.7", 0xFE, None),
        (socket.AF_INET, "198.51.100.7", 0xFE, "192.0.2.11"),
        (socket.AF_INET6, "2001:db8:7::7", 0xFE, None),
        (socket.AF_INET6, "2001:db8:7::7", 0xFE, "2001:db8:2::11"),
        (socket.AF_INET6, "2001:db8:7::7", 0, None),
        (socket.AF_INET, "203.0.113.9", 0xFA, None),  # table 1000250's route: unreachable
    ]

    def answer(get):
        try:
            msg = get()
        except netlink.NetlinkError as err:
            return ["error", err.code]
        return [msg.get("RTA_TABLE") or msg["table"], msg.get("RTA_GATEWAY"), msg.get("RTA_OIF")]

    seen = {}
    if sys.argv[2] == "reader":
        with rtnl.Reader() as r:
            seen["links"] = sorted(r.links().items())
            seen["rules"] = pick(r.rules(socket.AF_UNSPEC), *RULE)
            seen["routes"] = pick(r.routes(socket.AF_UNSPEC), *ROUTE)
            seen["addresses"] = pick(r.addresses(socket.AF_UNSPEC), *ADDR)
            seen["neighbours"] = pick(
                r.neighbours(socket.AF_INET) + r.neighbours(socket.AF_INET6), *NEIGH
            )
            seen["gets"] = [
                answer(lambda: r.route_get(af, dst, mark=mark, src=src))
                for af, dst, mark, src in GETS
            ]
        # The engine's reads, and what they imported.
        state = netlink.read()
        lookups = [
            planner.Lookup("x", "198.51.100.7", 0xFE, 1000254, "192.0.2.2", True, family=4),
            planner.Lookup("x", "2001:db8:7::7", 0xFE, 1000254, "2001:db8:2::2", True, family=6),
        ]
        seen["lookups"] = [list(a[1:]) for a in netlink.route_lookups(lookups)]
        seen["macs"] = netlink.neighbour_macs(["192.0.2.2", "2001:db8:2::2"])
        seen["rule_lines"] = sorted(rule.line() for rule in state.rules)
        seen["route_lines"] = sorted(route.line() for route in state.routes)
        seen["iproute_imported"] = sorted(
            m for m in sys.modules if m.startswith("pyroute2.iproute")
        )
    else:
        from pyroute2.iproute.linux import IPRoute
        with IPRoute() as ipr:
            seen["links"] = sorted((l["index"], l.get("IFLA_IFNAME")) for l in ipr.get_links())
            seen["rules"] = pick(ipr.get_rules(family=socket.AF_UNSPEC), *RULE)
            seen["routes"] = pick(ipr.route("dump", family=socket.AF_UNSPEC), *ROUTE)
            seen["addresses"] = pick(ipr.get_addr(family=socket.AF_UNSPEC), *ADDR)
            seen["neighbours"] = pick(
                list(ipr.get_neighbours(family=socket.AF_INET))
                + list(ipr.get_neighbours(family=socket.AF_INET6)),
                *NEIGH,
            )

            def get(af, dst, mark, src):
                args = {"dst": dst, "family": af, "flags": 0x1000}
                if mark:
                    args["mark"] = mark
                if src:
                    args["src"] = src
                return ipr.route("get", **args)[0]

            seen["gets"] = [answer(lambda: get(*each)) for each in GETS]
    print(json.dumps(seen))
    """
)


def _seen(ns, side):
    proc = ns.exec([sys.executable, "-c", READ, str(ROOT / "_modules"), side])
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def host(make_netns):
    relay, lan = make_netns("relay"), make_netns("lan")
    veth(relay, "eth0", lan, "eth0")
    addresses = ((relay, "192.0.2.11", "2001:db8:2::11"), (lan, "192.0.2.2", "2001:db8:2::2"))
    for ns, v4, v6 in addresses:
        ns.ip(f"addr add {v4}/24 dev eth0")
        ns.ip(f"-6 addr add {v6}/64 dev eth0 nodad")
    relay.ip("route add default via 192.0.2.1")
    relay.ip("-6 route add default via 2001:db8:2::1")
    for switch, gateway in (("", "192.0.2.2"), ("-6 ", "2001:db8:2::2")):
        # relayroute's table and rule, and another tool's, in each family.
        relay.ip(f"{switch}route add default via {gateway} table 1000254 proto 210")
        relay.ip(f"{switch}rule add priority 1000 fwmark 0xfe/0xff lookup 1000254 proto 210")
        relay.ip(f"{switch}rule add priority 1001 fwmark 0xfa/0xff lookup 1000250 proto 210")
        relay.ip(f"{switch}route add blackhole default table 77 proto static")
        other = "fd09::/32" if switch else "10.9.0.0/16"
        relay.ip(f"{switch}rule add priority 500 from all to {other} lookup 77")
    relay.ip("route add unreachable default table 1000250 proto 210")
    lan_mac = lan.exec("cat /sys/class/net/eth0/address").stdout.strip()
    relay.ip(f"neigh replace 192.0.2.2 lladdr {lan_mac} dev eth0 nud permanent")
    relay.ip(f"-6 neigh replace 2001:db8:2::2 lladdr {lan_mac} dev eth0 nud permanent")
    return relay, lan_mac


def test_the_reader_sees_what_iproute_sees_and_the_engine_reads_without_iproute(host):
    relay, lan_mac = host
    reader, iproute = _seen(relay, "reader"), _seen(relay, "iproute")
    for key in ("links", "rules", "routes", "addresses", "neighbours", "gets"):
        assert reader[key] == iproute[key], key
    assert len(reader["neighbours"]) == 2  # the proxy's, one per family
    assert len([route for route in reader["routes"] if "1000254" in route]) == 2
    # The lookups: table 1000254 via the proxy, by mark, from the relay's own address too.
    assert reader["gets"][1][:2] == [1000254, "192.0.2.2"]
    assert reader["gets"][2][:2] == [1000254, "192.0.2.2"]
    assert reader["gets"][4][:2] == [1000254, "2001:db8:2::2"]
    assert reader["gets"][0][:2] == [254, "192.0.2.1"]
    assert reader["gets"][6][0] == "error"
    assert reader["lookups"] == [
        [None, 1000254, "192.0.2.2", None],
        ["192.0.2.11", 1000254, "192.0.2.2", None],
        [None, 1000254, "2001:db8:2::2", None],
        ["2001:db8:2::11", 1000254, "2001:db8:2::2", None],
    ]
    assert reader["macs"] == {"192.0.2.2": lan_mac, "2001:db8:2::2": lan_mac}
    assert "1000: from all fwmark 0xfe/0xff lookup 1000254 proto 210" in reader["rule_lines"]
    assert "ipv6 1000: from all fwmark 0xfe/0xff lookup 1000254 proto 210" in reader["rule_lines"]
    assert any("table 1000254" in line for line in reader["route_lines"])
    assert reader["iproute_imported"] == []
