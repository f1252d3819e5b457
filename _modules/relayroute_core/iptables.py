"""
iptables backend: renders a plan's chains as iptables rules, one table per
address family, each written with its family's own tool: ``iptables-save -t
mangle`` / ``iptables-restore --noflush`` for IPv4, ``ip6tables-save`` /
``ip6tables-restore --noflush`` for IPv6 (:data:`TOOLS`).

Only chains whose names start with the owner's prefix, and jumps to them from
the built-in chains, are ever written; every other line of the ruleset stays
as it is. Declaring a chain in a ``--noflush`` transaction flushes that chain
alone, so a changed chain is rewritten whole, atomically.

What "atomic" means across the two tools: each family's transaction is one
``*-restore`` process, committed all or nothing in its own table (legacy: one
table replace; iptables-nft: one nf_tables batch). The kernel has no
transaction spanning both: IPv4 is written first, then IPv6, and for the few
milliseconds between them IPv4 packets see the new chains while IPv6 packets
still see the old ones. Each family's packets only ever traverse their own
family's table, so no packet ever meets half a ruleset: every packet is
handled entirely by the old plan or entirely by the new one. When the IPv6
transaction fails, :func:`apply` writes the IPv4 table back to what it was
before (the inverse transaction, computed with the forward one) and raises an
error naming ``ip6tables-restore``; the engine's rollback then finds nothing
left to undo in the packet filter, and undoes its routes and rules.

Reading: IPv4's table is read every time, IPv6's only when the kernel may
hold relayroute's chains there, which the backend finds out without running
a process (:func:`_may_hold`): iptables-nft keeps them as chains of
nf_tables' ``ip6 mangle`` table (one netlink dump of the IPv6 chain names, no
rules), iptables-legacy has an IPv6 mangle table at all only when
``/proc/<thread>/net/ip6_tables_names`` lists it. When neither holds any,
nothing of relayroute's is there to compare or remove, and the IPv6 table
reads as empty. The :class:`Ruleset` records which families were read.

A family read is one ``*-save`` with iptables-legacy. With iptables-nft,
the kernel's view of the table comes first, over nfnetlink in the process
(:func:`nftview.view`: every chain's name; for the hook chains and the
owners' chains, a digest of their rules, counters left out, and their
reference counts). A chain whose digest is the one it was last read under
is taken from the memo (:class:`nftview.Memo`); the others are listed, one
``iptables -S CHAIN`` each, up to :data:`LISTING_BUDGET` in all, or beyond
that their family is saved whole. So a no-op runs no process, and one that
follows another tool's change to PREROUTING lists that chain alone,
whatever else the table holds. A reference count the chains read do not
account for (a jump from a chain relayroute does not read) is read whole.
A table without any owner's chain needs no read (no rule can jump to a
chain that does not exist). A verification (:func:`read_part`) records
what it listed, so the no-op after an apply runs no process either.
"""

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import family, nftview, planner
from .persist import DEFAULT_LOCK

NAME = "iptables"
TABLE = "mangle"
HOOKS = {"prerouting": "PREROUTING", "output": "OUTPUT"}
BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
# iptables-legacy serialises its users (fail2ban, Docker, firewalld's direct
# rules, ...) with the xtables lock: without --wait a transaction fails at once
# while another holds it. Wait, bounded. iptables-nft accepts and ignores it;
# an iptables-restore too old to know it (before 1.6.2) is run without it.
# ip6tables shares the same lock and the same options.
XTABLES_WAIT = 30
WAIT = ("--wait", str(XTABLES_WAIT))


@dataclass(frozen=True)
class Tool:
    """One address family's iptables tools, and where that family's state lives."""

    version: int  # the family (relayroute_core.family)
    command: str  # "iptables" / "ip6tables"
    # How the family's lines are told apart in reports and diffs ("" for IPv4,
    # whose lines read as they always have).
    label: str
    saved_file: str  # iptables-services' saved ruleset (RHEL/CentOS)
    legacy_tables: str  # the legacy tables this network namespace has, under /proc/<tid>/net
    nfproto: int  # nf_tables' family of iptables-nft's tables (NFPROTO_IPV4 / IPV6)
    # Read every time (IPv4, as before IPv6), or only when the kernel may hold
    # relayroute's chains (found without a process, see _may_hold).
    always_read: bool

    @property
    def save(self):
        return (f"{self.command}-save", "-t", TABLE)

    @property
    def restore(self):
        return (f"{self.command}-restore", "--noflush")


