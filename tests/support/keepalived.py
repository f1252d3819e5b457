"""
Real keepalived (VRRP) inside a test network namespace.

Each instance runs in the foreground (``--dont-fork``) with only its VRRP
subsystem (``--vrrp``), its configuration, pid files and log under a directory
of the test's own, and its messages on the console (``--log-console``), which
go to a log file. It is started through the namespace (``Netns.popen``, its own
process group), so cleanup kills it and its VRRP child even when a test fails.

Stopping it with SIGTERM is a clean shutdown: it sends an advertisement with
priority 0 (the backup takes over at once, without waiting for the master-down
interval) and removes its virtual addresses before it exits.
"""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.support.netns import _alive, live_processes


class KeepalivedError(RuntimeError):
    """keepalived did not start or stop as asked."""


def vrrp_config(router_id, interface, vrid, priority, addresses, state="BACKUP", advert_int=1):
    """
    One VRRP instance, ``relayroute``, on ``interface``: ``addresses`` are
    ``(address/prefix, dev)`` pairs it holds while master (each on its own
    device; keepalived sends each one's gratuitous ARPs on that device).
    Everything else is keepalived's default, its gratuitous ARPs included (5
    at once on becoming master, 5 more 5 s later).
    """
    lines = [
        "global_defs {",
        f"    router_id {router_id}",
        "}",
        "vrrp_instance relayroute {",
        f"    state {state}",
        f"    interface {interface}",
        f"    virtual_router_id {vrid}",
        f"    priority {priority}",
        f"    advert_int {advert_int}",
        "    virtual_ipaddress {",
        *(f"        {address} dev {dev}" for address, dev in addresses),
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)


class Keepalived:
    """``keepalived --dont-fork --vrrp`` with ``config`` (text) in ``ns``; files in ``workdir``."""

    def __init__(self, ns, workdir, config):
        self.ns = ns
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "keepalived.conf"
        self.conf.write_text(config)
        self.log_path = self.workdir / "keepalived.log"
        self.proc = None

    def __repr__(self):
        return f"Keepalived({self.ns.name}, {self.conf})"

    def argv(self):
        files = {name: self.workdir / f"{name}.pid" for name in ("main", "vrrp", "checkers")}
        return [
            "keepalived",
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "--vrrp",
            "--use-file", str(self.conf),
            "--pid", str(files["main"]),
            "--vrrp_pid", str(files["vrrp"]),
            "--checkers_pid", str(files["checkers"]),
        ]  # fmt: skip

    def start(self, timeout=10):
        """Start it; return once its VRRP child runs and it says its startup is complete."""
        with open(self.log_path, "ab") as log:
            self.proc = self.ns.popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Startup complete" in self.output() and self.children():
                return self
            if not self.running():
                break
            time.sleep(0.05)
        output = self.output()
        self.stop()
        raise KeepalivedError(f"keepalived did not start in {self.ns.name}:\n{output}")

    def running(self):
        return self.proc is not None and _alive(self.proc.pid)

    def children(self):
        """The VRRP child (and any other) of the main process."""
        if not self.running():
            return []
        return live_processes(ppid=self.proc.pid)

    def terminate(self):
        """SIGTERM, without waiting: a clean shutdown starts (see the module's docstring)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout=10):
        """Wait for the main process to exit; its exit status."""
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout=10):
        """SIGTERM (clean: priority 0 sent, addresses removed), SIGKILL what is left."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *self.children()]
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)

    def output(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def state(self):
        """The last VRRP state it logged: MASTER, BACKUP, FAULT, or None."""
        found = None
        for line in self.output().splitlines():
            if "Entering " in line and " STATE" in line:
                found = line.split("Entering ", 1)[1].split()[0]
        return found
