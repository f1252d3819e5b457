"""
systemd-networkd, the real daemon (Debian 12: 252), managing one link of a
test namespace, with a private system D-Bus so that ``networkctl reload`` and
``networkctl reconfigure`` work.

Everything lives in a private mount namespace held by an anchor process
started in the network namespace (``ip netns exec NS unshare --mount
--propagation private``):

- a tmpfs over ``/run``: networkd's state (``/run/systemd/netif``), the bus
  socket (``/run/dbus/system_bus_socket``), and the ``.network`` files and
  ``networkd.conf`` drop-ins, bind-mounted from this run's own directory onto
  ``/run/systemd/network`` and ``/run/systemd/networkd.conf.d`` (both are
  directories networkd reads);
- a read-only sysfs of the namespace's own, mounted from inside it: networkd
  finds the namespace's links in ``/sys/class/net`` (in a chroot ``ip netns
  exec`` may leave the host's sysfs in place, and networkd then waits for
  links it cannot see there), and, ``/sys`` being read-only, does not wait for
  udev (none runs in a namespace), as in a container.

``dbus-daemon --system`` and networkd are started inside it with ``nsenter``
(its own debug log to this run's directory), ``networkctl`` is run the same
way; each is killed by its pid at the end, the anchor last. Nothing of the
host's ``/run``, ``/etc/systemd`` or the root namespace's links is touched.
"""

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from tests.support.netns import _alive, run

NETWORKD = "/lib/systemd/systemd-networkd"

ANCHOR = r"""
set -e
mount -t tmpfs -o mode=0755 relayroute-lab-run /run
mkdir -p /run/dbus /run/systemd/network /run/systemd/networkd.conf.d
mount --bind "$1/network" /run/systemd/network
mount --bind "$1/networkd.conf.d" /run/systemd/networkd.conf.d
umount -l /sys
mount -t sysfs -o ro relayroute-lab-sys /sys
echo ready
exec sleep infinity
"""

FOREIGN_NO = """\
[Network]
ManageForeignRoutingPolicyRules=no
ManageForeignRoutes=no
"""


def network_file(name, address, gateway):
    """
    A ``.network`` giving ``name`` one address and a default gateway, nothing
    else (no IPv6). ``Broadcast=no``: the lab adds its addresses without one
    (``ip addr add A/24 dev lan0``); networkd 252 asking for the same address
    with a broadcast finds the kernel's copy never matches (a replace does not
    change it) and asks again, 65535 times, then fails the link ("Failed to
    configure address: Numerical result out of range").
    """
    return (
        f"[Match]\nName={name}\n\n[Network]\nGateway={gateway}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\n\n"
        f"[Address]\nAddress={address}\nBroadcast=no\n"
    )


