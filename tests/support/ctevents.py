"""
Every connmark the kernel gives a TCP flow, as it happens: ``conntrack -E``
in each namespace, listening from before the flows begin.

A listing (``conntrack -L``) shows the marks of one moment; a mark that goes
wrong and comes back between two listings is never seen there. The kernel
reports each change of a flow's connmark as an event (``IPCT_MARK``: the
``CONNMARK``/``MARK`` targets, nft's ``ct mark set`` and ctnetlink updates
all raise it), so these events show every change at any moment, listing or
not. The kernel gives a flow its event record when the flow begins, and
only while someone listens: the listeners must be subscribed before the
flows open (:meth:`ConnmarkEvents.start` waits for that).

A flow is known by its conntrack id (``-o id``), the same for all its events.
"""

import os
import re
import subprocess
import time

EVENT = re.compile(r"^\[(?P<time>[\d.]+)\]\s+\[(?P<kind>NEW|UPDATE|DESTROY)\]\s+(?P<body>.*)$")
# What conntrack prints when the kernel dropped events for lack of buffer space.
LOST = "ENOBUFS"
# NFNLGRP_CONNTRACK_NEW, _UPDATE, _DESTROY: the groups a listener joins.
GROUPS = 0b111
NETLINK_NETFILTER = 12


def _fields(body):
    fields = {}
    for word in body.split():
        key, _, value = word.partition("=")
        if value:
            fields.setdefault(key, value)
    return fields


def parse(text):
    """``{id: [(time, kind, mark, fields)]}`` from ``conntrack -E -o timestamp,id`` output."""
    flows = {}
    for line in text.splitlines():
        match = EVENT.match(line.strip())
        if not match:
            continue
        fields = _fields(match["body"])
        if "id" not in fields:
            continue
        # The kernel leaves a connmark of 0 out of an event, unless the event
        # is that mark's change (ctnetlink_dump_mark): no mark= is mark 0.
        flows.setdefault(fields["id"], []).append(
            (float(match["time"]), match["kind"], int(fields.get("mark", 0)), fields)
        )
    return flows


def mark_changes(events):
    """
    ``[(time, old, new)]``: each change of a flow's connmark in its events
    (``parse``'s list for one id), the first mark reported being its start.
    """
    changes = []
    marks = [(when, mark) for when, kind, mark, _fields in events if kind != "DESTROY"]
    for (_before, old), (when, new) in zip(marks, marks[1:]):
        if new != old:
            changes.append((when, old, new))
    return changes


class ConnmarkEvents:
    """
    ``conntrack -E`` for TCP in each of ``namespaces`` (``{name: Netns}``), to
    ``directory``; ``with`` starts the listeners (:meth:`start`) and stops them.
    """

    def __init__(self, namespaces, directory):
        self.namespaces = dict(namespaces)
        self.paths = {name: directory / f"{name}.ctevents" for name in self.namespaces}
        self.procs = {}

    def start(self, timeout=10.0):
        """Start every listener and wait until each has joined the conntrack event groups."""
        argv = ["conntrack", "-E", "-p", "tcp", "-e", "NEW,UPDATE,DESTROY", "-o", "timestamp,id"]
        for name, ns in self.namespaces.items():
            with open(self.paths[name], "wb") as out:
                self.procs[name] = ns.popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        waiting = dict(self.procs)
        while waiting:
            for name in list(waiting):
                proc = waiting[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"conntrack -E in {name} ended: {self.text(name)!r}")
                if self._subscribed(self.namespaces[name], proc.pid):
                    del waiting[name]
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(
                    f"conntrack -E not listening after {timeout} s in {list(waiting)}"
                )
            if waiting:
                time.sleep(0.05)
        return self

    @staticmethod
    def _subscribed(ns, pid):
        # The listener's sockets (its event socket's netlink port id is not its
        # pid), and /proc/net/netlink of its namespace: sk Eth Pid Groups ...
        # Inode, Groups the first 32 groups in hex.
        inodes = set()
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        except OSError:
            return False
        for line in ns.exec(["cat", "/proc/net/netlink"]).stdout.splitlines()[1:]:
            words = line.split()
            ours = len(words) > 9 and words[1] == str(NETLINK_NETFILTER) and words[9] in inodes
            if ours and int(words[3], 16) & GROUPS == GROUPS:
                return True
        return False

    def text(self, name):
        return self.paths[name].read_text(errors="replace")

    def flows(self, name):
        """``{id: [(time, kind, mark, fields)]}`` reported so far in namespace ``name``."""
        return parse(self.text(name))

    def complete(self, name):
        """Whether every event reached the listener (the kernel reported no loss)."""
        return LOST not in self.text(name)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
