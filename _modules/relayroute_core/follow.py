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
    ``{name: {"address": ..., "mark": ...}}``: the proxies of the relay
    arguments (``topology.topology(...)["relay"]``) without ``mac``/``macs``.
    """
    proxies = (relay_args or {}).get("proxies") or {}
    return {
        name: {"address": proxy["address"], "mark": proxy["mark"]}
        for name, proxy in sorted(proxies.items())
        if not proxy.get("mac") and not proxy.get("macs")
    }