TOOLS = {
    4: Tool(4, "iptables", "", "/etc/sysconfig/iptables", "ip_tables_names", 2, True),
    6: Tool(
        6, "ip6tables", "ip6tables: ", "/etc/sysconfig/ip6tables", "ip6_tables_names", 10, False
    ),
}
VERSIONS = tuple(sorted(TOOLS))  # the order transactions are applied in: IPv4 first
SAVE = TOOLS[4].save
RESTORE = TOOLS[4].restore
# ICMPv6 neighbour discovery (RFC 4861), as ip6tables-save prints the types:
# router solicitation/advertisement, neighbour solicitation/advertisement, redirect.
ND_ICMPV6_TYPES = (133, 134, 135, 136, 137)


class BackendError(RuntimeError):
    """A packet-filter command failed; the message carries the command and its stderr."""


def _in_family(rule, version):
    """Whether an abstract rule belongs in ``version``'s table (iptables: 4, ip6tables: 6)."""
    kind = rule[0]
    if kind == "return_if_source":
        return family.of(rule[1]).version == version
    if kind == "return_if_neighbour_discovery":
        return version == 6
    return True


def render_rules(rule, chain_name):
    """One abstract rule as the rule specifications ip(6)tables-save prints for it."""
    if rule[0] == "return_if_neighbour_discovery":
        return [f"-p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j RETURN" for kind in ND_ICMPV6_TYPES]
    return [render_rule(rule, chain_name)]


def render_rule(rule, chain_name):
    """One abstract rule as the rule specification iptables-save prints for it."""
    kind, args = rule[0], rule[1:]
    if kind == "restore_mark":
        (mask,) = args
        return f"-j CONNMARK --restore-mark --nfmask {mask:#x} --ctmask {mask:#x}"
    if kind == "save_mark":
        (mask,) = args
        return f"-j CONNMARK --save-mark --nfmask {mask:#x} --ctmask {mask:#x}"
    if kind == "return_if_marked":
        (mask,) = args
        return f"-m mark ! --mark 0x0/{mask:#x} -j RETURN"
    if kind == "return_if_source":
        (net,) = args
        return f"-s {net} -j RETURN"
    if kind == "mark_from_mac":
        mac, mark, mask = args
        return f"-m mac --mac-source {mac} -j MARK --set-xmark {mark:#x}/{mask:#x}"
    if kind == "set_mark":
        mark, mask = args
        return f"-j MARK --set-xmark {mark:#x}/{mask:#x}"
    if kind == "accept":
        return "-j ACCEPT"
    if kind == "jump_transparent_socket":
        (target,) = args
        return f"-p tcp -m socket --transparent -j {chain_name(target)}"
    raise ValueError(f"iptables backend cannot render rule {rule!r}")


@dataclass
class Table:
    """One family's mangle table as its save tool shows it: every chain's rule specs, in order."""

    chains: Dict[str, List[str]] = field(default_factory=dict)

    def owned(self, prefix):
        return {name: rules for name, rules in self.chains.items() if name.startswith(prefix)}

    def jumps(self, prefix):
        """``(builtin chain, rule spec)`` of every built-in rule that jumps to an owned chain."""
        found = []
        for builtin in BUILTIN:
            for spec in self.chains.get(builtin, []):
                target = _target(spec)
                if target and target.startswith(prefix):
                    found.append((builtin, spec))
        return found


class Ruleset:
    """
    The mangle table of each family (``tables``: ``{4: Table, 6: Table}``).
    ``read``: the families whose save tool ran; a family not read was found to
    hold none of relayroute's chains (or was never looked at, in a ruleset
    built from text), and reads as empty. ``Ruleset(chains)``: IPv4's alone.
    """

    def __init__(self, chains=None, tables=None, read=(4,)):
        tables = dict(tables or {})
        if chains is not None:
            tables[4] = Table(dict(chains))
        self.tables = {version: tables.get(version) or Table() for version in VERSIONS}
        self.read = tuple(read)

    def __repr__(self):
        return f"Ruleset(tables={self.tables!r}, read={self.read!r})"

    def __eq__(self, other):
        return isinstance(other, Ruleset) and self.tables == other.tables

    __hash__ = None

    def table(self, version):
        return self.tables[version]

    @property
    def chains(self):
        """IPv4's chains (what ``iptables-save`` shows)."""
        return self.tables[4].chains

    def owned(self, prefix):
        """IPv4's owned chains (see :meth:`Table.owned`; each family's through :meth:`table`)."""
        return self.tables[4].owned(prefix)

    def jumps(self, prefix):
        return self.tables[4].jumps(prefix)


