"""
Many SMTP sessions held open at once, from inside a namespace, and kept busy:
each connects, greets, gives MAIL FROM and RCPT TO, then sends NOOP every
``interval`` seconds until told to finish; then it sends its message and quits.
Used to prove that applying relayroute never disturbs a session in flight: a
NOOP whose reply fails, or does not arrive within ``bound`` seconds, is a loss
(the session stops there). Every NOOP is counted in the window in effect when
its reply arrived (``window`` names them, e.g. one per highstate), so a test
can show that each session exchanged commands while each change was applied,
not only before and after. Bounded: every wait has a timeout, and the holder
stops itself after ``max_hold`` seconds or when its driver goes away.
"""

import contextlib
import json
import subprocess
import tempfile
import textwrap

HOLDER = textwrap.dedent(
    """
    import json, queue, random, smtplib, sys, threading, time

    args = json.loads(sys.argv[1])
    sessions = args["sessions"]
    interval, bound = args["interval"], args["bound"]
    open_timeout, max_hold = args["open_timeout"], args["max_hold"]
    results = [None] * len(sessions)
    opened = threading.Barrier(len(sessions) + 1, timeout=open_timeout * 2)
    stop = threading.Event()
    window = ["opened"]  # the label replies are counted under, switched by the driver

    def keep_busy(smtp, result):
        # NOOP every interval (from each NOOP's start; at once when a reply was
        # late); spread the sessions' phases so they do not all send together.
        smtp.sock.settimeout(bound)
        windows = result["windows"]
        last = time.monotonic()
        next_at = last + random.uniform(0, interval)
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            sent = time.monotonic()
            next_at = sent + interval
            try:
                code, text = smtp.noop()
            except Exception as err:
                code, text = None, repr(err)
            now = time.monotonic()
            label = window[0]
            if code != 250:
                error = text if code is None else f"{code} {text!r}"
                result.update(stage="noop", window=label, error=error, waited=round(now - sent, 3))
                return False
            counts = windows.setdefault(label, [0, 0.0, 0.0])
            counts[0] += 1
            counts[1] = max(counts[1], round(now - sent, 4))
            counts[2] = max(counts[2], round(now - last, 4))
            last = now
        return True

    def run(index, spec):
        result = {"spec": spec, "stage": "connect", "ok": False, "windows": {}}
        results[index] = result
        smtp = None
        try:
            smtp = smtplib.SMTP(timeout=open_timeout, source_address=(spec["source"], 0))
            code, banner = smtp.connect(spec["server"], spec["port"])
            result["local"] = list(smtp.sock.getsockname()[:2])
            result["peer"] = list(smtp.sock.getpeername()[:2])
            # smtpd_banner is "$myhostname ESMTP": which relay answered.
            result["relay"] = banner.decode(errors="replace").split(".")[0]
            result["stage"] = "ehlo"
            smtp.ehlo("hold.example.com")
            result["stage"] = "mail"
            code, text = smtp.mail("sender@example.com")
            if code != 250:
                raise RuntimeError(f"MAIL {code} {text!r}")
            result["stage"] = "rcpt"
            code, text = smtp.rcpt(spec["rcpt"])
            if code != 250:
                raise RuntimeError(f"RCPT {code} {text!r}")
            result["stage"] = "held"
        except Exception as err:
            result["error"] = repr(err)
        try:
            opened.wait()
        except threading.BrokenBarrierError:
            pass
        if result["stage"] != "held" or not keep_busy(smtp, result):
            return
        try:
            smtp.sock.settimeout(open_timeout)
            result["stage"] = "data"
            code, text = smtp.data(f"Subject: held {index}\\r\\n\\r\\nsession {index}\\r\\n")
            result["data_code"] = code
            result["ok"] = code == 250
            result["stage"] = "quit"
            smtp.quit()
            result["stage"] = "done"
        except Exception as err:
            result["error"] = repr(err)

    def say(data):
        print(json.dumps(data), flush=True)

    def status():
        # A lost session's thread has returned: its result no longer changes.
        return {
            "window": window[0],
            "busy": sum(1 for r in results if r and r["stage"] == "held"),
            "losses": [r for r in results if r and r["stage"] == "noop"],
        }

    threads = [
        threading.Thread(target=run, args=(i, s), daemon=True) for i, s in enumerate(sessions)
    ]
    for thread in threads:
        thread.start()
    try:
        opened.wait()
    except threading.BrokenBarrierError:
        pass
    first = [{k: v for k, v in dict(r).items() if k != "windows"} if r else {} for r in results]
    say({"held": sum(1 for r in first if r.get("stage") == "held"), "sessions": first})
    commands = queue.Queue()

    def read_commands():
        for line in sys.stdin:
            commands.put(json.loads(line))
        commands.put(None)  # the driver went away

    threading.Thread(target=read_commands, daemon=True).start()
    deadline = time.monotonic() + max_hold
    while True:
        try:
            command = commands.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if command is None:
            break
        if command["cmd"] == "window":
            window[0] = command["label"]
            say(status())
        elif command["cmd"] == "status":
            say(status())
        else:  # finish
            break
    window[0] = "finishing"
    stop.set()
    for thread in threads:
        thread.join(open_timeout * 2)
    say(results)
    """
)


class HeldSmtpSessions:
    """
    ``sessions``: dicts with server, port, source, rcpt (and anything else, kept
    as ``spec``). Opens them all and keeps them busy; ``held`` is how many got
    as far as RCPT, ``opened`` each one's first state (local and peer address,
    the relay that answered). ``window(label)`` starts counting replies under
    ``label``; ``finish()`` sends every message and returns the per-session
    results: ``windows`` maps each label to ``[commands, longest reply,
    longest time between two replies]`` (seconds); a lost session has stage
    ``noop`` and the window, error and time waited of the NOOP that failed.
    """

    def __init__(self, ns, sessions, interval=0.3, bound=3.0, open_timeout=60.0, max_hold=1800.0):
        self.sessions = list(sessions)
        self.interval, self.bound = interval, bound
        args = {
            "sessions": self.sessions,
            "interval": interval,
            "bound": bound,
            "open_timeout": open_timeout,
            "max_hold": max_hold,
        }
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by close()
        self.proc = ns.popen(
            ["python3", "-u", "-c", HOLDER, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        first = self._read()
        self.held = first["held"] if first else 0
        self.opened = first["sessions"] if first else []

    def window(self, label):
        """Count replies from now on under ``label``; returns the holder's status."""
        return self._ask({"cmd": "window", "label": label})

    def status(self):
        """``{"window", "busy": sessions still held, "losses": [lost sessions]}``."""
        return self._ask({"cmd": "status"})

    def finish(self, timeout=300):
        """Stop the NOOPs, let every session send its message; return the per-session results."""
        if self.proc.poll() is not None:
            return []
        self.proc.stdin.write(json.dumps({"cmd": "finish"}) + "\n")
        self.proc.stdin.flush()
        results = self._read() or []
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        return results

    def errors(self):
        """What the holder wrote to stderr (a traceback if it crashed)."""
        self.stderr.seek(0)
        return self.stderr.read()

    def _ask(self, command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if answer is None:
            raise RuntimeError(f"the session holder exited: {self.errors()[-2000:]}")
        return answer

    def _read(self):
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def close(self):
        """Stop the holder if it still runs (after ``finish`` it has exited)."""
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.stderr.close()
