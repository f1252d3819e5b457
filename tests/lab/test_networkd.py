"""
Between applies, with a real network manager: systemd-networkd (Debian 12's,
252) manages relay1's lan0 in the seed's lab (a ``.network`` giving it the
lab's address and default gateway, exactly what the lab set by hand), with a
private system D-Bus so that ``networkctl`` works (tests/support/networkd.py).
No Salt involved after the first highstate. SMTP sessions on both paths are
held busy during each network-manager event (the sessions of test_watch: 10
direct to relay1, 30 through the VIP), with relay1's watcher started as its
unit's ExecStart runs it.

What networkd 252 does to relayroute's rule (protocol 210) and its table's
route, found here (the daemon's debug log says it, ``ip monitor`` shows it):

- start, restart (``systemctl restart``) and ``networkctl reload`` with the
  files untouched: nothing, whatever ManageForeign*= says.
- ``networkctl reconfigure lan0``, and ``networkctl reload`` after the
  ``.network`` was written again (a new modification time is enough, the same
  text too: what ``netplan apply`` does), with ManageForeign*= at their default:
  networkd reconfigures lan0 and removes relayroute's rule ("Removing foreign
  routing policy rule"), an event the watcher repairs. The table's route: a
  reconfigure also removes and re-adds networkd's own address, which takes the
  route with it in the kernel, silently (networkd asks to remove it too); a
  reload removes it only when networkd holds it for present: after a
  reconfigure networkd keeps it marked "removing" (the kernel had flushed it
  first) and leaves the copy the watcher put back alone ("Received remembered
  foreign route (configured,removing)").
- With ``ManageForeignRoutingPolicyRules=no`` and ``ManageForeignRoutes=no`` a
  reload of a rewritten file deletes nothing. ``networkctl reconfigure`` keeps
  the rule, but the route still goes with networkd's address, and no deletion
  event says so.
- Carrier loss (the switch port down): networkd removes its address and route
  (the kernel then the table's route, silently), lan0 stays administratively
  up; carrier back, networkd puts its own back. No deletion event, no link-up,
  whatever ManageForeign*= says.

In those two the watcher repairs on the address networkd adds again (it
listens for IPv4 addresses added on the interfaces its routes use).
"""

import os
import shutil
import time

import pytest

from tests.lab.filters import ours
from tests.lab.test_live_safety import (
    noop_tolerant_postfix,  # noqa: F401 - a fixture
    smtp_retransmits,
)
from tests.lab.test_watch import (
    LINK,
    RELAY,
    Watcher,
    probe_proxied,
    sessions_spec,
)
from tests.support import seedlab
from tests.support.networkd import NETWORKD, Networkd, network_file
from tests.support.seedlab import mail_via_vip, report
from tests.support.smtphold import HeldSmtpSessions
from tests.support.tcp import NEGATIVE_TIMEOUT

pytestmark = [
    pytest.mark.lab,
    pytest.mark.root,
    pytest.mark.skipif(
        not (
            os.path.exists(NETWORKD) and shutil.which("networkctl") and shutil.which("dbus-daemon")
        ),
        reason="needs systemd-networkd and networkctl (package systemd) and dbus-daemon (dbus)",
    ),
]

# A new proxied session to relay1 must succeed within REPAIR_BOUND s of networkd
# having configured the link (the watcher's debounce 0.2 s, its restore about
# 0.3 s, the probe's first attempt 0.3 s: 0.8 s unloaded); the probe looks for up
# to RECOVERY_WAIT s. CONFIGURE_WAIT: how long networkd may take to configure the
# link after an event (about 0.1 s here; 1 s more after a carrier bounce).
REPAIR_BOUND = 3.0
RECOVERY_WAIT = 20.0
CONFIGURE_WAIT = 30.0
CARRIER_DOWN_FOR = 1.0
# Before each case, how long to wait for HAProxy's connections to relay1 that
# a previous case lost to close (16 s at most here).
DRAIN_WAIT = 120.0
# Held sessions: as test_watch (a NOOP every INTERVAL s, a reply later than
# REPLY_BOUND s is a loss, SETTLE s more talk after the path is back).
INTERVAL, REPLY_BOUND, SETTLE = 0.3, 3.0, 5.0
# The longest a held session stays open here: opening (60), the event and
# networkd configuring (CONFIGURE_WAIT), the probe, SETTLE, finishing (60).
HELD_WINDOW_MAX = 60 + CONFIGURE_WAIT + RECOVERY_WAIT + SETTLE + 1.0 + 60


