"""
The pillar topology as a whole: one description of every proxy and relay,
validated before any state runs, and the arguments each role's states take.

Pure: no kernel, no Salt. Errors name the pillar key path (``relayroute:...``)
and the value.
"""

import ipaddress
import re

from . import model

SYSCTL_KEY = re.compile(r"^[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+$")
# Removed from Linux 4.12; setting it fails there and breaks NAT'd clients before.
FORBIDDEN_SYSCTLS = {
    "net.ipv4.tcp_tw_recycle": "was removed from Linux 4.12 and must never be set; "
    "use net.ipv4.tcp_tw_reuse if you need TIME-WAIT reuse",
}
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
}
PROXY_ENTRY_KEYS = {"address", "mac", "mark", "table", "priority", "vip"}
RELAY_ENTRY_KEYS = {"address", "ports"}
PROXY_ROLE_KEYS = {
    "divert_mark",
    "divert_table",
    "divert_priority",
    "sysctls",
    "sysctl_config",
    "sysctl_saved",
    "haproxy",
}


def _unknown(errors, path, mapping, known):
    for key in sorted(set(mapping) - known, key=str):
        errors.add(
            f"{path}:{key}", mapping[key], f"is not a known key ({', '.join(sorted(known))})"
        )


def _ports(value, errors, path):
    if not isinstance(value, (list, tuple)) or not value:
        errors.add(path, value, "must be a non-empty list of TCP ports")
        return []
    ports = []
    for index, port in enumerate(value):
        number = model.to_int(port, errors, f"{path}:{index}", 1, 65535, "a TCP port")
        if number is not None and number not in ports:
            ports.append(number)
    return ports


def _mapping(value, errors, path, what):
    if not isinstance(value, dict) or not value:
        errors.add(path, value, f"must be a non-empty mapping of {what} keyed by minion id")
        return {}
    return value


def sysctls(values, errors, path):
    """Validate the proxy's sysctls: dotted keys, scalar values, never tcp_tw_recycle."""
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
        elif not isinstance(key, str) or not SYSCTL_KEY.match(key):
            errors.add(where, value, "is not a sysctl key such as net.ipv4.ip_forward")
        elif isinstance(value, bool) or not isinstance(value, (int, str)):
            errors.add(where, value, "must be an integer or a string")
        else:
            clean[key] = value
    return clean


