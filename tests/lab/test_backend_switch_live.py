"""
Switching packet-filter backend on live mail systems, in the seed's lab: the
relays and master-relay go from the platform's default backend (nftables on
Debian 12: the lab's pillar names none) to iptables by a pillar edit and a
highstate, then back. Sessions held open across both switches, through the VIP
and straight to the relays, stay busy (a NOOP every INTERVAL s) with no reply
lost, no segment resent, and each delivers its message at the end; new whole
sessions start one after another all through each switch, and none fails.
After each switch: every role lives in the new backend alone (nothing of the
old one left), mail flows both ways, and each flow's connmark is right (the
proxy's through the VIP, 0 direct).
"""

import copy
import time

import pytest

from tests.lab import filters
from tests.lab.sessions import NewSessions
from tests.lab.test_live_safety import (
    HIGHSTATE_TIMEOUT,
    INTERVAL,
    REPLY_BOUND,
    check_held_marks,
    connmark_changes,
    conntrack_flows,
    highstate,
    noop_tolerant_postfix,  # noqa: F401 - a fixture
    relay_connmarks,
    smtp_retransmits,
    window_counts,
)
from tests.support import seedlab
from tests.support.seedlab import mail_direct, mail_via_vip, report
from tests.support.smtphold import HeldSmtpSessions

pytestmark = [pytest.mark.lab, pytest.mark.root]

ROLES = {"master-relay": "proxy", **{name: "relay" for name in seedlab.RELAYS}}
# New sessions: one every NEW_EVERY s, cycling through the VIP on 25 and 587 and
# each relay directly, from just before a highstate until it returned; each wait
# bounded by NEW_TIMEOUT s (wide: a lost SYN is resent after 1 s, then 3 s).
NEW_EVERY, NEW_TIMEOUT = 0.25, 15.0
# The longest sessions are held here: opening, two highstates with the checks
# after each, finishing. HAProxy's idle timers (10 m, seedlab) are wider.
HELD_WINDOW_MAX = 2 * HIGHSTATE_TIMEOUT + 120


def held_spec(lab):
    """Four sessions straight to each relay, eight through the VIP on each port."""
    direct = [
        {"server": address, "port": 25, "source": seedlab.EXTERNAL_MTA,
         "rcpt": f"postmaster@{name}.lab.example", "path": "direct", "relay_address": address}
        for name, address in lab.relay_addresses.items()
        for _ in range(4)
    ]  # fmt: skip
    vip = [
        {"server": seedlab.VIP, "port": port, "source": seedlab.MAIL_CLIENT,
         "rcpt": "someone@example.org", "path": "vip"}
        for port in (25, 587)
        for _ in range(8)
    ]  # fmt: skip
    return direct + vip


def new_targets(lab):
    """Where the new sessions go, in turn: the VIP on both ports, each relay directly."""
    targets = [
        {"server": seedlab.VIP, "port": port, "source": seedlab.MAIL_CLIENT,
         "rcpt": "someone@example.org", "path": "vip"}
        for port in (25, 587)
    ]  # fmt: skip
    for name, address in lab.relay_addresses.items():
        targets.append(
            {"server": address, "port": 25, "source": seedlab.EXTERNAL_MTA,
             "rcpt": f"postmaster@{name}.lab.example", "path": "direct"}
        )  # fmt: skip
    return targets


def flow_keys(lab):
    """Every TCP flow the relays' conntrack holds now, by relay and original tuple."""
    return {
        (name, f["src"], f["sport"], f["dst"], f["dport"])
        for name in lab.relay_addresses
        for f in conntrack_flows(lab.ns(name), state=None)
    }


