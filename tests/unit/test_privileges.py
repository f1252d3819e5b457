"""
The judgement of HAProxy's privileges from ``/proc/PID/status`` texts
(``relayroute_core.privileges``): capability masks decoded, and each process
found lacking what transparent proxying needs. Pure: no root, no HAProxy.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from relayroute_core import privileges

# A worker of HAProxy 2.6.12 started as haproxy (uid 103) with
# setpriv --inh-caps=+net_admin,+net_bind_service --ambient-caps=+net_admin,+net_bind_service.
WORKER = """\
Name:\thaproxy
Umask:\t0022
State:\tS (sleeping)
Tgid:\t5804
Ngid:\t0
Pid:\t5804
PPid:\t5801
TracerPid:\t0
Uid:\t103\t103\t103\t103
Gid:\t107\t107\t107\t107
FDSize:\t64
Groups:\t107
CapInh:\t0000000000001400
CapPrm:\t0000000000001400
CapEff:\t0000000000001400
CapBnd:\t000001ffffffffff
CapAmb:\t0000000000001400
NoNewPrivs:\t0
"""


def status(pid=5804, uid=103, eff="0000000000001400"):
    text = WORKER.replace("5804", str(pid)).replace("103\t103\t103\t103", f"{uid}\t" * 3 + f"{uid}")
    return privileges.parse_status(text.replace("CapEff:\t0000000000001400", f"CapEff:\t{eff}"))


def test_decode_names_each_bit():
    assert privileges.decode("0000000000001400") == ("CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN")
    assert privileges.decode("0000000000002400") == ("CAP_NET_BIND_SERVICE", "CAP_NET_RAW")
    assert privileges.decode("0000000000000000") == ()
    assert privileges.decode(0x400) == ("CAP_NET_BIND_SERVICE",)
    assert privileges.decode("000001ffffffffff") == privileges.CAPABILITIES
    # A capability newer than this list is named by its bit, never dropped.
    assert privileges.decode(1 << 41 | 1) == ("CAP_CHOWN", "cap_41")


@pytest.mark.skipif(shutil.which("capsh") is None, reason="capsh (libcap2-bin) is not installed")
@pytest.mark.parametrize("mask", ["0x1400", "0x2400", "0x1ffffffffff", "0x80000000"])
def test_decode_agrees_with_capsh(mask):
    out = subprocess.run(
        ["capsh", f"--decode={mask}"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    names = out.strip().split("=", 1)[1].split(",")
    assert [name.upper() for name in names] == list(privileges.decode(mask))


def test_parse_status_reads_ids_and_every_set():
    found = privileges.parse_status(WORKER)
    assert found["name"] == "haproxy"
    assert (found["pid"], found["ppid"], found["uid"], found["gid"]) == (5804, 5801, 103, 107)
    for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert found[key] == ("CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"), key
    assert len(found["CapBnd"]) == 41


def test_parse_status_of_this_process():
    found = privileges.parse_status(Path("/proc/self/status").read_text())
    assert found["pid"] > 0
    assert isinstance(found["CapEff"], tuple)


def test_unprivileged_haproxy_with_both_capabilities_passes():
    master, worker = status(5801), status(5804)
    assert privileges.problems(master, [worker], uid=103, user="haproxy") == []
    # CAP_NET_RAW serves IP_TRANSPARENT as well as CAP_NET_ADMIN.
    raw = status(5804, eff="0000000000002400")
    assert privileges.problems(status(5801, eff="0000000000002400"), [raw], uid=103) == []
    # Root with every capability: nothing is missing either.
    root = status(1, uid=0, eff="000001ffffffffff")
    assert privileges.problems(root, [status(2, uid=0, eff="000001ffffffffff")]) == []


def test_bind_service_alone_is_named_as_the_silent_failure():
    master = status(5801, eff="0000000000000400")
    worker = status(5804, eff="0000000000000400")
    found = privileges.problems(master, [worker], uid=103, user="haproxy")
    assert len(found) == 2
    assert found[0].startswith("master 5801 (uid 103) lacks CAP_NET_ADMIN or CAP_NET_RAW")
    assert "CapEff: CAP_NET_BIND_SERVICE" in found[0]
    assert "accepts every connection and drops it" in found[0]
    assert found[1].startswith("worker 5804 (uid 103) lacks CAP_NET_ADMIN or CAP_NET_RAW")


def test_nothing_at_all_names_both_needs():
    found = privileges.problems(status(5801, eff="0"), [status(5804)])
    assert [line.split(" lacks ")[1].split(" in ")[0] for line in found] == [
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_ADMIN or CAP_NET_RAW",
    ]
    assert "CapEff: none" in found[0]


def test_another_user_is_named():
    root = status(5801, uid=0, eff="000001ffffffffff")
    found = privileges.problems(root, [status(5804)], uid=103, user="haproxy")
    assert found == [
        "master 5801 (uid 0) runs as uid 0, not as haproxy (uid 103): "
        "was HAProxy restarted since its unit changed?"
    ]


def test_a_master_without_workers_serves_nothing():
    assert privileges.problems(status(5801), []) == [
        "master 5801 has no worker: HAProxy serves no connection"
    ]


def test_summary_is_one_line():
    assert privileges.summary(status(5804)) == (
        "pid 5804 uid 103 CapEff=CAP_NET_BIND_SERVICE,CAP_NET_ADMIN"
    )
    assert privileges.summary(status(5804, eff="0")) == "pid 5804 uid 103 CapEff=-"
