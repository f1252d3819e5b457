"""
A mark mask other than 0xff through the whole formula, in a lab: relays mark
proxied connections 0x20/0xf0, master-relay diverts with 0x10/0xf0 (the
default derived from the mask), and both mail paths work.
"""

import pytest

from tests.lab import filters
from tests.lab_rp_filter.conftest import DIVERT_MARK, MASK, PROXY_MARK
from tests.support.seedlab import mail_direct, mail_via_vip, report

pytestmark = [pytest.mark.lab, pytest.mark.root]

# How each backend's divert sets DIVERT_MARK under MASK (nft prints x & ~M | V
# as x & (~M | V) | V: nftables.py).
DIVERT_SETS = {
    "iptables": f"-j MARK --set-xmark {DIVERT_MARK:#x}/{MASK:#x}",
    "nftables": f"DIVERT meta mark set meta mark & {~MASK & 0xFFFFFFFF | DIVERT_MARK:#x} "
    f"| {DIVERT_MARK:#x}",
}


def marks_of(ns, port):
    """The connmark of every tracked connection to ``port`` in ``ns``."""
    flows = ns.exec(f"conntrack -L -p tcp --dport {port}", check=False).stdout
    return [
        int(line.split("mark=")[1].split()[0]) for line in flows.splitlines() if "mark=" in line
    ]


def test_both_roles_and_both_paths_with_mask_0xf0(applied, lab):
    proxy = lab.ns("master-relay")
    rules = proxy.exec("ip -4 rule show").stdout
    assert f"fwmark {DIVERT_MARK:#x}/{MASK:#x} lookup 100" in rules, rules
    backend = filters.lab_backend(lab)
    divert = "\n".join(filters.owned(proxy, "proxy")[backend])
    assert DIVERT_SETS[backend] in divert, divert
    for name in lab.relay_addresses:
        relay = lab.ns(name)
        assert filters.holding(relay) == [backend], name
        rules = relay.exec("ip -4 rule show").stdout
        assert f"fwmark {PROXY_MARK:#x}/{MASK:#x} lookup 1000254" in rules, (name, rules)
        relay.exec("conntrack -F", check=False)
        direct = mail_direct(lab, name)
        assert direct.ok, direct.text
    proxied = mail_via_vip(lab, (25, 587) * 3)
    assert all(result.ok for result in proxied), [r.text for r in proxied if not r.ok]
    seen = {port: [] for port in (25, 587)}
    for name in lab.relay_addresses:
        for port in seen:
            seen[port] += marks_of(lab.ns(name), port)
    # Direct mail carries no mark; every proxied connection carries exactly 0x20.
    assert seen[587], seen
    assert set(seen[587]) == {PROXY_MARK}, seen
    assert set(seen[25]) == {0, PROXY_MARK}, seen
    report(
        "mark mask 0xf0",
        [
            f"backend {backend}; master-relay divert fwmark {DIVERT_MARK:#x}/{MASK:#x}; "
            f"relays fwmark {PROXY_MARK:#x}/{MASK:#x}",
            f"direct to 3 of 3 relays ok; {len(proxied)} of {len(proxied)} through the VIP ok",
            f"connmarks on 25: {sorted(set(seen[25]))}, on 587: {sorted(set(seen[587]))}",
        ],
    )
