"""
The end-to-end probe's pure parts (``relayroute_core.probe``): its settings,
the sessions a topology asks for, the judgement of what the probe minion and
the relays saw, the table. And the probe minion's side against an SMTP
server on the loopback (no root).
"""

import copy
import socket
import threading

import pytest

from relayroute_core import probe

# The seed lab's topology with two relays (tests/support/seedlab.py).
PILLAR = {
    "lan_networks": ["192.0.2.0/24"],
    "mark_mask": 0xFF,
    "ports": [25, 587],
    "proxies": {
        "master-relay": {
            "address": "192.0.2.2",
            "mark": 254,
            "table": 1000254,
            "priority": 1000,
            "vip": "198.51.100.25",
        }
    },
    "relays": {"relay1": {"address": "192.0.2.11"}, "relay2": {"address": "192.0.2.12"}},
}
PROBE = "203.0.113.10"


def net_of(config=None):
    net = probe.network(copy.deepcopy(config or PILLAR))
    assert net["errors"] == []
    return net


def chosen(**values):
    checked = probe.settings({"minion": "probe1", **values}, [25, 587])
    assert checked["errors"] == []
    return checked["settings"]


# -- settings and topology ---------------------------------------------------


def test_settings_defaults():
    assert chosen() == {
        "minion": "probe1",
        "ports": [25, 587],
        "timeout": 10,
        "families": [4, 6],
        "source": [],
        "vip_sessions": None,
        "message": None,
    }


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({}, "relayroute:probe:minion: is required"),
        ({"minion": "p", "ports": [26]}, "relayroute:probe:ports:0: is not one of ports [25, 587]"),
        ({"minion": "p", "timeout": 0}, "relayroute:probe:timeout: must be from 1 to 120"),
        ({"minion": "p", "timeout": "5"}, "relayroute:probe:timeout: must be a number"),
        ({"minion": "p", "families": [5]}, "relayroute:probe:families: must be a non-empty"),
        ({"minion": "p", "source": "nope"}, "relayroute:probe:source: is not a valid"),
        ({"minion": "p", "vip_sessions": 0}, "relayroute:probe:vip_sessions: must be between"),
        ({"minion": "p", "message": {"to": "x@y"}}, "relayroute:probe:message:from: must be a"),
        ({"minion": "p", "message": "x@y"}, "relayroute:probe:message: must be a mapping"),
        ({"minion": "p", "minon": "p"}, "relayroute:probe:minon: is not a known key; did you"),
    ],
)
def test_settings_errors_name_key_and_value(values, error):
    checked = probe.settings(values, [25, 587])
    assert checked["settings"] is None
    assert any(e.startswith(error) for e in checked["errors"]), checked["errors"]
    assert all("(got " in e for e in checked["errors"])


def test_settings_not_a_mapping():
    checked = probe.settings(["probe1"], [25])
    assert checked["errors"] == [
        "relayroute:probe: must be a mapping of probe settings (minion, ports, ...) "
        "(got ['probe1'])"
    ]


def test_network_reads_relays_proxies_and_marks_beside_probe_settings():
    net = net_of({**PILLAR, "probe": {"minion": "probe1"}})
    assert net == {
        "errors": [],
        "mark_mask": 0xFF,
        "ports": [25, 587],
        "relays": {
            "relay1": {"addresses": ["192.0.2.11"], "ports": [25, 587]},
            "relay2": {"addresses": ["192.0.2.12"], "ports": [25, 587]},
        },
        "proxies": {"master-relay": {"vips": ["198.51.100.25"], "mark": 254}},
    }


def test_network_takes_relays_from_the_mine():
    from relayroute_core import mine

    config = {**copy.deepcopy(PILLAR), "mine": {"enabled": True}}
    del config["relays"]["relay2"]["address"]
    records = {"relay2": mine.record([("192.0.2.12", 24, "lan0", "02:00:c0:00:02:12")], ["relay"])}
    assert probe.network(config)["errors"]  # relay2 has no address without the mine
    net = probe.network(config, records)
    assert net["errors"] == [], net["errors"]
    assert net["relays"]["relay2"] == {"addresses": ["192.0.2.12"], "ports": [25, 587]}


