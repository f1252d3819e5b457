"""
The bad-input corpus (``tests/data/bad_topologies.yaml``) through the formula on
the real kernel: for every malformed or contradictory topology both role
components (``relayroute.relay`` and ``relayroute.proxy``) render only their
one failing state naming the key path and the value, and the host's ruleset,
rules, routes and sysctls are exactly what they were.
"""

import time

import pytest

from tests.support.hosts import plant_foreign_state
from tests.unit.test_bad_topologies import load_cases, pillar_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

CASES = load_cases()
# Both components in one state.sls run: each renders on its own, from the same pillar.
SLS = "relayroute.relay,relayroute.proxy"
INVALID = {"relayroute-relay-invalid-pillar", "relayroute-proxy-invalid-pillar"}
# The sysctls the proxy role (and a careless pillar) would touch.
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv4.ip_nonlocal_bind",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.tcp_tw_reuse",
)


def snapshot(ns):
    """The namespace's rules, routes, full ruleset, and the sysctls that matter."""
    state = ns.snapshot()
    state["sysctls"] = ns.exec(["sysctl", *SYSCTLS]).stdout
    return state


@pytest.fixture
def host(relay_ns):
    """The functional relay namespace, holding other tools' state and loose rp_filter."""
    relay_ns.sysctl("net.ipv4.conf.all.rp_filter", 2)
    plant_foreign_state(relay_ns)
    return relay_ns


def host_overlay(tmp_path):
    """Keep every file the components would write inside tmp_path; no pkg, no service."""
    return {
        "relayroute": {
            "persist": {
                "dir": str(tmp_path / "persist"),
                "systemd_dir": str(tmp_path / "systemd"),
            },
            "proxy": {
                "sysctl_config": str(tmp_path / "sysctl.conf"),
                "sysctl_saved": str(tmp_path / "sysctl-before.yaml"),
            },
            "lookup": {
                "proxy": {
                    "haproxy": {
                        "config": str(tmp_path / "haproxy" / "haproxy.cfg"),
                        "manage_pkg": False,
                        "manage_service": False,
                        "stats_socket": "",
                        "chroot": "",
                    }
                }
            },
        }
    }


def apply_sls(loaders, pillar, test=False):
    ret = loaders.modules.state.sls(SLS, pillar=pillar, test=test)
    if not isinstance(ret.raw, dict):  # a render error: a list of messages
        return ret.raw
    return {state["__id__"]: state for state in ret.raw.values()}


def refusal_problems(case, states):
    """Why ``states`` are not exactly the two refusals naming the case's key and value."""
    if not isinstance(states, dict):
        return f"did not render: {states}"
    if set(states) != INVALID:
        return f"states {sorted(states)} ran, not only {sorted(INVALID)}"
    for sid, state in states.items():
        if state["result"] is not False:
            return f"{sid}: result {state['result']!r}"
        if state["changes"]:
            return f"{sid}: changes {state['changes']!r}"
        if case["expect"] not in state["name"] or case["expect"] not in state["comment"]:
            return f"{sid}: {case['expect']!r} not in {state['comment']!r}"
    return None


def test_every_bad_topology_is_refused_and_changes_nothing(loaders, host, tmp_path):
    overlay = host_overlay(tmp_path)
    written = [
        tmp_path / name
        for name in ("sysctl.conf", "sysctl-before.yaml", "haproxy", "persist", "systemd")
    ]
    failures = []
    tried = 0
    started = time.monotonic()
    with host.entered():
        before = snapshot(host)
        # Control: the unpatched base renders the roles' real states (dry run only).
        dry = apply_sls(loaders, pillar_for({"patch": {}}, overlay), test=True)
        assert isinstance(dry, dict), dry
        assert {"relayroute-relay-policy-routing", "relayroute-proxy-tproxy-divert"} <= set(dry)
        assert all(state["result"] in (None, True) for state in dry.values()), dry
        assert snapshot(host) == before
        assert not [path for path in written if path.exists()]
        for case in CASES:
            states = apply_sls(loaders, pillar_for(case, overlay))
            tried += 1
            problem = refusal_problems(case, states)
            if problem:
                failures.append(f"{case['id']}: {problem}")
            after = snapshot(host)
            if after != before:
                changed = sorted(key for key in before if before[key] != after[key])
                failures.append(f"{case['id']}: the host changed ({', '.join(changed)})")
                break  # every later comparison would be against a changed host
            made = [path.name for path in written if path.exists()]
            if made:
                failures.append(f"{case['id']}: wrote {made}")
                break
    elapsed = time.monotonic() - started
    print(f"\nbad-input corpus: {tried} cases tried through {SLS} in {elapsed:.1f} s")
    assert not failures, "\n".join(failures)
    assert tried == len(CASES)
    assert tried >= 40


