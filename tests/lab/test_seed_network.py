"""
The formula end to end in the seed's network: a salt-master, one minion per
Salt-managed host, ``state.highstate``, real HAProxy, real Postfix and swaks.
Run with ``-s`` (as ``scripts/demo`` does) to see the report.
"""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import seedlab
from tests.support.hosts import dropped
from tests.support.postfix import wait_for_messages
from tests.support.seedlab import (
    OUTSIDER,
    assert_states_succeeded,
    mail_direct,
    mail_via_vip,
    report,
    states_of,
)
from tests.support.smtp import send_mail
from tests.support.tcp import NEGATIVE_TIMEOUT

pytestmark = [pytest.mark.lab, pytest.mark.root]

VIP_SESSIONS = 6  # per port


def test_second_highstate_reports_no_changes(applied, lab, salt_cli):
    second = salt_cli.run("state.highstate", minion_tgt="*", _timeout=300)
    results = states_of(second, minions=["master-relay", *lab.relay_addresses])
    assert_states_succeeded(results)
    changed = {
        minion: [s["__id__"] for s in states if s["changes"]] for minion, states in results.items()
    }
    report("second highstate", [f"{m}: changed {ids or 'nothing'}" for m, ids in changed.items()])
    assert all(not ids for ids in changed.values()), changed
    # Targeting the role by grain works too, and is just as quiet.
    by_grain = salt_cli.run("-G", "state.apply", "relayroute", minion_tgt="roles:relay")
    results = states_of(by_grain, minions=lab.relay_addresses)
    assert_states_succeeded(results)
    for minion, states in results.items():
        assert not [s["__id__"] for s in states if s["changes"]], (minion, states)


def test_direct_and_proxied_mail_both_work(applied, lab, relays_postfix, salt_cli):
    lines = []
    sent = {}  # queue id: (the relay that must have it, or None for the VIP's choice, client)
    for name in lab.relay_addresses:
        direct = mail_direct(lab, name)
        assert direct.ok, direct.text
        sent[direct.queue_id] = (name, seedlab.EXTERNAL_MTA)
        lines.append(f"external MTA {seedlab.EXTERNAL_MTA} -> {name}:25 direct: {direct.code}")
    for port in (25, 587):
        for proxied in mail_via_vip(lab, (port,) * VIP_SESSIONS):
            assert proxied.ok, proxied.text
            sent[proxied.queue_id] = (None, seedlab.MAIL_CLIENT)
        lines.append(f"mail client {seedlab.MAIL_CLIENT} -> VIP:{port} x{VIP_SESSIONS}: accepted")
    report("mail", lines)
    assert None not in sent
    assert len(sent) == len(lab.relay_addresses) + 2 * VIP_SESSIONS

    # Each message, in the log of the relay that took it, with the client it
    # came from (the log is written after the reply: wait for every line).
    logged = wait_for_messages(relays_postfix, sent)
    assert set(logged) == set(sent), {q: sent[q] for q in set(sent) - set(logged)}
    seen = {name: Counter() for name in relays_postfix}
    for name, client in logged.values():
        seen[name][client] += 1
    report("what each relay's Postfix recorded (client= of this test's mail)", [
        f"{name}: {dict(clients)}" for name, clients in seen.items()
    ])  # fmt: skip
    for queue_id, (relay, client) in sent.items():
        # The real client's address, never the proxy's.
        assert logged[queue_id][1] == client, (queue_id, logged[queue_id], client)
        if relay is not None:
            assert logged[queue_id][0] == relay, (queue_id, logged[queue_id], relay)
    assert sum(1 for clients in seen.values() if clients[seedlab.MAIL_CLIENT]) >= 2, seen

    marks = salt_cli.run("relayroute.flows", "mark_mask=0xff", "port=25", minion_tgt="relay*")
    assert isinstance(marks.data, dict), marks.stdout
    assert sorted(marks.data) == sorted(lab.relay_addresses), marks.stdout
    lines = []
    for minion, flows in sorted(marks.data.items()):
        for flow in flows:
            # The flow's original direction: who opened the connection (a flow
            # conntrack picked up mid-stream from a relay's side, a leftover of
            # another test's dead session, has the relay as its source).
            source = flow.split("src=", 1)[1].split()[0]
            if source.startswith("203.0.113."):
                lines.append(f"{minion}: {flow}")
                if source == seedlab.EXTERNAL_MTA:
                    assert flow.endswith("mark=0"), flow
                if source == seedlab.MAIL_CLIENT:
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
    """
    The seed's problem, shown in the same lab with relayroute removed from the
    relays. Each probe expected to fail waits NEGATIVE_TIMEOUT (a loaded
    machine is slow, not broken), and the same probe succeeds under the other
    default route in the same run.
    """
    client, gw = lab.ns("client"), lab.ns("gw")
    relays = [lab.ns(name) for name in lab.relay_addresses]

    def vip_sessions(count, timeout):
        with ThreadPoolExecutor(count) as pool:
            return list(
                pool.map(
                    lambda _: send_mail(
                        client,
                        seedlab.VIP,
                        25,
                        rcpt_to="someone@example.org",
                        local_interface=seedlab.MAIL_CLIENT,
                        timeout=timeout,
                    ),
                    range(count),
                )
            )

    clean = salt_cli.run("state.apply", "relayroute.relay.clean", minion_tgt="relay*")
    assert_states_succeeded(states_of(clean, minions=lab.relay_addresses))
    try:
        # Default route via the gateway: sessions through the VIP break (the
        # relays' SYN-ACKs reach the gateway, which never saw the connections
        # begin, and drops them); the direct session works.
        drops = dropped(gw)
        vip = vip_sessions(3, NEGATIVE_TIMEOUT)
        # Not even a banner: broken, not refused.
        assert [result.code for result in vip] == [None] * 3, [r.transcript for r in vip]
        vip_drops = dropped(gw) - drops
        assert vip_drops > 0
        direct = mail_direct(lab, "relay1")
        assert direct.ok, direct.text
        # Default route via master-relay: direct sessions break; through the
        # VIP they work.
        for relay in relays:
            relay.ip(f"route replace default via {seedlab.PROXY_LAN}")
        broken = mail_direct(lab, "relay1", timeout=NEGATIVE_TIMEOUT)
        assert broken.code is None, broken.transcript
        working = vip_sessions(3, 20)
        assert all(result.ok for result in working), [result.text for result in working]
        report("controls without relayroute", [
            f"default via gateway: 3 of 3 sessions through the VIP failed within "
            f"{NEGATIVE_TIMEOUT:g} s ({vip_drops} packets dropped by gw); direct to relay1: "
            f"{direct.code}",
            f"default via master-relay: the direct session to relay1 failed within "
            f"{NEGATIVE_TIMEOUT:g} s; 3 of 3 through the VIP: {[r.code for r in working]}",
        ])  # fmt: skip
    finally:
        for relay in relays:
            relay.ip(f"route replace default via {seedlab.GATEWAY}")
        again = salt_cli.run("state.highstate", minion_tgt="relay*", _timeout=300)
        assert_states_succeeded(states_of(again, minions=lab.relay_addresses))
    after = send_mail(client, seedlab.VIP, 25, local_interface=seedlab.MAIL_CLIENT)
    assert after.ok, after.text
    after_direct = mail_direct(lab, "relay1")
    assert after_direct.ok, after_direct.text
