"""
Switching packet-filter backend on a live host, on the real kernel: an apply
with backend X where the relay role's chains live in backend Y puts X's in
first and then takes Y's out (no moment where neither marks), leaves nothing
of Y, keeps other tools' iptables and nftables tables byte for byte, and
live sessions through both routers carry on across the switch, both ways.
Also: ``test=True`` shows the additions in X and the removals in Y, removal
cleans every backend that holds the role, a no-op after a switch costs what
it cost before, and the nftables restore runs under the watcher unit's
privileges and sandbox.
"""

import re
import subprocess
import time
from pathlib import Path

import pytest

from relayroute_core import units
from tests.functional.test_nftables_backend import (
    CLIENT,
    OTHER_TOOL,
    VIP,
    nft,
    our_table,
    proxy_net,  # noqa: F401 - the fixture: a client routed by a proxy with a transparent VIP
    relay_args,
)
from tests.functional.test_relay import ARGS
from tests.functional.test_watch_repairs import UNIT_PRIVILEGES
from tests.support import spawns
from tests.support.hosts import (
    DIRECT,
    FOREIGN_MANGLE,
    PROXIED,
    RELAY,
    count_forwarded,
    dropped,
    forwarded,
)
from tests.support.tcp import HeldSession, Ticker, connect

pytestmark = [pytest.mark.root, pytest.mark.slow]

STEP_PAUSE = 0.8  # each packet-filter transaction is held this long


def iptables_part(ns):
    """relayroute's lines in ``iptables-save``."""
    return [line for line in ns.exec("iptables-save").stdout.splitlines() if "RELAYROUTE" in line]


def foreign(ns):
    """Other tools' state in both packet filters, as text (without their counters)."""
    return {
        "othertool": nft(ns, "-s -a list table inet othertool").stdout,
        "iptables": [
            re.sub(r" \[\d+:\d+\]$", "", line)
            for line in ns.exec("iptables-save -t mangle").stdout.splitlines()
            if not line.startswith("#") and "RELAYROUTE" not in line
        ],
    }


def plant_foreign(ns):
    nft(ns, "-f -", input=OTHER_TOOL)
    ns.exec(["iptables-restore", "--noflush"], input=FOREIGN_MANGLE)


def paced(loaders, monkeypatch, steps):
    """Record each backend's transactions in ``steps`` and hold each STEP_PAUSE seconds."""
    engine = loaders.modules.relayroute.relay_apply.__globals__["engine"]
    for name in ("iptables", "nftables"):
        backend = engine.backend(name)

        def paced_apply(payload, apply=backend.apply, name=name):
            apply(payload)
            steps.append(name)
            time.sleep(STEP_PAUSE)

        monkeypatch.setattr(backend, "apply", paced_apply)


