"""
The drop-in relayroute writes for HAProxy's unit (privileges 'unprivileged',
``relayroute/proxy/files/haproxy-unprivileged.conf.jinja``), as the formula
renders it from the layered defaults: its user, capabilities, runtime
directory and sandbox; ``systemd-analyze verify`` accepts it on top of the
distribution's unit; what the lab runs is derived from the same files; and
the validation of the keys it is written from. No root.
"""

import copy
import shutil
from pathlib import Path

import jinja2
import pytest

from relayroute_core import topology
from tests.support.haproxy import UnitLaunch, systemd_verify, unit_settings
from tests.unit.test_bad_topologies import BASE, MINION, as_map_jinja

FILES = Path(__file__).resolve().parents[2] / "relayroute" / "proxy" / "files"
DEBIAN_UNIT = Path("/lib/systemd/system/haproxy.service")


def haproxy_settings(os_family="Debian", osfinger="Debian-12", **haproxy):
    pillar = copy.deepcopy(BASE)
    pillar["relayroute"]["proxy"]["haproxy"].update(haproxy)
    config = as_map_jinja(pillar, os_family, osfinger)
    assert topology.topology(config, MINION)["errors"] == []
    return config["proxy"]["haproxy"]


def render(**kwargs):
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(FILES)), keep_trailing_newline=True)
    template = env.get_template("haproxy-unprivileged.conf.jinja")
    return template.render(haproxy=haproxy_settings(**kwargs))


def settings_lines(text):
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_debian_12_defaults_to_unprivileged_and_renders_the_drop_in():
    assert haproxy_settings()["privileges"] == "unprivileged"
    lines = settings_lines(render())
    assert lines[:9] == [
        "[Service]",
        "User=haproxy",
        "Group=haproxy",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "RuntimeDirectory=haproxy",
        "RuntimeDirectoryMode=0750",
        "RuntimeDirectoryPreserve=yes",
    ]
    assert 'Environment="EXTRAOPTS=-S /run/haproxy/master.sock"' in lines
    assert 'Environment="PIDFILE=/run/haproxy/haproxy.pid"' in lines
    # The stats socket (/run/haproxy/admin.sock) is in the runtime directory already.
    assert not [line for line in lines if line.startswith("ReadWritePaths=")]
    for setting in ("ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
        assert setting in lines
    # 2 sockets a session for the default maxconn 4096, and room for more.
    assert "LimitNOFILE=9216" in lines


def test_rhel_keeps_its_stats_socket_writable_and_has_no_master_socket():
    text = render(os_family="RedHat", osfinger="AlmaLinux-9")
    lines = settings_lines(text)
    assert "ReadWritePaths=-/var/lib/haproxy" in lines
    assert [line for line in lines if line.startswith("Environment=")] == [
        'Environment="PIDFILE=/run/haproxy/haproxy.pid"'
    ]
    assert "everything read-only but /run/haproxy and /var/lib/haproxy," in text


@pytest.mark.parametrize(
    "osfinger",
    [
        "CentOS Linux-7",
        "Red Hat Enterprise Linux Server-7",
        "Red Hat Enterprise Linux-7",
        "Oracle Linux Server-7",
    ],
)
def test_the_7_releases_keep_haproxy_root(osfinger):
    assert haproxy_settings("RedHat", osfinger)["privileges"] == "root"


def test_other_settings_reach_the_drop_in():
    lines = settings_lines(
        render(user="mailproxy", group="mail", runtime_directory="relayroute/haproxy", maxconn=100)
    )
    assert "User=mailproxy" in lines
    assert "Group=mail" in lines
    assert "RuntimeDirectory=relayroute/haproxy" in lines
    assert 'Environment="PIDFILE=/run/relayroute/haproxy/haproxy.pid"' in lines
    assert "LimitNOFILE=1224" in lines


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or not DEBIAN_UNIT.exists(),
    reason="needs systemd-analyze and Debian's haproxy.service",
)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"os_family": "RedHat", "osfinger": "AlmaLinux-9"}],
    ids=["debian", "rhel-paths"],
)
def test_systemd_analyze_verify_accepts_the_unit_with_the_drop_in(tmp_path, kwargs):
    (tmp_path / "haproxy.service.d").mkdir()
    shutil.copy(DEBIAN_UNIT, tmp_path / "haproxy.service")
    (tmp_path / "haproxy.service.d" / "relayroute.conf").write_text(render(**kwargs))
    # verify exits 0 on unknown keys and bad values too: only silence passes.
    assert systemd_verify(tmp_path, "haproxy.service") == (0, "")


