"""
A role's systemd units as the engine's boot files (pure, files under tmp_path):
with ``persist:mechanism: unit`` and the watcher's settings given (the
formula's states), an apply writes the boot unit, the watcher script, its
unit and both ``.wants`` symlinks beside the restore script, once; a no-op
writes and runs nothing; turning the watcher off, switching mechanism or
removing the role leaves none of them; on a systemd host a changed unit is
followed by ``systemctl daemon-reload`` and the watcher's restart (stopped
before its unit goes); a refused apply writes nothing. Without the watcher's
settings (a call by hand) the units relayroute wrote are left as they are.
"""

import os
import shutil

import pytest

from relayroute_core import engine, iptables, model, netlink, nftables, persist, planner, units
from relayroute_core import watcher as watcher_script
from tests.support.haproxy import systemd_verify
from tests.unit.test_plan_iptables import seed_spec

KERNEL = netlink.KernelState(
    (), (), ("192.0.2.0/24",), ("192.0.2.11",), (("192.0.2.0/24", "eth0"),), "eth0"
)
WANTS = "multi-user.target.wants"


def target(tmp_path, **settings):
    defaults = {
        "mechanism": persist.UNIT,
        "network_scripts_dir": str(tmp_path / "network-scripts"),
        "iptables_file": str(tmp_path / "iptables"),
        "sysctl_dir": str(tmp_path / "sysctl.d"),
        "systemd_dir": str(tmp_path / "systemd"),
        "units": True,
    }
    return persist.Target(str(tmp_path / "relayroute"), **{**defaults, **settings})


def paths(tmp_path, role="relay"):
    systemd, directory = tmp_path / "systemd", tmp_path / "relayroute"
    return {
        "boot": systemd / f"relayroute-{role}.service",
        "boot link": systemd / WANTS / f"relayroute-{role}.service",
        "watcher": directory / f"{role}.watch",
        "watch": systemd / f"relayroute-{role}-watch.service",
        "watch link": systemd / WANTS / f"relayroute-{role}-watch.service",
    }


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """systemctl's calls, on a host that is (``systemd``) or is not systemd's."""
    runtime = tmp_path / "run-systemd"
    monkeypatch.setattr(engine, "SYSTEMD_RUNTIME", str(runtime))
    monkeypatch.setattr(engine, "_systemctl", lambda verb, unit=None: made.append((verb, unit)))

    class Calls(list):
        def booted(self):
            runtime.mkdir(exist_ok=True)

    made = Calls()
    return made


def apply(tmp_path, settings=None, plan=None, backend=nftables, memory=None):
    """One apply's boot files, as converge writes them: returns the changes (None: none)."""
    where = target(tmp_path, **(settings or {}))
    plan = plan or planner.relay_plan(seed_spec())
    memory = persist.load(where.dir, plan.owner.role) if memory is None else memory
    ruleset = iptables.Ruleset() if backend is iptables else nftables.Ruleset()
    current = engine.Current(KERNEL, ruleset, memory=memory)
    saving = engine._persist_changes(plan, current, backend, where, "relayroute")
    if saving:
        engine._save(where, plan, saving)
        return {"persist": saving["changes"], "systemd": saving["systemd"]}
    return None


