"""
The iptables backend's memo (nftview.py) on the real kernel, with
iptables-nft: a no-op after an apply runs no process, traffic (which moves
the rules' counters) changes nothing, and every kind of drift is still seen
and repaired by the next apply, at the cost of listing the chain that moved
(or, for a jump from a chain relayroute does not read, a whole read): a rule
of relayroute's chain replaced by hand, the chain flushed, a jump to it from
INPUT, another tool's rule inserted before the jump in PREROUTING.
"""

import socket

import pytest

from tests.functional.test_relay import ARGS, EXPECTED_MANGLE, mangle_rules
from tests.support import spawns

pytestmark = pytest.mark.root

PRE = "RELAYROUTE-RELAY-PRE"


@pytest.fixture
def applied(loaders, relay_ns):
    """The relay applied, and ``spawned(call)``: the programs a call runs, and its result."""

    def spawned(call):
        with spawns.recorded() as seen, relay_ns.entered():
            result = call()
        return [argv[0] for argv in seen], result

    apply = loaders.modules.relayroute.relay_apply
    _seen, first = spawned(lambda: apply(backend="iptables", **ARGS))
    assert "iptables" in first["changes"]
    yield relay_ns, spawned, lambda: apply(backend="iptables", **ARGS)
    with relay_ns.entered():
        loaders.modules.relayroute.relay_remove(backend="iptables")


def _traffic(ns, count=50):
    """Datagrams through lo: PREROUTING and OUTPUT, so relayroute's rules count them."""
    with ns.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(count):
            sock.sendto(b"x", ("127.0.0.1", 9))


def test_a_no_op_runs_nothing_also_after_traffic(applied):
    relay, spawned, apply = applied
    relay.ip("link set lo up")
    assert spawned(apply) == ([], {"changes": {}})
    _traffic(relay)
    counted = relay.exec(["iptables", "-t", "mangle", "-L", PRE, "-v", "-x", "-n"]).stdout
    assert int(counted.splitlines()[2].split()[0]) >= 50  # the restore rule counted them
    assert spawned(apply) == ([], {"changes": {}})


@pytest.mark.parametrize(
    ("drift", "read"),
    [
        # A rule of relayroute's replaced by hand: another mask. Its chain is listed.
        (
            [
                *("iptables", "-t", "mangle", "-R", PRE, "1", "-j", "CONNMARK"),
                *("--restore-mark", "--nfmask", "0xf", "--ctmask", "0xf"),
            ],
            "iptables",
        ),
        (["iptables", "-t", "mangle", "-F", PRE], "iptables"),
        # A jump from a chain whose rules are not read (INPUT, which another
        # tool's rule made before): only the chain's reference count tells,
        # and only a whole read shows where it comes from.
        (["iptables", "-t", "mangle", "-A", "INPUT", "-j", PRE], "iptables-save"),
        # Another tool's rule before relayroute's jump (it stays): PREROUTING listed.
        (["iptables", "-t", "mangle", "-I", "PREROUTING", "-p", "udp", "--dport", "9"], "iptables"),
    ],
    ids=["replaced-rule", "flushed-chain", "jump-from-input", "foreign-rule-first"],
)
def test_drift_is_read_and_repaired(applied, drift, read):
    relay, spawned, apply = applied
    relay.exec(["iptables", "-t", "mangle", "-A", "INPUT", "-p", "udp", "--dport", "7"])
    # Another tool's chain of its own: no chain relayroute reads changed.
    assert spawned(apply) == ([], {"changes": {}})
    relay.exec(drift)
    ran, result = spawned(apply)
    assert ran[0] == read, ran
    if read == "iptables":
        assert "iptables-save" not in ran, ran
    if "--dport" in drift:
        assert (ran, result) == (["iptables"], {"changes": {}})  # none of relayroute's business
    else:
        assert "iptables" in result["changes"]
    assert spawned(apply) == ([], {"changes": {}})
    ours = [line for line in mangle_rules(relay) if "RELAYROUTE" in line]
    assert ours == EXPECTED_MANGLE


def test_a_first_apply_beside_another_tools_chains_reads_no_table(loaders, relay_ns):
    """No chain of relayroute's yet, so no jump to one: the diff needs no iptables-save."""
    relay_ns.exec(
        ["iptables-restore", "--noflush"],
        input="*mangle\n:OTHER - [0:0]\n-A PREROUTING -j OTHER\n-A OTHER -j RETURN\nCOMMIT\n",
    )
    with spawns.recorded() as spawned, relay_ns.entered():
        ret = loaders.modules.relayroute.relay_apply(backend="iptables", **ARGS)
    seen = [argv[0] for argv in spawned]
    assert "iptables" in ret["changes"]
    assert "iptables-save" not in seen, seen
    assert seen.count("iptables-restore") == 1, seen
    assert [line for line in mangle_rules(relay_ns) if "RELAYROUTE" in line] == EXPECTED_MANGLE
    assert "-A PREROUTING -j OTHER" in mangle_rules(relay_ns)
    with relay_ns.entered():
        loaders.modules.relayroute.relay_remove(backend="iptables")
