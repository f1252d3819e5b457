"""
What a scheduled re-apply of relayroute costs on a relay, with each
packet-filter backend side by side (iptables, nftables).

Per backend, a relay namespace (192.0.2.11/24 on a veth to a peer namespace
holding the master-relay's 192.0.2.2 and 192.0.2.3, default route via
192.0.2.1) runs ``salt-call --local`` from a temporary configuration: the
formula tree (symlinks to this checkout's ``relayroute/``, ``_modules/``,
``_states/``) plus a ``bench`` directory, and a pillar with the topology and
``backend:`` pinned. Two state runs are compared:

- ``bench.empty``: one ``test.nop`` state, the baseline (an empty state run:
  Salt's own start-up, grains, pillar, loaders, rendering);
- ``relayroute.relay``: the formula, already applied, so a no-op.

Every figure is a ratio or a difference against the baseline measured in the
same run, interleaved with it; nothing is compared with an absolute time.
Measured per run: wall time, CPU time of the whole process tree (``wait4``),
and, in separate runs under ``strace -f``, the processes exec'd. Then, with
relayroute's state flushed between runs (``relayroute.relay_remove``, outside
the measurement), what one apply that has work to do costs, and which
processes it runs. Beside each backend's relay, interleaved: the same relay
with the watcher switched off (``watch:enabled: false``: the relayroute state
keeps no watcher unit), and the same relay on a host whose packet filter
holds 10,000 rules of another tool (iptables: a chain in the mangle
table; nftables: another tool's ``inet`` table hooked where relayroute's is),
as ratios to the relay without them, for a no-op and for an apply with work.

salt-call runs with Python's bytecode cache on (``PYTHONDONTWRITEBYTECODE``
dropped from its environment), as salt-minion on a host: Salt compiles the
modules it synced once, into this run's temporary ``extension_modules``.
``--no-bytecode`` measures every run compiling them again.

Exit status 1 when the process budget is broken (counts, never timings), per
backend (``BUDGETS``): a no-op re-apply reports no changes and execs, beyond
the empty state run, at most 2 processes with iptables (the one expected:
``iptables-save``) and none with nftables (libnftables, in the process); an
apply with work runs exactly one ``iptables-restore`` with iptables, and no
process at all beyond the empty run with nftables.

    .venv/bin/python tests/bench/reapply.py [--runs N] [--json FILE]
        [--backends iptables,nftables] [--no-foreign-rules] [--no-bytecode]

Needs root, iproute2, nftables and strace (``bash scripts/bench`` installs what
is missing). Everything it makes (namespaces, /etc/netns overlay, temporary
directory, processes) is removed at exit, also on failure or Ctrl-C.
"""

import argparse
import collections
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench import standing  # noqa: E402
from tests.support import rh7boot  # noqa: E402
from tests.support.netns import (  # noqa: E402
    RUN_PREFIX,
    etc_mount_point,
    leftover_namespaces,
    mac_of,
    made_netns,
    release_etc_mount_point,
    remove_lock_files,
    run,
    veth,
)

# relayroute's host lock for this run's salt-calls (they inherit the
# environment): nothing is left in the host's /run.
LOCK_PATH = f"/tmp/{RUN_PREFIX}-relayroute.lock"
os.environ.setdefault("RELAYROUTE_LOCK", LOCK_PATH)
SALT_CALL = ROOT / ".venv" / "bin" / "salt-call"
NS_PREFIX = "bench-"  # namespaces: <run prefix>-bench-relay, <run prefix>-bench-lan
NETNS_ETC = Path("/etc/netns")
MINION_ID = "relay1"
BASELINE_SLS = "bench.empty"
FORMULA_SLS = "relayroute.relay"
BACKENDS = ("iptables", "nftables")
# The project's budget: a no-op re-apply execs at most this many processes more
# than an empty state run. With iptables-nft none is expected: every chain
# relayroute reads has the digest its last read was made under (nftview.py);
# after another tool's change to PREROUTING, one listing of it (CHURN).
EXTRA_PROCESS_BUDGET = 2
EXPECTED_EXTRA = []
# Another tool's change to PREROUTING before a no-op (outside the measurement):
# the no-op lists that chain (``iptables -S PREROUTING``), not the whole table.
CHURN = {
    "iptables": lambda index: [
        "iptables",
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-p",
        "udp",
        "--dport",
        str(20000 + index),
    ],
}
SALT_TIMEOUT = 300

EMPTY_SLS = """\
# The baseline: a state run that does nothing.
bench-empty:
  test.nop: []
"""

PILLAR_TOP = """\
base:
  '*':
    - relayroute
"""


# --mechanism network-scripts: CentOS 7's files, inside the namespace's /etc overlay.
SYSCONFIG = "/etc/relayroute/sysconfig"
NETWORK_SCRIPTS_PILLAR = f"""\
  lookup:
    persist:
      mechanism: network-scripts
      network_scripts_dir: {SYSCONFIG}/network-scripts
      iptables_file: {SYSCONFIG}/iptables
"""


def pillar_sls(proxy_mac, mechanism="unit", watch=True, backend="iptables"):
    extra = NETWORK_SCRIPTS_PILLAR if mechanism == "network-scripts" else ""
    if not watch:
        extra += "  watch:\n    enabled: false\n"
    return f"""\
relayroute:
  lan_networks:
    - 192.0.2.0/24
  mark_mask: 0xff
  backend: {backend}
  proxies:
    master-relay:
      address: 192.0.2.2
      mac: '{proxy_mac}'
      mark: 254
      table: 1000254
      vip: 198.51.100.25
  relays:
    relay1:
      address: 192.0.2.11
{extra}"""