def test_network_reports_the_topologys_errors():
    net = probe.network({**PILLAR, "mark_mask": 0})
    assert net["errors"]
    assert net["errors"][0].startswith("relayroute:mark_mask")


# -- the sessions -------------------------------------------------------------


def test_phases_direct_then_each_vip_with_one_session_per_serving_relay():
    plan = probe.phases(net_of(), chosen())
    assert [p["name"] for p in plan] == ["direct", "vip1"]
    direct = [(s["relay"], s["address"], s["port"]) for s in plan[0]["sessions"]]
    assert direct == [
        ("relay1", "192.0.2.11", 25),
        ("relay1", "192.0.2.11", 587),
        ("relay2", "192.0.2.12", 25),
        ("relay2", "192.0.2.12", 587),
    ]
    assert len({s["group"] for s in plan[0]["sessions"]}) == 4  # all at once
    vip = [(s["path"], s["address"], s["port"], s["group"]) for s in plan[1]["sessions"]]
    assert (
        vip
        == [("master-relay", "198.51.100.25", 25, "master-relay 198.51.100.25 25")] * 2
        + [("master-relay", "198.51.100.25", 587, "master-relay 198.51.100.25 587")] * 2
    )
    assert len({s["id"] for phase in plan for s in phase["sessions"]}) == 8


def test_phases_one_vip_per_family_each_phase():
    config = copy.deepcopy(PILLAR)
    config["lan_networks"].append("2001:db8:2::/64")
    config["proxies"]["master-relay"]["address"] = ["192.0.2.2", "2001:db8:2::2"]
    config["proxies"]["master-relay"]["vip"] = ["198.51.100.25", "2001:db8:100::25"]
    config["relays"]["relay1"]["address"] = ["192.0.2.11", "2001:db8:2::11"]
    config["proxies"]["second"] = {
        "address": "192.0.2.3",
        "mac": "02:00:c0:00:02:03",
        "mark": 250,
        "table": 1000250,
        "vip": "198.51.100.26",
    }
    net = net_of(config)
    plan = probe.phases(net, chosen(ports=[25], vip_sessions=3))
    vips = [sorted({s["address"] for s in p["sessions"]}) for p in plan[1:]]
    assert vips == [["198.51.100.25", "2001:db8:100::25"], ["198.51.100.26"]]
    v6 = [s for s in plan[1]["sessions"] if s["family"] == 6]
    assert len(v6) == 3  # vip_sessions, though one relay serves IPv6
    assert [s["address"] for s in plan[0]["sessions"]] == [
        "192.0.2.11",
        "2001:db8:2::11",
        "192.0.2.12",
    ]
    only4 = probe.phases(net, chosen(ports=[25], families=[4]))
    assert all(s["family"] == 4 for p in only4 for s in p["sessions"])


def test_call_timeout_covers_the_longest_group():
    sessions = [{"group": "a"}, {"group": "a"}, {"group": "b"}]
    assert probe.call_timeout(sessions, 10) == 2 * 4 * 10 + 15
    assert probe.call_timeout(sessions, 10, {"from": "a@b", "to": "c@d"}) == 2 * 8 * 10 + 15


# -- judgement ----------------------------------------------------------------


def session(sid, local_port, banner_ok=True, error=None):
    return {
        "id": sid,
        "local": PROBE,
        "local_port": local_port,
        "banner_ok": banner_ok,
        "banner": "220 relay ESMTP" if banner_ok else None,
        "ehlo_ok": banner_ok,
        "sent": None,
        "error": error,
    }


def flow(dst, sport, mark, state="TIME_WAIT", dport=25):
    return {"src": PROBE, "sport": sport, "dst": dst, "dport": dport, "mark": mark, "state": state}


