"""
The proxy role on the real kernel through Salt's loaders: the engine's TPROXY
divert, then the formula's proxy component (sysctls, divert, HAProxy config
validated by HAProxy itself).
"""

import copy
import os
import pwd
import shutil
from pathlib import Path

import pytest

from tests.support.haproxy import HAProxyProcess, UnitLaunch, unit_settings
from tests.support.netns import RUN_PREFIX

pytestmark = pytest.mark.root

MINION = "relayroute-functional"  # the functional minion's id (see conftest)
DEBIAN_UNIT = Path("/lib/systemd/system/haproxy.service")

EXPECTED_MANGLE = [
    "-A PREROUTING -j RELAYROUTE-PROXY-PRE",
    "-A RELAYROUTE-PROXY-DIVERT -j MARK --set-xmark 0x1/0xff",
    "-A RELAYROUTE-PROXY-DIVERT -j ACCEPT",
    "-A RELAYROUTE-PROXY-PRE -p tcp -m socket --transparent -j RELAYROUTE-PROXY-DIVERT",
]


def mangle_rules(ns):
    out = ns.exec("iptables-save -t mangle").stdout
    return [line for line in out.splitlines() if line.startswith("-A")]


@pytest.fixture
def proxy_ns(make_netns):
    from tests.support.netns import veth

    proxy = make_netns("proxy")
    lan = make_netns("lan")
    veth(proxy, "eth0", lan, "eth0")
    proxy.ip("addr add 192.0.2.2/24 dev eth0")
    lan.ip("addr add 192.0.2.11/24 dev eth0")
    return proxy


def test_divert_applies_exactly_and_is_idempotent(loaders, proxy_ns):
    with proxy_ns.entered():
        before = proxy_ns.snapshot()
        dry = loaders.states.relayroute.proxy_present(name="p", test=True)
        assert dry.result is None
        assert proxy_ns.snapshot() == before
        first = loaders.states.relayroute.proxy_present(name="p")
        assert first.result is True
        assert first.changes["routes"]["new"] == ["local 0.0.0.0/0 dev lo table 100 proto 211"]
        assert loaders.states.relayroute.proxy_present(name="p").changes == {}
    assert "100:\tfrom all fwmark 0x1/0xff lookup 100 proto 211" in proxy_ns.exec("ip rule").stdout
    table = proxy_ns.exec("ip route show table 100").stdout.strip()
    assert table == "local default dev lo proto 211 scope host"
    assert mangle_rules(proxy_ns) == EXPECTED_MANGLE
    with proxy_ns.entered():
        gone = loaders.states.relayroute.proxy_absent(name="p")
    assert gone.result is True
    assert proxy_ns.snapshot() == before


def pillar(tmp_path, **proxy_role):
    haproxy = {
        "config": str(tmp_path / "haproxy" / "haproxy.cfg"),
        "manage_pkg": False,
        "manage_service": False,
        "stats_socket": "",
        "chroot": "",
    }
    haproxy.update(proxy_role.pop("haproxy", {}))
    return {
        "relayroute": {
            "lan_networks": ["192.0.2.0/24"],
            "mark_mask": 0xFF,
            "ports": [25, 587],
            "proxies": {
                MINION: {
                    "address": "192.0.2.2",
                    "mac": "02:00:c0:00:02:02",
                    "mark": 254,
                    "table": 1000254,
                    "vip": "198.51.100.25",
                }
            },
            "relays": {"relay1": {"address": "192.0.2.11"}, "relay2": {"address": "192.0.2.12"}},
            "proxy": {
                "sysctl_config": str(tmp_path / "sysctl.conf"),
                "sysctl_saved": str(tmp_path / "sysctl-before.yaml"),
                **proxy_role,
            },
            "persist": {
                "dir": str(tmp_path / "relayroute"),
                "systemd_dir": str(tmp_path / "systemd"),
            },
            "lookup": {"proxy": {"haproxy": haproxy}},
        }
    }


def apply_sls(loaders, sls, pillar_data, test=False):
    ret = loaders.modules.state.sls(sls, pillar=pillar_data, test=test)
    return {state["__id__"]: state for state in ret.raw.values()}


