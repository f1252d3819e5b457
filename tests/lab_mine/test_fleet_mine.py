"""
Issue 12 in the lab: the fleet from the Salt mine. The pillar names no relay
(``relays_from_mine: true``) and no proxy MAC (``mine: {enabled: true}``);
every minion publishes its relayroute record (``mine_functions``).

1. Adding a relay: start its minion (grain ``roles: [relay]``), highstate it,
   highstate the proxy. HAProxy gets it as a backend, mail flows to it through
   the VIP and directly. Pillar diff: none.
2. Adding an HAProxy box: its pillar entry (address, VIP, mark, table: policy,
   no MAC), highstate it, highstate the relays. The relays mark its MAC from
   the mine; mail flows through its VIP with the client's own address, and the
   old VIP still works. Pillar diff: that entry.
3. Stale data: a relay whose minion is gone (its record older than
   ``mine:max_age``) leaves HAProxy's backends at the proxy's next highstate,
   and a warning state of that highstate names it. A proxy box whose minion
   is gone: the relays take no MAC from its stale record (their neighbour
   table gives it, as without the mine), and their highstate warns of it.
   Deleting a gone minion's key takes its record out of ``mine.get`` at once.

The tests run in this order, each from where the one before left the lab.
Run with ``-s`` to see the report (the pillar diffs among it).
"""

import copy
import time

import pytest

from tests.lab_mine.conftest import PROXY2, VIP2, pillar_diff, servers
from tests.support import seedlab
from tests.support.netns import mac_of
from tests.support.postfix import wait_for_messages
from tests.support.seedlab import mail_direct, report
from tests.support.smtp import send_mail

pytestmark = [pytest.mark.lab, pytest.mark.root]

PORTS = (25, 587)
VIP_SESSIONS = 4  # per port: leastconn takes turns among idle servers
PROXY_MARK, PROXY2_MARK = 254, 253
# Test 3's windows: mine:max_age there, and how old the gone minions' records
# are (at least) when a highstate reads the mine: 30 s beyond it. The live
# minions republish just before each highstate, which reads the mine while it
# renders: in this lab 12-15 s after, at most, on a loaded machine (the whole
# highstate), so their records are half MAX_AGE old or less.
MAX_AGE = 30
STALE_AGE = 60
TRIES = 9  # sessions through the VIP, per port, until one lands on the new relay


def via(lab, vip, port, timeout=20):
    """One message from the mail client through ``vip`` to an outside domain."""
    return send_mail(
        lab.ns("client"),
        vip,
        port,
        rcpt_to="someone@example.org",
        local_interface=seedlab.MAIL_CLIENT,
        timeout=timeout,
    )


def located(relays_postfix, sent):
    """``{queue id: (relay, client)}`` of ``sent`` (queue ids), every one found."""
    logged = wait_for_messages(relays_postfix, sent)
    assert set(logged) == set(sent), sorted(set(sent) - set(logged))
    return logged


def backends(cfg_text):
    """``{backend: [server names]}`` of relayroute's backends."""
    return {
        name: sorted(server for server, _address in found)
        for name, found in servers(cfg_text).items()
    }


def marked(fleet, relays):
    """``{relay: {mark: [mac]}}`` as ``relayroute.marked_macs`` reads each relay's rules."""
    data = fleet.call("relayroute.marked_macs", tgt=relays)
    assert sorted(data) == sorted(relays), data
    return {relay: {int(mark): macs for mark, macs in by.items()} for relay, by in data.items()}


def relay_state_macs(fleet, relays):
    """
    ``{relay: {proxy: [mac]}}``: the MACs each relay's rendered relay_present
    state gets per proxy (``mac``, or ``macs`` for more than one; none when
    the relay would look the proxy up in its neighbour table).
    """
    data = fleet.call("state.show_sls", "relayroute", tgt=relays)
    found = {}
    for relay in relays:
        state = data[relay]["relayroute-relay-policy-routing"]["relayroute"]
        (proxies,) = [arg["proxies"] for arg in state if isinstance(arg, dict) and "proxies" in arg]
        found[relay] = {
            name: entry.get("macs") or ([entry["mac"]] if entry.get("mac") else [])
            for name, entry in proxies.items()
        }
    return found


