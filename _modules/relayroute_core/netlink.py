"""
Kernel routing state through netlink (pyroute2): ip rules, routes in policy
tables, addresses, neighbours and conntrack. No ``ip`` process is spawned and
no command output is parsed.

Tables above 255 are read from the ``RTA_TABLE``/``FRA_TABLE`` attribute, not
the 8-bit header field; rules always get an explicit priority.
"""

import asyncio
import concurrent.futures
import socket
import time
from dataclasses import dataclass
from typing import List, Tuple

from . import family as families
from . import lazy, sysctl
from .planner import Route, Rule

# pyroute2's package __init__ imports every subsystem of the library (0.1 s):
# reads take rtnetlink's message classes alone (rtnl.py); IPRoute (writes,
# links with their MACs) and conntrack are imported on their first use (lazy.py).
lazy.deferred_package("pyroute2")
try:
    from pyroute2.netlink.exceptions import NetlinkError

    from .rtnl import Reader

    IPRoute = lazy.attribute("pyroute2.iproute.linux", "IPRoute")
    Conntrack = lazy.attribute("pyroute2.conntrack", "Conntrack")
    HAS_PYROUTE2 = True
except ImportError:  # pragma: no cover - reported by __virtual__
    HAS_PYROUTE2 = False
    NetlinkError = OSError

FR_ACT_TO_TBL = 1
RTN_UNICAST = 1
RTN_LOCAL = 2
KINDS = {RTN_UNICAST: "unicast", RTN_LOCAL: "local"}
KIND_TYPES = {name: number for number, name in KINDS.items()}
# Neighbour states without a usable link-layer address: resolution pending or
# failed, and NOARP (an entry the kernel made without asking: a multicast
# group's, or one on a link without ARP/ND), whose address is no neighbour's.
NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_UNUSABLE = NUD_INCOMPLETE | NUD_FAILED | NUD_NOARP
# rtm_flags of IPv6's cached clones in a route dump: no route of a table's.
RTM_F_CLONED = 0x200
MAIN_TABLE = 254


class NetlinkOpError(RuntimeError):
    """A netlink request failed; the message names the operation and the kernel's error."""


def _family_prefix(version):
    """What 'ip rule' prints before a rule of this family ('ipv6 ', nothing for IPv4)."""
    return "" if version == families.FAMILIES[0].version else f"{_name(version).lower()} "


def _name(version):
    return families.BY_VERSION[version].name


@dataclass(frozen=True)
class KernelRule:
    """An ip rule as the kernel holds it, with what relayroute needs to judge it."""

    priority: int
    table: int
    fwmark: int
    fwmask: int
    proto: int
    action: int
    selectors: Tuple[str, ...]  # other selectors (src, dst, iif, ...) present
    family: int = 4  # 4 or 6: the kernel keeps each family's rules apart

    def as_rule(self):
        return Rule(
            self.priority, self.fwmark, self.fwmask, self.table, self.proto, family=self.family
        )

    def line(self):
        words = [f"{_family_prefix(self.family)}{self.priority}:", "from all"]
        if self.fwmark or self.fwmask:
            words.append(f"fwmark {self.fwmark:#x}/{self.fwmask:#x}")
        words += list(self.selectors)
        words.append(f"lookup {self.table}" if self.action == FR_ACT_TO_TBL else "action")
        words.append(f"proto {self.proto}")
        return " ".join(words)


@dataclass(frozen=True)
class KernelState:
    """What one netlink read found: rules, policy routes, networks and addresses."""

    rules: Tuple[KernelRule, ...]  # of both families
    routes: Tuple[Route, ...]  # routes of both families in every table outside local/main/default
    networks: Tuple[str, ...]  # connected networks of the host (both families)
    addresses: Tuple[str, ...]  # the host's own addresses (both families)
    network_interfaces: Tuple[Tuple[str, str], ...] = ()  # (network, interface name)
    # The IPv4 main table's default route's interface (reverse-path filtering,
    # which src_valid_mark relaxes, is IPv4's).
    default_interface: str = ""
    # Kernels before 4.17 (CentOS 7) keep no protocol on ip rules (FRA_PROTOCOL).
    rule_protocol: bool = True
    # ((family, interface), ...): each family's main default route's interface.
    default_interfaces: Tuple[Tuple[int, str], ...] = ()

    def default_interface_of(self, version):
        """The interface of the main table's default route of this family ('' when none)."""
        return dict(self.default_interfaces).get(version, "")


