"""
The iptables backend's memo of its last whole-table read (nftview.py): what
the digest covers (a rule's bytes but its counters), the memo file, and when
a read runs ``*-save``: on a digest it has no read for, never again while
the digest stays, not when the table changed while it was read, and not
after a verification that listed everything the memo keeps. iptables-legacy
(no digest) reads every time. No root: the kernel's view is a test double.
"""

import json
import struct

import pytest

from relayroute_core import iptables, nftview

PREFIX = "RELAYROUTE-RELAY-"
SAVE = """\
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:RELAYROUTE-RELAY-PRE - [0:0]
:OTHER - [0:0]
-A PREROUTING -j RELAYROUTE-RELAY-PRE
-A PREROUTING -j OTHER
-A INPUT -s 198.51.100.9/32 -j DROP
-A RELAYROUTE-RELAY-PRE -j CONNMARK --restore-mark --nfmask 0xff --ctmask 0xff
-A OTHER -j RETURN
COMMIT
"""
NAMES = frozenset({"PREROUTING", "INPUT", "OUTPUT", "RELAYROUTE-RELAY-PRE", "OTHER"})


def nla(kind, value):
    size = 4 + len(value)
    return struct.pack("=HH", size, kind) + value + bytes(-size % 4)


def expression(name, data):
    return nla(
        nftview.NFTA_LIST_ELEM | 0x8000,
        nla(nftview.NFTA_EXPR_NAME, name.encode() + b"\0") + nla(2 | 0x8000, data),
    )


def rule(handle, *expressions):
    raw = nla(3, struct.pack(">Q", handle)) + nla(
        nftview.NFTA_RULE_EXPRESSIONS | 0x8000, b"".join(expressions)
    )
    return nftview.attributes(raw, 0, len(raw))


def counter(packets):
    return expression(
        "counter", nla(1, struct.pack(">Q", packets * 60)) + nla(2, struct.pack(">Q", packets))
    )


TARGET = expression("target", nla(1, b"CONNMARK\0") + nla(3, bytes(16)))


def test_a_rules_counters_are_left_out_of_its_digest():
    seen = nftview._rule_bytes(rule(7, counter(0), TARGET))
    assert nftview._rule_bytes(rule(7, counter(12345), TARGET)) == seen
    # Another handle (a rule written again) or another expression is another rule.
    assert nftview._rule_bytes(rule(8, counter(0), TARGET)) != seen
    other = expression("target", nla(1, b"CONNMARK\0") + nla(3, b"\1" + bytes(15)))
    assert nftview._rule_bytes(rule(7, counter(0), other)) != seen


def test_the_memo_keeps_each_chains_read_under_its_digest(tmp_path):
    path = tmp_path / "run" / "lock.iptables-1.json"
    memo = nftview.Memo.load(str(path))
    assert memo.get(4) == {}
    memo.put(4, {"PREROUTING": ("d1", ["-j X"])})
    memo.save()
    again = nftview.Memo.load(str(path))
    assert again.get(4) == {"PREROUTING": ("d1", ["-j X"])}
    assert again.get(6) == {}
    # Nothing new: nothing written.
    again.put(4, {"PREROUTING": ("d1", ["-j X"])})
    assert not again.changed
    path.write_text("{not json")
    assert nftview.Memo.load(str(path)).records == {}
    path.write_text(json.dumps({"4": {"PREROUTING": ["d1"]}}))
    assert nftview.Memo.load(str(path)).records == {}


WANTED = ("PREROUTING", "OUTPUT", "RELAYROUTE-RELAY-PRE")


@pytest.fixture
def host(monkeypatch, tmp_path):
    """
    An iptables-nft host whose IPv4 mangle table is SAVE (IPv6 holds nothing):
    the kernel's view is a digest and a reference count per chain read.
    """
    state = {
        "digests": {name: f"{name}-1" for name in WANTED},
        # RELAYROUTE-RELAY-PRE: its rule and PREROUTING's jump.
        "uses": {"PREROUTING": 2, "OUTPUT": 0, "RELAYROUTE-RELAY-PRE": 2},
        "names": NAMES,
        "saves": [],
        "listings": [],
        "during_read": None,
    }

    def view(tool):
        if tool.version == 6:
            return (frozenset(), {})
        chains = {
            name: (state["digests"][name], state["uses"][name])
            for name in state["names"]
            if iptables._wanted(name)
        }
        return (state["names"], chains)

    def meanwhile():
        if state["during_read"]:
            state["during_read"](state)
            state["during_read"] = None

    def save(tool):
        state["saves"].append(tool.command)
        meanwhile()
        return iptables.parse_table(SAVE, owned=iptables._owned_prefixes())

    def run(argv):
        state["listings"].append(argv[-1])
        meanwhile()
        table = iptables.parse_table(SAVE)
        chain = argv[-1]
        lines = [f"-N {chain}"] + [f"-A {chain} {spec}" for spec in table.chains.get(chain, [])]
        return "\n".join(lines) + "\n"

    monkeypatch.setenv("RELAYROUTE_LOCK", str(tmp_path / "lock"))
    monkeypatch.setattr(iptables, "_nft_view", view)
    monkeypatch.setattr(iptables, "_save", save)
    monkeypatch.setattr(iptables, "_run", run)
    monkeypatch.setattr(iptables, "flavour", lambda tool: "nft")
    monkeypatch.setattr(
        iptables,
        "nft_chains",
        lambda nfproto: {("mangle", n) for n in state["names"]} if nfproto == 2 else set(),
    )
    return state


