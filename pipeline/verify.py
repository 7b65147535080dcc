"""`pipeline verify`: re-hash everything the stat memo and the store vouch for, and name what differs.

Planning trusts the stat memo for inputs (images, captions, model files) and for store objects; that is
safe against every edit that goes through the filesystem (the ctime moves), not against bit rot or a tool
that writes behind the kernel's back. verify reads every byte again: inputs against the digests the memo
holds, objects against their names, pool arrays against their commit logs, and parses every manifest and
ref. What is damaged in the store is dropped (the store's own files), so the next run re-makes it; an input
whose memo entry was wrong gets its true digest, so the next run sees the change.
"""

from __future__ import annotations

import json
from pathlib import Path

from cache.hashing import sha256_file
from cache.store import Manifest, Store
from stages.base import PlanEnv


def verify(env: PlanEnv, progress: bool = True) -> dict:
    from core.progress import bar as progress_bar

    store = env.store
    inputs = _input_files(env)
    objects = sorted(p for p in (store.root / "objects").glob("*/*") if p.is_file() and not p.name.startswith("."))
    bar = progress_bar(total=len(inputs) + len(objects), desc="verify", unit="file", enabled=progress)
    report: dict = {"inputs": {"checked": 0, "differ": []}, "objects": {"checked": 0, "damaged": []}}
    for path, field in inputs:
        believed, actual = store.memo.digest(path), sha256_file(path)
        if believed != actual:
            report["inputs"]["differ"].append({"path": str(path), "field": field, "memo": believed, "actual": actual})
            store.memo.forget(path)
        report["inputs"]["checked"] += 1
        bar.update(1)
    for path in objects:
        if sha256_file(path) != path.name:
            report["objects"]["damaged"].append(str(path))
            path.unlink()
        report["objects"]["checked"] += 1
        bar.update(1)
    bar.close()
    report["manifests"] = _manifests(store)
    report["objects"]["missing"] = report["manifests"].pop("missing")
    report["refs"] = _refs(store)
    report["arrays"] = _arrays(store)
    report["ok"] = not any(
        report[k].get("differ") or report[k].get("damaged") or report[k].get("missing")
        for k in ("inputs", "objects", "manifests", "refs", "arrays")
    )
    store.memo.save()
    return report


def _input_files(env: PlanEnv) -> list[tuple[Path, str]]:
    """(file, config field) for every external input of the current config: images, captions, model files."""
    files = []
    for entry in env.images:
        files.append((entry.path, "data.images"))
        if entry.caption_path is not None:
            files.append((entry.caption_path, "data.images"))
    models = [env.model]
    if env.store.read_ref("transfer"):  # the student model is an input only where transfer has run
        models.append(env.student)
    for model in models:
        for comp_files in model.family.component_files(model.layout).values():
            files += [(f, model.field) for f in comp_files]
    seen, out = set(), []
    for path, field in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            out.append((path, field))
    return out


def _manifests(store: Store) -> dict:
    """Every manifest parses, and every object it lists is in the store."""
    damaged, missing, checked = [], [], 0
    for path in sorted((store.root / "stages").glob("*/*/manifest.json")):
        checked += 1
        try:
            manifest = Manifest.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            damaged.append({"path": str(path), "why": str(e)[:200]})
            continue
        for name, obj in manifest.outputs.items():
            if not store.object_path(obj["digest"]).exists():
                missing.append(f"{store.object_path(obj['digest'])} ({manifest.stage} output {name})")
    return {"checked": checked, "damaged": damaged, "missing": missing}


def _refs(store: Store) -> dict:
    damaged, checked = [], 0
    for path in sorted((store.root / "refs").glob("*.json")) if (store.root / "refs").is_dir() else []:
        checked += 1
        try:
            store.parse_ref(path)
        except (OSError, ValueError) as e:
            damaged.append({"path": str(path), "why": str(e)[:200]})
    return {"checked": checked, "damaged": damaged}


def _arrays(store: Store) -> dict:
    from cache.arrays import ArrayPool
    from core.errors import CorruptArray

    damaged, checked = [], 0
    for pool_dir in sorted((store.root / "pools").glob("*/*")):
        pool = ArrayPool(pool_dir)
        by_file: dict = {}
        for name in sorted(pool.committed()):
            try:
                by_file.setdefault(pool.location(name), []).append(name)
            except CorruptArray:  # its chunked array is gone
                by_file.setdefault(pool.arrays_dir, []).append(name)
        for path, names in by_file.items():  # a chunk at a time: a damaged one drops all its bad rows at once
            checked += len(names)
            try:
                pool.get_many(names)
            except CorruptArray:
                damaged.append(str(path))
    return {"checked": checked, "damaged": damaged}
