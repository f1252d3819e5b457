"""Validation of a relay's and a proxy's inputs: pure, no root."""

import pytest

from relayroute_core import model

GOOD_PROXY = {"address": "192.0.2.2", "mark": 254, "table": 1000254, "priority": 1000}


def relay(**over):
    args = {
        "lan_networks": ["192.0.2.0/24"],
        "mark_mask": 0xFF,
        "proxies": {"master-relay": dict(GOOD_PROXY)},
    }
    args.update(over)
    return model.relay_spec(**args)


def errors_of(**over):
    with pytest.raises(model.InputError) as info:
        relay(**over)
    return info.value.errors


def test_good_input_normalises():
    spec = relay(
        mark_mask="0xff",
        proxies={"m": {**GOOD_PROXY, "mac": "02:00:C0:00:02:02", "mark": "0xfe"}},
    )
    assert spec.mark_mask == 0xFF
    assert spec.proxies[0].mac == "02:00:c0:00:02:02"
    assert spec.proxies[0].mark == 0xFE
    assert spec.lan_networks == ("192.0.2.0/24",)


def test_proxies_as_list_with_names():
    spec = relay(proxies=[{"name": "m", **GOOD_PROXY}])
    assert spec.proxies[0].name == "m"


def test_proxies_sorted_by_priority():
    spec = relay(
        proxies={
            "b": {**GOOD_PROXY, "priority": 1001},
            "a": {"address": "192.0.2.3", "mark": 250, "table": 1000250, "priority": 999},
        }
    )
    assert [p.name for p in spec.proxies] == ["a", "b"]


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"lan_networks": []}, "lan_networks: must be a non-empty list"),
        ({"lan_networks": ["192.0.2.1/24"]}, "lan_networks:0: has host bits set"),
        ({"lan_networks": ["192.0.2.0/33"]}, "lan_networks:0: is not a valid network"),
        ({"lan_networks": "192.0.2.0/24"}, "lan_networks: must be a non-empty list"),
        ({"mark_mask": 0}, "mark_mask: must be between 1"),
        ({"mark_mask": "ff"}, "mark_mask: must be a 32-bit mask"),
        ({"mark_mask": 2**32}, "mark_mask: must be between 1"),
        ({"mark_mask": True}, "mark_mask: must be a 32-bit mask"),
        ({"proxies": {}}, "proxies: must list at least one proxy"),
        ({"proxies": "master-relay"}, "proxies: must be a mapping"),
        ({"proxies": {"m": {**GOOD_PROXY, "mark": 0}}}, "proxies:m:mark: must not be 0"),
        ({"proxies": {"m": {**GOOD_PROXY, "mark": 256}}}, "proxies:m:mark: has bits outside"),
        ({"proxies": {"m": {**GOOD_PROXY, "table": 254}}}, "reserved 'main' table"),
        ({"proxies": {"m": {**GOOD_PROXY, "table": 0}}}, "reserved 'unspec' table"),
        ({"proxies": {"m": {**GOOD_PROXY, "table": 253}}}, "reserved 'default' table"),
        ({"proxies": {"m": {**GOOD_PROXY, "table": 255}}}, "reserved 'local' table"),
        ({"proxies": {"m": {**GOOD_PROXY, "priority": 32766}}}, "'lookup main' rule"),
        ({"proxies": {"m": {**GOOD_PROXY, "priority": 0}}}, "'lookup local' rule"),
        ({"proxies": {"m": {**GOOD_PROXY, "address": "192.0.2.300"}}}, "not a valid IPv4 or IPv6"),
        ({"proxies": {"m": {**GOOD_PROXY, "mac": "02:00:c0:00:02"}}}, "is not a MAC address"),
        ({"proxies": {"m": {**GOOD_PROXY, "mac": "01:00:5e:00:00:01"}}}, "multicast MAC"),
        ({"proxies": {"m": {**GOOD_PROXY, "colour": "red"}}}, "proxies:m:colour: is not a known"),
        ({"proxies": {"m": {"address": "192.0.2.2"}}}, "proxies:m:mark: is required"),
        ({"proxies": {"m": "192.0.2.2"}}, "proxies:m: must be a mapping"),
    ],
)
def test_bad_input_names_key_and_value(over, expected):
    errors = errors_of(**over)
    assert any(expected in error for error in errors), errors
    assert all("(got " in error for error in errors)


@pytest.mark.parametrize("attribute", ["mark", "table", "priority", "address", "mac"])
def test_duplicates_between_proxies_are_refused(attribute):
    first = {**GOOD_PROXY, "mac": "02:00:00:00:00:01"}
    second = {
        "address": "192.0.2.3",
        "mark": 250,
        "table": 1000250,
        "priority": 1001,
        "mac": "02:00:00:00:00:02",
    }
    second[attribute] = first[attribute]
    errors = errors_of(proxies={"a": first, "b": second})
    assert any(f"proxies:b:{attribute}" in e and "also the" in e for e in errors), errors