def mail_both_ways(lab, mark):
    """
    One message straight to each relay and two through the VIP per port, then
    the marks of the relays' flows that are new since: the proxy's ``mark``
    on those from the mail client (through the VIP), 0 on the direct ones.
    Returns (what failed, the new flows' marks by path).
    """
    before = flow_keys(lab)
    results = [mail_direct(lab, name) for name in lab.relay_addresses]
    results += mail_via_vip(lab, (25, 587) * 2)
    failed = [r.text for r in results if not r.ok]
    marks = {"vip": [], "direct": []}
    for name in lab.relay_addresses:
        for f in conntrack_flows(lab.ns(name), state=None):
            if (name, f["src"], f["sport"], f["dst"], f["dport"]) in before:
                continue
            if f["dport"] in ("25", "587") and f["dst"] == lab.relay_addresses[name]:
                path = "vip" if f["src"] == seedlab.MAIL_CLIENT else "direct"
                marks[path].append(int(f["mark"]))
    problems = [] if marks["vip"] and marks["direct"] else [f"no new flows seen: {marks}"]
    problems += [f"vip flow mark {m}" for m in marks["vip"] if m != mark]
    problems += [f"direct flow mark {m}" for m in marks["direct"] if m != 0]
    return failed + problems, {path: sorted(set(m)) for path, m in marks.items()}


def leftovers(lab, backend):
    """What of ``backend`` relayroute still holds on any host (each role's part)."""
    return {
        name: lines
        for name, role in ROLES.items()
        if (lines := filters.owned(lab.ns(name), role)[backend])
    }


