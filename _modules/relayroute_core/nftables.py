"""
nftables backend: renders a plan's chains into a table of relayroute's own,
``table inet relayroute_<role>`` (one per role, both families), reads it with
one ``list table`` and replaces it whole in one transaction.

Layout (relay role, mark_mask 0xff, one proxy with mark 0xfe)::

    table inet relayroute_relay {
        chain OUT {     # type route hook output priority mangle - 1
            meta mark set meta mark & 0xffffff00                    # restore_mark
            ct mark & 0xff == 0xfe meta mark set meta mark & 0xfffffffe | 0xfe
        }
        chain PRE {     # type filter hook prerouting priority mangle - 1
            meta mark set meta mark & 0xffffff00                    # restore_mark
            ct mark & 0xff == 0xfe meta mark set meta mark & 0xfffffffe | 0xfe
            meta mark & 0xff != 0x0 return                          # return_if_marked
            ip saddr 192.0.2.0/24 return                            # return_if_source
            ether saddr 02:00:c0:00:02:02 counter meta mark set meta mark & 0xfffffffe | 0xfe
            meta mark & 0xff == 0xfe ct mark set ct mark & 0xfffffffe | 0xfe   # save_mark
            meta mark & 0xff == 0x0 ct mark set ct mark & 0xffffff00
        }
    }

The mask: only relayroute's bits of the packet mark and of the connmark ever
change. nft before 1.1.2 (Debian 12, RHEL 9) refuses ``meta mark set meta mark
& X | ct mark & Y`` (two non-constant operands), and ``meta mark set ct mark
and MASK`` (what iptables-translate makes of ``--restore-mark``) wipes the
other users' bits. So a restore clears relayroute's bits of the packet mark,
then, per mark value the plan sets, a rule sets ``meta mark & ~MASK | VALUE``
where the connmark holds that value (constants only); a save sets the
connmark the same way from the packet mark, in one write per packet (a
connmark is never cleared on its way to a value). A value relayroute no
longer plans (a proxy's old mark during a mark change) restores as 0, after
which the next packet from the proxy's MAC marks the connection again (the
engine moves such connmarks right after the transaction). No rule looks
anything up in a set: see :func:`_copy_bits` for what a set lookup did to
established flows while the table was replaced. nft prints ``x & A | B`` as
``x & (A | B) | B`` (same result); the renderer writes that form itself, so
what it compares is what the kernel holds.

The proxy role (``table inet relayroute_proxy``): ``PRE`` takes TCP packets
of transparent sockets (``meta l4proto tcp socket transparent 1``) to
``socket-DIVERT``, which returns for a listener bound to a wildcard address
(``socket wildcard 1``: xt_socket skips those by itself, nft's socket
expression does not) and otherwise jumps to ``DIVERT`` (the divert mark under
the mask, accept). Not ``socket transparent 1 socket wildcard 0`` in one rule:
``socket wildcard`` matches nothing on a socket that is not a full one (the
request socket of a handshake in SYN_RECV, TIME_WAIT), so a handshake's final
ACK would not be diverted and the connection would never complete (seen on
Linux 6.18: the first SYN is diverted, the retransmissions and the ACK not).

Priorities: every base chain hooks at ``mangle - 1`` (-151): after conntrack
(-200, so the connmark is there), before iptables-nft's ``table ip mangle``
(-150, which so sees relayroute's marks, as with the iptables backend's jumps
first in PREROUTING/OUTPUT) and firewalld's mangle chains (-140). At one and
the same priority, order is registration order: on Linux 6.18 the base chain
registered last runs first (measured), so at ``mangle`` itself relayroute would
run before or after iptables-nft's mangle depending on which table was created
last (a Docker restart would swap them); -151 is the same on every host. The
OUTPUT restore is a ``type route`` chain: a ``filter`` chain sets the mark but
the packet is not routed again.

Reading: ``list table inet relayroute_<role>`` in JSON, per role with chains
(a missing table is empty); writing: ``table inet X {}`` + ``delete table inet
X`` + the full definition, one batch, all or nothing, no other table named.

Process or library: both speak the same netlink to the kernel; the library
(``libnftables.so.1``: Debian's libnftables1, RHEL's nftables; the ``nft``
binary's own dependency, so present wherever ``nft`` is) is reached through
ctypes, in process, with nothing from PyPI. Measured on Debian 12 (nft 1.0.6,
Linux 6.18, 2 cores), relay table in place, medians of 200 in a namespace:

    one ``list table`` (JSON)          library 0.29 ms    ``nft -j`` process 3.5 ms
    read(): relay, proxy, policy       library 0.67 ms    3 processes        8.1 ms
      beside 10,000 rules of another tool's inet table: 0.88 ms (its rules are
      never fetched; the apply stays at 12.7 ms)
    apply: the table replaced whole    library 12.1 ms    ``nft -f`` process 16.0 ms
      (CPU of that apply)                      0.72 ms                       4.0 ms
    whole-process CPU of a no-op read, a fresh Python over import alone (30 runs):
                                       library +3.8 ms    one process        +9.7 ms

The apply's wall time is the kernel's commit either way. The library is 5-12x
cheaper per read, and a no-op apply spawns no process at all; so the library,
and no ``nft`` binary is needed at run time (the boot restore script uses it).
A fresh context per call: a context's netlink socket belongs to the network
namespace it was opened in, and a cached one would act on the wrong namespace
after a ``setns`` (the tests' namespaces, a Salt thread).
"""