@pytest.fixture(scope="module")
def networkd(applied, lab, tmp_path_factory):
    """networkd managing relay1's lan0 (ManageForeign*= at their default), killed at the end."""
    relay = lab.ns(RELAY)
    daemon = Networkd(relay, tmp_path_factory.mktemp("networkd"))
    address = f"{lab.relay_addresses[RELAY]}/24"
    daemon.write_network(f"10-{LINK}.network", network_file(LINK, address, seedlab.GATEWAY))
    before = ours(relay)
    try:
        daemon.start()
        daemon.wait_configured(LINK, 0, CONFIGURE_WAIT)
        assert daemon.setup_state(LINK) == "configured", daemon.log()[-3000:]
        assert ours(relay) == before, "networkd's start changed relayroute's state"
        yield daemon
    finally:
        daemon.stop()
        # As the lab left it for the tests after these: its own default route,
        # relayroute's state as the boot puts it back.
        relay.ip(f"route replace default via {seedlab.GATEWAY}")
        restore(lab)
        # The controls' dead sessions: relay1's halves stay open (Postfix's timer),
        # retransmitting; reset them, so no test after these sees their flows.
        for client in (seedlab.MAIL_CLIENT, seedlab.EXTERNAL_MTA):
            relay.exec(["ss", "-K", "-tnH", "dst", client], check=False)


def restore(lab):
    """What relay1's boot runs for relayroute (its units' ExecStart), no Salt."""
    relay = lab.ns(RELAY)
    commands = lab.boot_commands(RELAY)
    assert commands
    for command in commands:
        relay.exec(command)


def carrier_bounce(lab):
    """relay1's switch port down CARRIER_DOWN_FOR s, then up: lan0 loses its carrier, stays UP."""
    switch = lab.ns("lan")
    switch.ip(f"link set l-{RELAY} down")
    time.sleep(CARRIER_DOWN_FOR)
    flags = lab.ns(RELAY).ip(f"-br link show dev {LINK}").stdout
    switch.ip(f"link set l-{RELAY} up")
    assert "NO-CARRIER" in flags, flags
    assert ",UP" in flags, flags


def wait_haproxy_drained(lab, timeout=DRAIN_WAIT):
    """
    Wait until HAProxy holds no client's connection to relay1 (``balance
    leastconn``: the ones a previous case lost linger until relay1's
    retransmissions, backed off, get through, and new sessions would go to the
    other relays). Returns ``(seconds waited, connections left)``.
    """
    started = time.monotonic()
    while True:
        out = lab.ns("master-relay").exec(["ss", "-tnpH", "dst", lab.relay_addresses[RELAY]])
        busy = [
            line
            for line in out.stdout.splitlines()
            if '"haproxy"' in line
            and not line.startswith("TIME-WAIT")
            and not line.split()[3].startswith(f"{seedlab.PROXY_LAN}:")  # health checks
        ]
        waited = round(time.monotonic() - started, 1)
        if not busy or waited > timeout:
            return waited, len(busy)
        time.sleep(0.5)


