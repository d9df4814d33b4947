"""One service per workspace: the lock file ``<workspace>/run/service.lock``.

A service takes the lock (`WorkspaceLock.acquire`) before it opens anything slow and holds it
until it exits; a second service on the same workspace gets `WorkspaceInUse`, whose message
names the running service's pid and endpoints. The lock is the operating system's (``flock``
on POSIX, ``msvcrt.locking`` on Windows), so it goes with the process: a service killed
with SIGKILL or a power cut leaves no lock behind, only the file.

The file holds ``{"pid": ..., "started_utc": ...}`` while its holder runs and is emptied when
the holder stops cleanly. It is never removed: a process that opened the old file just before
it disappeared would lock a file nobody else can see, and two services would run. A file that
still names a process when its lock is free was left by a service that died; the next service
takes it over and says so in a warning. The endpoints themselves are in
``run/endpoints.json`` (written by the service once it has bound them, with its pid).

Clients ask `service_status` whether the service ``run/endpoints.json`` names is running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from focaltrack.daemon.transport import ServiceError

log = logging.getLogger("focaltrack.service")

__all__ = [
    "ENDPOINTS_FILE",
    "LOCK_FILE",
    "RunningService",
    "WorkspaceInUse",
    "WorkspaceLock",
    "read_endpoints",
    "service_status",
]

LOCK_FILE = "service.lock"
ENDPOINTS_FILE = "endpoints.json"
#: Windows locks byte ranges, and a locked range cannot be read by others: lock one byte far
#: past the JSON text instead of the text itself.
_WIN_LOCK_OFFSET = 1 << 30
#: A client checking the lock holds it shared for microseconds; a starting service that
#: meets such a check tries again for this long before it calls the workspace busy.
_RETRY_S = 1.0
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


class WorkspaceInUse(ServiceError):
    """Another service holds the workspace (the message names its pid and endpoints)."""


@dataclass(frozen=True, slots=True)
class RunningService:
    """What ``run/`` says about the service of a workspace."""

    pid: int | None
    endpoints: dict[str, str]
    running: bool

    def describe(self) -> str:
        pid = "an unknown pid" if self.pid is None else f"pid {self.pid}"
        if not self.endpoints:
            return f"{pid}, still starting (no endpoints yet)"
        eps = ", ".join(f"{k} {v}" for k, v in sorted(self.endpoints.items()))
        return f"{pid}; {eps}"


def run_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / "run"


def read_endpoints(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``run/endpoints.json`` of the workspace at ``root`` (None: absent or unreadable)."""
    try:
        data = json.loads((run_dir(root) / ENDPOINTS_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _endpoints_of(root: Path, pid: int | None) -> dict[str, str]:
    """The endpoints ``run/endpoints.json`` gives for ``pid`` (a file another pid wrote is a
    dead service's, and says nothing about this one)."""
    data = read_endpoints(root)
    if data is None or (pid is not None and data.get("pid") != pid):
        return {}
    return {k: v for k, v in data.items() if k in ("control", "pub", "metrics")}


def _holder(text: str) -> int | None:
    """The pid a lock file's text names, or None."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    pid = data.get("pid") if isinstance(data, dict) else None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


def _try_lock(fd: int, *, shared: bool = False) -> bool:
    """Lock ``fd`` without waiting; False when another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def _read_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


class WorkspaceLock:
    """The lock of one workspace, held from `acquire` until `release` (or the process ends)."""

    def __init__(self, root: Path, fd: int) -> None:
        self.root = root
        self.path = run_dir(root) / LOCK_FILE
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, root: str | os.PathLike[str], *, started_utc: str) -> WorkspaceLock:
        """Take the workspace's lock and write this process into it. Raises `WorkspaceInUse`
        when another service holds it, `ServiceError` when the file cannot be made."""
        root = Path(root)
        path = run_dir(root) / LOCK_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_BINARY, 0o644)
        except OSError as e:
            raise ServiceError(f"cannot create the workspace lock {path}: {e}") from e
        try:
            deadline = time.monotonic() + _RETRY_S
            while not _try_lock(fd):
                if time.monotonic() > deadline:
                    holder = _holder(_read_text(fd))
                    running = RunningService(holder, _endpoints_of(root, holder), True)
                    raise WorkspaceInUse(
                        f"workspace {root} is in use by another focaltrack service "
                        f"({running.describe()})"
                    )
                time.sleep(0.02)
            previous = _read_text(fd)
            if previous.strip():
                pid = _holder(previous)
                who = "a process" if pid is None else f"pid {pid}"
                log.warning(
                    "workspace %s: taking over the lock %s left by %s, which did not stop "
                    "cleanly (its recordings may be incomplete)",
                    root,
                    path,
                    who,
                )
            text = json.dumps({"pid": os.getpid(), "started_utc": started_utc})
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, text.encode("utf-8") + b"\n")
        except BaseException:
            os.close(fd)
            raise
        return cls(root, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the file (a clean stop: nothing to take over) and let the lock go."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            with contextlib.suppress(OSError):
                _unlock(fd)
        finally:
            os.close(fd)


def service_status(root: str | os.PathLike[str]) -> RunningService | None:
    """The service ``<root>/run/endpoints.json`` names, and whether it is still running
    (its lock is held; without a lock file, whether its pid is alive). None: no file."""
    root = Path(root)
    data = read_endpoints(root)
    if data is None:
        return None
    pid = data.get("pid") if isinstance(data.get("pid"), int) else None
    endpoints = {k: v for k, v in data.items() if k in ("control", "pub", "metrics")}
    return RunningService(pid, endpoints, _is_running(root, pid))


def _is_running(root: Path, pid: int | None) -> bool:
    # msvcrt locks need a writable descriptor; flock does not.
    mode = os.O_RDWR if sys.platform == "win32" else os.O_RDONLY
    try:
        fd = os.open(run_dir(root) / LOCK_FILE, mode | _O_BINARY)
    except FileNotFoundError:
        return pid is not None and _pid_alive(pid)
    except OSError:  # not ours to open (another user's workspace): let the connect tell
        return True
    try:
        if _try_lock(fd, shared=True):
            _unlock(fd)
            return False
        return True
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":
        return True  # os.kill(pid, 0) would end the process there; the connect tells
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
