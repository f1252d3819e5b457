"""
A fleet in network namespaces: one salt-master, two proxies running HAProxy,
N relays, each host its own salt-minion with its ``roles`` grain, every
process started in a cgroup (v2) of its group, so the CPU each group spent
over any interval is read from ``cpu.stat`` (``usage_usec``).

    client 203.0.113.10 (probe minion)
      |
    inet router 203.0.113.1 --- gw 198.51.100.2 ----------- LAN bridge 192.0.2.0/24
      |       \\                                               gw .1, px1 .2, px2 .3,
      px1      px2   (VIPs 198.51.100.25 and .26 on lo)        relays .11, .12, ...
      (up0 198.51.100.6, 198.51.100.10; lan0 on the LAN bridge)

The master lives in a namespace of its own (``master``) holding the
management bridge 198.51.100.128/25: the master at .129, each minion at
.130 upwards on a second interface (``mgmt0``), on-link, no route to add.
Nothing of the fleet is in the root namespace: its addresses never collide
with another run's lab, and it holds up to 122 relays.

Relays answer SMTP with one light responder process (``SMTP_RESPONDER``:
banner, EHLO, a message into nowhere, QUIT) listening in every relay's
namespace on the topology's ports: what HAProxy's ``option smtpchk`` and
``salt-run relayroute.probe`` need, without a Postfix per relay.

Each minion has its own relayroute host lock (``RELAYROUTE_LOCK``), as each
host of a real fleet has its own /run: a lock shared by all the namespaces
would serialise the relays' applies, which no real fleet does.

Cleanup (``Fleet.teardown``) kills every process of the fleet's cgroups
(``cgroup.kill``: only what this run started), removes the cgroups, the
namespaces (run prefix ``<RUN_PREFIX>-fl-``) and their /etc/netns overlays.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.haproxy import HAProxyProcess  # noqa: E402
from tests.support.netns import (  # noqa: E402
    RUN_PREFIX,
    Netns,
    etc_mount_point,
    leftover_namespaces,
    release_etc_mount_point,
    run,
    veth,
)

BIN = ROOT / ".venv" / "bin"
NS_TAG = "fl-"  # namespaces: <run prefix>-fl-<host>
NETNS_ETC = Path("/etc/netns")
MASTER_ADDRESS = "198.51.100.129"
MGMT_FIRST, MGMT_LAST = 130, 254
CLIENT = "203.0.113.10"
LAN = "192.0.2.0/24"
GATEWAY = "192.0.2.1"
PORTS = (25, 587)
PROBE_MINION = "client"
# Proxy minion id: (LAN address, uplink /30 on inet's side, proxy's side, VIP, mark, priority).
PROXIES = {
    "px1": ("192.0.2.2", "198.51.100.5", "198.51.100.6", "198.51.100.25", 254, 1000),
    "px2": ("192.0.2.3", "198.51.100.9", "198.51.100.10", "198.51.100.26", 253, 1001),
}
FIRST_RELAY = 11
MAX_RELAYS = (MGMT_LAST - MGMT_FIRST + 1) - len(PROXIES) - 1
SALT_TIMEOUT = 900

TOP = """\
base:
  'roles:relay':
    - match: grain
    - relayroute
  'roles:proxy':
    - match: grain
    - relayroute
"""

# One process serving SMTP in every relay's namespace: it enters each
# namespace (setns) to open that relay's listening sockets, comes back, and
# serves them all from one asyncio loop. argv[1]: JSON [[netns, address,
# name], ...]; argv[2]: JSON [port, ...]. Prints "ready" once it listens.
SMTP_RESPONDER = r"""
import asyncio, ctypes, json, os, socket, sys

CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)

def setns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns " + path)
    finally:
        os.close(fd)

