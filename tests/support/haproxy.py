"""
A real HAProxy inside a test network namespace.

HAProxy runs in master-worker mode in the foreground (``haproxy -W -db -f CFG``)
as a process tracked by the namespace, so it is killed at cleanup even when a
test fails. The master keeps its pid across reloads (SIGUSR2 re-executes it),
the workers are its children: a new worker pid after a reload means the new
configuration is live.
"""

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

from tests.support.netns import _alive, live_processes


class HAProxyError(RuntimeError):
    """HAProxy did not start, reload or stop as asked."""


# HAProxy's time units; a bare number is milliseconds.
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1e-3}


def timeouts(text):
    """The ``timeout NAME VALUE`` lines of a configuration's defaults, in seconds."""
    found, section = {}, None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words and not line[:1].isspace():
            section = words[0]
        elif section == "defaults" and len(words) == 3 and words[0] == "timeout":
            number, unit = re.fullmatch(r"(\d+)([a-z]*)", words[2]).groups()
            found[words[1]] = int(number) * _UNITS[unit]
    return found


def check(cfg_path, ns=None):
    """Validate a configuration with ``haproxy -c -f``; return ``(ok, output)``.

    With ``ns`` the check runs inside that namespace (addresses to bind exist there).
    """
    argv = ["haproxy", "-c", "-f", str(cfg_path)]
    if ns is not None:
        proc = ns.exec(argv, check=False)
    else:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def unit_settings(*texts):
    """
    The ``[Service]`` settings of a unit file and its drop-ins (``texts`` in
    the order systemd reads them): ``{key: [values]}``, every assignment
    appended, an empty one clearing what came before (systemd's rule for
    list settings; for single-valued ones the last value wins).
    """
    found, section = {}, None
    for text in texts:
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif section == "Service" and "=" in line:
                key, value = (part.strip() for part in line.split("=", 1))
                if value:
                    found.setdefault(key, []).append(value)
                else:
                    found[key] = []
    return found


