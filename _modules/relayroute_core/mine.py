"""
The fleet as the Salt mine knows it: what each minion publishes for
relayroute, and how a topology takes it.

Every relayroute minion publishes one record (``relayroute.mine_record``,
under the mine alias :data:`ALIAS`): its roles, when it was made, and each
global unicast address it holds with the interface and that interface's MAC.
Then the pillar may leave out

- (``mine:enabled``) a proxy's ``mac``/``macs``: relays take the MACs of the proxy's minion
  (``nodes`` for an HA pair, else the minion holding the proxy's address)
  on the interface in the proxy's LAN; without a fresh record, the neighbour
  table as before;
- HAProxy's backends (``relays``): with ``relays_from_mine`` (``true``, or a
  list of minion-id globs), each relay-role minion with a fresh record and an
  address in ``lan_networks`` is added under its minion id.

What the pillar says always wins: a proxy with ``mac``/``macs`` keeps them,
a relay listed in ``relays`` keeps its entry (with ``mine:enabled``, one
without ``address`` takes the mine's), and no relay is added without
``relays_from_mine``, so a relay is drained by pillar alone (leave it out of
the globs, or set the key false).

Stale data: a record older than ``mine:max_age`` seconds (default
:data:`MAX_AGE`, two of Salt's default ``mine_interval`` of 60 minutes) is
ignored and named in the notes; a minion that is gone stops being a backend,
or a MAC source, that long after its last update. A minion publishes at start
and every ``mine_interval``, and the formula runs ``mine.update`` when
relayroute changed something on it (a new relay is published by its first
highstate). Records carry the publisher's clock: keep clocks in sync (NTP).

Pure: no Salt, no kernel. :func:`record` builds a record from netlink data,
:func:`merge` applies records to a pillar ``relayroute`` mapping.
"""

import fnmatch
import ipaddress
import time

ALIAS = "relayroute"
FUNCTION = "relayroute.mine_record"
MAX_AGE = 7200
VERSION = 1
SETTINGS = {"enabled", "max_age"}


def record(addresses, roles, now=None):
    """
    The record a minion publishes. ``addresses``: ``[(address, prefixlen,
    dev, mac)]`` of the host; only global unicast ones are kept (no
    loopback, link-local, multicast or unspecified address).

    >>> record([("192.0.2.2", 24, "eth0", "02:00:00:00:00:02")], ["proxy"], now=1)["addresses"]
    [{'address': '192.0.2.2', 'prefixlen': 24, 'dev': 'eth0', 'mac': '02:00:00:00:00:02'}]
    """
    kept = []
    for address, prefixlen, dev, mac in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        kept.append(
            {
                "address": str(ip),
                "prefixlen": int(prefixlen),
                "dev": dev,
                "mac": (mac or "").lower(),
            }
        )
    kept.sort(key=lambda item: (ipaddress.ip_address(item["address"]).version, item["address"]))
    if isinstance(roles, str):
        roles = [roles]
    return {
        "version": VERSION,
        "published": float(time.time() if now is None else now),
        "roles": sorted(str(role) for role in roles or ()),
        "addresses": kept,
    }


def taken(note):
    """Whether a note of :func:`merge` says what was taken from the mine (not a warning)."""
    return note.endswith(("from the mine", "added from the mine"))


def unpublished():
    """The error for a topology that reads the mine while no minion publishes to it."""
    return (
        f"mine_functions:{ALIAS}: is not set, but relayroute:mine:enabled or "
        "relayroute:relays_from_mine reads the mine: without it no minion refreshes its "
        "record, and every record goes stale (set mine_functions: {relayroute: "
        "{mine_function: relayroute.mine_record}} in the pillar) (got None)"
    )


def settings(config):
    """``(enabled, max_age)`` from ``config["mine"]`` (validated by the topology)."""
    values = config.get("mine") if isinstance(config, dict) else None
    values = values if isinstance(values, dict) else {}
    max_age = values.get("max_age", MAX_AGE)
    if isinstance(max_age, bool) or not isinstance(max_age, (int, float)):
        max_age = MAX_AGE
    return bool(values.get("enabled", False)), max_age


def wanted(config):
    """Whether the topology reads the mine (``mine:enabled`` or ``relays_from_mine``)."""
    if not isinstance(config, dict):
        return False
    enabled, _age = settings(config)
    return enabled or bool(config.get("relays_from_mine"))


def fresh(records, now, max_age):
    """``(records that are usable, notes on those that are not)``."""
    usable, notes = {}, []
    for minion in sorted(records or {}, key=str):
        item = records[minion]
        if not isinstance(item, dict) or item.get("version") != VERSION:
            notes.append(f"mine: {minion}'s record is not a relayroute record: ignored")
            continue
        published = item.get("published")
        if isinstance(published, bool) or not isinstance(published, (int, float)):
            notes.append(f"mine: {minion}'s record has no time: ignored")
            continue
        age = now - published
        if age > max_age:
            notes.append(
                f"mine: {minion}'s record is {age:.0f} s old (mine:max_age {max_age}): ignored"
            )
            continue
        usable[str(minion)] = item
    return usable, notes


