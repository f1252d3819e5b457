"""
A tiny TCP service and clients run inside namespaces, for traffic tests; an
address with a colon makes an IPv6 socket.
"""

import contextlib
import queue
import subprocess
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

# How long a probe expected to fail waits before calling the path broken: a
# loaded machine (a lab running beside) is slow, not broken. Tests that use it
# show the same probe succeeding with the routing right.
NEGATIVE_TIMEOUT = 12.0

SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    srv = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((sys.argv[1], int(sys.argv[2])))
    srv.listen(64)
    print("ready", flush=True)
    def serve(conn, peer):
        conn.sendall(b"220 hello " + peer[0].encode() + b"\\r\\n")
        for line in conn.makefile("rb"):
            if line.strip() == b"QUIT":
                break
            conn.sendall(b"250 " + line)
        conn.close()
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
    """
)

CLIENT = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
    s.settimeout(float(sys.argv[4]))
    s.bind((sys.argv[3], 0))
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
        print(s.recv(200).decode().strip())
        s.sendall(b"QUIT\\n")
    except OSError as err:
        print("FAIL", err)
        sys.exit(1)
    """
)

# A transparent listener (IP_TRANSPARENT, 19, or IPV6_TRANSPARENT, 75), as
# HAProxy's transparent frontend: it may bind an address the host does not
# have, and the proxy's TPROXY divert hands it connections to that address.
TRANSPARENT_SERVER = textwrap.dedent(
    """
    import socket, sys
    six = ":" in sys.argv[1]
    srv = socket.socket(socket.AF_INET6 if six else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if six:
        srv.setsockopt(socket.IPPROTO_IPV6, 75, 1)
    else:
        srv.setsockopt(socket.SOL_IP, 19, 1)
    srv.bind((sys.argv[1], int(sys.argv[2])))
    srv.listen(16)
    print("ready", flush=True)
    while True:
        conn, peer = srv.accept()
        conn.sendall(b"220 diverted " + peer[0].encode() + b"\\r\\n")
        conn.close()
    """
)


def transparent_server(ns, address, port):
    """Start a transparent listener on ``address`` (either family) in ``ns``."""
    return _started(ns, TRANSPARENT_SERVER, address, port)


def start_server(ns, address, port):
    """Start the banner server in ``ns``; returns once it listens."""
    return _started(ns, SERVER, address, port)


def _started(ns, script, address, port):
    proc = ns.popen(["python3", "-u", "-c", script, address, str(port)], stdout=-1, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"tcp server in {ns.name} did not start: {line!r}")
    return proc


