"""The artifact store.

Layout under the store root:

    objects/ab/<sha256>                immutable files, named by their content digest
    stages/<stage>/<key>/manifest.json one manifest per (stage, key); writing it is the commit point
    stages/<stage>/<key>/work/         progress of a stage that has not committed (resume state)
    pools/<pool>/<config>/             per-item zarr arrays shared across keys (see cache.arrays)
    refs/<workflow>.json               the stage keys of a workflow's last run: the roots of `pipeline gc`
    memo/stat.json                     (path, inode, size, mtime_ns) -> sha256
    lock                               flock'd by a running `pipeline run`

Nothing outside a committed manifest is ever trusted: a manifest lists the digests of its objects and
the arrays it references, and it is written last, via a temp file, fsync and os.replace.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cache.arrays import ArrayPool, dir_size
from cache.hashing import StatMemo, sha256_file
from cache.locks import StoreLock


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Manifest:
    stage: str
    key: str
    preimage: dict
    contract: dict = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)  # name -> {"digest", "size"}
    pools: dict[str, list[str]] = field(default_factory=dict)  # pool id -> array names referenced
    record: dict = field(default_factory=dict)  # stage-specific results (caption table, loss log, ...)
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        return cls(**data)


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.memo = StatMemo(self.root / "memo" / "stat.json")
        self.lock = StoreLock(self.root / "lock")

    # -- objects -------------------------------------------------------------------------------------
    def object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def put_object(self, src: Path) -> dict:
        """Move a finished file into the object store. Returns {"digest", "size"}."""
        src = Path(src)
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(src)
        size = src.stat().st_size
        dst = self.object_path(digest)
        if dst.exists():
            src.unlink()
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{digest}.tmp{os.getpid()}")
            shutil.move(str(src), tmp)
            os.replace(tmp, dst)
        return {"digest": digest, "size": size}

    # -- manifests -----------------------------------------------------------------------------------
    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    def work_dir(self, stage: str, key: str, create: bool = True) -> Path:
        path = self.stage_dir(stage, key) / "work"
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def has_work(self, stage: str, key: str) -> bool:
        return (self.stage_dir(stage, key) / "work").is_dir()

    def load_manifest(self, stage: str, key: str) -> Manifest | None:
        path = self.stage_dir(stage, key) / "manifest.json"
        try:
            return Manifest.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def commit(self, manifest: Manifest) -> Path:
        for name, obj in manifest.outputs.items():
            if not self.object_path(obj["digest"]).exists():
                raise RuntimeError(f"refusing to commit {manifest.stage}: output {name} is not in the object store")
        manifest.provenance.setdefault("committed", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        path = self.stage_dir(manifest.stage, manifest.key) / "manifest.json"
        write_json_atomic(path, asdict(manifest))
        shutil.rmtree(self.stage_dir(manifest.stage, manifest.key) / "work", ignore_errors=True)
        return path

    # -- pools ---------------------------------------------------------------------------------------
    def pool(self, pool_id: str) -> ArrayPool:
        """pool_id is '<pool>/<config key>', e.g. 'latents/3fa2...'."""
        return ArrayPool(self.root / "pools" / pool_id)

    # -- refs ----------------------------------------------------------------------------------------
    def read_ref(self, workflow: str) -> dict[str, str]:
        try:
            return json.loads((self.root / "refs" / f"{workflow}.json").read_text())["stages"]
        except FileNotFoundError:
            return {}

    def write_ref(
        self, workflow: str, stages: dict[str, str], config: dict | None = None, kinds: dict[str, str] | None = None
    ) -> None:
        """stages: node name -> key; kinds: node name -> stage name where they differ (`lora1.car` -> `lora1`)."""
        old = self._read_ref_doc(workflow)
        kinds = {**old.get("kinds", {}), **(kinds or {})}
        ref = {"stages": stages, "kinds": kinds, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config}
        write_json_atomic(self.root / "refs" / f"{workflow}.json", ref)

    def _read_ref_doc(self, workflow: str) -> dict:
        try:
            return json.loads((self.root / "refs" / f"{workflow}.json").read_text())
        except FileNotFoundError:
            return {}

    def refs(self) -> dict[str, dict[str, str]]:
        """workflow -> {stage name/node name: key}, node names resolved to (stage, key) pairs by `ref_artifacts`."""
        refs_dir = self.root / "refs"
        if not refs_dir.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text())["stages"] for p in sorted(refs_dir.glob("*.json"))}

    def ref_artifacts(self) -> list[tuple[str, str]]:
        """Every (stage, key) some workflow's last run reached: the roots of garbage collection."""
        out = []
        for workflow, stages in self.refs().items():
            kinds = self._read_ref_doc(workflow).get("kinds", {})
            out += [(kinds.get(node, node), key) for node, key in stages.items()]
        return out

    # -- garbage collection --------------------------------------------------------------------------
    def gc(self, dry_run: bool = False) -> dict:
        """Remove stage dirs, objects and pool arrays that no workflow ref reaches."""
        live_stage_dirs: set[Path] = set()
        live_objects: set[str] = set()
        live_arrays: dict[str, set[str]] = {}
        for stage, key in self.ref_artifacts():
            manifest = self.load_manifest(stage, key)
            if manifest is None:
                continue
            live_stage_dirs.add(self.stage_dir(stage, key))
            live_objects.update(o["digest"] for o in manifest.outputs.values())
            for pool_id, names in manifest.pools.items():
                live_arrays.setdefault(pool_id, set()).update(names)

        removed: list[dict] = []

        def drop(kind: str, path: Path, size: int) -> None:
            removed.append({"kind": kind, "path": str(path), "bytes": size})
            if not dry_run:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

        for stage_dir in sorted((self.root / "stages").glob("*/*")):
            if stage_dir not in live_stage_dirs:
                drop("stage", stage_dir, dir_size(stage_dir))
        for obj in sorted((self.root / "objects").glob("*/*")):
            if obj.name not in live_objects:
                drop("object", obj, obj.stat().st_size)
        for pool_dir in sorted((self.root / "pools").glob("*/*")):
            pool_id = f"{pool_dir.parent.name}/{pool_dir.name}"
            keep = live_arrays.get(pool_id, set())
            if not keep:
                drop("pool", pool_dir, dir_size(pool_dir))
                continue
            pool = ArrayPool(pool_dir)
            dead = pool.all_names() - keep
            if dead:
                size = sum(dir_size(pool.arrays_dir / n) for n in dead)
                removed.append({"kind": "arrays", "path": f"{pool_dir} ({len(dead)} arrays)", "bytes": size})
                if not dry_run:
                    pool.remove(dead)
        return {"dry_run": dry_run, "removed": removed, "bytes": sum(r["bytes"] for r in removed)}
