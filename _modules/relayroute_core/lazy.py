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

``keep_unchanged_submodules(package)``: Salt's loader re-runs every
sub-module of a package it loads, each time it loads it (``importlib.reload``
of each module attribute, recursively), and ``salt-call state.apply`` loads
relayroute twice (the renderer's loader for ``map.jinja``, the states' own):
each of the engine's modules ran three to four times per call, its dataclasses
made anew each time. After this, a reload of a sub-module whose source file is
the one it ran from in this process (same size, modification time and inode)
keeps the module as it is; a changed file (``saltutil.sync_modules``) runs
again, as before.

Salt's loader re-runs this file in place on a reload (``importlib.reload``):
a package already in ``sys.modules``, deferred or not, is left as it is, and
so is a finder already installed.
"""

import importlib
import importlib.machinery
import importlib.util
import os
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


def _stamp(path):
    try:
        stat = os.stat(path)
    except (OSError, TypeError):
        return None
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


class _Ran(importlib.machinery.SourceFileLoader):
    """The loader of a module re-run from the file it ran from: running it again does nothing."""

    def exec_module(self, module):
        pass


class _KeepUnchanged:
    """A meta-path finder for the sub-modules of one package (see ``keep_unchanged_submodules``)."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.stamps = {}  # module name: stamp of the file it last ran from

    def note(self, name, module):
        stamp = _stamp(getattr(module, "__file__", None))
        if stamp is not None:
            self.stamps[name] = stamp

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.prefix):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or spec.submodule_search_locations is not None:
            return None  # no source file of a plain module: the usual finders' business
        stamp = _stamp(spec.origin)
        module = sys.modules.get(fullname)
        if (
            target is not None
            and target is module
            and stamp is not None
            and self.stamps.get(fullname) == stamp
            and getattr(module, "__file__", None) == spec.origin
        ):
            return importlib.util.spec_from_file_location(
                fullname, spec.origin, loader=_Ran(fullname, spec.origin)
            )
        # A first import, or a file that changed: it runs, from this file.
        if stamp is not None:
            self.stamps[fullname] = stamp
        return spec


def keep_unchanged_submodules(package):
    """
    Reloads of ``package``'s sub-modules keep a module whose source file did
    not change since it ran in this process (see above). Idempotent.
    """
    prefix = package + "."
    with _LOCK:
        # A finder installed before a reload of this file is of the class it had then.
        mine = [f for f in sys.meta_path if type(f).__name__ == _KeepUnchanged.__name__]
        finder = next((f for f in mine if f.prefix == prefix), None)
        if finder is None:
            finder = _KeepUnchanged(prefix)
            sys.meta_path.insert(0, finder)
        # Sub-modules imported before the finder was (this one): they ran from these files.
        for name, module in list(sys.modules.items()):
            if name.startswith(prefix) and name not in finder.stamps:
                finder.note(name, module)
    return finder
