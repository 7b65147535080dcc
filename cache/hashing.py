"""File digests with a stat memo, so multi-GB model files are hashed once.

The memo maps a file's stat signature to its sha256, the way git's index does: device, inode, size,
mtime and ctime in nanoseconds. A rewrite in place that restores the size and the mtime (`cp -p`,
`rsync -t`, batch editors) still moves the ctime, which no user call can set back.

Racy timestamps: a file changed again within the filesystem's timestamp tick after it was hashed keeps
its signature. So a digest is memoized only when the file's mtime and ctime are older than the moment of
hashing by more than RACY_SECONDS; a fresher file is hashed again next time (git's racy-clean rule).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

_CHUNK = 8 * 1024 * 1024
RACY_SECONDS = 2.0  # coarser than any timestamp tick of the filesystems people train on (FAT: 2 s)
MEMO_VERSION = 2


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def stat_signature(st: os.stat_result) -> str:
    return f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


class StatMemo:
    """A JSON file of {resolved path: [stat signature, sha256]}, loaded lazily and written back atomically."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, list[str]] | None = None
        self._dirty = False
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[str]]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _read(self) -> dict[str, list[str]]:
        # A missing, torn or foreign memo only costs re-hashing; it never yields a wrong digest. It is rebuilt.
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or doc.get("version") != MEMO_VERSION or not isinstance(doc.get("files"), dict):
            return {}
        return {
            k: v
            for k, v in doc["files"].items()
            if isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
        }

    def digest(self, path: Path) -> str:
        name = str(Path(path).resolve())
        sig = stat_signature(os.stat(name))
        with self._lock:
            entry = self._load().get(name)
            if entry is not None and entry[0] == sig:
                return entry[1]
        started = time.time_ns()
        digest = sha256_file(Path(name))
        after = os.stat(name)
        newest = max(after.st_mtime_ns, after.st_ctime_ns)
        if stat_signature(after) == sig and started - newest > RACY_SECONDS * 1e9:
            with self._lock:
                self._load()[name] = [sig, digest]
                self._dirty = True
        return digest

    def forget(self, path: Path) -> None:
        """Drop a file's entry (its memoized digest was found wrong): it is hashed again next time."""
        with self._lock:
            if self._load().pop(str(Path(path).resolve()), None) is not None:
                self._dirty = True

    def save(self) -> None:
        """Write the memo back. A store that cannot be written (read-only, full) keeps working without it."""
        if not self._dirty or self._entries is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": MEMO_VERSION, "files": self._entries}))
            os.replace(tmp, self.path)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EISDIR, errno.ENOTDIR):
                raise
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            print(
                f"note: the stat memo {self.path} was not saved ({e.strerror}); files are hashed again next time.",
                file=sys.stderr,
            )
        self._dirty = False
