"""The fleet's status as one table (``relayroute_core.status.table``), without root."""

import importlib

status = importlib.import_module("relayroute_core.status")


def row(proxy, flows, drift="ok"):
    return {
        "proxy": proxy,
        "mark": "0xfe",
        "rule": "IPv4 1000 ok",
        "route": "IPv4 via 192.0.2.2 ok",
        "macs_marked": "02:00:c0:00:02:02",
        "marked_packets": 3,
        "flows": flows,
        "last_apply": status.when(100.0, now=142.0),
        "drift": drift,
    }


def test_the_fleet_reads_as_one_table_relay_by_relay():
    text = status.table(
        {
            "relay2": [row("master-relay", 1, "relayroute DRIFT: 1 difference: x")],
            "relay1": [row("master-relay", 4), row("(direct)", 2)],
            "relay3": "Minion did not return. [No response]",
        }
    )
    lines = text.splitlines()
    assert lines[0].split() == ["relay", *status.COLUMNS]
    assert [line.split()[0] for line in lines[2:]] == ["relay1", "relay1", "relay2", "relay3"]
    assert "1970-01-01 00:01:40 UTC (42 s ago)" in lines[2]
    assert lines[4].rstrip().endswith("relayroute DRIFT: 1 difference: x")
    assert "ERROR" in lines[5]
    assert "Minion did not return" in lines[5]
    # Columns line up: every row's cells start where the header's do.
    start = lines[0].index("drift")
    assert lines[2][start:].startswith("ok")


def test_never_applied():
    assert status.when(None) == "never"
