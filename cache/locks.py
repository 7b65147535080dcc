"""Store-wide lock with fcntl.flock: the kernel releases it if the holder dies, even by kill -9."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from core.errors import LockHeld


class StoreLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def held(self) -> dict | None:
        """Who holds the lock right now ({} when unknown), or None when it is free. Takes nothing and writes
        nothing, so it works on a read-only store."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no lock file (never run), or not a file: nobody can be holding it
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.holder() or {}
        finally:
            os.close(fd)  # closing releases a shared lock taken here
        return None

    def acquire(self, what: str, wait: bool = True, on_wait: Callable[[dict | None], None] | None = None) -> None:
        """Take the lock; if another process holds it, call on_wait(holder) once and block (or raise)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            if not wait:
                os.close(fd)
                raise lock_held(self.path, holder) from None
            if on_wait:
                on_wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(
            fd, json.dumps({"pid": os.getpid(), "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        )
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(holder: dict | None) -> str:
    """`pid 123 (pipeline run lora, since 2026-11-23 12:00:00)`, or `another process` when the lock file is empty."""
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} ({holder.get('what')}, since {holder.get('since')})"


def lock_held(path: Path, holder: dict | None) -> LockHeld:
    err = LockHeld(f"the store lock {path} is held by {describe_holder(holder)}; wait for it to finish")
    err.holder = holder
    return err
