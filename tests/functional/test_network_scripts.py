"""
CentOS/RHEL 7 persistence (``persist:mechanism: network-scripts``) on the real
kernel: relayroute's part of route-/rule-<dev>, /etc/sysconfig/iptables and the
sysctl drop-in is what the distribution's boot (tests/support/rh7boot.py) needs
to bring back exactly what was applied; the administrator's lines in those
files stay byte for byte; a host whose boot would not restore it is refused
before anything changes; switching mechanism leaves nothing behind.
"""

import os

import pytest

from tests.functional.test_relay import ARGS
from tests.support import rh7boot
from tests.support.hosts import DIRECT, PROXIED, RELAY, lose_runtime_state, two_legged_args
from tests.support.netns import mac_of
from tests.support.tcp import connect

pytestmark = pytest.mark.root

# What the administrator of a CentOS 7 relay already has in the files.
ADMIN_ROUTES = "# static routes (admin)\n198.51.100.0/25 via 192.0.2.1 dev eth0\n"
ADMIN_IPTABLES = rh7boot.ADMIN_SAVED_RULESET


@pytest.fixture
def rh7(tmp_path):
    """A CentOS 7 host's files, under ``tmp_path``: the ``persist`` settings and the originals."""
    sysconfig = tmp_path / "sysconfig"
    scripts = sysconfig / "network-scripts"
    rh7boot.prepare_host(sysconfig, tmp_path / "systemd", ADMIN_IPTABLES)
    (scripts / "ifcfg-eth0").write_text("DEVICE=eth0\nBOOTPROTO=none\nONBOOT=yes\n")
    (scripts / "route-eth0").write_text(ADMIN_ROUTES)
    return rh7boot.persist_settings(tmp_path)


def files_of(tmp_path):
    """Every file under the host's directories, with its text (symlinks by target)."""
    found = {}
    for path in sorted(tmp_path.rglob("*")):
        if path.is_symlink():
            found[str(path)] = "-> " + os.readlink(path)
        elif path.is_file():
            found[str(path)] = path.read_text()
    return found


def reboot(ns, settings, interfaces, tables):
    """Lose the runtime state a reboot loses, then run what CentOS 7's boot runs."""
    lose_runtime_state(ns, tables, filter_tables=("mangle", "filter"))
    ns.ip("route del 198.51.100.0/25", check=False)  # the administrator's, from route-eth0
    return rh7boot.boot(ns, settings, interfaces)


def test_boot_from_the_distributions_files_restores_what_was_applied(
    loaders, relay_ns, rh7, tmp_path
):
    scripts = rh7["network_scripts_dir"]
    # The host as it came up from its own files, before relayroute.
    rh7boot.boot(relay_ns, rh7, ["eth0"])
    with relay_ns.entered():
        ret = loaders.modules.relayroute.relay_apply(persist=rh7, **ARGS)
        assert ret["changes"]["persist"] == {
            f"{scripts}/route-eth0": "updated",
            f"{scripts}/rule-eth0": "created",
            rh7["iptables_file"]: "updated",
            f"{rh7['dir']}/relay.json": "created",
        }
        assert loaders.modules.relayroute.relay_apply(persist=rh7, **ARGS) == {"changes": {}}
    route_file = (tmp_path / "sysconfig/network-scripts/route-eth0").read_text()
    assert route_file.startswith(ADMIN_ROUTES)
    assert "default via 192.0.2.2 dev eth0 table 1000254 proto 210\n" in route_file
    assert (
        "priority 1000 fwmark 0xfe/0xff lookup 1000254 proto 210"
        in (tmp_path / "sysconfig/network-scripts/rule-eth0").read_text()
    )
    assert not (tmp_path / "relayroute" / "relay.restore").exists()
    applied = relay_ns.snapshot()
    ran = reboot(relay_ns, rh7, ["eth0"], [1000254])
    assert ran[0] == "iptables-restore"
    assert relay_ns.snapshot() == applied
    with relay_ns.entered():
        assert loaders.modules.relayroute.relay_apply(persist=rh7, **ARGS) == {"changes": {}}
        gone = loaders.modules.relayroute.relay_remove(persist=rh7)
    assert set(gone["changes"]["persist"].values()) == {"updated", "removed"}
    assert (tmp_path / "sysconfig/network-scripts/route-eth0").read_text() == ADMIN_ROUTES
    assert (tmp_path / "sysconfig/iptables").read_text() == ADMIN_IPTABLES
    assert not (tmp_path / "sysconfig/network-scripts/rule-eth0").exists()
    assert not (tmp_path / "relayroute").exists() or not any((tmp_path / "relayroute").iterdir())