def _same_for_relayroute(a, b):
    for version in (4, 6):
        assert a.table(version).owned(PREFIX) == b.table(version).owned(PREFIX)
        assert a.table(version).jumps(PREFIX) == b.table(version).jumps(PREFIX)
        assert set(a.table(version).chains) == set(b.table(version).chains)


def test_a_read_whose_digests_stand_runs_nothing_and_reads_the_same(host):
    first = iptables.read()
    assert host["saves"] == ["iptables"]  # three chains unknown: more than the listing budget
    second = iptables.read()
    assert (host["saves"], host["listings"]) == (["iptables"], [])
    assert second.read == first.read == (4,)
    _same_for_relayroute(first, second)


def test_a_chain_whose_digest_moved_is_listed_alone(host):
    first = iptables.read()
    host["digests"]["PREROUTING"] = "PREROUTING-2"  # another tool's rule there
    second = iptables.read()
    assert (host["saves"], host["listings"]) == (["iptables"], ["PREROUTING"])
    _same_for_relayroute(first, second)
    iptables.read()
    assert (host["saves"], host["listings"]) == (["iptables"], ["PREROUTING"])


def test_more_moved_chains_than_the_budget_save_the_family(host):
    iptables.read()
    for name in WANTED:
        host["digests"][name] = f"{name}-2"
    iptables.read()
    assert (host["saves"], host["listings"]) == (["iptables", "iptables"], [])


def test_a_reference_from_a_chain_not_read_saves_the_family(host):
    iptables.read()
    host["uses"]["RELAYROUTE-RELAY-PRE"] = 3  # a jump from INPUT, say: no digest moved
    iptables.read()
    assert host["saves"] == ["iptables", "iptables"]


def test_a_table_that_changed_while_it_was_read_is_not_kept(host):
    def another_tool(state):
        state["digests"]["RELAYROUTE-RELAY-PRE"] = "RELAYROUTE-RELAY-PRE-2"

    host["during_read"] = another_tool
    iptables.read()
    iptables.read()  # nothing was kept: read again
    assert (host["saves"], host["listings"]) == (["iptables", "iptables"], [])
    iptables.read()
    assert (host["saves"], host["listings"]) == (["iptables", "iptables"], [])


def test_a_verification_spares_the_next_read(host):
    iptables.read_part(PREFIX)
    assert host["saves"] == []
    assert host["listings"] == ["PREROUTING", "OUTPUT", "RELAYROUTE-RELAY-PRE"]
    iptables.read()
    assert host["saves"] == []
    assert host["listings"] == ["PREROUTING", "OUTPUT", "RELAYROUTE-RELAY-PRE"]


def test_a_verification_of_one_role_on_a_host_with_both_leaves_the_others_chain_to_list(host):
    host["names"] = NAMES | {"RELAYROUTE-PROXY-DIVERT"}
    host["digests"]["RELAYROUTE-PROXY-DIVERT"] = "divert-1"
    host["uses"]["RELAYROUTE-PROXY-DIVERT"] = 0
    iptables.read_part(PREFIX)
    iptables.read()
    assert host["saves"] == []
    assert host["listings"][3:] == ["RELAYROUTE-PROXY-DIVERT"]


def test_iptables_legacy_reads_every_time(host, monkeypatch):
    monkeypatch.setattr(iptables, "_nft_view", lambda tool: None)
    monkeypatch.setattr(iptables, "_may_hold", lambda tool: tool.version == 4)
    iptables.read()
    iptables.read()
    assert host["saves"] == ["iptables", "iptables"]


def test_a_table_without_any_owners_chain_needs_no_read(host):
    host["names"] = frozenset({"PREROUTING", "OUTPUT", "OTHER"})
    ruleset = iptables.read()
    assert (host["saves"], host["listings"]) == ([], [])
    assert ruleset.read == (4,)
    assert set(ruleset.table(4).chains) == host["names"]
    assert ruleset.table(4).owned(PREFIX) == {}
    assert ruleset.table(4).jumps(PREFIX) == []
    assert ruleset.table(6).chains == {}


def test_a_family_whose_chains_stand_is_not_saved_with_the_other(host, monkeypatch):
    real_view = iptables._nft_view

    def view(tool):
        if tool.version == 6:  # the same chains as IPv4's, never moving
            names, chains = real_view(iptables.TOOLS[4])
            return names, {name: (f"v6-{name}", use) for name, (_d, use) in chains.items()}
        return real_view(tool)

    monkeypatch.setattr(iptables, "_nft_view", view)
    iptables.read()
    assert host["saves"] == ["iptables", "ip6tables"]
    for name in WANTED:
        host["digests"][name] = f"{name}-2"  # IPv4's three chains move: beyond the budget
    ruleset = iptables.read()
    assert (host["saves"], host["listings"]) == (["iptables", "ip6tables", "iptables"], [])
    assert ruleset.read == (4, 6)


def test_expressions_that_do_not_parse_are_digested_whole():
    def broken(blob):
        raw = nla(3, struct.pack(">Q", 7)) + nla(nftview.NFTA_RULE_EXPRESSIONS | 0x8000, blob)
        return nftview.attributes(raw, 0, len(raw))

    # An attribute claiming more bytes than there are: not a list of expressions.
    first, second = struct.pack("=HH", 64, 1) + b"\1" * 4, struct.pack("=HH", 64, 1) + b"\2" * 4
    assert nftview._rule_bytes(broken(first)) != nftview._rule_bytes(broken(second))
