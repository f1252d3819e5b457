"""
Shared fixtures. The engine's pure sub-modules are importable as ``relayroute.*``
(the ``_modules/relayroute_core`` package) for unit tests that need neither root nor Salt.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The engine's sources stay free of __pycache__: the SPM package is built from
# this tree (FORMULA's files list) and must hold sources only.
sys.dont_write_bytecode = True
sys.path.insert(0, str(ROOT / "_modules"))
sys.path.insert(0, str(ROOT))

from tests.support import netns as netns_support  # noqa: E402

# relayroute's host lock (engine.LOCK_PATH) for this run's applies, in-process
# and in the minions the labs start (they inherit the environment): nothing is
# left in the host's /run, and runs never wait on each other.
LOCK_PATH = f"/tmp/{netns_support.RUN_PREFIX}-relayroute.lock"
os.environ.setdefault("RELAYROUTE_LOCK", LOCK_PATH)


@pytest.fixture(scope="session")
def salt_factories_config():
    """
    pytest-salt-factories' settings: daemons it started are stopped with
    SIGKILL, children included (``slow_stop`` off). Its default, a SIGTERM
    and up to 2 s of waiting per process of a daemon's tree (kept for
    coverage data, which this suite does not collect), made each lab
    package's teardown 21 s; now 6 s.
    """
    return {"slow_stop": False}


def is_root():
    return os.geteuid() == 0


def needs_root(item):
    return "root" in item.keywords or "lab" in item.keywords


def without_root(environ, root, wanted):
    """
    What happens to the ``wanted`` tests that need root when ``root`` is False:
    ``None`` (nothing to do), ``"skip"`` on a developer's machine, or an error
    message under CI (``CI=true``), where green on unit tests alone would lie.
    """
    if root or not wanted:
        return None
    if environ.get("CI", "").lower() in ("true", "1", "yes"):
        return (
            f"CI={environ['CI']}: {wanted} tests need root and network namespaces, and this run "
            "is not root; under CI a skip for lack of root is a failure"
        )
    return "skip"


def pytest_addoption(parser):
    parser.addoption(
        "--fleet",
        action="store_true",
        default=False,
        help="also run the fleet-scale lab (tests/lab_fleet: a salt-master, 2 proxies and "
        "relays, each its own minion; minutes)",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--fleet"):
        skip_fleet = pytest.mark.skip(reason="the fleet-scale lab runs with pytest --fleet")
        for item in items:
            if "fleet" in item.keywords:
                item.add_marker(skip_fleet)
    wanted = [item for item in items if needs_root(item)]
    verdict = without_root(os.environ, is_root(), len(wanted))
    if verdict == "skip":
        skip = pytest.mark.skip(reason="needs root and network namespaces")
        for item in wanted:
            item.add_marker(skip)
    elif verdict:
        raise pytest.UsageError(verdict)


@pytest.fixture
def make_netns():
    """Factory of namespaces named with the run's prefix; all removed after the test."""
    made = []

    def make(short):
        ns = netns_support.Netns(short)
        made.append(ns)
        return ns

    yield make
    for ns in reversed(made):
        ns.delete()


@pytest.fixture(scope="session")
def formula_tree(tmp_path_factory):
    """
    What an operator puts in the master's file_roots: the formula and its
    modules, nothing else. (Serving the checkout itself would make every sync
    walk the virtualenv: 12 s per highstate.)
    """
    tree = tmp_path_factory.mktemp("formula-tree")
    for name in ("relayroute", "_modules", "_states", "_beacons"):
        (tree / name).symlink_to(ROOT / name, target_is_directory=True)
    return tree


def pytest_unconfigure(config):
    # Salt's log handlers outlive pytest's captured streams; at interpreter exit
    # they would print "--- Logging error ---" tracebacks for nothing.
    import logging

    logging.raiseExceptions = False


def pytest_sessionfinish(session, exitstatus):
    # Belt and braces: nothing with this run's prefix survives the run, neither
    # namespaces nor their /etc/netns overlays.
    import shutil

    for name in netns_support.leftover_namespaces():
        netns_support.run(["ip", "netns", "delete", name], check=False)
    for overlay in Path("/etc/netns").glob(f"{netns_support.RUN_PREFIX}-*"):
        shutil.rmtree(overlay, ignore_errors=True)
    netns_support.remove_lock_files(LOCK_PATH)