async def serve(reader, writer, name):
    def say(text):
        writer.write(text.encode() + b"\r\n")
    say(f"220 {name} ESMTP fleet-bench")
    in_data = False
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), 300)
            if not line:
                break
            if in_data:
                if line.rstrip(b"\r\n") == b".":
                    in_data = False
                    say("250 2.0.0 accepted into nowhere")
                continue
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"EHLO":
                say(f"250-{name}")
                say("250 8BITMIME")
            elif verb == b"DATA":
                in_data = True
                say("354 go ahead")
            elif verb == b"QUIT":
                say("221 2.0.0 bye")
                await writer.drain()
                break
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                say("250 2.0.0 ok")
            else:
                say("502 5.5.2 not here")
            await writer.drain()
    except (asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    hosts, ports = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    home = "/proc/self/ns/net"
    back = os.open(home, os.O_RDONLY)
    socks = []
    for netns, address, name in hosts:
        setns(f"/run/netns/{netns}")
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(512)
            socks.append((sock, name))
    if libc.setns(back, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns back")
    for sock, name in socks:
        await asyncio.start_server(lambda r, w, n=name: serve(r, w, n), sock=sock)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class FleetError(RuntimeError):
    """A step of building or driving the fleet failed."""


# --------------------------------------------------------------------------
# cgroups


def cgroup2_root():
    """Where the cgroup v2 hierarchy is mounted (hybrid hosts: /sys/fs/cgroup/unified)."""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    raise FleetError("no cgroup v2 hierarchy is mounted (the fleet's CPU is read from cpu.stat)")


class Cgroups:
    """
    ``<cgroup2>/<run prefix>-fleet/<group>[/<member>]``: one cgroup per host
    (or helper) a group of processes runs in. ``usage()`` reads every
    cgroup's ``usage_usec`` (a parent's includes its children's).
    """

    def __init__(self):
        self.root = cgroup2_root() / f"{RUN_PREFIX}-fleet"
        self.root.mkdir()
        self.paths = {}

    def make(self, group, member=None):
        """The cgroup of ``group`` (and of ``member`` below it), made if new."""
        path = self.root / group
        path.mkdir(exist_ok=True)
        self.paths.setdefault(group, path)
        if member is not None:
            path = path / member
            path.mkdir()
            self.paths[f"{group}/{member}"] = path
        return path

    def wrap(self, argv, group, member=None):
        """``argv`` started in the cgroup (a shell writes its pid there, then execs it)."""
        key = f"{group}/{member}" if member else group
        path = self.paths.get(key) or self.make(group, member)
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(path), *argv]

    def usage(self):
        """``{group or group/member: CPU seconds so far}``."""
        found = {}
        for key, path in self.paths.items():
            with open(path / "cpu.stat") as stat:
                for line in stat:
                    name, value = line.split()
                    if name == "usage_usec":
                        found[key] = int(value) / 1e6
        return found

    def processes(self, key):
        """
        ``{pid: (title, CPU seconds)}`` of the processes in one cgroup now: the
        title is what Salt names the process after its configuration
        (``MWorker-default-0``, ``PubServerChannel._publish_daemon``, ...).
        """
        found = {}
        for pid in self.pids(key):
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline") as cmdline:
                    words = cmdline.read().split("\0")
            except OSError:
                continue
            # Salt's setproctitle writes one string: "python salt-master -c CONFDIR
            # [Parent] TITLE"; the event publisher's is its title alone.
            words = " ".join(words).split()
            if "-c" in words and words.index("-c") + 2 < len(words):
                title = words[-1]
            else:
                title = words[0] if words else str(pid)
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
            found[pid] = (title, ticks / os.sysconf("SC_CLK_TCK"))
        return found

    def pids(self, key=None):
        """The processes of one cgroup and its children (``None``: the whole fleet's)."""
        return self.pids_under(self.paths[key] if key else self.root)

    def kill(self, key, timeout=10):
        """SIGTERM then SIGKILL every process of one cgroup (and its children cgroups)."""
        for pid in self.pids(key):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.pids(key) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._kill_all(self.paths[key])

    def _kill_all(self, path):
        kill = path / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        for pid in self.pids_under(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.pids_under(path) and time.monotonic() < deadline:
            time.sleep(0.05)

    @staticmethod
    def pids_under(path):
        """The processes of the cgroup ``path`` and of every cgroup below it."""
        found = []
        for procs in path.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                found += [int(p) for p in procs.read_text().split()]
        return found

    def remove(self):
        """Kill what is left in the fleet's cgroups, then remove them, leaves first."""
        if not self.root.exists():
            return
        self._kill_all(self.root)
        for path in sorted(
            (p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            self.root.rmdir()


# --------------------------------------------------------------------------
# the fleet


def relay_names(count):
    width = max(2, len(str(count)))
    return [f"relay{index:0{width}d}" for index in range(1, count + 1)]


def salt_environment():
    """The daemons' environment: this one, with Python's bytecode cache on, as on a host."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("RELAYROUTE_LOCK", None)
    return env


class Fleet:
    """
    Build with ``Fleet(relays, workdir)``, then ``start()``; always
    ``teardown()`` (also after a failure half-way: it removes what exists).
    """

    def __init__(self, relays, workdir, log=print, proxies=tuple(PROXIES)):
        if not 1 <= relays <= MAX_RELAYS:
            raise FleetError(f"relays: from 1 to {MAX_RELAYS} (got {relays})")
        self.relays = relay_names(relays)
        self.proxies = list(proxies)
        self.addresses = {n: f"192.0.2.{FIRST_RELAY + i}" for i, n in enumerate(self.relays)}
        self.workdir = Path(workdir)
        self.log = log
        self.hosts = {}
        self.mgmt = {}
        self.haproxy = {}
        self.daemons = {}  # minion id or "master" or "smtp": Popen
        self.cgroups = None
        self.made_etc = []
        self.master_conf = self.workdir / "master" / "conf"

    # ---- network

    def _host(self, short, overlay=True):
        ns = Netns(f"{NS_TAG}{short}")
        self.hosts[short] = ns
        if overlay:
            path = NETNS_ETC / ns.name
            path.mkdir(parents=True, exist_ok=True)
            (path / "resolv.conf").write_text("")
            (path / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {short}\n")
            for sub in ("haproxy", "sysctl.d", "relayroute", "systemd"):
                (path / sub).mkdir(exist_ok=True)
        for key in ("all", "default"):
            ns.sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
        return ns

    def build_network(self):
        """The namespaces and links of the module's picture, and the management bridge."""
        for path in ("/etc/relayroute",):
            if etc_mount_point(path):
                self.made_etc.append(path)
        master = self._host("master", overlay=False)
        master.ip("link add br0 type bridge")
        master.ip("link set br0 up")
        master.ip(f"addr add {MASTER_ADDRESS}/25 dev br0")
        client, inet, gw = self._host(PROBE_MINION), self._host("inet"), self._host("gw")
        lan = self._host("lan", overlay=False)
        lan.ip("link add br0 type bridge")
        lan.ip("link set br0 up")

        veth(client, "eth0", inet, "c0")
        client.ip(f"addr add {CLIENT}/24 dev eth0")
        client.ip("route add default via 203.0.113.1")
        inet.ip("addr add 203.0.113.1/24 dev c0")
        veth(inet, "g0", gw, "up0")
        inet.ip("addr add 198.51.100.1/30 dev g0")
        gw.ip("addr add 198.51.100.2/30 dev up0")
        inet.ip(f"route add {LAN} via 198.51.100.2")
        inet.sysctl("net.ipv4.ip_forward", 1)
        gw.sysctl("net.ipv4.ip_forward", 1)
        gw.ip("route add default via 198.51.100.1")
        self._lan_port(gw, "gw", GATEWAY)
        for index, name in enumerate(self.proxies):
            address, inet_side, proxy_side, vip, _mark, _prio = PROXIES[name]
            proxy = self._host(name)
            veth(inet, f"p{index}", proxy, "up0")
            inet.ip(f"addr add {inet_side}/30 dev p{index}")
            proxy.ip(f"addr add {proxy_side}/30 dev up0")
            inet.ip(f"route add {vip}/32 via {proxy_side}")
            proxy.ip(f"addr add {vip}/32 dev lo")
            proxy.ip(f"route add default via {inet_side}")
            self._lan_port(proxy, name, address)
        for name in self.relays:
            relay = self._host(name)
            self._lan_port(relay, name, self.addresses[name])
            relay.ip(f"route add default via {GATEWAY}")
        for name in [*self.proxies, *self.relays, PROBE_MINION]:
            self._mgmt_port(name)

    def _lan_port(self, host, name, address):
        port = f"l-{name}"[:15]
        veth(host, "lan0", self.hosts["lan"], port)
        self.hosts["lan"].ip(f"link set {port} master br0")
        host.ip(f"addr add {address}/24 dev lan0")

    def _mgmt_port(self, name):
        address = f"198.51.100.{MGMT_FIRST + len(self.mgmt)}"
        port = f"m-{name}"[:15]
        veth(self.hosts[name], "mgmt0", self.hosts["master"], port)
        self.hosts["master"].ip(f"link set {port} master br0")
        self.hosts[name].ip(f"addr add {address}/25 dev mgmt0")
        self.mgmt[name] = address

    # ---- pillar and configuration

    def pillar(self):
        """The fleet's relayroute pillar, generated: every relay and proxy listed."""
        return {
            "relayroute": {
                "lan_networks": [LAN],
                "mark_mask": 0xFF,
                "ports": list(PORTS),
                "proxies": {
                    name: {
                        "address": PROXIES[name][0],
                        "vip": PROXIES[name][3],
                        "mark": PROXIES[name][4],
                        "table": 1000000 + PROXIES[name][4],
                        "priority": PROXIES[name][5],
                    }
                    for name in self.proxies
                },
                "relays": {name: {"address": self.addresses[name]} for name in self.relays},
                # As the seed lab: HAProxy run by the fleet (no init system in a
                # namespace), no shared /run/haproxy, saved sysctls per host.
                "lookup": {
                    "proxy": {
                        "haproxy": {
                            "manage_pkg": False,
                            "manage_service": False,
                            "stats_socket": "",
                        },
                        "sysctl_saved": "/etc/sysctl.d/relayroute-before.yaml",
                    }
                },
            }
        }

    def _write_master_config(self):
        import yaml

        base = self.workdir / "master"
        tree = self.workdir / "file-roots"
        tree.mkdir(parents=True)
        for name in ("relayroute", "_modules", "_states", "_beacons", "_runners"):
            (tree / name).symlink_to(ROOT / name, target_is_directory=True)
        states = self.workdir / "states"
        states.mkdir()
        (states / "top.sls").write_text(TOP)
        pillar = self.workdir / "pillar"
        pillar.mkdir()
        (pillar / "top.sls").write_text("base:\n  '*':\n    - relayroute\n")
        (pillar / "relayroute.sls").write_text(yaml.safe_dump(self.pillar()))
        self.master_conf.mkdir(parents=True)
        config = {
            "id": "fleet-master",
            "root_dir": str(base),
            "pki_dir": str(base / "pki"),
            "cachedir": str(base / "cache"),
            "sock_dir": str(base / "sock"),
            "log_file": str(base / "master.log"),
            "log_level_logfile": "warning",
            "interface": MASTER_ADDRESS,
            "auto_accept": True,
            "file_roots": {"base": [str(states), str(tree)]},
            "pillar_roots": {"base": [str(pillar)]},
            "enable_fqdns_grains": False,
            "user": "root",
        }
        (self.master_conf / "master").write_text(json.dumps(config, indent=2) + "\n")

    def _minion_config(self, name, roles):
        base = self.workdir / "minions" / name
        conf = base / "conf"
        conf.mkdir(parents=True)
        config = {
            "id": name,
            "master": MASTER_ADDRESS,
            "root_dir": str(base),
            "pki_dir": str(base / "pki"),
            "cachedir": str(base / "cache"),
            "sock_dir": str(base / "sock"),
            "log_file": str(base / "minion.log"),
            "log_level_logfile": "warning",
            "grains": {"roles": roles},
            "enable_fqdns_grains": False,
            "grains_cache": True,
            "user": "root",
            "acceptance_wait_time": 1,
        }
        (conf / "minion").write_text(json.dumps(config, indent=2) + "\n")
        return conf, base

    # ---- daemons

    def _daemon(self, key, ns_name, argv, group, member=None, log_name=None, env=None):
        log_path = self.workdir / "logs" / f"{log_name or key}.out"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                self.cgroups.wrap(["ip", "netns", "exec", ns_name, *argv], group, member),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env or salt_environment(),
            )
        self.daemons[key] = proc
        return proc

    def start(self):
        """Network, salt-master, every minion (all answering), the relays' SMTP responder."""
        self.cgroups = Cgroups()
        for group in ("master", "cli", "relays", "proxies", "probe", "haproxy", "smtp"):
            self.cgroups.make(group)
        self.build_network()
        self._write_master_config()
        self._daemon(
            "master",
            self.hosts["master"].name,
            [str(BIN / "salt-master"), "-c", str(self.master_conf)],
            "master",
        )
        roles = {
            **{name: ("proxies", ["proxy"]) for name in self.proxies},
            **{name: ("relays", ["relay"]) for name in self.relays},
            PROBE_MINION: ("probe", ["probe"]),
        }
        for name, (group, grain) in roles.items():
            conf, base = self._minion_config(name, grain)
            env = salt_environment()
            # Each host its own relayroute lock, as on real hosts (see the module's doc).
            env["RELAYROUTE_LOCK"] = str(base / "relayroute.lock")
            member = None if group == "probe" else name
            self._daemon(
                name,
                self.hosts[name].name,
                [str(BIN / "salt-minion"), "-c", str(conf)],
                group,
                member,
                env=env,
            )
        self.wait_for_minions([*roles])
        self.start_smtp()

    def wait_for_minions(self, names, timeout=300):
        deadline = time.monotonic() + timeout
        missing = set(names)
        while missing and time.monotonic() < deadline:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise FleetError(f"{name}'s daemon exited ({proc.returncode}): see its log")
            answer = self.salt(
                "test.ping", tgt=",".join(sorted(missing)), tgt_type="list", timeout=10, check=False
            )
            missing -= {m for m, ok in (answer.data or {}).items() if ok is True}
            if missing:
                time.sleep(1)
        if missing:
            logs = {
                name: self.log_tail(self.workdir / "minions" / name / "minion.log")
                for name in sorted(missing)[:2]
            }
            logs["master"] = self.log_tail(self.workdir / "master" / "master.log")
            raise FleetError(
                f"minions that never answered test.ping: {sorted(missing)}; logs: "
                + "".join(f"\n--- {name}:\n{text}" for name, text in logs.items())
            )

    @staticmethod
    def log_tail(path, size=1500):
        try:
            return Path(path).read_text(errors="replace")[-size:]
        except OSError as err:
            return str(err)

    def start_smtp(self):
        hosts = [[self.hosts[n].name, self.addresses[n], n] for n in self.relays]
        script = self.workdir / "smtp_responder.py"
        script.write_text(SMTP_RESPONDER)
        out = self.workdir / "logs" / "smtp.out"
        proc = subprocess.Popen(
            self.cgroups.wrap(
                [sys.executable, str(script), json.dumps(hosts), json.dumps(list(PORTS))], "smtp"
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=open(out, "ab"),  # noqa: SIM115 - the child holds it
            start_new_session=True,
            text=True,
        )
        self.daemons["smtp"] = proc
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise FleetError(f"the SMTP responder did not start: {out.read_text()[-2000:]}")

    def start_haproxy(self):
        """HAProxy on each proxy, from the configuration the highstate wrote there."""
        for name in self.proxies:
            ns = self.hosts[name]
            cfg = "/etc/haproxy/haproxy.cfg"
            log_path = self.workdir / "logs" / f"haproxy-{name}.log"
            haproxy = HAProxyProcess(ns, cfg, log_path=log_path)
            haproxy.start()
            self.haproxy[name] = haproxy
            # Into its cgroup once running (ip netns exec hides the host's cgroup
            # mounts from what it runs): the master, then its workers.
            procs = self.cgroups.make("haproxy", name) / "cgroup.procs"
            for pid in [haproxy.pid, *haproxy.workers()]:
                procs.write_text(str(pid))

    # ---- Salt commands

    def salt(self, fun, *args, tgt="*", tgt_type="glob", timeout=SALT_TIMEOUT, check=True):
        """``salt`` on the master: a ``Call`` (data, wall, rc)."""
        flags = {"glob": [], "list": ["-L"], "grain": ["-G"]}[tgt_type]
        argv = [
            str(BIN / "salt"),
            "-c",
            str(self.master_conf),
            "--out=json",
            "--static",
            f"--timeout={timeout}",
            *flags,
            tgt,
            fun,
            *args,
        ]
        return self._cli(argv, timeout, check)

    def salt_run(self, fun, *args, timeout=SALT_TIMEOUT, check=True):
        argv = [str(BIN / "salt-run"), "-c", str(self.master_conf), "--out=json", fun, *args]
        return self._cli(argv, timeout, check)

    def _cli(self, argv, timeout, check):
        full = self.cgroups.wrap(["ip", "netns", "exec", self.hosts["master"].name, *argv], "cli")
        start = time.perf_counter()
        proc = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout + 60,
            check=False,
            env=salt_environment(),
        )
        wall = time.perf_counter() - start
        try:
            data = json.loads(proc.stdout) if proc.stdout.strip() else None
        except ValueError:
            data = None
        call = Call(data, wall, proc.returncode, proc.stdout, proc.stderr)
        if check and data is None:
            raise FleetError(
                f"{' '.join(argv[3:])}: no JSON (rc {proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return call

    # ---- cleanup

    def teardown(self):
        for haproxy in self.haproxy.values():
            with contextlib.suppress(Exception):
                haproxy.stop()
        if self.cgroups is not None:
            # Minions first, then the master: nothing waits on a master gone.
            for key in ("relays", "proxies", "probe", "smtp", "haproxy", "cli", "master"):
                if key in self.cgroups.paths:
                    self.cgroups.kill(key)
            self.cgroups.remove()
        for proc in self.daemons.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        for ns in reversed(list(self.hosts.values())):
            ns.delete()
            shutil.rmtree(NETNS_ETC / ns.name, ignore_errors=True)
        self.hosts.clear()
        for name in leftover_namespaces(RUN_PREFIX):
            if name.startswith(f"{RUN_PREFIX}-{NS_TAG}"):
                run(["ip", "netns", "delete", name], check=False)
        for path in self.made_etc:
            release_etc_mount_point(path)
        self.made_etc.clear()


class Call:
    """One Salt CLI call: its JSON output, wall time, exit code."""

    def __init__(self, data, wall, returncode, stdout, stderr):
        self.data = data
        self.wall = wall
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def states_by_minion(call, minions):
    """
    ``{minion: {state id: result}}`` of a state run, or FleetError naming each
    minion that did not answer or answered something else than states.
    """
    data = call.data if isinstance(call.data, dict) else {}
    missing = sorted(set(minions) - set(data))
    bad = {m: data[m] for m in minions if m in data and not (isinstance(data[m], dict) and data[m])}
    if missing or bad:
        raise FleetError(
            f"state run: no answer from {missing}; no states from {sorted(bad)}: "
            f"{json.dumps(bad)[:3000]}\n{call.stderr[-2000:]}"
        )
    return {m: data[m] for m in minions}


def failed_states(states):
    """``{minion: [(state id, comment)]}`` of states whose result is not True."""
    found = {}
    for minion, results in states.items():
        bad = [
            (key.split("_|-")[1], value.get("comment"))
            for key, value in results.items()
            if value.get("result") is not True
        ]
        if bad:
            found[minion] = bad
    return found


def changed_states(states):
    """``{minion: [state id, ...]}`` of states that reported changes."""
    found = {}
    for minion, results in states.items():
        changed = [key.split("_|-")[1] for key, value in results.items() if value.get("changes")]
        if changed:
            found[minion] = changed
    return found
