"""
``lazy``: pyroute2's package ``__init__`` deferred until someone asks the
package for a name it does not hold, conntrack imported on its first use; the
rest of the process (Salt's own modules) sees pyroute2 as before.

Each check runs in a fresh interpreter: the test process has its own pyroute2
already, and a deferred package is process-wide.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

MODULES = Path(__file__).resolve().parents[2] / "_modules"


def _run(code):
    """Run ``code`` in a fresh interpreter with the engine importable; its JSON output."""
    program = "import json, sys\nsys.path.insert(0, sys.argv[1])\n" + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-B", "-c", program, str(MODULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_engine_imports_rtnetlink_without_pyroute2s_init():
    seen = _run(
        """
        from relayroute_core import lazy, netlink
        import pyroute2.iproute.linux
        print(json.dumps({
            "initialised": lazy.initialised("pyroute2"),
            "loaded": sorted(m for m in sys.modules
                             if m.split(".")[:2] in (["pyroute2", "ndb"], ["pyroute2", "ipdb"],
                                                     ["pyroute2", "conntrack"])),
            "same_iproute": netlink.IPRoute is pyroute2.iproute.linux.IPRoute,
            "has_pyroute2": netlink.HAS_PYROUTE2,
            "netlink_error": netlink.NetlinkError.__module__,
        }))
        """
    )
    assert seen == {
        "initialised": False,
        "loaded": [],
        "same_iproute": True,
        "has_pyroute2": True,
        "netlink_error": "pyroute2.netlink.exceptions",
    }


def test_salt_style_imports_of_pyroute2_still_work_after_the_engine_deferred_it():
    seen = _run(
        """
        from relayroute_core import lazy, netlink
        from pyroute2 import config  # a submodule, as pyroute2's own modules import it
        before = lazy.initialised("pyroute2")
        from pyroute2 import IPDB, NDB, Conntrack, IPRoute  # Salt's modules import so
        import pyroute2
        import pyroute2.conntrack
        print(json.dumps({
            "before": before,
            "after": lazy.initialised("pyroute2"),
            "config": config.__name__,
            "same_iproute": IPRoute is netlink.IPRoute,
            "same_conntrack": Conntrack is pyroute2.conntrack.Conntrack,
            "ndb": NDB.__module__,
            "ipdb": IPDB.__module__,
            "version": pyroute2.__version__,
            "all": "IPRoute" in [getattr(x, "__name__", x) for x in pyroute2.__all__],
            "missing": hasattr(pyroute2, "NoSuchThing"),
        }))
        """
    )
    assert seen["before"] is False
    assert seen["after"] is True
    assert seen["config"] == "pyroute2.config"
    assert seen["same_iproute"] is True
    assert seen["same_conntrack"] is True
    assert seen["ndb"] == "pyroute2.ndb.main"
    assert seen["ipdb"] == "pyroute2.ipdb"
    assert seen["version"]
    assert seen["version"] != "unknown"
    assert seen["all"] is True
    assert seen["missing"] is False


def test_a_package_imported_before_is_left_alone_and_a_reload_changes_nothing():
    seen = _run(
        """
        import importlib
        import pyroute2
        from relayroute_core import lazy, netlink
        real = sys.modules["pyroute2"] is pyroute2
        lazy = importlib.reload(lazy)
        again = lazy.deferred_package("pyroute2") is pyroute2
        print(json.dumps({"real": real, "again": again, "initialised": lazy.initialised("pyroute2"),
                          "absent": lazy.deferred_package("relayroute_no_such_package")}))
        """
    )
    assert seen == {"real": True, "again": True, "initialised": True, "absent": None}


def test_an_attribute_is_imported_on_its_first_call():
    seen = _run(
        """
        from relayroute_core import lazy
        fraction = lazy.attribute("fractions", "Fraction")
        before = "fractions" in sys.modules
        third = fraction(1, 3)
        print(json.dumps({"before": before, "after": "fractions" in sys.modules,
                          "value": str(third), "repr": repr(fraction)}))
        """
    )
    assert seen == {
        "before": False,
        "after": True,
        "value": "1/3",
        "repr": "<lazy fractions.Fraction, imported>",
    }


def test_a_deferred_init_runs_once_and_its_names_stay():
    seen = _run(
        """
        import threading
        from relayroute_core import lazy
        package = lazy.deferred_package("pyroute2")
        results = []
        threads = [threading.Thread(target=lambda: results.append(package.IPRoute))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(json.dumps({"one_class": len(set(map(id, results))) == 1,
                          "count": len(results), "initialised": lazy.initialised("pyroute2")}))
        """
    )
    assert seen == {"one_class": True, "count": 4, "initialised": True}
