"""The store: objects, atomic manifests, pools with a commit log, locks, the stat memo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cache.arrays import array_digest
from cache.hashing import StatMemo, sha256_file
from cache.store import Manifest, Store
from core.errors import CorruptArray, LockHeld


def test_put_object_is_content_addressed_and_deduplicated(tmp_path):
    store = Store(tmp_path / "s")
    for i in range(2):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"same bytes")
        obj = store.put_object(f)
        assert not f.exists()
    assert store.object_path(obj["digest"]).read_bytes() == b"same bytes"
    assert len(list((tmp_path / "s" / "objects").rglob("*"))) == 2  # one folder, one file


def test_commit_refuses_a_manifest_whose_objects_are_missing(tmp_path):
    store = Store(tmp_path)
    m = Manifest("lora1", "k" * 64, {}, outputs={"lora.safetensors": {"digest": "0" * 64, "size": 1}})
    with pytest.raises(RuntimeError, match="not in the object store"):
        store.commit(m)
    assert store.load_manifest("lora1", "k" * 64) is None


def test_commit_clears_the_work_folder(tmp_path):
    store = Store(tmp_path)
    (store.work_dir("latents", "k") / "progress").write_text("x")
    store.commit(Manifest("latents", "k", {"a": 1}))
    assert not store.has_work("latents", "k") and store.load_manifest("latents", "k").preimage == {"a": 1}


def test_pool_reads_only_committed_arrays_and_checks_digests(tmp_path):
    store = Store(tmp_path)
    pool = store.pool("latents/cfg")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    pool.put("a", a)
    with open(pool.log_path, "a") as f:
        f.write('{"name": "b", "dig')  # a line torn by a kill
    fresh = store.pool("latents/cfg")
    assert fresh.has("a") and not fresh.has("b")
    np.testing.assert_array_equal(fresh.get("a"), a)
    with pytest.raises(CorruptArray, match="not committed"):
        fresh.get("b")
    with pytest.raises(CorruptArray, match="was damaged .* run the same command again"):
        fresh.get("a", digest=array_digest(a + 1))
    assert not store.pool("latents/cfg").has("a"), "a damaged array is dropped, so the next run re-makes it"


def _aged(path, seconds: float = 10.0) -> None:
    """Set mtime back, and let the ctime age too, so the file is past the racy window when it is hashed."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_stat_memo_hashes_once(tmp_path, monkeypatch):
    import cache.hashing as hashing

    f = tmp_path / "weights.bin"
    f.write_bytes(b"v1")
    monkeypatch.setattr(hashing, "RACY_SECONDS", -1e9)  # any file counts as old enough to memoize
    memo = StatMemo(tmp_path / "memo.json")
    assert memo.digest(f) == sha256_file(f)
    memo.save()
    memo2 = StatMemo(tmp_path / "memo.json")
    entry = memo2._load()[str(f.resolve())]
    entry[1] = "memoized"  # proves the second lookup is served from the memo
    assert memo2.digest(f) == "memoized"


def test_stat_memo_sees_a_same_size_rewrite_with_the_mtime_restored(tmp_path, monkeypatch):
    """What `cp -p` / `rsync -t` do: new bytes, same size, old mtime. The ctime still moves."""
    import cache.hashing as hashing

    monkeypatch.setattr(hashing, "RACY_SECONDS", -1e9)
    f = tmp_path / "001.png"
    f.write_bytes(b"old pixels")
    _aged(f)
    memo = StatMemo(tmp_path / "memo.json")
    assert memo.digest(f) == sha256_file(f)
    st = f.stat()
    time.sleep(0.02)  # beyond the kernel's coarse timestamp tick, so the ctime can differ
    f.write_bytes(b"new pixels")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert memo.digest(f) == sha256_file(f) != "old"


def test_stat_memo_racy_rule_re_hashes_a_file_changed_within_the_tick(tmp_path):
    """A file changed just before it was hashed may change again with the same stat: it is not memoized."""
    f = tmp_path / "caption.txt"
    f.write_bytes(b"a cat")
    memo = StatMemo(tmp_path / "memo.json")
    memo.digest(f)
    assert str(f.resolve()) not in memo._load(), "a file younger than RACY_SECONDS must not be memoized"
    _aged(f)
    # the ctime is still fresh (utime sets it to now): still racy
    memo.digest(f)
    assert str(f.resolve()) not in memo._load()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 2, "files": {"x": 3}}', '"text"', ""])
