"""
Between applies, in the seed's lab, no Salt involved: relay1's LAN link
bounces (down, 1 s, up: what ifdown/ifup, a NIC reset or a driver reload do)
while SMTP sessions on both paths are kept busy. The kernel takes every route
through the link with it, the proxy's table's default route included, while
relayroute's fwmark rule stays: marked replies fall through to the main table
and leave by the gateway, whose stateful firewall drops them.

- With the watcher (started as its unit's ExecStart runs it) new proxied
  sessions to relay1 succeed again within 2 s of the link being up, and
  relayroute's rules, routes and chains are identical to before.
- The control, without the watcher: the proxied path to relay1 stays dead
  (a new proxied session fails for 12 s) until a re-apply brings it back.
"""

import json
import os
import signal
import textwrap
import time

import pytest

from tests.lab import filters
from tests.lab.test_live_safety import (
    highstate,
    noop_tolerant_postfix,  # noqa: F401 - a fixture
    smtp_retransmits,
)
from tests.support import seedlab
from tests.support.netns import live_processes
from tests.support.seedlab import mail_via_vip, report
from tests.support.smtphold import HeldSmtpSessions
from tests.support.tcp import NEGATIVE_TIMEOUT

pytestmark = [pytest.mark.lab, pytest.mark.root]

RELAY = "relay1"
LINK = "lan0"
DOWN_FOR = 1.0
# The watcher must have put relay1's routing back within REPAIR_BOUND seconds
# of the link being up; the probe looks for up to RECOVERY_WAIT seconds.
REPAIR_BOUND = 2.0
RECOVERY_WAIT = 20.0
# Held sessions: a NOOP every INTERVAL s; a reply later than REPLY_BOUND s is a
# loss. SETTLE: how long after the path is back the sessions keep talking, so
# that a session the bounce killed is counted (wider than REPLY_BOUND).
INTERVAL, REPLY_BOUND, SETTLE = 0.3, 3.0, 5.0
# The longest a held session stays open here (opening, the bounce, the probe,
# SETTLE, finishing): every idle timer on the way is wider (HAProxy's 10 m,
# Postfix's smtpd_timeout 300 s, the NOOP bound per reply).
HELD_WINDOW_MAX = 60 + DOWN_FOR + RECOVERY_WAIT + SETTLE + 1.0 + 60

# A new session exactly as HAProxy opens it to relay1 for a client (usesrc
# clientip): from master-relay, bound transparently to the client's address.
# Each attempt is a new connection with a short timeout (a SYN-ACK misrouted
# is not waited for); prints when the first one completed EHLO.
PROBE = textwrap.dedent(
    """
    import json, socket, sys, time
    server, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    deadline, attempt = float(sys.argv[4]), float(sys.argv[5])
    start, tries, error = time.monotonic(), 0, None
    while time.monotonic() - start < deadline:
        tries += 1
        s = socket.socket()
        s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
        s.settimeout(attempt)
        try:
            s.bind((source, 0))
            s.connect((server, port))
            f = s.makefile("rb")
            banner = f.readline().decode().strip()
            s.sendall(b"EHLO probe.example.com\\r\\n")
            while True:
                line = f.readline()
                if not line:
                    raise OSError("closed")
                if line[3:4] == b" ":
                    break
            s.sendall(b"QUIT\\r\\n")
            print(json.dumps({"ok": True, "at": time.monotonic(), "tries": tries,
                              "banner": banner}), flush=True)
            sys.exit(0)
        except OSError as err:
            error = repr(err)
        finally:
            s.close()
        time.sleep(0.05)
    print(json.dumps({"ok": False, "at": time.monotonic(), "tries": tries, "error": error}))
    sys.exit(1)
    """
)