def break_no_iptables_service(tmp_path):
    (tmp_path / "systemd/basic.target.wants/iptables.service").unlink()
    return "iptables.service is not enabled"


def break_firewalld(tmp_path):
    wants = tmp_path / "systemd/multi-user.target.wants"
    wants.mkdir()
    (wants / "firewalld.service").symlink_to("/usr/lib/systemd/system/firewalld.service")
    return "firewalld.service is enabled"


def break_no_saved_ruleset(tmp_path):
    (tmp_path / "sysconfig/iptables").unlink()
    return "sysconfig/iptables does not exist"


def break_address_format(tmp_path):
    (tmp_path / "sysconfig/network-scripts/route-eth0").write_text(
        "ADDRESS0=198.51.100.0\nNETMASK0=255.255.255.128\nGATEWAY0=192.0.2.1\n"
    )
    return "route-eth0 is in the ADDRESSn= format"


@pytest.mark.parametrize(
    "breaking",
    [break_no_iptables_service, break_firewalld, break_no_saved_ruleset, break_address_format],
)
def test_a_host_whose_boot_would_not_restore_is_refused_untouched(
    loaders, relay_ns, rh7, tmp_path, breaking
):
    expected = breaking(tmp_path)
    kernel, files = relay_ns.snapshot(), files_of(tmp_path)
    with relay_ns.entered():
        ret = loaders.states.relayroute.relay_present(
            name="r", prefix="relayroute", persist=rh7, **ARGS
        )
    assert ret.result is False
    assert "relayroute:persist:mechanism: " in ret.comment
    assert expected in ret.comment
    assert relay_ns.snapshot() == kernel
    assert files_of(tmp_path) == files


def test_switching_mechanism_leaves_nothing_of_the_other(loaders, relay_ns, rh7, tmp_path):
    unit = {**rh7, "mechanism": "unit"}
    originals = files_of(tmp_path)
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(persist=unit, **ARGS)
        kernel = relay_ns.snapshot()
        assert (tmp_path / "relayroute/relay.restore").exists()
        to_rh7 = loaders.modules.relayroute.relay_apply(persist=rh7, **ARGS)
        assert set(to_rh7["changes"]) == {"persist"}
        assert to_rh7["changes"]["persist"][f"{rh7['dir']}/relay.restore"] == "removed"
        back = loaders.modules.relayroute.relay_apply(persist=unit, **ARGS)
        assert set(back["changes"]) == {"persist"}
        assert relay_ns.snapshot() == kernel
        assert (tmp_path / "relayroute/relay.restore").exists()
        assert (tmp_path / "sysconfig/iptables").read_text() == ADMIN_IPTABLES
        assert (tmp_path / "sysconfig/network-scripts/route-eth0").read_text() == ADMIN_ROUTES
        loaders.modules.relayroute.relay_remove(persist=unit)
    assert files_of(tmp_path) == originals


def test_second_interface_boots_with_its_reverse_path_setting(loaders, two_legged, rh7):
    """The rp_filter variant: src_valid_mark on px0 comes back from the sysctl drop-in."""
    relay = two_legged["relay"]
    args = {**two_legged_args(mac_of(two_legged["proxy"], "lan0")), "persist": rh7}
    rh7boot.boot(relay, rh7, ["lan0", "px0"])
    with relay.entered():
        ret = loaders.modules.relayroute.relay_apply(**args)
    scripts = rh7["network_scripts_dir"]
    assert f"{scripts}/route-px0" in ret["changes"]["persist"]
    assert f"{rh7['sysctl_dir']}/90-relayroute-relay.conf" in ret["changes"]["persist"]
    applied = relay.snapshot()
    relay.sysctl("net.ipv4.conf.px0.src_valid_mark", 0)
    reboot(relay, rh7, ["lan0", "px0"], [1000254])
    assert relay.snapshot() == applied
    assert relay.exec("sysctl -n net.ipv4.conf.px0.src_valid_mark").stdout.strip() == "1"
    assert connect(two_legged["client"], RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    assert connect(two_legged["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    with relay.entered():
        loaders.modules.relayroute.relay_remove(persist=rh7)
    assert not os.path.exists(f"{rh7['sysctl_dir']}/90-relayroute-relay.conf")