def connect(ns, address, port, source, timeout=NEGATIVE_TIMEOUT):
    """
    Connect from ``source`` in ``ns``; the banner on success, None when no
    banner came within ``timeout`` seconds (or the connection failed).
    """
    proc = ns.exec(
        ["python3", "-c", CLIENT, address, str(port), source, str(timeout)],
        check=False,
        timeout=timeout + 10,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


HELD = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
    s.settimeout(float(sys.argv[4]))
    s.bind((sys.argv[3], 0))
    s.connect((sys.argv[1], int(sys.argv[2])))
    f = s.makefile("rb")
    try:
        print(f.readline().decode().strip(), flush=True)
        for line in sys.stdin:
            s.sendall(line.encode())
            print(f.readline().decode().strip(), flush=True)
    except OSError as err:
        print("FAIL", err, flush=True)
    """
)


def _lines(stream, into):
    """Feed ``into`` (a queue) with the lines of ``stream``, then None at its end."""
    for line in stream:
        into.put(line.strip())
    into.put(None)


class HeldSession:
    """
    A connection held open from ``source``. ``send`` writes a line; ``reply``
    waits (bounded) for the server's answer without giving up the connection,
    so an answer that comes late (a reply retransmitted once its path is
    right again) is still read by the next ``reply``.
    """

    def __init__(self, ns, address, port, source, timeout=60.0):
        self.proc = ns.popen(
            ["python3", "-u", "-c", HELD, address, str(port), source, str(timeout)],
            stdin=-1,
            stdout=-1,
            text=True,
        )
        self._answers = queue.Queue()
        threading.Thread(target=_lines, args=(self.proc.stdout, self._answers), daemon=True).start()
        self.banner = self.reply(timeout=NEGATIVE_TIMEOUT)

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout=NEGATIVE_TIMEOUT):
        """The next line from the server, or None when none came within ``timeout``."""
        try:
            return self._answers.get(timeout=timeout)
        except queue.Empty:
            return None

    def pending(self):
        """True when an answer has arrived that no ``reply`` has read yet."""
        return not self._answers.empty()

    def say(self, line, timeout=NEGATIVE_TIMEOUT):
        self.send(line)
        return self.reply(timeout)

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            raise


TICKER = textwrap.dedent(
    """
    import select, socket, sys, time
    s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
    s.settimeout(float(sys.argv[5]))
    s.bind((sys.argv[3], 0))
    s.connect((sys.argv[1], int(sys.argv[2])))
    f = s.makefile("rb")
    interval = float(sys.argv[4])
    try:
        print("banner", f.readline().decode().strip(), flush=True)
        n = 0
        while not select.select([sys.stdin], [], [], interval)[0]:
            n += 1
            sent = time.monotonic()
            s.sendall(b"tick %d\\n" % n)
            answer = f.readline().decode().strip()
            print("tick", n, sent, time.monotonic(), answer, flush=True)
            if not answer:
                break
        s.sendall(b"QUIT\\n")
    except OSError as err:
        print("error", err, flush=True)
    """
)


@dataclass
class Exchange:
    """One line sent and its answer; times are ``time.monotonic()`` (one clock for all)."""

    seq: int
    sent: float
    answered: float
    answer: str

    @property
    def rtt(self):
        return self.answered - self.sent


class Ticker:
    """
    A connection from ``source`` exchanging one line every ``interval``
    seconds (after the previous answer) until ``stop``: traffic in flight at
    every moment of a change. Each exchange is recorded with its times.
    """

    def __init__(self, ns, address, port, source, interval=0.15, timeout=60.0):
        self.proc = ns.popen(
            ["python3", "-u", "-c", TICKER, address, str(port), source, str(interval),
             str(timeout)],
            stdin=-1,
            stdout=-1,
            text=True,
        )  # fmt: skip
        self.exchanges: List[Exchange] = []
        self.errors: List[str] = []
        self.banner: Optional[str] = None
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._started.wait(timeout=NEGATIVE_TIMEOUT)

    def _read(self):
        for line in self.proc.stdout:
            kind, _, rest = line.strip().partition(" ")
            if kind == "banner":
                self.banner = rest
                self._started.set()
            elif kind == "tick":
                seq, sent, answered, answer = (rest.split(" ", 3) + [""])[:4]
                self.exchanges.append(Exchange(int(seq), float(sent), float(answered), answer))
            else:
                self.errors.append(line.strip())
        self._started.set()

    def wait_for(self, count, timeout=NEGATIVE_TIMEOUT):
        """Wait (bounded) until ``count`` exchanges have completed; True if they have."""
        deadline = time.monotonic() + timeout
        while len(self.exchanges) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.exchanges) >= count

    def stop(self, timeout=NEGATIVE_TIMEOUT):
        """
        End the exchanges (after the one in flight) and close; returns the
        exchanges. An exchange still unanswered ``timeout`` seconds later is
        recorded in ``errors``, and the client is killed.
        """
        with contextlib.suppress(OSError):
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.errors.append(f"no answer {timeout} s after stop: the exchange in flight stalled")
        self._reader.join(timeout=5)
        return self.exchanges

    def lost(self):
        """Exchanges whose answer was not the line sent (empty: the connection closed)."""
        return [e for e in self.exchanges if e.answer != f"250 tick {e.seq}"]