def test_all_errors_reported_at_once_with_prefix():
    with pytest.raises(model.InputError) as info:
        model.relay_spec(["nope"], 0, {"m": {**GOOD_PROXY, "mark": 0}}, prefix="relayroute")
    text = str(info.value)
    assert "relayroute:lan_networks:0" in text
    assert "relayroute:mark_mask" in text
    assert "relayroute:proxies:m:mark" in text


def test_proxy_spec_defaults_and_errors():
    spec = model.proxy_spec()
    assert (spec.divert_mark, spec.divert_table, spec.divert_priority) == (1, 100, 100)
    # The default divert mark is the mask's lowest bit, valid for every mask.
    for mask, mark in ((0xF0, 0x10), (0xFF00, 0x100), (0x80000000, 0x80000000), (0x6, 0x2)):
        assert model.proxy_spec(mark_mask=mask).divert_mark == mark
    with pytest.raises(
        model.InputError, match="divert_table: is the kernel's reserved 'local' table \\(got 255\\)"
    ):
        model.proxy_spec(divert_table=255)
    with pytest.raises(model.InputError, match="divert_mark: has bits outside"):
        model.proxy_spec(divert_mark=0x100, mark_mask=0xFF)


def test_policy_route_needs_explicit_priority():
    with pytest.raises(model.InputError, match="priority: is required"):
        model.policy_route_spec(1000254, "192.0.2.2", 254, 0xFF, None)


def test_macs_are_the_union_mac_first():
    spec = relay(
        proxies={
            "m": {**GOOD_PROXY, "mac": "02:00:00:00:00:0A", "macs": ["02:00:00:00:00:0b"]},
            "n": {
                "address": "192.0.2.3",
                "mark": 250,
                "table": 1000250,
                "priority": 1001,
                "macs": ["02:00:00:00:00:0c", "02:00:00:00:00:0d"],
            },
        }
    )
    by_name = {p.name: p for p in spec.proxies}
    assert by_name["m"].macs == ("02:00:00:00:00:0a", "02:00:00:00:00:0b")
    assert by_name["m"].mac == "02:00:00:00:00:0a"
    assert by_name["n"].macs == ("02:00:00:00:00:0c", "02:00:00:00:00:0d")
    assert by_name["n"].mac == "02:00:00:00:00:0c"  # 'mac' keeps working: the first


def test_mac_repeated_in_macs_counts_once():
    spec = relay(
        proxies={"m": {**GOOD_PROXY, "mac": "02:00:00:00:00:0a", "macs": ["02:00:00:00:00:0A"]}}
    )
    assert spec.proxies[0].macs == ("02:00:00:00:00:0a",)


def test_neither_mac_nor_macs_leaves_it_to_arp():
    assert relay().proxies[0].macs == ()
    assert relay().proxies[0].mac is None


@pytest.mark.parametrize(
    ("macs", "expected"),
    [
        (
            ["02:00:00:00:00:0a", "02:00:00:00:00:0A"],
            "proxies:m:macs:1: is listed twice (also macs:0) (got '02:00:00:00:00:0A')",
        ),
        (
            ["02:00:00:00:00:0a", "02:00:00:00:0b"],
            "proxies:m:macs:1: is not a MAC address like 02:00:c0:00:02:02 (got '02:00:00:00:0b')",
        ),
        (
            ["01:00:5e:00:00:01"],
            "proxies:m:macs:0: is a multicast MAC address",
        ),
        ("02:00:00:00:00:0a", "proxies:m:macs: must be a non-empty list of MAC addresses"),
        ([], "proxies:m:macs: must be a non-empty list of MAC addresses (got [])"),
    ],
)
def test_bad_macs_name_the_index(macs, expected):
    errors = errors_of(proxies={"m": {**GOOD_PROXY, "macs": macs}})
    assert any(expected in error for error in errors), errors


def test_a_mac_under_two_proxies_is_refused():
    errors = errors_of(
        proxies={
            "a": {**GOOD_PROXY, "macs": ["02:00:00:00:00:0a", "02:00:00:00:00:0b"]},
            "b": {
                "address": "192.0.2.3",
                "mark": 250,
                "table": 1000250,
                "priority": 1001,
                "mac": "02:00:00:00:00:0c",
                "macs": ["02:00:00:00:00:0B"],
            },
        }
    )
    assert errors == [
        "proxies:b:macs:0: is also the mac of proxy 'a'; each proxy needs its own "
        "(got '02:00:00:00:00:0B')"
    ]
