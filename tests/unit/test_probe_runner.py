"""
``salt-run relayroute.probe``'s runner over a fake LocalClient (no root, no
Salt daemons): which minions it asks for what, in which order, and its
return code for a good lab, a broken relay, a bad pillar and a silent probe.
"""

import copy
import importlib.util
import itertools

import pytest

from tests.conftest import ROOT
from tests.unit.test_probe import PILLAR

PROBE_ADDRESS = "203.0.113.10"


def load_runner():
    spec = importlib.util.spec_from_file_location(
        "relayroute_runner_under_test", ROOT / "_runners" / "relayroute.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # What Salt's loader injects; no synced extension modules: the checkout's.
    module.__opts__ = {"extension_modules": "/nonexistent", "conf_file": "/dev/null"}
    module.__context__ = {}
    return module


class Lab:
    """
    Minions as the runner sees them through LocalClient: the relays' pillar,
    the probe minion opening sessions (each gets a port; a session through the
    VIP lands on the relay with the fewest, as leastconn does), and the relays'
    conntrack (a broken relay marks nothing and never completes a handshake).
    """

    def __init__(self, pillar, broken=(), probe_answers=True):
        self.pillar = pillar
        self.broken = set(broken)
        self.probe_answers = probe_answers
        self.flows = {"relay1": [], "relay2": []}
        self.ports = itertools.count(40000)
        self.calls = []

    def cmd(self, tgt, fun, arg=None, kwarg=None, timeout=None, tgt_type="glob", **_):
        self.calls.append((fun, tgt, tgt_type))
        if fun == "relayroute.probe_flows":
            sources, ports = arg
            return {
                relay: {
                    "ret": [f for f in self.flows[relay] if f["src"] in sources],
                    "retcode": 0,
                }
                for relay in tgt
            }
        if fun == "relayroute.probe_smtp":
            if not self.probe_answers:
                return {}
            return {tgt[0]: {"ret": self.sessions(arg[0], kwarg), "retcode": 0}}
        raise AssertionError(fun)

    def sessions(self, sessions, kwarg):
        relays = {"192.0.2.11": "relay1", "192.0.2.12": "relay2"}
        results = []
        turn = itertools.cycle(sorted(self.flows))
        for session in sessions:
            port = next(self.ports)
            relay = relays.get(session["address"]) or next(turn)
            broken = relay in self.broken and session["address"] not in relays
            dst = {v: k for k, v in relays.items()}[relay]
            self.flows[relay].append(
                {
                    "src": PROBE_ADDRESS,
                    "sport": port if session["address"] in relays else port + 10000,
                    "dst": dst,
                    "dport": session["port"],
                    "mark": 0 if broken or session["address"] in relays else 254,
                    "state": "SYN_RECV" if broken else "TIME_WAIT",
                }
            )
            results.append(
                {
                    "id": session["id"],
                    "address": session["address"],
                    "port": session["port"],
                    "local": PROBE_ADDRESS,
                    "local_port": port,
                    "banner_ok": not broken,
                    "banner": None if broken else "220 relay ESMTP",
                    "ehlo_ok": not broken,
                    "sent": None,
                    "error": "connect and banner: no answer within 10 s" if broken else None,
                }
            )
        sources = {a: PROBE_ADDRESS for a in kwarg.get("towards") or []}
        return {"sessions": results, "sources": sources}


@pytest.fixture
def runner():
    return load_runner()


def run(runner, lab, **kwargs):
    runner._client = lambda: lab

    def pillar(tgt, tgt_type):
        lab.calls.append(("pillar", tgt, tgt_type))
        return "relay1", lab.pillar

    runner._pillar = pillar
    return runner.probe(**kwargs)


def with_probe(**settings):
    pillar = copy.deepcopy(PILLAR)
    pillar["probe"] = {"minion": "probe1", **settings}
    return pillar


def test_every_path_right(runner):
    lab = Lab(with_probe())
    ret = run(runner, lab, details=True)
    assert ret["retcode"] == 0, ret["table"]
    assert ret["ok"]
    assert runner.__context__["retcode"] == 0
    assert ret["summary"] == "relayroute probe OK: 8 paths"
    assert ret["pillar_from"] == "relay1"
    assert ret["table"][0].split() == ["RELAY", "PATH", "TO", "BANNER", "CONNMARK", "RESULT"]
    # The pillar of a relay by grain, then per phase the probe and the relays by id.
    assert lab.calls == [
        ("pillar", "roles:relay", "grain"),
        ("relayroute.probe_smtp", ["probe1"], "list"),
        ("relayroute.probe_flows", ["relay1", "relay2"], "list"),
        ("relayroute.probe_smtp", ["probe1"], "list"),
        ("relayroute.probe_flows", ["relay1", "relay2"], "list"),
    ]


def test_a_broken_relay_fails_by_name(runner):
    ret = run(runner, Lab(with_probe(), broken={"relay2"}), details=True)
    assert ret["retcode"] == 1
    assert runner.__context__["retcode"] == 1
    failed = sorted({(r["relay"], r["path"], r["to"]) for r in ret["rows"] if not r["ok"]})
    assert failed == [
        ("relay2", "master-relay", "198.51.100.25:25"),
        ("relay2", "master-relay", "198.51.100.25:587"),
    ]
    assert ret["summary"].startswith(
        "relayroute probe FAILED: 2 of 8 paths: relay2 via master-relay 198.51.100.25:25: "
        "connmark 0 on"
    )


def test_without_details_the_table_and_summary():
    ret = run(load_runner(), Lab(with_probe(), broken={"relay2"}))
    assert sorted(ret) == ["ok", "retcode", "summary", "table"]
    assert [line.split()[0] for line in ret["table"] if "FAIL" in line] == ["relay2", "relay2"]


def test_arguments_replace_the_pillars_settings(runner):
    lab = Lab(with_probe(ports=[587]))
    ret = run(runner, lab, minion="other", ports=[25], families=[4], details=True)
    assert ret["probe_minion"] == "other"
    assert {r["to"].rsplit(":", 1)[1] for r in ret["rows"]} == {"25"}


def test_bad_probe_settings_do_not_run(runner):
    lab = Lab(with_probe(timeout=0))
    ret = run(runner, lab)
    assert ret["retcode"] == 2
    assert ret["summary"] == (
        "relayroute probe NOT RUN: relayroute:probe:timeout: must be from 1 to 120 seconds (got 0)"
    )
    assert [c[0] for c in lab.calls] == ["pillar"]


def test_no_probe_minion_named(runner):
    ret = run(runner, Lab(copy.deepcopy(PILLAR)))
    assert ret["retcode"] == 2
    assert "relayroute:probe:minion: is required" in ret["summary"]


def test_silent_probe_minion_does_not_run(runner):
    ret = run(runner, Lab(with_probe(), probe_answers=False))
    assert ret["retcode"] == 2
    assert "the probe minion 'probe1' (relayroute:probe:minion) did not answer" in ret["summary"]


def test_bad_topology_does_not_run(runner):
    pillar = with_probe()
    pillar["relays"]["relay1"]["address"] = "10.9.9.9"
    ret = run(runner, Lab(pillar))
    assert ret["retcode"] == 2
    assert ret["summary"].startswith(
        "relayroute probe NOT RUN: the pillar does not validate: relayroute:relays:relay1:address"
    )


def test_the_fleet_from_the_mine(runner):
    from relayroute_core import mine

    pillar = with_probe()
    pillar["mine"] = {"enabled": True}
    del pillar["relays"]["relay2"]["address"]
    record = mine.record([("192.0.2.12", 24, "lan0", "02:00:c0:00:02:12")], ["relay"])
    asked = []

    def mine_get(tgt, fun):
        asked.append((tgt, fun))
        return {"relay2": record}

    runner.__salt__ = {"mine.get": mine_get}
    ret = run(runner, Lab(pillar), details=True)
    assert asked == [("*", "relayroute")]
    assert ret["retcode"] == 0, ret["table"]
    assert {r["relay"] for r in ret["rows"]} == {"relay1", "relay2"}


class Fleet:
    """Relays answering ``relayroute.status`` through a fake LocalClient."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def cmd(self, tgt, fun, arg=None, kwarg=None, timeout=None, tgt_type="glob", **_):
        self.calls.append((fun, tgt, tgt_type))
        return self.answers


def status_row(drift="ok"):
    return {
        "proxy": "master-relay",
        "mark": "0xfe",
        "rule": "IPv4 1000 ok",
        "route": "IPv4 via 192.0.2.2 ok",
        "macs_marked": "02:00:c0:00:02:02",
        "marked_packets": 3,
        "flows": 1,
        "last_apply": "2026-11-30 12:00:00 UTC (42 s ago)",
        "drift": drift,
    }


def test_the_fleets_status_is_one_table(runner):
    fleet = Fleet(
        {
            "relay1": {"ret": [status_row()], "retcode": 0},
            "relay2": {"ret": [status_row("relayroute DRIFT: 1 difference: x")], "retcode": 0},
        }
    )
    runner._client = lambda: fleet
    runner._targeted = lambda tgt, tgt_type: {"relay1", "relay2", "relay3"}
    ret = runner.status(details=True)
    assert fleet.calls == [("relayroute.status", "roles:relay", "grain")]
    lines = ret["table"].splitlines()
    assert lines[0].split()[:3] == ["relay", "proxy", "mark"]
    assert [line.split()[0] for line in lines[2:]] == ["relay1", "relay2", "relay3"]
    assert "did not answer" in lines[4]
    assert ret["retcode"] == 1
    assert runner.__context__["retcode"] == 1
    assert ret["rows"]["relay3"] == "did not answer"
    fleet.answers = {"relay1": {"ret": [status_row()], "retcode": 0}}
    runner._targeted = lambda tgt, tgt_type: {"relay1"}
    assert runner.status()["retcode"] == 0