def _target(spec):
    words = spec.split()
    for flag in ("-j", "-g"):
        if flag in words:
            index = words.index(flag)
            if index + 1 < len(words):
                return words[index + 1]
    return None


def parse_table(text, owned=None):
    """
    Parse ``ip(6)tables-save -t mangle`` output into a :class:`Table`.
    ``owned``: chain-name prefixes; when given, only the rules of the
    built-in chains and of chains with such a name are kept (every chain is
    still declared), which is all relayroute ever compares or writes. A host
    with 10,000 rules of another tool's in the table then costs about 2 ms to
    parse, not 12.5 ms.
    """
    table = Table()
    in_table = False
    lines = text.splitlines()
    if owned is not None:
        keep = tuple(f"-A {name} " for name in BUILTIN) + tuple(f"-A {p}" for p in owned)
        lines = [line for line in lines if not line.startswith("-A ") or line.startswith(keep)]
    for raw in lines:
        line = raw.strip()
        if line.startswith("*"):
            in_table = line[1:] == TABLE
            continue
        if not in_table or not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            table.chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            table.chains.setdefault(chain, []).append(spec)
    return table


def parse_save(text, text6=None):
    """
    A :class:`Ruleset` from ``iptables-save -t mangle`` output (and, when
    given, ``ip6tables-save -t mangle``'s; without it IPv6 holds nothing).
    """
    tables = {4: parse_table(text)}
    if text6 is not None:
        tables[6] = parse_table(text6)
    return Ruleset(tables=tables, read=tuple(sorted(tables)))


def marked_macs(ruleset, prefix):
    """
    ``{mark: [mac, ...]}``: the source MACs the owner's chains mark, and with
    which mark (relayroute's bits), as the kernel has them now, in either family.
    """
    found = {}
    for version in VERSIONS:
        for rules in ruleset.table(version).owned(prefix).values():
            for spec in rules:
                words = spec.split()
                if "--mac-source" not in words or "--set-xmark" not in words:
                    continue
                mac = words[words.index("--mac-source") + 1].lower()
                mark = int(words[words.index("--set-xmark") + 1].split("/")[0], 16)
                found.setdefault(mark, set()).add(mac)
    return {mark: sorted(macs) for mark, macs in found.items()}


def desired(plan, version=4):
    """
    The owned chains and jumps a plan asks for in ``version``'s table:
    ``({chain name: [rule specs]}, [(builtin, jump spec)])``; nothing in a
    family the plan's chains are not needed in (``plan.families``).
    """
    if version not in plan.families:
        return {}, []
    prefix = plan.owner.chain_prefix

    def chain_name(short):
        return prefix + short

    chains = {}
    jumps = []
    for chain in plan.chains:
        name = chain_name(chain.name)
        chains[name] = [
            spec
            for rule in chain.rules
            if _in_family(rule, version)
            for spec in render_rules(rule, chain_name)
        ]
        if chain.hook:
            jumps.append((HOOKS[chain.hook], f"-j {name}"))
    return chains, jumps


def _table_lines(chains, jumps, label):
    lines = [f"{label}-A {builtin} {spec}" for builtin, spec in jumps]
    for name in sorted(chains):
        lines.append(f"{label}-N {name}")
        lines += [f"{label}-A {name} {spec}" for spec in chains[name]]
    return lines


def owned_lines(ruleset, prefix):
    """
    An owner's part of the ruleset as ``-A`` lines, jumps first, for diffs and
    reports; IPv4's as iptables prints them, then IPv6's prefixed ``ip6tables: ``.
    """
    lines = []
    for version in VERSIONS:
        table = ruleset.table(version)
        lines += _table_lines(table.owned(prefix), table.jumps(prefix), TOOLS[version].label)
    return lines


def desired_lines(plan):
    lines = []
    for version in VERSIONS:
        lines += _table_lines(*desired(plan, version), TOOLS[version].label)
    return lines


