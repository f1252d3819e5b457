"""
What a scheduled re-apply of relayroute costs on a relay.

A relay namespace (192.0.2.11/24 on a veth to a peer namespace holding the
master-relay's 192.0.2.2 and 192.0.2.3, default route via 192.0.2.1) runs
``salt-call --local`` from a temporary configuration: the formula tree (symlinks
to this checkout's ``relayroute/``, ``_modules/``, ``_states/``) plus a ``bench``
directory, and a pillar with the topology. Two state runs are compared:

- ``bench.empty``: one ``test.nop`` state, the baseline (an empty state run:
  Salt's own start-up, grains, pillar, loaders, rendering);
- ``relayroute.relay``: the formula, already applied, so a no-op.

Every figure is a ratio or a difference against the baseline measured in the
same run, interleaved with it; nothing is compared with an absolute time.
Measured per run: wall time, CPU time of the whole process tree (``wait4``),
and, in separate runs under ``strace -f``, the processes exec'd. Then, with
relayroute's state flushed between runs (``relayroute.relay_remove``, outside
the measurement), what one apply that has work to do costs, and how many
``iptables-restore`` it runs.

Exit status 1 when the process budget is broken (counts, never timings): a no-op
re-apply execs at most 2 processes more than the empty state run and reports no
changes; an apply with work runs exactly one ``iptables-restore``.

    .venv/bin/python tests/bench/reapply.py [--runs N] [--json FILE]

Needs root, iproute2 and strace (``bash scripts/bench`` installs what is missing).
Everything it makes (namespaces, /etc/netns overlay, temporary directory,
processes) is removed at exit, also on failure or Ctrl-C.
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
# The project's budget: a no-op re-apply execs at most this many processes more
# than an empty state run (the one expected: iptables-save).
EXTRA_PROCESS_BUDGET = 2
EXPECTED_EXTRA = ["iptables-save"]
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


def pillar_sls(proxy_mac, mechanism="unit", watch=True):
    extra = NETWORK_SCRIPTS_PILLAR if mechanism == "network-scripts" else ""
    if not watch:
        extra += "  watch:\n    enabled: false\n"
    return f"""\
relayroute:
  lan_networks:
    - 192.0.2.0/24
  mark_mask: 0xff
  backend: iptables
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


def timed(argv, workdir, timeout=SALT_TIMEOUT):
    """Run ``argv`` in a session of its own; wall time and CPU time of its whole tree."""
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
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


class Relay:
    """The relay namespace and its salt-call configuration."""

    def __init__(self, netns, confdir, workdir, verbose=False):
        self.netns = netns
        self.confdir = confdir
        self.workdir = workdir
        self.verbose = verbose
        self.calls = 0

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
        result = timed(argv, self.workdir)
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


# Another tool's rules (a Kubernetes node's ruleset is about this size), all in
# the mangle table: the one relayroute reads and writes, the worst case for it.
FOREIGN_RULES = 10000


def plant_foreign_rules(ns, count):
    """``count`` rules of another tool in a chain of its own in the mangle table."""
    lines = ["*mangle", ":BENCH-FOREIGN - [0:0]", "-A PREROUTING -j BENCH-FOREIGN"]
    lines += [
        f"-A BENCH-FOREIGN -s 198.51.100.{i % 250 + 1}/32 -p tcp --dport {1024 + i} "
        f"-j MARK --set-xmark 0x{(i % 15 + 1) << 8:x}/0xf00"
        for i in range(count)
    ]
    lines += ["COMMIT", ""]
    ns.exec(["iptables-restore", "--noflush"], input="\n".join(lines), timeout=300)


def build(stack, tmp, mechanism="unit", watch=True, suffix=""):
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
    (pillar / "relayroute.sls").write_text(pillar_sls(mac_of(lan, "eth0"), mechanism, watch))

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


