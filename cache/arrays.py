"""Pools of per-item zarr arrays with a commit log.

A pool holds one array per item (a latent per image digest, an embedding per caption string), so items
are shared between stage keys: adding 3 images to a data set encodes 3 latents. An array counts as
present only once its line is in the pool's commit log, appended (and fsynced) after the array is fully
written; an array written by a process killed before that line is never read, and is overwritten by the
next run. Every read checks the array against the digest in the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import CorruptArray
from core.faults import fault_point

if TYPE_CHECKING:
    import numpy as np


def array_digest(arr: np.ndarray) -> str:
    import numpy as np

    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}|{arr.shape}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


class ArrayPool:
    def __init__(self, root: Path):
        self.root = root
        self.arrays_dir = root / "arrays.zarr"
        self.log_path = root / "committed.jsonl"
        self._group = None
        self._committed: dict[str, dict] | None = None

    def _open(self):
        if self._group is None:
            import zarr

            self.root.mkdir(parents=True, exist_ok=True)
            self._group = zarr.open_group(str(self.arrays_dir), mode="a")
        return self._group

    def committed(self) -> dict[str, dict]:
        if self._committed is None:
            entries: dict[str, dict] = {}
            if self.log_path.exists():
                for line in self.log_path.read_text().splitlines():
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line torn by a kill: its array is simply not committed
                    entries[entry["name"]] = entry
            self._committed = entries
        return self._committed

    def has(self, name: str) -> bool:
        return name in self.committed()

    def put(self, name: str, arr: np.ndarray, chunks: tuple[int, ...] | None = None) -> dict:
        """Write one array, then commit it to the log. Returns its log entry."""
        import numpy as np

        group = self._open()
        arr = np.ascontiguousarray(arr)
        z = group.create_array(name=name, shape=arr.shape, dtype=arr.dtype, chunks=chunks or arr.shape, overwrite=True)
        z[...] = arr
        fault_point("pool.put", len(self.committed()) + 1)  # killed here: written, never committed
        entry = {"name": name, "digest": array_digest(arr), "shape": list(arr.shape), "dtype": arr.dtype.str}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.committed()[name] = entry
        return entry

    def get(self, name: str, digest: str | None = None) -> np.ndarray:
        """Read a committed array. A damaged one is dropped from the pool, so the next run re-makes it."""
        entry = self.committed().get(name)
        if entry is None:
            raise CorruptArray(
                f"array {name} is not committed in {self.root}; run the same command again to re-make it"
            )
        import numpy as np

        try:
            arr = np.asarray(self._open()[name][...])
            ok = array_digest(arr) == (digest or entry["digest"])
        except Exception:  # a missing or garbled chunk: zarr and its codecs raise many types
            ok = False
        if not ok:
            self.remove({name})
            raise CorruptArray(
                f"{self.arrays_dir / name} was damaged (missing or not matching its digest) and has been dropped "
                f"from the store; run the same command again to re-make it."
            )
        return arr

    def remove(self, names: set[str]) -> int:
        """Delete arrays (committed or not) and rewrite the log without them. Returns bytes freed."""
        freed = 0
        for name in names:
            path = self.arrays_dir / name
            if path.exists():
                freed += dir_size(path)
                shutil.rmtree(path)
        keep = [e for n, e in self.committed().items() if n not in names]
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in keep))
        os.replace(tmp, self.log_path)
        self._committed = {e["name"]: e for e in keep}
        return freed

    def all_names(self) -> set[str]:
        if not self.arrays_dir.exists():
            return set()
        return {p.name for p in self.arrays_dir.iterdir() if p.is_dir()}


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
