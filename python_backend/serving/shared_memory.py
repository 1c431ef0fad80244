"""The Python backend's shared-memory regions: private to the server's user, and removed when a
crashed server left them behind."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

log = logging.getLogger("distrifusion.server")

SERVER_UMASK = 0o077
"""The server's umask: files it (and its stubs) create are readable by this user only."""
SHM_DIR = Path("/dev/shm")
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"
SEMAPHORE_PREFIX = "sem.mp-"
"""multiprocessing's named semaphores (tqdm's progress-bar lock creates one in every process that shows
a bar): a killed stub or rank worker leaves its own behind."""
"""The Python backend's region names (its ``shm-region-prefix-name`` default)."""
STALE_REGION_MIN_AGE_S = 5.0
"""A region younger than this is never taken for a leftover (its creator may not have mapped it yet)."""


# The Python backend creates its regions through boost.interprocess, which sets their mode explicitly
# after creating them (fchmod(fd, 0644)): the umask alone leaves them readable by every local user. The
# server is therefore started through :func:`exec_private`, which installs a seccomp filter (inherited by
# every process of the tree) turning exactly ``fchmod(fd, 0644)`` into a successful no-op, so that what
# is created keeps the mode the umask gives it (0600). Any other fchmod, and every other call, is untouched.
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, 91), "aarch64": (0xC00000B7, 52)}  # AUDIT_ARCH_*, __NR_fchmod
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000  # ERRNO with 0: the call "succeeds"
LAUNCHER = "import sys; from python_backend.serving.shared_memory import exec_private; exec_private(sys.argv[1:])"
"""``python -c LAUNCHER tritonserver ...`` starts the server through :func:`exec_private`."""


def install_fchmod_guard() -> None:
    """Makes ``fchmod(fd, 0644)`` a no-op in this process and all it starts (seccomp; OSError if refused)."""
    import ctypes
    import platform

    if platform.machine() not in _SECCOMP_ARCHES:
        raise OSError(f"no seccomp filter for {platform.machine()}")
    arch, fchmod = _SECCOMP_ARCHES[platform.machine()]

    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

    load, jump_eq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    code = [(load, 0, 0, 4), (jump_eq, 0, 5, arch),  # seccomp_data.arch; other: allow
            (load, 0, 0, 0), (jump_eq, 0, 3, fchmod),  # .nr
            (load, 0, 0, 24), (jump_eq, 0, 1, 0o644),  # low word of .args[1]: the mode
            (ret, 0, 0, _SECCOMP_RET_ERRNO), (ret, 0, 0, _SECCOMP_RET_ALLOW)]
    instructions = (Instruction * len(code))(*(Instruction(*i) for i in code))
    program = Program(len(code), instructions)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter refused: " + os.strerror(ctypes.get_errno()))


def exec_private(argv: Sequence[str]) -> None:
    """Replaces this process with ``argv`` after :func:`install_fchmod_guard` (the launcher of the server)."""
    try:
        install_fchmod_guard()
    except OSError as error:
        print(f"distrifusion: warning: the Python backend's shared-memory regions stay readable by other "
              f"users: {error}", file=sys.stderr, flush=True)
    os.execv(argv[0], list(argv))


def _shm_in_use() -> set[int]:
    """Inodes of files under /dev/shm that a live process maps or holds open (every process /proc
    shows). By inode, not path: glibc maps a named semaphore under a temporary name it then renames."""
    used = set()
    prefix = f"{SHM_DIR}/"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps") as maps:
                for line in maps:
                    if prefix in line:
                        used.add(int(line.split()[4]))  # address perms offset dev inode path
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                try:
                    if os.readlink(fd.path).startswith(prefix):
                        used.add(os.stat(fd.path).st_ino)
                except OSError:
                    continue
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return used


def stale_shm_regions(prefix: str = SHM_REGION_PREFIX, min_age_s: float = STALE_REGION_MIN_AGE_S) -> list[Path]:
    """The Python backend's /dev/shm regions that no live process maps or holds open: left by a server
    that was killed. Only this user's regions, and none younger than ``min_age_s``."""
    if not SHM_DIR.is_dir():
        return []
    now, uid = time.time(), os.getuid()
    candidates = []
    for path in SHM_DIR.glob(f"{prefix}*"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if info.st_uid == uid and now - max(info.st_mtime, info.st_ctime) >= min_age_s:
            candidates.append((path, info.st_ino))
    if not candidates:
        return []
    used = _shm_in_use()  # read after listing: a region listed above and mapped since counts as in use
    return [path for path, inode in candidates if inode not in used]


def remove_stale_shm_regions(prefix: str = SHM_REGION_PREFIX,
                             min_age_s: float = STALE_REGION_MIN_AGE_S) -> list[Path]:
    """Removes :func:`stale_shm_regions`; returns those removed."""
    removed, freed = [], 0
    for path in stale_shm_regions(prefix, min_age_s):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        removed.append(path)
        freed += size
    if removed:
        log.warning("removed %d shared-memory region(s) a crashed server left in %s (%.1f MiB)", len(removed),
                    SHM_DIR, freed / 2**20)
    return removed