def measure(relay, runs, log, others=None):
    """
    ``others``: more relays, by name, whose no-op runs (``noop_<name>``) are
    interleaved with the others, so their differences are within the run:
    ``unwatched`` (its pillar switches the watcher off) and ``foreign`` (its
    packet filter holds another tool's rules; its applies with work,
    ``work_foreign``, are interleaved too).
    """
    others = others or {}
    results = {"baseline": [], "noop": [], "baseline_traced": [], "noop_traced": []}
    for name in others:
        results[f"noop_{name}"] = []
    results["work_foreign"] = []
    violations = []
    log("warm-up: saltutil.sync_all, first apply of relayroute.relay")
    for each in (relay, *others.values()):
        each.call("saltutil.sync_all")
        _, states = each.state(FORMULA_SLS)
        if not _changes(states):
            raise Failed("the first apply of relayroute.relay reported no changes")
    relay.state(BASELINE_SLS)

    def noop(strace):
        result, states = relay.state(FORMULA_SLS, strace=strace)
        changes = _changes(states)
        if changes:
            violations.append(f"no-op re-apply reported changes: {json.dumps(changes)}")
        return result

    def baseline(strace):
        return relay.state(BASELINE_SLS, strace=strace)[0]

    def noop_other(name):
        result, states = others[name].state(FORMULA_SLS)
        if _changes(states):
            violations.append(f"no-op re-apply ({name}) reported changes: {_changes(states)}")
        return result

    def work_on(host):
        flushed = json.loads(host.call("relayroute.relay_remove").stdout)["local"]
        if not flushed.get("changes"):
            raise Failed(f"relayroute.relay_remove removed nothing: {flushed!r}")
        result, states = host.state(FORMULA_SLS)
        if not _changes(states):
            raise Failed("an apply after relayroute.relay_remove reported no changes")
        return result

    for index in range(runs):
        log(f"no-op run {index + 1}/{runs}")
        # ABBA: alternate which goes first, so drift weighs on both alike.
        order = (("baseline", baseline), ("noop", noop))
        if index % 2:
            order = order[::-1]
        for key, func in order:
            results[key].append(func(False))
        for name in others:
            results[f"noop_{name}"].append(noop_other(name))
        for key, func in order:
            results[key + "_traced"].append(func(True))

    work, work_traced = [], []
    for index in range(runs):
        log(f"apply-with-work run {index + 1}/{runs}")
        for traced, into in ((False, work), (True, work_traced)):
            flushed = json.loads(relay.call("relayroute.relay_remove").stdout)["local"]
            if not flushed.get("changes"):
                raise Failed(f"relayroute.relay_remove removed nothing: {flushed!r}")
            result, states = relay.state(FORMULA_SLS, strace=traced)
            if not _changes(states):
                raise Failed("an apply after relayroute.relay_remove reported no changes")
            into.append(result)
        if "foreign" in others:
            results["work_foreign"].append(work_on(others["foreign"]))
    return results, work, work_traced, violations


