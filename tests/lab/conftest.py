"""
The lab: the seed's network in namespaces, a real salt-master serving this
checkout as the formula and a pillar describing the lab, and one real
salt-minion inside each Salt-managed host's namespace (``ip netns exec NS``),
with its role in its grains.
"""

import copy

import attr
import pytest
from saltfactories.daemons.minion import SaltMinion

from tests.support import seedlab
from tests.support.haproxy import HAProxyProcess
from tests.support.postfix import PostfixInstance
from tests.support.seedlab import OUTSIDER, assert_states_succeeded, report, states_of

pytestmark = [pytest.mark.lab, pytest.mark.root]


@attr.s(kw_only=True, slots=True)
class NetnsSaltMinion(SaltMinion):
    """A salt-minion started inside a network namespace."""

    netns = attr.ib()

    def cmdline(self, *args):
        return ["ip", "netns", "exec", self.netns, *super().cmdline(*args)]


def lab_pillar(lab):
    return lab.pillar()


REACTOR = {"salt/beacon/*/relayroute/mac": ["salt://relayroute/reactor/follow-mac.sls"]}

TOP = """\
base:
  'roles:relay':
    - match: grain
    - relayroute
  'roles:proxy':
    - match: grain
    - relayroute
"""


@pytest.fixture(scope="package")
def lab():
    built = seedlab.SeedLab()
    try:
        yield built
    finally:
        built.teardown()


@pytest.fixture(scope="package")
def state_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab-state-tree")
    (root / "top.sls").write_text(TOP)
    return root


@pytest.fixture(scope="package")
def pillar_tree(tmp_path_factory):
    return tmp_path_factory.mktemp("lab-pillar-tree")


def write_pillar(pillar_tree, data):
    import yaml

    (pillar_tree / "top.sls").write_text("base:\n  '*':\n    - relayroute\n")
    (pillar_tree / "relayroute.sls").write_text(yaml.safe_dump(data, default_flow_style=False))


@pytest.fixture(scope="package")
def master(salt_factories, lab, state_tree, pillar_tree, formula_tree):
    write_pillar(pillar_tree, lab_pillar(lab))
    factory = salt_factories.salt_master_daemon(
        f"{lab.name}-master",
        overrides={
            "interface": seedlab.MASTER_ADDRESS,
            "file_roots": {"base": [str(state_tree), str(formula_tree)]},
            "pillar_roots": {"base": [str(pillar_tree)]},
            "enable_fqdns_grains": False,
            "log_level_logfile": "info",
            # The formula's reactor for the relayroute beacon (README, "When a
            # proxy's MAC changes"); the beacon runs only where pillar asks.
            "reactor": [REACTOR],
        },
    )
    with factory.started(start_timeout=120):
        yield factory


@pytest.fixture(scope="package")
def minions(master, lab):
    roles = lab.roles()
    started = {}
    factories = {}
    for name, role in roles.items():
        factories[name] = master.salt_minion_daemon(
            name,
            overrides={
                "master": seedlab.MASTER_ADDRESS,
                "grains": {"roles": role},
                "enable_fqdns_grains": False,
                "grains_cache": True,
                "log_level_logfile": "info",
                # A minion's default (salt-factories sets 0.05). Salt runs beacons
                # every second but counts a beacon's 'interval' in loop_intervals.
                "loop_interval": 1,
            },
            factory_class=NetnsSaltMinion,
            netns=lab.ns(name).name,
        )
    try:
        for name, factory in factories.items():
            factory.start(start_timeout=120)
            started[name] = factory
        yield started
    finally:
        for factory in started.values():
            factory.terminate()


@pytest.fixture(scope="package")
def salt_cli(master):
    return master.salt_cli(timeout=180)


@pytest.fixture(scope="package")
def relays_postfix(lab, tmp_path_factory):
    """Real Postfix on 25 and 587 in every relay; mynetworks is the LAN and 203.0.113.0/28."""
    base = tmp_path_factory.mktemp("postfix")
    instances = {}
    try:
        for name, address in lab.relay_addresses.items():
            instance = PostfixInstance(
                lab.ns(name),
                base / name,
                myhostname=f"{name}.lab.example",
                mynetworks=["127.0.0.0/8", *lab.lan_networks, "203.0.113.0/28"],
                inet_interfaces=sorted({address, lab.direct_addresses[name]}),
            )
            instance.start()
            instances[name] = instance
        yield instances
    finally:
        for instance in instances.values():
            instance.stop()


