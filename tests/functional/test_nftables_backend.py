"""
The nftables backend on the real kernel, through Salt's loaders: relayroute's
own ``table inet relayroute_<role>``, real TCP traffic through namespaces, the
mask honoured in the packet mark and the connmark, other tools' tables left
byte for byte, rollback, the TPROXY divert, the boot restore and ``test=True``.
"""

import re
import sys
import time

import pytest

from tests.functional.test_relay import ARGS, MAC, PROXIES, SECOND
from tests.support import spawns
from tests.support.hosts import (
    DIRECT,
    FOREIGN_MANGLE,
    PROXIED,
    RELAY,
    count_forwarded,
    dropped,
    forwarded,
)
from tests.support.netns import mac_of, veth
from tests.support.tcp import Ticker, connect, transparent_server

pytestmark = [pytest.mark.root, pytest.mark.slow]

NFT = {"backend": "nftables"}
TABLE = "inet relayroute_relay"

# Another tool's nftables table with its own use of both marks: it sets bit
# 0x10000 of the packet mark and bit 0x1000000 of the connmark before
# relayroute's chains run (priority mangle - 10), and counts, after them
# (mangle + 10), the packets whose mark holds its bit and relayroute's value.
OTHER_TOOL = """\
table inet othertool {
	chain pre_early {
		type filter hook prerouting priority mangle - 10; policy accept;
		meta mark set meta mark | 0x00010000
		ct mark set ct mark | 0x01000000
	}
	chain out_early {
		type route hook output priority mangle - 10; policy accept;
		meta mark set meta mark | 0x00010000
	}
	chain pre_late {
		type filter hook prerouting priority mangle + 10; policy accept;
		tcp dport 25 meta mark 0x000100fe counter comment "proxied in"
		tcp dport 25 meta mark 0x00010000 counter comment "direct in"
	}
	chain out_late {
		type route hook output priority mangle + 10; policy accept;
		tcp sport 25 meta mark 0x000100fe counter comment "proxied out"
		tcp sport 25 meta mark 0x00010000 counter comment "direct out"
	}
}
"""


def nft(ns, args, check=True, input=None):  # noqa: A002
    return ns.exec(["nft", *args.split()], check=check, input=input)


def our_table(ns):
    """``nft list table inet relayroute_relay``, or None when there is none."""
    proc = nft(ns, f"list table {TABLE}", check=False)
    return proc.stdout if proc.returncode == 0 else None


def snapshot(ns):
    """The namespace's rules, routes, iptables ruleset and whole nftables ruleset."""
    return {**ns.snapshot(), "nft": nft(ns, "list ruleset").stdout}


def counters(ns, table="inet othertool"):
    """``{comment: packets}`` of the counters in ``table``."""
    text = nft(ns, f"list table {table}").stdout
    return {
        comment: int(packets)
        for packets, comment in re.findall(
            r'counter packets (\d+) bytes \d+ comment "([^"]+)"', text
        )
    }


def loaded(loaders, suffix):
    """The engine's sub-module as Salt's loader loaded it."""
    loaders.modules.relayroute.show()
    return next(
        mod
        for name, mod in sys.modules.items()
        if name.endswith(f".relayroute_core.{suffix}") and mod is not None
    )


def relay_args(net):
    proxy = {**PROXIES["master-relay"], "mac": mac_of(net["proxy"], "lan0")}
    return {"lan_networks": ["192.0.2.0/24"], "mark_mask": 0xFF, "proxies": {"m": proxy}}


