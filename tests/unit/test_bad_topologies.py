"""
The bad-input corpus (``tests/data/bad_topologies.yaml``) against the pillar's
validation: every malformed or contradictory topology is refused with an error
naming the key path and the value. Pure: no root, no Salt.

``BASE``, ``load_cases`` and ``pillar_for`` are also what the functional test
(``tests/functional/test_bad_input_corpus.py``) applies through the formula.
"""

import copy
import re
from pathlib import Path

import pytest
import yaml

from relayroute_core import topology

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "bad_topologies.yaml"
PARAMETERS = ROOT / "relayroute" / "parameters"
MINION = "relayroute-functional"  # the functional tests' minion id (tests/functional/conftest.py)
DELETE = "__delete__"
REPLACE = "__replace__"

# The seed's topology as in pillar.example, its master-relay named after the
# functional minion so that the proxy role is validated (and applied) too.
BASE = {
    "relayroute": {
        "lan_networks": ["192.0.2.0/24"],
        "mark_mask": 0xFF,
        "ports": [25, 587],
        "priority_base": 1000,
        "proxies": {
            MINION: {
                "address": "192.0.2.2",
                "mac": "02:00:c0:00:02:02",
                "mark": 254,
                "table": 1000254,
                "priority": 1000,
                "vip": "198.51.100.25",
            },
            "master-relay-2": {
                "address": "192.0.2.3",
                "mac": "02:00:c0:00:02:03",
                "mark": 250,
                "table": 1000250,
                "priority": 1001,
                "vip": "198.51.100.26",
            },
        },
        "relays": {
            "relay1": {"address": "192.0.2.11"},
            "relay2": {"address": "192.0.2.12"},
            "relay3": {"address": "192.0.2.13", "ports": [25]},
        },
        "proxy": {
            "divert_mark": 1,
            "divert_table": 100,
            "divert_priority": 100,
            "sysctls": {"net.ipv4.ip_nonlocal_bind": 1},
            "haproxy": {
                "maxconn": 4096,
                "balance": "leastconn",
                "timeouts": {"connect": "5s", "client": "5m", "server": "5m", "check": "10s"},
                "check": {"inter": "10s", "fall": 3, "rise": 2},
            },
        },
        "lookup": {},
    }
}

# "relayroute:<key path>: <problem> (got <value>)"
ERROR_FORM = re.compile(r"^relayroute(:[^:\s][^:]*)*: \S.* \(got .*\)$")


def load_cases():
    return yaml.safe_load(CORPUS.read_text())