def mail_through(lab, relays_postfix, vip, sessions=VIP_SESSIONS):
    """``sessions`` messages per port through ``vip``: ``{queue id: (relay, client)}``."""
    sent = []
    for port in PORTS:
        for _ in range(sessions):
            result = via(lab, vip, port)
            assert result.ok, (vip, port, result.text)
            sent.append(result.queue_id)
    logged = located(relays_postfix, sent)
    # The real client's address, never the proxy's.
    assert {client for _relay, client in logged.values()} == {seedlab.MAIL_CLIENT}, logged
    return logged


def changed_counts(results):
    """``relay1: 2 changed, ...`` of a highstate's ``{minion: [states]}``."""
    return ", ".join(
        f"{minion}: {sum(bool(state['changes']) for state in states)} changed"
        for minion, states in results.items()
    )


def mail_direct_to(lab, relays_postfix, names):
    sent = {}
    for name in names:
        result = mail_direct(lab, name)
        assert result.ok, (name, result.text)
        sent[result.queue_id] = name
    logged = located(relays_postfix, sent)
    for queue_id, name in sent.items():
        assert logged[queue_id] == (name, seedlab.EXTERNAL_MTA), (queue_id, logged[queue_id])


def test_adding_a_relay_takes_no_pillar_change(applied, lab, fleet, relays_postfix, haproxies):
    before = fleet.pillar_file()
    config = before["relayroute"]
    assert "relays" not in config, config
    assert not any({"mac", "macs"} & set(entry) for entry in config["proxies"].values()), config
    proxy_mac = lab.proxy_mac()
    first = ["relay1", "relay2"]

    # The relays mark master-relay's MAC, which their states got from the mine.
    rendered = relay_state_macs(fleet, first)
    assert rendered == {relay: {"master-relay": [proxy_mac]} for relay in first}, rendered
    assert marked(fleet, first) == {relay: {PROXY_MARK: [proxy_mac]} for relay in first}
    cfg = backends(lab.haproxy_cfg("master-relay"))
    assert cfg == {f"relayroute-smtp-{port}": first for port in PORTS}, cfg

    logged = mail_through(lab, relays_postfix, seedlab.VIP)
    assert {relay for relay, _client in logged.values()} == set(first), logged
    mail_direct_to(lab, relays_postfix, first)
    lines = [
        f"pillar: no relays, no proxy MAC; relay1/relay2 render master-relay macs {[proxy_mac]}",
        f"master-relay's backends: {cfg}",
        f"VIP {seedlab.VIP} x{VIP_SESSIONS} per port -> "
        f"{sorted({relay for relay, _c in logged.values()})}, client {seedlab.MAIL_CLIENT}",
    ]

    # The new relay: its minion, its highstate, the proxy's highstate.
    started = time.monotonic()
    fleet.start("relay3", ["relay"])
    own = fleet.highstate("relay3")
    assert marked(fleet, ["relay3"]) == {"relay3": {PROXY_MARK: [proxy_mac]}}
    assert relay_state_macs(fleet, ["relay3"]) == {"relay3": {"master-relay": [proxy_mac]}}
    proxied = fleet.highstate("master-relay")
    changed = [s["__id__"] for s in proxied["master-relay"] if s["changes"]]
    assert "relayroute-proxy-haproxy-config" in changed, changed
    cfg = backends(lab.haproxy_cfg("master-relay"))
    assert cfg == {f"relayroute-smtp-{port}": [*first, "relay3"] for port in PORTS}, cfg
    haproxies["master-relay"].reload()
    took = time.monotonic() - started

    # Through the VIP until a session lands on relay3, per port (bounded).
    landed = {}
    for port in PORTS:
        for attempt in range(1, TRIES + 1):
            result = via(lab, seedlab.VIP, port)
            assert result.ok, (port, result.text)
            relay, client = located(relays_postfix, [result.queue_id])[result.queue_id]
            assert client == seedlab.MAIL_CLIENT, (relay, client)
            if relay == "relay3":
                landed[port] = attempt
                break
        assert port in landed, f"VIP:{port}: {TRIES} sessions, none on relay3"
    mail_direct_to(lab, relays_postfix, ["relay3"])

    after = fleet.pillar_file()
    diff = pillar_diff(before, after)
    report("adding a relay (relay3)", [
        *lines,
        f"relay3: minion started, highstate ({sum(bool(s['changes']) for s in own['relay3'])} "
        f"states changed), marks master-relay's MAC {proxy_mac} from the mine",
        f"master-relay: highstate changed {changed}; backends now {cfg}; HAProxy reloaded",
        f"minion start to HAProxy reloaded: {took:.1f} s",
        *(f"VIP:{port} -> relay3 at session {n}, client {seedlab.MAIL_CLIENT}"
          for port, n in landed.items()),
        f"external MTA -> relay3 direct: accepted, client {seedlab.EXTERNAL_MTA}",
        f"pillar diff: {diff or 'none'}",
    ])  # fmt: skip
    assert diff == []