_RULE_SELECTORS = {
    "FRA_SRC": "from",
    "FRA_DST": "to",
    "FRA_IIFNAME": "iif",
    "FRA_OIFNAME": "oif",
    "FRA_UID_RANGE": "uidrange",
    "FRA_IP_PROTO": "ipproto",
    "FRA_SPORT_RANGE": "sport",
    "FRA_DPORT_RANGE": "dport",
    "FRA_L3MDEV": "l3mdev",
}


def _version(msg):
    """The family (4/6) of a netlink message, from its header."""
    return families.BY_AF[msg["family"]].version


def _rule_from_msg(msg):
    table = msg.get("FRA_TABLE") or msg["table"]
    selectors = tuple(
        f"{word} {msg.get(attr)}"
        for attr, word in _RULE_SELECTORS.items()
        if msg.get(attr) is not None
    )
    if msg["src_len"] and not msg.get("FRA_SRC"):
        selectors += (f"from /{msg['src_len']}",)
    return KernelRule(
        priority=msg.get("FRA_PRIORITY") or 0,
        table=table,
        fwmark=msg.get("FRA_FWMARK") or 0,
        fwmask=msg.get("FRA_FWMASK") or 0,
        proto=msg.get("FRA_PROTOCOL") or 0,
        action=msg["action"],
        selectors=selectors,
        family=_version(msg),
    )


def _route_from_msg(msg, ifnames):
    table = msg.get("RTA_TABLE") or msg["table"]
    version = _version(msg)
    dst = msg.get("RTA_DST")
    dst = f"{dst}/{msg['dst_len']}" if dst else families.BY_VERSION[version].any
    kind = KINDS.get(msg["type"], str(msg["type"]))
    oif = msg.get("RTA_OIF")
    return Route(
        table=table,
        proto=msg["proto"],
        dst=dst,
        gateway=msg.get("RTA_GATEWAY"),
        kind=kind,
        dev=ifnames.get(oif) if kind == "local" else None,
        family=version,
    )


def _outside_event_loop(func, *args, **kwargs):
    """
    Run ``func`` here, or in a worker thread when this thread runs an asyncio
    event loop: pyroute2's synchronous ``IPRoute`` drives a loop of its own,
    and fails with "This event loop is already running" inside one (a beacon
    or an engine runs in the minion's main process, which runs Salt's loop).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return func(*args, **kwargs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(func, *args, **kwargs).result()


def _wrap(what, event_loop=False):
    """
    Failures of the netlink requests of the decorated function raise
    :class:`NetlinkOpError` prefixed with ``what``. ``event_loop``: the
    function uses ``IPRoute``, run it outside a running asyncio loop; the
    readers (:class:`rtnl.Reader`) run no loop and run where they are called.
    """

    def decorate(func):
        def inner(*args, **kwargs):
            try:
                if event_loop:
                    return _outside_event_loop(func, *args, **kwargs)
                return func(*args, **kwargs)
            except (NetlinkError, OSError) as err:
                # OSError: the socket's own failure (ENOBUFS, a namespace gone).
                raise NetlinkOpError(f"{what}: {err}") from err

        inner.__name__ = func.__name__
        inner.__doc__ = func.__doc__
        return inner

    return decorate


def _own_interfaces(rtnl, family):
    """The host's addresses of ``family`` as interface objects, with their link's index."""
    found = []
    for msg in rtnl.addresses(family.af):
        address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        found.append((family.interface(f"{address}/{msg['prefixlen']}"), msg["index"]))
    return found


def _main_default(rtnl, family):
    """The main table's default route of ``family``: ``(present, interface index or None)``."""
    for msg in rtnl.routes(family.af):
        if not msg["dst_len"] and _table(msg) == MAIN_TABLE and not msg["flags"] & RTM_F_CLONED:
            return True, msg.get("RTA_OIF") if msg["type"] == RTN_UNICAST else None
    return False, None


