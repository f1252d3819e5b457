"""
master-relay's MAC changes (a NIC replaced, a VM moved) while the relays
discover it (the lab's pillar gives master-relay no ``mac``), with mail flowing.
The change is made as it happens: lan0 takes a new MAC and announces it with a
gratuitous ARP, which moves every neighbour entry of master-relay's address.

- The control, without the beacon: the relays' rules still mark the old MAC, so
  a new proxied session is not marked, its reply leaves by the gateway and is
  dropped there. The proxied path is dead.
- With the beacon (pillar ``beacons: relayroute``, as pillar.example) and the
  formula's reactor on the master, no operator: each relay's beacon sees the
  neighbour entry at a MAC its rules do not mark, the reactor applies relayroute
  on that relay, which looks the MAC up again. Reported: N, the seconds from the
  announcement until every relay marks the new MAC (and only it); new proxied
  sessions through the VIP on both ports succeed afterwards. Sessions held
  through the VIP across the change, sending a NOOP every 0.3 s, live: their
  connmark was set when they began, and their replies follow the neighbour
  entry. Then back to the old MAC, followed the same way.
"""

import random
import time

import pytest

from tests.lab import filters
from tests.lab.test_live_safety import noop_tolerant_postfix  # noqa: F401 - a fixture
from tests.lab.test_watch import probe_proxied
from tests.support import seedlab
from tests.support.arp import send_garp
from tests.support.netns import mac_of
from tests.support.seedlab import mail_via_vip, report
from tests.support.smtphold import HeldSmtpSessions
from tests.support.tcp import NEGATIVE_TIMEOUT

pytestmark = [pytest.mark.lab, pytest.mark.root]

# The beacon as pillar.example configures it.
BEACON = {"relayroute": [{"interval": 5}, {"refire": 60}]}
# N is about the beacon's interval plus one relayroute apply per relay (three
# at once on 2 cores); the relays are watched for FOLLOW_WAIT s at most.
FOLLOW_WAIT = 120.0
INTERVAL, REPLY_BOUND = 0.3, 3.0
# The longest a session is held: opening, the change, FOLLOW_WAIT, the probes
# and mail afterwards; HAProxy's idle timers (10 m) and Postfix's (300 s,
# never reached: a NOOP every 0.3 s) are wider.
HELD_WINDOW_MAX = 60 + FOLLOW_WAIT + 60


def marked(lab, relay):
    """The MACs relay's rules mark (lower case), from its packet filter (either backend)."""
    return filters.marked_macs(lab.ns(relay))


def change_mac(lab, mac):
    """master-relay's lan0 takes ``mac`` and announces its address with it. Returns the time."""
    proxy = lab.ns("master-relay")
    proxy.ip(f"link set lan0 address {mac}")
    time.sleep(1.1)  # neighbours ignore an update within locktime (1 s) of the last one
    send_garp(proxy, "lan0", lab.proxy_address)
    return time.monotonic()


def wait_followed(lab, mac, since):
    """Seconds from ``since`` until each relay marks ``mac`` and nothing else."""
    followed = {}
    deadline = since + FOLLOW_WAIT
    while len(followed) < len(lab.relay_addresses) and time.monotonic() < deadline:
        for relay in lab.relay_addresses:
            if relay not in followed and marked(lab, relay) == [mac]:
                followed[relay] = round(time.monotonic() - since, 2)
        time.sleep(0.25)
    return followed


def held_spec():
    """12 sessions through the VIP, both ports (HAProxy spreads them over the relays)."""
    return [
        {
            "server": seedlab.VIP,
            "port": 25 if i % 2 else 587,
            "source": seedlab.MAIL_CLIENT,
            "rcpt": "someone@example.org",
            "path": "vip",
        }
        for i in range(12)
    ]


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("noop_tolerant_postfix")
def test_relays_follow_a_new_proxy_mac_through_the_beacon_and_reactor(
    applied, lab, set_pillar, pillar_data, salt_cli
):
    timeouts = applied["haproxy"].timeouts()
    assert min(timeouts["client"], timeouts["server"]) > HELD_WINDOW_MAX, timeouts
    old = mac_of(lab.ns("master-relay"), "lan0")
    new = f"02:52:c0:00:02:{random.randrange(0x10, 0xF0):02x}"
    assert all(marked(lab, relay) == [old] for relay in lab.relay_addresses)
    figures = {}
    try:
        # The control: no beacon; the proxied path stays dead.
        change_mac(lab, new)
        dead = probe_proxied(lab, NEGATIVE_TIMEOUT)
        figures["control: new proxied session to relay1"] = dead
        assert not dead["ok"], dead
        assert all(marked(lab, relay) == [old] for relay in lab.relay_addresses)
        change_mac(lab, old)
        assert probe_proxied(lab, 20)["ok"]

        # With the beacon and the reactor.
        set_pillar({**pillar_data, "beacons": BEACON})
        listed = salt_cli.run("beacons.list", "return_yaml=False", minion_tgt="relay1")
        assert "relayroute" in listed.data, listed.stdout
        time.sleep(6)  # a first look at the old MAC, which is marked: nothing fires
        assert all(marked(lab, relay) == [old] for relay in lab.relay_addresses)
        held = HeldSmtpSessions(lab.ns("client"), held_spec(), interval=INTERVAL, bound=REPLY_BOUND)
        try:
            assert held.held == len(held.sessions), held.opened
            held.window("the MAC changes")
            announced = change_mac(lab, new)
            followed = wait_followed(lab, new, announced)
            probe = probe_proxied(lab, 20)
            vip = mail_via_vip(lab, (25, 587) * 3)
            held.window("after")
            time.sleep(1.0)
        finally:
            results = held.finish()
            held.close()
        lost = [r for r in results if r and r["stage"] == "noop"]
        figures.update(
            {
                "seconds until each relay marked the new MAC": followed,
                "new proxied session to relay1 after": probe,
                "mail through the VIP after (25, 587) x3": [m.ok for m in vip],
                "held sessions": len(results),
                "lost": len(lost),
                "lost detail": [(r.get("window"), r.get("error", "")[:60]) for r in lost][:6],
                "completed": sum(1 for r in results if r and r["ok"]),
            }
        )

        # And back: the beacon follows the old MAC again.
        back_at = change_mac(lab, old)
        figures["seconds until each relay marked the old MAC again"] = wait_followed(
            lab, old, back_at
        )
    finally:
        if mac_of(lab.ns("master-relay"), "lan0") != old:
            change_mac(lab, old)
        set_pillar(pillar_data)
    report("a proxy's MAC changes", [f"{k}: {v}" for k, v in figures.items()])

    assert sorted(followed) == sorted(lab.relay_addresses), figures
    assert probe["ok"], figures
    assert all(m.ok for m in vip), [m.text for m in vip if not m.ok]
    assert not lost, figures
    assert figures["completed"] == len(held_spec()), figures
    back = figures["seconds until each relay marked the old MAC again"]
    assert sorted(back) == sorted(lab.relay_addresses), figures