def topology(config, minion_id=None):
    """
    Validate ``config`` (the merged ``relayroute`` pillar) and return
    ``{"errors": [...], "relay": {...}, "proxy": {...} or None}``: the
    arguments of the relay states (same for every relay), and of the proxy
    states for ``minion_id`` when it is one of the proxies.
    """
    errors = model._Errors("relayroute")
    if not isinstance(config, dict):
        errors.add("", config, "must be a mapping")
        return {"errors": errors.items, "relay": None, "proxy": None}
    _unknown(errors, "", config, TOP_KEYS)

    proxies = _mapping(config.get("proxies"), errors, "proxies", "proxies")
    relays = _mapping(config.get("relays"), errors, "relays", "relays")
    ports = _ports(config.get("ports", [25, 587]), errors, "ports")
    base = model.to_int(config.get("priority_base", 1000), errors, "priority_base", 1, 32000)

    # Each proxy's rule priority defaults to priority_base + its rank by name.
    relay_proxies = {}
    for rank, name in enumerate(sorted(proxies, key=str)):
        entry = proxies[name]
        if not isinstance(entry, dict):
            errors.add(f"proxies:{name}", entry, "must be a mapping")
            continue
        _unknown(errors, f"proxies:{name}", entry, PROXY_ENTRY_KEYS)
        if "vip" not in entry:
            errors.add(f"proxies:{name}:vip", None, "is required: where clients connect")
        else:
            model.to_ipv4(entry["vip"], errors, f"proxies:{name}:vip")
        body = {k: v for k, v in entry.items() if k in model.PROXY_KEYS}
        if "priority" not in body and base is not None:
            body["priority"] = base + rank
        relay_proxies[str(name)] = body

    for name, entry in relays.items():
        if name in proxies:
            errors.add(
                f"relays:{name}", entry, f"{name!r} is listed as a proxy too; a minion has one role"
            )
        if not isinstance(entry, dict):
            errors.add(f"relays:{name}", entry, "must be a mapping with the relay's address")
            continue
        _unknown(errors, f"relays:{name}", entry, RELAY_ENTRY_KEYS)
        if "address" not in entry:
            errors.add(f"relays:{name}:address", None, "is required")
        else:
            model.to_ipv4(entry["address"], errors, f"relays:{name}:address")
        if "ports" in entry:
            _ports(entry["ports"], errors, f"relays:{name}:ports")

    spec = None
    try:
        spec = model.relay_spec(
            config.get("lan_networks"), config.get("mark_mask", 0xFF), relay_proxies, "relayroute"
        )
    except model.InputError as err:
        errors.items += [e for e in err.errors if e not in errors.items]

    relay_addresses = {}
    for name, entry in relays.items():
        address = entry.get("address") if isinstance(entry, dict) else None
        if address in relay_addresses:
            errors.add(
                f"relays:{name}:address", address, f"is also relay {relay_addresses[address]!r}'s"
            )
        elif address:
            relay_addresses[address] = name
        if (
            spec
            and address
            and _is_ipv4(address)
            and not any(
                ipaddress.IPv4Address(address) in ipaddress.IPv4Network(net)
                for net in spec.lan_networks
            )
        ):
            errors.add(f"relays:{name}:address", address, "is not in any of lan_networks")
    if spec:
        for proxy in spec.proxies:
            if proxy.address in relay_addresses:
                errors.add(
                    f"proxies:{proxy.name}:address",
                    proxy.address,
                    f"is relay {relay_addresses[proxy.address]!r}'s address",
                )
            if not any(
                ipaddress.IPv4Address(proxy.address) in ipaddress.IPv4Network(net)
                for net in spec.lan_networks
            ):
                errors.add(
                    f"proxies:{proxy.name}:address",
                    proxy.address,
                    "is not in any of lan_networks: a proxy must be a neighbour of the relays",
                )

    role = config.get("proxy") or {}
    proxy_args = None
    if not isinstance(role, dict):
        errors.add("proxy", role, "must be a mapping of proxy-role settings")
        role = {}
    _unknown(errors, "proxy", role, PROXY_ROLE_KEYS)
    try:
        proxy_spec = model.proxy_spec(
            role.get("divert_mark", 1),
            role.get("divert_table", 100),
            role.get("divert_priority", 100),
            config.get("mark_mask", 0xFF),
            "relayroute:proxy",
        )
    except model.InputError as err:
        errors.items += [e for e in err.errors if "mark_mask" not in e]
        proxy_spec = None
    clean_sysctls = sysctls(role.get("sysctls"), errors, "proxy:sysctls")

    if errors.items:
        return {"errors": errors.items, "relay": None, "proxy": None}

    relay_args = {
        "lan_networks": list(spec.lan_networks),
        "mark_mask": spec.mark_mask,
        "proxies": {
            p.name: {
                k: v
                for k, v in (
                    ("address", p.address),
                    ("mac", p.mac),
                    ("mark", p.mark),
                    ("table", p.table),
                    ("priority", p.priority),
                )
                if v is not None
            }
            for p in spec.proxies
        },
    }
    if minion_id in proxies:
        entry = proxies[minion_id]
        proxy_args = {
            "name": minion_id,
            "address": str(entry["address"]),
            "vip": str(entry["vip"]),
            "ports": ports,
            "divert_mark": proxy_spec.divert_mark,
            "divert_table": proxy_spec.divert_table,
            "divert_priority": proxy_spec.divert_priority,
            "mark_mask": proxy_spec.mark_mask,
            "sysctls": clean_sysctls,
            "relays": [
                {
                    "name": str(name),
                    "address": str(relays[name]["address"]),
                    "ports": relays[name].get("ports", ports),
                }
                for name in sorted(relays, key=str)
            ],
        }
    return {"errors": [], "relay": relay_args, "proxy": proxy_args}


def _is_ipv4(value):
    try:
        ipaddress.IPv4Address(value)
    except (ValueError, TypeError):
        return False
    return True