def _table(msg):
    return msg.get("RTA_TABLE") or msg["table"]


def _ours(msgs):
    """The messages of relayroute's families (an AF_UNSPEC dump also holds IPMR's, MPLS', ...)."""
    return [msg for msg in msgs if msg["family"] in families.BY_AF]


@_wrap("reading routing state over netlink")
def read():
    """
    Dump ip rules, routes, addresses and links (netlink only): one dump of
    each for both families (AF_UNSPEC), each message parsed in its family.
    Routes of the local, main and default tables are left out, but for the
    main table's default route of each family (its interface).
    """
    with Reader() as rtnl:
        ifnames = rtnl.links()
        rule_msgs = _ours(rtnl.rules(socket.AF_UNSPEC))
        route_msgs = [
            msg for msg in _ours(rtnl.routes(socket.AF_UNSPEC)) if not msg["flags"] & RTM_F_CLONED
        ]
        addr_msgs = _ours(rtnl.addresses(socket.AF_UNSPEC))
    routes = tuple(
        _route_from_msg(msg, ifnames) for msg in route_msgs if _table(msg) not in (253, 254, 255)
    )
    defaults = {}
    for msg in route_msgs:
        main_default = _table(msg) == MAIN_TABLE and not msg["dst_len"]
        if main_default and msg["type"] == RTN_UNICAST and msg.get("RTA_OIF"):
            defaults.setdefault(_version(msg), ifnames.get(msg.get("RTA_OIF"), ""))
    networks, addresses, on = [], [], []
    for msg in addr_msgs:
        family = families.BY_AF[msg["family"]]
        address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        interface = family.interface(f"{address}/{msg['prefixlen']}")
        addresses.append(str(interface.ip))
        if not interface.ip.is_loopback:
            networks.append(str(interface.network))
            on.append((str(interface.network), ifnames.get(msg["index"], "")))
    rules = tuple(_rule_from_msg(msg) for msg in rule_msgs)
    # Kernels with FRA_PROTOCOL report it on every rule, the defaults included.
    rule_protocol = any(msg.get("FRA_PROTOCOL") is not None for msg in rule_msgs)
    return KernelState(
        rules,
        routes,
        tuple(networks),
        tuple(addresses),
        tuple(on),
        defaults.get(families.IPV4.version, ""),
        rule_protocol,
        tuple(sorted(defaults.items())),
    )


@_wrap("reading the host's addresses over netlink", event_loop=True)
def host_addresses():
    """
    ``[(address, prefixlen, interface name, interface MAC)]``: every address
    of the host in relayroute's families (what a minion publishes to the
    mine, see :mod:`mine`); the MAC is "" on a link without one (lo, tun).
    """
    with IPRoute() as ipr:
        links = {
            link["index"]: (link.get("IFLA_IFNAME") or "", link.get("IFLA_ADDRESS") or "")
            for link in ipr.get_links()
        }
        addr_msgs = _ours(ipr.get_addr(family=socket.AF_UNSPEC))
    found = []
    for msg in addr_msgs:
        name, mac = links.get(msg["index"], ("", ""))
        address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        found.append((address, msg["prefixlen"], name, mac if mac.count(":") == 5 else ""))
    return found


def _route_args(route, ipr):
    args = {
        "dst": route.dst,
        "table": route.table,
        "proto": route.proto,
        "type": KIND_TYPES[route.kind],
        "family": families.BY_VERSION[route.family].af,
    }
    if route.gateway:
        args["gateway"] = route.gateway
    if route.dev:
        args["oif"] = ipr.link_lookup(ifname=route.dev)[0]
    if route.kind == "local":
        args["scope"] = 254  # host
    return args


def _rule_args(rule):
    return {
        "family": families.BY_VERSION[rule.family].af,
        "priority": rule.priority,
        "fwmark": rule.fwmark,
        "fwmask": rule.fwmask,
        "table": rule.table,
        "protocol": rule.proto,
        "action": "FR_ACT_TO_TBL",
    }


