"""The monitoring check's verdict and metrics over plain data: pure, no root."""

import importlib

from relayroute_core import engine, iptables, model, netlink, planner

# The package's function ``check`` (the Salt function) hides the sub-module's name.
check = importlib.import_module("relayroute_core.check")

MAC = "02:00:c0:00:02:02"
OTHER_MAC = "02:00:c0:00:02:99"


def relay_plan():
    spec = model.relay_spec(
        ["192.0.2.0/24"],
        0xFF,
        {
            "m": {
                "address": "192.0.2.2",
                "mac": MAC,
                "mark": 254,
                "table": 1000254,
                "priority": 1000,
            }
        },
    )
    return planner.relay_plan(spec)


def in_place(plan, extra_rules=()):
    """The kernel exactly as ``plan`` asks, plus ``extra_rules``."""
    chains, jumps = iptables.desired(plan)
    save = "*mangle\n" + "\n".join(
        [f"-A {b} {s}" for b, s in jumps]
        + [f":{c} - [0:0]" for c in chains]
        + [f"-A {c} {s}" for c, specs in chains.items() for s in specs]
    )
    rules = [
        netlink.KernelRule(r.priority, r.table, r.fwmark, r.fwmask, r.proto, 1, ())
        for r in plan.rules
    ] + list(extra_rules)
    kernel = netlink.KernelState(
        tuple(rules), tuple(plan.routes), ("192.0.2.0/24",), ("192.0.2.11",)
    )
    return engine.Current(kernel, iptables.parse_save(save + "\nCOMMIT\n"))


def good_answers(plan):
    proxy, unmarked = plan.lookups
    return [
        (proxy, None, 1000254, "192.0.2.2", None),
        (proxy, "192.0.2.11", 1000254, "192.0.2.2", None),
        (unmarked, None, 254, "192.0.2.1", None),
    ]


def test_everything_as_planned_is_ok():
    plan = relay_plan()
    result = check.verdict(
        plan, in_place(plan), iptables, good_answers(plan), {"m": [("192.0.2.2", MAC, [MAC])]}
    )
    assert result == {
        "ok": True,
        "summary": "relayroute OK: 1 proxies, 1 table routes, 3 route lookups as planned",
        "differences": [],
    }


def test_a_missing_route_and_a_shadowing_rule_are_differences():
    plan = relay_plan()
    current = in_place(plan, [netlink.KernelRule(900, 51820, 0xFE, 0xFF, 4, 1, ())])
    current.kernel = netlink.KernelState(
        current.kernel.rules, (), ("192.0.2.0/24",), ("192.0.2.11",)
    )
    proxy = plan.lookups[0]
    answers = [(proxy, None, 51820, "192.0.2.9", None)]
    result = check.verdict(plan, current, iptables, answers, {}, "relayroute")
    assert result["ok"] is False
    assert result["differences"][0] == (
        "routes: missing 'default via 192.0.2.2 table 1000254 proto 210'"
    )
    assert "a rule at priority 900" in result["differences"][1]
    assert result["summary"].startswith("relayroute DRIFT: 2 differences: routes: missing")


def test_a_neighbour_entry_with_a_mac_relayroute_does_not_mark_is_a_difference():
    plan = relay_plan()
    result = check.verdict(
        plan,
        in_place(plan),
        iptables,
        good_answers(plan),
        {"m": [("192.0.2.2", OTHER_MAC, [MAC])]},
        "relayroute",
    )
    assert result["differences"] == [
        f"relayroute:proxies:m: the neighbour entry of 192.0.2.2 carries {OTHER_MAC}, a MAC "
        f"relayroute does not mark (marks {MAC}): the proxy's MAC changed (got '{OTHER_MAC}')"
    ]
    # No entry at all (it expired) is no difference.
    assert check.verdict(
        plan, in_place(plan), iptables, good_answers(plan), {"m": [("192.0.2.2", None, [MAC])]}
    )["ok"]


def test_metrics_render_drift_lookups_and_flows():
    plan = relay_plan()
    answers = good_answers(plan)
    answers[1] = (plan.lookups[0], "192.0.2.11", 51820, "192.0.2.9", None)
    text = check.metrics({"ok": False}, check.lookup_ok(answers), {0: 3, 0xFE: 2})
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        "relayroute_drift 1",
        'relayroute_proxy_lookup_ok{proxy="m"} 0',
        'relayroute_flows{mark="0x0"} 3',
        'relayroute_flows{mark="0xfe"} 2',
    ]
    assert check.lookup_ok(good_answers(plan)) == {"m": True}


def test_textfile_is_replaced_whole(tmp_path):
    path = tmp_path / "relayroute.prom"
    check.write_textfile(str(path), "relayroute_drift 0\n")
    check.write_textfile(str(path), "relayroute_drift 1\n")
    assert path.read_text() == "relayroute_drift 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["relayroute.prom"]