def patched(base, patch):
    """``base`` deep-merged with ``patch``: '__delete__' removes, {'__replace__': v} sets v."""
    result = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, str) and value == DELETE:
            result.pop(key, None)
        elif isinstance(value, dict) and set(value) == {REPLACE}:
            result[key] = copy.deepcopy(value[REPLACE])
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = patched(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def pillar_for(case, overlay=None):
    """The case's pillar: BASE, then ``overlay`` (host specifics), then the case's patch."""
    return patched(patched(BASE, overlay or {}), case["patch"])


def _merge_recurse(dest, upd):
    # salt.utils.dictupdate.merge_recurse, as slsutil.merge(strategy='recurse') does it.
    result = copy.deepcopy(dest)
    for key, value in upd.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge_recurse(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def as_map_jinja(pillar, os_family="Debian", osfinger="Debian-12"):
    """What relayroute/map.jinja hands to the validation (a Debian 12 minion by default)."""
    family = yaml.safe_load((PARAMETERS / "os_family" / f"{os_family}.yaml").read_text())
    layers = [
        yaml.safe_load((PARAMETERS / "defaults.yaml").read_text())["values"],
        family.get("values", {}),
        yaml.safe_load((PARAMETERS / "osfinger.yaml").read_text()).get(osfinger) or {},
    ]
    from_pillar = pillar.get("relayroute", {})
    config = {}
    for layer in [*layers, from_pillar.get("lookup", {}), from_pillar]:
        config = _merge_recurse(config, layer)
    config.pop("lookup", None)
    return config


CASES = load_cases()


def test_corpus_is_well_formed():
    assert len(CASES) >= 45
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for case in CASES:
        assert set(case) == {"id", "why", "patch", "expect"}, case
        assert re.fullmatch(r"[a-z0-9-]+", case["id"]), case["id"]
        assert isinstance(case["why"], str), case["id"]
        assert case["why"].strip(), case["id"]
        assert "\n" not in case["why"], case["id"]
        assert isinstance(case["patch"], dict), case["id"]
        assert set(case["patch"]) == {"relayroute"}, case["id"]
        # The expectation names the key path and the value, as the error shows them.
        assert "relayroute:" in case["expect"], case["id"]
        assert "(got " in case["expect"], case["id"]
        assert repr(pillar_for(case)) != repr(BASE), case["id"]


def test_base_is_valid():
    result = topology.topology(copy.deepcopy(BASE["relayroute"]), MINION)
    assert result["errors"] == []
    assert set(result["relay"]["proxies"]) == {MINION, "master-relay-2"}
    assert result["proxy"]["name"] == MINION
    assert [r["ports"] for r in result["proxy"]["relays"]] == [[25, 587], [25, 587], [25]]
    merged = topology.topology(as_map_jinja(BASE), MINION)
    assert merged["errors"] == []
    assert merged["proxy"]["sysctls"] == {"net.ipv4.ip_nonlocal_bind": 1}


@pytest.mark.parametrize("minion_id", ["master-relay", "relay1"])
def test_pillar_example_is_valid(minion_id):
    example = yaml.safe_load((ROOT / "pillar.example").read_text())
    result = topology.topology(example["relayroute"], minion_id)
    assert result["errors"] == []
    assert result["relay"]["proxies"]
    assert (result["proxy"] is not None) == (minion_id == "master-relay")
    merged = topology.topology(as_map_jinja(example), minion_id)
    assert merged["errors"] == []


def _check_refused(result, case):
    errors = result["errors"]
    assert errors, f"{case['id']}: accepted ({case['why']})"
    assert result["relay"] is None
    assert result["proxy"] is None
    assert any(case["expect"] in error for error in errors), (case["expect"], errors)
    malformed = [error for error in errors if not ERROR_FORM.match(error)]
    assert not malformed, malformed


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_topology_is_refused_naming_key_and_value(case):
    pillar = pillar_for(case)
    for minion_id in (MINION, "relay1"):
        _check_refused(topology.topology(copy.deepcopy(pillar["relayroute"]), minion_id), case)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_topology_is_refused_after_the_formula_defaults(case):
    """The same through map.jinja's layers (defaults, os_family, osfinger, lookup, pillar)."""
    _check_refused(topology.topology(as_map_jinja(pillar_for(case)), MINION), case)


@pytest.mark.parametrize(
    ("os_family", "osfinger", "mechanism"),
    [
        ("Debian", "Debian-12", "unit"),
        ("RedHat", "AlmaLinux-9", "unit"),
        ("RedHat", "CentOS Linux-7", "network-scripts"),
        ("RedHat", "Red Hat Enterprise Linux Server-7", "network-scripts"),
    ],
)
def test_boot_persistence_follows_the_distribution(os_family, osfinger, mechanism):
    config = as_map_jinja(pillar_for({"patch": {}}), os_family, osfinger)
    assert config["persist"]["mechanism"] == mechanism
    assert topology.topology(config, MINION)["errors"] == []
    # An operator can still choose, per host, through pillar relayroute:lookup.
    lookup = {"patch": {"relayroute": {"lookup": {"persist": {"mechanism": "unit"}}}}}
    assert as_map_jinja(pillar_for(lookup), os_family, osfinger)["persist"]["mechanism"] == "unit"


def test_validation_is_pure():
    case = {"patch": {"relayroute": {"relays": {"relay1": {"address": ["192.0.2.11"]}}}}}
    pillar = pillar_for(case)
    before = copy.deepcopy(pillar)
    topology.topology(pillar["relayroute"], MINION)
    assert pillar == before


# Values the new checks must keep accepting.


def test_relay_ports_are_normalised_for_haproxy():
    case = {"patch": {"relayroute": {"relays": {"relay3": {"ports": ["25"]}}}}}
    result = topology.topology(pillar_for(case)["relayroute"], MINION)
    assert result["errors"] == []
    assert result["proxy"]["relays"][2] == {
        "name": "relay3",
        "address": "192.0.2.13",
        "ports": [25],
    }


def test_a_port_repeated_in_another_spelling_is_still_a_repeat():
    case = {"patch": {"relayroute": {"ports": [25, 587, "25"]}}}
    result = topology.topology(pillar_for(case)["relayroute"], MINION)
    assert result["errors"] == ["relayroute:ports:2: repeats port 25 (item 0) (got '25')"]


# A mask other than 0xff: the proxy role's defaults follow it.
MASKED = {
    "patch": {
        "relayroute": {
            "mark_mask": 0xF0,
            "proxies": {MINION: {"mark": 0x20}, "master-relay-2": {"mark": 0x30}},
            "proxy": "__delete__",
        }
    }
}


def test_a_valid_mask_needs_no_proxy_section():
    """Marks 0x20 and 0x30 under 0xf0, no 'proxy:' at all: the divert mark is 0x10."""
    for config in (pillar_for(MASKED)["relayroute"], as_map_jinja(pillar_for(MASKED))):
        result = topology.topology(config, MINION)
        assert result["errors"] == []
        assert result["relay"]["mark_mask"] == 0xF0
        assert result["proxy"]["mark_mask"] == 0xF0
        assert result["proxy"]["divert_mark"] == 0x10
        assert topology.topology(config, "relay1")["errors"] == []


def test_the_proxy_role_may_have_a_mask_of_its_own():
    """The proxy box's other mark users are not the relays': proxy:mark_mask."""
    case = {"patch": {"relayroute": {"proxy": {"mark_mask": 0xF000, "divert_mark": "__delete__"}}}}
    own = topology.topology(as_map_jinja(pillar_for(case)), MINION)
    assert own["errors"] == []
    assert (own["proxy"]["mark_mask"], own["proxy"]["divert_mark"]) == (0xF000, 0x1000)
    assert own["relay"]["mark_mask"] == 0xFF


def test_addresses_are_normalised_before_comparing():
    same = {"patch": {"relayroute": {"relays": {"relay2": {"address": " 192.0.2.11 "}}}}}
    errors = topology.topology(pillar_for(same)["relayroute"], MINION)["errors"]
    assert errors == [
        "relayroute:relays:relay2:address: is also relay 'relay1''s (got ' 192.0.2.11 ')"
    ]
    spaced = {"patch": {"relayroute": {"relays": {"relay2": {"address": " 192.0.2.12"}}}}}
    result = topology.topology(pillar_for(spaced)["relayroute"], MINION)
    assert result["errors"] == []
    assert result["proxy"]["relays"][1]["address"] == "192.0.2.12"


@pytest.mark.parametrize(
    "patch",
    [
        {"proxy": {"sysctls": {"net.ipv4.tcp_rmem": "4096 131072 6291456"}}},
        {"proxy": {"sysctls": {"net.ipv4.tcp_tw_reuse": 1}}},
        {"proxy": {"sysctls": None}},
        {"proxy": {"haproxy": {"stats_socket": "", "chroot": "", "manage_pkg": False}}},
        {"proxy": {"haproxy": {"timeouts": {"connect": 5000, "queue": "1m"}}}},
        {"proxy": {"sysctl_config": "/etc/sysctl.d/90-relayroute.conf"}},
        {"proxy": {"sysctl_saved": "/etc/relayroute/sysctl-before.yaml"}},
        {"backend": "iptables"},
        {"lan_networks": ["192.0.2.0/24", "10.0.0.0/8"]},
        {"proxies": {MINION: {"vip": "192.0.2.2"}}},
        {"proxies": {"master-relay-2": {"vip": "198.51.100.25"}}},  # a VIP shared by keepalived
        {"relays": {"relay1": {"ports": [587, 25]}, "relay2": {"ports": [25]}}},
    ],
)
def test_good_variants_stay_valid(patch):
    pillar = pillar_for({"patch": {"relayroute": patch}})
    assert topology.topology(pillar["relayroute"], MINION)["errors"] == []
    assert topology.topology(as_map_jinja(pillar), MINION)["errors"] == []


def test_a_relay_the_pillar_does_not_list_gets_a_warning():
    config = as_map_jinja(BASE)
    assert topology.topology(config, "relay1")["unlisted_relay"] is None
    assert topology.topology(config, MINION)["unlisted_relay"] is None  # a proxy
    result = topology.topology(config, "relay11")
    assert result["errors"] == []
    assert result["unlisted_relay"] == (
        "relayroute:relays: has no entry for this minion id 'relay11': it gets reply routing, "
        "but HAProxy sends it no mail (relays: relay1, relay2, relay3); did you mean 'relay1'?"
    )


def test_ha_pair_macs_reach_the_relay_arguments():
    config = copy.deepcopy(BASE["relayroute"])
    config["proxies"][MINION]["macs"] = ["02:00:c0:00:02:0a", "02:00:C0:00:02:0B"]
    result = topology.topology(config, "relay1")
    assert result["errors"] == []
    entry = result["relay"]["proxies"][MINION]
    assert entry["mac"] == "02:00:c0:00:02:02"
    assert entry["macs"] == ["02:00:c0:00:02:02", "02:00:c0:00:02:0a", "02:00:c0:00:02:0b"]
    # One MAC stays the plain 'mac' it was.
    assert "macs" not in result["relay"]["proxies"]["master-relay-2"]


@pytest.mark.parametrize("node", ["haproxy-a", "haproxy-b"])
def test_each_node_of_an_ha_pair_gets_its_proxy_role(node):
    config = copy.deepcopy(BASE["relayroute"])
    config["proxies"]["master-relay-2"]["nodes"] = ["haproxy-a", "haproxy-b"]
    result = topology.topology(config, node)
    assert result["errors"] == []
    assert result["proxy"]["name"] == node  # HAProxy's EHLO names the node
    assert result["proxy"]["vip"] == "198.51.100.26"
    assert result["unlisted_relay"] is None
    assert "nodes" not in result["relay"]["proxies"]["master-relay-2"]
    assert topology.topology(config, "haproxy-c")["proxy"] is None
