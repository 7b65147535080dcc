"""Pools of per-item arrays, stored many to a zarr chunk, with a commit log.

A pool holds one row per item (a latent per image digest, an embedding per caption string), so items are shared
between stage keys: adding 3 images to a data set encodes 3 latents. Items of one shape and dtype are rows of one
zarr array (`arrays.zarr/rows/<dtype>_<shape>`, chunked along the rows, one file per chunk), and the commit log
names each item's array and row. 100k latents are ~100k/8 chunk files, not the ~230k files and ~450k folders of an
array per item.

Crash safety rests on two rules. A row counts as present only once its line is in the commit log, appended after
the row's chunk is fully written; a row written by a process killed before that line is never read. And a chunk
that holds a committed row is never written again: every batch of puts starts a fresh chunk, so a kill during a
write can only tear rows that nobody trusts. Every read checks the row against the digest in the log; a damaged
chunk drops every row of it that fails, so one re-run re-makes them all.

Pools written before chunking hold one zarr array per item (`arrays.zarr/<name>`, log lines without "at"); they
are read, verified and collected as before.

Several processes of one run (core/dist.py) write one pool side by side: each names itself a writer (`r1`), appends
its rows to arrays of its own (`f2_4x8x8-r1`) and its lines to a log of its own (`committed.r1.jsonl`), so no two
processes ever pick the same row or interleave a line. Readers merge every log; rank 0 folds the writers' logs into
`committed.jsonl` once every rank finished (merge_writers), and a killed writer's committed rows stay committed.
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

ROWS = "rows"  # the zarr group of chunked arrays, beside the per-item arrays of older pools
MAX_ROWS = 2**40  # an array's declared length: only written chunks exist on disk
MAX_CHUNK_ROWS = 64


def array_digest(arr: np.ndarray) -> str:
    import numpy as np

    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}|{arr.shape}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def group_name(arr: np.ndarray) -> str:
    """The chunked array an item goes to: its dtype and shape, e.g. f4_4x8x8."""
    kind = arr.dtype.str.replace("<", "").replace("|", "").replace(">", "be").replace("=", "")
    return f"{kind}_{'x'.join(str(n) for n in arr.shape) or 'scalar'}"


def _racing_writers(make, tries: int = 5):
    """Open-or-create a zarr group that another process may be creating at the same moment: its creation then
    fails on what the other made, and the next try opens that."""
    import zarr.errors

    for attempt in range(tries):
        try:
            return make()
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
            if attempt == tries - 1:
                raise


class ArrayPool:
    def __init__(self, root: Path, writer: str = ""):
        self.root, self.writer = root, writer
        self.arrays_dir = root / "arrays.zarr"
        self.main_log = root / "committed.jsonl"
        self.log_path = self.main_log if not writer else root / f"committed.{writer}.jsonl"  # where puts append
        self._group = None
        self._arrays: dict[str, object] = {}
        self._committed: dict[str, dict] | None = None
        self._log_state: dict[Path, tuple[int, int]] = {}  # per log: (inode, bytes read) behind _committed
        self._last_row: dict[str, int] = {}  # chunked array -> its highest committed row

    def logs(self) -> list[Path]:
        """The main commit log and the logs of a multi-process run's writers, those that exist."""
        writers = sorted(self.root.glob("committed.*.jsonl")) if self.root.is_dir() else []
        return ([self.main_log] if self.main_log.exists() else []) + writers

    def merge_writers(self) -> None:
        """Fold the writers' logs into the main one (rank 0, after every writer finished)."""
        if any(p != self.main_log for p in self.logs()):
            self.remove(set())

    def _open(self):
        if self._group is None:
            import zarr

            self.root.mkdir(parents=True, exist_ok=True)
            self._group = _racing_writers(lambda: zarr.open_group(str(self.arrays_dir), mode="a"))
        return self._group

    # -- the commit log --------------------------------------------------------------------------------
    def committed(self) -> dict[str, dict]:
        """name -> log entry of every committed item, from every log. Re-reads what another writer (a second
        ArrayPool of the same folder, another process's log) appended since, so a row is never allocated twice."""
        stats = {}
        for path in self.logs():
            try:
                stats[path] = os.stat(path)
            except FileNotFoundError:
                continue
        replaced = any(p not in stats or stats[p].st_ino != ino for p, (ino, _) in self._log_state.items())
        if self._committed is None or replaced:
            self._committed, self._log_state, self._last_row = {}, {}, {}
        for path, st in stats.items():
            ino, read = self._log_state.get(path, (st.st_ino, 0))
            if st.st_size <= read:
                self._log_state[path] = (ino, read)
                continue
            with open(path, "rb") as f:
                f.seek(read)
                tail = f.read()
            end = tail.rfind(b"\n") + 1  # a line still being written is read next time
            for line in tail[:end].decode().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill: its row is simply not committed
                self._committed[entry["name"]] = entry
                if entry.get("at"):
                    gname, row = entry["at"]
                    self._last_row[gname] = max(row, self._last_row.get(gname, -1))
            self._log_state[path] = (ino, read + end)
        return self._committed

    def has(self, name: str) -> bool:
        return name in self.committed()

    # -- writing -----------------------------------------------------------------------------------------
    def put(self, name: str, arr: np.ndarray) -> dict:
        """Write one item, then commit it. Returns its log entry."""
        return self.put_many([(name, arr)])[0]

    def put_many(self, items: list[tuple[str, np.ndarray]], chunk_rows: int | None = None) -> list[dict]:
        """Write a batch of items as rows of fresh chunks (chunk_rows per chunk for an array created here; the
        batch size by default), then commit them one log line each. Returns their log entries, in order."""
        import numpy as np

        by_group: dict[str, list[int]] = {}
        arrays = [np.ascontiguousarray(a) for _, a in items]
        suffix = f"-{self.writer}" if self.writer else ""  # a writer's rows go to arrays of its own
        for i, arr in enumerate(arrays):
            by_group.setdefault(group_name(arr) + suffix, []).append(i)
        entries: list[dict | None] = [None] * len(items)
        for gname, idx in by_group.items():
            rows = np.stack([arrays[i] for i in idx])
            z = self._array(gname, rows.shape[1:], rows.dtype, chunk_rows or len(idx))
            start = self._free_row(gname, z.chunks[0])
            z[start : start + len(idx)] = rows
            self._end_torn_line()
            done = len(self.committed())
            with open(self.log_path, "a") as f:
                for n, i in enumerate(idx):
                    fault_point("pool.put", done + n + 1)  # killed here: written, never committed
                    arr = arrays[i]
                    entry = {
                        "name": items[i][0],
                        "digest": array_digest(arr),
                        "shape": list(arr.shape),
                        "dtype": arr.dtype.str,
                        "at": [gname, start + n],
                    }
                    f.write(json.dumps(entry) + "\n")
                    f.flush()  # in the kernel: a kill after this line keeps the row committed
                    entries[i] = entry
                os.fsync(f.fileno())
            self.committed()  # reads the batch's lines back: one stat and one read per batch, not per row
        return entries

    def _end_torn_line(self) -> None:
        """A line torn by a kill gets its newline, so the next entry is not glued to it (and lost with it)."""
        try:
            with open(self.log_path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        except (FileNotFoundError, OSError):
            pass  # no log yet, or an empty one

    def _array(self, gname: str, shape: tuple[int, ...], dtype, chunk_rows: int):
        if gname not in self._arrays:
            group = _racing_writers(lambda: self._open().require_group(ROWS))
            if gname in group:
                self._arrays[gname] = group[gname]
            else:
                rows = max(1, min(chunk_rows, MAX_CHUNK_ROWS))
                self._arrays[gname] = group.create_array(
                    name=gname,
                    shape=(MAX_ROWS, *shape),
                    dtype=dtype,
                    chunks=(rows, *shape),
                    chunk_key_encoding={"name": "default", "separator": "."},  # c.<i>.0.0: files, no folders
                    fill_value=0,
                )
        return self._arrays[gname]

    def _free_row(self, gname: str, chunk_rows: int) -> int:
        """The first row of the chunk after the last one holding a committed row of this array (a chunk left by a
        killed write holds no committed row and is overwritten)."""
        self.committed()
        last = self._last_row.get(gname)
        return 0 if last is None else (last // chunk_rows + 1) * chunk_rows

    # -- reading -----------------------------------------------------------------------------------------
    def get(self, name: str, digest: str | None = None) -> np.ndarray:
        """Read a committed item. A damaged one is dropped from the pool (with every damaged row of its chunk), so
        the next run re-makes it."""
        return self.get_many([name], None if digest is None else [digest])[name]

    def get_many(self, names, digests=None) -> dict[str, np.ndarray]:
        """Read committed items, each chunk once (the rows of one batch share a chunk). digests, when given, are
        the ones the caller's manifest recorded, checked instead of the log's."""
        import numpy as np

        names = list(names)
        want = dict(zip(names, digests, strict=True)) if digests is not None else {}
        committed = self.committed()
        missing = [n for n in names if n not in committed]
        if missing:
            raise CorruptArray(
                f"array {missing[0]} is not committed in {self.root}; run the same command again to re-make it"
            )
        out: dict[str, np.ndarray] = {}
        chunks: dict[tuple[str, int], list[str]] = {}
        for name in names:
            at = committed[name].get("at")
            if at is None:
                out[name] = self._get_legacy(name, want.get(name))
            else:
                z = self._array_for_read(at[0])
                chunks.setdefault((at[0], at[1] // z.chunks[0]), []).append(name)
        for (gname, c), members in chunks.items():
            z = self._array_for_read(gname)
            rows = z.chunks[0]
            try:
                block = np.asarray(z[c * rows : (c + 1) * rows])
            except Exception:  # a missing or garbled chunk: zarr and its codecs raise many types
                block = None
            bad = []
            for name in members:
                row = None if block is None else block[committed[name]["at"][1] - c * rows]
                if row is None or array_digest(row) != want.get(name, committed[name]["digest"]):
                    bad.append(name)
                else:
                    out[name] = row
            if bad:
                self._drop_damaged(gname, c, block, bad)
        return {n: out[n] for n in names}

    def _array_for_read(self, gname: str):
        if gname not in self._arrays:
            try:
                self._arrays[gname] = self._open()[ROWS][gname]
            except Exception:
                raise CorruptArray(
                    f"{self.arrays_dir / ROWS / gname} is missing; run the same command again to re-make its items"
                ) from None
        return self._arrays[gname]

    def chunk_file(self, gname: str, chunk: int) -> Path:
        z = self._array_for_read(gname)
        return self.arrays_dir / ROWS / gname / ".".join(["c", str(chunk), *["0"] * (len(z.shape) - 1)])

    def location(self, name: str) -> Path:
        """Where an item's bytes are: its chunk file, or its own array of an older pool."""
        at = self.committed()[name].get("at")
        if at is None:
            return self.arrays_dir / name
        return self.chunk_file(at[0], at[1] // self._array_for_read(at[0]).chunks[0])

    def _drop_damaged(self, gname: str, chunk: int, block, bad: list[str]) -> None:
        """Uncommit every row of the chunk that fails its digest (not only the ones asked for), then raise."""
        rows = self._array_for_read(gname).chunks[0]
        damaged = set(bad)
        for name, e in self.committed().items():
            at = e.get("at")
            if at and at[0] == gname and at[1] // rows == chunk:
                if block is None or array_digest(block[at[1] - chunk * rows]) != e["digest"]:
                    damaged.add(name)
        path = self.chunk_file(gname, chunk)
        self.remove(damaged)
        raise CorruptArray(
            f"{path} was damaged (missing or not matching its digest): {len(damaged)} item(s) in it have been dropped "
            f"from the store; run the same command again to re-make them."
        )

    def _get_legacy(self, name: str, digest: str | None):
        import numpy as np

        try:
            arr = np.asarray(self._open()[name][...])
            ok = array_digest(arr) == (digest or self.committed()[name]["digest"])
        except Exception:
            ok = False
        if not ok:
            self.remove({name})
            raise CorruptArray(
                f"{self.arrays_dir / name} was damaged (missing or not matching its digest) and has been dropped "
                f"from the store; run the same command again to re-make it."
            )
        return arr

    # -- removing ----------------------------------------------------------------------------------------
    def remove(self, names: set[str]) -> int:
        """Uncommit items, delete the per-item arrays of older pools and every chunk file that no committed row
        needs any more (including chunks a killed write left). Returns bytes freed."""
        freed = 0
        for name in names:
            path = self.arrays_dir / name
            if name != ROWS and path.exists():
                freed += dir_size(path)
                shutil.rmtree(path)
        keep = [e for n, e in self.committed().items() if n not in names]
        writers = [p for p in self.logs() if p != self.main_log]
        tmp = self.main_log.with_suffix(".tmp")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(e) + "\n" for e in keep))
        os.replace(tmp, self.main_log)
        for path in writers:  # their lines are in the main log now
            path.unlink(missing_ok=True)
        self._committed, self._log_state, self._last_row = None, {}, {}
        for path in self.dead_chunks():
            freed += path.stat().st_size
            path.unlink()
        return freed

    def dead_chunks(self, also_dead: set[str] = frozenset()) -> list[Path]:
        """Chunk files that hold no committed row (or only rows named in also_dead)."""
        rows_dir = self.arrays_dir / ROWS
        if not rows_dir.is_dir():
            return []
        live: set[tuple[str, int]] = set()
        for name, e in self.committed().items():
            at = e.get("at")
            if at and name not in also_dead:
                live.add((at[0], at[1] // self._array_for_read(at[0]).chunks[0]))
        dead = []
        for gdir in sorted(p for p in rows_dir.iterdir() if p.is_dir()):
            for f in sorted(gdir.glob("c.*")):
                if (gdir.name, int(f.name.split(".")[1])) not in live:
                    dead.append(f)
        return dead

    def all_names(self) -> set[str]:
        """Every item the pool holds bytes of: committed rows, and the per-item arrays of an older pool."""
        names = {n for n, e in self.committed().items() if e.get("at")}
        if self.arrays_dir.exists():
            names |= {p.name for p in self.arrays_dir.iterdir() if p.is_dir() and p.name != ROWS}
        return names

    def stored_bytes(self, names) -> int:
        """Bytes on disk of these items: an older pool's array each, and for chunked rows their share of their
        chunk files (a chunk's size split evenly between its committed rows)."""
        counts: dict[Path, int] = {}
        for name, e in self.committed().items():
            if e.get("at"):
                path = self.location(name)
                counts[path] = counts.get(path, 0) + 1
        total = 0.0
        for name in names:
            path = self.location(name)
            if name in self.committed() and self.committed()[name].get("at"):
                total += path.stat().st_size / counts[path] if path.exists() else 0
            elif path.exists():
                total += dir_size(path)
        return round(total)

    def bytes_of(self, names: set[str]) -> int:
        """What removing these items would free: their per-item arrays and the chunks left without live rows."""
        legacy = sum(dir_size(self.arrays_dir / n) for n in names if (self.arrays_dir / n).is_dir() and n != ROWS)
        return legacy + sum(p.stat().st_size for p in self.dead_chunks(names))


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
