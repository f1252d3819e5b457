"""
Fleet scale: what a highstate of a whole fleet costs, as ratios to a
highstate of one relay measured in the same run.

The fleet (``tests/lab_fleet/fleetlab.py``): one salt-master in a namespace of
its own, two proxies (px1, px2) running HAProxy, N relays, and a probe minion,
each host a salt-minion in its own namespace with its ``roles`` grain; the
pillar is generated (every relay and proxy listed), so each minion's pillar
grows with N (one line per relay). Every process runs in a cgroup (v2) of its
group: the master, the Salt CLI, each relay, each proxy, the probe minion,
HAProxy, the relays' SMTP responder; CPU is ``usage_usec`` of those cgroups
over each measured call, wall time that of the Salt CLI call.

Measured, in one run:

- cold: the very first highstate of relay01 alone (it syncs relayroute's
  modules), then of the other N-1 relays together; then the proxies' first;
- per round (``--runs``, alternately one relay first and the fleet first,
  ABBA): relayroute removed from the relays measured (``relayroute.relay.clean``,
  outside the measurement), then a highstate with work, then a no-op
  highstate, of relay01 alone (``one``) and of all N relays (``fleet``);
  the proxies' highstate with work (after ``relayroute.proxy.clean``) and
  no-op; ``salt-run relayroute.probe`` over the fleet (6 paths a relay:
  direct and via each proxy's VIP, ports 25 and 587).

CPU of a highstate = the master + the targeted minions (the Salt CLI that
made the call, about 0.7 s whatever it targets, and the relays a highstate does
not target, which receive the publish and drop it, are reported apart).
Computed: the fleet's CPU per relay over one relay's (goal <= x1.2), and the
fleet's wall time over its CPU / cores (1.0: CPU-bound on every core, nothing
serialises the minions; well above 1: something waits).
The minions' own state timings (each state's ``start_time`` in its return)
give the spread of the relays' starts. The share of the machine's CPU other
processes took during each call (``/proc/stat`` minus the fleet's cgroups) is
reported beside it: on a shared machine it is the noise.

Correctness (exit 1 otherwise, never on timings): every targeted relay
answered with every state succeeding, an apply after the clean changed
something on each, a no-op changed nothing, the probe passed on every path.

    .venv/bin/python tests/bench/fleet.py [--relays 20] [--runs 3] [--json FILE] [-v]

Needs root, cgroup v2 (hybrid hosts: /sys/fs/cgroup/unified), iproute2,
HAProxy (``bash scripts/bench-fleet`` runs ``scripts/setup`` first).
Everything it makes (namespaces ``<prefix>-fl-*``, their /etc/netns
overlays, cgroups, processes, the temporary directory) goes at exit, also on
failure or Ctrl-C.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.lab_fleet import fleetlab  # noqa: E402
from tests.support.netns import RUN_PREFIX  # noqa: E402

GOAL_CPU_PER_RELAY = 1.2
ONE = "relay01"


@dataclass
class Sample:
    """One measured call: its wall time, each cgroup's CPU seconds, what it targeted."""

    kind: str
    wall: float
    cpu: Dict[str, float]
    targets: List[str]
    machine_busy: float  # CPU seconds the whole machine spent meanwhile (/proc/stat)
    spread: Dict[str, float] = field(default_factory=dict)
    # The master's CPU by process (MWorkers summed, and the busiest of them).
    master_processes: Dict[str, float] = field(default_factory=dict)

    def group(self, name):
        return self.cpu.get(name, 0.0)

    @property
    def targeted(self):
        return sum(
            self.cpu.get(f"relays/{m}", 0.0) + self.cpu.get(f"proxies/{m}", 0.0)
            for m in self.targets
        )

    @property
    def untargeted_relays(self):
        return self.group("relays") - sum(self.cpu.get(f"relays/{m}", 0.0) for m in self.targets)

    @property
    def total(self):
        """The master and the targeted minions (the issue's "master and minions together")."""
        return self.group("master") + self.targeted

    @property
    def with_cli(self):
        """The same and the Salt CLI that made the call (a fixed cost per call)."""
        return self.total + self.group("cli")

    @property
    def fleet_cpu(self):
        """Every cgroup of the fleet (idle minions, HAProxy, the responder too)."""
        return sum(value for key, value in self.cpu.items() if "/" not in key)

    @property
    def others(self):
        """CPU the rest of the machine took meanwhile."""
        return max(0.0, self.machine_busy - self.fleet_cpu)