@pytest.mark.parametrize("persisted", [True, False], ids=["with-memory", "without-memory"])
def test_switch_both_ways_with_live_sessions(loaders, net, monkeypatch, tmp_path, persisted):
    relay, gw, proxy = net["relay"], net["gw"], net["proxy"]
    plant_foreign(relay)
    others = foreign(relay)
    persist = {"persist_dir": str(tmp_path / "relayroute")} if persisted else {}
    args = {**relay_args(net), **persist}
    with relay.entered():
        first = loaders.modules.relayroute.relay_apply(backend="iptables", **args)
    assert "iptables" in first["changes"]
    on_iptables = relay.snapshot()
    for router in (gw, proxy):
        count_forwarded(router, "to proxied", f"-p tcp -s {RELAY} --sport 25 -d {PROXIED}")
        count_forwarded(router, "to direct", f"-p tcp -s {RELAY} --sport 25 -d {DIRECT}")

    # Sessions open before the first switch and held across both.
    proxied = Ticker(net["client"], RELAY, 25, PROXIED)
    direct = Ticker(net["client"], RELAY, 25, DIRECT)
    held = HeldSession(net["client"], RELAY, 25, PROXIED)
    steps = []
    try:
        assert proxied.wait_for(3)
        assert direct.wait_for(3)
        assert held.banner == f"220 hello {PROXIED}"
        paced(loaders, monkeypatch, steps)
        with relay.entered():
            to_nft = loaders.modules.relayroute.relay_apply(backend="nftables", **args)
        # The new backend marks before the old one stops: nftables, then iptables.
        assert steps == ["nftables", "iptables"], steps
        assert held.say("NOOP on nftables") == "250 NOOP on nftables"
        time.sleep(STEP_PAUSE)
        steps.clear()
        with relay.entered():
            back = loaders.modules.relayroute.relay_apply(backend="iptables", **args)
        assert steps == ["iptables", "nftables"], steps
        assert held.say("NOOP on iptables again") == "250 NOOP on iptables again"
        time.sleep(STEP_PAUSE)
    finally:
        proxied.stop()
        direct.stop()
        held.close()
        monkeypatch.undo()

    # Reported under each backend's name: additions in the new, removals in the old.
    assert to_nft["changes"]["iptables"]["new"] == []
    assert "-A PREROUTING -j RELAYROUTE-RELAY-PRE" in to_nft["changes"]["iptables"]["old"]
    assert to_nft["changes"]["nftables"]["old"] == []
    assert "add table inet relayroute_relay" in to_nft["changes"]["nftables"]["new"]
    assert set(to_nft["changes"]) <= {"iptables", "nftables", "persist"}
    assert back["changes"]["nftables"]["new"] == []
    assert back["changes"]["iptables"]["old"] == []
    # Nothing of the old backend is left; the routes and rules never changed.
    assert our_table(relay) is None
    assert relay.snapshot() == on_iptables
    assert foreign(relay) == others
    if persisted:
        restore = (tmp_path / "relayroute" / "relay.restore").read_text()
        assert "iptables-restore --noflush" in restore
        assert "nft -f" not in restore

    wrong_way = {
        "gw: replies to the proxied client": forwarded(gw, "to proxied"),
        "proxy: replies to the direct client": forwarded(proxy, "to direct"),
        "gw: dropped": dropped(gw),
        "proxy: dropped": dropped(proxy),
    }
    assert set(wrong_way.values()) == {0}, wrong_way
    for ticker in (proxied, direct):
        assert not ticker.errors, ticker.errors
        assert not ticker.lost(), ticker.lost()
        assert len(ticker.exchanges) >= 15, len(ticker.exchanges)
    with relay.entered():
        loaders.modules.relayroute.relay_remove(backend="iptables", **persist)
    assert not iptables_part(relay)
    assert foreign(relay) == others


def test_test_mode_shows_the_additions_and_the_removals(loaders, relay_ns):
    plant_foreign(relay_ns)
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(backend="iptables", **ARGS)
        before = {**relay_ns.snapshot(), "nft": nft(relay_ns, "list ruleset").stdout}
        dry = loaders.states.relayroute.relay_present(
            name="r", test=True, backend="nftables", **ARGS
        )
        assert dry.result is None
        assert dry.changes["nftables"]["old"] == []
        assert dry.changes["nftables"]["new"][0] == "add table inet relayroute_relay"
        assert dry.changes["iptables"]["new"] == []
        assert "-N RELAYROUTE-RELAY-PRE" in dry.changes["iptables"]["old"]
        assert {**relay_ns.snapshot(), "nft": nft(relay_ns, "list ruleset").stdout} == before
        loaders.modules.relayroute.relay_remove(backend="iptables")


def test_a_failed_removal_from_the_old_backend_puts_everything_back(loaders, relay_ns, monkeypatch):
    """The old part's removal fails: the new backend's part goes again, the old one stays."""
    plant_foreign(relay_ns)
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(backend="iptables", **ARGS)
        before = {**relay_ns.snapshot(), "nft": nft(relay_ns, "list ruleset").stdout}
        engine = loaders.modules.relayroute.relay_apply.__globals__["engine"]
        old = engine.backend("iptables")

        def failing(payload):
            raise old.BackendError("iptables-restore --noflush failed (1): injected")

        monkeypatch.setattr(old, "apply", failing)
        ret = loaders.states.relayroute.relay_present(name="r", backend="nftables", **ARGS)
        monkeypatch.undo()
        assert ret.result is False
        assert "injected" in ret.comment
        assert "previous state was restored" in ret.comment
        assert {**relay_ns.snapshot(), "nft": nft(relay_ns, "list ruleset").stdout} == before
        assert our_table(relay_ns) is None
        loaders.modules.relayroute.relay_remove(backend="iptables")


