"""
``relayroute.check`` on the real kernel, through Salt's loaders: OK after an
apply; drift, with each difference named and return code 2, after relayroute's
route is deleted from the proxy's table and after another tool's rule shadows
relayroute's; the node_exporter textfile says the same. A check changes nothing.
"""

import pytest

from tests.support.hosts import plant_foreign_state

pytestmark = pytest.mark.root

PROXIES = {
    "master-relay": {
        "address": "192.0.2.2",
        "macs": ["02:00:c0:00:02:02", "02:00:c0:00:02:12"],
        "mark": 254,
        "table": 1000254,
        "priority": 1000,
    }
}
ARGS = {"lan_networks": ["192.0.2.0/24"], "mark_mask": 0xFF, "proxies": PROXIES}


def retcode(loaders):
    return loaders.modules.pack["__context__"].get("retcode", 0)


def checked(loaders, relay_ns, **kwargs):
    """The check, and the namespace's state before and after it (a check changes nothing)."""
    before = relay_ns.snapshot()
    with relay_ns.entered():
        loaders.modules.pack["__context__"].pop("retcode", None)
        result = loaders.modules.relayroute.check(prefix="relayroute", **ARGS, **kwargs)
    assert relay_ns.snapshot() == before
    return result


def test_ok_after_apply_then_drift_when_the_proxys_route_is_deleted(loaders, relay_ns, tmp_path):
    textfile = tmp_path / "relayroute.prom"
    with relay_ns.entered():
        assert loaders.states.relayroute.relay_present(name="r", **ARGS).result is True
    ok = checked(loaders, relay_ns, textfile=str(textfile))
    assert ok["ok"] is True, ok
    assert ok["differences"] == []
    assert ok["summary"] == ("relayroute OK: 1 proxies, 1 table routes, 3 route lookups as planned")
    assert retcode(loaders) == 0
    metrics = textfile.read_text().splitlines()
    assert "relayroute_drift 0" in metrics
    assert 'relayroute_proxy_lookup_ok{proxy="master-relay"} 1' in metrics

    relay_ns.ip("route del default table 1000254")
    drift = checked(loaders, relay_ns, textfile=str(textfile))
    assert drift["ok"] is False
    assert retcode(loaders) == 2
    assert (
        "routes: missing 'default via 192.0.2.2 table 1000254 proto 210'" in (drift["differences"])
    )
    # The kernel's own lookup falls through to the main table's default route.
    assert any(
        "relayroute:proxies:master-relay: 'ip route get 203.0.113.254 mark 0xfe' answered via "
        "192.0.2.1 table 254"
        in line
        and "fell through to the main table" in line
        for line in drift["differences"]
    ), drift["differences"]
    assert drift["summary"].startswith("relayroute DRIFT: ")
    assert "\n" not in drift["summary"]
    metrics = textfile.read_text().splitlines()
    assert "relayroute_drift 1" in metrics
    assert 'relayroute_proxy_lookup_ok{proxy="master-relay"} 0' in metrics


def test_a_shadowing_foreign_rule_is_drift_naming_it(loaders, relay_ns):
    with relay_ns.entered():
        assert loaders.states.relayroute.relay_present(name="r", **ARGS).result is True
    plant_foreign_state(relay_ns, vpn_fwmark="0xfe/0xff")
    drift = checked(loaders, relay_ns)
    assert drift["ok"] is False
    assert retcode(loaders) == 2
    # Rules, routes and chains are all as planned: only the lookup sees it.
    assert all("a rule at priority 900" in line for line in drift["differences"]), drift
    assert len(drift["differences"]) == 2  # from any address, and from the relay's own
    assert "shadows relayroute's at priority 1000" in drift["summary"]
    # What a Nagios-style check prints: the one line.
    assert checked(loaders, relay_ns, summary_only=True) == drift["summary"]


def test_a_neighbour_with_a_mac_relayroute_does_not_mark_is_drift(loaders, relay_ns):
    with relay_ns.entered():
        assert loaders.states.relayroute.relay_present(name="r", **ARGS).result is True
        relay_ns.ip("neigh replace 192.0.2.2 lladdr 02:00:c0:00:02:99 dev eth0 nud reachable")
    drift = checked(loaders, relay_ns)
    assert drift["differences"] == [
        "relayroute:proxies:master-relay: the neighbour entry of 192.0.2.2 carries "
        "02:00:c0:00:02:99, a MAC relayroute does not mark (marks 02:00:c0:00:02:02, "
        "02:00:c0:00:02:12): the proxy's MAC changed (got '02:00:c0:00:02:99')"
    ]
    # One of the pair's MACs is no drift: that node holds the address now.
    relay_ns.ip("neigh replace 192.0.2.2 lladdr 02:00:c0:00:02:12 dev eth0 nud reachable")
    assert checked(loaders, relay_ns)["ok"] is True


def test_check_topology_reads_the_pillar(loaders, relay_ns, monkeypatch):
    pillar = {
        "relayroute": {
            **ARGS,
            "proxies": {"master-relay": {**PROXIES["master-relay"], "vip": "198.51.100.25"}},
            "relays": {"relayroute-functional": {"address": "192.0.2.11"}},
        }
    }
    monkeypatch.setitem(loaders.modules.pack, "__pillar__", pillar)
    with relay_ns.entered():
        before = loaders.modules.relayroute.check_topology(retcode=False)
        assert before["ok"] is False  # nothing applied yet
        assert (
            "routes: missing 'default via 192.0.2.2 table 1000254 proto 210'"
            in (before["differences"])
        )
        assert loaders.states.relayroute.relay_present(name="r", **ARGS).result is True
        good = loaders.modules.relayroute.check_topology()
        assert good["ok"] is True, good
        monkeypatch.setitem(
            loaders.modules.pack,
            "__pillar__",
            {"relayroute": {**pillar["relayroute"], "mark_mask": "0xfff0000"}},
        )
        bad = loaders.modules.relayroute.check_topology(retcode=False)
    assert bad["ok"] is False
    assert bad["summary"].startswith("relayroute CRITICAL: the pillar does not validate: ")