def machine_busy():
    """CPU seconds the machine has been busy (all CPUs, /proc/stat, not idle or iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cores():
    return len(os.sched_getaffinity(0))


class Violation(RuntimeError):
    pass


class Bench:
    def __init__(self, fleet, log, verbose=False):
        self.fleet = fleet
        self.log = log
        self.verbose = verbose
        self.samples: Dict[str, List[Sample]] = {}
        self.violations: List[str] = []
        self.probe_rows = None

    def measure(self, kind, targets, call):
        cgroups = self.fleet.cgroups
        master_before = cgroups.processes("master")
        before, busy = cgroups.usage(), machine_busy()
        result = call()
        after, busy_after = cgroups.usage(), machine_busy()
        master_after = cgroups.processes("master")
        cpu = {key: round(after[key] - before.get(key, 0.0), 4) for key in after}
        sample = Sample(
            kind, round(result.wall, 4), cpu, list(targets), round(busy_after - busy, 3)
        )
        sample.master_processes = master_by_title(master_before, master_after)
        self.samples.setdefault(kind, []).append(sample)
        if self.verbose:
            self.log(f"  {kind}: {sample.wall:.2f} s wall, {sample.total:.2f} s CPU")
        return result, sample

    # ---- steps

    def highstate(self, kind, targets, want_changes):
        """A measured highstate of ``targets``; its states checked."""
        tgt, tgt_type = self._target(targets)
        result, sample = self.measure(
            kind, targets, lambda: self.fleet.salt("state.highstate", tgt=tgt, tgt_type=tgt_type)
        )
        states = fleetlab.states_by_minion(result, targets)
        failed = fleetlab.failed_states(states)
        if failed:
            raise Violation(f"{kind}: states failed: {json.dumps(failed)[:3000]}")
        changed = fleetlab.changed_states(states)
        if want_changes and set(changed) != set(targets):
            self.violations.append(
                f"{kind}: changed nothing on {sorted(set(targets) - set(changed))}"
            )
        if not want_changes and changed:
            self.violations.append(f"{kind}: a no-op highstate changed {json.dumps(changed)}")
        sample.spread = start_spread(states)
        return states

    def clean(self, targets, sls):
        tgt, tgt_type = self._target(targets)
        result = self.fleet.salt("state.apply", sls, tgt=tgt, tgt_type=tgt_type)
        states = fleetlab.states_by_minion(result, targets)
        failed = fleetlab.failed_states(states)
        if failed:
            raise Violation(f"{sls}: states failed: {json.dumps(failed)[:3000]}")

    def probe(self, kind="probe"):
        relays = self.fleet.relays
        result, _sample = self.measure(
            kind,
            [],
            lambda: self.fleet.salt_run(
                "relayroute.probe", f"minion={fleetlab.PROBE_MINION}", "timeout=4", check=False
            ),
        )
        data = result.data if isinstance(result.data, dict) else {}
        # One table row per path, under a header line.
        rows = (data.get("table") or [])[1:]
        # Per relay: direct and via each proxy, on each port.
        want = len(fleetlab.PORTS) * len(relays) * (1 + len(self.fleet.proxies))
        if result.returncode != 0 or not data.get("ok") or len(rows) != want:
            self.violations.append(
                f"{kind}: exit {result.returncode}, {len(rows)} rows (want {want}): "
                f"{data.get('summary') or result.stdout[-2000:] + result.stderr[-2000:]}"
            )
        self.probe_rows = len(rows)
        return data

    def _target(self, targets):
        return ",".join(targets), "list"

    # ---- the run

    def run(self, runs):
        fleet = self.fleet
        relays, proxies = fleet.relays, fleet.proxies
        others = [name for name in relays if name != ONE]
        self.log(f"cold: first highstate of {ONE}, then of the other {len(others)} relays")
        self.highstate("cold_one", [ONE], want_changes=True)
        if others:
            self.highstate("cold_rest", others, want_changes=True)
        self.log("cold: first highstate of the proxies; HAProxy started on each")
        self.highstate("cold_proxies", proxies, want_changes=True)
        fleet.start_haproxy()
        for what in ("saltutil.sync_modules", "saltutil.sync_runners"):
            fleet.salt_run(what)
        fleet.salt("saltutil.sync_modules", tgt=fleetlab.PROBE_MINION)

        def case(name, targets):
            self.clean(targets, "relayroute.relay.clean")
            self.highstate(f"{name}_apply", targets, want_changes=True)
            self.highstate(f"{name}_noop", targets, want_changes=False)

        for index in range(runs):
            self.log(f"round {index + 1}/{runs}")
            order = [("one", [ONE]), ("fleet", relays)]
            for name, targets in order if index % 2 == 0 else order[::-1]:
                case(name, targets)
            self.clean(proxies, "relayroute.proxy.clean")
            self.highstate("proxies_apply", proxies, want_changes=True)
            self.highstate("proxies_noop", proxies, want_changes=False)
            self.probe()


def master_by_title(before, after):
    """
    The master's CPU over a call by process title: its request workers summed
    (``MWorker``) and the busiest one (``MWorker (busiest)``), the publisher,
    the event publisher, the rest by name.
    """
    found = {}
    workers = []
    for pid, (title, cpu) in after.items():
        spent = cpu - before.get(pid, (title, 0.0))[1]
        if title.startswith("MWorker-"):
            workers.append(spent)
            title = "MWorker"
        found[title] = round(found.get(title, 0.0) + spent, 3)
    if workers:
        found["MWorker (busiest)"] = round(max(workers), 3)
        found["MWorker (count)"] = len(workers)
    return found


def start_spread(states):
    """
    From each minion's state results: when its first state started, relative to
    the earliest minion's (seconds), and how long its states ran in all.
    """
    starts, durations, ours = [], [], []
    for results in states.values():
        times = [
            datetime.strptime(value["start_time"], "%H:%M:%S.%f")
            for value in results.values()
            if value.get("start_time")
        ]
        if times:
            starts.append(min(times))
        durations.append(sum(float(value.get("duration") or 0) for value in results.values()))
        for key, value in results.items():
            # relayroute's own state (relayroute.relay_present / proxy_present): when
            # it ran on this minion, to see whether it ever ran on several at once.
            if key.startswith("relayroute_|-") and value.get("start_time"):
                begin = datetime.strptime(value["start_time"], "%H:%M:%S.%f")
                ours.append((begin, float(value.get("duration") or 0) / 1000))
    if not starts:
        return {}
    first = min(starts)
    offsets = sorted((s - first).total_seconds() for s in starts)
    return {
        "last_start_s": round(offsets[-1], 3),
        "median_start_s": round(statistics.median(offsets), 3),
        "median_states_s": round(statistics.median(durations) / 1000, 3),
        "max_states_s": round(max(durations) / 1000, 3),
        "relayroute_state_max_concurrent": max_overlap(ours),
    }


def max_overlap(intervals):
    """The most of ``(start datetime, seconds)`` intervals running at one instant."""
    events = []
    for begin, seconds in intervals:
        start = begin.timestamp()
        events += [(start, 1), (start + seconds, -1)]
    running = most = 0
    for _when, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        most = max(most, running)
    return most


# --------------------------------------------------------------------------
# analysis


def _median(values):
    return round(statistics.median(values), 4) if values else None


def _range(values):
    return [round(min(values), 4), round(max(values), 4)] if values else None


def summarise(samples):
    """Medians (and ranges) of a kind's samples, per relay targeted."""
    n = max(1, len(samples[0].targets)) if samples else 1
    out = {
        "runs": len(samples),
        "targets": n,
        "wall_s": _median([s.wall for s in samples]),
        "wall_s_range": _range([s.wall for s in samples]),
        "cpu_s": _median([s.total for s in samples]),
        "cpu_s_range": _range([s.total for s in samples]),
        "cpu_per_target_s": _median([s.total / n for s in samples]),
        "cpu_with_cli_per_target_s": _median([s.with_cli / n for s in samples]),
        "master_s": _median([s.group("master") for s in samples]),
        "cli_s": _median([s.group("cli") for s in samples]),
        "minions_s": _median([s.targeted for s in samples]),
        "per_minion_s_range": _range(
            [
                s.cpu.get(f"{g}/{m}", 0.0)
                for s in samples
                for m in s.targets
                for g in ("relays", "proxies")
                if f"{g}/{m}" in s.cpu
            ]
        ),
        "untargeted_relays_s": _median([s.untargeted_relays for s in samples]),
        "probe_minion_s": _median([s.group("probe") for s in samples]),
        "fleet_cpu_s": _median([s.fleet_cpu for s in samples]),
        "others_cpu_s": _median([s.others for s in samples]),
        # wall / (CPU / cores): 1.0 is every core busy with the fleet's work.
        "wall_over_cpu_per_core": _median(
            [s.wall / (s.fleet_cpu / cores()) for s in samples if s.fleet_cpu]
        ),
        # The fleet's CPU over what the machine left it (cores x wall - the others'):
        # 1.0 is every core the others left busy with the fleet.
        "used_of_available": _median(
            [
                s.fleet_cpu / (s.wall * cores() - s.others)
                for s in samples
                if s.wall * cores() - s.others > 0
            ]
        ),
        "machine_share_of_others": _median(
            [s.others / s.machine_busy for s in samples if s.machine_busy]
        ),
    }
    titles = sorted({t for s in samples for t in s.master_processes})
    if titles:
        out["master_processes_s"] = {
            t: _median([s.master_processes.get(t, 0.0) for s in samples]) for t in titles
        }
        # The busiest single master process's CPU over the wall time: near 1.0,
        # that process (one thread of Python) is what the fleet waits on.
        out["master_busiest_process_utilisation"] = _median(
            [
                max(v for k, v in s.master_processes.items() if "(count)" not in k) / s.wall
                for s in samples
                if s.master_processes and s.wall
            ]
        )
    spreads = [s.spread for s in samples if s.spread]
    if spreads:
        out["spread"] = {key: _median([sp[key] for sp in spreads]) for key in spreads[0]}
        out["spread"]["relayroute_state_max_concurrent_range"] = _range(
            [sp["relayroute_state_max_concurrent"] for sp in spreads]
        )
    return out


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def analyse(bench, relays, runs):
    kinds = {kind: summarise(samples) for kind, samples in bench.samples.items()}
    report = {
        "prefix": RUN_PREFIX,
        "relays": relays,
        "proxies": len(bench.fleet.proxies),
        "runs": runs,
        "cores": cores(),
        "pillar": "generated (every relay and proxy listed)",
        "kinds": kinds,
        "samples": {
            kind: [
                {
                    "wall": s.wall,
                    "cpu": s.cpu,
                    "targets": len(s.targets),
                    "spread": s.spread,
                    "machine_busy": s.machine_busy,
                    "master_processes": s.master_processes,
                }
                for s in samples
            ]
            for kind, samples in bench.samples.items()
        },
    }
    ratios = {}
    for what in ("apply", "noop"):
        one, fleet = kinds.get(f"one_{what}"), kinds.get(f"fleet_{what}")
        if one and fleet:
            # Run by run too: each fleet sample over the one-relay sample of its round.
            paired = [
                (f.total / len(f.targets)) / o.total
                for f, o in zip(bench.samples[f"fleet_{what}"], bench.samples[f"one_{what}"])
            ]
            ratios[what] = {
                "cpu_per_relay_fleet_over_one": _ratio(
                    fleet["cpu_per_target_s"], one["cpu_per_target_s"]
                ),
                "cpu_per_relay_fleet_over_one_paired_range": _range(paired),
                "cpu_with_cli_per_relay_fleet_over_one": _ratio(
                    fleet["cpu_with_cli_per_target_s"], one["cpu_with_cli_per_target_s"]
                ),
                "master_per_relay_fleet_over_one": _ratio(
                    fleet["master_s"] / relays, one["master_s"]
                ),
                "minion_fleet_over_one": _ratio(fleet["minions_s"] / relays, one["minions_s"]),
                "master_fleet_over_one": _ratio(fleet["master_s"], one["master_s"]),
                # The relays' own state run (the sum of its states' durations, as
                # Salt reports them): what relayroute's states take on a relay.
                "states_fleet_over_one": _ratio(
                    (fleet.get("spread") or {}).get("median_states_s"),
                    (one.get("spread") or {}).get("median_states_s"),
                ),
                "wall_fleet_over_one": _ratio(fleet["wall_s"], one["wall_s"]),
                "fleet_wall_over_cpu_per_core": fleet["wall_over_cpu_per_core"],
                "fleet_used_of_available": fleet["used_of_available"],
                "one_used_of_available": one["used_of_available"],
            }
    cold_one, cold_rest = kinds.get("cold_one"), kinds.get("cold_rest")
    if cold_one and cold_rest:
        ratios["cold"] = {
            "cpu_per_relay_rest_over_one": _ratio(
                cold_rest["cpu_per_target_s"], cold_one["cpu_per_target_s"]
            ),
            "fleet_wall_over_cpu_per_core": cold_rest["wall_over_cpu_per_core"],
        }
    report["ratios"] = ratios
    report["probe_rows"] = bench.probe_rows
    report["violations"] = bench.violations
    report["ok"] = not bench.violations
    report["goal_cpu_per_relay"] = GOAL_CPU_PER_RELAY
    return report


