"""
CentOS/RHEL 7 boot files (persist mechanism ``network-scripts``): what goes in
route-/rule-<dev>, /etc/sysconfig/iptables and the sysctl drop-in, and that
everything of the administrator's in those files stays byte for byte. Pure.
"""

import pytest

from relayroute_core import bootfiles, iptables, model, netlink, planner
from tests.support.rh7boot import ADMIN_SAVED_RULESET
from tests.unit.test_plan_iptables import SEED_LINES, seed_spec

KERNEL = netlink.KernelState(
    rules=(),
    routes=(),
    networks=("192.0.2.0/24", "198.51.100.128/25"),
    addresses=("192.0.2.10",),
    network_interfaces=(("192.0.2.0/24", "eth0"), ("198.51.100.128/25", "eth1")),
    default_interface="eth0",
)
OLD_KERNEL = netlink.KernelState(**{**KERNEL.__dict__, "rule_protocol": False})

SAVED = ADMIN_SAVED_RULESET


def relay_plan(second=False):
    return planner.relay_plan(seed_spec(second))


def two_legged_plan():
    proxies = {
        "master-relay": {
            "address": "198.51.100.130",
            "mac": "02:00:c0:00:02:02",
            "mark": 254,
            "table": 1000254,
            "priority": 1000,
        }
    }
    spec = model.relay_spec(["192.0.2.0/24", "198.51.100.128/25"], 0xFF, proxies)
    return planner.relay_plan(spec, mark_aware_interfaces=["eth1"])


def test_routes_and_rules_go_to_the_interface_their_proxy_is_on():
    assert bootfiles.network_script_lines(relay_plan(second=True), KERNEL) == {
        "route-eth0": [
            "default via 192.0.2.2 dev eth0 table 1000254 proto 210",
            "default via 192.0.2.3 dev eth0 table 1000250 proto 210",
        ],
        "rule-eth0": [
            "priority 1000 fwmark 0xfe/0xff lookup 1000254 proto 210",
            "priority 1001 fwmark 0xfa/0xff lookup 1000250 proto 210",
        ],
    }
    assert bootfiles.network_script_lines(two_legged_plan(), KERNEL) == {
        "route-eth1": ["default via 198.51.100.130 dev eth1 table 1000254 proto 210"],
        "rule-eth1": ["priority 1000 fwmark 0xfe/0xff lookup 1000254 proto 210"],
    }


def test_rule_lines_carry_no_protocol_where_the_kernel_keeps_none():
    # CentOS 7: kernel 3.10 and iproute 4.11 know no 'proto' on rules.
    lines = bootfiles.network_script_lines(relay_plan(), OLD_KERNEL)
    assert lines["rule-eth0"] == ["priority 1000 fwmark 0xfe/0xff lookup 1000254"]
    assert lines["route-eth0"] == ["default via 192.0.2.2 dev eth0 table 1000254 proto 210"]


def test_the_proxy_divert_goes_to_the_loopback_files():
    spec = model.proxy_spec(1, 100, 100, 0xFF)
    lines = bootfiles.network_script_lines(planner.proxy_plan(spec), KERNEL)
    assert lines == {
        "route-lo": ["local 0.0.0.0/0 dev lo table 100 proto 211"],
        "rule-lo": ["priority 100 fwmark 0x1/0xff lookup 100 proto 211"],
    }


def test_a_gateway_on_no_network_of_the_host_is_an_error():
    spec = model.relay_spec(
        ["192.0.2.0/24"],
        0xFF,
        {"far": {"address": "203.0.113.9", "mac": "02:00:00:00:00:09", "mark": 9, "table": 9,
                 "priority": 1000}},
    )  # fmt: skip
    with pytest.raises(ValueError, match="gateway 203.0.113.9"):
        bootfiles.network_script_lines(planner.relay_plan(spec), KERNEL)


ADMIN_ROUTES = "# static routes\n198.51.100.0/25 via 192.0.2.1 dev eth0\n"