def test_the_units_texts_are_the_boot_restore_and_the_sandboxed_watcher():
    boot = units.boot_unit("relay", "/etc/relayroute/relay.restore", "multi-user.target")
    assert "ExecStart=/bin/sh /etc/relayroute/relay.restore\n" in boot
    assert "Before=postfix.service haproxy.service\n" in boot
    assert boot.endswith("[Install]\nWantedBy=multi-user.target\n")
    watch = units.watch_unit(
        "relay", "/etc/relayroute/relay.restore", "/etc/relayroute/relay.watch", "/bin/bash", 0.2,
        "multi-user.target",
    )  # fmt: skip
    assert (
        "ExecStart=/bin/bash /etc/relayroute/relay.watch -d 0.2 /etc/relayroute/relay.restore\n"
    ) in watch
    assert "After=relayroute-relay.service network-online.target\n" in watch
    for line in (
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_NETLINK AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute=yes",
    ):
        assert f"\n{line}\n" in watch, line
        # The boot restore runs what the watcher runs, with no more privileges.
        assert f"\n{line}\n" in boot, line
    assert units.SANDBOX in boot
    assert units.SANDBOX in watch
    assert "\nRuntimeDirectory=relayroute\n" in units.SANDBOX  # the lock's directory


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_accepts_both_units(tmp_path):
    """What systemd itself says of the units the engine writes (only silence passes)."""
    script = tmp_path / "relay.restore"
    script.write_text("#!/bin/sh\n")
    names = [units.boot_unit_name("relay"), units.watch_unit_name("relay")]
    (tmp_path / names[0]).write_text(units.boot_unit("relay", str(script), "multi-user.target"))
    (tmp_path / names[1]).write_text(
        units.watch_unit("relay", str(script), str(tmp_path / "relay.watch"), "/bin/bash", 0.2,
                         "multi-user.target")
    )  # fmt: skip
    assert systemd_verify(tmp_path, *names) == (0, "")


def test_an_apply_writes_the_units_once_and_a_no_op_writes_and_runs_nothing(tmp_path, calls):
    calls.booted()
    first = apply(tmp_path)
    where = paths(tmp_path)
    for name in ("boot", "watcher", "watch", "boot link", "watch link"):
        assert first["persist"][str(where[name])] == "created", name
    assert os.readlink(where["boot link"]) == str(where["boot"])
    assert os.readlink(where["watch link"]) == str(where["watch"])
    assert where["watcher"].read_text() == watcher_script.SCRIPT
    assert where["watcher"].stat().st_mode & 0o777 == 0o755
    assert where["boot"].stat().st_mode & 0o777 == 0o644
    assert "ExecStart=/bin/sh " + str(tmp_path / "relayroute" / "relay.restore") in (
        where["boot"].read_text()
    )
    assert first["systemd"] == [
        ("daemon-reload", None),
        ("restart", "relayroute-relay-watch.service"),
    ]
    assert calls == first["systemd"]
    calls.clear()
    assert apply(tmp_path) is None
    assert calls == []


def test_a_changed_setting_rewrites_its_unit_and_restarts_the_watcher(tmp_path, calls):
    calls.booted()
    apply(tmp_path)
    calls.clear()
    changed = apply(tmp_path, {"watch_debounce": 0.5})
    where = paths(tmp_path)
    assert changed["persist"] == {str(where["watch"]): "updated"}
    assert " -d 0.5 " in where["watch"].read_text()
    assert calls == [("daemon-reload", None), ("restart", "relayroute-relay-watch.service")]
    # Another target: the links move, the old ones go (remembered).
    calls.clear()
    moved = apply(tmp_path, {"watch_debounce": 0.5, "wanted_by": "network.target"})
    assert moved["persist"][str(where["boot link"])] == "removed"
    assert moved["persist"][str(tmp_path / "systemd/network.target.wants/relayroute-relay.service")]
    assert "WantedBy=network.target" in where["boot"].read_text()


def test_the_watcher_switched_off_is_stopped_then_removed_and_the_boot_unit_stays(tmp_path, calls):
    calls.booted()
    apply(tmp_path)
    calls.clear()
    off = apply(tmp_path, {"watch": False})
    where = paths(tmp_path)
    assert {path for path, what in off["persist"].items() if what == "removed"} == {
        str(where[name]) for name in ("watcher", "watch", "watch link")
    }
    assert calls == [("stop", "relayroute-relay-watch.service"), ("daemon-reload", None)]
    assert where["boot"].exists()
    assert where["boot link"].is_symlink()
    assert not where["watch"].exists()
    assert not where["watch link"].is_symlink()


