"""
IPv4 and IPv6 through the kernel-state side of the engine, parametrised over
the families: netlink messages parsed into rules and routes of their family,
operations in their family, rules keyed by (family, priority) in conflicts,
scope, memory and connmark moves, the restore script's ``ip -4``/``ip -6``,
network-scripts' ``route6-``/``rule6-`` files, and proxies checked per
family. Pure (netlink stubbed), no root.
"""

import socket

import pytest

import relayroute_core
from relayroute_core import bootfiles, engine, model, netlink, persist, planner
from relayroute_core.family import IPV4, IPV6

FAMILIES = [IPV4, IPV6]
IDS = ["ipv4", "ipv6"]
# The proxy's LAN address and the relay's, per family.
PROXY = {4: "192.0.2.2", 6: "2001:db8:2::2"}
RELAY = {4: "192.0.2.11", 6: "2001:db8:2::11"}
LAN = {4: "192.0.2.0/24", 6: "2001:db8:2::/64"}
MAC = "02:00:c0:00:02:02"


class Msg(dict):
    """A pyroute2 message: header fields by key, attributes through get()."""

    def __init__(self, header, attrs):
        super().__init__(header)
        self.attrs = attrs

    def get(self, key, default=None):
        if key in self.attrs:
            return self.attrs[key]
        return super().get(key, default)


def rule_msg(family, priority, table, proto=210, **attrs):
    header = {"family": family.af, "table": 252, "src_len": 0, "action": 1}
    return Msg(
        header,
        {
            "FRA_PRIORITY": priority,
            "FRA_TABLE": table,
            "FRA_FWMARK": 0xFE,
            "FRA_FWMASK": 0xFF,
            "FRA_PROTOCOL": proto,
            **attrs,
        },
    )


def route_msg(family, table, gateway=None, rtype=1, oif=None, dst=None, dst_len=0):
    header = {
        "family": family.af,
        "table": 252,
        "proto": 210,
        "type": rtype,
        "dst_len": dst_len,
        "flags": 0,
    }
    attrs = {"RTA_TABLE": table, "RTA_GATEWAY": gateway, "RTA_OIF": oif}
    if dst:
        attrs["RTA_DST"] = dst
    return Msg(header, attrs)


def dual_spec(versions=(4, 6), macs=(MAC,)):
    proxy = {
        "address": [PROXY[v] for v in versions],
        "mark": 254,
        "table": 1000254,
        "priority": 1000,
    }
    if macs:
        proxy["macs"] = list(macs)
    proxies = {"master-relay": proxy}
    return model.relay_spec([LAN[v] for v in versions], 0xFF, proxies)


def kernel(rules=(), routes=(), versions=(4, 6), rule_protocol=True):
    return netlink.KernelState(
        rules=tuple(rules),
        routes=tuple(routes),
        networks=tuple(LAN[v] for v in versions),
        addresses=tuple(RELAY[v] for v in versions),
        network_interfaces=tuple((LAN[v], "eth0") for v in versions),
        default_interface="eth0",
        rule_protocol=rule_protocol,
        default_interfaces=tuple((v, "eth0") for v in versions),
    )


def kernel_rule(family, priority=1000, table=1000254, proto=210, fwmark=0xFE, fwmask=0xFF):
    return netlink.KernelRule(priority, table, fwmark, fwmask, proto, 1, (), family=family.version)