class Transaction(str):
    """
    What :func:`apply` writes, as the text an operator reads: each family's
    ``*-restore`` input under a ``# iptables-restore --noflush`` / ``#
    ip6tables-restore --noflush`` line, IPv4 first. ``parts``: ``(family,
    restore input)`` in that order; ``undo``: ``{family: restore input}``
    putting each family's table back as it was before its part (None: nothing
    to put back). Plain text (a transaction edited as text) is read back with
    :meth:`parse`; text without a header line is one IPv4 transaction.
    """

    parts: Tuple[Tuple[int, str], ...]
    undo: Dict[int, Optional[str]]

    def __new__(cls, parts, undo=None):
        text = "".join(f"{_header(version)}\n{body}" for version, body in parts)
        self = super().__new__(cls, text)
        self.parts = tuple(parts)
        self.undo = dict(undo or {})
        return self

    def text(self, version):
        """The restore input for ``version``'s table, or None when it has nothing to do."""
        return dict(self.parts).get(version)

    @classmethod
    def parse(cls, text):
        """A transaction from its text (the parts; no way back is known)."""
        headers = {_header(version): version for version in VERSIONS}
        parts, version, lines = [], 4, []
        for line in str(text).splitlines():
            if line in headers:
                if any(item.strip() for item in lines):
                    parts.append((version, "\n".join(lines) + "\n"))
                version, lines = headers[line], []
            else:
                lines.append(line)
        if any(item.strip() for item in lines):
            parts.append((version, "\n".join(lines) + "\n"))
        return cls(parts)


def _header(version):
    return "# " + " ".join(TOOLS[version].restore)


def transaction(plan, ruleset):
    """
    The transaction that turns the owner's part of ``ruleset`` into what
    ``plan`` asks for, in each family, or None when they already match.
    Foreign chains and rules are never named in it.
    """
    wanted = {version: desired(plan, version) for version in VERSIONS}
    return transaction_to(
        {version: chains for version, (chains, _jumps) in wanted.items()},
        {version: jumps for version, (_chains, jumps) in wanted.items()},
        ruleset,
        plan.owner.chain_prefix,
    )


def snapshot(ruleset, prefix):
    """
    The owner's chains and jumps in ``ruleset``, per family, in the form
    :func:`transaction_to` takes: ``({family: chains}, {family: jumps})``.
    """
    return (
        {version: dict(ruleset.table(version).owned(prefix)) for version in VERSIONS},
        {version: list(ruleset.table(version).jumps(prefix)) for version in VERSIONS},
    )


def transaction_to(want_chains, want_jumps, ruleset, prefix):
    """
    The :class:`Transaction` from the owner's part of ``ruleset`` to the
    wanted chains and jumps (``{family: ...}``, as :func:`snapshot` gives
    them), or None when every family already matches.
    """
    parts, undo = [], {}
    for version in VERSIONS:
        table = ruleset.table(version)
        chains = want_chains.get(version, {})
        jumps = want_jumps.get(version, [])
        text = table_transaction(chains, jumps, table, prefix)
        if text:
            parts.append((version, text))
            after = _after(table, chains, jumps, prefix)
            undo[version] = table_transaction(
                table.owned(prefix), table.jumps(prefix), after, prefix
            )
    if not parts:
        return None
    return Transaction(tuple(parts), undo)


def _after(table, chains, jumps, prefix):
    """``table`` as it is once the owner's part is ``chains`` and ``jumps`` (pure)."""
    after = {
        name: [spec for spec in specs if not (_target(spec) or "").startswith(prefix)]
        for name, specs in table.chains.items()
        if not name.startswith(prefix)
    }
    for builtin, spec in reversed(jumps):
        after.setdefault(builtin, []).insert(0, spec)
    after.update({name: list(specs) for name, specs in chains.items()})
    return Table(after)


def table_transaction(want_chains, want_jumps, table, prefix):
    """One family's ``*-restore --noflush`` input from ``table`` to the wanted part, or None."""
    have_chains = table.owned(prefix)
    have_jumps = table.jumps(prefix)

    body = []
    # Changed or new chains: declaring flushes them; then their rules, whole.
    for name in sorted(want_chains):
        if have_chains.get(name) != want_chains[name]:
            body.append(f":{name} - [0:0]")
            body += [f"-A {name} {spec}" for spec in want_chains[name]]
    # Jumps: exactly one of each wanted jump, at the top of its built-in chain
    # when missing; any other jump to an owned chain goes.
    seen = set()
    for builtin, spec in have_jumps:
        if (builtin, spec) in want_jumps and (builtin, spec) not in seen:
            seen.add((builtin, spec))
            continue
        body.append(f"-D {builtin} {spec}")
    for builtin, spec in want_jumps:
        if (builtin, spec) not in seen:
            body.append(f"-I {builtin} 1 {spec}")
    # Stale chains: flush, then delete (their jumps went above).
    stale = sorted(set(have_chains) - set(want_chains))
    for name in stale:
        body.append(f":{name} - [0:0]")
    for name in stale:
        body.append(f"-X {name}")
    if not body:
        return None
    return "\n".join([f"*{TABLE}", *body, "COMMIT", ""])


