"""
Validation of relayroute's inputs into plain, normalised values.

Pure: no kernel, no Salt. Every problem is reported with the key path and the
value that caused it, all problems at once, before anything is changed.
"""

import ipaddress
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from . import family

# Tables the kernel reserves: unspec, default, main, local.
RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
# Rule priorities the kernel's default rules use: local, main, default.
RESERVED_PRIORITIES = {0: "lookup local", 32766: "lookup main", 32767: "lookup default"}
U32 = 0xFFFFFFFF
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class InputError(ValueError):
    """
    Bad input: one or more messages, each naming the key path and the value.
    """

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


@dataclass(frozen=True)
class Proxy:
    """One master-relay as a relay sees it."""

    name: str
    # The proxy's LAN addresses, at most one per family, IPv4 first: the
    # gateway of its table in each family it has one in. A plain string is
    # taken as one address.
    addresses: Tuple[str, ...]
    mark: int
    table: int
    priority: int
    mac: Optional[str] = None
    # Every MAC marked with this proxy's mark, ``mac`` first: an HA pair's
    # nodes each connect from their own NIC. ``mac`` is ``macs[0]``.
    macs: Tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.addresses, str):
            object.__setattr__(self, "addresses", (self.addresses,))
        elif self.addresses is None:
            object.__setattr__(self, "addresses", ())
        if self.mac and not self.macs:
            object.__setattr__(self, "macs", (self.mac,))
        elif self.macs and self.mac != self.macs[0]:
            object.__setattr__(self, "mac", self.macs[0])

    @property
    def address(self):
        """The first LAN address (the IPv4 one on a dual-stack LAN); None when none."""
        return self.addresses[0] if self.addresses else None

    def gateways(self):
        """``(Family, address)`` of each LAN address, IPv4 first."""
        return tuple((family.of(address), address) for address in self.addresses)


@dataclass(frozen=True)
class RelaySpec:
    """What a relay needs to answer each connection through the gateway it came by."""

    lan_networks: Tuple[str, ...]
    mark_mask: int
    proxies: Tuple[Proxy, ...]


@dataclass(frozen=True)
class ProxySpec:
    """What a transparent HAProxy box needs to divert its own sockets' replies."""

    divert_mark: int
    divert_table: int
    divert_priority: int
    mark_mask: int
    # The families of the proxy's VIPs: the divert is set up in each.
    families: Tuple[int, ...] = (4,)


@dataclass
class _Errors:
    """Input errors collected as they are found, each naming its pillar key path."""

    prefix: str = ""
    items: List[str] = field(default_factory=list)

    def add(self, path, value, problem):
        self.items.append(f"{self.path(path)}: {problem} (got {value!r})")

    def path(self, path):
        path = str(path).strip(":")
        return ":".join(part for part in (self.prefix, path) if part)

    def raise_if_any(self):
        if self.items:
            raise InputError(self.items)


def _is_bool(value):
    return isinstance(value, bool)


def to_int(value, errors, path, minimum=0, maximum=U32, what="an integer"):
    """
    Read an integer given as int, decimal or ``0x`` hex string; None when invalid.
    """
    number = None
    if isinstance(value, int) and not _is_bool(value):
        number = value
    elif isinstance(value, str) and value.strip():
        try:
            number = int(value.strip(), 0)
        except ValueError:
            number = None
    if number is None:
        errors.add(path, value, f"must be {what}")
        return None
    if not minimum <= number <= maximum:
        errors.add(path, value, f"must be between {minimum} and {maximum}")
        return None
    return number


def to_address(value, errors, path):
    """Read a single IPv4 or IPv6 address, normalised; None when invalid."""
    if not isinstance(value, str):
        errors.add(path, value, "must be an IPv4 or IPv6 address as a string")
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        errors.add(path, value, "is not a valid IPv4 or IPv6 address")
        return None


def to_addresses(value, errors, path):
    """
    Read one address, or a list of at most one address per family (a host on
    a dual-stack LAN): a tuple, IPv4 first; () when invalid (errors added).
    Each bad item is named by its index (``address:1``).
    """
    if isinstance(value, str):
        address = to_address(value, errors, path)
        return (address,) if address else ()
    if not isinstance(value, (list, tuple)) or not value:
        errors.add(
            path,
            value,
            "must be an address, or a list of one IPv4 and one IPv6 address",
        )
        return ()
    found = {}
    ok = True
    for index, item in enumerate(value):
        address = to_address(item, errors, f"{path}:{index}")
        if address is None:
            ok = False
            continue
        version = ipaddress.ip_address(address).version
        if version in found:
            errors.add(
                f"{path}:{index}",
                item,
                f"is a second IPv{version} address (also {found[version]}); "
                "give one address per family",
            )
            ok = False
            continue
        found[version] = address
    if not ok:
        return ()
    return tuple(found[version] for version in sorted(found))