# netlink messages -> planner objects, in their family


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_a_kernel_rule_carries_its_family(family):
    rule = netlink._rule_from_msg(rule_msg(family, 1000, 1000254))
    assert rule.family == family.version
    planned = planner.Rule(1000, 0xFE, 0xFF, 1000254, 210, family=family.version)
    assert rule.as_rule() == planned
    assert rule.as_rule().ident == planned.ident
    # 'ip rule' prints what 'ip -6 rule' does, said once up front.
    assert rule.line() == planned.line()


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_a_default_route_is_the_familys_any(family):
    route = netlink._route_from_msg(route_msg(family, 1000254, PROXY[family.version]), {})
    assert route == planner.Route(
        table=1000254, proto=210, gateway=PROXY[family.version], family=family.version
    )
    assert route.dst == family.any
    assert route.line() == f"default via {PROXY[family.version]} table 1000254 proto 210"
    local = netlink._route_from_msg(route_msg(family, 100, rtype=2, oif=1), {1: "lo"})
    assert local.line() == f"local {family.any} dev lo table 100 proto 210"


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_operations_are_made_in_the_family_of_their_route_or_rule(family):
    rule = planner.Rule(1000, 0xFE, 0xFF, 1000254, 210, family=family.version)
    assert netlink._rule_args(rule)["family"] == family.af
    route = planner.Route(1000254, 210, gateway=PROXY[family.version], family=family.version)
    args = netlink._route_args(route, None)
    assert (args["family"], args["dst"], args["gateway"]) == (
        family.af,
        family.any,
        PROXY[family.version],
    )


def test_the_relays_own_address_of_the_gateways_family_is_the_source():
    networks = [IPV4.interface("192.0.2.11/24"), IPV6.interface("2001:db8:2::11/64")]
    assert netlink._own_address_towards(networks, "192.0.2.2") == "192.0.2.11"
    assert netlink._own_address_towards(networks, "2001:db8:2::2") == "2001:db8:2::11"
    assert netlink._own_address_towards(networks, "2001:db8:9::2") is None


@pytest.mark.parametrize(
    ("state", "usable"),
    [(0x02, True), (0x04, True), (0x80, True), (0x01, False), (0x20, False), (0x40, False)],
    ids=["reachable", "stale", "permanent", "incomplete", "failed", "noarp"],
)
def test_neighbour_entries_without_a_usable_mac_are_skipped(state, usable):
    msg = Msg({"state": state}, {"NDA_LLADDR": "02:00:C0:00:02:02"})
    assert netlink._usable_mac(msg) == (MAC if usable else None)


class FakeReader:
    """Neighbour tables per family (netlink's), and the families asked about."""

    def __init__(self, tables):
        self.tables, self.asked = tables, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def neighbours(self, family):
        self.asked.append(family)
        return [
            Msg({"state": 0x02}, {"NDA_DST": address, "NDA_LLADDR": mac})
            for address, mac in self.tables.get(family, {}).items()
        ]


def test_each_address_is_looked_up_in_its_familys_neighbour_table(monkeypatch):
    other = "02:00:c0:00:02:99"
    fake = FakeReader(
        {
            socket.AF_INET: {"192.0.2.2": MAC},
            # The kernel prints an address compressed; the input may not be.
            socket.AF_INET6: {"2001:db8:2::2": other},
        }
    )
    monkeypatch.setattr(netlink, "Reader", lambda: fake)
    found = netlink.neighbour_macs(["192.0.2.2", "2001:db8:2:0::2", "2001:db8:2::3"])
    assert found == {"192.0.2.2": MAC, "2001:db8:2:0::2": other, "2001:db8:2::3": None}
    assert fake.asked == [socket.AF_INET, socket.AF_INET6]
    # Both MACs of a proxy with an address in each family, each once, IPv4's first.
    assert netlink.lookup_macs(["192.0.2.2", "2001:db8:2::2"], resolve=False) == (MAC, other)
    fake.tables[socket.AF_INET6]["2001:db8:2::2"] = MAC
    assert netlink.lookup_macs(["192.0.2.2", "2001:db8:2::2"], resolve=False) == (MAC,)


# The engine: (family, priority)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_another_tools_rule_conflicts_in_its_own_family_only(family):
    other = IPV6 if family is IPV4 else IPV4
    plan = planner.relay_plan(dual_spec((family.version,)))
    beside = kernel([kernel_rule(other, proto=0, table=51820)])
    assert engine.conflicts(plan, beside) == []
    clash = kernel([kernel_rule(family, proto=0, table=51820)])
    (error,) = engine.conflicts(plan, clash)
    assert error.startswith("proxies:master-relay:priority: priority 1000 is already used")