def analyse(results, work, work_traced, violations):
    base, noop = results["baseline"], results["noop"]
    base_t, noop_t = results["baseline_traced"], results["noop_traced"]
    report = {
        "prefix": RUN_PREFIX,
        "runs": len(base),
        "baseline": {**_summary(base), **_trace_summary(base_t)},
        "noop": {**_summary(noop), **_trace_summary(noop_t)},
        "work": {**_summary(work), **_trace_summary(work_traced)},
    }
    b, n, w = report["baseline"], report["noop"], report["work"]
    # Ratios of the medians; and, as a check on drift, the median of the ratios
    # of each no-op run to the baseline run next to it (they ran back to back).
    report["ratios"] = {
        "noop_wall": round(n["median_wall_s"] / b["median_wall_s"], 3),
        "noop_cpu": round(n["median_cpu_s"] / b["median_cpu_s"], 3),
        "work_wall": round(w["median_wall_s"] / b["median_wall_s"], 3),
        "work_cpu": round(w["median_cpu_s"] / b["median_cpu_s"], 3),
        "noop_wall_paired": round(median([x.wall / y.wall for x, y in zip(noop, base)]), 3),
        "noop_cpu_paired": round(median([x.cpu / y.cpu for x, y in zip(noop, base)]), 3),
    }
    # Reported, never enforced: what the ratios mean on this machine, this run.
    report["differences_ms"] = {
        "noop_wall": round(1000 * (n["median_wall_s"] - b["median_wall_s"]), 1),
        "noop_cpu": round(1000 * (n["median_cpu_s"] - b["median_cpu_s"]), 1),
        "work_wall": round(1000 * (w["median_wall_s"] - b["median_wall_s"]), 1),
        "work_cpu": round(1000 * (w["median_cpu_s"] - b["median_cpu_s"]), 1),
    }
    noop_extra, noop_missing = extra_names(base_t[0].trace, noop_t[0].trace)
    work_extra, work_missing = extra_names(base_t[0].trace, work_traced[0].trace)
    restores = [t.trace.names().count("iptables-restore") for t in work_traced]
    report["processes"] = {
        "noop_extra_execs": n["median_execs"] - b["median_execs"],
        "noop_extra_execs_per_run": [
            len(x.trace.execs) - len(y.trace.execs) for x, y in zip(noop_t, base_t)
        ],
        "noop_extra_forks": n["median_forks"] - b["median_forks"],
        "noop_extra_names": noop_extra,
        "noop_unexpected_names": dict(
            collections.Counter(noop_extra) - collections.Counter(EXPECTED_EXTRA)
        ),
        "noop_missing_names": noop_missing,
        "work_extra_execs": w["median_execs"] - b["median_execs"],
        "work_extra_forks": w["median_forks"] - b["median_forks"],
        "work_extra_names": work_extra,
        "work_missing_names": work_missing,
        "work_iptables_restore_per_run": restores,
        "budget_extra_execs": EXTRA_PROCESS_BUDGET,
    }
    p = report["processes"]
    worst = max(p["noop_extra_execs_per_run"])
    if worst > EXTRA_PROCESS_BUDGET:
        violations.append(
            f"a no-op re-apply exec'd {worst} processes beyond the empty state run "
            f"(budget {EXTRA_PROCESS_BUDGET}): {noop_extra}"
        )
    if any(count != 1 for count in restores):
        violations.append(f"an apply with work ran iptables-restore {restores} times (want 1)")
    foreign = results.get("noop_foreign") or []
    if foreign:
        f = report["noop_foreign"] = _summary(foreign)
        fw = report["work_foreign"] = _summary(results["work_foreign"])
        report["foreign_rules"] = {
            "rules": FOREIGN_RULES,
            "noop_cpu_with_over_without": round(f["median_cpu_s"] / n["median_cpu_s"], 3),
            "work_cpu_with_over_without": round(fw["median_cpu_s"] / w["median_cpu_s"], 3),
            "noop_wall_with_over_without": round(f["median_wall_s"] / n["median_wall_s"], 3),
            "work_wall_with_over_without": round(fw["median_wall_s"] / w["median_wall_s"], 3),
        }
    unwatched = results.get("noop_unwatched") or []
    if unwatched:
        u = report["noop_unwatched"] = _summary(unwatched)
        report["watcher_share"] = {
            "noop_cpu_with_over_without": round(n["median_cpu_s"] / u["median_cpu_s"], 3),
            "noop_cpu_ms_with_minus_without": round(
                1000 * (n["median_cpu_s"] - u["median_cpu_s"]), 1
            ),
            "noop_unwatched_cpu_over_empty": round(u["median_cpu_s"] / b["median_cpu_s"], 3),
        }
    report["violations"] = violations
    report["ok"] = not violations
    return report


def _fmt_names(names):
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in names.items()) or "none"