def test_adding_a_haproxy_box_takes_only_its_entry(applied, lab, fleet, relays_postfix, haproxies):
    before = fleet.pillar_file()
    entry = lab.proxy2_entry()
    after = copy.deepcopy(before)
    after["relayroute"]["proxies"][PROXY2] = entry
    fleet.serve_pillar(after)
    diff = pillar_diff(before, after)
    assert diff == [f"+ relayroute:proxies:{PROXY2}: {entry!r}"], diff

    started = time.monotonic()
    fleet.start(PROXY2, ["proxy"])
    fleet.highstate(PROXY2)
    relays = [name for name in fleet.names() if name.startswith("relay")]
    cfg = backends(lab.haproxy_cfg(PROXY2))
    assert cfg == {f"relayroute-smtp-{port}": relays for port in PORTS}, cfg
    haproxies.start(PROXY2)
    results = fleet.highstate(*relays)
    took = time.monotonic() - started

    mac2 = mac_of(lab.ns(PROXY2), "lan0")
    want = {PROXY_MARK: [lab.proxy_mac()], PROXY2_MARK: [mac2]}
    assert marked(fleet, relays) == {relay: want for relay in relays}
    rendered = relay_state_macs(fleet, relays)
    assert rendered == {r: {"master-relay": [lab.proxy_mac()], PROXY2: [mac2]} for r in relays}

    new = mail_through(lab, relays_postfix, VIP2)
    old = mail_through(lab, relays_postfix, seedlab.VIP, sessions=2)
    flows = fleet.call("relayroute.flows", "mark_mask=0xff", "port=25", tgt=relays)
    proxied = [
        flow
        for found in flows.values()
        for flow in found
        if f"src={seedlab.MAIL_CLIENT} " in flow and flow.endswith(f"mark={PROXY2_MARK}")
    ]
    assert proxied, flows
    report("adding an HAProxy box (master-relay2)", [
        f"pillar diff: {diff}",
        f"master-relay2: minion started, highstate; backends {cfg}; HAProxy started",
        f"relays: highstate ({changed_counts(results)})",
        f"minion start to relays applied: {took:.1f} s",
        f"relays mark {want} (master-relay2's MAC from the mine)",
        f"VIP2 {VIP2} x{VIP_SESSIONS} per port -> {sorted({r for r, _c in new.values()})}, "
        f"client {seedlab.MAIL_CLIENT}",
        f"VIP {seedlab.VIP} x2 per port -> {sorted({r for r, _c in old.values()})}",
        f"conntrack, mark {PROXY2_MARK} from the mail client: {len(proxied)} flows on port 25",
    ])  # fmt: skip


def warned(states):
    """``{minion: warning}`` of the stale-record warning states of a highstate's ``states``."""
    found = {}
    for state in states:
        if "-mine-warning-" in state["__id__"]:
            text = state["comment"]
            assert text.startswith("WARNING: mine: "), text
            assert "'s record is " in text, text
            assert text.endswith(f"s old (mine:max_age {MAX_AGE}): ignored"), text
            found[text[len("WARNING: mine: ") :].split("'s record", 1)[0]] = text
    return found