def test_formula_proxy_component(loaders, proxy_ns, tmp_path):
    # The defaults set no sysctl (transparent binds need no ip_nonlocal_bind): one asked for.
    data = pillar(tmp_path, sysctls={"net.ipv4.ip_nonlocal_bind": 1})
    # The iptables lines below: pinned (Debian 12's default is nftables).
    data["relayroute"]["backend"] = "iptables"
    nonlocal_bind = "sysctl -n net.ipv4.ip_nonlocal_bind"
    with proxy_ns.entered():
        before = proxy_ns.snapshot()
        assert proxy_ns.exec(nonlocal_bind).stdout.strip() == "0"
        dry = apply_sls(loaders, "relayroute.proxy", data, test=True)
        assert all(state["result"] in (None, True) for state in dry.values()), [
            s["name"] for s in dry.values()
        ]
        assert proxy_ns.snapshot() == before
        assert not (tmp_path / "haproxy" / "haproxy.cfg").exists()

        first = apply_sls(loaders, "relayroute.proxy", data)
        assert all(state["result"] is True for state in first.values()), first
        assert proxy_ns.exec(nonlocal_bind).stdout.strip() == "1"
        assert "net.ipv4.ip_nonlocal_bind = 1" in (tmp_path / "sysctl.conf").read_text()
        assert mangle_rules(proxy_ns) == EXPECTED_MANGLE
        config = (tmp_path / "haproxy" / "haproxy.cfg").read_text()
        assert "bind 198.51.100.25:25 transparent" in config
        assert "bind 198.51.100.25:587 transparent" in config
        assert "source 0.0.0.0 usesrc clientip" in config
        assert "server relay2 192.0.2.12:587 check" in config
        check = proxy_ns.exec(["haproxy", "-c", "-f", str(tmp_path / "haproxy" / "haproxy.cfg")])
        assert check.returncode == 0

        # HAProxy's unit gets relayroute's drop-in (privileges: unprivileged);
        # no init system runs HAProxy here (manage_service false): nothing to check.
        dropin = tmp_path / "systemd" / "haproxy.service.d" / "relayroute.conf"
        assert "User=haproxy" in dropin.read_text().splitlines()
        assert "chroot" not in config
        privileges = first["relayroute-proxy-haproxy-privileges"]
        assert "HAProxy is not running" in privileges["comment"]

        # What the host runs at boot, without Salt: the unit and its script.
        unit = tmp_path / "systemd" / "relayroute-proxy.service"
        assert f"ExecStart=/bin/sh {tmp_path}/relayroute/proxy.restore" in unit.read_text()
        assert (tmp_path / "systemd" / "multi-user.target.wants" / unit.name).resolve() == unit
        script = (tmp_path / "relayroute" / "proxy.restore").read_text()
        assert "ip -4 route replace local 0.0.0.0/0 dev lo table 100 proto 211" in script

        second = apply_sls(loaders, "relayroute.proxy", data)
        assert all(state["changes"] == {} for state in second.values()), second

        clean = apply_sls(loaders, "relayroute.proxy.clean", data)
        assert all(state["result"] is True for state in clean.values()), clean
        after = proxy_ns.snapshot()
        # Clean puts back the value the sysctl had and removes relayroute's files.
        assert proxy_ns.exec(nonlocal_bind).stdout.strip() == "0"
    assert after == before
    assert not (tmp_path / "sysctl.conf").exists()
    assert not (tmp_path / "sysctl-before.yaml").exists()
    assert not list((tmp_path / "relayroute").iterdir())
    assert not (tmp_path / "systemd" / "relayroute-proxy.service").exists()
    # HAProxy's unit as the distribution ships it: the drop-in and its directory gone.
    assert not (tmp_path / "systemd" / "haproxy.service.d").exists()


def test_invalid_haproxy_description_keeps_the_previous_file(loaders, proxy_ns, tmp_path):
    good = pillar(tmp_path)
    bad = copy.deepcopy(good)
    bad["relayroute"]["lookup"]["proxy"]["haproxy"]["timeouts"] = {"connect": "5 parsecs"}
    with proxy_ns.entered():
        apply_sls(loaders, "relayroute.proxy", good)
        path = tmp_path / "haproxy" / "haproxy.cfg"
        previous = path.read_text()
        states = apply_sls(loaders, "relayroute.proxy", bad)
        loaders.modules.relayroute.proxy_remove()
    config_state = states["relayroute-proxy-haproxy-config"]
    assert config_state["result"] is False
    assert "parsecs" in config_state["comment"] or "timeout" in config_state["comment"]
    assert path.read_text() == previous


