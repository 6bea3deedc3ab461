"""What the cluster tests share: running a README command as a user's shell would, the TCP sockets an engine's
processes listen on, and stopping exactly the processes an engine started (found by a variable of their
environment that only this test run sets, e.g. RAY_TMPDIR=<its temporary directory>)."""
from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)          # `python` and `ray` in the README are this venv's


def shell(command: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run one README command line in bash from the repository root, as a user with the venv active would."""
    env = dict(env, PATH=f"{VENV_BIN}:{env.get('PATH', os.defpath)}")
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def processes_with(marker: str) -> list[int]:
    """Pids of the processes whose environment holds the entry `marker` ("NAME=value"), this one excluded."""
    want, pids = marker.encode(), []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if want in (p / "environ").read_bytes().split(b"\0"):
                pids.append(int(p.name))
        except OSError:                                  # gone, or a zombie
            continue
    return pids


def stop_processes(marker: str, grace: float = 15.0) -> list[int]:
    """SIGTERM to every process carrying `marker`, SIGKILL to those still there after `grace` s; returns them."""
    pids = processes_with(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and (pids := [p for p in pids if _alive(p)]):
            time.sleep(0.2)
        if not pids:
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def listening(marker: str) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, command) of every TCP socket listening in a process whose environment holds marker."""
    sockets = {}                                          # inode -> (address, port) of LISTEN sockets
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":                           # TCP_LISTEN
                addr, port = cols[1].split(":")
                sockets[cols[9]] = (_address(addr), int(port, 16))
    found = []
    for pid in processes_with(marker):
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for fd in fds:
            try:
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
            except OSError:
                continue
            if m and m.group(1) in sockets:
                found.append((*sockets[m.group(1)], pid, command[:100]))
    return found


def not_loopback(sockets) -> list:
    return [s for s in sockets if not _is_loopback(s[0])]


def _address(hex_addr: str) -> str:
    """/proc/net/tcp{,6} addresses: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    return str(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback)
