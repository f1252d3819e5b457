"""
The mine-fed variant of the lab (issue 12): the seed's network with a second
HAProxy box on the shelf, the same salt-master, Postfix relays and HAProxy,
and a pillar that names no relay and no proxy MAC: HAProxy's backends and the
MACs the relays mark come from the Salt mine's relayroute records.

    client ── inet ──┬── gw ───────────── LAN 192.0.2.0/24 ── relay1..3 (.11-.13)
                     ├── master-relay  (LAN .2, VIP 198.51.100.25, uplink .4/30)
                     └── master-relay2 (LAN .3, VIP 198.51.100.26, uplink .8/30)

Only master-relay, relay1 and relay2 run a salt-minion at first; relay3
(network and Postfix up) and master-relay2 (network up) are started by the
tests (``fleet.start``), as an operator adds a host.
"""

import copy
import time

import pytest
import yaml

from tests.lab.conftest import *  # noqa: F403 - the lab's fixtures, for this package
from tests.lab.conftest import NetnsSaltMinion, write_pillar
from tests.support import seedlab
from tests.support.haproxy import HAProxyProcess
from tests.support.netns import veth
from tests.support.seedlab import SeedLab, assert_states_succeeded, overlay_path, states_of

pytestmark = [pytest.mark.lab, pytest.mark.root]

PROXY2 = "master-relay2"
PROXY2_LAN = "192.0.2.3"
VIP2 = "198.51.100.26"
PROXY2_UPLINK = ("198.51.100.9", "198.51.100.10")  # inet's end, master-relay2's (.8/30)
# What the minions that come later run as (their grain), and who runs from the start.
LATER = {"relay3": ["relay"], PROXY2: ["proxy"]}
MINE_FUNCTIONS = {"relayroute": {"mine_function": "relayroute.mine_record"}}
HAPROXY_CFG = "/etc/haproxy/haproxy.cfg"


class MineLab(SeedLab):
    """The seed lab plus ``master-relay2``'s namespace, uplink and LAN port."""

    name = "mine"

    def _build(self):
        super()._build()
        inet, lan = self.hosts["inet"], self.hosts["lan"]
        proxy2 = self.host(PROXY2)
        inet_end, own_end = PROXY2_UPLINK
        veth(inet, "p1", proxy2, "up0")
        inet.ip(f"addr add {inet_end}/30 dev p1")
        proxy2.ip(f"addr add {own_end}/30 dev up0")
        proxy2.ip(f"addr add {VIP2}/32 dev lo")
        inet.ip(f"route add {VIP2}/32 via {own_end}")
        proxy2.ip(f"route add default via {inet_end}")
        veth(proxy2, "lan0", lan, "l-mr2")
        lan.ip("link set l-mr2 master br0")
        proxy2.ip(f"addr add {PROXY2_LAN}/24 dev lan0")
        proxy2.sysctl("net.ipv4.conf.all.rp_filter", 0)
        proxy2.sysctl("net.ipv4.conf.default.rp_filter", 0)
        self._management_link(proxy2)

    def roles(self):
        """The minions running from the start: master-relay, relay1, relay2."""
        return {"master-relay": ["proxy"], "relay1": ["relay"], "relay2": ["relay"]}

    def pillar(self):
        """
        The seed's pillar with the mine on, ``relays_from_mine``, no
        ``relays`` and no proxy MAC (the seed names none), and the mine
        function every minion publishes.
        """
        data = super().pillar()
        config = data["relayroute"]
        del config["relays"]
        config["mine"] = {"enabled": True, "max_age": 7200}
        config["relays_from_mine"] = True
        data["mine_functions"] = copy.deepcopy(MINE_FUNCTIONS)
        return data

    def proxy2_entry(self):
        """master-relay2's pillar entry: what an operator writes (no MAC: the mine has it)."""
        return {"address": PROXY2_LAN, "vip": VIP2, "mark": 253, "table": 1000253}

    def haproxy_cfg(self, name):
        return overlay_path(self.ns(name), HAPROXY_CFG).read_text()


def servers(cfg_text):
    """``{backend: [(server name, address:port)]}`` of an HAProxy configuration."""
    found, backend = {}, None
    for line in cfg_text.splitlines():
        words = line.split()
        if words[:1] == ["backend"]:
            backend = words[1]
            found[backend] = []
        elif words[:1] == ["server"] and backend:
            found[backend].append((words[1], words[2]))
        elif words and not line[:1].isspace():
            backend = None
    return found


