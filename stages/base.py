"""What every stage is: a typed params model, a manual IMPL_VERSION, its upstream stages, and a run().

Planning (params, inputs, contract, progress) touches files only; run() does the heavy work and returns
what goes into the manifest. Stages never import each other: they read upstream manifests from the
context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from cache.store import Manifest, Store
from pipeline.config import LoadedConfig
from stages.dataset import ImageEntry, scan_images
from stages.families import ModelFamily, ModelLayout, get_family


class PlanEnv:
    """What planning needs, computed once per command and shared by every stage: config, store, scans, digests."""

    def __init__(self, loaded: LoadedConfig, store: Store):
        self.loaded = loaded
        self.config = loaded.config
        self.store = store

    @cached_property
    def family(self) -> ModelFamily:
        return get_family(self.config.model.family)

    @cached_property
    def layout(self) -> ModelLayout:
        m = self.config.model
        config_dir = self.loaded.resolve(m.single_file_config) if m.single_file_config else None
        return self.family.layout(self.loaded.resolve(m.path), config_dir)

    @cached_property
    def images(self) -> list[ImageEntry]:
        d = self.config.data
        return scan_images(self.loaded.resolve(d.images), d.caption_extensions, self.store.memo)

    @cached_property
    def component_digests(self) -> dict[str, str]:
        from cache.keys import canonical_json, sha256_text

        digests = {}
        for comp, files in self.family.component_files(self.layout).items():
            digests[comp] = sha256_text(canonical_json([[f.name, self.store.memo.digest(f)] for f in files]))
        return digests

    @cached_property
    def prediction_type(self) -> str:
        p = self.config.model.prediction_type
        return self.family.prediction_type(self.layout) if p == "auto" else p

    @cached_property
    def latent_space(self) -> dict:
        return {"vae": self.component_digests["vae"], **self.family.latent_space(self.layout)}


@dataclass
class StageResult:
    """What a run produces: files to move into the object store, arrays referenced, and a JSON record."""

    files: dict[str, Path] = field(default_factory=dict)  # output name -> finished file in the work dir
    pools: dict[str, list[str]] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


@dataclass
class StageContext:
    env: PlanEnv
    key: str
    params: BaseModel
    upstream: dict[str, Manifest]
    work_dir: Path
    progress: bool = True

    @property
    def store(self) -> Store:
        return self.env.store

    @property
    def runtime(self):
        return self.env.config.runtime

    def log(self, message: str) -> None:
        import sys

        if self.runtime.log_level != "warning":
            print(message, file=sys.stderr, flush=True)


class Stage:
    name: ClassVar[str]
    IMPL_VERSION: ClassVar[int]
    upstream: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def params(self, env: PlanEnv) -> BaseModel:
        raise NotImplementedError

    def inputs(self, env: PlanEnv) -> dict[str, Any]:
        """Digests of external inputs (images, model components). Files only, no torch."""
        return {}

    def contract(self, env: PlanEnv, params: BaseModel) -> dict[str, Any]:
        """This stage's cross-phase contract fields (merged with its upstream contracts)."""
        return {}

    def preflight(self, env: PlanEnv, params: BaseModel) -> None:
        """Checks that need the machine (devices, optional packages), run before any stage of a run starts."""

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        """(done, total) of an interrupted run of this key, or None when nothing is in progress."""
        return None

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError
