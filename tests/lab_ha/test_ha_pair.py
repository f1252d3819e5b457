"""
An HA pair in the lab: real HAProxy on two nodes, real keepalived moving the
floating LAN address and the VIP, real Postfix on the relays, no Salt run
between the apply and the end.

Node A (haproxy-a) holds both addresses. SMTP sessions are held open through
the VIP (node A's HAProxy), busy with a NOOP every INTERVAL s, and beside them
sessions straight to the relays; new sessions through the VIP, on 25 and 587,
start every NEW_EVERY s. keepalived on node A is stopped (a clean shutdown: it
sends priority 0 and releases both addresses at once); node B's keepalived
takes them after VRRP's skew time ((256 - 100) / 256 s for priority 100) and
sends its gratuitous ARPs, on lan0 for the floating address and on up0 for the
VIP. Then:

- every session held through node A dies: the client's next segment reaches
  node B (the inet router's neighbour entry for the VIP now names B's MAC),
  which has the VIP but no socket for the connection and answers with a
  reset. TCP state lives in one kernel and HAProxy pairs the client's and the
  relay's connection in one process: nothing of either is on node B. The
  other halves are orphaned: node A's HAProxy still holds the client side,
  the relay's smtpd the relay side, and what the relay sends goes to the
  floating address, i.e. to node B, which drops it (no socket for TPROXY to
  divert it to, no forwarding): shown by resetting them on the relays;
- every new session started once the move is complete (node B holds both
  addresses, the relays' and the router's neighbour entries name node B)
  succeeds, on both ports; node B's MAC rule marked its connections, their
  flows on the relays carry the proxy's mark, nothing of relayroute's on the
  relays changed and the salt-master published no job;
- the sessions straight to the relays are untouched.

Between node A's release and node B's gratuitous ARPs nobody has told the
router or the relays anything: their neighbour entries still name node A,
whose HAProxy still listens on the VIP (bound ``transparent``) and whose
TPROXY divert still delivers the replies to its sockets, so node A goes on
serving new sessions for those 0.6 s (counted, not asserted).

The control: with only node A's MAC on the relays, node B's sessions are not
answered (their SYN-ACKs leave by the stateful gateway, which drops them).
"""

import copy
import datetime
import json
import time
from collections import Counter

import pytest

from tests.lab import filters
from tests.lab.sessions import NewSessions
from tests.lab.test_live_safety import (
    conntrack_flows,
    highstate,
    noop_tolerant_postfix,  # noqa: F401 - a fixture
)
from tests.support import seedlab
from tests.support.halab import FLOATING, PROXY, wait_for
from tests.support.hosts import dropped
from tests.support.seedlab import mail_via_vip, report
from tests.support.smtphold import HeldSmtpSessions
from tests.support.tcp import NEGATIVE_TIMEOUT

pytestmark = [pytest.mark.lab, pytest.mark.root]

A, B = "haproxy-a", "haproxy-b"
MARK = 254
# Held sessions: a NOOP every INTERVAL s, a reply later than REPLY_BOUND s is a loss.
INTERVAL, REPLY_BOUND = 0.3, 3.0
HELD_VIP_PER_PORT, HELD_DIRECT_PER_RELAY = 15, 3
# New sessions through the VIP: one every NEW_EVERY s for NEW_WINDOW s, the first
# NEW_LEAD s before the failover; each a whole transaction (MAIL, RCPT, DATA, QUIT),
# each wait bounded by NEW_TIMEOUT s (wide: a SYN lost in the move is resent after 1 s, 3 s).
NEW_EVERY, NEW_LEAD, NEW_WINDOW, NEW_TIMEOUT = 0.1, 1.0, 12.0, 15.0
# Node B must hold both addresses within MOVE_BOUND s of node A's keepalived being told
# to stop (measured about 0.6 s); polled for up to MOVE_WAIT s.
MOVE_BOUND, MOVE_WAIT = 5.0, 30.0
# The longest a held session stays open here (opening, the new sessions' window, the
# checks, finishing): HAProxy's client and server timeouts (10 m) are wider.
HELD_WINDOW_MAX = 60 + NEW_WINDOW + NEW_TIMEOUT + MOVE_WAIT + 60