def restore_commands(plan):
    """
    Shell lines that put the plan's chains in place at boot, per family (IPv4
    first): one transaction for the family's chains, then each jump unless it
    is already there. Under the script's ``set -e``, a failing IPv6 part stops
    the script with IPv4's in place (what the host had before the reboot, in
    the family that could be restored) and the unit fails, naming it.
    """
    lines = []
    for version in VERSIONS:
        chains, jumps = desired(plan, version)
        if not chains:
            continue
        tool = TOOLS[version]
        lines += [
            # The xtables lock (iptables-legacy), waited for where the tools know --wait.
            f"w=; {tool.command}-restore --help 2>&1 | grep -q -- --wait && "
            f"w='--wait {XTABLES_WAIT}'",
            f"{tool.command}-restore --noflush $w <<'RULES'",
            f"*{TABLE}",
        ]
        for name in sorted(chains):
            lines.append(f":{name} - [0:0]")
            lines += [f"-A {name} {spec}" for spec in chains[name]]
        lines += ["COMMIT", "RULES"]
        for builtin, spec in jumps:
            lines.append(
                f"{tool.command} $w -t {TABLE} -C {builtin} {spec} 2>/dev/null || "
                f"{tool.command} $w -t {TABLE} -I {builtin} 1 {spec}"
            )
    return lines


BUILTIN_POLICIES = [f":{name} ACCEPT [0:0]" for name in BUILTIN]
SAVED_FILE_NOTE = "# relayroute {role}: the {prefix}* chains and jumps to them are managed by Salt"


def _owned_saved_line(line, prefix, note):
    """Whether a line of a saved ruleset's mangle table is the owner's."""
    words = line.split()
    if words and words[0].startswith("[") and words[0].endswith("]"):
        words = words[1:]  # iptables-save -c counters
    if not words:
        return False
    if line.strip() == note:
        return True
    if words[0].startswith(":"):
        return words[0][1:].startswith(prefix)
    if words[0] == "-A" and len(words) > 1:
        if words[1].startswith(prefix):
            return True
        target = _target(" ".join(words[2:]))
        return bool(target and target.startswith(prefix))
    return False


def merge_saved(text, plan, version=4):
    """
    A saved ruleset file of family ``version`` (``TOOLS[version].saved_file``:
    ``/etc/sysconfig/iptables``, which iptables.service restores whole at boot,
    or ``/etc/sysconfig/ip6tables``, ip6tables.service's) with the owner's
    chains and jumps replaced by the plan's in that family. Every other line
    stays byte for byte; the owner's lines go right after the mangle table's
    chain declarations, so its jumps come first in their built-in chains, as
    ``-I ... 1`` puts them at runtime. A file without
    a mangle table gets one. ``text`` None (no file) stays None.
    """
    if text is None:
        return None
    prefix = plan.owner.chain_prefix
    note = SAVED_FILE_NOTE.format(role=plan.owner.role, prefix=prefix)
    chains, jumps = desired(plan, version)
    ours = []
    if chains:
        ours.append(note)
        ours += [f":{name} - [0:0]" for name in sorted(chains)]
        ours += [f"-A {builtin} {spec}" for builtin, spec in jumps]
        for name in sorted(chains):
            ours += [f"-A {name} {spec}" for spec in chains[name]]
    lines = text.splitlines(keepends=True)
    out = []
    in_table = found = False
    insert_at = None
    for raw in lines:
        line = raw.strip()
        if line.startswith("*"):
            in_table = line[1:] == TABLE
            found = found or in_table
            out.append(raw)
            if in_table:
                insert_at = len(out)
            continue
        if in_table:
            if line == "COMMIT":
                in_table = False
            elif _owned_saved_line(line, prefix, note):
                continue
            elif line.startswith(":"):
                insert_at = len(out) + 1
        out.append(raw)
    if ours:
        block = [line + "\n" for line in ours]
        if found:
            out[insert_at:insert_at] = block
        else:
            if out and not out[-1].endswith("\n"):
                out[-1] += "\n"
            out += [f"*{TABLE}\n", *[p + "\n" for p in BUILTIN_POLICIES], *block, "COMMIT\n"]
    return "".join(out)


def _env():
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env


