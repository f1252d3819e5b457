"""
HAProxy without root in the seed's lab: master-relay's HAProxy started the way
its unit starts it once relayroute's drop-in is there (Debian's
haproxy.service and the drop-in the formula wrote into master-relay's
/etc/systemd, read here: ExecStart with the unit's environment, User=,
Group=, the ambient and bounding capabilities, NoNewPrivileges=, the
RuntimeDirectory=) under setpriv, since no init system runs in a namespace.
Mail through the VIP reaches the relays from the client's own address, on 25
and 587, before and after a reload; the formula's privileges check passes it,
and fails an HAProxy started without CAP_NET_ADMIN and CAP_NET_RAW, which
accepts every connection and drops it (the negative control).
"""

import copy
import shutil
from pathlib import Path

import pytest

from relayroute_core import privileges
from tests.support import seedlab
from tests.support.haproxy import HAProxyProcess, UnitLaunch, unit_settings
from tests.support.netns import RUN_PREFIX
from tests.support.postfix import wait_for_messages
from tests.support.seedlab import mail_via_vip, report, states_of

pytestmark = [pytest.mark.lab, pytest.mark.root]

DEBIAN_UNIT = Path("/lib/systemd/system/haproxy.service")
DROPIN = "/etc/systemd/system/haproxy.service.d/relayroute.conf"
# /run is the host's in every namespace: a runtime directory of this run's own.
RUNTIME = f"relayroute-{RUN_PREFIX}-lab"
PRIVILEGES_STATE = "relayroute-proxy-haproxy-privileges"
WITHOUT_TRANSPARENT = ("CAP_NET_ADMIN", "CAP_NET_RAW")

if not DEBIAN_UNIT.exists():
    pytest.skip("needs Debian's haproxy.service", allow_module_level=True)


def apply_proxy(salt_cli):
    """``state.sls relayroute.proxy`` on master-relay: ``(returncode, {state id: state})``."""
    ret = salt_cli.run("state.sls", "relayroute.proxy", minion_tgt="master-relay", _timeout=300)
    (states,) = states_of(ret, "master-relay").values()
    return ret.returncode, {state["__id__"]: state for state in states}


def processes(haproxy):
    """``ps``'s user and command of the master and its workers, and their /proc status."""
    pids = [haproxy.pid, *haproxy.workers()]
    ps = haproxy.ns.exec(["ps", "-ww", "-o", "user=,pid=,args=", "-p", ",".join(map(str, pids))])
    statuses = [privileges.parse_status(Path(f"/proc/{pid}/status").read_text()) for pid in pids]
    return ps.stdout.splitlines(), statuses


@pytest.fixture(scope="module")
def unprivileged(lab, applied, salt_cli, set_pillar, tmp_path_factory):
    """
    master-relay with privileges 'unprivileged' (the default) and this run's
    runtime directory, the package's root HAProxy stopped; ``start(without)``
    starts HAProxy from the unit and the drop-in the formula wrote. At the
    end the lab's pillar, drop-in and root HAProxy are back.
    """
    data = copy.deepcopy(lab.pillar())
    data["relayroute"]["lookup"]["proxy"]["haproxy"]["runtime_directory"] = RUNTIME
    set_pillar(data)
    applied["haproxy"].stop()
    run_dir = Path("/run") / RUNTIME
    logs = tmp_path_factory.mktemp("haproxy-unprivileged")
    started = []
    ns = lab.ns("master-relay")

    def start(without=()):
        dropin = seedlab.overlay_path(ns, DROPIN)
        launch = UnitLaunch(unit_settings(DEBIAN_UNIT.read_text(), dropin.read_text()))
        # What systemd does for RuntimeDirectory= before ExecStart.
        run_dir.mkdir(mode=launch.runtime_mode, exist_ok=True)
        shutil.chown(run_dir, launch.user, launch.group)
        haproxy = HAProxyProcess(
            ns, "/etc/haproxy/haproxy.cfg", logs / f"{len(started)}.log", launch.argv(without)
        )
        started.append(haproxy.start())
        return launch, haproxy

    def stop():
        for haproxy in started:
            haproxy.stop()
        shutil.rmtree(run_dir, ignore_errors=True)

    try:
        code, states = apply_proxy(salt_cli)
        assert code == 0, states
        dropin = seedlab.overlay_path(ns, DROPIN).read_text()
        assert f"RuntimeDirectory={RUNTIME}" in dropin.splitlines()
        # No HAProxy runs yet; manage_service is false in the lab: nothing to check.
        assert "HAProxy is not running" in states[PRIVILEGES_STATE]["comment"]
        yield {"start": start, "stop": stop, "pidfile": run_dir / "haproxy.pid"}
    finally:
        stop()
        set_pillar(lab.pillar())
        code, states = apply_proxy(salt_cli)
        applied["haproxy"].start()
        assert code == 0, states