@pytest.fixture
def pillar_data(lab):
    return copy.deepcopy(lab_pillar(lab))


@pytest.fixture(scope="package")
def applied(lab, minions, salt_cli, relays_postfix, tmp_path_factory):
    """The lab after one highstate, with HAProxy running the rendered configuration."""
    lab.ns("client").ip(f"addr add {OUTSIDER}/24 dev eth0")
    first = salt_cli.run("state.highstate", minion_tgt="*", _timeout=300)
    assert first.returncode == 0, first.stdout
    results = states_of(first, minions=list(lab.roles()))
    assert_states_succeeded(results)
    report(
        "first highstate",
        [f"{m}: {sum(bool(s['changes']) for s in st)} states changed" for m, st in results.items()],
    )
    log_dir = tmp_path_factory.mktemp("haproxy")
    haproxy = HAProxyProcess(
        lab.ns("master-relay"), "/etc/haproxy/haproxy.cfg", log_path=log_dir / "haproxy.log"
    )
    haproxy.start()
    try:
        yield {"first": results, "haproxy": haproxy}
    finally:
        haproxy.stop()


@pytest.fixture(scope="package")
def set_pillar(pillar_tree, salt_cli):
    """Serve new pillar data and make every minion refresh it."""

    def serve(data):
        write_pillar(pillar_tree, data)
        ret = salt_cli.run("saltutil.refresh_pillar", "wait=True", minion_tgt="*")
        assert ret.returncode == 0, ret.stdout

    return serve


PROBE_MINION = "client"
# The probe's own source in the client namespace: inside the relays' mynetworks
# (203.0.113.0/28, so a sink message is relayed), and no other test's client:
# its direct sessions' entries (mark 0, TIME_WAIT for 2 minutes) never meet
# another test's checks of the mail client's flows.
PROBE_SOURCE = "203.0.113.14"


@pytest.fixture(scope="module")
def probe_minion(lab, master, minions, formula_tree):
    """
    A salt-minion in the lab's ``client`` namespace (outside the relays' LAN,
    roles ``[probe]``), for ``salt-run relayroute.probe``, and the runner on
    the master (``_runners`` served beside the formula, synced with the
    execution module). Module-scoped, and everything undone at its end: the
    minion, its key and its management link go, so the package's other tests
    target exactly the lab's own minions (``salt '*'``) as before.
    """
    from tests.conftest import ROOT
    from tests.support.netns import run

    client = lab.ns(PROBE_MINION)
    runners = formula_tree / "_runners"
    made_runners = not runners.exists()
    if made_runners:
        runners.symlink_to(ROOT / "_runners", target_is_directory=True)
    made_link = client.name not in lab.mgmt
    if made_link:
        lab._management_link(client)
    client.ip(f"addr add {PROBE_SOURCE}/24 dev eth0")
    factory = master.salt_minion_daemon(
        PROBE_MINION,
        overrides={
            "master": seedlab.MASTER_ADDRESS,
            "grains": {"roles": ["probe"]},
            "enable_fqdns_grains": False,
            "grains_cache": True,
            "log_level_logfile": "info",
        },
        factory_class=NetnsSaltMinion,
        netns=client.name,
    )
    factory.start(start_timeout=120)
    try:
        cli = master.salt_cli(timeout=120)
        synced = cli.run("saltutil.sync_modules", minion_tgt=PROBE_MINION)
        assert synced.returncode == 0, synced.stdout
        salt_run = master.salt_run_cli(timeout=120)
        for what in ("saltutil.sync_modules", "saltutil.sync_runners"):
            synced = salt_run.run(what)
            assert synced.returncode == 0, synced.stdout
        yield factory
    finally:
        factory.terminate()
        master.salt_key_cli().run("-d", PROBE_MINION, "-y")
        client.ip(f"addr del {PROBE_SOURCE}/24 dev eth0", check=False)
        if made_link:
            _address, root_if = lab.mgmt.pop(client.name)
            client.ip("link del mgmt0")
            run(["ip", "link", "del", root_if], check=False)
        if made_runners:
            runners.unlink()
