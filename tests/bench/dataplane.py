"""
What relayroute's rules cost on a relay's data plane: SMTP sessions per second.

One run builds the traffic tests' network in namespaces (``tests/support/hosts``):

    client 203.0.113.10 (direct)  --+              +-- gw (stateful)    --+
    client 203.0.113.20 (proxied) --+-- inet ------+                      +-- LAN -- relay
                                                   +-- proxy (stateful) --+

The proxy forwards like master-relay does with ``usesrc clientip``: packets
reach the relay from the proxy's MAC with the client's address. Both routers
are stateful firewalls that pick nothing up mid-stream, so a reply leaving by
the wrong gateway is dropped and its session fails: every counted session went
out and back by the right path.

The relay runs a minimal asyncio SMTP responder (EHLO, MAIL, RCPT, DATA,
RSET, NOOP, QUIT; the message is read and thrown away) or, with ``--server
postfix``, a real Postfix (``tests/support/postfix.py``; messages stay queued).
The load generator, one asyncio process in the client namespace, runs N
concurrent clients, each doing full sessions back to back (connect, banner,
EHLO, MAIL, RCPT, DATA with a small message, QUIT, wait for the server's
close) for a fixed duration, from one source address: the proxied or the
direct client's.

Three configurations of the relay, interleaved (a, b, c, a, b, c ...) over
several rounds, each measured on both paths (relay 192.0.2.11, port 25):

- ``relayroute``: relayroute's rules as the engine applies them
  (``relayroute_core.relay_apply``, the execution module's function, called
  in the relay's namespace);
- ``hand-written``: the seed's rules (``../shared/seed/``) as its answer gives
  them: restore-mark, return when marked, ``! -s LAN`` + MAC match set-mark,
  save-mark in PREROUTING, restore-mark in OUTPUT, ``ip rule fwmark 254
  lookup 1000254`` and the table's default via the proxy;
- ``no-marks``: the limit, no packet filter and no connection tracking on the
  relay at all: the proxied client's replies take the proxy's table by a
  destination rule (``ip rule to 203.0.113.20 lookup 1000254``), which works
  here only because the benchmark knows which client comes through the proxy.

Reported, per configuration and path, medians over the rounds of:

- sessions per second: what a user asks, and what another process on the
  machine halves when it takes one of the CPUs for a while;
- CPU microseconds per session: on-CPU time (``/proc/PID/task/*/schedstat``)
  of the load generator, the responder and the ksoftirqd threads. Namespaces
  pass packets in softirq context, charged to the process that sends them when
  the kernel does no separate IRQ time accounting (``CONFIG_IRQ_TIME_ACCOUNTING``
  unset, as here), so this holds the routers', the relay's and the packet
  filter's work too, and is far less sensitive to other load;
- the whole machine's busy time per session (``/proc/stat``), others' load
  included.

and the ratios relayroute / hand-written and no-marks / hand-written (of the
medians, and the median of the ratios round by round, each pair measured next to
each other). Nothing is enforced: the figures depend on the machine.

    .venv/bin/python tests/bench/dataplane.py [--rounds N] [--duration S]
        [--clients N] [--server python|postfix] [--json FILE]

Needs root and iproute2, iptables, conntrack. Everything it makes (namespaces,
processes, temporary files) is removed at exit, also on failure or Ctrl-C.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.dont_write_bytecode = True  # the engine's sources stay free of __pycache__
sys.path.insert(0, str(ROOT / "_modules"))
sys.path.insert(0, str(ROOT))

from tests.support.hosts import (  # noqa: E402
    DIRECT,
    PROXIED,
    RELAY,
    dropped,
    internet,
    relay_lan,
)
from tests.support.netns import (  # noqa: E402
    RUN_PREFIX,
    leftover_namespaces,
    mac_of,
    made_netns,
    remove_lock_files,
    run,
)

# relayroute's host lock for this run's applies, off the host's /run (read by
# the engine at import).
LOCK_PATH = f"/tmp/{RUN_PREFIX}-dataplane.lock"
os.environ.setdefault("RELAYROUTE_LOCK", LOCK_PATH)

NS_PREFIX = "dp-"  # namespaces: <run prefix>-dp-client, -dp-relay, ...
LAN = "192.0.2.0/24"
PROXY, GATEWAY = "192.0.2.2", "192.0.2.1"
MARK, TABLE, PRIORITY = 254, 1000254, 1000
PORT = 25
PATHS = ("proxied", "direct")
SOURCES = {"proxied": PROXIED, "direct": DIRECT}
MAX_SECONDS = 170  # rounds stop early rather than run the whole benchmark past this

SERVER = textwrap.dedent(
    """
    import asyncio, sys

    async def session(reader, writer):
        writer.write(b"220 relay1.example.net ESMTP bench\\r\\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-relay1.example.net\\r\\n250 8BITMIME\\r\\n")
                elif verb == b"DATA":
                    writer.write(b"354 end with .\\r\\n")
                    while True:
                        body = await reader.readline()
                        if not body or body == b".\\r\\n":
                            break
                    writer.write(b"250 2.0.0 Ok: queued\\r\\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\\r\\n")
                    break
                else:  # MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 2.0.0 Ok\\r\\n")
                await writer.drain()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(session, sys.argv[1], int(sys.argv[2]), backlog=1024)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    """
)

# Commands on stdin, one JSON line: {"source", "duration", "clients"}; one JSON
# line of results on stdout for each.
LOADGEN = textwrap.dedent(
    """
    import asyncio, json, sys, time

    MESSAGE = (
        b"From: <bench@client.example.org>\\r\\nTo: <bench@relay1.example.net>\\r\\n"
        b"Subject: data-plane bench\\r\\n\\r\\n" + (b"x" * 72 + b"\\r\\n") * 4 + b".\\r\\n"
    )
    TIMEOUT = 10.0

    async def reply(reader):
        while True:
            line = await reader.readline()
            if len(line) < 4:
                raise ConnectionError(f"short reply {line!r}")
            if line[3:4] != b"-":
                return int(line[:3])

    async def session(dest, port, source):
        reader, writer = await asyncio.open_connection(dest, port, local_addr=(source, 0))
        try:
            codes = [await reply(reader)]
            for command in (
                b"EHLO client.example.org\\r\\n",
                b"MAIL FROM:<bench@client.example.org>\\r\\n",
                b"RCPT TO:<bench@relay1.example.net>\\r\\n",
                b"DATA\\r\\n",
            ):
                writer.write(command)
                codes.append(await reply(reader))
            writer.write(MESSAGE)
            codes.append(await reply(reader))
            writer.write(b"QUIT\\r\\n")
            codes.append(await reply(reader))
            await reader.read()  # the server closes first: no TIME_WAIT here
        finally:
            writer.close()
        if codes != [220, 250, 250, 250, 354, 250, 221]:
            raise ConnectionError(f"replies {codes}")

    async def worker(dest, port, source, deadline, stats):
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                await asyncio.wait_for(session(dest, port, source), TIMEOUT)
            except (OSError, asyncio.TimeoutError) as err:
                stats["errors"] += 1
                stats["last_error"] = repr(err)
                continue
            end = time.monotonic()
            if end <= deadline:
                stats["sessions"] += 1
                stats["latencies"].append(end - start)

    async def measure(dest, port, command):
        stats = {"sessions": 0, "errors": 0, "latencies": [], "last_error": None}
        start = time.monotonic()
        deadline = start + command["duration"]
        await asyncio.gather(
            *(worker(dest, port, command["source"], deadline, stats)
              for _ in range(command["clients"]))
        )
        lat = sorted(stats.pop("latencies"))
        stats["elapsed"] = command["duration"]
        stats["rate"] = stats["sessions"] / command["duration"]
        stats["median_ms"] = round(1000 * lat[len(lat) // 2], 2) if lat else None
        stats["p99_ms"] = round(1000 * lat[int(len(lat) * 0.99)], 2) if lat else None
        stats["overrun_s"] = round(time.monotonic() - deadline, 3)
        return stats

    async def main(dest, port):
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            result = await measure(dest, port, json.loads(line))
            print(json.dumps(result), flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


class Failed(RuntimeError):
    """A step of the benchmark failed."""


# --------------------------------------------------------------------------
# the network


def build(stack):
    """The traffic tests' network: ``{name: Netns}``."""
    net = {
        name: stack.enter_context(made_netns(f"{NS_PREFIX}{name}"))
        for name in ("client", "inet", "gw", "proxy", "lan", "relay")
    }
    client, inet, gw, proxy, lan, relay = net.values()
    internet(client, inet, gw, proxy, DIRECT, PROXIED)
    relay_lan(lan, gw, proxy, relay, GATEWAY, PROXY)
    relay.ip(f"route add default via {GATEWAY}")
    # Sessions back to back from one address: the whole port range, and the
    # server closes first, so no client port waits in TIME_WAIT.
    client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")
    return net


def start_responder(relay):
    proc = relay.popen(
        [sys.executable, "-u", "-c", SERVER, RELAY, str(PORT)], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise Failed(f"SMTP responder in {relay.name} did not start: {line!r}")
    return proc.pid, "python asyncio responder"


def start_postfix(relay, tmp):
    from tests.support.postfix import PostfixInstance

    instance = PostfixInstance(
        relay,
        tmp,
        "relay1.example.net",
        [RELAY],
        [LAN],
        submission=False,
        data_dir=tmp / "postfix-data",
    )
    instance.start()
    version = run(["postconf", "-dh", "mail_version"], check=False).stdout.strip()
    return instance, f"postfix {version} (messages queued, never delivered)"


def cpu_ns(pids):
    """On-CPU time so far of every thread of ``pids`` (ns, /proc/PID/task/*/schedstat)."""
    total = 0
    for pid in pids:
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(stat.read_text().split()[0])
    return total


def ksoftirqd_pids():
    """The kernel's softirq threads: network work deferred there is charged to them."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().startswith("ksoftirqd/"):
                found.append(int(comm.parent.name))
    return found


def busy_ticks():
    """Busy and total CPU ticks of the whole machine (/proc/stat), others' load included."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class LoadGenerator:
    """The long-lived load generator in the client namespace."""

    def __init__(self, client):
        self.proc = client.popen(
            [sys.executable, "-u", "-c", LOADGEN, RELAY, str(PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise Failed(f"load generator did not start: {line!r}")
        self.accounted = [self.proc.pid]  # processes whose CPU a window counts

    def measure(self, source, duration, clients):
        """
        One window; with the CPU it cost: on-CPU time of the load generator, the
        server (when it is one process) and ksoftirqd (``cpu_us_per_session``),
        and the whole machine's busy time, others' load included.
        """
        command = {"source": source, "duration": duration, "clients": clients}
        cpu_before, (busy_before, _) = cpu_ns(self.accounted), busy_ticks()
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise Failed("the load generator exited")
        cpu, (busy, _) = cpu_ns(self.accounted) - cpu_before, busy_ticks()
        window = json.loads(line)
        sessions = max(window["sessions"], 1)
        window["cpu_us_per_session"] = round(cpu / 1000 / sessions, 1)
        ticks = (busy - busy_before) / os.sysconf("SC_CLK_TCK")
        window["machine_cpu_us_per_session"] = round(1e6 * ticks / sessions, 1)
        return window


# --------------------------------------------------------------------------
# the three configurations of the relay


def seed_mangle(proxy_mac):
    """The seed answer's mangle rules, addresses and MAC filled in, as one restore."""
    return "\n".join(
        [
            "*mangle",
            "-A PREROUTING -j CONNMARK --restore-mark",
            "-A PREROUTING -m mark ! --mark 0 -j RETURN",
            f"-A PREROUTING ! -s {LAN} -m mac --mac-source {proxy_mac} -j MARK --set-mark {MARK}",
            "-A PREROUTING -j CONNMARK --save-mark",
            "-A OUTPUT -j CONNMARK --restore-mark",
            "COMMIT",
            "",
        ]
    )


class Variant:
    name = ""
    marks = True  # the proxied flows carry the proxy's mark in the relay's conntrack

    def __init__(self, relay, proxy_mac):
        self.relay = relay
        self.proxy_mac = proxy_mac

    def apply(self):
        raise NotImplementedError

    def remove(self):
        raise NotImplementedError


class Relayroute(Variant):
    name = "relayroute"

    def __init__(self, relay, proxy_mac):
        super().__init__(relay, proxy_mac)
        # Imported here, after RELAYROUTE_LOCK is set: the engine reads it at import.
        import relayroute_core

        self.module = relayroute_core

    def apply(self):
        proxies = {
            "master-relay": {
                "address": PROXY,
                "mac": self.proxy_mac,
                "mark": MARK,
                "table": TABLE,
                "priority": PRIORITY,
            }
        }
        with self.relay.entered():
            result = self.module.relay_apply(lan_networks=[LAN], mark_mask=0xFF, proxies=proxies)
        if not result.get("changes"):
            raise Failed(f"relayroute.relay_apply changed nothing: {result!r}")

    def remove(self):
        with self.relay.entered():
            self.module.relay_remove()


class HandWritten(Variant):
    name = "hand-written"

    def apply(self):
        self.relay.ip(f"route add default via {PROXY} table {TABLE}")
        self.relay.ip(f"rule add priority {PRIORITY} fwmark {MARK} lookup {TABLE}")
        self.relay.exec(["iptables-restore", "--noflush"], input=seed_mangle(self.proxy_mac))

    def remove(self):
        self.relay.exec("iptables -t mangle -F")
        self.relay.ip(f"rule del priority {PRIORITY}")
        self.relay.ip(f"route flush table {TABLE}")


class NoMarks(Variant):
    name = "no-marks"
    marks = False

    def apply(self):
        self.relay.ip(f"route add default via {PROXY} table {TABLE}")
        self.relay.ip(f"rule add priority {PRIORITY} to {PROXIED}/32 lookup {TABLE}")

    def remove(self):
        self.relay.ip(f"rule del priority {PRIORITY}")
        self.relay.ip(f"route flush table {TABLE}")


def pristine(relay):
    """
    No packet-filter table left in the relay (an empty base chain still hooks
    every packet), so connection tracking stops too, and no rule or route
    of any variant: each configuration starts from the same relay.
    """
    relay.exec("iptables -t mangle -F", check=False)
    relay.exec("iptables -t mangle -X", check=False)
    if "nf_tables" in run(["iptables", "--version"], check=False).stdout:
        relay.exec("nft delete table ip mangle", check=False)
    rules = relay.exec("ip -4 rule show").stdout.splitlines()
    extra = [line for line in rules if line.split(":")[0] not in ("0", "32766", "32767")]
    routes = relay.exec(f"ip -4 route show table {TABLE}", check=False).stdout.strip()
    left = relay.exec("iptables-save").stdout
    if extra or routes or "-A " in left:
        raise Failed(f"a configuration left state behind: {extra} {routes!r}\n{left}")


def flush_conntrack(net):
    for name in ("gw", "proxy", "relay"):
        net[name].exec("conntrack -F", check=False)


def marked_flows(relay, source):
    """Flows from ``source`` in the relay's conntrack: ``(with the proxy's mark, all)``."""
    out = relay.exec(["conntrack", "-L", "-p", "tcp", "-s", source], check=False).stdout
    lines = [line for line in out.splitlines() if line.startswith("tcp")]
    return sum(f"mark={MARK}" in line for line in lines), len(lines)


def relay_state(relay):
    """What a configuration put in the relay: rule lines, mangle rules, the table's routes."""
    rules = relay.exec("ip -4 rule show").stdout.splitlines()
    mangle = relay.exec("iptables-save -t mangle", check=False).stdout.splitlines()
    routes = relay.exec(f"ip -4 route show table {TABLE}", check=False).stdout.splitlines()
    return {
        "rules": [line for line in rules if line.split(":")[0] not in ("0", "32766", "32767")],
        "mangle": [line for line in mangle if line.startswith("-A ")],
        "routes": routes,
    }


def check_marks(relay, variant, path, window):
    """
    After a window, the relay's conntrack shows which way its flows went: with
    marks, every proxied flow carries the proxy's mark and no direct one does;
    without, the relay tracks no connection at all.
    """
    marked, flows = marked_flows(relay, SOURCES[path])
    window["relay_conntrack"] = {"marked": marked, "flows": flows}
    if not variant.marks:
        ok = flows == 0
    elif path == "proxied":
        ok = flows > 0 and marked == flows
    else:
        ok = flows > 0 and marked == 0
    line = (
        f"{variant.name}: {marked} of {flows} {path} flows in the relay's conntrack "
        f"carry mark {MARK}"
    )
    if not ok:
        raise Failed(f"{line}: unexpected")
    return line


# --------------------------------------------------------------------------
# measurement


def measure(net, variants, loadgen, args, log, started):
    """``{variant: {path: [window, ...]}}`` over the rounds; rounds done; checks."""
    results = {v.name: {path: [] for path in PATHS} for v in variants}
    checks = []
    applied = {}
    rounds_done = 0
    per_round = None
    for index in range(args.rounds):
        round_started = time.monotonic()
        if per_round and round_started - started + per_round > args.max_seconds:
            log(f"stopping after {rounds_done} rounds: the next would pass {args.max_seconds} s")
            break
        # a, b, c every round; with --rotate b, c, a in the second, c, a, b in the third ...
        shift = index % len(variants) if args.rotate else 0
        for variant in variants[shift:] + variants[:shift]:
            variant.apply()
            try:
                if index == 0:
                    applied[variant.name] = relay_state(net["relay"])
                # Warm-up, not counted: neighbour entries, the server's accept queue.
                for path in PATHS:
                    loadgen.measure(SOURCES[path], args.warmup, args.clients)
                for path in PATHS:
                    flush_conntrack(net)
                    before = {r: dropped(net[r]) for r in ("gw", "proxy")}
                    window = loadgen.measure(SOURCES[path], args.duration, args.clients)
                    window["dropped"] = {r: dropped(net[r]) - before[r] for r in ("gw", "proxy")}
                    if index == 0:
                        checks.append(check_marks(net["relay"], variant, path, window))
                    results[variant.name][path].append(window)
                    log(
                        f"round {index + 1} {variant.name:12} {path:8} "
                        f"{window['rate']:8.1f} sessions/s  errors {window['errors']}  "
                        f"median {window['median_ms']} ms"
                    )
            finally:
                variant.remove()
                pristine(net["relay"])
        rounds_done += 1
        per_round = time.monotonic() - round_started
    return results, rounds_done, checks, applied


def _median(windows, key):
    return round(statistics.median(w[key] for w in windows), 1)


def analyse(results, variants):
    """Medians per configuration and path, and ratios against the hand-written rules."""
    names = [v.name for v in variants]
    keys = {
        "sessions/s": "rate",
        "cpu us/session": "cpu_us_per_session",
        "machine cpu us/session": "machine_cpu_us_per_session",
    }
    report = {"medians": {}, "windows": {}, "errors": {}, "dropped": {}, "ratios": {}}
    for name in names:
        for path in PATHS:
            windows = results[name][path]
            report["medians"].setdefault(name, {})[path] = {
                label: _median(windows, key) for label, key in keys.items()
            }
            report["windows"].setdefault(name, {})[path] = {
                label: [round(w[key], 1) for w in windows] for label, key in keys.items()
            }
            report["errors"].setdefault(name, {})[path] = sum(w["errors"] for w in windows)
            report["dropped"].setdefault(name, {})[path] = sum(
                sum(w["dropped"].values()) for w in windows
            )
    base = names[1]  # the hand-written rules
    for name in (names[0], names[2]):
        for path in PATHS:
            ratio = {}
            for label in ("sessions/s", "cpu us/session"):
                mine = report["windows"][name][path][label]
                theirs = report["windows"][base][path][label]
                # Round by round: each pair ran next to each other.
                paired = [x / y for x, y in zip(mine, theirs) if y]
                ratio[label] = {
                    "of_medians": round(
                        report["medians"][name][path][label] / report["medians"][base][path][label],
                        3,
                    ),
                    "paired_median": round(statistics.median(paired), 3),
                    "paired_min": round(min(paired), 3),
                    "paired_max": round(max(paired), 3),
                }
            report["ratios"][f"{name}/{base} {path}"] = ratio
    return report


def print_report(report, args):
    lines = [
        "",
        f"data-plane benchmark: {report['rounds']} rounds, {args.duration:g} s windows, "
        f"{args.clients} concurrent clients, server: {report['server']}",
        f"(namespaces {report['prefix']}-{NS_PREFIX}*, {report['cpus']} CPUs, "
        f"load average before {report['loadavg_before']}, after {report['loadavg_after']})",
        "",
        f"{'median':16}{'sessions/s':>24}{'CPU us/session':>24}{'machine us/session':>24}",
        f"{'':16}{'proxied':>12}{'direct':>12}{'proxied':>12}{'direct':>12}"
        f"{'proxied':>12}{'direct':>12}",
    ]
    for name, medians in report["medians"].items():
        row = f"{name:16}"
        for label in ("sessions/s", "cpu us/session", "machine cpu us/session"):
            row += f"{medians['proxied'][label]:>12.1f}{medians['direct'][label]:>12.1f}"
        lines.append(row)
    lines += ["", "sessions/s round by round (proxied | direct):"]
    for name, windows in report["windows"].items():
        lines.append(
            f"  {name:14}"
            + " ".join(f"{r:.0f}" for r in windows["proxied"]["sessions/s"])
            + " | "
            + " ".join(f"{r:.0f}" for r in windows["direct"]["sessions/s"])
        )
    lines += ["", "ratios (of the medians; round by round: median [min-max]):"]
    for key, ratio in report["ratios"].items():
        parts = []
        for label, r in ratio.items():
            parts.append(
                f"{label} x{r['of_medians']:.3f} "
                f"({r['paired_median']:.3f} [{r['paired_min']:.3f}-{r['paired_max']:.3f}])"
            )
        lines.append(f"  {key:30} " + "   ".join(parts))
    lines += [
        "",
        f"CPU us/session: on-CPU time of {report['cpu_accounted']}, per session; machine "
        "us/session: the whole machine's busy time (others' load included) per session.",
        "",
        "failed sessions and packets the stateful routers dropped, all rounds:",
    ]
    for name in report["errors"]:
        e, d = report["errors"][name], report["dropped"][name]
        lines.append(
            f"  {name:14} errors proxied {e['proxied']}, direct {e['direct']}; "
            f"dropped proxied {d['proxied']}, direct {d['direct']}"
        )
    lines += ["", "what each configuration put in the relay (ip rule; mangle rules):"]
    for name, state in report["applied"].items():
        lines.append(f"  {name}:")
        lines += [f"    {line}" for line in state["rules"] + state["mangle"]]
    lines += ["", *report["checks"]]
    lines += ["", f"wall-clock for the whole benchmark: {report['elapsed_s']:.1f} s"]
    print("\n".join(lines))


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _remove_leftovers():
    # Only this benchmark's names: RELAYROUTE_NETNS_PREFIX may be shared with a test run.
    for name in leftover_namespaces(RUN_PREFIX):
        if name.startswith(f"{RUN_PREFIX}-{NS_PREFIX}"):
            run(["ip", "netns", "delete", name], check=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds of a, b, c (default 7)")
    parser.add_argument(
        "--duration", type=float, default=2.0, help="seconds per measured window (default 2)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="unmeasured seconds per path (default 0.5)"
    )
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument(
        "--server",
        choices=("python", "postfix"),
        default="python",
        help="SMTP server on the relay (default python: a minimal asyncio responder)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=MAX_SECONDS,
        help=f"start no round that would end past this (default {MAX_SECONDS})",
    )
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="start each round with the next configuration (a check on position effects)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.clients < 1:
        parser.error("--rounds, --duration and --clients must be positive")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    for tool in ("ip", "iptables-restore", "conntrack"):
        if not shutil.which(tool):
            parser.error(f"{tool} is not installed (bash scripts/setup installs it)")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    # Ctrl-C, even when started from a shell that ignores it for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def log(text):
        print(f"bench-dataplane: {text}", flush=True)

    started = time.monotonic()
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}-dataplane-"))
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            stack.callback(remove_lock_files, LOCK_PATH)
            stack.callback(_remove_leftovers)
            net = build(stack)
            relay = net["relay"]
            if args.server == "postfix":
                tmp.chmod(0o755)  # Postfix's processes run as the postfix user
                instance, server = start_postfix(relay, tmp)
                stack.callback(instance.stop)
            else:
                server_pid, server = start_responder(relay)
            loadgen = LoadGenerator(net["client"])
            if args.server == "python":
                loadgen.accounted.append(server_pid)
            loadgen.accounted += ksoftirqd_pids()
            proxy_mac = mac_of(net["proxy"], "lan0")
            variants = [cls(relay, proxy_mac) for cls in (Relayroute, HandWritten, NoMarks)]
            pristine(relay)
            log(f"namespaces {RUN_PREFIX}-{NS_PREFIX}*, server: {server}")
            results, rounds, checks, applied = measure(net, variants, loadgen, args, log, started)
            report = analyse(results, variants)
            report.update(
                prefix=RUN_PREFIX,
                server=server,
                rounds=rounds,
                checks=checks,
                applied=applied,
                cpus=os.cpu_count(),
                cpu_accounted=(
                    "the load generator, the responder and ksoftirqd"
                    if args.server == "python"
                    else "the load generator and ksoftirqd (not Postfix's processes)"
                ),
                loadavg_before=" ".join(loadavg),
                loadavg_after=" ".join(Path("/proc/loadavg").read_text().split()[:3]),
                settings={
                    "rotate": args.rotate,
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "clients": args.clients,
                },
            )
    except KeyboardInterrupt:
        print("bench-dataplane: interrupted; cleaned up", file=sys.stderr)
        return 130
    except Failed as err:
        print(f"bench-dataplane: FAILED: {err}", file=sys.stderr)
        return 2
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    print_report(report, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