import ctypes
import errno
import ipaddress
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from . import planner

NAME = "nftables"
FAMILY = "inet"
TABLE_PREFIX = "relayroute_"
# nft's named priorities; relayroute's base chains hook just before mangle.
MANGLE = -150
PRIORITY = MANGLE - 1
HOOKS = {"prerouting": ("filter", "prerouting"), "output": ("route", "output")}
FULL = 0xFFFFFFFF
LIBRARY = "libnftables.so.1"

META_MARK = {"meta": {"key": "mark"}}
CT_MARK = {"ct": {"key": "mark"}}
TARGETS = {"mark": META_MARK, "ctmark": CT_MARK}


class BackendError(RuntimeError):
    """An nftables command failed; the message carries the command and nft's error."""


# --- the table as data -------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """One chain: ``base`` is ``(type, hook, priority, policy)`` for a base chain."""

    base: Optional[Tuple[str, str, int, str]]
    rules: Tuple[str, ...]  # each rule's statements as canonical JSON

    def statements(self):
        return [json.loads(rule) for rule in self.rules]


@dataclass
class Ruleset:
    """relayroute's tables as the kernel has them: ``{table name: {chain: Chain}}``."""

    tables: Dict[str, Optional[Dict[str, Chain]]] = field(default_factory=dict)

    def owned(self, prefix):
        """The owner's table (``{chain name: Chain}``), or None when it does not exist."""
        return self.tables.get(table_name(prefix))


def table_name(prefix_or_owner):
    """``relayroute_<role>`` for an :class:`planner.Owner` or its chain prefix."""
    if isinstance(prefix_or_owner, planner.Owner):
        return TABLE_PREFIX + prefix_or_owner.role
    for owner in planner.OWNERS.values():
        if prefix_or_owner in (owner.chain_prefix, owner.role, TABLE_PREFIX + owner.role):
            return TABLE_PREFIX + owner.role
    raise ValueError(f"nftables backend: no relayroute owner has prefix {prefix_or_owner!r}")


def _canonical(value):
    """
    A rule's statements with set elements in one order and counters without
    their values: equal rules, equal JSON text.
    """
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "counter":
                out[key] = None
            elif key == "set" and isinstance(item, list):
                elements = (_canonical(x) for x in item)
                out[key] = sorted(elements, key=lambda x: json.dumps(x, sort_keys=True))
            else:
                out[key] = _canonical(item)
        return out
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


def _rule(statements):
    return json.dumps(_canonical(statements), sort_keys=True)


# --- rendering abstract rules ------------------------------------------------


def _match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def _and(expr, value):
    """``expr & value``; nft drops a full mask, so the renderer does too."""
    return expr if value == FULL else {"&": [expr, value]}


def _set_bits(target, value, mask):
    """
    ``target set target & ~mask | value``, in the form nft keeps: constants
    only, so every nft and kernel takes it; the target's other bits stay.
    """
    value &= mask
    keep = ~mask & FULL
    if not keep:
        new = value
    elif value:
        new = {"|": [_and(target, keep | value), value]}
    else:
        new = _and(target, keep)
    return {"mangle": {"key": target, "value": new}}


