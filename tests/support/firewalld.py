"""
firewalld, the real daemon (Debian 12: 1.3.3), guarding one test namespace,
with a private system D-Bus so that ``firewall-cmd`` works (``--reload``,
``--complete-reload``, ``--state``).

It runs inside a :class:`tests.support.sysbus.BusNamespace`: a tmpfs over
``/run`` (the bus socket, firewalld's ``/run/firewalld``) and this run's own
configuration directory bind-mounted over ``/etc/firewalld`` (``firewalld.conf``
and one zone, written here), so neither the host's ``/etc/firewalld`` nor its
``/run`` is read or written. firewalld programs the namespace's packet filter
only (nftables through libnftables, iptables-restore for its direct rules and
its flush), the namespace being the network namespace it runs in.

No polkit runs on the private bus: firewalld then authorises a caller by its
uid (0 here), as its D-Bus decorators fall back to. A restart is what
``systemctl restart firewalld`` does (the unit has no ExecStop): SIGTERM, which
with ``CleanupOnExit=yes`` removes firewalld's tables, then a new start.
"""

from pathlib import Path

from tests.support.sysbus import BusNamespace, environment

FIREWALLD = "/usr/sbin/firewalld"
ZONE = "relayroute-test"

# firewalld.conf as Debian 12 ships it, but for the default zone and the
# settings a test chooses (FirewallBackend, IPv6_rpfilter).
CONF = {
    "DefaultZone": ZONE,
    "CleanupOnExit": "yes",
    "CleanupModulesOnExit": "no",
    "Lockdown": "no",
    "IPv6_rpfilter": "yes",
    "IndividualCalls": "no",
    "LogDenied": "off",
    "FirewallBackend": "nftables",
    "FlushAllOnReload": "yes",
    "RFC3964_IPv4": "yes",
}


def zone_xml(services):
    """A zone (the default one: every interface is in it) allowing ``services``."""
    lines = ['<?xml version="1.0" encoding="utf-8"?>', '<zone target="default">',
             "  <short>relayroute test</short>"]  # fmt: skip
    lines += [f'  <service name="{name}"/>' for name in services]
    lines.append("</zone>")
    return "\n".join(lines) + "\n"


class Firewalld:
    """firewalld and its bus in ``ns``; configuration and logs under ``workdir``."""

    def __init__(self, ns, workdir, services=("smtp",), **conf):
        self.ns = ns
        self.dir = Path(workdir)
        self.etc = self.dir / "etc-firewalld"
        (self.etc / "zones").mkdir(parents=True, exist_ok=True)
        settings = {**CONF, **conf}
        (self.etc / "firewalld.conf").write_text(
            "".join(f"{key}={value}\n" for key, value in settings.items())
        )
        (self.etc / "zones" / f"{ZONE}.xml").write_text(zone_xml(services))
        self.log_path = self.dir / "firewalld.log"
        self.bus = BusNamespace(ns, {"/etc/firewalld": str(self.etc)}, self.dir / "dbus.log")
        self.daemon = None
        self.starts = 0

    def start(self, timeout=60):
        """The bus, then firewalld; returns once ``firewall-cmd --state`` says running."""
        self.bus.start(timeout)
        self.start_daemon(timeout)

    def start_daemon(self, timeout=60):
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"--- start {self.starts}\n")
        self.daemon = self.bus.spawn(
            [FIREWALLD, "--nofork", "--nopid", "--debug", "2", "--log-target", "console"],
            self.log_path,
            env=environment(),
        )
        self.bus.wait(self.running, timeout, "firewalld running", self.log_tail)

    def running(self):
        state = self.cmd("--state", check=False)
        return state.returncode == 0 and state.stdout.strip() == "running"

    def cmd(self, *args, check=True, timeout=60):
        """``firewall-cmd ARGS`` over the private bus."""
        proc = self.bus.exec(["firewall-cmd", *args], timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"firewall-cmd {' '.join(args)} ({proc.returncode}): "
                f"{proc.stderr.strip()} {self.log_tail()}"
            )
        return proc

    def reload(self):
        """``firewall-cmd --reload``: returns once firewalld has applied its rules again."""
        return self.cmd("--reload")

    def complete_reload(self):
        """``firewall-cmd --complete-reload`` (also unloads conntrack helpers' state)."""
        return self.cmd("--complete-reload")

    def restart(self, timeout=60):
        """``systemctl restart firewalld``: SIGTERM (CleanupOnExit removes its tables), start."""
        self.bus.kill(self.daemon)
        self.daemon = None
        self.start_daemon(timeout)

    def stop(self):
        """firewalld, the bus and the anchor, each by its pid."""
        self.bus.stop()
        self.daemon = None

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_tail(self, size=3000):
        return self.log()[-size:]