def run_ops(ops):
    """
    Carry out netlink operations in order. ``ops`` are ``(verb, object)`` with
    verb one of ``route_replace``, ``route_del``, ``rule_add``, ``rule_del``
    (each in the family its route or rule carries), ``connmark_move`` and
    ``sysctl_set``. Stops at the first failure and raises
    :class:`NetlinkOpError` naming it, with ``done`` set to the operations
    that succeeded before it.
    """
    done = []
    with IPRoute() as ipr:
        for verb, obj in ops:
            try:
                if verb == "connmark_move":
                    move_connmarks(*obj)
                elif verb == "sysctl_set":
                    key, value, _previous = obj
                    try:
                        sysctl.write(key, value)
                    except OSError as err:
                        error = NetlinkOpError(str(err))
                        error.done = done
                        raise error from err
                elif verb == "route_replace":
                    ipr.route("replace", **_route_args(obj, ipr))
                elif verb == "route_del":
                    ipr.route("del", **_route_args(obj, ipr))
                elif verb == "rule_add":
                    ipr.rule("add", **_rule_args(obj))
                elif verb == "rule_del":
                    ipr.rule("del", **_rule_args(obj))
                else:
                    raise ValueError(f"unknown netlink operation {verb!r}")
            except NetlinkError as err:
                what = obj.line() if hasattr(obj, "line") else repr(obj)
                error = NetlinkOpError(f"{verb.replace('_', ' ')} '{what}': {err}")
                error.done = done
                raise error from err
            done.append((verb, obj))
    return done


def move_connmarks(old_mark, old_mask, new_mark, new_mask):
    """
    Give every conntrack entry (of both families) whose connmark carries
    ``old_mark`` under ``old_mask`` the connmark ``new_mark`` under
    ``new_mask`` instead, keeping the bits of other mark users. Entries that
    end meanwhile are skipped. Returns how many moved.
    """
    moved = 0
    for family in families.FAMILIES:
        with Conntrack(nfgen_family=family.af) as ct:
            entries = [
                entry
                for entry in ct.dump_entries(mark=old_mark, mark_mask=old_mask)
                if entry.tuple_orig.family == family.af
            ]
            for entry in entries:
                mark = ((entry.mark or 0) & ~(old_mask | new_mask) & 0xFFFFFFFF) | new_mark
                try:
                    ct.entry("set", tuple_orig=entry.tuple_orig, mark=mark)
                except NetlinkError as err:
                    if err.code != 2:  # ENOENT: the connection ended meanwhile
                        raise
                    continue
                moved += 1
    return moved


def _own_address_towards(networks, gateway):
    """The host's own address on the network ``gateway`` is on, of its family (None: none)."""
    for interface in networks:
        if families.contains(interface.network, gateway):
            return str(interface.ip)
    return None


def _route_get(rtnl, lookup, src):
    family = families.BY_VERSION[lookup.family]
    try:
        msg = rtnl.route_get(family.af, lookup.dst, mark=lookup.mark, src=src)
    except NetlinkError as err:
        return (lookup, src, None, None, err.args[1] if len(err.args) > 1 else str(err))
    return (lookup, src, msg.get("RTA_TABLE") or msg["table"], msg.get("RTA_GATEWAY"), None)


@_wrap("route lookups over netlink")
def route_lookups(lookups):
    """
    Ask the kernel's own route lookup each of ``lookups`` (planner.Lookup, in
    its family: ``ip [-6] route get DST mark MARK``, and from the host's
    address of that family on the gateway's network when ``from_own``).
    Returns ``(lookup, src, table, gateway, error)`` per lookup made; netlink
    only, no process.
    """
    answers = []
    if not lookups:
        return answers
    with Reader() as rtnl:
        main_default, networks = {}, []
        for version in sorted({lookup.family for lookup in lookups}):
            family = families.BY_VERSION[version]
            main_default[version] = _main_default(rtnl, family)[0]
            networks += [interface for interface, _index in _own_interfaces(rtnl, family)]
        for lookup in lookups:
            if lookup.if_main_default and not main_default[lookup.family]:
                continue
            answers.append(_route_get(rtnl, lookup, None))
            src = _own_address_towards(networks, lookup.gateway) if lookup.from_own else None
            if src:
                answers.append(_route_get(rtnl, lookup, src))
    return answers