def scenario(relay1_vip=(254, "TIME_WAIT"), vip_banners=(True, True), relay2_answers=True):
    """Ports [25] only: two direct sessions, two through the VIP (one on each relay)."""
    net = net_of()
    settings = chosen(ports=[25])
    plan = probe.phases(net, settings)
    ids = [s["id"] for p in plan for s in p["sessions"]]
    results = {
        ids[0]: session(ids[0], 40001),
        ids[1]: session(ids[1], 40002),
        ids[2]: session(ids[2], 40003, vip_banners[0], None if vip_banners[0] else "no banner"),
        ids[3]: session(ids[3], 40004, vip_banners[1], None if vip_banners[1] else "no banner"),
    }
    old = flow("192.0.2.11", 33333, 254)  # an earlier run's, still in TIME_WAIT
    direct = {
        "relay1": [old, flow("192.0.2.11", 40001, 0)],
        "relay2": [flow("192.0.2.12", 40002, 0)],
    }
    mark, state = relay1_vip
    after = {
        "relay1": [*direct["relay1"], flow("192.0.2.11", 51000, mark, state)],
        "relay2": [*direct["relay2"], flow("192.0.2.12", 52000, 254)],
    }
    if not relay2_answers:
        after["relay2"] = "relay2's minion did not answer"
    return probe.judge(net, settings, plan, results, [direct, after])


def test_judge_all_paths_right():
    rows = scenario()
    assert [(r["relay"], r["path"], r["to"], r["ok"]) for r in rows] == [
        ("relay1", "direct", "192.0.2.11:25", True),
        ("relay2", "direct", "192.0.2.12:25", True),
        ("relay1", "master-relay", "198.51.100.25:25", True),
        ("relay2", "master-relay", "198.51.100.25:25", True),
    ]
    assert rows[2]["marks"] == ["0xfe"]
    assert rows[2]["banners"] == "2/2"
    assert probe.summary(rows) == "relayroute probe OK: 4 paths"


def test_judge_relay_without_relayroute_fails_naming_it():
    rows = scenario(relay1_vip=(0, "SYN_RECV"), vip_banners=(False, True))
    failed = [r for r in rows if not r["ok"]]
    assert [(r["relay"], r["path"]) for r in failed] == [("relay1", "master-relay")]
    assert failed[0]["problems"] == [
        f"connmark 0 on {PROBE}:51000 -> 192.0.2.11:25, not 0xfe",
        f"{PROBE}:51000 -> 192.0.2.11:25 never got past the handshake (SYN_RECV): "
        "the relay's reply did not come back",
    ]
    assert probe.summary(rows).startswith(
        "relayroute probe FAILED: 1 of 4 paths: relay1 via master-relay 198.51.100.25:25: "
        "connmark 0"
    )


def test_judge_right_mark_but_reply_astray_fails():
    """A shadowing rule: the mark is the proxy's, the reply still leaves by the main table."""
    rows = scenario(relay1_vip=(254, "SYN_RECV"), vip_banners=(False, True))
    failed = [r for r in rows if not r["ok"]]
    assert [(r["relay"], r["path"]) for r in failed] == [("relay1", "master-relay")]
    assert "never got past the handshake (SYN_RECV)" in failed[0]["problems"][0]


def test_judge_relay_not_answering():
    rows = scenario(relay2_answers=False)
    failed = {(r["relay"], r["path"]): r["problems"] for r in rows if not r["ok"]}
    assert failed == {
        ("relay2", "master-relay"): ["conntrack unknown: relay2's minion did not answer"]
    }


def test_judge_missing_entry_and_unreached_relay():
    net = net_of()
    settings = chosen()
    plan = probe.phases(net, settings)
    ids = [s["id"] for p in plan for s in p["sessions"]]
    results = {sid: session(sid, 40001 + i) for i, sid in enumerate(ids)}
    # Direct: relay1 25, 587 (40001, 40002), relay2 25, 587 (40003, 40004: no entry).
    direct = {
        "relay1": [flow("192.0.2.11", 40001, 0), flow("192.0.2.11", 40002, 0, dport=587)],
        "relay2": [flow("192.0.2.12", 40003, 0)],
    }
    after = {
        "relay1": [
            *direct["relay1"],
            flow("192.0.2.11", 51000, 254),
            flow("192.0.2.11", 51001, 254, dport=587),
        ],
        "relay2": direct["relay2"],
    }
    rows = probe.judge(net, settings, plan, results, [direct, after])
    failed = {(r["relay"], r["to"]): r["problems"] for r in rows if not r["ok"]}
    assert failed == {
        ("relay2", "192.0.2.12:587"): [
            f"no conntrack entry of {PROBE}:40004 -> port 587 on relay2"
        ],
        ("relay2", "198.51.100.25:25"): [
            "none of the 2 sessions through 198.51.100.25:25 reached relay2: HAProxy holds it "
            "down or sent them elsewhere (relayroute:probe:vip_sessions sends more)"
        ],
        ("relay2", "198.51.100.25:587"): [
            "none of the 2 sessions through 198.51.100.25:587 reached relay2: HAProxy holds it "
            "down or sent them elsewhere (relayroute:probe:vip_sessions sends more)"
        ],
    }