@pytest.mark.timeout(HELD_WINDOW_MAX + 300)
@pytest.mark.usefixtures("noop_tolerant_postfix")
def test_backend_switch_and_back_with_mail_flowing(
    applied, lab, salt_cli, set_pillar, pillar_data, tmp_path
):
    """
    28 sessions held across both switches (12 direct, 16 through the VIP on
    25 and 587), new whole sessions through each highstate; after each switch
    every role in the new backend alone, mail both ways with the right marks.
    """
    mark = pillar_data["relayroute"]["proxies"]["master-relay"]["mark"]
    marks = {"direct": 0, "vip": mark}
    default = filters.lab_backend(lab)
    assert default == "nftables", "this test switches from nftables: the lab must run it"
    holding = {name: filters.holding(lab.ns(name), role) for name, role in ROLES.items()}
    assert holding == {name: [default] for name in ROLES}, holding
    to_iptables = copy.deepcopy(pillar_data)
    to_iptables["relayroute"]["backend"] = "iptables"
    plan = [("to iptables", to_iptables, "iptables", "nftables"),
            ("back to nftables", pillar_data, "nftables", "iptables")]  # fmt: skip
    # Every connmark of the held and the new sessions' flows, at every moment of both switches.
    with relay_connmarks(lab, tmp_path) as events:
        held = HeldSmtpSessions(
            lab.ns("client"), held_spec(lab), interval=INTERVAL, bound=REPLY_BOUND
        )
        steps, new = [], None
        started = time.monotonic()
        switched = False
        try:
            assert held.held == len(held.sessions), [r for r in held.opened if r["stage"] != "held"]
            for opened in held.opened:
                # Through the VIP, the relay that answered is the one HAProxy chose.
                opened["spec"]["relay_address"] = lab.relay_addresses[opened["relay"]]
            problems, _seen = check_held_marks(lab, held.opened, marks)
            assert not problems, problems
            for title, pillar, backend, old in plan:
                switched = True
                set_pillar(pillar)
                new = NewSessions(
                    lab.ns("client"), new_targets(lab), NEW_EVERY, HIGHSTATE_TIMEOUT, NEW_TIMEOUT,
                    stop_file=tmp_path / f"stop {title}",
                )  # fmt: skip
                held.window(title)
                began = time.monotonic()
                changed = highstate(salt_cli, timeout=HIGHSTATE_TIMEOUT)
                took = time.monotonic() - began
                new.stop()
                sessions = new.results()
                held.window(f"after {title}")
                status = held.status()
                held_problems, seen = check_held_marks(lab, held.opened, marks)
                retransmits = smtp_retransmits(lab)
                holding = {
                    name: filters.holding(lab.ns(name), role) for name, role in ROLES.items()
                }
                left = leftovers(lab, old)
                tables = {name: filters.relayroute_tables(lab.ns(name)) for name in ROLES}
                chains = {
                    name: "RELAYROUTE" in lab.ns(name).exec("iptables-save").stdout
                    for name in ROLES
                }
                mail_problems, new_marks = mail_both_ways(lab, mark)
                steps.append({
                    "title": title, "took": took, "changed": changed, "sessions": sessions,
                    "status": status, "held_problems": held_problems, "seen": seen,
                    "retransmits": retransmits, "holding": holding, "left": left,
                    "tables": tables, "chains": chains, "mail_problems": mail_problems,
                    "new_marks": new_marks, "backend": backend,
                })  # fmt: skip
                assert all(changed[name] for name in ROLES), changed
                assert holding == {name: [backend] for name in ROLES}, holding
                assert not left, left
                if backend == "iptables":
                    assert not any(tables.values()), tables
                else:
                    assert not any(chains.values()), chains
                switched = backend != default
        finally:
            try:
                if new is not None:
                    new.kill()
                # The lab's own pillar and backend for the package's other tests.
                if switched:
                    set_pillar(pillar_data)
                    highstate(salt_cli, timeout=HIGHSTATE_TIMEOUT)
            finally:
                results = held.finish()
                window = time.monotonic() - started
                held.close()
    changed_marks, followed = connmark_changes(lab, events, marks)

    completed = [r for r in results if r and r["ok"]]
    lost = [r for r in results if r and r["stage"] == "noop"]
    lines = []
    for step in steps:
        counts = window_counts(results, step["title"])
        sessions = step["sessions"]
        by_path = {
            path: f"{sum(s['ok'] for s in sessions if s['path'] == path)}/"
            f"{sum(s['path'] == path for s in sessions)}"
            for path in ("vip", "direct")
        }
        longest = max(c[1] for c in counts) * 1000
        lines += [
            f"{step['title']} ({step['took']:.1f} s): changed {step['changed']}",
            f"  held: NOOPs answered {sum(c[0] for c in counts)}, per session at least "
            f"{min(c[0] for c in counts)}; longest reply {longest:.0f} ms, "
            f"longest time between two replies {max(c[2] for c in counts) * 1000:.0f} ms; "
            f"{step['status']['busy']} busy, {len(step['status']['losses'])} lost; held flows in "
            f"conntrack {step['seen']}; retransmitted SMTP segments {step['retransmits']}",
            f"  new whole sessions during the highstate, one every {NEW_EVERY} s: "
            f"{len(sessions)} started, ok through the VIP {by_path['vip']}, direct "
            f"{by_path['direct']}",
            f"  after: every role in {step['backend']} alone {step['holding']}; relayroute's "
            f"nftables tables {step['tables']}; RELAYROUTE in iptables-save {step['chains']}",
            f"  mail after: new flows' marks {step['new_marks']}"
            + (f"; PROBLEMS {step['mail_problems']}" if step["mail_problems"] else ""),
        ]
    report("backend switch on live mail, nftables -> iptables -> nftables", [
        *lines,
        f"sessions held: {held.held}, {window:.0f} s, a NOOP every {INTERVAL} s each; lost "
        f"{len(lost)}; completed with 250 after DATA {len(completed)} of {len(held.sessions)}",
        f"connmarks in the kernel's conntrack events, held and new sessions' flows, the whole "
        f"window: {followed} flows followed, {len(changed_marks)} began wrong or changed",
    ])  # fmt: skip
    assert len(steps) == len(plan), [s["title"] for s in steps]
    assert not lost, lost[:5]
    assert len(completed) == len(held.sessions), [r for r in results if not (r and r["ok"])][:5]
    assert followed >= len(held.sessions), followed
    assert not changed_marks, changed_marks[:5]
    for step in steps:
        title = step["title"]
        failed = [s for s in step["sessions"] if not s["ok"]]
        assert step["sessions"], title
        assert not failed, (title, failed[:5])
        assert {s["path"] for s in step["sessions"]} == {"vip", "direct"}, title
        assert not step["held_problems"], (title, step["held_problems"])
        assert not any(step["retransmits"].values()), (title, step["retransmits"])
        assert not step["mail_problems"], (title, step["mail_problems"])
        counts = window_counts(results, title)
        # Every held session talked while the highstate ran, never silent for
        # longer than a late reply may take.
        assert min(c[0] for c in counts) >= 1, (title, counts)
        assert max(c[2] for c in counts) < INTERVAL + REPLY_BOUND, (title, counts)
