"""
A private mount namespace with a system D-Bus of its own, inside a test's
network namespace: what a daemon that lives on the system bus (firewalld)
needs on a machine whose PID 1 is not systemd, without touching the host's
``/run``.

The approach of :mod:`tests.support.networkd`, made reusable: an anchor
process started in the network namespace (``ip netns exec NS unshare --mount
--propagation private``) mounts a tmpfs over ``/run`` (the bus socket
``/run/dbus/system_bus_socket`` and the daemon's own ``/run`` state), bind
mounts the caller's directories over the paths it names, then sleeps; the bus
and every daemon or client are started inside it with ``nsenter``. Each
process is killed by its pid at the end (its own session), the anchor last.
"""

import os
import subprocess
import time

from tests.support.netns import run
from tests.support.networkd import _terminate

ANCHOR = r"""
set -e
mount -t tmpfs -o mode=0755 relayroute-test-run /run
mkdir -p /run/dbus
while [ "$#" -gt 0 ]; do
    mkdir -p "$2"
    mount --bind "$1" "$2"
    shift 2
done
echo ready
exec sleep infinity
"""


class BusNamespace:
    """
    The anchor and ``dbus-daemon --system`` in network namespace ``ns``;
    ``binds``: ``{path inside: directory outside}``, mounted after the tmpfs
    (so a path under ``/run`` is fine). ``bus_log``: the bus's stderr.
    """

    def __init__(self, ns, binds, bus_log):
        self.ns = ns
        self.binds = dict(binds)
        self.bus_log = bus_log
        self.anchor = self.bus = None
        self.daemons = []

    def nsenter(self, argv):
        # --root/--wd: the anchor's root and directory, which differ from the
        # mount namespace's own root when this runs in a chroot.
        return [
            "nsenter", "--target", str(self.anchor.pid), "--mount", "--net", "--root", "--wd",
            *argv,
        ]  # fmt: skip

    def start(self, timeout=30):
        """The anchor, then the bus; returns once the bus socket exists."""
        pairs = [item for inside, outside in self.binds.items() for item in (outside, inside)]
        self.anchor = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, "unshare", "--mount", "--propagation",
             "private", "sh", "-c", ANCHOR, "anchor", *pairs],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        line = self.anchor.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"the bus's mount namespace: {line!r} {self.anchor.stderr.read()}")
        with open(self.bus_log, "w") as log:
            self.bus = subprocess.Popen(
                self.nsenter(["dbus-daemon", "--system", "--nofork", "--nopidfile", "--nosyslog"]),
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )  # fmt: skip
        self.wait(
            lambda: self.exec(["test", "-S", "/run/dbus/system_bus_socket"]).returncode == 0,
            timeout,
            "the bus socket",
        )

    def spawn(self, argv, log_path, env=None):
        """Start a daemon inside (its own session), output appended to ``log_path``."""
        with open(log_path, "a") as log:
            proc = subprocess.Popen(
                self.nsenter(argv), stdout=log, stderr=log, env=env, start_new_session=True
            )
        self.daemons.append(proc)
        return proc

    def kill(self, proc, grace=10):
        """SIGTERM a daemon :meth:`spawn` started (SIGKILL after ``grace`` s) and reap it."""
        _terminate(proc, grace)
        if proc in self.daemons:
            self.daemons.remove(proc)

    def exec(self, argv, timeout=60):
        """Run ``argv`` in the mount namespace and the network namespace."""
        return run(self.nsenter(argv), check=False, timeout=timeout)

    def wait(self, ready, timeout, what, details=lambda: ""):
        """Poll ``ready`` until true; fail early when the anchor, bus or a daemon died."""
        deadline = time.monotonic() + timeout
        while not ready():
            for proc in (self.anchor, self.bus, *self.daemons):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"{_name(proc)} exited ({proc.returncode}) waiting for {what}: "
                        f"{details()} {_tail(self.bus_log)}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not within {timeout} s: {details()}")
            time.sleep(0.05)

    def stop(self):
        """Kill the daemons, the bus and the anchor, each by its pid; the mount namespace goes."""
        for proc in (*reversed(self.daemons), self.bus, self.anchor):
            _terminate(proc)
        self.daemons = []
        self.anchor = self.bus = None


def _name(proc):
    """The program a process started here runs (after ``nsenter``'s options)."""
    argv = list(proc.args)
    return argv[argv.index("--wd") + 1] if "--wd" in argv else argv[0]


def _tail(path, size=1000):
    try:
        with open(path) as handle:
            return handle.read()[-size:]
    except OSError:
        return ""


def environment(**extra):
    """A minimal environment for a daemon started inside: PATH, plus ``extra``."""
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **extra}