def _span(pair):
    low, high = pair
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def print_report(report):
    k, r = report["kinds"], report["ratios"]
    lines = [
        "",
        f"relayroute fleet benchmark: {report['relays']} relays, {report['proxies']} proxies, "
        f"1 salt-master, {report['cores']} cores; {report['runs']} rounds (ABBA), medians "
        f"[ranges]; namespaces {report['prefix']}-fl-*; pillar {report['pillar']}",
        "CPU = master + targeted minions (cgroup v2 usage_usec); the Salt CLI apart",
        "",
        f"{'':30}{'wall s':>18}{'CPU s':>18}{'CPU/relay':>11}{'master':>8}{'cli':>7}"
        f"{'minions':>9}{'others*':>9}",
    ]
    for kind in (
        "cold_one",
        "cold_rest",
        "one_apply",
        "fleet_apply",
        "one_noop",
        "fleet_noop",
        "cold_proxies",
        "proxies_apply",
        "proxies_noop",
        "probe",
    ):
        e = k.get(kind)
        if not e:
            continue
        lines.append(
            f"{kind + ' (' + str(e['targets']) + ')':30}"
            f"{e['wall_s']:7.2f} [{e['wall_s_range'][0]:.1f}-{e['wall_s_range'][1]:.1f}]"
            f"{e['cpu_s']:7.2f} [{e['cpu_s_range'][0]:.1f}-{e['cpu_s_range'][1]:.1f}]"
            f"{e['cpu_per_target_s']:11.3f}{e['master_s']:8.2f}{e['cli_s']:7.2f}"
            f"{e['minions_s']:9.2f}{e['others_cpu_s']:9.2f}"
        )
    lines.append("  * others: CPU the rest of the machine took meanwhile (not the fleet's)")
    lines.append("")
    for what in ("apply", "noop"):
        x = r.get(what)
        if not x:
            continue
        paired = x["cpu_per_relay_fleet_over_one_paired_range"]
        lines += [
            f"{what}: fleet CPU per relay / one relay's: x{x['cpu_per_relay_fleet_over_one']} "
            f"(rounds: {paired[0]:.3f}-{paired[1]:.3f}; goal <= x{report['goal_cpu_per_relay']}; "
            f"with the Salt CLI x{x['cpu_with_cli_per_relay_fleet_over_one']}); "
            f"master per relay x{x['master_per_relay_fleet_over_one']} (in all "
            f"x{x['master_fleet_over_one']}), minion x{x['minion_fleet_over_one']}, a relay's "
            f"state run x{x['states_fleet_over_one']}",
            f"  fleet wall / (fleet CPU / {report['cores']} cores): "
            f"{x['fleet_wall_over_cpu_per_core']} (1.0: CPU-bound, nothing serialises); "
            f"fleet wall / one relay's wall: x{x['wall_fleet_over_one']}",
            f"  CPU the fleet used of what the other processes left it (cores x wall - "
            f"theirs): fleet {x['fleet_used_of_available']}, one relay "
            f"{x['one_used_of_available']}",
        ]
        spread = k[f"fleet_{what}"].get("spread")
        if spread:
            lines.append(
                f"  relays' first state: median {spread['median_start_s']} s, last "
                f"{spread['last_start_s']} s after the first relay's; states ran "
                f"{spread['median_states_s']} s (median), {spread['max_states_s']} s (max), "
                "wall-clock, so longer when the relays share the cores; relayroute's own state "
                "ran on up to "
                + _span(spread["relayroute_state_max_concurrent_range"])
                + f" of {k[f'fleet_{what}']['targets']} relays at once"
            )
        procs = k[f"fleet_{what}"].get("master_processes_s") or {}
        if procs:
            top = sorted(((t, v) for t, v in procs.items() if "(" not in t), key=lambda i: -i[1])[
                :4
            ]
            lines.append(
                "  master by process: "
                + ", ".join(f"{t} {v:.2f} s" for t, v in top)
                + f"; busiest MWorker {procs.get('MWorker (busiest)', 0):.2f} s of "
                f"{procs.get('MWorker (count)', 0):g}; busiest process busy "
                f"{k[f'fleet_{what}']['master_busiest_process_utilisation']:.2f} of the wall time"
            )
        one = k[f"one_{what}"]
        lines.append(
            f"  the {report['relays'] - 1} relays not targeted by one relay's highstate: "
            f"{one['untargeted_relays_s']} s CPU (the publish they drop; not in its CPU)"
        )
    if r.get("cold"):
        lines.append(
            f"cold (first ever, with the module sync): the other relays' CPU per relay / "
            f"{ONE}'s: x{r['cold']['cpu_per_relay_rest_over_one']}; wall / (CPU / cores) "
            f"{r['cold']['fleet_wall_over_cpu_per_core']}"
        )
    if k.get("probe"):
        p = k["probe"]
        lines.append(
            f"probe (salt-run relayroute.probe, {report['probe_rows']} paths): {p['wall_s']} s "
            f"wall, {p['fleet_cpu_s']} s CPU in all: master {p['master_s']}, salt-run "
            f"{p['cli_s']}, probe minion {p['probe_minion_s']}, relays "
            f"{p['untargeted_relays_s']} (relayroute.probe_flows)"
        )
    lines.append("")
    if report["violations"]:
        lines += ["CORRECTNESS VIOLATED:"] + [f"  - {v}" for v in report["violations"]]
    else:
        lines.append("correctness: ok (every relay applied, no-ops changed nothing, probe passed)")
    lines.append(f"wall-clock for the whole benchmark: {report['elapsed_s']} s")
    print("\n".join(lines))


