"""
``salt-run relayroute.probe`` on the seed's lab: from a probe minion in the
``client`` namespace, sessions to each relay directly and through the VIP, and
each relay's conntrack entries of them. It passes on the lab as applied; it
fails naming the relay and the VIP's paths when relayroute is removed from one
relay, and when another relay has a foreign rule shadowing relayroute's (the
proxy's mark looked up in the main table). HAProxy's health checks stay green
in both. The lab is put back as it was (relayroute re-applied, the rule
deleted) whatever happens.
"""

import copy
import time

import pytest

from tests.lab.conftest import PROBE_MINION, PROBE_SOURCE
from tests.support.seedlab import PROXY_LAN, RELAYS, VIP, report, states_of

pytestmark = [pytest.mark.lab, pytest.mark.root]

# Seconds each network operation of the probe may take here (replies take
# milliseconds; a session through a broken path never gets its banner).
TIMEOUT = 4
PORTS = (25, 587)
SINK = {"from": "probe@lab.example", "to": "someone@example.org"}
# HAProxy holds a client's session to a relay until one side closes it or its
# timeouts (10 minutes in the lab) end it: earlier tests' lost sessions linger
# so (test_networkd's controls leave some to relay1), and with 'balance
# leastconn' HAProxy then sends every new session to the other relays. Before
# each probe, the lab's HAProxy is left no client session to a relay: those
# left are reset (ss -K, HAProxy's sockets only; health checks are kept).
SETTLE_WAIT = 30.0
ARGS = (f"minion={PROBE_MINION}", f"timeout={TIMEOUT}", f"source={PROBE_SOURCE}")
# Another tool's stateful firewall: a user of conntrack that is not relayroute.
FIREWALL_TABLE = "inet rrprobe_firewall"
FIREWALL = f"""
table {FIREWALL_TABLE} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        ct state established,related counter accept
    }}
}}
"""


def haproxy_sessions(lab):
    """HAProxy's sockets to the relays for clients' sessions: ``[(local, peer), ...]``."""
    out = lab.ns("master-relay").exec(["ss", "-tnpH", "state", "all"]).stdout
    relays = {f"{address}:{port}" for address in RELAYS.values() for port in PORTS}
    return [
        (line.split()[3], line.split()[4])
        for line in out.splitlines()
        if '"haproxy"' in line
        and line.split()[4] in relays
        and not line.split()[3].startswith(f"{PROXY_LAN}:")  # health checks
    ]


def haproxy_settled(lab):
    """Reset the clients' sessions HAProxy still holds to relays; how many there were."""
    reset = 0
    started = time.monotonic()
    while True:
        left = haproxy_sessions(lab)
        if not left:
            return reset
        assert time.monotonic() - started < SETTLE_WAIT, left
        for local, peer in left:
            lab.ns("master-relay").exec(["ss", "-K", "-tn", "src", local, "dst", peer], check=False)
        reset += len(left)
        time.sleep(0.5)


def probe(master, lab, *args, timeout=180):
    """Run the runner once HAProxy is idle; returns (exit code, its return, elapsed seconds)."""
    reset = haproxy_settled(lab)
    start = time.monotonic()
    ret = master.salt_run_cli(timeout=timeout).run("relayroute.probe", *args, "details=True")
    elapsed = time.monotonic() - start
    assert isinstance(ret.data, dict), ret.stdout + ret.stderr
    title = f"relayroute.probe {' '.join(args)}: exit {ret.returncode}, {elapsed:.1f} s"
    report(f"{title} (HAProxy's lingering sessions to relays reset first: {reset})", [
        *ret.data.get("table", []), ret.data["summary"]
    ])  # fmt: skip
    return ret.returncode, ret.data, elapsed


def failed_paths(data):
    return sorted((r["relay"], r["path"], r["to"]) for r in data["rows"] if not r["ok"])


def direct_paths(relay):
    return [(relay, "direct", f"{RELAYS[relay]}:{port}") for port in PORTS]


def vip_paths(relay):
    return [(relay, "master-relay", f"{VIP}:{port}") for port in PORTS]


def all_paths_ok(data):
    paths = {(r["relay"], r["path"]) for r in data["rows"]}
    expected = {(n, "direct") for n in RELAYS} | {(n, "master-relay") for n in RELAYS}
    return paths == expected and len(data["rows"]) == 4 * len(RELAYS) and data["ok"]