def pillar_diff(old, new, path=""):
    """The differences of two pillars, as ``key:path: old -> new`` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}:{key}" if path else str(key)
            if key not in old:
                lines.append(f"+ {sub}: {new[key]!r}")
            elif key not in new:
                lines.append(f"- {sub}: {old[key]!r}")
            else:
                lines += pillar_diff(old[key], new[key], sub)
        return lines
    return [] if old == new else [f"~ {path}: {old!r} -> {new!r}"]


@pytest.fixture(scope="package")
def lab():
    built = MineLab()
    try:
        yield built
    finally:
        built.teardown()


class Fleet:
    """The lab's salt-minions: started, stopped, and targeted by list."""

    def __init__(self, master, lab, salt_cli, pillar_tree):
        self.master, self.lab, self.salt_cli = master, lab, salt_cli
        self.pillar_tree = pillar_tree
        self.running = {}
        self.served = None

    def start(self, name, roles):
        factory = self.master.salt_minion_daemon(
            name,
            overrides={
                "master": seedlab.MASTER_ADDRESS,
                "grains": {"roles": roles},
                "enable_fqdns_grains": False,
                "grains_cache": True,
                "log_level_logfile": "info",
                "loop_interval": 1,
            },
            factory_class=NetnsSaltMinion,
            netns=self.lab.ns(name).name,
        )
        factory.start(start_timeout=120)
        self.running[name] = factory
        return factory

    def stop(self, name):
        """The minion gone (its key stays accepted, its mine data on the master)."""
        self.running.pop(name).terminate()

    def names(self):
        return sorted(self.running)

    def run(self, fun, *args, tgt=None, timeout=300):
        """``salt -L <tgt or every running minion> fun args``; asserts it returned."""
        tgt = tgt or self.names()
        ret = self.salt_cli.run("-L", fun, *args, minion_tgt=",".join(tgt), _timeout=timeout)
        assert ret.returncode == 0, ret.stdout
        return ret

    def call(self, fun, *args, tgt=None):
        """``{minion: return}`` of ``run`` (salt-factories unwraps one minion's return)."""
        tgt = tgt or self.names()
        data = self.run(fun, *args, tgt=tgt).data
        return {tgt[0]: data} if len(tgt) == 1 else data

    def highstate(self, *names):
        """``state.highstate`` of ``names``: ``{minion: [states]}``, every state succeeded."""
        ret = self.run("state.highstate", tgt=list(names))
        results = states_of(ret, target=names[0], minions=list(names))
        assert_states_succeeded(results)
        return results

    def serve_pillar(self, data):
        """Serve ``data`` as the pillar and make every running minion refresh it."""
        write_pillar(self.pillar_tree, data)
        self.served = copy.deepcopy(data)
        self.run("saltutil.refresh_pillar", "wait=True")

    def pillar_file(self):
        return yaml.safe_load((self.pillar_tree / "relayroute.sls").read_text())


@pytest.fixture(scope="package")
def fleet(master, lab, salt_cli, pillar_tree):
    built = Fleet(master, lab, salt_cli, pillar_tree)
    try:
        for name, roles in lab.roles().items():
            built.start(name, roles)
        yield built
    finally:
        for factory in built.running.values():
            factory.terminate()


@pytest.fixture(scope="package")
def minions(fleet):
    return fleet.running


@pytest.fixture(scope="package")
def haproxies(lab, tmp_path_factory):
    """``{proxy: HAProxyProcess}``: HAProxy as each proxy box's service would run it."""
    log_dir = tmp_path_factory.mktemp("haproxy")
    started = {}

    class Started(dict):
        def start(self, name):
            self[name] = HAProxyProcess(
                lab.ns(name), HAPROXY_CFG, log_path=log_dir / f"{name}.log"
            ).start()
            return self[name]

    started = Started()
    try:
        yield started
    finally:
        for haproxy in started.values():
            haproxy.stop()


@pytest.fixture(scope="package")
def applied(lab, fleet, relays_postfix, haproxies):
    """
    The first deployment: modules synced and every minion's record published
    (``saltutil.sync_all``, ``mine.update``), then one highstate of every
    minion; HAProxy runs master-relay's configuration.
    """
    started = time.monotonic()
    fleet.run("saltutil.sync_all")
    fleet.run("mine.update")
    results = fleet.highstate(*fleet.names())
    haproxies.start("master-relay")
    seedlab.report(
        "first deployment (sync_all, mine.update, highstate)",
        [
            *(f"{m}: {sum(bool(s['changes']) for s in st)} states changed"
              for m, st in results.items()),
            f"took {time.monotonic() - started:.1f} s",
        ],
    )  # fmt: skip
    return results
