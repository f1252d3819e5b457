"""
Importing what a run needs, when it needs it.

``import pyroute2`` runs the package's ``__init__``, which imports every
subsystem of the library (NDB, IPDB, conntrack, WireGuard, nl80211, IPVS,
plan9...): about 0.1 s of CPU on each ``salt-call``, of which a relay's no-op
re-apply needs only rtnetlink (``pyroute2.iproute.linux``) and conntrack only
when flows are read. Importing any submodule (``pyroute2.iproute.linux``) runs
that ``__init__`` first.

``deferred_package("pyroute2")`` puts the real package into ``sys.modules``
without running its ``__init__``: made from the package's own spec (same
``__path__``, ``__file__``, loader), so its submodules import as usual and are
the very modules the full package holds. The ``__init__`` runs, in that same
module, the first time someone asks the package for a name it does not hold
yet (``from pyroute2 import NDB``, ``pyroute2.__version__``), through a module
``__getattr__`` (PEP 562): other code in the process (Salt's own modules, a
test) sees the whole package as before. A name that is a submodule
(``from pyroute2 import config``, as pyroute2's modules do) imports that
submodule only.

``attribute(module, name)`` is a stand-in for a callable (a class) of a module
imported on the first call: ``IPRoute = attribute("pyroute2.iproute.linux",
"IPRoute")`` and ``with IPRoute() as ipr:`` works unchanged.

Salt's loader re-runs this file in place on a reload (``importlib.reload``):
a package already in ``sys.modules``, deferred or not, is left as it is.
"""

import importlib
import importlib.util
import sys
import threading

_LOCK = threading.RLock()


def deferred_package(name):
    """
    The package ``name`` in ``sys.modules``, its ``__init__`` deferred to the
    first lookup of a name it does not hold; None when it is not installed.
    A package already imported (or deferred) is returned as it is.
    """
    with _LOCK:
        module = sys.modules.get(name)
        if module is not None:
            return module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        state = {"ran": False, "running": False}

        def __getattr__(attr):  # noqa: N807 - PEP 562
            if not attr.startswith("__"):
                # A submodule: import it alone, as a full package would.
                full = f"{name}.{attr}"
                if full in sys.modules or importlib.util.find_spec(full) is not None:
                    return importlib.import_module(full)
            with _LOCK:
                # Another thread waited here while the __init__ ran: it finds
                # the names. This thread, from inside the __init__: it does not.
                if not state["ran"] and not state["running"]:
                    state["running"] = True
                    try:
                        spec.loader.exec_module(module)
                        state["ran"] = True
                    finally:
                        state["running"] = False
            try:
                return module.__dict__[attr]
            except KeyError:
                raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

        module.__getattr__ = __getattr__
        module.__deferred_init__ = state
        sys.modules[name] = module
        return module


def initialised(name):
    """Whether the package ``name``'s ``__init__`` has run (True for one not deferred)."""
    module = sys.modules.get(name)
    if module is None:
        return False
    state = getattr(module, "__dict__", {}).get("__deferred_init__")
    return state is None or state["ran"]


class attribute:  # noqa: N801 - used where the class it stands for was
    """A callable attribute of a module, the module imported on the first call."""

    __slots__ = ("module", "name", "_target")

    def __init__(self, module, name):
        self.module = module
        self.name = name
        self._target = None

    def resolve(self):
        target = self._target
        if target is None:
            target = self._target = getattr(importlib.import_module(self.module), self.name)
        return target

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __repr__(self):
        state = "imported" if self._target is not None else "not imported yet"
        return f"<lazy {self.module}.{self.name}, {state}>"
