"""The store: objects, atomic manifests, pools with a commit log, locks, the stat memo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cache.arrays import CorruptArray, array_digest
from cache.hashing import StatMemo, sha256_file
from cache.locks import LockHeld
from cache.store import Manifest, Store


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


def test_stat_memo_hashes_once_and_notices_changes(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"v1")
    memo = StatMemo(tmp_path / "memo.json")
    assert memo.digest(f) == sha256_file(f)
    memo.save()
    memo2 = StatMemo(tmp_path / "memo.json")
    sig = memo2._signature(f)
    memo2._load()[sig] = "memoized"  # proves the second lookup is served from the memo
    assert memo2.digest(f) == "memoized"
    time.sleep(0.01)
    f.write_bytes(b"v2")
    assert memo2.digest(f) == sha256_file(f)


def test_second_locker_is_told_who_holds_the_lock_and_a_killed_holder_releases_it(tmp_path):
    store = Store(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]); from cache.store import Store; "
            "s = Store(sys.argv[2]); s.lock.acquire('pipeline run lora'); print('held', flush=True); time.sleep(60)",
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            str(tmp_path),
        ],
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