def test_the_defaults_set_no_sysctl(loaders, proxy_ns, tmp_path):
    with proxy_ns.entered():
        applied = apply_sls(loaders, "relayroute.proxy", pillar(tmp_path))
        assert proxy_ns.exec("sysctl -n net.ipv4.ip_nonlocal_bind").stdout.strip() == "0"
        loaders.modules.relayroute.proxy_remove()
    assert all(state["result"] is True for state in applied.values()), applied
    assert not [name for name in applied if name.startswith("relayroute-proxy-sysctl-net.")]
    assert not (tmp_path / "sysctl.conf").exists()


def test_tcp_tw_recycle_is_refused_and_nothing_changes(loaders, proxy_ns, tmp_path):
    data = pillar(tmp_path, sysctls={"net.ipv4.tcp_tw_recycle": 1})
    with proxy_ns.entered():
        before = proxy_ns.snapshot()
        states = apply_sls(loaders, "relayroute.proxy", data)
        assert proxy_ns.snapshot() == before
    assert list(states) == ["relayroute-proxy-invalid-pillar"]
    state = states["relayroute-proxy-invalid-pillar"]
    assert state["result"] is False
    assert "relayroute:proxy:sysctls:net.ipv4.tcp_tw_recycle: was removed from Linux 4.12" in (
        state["name"] + state["comment"]
    )
    assert not (tmp_path / "haproxy" / "haproxy.cfg").exists()


def test_a_mask_other_than_0xff_needs_no_divert_mark(loaders, proxy_ns, tmp_path):
    """mark_mask 0xf0, proxy marks 0x20/0x30, no divert_mark: the divert takes 0x10."""
    data = pillar(tmp_path)
    data["relayroute"]["backend"] = "iptables"  # the iptables line below (default: nftables)
    data["relayroute"]["mark_mask"] = 0xF0
    data["relayroute"]["proxies"][MINION]["mark"] = 0x20
    data["relayroute"]["proxies"]["master-relay-2"] = {
        "address": "192.0.2.3",
        "mark": 0x30,
        "table": 1000250,
        "vip": "198.51.100.26",
    }
    with proxy_ns.entered():
        before = proxy_ns.snapshot()
        applied = apply_sls(loaders, "relayroute.proxy", data)
        assert all(state["result"] is True for state in applied.values()), applied
        assert "-A RELAYROUTE-PROXY-DIVERT -j MARK --set-xmark 0x10/0xf0" in mangle_rules(proxy_ns)
        rules = proxy_ns.exec("ip rule").stdout
        assert "100:\tfrom all fwmark 0x10/0xf0 lookup 100 proto 211" in rules
        again = apply_sls(loaders, "relayroute.proxy", data)
        assert all(state["changes"] == {} for state in again.values()), again
        clean = apply_sls(loaders, "relayroute.proxy.clean", data)
        assert all(state["result"] is True for state in clean.values()), clean
        assert proxy_ns.snapshot() == before


def test_privileges_root_removes_the_drop_in_and_keeps_the_chroot(loaders, proxy_ns, tmp_path):
    data = pillar(tmp_path, haproxy={"chroot": "/var/lib/haproxy"})
    dropin_dir = tmp_path / "systemd" / "haproxy.service.d"
    # Another drop-in of the operator's stays, and with it the directory.
    dropin_dir.mkdir(parents=True)
    (dropin_dir / "local.conf").write_text("[Service]\nNice=1\n")
    with proxy_ns.entered():
        first = apply_sls(loaders, "relayroute.proxy", data)
        assert all(state["result"] is True for state in first.values()), first
        assert (dropin_dir / "relayroute.conf").exists()
        config = (tmp_path / "haproxy" / "haproxy.cfg").read_text()
        assert "chroot" not in config

        data["relayroute"]["lookup"]["proxy"]["haproxy"]["privileges"] = "root"
        root = apply_sls(loaders, "relayroute.proxy", data)
        assert all(state["result"] is True for state in root.values()), root
        assert root["relayroute-proxy-haproxy-dropin"]["changes"] == {
            "removed": str(dropin_dir / "relayroute.conf")
        }
        # Root: no privileges check (HAProxy has every capability), the chroot is back.
        assert "relayroute-proxy-haproxy-privileges" not in root
        config = (tmp_path / "haproxy" / "haproxy.cfg").read_text()
        assert "    chroot /var/lib/haproxy\n" in config
        clean = apply_sls(loaders, "relayroute.proxy.clean", data)
        assert all(state["result"] is True for state in clean.values()), clean
    assert sorted(path.name for path in dropin_dir.iterdir()) == ["local.conf"]


