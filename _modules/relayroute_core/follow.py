"""
Following a proxy's MAC (README, "When a proxy's MAC changes"): the proxies
whose MAC relayroute discovers, which the ``relayroute`` beacon
(``_beacons/relayroute.py``) watches. When one's neighbour entry carries a
MAC the rules do not mark, the reactor the beacon wakes re-applies the relay,
which looks the MAC up again. Pure.

A proxy with ``mac``/``macs`` in pillar is never followed: what the operator
wrote stands, and ``relayroute.check`` reports a neighbour entry that
disagrees.
"""


def discovered(relay_args):
    """
    ``{name: {"address": ..., "addresses": [...], "mark": ...}}``: the
    proxies of the relay arguments (``topology.topology(...)["relay"]``)
    without ``mac``/``macs``. ``address`` (the pillar's form: a string, or a
    list of one address per family) becomes ``addresses``, a list; ``address``
    is the first of them (IPv4's on a dual-stack LAN), as events name it.
    """
    proxies = (relay_args or {}).get("proxies") or {}
    found = {}
    for name, proxy in sorted(proxies.items()):
        if proxy.get("mac") or proxy.get("macs"):
            continue
        address = proxy["address"]
        addresses = list(address) if isinstance(address, (list, tuple)) else [address]
        found[name] = {"address": addresses[0], "addresses": addresses, "mark": proxy["mark"]}
    return found


def neighbours(addresses, macs):
    """
    ``{"neighbours": [...], "neighbour": ...}``: the MACs the neighbour entries
    of a proxy's ``addresses`` carry (``macs``: ``{address: mac or None}``),
    each once in the order of the addresses; ``neighbour`` is the first (None
    when no entry has one).
    """
    found = []
    for address in addresses:
        mac = macs.get(address)
        if mac and mac not in found:
            found.append(mac)
    return {"neighbours": found, "neighbour": found[0] if found else None}