def _copy_bits(kind, source, mask, values):
    """
    Copy ``source``'s bits under ``mask`` into ``kind``'s target, constants
    only and no set: one rule per value the plan sets (``source & mask ==
    value target set target & ~mask | value``), and for a source with none of
    them, the target's bits cleared. Each packet so writes the target once:
    a connmark is never cleared on the way to its value, and no other CPU
    (another packet of the flow, a conntrack reader) sees it 0 meanwhile.

    No verdict map either: a table replaced while packets traverse it is
    evaluated, for a packet that began before the commit, in the previous
    generation's rules, but its sets are looked up in the new generation,
    where the previous table's anonymous sets hold nothing. A dispatch
    through a map then missed, an established flow's connmark was cleared
    and not set again, and its replies took the main table until the next
    packet from the proxy marked it anew (measured on 30 busy flows: 62-120
    connmark changes in 200 replacements with maps, none with constants;
    tests/functional/test_replace_race.py).
    """
    target = TARGETS[kind]
    key = _and(source, mask)
    planned = sorted({v & mask for v in values} - {0})
    if kind == "mark":
        # The packet's own mark: cleared, then set (nobody else sees it meanwhile).
        rules = [[_set_bits(target, 0, mask)]]
        return rules + [[_match(key, value), _set_bits(target, value, mask)] for value in planned]
    rules = [[_match(key, value), _set_bits(target, value, mask)] for value in planned]
    return rules + [[_match(key, 0), _set_bits(target, 0, mask)]]


# ICMPv6 neighbour discovery (RFC 4861): never a client's connection, never marked.
ND_TYPES = (
    "nd-router-solicit",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "nd-redirect",
)