RUNTIME = f"relayroute-{RUN_PREFIX}"


@pytest.fixture
def unprivileged_haproxy(loaders, proxy_ns, tmp_path):
    """
    The proxy component applied with privileges 'unprivileged' and a runtime
    directory of this run's own; ``start(without=())`` runs HAProxy the way
    the distribution's unit with relayroute's drop-in starts it (setpriv),
    withholding ``without`` capabilities. The VIP is local: an HAProxy without
    CAP_NET_ADMIN binds it, and then fails silently.
    """
    data = pillar(tmp_path, haproxy={"runtime_directory": RUNTIME})
    proxy_ns.ip("addr add 198.51.100.25/32 dev lo")
    with proxy_ns.entered():
        applied = apply_sls(loaders, "relayroute.proxy", data)
    assert all(state["result"] is True for state in applied.values()), applied
    config = tmp_path / "haproxy" / "haproxy.cfg"
    dropin = tmp_path / "systemd" / "haproxy.service.d" / "relayroute.conf"
    run_dir = Path("/run") / RUNTIME
    # pytest's tmp_path is root's alone: the configuration where HAProxy's user reads it.
    readable = Path("/run") / f"{RUNTIME}-haproxy.cfg"
    shutil.copy(config, readable)
    readable.chmod(0o644)
    started = []

    def start(without=()):
        launch = UnitLaunch(
            unit_settings(
                DEBIAN_UNIT.read_text(),
                dropin.read_text(),
                f'[Service]\nEnvironment="CONFIG={readable}"\n',
            )
        )
        run_dir.mkdir(mode=launch.runtime_mode, exist_ok=True)
        shutil.chown(run_dir, launch.user, launch.group)
        haproxy = HAProxyProcess(
            proxy_ns, readable, tmp_path / f"haproxy-{len(started)}.log", launch.argv(without)
        )
        started.append(haproxy.start())
        return haproxy

    try:
        yield {"data": data, "start": start, "pidfile": str(run_dir / "haproxy.pid")}
    finally:
        for haproxy in started:
            haproxy.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        readable.unlink()
        with proxy_ns.entered():
            loaders.modules.relayroute.proxy_remove()


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_UNIT.exists(), reason="needs Debian's haproxy.service")
def test_privileges_state_passes_the_unprivileged_haproxy(loaders, proxy_ns, unprivileged_haproxy):
    haproxy = unprivileged_haproxy["start"]()
    pidfile = unprivileged_haproxy["pidfile"]
    found = loaders.modules.relayroute.haproxy_privileges(pidfile=pidfile, user="haproxy")
    assert found["problems"] == []
    assert found["master"]["pid"] == haproxy.pid
    assert [w["pid"] for w in found["workers"]] == haproxy.workers()
    for status in [found["master"], *found["workers"]]:
        assert status["uid"] == pwd.getpwnam("haproxy").pw_uid
        assert status["CapEff"] == ("CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN")
        assert status["CapAmb"] == ("CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN")
        assert status["CapBnd"] == ("CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN")
    with proxy_ns.entered():
        states = apply_sls(loaders, "relayroute.proxy", unprivileged_haproxy["data"])
    state = states["relayroute-proxy-haproxy-privileges"]
    assert state["result"] is True, state
    assert state["comment"].endswith("every process has what it needs")
    assert state["changes"] == {}


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_UNIT.exists(), reason="needs Debian's haproxy.service")
def test_privileges_state_fails_an_haproxy_that_would_drop_every_connection(
    loaders, proxy_ns, unprivileged_haproxy
):
    """Negative control: CAP_NET_ADMIN and CAP_NET_RAW withheld; HAProxy starts all the same."""
    haproxy = unprivileged_haproxy["start"](without=("CAP_NET_ADMIN", "CAP_NET_RAW"))
    assert haproxy.workers()
    with proxy_ns.entered():
        states = apply_sls(loaders, "relayroute.proxy", unprivileged_haproxy["data"])
        dry = apply_sls(loaders, "relayroute.proxy", unprivileged_haproxy["data"], test=True)
    state = states["relayroute-proxy-haproxy-privileges"]
    assert state["result"] is False
    master = f"master {haproxy.pid} (uid {pwd.getpwnam('haproxy').pw_uid})"
    assert state["comment"].startswith(
        f"{master} lacks CAP_NET_ADMIN or CAP_NET_RAW in its effective capabilities "
        "(CapEff: CAP_NET_BIND_SERVICE), needed for IP_TRANSPARENT"
    ), state["comment"]
    assert "worker" in state["comment"]
    # Every other state of the component succeeded: the failure is this one alone.
    assert [s["__id__"] for s in states.values() if s["result"] is not True] == [
        "relayroute-proxy-haproxy-privileges"
    ]
    assert dry["relayroute-proxy-haproxy-privileges"]["result"] is None


