"""
Many SMTP sessions held open at once, from inside a namespace: each connects,
greets, gives MAIL FROM and RCPT TO, then waits; on ``finish`` each sends its
message and quits. Used to prove that applying relayroute never drops a
session in flight. Bounded: every wait has a timeout, the process stops itself.
"""

import json
import textwrap

HOLDER = textwrap.dedent(
    """
    import json, smtplib, sys, threading
    sessions = json.loads(sys.argv[1])
    timeout = float(sys.argv[2])
    results = [None] * len(sessions)
    opened = threading.Barrier(len(sessions) + 1, timeout=timeout * 4)
    go = threading.Event()

    def run(index, spec):
        result = {"spec": spec, "stage": "connect", "ok": False}
        results[index] = result
        smtp = None
        try:
            smtp = smtplib.SMTP(timeout=timeout, source_address=(spec["source"], 0))
            smtp.connect(spec["server"], spec["port"])
            result["stage"] = "ehlo"
            smtp.ehlo("hold.example.com")
            result["stage"] = "mail"
            code, _ = smtp.mail("sender@example.com")
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
        if result["stage"] != "held":
            return
        go.wait(timeout * 20)
        try:
            result["stage"] = "data"
            code, text = smtp.data(f"Subject: held {index}\\r\\n\\r\\nsession {index}\\r\\n")
            result["data_code"] = code
            result["ok"] = code == 250
            result["stage"] = "quit"
            smtp.quit()
            result["stage"] = "done"
        except Exception as err:
            result["error"] = repr(err)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(sessions)]
    for thread in threads:
        thread.start()
    try:
        opened.wait()
    except threading.BrokenBarrierError:
        pass
    held = sum(1 for r in results if r and r["stage"] == "held")
    print(json.dumps({"held": held}), flush=True)
    sys.stdin.readline()
    go.set()
    for thread in threads:
        thread.join(timeout * 4)
    print(json.dumps(results), flush=True)
    """
)


class HeldSmtpSessions:
    """``sessions``: dicts with server, port, source, rcpt. Opens them all, holds them."""

    def __init__(self, ns, sessions, timeout=60.0):
        self.sessions = list(sessions)
        self.proc = ns.popen(
            ["python3", "-u", "-c", HOLDER, json.dumps(self.sessions), str(timeout)],
            stdin=-1,
            stdout=-1,
            text=True,
        )
        first = self.proc.stdout.readline()
        self.held = json.loads(first)["held"] if first else 0

    def finish(self, timeout=300):
        """Let every session send its message; return the per-session results."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        self.proc.wait(timeout=timeout)
        return json.loads(line) if line else []
