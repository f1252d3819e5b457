"""
New SMTP sessions started one after another while something changes, each a
whole transaction (EHLO, MAIL, RCPT, DATA, QUIT) with every wait bounded: the
other half of ``tests/support/smtphold.py``'s held sessions. One process in a
namespace starts one every ``every`` s, cycling through ``targets``, for
``window`` s at most or until ``stop()``; ``results()`` gives each one's
target, start, end, relay that answered, outcome (``ok``: 250 after DATA).
"""

import json
import subprocess

NEW_SESSIONS = """
import json, os, smtplib, sys, threading, time
args = json.loads(sys.argv[1])
results, threads = [], []

def one(index, target):
    r = {**target, "index": index, "start": time.monotonic(), "ok": False}
    results.append(r)
    try:
        smtp = smtplib.SMTP(timeout=args["timeout"], source_address=(target["source"], 0))
        code, banner = smtp.connect(target["server"], target["port"])
        r["banner_at"] = time.monotonic()
        r["local"] = list(smtp.sock.getsockname()[:2])
        r["relay"] = banner.decode(errors="replace").split(".")[0]
        smtp.ehlo("new.example.com")
        smtp.mail("sender@example.com")
        code, text = smtp.rcpt(target["rcpt"])
        if code != 250:
            raise RuntimeError(f"RCPT {code} {text!r}")
        code, text = smtp.data(f"Subject: new {index}\\r\\n\\r\\nnew session {index}\\r\\n")
        r["code"] = code
        r["ok"] = code == 250
        smtp.quit()
    except Exception as err:
        r["error"] = repr(err)
    r["end"] = time.monotonic()

start = time.monotonic()
index = 0
stop = args.get("stop_file")
while time.monotonic() - start < args["window"] and not (stop and os.path.exists(stop)):
    target = args["targets"][index % len(args["targets"])]
    thread = threading.Thread(target=one, args=(index, target), daemon=True)
    thread.start()
    threads.append(thread)
    index += 1
    time.sleep(max(0.0, start + index * args["every"] - time.monotonic()))
for thread in threads:
    thread.join(args["timeout"] * 4)
print(json.dumps(results), flush=True)
"""


class NewSessions:
    """
    ``targets``: dicts with server, port, source, rcpt (and anything else,
    kept in each result). ``stop_file``: a path whose existence ends the
    starting early (``stop()`` creates it); None runs the whole ``window``.
    """

    def __init__(self, ns, targets, every, window, timeout, stop_file=None):
        self.window, self.timeout, self.stop_file = window, timeout, stop_file
        args = {
            "targets": list(targets),
            "every": every,
            "window": window,
            "timeout": timeout,
            "stop_file": str(stop_file) if stop_file else None,
        }
        self.proc = ns.popen(
            ["python3", "-c", NEW_SESSIONS, json.dumps(args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )

    def stop(self):
        """No new session from now on (those in flight finish)."""
        if self.stop_file:
            self.stop_file.touch()

    def results(self):
        """Wait for every session to end; one dict per session started."""
        out, _ = self.proc.communicate(timeout=self.window + self.timeout * 5)
        return json.loads(out)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