def test_a_dual_stack_proxy_gets_a_rule_and_route_in_each_family_and_a_noop_after():
    plan = planner.relay_plan(dual_spec())
    current = engine.Current(kernel(), None)
    todo = engine.diff(plan, current, _NoFilter)
    assert [(verb, obj.family) for verb, obj in todo.before] == [
        ("route_replace", 4),
        ("route_replace", 6),
        ("rule_add", 4),
        ("rule_add", 6),
    ]
    done = kernel(
        rules=[netlink.KernelRule(1000, 1000254, 0xFE, 0xFF, 210, 1, (), family=v) for v in (4, 6)],
        routes=plan.routes,
    )
    again = engine.diff(plan, engine.Current(done, None), _NoFilter)
    assert not again.before
    assert not again.after


def test_dropping_the_ipv6_address_removes_the_ipv6_rule_and_route_alone():
    before = planner.relay_plan(dual_spec())
    plan = planner.relay_plan(dual_spec((4,)))
    done = kernel(
        rules=[netlink.KernelRule(1000, 1000254, 0xFE, 0xFF, 210, 1, (), family=v) for v in (4, 6)],
        routes=before.routes,
    )
    todo = engine.diff(plan, engine.Current(done, None), _NoFilter)
    assert todo.before == []
    assert [(verb, obj.line()) for verb, obj in todo.after] == [
        ("rule_del", "ipv6 1000: from all fwmark 0xfe/0xff lookup 1000254 proto 210"),
        ("route_del", "default via 2001:db8:2::2 table 1000254 proto 210"),
    ]


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_a_policy_routes_scope_is_its_family_and_priority(family):
    spec = model.policy_route_spec(1000254, PROXY[family.version], 254, 0xFF, 1000)
    plan = planner.policy_route_plan(spec)
    scope = planner.plan_scope(plan)
    assert scope[1] == {(family.version, 1000)}
    other = IPV6 if family is IPV4 else IPV4
    # The same priority's rule of the other family, kept by another policy
    # route, is out of scope: neither compared nor removed.
    have = kernel([kernel_rule(other, proto=212, table=1000253)])
    todo = engine.diff(planner.empty_plan(planner.POLICY), engine.Current(have, None), None, scope)
    assert todo.after == []


def test_rules_are_remembered_with_their_family_and_older_memories_are_ipv4():
    plan = planner.relay_plan(dual_spec())
    old = kernel(rule_protocol=False)
    memory = engine.memory_after(plan, engine.Current(old, None, {}, {}))
    assert memory["rules"] == [[4, 1000, 0xFE, 0xFF, 1000254], [6, 1000, 0xFE, 0xFF, 1000254]]
    # A rule of another tool at the same priority but a different family is not adopted.
    found = old.__class__(
        **{
            **old.__dict__,
            "rules": (
                netlink.KernelRule(1000, 1000254, 0xFE, 0xFF, 0, 1, (), family=4),
                netlink.KernelRule(1000, 1000254, 0xFE, 0xFF, 0, 1, (), family=6),
            ),
        }
    )
    ipv4_plan = planner.relay_plan(dual_spec((4,)))
    adopted = engine.adopt_rules(found, ipv4_plan, {"rules": [[1000, 0xFE, 0xFF, 1000254]]})
    assert [(rule.family, rule.proto) for rule in adopted.rules] == [(4, 210), (6, 0)]


def test_a_proxy_changing_mark_moves_its_connections_once_for_both_families():
    before = planner.relay_plan(dual_spec())
    changed = dual_spec()
    proxy = changed.proxies[0].__class__(
        **{**changed.proxies[0].__dict__, "mark": 253, "table": 1000253}
    )
    after = planner.relay_plan(changed.__class__(changed.lan_networks, 0xFF, (proxy,)))
    have_rules = [
        netlink.KernelRule(1000, 1000254, 0xFE, 0xFF, 210, 1, (), family=v) for v in (4, 6)
    ]
    assert engine.connmark_moves(after, list(before.routes), have_rules) == [
        (0xFE, 0xFF, 0xFD, 0xFF)
    ]


# Proxies checked per family


