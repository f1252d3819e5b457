"""
rp_filter: relays reach master-relay on a second interface (px0) and the
gateway on lan0, with strict reverse-path filtering. Proxied packets arrive on
px0 from a client whose address routes out lan0; relayroute makes px0's check
use the packet's mark (src_valid_mark), so both mail paths work while the
filter stays strict.
"""

import pytest

from tests.support.seedlab import mail_direct, mail_via_vip, report

pytestmark = [pytest.mark.lab, pytest.mark.root]


def rp_filter_drops(lab):
    """Packets the relays' reverse-path filters dropped so far (TcpExt IPReversePathFilter)."""
    total = 0
    for name in lab.relay_addresses:
        out = lab.ns(name).exec("nstat -asz TcpExtIPReversePathFilter").stdout
        total += sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("Tcp"))
    return total


def test_both_paths_with_strict_rp_filter_on_two_interfaces(applied, lab, salt_cli):
    lines = []
    for name in lab.relay_addresses:
        relay = lab.ns(name)
        assert relay.exec("sysctl -n net.ipv4.conf.px0.rp_filter").stdout.strip() == "1"
        assert relay.exec("sysctl -n net.ipv4.conf.px0.src_valid_mark").stdout.strip() == "1"
        assert relay.exec("sysctl -n net.ipv4.conf.lan0.src_valid_mark").stdout.strip() == "0"
        direct = mail_direct(lab, name)
        assert direct.ok, direct.text
    proxied = mail_via_vip(lab, (587, 25) * 3)
    assert all(result.ok for result in proxied), [r.text for r in proxied if not r.ok]
    lines.append(
        f"with relayroute: direct to 3 of 3 relays ok; {len(proxied)} of {len(proxied)} "
        "through the VIP ok; px0 rp_filter=1 src_valid_mark=1"
    )

    # The control: the same routing, without the mark-aware reverse-path check.
    # A short timeout only hastens the expected failure; the relays' count of
    # packets their reverse-path filter dropped shows that it is the cause.
    before = rp_filter_drops(lab)
    try:
        for name in lab.relay_addresses:
            lab.ns(name).sysctl("net.ipv4.conf.px0.src_valid_mark", 0)
        failed = mail_via_vip(lab, (587, 25, 587), timeout=4)
        dropped = rp_filter_drops(lab) - before
    finally:
        again = salt_cli.run("state.highstate", minion_tgt="relay*", _timeout=300)
    assert not any(result.ok for result in failed)
    assert dropped >= len(failed), dropped
    lines.append(
        f"src_valid_mark=0 on px0: 3 of 3 sessions through the VIP failed; the relays' "
        f"reverse-path filter dropped {dropped} packets"
    )
    assert again.returncode == 0, again.stdout
    restored = mail_via_vip(lab, (587, 25) * 3)
    assert all(result.ok for result in restored), [r.text for r in restored if not r.ok]
    lines.append(f"highstate puts src_valid_mark back: {len(restored)} of {len(restored)} ok")
    report("rp_filter variant", lines)
