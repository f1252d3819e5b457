"""Pieces of test hosts shared by the functional traffic tests and the lab."""

import shlex

from tests.support.netns import veth

# The traffic tests' hosts: a client reaching the relay directly, one reaching it
# through the proxy, and the relay's address.
DIRECT, PROXIED, RELAY = "203.0.113.10", "203.0.113.20", "192.0.2.11"

# Other tools' packet-filter state: a Docker-like chain, and another connmark
# user that keeps its own bits (0xff0000) of the mark.
FOREIGN_MANGLE = "\n".join(
    [
        "*mangle",
        ":DOCKER-LIKE - [0:0]",
        "-A PREROUTING -j DOCKER-LIKE",
        "-A DOCKER-LIKE -i br-lab -j RETURN",
        "-A PREROUTING -m conntrack --ctstate NEW -j CONNMARK --set-xmark 0x10000/0xff0000",
        "-A OUTPUT -j CONNMARK --restore-mark --nfmask 0xff0000 --ctmask 0xff0000",
        "COMMIT",
        "",
    ]
)


def plant_foreign_state(ns, vpn_fwmark="0x10000/0xff0000", gateway="192.0.2.1"):
    """What other tools left: the mangle state above, and a VPN's fwmark rule and table."""
    ns.exec(["iptables-restore", "--noflush"], input=FOREIGN_MANGLE)
    ns.ip(f"route add default via {gateway} table 51820")
    ns.ip(f"rule add priority 900 fwmark {vpn_fwmark} lookup 51820")


def lose_runtime_state(ns, tables, filter_tables=("mangle",)):
    """What a reboot loses: packet-filter tables, policy rules and tables, conntrack."""
    for table in filter_tables:
        ns.exec(f"iptables -t {table} -F")
        ns.exec(f"iptables -t {table} -X")
    for line in ns.exec("ip -4 rule show").stdout.splitlines():
        priority = line.split(":")[0]
        if priority not in ("0", "32766", "32767"):
            ns.ip(f"rule del priority {priority}")
    for table in tables:
        ns.ip(f"route flush table {table}")
    ns.exec("conntrack -F", check=False)


# The comment on a stateful router's drop rule, by which its counter is read.
STATEFUL_DROP = "stateful: conntrack INVALID"


def make_stateful(router, tool="iptables"):
    """
    Make ``router`` a stateful firewall: it forwards only packets of connections
    it saw begin, and drops (counting them) the conntrack INVALID ones, in the
    family of ``tool`` (``ip6tables``: IPv6's).

    With the kernel's default ``nf_conntrack_tcp_loose = 1`` conntrack picks a
    connection up mid-stream from any packet, as ESTABLISHED: a reply that takes
    the wrong router in the middle of a session would pass, and only a
    misrouted SYN-ACK would be caught. ``0`` makes every packet of a connection
    the router did not see begin INVALID. The setting belongs to the network
    namespace; the conntrack rule is added first, so nf_conntrack is loaded.
    """
    router.exec(
        [
            tool, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID",
            "-m", "comment", "--comment", STATEFUL_DROP, "-j", "DROP",
        ]
    )  # fmt: skip
    router.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)
    loose = router.exec("sysctl -n net.netfilter.nf_conntrack_tcp_loose").stdout.strip()
    if loose != "0":
        raise RuntimeError(f"{router.name}: nf_conntrack_tcp_loose is {loose!r}, not 0")


def count_forwarded(router, name, match, tool="iptables"):
    """
    Count, without deciding anything, the packets ``router`` forwards that
    match ``match`` (``tool``'s match arguments), under the comment ``name``.
    """
    router.exec(
        [tool, "-I", "FORWARD", "1", *shlex.split(match), "-m", "comment", "--comment", name]
    )


def forwarded(router, name, tool="iptables"):
    """Packets counted so far by ``router``'s FORWARD rule commented ``name``."""
    listing = router.exec(f"{tool} -t filter -L FORWARD -n -v -x").stdout
    for line in listing.splitlines():
        if f"/* {name} */" in line:
            return int(line.split()[0])
    raise LookupError(f"{router.name}: no FORWARD rule commented {name!r}:\n{listing}")


def dropped(router, tool="iptables"):
    """Packets a stateful router (see ``make_stateful``) dropped as conntrack INVALID."""
    return forwarded(router, STATEFUL_DROP, tool)


def uplinks(client, inet, gw, proxy, client_addresses):
    """
    The internet side every traffic test shares: ``client`` (holding
    ``client_addresses``) behind the ``inet`` router, which links to the
    gateway (198.51.100.0/30) and to the proxy (198.51.100.4/30).
    """
    veth(client, "eth0", inet, "c0")
    for address in client_addresses:
        client.ip(f"addr add {address}/24 dev eth0")
    client.ip("route add default via 203.0.113.1")
    inet.ip("addr add 203.0.113.1/24 dev c0")
    veth(inet, "g0", gw, "up0")
    inet.ip("addr add 198.51.100.1/30 dev g0")
    gw.ip("addr add 198.51.100.2/30 dev up0")
    veth(inet, "p0", proxy, "up0")
    inet.ip("addr add 198.51.100.5/30 dev p0")
    proxy.ip("addr add 198.51.100.6/30 dev up0")
    inet.ip("route add 192.0.2.0/24 via 198.51.100.2")
    inet.sysctl("net.ipv4.ip_forward", 1)


def internet(client, inet, gw, proxy, direct, proxied):
    """
    The client side of a traffic test with a forwarding proxy: the ``inet``
    router reaches 192.0.2.0/24 through ``gw``, except traffic from
    ``proxied``, which it sends through ``proxy``.
    """
    uplinks(client, inet, gw, proxy, [direct, proxied])
    inet.ip("route add default via 198.51.100.6 table 100")
    inet.ip(f"rule add priority 100 from {proxied} lookup 100")
    for router, uplink in ((gw, "198.51.100.1"), (proxy, "198.51.100.5")):
        router.sysctl("net.ipv4.ip_forward", 1)
        router.ip(f"route add default via {uplink}")
        make_stateful(router)
    for host in (gw, proxy, inet):
        host.sysctl("net.ipv4.conf.all.rp_filter", 0)


def relay_lan(lan, gw, proxy, relay, gateway="192.0.2.1", proxy_address="192.0.2.2"):
    """The seed's LAN: a bridge in ``lan`` joining gateway, proxy and relay (on lan0)."""
    lan.ip("link add br0 type bridge")
    lan.ip("link set br0 up")
    for host, port in ((gw, "l-gw"), (proxy, "l-px"), (relay, "l-relay")):
        veth(host, "lan0", lan, port)
        lan.ip(f"link set {port} master br0")
    gw.ip(f"addr add {gateway}/24 dev lan0")
    proxy.ip(f"addr add {proxy_address}/24 dev lan0")
    relay.ip(f"addr add {RELAY}/24 dev lan0")


def two_legged_args(proxy_mac):
    """relay_apply's arguments for the relay of the two-legged fixture (proxy on px0)."""
    return {
        "lan_networks": ["192.0.2.0/25", "192.0.2.128/25"],
        "mark_mask": 0xFF,
        "proxies": {
            "master-relay": {
                "address": "192.0.2.130",
                "mac": proxy_mac,
                "mark": 254,
                "table": 1000254,
                "priority": 1000,
            }
        },
    }
