"""
Reboot and reverse-path filtering on the real kernel.

- The relay's restore script, run on a namespace whose runtime state was
  flushed as a reboot would, brings back exactly what relayroute applied.
- A relay that reaches its proxy on a second interface, with strict rp_filter:
  proxied traffic is dropped unless that interface's reverse-path check uses
  the packet mark (src_valid_mark), which relayroute manages and, on removal,
  puts back as it was.
"""

import pytest

from tests.functional.test_relay import ARGS
from tests.support.hosts import (
    DIRECT,
    PROXIED,
    RELAY,
    lose_runtime_state,
    plant_foreign_state,
    two_legged_args,
)
from tests.support.netns import mac_of
from tests.support.tcp import connect

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_restore_script_brings_back_what_was_applied(loaders, relay_ns, tmp_path):
    persist = tmp_path / "relayroute"
    with relay_ns.entered():
        ret = loaders.modules.relayroute.relay_apply(persist_dir=str(persist), **ARGS)
        # relay.json remembers the backend that holds the chains (engine.backends_to_clear).
        assert ret["changes"]["persist"] == {
            str(persist / "relay.restore"): "created",
            str(persist / "relay.json"): "created",
        }
        applied = relay_ns.snapshot()
        lose_runtime_state(relay_ns, [1000254])
        assert relay_ns.snapshot() != applied
        relay_ns.exec(["/bin/sh", str(persist / "relay.restore")])
        assert relay_ns.snapshot() == applied
        # Idempotent: running it again changes nothing, and Salt finds nothing to do.
        relay_ns.exec(["/bin/sh", str(persist / "relay.restore")])
        assert relay_ns.snapshot() == applied
        assert loaders.modules.relayroute.relay_apply(persist_dir=str(persist), **ARGS) == {
            "changes": {}
        }
        gone = loaders.modules.relayroute.relay_remove(persist_dir=str(persist))
    assert gone["changes"]["persist"] == {
        str(persist / "relay.restore"): "removed",
        str(persist / "relay.json"): "removed",
    }
    assert not (persist / "relay.restore").exists()


def test_restore_script_keeps_other_tools_state(loaders, relay_ns, tmp_path):
    plant_foreign_state(relay_ns)
    persist = tmp_path / "relayroute"
    with relay_ns.entered():
        loaders.modules.relayroute.relay_apply(persist_dir=str(persist), **ARGS)
    applied = relay_ns.snapshot()
    # A partial loss (someone flushed relayroute's chains only): the script repairs it
    # without touching the rest.
    relay_ns.exec("iptables -t mangle -F RELAYROUTE-RELAY-PRE")
    relay_ns.exec(["/bin/sh", str(persist / "relay.restore")])
    assert relay_ns.snapshot() == applied


def rp_filter_drops(ns):
    """Packets the namespace's reverse-path filter dropped so far (TcpExt IPReversePathFilter)."""
    out = ns.exec("nstat -asz TcpExtIPReversePathFilter").stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("Tcp"))


def test_strict_rp_filter_on_a_second_interface(loaders, two_legged, tmp_path):
    relay = two_legged["relay"]
    persist = str(tmp_path / "relayroute")
    args = {**two_legged_args(mac_of(two_legged["proxy"], "lan0")), "persist_dir": persist}
    valid_mark = "sysctl -n net.ipv4.conf.px0.src_valid_mark"
    with relay.entered():
        ret = loaders.modules.relayroute.relay_apply(**args)
    assert ret["changes"]["sysctls"] == {
        "old": ["net.ipv4.conf.px0.src_valid_mark = 0"],
        "new": ["net.ipv4.conf.px0.src_valid_mark = 1"],
    }
    assert connect(two_legged["client"], RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    assert connect(two_legged["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
    # The control: the same routing without the mark-aware check drops proxied
    # traffic, and it is the reverse-path filter that drops it (its counter
    # moves), not slowness: a 12 s wait, and the direct path still answers.
    relay.sysctl("net.ipv4.conf.px0.src_valid_mark", 0)
    dropped = rp_filter_drops(relay)
    assert connect(two_legged["client"], RELAY, 25, PROXIED) is None
    assert rp_filter_drops(relay) > dropped
    assert connect(two_legged["client"], RELAY, 25, DIRECT) == f"220 hello {DIRECT}"
    with relay.entered():
        again = loaders.modules.relayroute.relay_apply(**args)
        assert set(again["changes"]) == {"sysctls"}
        assert connect(two_legged["client"], RELAY, 25, PROXIED) == f"220 hello {PROXIED}"
        assert (
            "sysctl -qw net.ipv4.conf.px0.src_valid_mark=1"
            in (tmp_path / "relayroute" / "relay.restore").read_text()
        )
        loaders.modules.relayroute.relay_remove(persist_dir=persist)
    # Removal puts back the value the interface had before relayroute.
    assert relay.exec(valid_mark).stdout.strip() == "0"
    assert relay.exec("sysctl -n net.ipv4.conf.px0.rp_filter").stdout.strip() == "1"
