"""
The monitoring check: is the kernel still what relayroute's plan says, and
does the kernel's own route lookup still send each proxy's replies through it?

Pure where it can be: :func:`verdict` and :func:`metrics` compare and render
plain data (no kernel, no Salt); :func:`run` reads the kernel (one ruleset
read, netlink dumps, route lookups, neighbour entries) and calls them. Nothing
is changed: a check never writes to the kernel.
"""

import os
import tempfile

from . import engine, netlink, planner


def _lines_diff(what, changes):
    """``changes`` is ``{"old": [...], "new": [...]}``: what is missing and what is extra."""
    old, new = changes.get("old", []), changes.get("new", [])
    found = [f"{what}: missing '{line}'" for line in new if line not in old]
    found += [f"{what}: not in the plan '{line}'" for line in old if line not in new]
    return found


def verdict(plan, current, filter_backend, answers, neighbours, prefix=""):
    """
    Pure: the check's result for ``plan`` against ``current`` (an
    :class:`engine.Current`), the kernel's ``answers`` to the plan's lookups
    (see :func:`planner.lookup_problems`) and ``neighbours``, the MAC each
    proxy's addresses (one per family) have in the neighbour table now
    (``{name: [(address, mac or None, marked MACs), ...]}``).

    Returns ``{"ok": bool, "summary": "one line", "differences": [...]}``.
    """
    differences = list(engine.conflicts(plan, current.kernel, prefix))
    todo = engine.diff(plan, current, filter_backend)
    for what, changes in todo.changes.items():
        if isinstance(changes, dict):
            differences += _lines_diff(what, changes)
        else:
            differences += [f"{what}: {item}" for item in changes]
    differences += planner.lookup_problems(answers, current.kernel.rules, prefix)
    base = f"{prefix}:proxies" if prefix else "proxies"
    for name, entries in sorted(neighbours.items()):
        for address, mac, marked in entries:
            if mac and mac not in marked:
                differences.append(
                    f"{base}:{name}: the neighbour entry of {address} carries {mac}, a MAC "
                    f"relayroute does not mark (marks {', '.join(marked)}): the proxy's MAC "
                    f"changed (got {mac!r})"
                )
    proven = sum(1 for answer in answers if not answer[4])
    proxies = len({lookup.name for lookup in plan.lookups if lookup.gateway})
    if differences:
        summary = (
            f"relayroute DRIFT: {len(differences)} difference"
            f"{'s' if len(differences) > 1 else ''}: {differences[0]}"
        )
    else:
        summary = (
            f"relayroute OK: {proxies} proxies, {len(plan.routes)} table routes, "
            f"{proven} route lookups as planned"
        )
    return {"ok": not differences, "summary": summary, "differences": differences}


def lookup_ok(answers, prefix=""):
    """Pure: ``{proxy name: bool}``, every lookup of that proxy answered as planned."""
    result = {}
    for answer in answers:
        lookup = answer[0]
        if lookup.name == "unmarked":
            continue
        good = not planner.lookup_problems([answer], (), prefix)
        result[lookup.name] = result.get(lookup.name, True) and good
    return result


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def metrics(result, lookups, flows_by_mark):
    """
    Pure: node_exporter textfile lines for a check ``result``: drift 0/1, each
    proxy's lookup verdict, and conntrack flows per connmark (relayroute's bits).
    """
    lines = [
        "# HELP relayroute_drift 1 when the kernel differs from relayroute's plan.",
        "# TYPE relayroute_drift gauge",
        f"relayroute_drift {0 if result['ok'] else 1}",
        "# HELP relayroute_proxy_lookup_ok 1 when the kernel's route lookup with the proxy's "
        "mark leaves via the proxy.",
        "# TYPE relayroute_proxy_lookup_ok gauge",
    ]
    lines += [
        f'relayroute_proxy_lookup_ok{{proxy="{_label(name)}"}} {1 if ok else 0}'
        for name, ok in sorted(lookups.items())
    ]
    lines += [
        "# HELP relayroute_flows Conntrack flows by connmark (relayroute's bits; 0: direct).",
        "# TYPE relayroute_flows gauge",
    ]
    lines += [
        f'relayroute_flows{{mark="{mark:#x}"}} {count}'
        for mark, count in sorted(flows_by_mark.items())
    ]
    return "\n".join(lines) + "\n"


def write_textfile(path, text):
    """Replace ``path`` atomically (node_exporter never reads half a file)."""
    directory = os.path.dirname(path) or "."
    handle, tmp = tempfile.mkstemp(prefix=".relayroute-", suffix=".prom", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(plan, filter_backend, kernel=None, prefix="", textfile=None):
    """
    Read the kernel and return :func:`verdict` for ``plan`` (a relay plan with
    its proxies' MACs); with ``textfile``, also write :func:`metrics` there.
    Changes nothing in the kernel.
    """
    current = engine.read(filter_backend, kernel, sysctl_keys=[s.key for s in plan.sysctls])
    result, answers = evaluate(plan, current, filter_backend, prefix)
    if textfile:
        mask = plan.rules[0].fwmask if plan.rules else 0xFFFFFFFF
        by_mark = {}
        for flow in netlink.flows(mask):
            by_mark[flow.mark] = by_mark.get(flow.mark, 0) + 1
        write_textfile(textfile, metrics(result, lookup_ok(answers, prefix), by_mark))
    return result


def evaluate(plan, current, filter_backend, prefix=""):
    """
    :func:`verdict` for ``plan`` against ``current`` (an :class:`engine.Current`
    already read), after the kernel's own lookups and each proxy's neighbour
    entries: ``(result, answers)``.
    """
    current.kernel = engine.adopt_rules(current.kernel, plan, current.memory)
    answers = netlink.route_lookups(plan.lookups)
    marked = {}
    for chain in plan.chains:
        for rule in chain.rules:
            if rule[0] == "mark_from_mac":
                marked.setdefault(rule[2], []).append(rule[1])
    # Each proxy's neighbour entry in each family it has an address in.
    neighbours = {}
    for lookup in plan.lookups:
        if lookup.gateway:
            neighbours.setdefault(lookup.name, []).append(
                (
                    lookup.gateway,
                    netlink.lookup_mac(lookup.gateway, resolve=False),
                    marked.get(lookup.mark, []),
                )
            )
    return verdict(plan, current, filter_backend, answers, neighbours, prefix), answers