def held_event(lab, daemon, title, event):
    """
    Hold sessions on both paths; run ``event`` (a callable); wait until networkd
    logged relay1's link configured after it; poll new proxied sessions to
    relay1; let the held ones talk SETTLE s more. Returns the figures.
    """
    relay = lab.ns(RELAY)
    drained = wait_haproxy_drained(lab)
    held = HeldSmtpSessions(
        lab.ns("client"), sessions_spec(lab), interval=INTERVAL, bound=REPLY_BOUND
    )
    try:
        assert held.held == len(held.sessions), held.opened
        on_relay = [r["relay"] == RELAY for r in held.opened]
        retrans_before = smtp_retransmits(lab)
        held.window(title)
        mark = daemon.mark()
        started = time.monotonic()
        event()
        configured = daemon.wait_configured(LINK, mark, CONFIGURE_WAIT)
        just_after = ours(relay)
        probe = probe_proxied(lab, RECOVERY_WAIT)
        time.sleep(SETTLE)
        held.window(f"after {title}")
        time.sleep(1.0)
        status = held.status()
        retrans = smtp_retransmits(lab)
        networkd_said = [
            line.split(" UTC ", 1)[-1]
            for line in daemon.log_since(mark).splitlines()
            if "foreign" in line and "Removing" in line or f"{LINK}: State changed" in line
        ]
    finally:
        results = held.finish()
        held.close()
    lost = [r for r in results if r and r["stage"] == "noop"]
    for r, mine in zip(results, on_relay):
        r["on_relay1"] = mine
    return {
        "waited for HAProxy's connections to relay1 to close s, left": drained,
        "networkd configured the link after s": round(configured - started, 2),
        "new proxied session ok after configured s":
            round(probe["at"] - configured, 2) if probe["ok"] else None,
        "probe": probe,
        "held": len(results),
        "held on relay1": {
            path: sum(1 for r in results if r["on_relay1"] and r["spec"]["path"] == path)
            for path in ("direct", "vip")
        },
        "lost": len(lost),
        "lost on relay1": {
            path: sum(1 for r in lost if r["on_relay1"] and r["spec"]["path"] == path)
            for path in ("direct", "vip")
        },
        "lost elsewhere": sum(1 for r in lost if not r["on_relay1"]),
        "lost detail": [
            (r["spec"]["path"], r.get("window"), r.get("error", "")[:60], r.get("waited"))
            for r in lost
        ][:4],
        "longest reply in the event window s": max(
            (r["windows"].get(title, [0, 0.0, 0.0])[1] for r in results if "windows" in r),
            default=None,
        ),
        "still busy": status["busy"],
        "retransmitted SMTP segments": {
            name: retrans[name] - retrans_before.get(name, 0) for name in retrans
        },
        "completed": sum(1 for r in results if r and r["ok"]),
        "relayroute's state once configured": just_after,
        "networkd said": networkd_said,
    }  # fmt: skip


