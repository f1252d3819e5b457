"""
The seed's proof in both families, with each backend: after ``state.highstate``
mail reaches every relay directly and through the IPv4 and the IPv6 VIP on 25
and 587; Postfix logs the real client of each family; conntrack on the relays
shows the proxy's mark on proxied flows of both families and 0 on direct ones.
The platform's default backend (nftables on Debian 12: the pillar names none)
runs first, then a pillar edit and a highstate move the lab to iptables
(iptables and ip6tables) and the proof runs again. The controls remove
relayroute from the relays: one path breaks in IPv6 as it does in IPv4.
Run with ``-s`` to see the report.
"""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.hosts import dropped
from tests.support.postfix import wait_for_messages
from tests.support.seedlab import (
    assert_states_succeeded,
    dropped_ipv6,
    mail_direct,
    mail_via_vip,
    report,
    states_of,
)
from tests.support.tcp import NEGATIVE_TIMEOUT

pytestmark = [pytest.mark.lab, pytest.mark.root]

VIP_SESSIONS = 3  # per VIP and port: leastconn spreads them over the relays
PROXY_MARK = 254  # the lab pillar's mark of master-relay


def filter_backend(ns, role="relay"):
    """Which backend holds the ``role``'s packet-filter rules in ``ns``, per family."""
    nft = ns.exec(f"nft list table inet relayroute_{role}", check=False).returncode == 0
    return {
        "nftables": nft,
        "iptables": "RELAYROUTE" in ns.exec("iptables-save -t mangle").stdout,
        "ip6tables": "RELAYROUTE" in ns.exec("ip6tables-save -t mangle").stdout,
    }


@pytest.fixture(scope="package")
def on_backend(applied, lab, set_pillar, salt_cli):
    """
    ``on_backend(name)``: the lab's pillar names ``name`` (None: no backend,
    the platform's default) and a highstate has applied it; nothing is done
    when the lab runs it already. Returns the highstate's results or None.
    """
    current = {"backend": lab.backend}

    def switch(backend):
        if current["backend"] == backend:
            return None
        data = lab.pillar()
        data["relayroute"].pop("backend", None)
        if backend:
            data["relayroute"]["backend"] = backend
        set_pillar(data)
        ret = salt_cli.run("state.highstate", minion_tgt="*", _timeout=300)
        results = states_of(ret, minions=list(lab.roles()))
        assert_states_succeeded(results)
        current["backend"] = backend
        return results

    return switch


@pytest.mark.parametrize(
    ("backend", "holds"),
    [
        pytest.param(None, {"nftables"}, id="default-nftables"),
        pytest.param("iptables", {"iptables", "ip6tables"}, id="iptables"),
    ],
)
def test_mail_in_both_families_direct_and_through_each_vip(
    backend, holds, on_backend, lab, relays_postfix, salt_cli
):
    switched = on_backend(backend)
    if switched:
        report(f"pillar backend: {backend}, highstate", [
            f"{m}: {sum(bool(s['changes']) for s in st)} states changed"
            for m, st in switched.items()
        ])  # fmt: skip
    found = filter_backend(lab.ns("master-relay"), "proxy")
    assert {k for k, present in found.items() if present} == holds, ("master-relay", found)
    for name in lab.relay_addresses:
        found = filter_backend(lab.ns(name))
        assert {k for k, present in found.items() if present} == holds, (name, found)
        # This round's flows only (the previous backend's sessions linger in TIME_WAIT).
        lab.ns(name).exec("conntrack -F", check=False)

    # IPv6 needs no sysctl of the proxy's: the transparent binds (IPV6_TRANSPARENT)
    # need no ip_nonlocal_bind, TPROXY delivers locally (no forwarding, which
    # would make the host ignore router advertisements).
    proxy = lab.ns("master-relay")
    for key in ("net.ipv6.ip_nonlocal_bind", "net.ipv6.conf.all.forwarding"):
        assert proxy.exec(f"sysctl -n {key}").stdout.strip() == "0", key

    sides = list(lab.sides.values())
    assert [side.family for side in sides] == [4, 6]
    lines = []
    sent = {}  # queue id: (the relay that must have it, or None for the VIP's choice, client)
    for side in sides:
        for name in lab.relay_addresses:
            direct = mail_direct(lab, name, side=side)
            assert direct.ok, direct.transcript
            sent[direct.queue_id] = (name, side.external_mta)
            lines.append(f"{side.external_mta} -> {name} [{side.relays[name]}]:25 direct: 250")
        for port in (25, 587):
            for proxied in mail_via_vip(lab, (port,) * VIP_SESSIONS, side=side):
                assert proxied.ok, proxied.transcript
                sent[proxied.queue_id] = (None, side.mail_client)
            lines.append(f"{side.mail_client} -> VIP [{side.vip}]:{port} x{VIP_SESSIONS}: 250")
    report(f"mail ({backend or 'platform default'})", lines)
    assert None not in sent
    assert len(sent) == len(sides) * (len(lab.relay_addresses) + 2 * VIP_SESSIONS)

    logged = wait_for_messages(relays_postfix, sent)
    assert set(logged) == set(sent), {q: sent[q] for q in set(sent) - set(logged)}
    seen = {name: Counter() for name in relays_postfix}
    for name, client in logged.values():
        seen[name][client] += 1
    report("what each relay's Postfix recorded (client= of this test's mail)", [
        f"{name}: {dict(clients)}" for name, clients in seen.items()
    ])  # fmt: skip
    for queue_id, (relay, client) in sent.items():
        # The real client's address of its own family, never the proxy's.
        assert logged[queue_id][1] == client, (queue_id, logged[queue_id], client)
        if relay is not None:
            assert logged[queue_id][0] == relay, (queue_id, logged[queue_id], relay)

    flows = salt_cli.run("relayroute.flows", "mark_mask=0xff", minion_tgt="relay*")
    assert isinstance(flows.data, dict), flows.stdout
    assert sorted(flows.data) == sorted(lab.relay_addresses), flows.stdout
    expected = {side.mail_client: PROXY_MARK for side in sides}
    expected.update({side.external_mta: 0 for side in sides})
    lines, marks = [], {}
    for minion, entries in sorted(flows.data.items()):
        for flow in entries:
            # The flow's original direction: who opened the connection.
            source = flow.split("src=", 1)[1].split()[0]
            if source in expected:
                lines.append(f"{minion}: {flow}")
                mark = int(flow.rsplit("mark=", 1)[1])
                assert mark == expected[source], flow
                marks[source] = mark
    report("conntrack on the relays (relayroute.flows)", lines)
    # Both families, proxied and direct, were seen.
    assert marks == expected, (marks, expected)