def bench(relays=20, runs=3, log=print, verbose=False):
    """Build the fleet, measure, tear it all down; the report (dict)."""
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        # Short: Salt's Unix sockets live under it (at most 107 bytes a path).
        tmp = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}-fleet-", dir="/tmp"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        fleet = fleetlab.Fleet(relays, tmp, log=log)
        stack.callback(fleet.teardown)
        log(f"building: {relays} relays, {len(fleet.proxies)} proxies, salt-master, probe minion")
        fleet.start()
        log(f"fleet up ({time.monotonic() - started:.0f} s); measuring")
        measured = Bench(fleet, log, verbose)
        try:
            measured.run(runs)
        except Violation as err:
            measured.violations.append(str(err))
        report = (
            analyse(measured, relays, runs)
            if measured.samples.get("fleet_noop")
            else {
                "violations": measured.violations,
                "ok": False,
                "samples": {},
            }
        )
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        return report


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relays", type=int, default=20, help="relays in the fleet (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every measured call")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not 2 <= args.relays <= fleetlab.MAX_RELAYS:
        parser.error(f"--relays: from 2 to {fleetlab.MAX_RELAYS}")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, cgroups)")
    for tool in ("ip", "haproxy"):
        if not shutil.which(tool):
            parser.error(f"{tool} is not installed (bash scripts/bench-fleet installs it)")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)

    def log(text):
        print(f"bench-fleet: {text}", flush=True)

    try:
        report = bench(args.relays, args.runs, log, args.verbose)
    except KeyboardInterrupt:
        print("bench-fleet: interrupted; cleaned up", file=sys.stderr)
        return 130
    except fleetlab.FleetError as err:
        print(f"bench-fleet: FAILED: {err}", file=sys.stderr)
        return 2
    if report.get("kinds"):
        print_report(report)
    else:
        print("bench-fleet: no figures:", *report["violations"], sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
