"""
A lab host's packet filter, whichever backend relayroute runs: relayroute's
part read by the engine's own backends (``relayroute_core``, in the host's
namespace), and the rest (other tools' tables) as text.
"""

import relayroute_core  # noqa: F401 - the package first: its sub-modules import through it
from relayroute_core import engine, nftables, planner

BACKENDS = ("iptables", "nftables")
# The lab's hosts are this machine's, Debian 12, whose default backend
# (relayroute/parameters/os_family/Debian.yaml) is nftables.
PLATFORM_DEFAULT = "nftables"


def lab_backend(lab):
    """The backend the lab's roles run: its pillar's, else the platform's default."""
    return lab.backend or PLATFORM_DEFAULT


def owned(ns, role="relay"):
    """``{backend: lines}``: ``role``'s part of each backend in ``ns`` ([] where it has none)."""
    prefix = planner.OWNERS[role].chain_prefix
    found = {}
    with ns.entered():
        for name in BACKENDS:
            backend = engine.backend(name)
            found[name] = backend.owned_lines(backend.read(), prefix)
    return found


def holding(ns, role="relay"):
    """The backends that hold any of ``role``'s state in ``ns`` (a sorted list)."""
    return sorted(name for name, lines in owned(ns, role).items() if lines)


def marked_macs(ns):
    """The MACs the relay role's rules mark in ``ns`` (lower case, sorted), either backend."""
    macs = set()
    with ns.entered():
        for name in BACKENDS:
            backend = engine.backend(name)
            for marked in backend.marked_macs(backend.read(), planner.RELAY.chain_prefix).values():
                macs.update(mac.lower() for mac in marked)
    return sorted(macs)


# iptables' own tables (the nf_tables flavour keeps them in nftables, by family ip
# and ip6): ``iptables-save`` shows them, in its own order.
IPTABLES_TABLES = {"filter", "nat", "mangle", "raw", "security"}


def tables(ns):
    """Every nftables table in ``ns``, as ``family name``."""
    out = ns.exec(["nft", "list", "tables"]).stdout
    return [line.split(None, 1)[1] for line in out.splitlines() if line.startswith("table ")]


def relayroute_tables(ns):
    """The nftables tables relayroute owns in ``ns``, as ``family name``."""
    return [t for t in tables(ns) if t.split()[-1].startswith(nftables.TABLE_PREFIX)]


def listed(ns, table):
    """One table as ``nft -s`` lists it (without counters)."""
    return ns.exec(["nft", "-s", "list", "table", *table.split()]).stdout


def ruleset(ns):
    """
    ``ns.snapshot()`` (rules, routes, ``iptables-save``) and every nftables
    table but iptables' own (``nft -s``, without counters): both backends'
    state and other tools', each table as text.
    """
    beyond = {}
    for table in tables(ns):
        family, name = table.split()
        if not (family in ("ip", "ip6") and name in IPTABLES_TABLES):
            beyond[table] = listed(ns, table)
    return {**ns.snapshot(), "nft": beyond}


def foreign(ns):
    """Other tools' nftables tables in ``ns``: ``{family name: text}`` (``nft -s``)."""
    return {
        table: listed(ns, table)
        for table in tables(ns)
        if not table.split()[-1].startswith(nftables.TABLE_PREFIX)
    }


def lose_relayroute_tables(ns):
    """What a reboot takes of relayroute's nftables state: its tables."""
    for table in relayroute_tables(ns):
        ns.exec(["nft", "delete", "table", *table.split()])


def ours(ns, role="relay"):
    """
    relayroute's part of ``ns``: its rules, table routes and ``role``'s part
    of the packet filter, ``{backend: lines}`` of the backends holding any.
    """
    snap = ns.snapshot()
    return {
        "rules": [line for line in snap["rules"].splitlines() if "proto 210" in line],
        "routes": [line for line in snap["routes"].splitlines() if "proto 210" in line],
        "filter": {name: lines for name, lines in owned(ns, role).items() if lines},
    }