def start_new_sessions(lab):
    targets = [
        {"server": seedlab.VIP, "port": port, "source": seedlab.MAIL_CLIENT,
         "rcpt": "someone@example.org"}
        for port in (25, 587)
    ]  # fmt: skip
    return NewSessions(lab.ns("client"), targets, NEW_EVERY, NEW_WINDOW, NEW_TIMEOUT)


# A table of the test's own on each relay, hooked after relayroute's marking in
# either backend (nftables' at mangle - 1, iptables' in mangle): it counts the
# connections that arrive from each node's MAC and leave prerouting with the
# proxy's mark, i.e. that relayroute's MAC rule for that node marked.
COUNTING = "inet lab_marked_by_mac"


@pytest.fixture
def mark_counters(lab, applied):
    """The counting table on every relay, for the test's length."""
    rules = "".join(
        f"ct state new ether saddr {lab.node_mac(name)} meta mark & 0xff == {MARK:#x} "
        f'counter comment "{name}"\n'
        for name in lab.nodes
    )
    text = (
        f"table {COUNTING} {{\n chain pre {{\n type filter hook prerouting priority -100;\n"
        f"{rules} }}\n}}\n"
    )
    try:
        for name in lab.relay_addresses:
            lab.ns(name).exec(["nft", "-f", "-"], input=text)
        yield
    finally:
        for name in lab.relay_addresses:
            lab.ns(name).exec(["nft", "delete", "table", *COUNTING.split()], check=False)


def mac_counters(lab):
    """New connections marked by each node's MAC rule so far, summed over the relays."""
    counts = Counter()
    for name in lab.relay_addresses:
        out = lab.ns(name).exec(["nft", "-j", "list", "table", *COUNTING.split()]).stdout
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if rule and rule.get("comment") in lab.nodes:
                for statement in rule["expr"]:
                    if "counter" in statement:
                        counts[rule["comment"]] += statement["counter"]["packets"]
    return {name: counts[name] for name in lab.nodes}


def snmp(ns, table, field):
    """A counter of /proc/net/snmp in ``ns`` (e.g. Tcp OutRsts, Ip InAddrErrors)."""
    lines = [line.split() for line in ns.exec("cat /proc/net/snmp").stdout.splitlines()]
    for names, values in zip(lines, lines[1:]):
        if names[0] == f"{table}:" and values[0] == f"{table}:" and names[1:] != values[1:]:
            return int(values[names.index(field)])
    raise LookupError((table, field))


def neighbour_mac(ns, address):
    words = ns.ip(f"neigh show {address}").stdout.split()
    return words[words.index("lladdr") + 1].lower() if "lladdr" in words else None


def quiet_gateway(lab, quiet=2.0, timeout=90.0):
    """
    The stateful gateway's drop count once it has dropped nothing for
    ``quiet`` s: the relays' retransmissions of an earlier test (SYN-ACKs of
    the control's half-open connections) are over.
    """
    deadline = time.monotonic() + timeout
    count = dropped(lab.ns("gw"))
    while True:
        time.sleep(quiet)
        now = dropped(lab.ns("gw"))
        if now == count:
            return now
        assert time.monotonic() < deadline, f"the gateway still drops: {count} -> {now}"
        count = now


def vrrp_lines(log):
    """What keepalived logged from the priority 0 advertisement on, gratuitous ARPs counted."""
    lines = [line.split(": ", 1)[-1] for line in log.splitlines()]
    start = next((i for i, line in enumerate(lines) if "priority 0" in line), len(lines))
    garps = Counter()
    shown = []
    for line in lines[start:]:
        if line.startswith("Sending gratuitous ARP on "):
            garps[line.split(" on ", 1)[1]] += 1
        elif "(relayroute)" in line and "queueing" not in line:
            shown.append(line)
    return shown + [f"gratuitous ARPs sent on {key}: {count}" for key, count in garps.items()]