def check_timeouts(applied):
    timeouts = applied["haproxy"].timeouts()
    assert min(timeouts["client"], timeouts["server"]) > HELD_WINDOW_MAX, timeouts


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("noop_tolerant_postfix")
def test_networkd_restart_and_reload_leave_relayroute_alone(applied, lab, networkd, tmp_path):
    """
    ``systemctl restart systemd-networkd`` and ``networkctl reload`` with the
    files unchanged (ManageForeign*= at their default), and a reload after the
    ``.network`` was rewritten with ManageForeign*=no: nothing deleted, no
    session lost, the watcher has nothing to do.
    """
    check_timeouts(applied)
    relay = lab.ns(RELAY)
    before = ours(relay)
    assert all(before.values()), before
    network = f"10-{LINK}.network"

    def rewritten_and_reloaded():
        networkd.touch_network(network)
        networkd.networkctl("reload")

    watcher = Watcher(lab, tmp_path / "watch.log")
    try:
        restarted = held_event(lab, networkd, "networkd restart", networkd.restart)
        after_restart = ours(relay)
        mark = networkd.mark()
        reload = networkd.networkctl("reload")
        time.sleep(2.0)  # a reload that reconfigured would have done so by now
        reloaded_log = networkd.log_since(mark)
        after_reload = ours(relay)
        networkd.manage_foreign(False)
        try:
            networkd.restart()
            foreign_no = held_event(
                lab, networkd, "rewritten .network, reload, ManageForeign*=no",
                rewritten_and_reloaded,
            )  # fmt: skip
            after_foreign_no = ours(relay)
        finally:
            networkd.manage_foreign(True)
            networkd.restart()
        log = watcher.log()
    finally:
        watcher.stop()
    report(
        "networkd restarted, networkctl reload, a reload of a rewritten .network "
        "with ManageForeign*=no",
        [
            f"restart, sessions held: {restarted}",
            "  relayroute's rules, routes and chains after: "
            + ("identical" if after_restart == before else f"DIFFER {after_restart}"),
            f"networkctl reload, files unchanged: rc {reload.returncode}; networkd logged for "
            f"{LINK}: {[line for line in reloaded_log.splitlines() if f' {LINK}: ' in line][:5]}",
            "  relayroute's rules, routes and chains after: "
            + ("identical" if after_reload == before else f"DIFFER {after_reload}"),
            f".network rewritten, reload, ManageForeign*=no, sessions held: {foreign_no}",
            "  relayroute's rules, routes and chains after: "
            + ("identical" if after_foreign_no == before else f"DIFFER {after_foreign_no}"),
            f"watcher log: {log.splitlines()}",
        ],
    )
    for figures, after in ((restarted, after_restart), (foreign_no, after_foreign_no)):
        assert figures["relayroute's state once configured"] == before, figures
        assert after == before
        assert not [line for line in figures["networkd said"] if "Removing" in line], figures
        assert figures["held on relay1"]["vip"] > 0, figures
        assert figures["lost"] == 0, figures
        assert figures["new proxied session ok after configured s"] is not None, figures
    # The rewritten file did make networkd reconfigure the link.
    assert f"{LINK}: State changed: configuring -> configured" in " ".join(
        foreign_no["networkd said"]
    ), foreign_no
    assert f" {LINK}: State changed" not in reloaded_log, reloaded_log
    assert "Removing" not in reloaded_log, reloaded_log
    assert after_reload == before
    assert "repaired" not in log, log


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("noop_tolerant_postfix")
@pytest.mark.parametrize("event", ["networkctl reconfigure", "rewritten .network, reload"])
def test_networkd_reconfiguring_is_repaired_by_the_watcher_and_not_without_it(
    applied, lab, networkd, tmp_path, event
):
    """
    ``networkctl reconfigure lan0``, or ``networkctl reload`` after the
    ``.network`` was written again (``netplan apply``), with ManageForeign*= at
    their default: networkd reconfigures lan0 and removes relayroute's rule and
    route; the watcher puts them back; without it the proxied path to relay1
    stays dead until the boot's restore.
    """
    check_timeouts(applied)
    relay = lab.ns(RELAY)
    before = ours(relay)
    assert all(before.values()), before

    def reconfigure():
        if event == "networkctl reconfigure":
            networkd.networkctl("reconfigure", LINK)
        else:
            networkd.touch_network(f"10-{LINK}.network")
            networkd.networkctl("reload")

    watcher = Watcher(lab, tmp_path / "watch.log")
    try:
        with_watcher = held_event(lab, networkd, f"{event} with the watcher", reconfigure)
        time.sleep(0.5)
        after = ours(relay)
        log = watcher.log()
    finally:
        watcher.stop()
    vip = mail_via_vip(lab, (25, 587) * 3)

    # The control: the same event, no watcher.
    try:
        control = held_event(lab, networkd, f"{event} without the watcher", reconfigure)
        dead = probe_proxied(lab, NEGATIVE_TIMEOUT)
        broken = ours(relay)
    finally:
        restore(lab)
    positive = probe_proxied(lab, RECOVERY_WAIT)
    repaired = ours(relay)

    report(
        f"{event} ({LINK} on relay1), sessions on both paths held",
        [
            f"watcher: {' '.join(watcher.command)}",
            *(f"  log: {line}" for line in log.splitlines()),
            f"with the watcher: {with_watcher}",
            "  relayroute's rules, routes and chains after: "
            + ("identical to before" if after == before else f"DIFFER {after} vs {before}"),
            f"  mail through the VIP afterwards: {sum(r.ok for r in vip)} of {len(vip)} ok",
            f"without the watcher: {control}",
            f"  a new proxied session to relay1, polled {NEGATIVE_TIMEOUT:.0f} s later: {dead}",
            f"  relayroute's rules and routes then: {broken['rules']} {broken['routes']}",
            f"  the boot's restore (no Salt), then a new proxied session: {positive}",
        ],
    )
    # networkd removed the rule (the event the watcher saw). The route: a
    # reconfigure's address removal takes it in the kernel; a reload removes it
    # only while networkd does not hold it for "removing" (see the docstring).
    assert "Removing foreign routing policy rule" in " ".join(with_watcher["networkd said"])
    repaired_lines = [line for line in log.splitlines() if "repaired (" in line]
    assert repaired_lines, log
    assert "deleted: " in repaired_lines[0], log
    recovered = with_watcher["new proxied session ok after configured s"]
    assert recovered is not None, with_watcher
    assert recovered < REPAIR_BOUND, with_watcher
    assert after == before
    assert with_watcher["lost"] == 0, with_watcher
    assert with_watcher["held on relay1"]["vip"] > 0, with_watcher
    assert all(r.ok for r in vip), [r.text for r in vip if not r.ok]
    assert control["new proxied session ok after configured s"] is None, control
    assert control["lost on relay1"]["vip"] == control["held on relay1"]["vip"] > 0, control
    assert control["lost elsewhere"] == 0, control
    assert not dead["ok"], dead
    assert not broken["rules"], broken
    if event == "networkctl reconfigure":
        # Gone with networkd's address, whatever networkd knew of it.
        assert not broken["routes"], broken
    assert positive["ok"], positive
    assert repaired == before


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("noop_tolerant_postfix")
@pytest.mark.parametrize("case", ["carrier bounce", "reconfigure, ManageForeign*=no"])
def test_watcher_repairs_what_goes_with_networkds_address(applied, lab, networkd, tmp_path, case):
    """
    Carrier lost and back (ManageForeign*= at their default), and ``networkctl
    reconfigure`` with ManageForeign*=no: relayroute's rule stays, its table's
    route goes with networkd's address, silently (no deletion event, lan0 stays
    up). The watcher puts it back when networkd adds the address again; without
    it the proxied path to relay1 stays dead.
    """
    check_timeouts(applied)
    relay = lab.ns(RELAY)
    before = ours(relay)
    assert all(before.values()), before
    foreign_no = case.endswith("=no")
    if foreign_no:
        networkd.manage_foreign(False)
        networkd.restart()
        event = lambda: networkd.networkctl("reconfigure", LINK)  # noqa: E731
    else:
        event = lambda: carrier_bounce(lab)  # noqa: E731
    try:
        watcher = Watcher(lab, tmp_path / "watch.log")
        try:
            figures = held_event(lab, networkd, f"{case} with the watcher", event)
            time.sleep(0.5)
            after = ours(relay)
            log = watcher.log()
        finally:
            watcher.stop()
        # The control: the same event, no watcher.
        try:
            control = held_event(lab, networkd, f"{case} without the watcher", event)
            broken = ours(relay)
        finally:
            restore(lab)
    finally:
        if foreign_no:
            networkd.manage_foreign(True)
            networkd.restart()
    report(
        f"{case} on relay1 under networkd, sessions on both paths held",
        [
            f"watcher: {' '.join(watcher.command)}",
            *(f"  log: {line}" for line in log.splitlines()),
            f"with the watcher: {figures}",
            "  relayroute's rules, routes and chains after: "
            + ("identical to before" if after == before else f"DIFFER {after} vs {before}"),
            f"without the watcher: {control}",
            f"  relayroute's rules and routes then: {broken['rules']} {broken['routes']}",
        ],
    )
    assert "repaired (address added: lan0" in log, log
    recovered = figures["new proxied session ok after configured s"]
    assert recovered is not None, figures
    assert recovered < REPAIR_BOUND, figures
    assert after == before
    assert figures["held on relay1"]["vip"] > 0, figures
    assert figures["lost"] == 0, figures
    # What networkd did (seen without the watcher): the rule stayed, the route went.
    assert control["relayroute's state once configured"]["rules"] == before["rules"], control
    assert not control["relayroute's state once configured"]["routes"], control
    assert control["new proxied session ok after configured s"] is None, control
    assert control["lost on relay1"]["vip"] == control["held on relay1"]["vip"] > 0, control
    assert control["lost elsewhere"] == 0, control
    assert broken["rules"] == before["rules"], broken
    assert not broken["routes"], broken
