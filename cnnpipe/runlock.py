"""The lock a running command holds on its run (or sweep) directory, so that no second process writes there at once.

`<dir>/.cnnpipe.lock`, flock'ed exclusively for as long as the command runs. The kernel drops a flock when its process
ends, however it ends, so a killed run leaves no stale lock. The lock is advisory: it binds cnnpipe's commands
(each takes it before Hydra writes, in cnnpipe.cli.check_command_line, or in the fresh_dir resolver that makes the
default directory), not other programs. SLURM and Ray jobs on one machine share this kernel's locks. On NFS,
Linux emulates flock with fcntl byte-range locks, which hold across machines only where the NFS lock manager runs
(not with the `nolock` mount option, where each machine sees only its own locks).
"""
from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cnnpipe import ConfigError

LOCK_FILE = ".cnnpipe.lock"
# What a command's directory holds before any of our code ran: Hydra's record, its log (<job name>.log) and the lock.
HYDRA_ONLY = (".hydra", LOCK_FILE)


@dataclass
class _Held:
    fd: int
    created: bool                   # this process made the directory
    before: frozenset[str]          # the names the directory held when the lock was taken
    started: bool = False           # the command got past its set-up: the directory holds a run from here on


_held: dict[Path, _Held] = {}      # this process's locks, by resolved directory


def holder(directory: Path) -> int | None:
    """The pid of another process that holds `directory`'s lock (0 if it cannot be told), else None. Only
    reads."""
    directory = Path(directory)
    if directory.resolve() in _held:
        return None
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:                             # no lock file: no cnnpipe command ever ran there
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)     # a probe: conflicts with a holder's exclusive lock only
        return None                             # (two probes at one instant can refuse a start; never a write)
    except BlockingIOError:
        return _pid_in(fd)
    finally:
        os.close(fd)                            # also drops the probe's shared lock


def hold(directory: Path, made: bool = False) -> None:
    """Take `directory`'s lock for the rest of this process (making the directory if needed; `made`: the caller
    has just made it), or a ConfigError naming the process that holds it. Again in the same process: a no-op."""
    directory = Path(directory)
    key = directory.resolve()
    if key in _held:
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        try:
            os.mkdir(directory)                 # atomic: of two processes, one makes it
            created = True
        except FileExistsError:
            created = made
        before = frozenset(os.listdir(directory))
        try:
            fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:               # removed meanwhile (a refused run discarding it): again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise ConfigError(busy_message(directory, pid)) from None
        # A lock on a file that was removed between open and flock (by a refused run discarding its directory)
        # guards nothing: keep it only if it is the file that is there now.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(directory / LOCK_FILE))
        except FileNotFoundError:
            same = False
        if same:                                # the file stays empty: taking the lock changes no file
            _held[key] = _Held(fd, created, before)
            return
        os.close(fd)
    raise ConfigError(f"Could not lock the run directory {directory}: it was removed and made again while this "
                      f"command started. Run it again.")


def busy_message(directory: Path, pid: int | None) -> str:
    who = f"process {pid}" if pid else "another process"
    return (f"{directory} is in use: a cnnpipe command ({who}) is running there now, and two processes never "
            f"write one run directory. Wait until it ends (or stop it), or choose another directory.")


def started(directory: Path) -> None:
    """The command is past its set-up (e.g. the trainer is built): its directory holds a run even if it fails."""
    held = _held.get(Path(directory).resolve())
    if held is not None:
        held.started = True


def discard_unstarted(directory: Path) -> bool:
    """A command refused during its set-up leaves its directory as it found it: remove what this process added
    there, when that is only what Hydra writes before our code runs (.hydra/, <job>.log) and the lock, and the
    directory itself when this process made it. Anything else (a checkpoint, metrics) keeps everything."""
    directory = Path(directory)
    key = directory.resolve()
    held = _held.get(key)
    if held is None or held.started or not directory.is_dir():
        return False
    added = set(os.listdir(directory)) - held.before
    if not all(name in HYDRA_ONLY or name.endswith(".log") for name in added):
        return False
    if held.created:
        shutil.rmtree(directory)                # the lock is still held: see hold() for whoever opened it meanwhile
    else:
        for name in added:
            path = directory / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    release(directory)
    return True


def release(directory: Path) -> None:
    held = _held.pop(Path(directory).resolve(), None)
    if held is not None:
        os.close(held.fd)


def release_all() -> None:
    """Drop every lock of this process (a command run in-process ends; the process itself may go on)."""
    for key in list(_held):
        release(key)


def _pid_in(fd: int) -> int:
    """The pid of the process holding the flock on fd's file, as Linux's /proc/locks lists it; 0 if unknown."""
    st = os.fstat(fd)
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:                          # "1: FLOCK  ADVISORY  WRITE 25934 fe:00:2146323 0 EOF"
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5] == file_id:
            return int(fields[4])
    return 0
