"""
The seed's network in namespaces.

    client (203.0.113.10 mail client via the VIP, 203.0.113.20 external MTA)
      |
    inet router 203.0.113.1 --- gw (stateful firewall, hosts.make_stateful)
      |                          |
      +--- master-relay ---------+--- LAN bridge 192.0.2.0/24 --- relay1..3
           VIP 198.51.100.25          gw .1, master-relay .2, relays .11-.13

Salt's hosts (master-relay, relays) also get a management link to the
salt-master in the root namespace: a veth whose root end carries
198.51.100.129/32 and whose namespace end a /32 of its own, with one host route
each way. No default route, no other traffic: the lab's mail flows only on the
lab's own networks.

``SeedLab(dual_stack=True)`` adds the same network in IPv6 (``IPV6`` below),
every host and link of the IPv4 layout mirrored in 2001:db8::/32: clients in
2001:db8:203::/64, the LAN 2001:db8:2::/64 (gw ::1, master-relay ::2, relays
::11-::13), the VIP 2001:db8:100::25, inet's links to gw and master-relay
2001:db8:1::/64 and 2001:db8:1:4::/64. Duplicate address detection is off in
every namespace (addresses are usable at once), the bridges do not snoop
multicast (neighbour discovery is never filtered by a missed MLD report), and
master-relay forwards in neither family (TPROXY delivers locally).
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

from tests.support.hosts import make_stateful, uplinks
from tests.support.netns import (
    RUN_PREFIX,
    Netns,
    etc_mount_point,
    mac_of,
    release_etc_mount_point,
    run,
    veth,
)
from tests.support.smtp import send_mail

MAIL_CLIENT = "203.0.113.10"
EXTERNAL_MTA = "203.0.113.20"
VIP = "198.51.100.25"
LAN = "192.0.2.0/24"
GATEWAY = "192.0.2.1"
PROXY_LAN = "192.0.2.2"
RELAYS = {"relay1": "192.0.2.11", "relay2": "192.0.2.12", "relay3": "192.0.2.13"}
MASTER_ADDRESS = "198.51.100.129"
OUTSIDER = "203.0.113.30"  # not in the relays' mynetworks, connects through the VIP
NETNS_ETC = Path("/etc/netns")


@dataclass(frozen=True)
class Side:
    """One family's addresses in the lab: what a test sends from and to."""

    family: int
    vip: str
    mail_client: str  # in the relays' mynetworks, sends through the VIP
    external_mta: str  # outside mynetworks, sends straight to a relay
    gateway: str
    proxy_lan: str
    lan: str
    relays: Dict[str, str] = field(default_factory=dict)
    # The clients the relays' Postfix lets relay (the mail client, not the MTA).
    trusted_clients: str = ""


IPV4 = Side(4, VIP, MAIL_CLIENT, EXTERNAL_MTA, GATEWAY, PROXY_LAN, LAN, RELAYS, "203.0.113.0/28")
IPV6 = Side(
    6,
    vip="2001:db8:100::25",
    mail_client="2001:db8:203::10",
    external_mta="2001:db8:203::20",
    gateway="2001:db8:2::1",
    proxy_lan="2001:db8:2::2",
    lan="2001:db8:2::/64",
    relays={"relay1": "2001:db8:2::11", "relay2": "2001:db8:2::12", "relay3": "2001:db8:2::13"},
    # ::0-::1f: the mail client (::10), not the external MTA (::20).
    trusted_clients="2001:db8:203::/123",
)


