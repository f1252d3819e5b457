"""
Reboot: relay1 and master-relay lose every runtime rule, route, mark and
connection, then run exactly what their boot would run (no Salt): both mail
paths work again.
"""

import pytest

from tests.support import seedlab
from tests.support.hosts import lose_runtime_state
from tests.support.seedlab import mail_direct, mail_via_vip, report

pytestmark = [pytest.mark.lab, pytest.mark.root]


def test_boot_restores_both_mail_paths_without_salt(applied, lab):
    relay, proxy = lab.ns("relay1"), lab.ns("master-relay")
    before = {name: lab.ns(name).snapshot() for name in ("relay1", "master-relay")}
    applied["haproxy"].stop()
    lose_runtime_state(relay, [1000254])
    lose_runtime_state(proxy, [100])
    proxy.sysctl("net.ipv4.ip_nonlocal_bind", 0)
    lines = []
    for name in ("relay1", "master-relay"):
        commands = lab.boot_commands(name)
        assert commands, f"{name} has nothing to run at boot"
        for command in commands:
            lab.ns(name).exec(command)
            lines.append(f"{name}: {' '.join(command)}")
    # HAProxy's own unit starts after relayroute's (Before=haproxy.service).
    applied["haproxy"].start()
    for name in ("relay1", "master-relay"):
        assert lab.ns(name).snapshot() == before[name], name
    assert proxy.exec("sysctl -n net.ipv4.ip_nonlocal_bind").stdout.strip() == "1"
    direct = mail_direct(lab, "relay1")
    assert direct.ok, direct.text
    proxied = mail_via_vip(lab, (25, 587) * 3)
    assert all(result.ok for result in proxied), [r.text for r in proxied if not r.ok]
    flows = relay.exec("conntrack -L -p tcp").stdout
    assert any(seedlab.MAIL_CLIENT in line and "mark=254" in line for line in flows.splitlines())
    report("reboot of relay1 and master-relay, restored without Salt", [
        *lines,
        "after: rules, routes and ruleset identical to before the reboot",
        f"mail: direct to relay1 ok; {len(proxied)} of {len(proxied)} through the VIP ok",
    ])  # fmt: skip