class Networkd:
    """networkd and its bus in ``ns``; state and logs under ``workdir``."""

    def __init__(self, ns, workdir):
        self.ns = ns
        self.dir = Path(workdir)
        for sub in ("network", "networkd.conf.d"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.anchor = self.bus = self.daemon = None
        self.log_path = self.dir / "networkd.log"
        self.bus_log = self.dir / "dbus.log"
        self.starts = 0

    # Configuration (read by networkd when it starts, reloads or reconfigures).

    def write_network(self, filename, text):
        (self.dir / "network" / filename).write_text(text)

    def touch_network(self, filename):
        """
        A new modification time, same text: what regenerating the files does
        (``netplan apply``). networkd 252 then takes the ``.network`` for a new
        one on ``networkctl reload`` and reconfigures its link.
        """
        os.utime(self.dir / "network" / filename)

    def manage_foreign(self, yes):
        """networkd.conf's ManageForeign{RoutingPolicyRules,Routes}: default (yes) or ``no``."""
        dropin = self.dir / "networkd.conf.d" / "relayroute.conf"
        if yes:
            dropin.unlink(missing_ok=True)
        else:
            dropin.write_text(FOREIGN_NO)

    # Processes.

    def _nsenter(self, argv):
        # --root/--wd: the anchor's root and directory, which differ from the
        # mount namespace's own root when this runs in a chroot.
        return [
            "nsenter", "--target", str(self.anchor.pid), "--mount", "--net", "--root", "--wd",
            *argv,
        ]  # fmt: skip

    def start(self, timeout=30):
        """The anchor, the bus, then networkd; returns when ``networkctl`` answers over the bus."""
        self.anchor = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, "unshare", "--mount", "--propagation",
             "private", "sh", "-c", ANCHOR, "anchor", str(self.dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        line = self.anchor.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"networkd's mount namespace: {line!r} {self.anchor.stderr.read()}")
        self.bus = subprocess.Popen(
            self._nsenter(["dbus-daemon", "--system", "--nofork", "--nopidfile", "--nosyslog"]),
            stdout=subprocess.DEVNULL, stderr=self.bus_log.open("w"), start_new_session=True,
        )  # fmt: skip
        self._wait(lambda: self.exec(["test", "-S", "/run/dbus/system_bus_socket"]).returncode == 0,
                   timeout, "the bus socket")  # fmt: skip
        self.start_networkd(timeout)

    def start_networkd(self, timeout=30):
        """Start networkd (again); returns once it owns its bus name."""
        self.starts += 1
        log = self.log_path.open("a")
        log.write(f"--- start {self.starts}\n")
        log.flush()
        env = {
            "SYSTEMD_LOG_LEVEL": "debug",
            "SYSTEMD_LOG_TARGET": "console",
            "SYSTEMD_LOG_TIME": "1",
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        self.daemon = subprocess.Popen(
            self._nsenter([NETWORKD]), stdout=log, stderr=log, env=env, start_new_session=True
        )
        log.close()
        self._wait(lambda: self.networkctl("list", check=False).returncode == 0, timeout,
                   "networkctl list")  # fmt: skip
        self._wait(self._owns_bus_name, timeout, "org.freedesktop.network1 on the bus")

    def _owns_bus_name(self):
        out = self.exec(["busctl", "--system", "--no-pager", "list", "--no-legend"]).stdout
        return "org.freedesktop.network1" in out.split()

    def stop_networkd(self):
        _terminate(self.daemon)
        self.daemon = None

    def restart(self, timeout=30):
        """What ``systemctl restart systemd-networkd`` does: SIGTERM, wait, start again."""
        self.stop_networkd()
        self.start_networkd(timeout)

    def stop(self):
        """Kill networkd, the bus and the anchor (each by its pid); the mount namespace goes."""
        for proc in (self.daemon, self.bus, self.anchor):
            _terminate(proc)
        self.daemon = self.bus = self.anchor = None

    # Inside.

    def exec(self, argv, timeout=60):
        """Run ``argv`` in networkd's mount namespace and the namespace's network."""
        return run(self._nsenter(argv), check=False, timeout=timeout)

    def networkctl(self, *args, check=True, timeout=60):
        proc = self.exec(["networkctl", "--no-pager", *args], timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"networkctl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def setup_state(self, link):
        """networkd's setup state of ``link``: ``configured``, ``configuring``, ``failed`` ..."""
        out = self.networkctl("list", "--no-legend", link, check=False).stdout.split()
        return out[4] if len(out) >= 5 else None

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def mark(self):
        """A position in networkd's log, for :meth:`log_since`."""
        return len(self.log())

    def log_since(self, mark):
        return self.log()[mark:]

    def wait_configured(self, link, mark, timeout=30):
        """
        Wait until networkd logged ``link`` configured after ``mark`` (a log
        position): the state file can still say configured from before.
        """
        pattern = re.compile(rf" {re.escape(link)}: State changed: \S+ -> configured$", re.M)
        self._wait(lambda: pattern.search(self.log_since(mark)), timeout, f"{link} configured")
        return time.monotonic()

    def _wait(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in (("anchor", self.anchor), ("dbus-daemon", self.bus),
                               ("networkd", self.daemon)):  # fmt: skip
                if proc is not None and proc.poll() is not None:
                    logs = f"{self.log()[-3000:]} {self.bus_log.read_text()[-1000:]}"
                    raise RuntimeError(f"{name} exited ({proc.returncode}), {what}: {logs}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not within {timeout} s: {self.log()[-3000:]}")
            time.sleep(0.05)


def _terminate(proc, grace=10):
    """SIGTERM ``proc``'s session (it was started in its own), SIGKILL after ``grace`` s."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    assert not _alive(proc.pid)