def test_remove_cleans_every_backend_that_holds_the_role(loaders, relay_ns, tmp_path):
    plant_foreign(relay_ns)
    before = relay_ns.snapshot()
    others = foreign(relay_ns)
    kept = tmp_path / "kept"
    with relay_ns.entered():
        # Both backends hold the role (a switch cut short, without memory): the
        # iptables restore script of an earlier apply runs after a switch.
        loaders.modules.relayroute.relay_apply(backend="iptables", persist_dir=str(kept), **ARGS)
        loaders.modules.relayroute.relay_apply(backend="nftables", **ARGS)
        assert not iptables_part(relay_ns)
        relay_ns.exec(["/bin/sh", str(kept / "relay.restore")])
        assert iptables_part(relay_ns)
        assert our_table(relay_ns)
        # No memory: the removal has work (routes, rules, the table), so it looks at iptables too.
        gone = loaders.modules.relayroute.relay_remove(backend="nftables")
        assert gone["changes"]["iptables"]["new"] == []
        assert gone["changes"]["nftables"]["new"] == []
        assert not iptables_part(relay_ns)
        assert our_table(relay_ns) is None
        assert relay_ns.snapshot() == before
        assert foreign(relay_ns) == others

        # With memory: applied with iptables, removed with the pillar now saying
        # nftables (clean.sls after the pillar changed): the memory names iptables.
        persist = str(tmp_path / "relayroute")
        loaders.modules.relayroute.relay_apply(backend="iptables", persist_dir=persist, **ARGS)
        gone = loaders.modules.relayroute.relay_remove(backend="nftables", persist_dir=persist)
        assert "iptables" in gone["changes"]
        assert relay_ns.snapshot() == before
        assert not list(Path(persist).iterdir())
        # Nothing left anywhere: a second removal is a no-op.
        assert loaders.modules.relayroute.relay_remove(backend="nftables") == {"changes": {}}
    assert foreign(relay_ns) == others


def spawned_by(call):
    """The argv of every process ``call()`` starts (a no-op: it must change nothing)."""
    with spawns.recorded() as spawned:
        assert call() == {"changes": {}}
    return spawned


def test_a_no_op_after_a_switch_costs_what_it_cost_before(loaders, relay_ns, tmp_path):
    """
    The memory names the backend applied last: a no-op looks nowhere else.
    nftables' no-op starts no process (no iptables-save), nor does iptables'
    (its apply's verification is remembered), as without a switch.
    """
    persist = {"persist_dir": str(tmp_path / "relayroute")}
    memory = tmp_path / "relayroute" / "relay.json"
    apply = loaders.modules.relayroute.relay_apply
    with relay_ns.entered():
        apply(backend="iptables", **persist, **ARGS)
        assert '"backend": "iptables"' in memory.read_text()
        switched = apply(backend="nftables", **persist, **ARGS)
        assert "iptables" in switched["changes"]
        assert '"backend": "nftables"' in memory.read_text()
        assert spawned_by(lambda: apply(backend="nftables", **persist, **ARGS)) == []
        apply(backend="iptables", **persist, **ARGS)
        spawned = spawned_by(lambda: apply(backend="iptables", **persist, **ARGS))
        assert spawned == []  # the apply's verification is remembered (nftview.py)
        loaders.modules.relayroute.relay_remove(backend="iptables", **persist)
    assert not memory.exists()


# --- the restore under the watcher unit's privileges and sandbox -----------------


def unit_setting(text, key):
    """The values of ``key=`` in a unit's text (relayroute_core/units.py)."""
    return [
        line.split("=", 1)[1].split() for line in text.splitlines() if line.startswith(f"{key}=")
    ]


def syscall_groups():
    """``{"@group": {syscall or @group, ...}}`` from ``systemd-analyze syscall-filter``."""
    groups, current = {}, None
    for line in subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), set())
        elif current is not None and line.startswith("    ") and not line.strip().startswith("#"):
            current.add(line.strip())
    return groups


def expanded(name, groups):
    out = set()
    for item in groups.get(name, ()):
        out |= expanded(item, groups) if item.startswith("@") else {item}
    return out


def test_the_nftables_restore_runs_under_the_watcher_units_sandbox(loaders, relay_ns, tmp_path):
    """
    relayroute-watch.service runs the restore script with CAP_NET_ADMIN and
    CAP_NET_RAW only (setpriv, as test_watch_repairs), SystemCallFilter
    @system-service and RestrictAddressFamilies: the script's ``nft -f``
    brings the lost table back under those capabilities, and every system
    call and socket family it makes (strace) is one the unit allows.
    """
    persist = tmp_path / "relayroute"
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(backend="nftables", persist_dir=str(persist), **ARGS)
    table = our_table(relay_ns)
    nft(relay_ns, "delete table inet relayroute_relay")
    trace = tmp_path / "trace"
    relay_ns.exec(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            str(trace),
            *UNIT_PRIVILEGES,
            "/bin/sh",
            str(persist / "relay.restore"),
        ]
    )
    assert our_table(relay_ns) == table

    unit = units.watch_unit("relay", "/r", "/w", "/bin/bash", 0.2, "multi-user.target")
    (allowed_families,) = unit_setting(unit, "RestrictAddressFamilies")
    (filters,) = unit_setting(unit, "SystemCallFilter")
    assert filters == ["@system-service"]
    allowed = expanded("@system-service", syscall_groups())
    calls, families = set(), set()
    for line in trace.read_text().splitlines():
        found = re.match(r"\d+\s+([a-z0-9_]+)\(", line)
        if found:
            calls.add(found.group(1))
        families |= set(re.findall(r"socket\((AF_[A-Z0-9]+)", line))
    # setpriv's own calls before it runs the script are not the unit's to allow.
    calls -= {"prctl", "capset", "capget"}
    # nft's netlink socket was traced (the script ran nft, not nothing).
    assert "AF_NETLINK" in families, families
    assert "execve" in calls, sorted(calls)
    assert {"sendmsg", "recvmsg"} & calls, sorted(calls)
    assert calls - allowed == set(), sorted(calls - allowed)
    assert families <= set(allowed_families), families
    with relay_ns.entered():
        loaders.modules.relayroute.relay_remove(backend="nftables", persist_dir=str(persist))