def test_a_damaged_stat_memo_is_rebuilt(tmp_path, content):
    (tmp_path / "memo.json").write_text(content)
    f = tmp_path / "a.bin"
    f.write_bytes(b"data")
    memo = StatMemo(tmp_path / "memo.json")
    assert memo.digest(f) == sha256_file(f)
    memo._dirty = True
    memo.save()
    assert json.loads((tmp_path / "memo.json").read_text())["version"] == 2


def test_second_locker_is_told_who_holds_the_lock_and_a_killed_holder_releases_it(tmp_path):
    store = Store(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]); from cache.store import Store; "
            "s = Store(sys.argv[2]); s.lock.acquire('pipeline run lora'); print('held', flush=True); sys.stdin.read()",
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            str(tmp_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld, match=f"pid {holder.pid} \\(pipeline run lora"):
        store.lock.acquire("pipeline gc", wait=False)
    holder.kill()
    holder.wait()
    store.lock.acquire("pipeline gc", wait=False)  # the kernel released the dead holder's flock
    assert json.loads((tmp_path / "lock").read_text())["what"] == "pipeline gc"
    store.lock.release()


def test_gc_keeps_pool_arrays_that_a_ref_reaches(tmp_path):
    store = Store(tmp_path)
    pool = store.pool("latents/cfg")
    for name in ("a", "b", "c"):
        pool.put(name, np.zeros(2, dtype=np.float32))
    store.commit(Manifest("latents", "k1", {}, pools={"latents/cfg": ["a", "b"]}))
    store.write_ref("lora", {"latents": "k1"})
    report = store.gc()
    assert [r["kind"] for r in report["removed"]] == ["arrays"]
    assert store.pool("latents/cfg").all_names() == {"a", "b"}
    assert set(store.pool("latents/cfg").committed()) == {"a", "b"}


def test_gc_while_a_run_holds_the_store_says_who_and_removes_nothing(project):
    from typer.testing import CliRunner

    from cli import app

    project.run_json()
    store = Store(project.store)
    store.lock.acquire("pipeline run lora")
    try:
        result = CliRunner().invoke(app, ["gc", "-c", str(project.config)])
    finally:
        store.lock.release()
    assert result.exit_code == 1
    assert f"held by pid {os.getpid()} (pipeline run lora" in result.output and "Traceback" not in result.output
    assert project.manifests("lora1")


def test_pool_items_are_rows_of_chunks_one_file_per_batch(tmp_path):
    """100 latents in batches of 8 are 13 chunk files in one folder, not an array (and 4 folders) per item; disk use
    stays near the latent bytes."""
    from cache.arrays import ROWS, dir_size

    pool = Store(tmp_path).pool("latents/cfg")
    rng = np.random.default_rng(0)
    arrays = {f"img{i:03d}": rng.standard_normal((4, 8, 8)).astype(np.float32) for i in range(100)}
    names = sorted(arrays)
    for start in range(0, 100, 8):
        pool.put_many([(n, arrays[n]) for n in names[start : start + 8]], 8)
    files = [p for p in pool.arrays_dir.rglob("*") if p.is_file()]
    folders = [p for p in pool.arrays_dir.rglob("*") if p.is_dir()]
    assert len([f for f in files if f.name.startswith("c.")]) == 13 and len(folders) == 2  # rows/, rows/f4_4x8x8/
    assert dir_size(pool.arrays_dir / ROWS) <= 1.3 * 100 * 4 * 8 * 8 * 4  # random floats barely compress
    fresh = Store(tmp_path).pool("latents/cfg")
    got = fresh.get_many(names)
    assert all(np.array_equal(got[n], arrays[n]) for n in names)
    # a batch never writes into a chunk that holds committed rows: a kill during a write tears no trusted row
    first = pool.location(names[0])
    before = first.read_bytes()
    pool.put_many([("late", arrays[names[0]])], 8)
    assert first.read_bytes() == before and pool.location("late") != first