def gateway_problem(address):
    """Why ``address`` cannot be a next hop in a policy table, or None."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.is_link_local:
        return (
            "is a link-local address: give the global (or unique-local) address on the LAN; "
            "a link-local next hop needs an interface, and each node of an HA pair has its own"
        )
    if ip.version == 6 and ip.ipv4_mapped:
        return f"is an IPv4-mapped IPv6 address; give the IPv4 address {ip.ipv4_mapped}"
    return None


def check_gateways(addresses, raw, errors, path):
    """Drop (and report) addresses that cannot be a next hop; keep the others."""
    kept = []
    for address in addresses:
        why = gateway_problem(address)
        if why is None:
            kept.append(address)
        else:
            errors.add(*where(path, raw, address), why)
    return tuple(kept)


def where(path, raw, address):
    """The key path and raw value of ``address`` within a one-or-list pillar value."""
    if not isinstance(raw, (list, tuple)):
        return path, raw
    for index, item in enumerate(raw):
        if to_address(item, _Errors(), "") == address:
            return f"{path}:{index}", item
    return path, raw


def plain(addresses):
    """The pillar form of a tuple of addresses: a string for one, a list for two."""
    return addresses[0] if len(addresses) == 1 else list(addresses)


def to_network(value, errors, path):
    """Read an IPv4 or IPv6 network in CIDR form, host bits clear; None when invalid."""
    example = "e.g. 192.0.2.0/24 or 2001:db8:2::/64"
    if not isinstance(value, str):
        errors.add(path, value, f"must be a network in CIDR form, {example}")
        return None
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as err:
        hint = str(err)
        if "host bits" in hint:
            errors.add(path, value, "has host bits set; give the network address")
        else:
            errors.add(path, value, f"is not a valid network in CIDR form, {example}")
        return None


def to_mac(value, errors, path):
    """Read a unicast Ethernet MAC address, normalised to lower case; None when invalid."""
    if not isinstance(value, str) or not _MAC_RE.match(value.strip().lower()):
        errors.add(path, value, "is not a MAC address like 02:00:c0:00:02:02")
        return None
    mac = value.strip().lower()
    if int(mac[:2], 16) & 1:
        errors.add(path, value, "is a multicast MAC address; a gateway's MAC is unicast")
        return None
    if mac == "00:00:00:00:00:00":
        errors.add(path, value, "is the all-zero MAC address")
        return None
    return mac


def to_mask(value, errors, path):
    """Read a non-zero 32-bit mark mask."""
    return to_int(value, errors, path, minimum=1, what="a 32-bit mask such as 0xff")


def check_mark(mark, mask, errors, path, raw):
    """A mark is non-zero and lies within relayroute's bits of the packet mark."""
    if mark is None:
        return
    if mark == 0:
        errors.add(path, raw, "must not be 0: 0 means 'not marked'")
    elif mask is not None and mark & ~mask & U32:
        errors.add(path, raw, f"has bits outside mark_mask {mask:#x}")


def check_table(table, errors, path, raw):
    """A routing table id is not one of the kernel's reserved tables."""
    if table in RESERVED_TABLES:
        errors.add(path, raw, f"is the kernel's reserved '{RESERVED_TABLES[table]}' table")


def check_priority(priority, errors, path, raw):
    """A rule priority is not one of the kernel's default rules."""
    if priority in RESERVED_PRIORITIES:
        errors.add(
            path, raw, f"is the priority of the kernel's '{RESERVED_PRIORITIES[priority]}' rule"
        )


def _proxy_items(proxies, errors, path):
    """Proxies come as a mapping keyed by name, or as a list of mappings with 'name'."""
    if isinstance(proxies, dict):
        items = []
        for name, body in proxies.items():
            if not isinstance(body, dict):
                errors.add(f"{path}:{name}", body, "must be a mapping")
                continue
            items.append((str(name), body))
        return items
    if isinstance(proxies, (list, tuple)):
        items = []
        for index, body in enumerate(proxies):
            if not isinstance(body, dict):
                errors.add(f"{path}:{index}", body, "must be a mapping")
                continue
            name = body.get("name")
            if not isinstance(name, str) or not name:
                errors.add(f"{path}:{index}:name", name, "every proxy needs a name")
                continue
            items.append((name, body))
        return items
    errors.add(path, proxies, "must be a mapping of proxies keyed by name")
    return []