def since(moment, reference):
    return "never" if moment is None else f"{moment - reference:.3f} s"


def held_spec(lab):
    vip = {"server": seedlab.VIP, "source": seedlab.MAIL_CLIENT, "rcpt": "someone@example.org"}
    sessions = [
        {**vip, "port": port, "path": "vip"} for port in (25, 587) for _ in range(HELD_VIP_PER_PORT)
    ]
    for name, address in lab.relay_addresses.items():
        sessions += [
            {
                "server": address,
                "port": 25,
                "source": seedlab.EXTERNAL_MTA,
                "rcpt": f"postmaster@{name}.lab.example",
                "path": "direct",
            }
        ] * HELD_DIRECT_PER_RELAY
    return sessions


def proxied_flows(lab):
    """Each relay's conntrack flows from the mail client (proxied), keyed by (relay, port)."""
    return {
        (name, flow["sport"]): flow
        for name in lab.relay_addresses
        for flow in conntrack_flows(lab.ns(name), state=None)
        if flow["src"] == seedlab.MAIL_CLIENT
    }


def established(ns, filter_):
    return len(
        ns.exec(["ss", "-tnH", "state", "established", *filter_.split()]).stdout.splitlines()
    )


def salt_jobs(master, since, until):
    """
    The jobs in the salt-master's job cache: ``(inside, outside)`` the
    wall-clock window ``since``-``until`` (a jid is the local time it was published).
    """
    ret = master.salt_run_cli(timeout=120).run("jobs.list_jobs")
    assert ret.returncode == 0, ret.stdout
    inside, outside = {}, {}
    for jid, job in (ret.data or {}).items():
        published = datetime.datetime.strptime(jid[:20], "%Y%m%d%H%M%S%f")
        (inside if since <= published <= until else outside)[jid] = job.get("Function")
    return inside, outside