def test_replies_leave_by_the_way_they_came_and_a_second_apply_is_a_no_op(
    loaders, net, monkeypatch
):
    relay, client = net["relay"], net["client"]
    # Control: without relayroute the proxied client gets no answer.
    assert connect(client, RELAY, 25, PROXIED, timeout=4) is None
    with relay.entered():
        ret = loaders.states.relayroute.relay_present(name="r", **NFT, **relay_args(net))
    assert ret.result is True, ret.comment
    assert set(ret.changes) == {"routes", "rules", "nftables"}
    assert ret.changes["nftables"]["old"] == []
    assert f"add table {TABLE}" in ret.changes["nftables"]["new"]
    assert connect(client, RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    assert connect(client, RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    listing = relay.exec("conntrack -L -p tcp --dport 25").stdout.splitlines()
    assert any(f"src={PROXIED}" in line and "mark=254" in line for line in listing), listing
    assert any(f"src={DIRECT}" in line and "mark=0" in line for line in listing), listing
    # Nothing of relayroute's in iptables' tables: the backend is nftables alone.
    assert "RELAYROUTE" not in relay.exec("iptables-save").stdout
    assert "type route hook output priority mangle - 1" in our_table(relay)

    # A second apply reads, finds nothing to do and writes no transaction.
    with relay.entered():
        backend = loaded(loaders, "nftables")

        def no_transaction(payload):
            raise AssertionError(f"a no-op wrote a transaction:\n{payload}")

        monkeypatch.setattr(backend, "apply", no_transaction)
        again = loaders.modules.relayroute.relay_apply(**NFT, **relay_args(net))
        assert again == {"changes": {}}
        monkeypatch.undo()
        assert loaders.modules.relayroute.marked_macs(backend="nftables") == {
            254: [mac_of(net["proxy"], "lan0")]
        }
        gone = loaders.states.relayroute.relay_absent(name="r", **NFT)
    assert gone.result is True
    assert our_table(relay) is None
    assert connect(client, RELAY, 25, PROXIED, timeout=4) is None


def test_other_users_bits_survive_in_the_packet_mark_and_the_connmark(loaders, net):
    relay = net["relay"]
    nft(relay, "-f -", input=OTHER_TOOL)
    # iptables-nft's mangle PREROUTING (priority mangle, -150) runs after
    # relayroute's chain (mangle - 1): it sees the packet mark relayroute set.
    relay.exec(
        ["iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "--dport", "25"]
        + ["-m", "mark", "--mark", "0x100fe", "-m", "comment", "--comment", "after relayroute"]
    )
    with relay.entered():
        ret = loaders.modules.relayroute.relay_apply(**NFT, **relay_args(net))
    assert "nftables" in ret["changes"]
    client = net["client"]
    assert connect(client, RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    assert connect(client, RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    # The connmark: the other tool's bit 0x1000000 and relayroute's value side by side.
    listing = relay.exec("conntrack -L -p tcp --dport 25").stdout.splitlines()
    proxied = [line for line in listing if f"src={PROXIED}" in line]
    direct = [line for line in listing if f"src={DIRECT}" in line]
    assert proxied, listing
    assert direct, listing
    assert all(f"mark={0x1000000 | 0xFE} " in line for line in proxied), listing
    assert all(f"mark={0x1000000} " in line for line in direct), listing
    # The packet mark, in both directions: the other tool's bit 0x10000 kept,
    # relayroute's bits 0xfe on the proxied connection's packets, 0 on the direct one's.
    seen = counters(relay)
    assert seen["proxied in"] >= 3, seen
    assert seen["proxied out"] >= 3, seen
    assert seen["direct in"] >= 3, seen
    assert seen["direct out"] >= 3, seen
    mangle = relay.exec("iptables -t mangle -L PREROUTING -v -n -x").stdout
    after = [line for line in mangle.splitlines() if "after relayroute" in line]
    assert int(after[0].split()[0]) >= 3, mangle
    with relay.entered():
        loaders.modules.relayroute.relay_remove(**NFT)


def test_other_tools_tables_stay_byte_identical(loaders, relay_ns):
    nft(relay_ns, "-f -", input=OTHER_TOOL)
    relay_ns.exec(["iptables-restore", "--noflush"], input=FOREIGN_MANGLE)

    def foreign():
        return {
            "othertool": nft(relay_ns, "-a list table inet othertool").stdout,
            "mangle": nft(relay_ns, "-a list table ip mangle").stdout,
            "iptables": [
                line
                for line in relay_ns.exec("iptables-save -t mangle").stdout.splitlines()
                if not line.startswith("#")
            ],
        }

    before = foreign()
    assert "CONNMARK" in "\n".join(before["iptables"])
    whole = snapshot(relay_ns)
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(**NFT, **ARGS)
        assert foreign() == before
        assert loaders.modules.relayroute.relay_apply(**NFT, **ARGS) == {"changes": {}}
        changed = loaders.modules.relayroute.relay_apply(
            **NFT, **{**ARGS, "proxies": {**PROXIES, **SECOND}}
        )
        assert "nftables" in changed["changes"]
        assert "ct mark & 0x000000ff == 0x000000fa" in our_table(relay_ns)
        assert foreign() == before
        loaders.modules.relayroute.relay_remove(**NFT)
    assert foreign() == before
    assert snapshot(relay_ns) == whole


def test_a_failing_transaction_rolls_back(loaders, relay_ns, monkeypatch):
    with relay_ns.entered():
        before = snapshot(relay_ns)
        backend = loaded(loaders, "nftables")

        def failing(payload):
            raise backend.BackendError("nft -f failed: injected")

        monkeypatch.setattr(backend, "apply", failing)
        ret = loaders.states.relayroute.relay_present(name="r", **NFT, **ARGS)
        assert ret.result is False
        assert "injected" in ret.comment
        assert "previous state was restored" in ret.comment
        assert snapshot(relay_ns) == before


def test_a_wrong_table_is_caught_and_the_previous_one_put_back(loaders, relay_ns, monkeypatch):
    """From one proxy to two, the kernel takes a batch that lost a line: verified, undone."""
    with relay_ns.entered():
        assert loaders.modules.relayroute.relay_apply(**NFT, **ARGS)["changes"]
        one_proxy = our_table(relay_ns)
        before = snapshot(relay_ns)
        backend = loaded(loaders, "nftables")
        real_apply = backend.apply
        calls = []

        def lossy_once(payload):
            calls.append(payload)
            if len(calls) == 1:
                payload = "\n".join(
                    line for line in payload.splitlines() if "ct mark set ct mark" not in line
                )
            real_apply(payload)

        monkeypatch.setattr(backend, "apply", lossy_once)
        ret = loaders.states.relayroute.relay_present(
            name="r", **NFT, **{**ARGS, "proxies": {**PROXIES, **SECOND}}
        )
        assert ret.result is False
        assert "verification failed" in ret.comment
        assert "previous state was restored" in ret.comment
        assert len(calls) == 2  # the change, then the rollback's batch
        assert our_table(relay_ns) == one_proxy
        assert snapshot(relay_ns) == before
        monkeypatch.undo()
        loaders.modules.relayroute.relay_remove(**NFT)


def test_test_mode_shows_nft_changes_and_changes_nothing(loaders, relay_ns):
    with relay_ns.entered():
        before = snapshot(relay_ns)
        dry = loaders.states.relayroute.relay_present(name="r", test=True, **NFT, **ARGS)
        assert dry.result is None
        new = dry.changes["nftables"]["new"]
        assert new[0] == f"add table {TABLE}"
        assert (
            f"add rule {TABLE} PRE ether saddr {MAC} counter "
            "meta mark set meta mark & 0xfffffffe | 0xfe" in new
        )
        assert dry.changes["nftables"]["old"] == []
        assert snapshot(relay_ns) == before


def test_boot_restore_brings_back_only_our_lost_table(loaders, relay_ns, tmp_path):
    persist = tmp_path / "relayroute"
    nft(relay_ns, "-f -", input=OTHER_TOOL)
    with relay_ns.entered():
        ret = loaders.modules.relayroute.relay_apply(persist_dir=str(persist), **NFT, **ARGS)
    script = persist / "relay.restore"
    memory = persist / "relay.json"  # remembers the backend (engine.backends_to_clear)
    assert ret["changes"]["persist"] == {str(script): "created", str(memory): "created"}
    assert "nft -f - <<'RULES'" in script.read_text()
    applied = snapshot(relay_ns)
    table = our_table(relay_ns)
    # Only relayroute's table is lost (a ruleset reload that knows nothing of it).
    nft(relay_ns, f"delete table {TABLE}")
    assert our_table(relay_ns) is None
    other = nft(relay_ns, "-a list table inet othertool").stdout
    relay_ns.exec(["/bin/sh", str(script)])
    assert our_table(relay_ns) == table
    assert snapshot(relay_ns) == applied
    # Idempotent: run again on a host that has it all.
    relay_ns.exec(["/bin/sh", str(script)])
    assert snapshot(relay_ns) == applied
    assert nft(relay_ns, "-a list table inet othertool").stdout == other
    with relay_ns.entered():
        gone = loaders.modules.relayroute.relay_remove(persist_dir=str(persist), **NFT)
    assert gone["changes"]["persist"] == {str(script): "removed", str(memory): "removed"}


# A transparent listener (IP_TRANSPARENT, as HAProxy's ``bind ... transparent``)
# on an address the host does not have.
VIP, CLIENT = "198.51.100.25", "203.0.113.10"


@pytest.fixture
def proxy_net(make_netns):
    """A client whose router is the proxy; the VIP is on no host, the proxy does not forward."""
    client, proxy = make_netns("client"), make_netns("proxy")
    veth(client, "eth0", proxy, "eth0")
    client.ip(f"addr add {CLIENT}/24 dev eth0")
    client.ip("route add default via 203.0.113.1")
    proxy.ip("addr add 203.0.113.1/24 dev eth0")
    proxy.sysctl("net.ipv4.ip_forward", 0)
    transparent_server(proxy, VIP, 25)  # HAProxy's transparent frontend on the VIP
    transparent_server(proxy, "0.0.0.0", 2525)  # a transparent socket on the wildcard
    return {"client": client, "proxy": proxy}


def test_proxy_divert_takes_transparent_sockets_but_not_wildcard_ones(loaders, proxy_net):
    client, proxy = proxy_net["client"], proxy_net["proxy"]
    assert connect(client, VIP, 25, CLIENT, timeout=4) is None
    with proxy.entered():
        before = snapshot(proxy)
        ret = loaders.states.relayroute.proxy_present(name="p", **NFT)
        assert ret.result is True, ret.comment
        assert loaders.states.relayroute.proxy_present(name="p", **NFT).changes == {}
    listing = nft(proxy, "list table inet relayroute_proxy").stdout
    assert "meta l4proto tcp socket transparent 1 jump socket-DIVERT" in listing
    assert "socket wildcard 1 return" in listing
    # The VIP's connection is diverted to the transparent listener, which sees the client.
    assert connect(client, VIP, 25, CLIENT) == f"220 diverted {CLIENT}"
    # A transparent listener on the wildcard address is not taken, as xt_socket does not.
    assert connect(client, VIP, 2525, CLIENT, timeout=4) is None
    # Control: the same divert without skipping wildcard listeners would take it.
    nft(
        proxy,
        "insert rule inet relayroute_proxy PRE meta l4proto tcp socket transparent 1 jump DIVERT",
    )
    assert connect(client, VIP, 2525, CLIENT) == f"220 diverted {CLIENT}"
    with proxy.entered():
        gone = loaders.states.relayroute.proxy_absent(name="p", **NFT)
        assert gone.result is True
        assert snapshot(proxy) == before
    assert connect(client, VIP, 25, CLIENT, timeout=4) is None


STEP_PAUSE = 0.8  # each step of the apply is held this long (as in test_reply_path)


def test_mark_change_keeps_live_connections_on_their_path(loaders, net, monkeypatch):
    """
    A proxy's mark and table change while its connections exchange a line
    every 0.15 s. The new table dispatches only on the new mark: between the
    transaction and the engine's connmark move, the old connmark restores as
    0 and the next packet from the proxy's MAC marks the connection anew.
    Each step is held 0.8 s; no reply takes the wrong router, none is lost.
    """
    relay, gw, proxy = net["relay"], net["gw"], net["proxy"]
    with relay.entered():
        loaders.modules.relayroute.relay_apply(**NFT, **relay_args(net))
    for router in (gw, proxy):
        count_forwarded(router, "to proxied", f"-p tcp -s {RELAY} --sport 25 -d {PROXIED}")
        count_forwarded(router, "to direct", f"-p tcp -s {RELAY} --sport 25 -d {DIRECT}")
    engine = loaders.modules.relayroute.relay_apply.__globals__["engine"]
    backend, run_ops = engine.backend("nftables"), engine.netlink.run_ops
    steps = []

    def paced_run_ops(ops):
        done = []
        for op in ops:
            done += run_ops([op])
            steps.append(op[0])
            time.sleep(STEP_PAUSE)
        return done

    def paced_apply(payload, apply=backend.apply):
        apply(payload)
        steps.append("nftables")
        time.sleep(STEP_PAUSE)

    proxied = Ticker(net["client"], RELAY, 25, PROXIED)
    direct = Ticker(net["client"], RELAY, 25, DIRECT)
    try:
        assert proxied.wait_for(3)
        assert direct.wait_for(3)
        monkeypatch.setattr(engine.netlink, "run_ops", paced_run_ops)
        monkeypatch.setattr(backend, "apply", paced_apply)
        args = relay_args(net)
        args["proxies"]["m"].update(mark=253, table=1000253)
        with relay.entered():
            ret = loaders.modules.relayroute.relay_apply(**NFT, **args)
            flows = loaders.modules.relayroute.flows(mark_mask=0xFF, port=25)
        time.sleep(STEP_PAUSE)
    finally:
        proxied.stop()
        direct.stop()
        monkeypatch.undo()
    assert steps[:4] == ["route_replace", "rule_add", "nftables", "connmark_move"], steps
    assert ret["changes"]["connmarks"] == ["0xfe/0xff -> 0xfd/0xff"]
    assert any(f"src={PROXIED}" in f and f.endswith("mark=253") for f in flows), flows
    assert any(f"src={DIRECT}" in f and f.endswith("mark=0") for f in flows), flows
    wrong_way = {
        "gw: replies to the proxied client": forwarded(gw, "to proxied"),
        "proxy: replies to the direct client": forwarded(proxy, "to direct"),
        "gw: dropped": dropped(gw),
        "proxy: dropped": dropped(proxy),
    }
    assert set(wrong_way.values()) == {0}, wrong_way
    assert forwarded(proxy, "to proxied") >= len(proxied.exchanges)
    for ticker in (proxied, direct):
        assert not ticker.errors, ticker.errors
        assert not ticker.lost(), ticker.lost()
        assert len(ticker.exchanges) >= 15, len(ticker.exchanges)
    with relay.entered():
        loaders.modules.relayroute.relay_remove(**NFT)


def formula_pillar(tmp_path):
    """The relay component's pillar with ``backend: nftables`` and mark_mask 0xf0."""
    return {
        "relayroute": {
            "backend": "nftables",
            "lan_networks": ["192.0.2.0/24"],
            "mark_mask": 0xF0,
            "proxies": {
                "master-relay": {**PROXIES["master-relay"], "mark": 0x20, "vip": "198.51.100.25"},
                "master-relay-2": {
                    **SECOND["master-relay-2"],
                    "mark": 0x30,
                    "vip": "198.51.100.26",
                },
            },
            "relays": {"relayroute-functional": {"address": "192.0.2.11"}},
            "persist": {"dir": str(tmp_path / "relayroute"), "systemd_dir": str(tmp_path / "sd")},
        }
    }


def test_formula_relay_component_with_backend_nftables(loaders, relay_ns, tmp_path):
    """Pillar ``backend: nftables``: the formula's states, the check and the restore follow it."""
    pillar = formula_pillar(tmp_path)
    args = {
        "lan_networks": ["192.0.2.0/24"],
        "mark_mask": 0xF0,
        "proxies": {
            name: {k: v for k, v in proxy.items() if k != "vip"}
            for name, proxy in pillar["relayroute"]["proxies"].items()
        },
    }
    with relay_ns.entered():
        ret = loaders.modules.state.sls("relayroute.relay", pillar=pillar)
        assert all(state["result"] is True for state in ret.raw.values()), ret.raw
        table = our_table(relay_ns)
        assert (
            "ether saddr 02:00:c0:00:02:02 counter packets 0 bytes 0 "
            "meta mark set meta mark & 0xffffff2f" in table
        )
        assert "RELAYROUTE" not in relay_ns.exec("iptables-save").stdout
        assert "nft -f - <<'RULES'" in (tmp_path / "relayroute" / "relay.restore").read_text()
        again = loaders.modules.state.sls("relayroute.relay", pillar=pillar)
        assert all(state["changes"] == {} for state in again.raw.values()), again.raw
        ok = loaders.modules.relayroute.check(backend="nftables", retcode=False, **args)
        assert ok["ok"] is True, ok
        # Only relayroute's table is lost: the check names what is missing, in nft syntax.
        nft(relay_ns, f"delete table {TABLE}")
        drift = loaders.modules.relayroute.check(backend="nftables", retcode=False, **args)
        assert drift["ok"] is False
        assert f"nftables: missing 'add table {TABLE}'" in drift["differences"]
        repaired = loaders.modules.state.sls("relayroute.relay", pillar=pillar)
        assert all(state["result"] is True for state in repaired.raw.values()), repaired.raw
        assert our_table(relay_ns) == table
        loaders.modules.relayroute.relay_remove(
            backend="nftables", persist_dir=str(tmp_path / "relayroute")
        )
    assert our_table(relay_ns) is None


def test_formula_relay_clean_with_backend_nftables(loaders, relay_ns, tmp_path):
    pillar = formula_pillar(tmp_path)
    with relay_ns.entered():
        before = snapshot(relay_ns)
        ret = loaders.modules.state.sls("relayroute.relay", pillar=pillar)
        assert all(state["result"] is True for state in ret.raw.values()), ret.raw
        clean = loaders.modules.state.sls("relayroute.relay.clean", pillar=pillar)
        assert all(state["result"] is True for state in clean.raw.values()), clean.raw
        left = our_table(relay_ns)
        if left:
            loaders.modules.relayroute.relay_remove(backend="nftables")
        assert left is None
        assert snapshot(relay_ns) == before


def test_a_no_op_apply_starts_no_process(loaders, relay_ns):
    """
    The read is in process (libnftables), as are netlink and /proc: nothing is
    spawned. With the iptables backend (iptables-nft) neither, as the apply's
    verification is remembered (nftview.py). Control: once another tool has
    changed PREROUTING, the iptables no-op lists that chain (one iptables).
    """

    def no_op_spawns(backend, meanwhile=None):
        args = {**ARGS, "backend": backend}
        assert loaders.modules.relayroute.relay_apply(**args)["changes"]
        if meanwhile:
            relay_ns.exec(meanwhile)
        with spawns.recorded() as spawned:
            assert loaders.modules.relayroute.relay_apply(**args) == {"changes": {}}
        loaders.modules.relayroute.relay_remove(backend=backend)
        return spawned

    with relay_ns.entered():
        assert no_op_spawns("nftables") == []
        assert no_op_spawns("iptables") == []
        other_tool = ["iptables", "-t", "mangle", "-I", "PREROUTING", "-p", "udp", "--dport", "9"]
        spawned = no_op_spawns("iptables", meanwhile=other_tool)
        assert [argv[-1] for argv in spawned] == ["PREROUTING"]
        assert [argv[0] for argv in spawned] == ["iptables"]