def test_probe_passes_on_the_lab_from_pillar(applied, probe_minion, master, set_pillar, lab):
    """The settings in pillar (relayroute:probe), a whole message to a sink in every session."""
    pillar = copy.deepcopy(lab.pillar())
    pillar["relayroute"]["probe"] = {
        "minion": PROBE_MINION,
        "timeout": TIMEOUT,
        "source": PROBE_SOURCE,
        "message": SINK,
    }
    set_pillar(pillar)
    try:
        code, data, _elapsed = probe(master, lab)
    finally:
        set_pillar(lab.pillar())
    assert code == 0, data["table"]
    assert all_paths_ok(data), data["rows"]
    assert all(s["sent"] for s in data["sessions"]), data["sessions"]
    marks = {r["path"]: r["marks"] for r in data["rows"]}
    assert marks == {"direct": ["0"], "master-relay": ["0xfe"]}


def test_probe_fails_naming_a_relay_without_relayroute(
    applied, probe_minion, master, salt_cli, lab
):
    relay = "relay1"
    ns = lab.ns(relay)
    # Another tool's stateful firewall on the relay keeps conntrack on there.
    ns.exec(["nft", "-f", "-"], input=FIREWALL)
    try:
        cleaned = salt_cli.run("state.apply", "relayroute.relay.clean", minion_tgt=relay)
        assert cleaned.returncode == 0, cleaned.stdout
        code, data, _elapsed = probe(master, lab, *ARGS)
        assert code == 1, data["table"]
        assert failed_paths(data) == vip_paths(relay), data["table"]
        assert data["summary"].startswith(
            f"relayroute probe FAILED: 2 of 12 paths: {relay} via master-relay {VIP}:25: "
            f"connmark 0 on {PROBE_SOURCE}:"
        ), data["summary"]
        problems = [p for r in data["rows"] if not r["ok"] for p in r["problems"]]
        assert any("never got past the handshake (SYN_RECV)" in p for p in problems), problems
        # Without it the kernel tracks nothing there: every path of the relay is unproven.
        ns.exec(f"nft delete table {FIREWALL_TABLE}")
        code, data, _elapsed = probe(master, lab, *ARGS)
        assert code == 1, data["table"]
        assert failed_paths(data) == sorted(direct_paths(relay) + vip_paths(relay)), data["table"]
        problems = [p for r in data["rows"] if not r["ok"] for p in r["problems"]]
        assert all("its kernel tracks no connection" in p for p in problems), problems
    finally:
        ns.exec(f"nft delete table {FIREWALL_TABLE}", check=False)
        again = salt_cli.run("state.apply", "relayroute", minion_tgt=relay, _timeout=300)
        assert again.returncode == 0, again.stdout
        states_of(again, relay)
    code, data, _elapsed = probe(master, lab, *ARGS)
    assert code == 0, data["table"]


def test_probe_fails_naming_a_relay_with_a_shadowing_rule(applied, probe_minion, master, lab):
    relay = "relay2"
    # Before relayroute's rule (priority 1000): the proxy's mark in the main table.
    rule = "rule add priority 900 fwmark 0xfe/0xff lookup main"
    lab.ns(relay).ip(rule)
    try:
        code, data, _elapsed = probe(master, lab, *ARGS)
        assert code == 1, data["table"]
        assert failed_paths(data) == vip_paths(relay), data["table"]
        problems = [p for r in data["rows"] if not r["ok"] for p in r["problems"]]
        assert all("never got past the handshake (SYN_RECV)" in p for p in problems), problems
    finally:
        lab.ns(relay).ip(rule.replace("rule add", "rule del"))
    code, data, _elapsed = probe(master, lab, *ARGS)
    assert code == 0, data["table"]


def test_the_fleets_status_is_one_table(applied, probe_minion, master, lab):
    """``salt-run relayroute.status``: every relay's rows in one table; a drift named by relay."""
    run = master.salt_run_cli(timeout=120)
    ret = run.run("relayroute.status", "details=True")
    assert isinstance(ret.data, dict), ret.stdout + ret.stderr
    report("salt-run relayroute.status", ret.data["table"].splitlines())
    assert ret.returncode == 0, ret.data["table"]
    assert set(ret.data["rows"]) == set(RELAYS)
    for name, rows in ret.data["rows"].items():
        proxy = rows[0]
        assert proxy["proxy"] == "master-relay", rows
        assert proxy["rule"] == "IPv4 1000 ok", rows
        assert proxy["macs_marked"] == lab.proxy_mac(), rows
        assert proxy["drift"] == "ok", (name, rows)
    route = "route del default table 1000254"
    lab.ns("relay2").ip(route)
    try:
        ret = run.run("relayroute.status", "details=True")
        assert ret.returncode == 1, ret.data["table"]
        drifting = {n for n, rows in ret.data["rows"].items() if rows[0]["drift"] != "ok"}
        assert drifting == {"relay2"}, ret.data["table"]
        assert "MISSING" in ret.data["rows"]["relay2"][0]["route"]
    finally:
        lab.ns("relay2").ip(f"route add default via {lab.proxy_address} table 1000254 proto 210")
