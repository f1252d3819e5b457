"""
iptables-nft's tables as nf_tables holds them, seen over nfnetlink from this
process: no ``iptables`` process runs and no rule of another chain is fetched.

- :func:`chains`: the names of every chain of a family (one dump, no rules).
- :func:`view`: the chain names of one table and, for each chain relayroute
  reads, a digest of its rules (each rule's handle, position and
  expressions, its counters left out) and its reference count. The rules
  are fetched chain by chain (the kernel filters a rule dump by table and
  chain), so the cost does not grow with other tools' chains.

nf_tables never changes a rule in place: a rule replaced, or a table written
again, gets new handles (never reused while the table exists), and the
digest covers every byte the kernel reports of a rule but its counters. Two
equal digests of a chain are therefore the same rules, and what
``iptables-save`` or ``iptables -S`` printed of them once is what it would
print again. The iptables backend keeps that printout per chain in a memo
(:class:`Memo`) and lists only the chains whose digest moved.

A chain's reference count (``use``) is its number of rules plus the number of
rules that jump or go to it, wherever they are: a jump to one of relayroute's
chains from a chain it does not read shows as a count that the chains it
read do not account for.

Kernels whose rule dumps ignore the table and chain filter (before Linux
4.19 or so) answer with every rule: the rules of other chains are skipped here,
at a cost that grows with them, as before.
"""

import errno
import hashlib
import json
import os
import socket
import struct
import tempfile

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_CHAIN_USE = 6
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_RULE_EXPRESSIONS = 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME = 1
NLA_TYPE_MASK = 0x3FFF
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_HEADER = struct.Struct("=IHHII")
NFGENMSG = struct.Struct("=BBH")
NLATTR = struct.Struct("=HH")
# Expressions whose dumped values change with traffic, not with the ruleset.
VOLATILE = ("counter",)
# Answers that mean "nothing here": no nf_tables in this kernel, no such chain.
EMPTY = (0, -errno.EOPNOTSUPP, -errno.EPROTONOSUPPORT, -errno.ENOENT)


def attributes(data, start, end):
    """``[(type, value, whole attribute)]`` (bytes) from ``start`` to ``end``; None if malformed."""
    found = []
    at = start
    while at + NLATTR.size <= end:
        size, kind = NLATTR.unpack_from(data, at)
        if size < NLATTR.size or at + size > end:
            return None
        value = data[at + NLATTR.size : at + size]
        found.append((kind & NLA_TYPE_MASK, value, data[at : at + size]))
        at += (size + 3) & ~3
    return found


def _string(value):
    return value.split(b"\0", 1)[0].decode(errors="replace")


def _attr(name, text):
    value = text.encode() + b"\0"
    return NLATTR.pack(NLATTR.size + len(value), name) + value + bytes(-len(value) % 4)


def messages(data, seq, found):
    """
    Add the attribute lists of one netlink read's messages (of request
    ``seq``) to ``found``. None: more to come; True: the dump ended; False:
    the kernel refused it, marked it interrupted, or sent something malformed.
    """
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, flags, mseq, _pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            return False
        if mseq == seq:
            if kind == NLMSG_DONE:
                return True
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, offset + NLMSG_HEADER.size)
                return code in EMPTY
            if flags & NLM_F_DUMP_INTR:
                return False
            attrs = attributes(data, offset + NLMSG_HEADER.size + NFGENMSG.size, offset + length)
            if attrs is None:
                return False
            found.append(attrs)
        offset += (length + 3) & ~3
    return None


class _Session:
    """One NETLINK_NETFILTER socket in this thread's network namespace."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.seq = 0

    def close(self):
        self.sock.close()

    def dump(self, msg_type, nfproto, attrs=b""):
        """The attribute lists of every message of one dump; None when it cannot be told."""
        self.seq += 1
        body = NFGENMSG.pack(nfproto, 0, 0) + attrs
        kind = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
        header = NLMSG_HEADER.pack(
            NLMSG_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0
        )
        self.sock.send(header + body)
        found = []
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            done = messages(data, self.seq, found)
            if done is not None:
                return found if done else None


def _session():
    try:
        session = _Session()
    except OSError:
        return None
    try:
        session.sock.bind((0, 0))
    except OSError:
        session.close()
        return None
    return session


def chains(nfproto):
    """
    ``{(table, chain)}``: the names of every nf_tables chain of family
    ``nfproto`` in this thread's network namespace, from one netlink dump of
    chains (no rules are fetched, however many there are). None when it
    cannot be told. A kernel without nf_tables has none.
    """
    session = _session()
    if session is None:
        return None
    try:
        found = session.dump(NFT_MSG_GETCHAIN, nfproto)
    except OSError:
        return None
    finally:
        session.close()
    if found is None:
        return None
    return {pair for pair in (_chain_key(attrs) for attrs in found) if pair is not None}


def _chain_key(attrs):
    values = {kind: value for kind, value, _raw in attrs}
    if NFTA_CHAIN_TABLE in values and NFTA_CHAIN_NAME in values:
        return _string(values[NFTA_CHAIN_TABLE]), _string(values[NFTA_CHAIN_NAME])
    return None


def _rule_bytes(attrs):
    """A rule's attributes as the digest takes them: every expression but the volatile ones."""
    parts = []
    for kind, value, raw in attrs:
        if kind != NFTA_RULE_EXPRESSIONS:
            parts.append(raw)
            continue
        elems = attributes(value, 0, len(value))
        if elems is None:  # not a list of expressions: taken whole, never left out
            parts.append(raw)
            continue
        for _elem_kind, elem, elem_raw in elems:
            inner = attributes(elem, 0, len(elem)) or []
            name = next((v for k, v, _r in inner if k == NFTA_EXPR_NAME), b"")
            if _string(name) not in VOLATILE:
                parts.append(elem_raw)
    return b"".join(parts)


