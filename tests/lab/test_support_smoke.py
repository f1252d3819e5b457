"""
Smoke test of the lab helpers: real Postfix, HAProxy and swaks in namespaces.

    client 203.0.113.10 (+ .20, outside mynetworks)
       | veth
    proxy 203.0.113.1 / 192.0.2.2   ip_forward=1, HAProxy 203.0.113.1:25 -> 192.0.2.11:25
       | veth
    relay 192.0.2.11                Postfix on :25 and :587
"""

import pytest

from tests.support.haproxy import HAProxyProcess
from tests.support.haproxy import check as haproxy_check
from tests.support.netns import run, veth
from tests.support.postfix import PostfixInstance, wait_for_messages
from tests.support.smtp import send_mail

pytestmark = [pytest.mark.lab, pytest.mark.root]

CLIENT, OUTSIDER, PROXY_FRONT = "203.0.113.10", "203.0.113.20", "203.0.113.1"
PROXY_BACK, RELAY = "192.0.2.2", "192.0.2.11"
RELAY_HOST = "relay.example.net"

HAPROXY_CFG = f"""\
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend smtp_in
    bind {PROXY_FRONT}:25
    default_backend relay

backend relay
    server relay1 {RELAY}:25
"""


@pytest.fixture
def lab(make_netns):
    client, proxy, relay = make_netns("client"), make_netns("proxy"), make_netns("relay")
    veth(client, "c0", proxy, "p0")
    veth(proxy, "p1", relay, "r0")
    client.ip(f"addr add {CLIENT}/24 dev c0")
    client.ip(f"addr add {OUTSIDER}/24 dev c0")
    client.ip(f"route add default via {PROXY_FRONT}")
    proxy.ip(f"addr add {PROXY_FRONT}/24 dev p0")
    proxy.ip(f"addr add {PROXY_BACK}/24 dev p1")
    proxy.sysctl("net.ipv4.ip_forward", 1)
    relay.ip(f"addr add {RELAY}/24 dev r0")
    relay.ip(f"route add default via {PROXY_BACK}")
    return client, proxy, relay


@pytest.fixture
def postfix(lab, tmp_path):
    relay = lab[2]
    instance = PostfixInstance(
        relay,
        tmp_path,
        myhostname=RELAY_HOST,
        inet_interfaces=[RELAY],
        mynetworks=["127.0.0.0/8", f"{CLIENT}/32", f"{PROXY_BACK}/32"],
    )
    try:
        yield instance.start()
    finally:
        instance.stop()


@pytest.fixture
def haproxy(lab, tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG)
    process = HAProxyProcess(lab[1], cfg)
    try:
        yield process.start()
    finally:
        process.stop()


def test_postfix_haproxy_swaks_in_namespaces(lab, postfix, haproxy, tmp_path):
    client, _proxy, relay = lab

    direct = send_mail(client, RELAY, 25, "a@example.com", "someone@example.org",
                       local_interface=CLIENT)  # fmt: skip
    assert direct.ok, direct.transcript
    assert direct.code == 250
    assert direct.queue_id

    proxied = send_mail(client, PROXY_FRONT, 25, "b@example.com", "someone@example.org",
                        local_interface=CLIENT)  # fmt: skip
    assert proxied.ok, proxied.transcript

    submission = send_mail(client, RELAY, 587, "c@example.com", f"postmaster@{RELAY_HOST}")
    assert submission.ok, submission.transcript

    # The log is written after the replies (postlogd): wait for each message's line.
    logged = wait_for_messages({"relay": postfix}, [direct.queue_id, proxied.queue_id])
    assert logged == {direct.queue_id: ("relay", CLIENT), proxied.queue_id: ("relay", PROXY_BACK)}
    seen = postfix.client_ips_seen()
    assert CLIENT in seen
    assert PROXY_BACK in seen

    # Not in mynetworks: no relaying, but mail for the relay itself is taken.
    refused = send_mail(client, RELAY, 25, "d@example.com", "someone@example.org",
                        local_interface=OUTSIDER)  # fmt: skip
    assert not refused.ok
    assert refused.code in (454, 554), refused.transcript
    assert "Relay access denied" in refused.text
    local = send_mail(client, RELAY, 25, "e@example.com", f"postmaster@{RELAY_HOST}",
                      local_interface=OUTSIDER)  # fmt: skip
    assert local.ok, local.transcript
    assert wait_for_messages({"relay": postfix}, [local.queue_id]) == {
        local.queue_id: ("relay", OUTSIDER)
    }
    assert OUTSIDER in postfix.client_ips_seen()

    # Four messages accepted (the queue files are written before the 250), all
    # still queued: each message's delivery attempt is logged as deferred
    # (nothing leaves the lab), so no "status=sent" can still be on its way.
    accepted = [direct.queue_id, proxied.queue_id, submission.queue_id, local.queue_id]
    assert postfix.queue_ids() == sorted(accepted)
    assert postfix.accepted_count() == 4
    statuses = postfix.wait_for_statuses(accepted)
    assert statuses == {queue_id: ["deferred"] for queue_id in accepted}, statuses
    assert "status=sent" not in postfix.log_text()

    # HAProxy: configuration check and a live reload that keeps serving.
    assert haproxy.check()[0]
    broken = tmp_path / "broken.cfg"
    broken.write_text("frontend x\n    bind 203.0.113.1:bad\n")
    ok, output = haproxy_check(broken)
    assert not ok
    assert output
    old_workers = haproxy.workers()
    new_workers = haproxy.reload()
    assert new_workers
    assert not set(new_workers) & set(old_workers)
    again = send_mail(client, PROXY_FRONT, 25, "f@example.com", f"postmaster@{RELAY_HOST}")
    assert again.ok, again.transcript

    # Stopping leaves nothing running in the relay and proxy namespaces.
    postfix.stop()
    haproxy.stop()
    for ns in (relay, lab[1]):
        assert run(["ip", "netns", "pids", ns.name]).stdout.split() == []
