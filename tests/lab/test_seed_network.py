"""
The formula end to end in the seed's network: a salt-master, one minion per
Salt-managed host, ``state.highstate``, real HAProxy, real Postfix and swaks.
Run with ``-s`` (as ``scripts/demo`` does) to see the report.
"""

import re
from collections import Counter

import pytest

from tests.support import seedlab
from tests.support.seedlab import OUTSIDER, mail_direct, mail_via_vip, report, states_of
from tests.support.smtp import send_mail

pytestmark = [pytest.mark.lab, pytest.mark.root]

VIP_SESSIONS = 6  # per port


def accepted_from(postfix):
    """Accepted messages per client address, from the relay's Postfix log (client=...)."""
    return Counter(re.findall(r"client=\S*\[([\d.]+)\]", postfix.log_text()))


def test_second_highstate_reports_no_changes(applied, salt_cli):
    second = salt_cli.run("state.highstate", minion_tgt="*", _timeout=300)
    changed = {
        minion: [s["__id__"] for s in states if s["changes"]]
        for minion, states in states_of(second).items()
    }
    report("second highstate", [f"{m}: changed {ids or 'nothing'}" for m, ids in changed.items()])
    assert all(not ids for ids in changed.values()), changed
    # Targeting the role by grain works too, and is just as quiet.
    by_grain = salt_cli.run("-G", "state.apply", "relayroute", minion_tgt="roles:relay")
    assert sorted(by_grain.data) == ["relay1", "relay2", "relay3"], by_grain.stdout
    for minion, states in states_of(by_grain).items():
        assert all(s["result"] and not s["changes"] for s in states), (minion, states)


def test_direct_and_proxied_mail_both_work(applied, lab, relays_postfix, salt_cli):
    lines = []
    # Other lab tests may have sent mail already: count only this test's.
    earlier = {name: accepted_from(postfix) for name, postfix in relays_postfix.items()}
    for name in lab.relay_addresses:
        direct = mail_direct(lab, name)
        assert direct.ok, direct.text
        lines.append(f"external MTA {seedlab.EXTERNAL_MTA} -> {name}:25 direct: {direct.code}")
    for port in (25, 587):
        for proxied in mail_via_vip(lab, (port,) * VIP_SESSIONS):
            assert proxied.ok, proxied.text
        lines.append(f"mail client {seedlab.MAIL_CLIENT} -> VIP:{port} x{VIP_SESSIONS}: accepted")
    report("mail", lines)

    seen = {
        name: accepted_from(postfix) - earlier[name] for name, postfix in relays_postfix.items()
    }
    report("what each relay's Postfix recorded (client= of accepted mail)", [
        f"{name}: {dict(clients)}" for name, clients in seen.items()
    ])  # fmt: skip
    for name, clients in seen.items():
        assert clients[seedlab.EXTERNAL_MTA] >= 1, (name, clients)
        assert seedlab.PROXY_LAN not in clients, (name, clients)
    proxied_total = sum(clients[seedlab.MAIL_CLIENT] for clients in seen.values())
    assert proxied_total == 2 * VIP_SESSIONS
    assert sum(1 for clients in seen.values() if clients[seedlab.MAIL_CLIENT]) >= 2, seen

    marks = salt_cli.run("relayroute.flows", "mark_mask=0xff", "port=25", minion_tgt="relay*")
    lines = []
    for minion, flows in sorted(marks.data.items()):
        for flow in flows:
            if "src=203.0.113." in flow:
                lines.append(f"{minion}: {flow}")
                if f"src={seedlab.EXTERNAL_MTA} " in flow:
                    assert flow.endswith("mark=0"), flow
                if f"src={seedlab.MAIL_CLIENT} " in flow:
                    assert flow.endswith("mark=254"), flow
    report("conntrack on the relays (relayroute.flows)", lines)
    assert any("mark=254" in line for line in lines)
    assert any("mark=0" in line for line in lines)


def test_relays_see_the_real_client_so_relaying_rules_hold(applied, lab, relays_postfix):
    client = lab.ns("client")
    outsider = send_mail(
        client, seedlab.VIP, 25, rcpt_to="someone@example.org", local_interface=OUTSIDER
    )
    assert not outsider.ok
    assert outsider.code in (454, 554), outsider.text
    assert "Relay access denied" in outsider.text
    allowed = send_mail(
        client, seedlab.VIP, 25, rcpt_to="someone@example.org", local_interface=seedlab.MAIL_CLIENT
    )
    assert allowed.ok, allowed.text
    report("relaying through the VIP", [
        f"{OUTSIDER} (outside mynetworks) -> someone@example.org: {outsider.code}",
        f"{seedlab.MAIL_CLIENT} (in mynetworks) -> someone@example.org: {allowed.code}",
    ])  # fmt: skip


def test_controls_without_relayroute_one_path_always_breaks(applied, lab, salt_cli):
    """The seed's problem, shown in the same lab with relayroute removed from the relays."""
    client = lab.ns("client")
    relay = lab.ns("relay1")
    relay_address = lab.relay_addresses["relay1"]
    clean = salt_cli.run("state.apply", "relayroute.relay.clean", minion_tgt="relay*")
    assert clean.returncode == 0, clean.stdout
    try:
        # Default route via the gateway: sessions through the VIP break.
        vip = [
            send_mail(client, seedlab.VIP, 25, local_interface=seedlab.MAIL_CLIENT, timeout=4)
            for _ in range(3)
        ]
        assert not any(result.ok for result in vip)
        # Default route via master-relay: direct sessions break.
        relay.ip(f"route replace default via {seedlab.PROXY_LAN}")
        direct = send_mail(
            client, relay_address, 25, local_interface=seedlab.EXTERNAL_MTA, timeout=4
        )
        assert not direct.ok
        report("controls without relayroute", [
            "default via gateway: 3 of 3 sessions through the VIP failed",
            "default via master-relay: the direct session to relay1 failed",
        ])  # fmt: skip
    finally:
        relay.ip(f"route replace default via {seedlab.GATEWAY}")
        again = salt_cli.run("state.highstate", minion_tgt="relay*", _timeout=300)
        assert again.returncode == 0, again.stdout
    after = send_mail(client, seedlab.VIP, 25, local_interface=seedlab.MAIL_CLIENT)
    assert after.ok, after.text