@pytest.mark.timeout(HELD_WINDOW_MAX + 900)
@pytest.mark.usefixtures("noop_tolerant_postfix", "mark_counters")
def test_failover_to_node_b_without_reapply(applied, lab, vrrp, master):
    timeouts = applied["haproxy"][A].timeouts()
    assert min(timeouts["client"], timeouts["server"]) > HELD_WINDOW_MAX, timeouts
    client, inet, node_a, node_b = (lab.ns(n) for n in ("client", "inet", A, B))
    macs = {name: lab.node_mac(name) for name in lab.nodes}
    up_macs = {name: lab.node_mac(name, "up0") for name in lab.nodes}
    assert lab.holds(A) == {"floating": True, "vip": True}, lab.holds(A)
    assert lab.holds(B) == {"floating": False, "vip": False}, lab.holds(B)
    # The formula gave both nodes the proxy role and the same HAProxy configuration.
    configs = {n: lab.ns(n).exec("cat /etc/haproxy/haproxy.cfg").stdout for n in lab.nodes}
    # Only the minion id differs (the header, the health check's EHLO name).
    assert len({text.replace(n, "NODE") for n, text in configs.items()}) == 1, configs
    for name in lab.nodes:
        held = filters.holding(lab.ns(name), "proxy")
        assert held == [filters.lab_backend(lab)], (name, held)

    before = {name: filters.ours(lab.ns(name)) for name in lab.relay_addresses}
    assert all(all(part.values()) for part in before.values()), before
    vip_before = mail_via_vip(lab, (25, 587) * 2)
    assert all(r.ok for r in vip_before), [r.text for r in vip_before if not r.ok]
    counters_before = mac_counters(lab)
    gw_dropped_before = quiet_gateway(lab)

    held = HeldSmtpSessions(client, held_spec(lab), interval=INTERVAL, bound=REPLY_BOUND)
    new = None
    try:
        assert held.held == len(held.sessions), [r for r in held.opened if r["stage"] != "held"]
        held_relays = {r["relay"] for r in held.opened if r["spec"]["path"] == "vip"}
        flows_before = proxied_flows(lab)
        neighbours_before = {n: neighbour_mac(lab.ns(n), FLOATING) for n in held_relays}
        assert set(neighbours_before.values()) == {macs[A]}, neighbours_before
        assert neighbour_mac(inet, seedlab.VIP) == up_macs[A]
        rsts_before = snmp(node_b, "Tcp", "OutRsts")
        addr_errors_before = snmp(node_b, "Ip", "InAddrErrors")
        wall_since = datetime.datetime.now()
        held.window("failover")

        new = start_new_sessions(lab)
        time.sleep(NEW_LEAD)
        moved = {}
        counters_t0 = mac_counters(lab)
        opens_t0 = {n: snmp(lab.ns(n), "Tcp", "PassiveOpens") for n in lab.nodes}
        t0 = time.monotonic()
        vrrp[A].terminate()
        watch = {
            "A released both": lambda: not any(lab.holds(A).values()),
            "B holds both": lambda: all(lab.holds(B).values()),
            "relays' neighbour is B": lambda: all(
                neighbour_mac(lab.ns(n), FLOATING) == macs[B] for n in held_relays
            ),
            "inet's neighbour is B": lambda: neighbour_mac(inet, seedlab.VIP) == up_macs[B],
        }

        def all_moved():
            now = time.monotonic()
            for label, check in watch.items():
                if label not in moved and check():
                    moved[label] = now
            return len(moved) == len(watch)

        wait_for(all_moved, MOVE_WAIT, lambda: f"moved so far: {moved}")
        # The move is complete when every observer says so: sessions started
        # from then on reach node B, and node B's replies reach them.
        t_move = max(moved.values())
        vrrp[A].wait(timeout=30)
        sessions = new.results()
        held.window("after the failover")
        time.sleep(INTERVAL + REPLY_BOUND)
        status = held.status()
        # The relay's half of the dead sessions: what it sends goes to node B.
        orphans_relay = {
            n: established(lab.ns(n), f"dst {seedlab.MAIL_CLIENT}") for n in lab.relay_addresses
        }
        orphans_a = established(node_a, f"src {seedlab.VIP}")
        for name in lab.relay_addresses:
            lab.ns(name).exec(["ss", "-K", "-tnH", "dst", seedlab.MAIL_CLIENT], check=False)
        time.sleep(1.0)
        addr_errors = snmp(node_b, "Ip", "InAddrErrors") - addr_errors_before
        rsts = snmp(node_b, "Tcp", "OutRsts") - rsts_before
        vip_after = mail_via_vip(lab, (25, 587) * 2)
        opens = {n: snmp(lab.ns(n), "Tcp", "PassiveOpens") - opens_t0[n] for n in lab.nodes}
        counters_after = mac_counters(lab)
        via = {n: counters_after[n] - counters_t0[n] for n in lab.nodes}
        via_before = {n: counters_t0[n] - counters_before[n] for n in lab.nodes}
        flows_after = proxied_flows(lab)
        after = {name: filters.ours(lab.ns(name)) for name in lab.relay_addresses}
        wall_until = datetime.datetime.now()
    finally:
        if new is not None:
            new.kill()
        results = held.finish()
        held.close()
    jobs, earlier = salt_jobs(master, wall_since, wall_until)
    # The job cache works: it holds the highstate that configured the lab.
    assert "state.highstate" in earlier.values(), earlier
    logs = {name: vrrp[name].output() for name in lab.nodes}

    vip_held = [r for r in results if r["spec"]["path"] == "vip"]
    direct_held = [r for r in results if r["spec"]["path"] == "direct"]
    died = [r for r in vip_held if r["stage"] == "noop"]
    reset = [r for r in died if "Connection reset by peer" in r.get("error", "")]
    before_move = [s for s in sessions if s["start"] < t0]
    during_move = [s for s in sessions if t0 <= s["start"] < t_move]
    after_move = [s for s in sessions if s["start"] >= t_move]
    first_ok = min((s["end"] for s in after_move if s["ok"]), default=None)
    new_flows = {key: flow for key, flow in flows_after.items() if key not in flows_before}
    new_marks = Counter(int(flow.get("mark", 0)) for flow in new_flows.values())
    tried_after = len(after_move) + len(vip_after)
    ok_after = sum(s["ok"] for s in after_move) + sum(r.ok for r in vip_after)

    def summary(group):
        by_port = Counter((s["port"], s["ok"]) for s in group)
        return ", ".join(
            f"{port}: {by_port[(port, True)]}/{by_port[(port, True)] + by_port[(port, False)]} ok"
            for port in (25, 587)
        )

    report(
        "HA pair: keepalived on node A stopped, node B takes the floating address and the VIP",
        [
            f"before: mail through the VIP {sum(r.ok for r in vip_before)}/{len(vip_before)} ok "
            "(25 and 587)",
            f"held: {held.held} sessions ({len(vip_held)} through the VIP via node A, "
            f"{len(direct_held)} direct), a NOOP every {INTERVAL} s",
            "the move, from SIGTERM to node A's keepalived: "
            + ", ".join(
                f"{label} after {at - t0:.3f} s"
                for label, at in sorted(moved.items(), key=lambda x: x[1])
            ),
            f"held through node A: {len(died)} of {len(vip_held)} died, {len(reset)} by a reset; "
            f"errors {dict(Counter(r.get('error', '') for r in died))}; waited "
            f"{max((r.get('waited', 0) for r in died), default=0):.3f} s at most; node B sent "
            f"{rsts} resets",
            f"  their other halves: {orphans_a} client-side sockets still open in node A's "
            "HAProxy, "
            f"relays' smtpd sessions {orphans_relay}; reset from the relays (ss -K): node B "
            f"dropped {addr_errors} (IP InAddrErrors: no socket, no forwarding)",
            f"held direct: {sum(r['ok'] for r in direct_held)} of {len(direct_held)} "
            "delivered (250)",
            f"new sessions through the VIP, one every {NEW_EVERY} s: started before the move "
            f"{len(before_move)} ({summary(before_move)}), during it {len(during_move)} "
            f"({summary(during_move)}), after it {len(after_move)} ({summary(after_move)})",
            f"the first new session started after the move's end completed (250 after DATA, "
            f"QUIT) {since(first_ok, t0)} after the SIGTERM, {since(first_ok, t_move)} after the "
            "move's end",
            f"after: swaks through the VIP {sum(r.ok for r in vip_after)}/{len(vip_after)} ok; new "
            f"sessions after the move in all: {ok_after} of {tried_after} ok",
            f"connections accepted since the SIGTERM (TcpPassiveOpens): node A {opens[A]}, "
            f"node B {opens[B]}",
            f"relays' conntrack, proxied flows opened since the held ones: {len(new_flows)}, "
            f"marks {dict(new_marks)}",
            "connections the relays marked by node MAC (new ones from its MAC that leave "
            "prerouting with the proxy's mark): from the held sessions' start to the SIGTERM "
            f"{via_before}, since then {via}",
            "relayroute's rules, routes and chains on the relays: "
            + ("identical to before" if after == before else "DIFFER"),
            f"Salt jobs published from before the move to the end: {jobs or 'none'}",
            f"stateful gateway's drops: {dropped(lab.ns('gw')) - gw_dropped_before}",
            "node B's keepalived:",
            *(f"  {line}" for line in vrrp_lines(logs[B])),
        ],
    )
    assert moved["B holds both"] - t0 < MOVE_BOUND, moved
    assert len(died) == len(vip_held), [r for r in vip_held if r["stage"] != "noop"][:3]
    # A reset from node B, or (a NOOP that reached node A just before the router
    # learnt node B's MAC, its reply from the relay sent to node B) no reply at all.
    assert all(r in reset or "timed out" in r.get("error", "") for r in died), died[:3]
    assert reset
    assert rsts >= len(reset), rsts
    assert all(r["ok"] for r in direct_held), [r for r in direct_held if not r["ok"]][:3]
    assert not [r for r in status["losses"] if r["spec"]["path"] == "direct"]
    assert after_move, sessions
    assert first_ok is not None
    assert ok_after == tried_after, [s for s in after_move if not s["ok"]][:5]
    assert {s["port"] for s in after_move} == {25, 587}
    # Node B carried nothing while node A was master, every session after the move.
    assert via_before[B] == 0, via_before
    assert via_before[A] >= len(held.sessions) - len(direct_held), via_before
    assert via[B] >= ok_after, via
    assert opens[B] >= ok_after, opens
    assert new_flows
    assert set(new_marks) == {MARK}, new_marks
    assert after == before
    assert not jobs, jobs
    # Node A gave the addresses up cleanly; node B took them and announced both.
    assert "(relayroute) sent 0 priority" in logs[A], logs[A]
    assert "(relayroute) removing VIPs." in logs[A], logs[A]
    assert "(relayroute) Entering MASTER STATE" in logs[B], logs[B]
    for address, dev in ((FLOATING, "lan0"), (seedlab.VIP, "up0")):
        assert f"Sending gratuitous ARP on {dev} for {address}" in logs[B], logs[B]
    assert dropped(lab.ns("gw")) == gw_dropped_before


