"""
The pillar topology as a whole: one description of every proxy and relay,
validated before any state runs, and the arguments each role's states take.

Pure: no kernel, no Salt. Errors name the pillar key path (``relayroute:...``)
and the value.
"""

import difflib
import ipaddress
import re

from . import iptables, model, nftables
from . import persist as persist_mechanisms

SYSCTL_KEY = re.compile(r"[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+")
# Removed from Linux 4.12; setting it fails there and breaks NAT'd clients before.
FORBIDDEN_SYSCTLS = {
    "net.ipv4.tcp_tw_recycle": "was removed from Linux 4.12 and must never be set; "
    "use net.ipv4.tcp_tw_reuse if you need TIME-WAIT reuse",
}
# Packet-filter backends the engine has (engine.BACKENDS; engine itself needs pyroute2).
BACKENDS = (iptables.NAME, nftables.NAME)
# Values written into configuration files (sysctl drop-in, haproxy.cfg): one line each.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
INT32 = 2**31 - 1
TOP_KEYS = {
    "lan_networks",
    "mark_mask",
    "ports",
    "priority_base",
    "proxies",
    "relays",
    "proxy",
    "relay",
    "backend",
    "lookup",
    "persist",
    "watch",
    "mine",
    "relays_from_mine",
    "probe",
}
MINE_KEYS = {"enabled", "max_age"}
WATCH_KEYS = {"enabled", "debounce", "shell"}
PROXY_ENTRY_KEYS = {"address", "mac", "macs", "mark", "table", "priority", "vip", "nodes"}
RELAY_ENTRY_KEYS = {"address", "ports"}
PROXY_ROLE_KEYS = {
    "mark_mask",
    "divert_mark",
    "divert_table",
    "divert_priority",
    "sysctls",
    "sysctl_config",
    "sysctl_saved",
    "haproxy",
}
HAPROXY_KEYS = {
    "pkg",
    "manage_pkg",
    "service",
    "manage_service",
    "config",
    "binary",
    "chroot",
    "stats_socket",
    "log",
    "maxconn",
    "balance",
    "timeouts",
    "check",
    "privileges",
    "user",
    "group",
    "runtime_directory",
    "unit_environment",
}
# How HAProxy gets CAP_NET_ADMIN and CAP_NET_BIND_SERVICE (README, "HAProxy without root").
HAPROXY_PRIVILEGES = ("unprivileged", "root")
# A unit's environment variable; a directory name under /run (RuntimeDirectory=).
UNIT_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")
RUNTIME_DIRECTORY = re.compile(r"[A-Za-z0-9_.@-]+(/[A-Za-z0-9_.@-]+)*")
HAPROXY_TIMEOUTS = {"connect", "client", "server", "check", "queue"}
HAPROXY_CHECK = {"inter", "fall", "rise"}


def _unknown(errors, path, mapping, known):
    for key in sorted(set(mapping) - known, key=str):
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" ({', '.join(sorted(known))})"
        errors.add(f"{path}:{key}", mapping[key], f"is not a known key{hint}")


def _ports(value, errors, path, allowed=None):
    """A non-empty list of TCP ports, each once, in order; within ``allowed`` when given."""
    if not isinstance(value, (list, tuple)) or not value:
        errors.add(path, value, "must be a non-empty list of TCP ports")
        return []
    ports = []
    first = {}  # port number: index of its first item
    for index, port in enumerate(value):
        number = model.to_int(port, errors, f"{path}:{index}", 1, 65535, "a TCP port")
        if number is None:
            continue
        if allowed is not None and number not in allowed:
            errors.add(f"{path}:{index}", port, f"is not one of ports {allowed}")
        elif number in first:
            # One frontend per port: a repeated port is a typo, not a wish.
            errors.add(f"{path}:{index}", port, f"repeats port {number} (item {first[number]})")
        else:
            first[number] = index
            ports.append(number)
    return ports


def _settings(values, errors, path, what, known):
    """A mapping of settings with only ``known`` keys; None when absent or not a mapping."""
    if values is None:
        return None
    if not isinstance(values, dict):
        errors.add(path, values, f"must be a mapping of {what}")
        return None
    _unknown(errors, path, values, known)
    return values