def minion_config(tmp, tree, pillar):
    """A salt-call --local configuration whose every path lies inside ``tmp``."""
    config = {
        "id": MINION_ID,
        "root_dir": str(tmp),
        "file_client": "local",
        "file_roots": {"base": [str(tree)]},
        "pillar_roots": {"base": [str(pillar)]},
        "grains": {"roles": ["relay"]},
        "enable_fqdns_grains": False,
        "cachedir": str(tmp / "cache"),
        "extension_modules": str(tmp / "cache" / "extmods"),
        "pki_dir": str(tmp / "pki"),
        "sock_dir": str(tmp / "sock"),
        "log_file": str(tmp / "log" / "minion"),
        "log_level_logfile": "warning",
    }
    # JSON is YAML: no quoting questions.
    return json.dumps(config, indent=2) + "\n"


# --------------------------------------------------------------------------
# strace output


@dataclass
class Exec:
    pid: int
    path: str
    argv: List[str]

    @property
    def name(self):
        return os.path.basename(self.path)

    def command(self, limit=6):
        words = self.argv[:limit] + (["..."] if len(self.argv) > limit else [])
        return " ".join(words)


@dataclass
class Trace:
    execs: List[Exec] = field(default_factory=list)
    forks: int = 0  # processes created (fork, vfork, clone without CLONE_THREAD)
    threads: int = 0
    parents: Dict[int, int] = field(default_factory=dict)  # child pid: parent pid

    def names(self):
        return [e.name for e in self.execs]

    def spawned_by(self):
        """``{program: {executable: count}}``: who exec'd what (a forked child's parent)."""
        program = {}
        for item in self.execs:
            program[item.pid] = item.name  # a pid's last exec: what it ran when it forked
        by = collections.defaultdict(collections.Counter)
        for item in self.execs:
            pid = self.parents.get(item.pid)
            # A child that forked without exec (a shell's subshell) belongs to its parent.
            while pid is not None and pid not in program:
                pid = self.parents.get(pid)
            by[program.get(pid, "(started)")][item.name] += 1
        return {name: dict(sorted(counts.items())) for name, counts in sorted(by.items())}


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
FORK_CALLS = ("clone", "clone3", "fork", "vfork")
EXEC_CALLS = ("execve", "execveat")


def _unescape(text):
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _exec_args(call):
    """The file name and argv of a strace execve line."""
    strings = _STRING.findall(call)
    if not strings:
        return None, []
    path = _unescape(strings[0])
    start = call.find("[")
    end = start
    in_string = escaped = False
    for end in range(start, len(call)):
        char = call[end]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "]":
            break
    argv = [_unescape(s) for s in _STRING.findall(call[start:end])] if start >= 0 else []
    return path, argv


def parse_strace(text):
    """Successful execs and process creations in ``strace -f -o FILE`` output."""
    trace = Trace()
    pending: Dict[int, str] = {}
    for raw in text.splitlines():
        match = _LINE.match(raw)
        if not match:
            continue
        pid, call = int(match.group(1)), match.group(2)
        if call.endswith("<unfinished ...>"):
            pending[pid] = call[: -len("<unfinished ...>")].rstrip()
            continue
        resumed = _RESUMED.match(call)
        if resumed:
            call = pending.pop(pid, resumed.group(1) + "(") + resumed.group(2)
        name = call.split("(", 1)[0]
        results = _RESULT.findall(call)  # the last one: argv may hold ") = "
        if not results or int(results[-1]) < 0:
            continue
        retval = int(results[-1])
        if name in EXEC_CALLS:
            path, argv = _exec_args(call)
            if path and os.path.basename(path) != "strace":
                trace.execs.append(Exec(pid, path, argv))
        elif name in FORK_CALLS and retval > 0:
            if "CLONE_THREAD" in call:
                trace.threads += 1
            else:
                trace.forks += 1
                trace.parents[retval] = pid
    return trace


# --------------------------------------------------------------------------
# running salt-call


@dataclass
class Run:
    wall: float
    cpu: float  # user + sys of the process and every descendant it waited for
    cpu_children: float  # the same from getrusage(RUSAGE_CHILDREN) deltas, a cross-check
    returncode: int
    stdout: str
    stderr: str
    trace: Optional[Trace] = None


class Failed(RuntimeError):
    """A step of the benchmark failed (not a budget violation)."""