def systemd_verify(unit_dir, *units):
    """
    ``systemd-analyze verify`` of ``units`` (file names in ``unit_dir``, which
    is searched first for the units and their drop-ins): ``(exit code,
    output)``. verify exits 0 on unknown keys and bad values too: only
    ``(0, "")`` passes.
    """
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(Path(unit_dir) / u) for u in units)],
        env={"SYSTEMD_UNIT_PATH": f"{unit_dir}:", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _capability_names(values):
    """``CAP_NET_ADMIN CAP_X`` settings as one set of names (systemd merges the lines)."""
    return {name.upper() for value in values for name in value.split()}


class UnitLaunch:
    """
    How systemd would start a service, from its unit and drop-ins: the
    ``ExecStart`` command with the unit's environment expanded, and the user,
    group, capabilities, ``NoNewPrivileges`` and ``RuntimeDirectory`` it gets.
    ``argv()`` is that command under ``setpriv`` (for a lab without an init
    system: the same credentials, none of systemd's sandboxing).
    """

    def __init__(self, settings):
        self.settings = settings
        self.environment = {}
        for value in settings.get("Environment", []):
            for assignment in shlex.split(value):
                name, _, text = assignment.partition("=")
                self.environment[name] = text
        self.user = self._last("User")
        self.group = self._last("Group")
        self.ambient = _capability_names(settings.get("AmbientCapabilities", []))
        self.bounding = _capability_names(settings.get("CapabilityBoundingSet", []))
        self.no_new_privileges = self._last("NoNewPrivileges") in ("yes", "true", "1", "on")
        self.runtime_directory = self._last("RuntimeDirectory")
        self.runtime_mode = int(self._last("RuntimeDirectoryMode") or "0755", 8)
        (start,) = settings["ExecStart"]
        self.command = self.expand(start.lstrip("-@+!:"))

    @classmethod
    def from_files(cls, *paths):
        return cls(unit_settings(*(Path(path).read_text() for path in paths)))

    def _last(self, key):
        values = self.settings.get(key)
        return values[-1] if values else None

    def expand(self, command):
        """systemd's expansion: ``$NAME`` as a word splits into words, ``${NAME}`` is one."""
        words = []
        for word in shlex.split(command):
            whole = re.fullmatch(r"\$(\w+)", word)
            if whole:
                words += self.environment.get(whole.group(1), "").split()
            else:
                words.append(
                    re.sub(r"\$\{(\w+)\}", lambda m: self.environment.get(m.group(1), ""), word)
                )
        return words

    def argv(self, without=()):
        """
        ``setpriv`` running the command with the unit's credentials; ``without``:
        capabilities to withhold from the ambient, inheritable and bounding sets
        (a negative control).
        """
        ambient = sorted(self.ambient - set(without))
        bounding = sorted((self.bounding or self.ambient) - set(without))

        def caps(names):
            return ",".join(["-all", *(f"+{name.lower()[4:]}" for name in names)])

        if self.user is None:
            # Root's uid (relayroute's own units): what the command execs with
            # is the bounding set, so that is all it has.
            if not (self.bounding or self.no_new_privileges):
                return list(self.command)
            argv = ["setpriv", f"--bounding-set={caps(bounding)}"]
        else:
            argv = [
                "setpriv",
                f"--reuid={self.user}",
                f"--regid={self.group or self.user}",
                "--init-groups",
                f"--inh-caps={caps(ambient)}",
                f"--ambient-caps={caps(ambient)}",
                f"--bounding-set={caps(bounding)}",
            ]
        if self.no_new_privileges:
            argv.append("--no-new-privs")
        return [*argv, *self.command]


class HAProxyProcess:
    """``haproxy -W -db -f cfg_path`` running in ``ns``.

    Its stdout and stderr (alerts, warnings, worker exits) go to ``log_path``,
    by default ``<cfg_path>.log``. With ``argv``, that command instead (a
    master-worker HAProxy that stays in the foreground, e.g. the unit's
    ``haproxy -Ws ...`` under setpriv: ``UnitLaunch.argv``).
    """

    def __init__(self, ns, cfg_path, log_path=None, argv=None):
        self.ns = ns
        self.cfg_path = Path(cfg_path)
        self.log_path = Path(log_path) if log_path else self.cfg_path.with_suffix(".log")
        self.argv = list(argv) if argv else ["haproxy", "-W", "-db", "-f", str(self.cfg_path)]
        self.proc = None

    def __repr__(self):
        return f"HAProxyProcess({self.ns.name}, {self.cfg_path})"

    def check(self):
        """Validate this instance's configuration in its namespace: ``(ok, output)``."""
        return check(self.cfg_path, self.ns)

    @property
    def pid(self):
        """The master's pid (None before start)."""
        return self.proc.pid if self.proc else None

    def start(self, timeout=10):
        """Start the master; return once a worker runs (listeners are bound then)."""
        with open(self.log_path, "ab") as log:
            # From /, as systemd starts a unit (WorkingDirectory= unset): an
            # HAProxy that drops to its own user must be able to return to
            # its working directory, and a checkout under /root is not.
            self.proc = self.ns.popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
            )
        if not self._wait_for(lambda: self.workers(), timeout):
            self.stop()
            raise HAProxyError(f"haproxy did not start a worker:\n{self.output()}")
        return self

    def running(self):
        return self.proc is not None and _alive(self.proc.pid)

    def workers(self):
        """Pids of the master's live worker processes."""
        if not self.running():
            return []
        return live_processes(ppid=self.proc.pid)

    def reload(self, timeout=10):
        """Check the configuration, then SIGUSR2 the master; return the new workers.

        Raises HAProxyError if the configuration is invalid or no new worker
        appears (the old workers keep serving in that case).
        """
        ok, output = self.check()
        if not ok:
            raise HAProxyError(f"configuration rejected, not reloading:\n{output}")
        old = set(self.workers())
        os.kill(self.proc.pid, signal.SIGUSR2)
        if not self._wait_for(lambda: set(self.workers()) - old, timeout):
            raise HAProxyError(f"no new worker after reload:\n{self.output()}")
        return sorted(set(self.workers()) - old)

    def stop(self, timeout=10):
        """SIGTERM the master (it stops the workers), SIGKILL what is left after ``timeout``."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *live_processes(ppid=self.proc.pid)]
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

    def timeouts(self):
        """This instance's configured default timeouts, in seconds (see ``timeouts``).

        Read inside the namespace: its /etc may be an overlay (``ip netns exec``).
        """
        return timeouts(self.ns.exec(["cat", str(self.cfg_path)]).stdout)

    def output(self):
        """What HAProxy wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_for(self, condition, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if not self.running():
                return False
            time.sleep(0.05)
        return bool(condition())