def _usable_mac(msg):
    """The MAC of a neighbour entry, lower case; None when it has no usable one."""
    mac = msg.get("NDA_LLADDR")
    if mac and not msg["state"] & NUD_UNUSABLE:
        return mac.lower()
    return None


def _same(a, b):
    return families.parse_address(a) == families.parse_address(b)


def _neighbour_mac(rtnl, address):
    family = families.of(address)
    for msg in rtnl.neighbours(family.af):
        if not msg.get("NDA_DST") or not _same(msg.get("NDA_DST"), address):
            continue
        mac = _usable_mac(msg)
        if mac:
            return mac
    return None


@_wrap("reading the neighbour table over netlink")
def neighbour_macs(addresses):
    """
    ``{address: mac or None}``: the MAC each address's neighbour entry carries
    now, from one dump of the neighbour table per family asked about
    (nothing is resolved, no ARP or neighbour solicitation).
    """
    wanted = {address: None for address in addresses}
    if not wanted:
        return wanted
    by_ip = {families.parse_address(address): address for address in wanted}
    with Reader() as rtnl:
        for family in sorted({families.of(address) for address in wanted}, key=_order):
            for msg in rtnl.neighbours(family.af):
                dst, mac = msg.get("NDA_DST"), _usable_mac(msg)
                address = by_ip.get(families.parse_address(dst)) if dst else None
                if address is not None and mac:
                    wanted[address] = mac
    return wanted


def _order(family):
    return family.version


@_wrap("looking up a neighbour over netlink")
def lookup_mac(address, resolve=True, timeout=3.0):
    """
    The MAC address of ``address`` (either family) from the neighbour table
    of its family. When absent and ``resolve`` is true, make the kernel
    resolve it (one UDP datagram to the discard port triggers ARP, or IPv6's
    neighbour solicitation) and wait up to ``timeout`` seconds. None when it
    cannot be found.
    """
    family = families.of(address)
    with Reader() as rtnl:
        mac = _neighbour_mac(rtnl, address)
        if mac or not resolve:
            return mac
        deadline = time.monotonic() + timeout
        with socket.socket(family.af, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(b"", (address, 9))
            except OSError:
                return None
            while time.monotonic() < deadline:
                time.sleep(0.05)
                mac = _neighbour_mac(rtnl, address)
                if mac:
                    return mac
    return None


def lookup_macs(addresses, resolve=True, timeout=3.0):
    """
    The MACs found for any of ``addresses`` (a proxy's, one per family), each
    once, in the order of the addresses (IPv4 first): an empty tuple when none
    was found.
    """
    found = []
    for address in addresses:
        mac = lookup_mac(address, resolve=resolve, timeout=timeout)
        if mac and mac not in found:
            found.append(mac)
    return tuple(found)


@dataclass(frozen=True)
class Flow:
    """A conntrack entry: the connection and its reply's source, its mark and state."""

    proto: str
    src: str
    sport: int
    dst: str
    dport: int
    reply_src: str
    mark: int
    state: str

    def line(self):
        return (
            f"{self.proto} {self.state} src={self.src} dst={self.dst} sport={self.sport} "
            f"dport={self.dport} reply-src={self.reply_src} mark={self.mark}"
        )


@_wrap("dumping conntrack over netlink", event_loop=True)
def flows(mark_mask=0xFFFFFFFF, port=None):
    """Conntrack entries (TCP/UDP, both families), with their connmark under ``mark_mask``."""
    names = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
    found: List[Flow] = []
    for family in families.FAMILIES:
        with Conntrack(nfgen_family=family.af) as ct:
            for entry in ct.dump_entries():
                orig, reply = entry.tuple_orig, entry.tuple_reply
                # Old kernels dump every family whatever the request's.
                if orig.family != family.af or orig.proto not in names:
                    continue
                if port is not None and port not in (orig.dport, orig.sport):
                    continue
                state = entry.protoinfo.state_name() if entry.protoinfo else ""
                found.append(
                    Flow(
                        names[orig.proto],
                        orig.saddr,
                        orig.sport,
                        orig.daddr,
                        orig.dport,
                        reply.saddr,
                        (entry.mark or 0) & mark_mask,
                        state,
                    )
                )
    return found
