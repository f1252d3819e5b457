"""
What relayroute costs on a relay while nothing happens (``scripts/bench``):

- the watcher (relayroute-relay-watch.service's ExecStart, run in the bench's
  relay namespace): CPU while idle, per hour, and its memory (RSS of the shell
  and its ``ip monitor``); then CPU per 1000 netlink events of other tools
  (routes added and deleted that are not relayroute's), which it reads and
  drops: its cost on a host whose routes churn;
- the beacon's look (what ``_beacons/relayroute.py`` does each interval: the
  pillar's topology, the proxies whose MAC is discovered, one netlink dump of
  the neighbour table), as CPU per look and per hour at the documented
  ``interval: 5``. Salt's own beacon plumbing around it (config.merge, the
  loader call) is not counted.

The figures are absolute (CPU seconds, kB): idle costs have no baseline to be
a ratio of but zero.
"""

import json
import os
import signal
import textwrap
import time

from tests.support.netns import live_processes
from tests.support.seedlab import NETNS_ETC, exec_start

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
BEACON_INTERVAL = 5


def _cpu_s(pid):
    """utime + stime of one process, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _rss_kb(pid):
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * PAGE_KB
    except OSError:
        return 0


def _tree(pid):
    return [pid, *live_processes(ppid=pid)]


def watcher_costs(relay, idle_s, events=2000):
    """Start the relay's watcher as its unit does; measure it idle, then under churn."""
    unit = NETNS_ETC / relay.name / "systemd" / "system" / "relayroute-relay-watch.service"
    (argv,) = exec_start(unit)
    log_path = NETNS_ETC / relay.name / "relayroute" / "bench-watch.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = relay.popen(argv, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while "watching" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the watcher did not start: {log_path.read_text()}")
            time.sleep(0.05)
        # ip netns exec execs the shell in place: proc.pid is the watcher's bash.
        time.sleep(1.0)
        pids = _tree(proc.pid)
        before = sum(_cpu_s(pid) for pid in pids)
        rss = sum(_rss_kb(pid) for pid in pids)
        started = time.monotonic()
        time.sleep(idle_s)
        idle_cpu = sum(_cpu_s(pid) for pid in pids) - before
        idle_wall = time.monotonic() - started

        # Other tools' routes: added and deleted (2 events each) in one ip -batch.
        batch = "".join(
            f"route add 203.0.113.{i % 250 + 1}/32 via 192.0.2.1 table 4242\n"
            f"route del 203.0.113.{i % 250 + 1}/32 via 192.0.2.1 table 4242\n"
            for i in range(events // 2)
        )
        before = sum(_cpu_s(pid) for pid in _tree(proc.pid))
        relay.exec(["ip", "-batch", "-"], input=batch)
        time.sleep(2.0)  # the watcher drains what it was sent
        churn_cpu = sum(_cpu_s(pid) for pid in _tree(proc.pid)) - before
        restores = log_path.read_text().count("repaired") + log_path.read_text().count("checked")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        log_path.unlink(missing_ok=True)
    return {
        "processes": len(pids),
        "rss_kb": rss,
        "idle_s": round(idle_wall, 1),
        "idle_cpu_s": round(idle_cpu, 3),
        "idle_cpu_s_per_hour": round(idle_cpu / idle_wall * 3600, 2),
        # The kernel counts CPU in ticks: below one tick over the window reads 0.
        "idle_cpu_s_per_hour_resolution": round(3600 / CLK_TCK / idle_wall, 2),
        "foreign_events": events,
        "cpu_s_per_1000_foreign_events": round(churn_cpu / events * 1000, 3),
        "restores_run_for_foreign_events": restores,
    }


LOOK = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    sys.dont_write_bytecode = True
    import yaml
    from relayroute_core import follow, netlink, topology
    config = yaml.safe_load(open(sys.argv[2]))["relayroute"]
    looks = int(sys.argv[3])

    def look():
        result = topology.topology(config, "relay")
        proxies = follow.discovered(result["relay"])
        return netlink.neighbour_macs([p["address"] for p in proxies.values()])

    assert look(), "no proxy whose MAC is discovered"
    start = time.process_time()
    for _ in range(looks):
        look()
    print(json.dumps({"cpu_s": time.process_time() - start}))
    """
)


def beacon_look_cost(relay, python, modules_dir, pillar_file, looks=500):
    """CPU of the beacon's look, in the relay's namespace, without Salt's plumbing."""
    out = relay.exec([python, "-c", LOOK, str(modules_dir), str(pillar_file), str(looks)])
    cpu = json.loads(out.stdout.strip().splitlines()[-1])["cpu_s"]
    per_look = cpu / looks
    return {
        "looks": looks,
        "cpu_ms_per_look": round(per_look * 1000, 3),
        "interval_s": BEACON_INTERVAL,
        "cpu_s_per_hour": round(per_look * 3600 / BEACON_INTERVAL, 3),
    }
