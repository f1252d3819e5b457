"""
A relay's status, one row per proxy, as ``salt -G roles:relay relayroute.status
--out=table`` prints it (and ``salt-run relayroute.status`` for the fleet as
one table): the proxy's rule and route in each family, the MACs marked with
its mark, the packets those marking rules marked, the connections that carry
its mark now, when relayroute last applied, and the drift check's verdict.
A last row, ``(direct)``, counts the connections without a mark.

Pure: :func:`rows` renders data that :func:`relayroute.status` reads (the
plan, one kernel read, the packet filter's counters, conntrack, the check).
"""

import time

DIRECT = "(direct)"
COLUMNS = (
    "proxy",
    "mark",
    "rule",
    "route",
    "macs_marked",
    "marked_packets",
    "flows",
    "last_apply",
    "drift",
)


def _families(rule_or_route):
    return "IPv4" if rule_or_route.family == 4 else "IPv6"


def _held(planned, held, origin, describe):
    """Each planned item of ``origin`` as ``IPv4 <describe(item)> ok`` (or MISSING)."""
    found = [
        f"{_families(item)} {describe(item)} {'ok' if item.ident in held else 'MISSING'}"
        for item in planned
        if item.origin == origin
    ]
    return ", ".join(found) or "none planned"


def _rule_state(plan, kernel, proxy):
    held = {rule.as_rule().ident for rule in kernel.rules}
    return _held(plan.rules, held, f"proxies:{proxy.name}:priority", lambda r: r.priority)


def _route_state(plan, kernel, proxy):
    held = {route.ident for route in kernel.routes}
    return _held(plan.routes, held, f"proxies:{proxy.name}:table", lambda r: f"via {r.gateway}")


def when(timestamp, now=None):
    """A time as ``2026-11-30 12:00:00 UTC (42 s ago)``; ``never`` for None."""
    if timestamp is None:
        return "never"
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
    return f"{stamp} ({max(0, now - timestamp):.0f} s ago)"


def rows(plan, spec, kernel, marked, packets, flows_by_mark, verdict, last_apply, now=None):
    """
    The status rows (dicts of :data:`COLUMNS`): one per proxy of ``spec``,
    then :data:`DIRECT`. ``marked``: ``{mark: [mac]}`` as the packet filter
    has them; ``packets``: ``{mac: packets}``; ``flows_by_mark``: ``{mark:
    connections}`` under the mask; ``verdict``: the check's result
    (``{"ok", "summary", "differences"}``); ``last_apply``: epoch seconds or
    None.
    """
    drift = "ok" if verdict["ok"] else verdict["summary"]
    applied = when(last_apply, now)
    found = []
    for proxy in spec.proxies:
        macs = sorted(marked.get(proxy.mark, []))
        found.append(
            {
                "proxy": proxy.name,
                "mark": f"{proxy.mark:#x}",
                "rule": _rule_state(plan, kernel, proxy),
                "route": _route_state(plan, kernel, proxy),
                "macs_marked": ", ".join(macs) or "NONE",
                "marked_packets": sum(packets.get(mac, 0) for mac in macs),
                "flows": flows_by_mark.get(proxy.mark, 0),
                "last_apply": applied,
                "drift": drift,
            }
        )
    found.append(
        {
            "proxy": DIRECT,
            "mark": "0x0",
            "rule": "-",
            "route": "main table",
            "macs_marked": "-",
            "marked_packets": "-",
            "flows": flows_by_mark.get(0, 0),
            "last_apply": applied,
            "drift": drift,
        }
    )
    return found


def table(rows_by_relay):
    """
    The fleet's rows as one text table: ``{relay: [row, ...]}`` (a relay's
    value may be an error string instead), a ``relay`` column first.
    """
    columns = ("relay", *COLUMNS)
    lines = []
    for relay in sorted(rows_by_relay):
        value = rows_by_relay[relay]
        if isinstance(value, str) or not isinstance(value, list):
            lines.append({"relay": relay, "proxy": "ERROR", "drift": str(value)})
            continue
        for row in value:
            lines.append({"relay": relay, **row})
    cells = [[str(line.get(column, "")) for column in columns] for line in lines]
    widths = [
        max([len(column)] + [len(row[index]) for row in cells])
        for index, column in enumerate(columns)
    ]

    def fmt(values):
        return "  ".join(value.ljust(width) for value, width in zip(values, widths)).rstrip()

    rule = fmt(["-" * width for width in widths])
    return "\n".join([fmt(columns), rule, *(fmt(row) for row in cells)])


def flows_by_mark(flows):
    """``{mark: count}`` of conntrack flows (each with ``.mark`` under the mask)."""
    found = {}
    for flow in flows:
        found[flow.mark] = found.get(flow.mark, 0) + 1
    return found
