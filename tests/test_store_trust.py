"""The store against hostile edits: no silent wrong result, no lost user file, no traceback.

Each test reproduces a failure seen on the landed code (issue 8) and would fail on it.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from conftest import actions

import cache.hashing as hashing
from cache.store import Store
from core.errors import DamagedObject


def _status(project) -> dict[str, dict]:
    result = project.cli("status", "lora", "--json")
    assert result.exit_code == 0, result.output
    return {s["name"]: s for s in json.loads(result.stdout)["stages"]}


def _object(project, stage: str, output: str) -> object:
    digest = json.loads(project.manifests(stage)[0].read_text())["outputs"][output]["digest"]
    return project.store / "objects" / digest[:2] / digest


def _flip_a_bit_keeping_mtime(path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    time.sleep(0.02)  # past the kernel's coarse timestamp tick, so the ctime moves
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_image_rewritten_with_same_size_and_restored_mtime_is_seen(project, monkeypatch):
    monkeypatch.setattr(hashing, "RACY_SECONDS", -1e9)  # memoize at once: the memo must catch this by itself
    project.run_json()
    image = sorted((project.root / "images").glob("*.png"))[0]
    _flip_a_bit_keeping_mtime(image)  # what `cp -p` / `rsync -t` of an edited file look like to stat
    status = _status(project)
    assert status["caption"]["state"] == "stale"
    assert "input: 1 image changed" in status["caption"]["causes"]


def test_a_caption_rewritten_with_same_size_and_restored_mtime_is_seen(project, monkeypatch):
    monkeypatch.setattr(hashing, "RACY_SECONDS", -1e9)
    caption = sorted((project.root / "images").glob("*.txt"))[0]
    caption.write_text("a red circle")
    project.run_json()
    st = caption.stat()
    time.sleep(0.02)
    caption.write_text("a tan circle")  # same length
    os.utime(caption, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = project.run_json()
    assert actions(report)["caption"] == "ran"


def test_a_flipped_bit_in_a_stored_lora_makes_it_stale_and_the_next_run_re_makes_it(project):
    project.run_json()
    obj = _object(project, "lora1", "lora1.safetensors")
    good = obj.read_bytes()
    _flip_a_bit_keeping_mtime(obj)
    status = _status(project)
    assert status["lora1"]["state"] == "stale"
    assert "store: output lora1.safetensors is damaged (its bytes do not match its digest)" in status["lora1"]["causes"]
    report = project.run_json()
    assert actions(report) == {"caption": "reused", "latents": "reused", "text": "reused", "lora1": "ran"}
    assert obj.read_bytes() == good, "the re-made object has the digest's bytes again"
    exported = project.root / "output" / "lora" / "lora1" / "lora1.safetensors"
    assert exported.read_bytes() == good


def test_reading_a_damaged_object_for_use_drops_it_and_says_so(tmp_path):
    store = Store(tmp_path)
    f = tmp_path / "x.bin"
    f.write_bytes(b"weights")
    digest = store.put_object(f)["digest"]
    assert store.read_object(digest).read_bytes() == b"weights"
    path = store.object_path(digest)
    path.write_bytes(b"weightz")
    with pytest.raises(DamagedObject, match="was damaged.*run the same command again"):
        store.read_object(digest, "the teacher LoRA")
    assert not path.exists()
    # put_object never keeps a damaged copy that happens to sit at the digest's name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"garbage")
    f.write_bytes(b"weights")
    store.put_object(f)
    assert path.read_bytes() == b"weights"


def test_a_truncated_manifest_is_stale_with_a_store_cause_and_heals(project):
    project.run_json()
    manifest = project.manifests("lora1")[0]
    manifest.write_text(manifest.read_text()[:40])
    status = _status(project)
    assert status["lora1"]["state"] == "stale"
    assert status["lora1"]["causes"][0].startswith("store: the manifest is damaged")
    report = project.run_json()
    assert actions(report)["lora1"] == "ran"
    assert _status(project)["lora1"]["state"] == "fresh"


@pytest.mark.parametrize("content", ['{"stage": "lora1"}', "[]", '{"stages": {"lora1": 3}}'])
def test_a_schema_less_manifest_or_ref_is_damage_not_a_traceback(project, content):
    project.run_json()
    project.manifests("text")[0].write_text(content)
    (project.store / "refs" / "lora.json").write_text(content)
    result = project.cli("status", "lora")
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "store: the manifest is damaged" in result.output
    report = project.run_json()
    assert actions(report)["text"] == "ran"
    assert json.loads((project.store / "refs" / "lora.json").read_text())["stages"]["text"]


@pytest.mark.parametrize(
    "damage",
    ["refs is a file", "truncated ref", "no refs at all", "damaged manifest a ref reaches"],
)
def test_gc_refuses_refs_it_cannot_read_and_removes_nothing(project, damage):
    project.run_json()
    refs = project.store / "refs"
    if damage == "refs is a file":
        shutil.rmtree(refs)
        refs.write_text("oops")
    elif damage == "truncated ref":
        (refs / "lora.json").write_text('{"stages": {"capt')
    elif damage == "no refs at all":
        shutil.rmtree(refs)
    else:
        project.manifests("latents")[0].write_text("{")
    before = sorted(p for p in project.store.rglob("*") if p.is_file())
    for args in (["--dry-run"], []):
        result = project.cli("gc", "-c", str(project.config), *args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and str(project.store) in result.output
    assert sorted(p for p in project.store.rglob("*") if p.is_file()) == before


def test_user_files_in_an_export_folder_are_never_deleted(project):
    project.run_json()
    folder = project.root / "output" / "lora" / "lora1"
    (folder / "my-notes.txt").write_text("keep me")
    (folder / "previews").mkdir(exist_ok=True)
    (folder / "previews" / "favourite.png").write_bytes(b"mine")
    for args in ([], ["--set", "lora1.lr=5e-4"], ["--set", "lora1.lr=5e-4"]):
        result = project.cli("run", "lora", *args)
        assert result.exit_code == 0, result.output
        assert "my-notes.txt" in result.output and "left as they are" in result.output
    assert (folder / "my-notes.txt").read_text() == "keep me"
    assert (folder / "previews" / "favourite.png").read_bytes() == b"mine"
    # the pipeline's own file is replaced by the new artifact's (the run with lr 5e-4, whatever its key's order)
    latest = next(
        json.loads(m.read_text())
        for m in project.manifests("lora1")
        if json.loads(m.read_text())["preimage"]["params"]["lr"] == 5e-4
    )
    digest = latest["outputs"]["lora1.safetensors"]["digest"]
    assert (folder / "lora1.safetensors").read_bytes() == (project.store / "objects" / digest[:2] / digest).read_bytes()


def test_a_changed_exported_file_is_left_alone(project):
    project.run_json()
    exported = project.root / "output" / "lora" / "lora1" / "loss.csv"
    exported.write_text("my edits")
    result = project.cli("run", "lora", "--set", "lora1.lr=5e-4")
    assert result.exit_code == 0, result.output
    assert exported.read_text() == "my edits" and "loss.csv" in result.output


def test_a_lock_path_that_is_a_folder_is_a_named_error(project):
    project.store.mkdir(parents=True, exist_ok=True)
    (project.store / "lock").mkdir()
    for args in (["run", "lora"], ["gc", "-c", str(project.config)]):
        result = project.cli(*args)
        assert result.exit_code == 2, result.output
        assert "is a folder" in result.output and "rmdir" in result.output and "Traceback" not in result.output
    assert (project.store / "lock").is_dir(), "not ours to delete"


def test_status_shows_running_while_another_process_runs_the_workflow(project):
    project.run_json()
    project.write_config(lora1={"lr": 5e-4})
    store = Store(project.store)
    store.lock.acquire("pipeline run lora")
    try:
        status = _status(project)
    finally:
        store.lock.release()
    assert status["lora1"]["state"] == "running"
    assert f"pid {os.getpid()} (pipeline run lora" in status["lora1"]["causes"][0]
    assert status["caption"]["state"] == "fresh"
    assert _status(project)["lora1"]["state"] == "stale"


def test_verify_names_an_input_the_memo_vouched_for_and_a_damaged_object(project, monkeypatch):
    monkeypatch.setattr(hashing, "RACY_SECONDS", -1e9)
    project.run_json()
    memo_path = project.store / "memo" / "stat.json"
    memo = json.loads(memo_path.read_text())
    image = str(sorted((project.root / "images").glob("*.png"))[0].resolve())
    memo["files"][image][1] = "0" * 64  # bit rot behind the memo's back: the memo no longer tells the truth
    memo_path.write_text(json.dumps(memo))
    obj = _object(project, "lora1", "loss.csv")
    obj.write_text("tampered")
    result = project.cli("verify", "-c", str(project.config), "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert [d["path"] for d in report["inputs"]["differ"]] == [image]
    assert report["objects"]["damaged"] == [str(obj)]
    assert not report["ok"]
    # verify fixed what it could: the next status sees the true digests and the missing object
    status = _status(project)
    assert status["lora1"]["state"] == "stale"
    clean = project.cli("verify", "-c", str(project.config))
    assert clean.exit_code == 1  # the object is gone until the next run re-makes it
    project.run_json()
    assert project.cli("verify", "-c", str(project.config)).exit_code == 0


def test_a_store_path_that_is_a_file_is_a_named_error(project):
    project.store.write_text("not a folder")
    result = project.cli("run", "lora")
    assert result.exit_code == 2, result.output
    assert "is a file, not a folder" in result.output and "Traceback" not in result.output
    assert project.store.read_text() == "not a folder"