def mail_reaches_the_relays_from_the_client(lab, relays_postfix, count=2):
    """Mail through the VIP on 25 and 587, each logged by a relay with the client's address."""
    sent = mail_via_vip(lab, (25, 587) * count)
    assert all(result.ok for result in sent), [result.text for result in sent if not result.ok]
    logged = wait_for_messages(relays_postfix, [result.queue_id for result in sent])
    assert len(logged) == len(sent), logged
    assert {client for _relay, client in logged.values()} == {seedlab.MAIL_CLIENT}, logged
    return logged


def test_haproxy_as_its_user_keeps_the_client_address_across_a_reload(
    lab, unprivileged, relays_postfix, salt_cli
):
    launch, haproxy = unprivileged["start"]()
    assert launch.user == "haproxy"
    assert unprivileged["pidfile"].read_text().split() == [str(haproxy.pid)]
    ps, statuses = processes(haproxy)
    assert [line.split()[0] for line in ps] == ["haproxy"] * len(ps)
    assert len(ps) >= 2
    needed = ("CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN")
    for status in statuses:
        assert (status["CapEff"], status["CapAmb"], status["CapBnd"]) == (needed,) * 3, status
    lines = [*ps, *(privileges.summary(status) for status in statuses)]

    logged = mail_reaches_the_relays_from_the_client(lab, relays_postfix)
    lines.append(
        f"{len(logged)} messages via VIP:25/587 logged by "
        f"{sorted({relay for relay, _ in logged.values()})} from {seedlab.MAIL_CLIENT}"
    )
    code, states = apply_proxy(salt_cli)
    assert code == 0, states
    assert states[PRIVILEGES_STATE]["result"] is True
    lines.append(f"{PRIVILEGES_STATE}: {states[PRIVILEGES_STATE]['comment']}")

    new_workers = haproxy.reload()
    ps, statuses = processes(haproxy)
    assert [status["pid"] for status in statuses[1:]] == haproxy.workers()
    assert set(new_workers) <= set(haproxy.workers())
    for status in statuses:
        assert status["uid"] == statuses[0]["uid"] != 0
        assert status["CapEff"] == needed, status
    logged = mail_reaches_the_relays_from_the_client(lab, relays_postfix)
    code, states = apply_proxy(salt_cli)
    assert code == 0, states
    assert states[PRIVILEGES_STATE]["result"] is True
    lines += [
        f"after the reload (SIGUSR2, as the unit's ExecReload): new workers {new_workers}",
        *ps,
        f"{len(logged)} messages via VIP:25/587, all from {seedlab.MAIL_CLIENT}",
        f"{PRIVILEGES_STATE}: {states[PRIVILEGES_STATE]['comment']}",
    ]
    report("HAProxy as its user, started from its unit and relayroute's drop-in", lines)
    unprivileged["stop"]()


def test_without_cap_net_admin_and_net_raw_the_privileges_state_fails(lab, unprivileged, salt_cli):
    """Negative control: HAProxy starts and binds the VIP, then drops every connection."""
    _launch, haproxy = unprivileged["start"](without=WITHOUT_TRANSPARENT)
    _ps, statuses = processes(haproxy)
    assert all(status["CapEff"] == ("CAP_NET_BIND_SERVICE",) for status in statuses)
    (dropped,) = mail_via_vip(lab, (25,), timeout=5)
    assert not dropped.ok
    code, states = apply_proxy(salt_cli)
    assert code != 0
    state = states[PRIVILEGES_STATE]
    assert state["result"] is False
    assert state["comment"].startswith(
        f"master {haproxy.pid} (uid {statuses[0]['uid']}) lacks CAP_NET_ADMIN or CAP_NET_RAW "
        "in its effective capabilities (CapEff: CAP_NET_BIND_SERVICE), needed for IP_TRANSPARENT"
    ), state["comment"]
    assert [i for i, s in states.items() if s["result"] is not True] == [PRIVILEGES_STATE]
    report(
        "negative control: CAP_NET_ADMIN and CAP_NET_RAW withheld",
        [
            f"mail via VIP:25: {'no reply' if dropped.code is None else dropped.code}, "
            f"swaks exit {dropped.returncode} (connection accepted, then closed)",
            f"{PRIVILEGES_STATE}: result False: {state['comment']}",
        ],
    )
    unprivileged["stop"]()