def _unique(items, attribute, errors, path_of):
    seen = {}
    for item in items:
        value = getattr(item, attribute)
        if value is None:
            continue
        if value in seen:
            errors.add(
                path_of(item, attribute),
                value,
                f"is also the {attribute} of proxy {seen[value]!r}; each proxy needs its own",
            )
        else:
            seen[value] = item.name


def _unique_addresses(parsed, errors):
    """A LAN address is one proxy's: the same address under two proxies is refused."""
    seen = {}
    for proxy in parsed:
        for index, address in enumerate(proxy.addresses):
            path = f"proxies:{proxy.name}:address"
            if len(proxy.addresses) > 1:
                path += f":{index}"
            if address in seen:
                errors.add(
                    path,
                    address,
                    f"is also the address of proxy {seen[address]!r}; each proxy needs its own",
                )
            else:
                seen[address] = proxy.name


def _proxy_macs(body, errors, base):
    """
    A proxy's MACs: ``mac`` (one) and ``macs`` (a list), both optional; their
    union, ``mac`` first, each once. A MAC repeated within ``macs`` is refused
    as the typo it is; ``mac`` repeated in ``macs`` counts once.
    """
    macs = []
    if body.get("mac") not in (None, ""):
        mac = to_mac(body["mac"], errors, f"{base}:mac")
        if mac:
            macs.append(mac)
    raw = body.get("macs")
    if raw is None:
        return tuple(macs)
    if not isinstance(raw, (list, tuple)) or not raw:
        errors.add(f"{base}:macs", raw, "must be a non-empty list of MAC addresses")
        return tuple(macs)
    seen = {}
    for index, value in enumerate(raw):
        mac = to_mac(value, errors, f"{base}:macs:{index}")
        if mac is None:
            continue
        if mac in seen:
            errors.add(f"{base}:macs:{index}", value, f"is listed twice (also macs:{seen[mac]})")
            continue
        seen[mac] = index
        if mac not in macs:
            macs.append(mac)
    return tuple(macs)


def _mac_paths(name, body):
    """``(key path, raw value, normalised MAC)`` of each MAC a proxy's entry gives."""
    found = []
    if isinstance(body.get("mac"), str):
        found.append((f"proxies:{name}:mac", body["mac"], body["mac"].strip().lower()))
    if isinstance(body.get("macs"), (list, tuple)):
        for index, value in enumerate(body["macs"]):
            if isinstance(value, str):
                found.append((f"proxies:{name}:macs:{index}", value, value.strip().lower()))
    return found


def _unique_macs(parsed, items, errors):
    """A MAC marks for one proxy only: the same MAC under two proxies is refused."""
    owner = {}
    bodies = dict(items)
    for proxy in parsed:
        for path, raw, mac in _mac_paths(proxy.name, bodies.get(proxy.name, {})):
            if mac not in proxy.macs:
                continue  # invalid: reported already
            other = owner.setdefault(mac, proxy.name)
            if other != proxy.name:
                errors.add(
                    path, raw, f"is also the mac of proxy {other!r}; each proxy needs its own"
                )


PROXY_KEYS = {"name", "address", "mac", "macs", "mark", "table", "priority"}
RELAY_KEYS = {"lan_networks", "mark_mask", "proxies"}