def _booleans(values, keys, errors, path):
    for key in keys:
        if key in values and not isinstance(values[key], bool):
            errors.add(f"{path}:{key}", values[key], "must be true or false")


def _mapping(value, errors, path, what):
    if not isinstance(value, dict) or not value:
        errors.add(path, value, f"must be a non-empty mapping of {what} keyed by minion id")
        return {}
    return value


def _line(value, errors, path, what="a string"):
    """A string written into a configuration file: one line, no control characters."""
    if not isinstance(value, str):
        errors.add(path, value, f"must be {what}")
        return None
    if CONTROL.search(value):
        errors.add(path, value, "must be a single line without control characters")
        return None
    return value


def _word(value, errors, path, what="a non-empty string"):
    text = _line(value, errors, path, what)
    if text is not None and not text.strip():
        errors.add(path, value, f"must be {what}")
        return None
    return text


def _absolute_path(value, errors, path, optional=False):
    """An absolute file path; with ``optional``, also '' or None (the feature is off)."""
    if optional and value in (None, ""):
        return value
    text = _line(value, errors, path, "an absolute path")
    if text is not None and not text.startswith("/"):
        errors.add(path, value, "must be an absolute path")
        return None
    return text


def _not_unicast(address):
    """Why ``address`` (a valid IPv4 or IPv6 address) is no host's unicast address, or None."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_multicast:
        return "a multicast address"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return "the limited broadcast address"
    if ip.version == 4 and ip.is_reserved:
        return "a reserved (240.0.0.0/4) address"
    if ip.version == 6 and ip.is_link_local:
        return "a link-local address (valid on one link only)"
    return None


def _host_addresses(value, errors, path, gateway=False):
    """
    A host's unicast addresses, one or one per family (IPv4 first), normalised;
    () when invalid (errors added). With ``gateway``, also refused: what cannot
    be a next hop (an IPv6 link-local address, an IPv4-mapped one).
    """
    addresses = model.to_addresses(value, errors, path)
    if gateway:
        addresses = model.check_gateways(addresses, value, errors, path)
    kept = []
    for address in addresses:
        why = _not_unicast(address)
        if why:
            where, raw = model.where(path, value, address)
            errors.add(where, raw, f"is {why}, not a host's unicast address")
        else:
            kept.append(address)
    return tuple(kept) if len(kept) == len(addresses) else ()


def _version(address):
    return ipaddress.ip_address(address).version


def _quiet(check, value):
    """``check(value)`` without reporting: for values whose errors another check reports."""
    return check(value, model._Errors(), "")


def _on_lan(address, lan, errors, path, raw, outside):
    """
    ``address`` lies on one of the ``lan`` networks of its family and is
    neither the network's own address (IPv6: the subnet-router anycast
    address) nor its broadcast address.
    """
    ip = ipaddress.ip_address(address)
    same = [net for net in lan if net.version == ip.version]
    nets = [net for net in same if ip in net]
    if not same:
        errors.add(
            path,
            raw,
            f"is an IPv{ip.version} address, and lan_networks has no IPv{ip.version} network",
        )
    elif not nets:
        errors.add(path, raw, outside)
    full = 30 if ip.version == 4 else 126
    for net in nets:
        if net.prefixlen <= full and ip == net.network_address:
            what = "network address" if ip.version == 4 else "subnet-router anycast address"
            errors.add(path, raw, f"is the {what} of {net}")
        elif ip.version == 4 and net.prefixlen <= full and ip == net.broadcast_address:
            errors.add(path, raw, f"is the broadcast address of {net}")


def _time(value, errors, path):
    """An HAProxy time: milliseconds as an integer or a string such as 5s (haproxy -c checks it)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            errors.add(path, value, "must not be negative")
        return
    _word(value, errors, path, "a time such as 5s")


