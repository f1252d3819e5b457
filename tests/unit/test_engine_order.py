"""
The engine's order of application, recorded: ``converge`` runs against a
simulated host whose netlink operations and packet-filter transactions are
written down in the order they happen. Pure: no root, no kernel.

The order is what keeps live traffic on its path (README, "Live systems"):
new table routes, then new rules, then the packet-filter transaction that
starts marking, then the connmark move of open connections, and only then the
removal of stale rules and routes.
"""

import types

import pytest

from relayroute_core import engine, iptables, model, netlink, planner


def relay_plan(*proxies):
    """A relay's plan for proxies given as (name, address, mark, table, priority)."""
    spec = model.relay_spec(
        ["192.0.2.0/24"],
        0xFF,
        {
            name: {
                "address": address,
                "mac": f"02:00:c0:00:02:{int(address.rsplit('.', 1)[1]):02x}",
                "mark": mark,
                "table": table,
                "priority": prio,
            }
            for name, address, mark, table, prio in proxies
        },
    )
    return planner.relay_plan(spec)


MASTER = ("master-relay", "192.0.2.2", 254, 1000254, 1000)
RENUMBERED = ("master-relay", "192.0.2.2", 253, 1000253, 1000)
NEW_MARK_SAME_TABLE = ("master-relay", "192.0.2.2", 253, 1000254, 1000)
SECOND = ("second", "192.0.2.3", 250, 1000250, 1001)


def save_text(plan):
    """``iptables-save -t mangle`` of a host where ``plan``'s chains are in place."""
    chains, jumps = iptables.desired(plan)
    lines = ["*mangle"]
    lines += [f":{name} - [0:0]" for name in chains]
    lines += [f"-A {builtin} {spec}" for builtin, spec in jumps]
    lines += [f"-A {name} {spec}" for name, specs in chains.items() for spec in specs]
    return "\n".join([*lines, "COMMIT", ""])


class Host:
    """
    A relay as the engine sees it: rules, routes and a ruleset, changed only
    by the operations the engine sends, each written down in ``steps``.
    """

    def __init__(self, plan=None):
        self.rules = {}
        self.routes = {}
        self.save = "*mangle\nCOMMIT\n"
        self.steps = []
        self.target = None  # the plan the packet-filter transaction writes
        if plan is not None:
            for route in plan.routes:
                self.routes[route.key] = route
            for rule in plan.rules:
                self.rules[rule.ident] = self._kernel_rule(rule)
            self.save = save_text(plan)

    @staticmethod
    def _kernel_rule(rule):
        return netlink.KernelRule(
            rule.priority, rule.table, rule.fwmark, rule.fwmask, rule.proto, 1, ()
        )

    def kernel(self):
        return netlink.KernelState(
            tuple(self.rules.values()),
            tuple(self.routes.values()),
            ("192.0.2.0/24",),
            ("192.0.2.11",),
        )

    def run_ops(self, ops):
        for verb, obj in ops:
            if verb == "route_replace":
                self.routes[obj.key] = obj
                self.steps.append(f"{verb} table {obj.table}")
            elif verb == "route_del":
                del self.routes[obj.key]
                self.steps.append(f"{verb} table {obj.table}")
            elif verb == "rule_add":
                self.rules[obj.ident] = self._kernel_rule(obj)
                self.steps.append(f"{verb} {obj.fwmark:#x} -> {obj.table}")
            elif verb == "rule_del":
                del self.rules[obj.ident]
                self.steps.append(f"{verb} {obj.fwmark:#x} -> {obj.table}")
            elif verb == "connmark_move":
                old, _old_mask, new, _new_mask = obj
                self.steps.append(f"{verb} {old:#x} -> {new:#x}")
            else:
                raise AssertionError(f"unexpected operation {verb} {obj!r}")
        return list(ops)

    def route_lookups(self, lookups):
        """The kernel's lookup, simulated: rules by priority, the first table with a route."""
        answers = []
        main = self.routes.get((254, planner.DEFAULT_DST, "unicast"))
        for lookup in lookups:
            if lookup.if_main_default and main is None:
                continue
            for src in (None, "192.0.2.11") if lookup.from_own else (None,):
                table, gateway = 254, main.gateway if main else None
                for rule in sorted(self.rules.values(), key=lambda r: r.priority):
                    route = self.routes.get((rule.table, planner.DEFAULT_DST, "unicast"))
                    if lookup.mark & rule.fwmask == rule.fwmark and route:
                        table, gateway = rule.table, route.gateway
                        break
                answers.append((lookup, src, table, gateway, None))
        return answers

    def backend(self):
        """The iptables backend, with its read and apply on this host."""

        def read():
            return iptables.parse_save(self.save)

        def apply(payload):
            assert payload
            self.steps.append("filter transaction")
            self.save = save_text(self.target)

        fields = {
            name: getattr(iptables, name) for name in dir(iptables) if not name.startswith("_")
        }
        return types.SimpleNamespace(
            **{**fields, "read": read, "read_part": lambda prefix: read(), "apply": apply}
        )


