"""
The proxy component's HAProxy configuration (``relayroute/proxy/files/
haproxy.cfg.jinja``) rendered from the topology's proxy arguments, as the
formula hands them over: one frontend per VIP and port, bound transparently,
and one backend per port and family whose servers are the relays' addresses
of that family. Pure: Jinja and the validation, no Salt, no root
(``haproxy -c`` runs when HAProxy is installed).
"""

import copy
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest

from relayroute_core import topology
from tests.unit.test_bad_topologies import BASE, MINION, as_map_jinja

TEMPLATE = Path(__file__).resolve().parents[2] / "relayroute" / "proxy" / "files"

# What the template rendered for the seed's (IPv4) pillar before it knew
# families: an IPv4-only pillar renders exactly this, byte for byte, with
# privileges 'root' (HAProxy as root and chrooted, as it always ran before).
IPV4_ONLY = """\
# Managed by Salt (relayroute) for relayroute-functional: local edits are overwritten.
global
    log /dev/log local0
    chroot /var/lib/haproxy
    stats socket /run/haproxy/admin.sock mode 660 level admin
    maxconn 4096
    # No 'user'/'group': 'source ... usesrc clientip' opens every connection to a
    # relay with IP_TRANSPARENT, which needs CAP_NET_ADMIN; HAProxy before 2.9 has
    # no 'setcap' to keep it after dropping root.

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    timeout connect 5s
    timeout client 5m
    timeout server 5m
    timeout check 10s
    timeout queue 1m

frontend relayroute-smtp-25
    bind 198.51.100.25:25 transparent
    default_backend relayroute-smtp-25

backend relayroute-smtp-25
    balance leastconn
    # Checks leave from the proxy's own address; clients' sessions keep theirs.
    option smtpchk EHLO relayroute-functional
    source 0.0.0.0 usesrc clientip
    server relay1 192.0.2.11:25 check inter 10s fall 3 rise 2
    server relay2 192.0.2.12:25 check inter 10s fall 3 rise 2
    server relay3 192.0.2.13:25 check inter 10s fall 3 rise 2

frontend relayroute-smtp-587
    bind 198.51.100.25:587 transparent
    default_backend relayroute-smtp-587

backend relayroute-smtp-587
    balance leastconn
    # Checks leave from the proxy's own address; clients' sessions keep theirs.
    option smtpchk EHLO relayroute-functional
    source 0.0.0.0 usesrc clientip
    server relay1 192.0.2.11:587 check inter 10s fall 3 rise 2
    server relay2 192.0.2.12:587 check inter 10s fall 3 rise 2

"""


# privileges 'unprivileged' (the default): no chroot, another comment; the rest the same.
ROOT_GLOBAL = """\
    chroot /var/lib/haproxy
    stats socket /run/haproxy/admin.sock mode 660 level admin
    maxconn 4096
    # No 'user'/'group': 'source ... usesrc clientip' opens every connection to a
    # relay with IP_TRANSPARENT, which needs CAP_NET_ADMIN; HAProxy before 2.9 has
    # no 'setcap' to keep it after dropping root.
"""
UNPRIVILEGED_GLOBAL = """\
    stats socket /run/haproxy/admin.sock mode 660 level admin
    maxconn 4096
    # No 'user'/'group': HAProxy starts as haproxy, its unit's drop-in giving it
    # CAP_NET_ADMIN (IP_TRANSPARENT for 'usesrc clientip') and CAP_NET_BIND_SERVICE.
"""


def as_root(pillar):
    """``pillar`` with privileges 'root' (README, "HAProxy without root")."""
    pillar = copy.deepcopy(pillar)
    lookup = pillar["relayroute"].setdefault("lookup", {})
    lookup.setdefault("proxy", {}).setdefault("haproxy", {})["privileges"] = "root"
    return pillar


def render(pillar):
    """The configuration file the proxy component writes for ``pillar`` (Salt's Jinja defaults)."""
    config = as_map_jinja(pillar)
    top = topology.topology(config, MINION)
    assert top["errors"] == []
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE)), keep_trailing_newline=True
    )
    template = env.get_template("haproxy.cfg.jinja")
    return template.render(proxy=top["proxy"], haproxy=config["proxy"]["haproxy"])


def dual_stack(vip=("198.51.100.25", "2001:db8:100::25")):
    """BASE with IPv6 on the LAN: the proxy, relay1 and relay2 dual-stack, relay3 IPv4 only."""
    pillar = copy.deepcopy(BASE)
    data = pillar["relayroute"]
    data["lan_networks"].append("2001:db8:2::/64")
    data["proxies"][MINION]["address"] = ["192.0.2.2", "2001:db8:2::2"]
    data["proxies"][MINION]["vip"] = list(vip)
    data["relays"]["relay1"]["address"] = ["192.0.2.11", "2001:db8:2::11"]
    # Written IPv6 first: the order in pillar does not matter.
    data["relays"]["relay2"]["address"] = ["2001:db8:2::12", "192.0.2.12"]
    return pillar


