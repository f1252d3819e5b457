"""
Network namespaces for tests: every namespace a run makes carries the run's
prefix, processes started in them are tracked, and cleanup removes exactly
what the run made (namespaces, processes), also when a test fails.
"""

import contextlib
import ctypes
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
# One prefix per test run (process): runs on one machine never collide.
RUN_PREFIX = os.environ.get("RELAYROUTE_NETNS_PREFIX") or f"rrt{uuid.uuid4().hex[:6]}"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run(cmd, check=True, input=None, timeout=60):  # noqa: A002
    """Run a command (list or string), return CompletedProcess with text output."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    proc = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _stat(pid):
    """``(state, ppid, pgid)`` of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def _alive(pid):
    """True while ``pid`` runs; a zombie counts as gone (it looks alive to kill -0)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def live_processes(ppid=None, pgid=None):
    """Live (non-zombie) processes with this parent or in this process group."""
    found = []
    for entry in os.listdir("/proc"):
        stat = _stat(entry) if entry.isdigit() else None
        if stat is None or stat[0] in ("Z", "X"):
            continue
        if (ppid is not None and stat[1] == ppid) or (pgid is not None and stat[2] == pgid):
            found.append(int(entry))
    return sorted(found)


class Netns:
    """One network namespace of the current run."""

    def __init__(self, short, prefix=RUN_PREFIX):
        self.short = short
        self.name = f"{prefix}-{short}"
        self.procs = []
        run(["ip", "netns", "add", self.name])
        self.ip("link set lo up")

    def __repr__(self):
        return f"Netns({self.name})"

    def exec(self, cmd, check=True, input=None, timeout=60):  # noqa: A002
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return run(["ip", "netns", "exec", self.name, *argv], check, input, timeout)

    def ip(self, args, check=True):
        return run(["ip", "-n", self.name, *shlex.split(args)], check)

    def sysctl(self, key, value):
        self.exec(["sysctl", "-qw", f"{key}={value}"])

    def popen(self, cmd, **kwargs):
        """Start a process in the namespace; it is killed at cleanup."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv], start_new_session=True, **kwargs
        )
        self.procs.append(proc)
        return proc

    def track_pid(self, pid):
        """Track a daemon that forked away from a started process (e.g. a pid file's pid)."""
        self.procs.append(pid)

    @contextlib.contextmanager
    def entered(self):
        """Run the calling thread (and what it spawns) inside this namespace."""
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(os.path.join(NETNS_DIR, self.name), os.O_RDONLY)
        try:
            _setns(target)
            yield self
        finally:
            _setns(back)
            os.close(target)
            os.close(back)

    def snapshot(self):
        """
        The namespace's rules and routes of every table in both families, and
        its packet filter: iptables', ip6tables' and every nftables table
        (``nft -s``: without counters, which are traffic, not state), as text.
        """
        return {
            "rules": self.exec("ip -4 rule show").stdout,
            "routes": self.exec("ip -4 route show table all").stdout,
            "rules6": self.exec("ip -6 rule show").stdout,
            # Without the kernel's own routes: a link's fe80:: address (and its
            # local route) appears when its duplicate address detection ends.
            "routes6": _without_kernel_routes(self.exec("ip -6 route show table all").stdout),
            "iptables": _strip_save_comments(self.exec("iptables-save").stdout),
            "ip6tables": _strip_save_comments(self.exec("ip6tables-save").stdout),
            "nft": _without_xtables_tables(self.exec("nft -s list ruleset").stdout),
        }

    def stop_processes(self):
        for item in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if isinstance(item, int):
                    os.kill(item, signal.SIGTERM)
                else:
                    os.killpg(item.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for item in self.procs:
            pid = item if isinstance(item, int) else item.pid
            while _alive(pid) and time.monotonic() < deadline:
                if not isinstance(item, int):
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        item.wait(timeout=0.1)
                else:
                    time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not isinstance(item, int):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    item.wait(timeout=2)
        self.procs.clear()

    def delete(self):
        self.stop_processes()
        # Anything still running in the namespace was started by this run.
        pids = run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "netns", "delete", self.name], check=False)