@pytest.mark.timeout(900)
def test_control_without_node_bs_mac_node_b_is_not_answered(
    applied, lab, vrrp, salt_cli, set_pillar, pillar_data
):
    """
    The same failover with only node A's MAC in the pillar (applied to the
    relays first): node B's connections to the relays get no mark, the relays
    answer them through their default gateway, whose stateful firewall drops
    the SYN-ACKs, and no session through the VIP completes. Then the pillar
    with both MACs is applied again and the same probe succeeds.
    """
    only_a = copy.deepcopy(pillar_data)
    only_a["relayroute"]["proxies"][PROXY]["macs"] = [lab.node_mac(A)]
    try:
        set_pillar(only_a)
        changed = highstate(salt_cli, "relay*")
        assert all(changed[name] for name in lab.relay_addresses), changed
        through_a = mail_via_vip(lab, (25, 587))
        assert all(r.ok for r in through_a), [r.text for r in through_a if not r.ok]
        vrrp[A].stop()
        wait_for(lambda: all(lab.holds(B).values()), MOVE_WAIT, vrrp[B].output)
        dropped_before = dropped(lab.ns("gw"))
        through_b = mail_via_vip(lab, (25, 587), timeout=NEGATIVE_TIMEOUT)
        drops = dropped(lab.ns("gw")) - dropped_before
    finally:
        set_pillar(pillar_data)
        restored = highstate(salt_cli, "relay*")
    again = mail_via_vip(lab, (25, 587))
    # The relays' half-open connections of node B's attempts (their SYN-ACKs,
    # resent for about a minute, would go on being dropped by the gateway).
    for name in lab.relay_addresses:
        lab.ns(name).exec(["ss", "-K", "-tnH", "state", "syn-recv", "dst", seedlab.MAIL_CLIENT])
    quiet_gateway(lab)
    report(
        "control: the relays list only node A's MAC",
        [
            f"through node A: {sum(r.ok for r in through_a)}/{len(through_a)} ok",
            f"after the failover, through node B: {sum(r.ok for r in through_b)}/"
            f"{len(through_b)} ok ({[r.code for r in through_b]}); the gateway dropped {drops}",
            f"both MACs applied again (changed {restored}): "
            f"{sum(r.ok for r in again)}/{len(again)} ok through node B",
        ],
    )
    assert not any(r.ok for r in through_b), [r.transcript for r in through_b]
    assert drops > 0
    assert all(restored[name] for name in lab.relay_addresses), restored
    assert all(r.ok for r in again), [r.text for r in again if not r.ok]