@pytest.mark.slow
def test_privileges_state_names_a_root_haproxy_and_a_stale_pid_file(
    loaders, proxy_ns, unprivileged_haproxy, tmp_path
):
    root = HAProxyProcess(proxy_ns, tmp_path / "haproxy" / "haproxy.cfg").start()
    try:
        found = loaders.modules.relayroute.haproxy_privileges(pid=root.pid, user="haproxy")
    finally:
        root.stop()
    assert found["problems"][0] == (
        f"master {root.pid} (uid 0) runs as uid 0, not as haproxy "
        f"(uid {pwd.getpwnam('haproxy').pw_uid}): was HAProxy restarted since its unit changed?"
    )
    stale = tmp_path / "stale.pid"
    stale.write_text(f"{os.getpid()}\n")
    state = loaders.states.relayroute.haproxy_privileged(name="h", pidfile=str(stale))
    assert state.result is False
    assert state.comment == (
        f"pid file {stale} names process {os.getpid()}, which is "
        f"{Path('/proc/self/comm').read_text().strip()!r}, not haproxy"
    )


def args_of(state):
    """A rendered state's arguments (``state.show_sls``: a list of one-key dicts)."""
    return {k: v for item in state if isinstance(item, dict) for k, v in item.items()}


def test_a_managed_service_restarts_on_a_new_drop_in_and_is_checked_after(loaders, tmp_path):
    """Rendered (state.show_sls): systemd's restart and reload paths cannot run here."""
    data = pillar(tmp_path, haproxy={"manage_service": True})
    states = loaders.modules.state.show_sls("relayroute.proxy", pillar=data)
    assert isinstance(states, dict), states
    restart = states["relayroute-proxy-haproxy-restart"]["module"]
    assert "run" in restart
    assert args_of(restart)["service.restart"] == [{"name": "haproxy"}]
    assert args_of(restart)["onchanges"] == [{"file": "relayroute-proxy-haproxy-dropin"}]
    service = args_of(states["relayroute-proxy-haproxy-service"]["service"])
    assert service["reload"] is True
    assert service["watch"] == [{"file": "relayroute-proxy-haproxy-config"}]
    assert {"module": "relayroute-proxy-haproxy-restart"} in service["require"]
    check = args_of(states["relayroute-proxy-haproxy-privileges"]["relayroute"])
    assert check["pidfile"] == "/run/haproxy/haproxy.pid"
    assert check["user"] == "haproxy"
    assert check["require_running"] is True
    assert {"service": "relayroute-proxy-haproxy-service"} in check["require"]

    clean = loaders.modules.state.show_sls("relayroute.proxy.clean", pillar=data)
    restart = args_of(clean["relayroute-proxy-haproxy-restart-clean"]["module"])
    assert restart["onchanges"] == [{"file": "relayroute-proxy-haproxy-dropin-clean"}]
    assert restart["onlyif"] == [{"fun": "service.status", "name": "haproxy"}]