def relay_spec(lan_networks, mark_mask, proxies, prefix=""):
    """
    Validate a relay's inputs and return a :class:`RelaySpec`.

    ``proxies`` is a mapping keyed by proxy name (or a list of mappings with
    ``name``), each with ``address``, ``mark``, ``table``, ``priority`` and
    optional ``mac`` and ``macs`` (all of them marked with the proxy's mark;
    neither: looked up by ARP at apply). Raises :class:`InputError` naming every bad key and value.
    """
    errors = _Errors(prefix)
    nets = []
    if not isinstance(lan_networks, (list, tuple)) or not lan_networks:
        errors.add("lan_networks", lan_networks, "must be a non-empty list of networks")
    else:
        for index, net in enumerate(lan_networks):
            norm = to_network(net, errors, f"lan_networks:{index}")
            if norm is not None and norm.endswith("/0"):
                # '-s 0.0.0.0/0 -j RETURN' would come before every mark rule.
                errors.add(
                    f"lan_networks:{index}",
                    net,
                    "covers every address: every client would count as the relays' own "
                    "and no connection would be marked",
                )
            elif norm is not None and norm not in nets:
                nets.append(norm)
    mask = to_mask(mark_mask, errors, "mark_mask")

    parsed = []
    items = _proxy_items(proxies, errors, "proxies")
    if not items and isinstance(proxies, (dict, list, tuple)) and not errors.items:
        errors.add("proxies", proxies, "must list at least one proxy")
    for name, body in items:
        base = f"proxies:{name}"
        for key in sorted(set(body) - PROXY_KEYS):
            errors.add(f"{base}:{key}", body[key], f"is not a known key ({sorted(PROXY_KEYS)})")
        for key in ("address", "mark", "table", "priority"):
            if key not in body:
                errors.add(f"{base}:{key}", None, "is required")
        addresses = ()
        if "address" in body:
            addresses = to_addresses(body["address"], errors, f"{base}:address")
            addresses = check_gateways(addresses, body["address"], errors, f"{base}:address")
        macs = _proxy_macs(body, errors, base)
        mark = table = priority = None
        if "mark" in body:
            mark = to_int(body["mark"], errors, f"{base}:mark", what="an integer mark")
            check_mark(mark, mask, errors, f"{base}:mark", body["mark"])
        if "table" in body:
            table = to_int(body["table"], errors, f"{base}:table", what="a routing table id")
            check_table(table, errors, f"{base}:table", body["table"])
        if "priority" in body:
            priority = to_int(
                body["priority"], errors, f"{base}:priority", maximum=32767, what="a rule priority"
            )
            check_priority(priority, errors, f"{base}:priority", body["priority"])
        parsed.append(Proxy(name, addresses, mark, table, priority, macs=macs))

    def path_of(item, attribute):
        return f"proxies:{item.name}:{attribute}"

    for attribute in ("mark", "table", "priority"):
        _unique(parsed, attribute, errors, path_of)
    _unique_addresses(parsed, errors)
    _unique_macs(parsed, items, errors)
    errors.raise_if_any()
    return RelaySpec(tuple(nets), mask, tuple(sorted(parsed, key=lambda p: p.priority)))


def lowest_mark(mask):
    """The smallest non-zero mark within ``mask``: its lowest set bit (0x10 for 0xf0)."""
    return mask & -mask


def proxy_spec(
    divert_mark=None,
    divert_table=100,
    divert_priority=100,
    mark_mask=0xFF,
    prefix="",
    families=(4,),
):
    """
    Validate a proxy box's TPROXY inputs and return a :class:`ProxySpec`.

    ``divert_mark`` defaults to the lowest bit of ``mark_mask`` (1 for 0xff,
    0x10 for 0xf0), so the default is valid for every valid mask. ``families``:
    the address families (4, 6) of the proxy's VIPs; the divert is made in each.
    """
    errors = _Errors(prefix)
    mask = to_mask(mark_mask, errors, "mark_mask")
    if divert_mark is None:
        mark = lowest_mark(mask) if mask else None
    else:
        mark = to_int(divert_mark, errors, "divert_mark", what="an integer mark")
        check_mark(mark, mask, errors, "divert_mark", divert_mark)
    table = to_int(divert_table, errors, "divert_table", what="a routing table id")
    check_table(table, errors, "divert_table", divert_table)
    priority = to_int(
        divert_priority, errors, "divert_priority", maximum=32767, what="a rule priority"
    )
    check_priority(priority, errors, "divert_priority", divert_priority)
    versions = tuple(sorted(set(families or ())))
    if not versions or any(v not in family.BY_VERSION for v in versions):
        errors.add("families", families, "must list address families 4 and/or 6")
    errors.raise_if_any()
    return ProxySpec(mark, table, priority, mask, versions)


@dataclass(frozen=True)
class PolicyRouteSpec:
    """One policy route: ``default via gateway table T`` and ``fwmark M/MASK lookup T``."""

    table: int
    gateway: str
    fwmark: int
    fwmask: int
    priority: int


def policy_route_spec(table, gateway, fwmark, fwmask=U32, priority=None, prefix=""):
    """Validate a single policy route's inputs."""
    errors = _Errors(prefix)
    number = to_int(table, errors, "table", what="a routing table id")
    check_table(number, errors, "table", table)
    address = to_address(gateway, errors, "gateway")
    if address is not None and gateway_problem(address):
        errors.add("gateway", gateway, gateway_problem(address))
    mask = to_mask(fwmask, errors, "fwmask")
    mark = to_int(fwmark, errors, "fwmark", what="an integer mark")
    check_mark(mark, mask, errors, "fwmark", fwmark)
    if priority is None:
        errors.add("priority", priority, "is required: give the rule an explicit priority")
        rule_priority = None
    else:
        rule_priority = to_int(priority, errors, "priority", maximum=32767, what="a rule priority")
        check_priority(rule_priority, errors, "priority", priority)
    errors.raise_if_any()
    return PolicyRouteSpec(number, address, mark, mask, rule_priority)