def view(nfproto, table, wanted):
    """
    ``(names, chains)`` of ``table`` in family ``nfproto``: ``names`` every
    chain of the table (a frozenset); ``chains`` ``{name: (digest, use)}``
    for each chain for which ``wanted(name)`` is true: the digest (hex) of
    its rules, counters left out, and its reference count (nf_tables'
    ``use``: its rules plus the rules that jump or go to it). None when it
    cannot be told (no nf_tables socket, an interrupted or refused dump).
    """
    session = _session()
    if session is None:
        return None
    try:
        chain_msgs = session.dump(NFT_MSG_GETCHAIN, nfproto)
        if chain_msgs is None:
            return None
        names, uses = set(), {}
        for attrs in chain_msgs:
            key = _chain_key(attrs)
            if key is None or key[0] != table:
                continue
            names.add(key[1])
            use = next((v for k, v, _r in attrs if k == NFTA_CHAIN_USE), b"")
            uses[key[1]] = struct.unpack(">I", use)[0] if len(use) == 4 else -1
        chains = {}
        for name in sorted(name for name in names if wanted(name)):
            which = _attr(NFTA_RULE_TABLE, table) + _attr(NFTA_RULE_CHAIN, name)
            rules = session.dump(NFT_MSG_GETRULE, nfproto, which)
            if rules is None:
                return None
            digest = hashlib.sha256()
            for attrs in rules:
                values = {kind: value for kind, value, _raw in attrs}
                # A kernel that ignores the filter answers with every rule.
                if _string(values.get(NFTA_RULE_TABLE, b"")) != table:
                    continue
                if _string(values.get(NFTA_RULE_CHAIN, b"")) != name:
                    continue
                rule = _rule_bytes(attrs)
                digest.update(struct.pack("=I", len(rule)) + rule)
            chains[name] = (digest.hexdigest(), uses[name])
        return frozenset(names), chains
    except OSError:
        return None
    finally:
        session.close()


class Memo:
    """
    What relayroute last read of each chain, per family, with the digest of
    that chain's rules when it was read: ``{version: {chain: (digest,
    specs)}}``, in one JSON file per network namespace beside relayroute's
    host lock (``/run``: a reboot starts without it). Losing it costs one
    read; a file that cannot be read or written is ignored.
    """

    def __init__(self, path, records=None):
        self.path = path
        self.records = dict(records or {})
        self.changed = False

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            records = {
                int(version): {
                    name: (str(record[0]), [str(spec) for spec in record[1]])
                    for name, record in chains.items()
                }
                for version, chains in data.items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
            records = {}
        return cls(path, records)

    def get(self, version):
        """``{chain: (digest, specs)}`` last read in ``version`` (empty when none)."""
        return {
            name: (digest, list(specs))
            for name, (digest, specs) in self.records.get(version, {}).items()
        }

    def put(self, version, chains):
        """Record ``{chain: (digest, specs)}`` as what ``version`` holds now."""
        record = {name: (digest, list(specs)) for name, (digest, specs) in chains.items()}
        if self.records.get(version) != record:
            self.records[version] = record
            self.changed = True

    def save(self):
        if not self.changed:
            return
        data = {
            str(version): {name: [digest, specs] for name, (digest, specs) in chains.items()}
            for version, chains in sorted(self.records.items())
        }
        try:
            directory = os.path.dirname(self.path) or "."
            os.makedirs(directory, mode=0o755, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=".relayroute-memo-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(data, handle, sort_keys=True)
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError:
            return
        self.changed = False
