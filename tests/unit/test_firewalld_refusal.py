"""
Where firewalld is refused, and where not (pure: boot files under tmp_path).

firewalld 1.3, whatever its FirewallBackend, flushes iptables' tables on every
start and reload, and relayroute's iptables chains with them; it never touches
relayroute's nftables table (tests/functional/test_firewalld.py). So an enabled
firewalld.service refuses the iptables backend: with network-scripts (which
restores its chains through iptables.service) and with the unit alike (a
reload would empty the chains); the nftables backend with the unit mechanism
is not refused; nftables with network-scripts is refused
for its own reason (nothing there restores an nftables table), pointing to the
unit. Every refusal names the pillar key and the value.
"""

import pytest

from relayroute_core import engine, iptables, model, netlink, nftables, persist, planner
from tests.unit.test_plan_iptables import seed_spec

KEY = "relayroute:persist:mechanism"
KERNEL = netlink.KernelState(
    (), (), ("192.0.2.0/24",), ("192.0.2.11",), (("192.0.2.0/24", "eth0"),), "eth0"
)
SAVED = "*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"


def host(tmp_path, mechanism, enabled=()):
    """A host's boot files under ``tmp_path``, ``enabled`` units wanted by multi-user."""
    wants = tmp_path / "systemd" / "multi-user.target.wants"
    wants.mkdir(parents=True)
    for unit in enabled:
        (wants / unit).symlink_to(f"/usr/lib/systemd/system/{unit}")
    (tmp_path / "iptables").write_text(SAVED)
    return persist.Target(
        str(tmp_path / "relayroute"),
        mechanism=mechanism,
        network_scripts_dir=str(tmp_path / "network-scripts"),
        iptables_file=str(tmp_path / "iptables"),
        sysctl_dir=str(tmp_path / "sysctl.d"),
        systemd_dir=str(tmp_path / "systemd"),
    )


def persist_changes(target, backend):
    plan = planner.relay_plan(seed_spec())
    ruleset = iptables.Ruleset() if backend is iptables else nftables.Ruleset()
    current = engine.Current(KERNEL, ruleset)
    return engine._persist_changes(plan, current, backend, target, "relayroute")


def firewalld_problem(errors):
    return [e for e in errors if "firewalld.service is enabled" in e]


def test_network_scripts_with_the_iptables_backend_refuses_an_enabled_firewalld(tmp_path):
    target = host(tmp_path, persist.NETWORK_SCRIPTS, ["iptables.service", "firewalld.service"])
    with pytest.raises(model.InputError) as caught:
        persist_changes(target, iptables)
    assert caught.value.errors == [
        f"{KEY}: firewalld.service is enabled; it flushes iptables' tables, the mangle "
        "table and relayroute's chains in it, on every start and reload; use "
        "iptables-services instead (where relayroute's nftables backend runs, RHEL 8+: "
        "backend 'nftables' with mechanism 'unit', whose table firewalld leaves alone) "
        "(got 'network-scripts')"
    ]
    # Nothing written.
    assert (tmp_path / "iptables").read_text() == SAVED
    assert not (tmp_path / "network-scripts").exists()
    assert not (tmp_path / "relayroute").exists()


def test_the_firewalld_refusal_comes_with_the_hosts_other_problems(tmp_path):
    target = host(tmp_path, persist.NETWORK_SCRIPTS, ["firewalld.service"])
    with pytest.raises(model.InputError) as caught:
        persist_changes(target, iptables)
    errors = caught.value.errors
    assert len(errors) == 2, errors
    assert "iptables.service is not enabled" in errors[0]
    assert firewalld_problem(errors) == [errors[1]]
    assert all(e.startswith(f"{KEY}: ") and e.endswith("(got 'network-scripts')") for e in errors)


def test_network_scripts_with_the_iptables_backend_and_no_firewalld_is_fine(tmp_path):
    target = host(tmp_path, persist.NETWORK_SCRIPTS, ["iptables.service"])
    changes = persist_changes(target, iptables)
    assert "RELAYROUTE-RELAY-PRE" in changes["files"][str(tmp_path / "iptables")]


def test_the_unit_mechanism_with_the_nftables_backend_is_fine_beside_firewalld(tmp_path):
    """With the unit, an enabled firewalld.service is no refusal for nftables."""
    target = host(tmp_path, persist.UNIT, ["firewalld.service"])
    changes = persist_changes(target, nftables)
    script = changes["files"][str(tmp_path / "relayroute" / "relay.restore")]
    assert "nft -f - <<'RULES'" in script
    assert "table inet relayroute_relay" in script
    plan = planner.relay_plan(seed_spec())
    assert persist.check_host(plan, target, {}, KEY) == []
    assert persist.check_backend(plan, target, nftables.NAME, "relayroute:backend") == []


def test_the_unit_mechanism_with_the_iptables_backend_refuses_an_enabled_firewalld(tmp_path):
    """
    Any firewall-cmd --reload would empty relayroute's chains and break the
    proxied path until the next apply: refused, naming the backend key.
    """
    target = host(tmp_path, persist.UNIT, ["firewalld.service"])
    with pytest.raises(model.InputError) as caught:
        persist_changes(target, iptables)
    assert caught.value.errors == [
        "relayroute:backend: firewalld.service is enabled; it flushes iptables' tables, "
        "relayroute's chains in the mangle table with them, on every start and reload, and "
        "the proxied path breaks until the next apply; use backend 'nftables', whose table "
        "firewalld leaves alone (got 'iptables')"
    ]
    assert not (tmp_path / "relayroute").exists()
    # Without firewalld, or for a removal, nothing to say.
    plan = planner.relay_plan(seed_spec())
    quiet = host(tmp_path / "quiet", persist.UNIT)
    assert persist.check_backend(plan, quiet, iptables.NAME, "k") == []
    empty = planner.empty_plan(planner.RELAY)
    assert persist.check_backend(empty, target, iptables.NAME, "k") == []


def test_network_scripts_with_the_nftables_backend_is_refused_for_the_unit_not_firewalld(
    tmp_path,
):
    """The nftables backend's refusal of network-scripts: no firewalld in it, the unit named."""
    target = host(tmp_path, persist.NETWORK_SCRIPTS, ["iptables.service", "firewalld.service"])
    with pytest.raises(ValueError, match="use persist:mechanism 'unit'") as caught:
        persist_changes(target, nftables)
    assert "firewalld" not in str(caught.value).replace(str(tmp_path), "")
    assert str(caught.value).endswith("(got 'network-scripts')")
    assert (tmp_path / "iptables").read_text() == SAVED


def test_removing_the_role_with_network_scripts_is_never_refused_for_firewalld(tmp_path):
    """An empty plan (relay_remove) cleans its boot files whatever runs on the host."""
    target = host(tmp_path, persist.NETWORK_SCRIPTS, ["firewalld.service"])
    empty = planner.empty_plan(planner.RELAY)
    assert persist.check_host(empty, target, {}, KEY) == []