def _kill_group(pid, sig=signal.SIGKILL):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def timed(argv, workdir, timeout=SALT_TIMEOUT, env=None):
    """Run ``argv`` in a session of its own; wall time and CPU time of its whole tree."""
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            env=env,
        )
        timer = threading.Timer(timeout, _kill_group, (proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            _kill_group(proc.pid)
            with contextlib.suppress(ChildProcessError):
                os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        cpu_children=children,
        returncode=proc.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def salt_environment(bytecode=True):
    """
    salt-call's environment: this one, with Python's bytecode cache as a minion
    has it (``bytecode``: Salt caches the compiled modules it synced next to
    them, in this run's temporary ``extension_modules``, as salt-minion does on
    a host; otherwise every run compiles relayroute's sources again, which a
    ``PYTHONDONTWRITEBYTECODE`` inherited from a test shell would do).
    """
    env = dict(os.environ)
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class Relay:
    """The relay namespace and its salt-call configuration."""

    def __init__(self, netns, confdir, workdir, verbose=False, bytecode=True):
        self.netns = netns
        self.confdir = confdir
        self.workdir = workdir
        self.verbose = verbose
        self.calls = 0
        self.env = salt_environment(bytecode)

    def argv(self, *args):
        return [
            "ip",
            "netns",
            "exec",
            self.netns.name,
            str(SALT_CALL),
            "--local",
            "-c",
            str(self.confdir),
            "--out=json",
            "--retcode-passthrough",
            "-l",
            "error",
            *args,
        ]

    def call(self, *args, strace=False):
        argv = self.argv(*args)
        trace_file = self.workdir / "strace.out"
        if strace:
            trace_file.unlink(missing_ok=True)
            argv = [
                "strace",
                "-f",
                "-qq",
                "-s",
                "4096",
                "-e",
                "trace=" + ",".join(EXEC_CALLS + FORK_CALLS),
                "-e",
                "signal=none",
                "-o",
                str(trace_file),
                *argv,
            ]
        self.calls += 1
        result = timed(argv, self.workdir, env=self.env)
        if strace:
            result.trace = parse_strace(trace_file.read_text(errors="replace"))
        if self.verbose:
            print(f"  salt-call {' '.join(args)}: {result.wall:.2f} s, rc {result.returncode}")
        if result.returncode != 0:
            raise Failed(
                f"salt-call {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def state(self, sls, strace=False):
        """Apply ``sls``; the run and its per-state results (all must succeed)."""
        result = self.call("state.sls", sls, strace=strace)
        states = _states(result.stdout, sls)
        return result, states


def _states(stdout, what):
    try:
        data = json.loads(stdout)["local"]
    except (ValueError, KeyError, TypeError) as err:
        raise Failed(f"{what}: salt-call printed no state results: {stdout[-2000:]!r}") from err
    if not isinstance(data, dict) or not data:
        raise Failed(f"{what}: no state results: {data!r}")
    bad = {key: value for key, value in data.items() if value.get("result") is not True}
    if bad:
        raise Failed(f"{what}: states did not succeed: {json.dumps(bad, indent=2)}")
    return data


def _changes(states):
    return {key: value["changes"] for key, value in states.items() if value.get("changes")}


# --------------------------------------------------------------------------
# the environment


# Another tool's rules (a Kubernetes node's ruleset is about this size), where
# relayroute reads and writes: for iptables all in the mangle table (iptables-nft
# here, as Debian's iptables is), for nftables in another tool's table of the
# same family and hook as relayroute's (inet, prerouting at mangle priority).
FOREIGN_RULES = 10000
FOREIGN_NFT_TABLE = "bench_foreign"


def plant_foreign_rules(ns, count, backend="iptables"):
    """``count`` rules of another tool in the packet filter ``backend`` uses."""
    if backend == "nftables":
        lines = [
            f"table inet {FOREIGN_NFT_TABLE} {{",
            "  chain prerouting {",
            "    type filter hook prerouting priority mangle; policy accept;",
        ]
        lines += [
            f"    ip saddr 198.51.100.{i % 250 + 1} tcp dport {1024 + i} "
            f"meta mark set meta mark & 0xfffff0ff | 0x{(i % 15 + 1) << 8:x}"
            for i in range(count)
        ]
        lines += ["  }", "}", ""]
        ns.exec(["nft", "-f", "-"], input="\n".join(lines), timeout=300)
        listed = ns.exec(["nft", "list", "chain", "inet", FOREIGN_NFT_TABLE, "prerouting"]).stdout
        held = sum("meta mark set" in line for line in listed.splitlines())
        if held != count:
            raise Failed(f"the foreign nftables table holds {held} rules, not {count}")
        return
    # iptables: a chain of its own in the mangle table.
    lines = ["*mangle", ":BENCH-FOREIGN - [0:0]", "-A PREROUTING -j BENCH-FOREIGN"]
    lines += [
        f"-A BENCH-FOREIGN -s 198.51.100.{i % 250 + 1}/32 -p tcp --dport {1024 + i} "
        f"-j MARK --set-xmark 0x{(i % 15 + 1) << 8:x}/0xf00"
        for i in range(count)
    ]
    lines += ["COMMIT", ""]
    ns.exec(["iptables-restore", "--noflush"], input="\n".join(lines), timeout=300)


def build(stack, tmp, mechanism="unit", watch=True, suffix="", backend="iptables"):
    """Namespaces, /etc/netns overlay, formula tree, pillar and minion config."""
    relay = stack.enter_context(made_netns(f"{NS_PREFIX}relay{suffix}"))
    lan = stack.enter_context(made_netns(f"{NS_PREFIX}lan{suffix}"))
    veth(relay, "eth0", lan, "eth0")
    relay.ip("addr add 192.0.2.11/24 dev eth0")
    lan.ip("addr add 192.0.2.2/24 dev eth0")
    lan.ip("addr add 192.0.2.3/24 dev eth0")
    relay.ip("route add default via 192.0.2.1")

    # ip netns exec bind-mounts /etc/netns/NS/* over /etc/*: an empty
    # resolv.conf keeps Salt's lookups from waiting on an unreachable resolver,
    # and what the formula persists for boot stays in the overlay, off the host.
    # ip netns exec binds an overlay only over a directory that exists: an
    # empty mount point, removed at exit (after the overlay, callbacks run last
    # first) when this run made it and no other run's overlay still needs it.
    if etc_mount_point("/etc/relayroute"):
        stack.callback(release_etc_mount_point, "/etc/relayroute")
    overlay = NETNS_ETC / relay.name
    stack.callback(shutil.rmtree, overlay, ignore_errors=True)
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "resolv.conf").write_text("")
    for sub in ("relayroute", "systemd", "sysctl.d"):
        (overlay / sub).mkdir()
    if mechanism == "network-scripts":
        rh7boot.prepare_host(
            overlay / "relayroute" / "sysconfig",
            overlay / "systemd" / "system",
            relay.exec("iptables-save").stdout,
        )

    tree = tmp / "file-roots"
    tree.mkdir()
    for name in ("relayroute", "_modules", "_states"):
        (tree / name).symlink_to(ROOT / name, target_is_directory=True)
    (tree / "bench").mkdir()
    (tree / "bench" / "empty.sls").write_text(EMPTY_SLS)

    pillar = tmp / "pillar"
    pillar.mkdir()
    (pillar / "top.sls").write_text(PILLAR_TOP)
    (pillar / "relayroute.sls").write_text(
        pillar_sls(mac_of(lan, "eth0"), mechanism, watch, backend)
    )

    confdir = tmp / "conf"
    confdir.mkdir()
    (confdir / "minion").write_text(minion_config(tmp, tree, pillar))
    workdir = tmp / "work"
    workdir.mkdir()
    return relay, confdir, workdir


# --------------------------------------------------------------------------
# measurement


def median(values):
    return statistics.median(values) if values else None


def _summary(runs):
    return {
        "wall_s": [round(r.wall, 4) for r in runs],
        "cpu_s": [round(r.cpu, 4) for r in runs],
        "cpu_children_s": [round(r.cpu_children, 4) for r in runs],
        "median_wall_s": round(median([r.wall for r in runs]), 4),
        "median_cpu_s": round(median([r.cpu for r in runs]), 4),
    }


def _trace_summary(runs):
    traces = [r.trace for r in runs]
    return {
        "execs": [len(t.execs) for t in traces],
        "forks": [t.forks for t in traces],
        "median_execs": median([len(t.execs) for t in traces]),
        "median_forks": median([t.forks for t in traces]),
        "names": dict(sorted(collections.Counter(traces[0].names()).items())),
        "spawned_by": traces[0].spawned_by(),
        "commands": [e.command() for e in traces[0].execs],
    }


def extra_names(base, other):
    """Executables ``other`` runs beyond ``base`` (a multiset difference), by name."""
    extra = collections.Counter(other.names()) - collections.Counter(base.names())
    missing = collections.Counter(base.names()) - collections.Counter(other.names())
    return dict(sorted(extra.items())), dict(sorted(missing.items()))


@dataclass
class Host:
    """One backend's relays: the measured one and those beside it (by kind)."""

    backend: str
    relay: Relay
    others: Dict[str, Relay] = field(default_factory=dict)  # "unwatched", "foreign"


def measure(hosts, runs, log):
    """
    ``hosts``: one ``Host`` per backend. Each run measures the empty state run
    (on the first backend's relay: it does not depend on the backend) and each
    backend's no-op, in an order that alternates run by run (ABBA), so drift
    weighs on all alike; then, interleaved with them, the no-ops of the relays
    beside each (``unwatched``: its pillar switches the watcher off;
    ``foreign``: its packet filter holds another tool's rules), and the same
    again under strace. Then applies with work: relayroute's state removed
    (``relayroute.relay_remove``, outside the measurement), then applied, on
    each backend's relay (timed and traced) and its ``foreign`` relay.
    """
    results = collections.defaultdict(list)
    violations = []
    first = hosts[0].relay
    log("warm-up: saltutil.sync_all, first apply of relayroute.relay")
    for host in hosts:
        for each in (host.relay, *host.others.values()):
            each.call("saltutil.sync_all")
            _, states = each.state(FORMULA_SLS)
            if not _changes(states):
                raise Failed(
                    f"the first apply of relayroute.relay ({host.backend}) changed nothing"
                )
            # Once more: bytecode of every module the no-op loads is cached.
            each.state(FORMULA_SLS)
    first.state(BASELINE_SLS)

    def baseline(strace):
        return first.state(BASELINE_SLS, strace=strace)[0]

    def noop_on(host, relay, what, strace=False):
        result, states = relay.state(FORMULA_SLS, strace=strace)
        changes = _changes(states)
        if changes:
            violations.append(
                f"{host.backend}: no-op re-apply ({what}) reported changes: {json.dumps(changes)}"
            )
        return result

    def work_on(host, relay, strace=False):
        flushed = json.loads(
            relay.call("relayroute.relay_remove", f"backend={host.backend}").stdout
        )
        if not flushed["local"].get("changes"):
            raise Failed(f"{host.backend}: relayroute.relay_remove removed nothing: {flushed!r}")
        result, states = relay.state(FORMULA_SLS, strace=strace)
        if not _changes(states):
            raise Failed(f"{host.backend}: an apply after relayroute.relay_remove changed nothing")
        return result

    steps = [("baseline", baseline)] + [
        (f"{host.backend}:noop", lambda strace, h=host: noop_on(h, h.relay, "", strace))
        for host in hosts
    ]
    for index in range(runs):
        log(f"no-op run {index + 1}/{runs}")
        order = steps if index % 2 == 0 else steps[::-1]
        for key, func in order:
            results[key].append(func(False))
        for host in hosts if index % 2 == 0 else hosts[::-1]:
            for name, relay in host.others.items():
                results[f"{host.backend}:noop_{name}"].append(noop_on(host, relay, name))
            if host.backend in CHURN:
                # Another tool changed its own rules since: PREROUTING's digest moved.
                relays = [("", host.relay)]
                if "foreign" in host.others:
                    relays.append(("_foreign", host.others["foreign"]))
                for suffix, relay in relays:
                    relay.netns.exec(CHURN[host.backend](index))
                    results[f"{host.backend}:noop_changed{suffix}"].append(
                        noop_on(host, relay, "another tool changed PREROUTING")
                    )
        for key, func in order:
            results[key + "_traced"].append(func(True))

    for index in range(runs):
        log(f"apply-with-work run {index + 1}/{runs}")
        for host in hosts if index % 2 == 0 else hosts[::-1]:
            results[f"{host.backend}:work"].append(work_on(host, host.relay))
            results[f"{host.backend}:work_traced"].append(work_on(host, host.relay, strace=True))
            if "foreign" in host.others:
                results[f"{host.backend}:work_foreign"].append(
                    work_on(host, host.others["foreign"])
                )
    return results, violations


# The process budget, per backend (counts, never timings). A no-op execs at most
# ``noop_budget`` processes beyond the empty state run (``noop_expected``: the
# ones it should be); an apply with work runs ``work_tools`` exactly so many
# times each, and at most ``work_budget`` processes beyond the empty run
# (None: not enforced). nftables goes through libnftables in the process.
BUDGETS = {
    "iptables": {
        "noop_budget": EXTRA_PROCESS_BUDGET,
        "noop_expected": EXPECTED_EXTRA,
        "work_tools": {"iptables-restore": 1},
        "work_budget": None,
    },
    "nftables": {
        "noop_budget": 0,
        "noop_expected": [],
        "work_tools": {"nft": 0, "iptables-restore": 0, "iptables-save": 0},
        "work_budget": 0,
    },
}


def _ratio(a, b):
    return round(a / b, 3) if b else None


def analyse(results, violations, backends):
    base, base_t = results["baseline"], results["baseline_traced"]
    b = {**_summary(base), **_trace_summary(base_t)}
    report = {"prefix": RUN_PREFIX, "runs": len(base), "baseline": b, "backends": {}}
    for backend in backends:
        key = f"{backend}:"
        noop, noop_t = results[key + "noop"], results[key + "noop_traced"]
        work, work_t = results[key + "work"], results[key + "work_traced"]
        n = {**_summary(noop), **_trace_summary(noop_t)}
        w = {**_summary(work), **_trace_summary(work_t)}
        entry = {"noop": n, "work": w}
        # Ratios of the medians; and, as a check on drift, the median of the
        # ratios of each no-op run to the empty run next to it (back to back).
        entry["ratios"] = {
            "noop_wall": _ratio(n["median_wall_s"], b["median_wall_s"]),
            "noop_cpu": _ratio(n["median_cpu_s"], b["median_cpu_s"]),
            "work_wall": _ratio(w["median_wall_s"], b["median_wall_s"]),
            "work_cpu": _ratio(w["median_cpu_s"], b["median_cpu_s"]),
            "noop_wall_paired": round(median([x.wall / y.wall for x, y in zip(noop, base)]), 3),
            "noop_cpu_paired": round(median([x.cpu / y.cpu for x, y in zip(noop, base)]), 3),
        }
        # Reported, never enforced: what the ratios mean on this machine, this run.
        entry["differences_ms"] = {
            "noop_wall": round(1000 * (n["median_wall_s"] - b["median_wall_s"]), 1),
            "noop_cpu": round(1000 * (n["median_cpu_s"] - b["median_cpu_s"]), 1),
            "work_wall": round(1000 * (w["median_wall_s"] - b["median_wall_s"]), 1),
            "work_cpu": round(1000 * (w["median_cpu_s"] - b["median_cpu_s"]), 1),
        }
        budget = BUDGETS[backend]
        noop_extra, noop_missing = extra_names(base_t[0].trace, noop_t[0].trace)
        work_extra, work_missing = extra_names(base_t[0].trace, work_t[0].trace)
        per_run = [len(x.trace.execs) - len(y.trace.execs) for x, y in zip(noop_t, base_t)]
        work_per_run = [len(x.trace.execs) - len(y.trace.execs) for x, y in zip(work_t, base_t)]
        tools = {
            tool: [t.trace.names().count(tool) for t in work_t] for tool in budget["work_tools"]
        }
        entry["processes"] = {
            "noop_extra_execs": n["median_execs"] - b["median_execs"],
            "noop_extra_execs_per_run": per_run,
            "noop_extra_forks": n["median_forks"] - b["median_forks"],
            "noop_extra_names": noop_extra,
            "noop_unexpected_names": dict(
                collections.Counter(noop_extra) - collections.Counter(budget["noop_expected"])
            ),
            "noop_missing_names": noop_missing,
            "work_extra_execs": w["median_execs"] - b["median_execs"],
            "work_extra_execs_per_run": work_per_run,
            "work_extra_forks": w["median_forks"] - b["median_forks"],
            "work_extra_names": work_extra,
            "work_missing_names": work_missing,
            "work_tools_per_run": tools,
            "budget": budget,
        }
        if max(per_run) > budget["noop_budget"]:
            violations.append(
                f"{backend}: a no-op re-apply exec'd {max(per_run)} processes beyond the empty "
                f"state run (budget {budget['noop_budget']}): {noop_extra}"
            )
        for tool, counts in tools.items():
            want = budget["work_tools"][tool]
            if any(count != want for count in counts):
                violations.append(
                    f"{backend}: an apply with work ran {tool} {counts} times (want {want})"
                )
        if budget["work_budget"] is not None and max(work_per_run) > budget["work_budget"]:
            violations.append(
                f"{backend}: an apply with work exec'd {max(work_per_run)} processes beyond the "
                f"empty state run (budget {budget['work_budget']}): {work_extra}"
            )
        foreign = results.get(key + "noop_foreign") or []
        if foreign:
            f = entry["noop_foreign"] = _summary(foreign)
            fw = entry["work_foreign"] = _summary(results[key + "work_foreign"])
            entry["foreign_rules"] = {
                "rules": FOREIGN_RULES,
                "where": FOREIGN_WHERE[backend],
                "noop_cpu_with_over_without": _ratio(f["median_cpu_s"], n["median_cpu_s"]),
                "work_cpu_with_over_without": _ratio(fw["median_cpu_s"], w["median_cpu_s"]),
                "noop_wall_with_over_without": _ratio(f["median_wall_s"], n["median_wall_s"]),
                "work_wall_with_over_without": _ratio(fw["median_wall_s"], w["median_wall_s"]),
                "noop_cpu_ms_with_minus_without": round(
                    1000 * (f["median_cpu_s"] - n["median_cpu_s"]), 1
                ),
                "work_cpu_ms_with_minus_without": round(
                    1000 * (fw["median_cpu_s"] - w["median_cpu_s"]), 1
                ),
            }
        changed = results.get(key + "noop_changed") or []
        if changed:
            c = entry["noop_changed"] = _summary(changed)
            entry["after_change"] = {
                "noop_cpu_over_noop": _ratio(c["median_cpu_s"], n["median_cpu_s"]),
                "noop_cpu_ms_minus_noop": round(1000 * (c["median_cpu_s"] - n["median_cpu_s"]), 1),
                "noop_cpu_over_empty": _ratio(c["median_cpu_s"], b["median_cpu_s"]),
            }
            changed_foreign = results.get(key + "noop_changed_foreign") or []
            if changed_foreign:
                cf = entry["noop_changed_foreign"] = _summary(changed_foreign)
                entry["after_change"]["foreign_cpu_with_over_without"] = _ratio(
                    cf["median_cpu_s"], c["median_cpu_s"]
                )
                entry["after_change"]["foreign_cpu_ms_with_minus_without"] = round(
                    1000 * (cf["median_cpu_s"] - c["median_cpu_s"]), 1
                )
        unwatched = results.get(key + "noop_unwatched") or []
        if unwatched:
            u = entry["noop_unwatched"] = _summary(unwatched)
            entry["watcher_share"] = {
                "noop_cpu_with_over_without": _ratio(n["median_cpu_s"], u["median_cpu_s"]),
                "noop_cpu_ms_with_minus_without": round(
                    1000 * (n["median_cpu_s"] - u["median_cpu_s"]), 1
                ),
                "noop_unwatched_cpu_over_empty": _ratio(u["median_cpu_s"], b["median_cpu_s"]),
            }
        report["backends"][backend] = entry
    report["violations"] = violations
    report["ok"] = not violations
    return report


FOREIGN_WHERE = {
    "iptables": "iptables' mangle table",
    "nftables": f"nftables table inet {FOREIGN_NFT_TABLE}",
}
# The issue's goals, printed beside the figures (never enforced: timings).
GOAL_NOOP_CPU = 1.15
GOAL_FOREIGN = 1.10


def _fmt_names(names):
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in names.items()) or "none"


def _row(label, cells, width=24):
    return f"{label:44}" + "".join(f"{cell:>{width}}" for cell in cells)


def _vs(key):
    """A cell: the ratio to the empty run and the difference in ms."""
    return lambda e: f"x{e['ratios'][key]:.3f} {e['differences_ms'][key]:+5.0f} ms"


def print_report(report, elapsed):
    b = report["baseline"]
    backends = list(report["backends"])
    data = report["backends"]
    lines = [
        "",
        f"relayroute re-apply benchmark: {report['runs']} runs of each, medians "
        f"(namespaces {report['prefix']}-*, {report['salt_calls']} salt-calls, "
        f"persist mechanism {report['mechanism']}, "
        f"bytecode cache {'on, as on a minion' if report['bytecode'] else 'off'})",
        "",
        _row("", backends),
        _row("", ["wall s   cpu s  execs" for _ in backends]),
        _row(
            f"empty state run ({BASELINE_SLS})",
            [
                f"{b['median_wall_s']:.3f}  {b['median_cpu_s']:6.3f}  {b['median_execs']:5g}"
                for _ in backends
            ],
        ),
    ]

    def cells(func):
        return [func(data[name]) for name in backends]

    for label, kind in (("no-op", "noop"), ("with work", "work")):
        lines.append(
            _row(
                f"{FORMULA_SLS}, {label}",
                cells(
                    lambda e, k=kind: f"{e[k]['median_wall_s']:.3f}  {e[k]['median_cpu_s']:6.3f}  "
                    f"{e[k]['median_execs']:5g}"
                ),
            )
        )
    lines += [
        "",
        _row(f"no-op / empty: cpu (goal <= x{GOAL_NOOP_CPU})", cells(_vs("noop_cpu"))),
        _row("no-op / empty: wall", cells(_vs("noop_wall"))),
        _row(
            "no-op / empty, run by run: cpu, wall",
            cells(
                lambda e: "x{noop_cpu_paired:.3f}, x{noop_wall_paired:.3f}".format(**e["ratios"])
            ),
        ),
        _row("with work / empty: cpu", cells(_vs("work_cpu"))),
        _row("with work / empty: wall", cells(_vs("work_wall"))),
    ]
    if all(data[name].get("foreign_rules") for name in backends):
        lines += [
            "",
            f"with {FOREIGN_RULES} rules of another tool / without (goal <= x{GOAL_FOREIGN}):",
            _row(
                "  no-op: cpu",
                cells(
                    lambda e: f"x{e['foreign_rules']['noop_cpu_with_over_without']:.3f} "
                    f"{e['foreign_rules']['noop_cpu_ms_with_minus_without']:+5.0f} ms"
                ),
            ),
            _row(
                "  no-op: wall",
                cells(lambda e: f"x{e['foreign_rules']['noop_wall_with_over_without']:.3f}"),
            ),
            _row(
                "  with work: cpu",
                cells(
                    lambda e: f"x{e['foreign_rules']['work_cpu_with_over_without']:.3f} "
                    f"{e['foreign_rules']['work_cpu_ms_with_minus_without']:+5.0f} ms"
                ),
            ),
            _row(
                "  with work: wall",
                cells(lambda e: f"x{e['foreign_rules']['work_wall_with_over_without']:.3f}"),
            ),
        ]
        lines += [f"  {name}: in {FOREIGN_WHERE[name]}" for name in backends]
    changed = [name for name in backends if data[name].get("after_change")]
    for name in changed:
        a = data[name]["after_change"]
        lines += [
            "",
            f"{name}: no-op after another tool changed PREROUTING (which it lists again):",
            f"  cpu vs the no-op x{a['noop_cpu_over_noop']:.3f} "
            f"{a['noop_cpu_ms_minus_noop']:+.0f} ms; "
            f"vs the empty run x{a['noop_cpu_over_empty']:.3f}",
        ]
        if "foreign_cpu_with_over_without" in a:
            lines.append(
                f"  with {FOREIGN_RULES} rules of another tool / without: "
                f"cpu x{a['foreign_cpu_with_over_without']:.3f} "
                f"{a['foreign_cpu_ms_with_minus_without']:+.0f} ms"
            )
    if all(data[name].get("watcher_share") for name in backends):
        lines += [
            "",
            _row(
                "no-op, watch:enabled false / empty",
                cells(lambda e: f"cpu x{e['watcher_share']['noop_unwatched_cpu_over_empty']:.3f}"),
            ),
            _row(
                "  with / without the watcher: cpu",
                cells(
                    lambda e: f"x{e['watcher_share']['noop_cpu_with_over_without']:.3f} "
                    f"{e['watcher_share']['noop_cpu_ms_with_minus_without']:+5.0f} ms"
                ),
            ),
        ]
    lines += [
        "",
        f"processes exec'd by the empty state run ({b['median_execs']:g}):",
        *[
            f"  by {parent}: {_fmt_names(names)}"
            for parent, names in b["spawned_by"].items()
            if parent != "(started)"
        ],
    ]
    for name in backends:
        p = data[name]["processes"]
        budget = p["budget"]
        expected = ", ".join(budget["noop_expected"]) or "none"
        lines += [
            f"{name}:",
            f"  no-op, beyond the empty run: {p['noop_extra_execs']:+g} "
            f"(per run {p['noop_extra_execs_per_run']}; budget {budget['noop_budget']}): "
            f"{_fmt_names(p['noop_extra_names'])} "
            f"(expected {expected}; other: {_fmt_names(p['noop_unexpected_names'])})",
            f"  with work, beyond the empty run: {p['work_extra_execs']:+g} "
            f"(per run {p['work_extra_execs_per_run']}"
            + (f"; budget {budget['work_budget']}" if budget["work_budget"] is not None else "")
            + f"): {_fmt_names(p['work_extra_names'])}",
            "  per apply with work: "
            + ", ".join(
                f"{tool} {counts} (want {budget['work_tools'][tool]})"
                for tool, counts in p["work_tools_per_run"].items()
            ),
        ]
        if p["noop_missing_names"] or p["work_missing_names"]:
            lines.append(
                f"  run by the empty run only: no-op {_fmt_names(p['noop_missing_names'])}; "
                f"with work {_fmt_names(p['work_missing_names'])}"
            )
    if report.get("standing"):
        wat, bea = report["standing"]["watcher"], report["standing"]["beacon"]
        lines += [
            "",
            f"watcher idle ({wat['processes']} processes, {wat['idle_s']:g} s watched): "
            f"{wat['idle_cpu_s_per_hour']:g} CPU s per hour (resolution "
            f"{wat['idle_cpu_s_per_hour_resolution']:g}), RSS {wat['rss_kb']} kB; "
            f"{wat['cpu_s_per_1000_foreign_events']:g} CPU s per 1000 netlink events of other "
            f"tools ({wat['restores_run_for_foreign_events']} restores run for them)",
            f"beacon's look (without Salt's plumbing): {bea['cpu_ms_per_look']:g} ms CPU, "
            f"{bea['cpu_s_per_hour']:g} CPU s per hour at interval {bea['interval_s']} s",
        ]
    lines += ["", f"wall-clock for the whole benchmark: {elapsed:.1f} s"]
    if report["violations"]:
        lines += ["", "BUDGET VIOLATED:"] + [f"  - {v}" for v in report["violations"]]
    else:
        lines += ["", "process budget: ok"]
    print("\n".join(lines))


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every salt-call")
    parser.add_argument(
        "--mechanism",
        choices=("unit", "network-scripts"),
        default="unit",
        help="persist mechanism of the formula (default unit; network-scripts: CentOS 7's files)",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"packet-filter backends measured side by side (default {','.join(BACKENDS)})",
    )
    parser.add_argument(
        "--no-foreign-rules",
        dest="foreign_rules",
        action="store_false",
        help=f"skip the relays whose packet filter holds {FOREIGN_RULES} rules of another tool",
    )
    parser.add_argument(
        "--no-bytecode",
        dest="bytecode",
        action="store_false",
        help="run salt-call with PYTHONDONTWRITEBYTECODE=1 (every run compiles relayroute's "
        "synced sources again; default: Salt caches their bytecode, as salt-minion does)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=60.0,
        help="seconds the watcher is watched idle (default 60; 0 skips the standing costs)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if not backends or any(name not in BACKENDS for name in backends):
        parser.error(f"--backends: one or more of {', '.join(BACKENDS)}")
    if args.mechanism == "network-scripts" and "nftables" in backends:
        if args.backends != ",".join(BACKENDS):
            parser.error("--mechanism network-scripts persists iptables' rules: no nftables")
        backends = ["iptables"]  # CentOS 7's files hold iptables' rules only
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    for tool in ("ip", "strace"):
        if not shutil.which(tool):
            parser.error(f"{tool} is not installed (bash scripts/bench installs it)")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)

    def log(text):
        print(f"bench: {text}", flush=True)

    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}-bench-"))
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            # Belt and braces: no namespace of this run survives it.
            stack.callback(_remove_leftovers)
            hosts = []
            for backend in backends:
                short = backend[:3]

                def made(kind, watch=True, suffix="", backend=backend, short=short):
                    where = tmp / backend / kind
                    where.mkdir(parents=True)
                    ns, confdir, workdir = build(
                        stack, where, args.mechanism, watch, f"-{short}{suffix}", backend
                    )
                    return Relay(ns, confdir, workdir, args.verbose, args.bytecode)

                host = Host(backend, made("relay"))
                log(f"{backend}: relay namespace {host.relay.netns.name}")
                if args.mechanism == "unit":
                    # The same relay with the watcher switched off, beside it.
                    host.others["unwatched"] = made("unwatched", watch=False, suffix="-nw")
                if args.foreign_rules:
                    # The same relay on a host whose packet filter holds another tool's rules.
                    host.others["foreign"] = made("foreign", suffix="-fr")
                    plant_foreign_rules(host.others["foreign"].netns, FOREIGN_RULES, backend)
                hosts.append(host)
            results, violations = measure(hosts, args.runs, log)
            report = analyse(results, violations, backends)
            report["salt_calls"] = sum(
                relay.calls for host in hosts for relay in (host.relay, *host.others.values())
            )
            report["mechanism"] = args.mechanism
            report["bytecode"] = args.bytecode
            if args.mechanism == "unit" and args.idle > 0:
                first = hosts[0]
                log(
                    f"standing costs ({first.backend}'s relay): the watcher idle for "
                    f"{args.idle:g} s, then other tools' netlink events; the beacon's look"
                )
                pillar = first.relay.confdir.parent / "pillar" / "relayroute.sls"
                discovered = tmp / "pillar-discovered.yaml"
                discovered.write_text(
                    "\n".join(
                        line
                        for line in pillar.read_text().splitlines()
                        if not line.strip().startswith("mac:")
                    )
                )
                report["standing"] = {
                    "backend": first.backend,
                    "watcher": standing.watcher_costs(first.relay.netns, args.idle),
                    "beacon": standing.beacon_look_cost(
                        first.relay.netns, sys.executable, ROOT / "_modules", discovered
                    ),
                }
            report["elapsed_s"] = round(time.monotonic() - started, 1)
    except KeyboardInterrupt:
        print("bench: interrupted; cleaned up", file=sys.stderr)
        return 130
    except Failed as err:
        print(f"bench: FAILED: {err}", file=sys.stderr)
        return 2
    print_report(report, report["elapsed_s"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0 if report["ok"] else 1


def _remove_leftovers():
    # Only the bench's own names: RELAYROUTE_NETNS_PREFIX may be shared with a test run.
    for name in leftover_namespaces(RUN_PREFIX):
        if name.startswith(f"{RUN_PREFIX}-{NS_PREFIX}"):
            run(["ip", "netns", "delete", name], check=False)
    remove_lock_files(LOCK_PATH)


if __name__ == "__main__":
    sys.exit(main())