def test_pool_rows_of_other_shapes_and_of_older_pools(tmp_path):
    """Items of different shapes go to arrays of their own; a pool written before chunking (an array per item,
    log lines without "at") is read, verified and collected as before."""
    import zarr

    pool = Store(tmp_path).pool("text/cfg")
    pool.put_many([("short", np.ones((3, 2), np.float32)), ("long", np.zeros((5, 2), np.float32))])
    assert pool.get("short").shape == (3, 2) and pool.get("long").shape == (5, 2)
    old = Store(tmp_path).pool("latents/old")
    legacy = np.arange(6, dtype=np.float32).reshape(2, 3)
    z = zarr.open_group(str(old.arrays_dir), mode="a").create_array(name="x", shape=(2, 3), dtype="f4", chunks=(2, 3))
    z[...] = legacy
    old.log_path.write_text(json.dumps({"name": "x", "digest": array_digest(legacy), "shape": [2, 3]}) + "\n")
    fresh = Store(tmp_path).pool("latents/old")
    np.testing.assert_array_equal(fresh.get("x"), legacy)
    fresh.put("y", legacy + 1)  # new items of an old pool are chunked
    assert fresh.all_names() == {"x", "y"}
    fresh.remove({"x"})
    assert not (fresh.arrays_dir / "x").exists() and fresh.all_names() == {"y"}


def test_a_damaged_chunk_drops_all_its_bad_rows_and_gc_sweeps_orphan_chunks(tmp_path):
    store = Store(tmp_path)
    pool = store.pool("latents/cfg")
    rows = [(f"i{n}", np.full((2, 2), n, np.float32)) for n in range(4)]
    pool.put_many(rows[:2], 2)
    pool.put_many(rows[2:], 2)
    pool.location("i0").write_bytes(b"garbage")
    with pytest.raises(CorruptArray, match=r"2 item\(s\) in it have been dropped"):
        store.pool("latents/cfg").get("i1")
    assert set(store.pool("latents/cfg").committed()) == {"i2", "i3"}
    assert not (pool.arrays_dir / "rows" / "f4_2x2" / "c.0.0.0").exists()  # no committed row left in it
    # the dropped chunk's file and a chunk written by a killed run (no committed row) are garbage
    store.commit(Manifest("latents", "k1", {}, pools={"latents/cfg": ["i2", "i3"]}))
    store.write_ref("lora", {"latents": "k1"})
    orphan = store.pool("latents/cfg").arrays_dir / "rows" / "f4_2x2" / "c.9.0.0"
    orphan.write_bytes(b"half-written")
    report = store.gc()
    assert [r["kind"] for r in report["removed"]] == ["arrays"] and not orphan.exists()
    assert store.pool("latents/cfg").location("i2").name == "c.1.0.0"
    np.testing.assert_array_equal(store.pool("latents/cfg").get("i3"), rows[3][1])


def test_training_reads_latents_a_batch_at_a_time_prefetching_the_next(tmp_path):
    """lora1's latents stay in the pool: a batch reads its rows (the pool's bytes), and a prefetched batch is the
    same tensor as a direct read."""
    import torch

    from stages.pools import PooledLatents

    pool = Store(tmp_path).pool("latents/cfg")
    rows = {f"i{n}": np.random.default_rng(n).standard_normal((4, 2, 2)).astype(np.float32) for n in range(10)}
    pool.put_many(list(rows.items()), 4)
    entries = [{"array": n, "digest": array_digest(a)} for n, a in rows.items()]
    latents = PooledLatents(Store(tmp_path).pool("latents/cfg"), entries, cache_bytes=2 * 4 * 2 * 2 * 4)
    assert latents.shape == (10, 4, 2, 2) and len(latents) == 10
    assert torch.equal(latents[torch.tensor([3, 7])], torch.from_numpy(np.stack([rows["i3"], rows["i7"]])))
    latents.prefetch([9, 0, 9])
    assert latents._pending is not None
    assert torch.equal(latents[[9, 0, 9]], torch.from_numpy(np.stack([rows["i9"], rows["i0"], rows["i9"]])))
    assert latents._pending is None  # the prefetched read was the one used
    assert len(latents._rows) == 2  # what stays in memory is bounded (here: two rows)
    assert torch.equal(latents[[0, 3, 5]], torch.from_numpy(np.stack([rows["i0"], rows["i3"], rows["i5"]])))


