"""Process-group and port helpers for the server and its tests (read from /proc; no psutil)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

log = logging.getLogger("distrifusion.server")



def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now on this machine (for tests)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie has exited already), read from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def kill_group(pgid: int, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process left in group ``pgid``; returns those that were found."""
    found = group_members(pgid)
    if not found:
        return []
    log.warning("killing %d process(es) left in the server's process group: %s", len(found), found)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return found
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def wait_group_exit(pgid: int, timeout: float) -> bool:
    """Waits up to ``timeout`` s for every process of group ``pgid`` to exit on its own; returns whether
    they did. Helpers such as multiprocessing's resource trackers outlive the server by a moment while
    they unlink what their process left (semaphores, shared memory); killing them loses that."""
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
