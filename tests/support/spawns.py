"""The processes a piece of code starts in this process, recorded."""

import contextlib
import subprocess

import pytest


@contextlib.contextmanager
def recorded():
    """
    A list that receives the argv of every process ``subprocess.Popen``
    starts while the body runs (``subprocess.run`` and the like included);
    the processes start as usual.
    """
    real_init = subprocess.Popen.__init__
    spawned = []

    def recording_init(self, argv, *rest, **kwargs):
        spawned.append(argv)
        real_init(self, argv, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", recording_init)
        yield spawned