def _source(net):
    """``ip saddr`` / ``ip6 saddr`` by the network's own family."""
    network = ipaddress.ip_network(net, strict=False)
    protocol = "ip" if network.version == 4 else "ip6"
    left = {"payload": {"protocol": protocol, "field": "saddr"}}
    if network.prefixlen == network.max_prefixlen:
        return left, str(network.network_address)
    return left, {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def render_rule(rule, values, helpers):
    """
    One abstract rule as nft rules (each a list of JSON statements).
    ``values``: the marks the plan sets (restore and save test each of them);
    ``helpers`` collects the helper chains the rules jump to (the proxy's socket check).
    """
    kind, args = rule[0], rule[1:]
    if kind == "restore_mark":
        (mask,) = args
        return _copy_bits("mark", CT_MARK, mask, values)
    if kind == "save_mark":
        (mask,) = args
        return _copy_bits("ctmark", META_MARK, mask, values)
    if kind == "return_if_marked":
        (mask,) = args
        return [[_match(_and(META_MARK, mask), 0, "!="), {"return": None}]]
    if kind == "return_if_neighbour_discovery":
        # One rule per type, no anonymous set: see _copy_bits on sets during a replacement.
        left = {"payload": {"protocol": "icmpv6", "field": "type"}}
        return [[_match(left, nd), {"return": None}] for nd in ND_TYPES]
    if kind == "return_if_source":
        (net,) = args
        return [[_match(*_source(net)), {"return": None}]]
    if kind == "mark_from_mac":
        mac, mark, mask = args
        ether = {"payload": {"protocol": "ether", "field": "saddr"}}
        # The counter is what relayroute.status reports as marked packets
        # (iptables counts every rule by itself); compared without its values.
        return [[_match(ether, mac.lower()), {"counter": None}, _set_bits(META_MARK, mark, mask)]]
    if kind == "set_mark":
        mark, mask = args
        return [[_set_bits(META_MARK, mark, mask)]]
    if kind == "accept":
        return [[{"accept": None}]]
    if kind == "jump_transparent_socket":
        (target,) = args
        # xt_socket (``-m socket --transparent``) skips listeners bound to a
        # wildcard address; nft's socket expression does not by itself. And
        # ``socket wildcard`` does not match at all on sockets that are not
        # full ones: the request socket of a SYN_RECV handshake, a TIME_WAIT
        # one. ``socket transparent 1 socket wildcard 0`` in one rule would so
        # miss a handshake's retransmitted SYN and final ACK (measured: the
        # connection to a transparent listener never completes). A helper
        # chain returns for a full socket on a wildcard address, and diverts
        # every other transparent one, as xt_socket does.
        name = f"socket-{target}"
        helpers[name] = Chain(
            None,
            (
                _rule([_match({"socket": {"key": "wildcard"}}, 1), {"return": None}]),
                _rule([{"jump": {"target": target}}]),
            ),
        )
        return [
            [
                _match({"meta": {"key": "l4proto"}}, "tcp"),
                _match({"socket": {"key": "transparent"}}, 1),
                {"jump": {"target": name}},
            ]
        ]
    raise ValueError(f"nftables backend cannot render rule {rule!r}")


def _plan_marks(plan):
    marks = set()
    for chain in plan.chains:
        for rule in chain.rules:
            if rule[0] == "mark_from_mac":
                marks.add(rule[2])
            elif rule[0] == "set_mark":
                marks.add(rule[1])
    return marks


def desired(plan):
    """The table a plan asks for (``{chain name: Chain}``), or None for no table."""
    if not plan.chains:
        return None
    values = _plan_marks(plan)
    chains, helpers = {}, {}
    for chain in plan.chains:
        rules = []
        for rule in chain.rules:
            rules += [_rule(statements) for statements in render_rule(rule, values, helpers)]
        base = None
        if chain.hook:
            kind, hook = HOOKS[chain.hook]
            base = (kind, hook, PRIORITY, "accept")
        chains[chain.name] = Chain(base, tuple(rules))
    chains.update(helpers)
    return chains


# --- printing (JSON -> nft syntax) -------------------------------------------


class Unprintable(ValueError):
    """A statement this backend does not write (someone else's change to the table)."""


def _mentions_mark(expr):
    return '"mark"' in json.dumps(expr)


def _is_binary(expr):
    return isinstance(expr, dict) and len(expr) == 1 and next(iter(expr)) in ("&", "|", "^")


def _value(expr, hexa):
    if isinstance(expr, bool):
        return str(int(expr))
    if isinstance(expr, int):
        return f"{expr:#x}" if hexa else str(expr)
    if isinstance(expr, str):
        return expr
    if isinstance(expr, dict) and len(expr) == 1:
        ((key, body),) = expr.items()
        if key in ("meta", "ct", "socket"):
            return f"{key} {body['key']}"
        if key == "payload" and "protocol" in body:
            return f"{body['protocol']} {body['field']}"
        if key in ("&", "|", "^"):
            left, right = body
            return f"{_value(left, True)} {key} {_value(right, True)}"
        if key == "prefix":
            return f"{body['addr']}/{body['len']}"
        if key == "set" and isinstance(body, list):
            # An anonymous set (``icmpv6 type { nd-router-solicit, ... }``); the
            # canonical form keeps its elements sorted, and so prints them.
            return "{ " + ", ".join(_value(item, hexa) for item in body) + " }"
    raise Unprintable(f"nftables backend does not print {json.dumps(expr)}")


def _verdict(item):
    if isinstance(item, dict) and len(item) == 1:
        ((key, body),) = item.items()
        if key in ("jump", "goto"):
            return f"{key} {body['target']}"
        if key in ("accept", "drop", "return", "continue"):
            return key
    raise Unprintable(f"nftables backend does not print {json.dumps(item)}")


def _statement(item):
    if isinstance(item, dict) and len(item) == 1:
        ((key, body),) = item.items()
        if key == "match":
            hexa = _mentions_mark(body["left"])
            # nft's own print: "ether saddr X", but "ct mark & 0xff == 0xfe".
            plain = body["op"] == "==" and not _is_binary(body["left"])
            op = "" if plain else f"{body['op']} "
            return f"{_value(body['left'], hexa)} {op}{_value(body['right'], hexa)}"
        if key == "mangle":
            return f"{_value(body['key'], True)} set {_value(body['value'], True)}"
        if key == "counter":
            return "counter"
        if key == "vmap":
            hexa = _mentions_mark(body["key"])
            elements = ", ".join(
                f"{_value(k, hexa)} : {_verdict(v)}" for k, v in body["data"]["set"]
            )
            return f"{_value(body['key'], hexa)} vmap {{ {elements} }}"
    return _verdict(item)


def rule_text(rule):
    """One rule (canonical JSON) in nft syntax."""
    return " ".join(_statement(item) for item in json.loads(rule))


def _priority(prio):
    offset = prio - MANGLE
    if offset == 0:
        return "mangle"
    return f"mangle {'-' if offset < 0 else '+'} {abs(offset)}"


def _base_text(base):
    kind, hook, prio, policy = base
    return f"type {kind} hook {hook} priority {_priority(prio)}; policy {policy};"


def _ordered(chains):
    """Base chains first, then the chains they jump to; by name within each."""
    return sorted(chains, key=lambda name: (chains[name].base is None, name))


def definition(name, chains):
    """The ``table inet NAME { ... }`` block that creates ``chains``."""
    lines = [f"table {FAMILY} {name} {{"]
    for chain in _ordered(chains):
        lines.append(f"\tchain {chain} {{")
        if chains[chain].base:
            lines.append(f"\t\t{_base_text(chains[chain].base)}")
        lines += [f"\t\t{rule_text(rule)}" for rule in chains[chain].rules]
        lines.append("\t}")
    lines.append("}")
    return lines


def replacement(name, chains):
    """
    One ``nft -f`` batch replacing table ``name`` whole (``chains`` None: removing
    it): declare it (so the delete never fails), delete it, define it again.
    """
    lines = [f"table {FAMILY} {name} {{}}", f"delete table {FAMILY} {name}"]
    if chains is not None:
        lines += definition(name, chains)
    return "\n".join(lines) + "\n"


def _lines(name, chains):
    if chains is None:
        return []
    lines = [f"add table {FAMILY} {name}"]
    for chain in _ordered(chains):
        base = chains[chain].base
        hook = f" {{ {_base_text(base)} }}" if base else ""
        lines.append(f"add chain {FAMILY} {name} {chain}{hook}")
    for chain in _ordered(chains):
        lines += [f"add rule {FAMILY} {name} {chain} {rule_text(r)}" for r in chains[chain].rules]
    return lines


def owned_lines(ruleset, prefix):
    """The owner's table as nft commands, for diffs and reports."""
    name = table_name(prefix)
    try:
        return _lines(name, ruleset.owned(prefix))
    except Unprintable as err:
        return [f"# table {FAMILY} {name}: {err}"]


def desired_lines(plan):
    return _lines(table_name(plan.owner), desired(plan))


# --- diff, transactions, rollback, boot ----------------------------------------


def transaction(plan, ruleset):
    """
    The ``nft -f`` batch that turns the owner's table in ``ruleset`` into
    what ``plan`` asks for, or None when they already match.
    """
    return transaction_to(desired(plan), (), ruleset, plan.owner.chain_prefix)


def snapshot(ruleset, prefix):
    """The owner's table now, in the form :func:`transaction_to` takes (no jumps in nftables)."""
    return ruleset.owned(prefix), ()


def transaction_to(want_chains, want_jumps, ruleset, prefix):
    """The batch from the owner's table in ``ruleset`` to ``want_chains`` (None: no table)."""
    del want_jumps  # nftables base chains hook themselves: there are no jumps to keep
    have = ruleset.owned(prefix)
    if have == want_chains:
        return None
    name = table_name(prefix)
    try:
        return replacement(name, want_chains)
    except Unprintable as err:
        raise BackendError(f"table {FAMILY} {name}: {err}") from err


def restore_commands(plan):
    """Shell lines for the boot restore script: the table replaced whole (idempotent)."""
    chains = desired(plan)
    if chains is None:
        return []
    batch = replacement(table_name(plan.owner), chains)
    return ["nft -f - <<'RULES'", *batch.splitlines(), "RULES"]


def merge_saved(text, plan, version=4):
    """
    The network-scripts mechanism keeps relayroute's chains in
    ``/etc/sysconfig/iptables`` (iptables.service; ``ip6tables`` for IPv6,
    ``version`` 6); nftables tables are not restored from there. Only removing
    relayroute's part of such a file (a host that used that mechanism before)
    is done; anything else is refused.
    """
    if not plan.chains:
        from . import iptables  # pylint: disable=import-outside-toplevel

        return iptables.merge_saved(text, plan, version)
    raise ValueError(
        "persist:mechanism: 'network-scripts' restores the packet filter from "
        "/etc/sysconfig/iptables, which the nftables backend does not write; use "
        "persist:mechanism 'unit' with backend 'nftables', or backend 'iptables' "
        "(got 'network-scripts')"
    )


def marked_macs(ruleset, prefix):
    """
    ``{mark: [mac, ...]}``: the source MACs the owner's table marks, and with
    which mark (relayroute's bits), as the kernel has them now.
    """
    found = {}
    for chain in (ruleset.owned(prefix) or {}).values():
        for statements in chain.statements():
            mac = mark = None
            for item in statements:
                body = item.get("match") if isinstance(item, dict) else None
                if body and body["left"] == {"payload": {"protocol": "ether", "field": "saddr"}}:
                    mac = str(body["right"]).lower()
                body = item.get("mangle") if isinstance(item, dict) else None
                if body and body["key"] == META_MARK:
                    value = body["value"]
                    mark = value["|"][1] if isinstance(value, dict) and "|" in value else value
            if mac and isinstance(mark, int):
                found.setdefault(mark, set()).add(mac)
    return {mark: sorted(macs) for mark, macs in found.items()}


def marked_packets(prefix):
    """
    ``{mac: packets}``: the packets the owner's marking rules have marked
    (their counters; the first packet of each connection from the proxy,
    since later ones carry the restored mark), read now. ``{}`` without the
    owner's table.
    """
    code, out, err = run(f"list table {FAMILY} {table_name(prefix)}", json_output=True)
    if code != 0:
        if os.strerror(errno.ENOENT) in err:
            return {}
        raise BackendError(f"nft list table failed: {err.strip()}")
    return _packets_by_mac(json.loads(out))


def _packets_by_mac(document):
    found = {}
    for item in document.get("nftables", []):
        statements = item.get("rule", {}).get("expr", []) if "rule" in item else []
        mac = packets = None
        for statement in statements:
            body = statement.get("match") if isinstance(statement, dict) else None
            if body and body.get("left") == {"payload": {"protocol": "ether", "field": "saddr"}}:
                mac = str(body["right"]).lower()
            counter = statement.get("counter") if isinstance(statement, dict) else None
            if isinstance(counter, dict):
                packets = int(counter.get("packets", 0))
        if mac and packets is not None:
            found[mac] = found.get(mac, 0) + packets
    return found


# --- reading the kernel --------------------------------------------------------


def parse(document):
    """``nft -j list table`` output (parsed JSON) as ``{chain name: Chain}``."""
    chains, rules = {}, {}
    for item in document.get("nftables", []):
        if "chain" in item:
            body = item["chain"]
            base = None
            if "hook" in body:
                base = (body.get("type"), body["hook"], body.get("prio"), body.get("policy"))
            chains[body["name"]] = base
            rules.setdefault(body["name"], [])
        elif "rule" in item:
            body = item["rule"]
            rules.setdefault(body["chain"], []).append(_rule(body.get("expr", [])))
    return {name: Chain(chains.get(name), tuple(rules[name])) for name in rules}


def _tables():
    """relayroute's table names, one per owner."""
    return sorted({table_name(owner) for owner in planner.OWNERS.values()})


def read():
    """
    relayroute's tables, in process (libnftables): one ``list table`` per
    owner; a missing table (ENOENT) reads as None. Not ``list tables`` first:
    nft 1.0.6 fetches every table's rules for that (177 ms with 10,000 rules
    of another tool's, measured), while ``list table X`` fetches X alone
    (0.28 ms with or without them; a missing one 0.05 ms).
    """
    # The library's message carries strerror() of this same process (same locale).
    return _read_tables(_tables())


def read_part(prefix):
    """The owner's table alone (``prefix``: its chain prefix), what verifying an apply compares."""
    return _read_tables([table_name(prefix)])


def _read_tables(names):
    missing = os.strerror(errno.ENOENT)
    ruleset = Ruleset()
    for name in names:
        command = f"list table {FAMILY} {name}"
        code, out, err = run(command, json_output=True)
        if code == 0:
            ruleset.tables[name] = parse(json.loads(out))
        elif missing in err:
            ruleset.tables[name] = None
        else:
            raise BackendError(f"nft {command} failed: {err.strip()}")
    return ruleset


def available():
    """Whether this host has libnftables (CentOS 7 has none)."""
    try:
        library()
    except BackendError:
        return False
    return True


def apply(payload):
    """Write one batch (``nft -f``, in process): all or nothing."""
    code, _out, err = run(payload)
    if code != 0:
        raise BackendError(f"nft -f failed: {err.strip()}\ntransaction was:\n{payload}")


# --- libnftables through ctypes ------------------------------------------------

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4
_lib = None


def library():
    """libnftables, loaded once; BackendError naming the package when it is missing."""
    global _lib  # noqa: PLW0603 - one handle per process
    if _lib is None:
        try:
            lib = ctypes.CDLL(LIBRARY)
        except OSError as err:
            raise BackendError(
                f"the nftables backend needs {LIBRARY} (Debian: libnftables1; RHEL: "
                f"nftables): {err}"
            ) from err
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).restype = ctypes.c_char_p
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        _lib = lib
    return _lib


def run(command, json_output=False):
    """
    Run nft commands in process: ``(return code, output, error text)``. A
    fresh context each time: its netlink socket is the calling thread's
    network namespace's.
    """
    lib = library()
    ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
    if not ctx:
        raise BackendError("nft_ctx_new failed")
    try:
        if json_output:
            lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        code = lib.nft_run_cmd_from_buffer(ctx, command.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
    finally:
        lib.nft_ctx_free(ctx)
    return code, out, err
