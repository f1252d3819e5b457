"""The engine's diff and conflict checks over plain data: pure, no root."""

from relayroute_core import engine, iptables, model, netlink, planner
from relayroute_core.planner import Route

MAC = "02:00:c0:00:02:02"


def relay_plan(mark=254, table=1000254, priority=1000, address="192.0.2.2"):
    spec = model.relay_spec(
        ["192.0.2.0/24"],
        0xFF,
        {
            "m": {
                "address": address,
                "mac": MAC,
                "mark": mark,
                "table": table,
                "priority": priority,
            }
        },
    )
    return planner.relay_plan(spec)


def kernel(rules=(), routes=()):
    return netlink.KernelState(tuple(rules), tuple(routes), ("192.0.2.0/24",), ("192.0.2.11",))


def krule(priority, fwmark, fwmask, table, proto, selectors=()):
    return netlink.KernelRule(priority, table, fwmark, fwmask, proto, 1, tuple(selectors))


def current(rules=(), routes=(), save=""):
    return engine.Current(kernel(rules, routes), iptables.parse_save(save))


def test_fresh_host_adds_route_then_rule_then_chains():
    todo = engine.diff(relay_plan(), current(), iptables)
    assert [verb for verb, _ in todo.before] == ["route_replace", "rule_add"]
    assert todo.after == []
    assert todo.transaction
    assert todo.changes["routes"] == {
        "old": [],
        "new": ["default via 192.0.2.2 table 1000254 proto 210"],
    }
    assert todo.changes["rules"]["new"] == [
        "1000: from all fwmark 0xfe/0xff lookup 1000254 proto 210"
    ]
    assert "-A PREROUTING -j RELAYROUTE-RELAY-PRE" in todo.changes["iptables"]["new"]


def test_in_place_means_no_diff():
    plan = relay_plan()
    chains, jumps = iptables.desired(plan)
    save = "*mangle\n" + "\n".join(
        [f"-A {b} {s}" for b, s in jumps]
        + [f":{c} - [0:0]" for c in chains]
        + [f"-A {c} {s}" for c, specs in chains.items() for s in specs]
    )
    state = current(
        rules=[krule(1000, 254, 0xFF, 1000254, 210)],
        routes=[Route(1000254, 210, gateway="192.0.2.2")],
        save=save + "\nCOMMIT\n",
    )
    todo = engine.diff(plan, state, iptables)
    assert not todo
    assert todo.changes == {}


def test_changed_gateway_replaces_route_in_place():
    state = current(
        rules=[krule(1000, 254, 0xFF, 1000254, 210)],
        routes=[Route(1000254, 210, gateway="192.0.2.9")],
    )
    todo = engine.diff(relay_plan(), state, iptables)
    assert todo.before == [("route_replace", Route(1000254, 210, gateway="192.0.2.2"))]
    assert [verb for verb, _ in todo.after] == []


def test_stale_owned_rule_and_route_removed_after():
    state = current(
        rules=[krule(1000, 254, 0xFF, 1000254, 210), krule(1001, 250, 0xFF, 1000250, 210)],
        routes=[
            Route(1000254, 210, gateway="192.0.2.2"),
            Route(1000250, 210, gateway="192.0.2.3"),
        ],
    )
    todo = engine.diff(relay_plan(), state, iptables)
    assert [verb for verb, _ in todo.after] == ["rule_del", "route_del"]
    assert todo.before == []


def test_foreign_rules_and_routes_never_in_the_diff():
    state = current(
        rules=[krule(500, 0x1, 0x1, 51820, 0), krule(1000, 254, 0xFF, 1000254, 210)],
        routes=[Route(51820, 3, gateway="198.51.100.1"), Route(1000254, 210, gateway="192.0.2.2")],
    )
    todo = engine.diff(relay_plan(), state, iptables)
    assert todo.before == []
    assert todo.after == []


def test_conflicts_name_the_key_and_value():
    state = kernel(
        rules=[krule(1000, 0x1, 0x1, 51820, 0)],
        routes=[Route(1000254, 3, gateway="198.51.100.1")],
    )
    errors = engine.conflicts(relay_plan(), state, prefix="relayroute")
    assert any(
        e.startswith("relayroute:proxies:m:priority: priority 1000 is already used") for e in errors
    )
    assert any(
        e.startswith("relayroute:proxies:m:table: table 1000254 already holds") for e in errors
    )
    assert all("(got " in e for e in errors)


def test_other_role_rules_conflict_too():
    state = kernel(rules=[krule(1000, 1, 0xFF, 100, 211)])
    assert engine.conflicts(relay_plan(), state)


def test_undo_of_replace_restores_previous_route():
    old = Route(1000254, 210, gateway="192.0.2.9")
    new = Route(1000254, 210, gateway="192.0.2.2")
    undo = engine._undo_ops(
        [("route_replace", new), ("rule_add", "r")], kernel(routes=[old]), planner.RELAY
    )
    assert undo == [("rule_del", "r"), ("route_replace", old)]


def test_scope_limits_policy_route_diff():
    spec = model.policy_route_spec(1000254, "192.0.2.2", 254, 0xFF, 1000)
    plan = planner.policy_route_plan(spec)
    other = Route(1000250, 212, gateway="192.0.2.3")
    state = current(rules=[krule(1001, 250, 0xFF, 1000250, 212)], routes=[other])
    todo = engine.diff(plan, state, iptables, planner.plan_scope(plan))
    assert [verb for verb, _ in todo.before] == ["route_replace", "rule_add"]
    assert todo.after == []
    assert todo.transaction is None


def test_rules_adopted_by_memory_where_the_kernel_keeps_no_protocol():
    legacy = netlink.KernelState(
        (
            krule(1000, 254, 0xFF, 1000254, 0),
            krule(1001, 250, 0xFF, 1000250, 0),
            krule(900, 0x1, 0x1, 51820, 0),
        ),
        (),
        ("192.0.2.0/24",),
        ("192.0.2.11",),
        rule_protocol=False,
    )
    memory = {"rules": [[1001, 250, 0xFF, 1000250]]}
    adopted = engine.adopt_rules(legacy, relay_plan(), memory)
    assert [rule.proto for rule in adopted.rules] == [210, 210, 0]
    todo = engine.diff(relay_plan(), engine.Current(adopted, iptables.parse_save("")), iptables)
    assert [(verb, obj.priority) for verb, obj in todo.after] == [("rule_del", 1001)]
    modern = legacy.__class__(**{**legacy.__dict__, "rule_protocol": True})
    assert engine.adopt_rules(modern, relay_plan(), memory) is modern