def test_each_proxy_address_is_checked_on_the_networks_of_its_family(monkeypatch):
    asked = []

    def lookup_macs(addresses, resolve=True):
        asked.append(tuple(addresses))
        return (MAC,)

    monkeypatch.setattr(netlink, "lookup_macs", lookup_macs)
    spec = dual_spec(macs=())
    resolved, interfaces = relayroute_core._resolve_proxies(spec, kernel(), "relayroute")
    assert resolved.proxies[0].macs == (MAC,)
    assert asked == [("192.0.2.2", "2001:db8:2::2")]
    assert interfaces == []

    # An IPv6 address on no IPv6 network of the host (IPv4's is there).
    with pytest.raises(
        Exception,
        match=r"address:1: is not on a connected network of this host "
        r"\(IPv6: \[\]\) \(got '2001:db8:2::2'\)",
    ):
        relayroute_core._resolve_proxies(spec, kernel(versions=(4,)), "relayroute")
    # The host's own IPv6 address, written another way.
    own = dual_spec(macs=())
    own_proxy = own.proxies[0].__class__(
        **{**own.proxies[0].__dict__, "addresses": ("192.0.2.2", "2001:db8:2:0:0::11")}
    )
    with pytest.raises(Exception, match="address:1: is an address of this host"):
        relayroute_core._resolve_proxies(
            own.__class__(own.lan_networks, 0xFF, (own_proxy,)), kernel(), "relayroute"
        )


def test_a_proxy_found_in_neither_table_is_named_with_both_addresses(monkeypatch):
    monkeypatch.setattr(netlink, "lookup_macs", lambda addresses, resolve=True: ())
    with pytest.raises(
        Exception, match="192.0.2.2 and 2001:db8:2::2 did not answer ARP or neighbour"
    ):
        relayroute_core._resolve_proxies(dual_spec(macs=()), kernel(), "")


def test_an_ipv6_proxy_on_another_interface_than_ipv6s_default_is_mark_aware(monkeypatch):
    state = netlink.KernelState(
        (),
        (),
        (LAN[4], LAN[6]),
        (RELAY[4], RELAY[6]),
        ((LAN[4], "eth0"), (LAN[6], "eth1")),
        "eth0",
        True,
        ((4, "eth0"), (6, "eth1")),
    )
    _spec, interfaces = relayroute_core._resolve_proxies(dual_spec(), state, "")
    assert interfaces == []  # each family's proxy is on that family's default interface


# Boot persistence


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_the_restore_script_uses_each_familys_switch(family):
    plan = planner.relay_plan(dual_spec((family.version,)))
    script = persist.restore_script(plan, _NoFilter).splitlines()
    flag = family.ip_flag
    assert (
        f"ip {flag} route replace default via {PROXY[family.version]} table 1000254 proto 210"
        in (script)
    )
    spec = "priority 1000 fwmark 0xfe/0xff lookup 1000254 proto 210"
    assert f"ip {flag} rule show {spec} | grep -q . || ip {flag} rule add {spec}" in script
    other = "-6" if flag == "-4" else "-4"
    assert not [line for line in script if line.startswith(f"ip {other} ")]


def test_the_proxys_restore_script_diverts_both_families():
    spec = model.proxy_spec(1, 100, 100, 0xFF, families=(4, 6))
    script = persist.restore_script(planner.proxy_plan(spec), _NoFilter)
    assert "ip -4 route replace local 0.0.0.0/0 dev lo table 100 proto 211" in script
    assert "ip -6 route replace local ::/0 dev lo table 100 proto 211" in script


def test_network_scripts_put_ipv6_in_route6_and_rule6_files():
    spec = dual_spec()
    files = bootfiles.network_script_lines(planner.relay_plan(spec), kernel())
    assert files == {
        "route-eth0": ["default via 192.0.2.2 dev eth0 table 1000254 proto 210"],
        "route6-eth0": ["default via 2001:db8:2::2 dev eth0 table 1000254 proto 210"],
        "rule-eth0": ["priority 1000 fwmark 0xfe/0xff lookup 1000254 proto 210"],
        "rule6-eth0": ["priority 1000 fwmark 0xfe/0xff lookup 1000254 proto 210"],
    }
    assert bootfiles.route_file("/x", "eth0", 6) == "/x/route6-eth0"
    assert bootfiles.rule_file("/x", "eth0", 4) == "/x/rule-eth0"


