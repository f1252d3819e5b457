"""
Reboot: relay1 and master-relay lose every runtime rule, route, mark and
connection, then run exactly what their boot would run (no Salt): both mail
paths work again.
"""

import copy
import os
from pathlib import Path

import pytest

from tests.lab import filters
from tests.lab.test_live_safety import conntrack_flows, highstate
from tests.support import rh7boot, seedlab
from tests.support.hosts import lose_runtime_state
from tests.support.seedlab import mail_direct, mail_via_vip, report

pytestmark = [pytest.mark.lab, pytest.mark.root]


HOSTS = ("relay1", "master-relay")
ROLES = {"relay1": "relay", "master-relay": "proxy"}


def reboot_and_mail(applied, lab, boot, title, backend, extra=()):
    """
    relay1 and master-relay, whose roles live in ``backend``, lose their
    runtime state, ``boot(name)`` runs what that host's boot runs (returning
    the commands); then the state must be identical to before and both mail
    paths must work.
    """
    relay, proxy = lab.ns("relay1"), lab.ns("master-relay")
    before = {name: filters.ruleset(lab.ns(name)) for name in HOSTS}
    held = {name: filters.holding(lab.ns(name), role) for name, role in ROLES.items()}
    assert held == {name: [backend] for name in HOSTS}, held
    applied["haproxy"].stop()
    lose_runtime_state(relay, [1000254])
    lose_runtime_state(proxy, [100])
    for name in HOSTS:
        filters.lose_relayroute_tables(lab.ns(name))
        assert filters.holding(lab.ns(name), ROLES[name]) == [], name
    proxy.sysctl("net.ipv4.ip_nonlocal_bind", 0)
    lines = [f"{name}: {command}" for name in HOSTS for command in boot(name)]
    # HAProxy's own unit starts after relayroute's (Before=haproxy.service).
    applied["haproxy"].start()
    for name in HOSTS:
        assert filters.ruleset(lab.ns(name)) == before[name], name
    assert proxy.exec("sysctl -n net.ipv4.ip_nonlocal_bind").stdout.strip() == "1"
    direct = mail_direct(lab, "relay1")
    assert direct.ok, direct.text
    proxied = mail_via_vip(lab, (25, 587) * 3)
    assert all(result.ok for result in proxied), [r.text for r in proxied if not r.ok]
    # The reboot emptied relay1's conntrack: every SMTP flow in it is from now,
    # each with its mark (the proxy's through the VIP, 0 direct).
    mark = lab.pillar()["relayroute"]["proxies"]["master-relay"]["mark"]
    flows = [f for f in conntrack_flows(relay, state=None) if f["dport"] in ("25", "587")]
    vip = [f for f in flows if f["src"] == seedlab.MAIL_CLIENT]
    direct = [f for f in flows if f["src"] == seedlab.EXTERNAL_MTA]
    assert {f["mark"] for f in vip} == {str(mark)}, vip
    assert {f["mark"] for f in direct} == {"0"}, direct
    report(title, [
        *extra,
        f"relayroute's roles in backend {backend} on both hosts",
        *lines,
        "after: rules, routes and rulesets (iptables-save, nft list ruleset) identical to "
        "before the reboot",
        f"mail: direct to relay1 ok; {len(proxied)} of {len(proxied)} through the VIP ok",
        f"relay1's conntrack: {len(vip)} flows through the VIP mark={mark}, "
        f"{len(direct)} direct mark=0",
    ])  # fmt: skip


def test_boot_restores_both_mail_paths_without_salt(applied, lab):
    def boot(name):
        commands = lab.boot_commands(name)
        assert commands, f"{name} has nothing to run at boot"
        for command in commands:
            lab.ns(name).exec(command)
        return [" ".join(command) for command in commands]

    # The lab's backend: the platform's default (nftables on Debian 12) unless it names one.
    reboot_and_mail(
        applied, lab, boot, "reboot of relay1 and master-relay, restored without Salt",
        filters.lab_backend(lab),
    )  # fmt: skip


# Inside each host's /etc overlay: what a CentOS 7 host keeps in /etc/sysconfig.
SYSCONFIG = "/etc/relayroute/sysconfig"


def as_centos7(lab, name):
    """
    The host as a CentOS 7 administrator runs it: iptables-services enabled
    with the running ruleset saved ('service iptables save'), network-scripts.
    """
    ns = lab.ns(name)
    sysconfig = seedlab.overlay_path(ns, SYSCONFIG)
    systemd = seedlab.overlay_path(ns, "/etc/systemd/system")
    rh7boot.prepare_host(sysconfig, systemd, ns.exec("iptables-save").stdout)
    return {
        "iptables_file": str(sysconfig / "iptables"),
        "sysctl_dir": str(seedlab.overlay_path(ns, "/etc/sysctl.d")),
        "network_scripts_dir": str(sysconfig / "network-scripts"),
    }


def test_centos7_boot_from_its_own_files_restores_both_mail_paths(
    applied, lab, salt_cli, set_pillar, pillar_data
):
    """
    persist mechanism 'network-scripts' (CentOS/RHEL 7's default): a highstate
    moves relay1's and master-relay's boot state from the relayroute units to
    route-/rule- files and /etc/sysconfig/iptables; a reboot that runs what
    CentOS 7's boot runs (tests/support/rh7boot.py) brings both mail paths back.
    The backend is CentOS 7's, iptables (the topology refuses nftables with
    network-scripts): the same highstate moves the two hosts to it.
    """
    target = ",".join(HOSTS)
    files = {name: as_centos7(lab, name) for name in HOSTS}
    pillar = copy.deepcopy(pillar_data)
    pillar["relayroute"]["backend"] = "iptables"
    pillar["relayroute"]["lookup"]["persist"] = {
        "mechanism": "network-scripts",
        "network_scripts_dir": f"{SYSCONFIG}/network-scripts",
        "iptables_file": f"{SYSCONFIG}/iptables",
    }
    set_pillar(pillar)
    try:
        moved = highstate(salt_cli, target, flags=["-L"])
        for name in HOSTS:
            overlay = seedlab.overlay_path(lab.ns(name), "/etc")
            assert not list((overlay / "systemd" / "system").glob("relayroute-*.service")), name
            assert not list((overlay / "relayroute").glob("*.restore")), name
        scripts = {name: sorted(os.listdir(files[name]["network_scripts_dir"])) for name in HOSTS}
        assert scripts == {"relay1": ["route-lan0", "rule-lan0"],
                           "master-relay": ["route-lo", "rule-lo"]}  # fmt: skip
        assert highstate(salt_cli, target, flags=["-L"]) == {name: [] for name in HOSTS}
        interfaces = {"relay1": ["lan0", "mgmt0"], "master-relay": ["lan0"]}
        persist = pillar["relayroute"]["lookup"]["persist"]
        reboot_and_mail(
            applied,
            lab,
            lambda name: rh7boot.boot(lab.ns(name), {**persist, **files[name]}, interfaces[name]),
            "CentOS 7 boot of relay1 and master-relay from their own files",
            "iptables",
            [f"highstate to mechanism network-scripts: {moved}"],
        )
    finally:
        set_pillar(pillar_data)
        highstate(salt_cli, target, flags=["-L"])
    for name, role in ROLES.items():
        held = filters.holding(lab.ns(name), role)
        assert held == [filters.lab_backend(lab)], (name, held)
        assert not os.listdir(files[name]["network_scripts_dir"]), name
        saved = Path(files[name]["iptables_file"]).read_text()
        assert "RELAYROUTE" not in saved, name