def sections(text):
    """``{'frontend NAME' or 'backend NAME': [its lines, stripped]}``."""
    found, current = {}, None
    for line in text.splitlines():
        if line.startswith(("frontend ", "backend ")):
            current = found.setdefault(line, [])
        elif not line.strip() or not line[:1].isspace():
            current = None
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    return found


def test_ipv4_only_pillar_renders_the_single_stack_configuration_exactly():
    assert render(as_root(BASE)) == IPV4_ONLY


def test_unprivileged_haproxy_has_no_chroot_and_the_same_sections():
    # Started as its user, HAProxy has no CAP_SYS_CHROOT: the drop-in's sandbox instead.
    assert ROOT_GLOBAL in IPV4_ONLY
    assert render(BASE) == IPV4_ONLY.replace(ROOT_GLOBAL, UNPRIVILEGED_GLOBAL)


def test_a_list_of_one_ipv4_address_renders_the_same_as_the_string():
    pillar = copy.deepcopy(BASE)
    pillar["relayroute"]["proxies"][MINION]["vip"] = ["198.51.100.25"]
    pillar["relayroute"]["relays"]["relay1"]["address"] = ["192.0.2.11"]
    assert render(as_root(pillar)) == IPV4_ONLY
    assert render(pillar) == render(BASE)


def test_dual_stack_frontends_and_backends_per_family():
    found = sections(render(dual_stack()))
    check = "check inter 10s fall 3 rise 2"
    assert found == {
        "frontend relayroute-smtp-25": [
            "bind 198.51.100.25:25 transparent",
            "default_backend relayroute-smtp-25",
        ],
        "backend relayroute-smtp-25": [
            "balance leastconn",
            "option smtpchk EHLO relayroute-functional",
            "source 0.0.0.0 usesrc clientip",
            f"server relay1 192.0.2.11:25 {check}",
            f"server relay2 192.0.2.12:25 {check}",
            f"server relay3 192.0.2.13:25 {check}",
        ],
        "frontend relayroute-smtp-25-ipv6": [
            "bind 2001:db8:100::25:25 transparent",
            "default_backend relayroute-smtp-25-ipv6",
        ],
        # Only the relays with an IPv6 address: an IPv6 client's session can
        # leave from its own address towards an IPv6 server only.
        "backend relayroute-smtp-25-ipv6": [
            "balance leastconn",
            "option smtpchk EHLO relayroute-functional",
            "source :::0 usesrc clientip",
            f"server relay1 2001:db8:2::11:25 {check}",
            f"server relay2 2001:db8:2::12:25 {check}",
        ],
        "frontend relayroute-smtp-587": [
            "bind 198.51.100.25:587 transparent",
            "default_backend relayroute-smtp-587",
        ],
        "backend relayroute-smtp-587": [
            "balance leastconn",
            "option smtpchk EHLO relayroute-functional",
            "source 0.0.0.0 usesrc clientip",
            f"server relay1 192.0.2.11:587 {check}",
            f"server relay2 192.0.2.12:587 {check}",
        ],
        "frontend relayroute-smtp-587-ipv6": [
            "bind 2001:db8:100::25:587 transparent",
            "default_backend relayroute-smtp-587-ipv6",
        ],
        "backend relayroute-smtp-587-ipv6": [
            "balance leastconn",
            "option smtpchk EHLO relayroute-functional",
            "source :::0 usesrc clientip",
            f"server relay1 2001:db8:2::11:587 {check}",
            f"server relay2 2001:db8:2::12:587 {check}",
        ],
    }


def test_dual_stack_keeps_the_ipv4_sections_of_the_single_stack_file():
    """Adding IPv6 adds sections; the IPv4 ones (and the file's head) read as before."""
    dual = sections(render(dual_stack()))
    single = sections(IPV4_ONLY)
    # relay1's and relay2's IPv4 addresses are the same as in BASE.
    assert {k: v for k, v in dual.items() if not k.endswith("-ipv6")} == single
    head = IPV4_ONLY.split("\nfrontend ", 1)[0]
    assert render(as_root(dual_stack())).startswith(head)


def test_ipv6_only_vip():
    found = sections(render(dual_stack(vip=("2001:db8:100::25",))))
    names = [f"relayroute-smtp-{port}-ipv6" for port in (25, 587)]
    assert sorted(found) == sorted(f"{kind} {n}" for kind in ("frontend", "backend") for n in names)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="HAProxy is not installed")
@pytest.mark.parametrize("pillar", [BASE, dual_stack()], ids=["ipv4", "dual-stack"])
def test_haproxy_accepts_the_rendering(pillar, tmp_path):
    # The lab's settings: no chroot, no stats socket, logs to stdout (-c binds nothing).
    pillar = copy.deepcopy(pillar)
    pillar["relayroute"]["lookup"] = {
        "proxy": {"haproxy": {"chroot": "", "stats_socket": "", "log": "stdout format raw local0"}}
    }
    path = tmp_path / "haproxy.cfg"
    path.write_text(render(pillar))
    proc = subprocess.run(
        ["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