def haproxy(values, errors, path):
    """Validate HAProxy's settings: known keys, types; values are one line each."""
    values = _settings(values, errors, path, "HAProxy settings", HAPROXY_KEYS)
    if values is None:
        return
    _booleans(values, ("manage_pkg", "manage_service"), errors, path)
    for key in ("pkg", "service", "binary", "log", "balance"):
        if key in values:
            _word(values[key], errors, f"{path}:{key}")
    if "config" in values:
        _absolute_path(values["config"], errors, f"{path}:config")
    for key in ("chroot", "stats_socket"):
        if key in values:
            _absolute_path(values[key], errors, f"{path}:{key}", optional=True)
    if "maxconn" in values:
        model.to_int(
            values["maxconn"], errors, f"{path}:maxconn", 1, INT32, "a number of connections"
        )
    _haproxy_privileges(values, errors, path)
    for key, known in (("timeouts", HAPROXY_TIMEOUTS), ("check", HAPROXY_CHECK)):
        settings = values.get(key)
        if settings is None:
            continue
        if not isinstance(settings, dict):
            errors.add(f"{path}:{key}", settings, f"must be a mapping ({', '.join(sorted(known))})")
            continue
        _unknown(errors, f"{path}:{key}", settings, known)
        for name in sorted(set(settings) & known):
            where = f"{path}:{key}:{name}"
            if name in ("fall", "rise"):
                model.to_int(settings[name], errors, where, 1, INT32, "a number of checks")
            else:
                _time(settings[name], errors, where)


def _haproxy_privileges(values, errors, path):
    """``privileges`` and what the drop-in of mode ``unprivileged`` is written from."""
    if "privileges" in values and values["privileges"] not in HAPROXY_PRIVILEGES:
        errors.add(
            f"{path}:privileges",
            values["privileges"],
            f"must be one of {', '.join(HAPROXY_PRIVILEGES)}",
        )
    for key in ("user", "group"):
        name = _word(values[key], errors, f"{path}:{key}") if key in values else None
        if name is not None and not USER_NAME.fullmatch(name):
            errors.add(f"{path}:{key}", name, "must be a user or group name")
    if "runtime_directory" in values:
        name = values["runtime_directory"]
        if _word(name, errors, f"{path}:runtime_directory") is not None and (
            not RUNTIME_DIRECTORY.fullmatch(name) or ".." in name.split("/")
        ):
            errors.add(
                f"{path}:runtime_directory",
                name,
                "must be a directory name relative to /run, such as haproxy",
            )
    environment = values.get("unit_environment")
    if environment is None:
        environment = {}
    elif not isinstance(environment, dict):
        errors.add(
            f"{path}:unit_environment",
            environment,
            "must be a mapping of the unit's environment variables to values",
        )
        environment = {}
    for variable, value in environment.items():
        where = f"{path}:unit_environment:{variable}"
        if not isinstance(variable, str) or not UNIT_VARIABLE.fullmatch(variable):
            errors.add(where, variable, "is not an environment variable's name")
        elif _line(value, errors, where) is not None and set(value) & set('"\\$%'):
            # Written as Environment="NAME=VALUE": no quoting, escapes or expansion.
            errors.add(where, value, "must not contain '\"', '\\', '$' or '%'")
    if values.get("privileges") == "unprivileged":
        pidfile = environment.get("PIDFILE")
        if not isinstance(pidfile, str) or not pidfile.startswith(("/", "{run}/")):
            errors.add(
                f"{path}:unit_environment:PIDFILE",
                pidfile,
                "must be the pid file's absolute path ('{run}/...' for the runtime "
                "directory): the privileges check finds HAProxy by it",
            )


