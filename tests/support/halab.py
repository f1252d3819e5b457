"""
The seed's network with an HA pair of HAProxy boxes instead of one master-relay.

    client (203.0.113.10 mail client via the VIP, 203.0.113.20 external MTA)
      |
    inet router 203.0.113.1 ---------- gw (stateful firewall)
      | up bridge 198.51.100.32/28       |
      | inet .33, VIP 198.51.100.25      |
      | on-link (ARP: whoever holds it)  |
      +-- haproxy-a .34 --+              |
      +-- haproxy-b .35 --+--- LAN bridge 192.0.2.0/24 --- relay1..3
                             gw .1, floating 192.0.2.2 (keepalived),
                             haproxy-a .5, haproxy-b .6, relays .11-.13

Both nodes are Salt minions with the proxy role (pillar ``nodes:``) and run
HAProxy from the configuration the formula writes; each has its own LAN
address and MAC. The floating LAN address (the proxy's ``address``, master-relay's
in the seed lab) and the VIP belong to whichever node is VRRP master
(keepalived, ``tests/support/keepalived.py``), on lan0 and up0 respectively.
The inet router reaches the VIP on-link: it finds the holder by ARP, and a
gratuitous ARP moves it, as on a real uplink segment.
"""

import time

from tests.support import seedlab
from tests.support.hosts import make_stateful
from tests.support.keepalived import vrrp_config
from tests.support.netns import mac_of, veth
from tests.support.seedlab import (
    EXTERNAL_MTA,
    GATEWAY,
    MAIL_CLIENT,
    PROXY_LAN,
    VIP,
    SeedLab,
)

FLOATING = PROXY_LAN  # master-relay's address in the seed lab
PROXY = "master-relay"  # the one logical proxy of the pillar
NODES = {"haproxy-a": "192.0.2.5", "haproxy-b": "192.0.2.6"}
UPLINK = {"inet": "198.51.100.33", "haproxy-a": "198.51.100.34", "haproxy-b": "198.51.100.35"}
UPLINK_PREFIX = 28
VRID = 25
PRIORITY = {"haproxy-a": 150, "haproxy-b": 100}


class HALab(SeedLab):
    """The seed lab's network with nodes ``haproxy-a`` and ``haproxy-b`` for master-relay."""

    name = "ha"

    def __init__(self, relays=seedlab.RELAYS, backend=None):
        self.nodes = dict(NODES)
        super().__init__(relays, backend)

    def _build(self):
        client, inet, gw = self.host("client"), self.host("inet"), self.host("gw")
        nodes = {name: self.host(name) for name in self.nodes}
        relays = {name: self.host(name) for name in self.relay_addresses}

        # The internet side: as hosts.uplinks, with a segment for the pair.
        veth(client, "eth0", inet, "c0")
        for address in (MAIL_CLIENT, EXTERNAL_MTA):
            client.ip(f"addr add {address}/24 dev eth0")
        client.ip("route add default via 203.0.113.1")
        inet.ip("addr add 203.0.113.1/24 dev c0")
        veth(inet, "g0", gw, "up0")
        inet.ip("addr add 198.51.100.1/30 dev g0")
        gw.ip("addr add 198.51.100.2/30 dev up0")
        inet.ip("route add 192.0.2.0/24 via 198.51.100.2")
        inet.sysctl("net.ipv4.ip_forward", 1)
        members = [(inet, "p0", "u-inet", UPLINK["inet"])]
        members += [(nodes[n], "up0", f"u-{n[-1]}", UPLINK[n]) for n in nodes]
        self.bridge("up", members, UPLINK_PREFIX)
        inet.ip(f"route add {VIP}/32 dev p0")

        members = [(gw, "lan0", "l-gw", GATEWAY)]
        members += [(nodes[n], "lan0", f"l-{n[-1]}", a) for n, a in self.nodes.items()]
        members += [(relays[n], "lan0", f"l-{n}", a) for n, a in self.relay_addresses.items()]
        self.bridge("lan", members, 24)

        gw.ip("route add default via 198.51.100.1")
        gw.sysctl("net.ipv4.ip_forward", 1)
        make_stateful(gw)
        for node in nodes.values():
            node.ip(f"route add default via {UPLINK['inet']}")
        for relay in relays.values():
            relay.ip(f"route add default via {GATEWAY}")
        for host in (client, inet, gw, *nodes.values(), *relays.values()):
            host.sysctl("net.ipv4.conf.all.rp_filter", 0)
            host.sysctl("net.ipv4.conf.default.rp_filter", 0)
        for name in (*nodes, *relays):
            self._management_link(self.hosts[name])

    def roles(self):
        """Each Salt minion's ``roles`` grain."""
        return {
            **{name: ["proxy"] for name in self.nodes},
            **{name: ["relay"] for name in self.relay_addresses},
        }

    def node_mac(self, name, ifname="lan0"):
        """Node ``name``'s MAC on the LAN (``lan0``, the relays' side) or ``up0``."""
        return mac_of(self.hosts[name], ifname)

    def proxy_mac(self):
        return self.node_mac("haproxy-a")

    def pillar(self):
        """The seed lab's pillar with master-relay as the HA pair: both MACs, both nodes."""
        data = super().pillar()
        entry = data["relayroute"]["proxies"][PROXY]
        assert entry["address"] == FLOATING, entry
        entry["macs"] = [self.node_mac(name) for name in self.nodes]
        entry["nodes"] = list(self.nodes)
        return data

    def keepalived_config(self, name):
        """Node ``name``'s VRRP instance: the floating address on lan0, the VIP on up0."""
        return vrrp_config(
            router_id=name,
            interface="lan0",
            vrid=VRID,
            priority=PRIORITY[name],
            addresses=[(f"{FLOATING}/24", "lan0"), (f"{VIP}/32", "up0")],
            state="MASTER" if PRIORITY[name] == max(PRIORITY.values()) else "BACKUP",
        )

    def holds(self, name):
        """Which of the floating address and the VIP node ``name`` holds now."""
        out = self.hosts[name].ip("-4 -o addr show").stdout
        return {
            label: f" {address}/" in out
            for label, address in (("floating", FLOATING), ("vip", VIP))
        }


def wait_for(condition, timeout, explain=lambda: ""):
    """Poll ``condition`` every 20 ms for up to ``timeout`` s; fail with ``explain()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, explain()
        time.sleep(0.02)
    return time.monotonic()
