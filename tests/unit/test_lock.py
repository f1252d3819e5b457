"""relayroute's host lock: one holder at a time, a clear error after the wait."""

import multiprocessing
import time

import pytest

from relayroute_core import engine


def _hold(path, ready, release):
    with engine.locked(path):
        ready.set()
        release.wait(10)


def test_a_second_holder_waits_then_fails_clearly(tmp_path):
    path = str(tmp_path / "run" / "lock")
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with (
            pytest.raises(RuntimeError, match="another relayroute apply or restore has held"),
            engine.locked(path, timeout=0.3),
        ):
            pass
        assert time.monotonic() - started >= 0.3
    finally:
        release.set()
        holder.join(10)
    # Released with its holder: the next one gets it at once, without waiting.
    with engine.locked(path, timeout=0.1) as waited:
        assert waited is False