# Valid pillars this host refuses: its checks run before any change, and a
# refused role writes nothing either, its boot unit and restore script included.
HOST_REFUSALS = [
    (
        "relay",
        "table holds another tool's routes",
        {"relayroute": {"proxies": {"master-relay-2": {"table": 51820}}}},
        "relayroute:proxies:master-relay-2:table: table 51820 already holds another tool's route",
    ),
    (
        "relay",
        "proxy in a declared LAN but on no connected network",
        {
            "relayroute": {
                "lan_networks": ["192.0.2.0/24", "203.0.113.0/24"],
                "proxies": {"master-relay-2": {"address": "203.0.113.3"}},
            }
        },
        "relayroute:proxies:master-relay-2:address: is not on a connected network",
    ),
    (
        "relay",
        "priority taken by another tool's rule",
        {"relayroute": {"proxies": {"master-relay-2": {"priority": 900}}}},
        "relayroute:proxies:master-relay-2:priority: priority 900 is already used",
    ),
    (
        "proxy",
        "divert table holds another tool's routes",
        {"relayroute": {"proxy": {"divert_table": 51820}}},
        "table 51820 already holds another tool's route",
    ),
    (
        "proxy",
        "divert priority taken by another tool's rule",
        {"relayroute": {"proxy": {"divert_priority": 900}}},
        "priority 900 is already used",
    ),
]


def files_under(root):
    """Every file and link below ``root`` with its content (links: their target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(root))] = f"-> {path.readlink()}"
        elif path.is_file():
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


@pytest.mark.parametrize(
    ("role", "why", "patch", "expect"),
    HOST_REFUSALS,
    ids=[f"{role}: {why}" for role, why, _, _ in HOST_REFUSALS],
)
def test_a_role_the_host_refuses_writes_nothing(loaders, host, tmp_path, role, why, patch, expect):
    # The relay role runs on relay1's minion id; the proxy role on the master-relay's.
    overlay = host_overlay(tmp_path)
    pillar = pillar_for({"patch": patch}, overlay)
    if role == "relay":
        proxies = pillar["relayroute"]["proxies"]
        proxies["master-relay"] = proxies.pop("relayroute-functional")
        pillar["relayroute"]["relays"]["relayroute-functional"] = pillar["relayroute"][
            "relays"
        ].pop("relay1")
    files = tmp_path / "files-root"
    files.mkdir()
    with host.entered():
        before = snapshot(host)
        ret = loaders.modules.state.sls(f"relayroute.{role}", pillar=pillar)
        states = {state["__id__"]: state for state in ret.raw.values()}
        main = (
            "relayroute-relay-policy-routing"
            if role == "relay"
            else "relayroute-proxy-tproxy-divert"
        )
        assert states[main]["result"] is False, states[main]
        assert expect in states[main]["comment"], states[main]["comment"]
        assert not [sid for sid, state in states.items() if state["changes"]], states
        assert snapshot(host) == before
    written = {
        name: files_under(tmp_path / name)
        for name in ("persist", "systemd")
        if (tmp_path / name).exists()
    }
    written.update(
        {
            name: "exists"
            for name in ("sysctl.conf", "sysctl-before.yaml", "haproxy")
            if (tmp_path / name).exists()
        }
    )
    assert not any(written.values()), written