def sysctls(values, errors, path):
    """Validate the proxy's sysctls: dotted keys, one-line values, never tcp_tw_recycle."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        errors.add(path, values, "must be a mapping of sysctl key to value")
        return {}
    clean = {}
    for key, value in values.items():
        where = f"{path}:{key}"
        if key in FORBIDDEN_SYSCTLS:
            errors.add(where, value, FORBIDDEN_SYSCTLS[key])
        elif not isinstance(key, str) or not SYSCTL_KEY.fullmatch(key):
            errors.add(where, value, "is not a sysctl key such as net.ipv4.ip_forward")
        elif isinstance(value, bool) or not isinstance(value, (int, str)):
            errors.add(where, value, "must be an integer or a string")
        elif isinstance(value, str) and _word(value, errors, where) is None:
            continue
        else:
            clean[key] = value
    return clean


PERSIST_KEYS = {
    "enabled",
    "dir",
    "mechanism",
    "network_scripts_dir",
    "iptables_file",
    "sysctl_dir",
    "systemd_dir",
    "wanted_by",
}
PERSIST_PATHS = ("dir", "network_scripts_dir", "iptables_file", "sysctl_dir", "systemd_dir")
MECHANISMS = persist_mechanisms.MECHANISMS


def persist(values, errors, path):
    """
    Boot-time persistence: the mechanism (``unit`` or ``network-scripts``),
    where the restore scripts, memory, systemd units and distribution files go.
    """
    values = _settings(values, errors, path, "persistence settings", PERSIST_KEYS)
    if values is None:
        return
    _booleans(values, ("enabled",), errors, path)
    if "mechanism" in values and values["mechanism"] not in MECHANISMS:
        errors.add(f"{path}:mechanism", values["mechanism"], f"must be one of {list(MECHANISMS)}")
    for key in PERSIST_PATHS:
        if key in values:
            _absolute_path(values[key], errors, f"{path}:{key}")
    if "wanted_by" in values:
        target = _word(values["wanted_by"], errors, f"{path}:wanted_by", "a systemd target")
        if target is not None and not target.endswith(".target"):
            errors.add(f"{path}:wanted_by", values["wanted_by"], "must name a systemd .target")


def mine_settings(config, errors):
    """
    ``mine`` (``enabled``: proxies' MACs and relays' addresses the pillar
    omits come from the Salt mine; ``max_age``: seconds after which a record
    is ignored) and ``relays_from_mine`` (true, false, or a list of minion-id
    globs: relay-role minions of the mine added to HAProxy's backends).
    See :mod:`mine`.
    """
    values = _settings(config.get("mine"), errors, "mine", "mine settings", MINE_KEYS)
    if values is not None:
        _booleans(values, ("enabled",), errors, "mine")
        if "max_age" in values:
            age = values["max_age"]
            if isinstance(age, bool) or not isinstance(age, (int, float)) or age <= 0:
                errors.add("mine:max_age", age, "must be a number of seconds above 0")
    allow = config.get("relays_from_mine", False)
    if isinstance(allow, bool):
        return
    if not isinstance(allow, (list, tuple)) or not allow:
        errors.add(
            "relays_from_mine", allow, "must be true, false or a non-empty list of minion-id globs"
        )
        return
    for index, glob in enumerate(allow):
        if not isinstance(glob, str) or not glob.strip():
            errors.add(f"relays_from_mine:{index}", glob, "must be a minion-id glob")


def watch(values, errors, path):
    """
    The watcher that puts a role's routing back between applies: ``enabled``,
    ``debounce`` (seconds, written into the unit's command line) and ``shell``.
    """
    values = _settings(values, errors, path, "watcher settings", WATCH_KEYS)
    if values is None:
        return
    _booleans(values, ("enabled",), errors, path)
    if "debounce" in values:
        debounce = values["debounce"]
        if isinstance(debounce, bool) or not isinstance(debounce, (int, float)):
            errors.add(f"{path}:debounce", debounce, "must be a number of seconds")
        elif not 0 < debounce <= 10:
            errors.add(f"{path}:debounce", debounce, "must be above 0 and at most 10 seconds")
    if "shell" in values:
        _absolute_path(values["shell"], errors, f"{path}:shell")


def topology(config, minion_id=None):
    """
    Validate ``config`` (the merged ``relayroute`` pillar) and return
    ``{"errors": [...], "relay": {...}, "proxy": {...} or None,
    "unlisted_relay": str or None}``: the arguments of the relay states (same
    for every relay), of the proxy states for ``minion_id`` when it is one of
    the proxies, and the warning for a relay-role minion that
    ``relays`` does not list.
    """
    errors = model._Errors("relayroute")
    if not isinstance(config, dict):
        errors.add("", config, "must be a mapping")
        return {"errors": errors.items, "relay": None, "proxy": None, "unlisted_relay": None}
    _unknown(errors, "", config, TOP_KEYS)

    proxies = _mapping(config.get("proxies"), errors, "proxies", "proxies")
    if config.get("relays_from_mine") and not config.get("relays"):
        # Nothing listed and nothing fresh in the mine: a new fleet whose
        # minions have not published yet (they publish once relayroute is synced).
        errors.add(
            "relays",
            config.get("relays"),
            "has no relay: none in the pillar and no relay-role minion with a fresh record in "
            "the mine (relays_from_mine); on a new fleet run saltutil.sync_all and mine.update "
            "on every minion before the first highstate (README, 'The fleet from the mine')",
        )
        relays = {}
    else:
        relays = _mapping(config.get("relays"), errors, "relays", "relays")
    raw_ports = config.get("ports", [25, 587])
    ports = _ports(raw_ports, errors, "ports")
    base = model.to_int(config.get("priority_base", 1000), errors, "priority_base", 1, 32000)
    backend = config.get("backend", iptables.NAME)
    if backend not in BACKENDS:
        errors.add(
            "backend",
            backend,
            f"is not a packet-filter backend of relayroute ({', '.join(BACKENDS)})",
        )
    # The networks that are valid (relay_spec reports the others), for the checks below.
    lan_networks = config.get("lan_networks")
    lan = []
    if isinstance(lan_networks, (list, tuple)):
        for net in lan_networks:
            norm = _quiet(model.to_network, net)
            if norm is not None and not norm.endswith("/0"):
                lan.append(ipaddress.ip_network(norm))

    # Relays: one address each, on the LAN; their ports among the proxied ones.
    relay_addresses = {}  # normalised address: relay name
    relay_families = {}  # relay name: the families (4, 6) it has an address in
    relay_ports = {}
    for name, entry in relays.items():
        if name in proxies:
            errors.add(
                f"relays:{name}", entry, f"{name!r} is listed as a proxy too; a minion has one role"
            )
        if not isinstance(entry, dict):
            errors.add(f"relays:{name}", entry, "must be a mapping with the relay's address")
            continue
        _unknown(errors, f"relays:{name}", entry, RELAY_ENTRY_KEYS)
        if "ports" in entry:
            relay_ports[name] = _ports(
                entry["ports"], errors, f"relays:{name}:ports", ports or None
            )
        if "address" not in entry:
            errors.add(f"relays:{name}:address", None, "is required")
            continue
        path, value = f"relays:{name}:address", entry["address"]
        addresses = _host_addresses(value, errors, path)
        relay_families[name] = {_version(address) for address in addresses}
        for address in addresses:
            where, raw = model.where(path, value, address)
            if address in relay_addresses:
                errors.add(where, raw, f"is also relay {relay_addresses[address]!r}'s")
            else:
                relay_addresses[address] = name
            if lan:
                _on_lan(address, lan, errors, where, raw, "is not in any of lan_networks")
    if ports and relays and all(isinstance(entry, dict) for entry in relays.values()):
        served = {port for name in relays for port in relay_ports.get(name, ports)}
        for index, port in enumerate(raw_ports):
            number = model.to_int(port, model._Errors(), "", 1, 65535)
            if number is not None and number not in served:
                errors.add(
                    f"ports:{index}",
                    port,
                    "no relay serves this port: HAProxy's backend would have no server",
                )

    # Proxies: each proxy's rule priority defaults to priority_base + its rank by name.
    relay_proxies = {}
    vips = {}
    node_of = {}  # minion id of an HA pair's node: the proxy entry it runs
    for rank, name in enumerate(sorted(proxies, key=str)):
        entry = proxies[name]
        if not isinstance(entry, dict):
            errors.add(f"proxies:{name}", entry, "must be a mapping")
            continue
        _unknown(errors, f"proxies:{name}", entry, PROXY_ENTRY_KEYS)
        if "vip" not in entry:
            errors.add(f"proxies:{name}:vip", None, "is required: where clients connect")
        else:
            path = f"proxies:{name}:vip"
            vips[name] = _host_addresses(entry["vip"], errors, path)
            for vip in vips[name]:
                if vip in relay_addresses:
                    where, raw = model.where(path, entry["vip"], vip)
                    errors.add(
                        where,
                        raw,
                        f"is relay {relay_addresses[vip]!r}'s address, not one of the proxy's",
                    )
        _nodes(entry, name, proxies, relays, node_of, errors)
        body = {k: v for k, v in entry.items() if k in model.PROXY_KEYS}
        if "priority" not in body and base is not None:
            body["priority"] = base + rank
        relay_proxies[str(name)] = body
        # The LAN addresses; relay_spec reports what is no address at all.
        addresses = _quiet(model.to_addresses, entry.get("address"))
        for address in addresses:
            where, raw = model.where(f"proxies:{name}:address", entry["address"], address)
            if model.gateway_problem(address):
                continue  # relay_spec names it
            if address in relay_addresses:
                errors.add(where, raw, f"is relay {relay_addresses[address]!r}'s address")
            why = _not_unicast(address)
            if why:
                errors.add(where, raw, f"is {why}, not a host's unicast address")
            elif lan:
                _on_lan(
                    address,
                    lan,
                    errors,
                    where,
                    raw,
                    "is not in any of lan_networks: a proxy must be a neighbour of the relays",
                )
        _vip_families(name, entry, vips.get(name, ()), addresses, relays, relay_families, errors)

    spec = None
    try:
        spec = model.relay_spec(
            lan_networks, config.get("mark_mask", 0xFF), relay_proxies, "relayroute"
        )
    except model.InputError as err:
        # The proxies mapping as a whole is reported above (_mapping).
        errors.items += [
            e
            for e in err.errors
            if e not in errors.items and not e.startswith("relayroute:proxies: ")
        ]

    role = config.get("proxy")
    if role is None:
        role = {}
    proxy_args = None
    if not isinstance(role, dict):
        errors.add("proxy", role, "must be a mapping of proxy-role settings")
        role = {}
    _unknown(errors, "proxy", role, PROXY_ROLE_KEYS)
    # The proxy box has mark users of its own: its mask is proxy:mark_mask, by
    # default the relays' mark_mask, and its divert mark, unless written, the
    # lowest bit of that mask (a default valid for every valid mask).
    own_mask = "mark_mask" in role
    try:
        proxy_spec = model.proxy_spec(
            role.get("divert_mark"),
            role.get("divert_table", 100),
            role.get("divert_priority", 100),
            role["mark_mask"] if own_mask else config.get("mark_mask", 0xFF),
            "relayroute:proxy",
        )
    except model.InputError as err:
        # Without a mask of its own, relay_spec has reported a bad mark_mask already.
        errors.items += [
            e for e in err.errors if own_mask or not e.startswith("relayroute:proxy:mark_mask:")
        ]
        proxy_spec = None
    clean_sysctls = sysctls(role.get("sysctls"), errors, "proxy:sysctls")
    for key in ("sysctl_config", "sysctl_saved"):
        if key in role:
            _absolute_path(role[key], errors, f"proxy:{key}")
    haproxy(role.get("haproxy"), errors, "proxy:haproxy")
    persist(config.get("persist"), errors, "persist")
    mechanism = (
        (config.get("persist") or {}).get("mechanism")
        if isinstance(config.get("persist"), dict)
        else None
    )
    if backend == "nftables" and mechanism == "network-scripts":
        # CentOS 7's files restore iptables' rules (iptables.service); the
        # nftables table is restored by relayroute's boot unit.
        errors.add(
            "persist:mechanism",
            mechanism,
            "restores iptables' rules at boot, not the nftables backend's table "
            "(backend: nftables); use mechanism 'unit'",
        )
    watch(config.get("watch"), errors, "watch")
    mine_settings(config, errors)
    if "probe" in config:
        # The probe runner's settings (salt-run relayroute.probe); probe
        # imports this module, hence the import here.
        from . import probe as probing

        errors.items += probing.settings(config["probe"], ports or [25, 587])["errors"]

    if errors.items or spec is None or proxy_spec is None:
        return {"errors": errors.items, "relay": None, "proxy": None, "unlisted_relay": None}

    relay_args = {
        "lan_networks": list(spec.lan_networks),
        "mark_mask": spec.mark_mask,
        "proxies": {
            p.name: {
                k: v
                for k, v in (
                    ("address", model.plain(p.addresses)),
                    ("mac", p.mac),
                    # An HA pair's MACs, mac first; one MAC stays plain 'mac'.
                    ("macs", list(p.macs) if len(p.macs) > 1 else None),
                    ("mark", p.mark),
                    ("table", p.table),
                    ("priority", p.priority),
                )
                if v is not None
            }
            for p in spec.proxies
        },
    }
    entry_name = minion_id if minion_id in proxies else node_of.get(minion_id)
    if entry_name is not None:
        addresses = next(p.addresses for p in spec.proxies if p.name == str(entry_name))
        proxy_args = {
            "name": minion_id,
            "address": model.plain(addresses),
            "vip": model.plain(vips[entry_name]),
            # The divert is made in each family clients connect in.
            "families": sorted({_version(vip) for vip in vips[entry_name]}),
            "ports": ports,
            "divert_mark": proxy_spec.divert_mark,
            "divert_table": proxy_spec.divert_table,
            "divert_priority": proxy_spec.divert_priority,
            "mark_mask": proxy_spec.mark_mask,
            "sysctls": clean_sysctls,
            "relays": [
                {
                    "name": str(name),
                    "address": model.plain(_quiet(model.to_addresses, relays[name]["address"])),
                    "ports": relay_ports.get(name, ports),
                }
                for name in sorted(relays, key=str)
            ],
        }
    return {
        "errors": [],
        "relay": relay_args,
        "proxy": proxy_args,
        "unlisted_relay": None if entry_name is not None else unlisted_relay(minion_id, relays),
    }


def _vip_families(name, entry, vips, addresses, relays, relay_families, errors):
    """
    A VIP of a family needs the proxy's LAN address and relays' addresses of
    that family: HAProxy connects to a relay from the client's own address
    (``usesrc clientip``), so an IPv6 client can only be sent to an IPv6 relay.
    """
    own = {_version(address) for address in addresses}
    served = set().union(*relay_families.values()) if relay_families else set()
    for vip in vips:
        version = _version(vip)
        where, raw = model.where(f"proxies:{name}:vip", entry["vip"], vip)
        if addresses and version not in own:
            errors.add(
                where,
                raw,
                f"is an IPv{version} VIP, but proxy {name!r} has no IPv{version} address "
                f"(proxies:{name}:address): it reaches the relays over IPv{version}, "
                "from the client's own address",
            )
        if relay_families and version not in served:
            errors.add(
                where,
                raw,
                f"is an IPv{version} VIP, but no relay has an IPv{version} address "
                f"(relays:*:address): HAProxy's IPv{version} backends would have no server",
            )


def _nodes(entry, name, proxies, relays, node_of, errors):
    """
    ``nodes``: the minion ids of an HA pair's HAProxy boxes that run this
    proxy entry (the proxy role: TPROXY divert, HAProxy), when the entry's own
    name is no minion's. Each node runs one proxy entry and has no other role.
    """
    if "nodes" not in entry:
        return
    nodes, where = entry["nodes"], f"proxies:{name}:nodes"
    if not isinstance(nodes, (list, tuple)) or not nodes:
        errors.add(where, nodes, "must be a non-empty list of the HA pair's minion ids")
        return
    for index, node in enumerate(nodes):
        path = f"{where}:{index}"
        if not isinstance(node, str) or not node.strip():
            errors.add(path, node, "must be a minion id")
        elif node in relays:
            errors.add(path, node, "is listed as a relay too; a minion has one role")
        elif node in proxies and node != name:
            errors.add(path, node, f"is proxy {node!r}'s own entry; a minion runs one proxy")
        elif node in node_of:
            errors.add(path, node, f"is also a node of proxy {node_of[node]!r}")
        else:
            node_of[node] = str(name)


def unlisted_relay(minion_id, relays):
    """
    The warning for a relay-role minion that ``relays`` does not list, or None.

    It still gets reply routing (harmless: no connection of it arrives from a
    proxy's MAC, and a relay being brought up may get it before HAProxy
    sends it mail), but HAProxy has no server line for it: usually a
    mistyped minion id, or a relay not yet added to the pillar.
    """
    if minion_id is None or minion_id in relays:
        return None
    names = sorted(str(name) for name in relays)
    close = difflib.get_close_matches(str(minion_id), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"relayroute:relays: has no entry for this minion id {minion_id!r}: it gets reply "
        f"routing, but HAProxy sends it no mail (relays: {', '.join(names) or 'none'}){hint}"
    )