def test_the_lab_launch_is_derived_from_the_unit_and_the_drop_in():
    unit = (
        "[Service]\n"
        'Environment="CONFIG=/etc/haproxy/haproxy.cfg" "PIDFILE=/run/haproxy.pid" '
        '"EXTRAOPTS=-S /run/haproxy-master.sock"\n'
        "ExecStart=/usr/sbin/haproxy -Ws -f $CONFIG -p $PIDFILE $EXTRAOPTS\n"
        "ExecReload=/usr/sbin/haproxy -Ws -f $CONFIG -c -q $EXTRAOPTS\n"
        "ExecReload=/bin/kill -USR2 $MAINPID\n"
    )
    launch = UnitLaunch(unit_settings(unit, render()))
    assert launch.command == [
        "/usr/sbin/haproxy",
        "-Ws",
        "-f",
        "/etc/haproxy/haproxy.cfg",
        "-p",
        "/run/haproxy/haproxy.pid",
        "-S",
        "/run/haproxy/master.sock",
    ]
    assert (launch.user, launch.group, launch.runtime_directory) == ("haproxy",) * 3
    assert launch.runtime_mode == 0o750
    caps = "-all,+net_admin,+net_bind_service"
    assert launch.argv()[:8] == [
        "setpriv",
        "--reuid=haproxy",
        "--regid=haproxy",
        "--init-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        f"--bounding-set={caps}",
        "--no-new-privs",
    ]
    withheld = launch.argv(without=("CAP_NET_ADMIN", "CAP_NET_RAW"))
    assert "--ambient-caps=-all,+net_bind_service" in withheld
    assert "--bounding-set=-all,+net_bind_service" in withheld


def test_unit_settings_follow_systemds_list_rules():
    found = unit_settings("[Service]\nExecReload=a\nExecReload=b\n", "[Service]\nExecReload=\n")
    assert found["ExecReload"] == []
    found = unit_settings("[Unit]\nUser=no\n[Service]\nUser=root\n", "[Service]\nUser=haproxy\n")
    assert found["User"] == ["root", "haproxy"]


def errors_for(**haproxy):
    pillar = copy.deepcopy(BASE)
    pillar["relayroute"]["proxy"]["haproxy"].update(haproxy)
    return topology.topology(as_map_jinja(pillar), MINION)["errors"]


@pytest.mark.parametrize(
    ("haproxy", "expected"),
    [
        (
            {"privileges": "setcap"},
            "relayroute:proxy:haproxy:privileges: must be one of unprivileged, root (got 'setcap')",
        ),
        ({"user": "hap roxy"}, "relayroute:proxy:haproxy:user: must be a user or group name"),
        ({"group": ""}, "relayroute:proxy:haproxy:group: must be a non-empty string"),
        (
            {"runtime_directory": "/run/haproxy"},
            "relayroute:proxy:haproxy:runtime_directory: must be a directory name relative to /run",
        ),
        (
            {"runtime_directory": "../etc"},
            "relayroute:proxy:haproxy:runtime_directory: must be a directory name",
        ),
        (
            {"unit_environment": {"EXTRAOPTS": '-S "$HOME"'}},
            "relayroute:proxy:haproxy:unit_environment:EXTRAOPTS: must not contain",
        ),
        (
            {"unit_environment": {"1X": "a"}},
            "relayroute:proxy:haproxy:unit_environment:1X: is not an environment variable's name",
        ),
        (
            {"unit_environment": {"PIDFILE": "haproxy.pid"}},
            "relayroute:proxy:haproxy:unit_environment:PIDFILE: must be the pid file's "
            "absolute path",
        ),
        (
            {"unit_environment": ["PIDFILE=/run/x"]},
            "relayroute:proxy:haproxy:unit_environment: must be a mapping",
        ),
    ],
)
def test_bad_privilege_settings_name_the_key_and_value(haproxy, expected):
    errors = errors_for(**haproxy)
    assert any(error.startswith(expected) for error in errors), errors


def test_root_needs_no_pid_file_of_its_own():
    # privileges 'root' writes no drop-in: PIDFILE is not read.
    assert errors_for(privileges="root", unit_environment={"PIDFILE": "haproxy.pid"}) == []