@pytest.fixture
def converge(monkeypatch):
    """``converge(host, plan)``: apply ``plan`` on ``host``; returns the steps taken."""

    def run(host, plan):
        monkeypatch.setattr(netlink, "run_ops", host.run_ops)
        monkeypatch.setattr(netlink, "read", host.kernel)
        monkeypatch.setattr(netlink, "route_lookups", host.route_lookups)
        monkeypatch.setattr(engine.sysctl, "read", lambda keys: {})
        host.target = plan
        backend = host.backend()
        current = engine.Current(host.kernel(), backend.read())
        result = engine.converge(plan, backend, current=current)
        return result["changes"], host.steps

    return run


def test_fresh_host_routes_then_rules_then_marking(converge):
    changes, steps = converge(Host(), relay_plan(MASTER))
    assert steps == [
        "route_replace table 1000254",
        "rule_add 0xfe -> 1000254",
        "filter transaction",
    ]
    assert "connmarks" not in changes


def test_renumbered_proxy_moves_connections_before_the_old_rule_and_table_go(converge):
    changes, steps = converge(Host(relay_plan(MASTER)), relay_plan(RENUMBERED))
    assert changes["connmarks"] == ["0xfe/0xff -> 0xfd/0xff"]
    # The new table and rule first, then the chains (new connections get the
    # new mark), then the open connections' connmark, then removal.
    assert steps[:4] == [
        "route_replace table 1000253",
        "rule_add 0xfd -> 1000253",
        "filter transaction",
        "connmark_move 0xfe -> 0xfd",
    ], steps
    # A stale rule goes before its table's routes: no lookup in an emptied table.
    assert steps[4:] == ["rule_del 0xfe -> 1000254", "route_del table 1000254"], steps


def test_new_mark_on_the_same_table_keeps_the_route_throughout(converge):
    changes, steps = converge(Host(relay_plan(MASTER)), relay_plan(NEW_MARK_SAME_TABLE))
    assert changes["connmarks"] == ["0xfe/0xff -> 0xfd/0xff"]
    assert steps == [
        "rule_add 0xfd -> 1000254",
        "filter transaction",
        "connmark_move 0xfe -> 0xfd",
        "rule_del 0xfe -> 1000254",
    ]


def test_added_proxy_table_and_rule_before_the_chains_that_mark_for_it(converge):
    _changes, steps = converge(Host(relay_plan(MASTER)), relay_plan(MASTER, SECOND))
    assert steps == [
        "route_replace table 1000250",
        "rule_add 0xfa -> 1000250",
        "filter transaction",
    ]


def test_removed_proxy_stops_being_marked_before_its_rule_and_table_go(converge):
    changes, steps = converge(Host(relay_plan(MASTER, SECOND)), relay_plan(MASTER))
    assert "connmarks" not in changes
    assert steps[0] == "filter transaction"
    assert steps[1:] == ["rule_del 0xfa -> 1000250", "route_del table 1000250"]


def test_removal_of_everything_stops_marking_first(converge):
    _changes, steps = converge(Host(relay_plan(MASTER)), planner.empty_plan(planner.RELAY))
    assert steps[0] == "filter transaction"
    assert steps[1:] == ["rule_del 0xfe -> 1000254", "route_del table 1000254"]


def test_a_shadowing_rule_fails_the_lookup_and_everything_is_undone(converge):
    host = Host()
    shadow = netlink.KernelRule(900, 51820, 0xFE, 0xFF, 4, 1, ())
    host.rules[("foreign",)] = shadow
    host.routes[(51820, planner.DEFAULT_DST, "unicast")] = planner.Route(
        51820, 4, gateway="192.0.2.9"
    )
    with pytest.raises(engine.ApplyError) as info:
        converge(host, relay_plan(MASTER))
    message = str(info.value)
    assert "data-path verification failed" in message
    assert (
        "a rule at priority 900 ('900: from all fwmark 0xfe/0xff lookup 51820 proto 4')" in message
    )
    assert "answered via 192.0.2.9 table 51820, expected via 192.0.2.2 table" in message
    assert "the previous state was restored" in message
    # Undone, newest first: the rule, then the route relayroute had added.
    assert [rule for rule in host.rules.values() if rule.proto == planner.RELAY.proto] == []
    assert [route for route in host.routes.values() if route.proto == planner.RELAY.proto] == []


def test_a_shadowing_rule_fails_a_no_op_apply_changing_nothing(converge):
    host = Host(relay_plan(MASTER))
    host.rules[("foreign",)] = netlink.KernelRule(900, 51820, 0, 0, 4, 1, ())
    host.routes[(51820, planner.DEFAULT_DST, "unicast")] = planner.Route(
        51820, 4, gateway="192.0.2.9"
    )
    with pytest.raises(engine.ApplyError, match="nothing was changed"):
        converge(host, relay_plan(MASTER))
    assert host.steps == []