def print_report(report, elapsed):
    b, n, w = report["baseline"], report["noop"], report["work"]
    r, d, p = report["ratios"], report["differences_ms"], report["processes"]
    lines = [
        "",
        f"relayroute re-apply benchmark: {report['runs']} runs of each, medians "
        f"(namespaces {report['prefix']}-*, {report['salt_calls']} salt-calls, "
        f"persist mechanism {report['mechanism']})",
        "",
        f"{'':34}{'wall s':>9}{'cpu s':>9}{'execs':>7}{'forks':>7}",
    ]
    for label, data in (
        (f"empty state run ({BASELINE_SLS})", b),
        (f"{FORMULA_SLS}, no-op", n),
        (f"{FORMULA_SLS}, with work", w),
    ):
        lines.append(
            f"{label:34}{data['median_wall_s']:>9.3f}{data['median_cpu_s']:>9.3f}"
            f"{data['median_execs']:>7g}{data['median_forks']:>7g}"
        )
    lines += [
        "",
        f"no-op / empty:     wall x{r['noop_wall']:.3f} ({d['noop_wall']:+.0f} ms)   "
        f"cpu x{r['noop_cpu']:.3f} ({d['noop_cpu']:+.0f} ms)   "
        f"run by run: wall x{r['noop_wall_paired']:.3f}, cpu x{r['noop_cpu_paired']:.3f}",
        f"with work / empty: wall x{r['work_wall']:.3f} ({d['work_wall']:+.0f} ms)   "
        f"cpu x{r['work_cpu']:.3f} ({d['work_cpu']:+.0f} ms)",
        "",
        f"processes exec'd by the empty state run ({b['median_execs']:g}):",
        *[
            f"  by {parent}: {_fmt_names(names)}"
            for parent, names in b["spawned_by"].items()
            if parent != "(started)"
        ],
        f"no-op re-apply, beyond the empty run: {p['noop_extra_execs']:+g} "
        f"(per run {p['noop_extra_execs_per_run']}; budget {EXTRA_PROCESS_BUDGET}): "
        f"{_fmt_names(p['noop_extra_names'])} "
        f"(expected {', '.join(EXPECTED_EXTRA)}; other: {_fmt_names(p['noop_unexpected_names'])})",
        f"apply with work, beyond the empty run: {p['work_extra_execs']:+g}: "
        f"{_fmt_names(p['work_extra_names'])}",
        f"iptables-restore per apply with work: {p['work_iptables_restore_per_run']} (want 1)",
    ]
    if report.get("watcher_share"):
        ws = report["watcher_share"]
        lines.append(
            "no-op without the watcher's states / empty: "
            f"cpu x{ws['noop_unwatched_cpu_over_empty']:.3f}; with / without them: "
            f"cpu x{ws['noop_cpu_with_over_without']:.3f} "
            f"({ws['noop_cpu_ms_with_minus_without']:+.0f} ms)"
        )
    if report.get("foreign_rules"):
        fr = report["foreign_rules"]
        lines.append(
            f"with {fr['rules']} rules of another tool in the mangle table / without: "
            f"no-op cpu x{fr['noop_cpu_with_over_without']:.3f} "
            f"(wall x{fr['noop_wall_with_over_without']:.3f}), "
            f"with work cpu x{fr['work_cpu_with_over_without']:.3f} "
            f"(wall x{fr['work_wall_with_over_without']:.3f})"
        )
    if p["noop_missing_names"] or p["work_missing_names"]:
        lines.append(
            f"run by the empty run only: no-op {_fmt_names(p['noop_missing_names'])}; "
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
        "--no-foreign-rules",
        dest="foreign_rules",
        action="store_false",
        help=f"skip the relay whose mangle table holds {FOREIGN_RULES} rules of another tool",
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
            relay, confdir, workdir = build(stack, tmp, args.mechanism)
            log(f"relay namespace {relay.name}, salt config {confdir}")
            bench = Relay(relay, confdir, workdir, verbose=args.verbose)
            others = {}
            if args.mechanism == "unit":
                # The same relay with the watcher switched off, beside it.
                (tmp / "unwatched").mkdir()
                other = build(stack, tmp / "unwatched", args.mechanism, watch=False, suffix="-nw")
                others["unwatched"] = Relay(*other, verbose=args.verbose)
            if args.foreign_rules:
                # The same relay on a host whose mangle table holds another tool's rules.
                (tmp / "foreign").mkdir()
                other = build(stack, tmp / "foreign", args.mechanism, suffix="-fr")
                plant_foreign_rules(other[0], FOREIGN_RULES)
                others["foreign"] = Relay(*other, verbose=args.verbose)
            results, work, work_traced, violations = measure(bench, args.runs, log, others)
            report = analyse(results, work, work_traced, violations)
            report["salt_calls"] = bench.calls
            report["mechanism"] = args.mechanism
            if args.mechanism == "unit" and args.idle > 0:
                log(
                    f"standing costs: the watcher idle for {args.idle:g} s, then other tools' "
                    "netlink events; the beacon's look"
                )
                discovered = tmp / "pillar-discovered.yaml"
                discovered.write_text(
                    "\n".join(
                        line
                        for line in (tmp / "pillar" / "relayroute.sls").read_text().splitlines()
                        if not line.strip().startswith("mac:")
                    )
                )
                report["standing"] = {
                    "watcher": standing.watcher_costs(relay, args.idle),
                    "beacon": standing.beacon_look_cost(
                        relay, sys.executable, ROOT / "_modules", discovered
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
    with contextlib.suppress(OSError):
        os.unlink(LOCK_PATH)


if __name__ == "__main__":
    sys.exit(main())
