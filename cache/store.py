"""The artifact store.

Layout under the store root:

    objects/ab/<sha256>                immutable files, named by their content digest
    stages/<stage>/<key>/manifest.json one manifest per (stage, key); writing it is the commit point
    stages/<stage>/<key>/work/         progress of a stage that has not committed (resume state)
    pools/<pool>/<config>/             items as rows of chunked zarr arrays, shared across keys (see cache.arrays)
    refs/<workflow>.json               the stage keys of a workflow's last run: the roots of `pipeline gc`
    memo/stat.json                     path -> (device, inode, size, mtime_ns, ctime_ns), sha256
    lock                               flock'd by a running `pipeline run`

Nothing outside a committed manifest is ever trusted: a manifest lists the digests of its objects and
the arrays it references, and it is written last, via a temp file, fsync and os.replace. Every object is
digest-checked when it is read for use (`read_object`); a damaged one is dropped, so the artifact that
needs it is re-made. A manifest or ref that cannot be parsed counts as missing (and is reported as
damage), except to `gc`, which refuses to decide what to delete from refs it cannot read.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cache.arrays import ArrayPool, dir_size
from cache.hashing import StatMemo, sha256_file, stat_signature
from cache.locks import StoreLock
from core.errors import DamagedObject, StoreError

WRITE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def read_only_error(root: Path, what: str, e: OSError) -> StoreError:
    return StoreError(
        f"the store {root} is read-only ({e.strerror}: {e.filename}); `{what}` needs to write to it. "
        f"Make it writable, or point runtime.store at a writable folder. `pipeline status` works as it is."
    )


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
        """Parse a manifest document; ValueError naming what is wrong when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        names = {f.name for f in fields(cls)}
        if set(data) - names or not {"stage", "key", "preimage"} <= set(data):
            raise ValueError(f"fields {sorted(data)} are not a manifest's")
        m = cls(**data)
        types = {"preimage": dict, "contract": dict, "outputs": dict, "pools": dict, "record": dict}
        bad = [n for n, t in types.items() if not isinstance(getattr(m, n), t)]
        if bad or not all(isinstance(o, dict) and isinstance(o.get("digest"), str) for o in m.outputs.values()):
            raise ValueError(f"malformed fields {bad or ['outputs']}")
        return m


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.memo = StatMemo(self.root / "memo" / "stat.json")
        self.lock = StoreLock(self.root / "lock")
        self.damage: dict[str, str] = {}  # store-relative path -> why it could not be read (manifests, refs)
        self._verified: dict[str, str] = {}  # object digest -> stat signature it was verified at

    def lock_for(self, what: str, wait: bool = True, on_wait=None) -> None:
        """Take the store lock for a command that writes; StoreError when the store cannot be written."""
        try:
            self.lock.acquire(what, wait=wait, on_wait=on_wait)
        except IsADirectoryError:
            raise StoreError(
                f"the store lock {self.lock.path} is a folder, not a file. It was not made by lora-pipeline: "
                f"remove it (rmdir {self.lock.path}) and run the same command again."
            ) from None
        except (FileExistsError, NotADirectoryError) as e:
            raise StoreError(
                f"the store folder {self.root} cannot be made: {e.filename} is a file, not a folder. Move it away, "
                f"or point runtime.store at another folder."
            ) from None
        except OSError as e:
            if e.errno in WRITE_ERRNOS:
                raise read_only_error(self.root, what, e) from None
            raise

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
        if dst.exists() and self.object_intact(digest):
            src.unlink()
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{digest}.tmp{os.getpid()}")
            shutil.move(str(src), tmp)
            os.replace(tmp, dst)
        return {"digest": digest, "size": size}

    def object_intact(self, digest: str, memo: bool = False) -> bool:
        """Whether the object exists with the bytes its name says. Hashed once per process and file state;
        with memo=True (planning) the stat memo may answer, which any write to the file invalidates."""
        path = self.object_path(digest)
        try:
            sig = stat_signature(path.stat())
        except FileNotFoundError:
            return False
        if self._verified.get(digest) == sig:
            return True
        if memo:
            return self.memo.digest(path) == digest
        if sha256_file(path) != digest:
            return False
        self._verified[digest] = sig  # only a full hash vouches for a read for use
        return True

    def read_object(self, digest: str, what: str = "") -> Path:
        """The path of an object about to be used, after checking its bytes against its digest.

        A damaged object is dropped (it is the store's own file) and DamagedObject raised: the artifact
        that lists it is then STALE, and the next run re-makes it."""
        path = self.object_path(digest)
        if self.object_intact(digest):
            return path
        if not path.exists():
            raise DamagedObject(
                f"store object {path}{f' ({what})' if what else ''} is missing; run the same "
                f"command again to re-make it."
            )
        path.unlink()
        raise DamagedObject(
            f"store object {path}{f' ({what})' if what else ''} was damaged: its bytes no longer match its digest. "
            f"It was dropped; run the same command again to re-make it."
        )

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
        """The committed manifest, or None; a damaged one is None too, with the reason in `damage`."""
        path = self.stage_dir(stage, key) / "manifest.json"
        try:
            return Manifest.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as e:
            self.damage[str(path.relative_to(self.root))] = f"{type(e).__name__}: {e}"[:200]
            return None

    def manifest_damage(self, stage: str, key: str) -> str | None:
        return self.damage.get(str((self.stage_dir(stage, key) / "manifest.json").relative_to(self.root)))

    def commit(self, manifest: Manifest) -> Path:
        for name, obj in manifest.outputs.items():
            if not self.object_intact(obj["digest"]):
                raise RuntimeError(f"refusing to commit {manifest.stage}: output {name} is not in the object store")
        manifest.provenance.setdefault("committed", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        path = self.stage_dir(manifest.stage, manifest.key) / "manifest.json"
        write_json_atomic(path, asdict(manifest))
        shutil.rmtree(self.stage_dir(manifest.stage, manifest.key) / "work", ignore_errors=True)
        return path

    # -- pools ---------------------------------------------------------------------------------------
    def pool(self, pool_id: str, writer: str = "") -> ArrayPool:
        """pool_id is '<pool>/<config key>', e.g. 'latents/3fa2...'; writer names one process of several that
        write it at once (cache/arrays.py)."""
        return ArrayPool(self.root / "pools" / pool_id, writer)

    # -- refs ----------------------------------------------------------------------------------------
    def read_ref(self, workflow: str) -> dict[str, str]:
        """The last run's node -> key; a damaged ref counts as none (said once on stderr; the run rewrites it)."""
        try:
            return self.parse_ref(self.root / "refs" / f"{workflow}.json")["stages"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            path = f"refs/{workflow}.json"
            if path not in self.damage:
                print(
                    f"warning: the store ref {self.root / path} is damaged ({e}); it is treated as no earlier "
                    f"run and rewritten by the next `pipeline run {workflow}`.",
                    file=sys.stderr,
                )
            self.damage[path] = str(e)
            return {}

    @staticmethod
    def parse_ref(path: Path) -> dict:
        """A parsed ref; FileNotFoundError when absent, ValueError naming the problem when it is not a ref."""
        try:
            doc = json.loads(path.read_text())
        except UnicodeDecodeError as e:
            raise ValueError(f"not text: {e}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from None
        stages = doc.get("stages") if isinstance(doc, dict) else None
        if not isinstance(stages, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in stages.items()
        ):
            raise ValueError("no `stages` table of node -> key")
        if not isinstance(doc.get("kinds", {}), dict):
            raise ValueError("`kinds` is not a table")
        return doc

    def write_ref(
        self,
        workflow: str,
        stages: dict[str, str],
        config: dict | None = None,
        kinds: dict[str, str] | None = None,
        run: dict | None = None,
    ) -> None:
        """stages: node name -> key; kinds: node name -> stage name where they differ (`lora1.car` -> `lora1`);
        run: what the last run did per stage (action, seconds, causes, the key it replaced)."""
        old = self._read_ref_doc(workflow)
        kinds = {**old.get("kinds", {}), **(kinds or {})}
        ref = {"stages": stages, "kinds": kinds, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config}
        if run is not None:
            ref["run"] = run
        write_json_atomic(self.root / "refs" / f"{workflow}.json", ref)
        self.damage.pop(f"refs/{workflow}.json", None)

    def ref_doc(self, workflow: str) -> dict:
        """The whole ref of a workflow (stages, kinds, config, the last run); {} when absent or unreadable."""
        return self._read_ref_doc(workflow)

    def _read_ref_doc(self, workflow: str) -> dict:
        try:
            return self.parse_ref(self.root / "refs" / f"{workflow}.json")
        except (OSError, ValueError):
            return {}

    def refs(self) -> dict[str, dict]:
        """workflow -> its ref document, read strictly: StoreError naming the file when one cannot be read."""
        refs_dir = self.root / "refs"
        if refs_dir.exists() and not refs_dir.is_dir():
            raise StoreError(
                f"{refs_dir} is not a folder: the store's refs (what every workflow's last run made) "
                f"cannot be read. Move the file away, then run each workflow again to record its refs."
            )
        docs = {}
        for path in sorted(refs_dir.glob("*.json")) if refs_dir.is_dir() else []:
            try:
                docs[path.stem] = self.parse_ref(path)
            except (OSError, ValueError) as e:
                raise StoreError(
                    f"the ref {path} cannot be read ({e}). Run `pipeline run {path.stem}` to rewrite it, or move "
                    f"the file away if that workflow is no longer used; gc removes nothing until every ref reads."
                ) from None
        return docs

    def ref_artifacts(self) -> list[tuple[str, str]]:
        """Every (stage, key) some workflow's last run reached: the roots of garbage collection."""
        out = []
        for doc in self.refs().values():
            kinds = doc.get("kinds", {})
            out += [(kinds.get(node, node), key) for node, key in doc["stages"].items()]
        return out

    # -- garbage collection --------------------------------------------------------------------------
    def gc(self, dry_run: bool = False) -> dict:
        """Remove stage dirs, objects and pool arrays that no workflow ref reaches."""
        live_stage_dirs: set[Path] = set()
        live_objects: set[str] = set()
        live_arrays: dict[str, set[str]] = {}
        artifacts = self.ref_artifacts()
        if not artifacts and any((self.root / "stages").glob("*/*")):
            raise StoreError(
                f"{self.root} has artifacts but no refs (refs/<workflow>.json record what each workflow's last run "
                f"made): gc would remove everything. Run your workflows once to record them; to empty the store, "
                f"delete {self.root} yourself."
            )
        for stage, key in artifacts:
            manifest = self.load_manifest(stage, key)
            damage = self.manifest_damage(stage, key)
            if damage:
                raise StoreError(
                    f"the manifest {self.stage_dir(stage, key) / 'manifest.json'} that a ref reaches is damaged "
                    f"({damage}); gc cannot tell which files it needs. Run the workflow again to re-make it."
                )
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
            if dead or pool.dead_chunks():  # unreferenced items, or chunks a killed write left
                size = pool.bytes_of(dead)
                removed.append({"kind": "arrays", "path": f"{pool_dir} ({len(dead)} arrays)", "bytes": size})
                if not dry_run:
                    pool.remove(dead)
        return {"dry_run": dry_run, "removed": removed, "bytes": sum(r["bytes"] for r in removed)}
