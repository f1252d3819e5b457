"""
Beacon: a relay's proxy now sits behind a MAC that relayroute does not mark.

A proxy whose MAC relayroute discovers (no ``mac``/``macs`` in pillar) can
change it: a NIC replaced, a VM moved. Its gratuitous ARP moves the relay's
neighbour entry, but the relay's rules still mark the old MAC, so new
connections through the proxy go unmarked and their replies leave by the
default gateway. This beacon looks at the neighbour entries of those proxies
(one netlink dump per interval, no process) and fires an event when one
carries a MAC the rules do not mark; the formula's reactor
(``relayroute/reactor/follow-mac.sls``) then applies ``relayroute`` on that
relay, which looks the MAC up again. See README, "When a proxy's MAC changes".

The packet filter is read (one ``iptables-save``) at the first look, when a
neighbour entry has moved since the last read, and every ``refire`` seconds
while one stays unmarked; nothing else runs while the entries stay put. An
event for the same proxy and MAC is fired again only after ``refire``
seconds (an apply that failed, or a reactor that is not configured, is not
hammered).

Pillar (relays only), with the master's reactor (see ``pillar.example``):

.. code-block:: yaml

    beacons:
      relayroute:
        - interval: 5    # seconds between looks
        - refire: 60     # seconds before the same event is fired again

Event tag ``salt/beacon/<minion>/relayroute/mac``, data ``{"proxy", "address",
"mark", "mac", "marked", "id"}``.
"""

import logging
import time

log = logging.getLogger(__name__)

__virtualname__ = "relayroute"

CONTEXT_KEY = "relayroute.beacon"
DEFAULTS = {"refire": 60}
SALT_KEYS = ("interval", "_beacon_name", "disable_during_state_run", "run_once", "beacon_module")


def __virtual__():
    return __virtualname__


def _settings(config):
    merged = {}
    for item in config if isinstance(config, list) else [config]:
        if isinstance(item, dict):
            merged.update(item)
    return merged


def validate(config):
    """Check the beacon's configuration: a list of one-key mappings."""
    if not isinstance(config, list):
        return False, f"relayroute beacon: the configuration must be a list (got {config!r})"
    settings = _settings(config)
    unknown = sorted(set(settings) - set(DEFAULTS) - set(SALT_KEYS))
    if unknown:
        return False, f"relayroute beacon: unknown setting(s) {unknown} (known: refire, interval)"
    refire = settings.get("refire", DEFAULTS["refire"])
    if isinstance(refire, bool) or not isinstance(refire, (int, float)) or refire < 0:
        return False, f"relayroute beacon: refire must be seconds >= 0 (got {refire!r})"
    return True, "valid"


def _state():
    return __context__.setdefault(  # noqa: F821 - injected by Salt's loader
        CONTEXT_KEY, {"marked": None, "seen": frozenset(), "read_at": None, "fired": {}}
    )


def beacon(config):
    """
    Fire ``relayroute/mac`` for each discovered proxy whose neighbour entry
    carries a MAC relayroute's rules do not mark with the proxy's mark.
    """
    settings = {**DEFAULTS, **_settings(config)}
    state = _state()
    now = time.monotonic()
    try:
        proxies = __salt__["relayroute.discovered_proxies"]()  # noqa: F821
    except Exception as err:  # pylint: disable=broad-except
        # A pillar that does not validate: the apply says so; no event.
        if state.get("error") != str(err):
            log.warning("relayroute beacon: %s", err)
            state["error"] = str(err)
        return []
    state["error"] = None
    if not proxies:
        return []
    # Every MAC a proxy's neighbour entries carry: one per family it has an
    # address in (the same NIC answers both, normally).
    seen = frozenset(
        (name, mac)
        for name, proxy in proxies.items()
        for mac in proxy.get("neighbours") or [proxy.get("neighbour")]
        if mac
    )

    def unmarked(marked):
        return {
            (name, mac) for name, mac in seen if mac not in marked.get(proxies[name]["mark"], [])
        }

    # Read the packet filter when a neighbour entry moved since the last read,
    # and while one stays unmarked, every refire seconds (an apply may have
    # followed it since).
    if (
        state["marked"] is None
        or seen != state["seen"]
        or (unmarked(state["marked"]) and now - state["read_at"] >= settings["refire"])
    ):
        state["marked"] = __salt__["relayroute.marked_macs"]()  # noqa: F821
        state["seen"] = seen
        state["read_at"] = now
    now_unmarked = unmarked(state["marked"])
    # A MAC followed (or gone) may be fired for again when it comes back.
    state["fired"] = {key: at for key, at in state["fired"].items() if key in now_unmarked}
    events = []
    for name, mac in sorted(now_unmarked):
        last = state["fired"].get((name, mac))
        if last is not None and now - last < settings["refire"]:
            continue
        state["fired"][(name, mac)] = now
        proxy = proxies[name]
        marked = sorted(state["marked"].get(proxy["mark"], []))
        log.warning(
            "relayroute beacon: proxy %s (%s) is now at %s; relayroute marks %s with %#x",
            name,
            proxy["address"],
            mac,
            ", ".join(marked) or "no MAC",
            proxy["mark"],
        )
        events.append(
            {
                "tag": "mac",
                "proxy": name,
                "address": proxy["address"],
                "mark": proxy["mark"],
                "mac": mac,
                "marked": marked,
            }
        )
    return events