def test_the_formula_follows_the_platform_default_and_a_pillar_switch(loaders, relay_ns, tmp_path):
    """
    This Debian 12 minion's default is nftables (parameters/os_family/Debian.yaml);
    pillar ``backend: iptables`` moves the role there, and clean.sls with the
    pillar back on the default removes the iptables part, by the memory.
    """
    from tests.functional.test_nftables_backend import formula_pillar

    pillar = formula_pillar(tmp_path)
    del pillar["relayroute"]["backend"]
    pinned = {"relayroute": {**pillar["relayroute"], "backend": "iptables"}}
    before = relay_ns.snapshot()

    def ok(ret):
        assert all(state["result"] is True for state in ret.raw.values()), ret.raw
        return ret.raw

    with relay_ns.entered():
        ok(loaders.modules.state.sls("relayroute.relay", pillar=pillar))
        assert our_table(relay_ns)
        assert not iptables_part(relay_ns)
        dry = loaders.modules.state.sls("relayroute.relay", pillar=pinned, test=True).raw
        (routing,) = [s for s in dry.values() if s["__id__"] == "relayroute-relay-policy-routing"]
        assert routing["result"] is None
        assert routing["changes"]["nftables"]["new"] == []
        assert routing["changes"]["iptables"]["old"] == []
        ok(loaders.modules.state.sls("relayroute.relay", pillar=pinned))
        assert our_table(relay_ns) is None
        assert iptables_part(relay_ns)
        restore = (tmp_path / "relayroute" / "relay.restore").read_text()
        assert "iptables-restore --noflush" in restore
        again = ok(loaders.modules.state.sls("relayroute.relay", pillar=pinned))
        assert all(state["changes"] == {} for state in again.values()), again
        ok(loaders.modules.state.sls("relayroute.relay.clean", pillar=pillar))
    assert our_table(relay_ns) is None
    assert not iptables_part(relay_ns)
    assert relay_ns.snapshot() == before
    assert not list((tmp_path / "relayroute").iterdir())


def test_the_proxy_role_switches_both_ways(loaders, proxy_net):  # noqa: F811 - the fixture
    """The TPROXY divert moves too: the VIP answers after each switch, nothing of the old stays."""
    client, proxy = proxy_net["client"], proxy_net["proxy"]
    plant_foreign(proxy)
    others = foreign(proxy)
    before = proxy.snapshot()

    def proxy_part():
        return [
            line for line in proxy.exec("iptables-save").stdout.splitlines() if "RELAYROUTE" in line
        ]

    def proxy_table():
        found = nft(proxy, "list table inet relayroute_proxy", check=False)
        return found.stdout if found.returncode == 0 else None

    with proxy.entered():
        loaders.modules.relayroute.proxy_apply(backend="iptables")
    assert connect(client, VIP, 25, CLIENT) == f"220 diverted {CLIENT}"
    with proxy.entered():
        moved = loaders.modules.relayroute.proxy_apply(backend="nftables")
    assert moved["changes"]["iptables"]["new"] == []
    assert not proxy_part()
    assert proxy_table()
    assert connect(client, VIP, 25, CLIENT) == f"220 diverted {CLIENT}"
    with proxy.entered():
        back = loaders.modules.relayroute.proxy_apply(backend="iptables")
    assert back["changes"]["nftables"]["new"] == []
    assert proxy_table() is None
    assert proxy_part()
    assert connect(client, VIP, 25, CLIENT) == f"220 diverted {CLIENT}"
    with proxy.entered():
        loaders.modules.relayroute.proxy_remove(backend="nftables")
    assert not proxy_part()
    assert proxy.snapshot() == before
    assert foreign(proxy) == others