def available():
    """Whether this host has iptables' tools (a host with nft alone has none)."""
    return all(shutil.which(tool) for tool in (SAVE[0], RESTORE[0]))


# The processes a read may spend on listing chains whose digest moved (a
# no-op's budget): more than that, and each such family is saved whole.
LISTING_BUDGET = 2


def read():
    """
    The mangle table of each family: IPv4's always, IPv6's only when the
    kernel may hold relayroute's chains there (:func:`_may_hold`, no
    process); otherwise it reads as empty. iptables-legacy: one ``*-save``
    per family read. iptables-nft: the kernel's view of the table first
    (:func:`nftview.view`, in the process); a table without any owner's
    chain is its chain names alone; otherwise each chain relayroute reads
    comes from the memo while its digest is the one it was read under, and
    the others are listed (``iptables -S CHAIN``, at most
    :data:`LISTING_BUDGET` in all) or, beyond that, their family saved.
    A table whose reference counts its chains do not account for (a jump
    from a chain relayroute does not read) is saved too.
    """
    tables, done = {}, []
    memo = nftview.Memo.load(_memo_path())
    pending = []
    for version in VERSIONS:
        tool = TOOLS[version]
        seen = _nft_view(tool)
        if seen is None:
            if tool.always_read or _may_hold(tool):
                tables[version] = _save(tool)
                done.append(version)
            continue
        names, chains = seen
        if not any(name.startswith(_owned_prefixes()) for name in names):
            # No owner's chain, hence no jump to one (iptables refuses a jump
            # to a missing chain): nothing to compare or remove, no process.
            if tool.always_read:
                tables[version] = Table({name: [] for name in names})
                done.append(version)
            continue
        known = memo.get(version)
        stale = [name for name in sorted(chains) if known.get(name, (None,))[0] != chains[name][0]]
        pending.append((version, tool, seen, known, stale))
    listing = sum(len(stale) for *_rest, stale in pending) <= LISTING_BUDGET
    for version, tool, seen, known, stale in pending:
        table = None
        if listing or not stale:
            specs = {name: known[name][1] for name in seen[1] if name not in stale}
            specs.update({name: _listed(tool, name) for name in stale})
            table = Table({name: list(specs.get(name, [])) for name in sorted(seen[0])})
            if not _accounted(table, seen[1]):
                table = None
        if table is None:
            table = _save(tool)
            stale = sorted(seen[1])
        # What a process read is kept when nothing changed while it was read.
        if stale and _nft_view(tool) == seen:
            memo.put(version, _memo_chains(table, seen[1]))
        tables[version] = table
        done.append(version)
    memo.save()
    return Ruleset(tables=tables, read=tuple(done))


def _wanted(name):
    """The chains whose rules relayroute reads: the hook chains and the owners' chains."""
    return name in HOOKS.values() or name.startswith(_owned_prefixes())


def _nft_view(tool):
    """:func:`nftview.view` of ``tool``'s mangle table under iptables-nft; None otherwise."""
    if flavour(tool) != "nft":
        return None
    return nftview.view(tool.nfproto, TABLE, _wanted)


def _listed(tool, name):
    """One chain's rule specs, from its own ``iptables -t mangle -S CHAIN``."""
    return parse_listing(_run((tool.command, "-t", TABLE, "-S", name))).chains.get(name, [])


def _accounted(table, chains):
    """
    Whether ``table`` accounts for every reference to an owner's chain the
    kernel counts (``chains``: :func:`nftview.view`'s): its rules plus the
    jumps and gotos to it from the chains read. Otherwise a chain not read
    jumps to it, and only a whole read shows where.
    """
    targets = {}
    for name in chains:
        for spec in table.chains.get(name, []):
            target = _target(spec)
            if target:
                targets[target] = targets.get(target, 0) + 1
    return all(
        use == len(table.chains.get(name, [])) + targets.get(name, 0)
        for name, (_digest, use) in chains.items()
        if name.startswith(_owned_prefixes())
    )


def _memo_chains(table, chains):
    """``{chain: (digest, specs)}`` of the chains read, for the memo."""
    return {
        name: (digest, list(table.chains.get(name, []))) for name, (digest, _use) in chains.items()
    }


def _memo_path():
    """The memo of this network namespace's reads, beside relayroute's host lock."""
    lock = os.environ.get("RELAYROUTE_LOCK", DEFAULT_LOCK)
    try:
        netns = os.stat(f"{_thread_proc()}/ns/net").st_ino
    except OSError:
        netns = 0
    return f"{lock}.iptables-{netns}.json"