def test_an_ipv6_gateway_is_found_on_an_ipv6_network_of_the_host():
    # IPv4 on eth0 only, IPv6 on eth1 only: each route to its own interface.
    state = netlink.KernelState(
        (), (), (LAN[4], LAN[6]), (RELAY[4], RELAY[6]), ((LAN[4], "eth0"), (LAN[6], "eth1"))
    )
    files = bootfiles.network_script_lines(planner.relay_plan(dual_spec()), state)
    assert sorted(files) == ["route-eth0", "route6-eth1", "rule-eth0", "rule6-eth1"]
    lonely = netlink.KernelState((), (), (LAN[4],), (RELAY[4],), ((LAN[4], "eth0"),))
    with pytest.raises(ValueError, match="gateway 2001:db8:2::2"):
        bootfiles.network_script_lines(planner.relay_plan(dual_spec()), lonely)


class _NoFilter:
    """A packet-filter backend with nothing to do (the kernel-state side alone)."""

    NAME = "none"

    @staticmethod
    def transaction(plan, ruleset):
        return None

    @staticmethod
    def restore_commands(plan):
        return []


def _target(tmp_path, ip6tables=True, enabled=("iptables.service", "ip6tables.service")):
    sysconfig = tmp_path / "sysconfig"
    sysconfig.mkdir(parents=True)
    (sysconfig / "iptables").write_text("*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n")
    if ip6tables:
        (sysconfig / "ip6tables").write_text("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")
    wants = tmp_path / "systemd" / "multi-user.target.wants"
    wants.mkdir(parents=True)
    for unit in enabled:
        (wants / unit).touch()
    return persist.Target(
        dir=str(tmp_path / "relayroute"),
        mechanism=persist.NETWORK_SCRIPTS,
        network_scripts_dir=str(sysconfig / "network-scripts"),
        iptables_file=str(sysconfig / "iptables"),
        sysctl_dir=str(tmp_path / "sysctl.d"),
        systemd_dir=str(tmp_path / "systemd"),
    )


def _boot(plan, target):
    from relayroute_core import iptables

    wanted = persist.boot_files(plan, target, kernel(), iptables)
    files = {}
    for path, (kind, ours) in wanted.items():
        old = persist.read_text(path)
        files[path] = (kind, old, persist.merged(kind, old, ours, plan, iptables))
    return files


@pytest.mark.parametrize("versions", [(4,), (4, 6)], ids=["ipv4", "dual-stack"])
def test_network_scripts_keep_the_ipv6_chains_in_ip6tables_saved_file(tmp_path, versions):
    target = _target(tmp_path)
    files = _boot(planner.relay_plan(dual_spec(versions)), target)
    # ip6tables.service's file, beside iptables.service's.
    assert target.saved_file(persist.RULESET6) == str(tmp_path / "sysconfig" / "ip6tables")
    kind, old, new = files[target.saved_file(persist.RULESET6)]
    assert kind == persist.RULESET6
    if versions == (4,):
        assert new == old  # no IPv6 chains: the file is left as it is
    else:
        assert "-A PREROUTING -j RELAYROUTE-RELAY-PRE" in new
        assert new.startswith("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")  # the admin's, kept
    assert "-A PREROUTING -j RELAYROUTE-RELAY-PRE" in files[target.iptables_file][2]
    assert persist.check_host(planner.relay_plan(dual_spec(versions)), target, files, "k") == []