def test_judge_relay_tracking_nothing():
    net = net_of()
    settings = chosen(ports=[25])
    plan = probe.phases(net, settings)
    ids = [s["id"] for p in plan for s in p["sessions"]]
    results = {sid: session(sid, 40001 + i) for i, sid in enumerate(ids)}
    old = flow("192.0.2.12", 39999, 254)  # an earlier run's, before conntrack went off
    direct = {"relay1": [flow("192.0.2.11", 40001, 0)], "relay2": [old]}
    after = {"relay1": [*direct["relay1"], flow("192.0.2.11", 51000, 254)], "relay2": [old]}
    rows = probe.judge(net, settings, plan, results, [direct, after])
    failed = {(r["relay"], r["path"]): r["problems"] for r in rows if not r["ok"]}
    untracked = (
        "relay2 has a conntrack entry of none of the probe's direct sessions: its kernel "
        "tracks no connection (relayroute's rules, which use conntrack, are not in place?)"
    )
    assert failed == {("relay2", "direct"): [untracked], ("relay2", "master-relay"): [untracked]}


def test_judge_failed_sessions_no_relay_explains():
    rows = scenario(vip_banners=(False, False))
    failed = [r for r in rows if not r["ok"]]
    assert [(r["relay"], r["path"], r["problems"]) for r in failed] == [
        ("-", "master-relay", ["2 of 2 sessions failed: no banner"])
    ]


def test_judge_without_direct_phase_uses_the_baseline():
    net = net_of()
    settings = chosen(ports=[25])
    plan = probe.phases(net, settings)[1:]
    ids = [s["id"] for s in plan[0]["sessions"]]
    results = {sid: session(sid, 40001 + i) for i, sid in enumerate(ids)}
    old = flow("192.0.2.11", 33333, 0)
    baseline = {"relay1": [old], "relay2": []}
    after = {
        "relay1": [old, flow("192.0.2.11", 51000, 254)],
        "relay2": [flow("192.0.2.12", 52000, 254)],
    }
    rows = probe.judge(net, settings, plan, results, [after], baseline)
    assert [r["ok"] for r in rows] == [True, True]


def test_select_and_new_flows():
    from relayroute_core.netlink import Flow

    flows = [
        Flow("tcp", PROBE, 40001, "192.0.2.11", 25, "192.0.2.11", 0, "TIME_WAIT"),
        Flow("tcp", "203.0.113.99", 40001, "192.0.2.11", 25, "192.0.2.11", 0, "ESTABLISHED"),
        Flow("tcp", PROBE, 40002, "192.0.2.11", 22, "192.0.2.11", 0, "ESTABLISHED"),
        Flow("udp", PROBE, 40003, "192.0.2.11", 25, "192.0.2.11", 0, ""),
        Flow("tcp", "2001:db8:203:0::10", 40004, "2001:db8:2::11", 587, "x", 254, "CLOSE"),
    ]
    chosen_flows = probe.select_flows(flows, [PROBE, "2001:db8:203::10"], [25, 587])
    assert chosen_flows == [
        {
            "src": PROBE,
            "sport": 40001,
            "dst": "192.0.2.11",
            "dport": 25,
            "mark": 0,
            "state": "TIME_WAIT",
        },
        {
            "src": "2001:db8:203::10",
            "sport": 40004,
            "dst": "2001:db8:2::11",
            "dport": 587,
            "mark": 254,
            "state": "CLOSE",
        },
    ]
    assert probe.new_flows(chosen_flows[:1], chosen_flows) == chosen_flows[1:]