def test_gone_minions_records_go_stale_with_a_warning(
    applied, lab, fleet, relays_postfix, haproxies, master
):
    """
    relay3's minion stops and its host leaves the LAN; master-relay2's
    minion stops (the box keeps serving). Their records stay in the master's
    mine. Once both are STALE_AGE s old, the pillar's ``mine:max_age`` is
    MAX_AGE, and the live minions have just republished: the proxy's
    highstate drops relay3 from HAProxy's backends, the relays' highstate
    takes no MAC from master-relay2's record (its neighbour entry gives the
    MAC, as without the mine), and each highstate names both in warnings.
    """
    gone = ["relay3", PROXY2]
    assert set(gone) <= set(fleet.running), "runs after the tests that start relay3 and PROXY2"
    for name in gone:
        fleet.stop(name)
    lab.ns("relay3").ip("link set lan0 down")
    records = master.salt_run_cli(timeout=60).run(
        "mine.get", ",".join(gone), "relayroute", "tgt_type=list"
    )
    assert records.returncode == 0, records.stdout
    assert sorted(records.data) == sorted(gone), records.stdout
    published = {name: records.data[name]["published"] for name in gone}
    waited = max(0.0, max(published.values()) + STALE_AGE - time.time())
    time.sleep(waited)

    before = fleet.pillar_file()
    after = copy.deepcopy(before)
    after["relayroute"]["mine"]["max_age"] = MAX_AGE
    fleet.serve_pillar(after)
    live = fleet.names()
    fleet.run("mine.update")  # every live minion's record: fresh
    refreshed = time.time()
    proxy_run = fleet.highstate("master-relay")["master-relay"]
    proxy_took = time.time() - refreshed
    proxy_warnings = warned(proxy_run)
    assert sorted(proxy_warnings) == sorted(gone), proxy_warnings
    cfg = backends(lab.haproxy_cfg("master-relay"))
    assert cfg == {f"relayroute-smtp-{port}": ["relay1", "relay2"] for port in PORTS}, cfg
    haproxies["master-relay"].reload()
    logged = mail_through(lab, relays_postfix, seedlab.VIP, sessions=2)
    assert {relay for relay, _c in logged.values()} <= {"relay1", "relay2"}, logged

    relays = [name for name in live if name.startswith("relay")]
    fleet.run("mine.update")
    refreshed = time.time()
    relay_runs = fleet.highstate(*relays)
    relays_took = time.time() - refreshed
    for relay, states in relay_runs.items():
        assert sorted(warned(states)) == sorted(gone), (relay, warned(states))
        changed = [s["__id__"] for s in states if s["changes"]]
        assert changed == [], (relay, changed)
    # master-relay2's MAC is still marked: the neighbour table has it, the box being up.
    mac2 = mac_of(lab.ns(PROXY2), "lan0")
    assert marked(fleet, relays) == {
        relay: {PROXY_MARK: [lab.proxy_mac()], PROXY2_MARK: [mac2]} for relay in relays
    }
    new = mail_through(lab, relays_postfix, VIP2, sessions=1)
    age = {name: time.time() - at for name, at in published.items()}

    # Decommissioning at once: with relay3's key deleted, the master's mine.get
    # no longer matches it (its records need not age past max_age).
    deleted = master.salt_key_cli().run("-d", "relay3", "-y")
    assert deleted.returncode == 0, deleted.stdout
    seen = fleet.call("mine.get", "*", "relayroute", tgt=["master-relay"])["master-relay"]
    assert "relay3" not in seen, sorted(seen)
    assert PROXY2 in seen, sorted(seen)
    title = "gone minions (relay3: minion stopped, host off the LAN; master-relay2: minion stopped)"
    report(title, [
        f"pillar diff: {pillar_diff(before, after)}",
        f"waited {waited:.1f} s for both records to be {STALE_AGE} s old",
        f"master-relay's highstate ended {proxy_took:.1f} s, the relays' {relays_took:.1f} s "
        "after the live minions republished",
        f"records' ages at the end: {', '.join(f'{n} {a:.0f} s' for n, a in age.items())}",
        *(f"master-relay's highstate: {text}" for text in proxy_warnings.values()),
        f"master-relay's backends: {cfg}; HAProxy reloaded; VIP x2 per port -> "
        f"{sorted({r for r, _c in logged.values()})}",
        f"relays' highstate: the same two warnings, nothing changed; they mark {PROXY2_MARK}: "
        f"[{mac2}] (neighbour table); VIP2 x1 per port -> {sorted({r for r, _c in new.values()})}",
        f"salt-key -d relay3: mine.get '*' relayroute on master-relay now names {sorted(seen)}",
    ])  # fmt: skip