def test_ipv6_chains_need_ip6tables_service_to_restore_them_at_boot(tmp_path):
    plan = planner.relay_plan(dual_spec())
    target = _target(tmp_path, ip6tables=False)
    problems = persist.check_host(plan, target, _boot(plan, target), "k")
    saved = target.saved_file(persist.RULESET6)
    assert problems == [
        f"k: {saved} does not exist, so nothing restores the IPv6 packet filter "
        "at boot; install iptables-services, run 'service ip6tables save' and enable "
        "ip6tables.service, or use mechanism 'unit' (got 'network-scripts')"
    ]
    other = _target(tmp_path / "other", enabled=("iptables.service",))
    (problem,) = persist.check_host(plan, other, _boot(plan, other), "k")
    assert "ip6tables.service is not enabled" in problem
    # An IPv4-only relay needs no ip6tables.service.
    ipv4 = planner.relay_plan(dual_spec((4,)))
    assert persist.check_host(ipv4, other, _boot(ipv4, other), "k") == []


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_a_shadowing_rule_is_named_only_from_the_lookups_family(family):
    other = IPV6 if family is IPV4 else IPV4
    plan = planner.relay_plan(dual_spec())
    lookup = next(item for item in plan.lookups if item.family == family.version and item.mark)
    answers = [(lookup, None, 51820, None, None)]
    shadow = kernel_rule(family, priority=900, table=51820, proto=0)
    beside = kernel_rule(other, priority=900, table=51820, proto=0)
    (named,) = planner.lookup_problems(answers, [beside, shadow])
    assert f"a rule at priority 900 ('{shadow.line()}') shadows relayroute's" in named
    (unnamed,) = planner.lookup_problems(answers, [beside])
    assert "shadows" not in unnamed
    assert "table 51820 answered instead of table 1000254" in unnamed


class FakeDump:
    """One AF_UNSPEC dump of each kind, as a dual-stack relay's kernel answers it."""

    def __init__(self):
        self.asked = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def links(self):
        return {1: "lo", 2: "eth0"}

    def rules(self, family):
        self.asked.append(("rules", family))
        return [
            rule_msg(IPV4, 1000, 1000254),
            rule_msg(IPV6, 1000, 1000254),
            Msg({"family": 128}, {}),  # IPMR's: another family's, skipped
        ]

    def routes(self, family):
        self.asked.append(("routes", family))
        main = {"table": 254, "proto": 3, "type": 1, "dst_len": 0, "flags": 0}
        return [
            Msg({**main, "family": IPV4.af}, {"RTA_OIF": 2, "RTA_GATEWAY": "192.0.2.1"}),
            Msg({**main, "family": IPV6.af}, {"RTA_OIF": 2, "RTA_GATEWAY": "2001:db8:2::1"}),
            Msg({**main, "family": IPV6.af, "flags": netlink.RTM_F_CLONED, "table": 1}, {}),
            *[route_msg(f, 1000254, PROXY[f.version]) for f in FAMILIES],
            Msg({**main, "family": 28}, {}),  # MPLS'
        ]

    def addresses(self, family):
        self.asked.append(("addresses", family))
        return [
            Msg({"family": IPV4.af, "prefixlen": 8, "index": 1}, {"IFA_LOCAL": "127.0.0.1"}),
            Msg({"family": IPV4.af, "prefixlen": 24, "index": 2}, {"IFA_LOCAL": RELAY[4]}),
            Msg({"family": IPV6.af, "prefixlen": 64, "index": 2}, {"IFA_ADDRESS": RELAY[6]}),
        ]


def test_one_dump_of_each_kind_reads_both_families(monkeypatch):
    fake = FakeDump()
    monkeypatch.setattr(netlink, "Reader", lambda: fake)
    state = netlink.read()
    assert fake.asked == [
        ("rules", socket.AF_UNSPEC),
        ("routes", socket.AF_UNSPEC),
        ("addresses", socket.AF_UNSPEC),
    ]
    assert [(rule.family, rule.priority) for rule in state.rules] == [(4, 1000), (6, 1000)]
    assert [route.line() for route in state.routes] == [
        "default via 192.0.2.2 table 1000254 proto 210",
        "default via 2001:db8:2::2 table 1000254 proto 210",
    ]
    assert state.addresses == ("127.0.0.1", RELAY[4], RELAY[6])
    assert state.network_interfaces == ((LAN[4], "eth0"), (LAN[6], "eth0"))
    assert state.default_interfaces == ((4, "eth0"), (6, "eth0"))
    assert state.default_interface == "eth0"
    assert state.default_interface_of(6) == "eth0"
    assert state.rule_protocol