# iptables-nft's own tables, in nftables' listing: iptables-save and
# ip6tables-save above show them (an iptables read leaves them, empty, behind).
XTABLES_TABLES = {
    (family, name)
    for family in ("ip", "ip6")
    for name in ("filter", "mangle", "nat", "raw", "security")
}


def _without_xtables_tables(text):
    """``nft list ruleset`` output without iptables-nft's own tables."""
    kept, skip = [], False
    for line in text.splitlines(keepends=True):
        words = line.split()
        if line.startswith("table ") and len(words) >= 3:
            skip = (words[1], words[2]) in XTABLES_TABLES
        if not skip:
            kept.append(line)
        if line.startswith("}"):
            skip = False
    return "".join(kept)


def _without_kernel_routes(text):
    return "".join(line for line in text.splitlines(keepends=True) if "proto kernel" not in line)


def _strip_save_comments(text):
    """
    iptables-save output without its timestamp comments and chain counters
    (traffic, not state: restoring a table zeroes them), and without tables
    that hold nothing (only built-in chains with ACCEPT policy, no rules): the
    first iptables command creates such a table, and it filters nothing.
    """
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(":"):
            line = re.sub(r" \[\d+:\d+\]$", " [0:0]", line)
        if line.startswith("*"):
            current = [line]
            tables.append(current)
        elif current is not None:
            current.append(line)
    kept = []
    for table in tables:
        body = table[1:-1]
        # Built-in chains read ":NAME ACCEPT [0:0]"; user chains ":NAME - [0:0]".
        if not all(line.startswith(":") and " ACCEPT " in line for line in body):
            kept.extend(table)
    return "\n".join(kept) + "\n"


@contextlib.contextmanager
def made_netns(short):
    """A :class:`Netns` for a script's ``with``/ExitStack: deleted on exit, also when
    interrupted between ``ip netns add`` and the object (removed by name)."""
    name = f"{RUN_PREFIX}-{short}"
    try:
        ns = Netns(short)
    except BaseException:
        run(["ip", "netns", "delete", name], check=False)
        raise
    try:
        yield ns
    finally:
        ns.delete()


def veth(a, a_if, b, b_if):
    """A veth pair between two namespaces, created inside ``a`` (no root-namespace names)."""
    a.ip(f"link add {a_if} type veth peer name {b_if} netns {b.name}")
    a.ip(f"link set {a_if} up")
    b.ip(f"link set {b_if} up")


def mac_of(ns, ifname):
    out = ns.ip(f"-br link show dev {ifname}").stdout.split()
    return out[2].lower()


def remove_lock_files(lock_path):
    """Remove a run's relayroute host lock and what the engine keeps beside it (the read memo)."""
    for path in [Path(lock_path), *Path(lock_path).parent.glob(Path(lock_path).name + ".*")]:
        path.unlink(missing_ok=True)


def leftover_namespaces(prefix=RUN_PREFIX):
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]


# Mount points under /etc and whether each was there before this run touched it.
_ETC_BEFORE = {}


def etc_mount_point(path):
    """
    Make sure ``path`` (e.g. ``/etc/relayroute``) exists so that ``ip netns
    exec`` binds a namespace's ``/etc/netns/NS/<name>`` overlay over it (it
    binds only over directories that exist). Every user calls
    :func:`release_etc_mount_point` when done; the last one out removes it,
    unless it was there before this run. Returns True.
    """
    path = Path(path)
    _ETC_BEFORE.setdefault(str(path), path.exists())
    path.mkdir(exist_ok=True)
    return True


def release_etc_mount_point(path):
    """
    Remove a mount point :func:`etc_mount_point` made, unless another run's
    namespace still has an overlay for it (runs overlap: removing it under them
    would send their writes to the host's /etc) or something was put in it.
    """
    path = Path(path)
    if _ETC_BEFORE.get(str(path), True):
        return  # the host's own, or not made by this run
    if any(Path("/etc/netns").glob(f"*/{path.name}")):
        return
    with contextlib.suppress(OSError):
        path.rmdir()  # only when empty
