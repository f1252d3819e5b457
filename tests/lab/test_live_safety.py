"""
Safe on live mail systems, in the seed's lab: sessions in flight survive
re-applies and topology changes; other tools' state survives apply, re-apply
and clean, byte for byte, with both mail paths working.
"""

import copy

import pytest

from tests.support import seedlab
from tests.support.hosts import plant_foreign_state
from tests.support.seedlab import mail_direct, mail_via_vip, report, states_of
from tests.support.smtphold import HeldSmtpSessions

pytestmark = [pytest.mark.lab, pytest.mark.root]

SECOND_PROXY = {
    "address": "192.0.2.3",
    "mac": "02:00:c0:00:02:03",
    "mark": 250,
    "table": 1000250,
    "priority": 1001,
    "vip": "198.51.100.26",
}


def highstate(salt_cli, target="*", flags=()):
    """Run a highstate on ``target``; every state must succeed. Returns the changed state ids."""
    ret = salt_cli.run(*flags, "state.highstate", minion_tgt=target, _timeout=300)
    assert ret.returncode == 0, ret.stdout
    results = states_of(ret, target)
    for minion, states in results.items():
        assert all(isinstance(s, dict) and s["result"] for s in states), (minion, states)
    return {m: [s["__id__"] for s in st if s["changes"]] for m, st in results.items()}


def test_sessions_in_flight_survive_reapply_and_topology_changes(
    applied, lab, salt_cli, set_pillar, pillar_data
):
    sessions = []
    for index in range(40):
        name = f"relay{index % 3 + 1}"
        sessions.append(
            {
                "server": lab.relay_addresses[name],
                "port": 25,
                "source": seedlab.EXTERNAL_MTA,
                "rcpt": f"postmaster@{name}.lab.example",
                "path": "direct",
            }
        )
    for index in range(80):
        sessions.append(
            {
                "server": seedlab.VIP,
                "port": 25 if index % 2 else 587,
                "source": seedlab.MAIL_CLIENT,
                "rcpt": "someone@example.org",
                "path": "vip",
            }
        )
    held = HeldSmtpSessions(lab.ns("client"), sessions)
    assert held.held == len(sessions), "not every session could be opened"
    steps = []
    try:
        steps.append(("highstate again", highstate(salt_cli)))
        two = copy.deepcopy(pillar_data)
        two["relayroute"]["proxies"]["master-relay-2"] = SECOND_PROXY
        set_pillar(two)
        added = highstate(salt_cli)
        assert all(added[name] for name in lab.relay_addresses), added
        steps.append(("second master-relay added", added))
        set_pillar(pillar_data)
        removed = highstate(salt_cli)
        assert all(removed[name] for name in lab.relay_addresses), removed
        steps.append(("second master-relay removed", removed))
    finally:
        set_pillar(pillar_data)
        results = held.finish()
    completed = [r for r in results if r and r["ok"]]
    by_path = {
        path: sum(1 for r in completed if r["spec"]["path"] == path) for path in ("direct", "vip")
    }
    report(
        "live re-apply",
        [f"{title}: changed {changes}" for title, changes in steps]
        + [
            f"sessions opened and held: {held.held}",
            f"sessions completed with 250 after DATA: {len(completed)} of {len(sessions)} "
            f"(direct {by_path['direct']}, through the VIP {by_path['vip']})",
        ],
    )
    failures = [r for r in results if not (r and r["ok"])]
    assert not failures, failures[:5]
    assert len(completed) == len(sessions) >= 100


def test_other_tools_state_survives_apply_reapply_and_clean(applied, lab, salt_cli):
    """A Docker-like chain, another connmark user with its own mask, a VPN's rule and table."""
    relay = lab.ns("relay2")
    clean = salt_cli.run("state.apply", "relayroute.relay.clean", minion_tgt="relay2")
    assert clean.returncode == 0, clean.stdout
    # The VPN's rule catches only its own mark: a rule catching every connection
    # ahead of relayroute's would route proxied replies by the VPN's table.
    plant_foreign_state(relay, vpn_fwmark="0x20000/0xff0000")
    planted = relay.snapshot()
    try:
        assert highstate(salt_cli, "relay2")["relay2"]
        applied_state = relay.snapshot()
        foreign_lines = [line for line in planted["iptables"].splitlines() if line.startswith("-A")]
        now_lines = [
            line
            for line in applied_state["iptables"].splitlines()
            if line.startswith("-A") and "RELAYROUTE" not in line
        ]
        assert now_lines == foreign_lines
        for line in planted["rules"].splitlines():
            assert line in applied_state["rules"]
        direct = mail_direct(lab, "relay2")
        assert direct.ok, direct.text
        vip = mail_via_vip(lab, (25,) * 6)
        assert all(result.ok for result in vip), [r.text for r in vip if not r.ok]
        flows = relay.exec("conntrack -L -p tcp --dport 25").stdout
        marks = {
            line.split("mark=")[1].split()[0] for line in flows.splitlines() if "mark=" in line
        }
        # Both users' bits coexist: 0x10000 (theirs) and 0xfe (relayroute's).
        assert "65790" in marks, flows  # 0x100fe: proxied, marked by both
        assert highstate(salt_cli, "relay2") == {"relay2": []}
        clean = salt_cli.run("state.apply", "relayroute.relay.clean", minion_tgt="relay2")
        assert clean.returncode == 0, clean.stdout
        assert relay.snapshot() == planted
        report("foreign state on relay2", [
            "apply: other tools' mangle rules unchanged and in order; their ip rule kept",
            f"mail: direct ok, {len(vip)} of {len(vip)} through the VIP; connmarks {sorted(marks)}",
            "re-apply: no changes; clean: namespace byte-identical to before",
        ])  # fmt: skip
    finally:
        relay.exec(["iptables", "-t", "mangle", "-F"])
        relay.exec(["iptables", "-t", "mangle", "-X", "DOCKER-LIKE"], check=False)
        relay.ip("rule del priority 900", check=False)
        relay.ip("route flush table 51820", check=False)
        highstate(salt_cli, "relay2")
