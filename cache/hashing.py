"""File digests with a stat memo, so multi-GB model files are hashed once.

The memo maps (path, inode, size, mtime_ns) to the file's sha256. Any change to the file changes at
least one of these (an in-place rewrite changes mtime_ns), so a memo hit is safe to trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class StatMemo:
    """A JSON file of stat signature -> sha256, loaded lazily and written back atomically."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, str] | None = None
        self._dirty = False
        self._lock = threading.Lock()

    def _load(self) -> dict[str, str]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                # A missing or torn memo only costs re-hashing; it never yields a wrong digest.
                self._entries = {}
        return self._entries

    @staticmethod
    def _signature(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"

    def digest(self, path: Path) -> str:
        sig = self._signature(path)
        with self._lock:
            entries = self._load()
            if sig in entries:
                return entries[sig]
        digest = sha256_file(path)
        with self._lock:
            entries[sig] = digest
            self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty or self._entries is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self._entries))
        os.replace(tmp, self.path)
        self._dirty = False
