"""
Kernel parameters through /proc/sys: read and written in-process, no
``sysctl`` process. Keys are dotted (``net.ipv4.conf.eth1.src_valid_mark``).
"""

import os

PROC_SYS = "/proc/sys"


def path_of(key):
    # Interface names may contain dots; they are written with "/" in keys only
    # when needed, which relayroute's keys never need.
    return os.path.join(PROC_SYS, *key.split("."))


def read(keys):
    """Current values of ``keys`` as strings; a key the kernel lacks reads None."""
    values = {}
    for key in keys:
        try:
            with open(path_of(key)) as handle:
                values[key] = handle.read().strip()
        except FileNotFoundError:
            values[key] = None
    return values


def write(key, value):
    """Set one kernel parameter; raises OSError naming the key when refused."""
    try:
        with open(path_of(key), "w") as handle:
            handle.write(f"{value}\n")
    except OSError as err:
        raise OSError(err.errno, f"setting {key} = {value}: {err.strerror}") from err
