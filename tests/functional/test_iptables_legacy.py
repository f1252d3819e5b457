"""
The iptables backend on its other flavour, iptables-legacy (CentOS 7's, and
Debian's ``iptables-legacy*``), as a host whose ``iptables`` alternative points
there runs it: legacy's binaries come first on PATH for the test, and its
xtables lock is a file of the test's own (XTABLES_LOCKFILE), never the host's
/run/xtables.lock.

- Both mail paths answer by the way they came; relayroute's chains are in the
  legacy tables and not in nf_tables; a re-apply is a no-op.
- The boot restore script puts back what a reboot loses, on legacy too.
- Another user of the xtables lock (fail2ban, Docker) holding it: the apply
  waits for it and succeeds; held past the bound, the apply fails with
  iptables' message and changes nothing.
"""

import fcntl
import os
import subprocess
import sys
import time

import pytest

from tests.functional.test_atomic import loaded
from tests.functional.test_relay import ARGS
from tests.functional.test_reply_path import relayroute_applied
from tests.support.hosts import DIRECT, PROXIED, RELAY, lose_runtime_state
from tests.support.tcp import connect

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def legacy(tmp_path, monkeypatch):
    """iptables, iptables-save and iptables-restore are legacy's; the lock is the test's."""
    shim = tmp_path / "legacy-bin"
    shim.mkdir()
    for tool in ("iptables", "iptables-save", "iptables-restore"):
        target = f"/usr/sbin/{tool.replace('iptables', 'iptables-legacy', 1)}"
        if not os.path.exists(target):
            pytest.fail(f"{target} is missing (Debian's iptables package ships it)")
        # xtables-legacy-multi picks the tool by the name it is run as.
        (shim / tool).symlink_to(target)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    lock = tmp_path / "xtables.lock"
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lock))
    return lock


def mangle(ns, flavour):
    return ns.exec([f"iptables-{flavour}-save", "-t", "mangle"]).stdout


def test_both_paths_on_iptables_legacy(loaders, net, legacy):
    relay = net["relay"]
    assert relay.exec("iptables -V").stdout.strip().endswith("(legacy)")
    assert relayroute_applied(loaders, net).result is True
    assert "-A RELAYROUTE-RELAY-PRE" in mangle(relay, "legacy")
    assert "RELAYROUTE" not in mangle(relay, "nft")
    assert connect(net["client"], RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    assert connect(net["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    with relay.entered():
        flows = loaders.modules.relayroute.flows(mark_mask=0xFF, port=25)
    by_source = {line.split("src=")[1].split()[0]: line for line in flows}
    assert by_source[DIRECT].endswith("mark=0")
    assert by_source[PROXIED].endswith("mark=254")
    again = relayroute_applied(loaders, net)
    assert again.result is True
    assert again.changes == {}


def test_restore_script_on_iptables_legacy(loaders, relay_ns, legacy, tmp_path):
    persist = tmp_path / "relayroute"
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(persist_dir=str(persist), **ARGS)
        applied = relay_ns.snapshot()
        assert "RELAYROUTE-RELAY-PRE" in applied["iptables"]
        lose_runtime_state(relay_ns, [1000254])
        assert relay_ns.snapshot() != applied
        relay_ns.exec(["/bin/sh", str(persist / "relay.restore")])
        assert relay_ns.snapshot() == applied
        assert "RELAYROUTE" not in mangle(relay_ns, "nft")


HOLD = """
import fcntl, sys, time
with open(sys.argv[1], "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(path, seconds):
    """Another xtables user: holds the lock for ``seconds`` from when this returns."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_an_apply_waits_for_the_xtables_lock_bounded(loaders, relay_ns, legacy, monkeypatch):
    with relay_ns.entered():
        holder = hold_lock(legacy, 2.0)
        try:
            started = time.monotonic()
            ret = loaders.states.relayroute.relay_present(name="r", **ARGS)
            waited = time.monotonic() - started
        finally:
            holder.wait(timeout=30)
        assert ret.result is True, ret.comment
        assert waited >= 1.5, waited  # it waited for the holder, and did not fail
        loaders.modules.relayroute.relay_remove()
        before = relay_ns.snapshot()

        # Held past the bound (shortened for the test): a clear failure, no change.
        backend = loaded(loaders, "iptables")
        monkeypatch.setattr(backend, "WAIT", ("--wait", "1"))
        holder = hold_lock(legacy, 6.0)
        try:
            ret = loaders.states.relayroute.relay_present(name="r", **ARGS)
        finally:
            holder.kill()
            holder.wait(timeout=10)
        assert ret.result is False
        assert "xtables lock" in ret.comment, ret.comment
        assert relay_ns.snapshot() == before
    with open(legacy) as lock:  # nothing of ours still holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