class SeedLab:
    """Builds the namespaces; ``teardown`` removes them and their /etc/netns overlays."""

    name = "seed"

    def __init__(self, relays=RELAYS, backend=None, dual_stack=False):
        # The packet-filter backend the pillar names; None names none, so the
        # platform's default (parameters/: nftables on Debian 12) is what runs.
        self.backend = backend
        # IPv6 beside IPv4 (the IPV6 side); off, the lab is IPv4 only as ever.
        self.dual_stack = dual_stack
        if dual_stack:
            # Its own namespace and link names: pytest keeps a lab package's
            # fixtures until the session ends, so this lab and the IPv4 seed
            # lab of one run may be up at the same time.
            self.name = "dual"
        self.sides = {4: IPV4, 6: IPV6} if dual_stack else {4: IPV4}
        # Where HAProxy and the pillar reach each relay, and where clients do.
        self.relay_addresses = dict(relays)
        self.direct_addresses = dict(relays)
        self.lan_networks = [LAN]
        self.proxy_address = PROXY_LAN
        # ip netns exec can only bind an overlay over a directory that exists.
        self.made_etc_relayroute = etc_mount_point("/etc/relayroute")
        self.hosts = {}
        self._mgmt_index = 0
        self.mgmt = {}
        try:
            self._build()
        except Exception:
            self.teardown()
            raise

    def host(self, short):
        ns = Netns(f"{self.name}-{short}")
        self.hosts[short] = ns
        # ip netns exec bind-mounts /etc/netns/NS/* over /etc/*: an empty
        # resolv.conf keeps lookups from waiting on an unreachable resolver, and
        # each host gets its own /etc/haproxy and /etc/sysctl.d.
        overlay = NETNS_ETC / ns.name
        overlay.mkdir(parents=True, exist_ok=True)
        (overlay / "resolv.conf").write_text("")
        (overlay / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {short}\n")
        for sub in ("haproxy", "sysctl.d", "relayroute", "systemd"):
            (overlay / sub).mkdir(exist_ok=True)
        if self.dual_stack:
            # Before any link exists: every address of the lab (link-local ones
            # too) is usable at once, not tentative for a second of DAD.
            for key in ("all", "default"):
                ns.sysctl(f"net.ipv6.conf.{key}.accept_dad", 0)
        return ns

    def _build(self):
        client, inet, gw = self.host("client"), self.host("inet"), self.host("gw")
        proxy = self.host("master-relay")
        relays = {name: self.host(name) for name in self.relay_addresses}

        uplinks(client, inet, gw, proxy, [MAIL_CLIENT, EXTERNAL_MTA])
        # Clients reach master-relay at the VIP; HAProxy answers there.
        proxy.ip(f"addr add {VIP}/32 dev lo")
        inet.ip(f"route add {VIP}/32 via 198.51.100.6")

        self._lans(gw, proxy, relays)
        gw.ip("route add default via 198.51.100.1")
        gw.sysctl("net.ipv4.ip_forward", 1)
        make_stateful(gw)
        proxy.ip("route add default via 198.51.100.5")
        for relay in relays.values():
            relay.ip(f"route add default via {GATEWAY}")
        for host in (client, inet, gw, proxy, *relays.values()):
            host.sysctl("net.ipv4.conf.all.rp_filter", 0)
            host.sysctl("net.ipv4.conf.default.rp_filter", 0)
        for name in ("master-relay", *relays):
            self._management_link(self.hosts[name])
        if self.dual_stack:
            self._build_ipv6(client, inet, gw, proxy, relays)

    def _build_ipv6(self, client, inet, gw, proxy, relays):
        """The IPv6 side (``IPV6``), on the links ``_build`` made, as in IPv4."""
        side = IPV6

        def add(host, address, dev):
            host.ip(f"-6 addr add {address} dev {dev} nodad")

        for address in (side.mail_client, side.external_mta):
            add(client, f"{address}/64", "eth0")
        client.ip("-6 route add default via 2001:db8:203::1")
        add(inet, "2001:db8:203::1/64", "c0")
        add(inet, "2001:db8:1::1/64", "g0")
        add(gw, "2001:db8:1::2/64", "up0")
        add(inet, "2001:db8:1:4::1/64", "p0")
        add(proxy, "2001:db8:1:4::2/64", "up0")
        inet.ip(f"-6 route add {side.lan} via 2001:db8:1::2")
        inet.ip(f"-6 route add {side.vip}/128 via 2001:db8:1:4::2")
        add(proxy, f"{side.vip}/128", "lo")
        proxy.ip("-6 route add default via 2001:db8:1:4::1")
        gw.ip("-6 route add default via 2001:db8:1::1")
        for router in (inet, gw):
            router.sysctl("net.ipv6.conf.all.forwarding", 1)
        make_stateful_ipv6(gw)
        self._lans_ipv6(gw, proxy, relays)
        for relay in relays.values():
            relay.ip(f"-6 route add default via {side.gateway}")

    def _lans_ipv6(self, gw, proxy, relays):
        """The seed's LAN in IPv6: the same bridge, one more address on each lan0."""
        side = IPV6
        self.hosts["lan"].ip("link set br0 type bridge mcast_snooping 0")
        for host, address in (
            (gw, side.gateway),
            (proxy, side.proxy_lan),
            *((relays[name], address) for name, address in side.relays.items()),
        ):
            host.ip(f"-6 addr add {address}/64 dev lan0 nodad")

    def bridge(self, short, members, prefixlen):
        """A bridge namespace joining ``(host, port name, address)`` members on lan-side ifs."""
        switch = self.host(short)
        switch.ip("link add br0 type bridge")
        switch.ip("link set br0 up")
        for host, ifname, port, address in members:
            veth(host, ifname, switch, port)
            switch.ip(f"link set {port} master br0")
            host.ip(f"addr add {address}/{prefixlen} dev {ifname}")

    def _lans(self, gw, proxy, relays):
        """The seed: one LAN joining gateway, master-relay and relays."""
        members = [(gw, "lan0", "l-gw", GATEWAY), (proxy, "lan0", "l-mr", PROXY_LAN)]
        members += [(relays[n], "lan0", f"l-{n}", a) for n, a in self.relay_addresses.items()]
        self.bridge("lan", members, 24)

    def pillar(self):
        """This lab's topology as relayroute's pillar (documentation ranges only)."""
        extra = [side for family, side in sorted(self.sides.items()) if family != 4]

        def one_or_all(first, more):
            # IPv4 only: the plain string, as the seed's pillar has always had it.
            return [first, *more] if more else first

        return {
            "relayroute": {
                "lan_networks": [*self.lan_networks, *(side.lan for side in extra)],
                "mark_mask": 0xFF,
                **({"backend": self.backend} if self.backend else {}),
                "ports": [25, 587],
                "proxies": {
                    "master-relay": {
                        "address": one_or_all(
                            self.proxy_address, [side.proxy_lan for side in extra]
                        ),
                        "mark": 254,
                        "table": 1000254,
                        "priority": 1000,
                        "vip": one_or_all(VIP, [side.vip for side in extra]),
                    }
                },
                "relays": {
                    name: {"address": one_or_all(a, [side.relays[name] for side in extra])}
                    for name, a in self.relay_addresses.items()
                },
                # Wider than the longest a lab test holds sessions open (HELD_WINDOW_MAX
                # in test_live_safety): no idle timer of HAProxy's ends one.
                "proxy": {
                    "haproxy": {"timeouts": {"client": "10m", "server": "10m"}},
                    # None by default; one here, for the reboot proof to restore.
                    "sysctls": {"net.ipv4.ip_nonlocal_bind": 1},
                },
                # The lab runs HAProxy itself (no init system in a namespace) and has
                # no shared /run/haproxy: one stats socket path would collide. Saved
                # sysctls go to a directory each host has of its own (/etc/netns).
                "lookup": {
                    "proxy": {
                        "haproxy": {
                            "manage_pkg": False,
                            "manage_service": False,
                            "stats_socket": "",
                        },
                        "sysctl_saved": "/etc/sysctl.d/relayroute-before.yaml",
                    }
                },
            }
        }

    def _management_link(self, ns):
        """
        A /32 link from the root namespace (the salt-master) to one host. The
        host's address is the first of 198.51.100.130-254 with no route in the
        root namespace yet, so labs of runs that overlap never collide.
        """
        self._mgmt_index += 1
        taken = set(run(["ip", "-4", "route", "show"]).stdout.split())
        address = next(
            f"198.51.100.{last}" for last in range(130, 255) if f"198.51.100.{last}" not in taken
        )
        root_if = f"{RUN_PREFIX[-6:]}{self.name[0]}{self._mgmt_index}"
        ns.ip(f"link add mgmt0 type veth peer name {root_if} netns 1")
        ns.ip(f"addr add {address}/32 dev mgmt0")
        ns.ip("link set mgmt0 up")
        run(["ip", "addr", "add", f"{MASTER_ADDRESS}/32", "dev", root_if])
        run(["ip", "link", "set", root_if, "up"])
        run(["ip", "route", "add", f"{address}/32", "dev", root_if, "src", MASTER_ADDRESS])
        ns.ip(f"route add {MASTER_ADDRESS}/32 dev mgmt0 src {address}")
        self.mgmt[ns.name] = (address, root_if)

    def roles(self):
        """Each Salt minion's ``roles`` grain."""
        return {"master-relay": ["proxy"], **{name: ["relay"] for name in self.relay_addresses}}

    def ns(self, short):
        return self.hosts[short]

    def proxy_mac(self):
        return mac_of(self.hosts["master-relay"], "lan0")

    def teardown(self):
        for ns in reversed(list(self.hosts.values())):
            ns.delete()
            shutil.rmtree(NETNS_ETC / ns.name, ignore_errors=True)
        for _address, root_if in self.mgmt.values():
            # The root end goes with its namespace; this catches a half-built link.
            run(["ip", "link", "del", root_if], check=False)
        self.hosts.clear()
        if self.made_etc_relayroute:
            release_etc_mount_point("/etc/relayroute")
            self.made_etc_relayroute = False

    def boot_commands(self, short):
        """
        What the host runs at boot for relayroute, read from its own files:
        systemd-sysctl's drop-in, then each relayroute unit's ExecStart.
        """
        overlay = NETNS_ETC / self.hosts[short].name
        commands = []
        dropin = overlay / "sysctl.d" / "90-relayroute.conf"
        if dropin.exists():
            commands.append(["sysctl", "-q", "-p", "/etc/sysctl.d/90-relayroute.conf"])
        for unit in sorted((overlay / "systemd" / "system").glob("relayroute-*.service")):
            if unit.name.endswith("-watch.service"):
                continue  # a long-running watcher, not part of the boot's restore
            commands.append(unit_launch(unit))
        return commands

    def watch_commands(self, short):
        """The ExecStart of each relayroute watcher unit the host has (long-running)."""
        overlay = NETNS_ETC / self.hosts[short].name
        units = (overlay / "systemd" / "system").glob("relayroute-*-watch.service")
        return [unit_launch(unit) for unit in sorted(units)]


def unit_launch(unit):
    """
    A relayroute unit's ExecStart with the unit's own privileges (its
    capability bounding set, NoNewPrivileges) under setpriv, read from the
    unit file the formula wrote: the lab has no init system, and the restore
    must work with what the unit gives it.
    """
    from tests.support.haproxy import UnitLaunch

    return UnitLaunch.from_files(unit).argv()


def exec_start(unit):
    """A unit file's ExecStart lines, each as its argv."""
    return [
        line.split("=", 1)[1].split()
        for line in unit.read_text().splitlines()
        if line.startswith("ExecStart=")
    ]


class TwoLeggedLab(SeedLab):
    """
    The rp_filter variant: the relays reach the gateway on lan0 (192.0.2.0/25)
    and master-relay on a second interface, px0 (192.0.2.128/25), with strict
    reverse-path filtering. HAProxy and the pillar use the px0 addresses;
    clients reach the relays directly on their lan0 addresses.
    """

    name = "rpf"

    def __init__(self, backend=None):
        super().__init__({n: f"192.0.2.{131 + i}" for i, n in enumerate(RELAYS)}, backend)
        self.direct_addresses = dict(RELAYS)
        self.lan_networks = ["192.0.2.0/25", "192.0.2.128/25"]
        self.proxy_address = "192.0.2.130"

    def _lans(self, gw, proxy, relays):
        members = [(gw, "lan0", "l-gw", GATEWAY)]
        members += [(relays[n], "lan0", f"l-{n}", a) for n, a in RELAYS.items()]
        self.bridge("lan", members, 25)
        members = [(proxy, "lan0", "p-mr", "192.0.2.130")]
        members += [(relays[n], "px0", f"p-{n}", a) for n, a in self.relay_addresses.items()]
        self.bridge("pnet", members, 25)
        for relay in relays.values():
            for key in ("all", "default", "lan0", "px0"):
                relay.sysctl(f"net.ipv4.conf.{key}.rp_filter", 1)

    def _build(self):
        super()._build()
        for relay in (self.hosts[n] for n in RELAYS):
            # _build reset all/default to 0 for the seed; this variant is strict.
            relay.sysctl("net.ipv4.conf.all.rp_filter", 1)
            relay.sysctl("net.ipv4.conf.default.rp_filter", 1)


def overlay_path(ns, path):
    """Where a host's /etc/<path> lives on the shared filesystem."""
    rel = os.path.relpath(path, "/etc")
    return NETNS_ETC / ns.name / rel


def states_of(ret, target=None, minions=None):
    """
    Flatten a state run's return into {minion: [state dicts]}. For a single
    minion salt-factories unwraps the return, so it is keyed by state instead.

    Fails (AssertionError with the output) on anything that is not a state
    run's return: no data (no minion answered), a minion that returned
    something else than states (render errors come back as a list of
    strings), or, with ``minions``, a set of minions that answered other than
    exactly those.
    """
    data = ret.data
    assert isinstance(data, dict), f"no state return: {data!r}\n{ret.stdout}"
    assert data, f"no minion answered\n{ret.stdout}"
    if any("_|-" in key for key in data):
        data = {target or "minion": data}
    for minion, result in data.items():
        assert isinstance(result, dict), f"{minion} returned no states: {result!r}"
        assert result, f"{minion} returned no states"
    if minions is not None:
        assert sorted(data) == sorted(minions), (sorted(data), sorted(minions), ret.stdout)
    return {minion: list(result.values()) for minion, result in data.items()}


def assert_states_succeeded(states_by_minion):
    """Every state of every minion has result True (not False, not None)."""
    failed = {
        minion: [(s.get("__id__"), s.get("result"), s.get("comment")) for s in states]
        for minion, states in states_by_minion.items()
        if any(s.get("result") is not True for s in states)
    }
    assert not failed, failed


def report(title, lines):
    print(f"\n=== {title}")
    for line in lines:
        print(f"  {line}")


def mail_direct(lab, name, timeout=20, side=None):
    """
    One message from the external MTA straight to a relay, for its own domain;
    with ``side`` (IPV4, IPV6), from and to that family's addresses.
    """
    return send_mail(
        lab.ns("client"),
        side.relays[name] if side else lab.direct_addresses[name],
        25,
        rcpt_to=f"postmaster@{name}.lab.example",
        local_interface=side.external_mta if side else EXTERNAL_MTA,
        timeout=timeout,
    )


def mail_via_vip(lab, ports, source=None, timeout=20, side=None):
    """
    One message through the VIP per entry of ``ports``, relayed to an outside
    domain; from ``source``, by default the mail client. With ``side`` (IPV4,
    IPV6), through that family's VIP and from its mail client.
    """
    side = side or IPV4
    return [
        send_mail(
            lab.ns("client"),
            side.vip,
            port,
            rcpt_to="someone@example.org",
            local_interface=source or side.mail_client,
            timeout=timeout,
        )
        for port in ports
    ]


# The comment on the IPv6 drop rule of make_stateful_ipv6, by which its counter is read.
STATEFUL_DROP_IPV6 = "stateful: conntrack INVALID (IPv6)"


def make_stateful_ipv6(router):
    """
    ``hosts.make_stateful`` for IPv6 (call that first: conntrack's TCP
    strictness, ``nf_conntrack_tcp_loose = 0``, is one setting for both
    families): forwarded IPv6 packets of connections the router did not see
    begin are dropped and counted.
    """
    router.exec(
        [
            "ip6tables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID",
            "-m", "comment", "--comment", STATEFUL_DROP_IPV6, "-j", "DROP",
        ]
    )  # fmt: skip


def dropped_ipv6(router):
    """IPv6 packets a router of ``make_stateful_ipv6`` dropped as conntrack INVALID."""
    listing = router.exec("ip6tables -t filter -L FORWARD -n -v -x").stdout
    for line in listing.splitlines():
        if f"/* {STATEFUL_DROP_IPV6} */" in line:
            return int(line.split()[0])
    raise LookupError(f"{router.name}: no FORWARD rule commented {STATEFUL_DROP_IPV6!r}")