def marked_packets(prefix):
    """
    ``{mac: packets}``: the packets the owner's marking rules have marked
    (iptables' own rule counters, ``*-save -c``), in each family read.
    """
    found = {}
    for version in VERSIONS:
        tool = TOOLS[version]
        if not (tool.always_read or _may_hold(tool)):
            continue
        text = _run((f"{tool.command}-save", "-c", "-t", TABLE))
        for mac, packets in _counted(text, prefix):
            found[mac] = found.get(mac, 0) + packets
    return found


def _counted(text, prefix):
    """``(mac, packets)`` of each owned marking rule in ``*-save -c`` output."""
    for line in text.splitlines():
        if not line.startswith("[") or f" -A {prefix}" not in line:
            continue
        counters, _rest = line.split("]", 1)
        words = line.split()
        if "--mac-source" not in words or "--set-xmark" not in words:
            continue
        packets = int(counters.lstrip("[").split(":")[0])
        yield words[words.index("--mac-source") + 1].lower(), packets


def _owned_prefixes():
    return tuple(owner.chain_prefix for owner in planner.OWNERS.values())


def _run(argv):
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, check=False, env=_env(), timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackendError(f"{' '.join(argv)}: {err}") from err
    if proc.returncode != 0:
        raise BackendError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _save(tool):
    return parse_table(_run(tool.save), owned=_owned_prefixes())


def read_part(prefix):
    """
    The owner's part of each family's mangle table alone: its chains (names
    starting with ``prefix``) and the built-in chains it hooks into
    (:data:`HOOKS`), what verifying a transaction just written compares.

    With iptables-nft the owner's chains are found in the table's view
    (:func:`_nft_view`: its chain names; no other tool's rules fetched),
    the view the memo records the listings under; then each of those chains
    and each hook chain is listed by its own ``iptables -t mangle -S CHAIN``,
    which fetches
    that chain's rules alone: the cost does not grow with other tools' rules
    (1.3 ms of CPU per process beside 10,000 rules of another tool's chain as
    without them, where ``iptables-save -t mangle`` costs 37 ms). A family
    holding none of the owner's chains holds no jump to them either (iptables
    refuses a jump to a missing chain): nothing is run for it.
    iptables-legacy fetches the whole table for any listing: there, and when
    the chain names cannot be told, the tables are read as :func:`read`
    reads them.
    """
    tables, done = {}, []
    memo = nftview.Memo.load(_memo_path())
    for version in VERSIONS:
        tool = TOOLS[version]
        seen = _nft_view(tool)
        names = _owned_chain_names(tool, prefix, seen)
        if names is None:
            if tool.always_read or _may_hold(tool):
                tables[version] = _save(tool)
                done.append(version)
            continue
        if names:
            listed = [_run((tool.command, "-t", TABLE, "-S", name)) for name in names]
            tables[version] = parse_listing("".join(listed))
            if seen is not None and _nft_view(tool) == seen:
                # The chains listed, for the memo: the next no-op lists nothing.
                read_ = {name: seen[1][name] for name in names if name in seen[1]}
                known = memo.get(version)
                known.update(_memo_chains(tables[version], read_))
                memo.put(version, {name: known[name] for name in seen[1] if name in known})
        done.append(version)
    memo.save()
    return Ruleset(tables=tables, read=tuple(done))


def _owned_chain_names(tool, prefix, seen=None):
    """
    The hook chains then the owner's chains to list in ``tool``'s family
    (none when it holds no chain of the owner's), or None when they cannot
    be told without reading the whole table (legacy, no netlink answer).
    ``seen``: the table's :func:`_nft_view` when one was taken (its chain
    names), else the names come from a dump of the family's chains.
    """
    kind = flavour(tool)
    if kind is None:
        return []
    if kind != "nft":
        return None
    if seen is not None:
        names = seen[0]
    else:
        chains = nft_chains(tool.nfproto)
        if chains is None:
            return None
        names = {name for table, name in chains if table == TABLE}
    owned = sorted(name for name in names if name.startswith(prefix))
    if not owned:
        return []
    return [*HOOKS.values(), *owned]


def parse_listing(text):
    """A :class:`Table` from ``iptables -t mangle -S CHAIN`` outputs (``-P``/``-N``, ``-A``)."""
    table = Table()
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(("-P ", "-N ")):
            table.chains.setdefault(line.split()[1], [])
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            table.chains.setdefault(chain, []).append(spec)
    return table