def test_controls_without_relayroute_one_path_breaks_in_both_families(
    applied, lab, salt_cli, relays_postfix
):
    """
    The seed's problem in IPv6 as in IPv4, with relayroute removed from the
    relays (as the seed lab's control test does it). Each probe expected to
    fail waits NEGATIVE_TIMEOUT; the same probe succeeds under the other
    default route in the same run.
    """
    gw = lab.ns("gw")
    relays = [lab.ns(name) for name in lab.relay_addresses]
    sides = list(lab.sides.values())

    def concurrently(calls):
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(lambda call: call(), calls))

    def vip_sessions(count, timeout):
        """``count`` sessions through each family's VIP at once: {family: [results]}."""
        calls = [
            (lambda side=side: mail_via_vip(lab, (25,), side=side, timeout=timeout)[0])
            for side in sides
            for _ in range(count)
        ]
        results = concurrently(calls)
        return {side.family: results[i * count : (i + 1) * count] for i, side in enumerate(sides)}

    def direct(timeout):
        return dict(
            zip(
                [side.family for side in sides],
                concurrently(
                    [
                        (lambda side=side: mail_direct(lab, "relay1", timeout=timeout, side=side))
                        for side in sides
                    ]
                ),
            )
        )

    def set_default_routes(router_of):
        for relay in relays:
            for side in sides:
                relay.ip(f"-{side.family} route replace default via {router_of(side)}")

    clean = salt_cli.run("state.apply", "relayroute.relay.clean", minion_tgt="relay*")
    assert_states_succeeded(states_of(clean, minions=lab.relay_addresses))
    try:
        for relay in relays:
            found = filter_backend(relay)
            assert not any(found.values()), (relay.name, found)
        # Default routes via the gateway: sessions through either VIP break
        # (the relays' SYN-ACKs reach the gateway, which never saw the
        # connections begin, and drops them); direct sessions work.
        drops = {4: dropped(gw), 6: dropped_ipv6(gw)}
        vip = vip_sessions(3, NEGATIVE_TIMEOUT)
        drops = {4: dropped(gw) - drops[4], 6: dropped_ipv6(gw) - drops[6]}
        for family, results in vip.items():
            # Not even a banner: broken, not refused.
            assert [r.code for r in results] == [None] * 3, [r.transcript for r in results]
            assert drops[family] > 0, drops
        working_direct = direct(20)
        assert all(r.ok for r in working_direct.values()), working_direct
        # Default routes via master-relay: direct sessions break; through
        # either VIP they work.
        set_default_routes(lambda side: side.proxy_lan)
        broken = direct(NEGATIVE_TIMEOUT)
        assert all(r.code is None for r in broken.values()), [r.transcript for r in broken.values()]
        working = vip_sessions(3, 20)
        assert all(r.ok for results in working.values() for r in results), working
        report("controls without relayroute", [
            f"IPv{family}: default via gateway: 3 of 3 sessions through the VIP failed within "
            f"{NEGATIVE_TIMEOUT:g} s ({drops[family]} packets dropped by gw), direct to relay1 "
            f"{working_direct[family].code}; default via master-relay: direct to relay1 failed "
            f"within {NEGATIVE_TIMEOUT:g} s, 3 of 3 through the VIP "
            f"{[r.code for r in working[family]]}"
            for family in (side.family for side in sides)
        ])  # fmt: skip
    finally:
        set_default_routes(lambda side: side.gateway)
        again = salt_cli.run("state.highstate", minion_tgt="relay*", _timeout=300)
        assert_states_succeeded(states_of(again, minions=lab.relay_addresses))
    for side in sides:
        after = mail_via_vip(lab, (25,), side=side)[0]
        assert after.ok, after.transcript
        after_direct = mail_direct(lab, "relay1", side=side)
        assert after_direct.ok, after_direct.transcript