def test_teacher_prior_and_student_read_latents_and_text_a_step_at_a_time(tmp_path):
    """LatentTable and PooledConditioning: what the transfer stages read instead of whole tables. A step's rows come
    in one pass (need), the next step's on a thread (prefetch), memory stays within the budget, and every value is
    the pool's bytes; a text batch equals the same rows of the whole table (Z-Image's unpadded rows included)."""
    from stages.families.base import Conditioning
    from stages.pools import LatentTable, PooledConditioning

    store = Store(tmp_path)
    pool = store.pool("latents/cfg")
    rows = {f"i{n}": np.random.default_rng(n).standard_normal((4, 2, 2)).astype(np.float32) for n in range(10)}
    pool.put_many(list(rows.items()), 4)
    digests = {n: array_digest(a) for n, a in rows.items()}
    table = LatentTable(pool, digests, ["i1", "i2", "i5", "i8"], cache_bytes=2 * rows["i0"].nbytes)
    assert sorted(table) == ["i1", "i2", "i5", "i8"] and "i3" not in table and len(table) == 4
    table.need(["i1", "i2"])
    assert np.array_equal(table["i1"], rows["i1"]) and np.array_equal(table["i2"], rows["i2"])
    table.prefetch(["i5", "i8"])
    assert np.array_equal(table["i8"], rows["i8"]) and np.array_equal(table["i5"], rows["i5"])
    assert table.cache.bytes <= 2 * rows["i0"].nbytes  # bounded: the older rows were let go
    assert np.array_equal(table["i1"], rows["i1"])  # read again after eviction
    with pytest.raises(KeyError):
        table["i3"]

    text = store.pool("text/cfg")
    embeds = {f"s{n}": np.random.default_rng(n).standard_normal((3 + n, 5)).astype(np.float32) for n in range(4)}
    text.put_many(list(embeds.items()))
    strings = {s: {"array": s, "digest": array_digest(a)} for s, a in embeds.items()}
    pooled = PooledConditioning(store, {"pool": "text/cfg", "strings": strings}, sorted(strings), cache_bytes=100)
    whole = Conditioning.stack([embeds[s] for s in sorted(strings)])
    batch = pooled[[3, 1, 3]]
    assert [r.tolist() for r in batch.rows()] == [r.tolist() for r in whole[[3, 1, 3]].rows()]
    assert pooled[2].embeds.tolist() == whole[2].embeds[: 3 + 2].tolist()  # one row: as Conditioning[i] gives it


def test_writers_of_one_pool_never_share_a_row_and_merge_into_the_main_log(tmp_path):
    """Two processes of one run write one pool at once: each its own arrays and log; readers see both; rank 0
    folds the logs into committed.jsonl and every row still reads back."""
    import numpy as np

    from cache.arrays import ArrayPool

    a, b = ArrayPool(tmp_path / "p", "r0"), ArrayPool(tmp_path / "p", "r1")
    for i in range(3):
        a.put(f"a{i}", np.full((2, 2), i, np.float32))
        b.put(f"b{i}", np.full((2, 2), 10 + i, np.float32))
    reader = ArrayPool(tmp_path / "p")
    names = {f"{w}{i}" for w in "ab" for i in range(3)}
    assert set(reader.committed()) == names
    assert {tuple(e["at"]) for e in reader.committed().values()} == {
        (f"f4_2x2-r{r}", row) for r in (0, 1) for row in (0, 1, 2)
    }
    assert sorted(p.name for p in reader.logs()) == ["committed.r0.jsonl", "committed.r1.jsonl"]
    reader.merge_writers()
    assert [p.name for p in reader.logs()] == ["committed.jsonl"]
    again = ArrayPool(tmp_path / "p")
    assert float(again.get("b2")[0, 0]) == 12.0 and set(again.committed()) == names
    a.put("a3", np.zeros((2, 2), np.float32))  # a writer that goes on after a merge starts a fresh chunk
    assert ArrayPool(tmp_path / "p").committed()["a3"]["at"] == ["f4_2x2-r0", 3]