def flavour(tool):
    """
    ``"nft"``, ``"legacy"``, or None (no such tool; "" when it cannot be told):
    which kernel interface ``tool``'s save command speaks, from the binary it
    resolves to (xtables-nft-multi, xtables-legacy-multi; CentOS 7's
    xtables-multi is legacy), without running it.
    """
    path = shutil.which(tool.save[0])
    if not path:
        return None
    real = os.path.basename(os.path.realpath(path))
    if "nft" in real:
        return "nft"
    if "legacy" in real or real in ("xtables-multi", f"{tool.command}-multi"):
        return "legacy"
    return ""


def _may_hold(tool):
    """
    Whether ``tool``'s mangle table may hold chains of relayroute's, told
    without a process: iptables-nft's are chains of nf_tables' table
    ``mangle`` in the family's nfproto (a netlink dump of chain names);
    iptables-legacy's table exists only when this network namespace lists it
    in ``ip6_tables_names``. When unsure: True (read it).
    """
    kind = flavour(tool)
    if kind is None:
        return False  # no tool: nothing it could have written
    if kind == "legacy":
        path = f"{_thread_proc()}/net/{tool.legacy_tables}"
        try:
            with open(path) as handle:
                return TABLE in handle.read().split()
        except FileNotFoundError:
            return False  # the family's x_tables module is not even loaded
        except OSError:
            return True
    if kind == "nft":
        chains = nft_chains(tool.nfproto)
        if chains is None:
            return True
        prefixes = tuple(owner.chain_prefix for owner in planner.OWNERS.values())
        return any(table == TABLE and name.startswith(prefixes) for table, name in chains)
    return True


def _thread_proc():
    """
    This thread's /proc directory: its network namespace's view (a thread may
    have entered another namespace than the process's: a test, a Salt thread).
    /proc/thread-self is Linux 3.17+; CentOS 7's 3.10 has the task directory.
    """
    native_id = getattr(threading, "get_native_id", None)  # Python 3.8+
    if native_id is None:
        return "/proc/thread-self"
    return f"/proc/self/task/{native_id()}"


def nft_chains(nfproto):
    """``{(table, chain)}`` of every nf_tables chain of ``nfproto`` (see :func:`nftview.chains`)."""
    return nftview.chains(nfproto)


def _restore(argv, payload):
    try:
        return subprocess.run(
            argv,
            input=payload,
            capture_output=True,
            text=True,
            check=False,
            env=_env(),
            timeout=XTABLES_WAIT + 60,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackendError(f"{' '.join(argv)}: {err}") from err


def _restore_one(tool, text):
    """One family's transaction (one ``*-restore --noflush --wait`` process): all or nothing."""
    argv = (*tool.restore, *WAIT)
    proc = _restore(argv, text)
    if proc.returncode != 0 and _no_wait_option(proc.stderr):
        argv = tool.restore
        proc = _restore(argv, text)
    if proc.returncode != 0:
        raise BackendError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}\n"
            f"transaction was:\n{text}"
        )


def apply(payload):
    """
    Write a :class:`Transaction`: each family's part with its own tool, IPv4
    first, each all or nothing (waiting up to XTABLES_WAIT seconds for the
    xtables lock). When a later part fails, the parts already written are put
    back to what they were (their ``undo``), and the error names the tool that
    failed and says whether the others were put back.
    """
    if not isinstance(payload, Transaction):  # its text, e.g. edited
        payload = Transaction.parse(payload)
    written = []
    for version, text in payload.parts:
        try:
            _restore_one(TOOLS[version], text)
        except BackendError as err:
            if not written:
                raise
            raise BackendError(f"{err}\n{_put_back(payload, written)}") from err
        written.append(version)


def _put_back(payload, written):
    """Undo the parts ``written`` (newest first); a sentence saying what became of them."""
    names = " and ".join(TOOLS[version].command for version in written)
    problems = []
    for version in reversed(written):
        undo = payload.undo.get(version)
        if undo is None:
            continue  # the part only tidied (a duplicate jump): nothing to put back
        try:
            _restore_one(TOOLS[version], undo)
        except BackendError as err:
            problems.append(str(err))
    if problems:
        return f"{names}' part was written and putting it back failed: " + "; ".join(problems)
    return f"{names}' part, already written, was put back as it was"


def _no_wait_option(stderr):
    """Whether iptables-restore refused --wait itself (an iptables before 1.6.2)."""
    text = stderr.lower()
    return "wait" in text and any(
        word in text for word in ("unrecognized option", "invalid option", "unknown option")
    )
