"""``__virtual__``: the module loads where one packet-filter backend can run, and says why not."""

import relayroute_core
from relayroute_core import nftables


def test_loads_with_iptables_tools_or_with_libnftables_alone(monkeypatch):
    monkeypatch.setattr(relayroute_core.netlink, "HAS_PYROUTE2", True)
    monkeypatch.setattr(relayroute_core.salt.utils.path, "which", lambda name: f"/usr/sbin/{name}")
    assert relayroute_core.__virtual__() == "relayroute"

    # A host with nft alone (no iptables package): libnftables is the backend.
    monkeypatch.setattr(relayroute_core.salt.utils.path, "which", lambda name: None)
    monkeypatch.setattr(nftables, "library", lambda: object())
    assert relayroute_core.__virtual__() == "relayroute"

    def missing():
        raise nftables.BackendError("the nftables backend needs libnftables.so.1 (...)")

    monkeypatch.setattr(nftables, "library", missing)
    loaded, why = relayroute_core.__virtual__()
    assert loaded is False
    assert "missing iptables-save, iptables-restore" in why
    assert "libnftables.so.1" in why


def test_backend_of_a_pillar_without_one_is_the_last_applys(monkeypatch, tmp_path):
    # The beacon's marked_macs and check_topology read raw pillar, not the
    # formula's parameters/ defaults: without 'backend' they take the backend
    # the role's last apply recorded in its memory, then iptables.
    import json

    pillar = {"relayroute": {"persist": {"dir": str(tmp_path)}}}
    monkeypatch.setattr(relayroute_core, "__pillar__", pillar, raising=False)
    assert relayroute_core._pillar_backend("relay") == "iptables"
    (tmp_path / "relay.json").write_text(json.dumps({"backend": "nftables"}))
    assert relayroute_core._pillar_backend("relay") == "nftables"
    pillar["relayroute"]["backend"] = "iptables"
    assert relayroute_core._pillar_backend("relay") == "iptables"