def test_switching_mechanism_or_removing_the_role_leaves_no_unit(tmp_path, calls):
    apply(tmp_path)
    (tmp_path / "iptables").write_text("*mangle\nCOMMIT\n")
    wants = tmp_path / "systemd" / WANTS
    (wants / "iptables.service").symlink_to("/usr/lib/systemd/system/iptables.service")
    apply(tmp_path, {"mechanism": persist.NETWORK_SCRIPTS}, backend=iptables)
    assert not [p for p in paths(tmp_path).values() if os.path.lexists(p)]
    assert calls == []  # not a systemd host: no systemctl
    apply(tmp_path)
    assert all(os.path.lexists(p) for p in paths(tmp_path).values())
    gone = apply(tmp_path, plan=planner.empty_plan(planner.RELAY))
    assert not [p for p in paths(tmp_path).values() if os.path.lexists(p)]
    assert set(gone["persist"].values()) == {"removed"}
    assert not list((tmp_path / "relayroute").iterdir())


def test_a_call_without_the_watchers_settings_leaves_the_units_and_removal_takes_them(tmp_path):
    apply(tmp_path)
    where = paths(tmp_path)
    texts = {name: os.readlink(p) if p.is_symlink() else p.read_text() for name, p in where.items()}
    # By hand, without the watcher's settings: another debounce would not reach the unit.
    assert apply(tmp_path, {"units": False, "watch_debounce": 0.5}) is None
    assert {
        name: os.readlink(p) if p.is_symlink() else p.read_text() for name, p in where.items()
    } == texts
    apply(tmp_path, {"units": False}, plan=planner.empty_plan(planner.RELAY))
    assert not [p for p in where.values() if os.path.lexists(p)]


def test_without_the_watchers_settings_no_unit_is_written(tmp_path):
    first = apply(tmp_path, {"units": False})
    assert set(first["persist"]) == {
        str(tmp_path / "relayroute" / "relay.restore"),
        str(tmp_path / "relayroute" / "relay.json"),
    }
    assert not (tmp_path / "systemd").exists()


def test_test_mode_reports_the_units_and_writes_nothing(tmp_path, calls):
    calls.booted()
    plan = planner.relay_plan(seed_spec())
    current = engine.Current(KERNEL, nftables.Ruleset())
    saving = engine._persist_changes(plan, current, nftables, target(tmp_path), "relayroute")
    assert str(paths(tmp_path)["watch"]) in saving["changes"]
    assert saving["systemd"][-1] == ("restart", "relayroute-relay-watch.service")
    assert not (tmp_path / "systemd").exists()
    assert calls == []


def test_a_refused_apply_writes_no_unit(tmp_path, calls):
    """iptables beside an enabled firewalld is refused: no boot path at all."""
    wants = tmp_path / "systemd" / WANTS
    wants.mkdir(parents=True)
    (wants / "firewalld.service").symlink_to("/usr/lib/systemd/system/firewalld.service")
    with pytest.raises(model.InputError):
        apply(tmp_path, backend=iptables)
    assert sorted(os.listdir(wants)) == ["firewalld.service"]
    assert not (tmp_path / "relayroute").exists()
    assert not (tmp_path / "systemd" / "relayroute-relay.service").exists()


def test_the_units_the_formula_wrote_before_are_adopted_without_a_write(tmp_path):
    """A host upgraded from Jinja-written units (same text): only the memory changes."""
    where = paths(tmp_path)
    apply(tmp_path)
    memory = persist.load(str(tmp_path / "relayroute"), "relay")
    del memory["boot_files"]
    changed = apply(tmp_path, memory=memory)
    assert changed["persist"] == {str(tmp_path / "relayroute" / "relay.json"): "updated"}
    assert changed["systemd"] == []
    assert where["watch"].exists()


def test_systemd_actions_are_pure():
    watch = "relayroute-relay-watch.service"
    unit = f"/s/{watch}"
    assert units.actions("relay", {unit: (units.UNIT, "a", "b")}, systemd=False) == []
    assert units.actions("relay", {}, systemd=True) == []
    assert units.actions("relay", {"/s/x.wants/y": (units.LINK, None, "/s/y")}, True) == []
    assert units.actions("relay", {"/d/relay.watch": (units.SCRIPT, "a", "b")}, True) == [
        ("restart", watch)
    ]
    assert units.actions("relay", {"/d/relay.watch": (units.SCRIPT, "a", None)}, True) == []
    assert units.actions("relay", {unit: (units.UNIT, "a", None)}, True) == [
        ("stop", watch),
        ("daemon-reload", None),
    ]
