"""
Verifying an iptables transaction reads relayroute's part alone
(``iptables.read_part``): on iptables-nft, one ``-S`` listing per hook chain
and per chain of the owner's, never ``iptables-save`` of the whole mangle
table, so the cost of an apply with work does not grow with other tools'
rules (``scripts/bench`` measures it). What it reads must be exactly what the
whole-table read shows of the owner's part, in both families, beside another
tool's chains and jumps; and a verification that reads too little would let
a broken transaction through: ``test_atomic``'s lossy-apply control still
fails the state.
"""

import subprocess
import sys

import pytest

from tests.functional.test_ipv6_kernel import (
    dual,  # noqa: F401 - the fixture
    dual_args,
    relayroute,
)
from tests.support.hosts import plant_foreign_state

pytestmark = pytest.mark.root

# Another tool's chain with many rules and a jump from PREROUTING, in each family.
FOREIGN = "OTHER-TOOL"


def _foreign(rules=200):
    lines = ["*mangle", f":{FOREIGN} - [0:0]", f"-A PREROUTING -j {FOREIGN}"]
    lines += [f"-A {FOREIGN} -p tcp --dport {1000 + i} -j RETURN" for i in range(rules)]
    return "\n".join([*lines, "COMMIT", ""])


def _backend_module():
    from relayroute_core import iptables

    return iptables


def _owned(ruleset, iptables, prefix):
    return {
        version: (ruleset.table(version).owned(prefix), ruleset.table(version).jumps(prefix))
        for version in iptables.VERSIONS
    }


@pytest.mark.parametrize("role", ["relay", "proxy"])
def test_the_verifying_read_holds_the_owners_part_and_nothing_else(
    loaders,
    dual,  # noqa: F811 - the fixture
    role,
    monkeypatch,
):
    relay = dual["relay"]
    plant_foreign_state(relay)
    relay.exec(["iptables-restore", "--noflush"], input=_foreign())
    relay.exec(["ip6tables-restore", "--noflush"], input=_foreign())
    if role == "relay":
        ret = relayroute(loaders, relay, "relay_apply", **dual_args("iptables"))
    else:
        ret = relayroute(loaders, relay, "proxy_apply", backend="iptables", families=[4, 6])
    assert "changes" in ret, ret
    iptables = _backend_module()
    prefix = next(o.chain_prefix for o in iptables.planner.OWNERS.values() if o.role == role)

    runs = []
    real_run = subprocess.run

    def recording(argv, *args, **kwargs):
        runs.append(tuple(argv))
        return real_run(argv, *args, **kwargs)

    with relay.entered():
        whole = iptables.read()
        monkeypatch.setattr(iptables.subprocess, "run", recording)
        part = iptables.read_part(prefix)
    assert _owned(part, iptables, prefix) == _owned(whole, iptables, prefix)
    assert _owned(part, iptables, prefix)[6][0], "the IPv6 chains were not read"
    for version in iptables.VERSIONS:
        assert FOREIGN not in part.table(version).chains
        # The whole read declares every chain, and keeps no other tool's rules.
        assert whole.table(version).chains[FOREIGN] == []
    assert runs, "nothing was read"
    assert all(argv[0] in ("iptables", "ip6tables") and argv[3] == "-S" for argv in runs), runs
    listed = {(argv[0], argv[4]) for argv in runs}
    assert not any(name == FOREIGN for _tool, name in listed)
    assert set(part.read) == set(iptables.VERSIONS)


def test_a_family_without_the_owners_chains_is_not_listed(loaders, dual, monkeypatch):  # noqa: F811
    relay = dual["relay"]
    args = dual_args("iptables")
    args["lan_networks"] = ["192.0.2.0/24"]
    args["proxies"]["master-relay"]["address"] = "192.0.2.2"
    ret = relayroute(loaders, relay, "relay_apply", **args)
    assert "changes" in ret, ret
    iptables = _backend_module()
    runs = []
    real_run = subprocess.run

    def recording(argv, *a, **kw):
        runs.append(tuple(argv))
        return real_run(argv, *a, **kw)

    with relay.entered():
        monkeypatch.setattr(iptables.subprocess, "run", recording)
        part = iptables.read_part(iptables.planner.RELAY.chain_prefix)
    assert {argv[0] for argv in runs} == {"iptables"}, runs
    assert part.table(6).chains == {}
    assert part.table(4).owned(iptables.planner.RELAY.chain_prefix)


def test_an_apply_with_work_verifies_without_saving_the_whole_table(loaders, dual):  # noqa: F811
    """
    Through Salt's loader: a change runs one restore, and its check lists
    chains only; that check spares the next no-op any process (the memo,
    nftview.py), until another tool changes a hook chain: then that chain
    alone is listed in each family before the diff, never the whole table.
    """
    relay = dual["relay"]
    relay.exec(["iptables-restore", "--noflush"], input=_foreign())
    ret = relayroute(loaders, relay, "relay_apply", **dual_args("iptables"))
    assert "changes" in ret, ret
    module = next(
        mod
        for name, mod in sys.modules.items()
        if name.endswith(".relayroute_core.iptables") and mod is not None
    )
    real_run = module.subprocess.run

    def runs_of(args):
        runs = []

        def recording(argv, *a, **kw):
            runs.append(tuple(argv))
            return real_run(argv, *a, **kw)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module.subprocess, "run", recording)
            ret = relayroute(loaders, relay, "relay_apply", **args)
        assert "changes" in ret, ret
        return ret["changes"], runs

    assert runs_of(dual_args("iptables")) == ({}, [])
    # Another tool adds a rule to PREROUTING, in each family.
    for tool in ("iptables", "ip6tables"):
        relay.exec([tool, "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "9"])
    changed = dual_args("iptables", mark=253)
    changes, runs = runs_of(changed)
    assert changes
    saves = [argv for argv in runs if argv[0].endswith("-save")]
    restores = [argv for argv in runs if argv[0].endswith("-restore")]
    listings = [argv for argv in runs if "-S" in argv]
    # Before the plan's diff, the chain that moved in each family; one
    # transaction per family; then the check: listings only.
    assert saves == [], runs
    assert runs[:2] == [
        ("iptables", "-t", "mangle", "-S", "PREROUTING"),
        ("ip6tables", "-t", "mangle", "-S", "PREROUTING"),
    ], runs
    assert [argv[0] for argv in restores] == ["iptables-restore", "ip6tables-restore"], runs
    assert runs.index(restores[0]) == 2, runs
    assert len(listings) > 2, runs
    assert runs_of(changed) == ({}, [])
