"""A tiny TCP service and client run inside namespaces, for traffic tests."""

import contextlib
import textwrap

SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    srv = socket.socket()
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
    s = socket.socket()
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


def start_server(ns, address, port):
    """Start the banner server in ``ns``; returns once it listens."""
    proc = ns.popen(["python3", "-u", "-c", SERVER, address, str(port)], stdout=-1, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"tcp server in {ns.name} did not start: {line!r}")
    return proc


def connect(ns, address, port, source, timeout=3.0):
    """Connect from ``source`` in ``ns``; the banner on success, None on failure."""
    proc = ns.exec(
        ["python3", "-c", CLIENT, address, str(port), source, str(timeout)],
        check=False,
        timeout=timeout + 10,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


HELD = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket()
    s.settimeout(float(sys.argv[4]))
    s.bind((sys.argv[3], 0))
    s.connect((sys.argv[1], int(sys.argv[2])))
    f = s.makefile("rb")
    print(f.readline().decode().strip(), flush=True)
    for line in sys.stdin:
        s.sendall(line.encode())
        print(f.readline().decode().strip(), flush=True)
    """
)


class HeldSession:
    """A connection held open from ``source``; ``say`` sends a line and returns the answer."""

    def __init__(self, ns, address, port, source, timeout=5.0):
        self.proc = ns.popen(
            ["python3", "-u", "-c", HELD, address, str(port), source, str(timeout)],
            stdin=-1,
            stdout=-1,
            text=True,
        )
        self.banner = self.proc.stdout.readline().strip()

    def say(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.wait(timeout=10)
