"""
Between applies, on the real kernel: the restore script takes relayroute's
host lock (never halfway through an apply), and the watcher
(relayroute_core/watcher.py, written as <dir>/<role>.watch) puts the relay's rules and routes back,
by running that script, when a link bounce or a deletion removed them.
"""

import fcntl
import os
import subprocess
import time

import pytest

from relayroute_core import watcher as watcher_script
from tests.functional.test_relay import ARGS
from tests.support.hosts import lose_runtime_state
from tests.support.netns import run

pytestmark = [pytest.mark.root, pytest.mark.slow]

# The repair must be in place within 2 s of the event; the polls wait wider.
REPAIR_BOUND = 2.0


def applied(loaders, relay_ns, tmp_path):
    persist = tmp_path / "relayroute"
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(persist_dir=str(persist), **ARGS)
    return persist / "relay.restore", relay_ns.snapshot()


class HeldLock:
    """relayroute's host lock (RELAYROUTE_LOCK, as the engine takes it), held by the test."""

    def __init__(self):
        path = os.environ["RELAYROUTE_LOCK"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.handle = open(path, "a")  # noqa: SIM115 - released by release()
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def release(self):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def wait_for(condition, timeout):
    """Seconds until ``condition()`` held (polled every 20 ms), or None after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    return None


def test_restore_waits_for_an_apply_and_runs_what_it_left(loaders, relay_ns, tmp_path):
    script, state = applied(loaders, relay_ns, tmp_path)
    lose_runtime_state(relay_ns, [1000254])
    lost = relay_ns.snapshot()
    lock = HeldLock()
    try:
        restore = relay_ns.popen(["/bin/sh", str(script)])
        time.sleep(1.0)
        # Blocked on the lock, having changed nothing.
        assert restore.poll() is None
        assert relay_ns.snapshot() == lost
    finally:
        lock.release()
    assert restore.wait(timeout=30) == 0
    assert relay_ns.snapshot() == state

    # An apply that removes the role while a restore waits: the restore reads
    # the script again once it holds the lock, finds none, and does nothing.
    lose_runtime_state(relay_ns, [1000254])
    lock = HeldLock()
    try:
        restore = relay_ns.popen(["/bin/sh", str(script)])
        time.sleep(0.5)
        script.rename(script.with_suffix(".gone"))
    finally:
        lock.release()
    assert restore.wait(timeout=30) == 0
    assert relay_ns.snapshot() == lost


def test_restore_leaves_a_rule_in_place_alone(loaders, relay_ns, tmp_path):
    """A repair on a live host never takes away, even for an instant, a rule in use."""
    script, state = applied(loaders, relay_ns, tmp_path)
    monitor = relay_ns.popen(["ip", "-o", "monitor", "rule"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    relay_ns.exec(["/bin/sh", str(script)])
    relay_ns.exec(["/bin/sh", str(script)])
    time.sleep(0.3)
    monitor.terminate()
    events = monitor.communicate(timeout=10)[0]
    assert "Deleted" not in events, events
    assert relay_ns.snapshot() == state


# The unit's capabilities (CapabilityBoundingSet=, NoNewPrivileges=), as
# setpriv sets them: root's uid with CAP_NET_ADMIN and CAP_NET_RAW only.
UNIT_PRIVILEGES = ["setpriv", "--bounding-set", "-all,+net_admin,+net_raw", "--no-new-privs"]


def watcher_file(directory):
    """The watcher script, as an apply writes it (``<dir>/<role>.watch``)."""
    path = directory / "relay.watch"
    path.write_text(watcher_script.SCRIPT)
    return path


def start_watcher(relay_ns, script, log):
    proc = relay_ns.popen(
        [*UNIT_PRIVILEGES, "/bin/bash", str(watcher_file(log.parent)), "-d", "0.2", str(script)],
        stderr=log.open("w"),
    )
    assert wait_for(lambda: "watching" in log.read_text(), 10) is not None, log.read_text()
    return proc


def table_route(relay_ns):
    return "default via 192.0.2.2" in relay_ns.exec("ip -4 route show table 1000254").stdout


def test_watcher_repairs_a_link_bounce_and_deletions(loaders, relay_ns, tmp_path):
    script, state = applied(loaders, relay_ns, tmp_path)
    log = tmp_path / "watch.log"
    watcher = start_watcher(relay_ns, script, log)
    figures = {}

    relay_ns.ip("link set eth0 down")
    assert not table_route(relay_ns)  # the kernel took the proxy's route with the link
    time.sleep(1.0)
    relay_ns.ip("link set eth0 up")
    figures["link bounce"] = wait_for(lambda: table_route(relay_ns), 10)
    # The main table's default route is the network configuration's (ifup's) to put back.
    relay_ns.ip("route replace default via 192.0.2.1")
    # The watcher logs what it put back once its restore is done: the next event after that.
    logged = lambda n: wait_for(lambda: log.read_text().count("repaired (") >= n, 10)  # noqa: E731
    logged(1)

    # A network manager's carrier handling or reconfigure: the address goes and
    # comes back, the link stays up. The kernel takes the route through the
    # gateway the address made reachable, and says nothing of it.
    relay_ns.ip("addr del 192.0.2.11/24 dev eth0")
    assert not table_route(relay_ns)
    time.sleep(0.5)
    relay_ns.ip("addr add 192.0.2.11/24 dev eth0")
    figures["address removed and added"] = wait_for(lambda: table_route(relay_ns), 10)
    relay_ns.ip("route replace default via 192.0.2.1")
    logged(2)

    relay_ns.ip("rule del priority 1000")
    figures["rule deleted"] = wait_for(
        lambda: "lookup 1000254" in relay_ns.exec("ip -4 rule show").stdout, 10
    )
    relay_ns.ip("route del default table 1000254")
    figures["route deleted"] = wait_for(lambda: table_route(relay_ns), 10)
    time.sleep(0.5)
    assert relay_ns.snapshot() == state

    # Never halfway through an apply: while the lock is held the repair waits.
    lock = HeldLock()
    try:
        relay_ns.ip("rule del priority 1000")
        time.sleep(1.0)
        assert "lookup 1000254" not in relay_ns.exec("ip -4 rule show").stdout
    finally:
        lock.release()
    figures["rule deleted during an apply, after the apply"] = wait_for(
        lambda: "lookup 1000254" in relay_ns.exec("ip -4 rule show").stdout, 10
    )
    wait_for(lambda: log.read_text().count("repaired (") >= 5, 10)
    watcher.terminate()  # SIGTERM to bash alone, as `systemctl stop` with KillMode=process would
    watcher.wait(timeout=10)
    # Its ip monitor went with it: nothing of it is left in the namespace.
    left = lambda: run(["ip", "netns", "pids", relay_ns.name]).stdout.split()  # noqa: E731
    assert wait_for(lambda: not left(), 5) is not None, left()
    text = log.read_text()
    print("\n=== watcher repairs (seconds after the event):", figures)
    print(text)
    assert all(took is not None and took < REPAIR_BOUND + 1.0 for took in figures.values()), (
        figures,
        text,
    )
    assert figures["link bounce"] < REPAIR_BOUND, figures
    assert "repaired (link up: eth0): put back route default via 192.0.2.2" in text
    assert "repaired (address added: eth0): put back route default via 192.0.2.2" in text
    assert "repaired (deleted: 1000: from all fwmark 0xfe/0xff lookup 1000254 proto 210)" in text

    # The control: without the watcher a bounce, or an address removed and
    # added, leaves the proxy's table empty.
    relay_ns.ip("link set eth0 down")
    relay_ns.ip("link set eth0 up")
    time.sleep(REPAIR_BOUND + 1.0)
    assert not table_route(relay_ns)
    relay_ns.ip("route replace default via 192.0.2.2 table 1000254 proto 210")
    relay_ns.ip("addr del 192.0.2.11/24 dev eth0")
    relay_ns.ip("addr add 192.0.2.11/24 dev eth0")
    time.sleep(REPAIR_BOUND + 1.0)
    assert not table_route(relay_ns)


def test_formula_installs_the_watcher_with_the_relay_role_and_clean_removes_it(
    loaders, relay_ns, tmp_path
):
    from tests.functional.test_proxy import apply_sls, pillar

    data = pillar(tmp_path)
    persist, systemd = tmp_path / "relayroute", tmp_path / "systemd"
    unit = systemd / "relayroute-relay-watch.service"
    with relay_ns.entered():
        first = apply_sls(loaders, "relayroute.relay", data)
        assert all(state["result"] is True for state in first.values()), first
        written = first["relayroute-relay-policy-routing"]["changes"]["persist"]
        assert written[str(unit)] == "created", written
        text = unit.read_text()
        command = f"/bin/bash {persist}/relay.watch -d 0.2 {persist}/relay.restore"
        assert f"ExecStart={command}\n" in text
        assert "After=relayroute-relay.service network-online.target" in text
        assert (systemd / "multi-user.target.wants" / unit.name).resolve() == unit
        watcher = persist / "relay.watch"
        assert watcher.read_text() == watcher_script.SCRIPT
        assert watcher.stat().st_mode & 0o777 == 0o755
        second = apply_sls(loaders, "relayroute.relay", data)
        assert all(state["changes"] == {} for state in second.values()), second
        clean = apply_sls(loaders, "relayroute.relay.clean", data)
        assert all(state["result"] is True for state in clean.values()), clean
    assert not unit.exists()
    assert not (systemd / "multi-user.target.wants" / unit.name).exists()
    assert not list(persist.iterdir())


def test_watcher_repairs_in_time_while_routes_keep_changing(loaders, relay_ns, tmp_path):
    """A host whose routes never stop changing (an event every 50 ms): the burst is cut at 1 s."""
    script, state = applied(loaders, relay_ns, tmp_path)
    watcher = start_watcher(relay_ns, script, tmp_path / "watch.log")
    churn = relay_ns.popen(
        [
            "sh", "-c",
            "i=0; while [ $i -lt 200 ]; do i=$((i+1)); "
            "ip route replace 10.9.$((i % 50)).0/24 dev eth0; sleep 0.05; done",
        ]
    )  # fmt: skip
    try:
        time.sleep(0.5)
        relay_ns.ip("link set eth0 down")
        time.sleep(0.3)
        relay_ns.ip("link set eth0 up")
        took = wait_for(lambda: table_route(relay_ns), 10)
    finally:
        churn.kill()
        churn.wait(timeout=10)
        watcher.terminate()
        watcher.wait(timeout=10)
    print(f"\n=== repaired {took} s after the link came up, routes changing every 50 ms")
    assert took is not None, (tmp_path / "watch.log").read_text()
    assert took < REPAIR_BOUND
    relay_ns.ip("route replace default via 192.0.2.1")
    for index in range(50):
        relay_ns.ip(f"route del 10.9.{index}.0/24", check=False)
    assert relay_ns.snapshot() == state