def test_block_is_added_replaced_and_removed_leaving_the_admins_lines():
    first = bootfiles.merge_block(ADMIN_ROUTES, "relay", ["default via 192.0.2.2 table 1"])
    assert first == (
        ADMIN_ROUTES + "# BEGIN relayroute relay: managed by Salt, edits here are overwritten\n"
        "default via 192.0.2.2 table 1\n# END relayroute relay\n"
    )
    second = bootfiles.merge_block(first, "relay", ["default via 192.0.2.3 table 2"])
    assert second.startswith(ADMIN_ROUTES)
    assert "192.0.2.2" not in second
    assert bootfiles.merge_block(second, "relay", ["default via 192.0.2.3 table 2"]) == second
    # The admin adds a line after the block: it stays, the block goes.
    edited = second + "203.0.113.0/24 via 192.0.2.1 dev eth0\n"
    assert bootfiles.merge_block(edited, "relay", []) == (
        ADMIN_ROUTES + "203.0.113.0/24 via 192.0.2.1 dev eth0\n"
    )
    assert bootfiles.merge_block(second, "relay", []) == ADMIN_ROUTES


def test_a_file_of_relayroute_alone_is_created_and_removed():
    text = bootfiles.merge_block(None, "proxy", ["local 0.0.0.0/0 dev lo table 100"])
    assert text.count("\n") == 3
    assert bootfiles.merge_block(text, "proxy", []) is None
    assert bootfiles.merge_block(None, "proxy", []) is None


def test_the_roles_blocks_are_separate():
    both = bootfiles.merge_block(bootfiles.merge_block(None, "relay", ["a"]), "policy", ["b"])
    assert bootfiles.merge_block(both, "relay", []).splitlines()[1] == "b"


def test_address_format_route_files_are_recognised():
    assert bootfiles.uses_address_format("ADDRESS0=10.0.0.0\nNETMASK0=255.0.0.0\n")
    assert not bootfiles.uses_address_format(ADMIN_ROUTES)


def test_sysctl_dropin_lists_the_plans_parameters():
    assert bootfiles.sysctl_text(two_legged_plan()).splitlines()[1:] == [
        "net.ipv4.conf.eth1.src_valid_mark = 1"
    ]
    assert bootfiles.sysctl_text(relay_plan()) is None


def test_saved_ruleset_gets_the_chains_and_keeps_every_other_line():
    merged = iptables.merge_saved(SAVED, relay_plan())
    lines = merged.splitlines()
    declared = [f"-N {line[1:].split()[0]}" for line in lines if line.startswith(":RELAYROUTE")]
    rules = [line for line in lines if line.startswith("-A") and "RELAYROUTE" in line]
    assert sorted(declared + rules) == sorted(SEED_LINES)
    # Jumps come first in their built-in chains, before the VPN tool's.
    assert lines.index("-A PREROUTING -j RELAYROUTE-RELAY-PRE") < lines.index(
        "-A PREROUTING -i tun0 -j VPN-MARK"
    )
    assert [line for line in lines if "RELAYROUTE" not in line] == SAVED.splitlines()
    assert iptables.merge_saved(merged, relay_plan()) == merged
    assert iptables.merge_saved(merged, planner.empty_plan(planner.RELAY)) == SAVED


def test_saved_ruleset_with_counters_is_recognised_as_ours():
    # 'iptables-save -c' (service iptables save with IPTABLES_SAVE_COUNTER=yes).
    merged = iptables.merge_saved(SAVED, relay_plan())
    counted = "".join(
        f"[12:3456] {line}\n" if line.startswith("-A") and "RELAYROUTE" in line else line + "\n"
        for line in merged.splitlines()
    )
    assert iptables.merge_saved(counted, planner.empty_plan(planner.RELAY)) == SAVED


def test_saved_ruleset_without_mangle_gets_one_and_other_roles_stay():
    filter_only = SAVED[SAVED.index("*filter") :]
    merged = iptables.merge_saved(filter_only, relay_plan())
    assert merged.startswith(filter_only)
    assert "*mangle\n:PREROUTING ACCEPT [0:0]\n" in merged
    spec = model.proxy_spec(1, 100, 100, 0xFF)
    both = iptables.merge_saved(merged, planner.proxy_plan(spec))
    assert iptables.merge_saved(both, planner.empty_plan(planner.PROXY)) == merged
    assert iptables.merge_saved(None, relay_plan()) is None
