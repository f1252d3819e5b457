"""pillar.example is real: it renders both components (state.show_sls) on a minion."""

import copy

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.root

MINION = "relayroute-functional"


def example(as_proxy=None):
    data = yaml.safe_load((ROOT / "pillar.example").read_text())
    data = copy.deepcopy(data)
    if as_proxy:
        proxies = data["relayroute"]["proxies"]
        proxies[MINION] = proxies.pop(as_proxy)
    return data


def rendered(loaders, sls, pillar):
    ret = loaders.modules.state.show_sls(sls, pillar=pillar)
    assert isinstance(ret, dict), ret
    return ret


def test_relay_component_renders_the_example(loaders):
    states = rendered(loaders, "relayroute.relay", example())
    present = states["relayroute-relay-policy-routing"]["relayroute"]
    args = {key: value for item in present if isinstance(item, dict) for key, value in item.items()}
    assert args["lan_networks"] == ["192.0.2.0/24"]
    assert set(args["proxies"]) == {"master-relay", "master-relay-2"}
    assert args["proxies"]["master-relay-2"]["mark"] == 250
    assert args["watcher"]["enabled"] is True  # the units: the state's boot files
    # This minion is no relay of the example: a warning, not a failure.
    warning = states["relayroute-relay-not-in-pillar"]["test"]
    text = next(item["text"] for item in warning if isinstance(item, dict) and "text" in item)
    assert text.startswith("WARNING: relayroute:relays: has no entry for this minion id")


def test_a_listed_relay_gets_no_warning(loaders):
    data = example()
    data["relayroute"]["relays"][MINION] = data["relayroute"]["relays"].pop("relay1")
    states = rendered(loaders, "relayroute.relay", data)
    assert "relayroute-relay-policy-routing" in states
    assert "relayroute-relay-not-in-pillar" not in states


def test_proxy_component_renders_the_example(loaders):
    states = rendered(loaders, "relayroute.proxy", example(as_proxy="master-relay"))
    assert "relayroute-proxy-tproxy-divert" in states
    assert "relayroute-proxy-haproxy-config" in states
    # The example asks for no sysctl, as the defaults (transparent binds need none).
    assert not [name for name in states if name.startswith("relayroute-proxy-sysctl-net.")]
    assert not [name for name in states if "invalid" in name]
