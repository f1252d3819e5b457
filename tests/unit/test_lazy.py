"""
``lazy``: pyroute2's package ``__init__`` deferred until someone asks the
package for a name it does not hold, conntrack imported on its first use; the
rest of the process (Salt's own modules) sees pyroute2 as before; a reload
(Salt's loader reloads every sub-module on each load) keeps a sub-module whose
file did not change and runs a changed one again.

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


def test_the_engine_imports_rtnetlinks_message_classes_alone():
    seen = _run(
        """
        from relayroute_core import lazy, netlink
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[:2] in (["pyroute2", "ndb"], ["pyroute2", "ipdb"],
                                                ["pyroute2", "conntrack"], ["pyroute2", "iproute"])
                        or m.startswith("pyroute2.netlink.rtnl.tcmsg")
                        or m.startswith("pyroute2.netlink.rtnl.ifinfmsg"))
        import pyroute2.iproute.linux
        print(json.dumps({
            "initialised": lazy.initialised("pyroute2"),
            "loaded": loaded,
            # The stand-in imports IPRoute on its first call, and it is pyroute2's.
            "same_iproute": netlink.IPRoute.resolve() is pyroute2.iproute.linux.IPRoute,
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
            "same_iproute": IPRoute is netlink.IPRoute.resolve(),
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


def test_a_reload_keeps_a_sub_module_whose_file_did_not_change_and_reruns_a_changed_one(tmp_path):
    # A package like relayroute_core, reloaded as Salt's loader does on each load.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from relayroute_core import lazy\n"
        "lazy.keep_unchanged_submodules(__name__)\n"
        "from . import sub\n"
    )
    (package / "sub.py").write_text(
        "import builtins\n"
        "builtins.sub_runs = getattr(builtins, 'sub_runs', 0) + 1\n"
        "class Thing:\n"
        "    pass\n"
        "VALUE = 1\n"
    )
    seen = _run(
        f"""
        import builtins, importlib, os
        sys.path.insert(0, {str(tmp_path)!r})
        import pkg
        thing = pkg.sub.Thing
        for _ in range(3):
            importlib.reload(pkg)
            importlib.reload(pkg.sub)
        kept = {{"runs": builtins.sub_runs, "same_class": pkg.sub.Thing is thing,
                 "loader": type(pkg.sub.__loader__).__name__,
                 "source": "VALUE = 1" in pkg.sub.__loader__.get_source("pkg.sub")}}
        path = pkg.sub.__file__
        with open(path, "a") as source:
            source.write("VALUE = 2\\n")
        importlib.reload(pkg.sub)
        changed = {{"runs": builtins.sub_runs, "value": pkg.sub.VALUE,
                    "same_class": pkg.sub.Thing is thing}}
        importlib.reload(pkg.sub)
        again = {{"runs": builtins.sub_runs, "value": pkg.sub.VALUE}}
        print(json.dumps({{"kept": kept, "changed": changed, "again": again}}))
        """
    )
    assert seen["kept"] == {"runs": 1, "same_class": True, "loader": "_Ran", "source": True}
    assert seen["changed"] == {"runs": 2, "value": 2, "same_class": False}
    assert seen["again"] == {"runs": 2, "value": 2}


def test_the_engine_reloaded_as_salts_loader_does_keeps_its_modules():
    seen = _run(
        """
        import importlib, types
        import relayroute_core
        from relayroute_core import engine, planner

        def reload_submodules(mod):  # salt.loader.lazy.LazyLoader._reload_submodules
            prefix = mod.__name__ + "."
            for name in dir(mod):
                sub = getattr(mod, name)
                if isinstance(sub, types.ModuleType) and sub.__name__.startswith(prefix):
                    importlib.reload(sub)
                    reload_submodules(sub)

        owner, backends = planner.Owner, engine.BACKENDS
        importlib.reload(relayroute_core)
        reload_submodules(relayroute_core)
        print(json.dumps({"same": planner.Owner is owner and engine.BACKENDS is backends,
                          "plan": engine.planner is planner}))
        """
    )
    assert seen == {"same": True, "plan": True}