def test_table_names_each_failure():
    text = probe.table(scenario(relay1_vip=(0, "SYN_RECV"), vip_banners=(False, True)))
    lines = text.splitlines()
    assert lines[0].split() == ["RELAY", "PATH", "TO", "BANNER", "CONNMARK", "RESULT"]
    assert lines[1].split()[:5] == ["relay1", "direct", "192.0.2.11:25", "1/1", "0"]
    assert lines[3].startswith("relay1  via master-relay  198.51.100.25:25  1/2")
    assert "  0 (want 0xfe)  " in lines[3]
    assert "FAIL: connmark 0 on" in lines[3]
    assert lines[4].endswith("ok")


# -- the probe minion's side, on the loopback -----------------------------------


class Server:
    """A one-thread SMTP server on 127.0.0.1: banner, 250 to anything, 221 to QUIT."""

    def __init__(self, banner=True):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.banner = banner
        self.peers = []
        self.commands = []
        self.conns = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            self.conns.append(conn)
            threading.Thread(target=self.talk, args=(conn,), daemon=True).start()

    def talk(self, conn):
        if not self.banner:
            return  # holds the connection, says nothing
        conn.sendall(b"220 test ESMTP\r\n")
        data = conn.makefile("rb")
        in_data = False
        for line in data:
            text = line.decode().rstrip("\r\n")
            if in_data:
                if text == ".":
                    in_data = False
                    conn.sendall(b"250 queued\r\n")
                continue
            self.commands.append(text.split(" ")[0].upper())
            if text.upper() == "QUIT":
                conn.sendall(b"221 bye\r\n")
                conn.close()
                return
            if text.upper() == "DATA":
                in_data = True
                conn.sendall(b"354 go\r\n")
            else:
                conn.sendall(b"250 ok\r\n")

    def close(self):
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def server():
    made = Server()
    yield made
    made.close()


def test_run_sessions_reports_banner_and_source(server):
    sessions = [
        {"id": "a", "address": "127.0.0.1", "port": server.port, "group": "g"},
        {"id": "b", "address": "127.0.0.1", "port": server.port, "group": "g"},
    ]
    results = probe.run_sessions(sessions, timeout=5)
    assert [r["id"] for r in results] == ["a", "b"]
    for result in results:
        assert result["banner_ok"]
        assert result["ehlo_ok"]
        assert result["error"] is None
        assert result["banner"] == "220 test ESMTP"
        assert result["local"] == "127.0.0.1"
    assert sorted(r["local_port"] for r in results) == sorted(p[1] for p in server.peers)
    assert server.commands.count("EHLO") == 2
    assert "MAIL" not in server.commands


def test_run_sessions_sends_a_message_when_asked(server):
    message = {"from": "probe@example.org", "to": "sink@example.org"}
    sessions = [{"id": "a", "address": "127.0.0.1", "port": server.port}]
    (result,) = probe.run_sessions(sessions, timeout=5, message=message)
    assert result["sent"] is True
    assert server.commands[:4] == ["EHLO", "MAIL", "RCPT", "DATA"]


def test_run_sessions_bounded_and_failures_named():
    silent = Server(banner=False)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    try:
        sessions = [
            {"id": "silent", "address": "127.0.0.1", "port": silent.port},
            {"id": "closed", "address": "127.0.0.1", "port": port},
        ]
        results = {r["id"]: r for r in probe.run_sessions(sessions, timeout=1)}
    finally:
        silent.close()
    assert results["silent"]["error"] == "connect and banner: no answer within 1 s"
    assert results["silent"]["local_port"] == silent.peers[0][1]
    assert results["closed"]["error"].startswith("connect and banner: ")
    assert "refused" in results["closed"]["error"]
    assert probe.session_problem(results["silent"]) == results["silent"]["error"]


def test_sources_towards_the_loopback():
    assert probe.sources_towards(["127.0.0.1"]) == {"127.0.0.1": "127.0.0.1"}
    assert probe.sources_towards(["127.0.0.1"], ["127.0.0.1"]) == {"127.0.0.1": "127.0.0.1"}


def test_the_formula_accepts_probe_settings_in_its_pillar():
    from relayroute_core import topology

    assert topology.topology({**PILLAR, "probe": {"minion": "probe1"}})["errors"] == []
    errors = topology.topology({**PILLAR, "probe": {"minion": "probe1", "ports": [26]}})["errors"]
    assert errors
    assert errors[0].startswith("relayroute:probe:ports:0: "), errors