def _networks(lan_networks):
    found = []
    for net in lan_networks or ():
        try:
            found.append(ipaddress.ip_network(str(net), strict=False))
        except ValueError:
            continue
    return found


def _addresses(value):
    items = value if isinstance(value, (list, tuple)) else [value]
    found = []
    for item in items:
        try:
            found.append(ipaddress.ip_address(str(item)))
        except ValueError:
            continue
    return found


def _in(address, networks):
    return any(address.version == net.version and address in net for net in networks)


def _lan_entries(item, networks):
    """The record's addresses in one of ``networks`` (parsed)."""
    found = []
    for entry in item.get("addresses") or ():
        try:
            ip = ipaddress.ip_address(entry["address"])
        except (KeyError, TypeError, ValueError):
            continue
        if _in(ip, networks):
            found.append((ip, entry))
    return found


def proxy_macs(entry, records, networks):
    """
    The MACs a proxy entry's minions publish on the proxy's LAN, or ``[]``:
    its ``nodes`` (an HA pair: every node's MAC, as ``macs`` lists them),
    else the minions holding one of its addresses.
    """
    own = _addresses(entry.get("address"))
    lans = [net for net in networks if any(_in(ip, [net]) for ip in own)]
    nodes = entry.get("nodes")
    if isinstance(nodes, (list, tuple)) and nodes:
        minions = [str(node) for node in nodes if str(node) in records]
    else:
        minions = [
            minion
            for minion, item in records.items()
            if any(ip in own for ip, _e in _lan_entries(item, networks))
        ]
    macs = set()
    for minion in minions:
        for _ip, lan_entry in _lan_entries(records[minion], lans):
            if lan_entry.get("mac"):
                macs.add(lan_entry["mac"])
    return sorted(macs)


def _allowed(minion, allow):
    if allow is True:
        return True
    if isinstance(allow, (list, tuple)):
        return any(fnmatch.fnmatchcase(minion, str(glob)) for glob in allow)
    return False


def _relay_address(item, networks):
    """One address per family from the record's LAN addresses (IPv4 first), or None."""
    chosen = {}
    for ip, _entry in _lan_entries(item, networks):
        chosen.setdefault(ip.version, str(ip))
    if not chosen:
        return None
    values = [chosen[version] for version in sorted(chosen)]
    return values[0] if len(values) == 1 else values


def merge(config, records, now=None):
    """
    ``(config, notes)``: ``config`` (a pillar ``relayroute`` mapping, not
    changed) with what the mine adds, and a note for each thing taken from
    the mine or ignored. Nothing is added where the pillar says it.
    """
    if not isinstance(config, dict) or not wanted(config):
        return config, []
    now = time.time() if now is None else now
    enabled, max_age = settings(config)
    usable, notes = fresh(records, now, max_age)
    networks = _networks(config.get("lan_networks"))
    merged = dict(config)

    proxies = config.get("proxies")
    if enabled and isinstance(proxies, dict):
        merged["proxies"] = dict(proxies)
        for name, entry in proxies.items():
            if not isinstance(entry, dict) or "mac" in entry or "macs" in entry:
                continue
            macs = proxy_macs(entry, usable, networks)
            if macs:
                merged["proxies"][name] = {**entry, "macs": macs}
                notes.append(f"mine: proxies:{name}:macs {macs} from the mine")

    allow = config.get("relays_from_mine", False)
    relays = config.get("relays")
    relays = dict(relays) if isinstance(relays, dict) else ({} if relays is None else relays)
    if isinstance(relays, dict):
        listed = {
            ip
            for entry in relays.values()
            if isinstance(entry, dict)
            for ip in _addresses(entry.get("address"))
        }
        for name, entry in list(relays.items()):
            if not enabled or not isinstance(entry, dict) or "address" in entry:
                continue
            if str(name) in usable:
                address = _relay_address(usable[str(name)], networks)
                if address is not None:
                    relays[name] = {**entry, "address": address}
                    notes.append(f"mine: relays:{name}:address {address} from the mine")
        for minion, item in usable.items():
            if minion in relays or "relay" not in item.get("roles", ()):
                continue
            if not _allowed(minion, allow):
                continue
            address = _relay_address(item, networks)
            if address is None:
                notes.append(f"mine: relay {minion} has no address in lan_networks: not added")
                continue
            if any(ip in listed for ip in _addresses(address)):
                notes.append(f"mine: relay {minion}'s address {address} is listed in relays: kept")
                continue
            relays[minion] = {"address": address}
            notes.append(f"mine: relays:{minion} {address} added from the mine")
        if relays or "relays" in config:
            merged["relays"] = relays
    return merged, notes