def probe_proxied(lab, deadline, attempt=0.3):
    """Poll new proxied sessions to relay1 for up to ``deadline`` s; the first success's result."""
    out = lab.ns("master-relay").exec(
        [
            "python3", "-c", PROBE, lab.relay_addresses[RELAY], "25", seedlab.MAIL_CLIENT,
            str(deadline), str(attempt),
        ],
        check=False,
        timeout=deadline + 30,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def bounce(lab):
    """Down, DOWN_FOR s, up; then the interface's gateway back, as ifup puts it. Returns t(up)."""
    relay = lab.ns(RELAY)
    relay.ip(f"link set {LINK} down")
    time.sleep(DOWN_FOR)
    relay.ip(f"link set {LINK} up")
    up = time.monotonic()
    relay.ip(f"route replace default via {seedlab.GATEWAY}")
    return up


class Watcher:
    """relay1's watcher, run in its namespace as its unit's ExecStart runs it."""

    def __init__(self, lab, log_path):
        commands = lab.watch_commands(RELAY)
        assert len(commands) == 1, commands
        self.command = commands[0]
        self.log_path = log_path
        self.proc = lab.ns(RELAY).popen(self.command, stderr=log_path.open("w"))
        started = time.monotonic()
        while "watching" not in self.log():
            assert time.monotonic() - started < 10, self.log()
            assert self.proc.poll() is None, self.log()
            time.sleep(0.05)

    def log(self):
        return self.log_path.read_text()

    def pids(self):
        """The watcher's bash and what it runs (ip monitor)."""
        return [self.proc.pid, *live_processes(ppid=self.proc.pid)]

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


def sessions_spec(lab):
    """10 sessions straight to relay1, 30 through the VIP (HAProxy spreads them)."""
    direct = {
        "server": lab.relay_addresses[RELAY],
        "port": 25,
        "source": seedlab.EXTERNAL_MTA,
        "rcpt": f"postmaster@{RELAY}.lab.example",
        "path": "direct",
    }
    vip = {
        "server": seedlab.VIP,
        "source": seedlab.MAIL_CLIENT,
        "rcpt": "someone@example.org",
        "path": "vip",
    }
    return [dict(direct) for _ in range(10)] + [
        {**vip, "port": 25 if i % 2 else 587} for i in range(30)
    ]


def held_bounce(lab, title):
    """
    Hold sessions on both paths, bounce relay1's link, poll new proxied
    sessions to relay1; then let the held ones talk SETTLE s more. Returns the
    figures.
    """
    held = HeldSmtpSessions(
        lab.ns("client"), sessions_spec(lab), interval=INTERVAL, bound=REPLY_BOUND
    )
    try:
        assert held.held == len(held.sessions), held.opened
        on_relay = [r["relay"] == RELAY for r in held.opened]
        retrans_before = smtp_retransmits(lab)
        held.window(title)
        up = bounce(lab)
        probe = probe_proxied(lab, RECOVERY_WAIT)
        time.sleep(SETTLE)
        held.window(f"after {title}")
        time.sleep(1.0)
        status = held.status()
        retrans = smtp_retransmits(lab)
    finally:
        results = held.finish()
        held.close()
    lost = [r for r in results if r and r["stage"] == "noop"]
    figures = {
        "new proxied session ok after s": round(probe["at"] - up, 2) if probe["ok"] else None,
        "probe": probe,
        "held": len(results),
        "held on relay1": {
            path: sum(1 for r, mine in zip(results, on_relay) if mine and r["spec"]["path"] == path)
            for path in ("direct", "vip")
        },
        "lost": len(lost),
        "lost detail": [
            (r["spec"]["path"], r.get("window"), r.get("error", "")[:60], r.get("waited"))
            for r in lost
        ][:6],
        "longest reply in the bounce window s": max(
            (r["windows"].get(title, [0, 0.0, 0.0])[1] for r in results if "windows" in r),
            default=None,
        ),
        "still busy": status["busy"],
        "retransmitted SMTP segments": {
            name: retrans[name] - retrans_before.get(name, 0) for name in retrans
        },
        "completed": sum(1 for r in results if r and r["ok"]),
    }  # fmt: skip
    for r, mine in zip(results, on_relay):
        r["on_relay1"] = mine
    figures["lost on relay1"] = {
        path: sum(1 for r in lost if r["on_relay1"] and r["spec"]["path"] == path)
        for path in ("direct", "vip")
    }
    figures["lost elsewhere"] = sum(1 for r in lost if not r["on_relay1"])
    return figures


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("noop_tolerant_postfix")
def test_link_bounce_is_repaired_by_the_watcher_and_not_without_it(
    applied, lab, salt_cli, tmp_path
):
    timeouts = applied["haproxy"].timeouts()
    assert min(timeouts["client"], timeouts["server"]) > HELD_WINDOW_MAX, timeouts
    relay = lab.ns(RELAY)
    before = filters.ours(relay)
    assert all(before.values()), before
    watcher = Watcher(lab, tmp_path / "watch.log")
    try:
        with_watcher = held_bounce(lab, "bounce with the watcher")
        time.sleep(0.5)
        after = filters.ours(relay)
        log = watcher.log()
    finally:
        watcher.stop()
        relay.ip(f"route replace default via {seedlab.GATEWAY}")
    vip = mail_via_vip(lab, (25, 587) * 3)

    # The control: the same bounce, no watcher.
    control = held_bounce(lab, "bounce without the watcher")
    dead = probe_proxied(lab, NEGATIVE_TIMEOUT)
    broken = filters.ours(relay)
    changed = highstate(salt_cli, RELAY)
    positive = probe_proxied(lab, RECOVERY_WAIT)
    repaired = filters.ours(relay)

    report(
        f"relay1's {LINK} down {DOWN_FOR:.0f} s, then up, sessions on both paths held",
        [
            f"watcher: {' '.join(watcher.command)}",
            *(f"  log: {line}" for line in log.splitlines()),
            f"with the watcher: {with_watcher}",
            "  relayroute's rules, routes and chains after: "
            + ("identical to before" if after == before else f"DIFFER {after} vs {before}"),
            f"  mail through the VIP afterwards: {sum(r.ok for r in vip)} of {len(vip)} ok",
            f"without the watcher: {control}",
            f"  a new proxied session to relay1, polled {NEGATIVE_TIMEOUT:.0f} s later: {dead}",
            f"  relayroute's routes then: {broken['routes']}",
            f"  re-apply (highstate relay1) changed {changed}; then a new proxied "
            f"session: {positive}",
        ],
    )
    assert with_watcher["new proxied session ok after s"] is not None, with_watcher
    assert with_watcher["new proxied session ok after s"] < REPAIR_BOUND, with_watcher
    assert after == before
    assert f"repaired (link up: {LINK}): put back route default via" in log
    assert all(r.ok for r in vip), [r.text for r in vip if not r.ok]
    assert with_watcher["lost elsewhere"] == 0, with_watcher
    assert control["new proxied session ok after s"] is None, control
    assert not dead["ok"], dead
    assert not broken["routes"], broken
    assert broken["rules"] == before["rules"], broken
    assert changed[RELAY], changed
    assert positive["ok"], positive
    assert repaired == before
