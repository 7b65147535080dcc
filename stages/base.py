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
from pipeline.config_loading import LoadedConfig
from stages.dataset import ImageEntry, scan_images
from stages.families import ModelFamily, ModelLayout, detect_family, get_family


def resolve_family(name: str, path: Path, field: str) -> ModelFamily:
    """The configured family, or the detected one for "auto"; an explicit family the model does not fit is an
    error naming both."""
    from core.errors import ModelError

    found, why = detect_family(path) if path.exists() else (None, "")
    if name == "auto":
        if found is None:
            if not path.exists():
                raise ModelError(
                    f"{field}: {path} does not exist. Point it at a diffusers model folder (with model_index.json) "
                    f"or a single-file .safetensors checkpoint."
                )
            raise ModelError(
                f"{field}: could not tell the model family of {path} ({why}). Set model.family to one of sd15, "
                f"sdxl, flux1, zimage, flux2, qwenimage if it is one of them."
            )
        return get_family(found)
    if found is not None and found != name:
        raise ModelError(
            f"{field}: model.family = {name!r}, but {path} is a {found} model ({why}). Set model.family = "
            f'"{found}" (or "auto"), or point {field} at a {name} model.'
        )
    return get_family(name)


def guidance_embed_for(model: ModelRef, value: float | None, field: str) -> float | None:
    """The guidance value a model's forwards get: None for models without a guidance embedding (a value set for
    one is refused by name), the setting or the family's pipeline default for models with one (FLUX.2 4.0, FLUX.1
    [dev] 3.5)."""
    from core.errors import ConfigError

    if not model.family.has_guidance_embed(model.layout):
        if value is not None:
            raise ConfigError(
                f"{field} = {value:g}, but {model.path} ({model.family.name}) has no guidance embedding: its "
                f"transformer takes no guidance value. Remove {field}."
            )
        return None
    return value if value is not None else model.family.default_guidance_embed


class ModelRef:
    """One model on disk as planning sees it: family, layout, component digests, prediction type, latent space.

    Files and JSON only; computed once per command."""

    def __init__(self, family: str, path: Path, single_file_config: Path | None, store: Store, field: str):
        self.family_name, self.path, self.single_file_config, self.store = family, path, single_file_config, store
        self.field = field  # the config key that names it, for error messages

    @cached_property
    def family(self) -> ModelFamily:
        return resolve_family(self.family_name, self.path, self.field)

    @cached_property
    def layout(self) -> ModelLayout:
        from core.errors import ModelError

        try:
            return self.family.layout(self.path, self.single_file_config)
        except ModelError as e:
            text = str(e)
            raise ModelError(text.replace("model.path:", f"{self.field}:", 1)) from None

    @cached_property
    def component_digests(self) -> dict[str, str]:
        from cache.keys import canonical_json, sha256_text

        digests = {}
        for comp, files in self.family.component_files(self.layout).items():
            digests[comp] = sha256_text(canonical_json([[f.name, self.store.memo.digest(f)] for f in files]))
        return digests

    @cached_property
    def auto_prediction_type(self) -> str:
        return self.family.prediction_type(self.layout)

    @cached_property
    def latent_space(self) -> dict:
        return self.family.latent_space(self.layout)

    def timesteps(self, settings, section: str, resolution: int, schedule_of: ModelRef | None = None) -> dict:
        """The noise process of this model under a section's timestep settings (lora1, schedule, ...). schedule_of:
        the teacher, for a flow-matching student: the student trains at the noise levels the teacher's schedule
        drew, so the teacher's scheduler settings (shift, dynamic shifting) resolve its `auto` shift; its own
        (FLUX.1 [schnell]: shift 1, no dynamic shifting) are for sampling after training."""
        from stages.families.noise import resolve_timesteps

        seq_len = self.family.image_seq_len(self.family.latent_shape(self.layout, resolution))
        base = self.family.noise_schedule_contract(self.layout)
        if schedule_of is not None and base["process"] == "flow":
            other = schedule_of.family.noise_schedule_contract(schedule_of.layout)
            if other["process"] == "flow":
                base = {**base, "scheduler": other["scheduler"]}
        return resolve_timesteps(base, settings, seq_len, section)


class PlanEnv:
    """What planning needs, computed once per command and shared by every stage: config, store, scans, digests."""

    def __init__(self, loaded: LoadedConfig, store: Store):
        self.loaded = loaded
        self.config = loaded.config
        self.store = store

    @property
    def family(self) -> ModelFamily:
        return self.model.family

    @cached_property
    def model(self) -> ModelRef:
        """The base model (the teacher of `transfer`)."""
        m = self.config.model
        config_dir = self.loaded.resolve(m.single_file_config) if m.single_file_config else None
        return ModelRef(m.family, self.loaded.resolve(m.path), config_dir, self.store, "model.path")

    @cached_property
    def student(self) -> ModelRef:
        """The student model of `transfer` (its family is detected on its own, so a mismatch is caught)."""
        t = self.config.transfer
        config_dir = self.loaded.resolve(t.student_single_file_config) if t.student_single_file_config else None
        return ModelRef(
            self.config.model.family,
            self.loaded.resolve(t.student_model),
            config_dir,
            self.store,
            "transfer.student_model",
        )

    def train_fields(
        self,
        section,
        name: str,
        model: ModelRef | None = None,
        timestep_settings=None,
        steps: int | None = None,
        grad_accum: int | None = None,
        grad_accum_field: str | None = None,
    ) -> dict:
        """What every training stage resolves from its section: targets, the noise process, a checked weighting,
        the loss, and the optimizer side (its arguments, the lr schedule in steps, EMA, fused backward). steps and
        grad_accum default to the section's; grad_accum_field names where grad_accum is set when it is elsewhere."""
        from stages.families.noise import check_weighting
        from stages.training.losses import resolve_loss
        from stages.training.networks import check_network
        from stages.training.optim import resolve_optim

        model = model or self.model
        check_network(section, name, model.family)
        resolution, teacher = self.config.latents.resolution, None if model is self.model else self.model
        timesteps = model.timesteps(timestep_settings or section, name, resolution, schedule_of=teacher)
        prediction_type = self.prediction_type if model is self.model else model.auto_prediction_type
        return {
            "targets": self.targets(section.targets),
            "lokr_factor": section.lokr_factor if section.network == "lokr" else None,
            "timesteps": timesteps,
            "loss_weighting": check_weighting(timesteps, section.loss_weighting, name),
            "loss": resolve_loss(section, timesteps, prediction_type, name),
            **resolve_optim(
                section,
                steps or self.section_steps(section, name),
                grad_accum or section.grad_accum,
                name,
                grad_accum_field,
            ),
        }

    def section_steps(self, section, name: str, held_out: int = 0, sharded: bool = True) -> int:
        """A training section's optimizer steps: its `steps`, or its `epochs` of this data set (kohya's epoch: every
        training image num_repeats times, regularization images as many again, in batches of batch_size; an
        optimizer step takes grad_accum of them on each process, or in all with sharded=False: the transfer
        schedule, whose global batch is fixed). held_out: images kept out of training (schedule.heldout_images)."""
        import math

        from core import dist
        from core.errors import ConfigError

        epochs = getattr(section, "epochs", None)
        if epochs is None:
            return section.steps
        if "steps" in section.model_fields_set:
            raise ConfigError(
                f"{name}.steps and {name}.epochs are both set: one says how long to train. Remove one of them."
            )
        subsets = {s.name or s.images.name: s for s in self.config.data.subsets}
        images = reg = 0
        for entry in self.images:
            subset = subsets.get(entry.subset) if entry.subset is not None else None
            if subset is not None and subset.is_reg:
                reg += 1
            else:
                images += subset.num_repeats if subset is not None else 1
        shown = max(1, images - held_out) * (2 if reg else 1)  # kohya repeats or cuts reg images to as many
        processes = dist.size() if sharded else 1
        per_epoch = math.ceil(math.ceil(shown / section.batch_size) / (section.grad_accum * processes))
        return max(1, epochs * per_epoch)

    def schedule_steps(self) -> int:
        """The transfer schedule's steps: schedule.steps, or schedule.epochs of the images it trains on."""
        s = self.config.schedule
        return self.section_steps(s, "schedule", held_out=s.heldout_images, sharded=False)

    def targets(self, section_targets: list[str] | None) -> list[str]:
        return list(section_targets) if section_targets is not None else list(self.family.default_targets)

    def scoped(self, **sections) -> PlanEnv:
        """The same project with some config sections replaced (a pair side's images, its LoRA settings).

        It shares the store and the models' digests; the scans and params follow the replaced sections."""
        config = self.config.model_copy(update=sections)
        env = PlanEnv(LoadedConfig(config, self.loaded.path), self.store)
        env.__dict__.update({k: self.__dict__[k] for k in ("model", "student") if k in self.__dict__})
        return env

    @property
    def layout(self) -> ModelLayout:
        return self.model.layout

    @property
    def component_digests(self) -> dict[str, str]:
        return self.model.component_digests

    @cached_property
    def images(self) -> list[ImageEntry]:
        """Every image of data.images, or of each [[data.subsets]] folder (their entries carry the subset)."""
        from dataclasses import replace

        d = self.config.data
        if not d.subsets:
            return scan_images(self.loaded.resolve(d.images), d.caption_extensions, self.store.memo)
        entries = []
        for s in d.subsets:
            name = s.name or s.images.name
            found = scan_images(self.loaded.resolve(s.images), d.caption_extensions, self.store.memo, f"subset {name}")
            entries += [replace(e, subset=name) for e in found]
        return entries

    def image_root(self, subset: str | None) -> Path:
        """The folder an item's path is relative to: data.images, or its subset's folder."""
        d = self.config.data
        if subset is None:
            return self.loaded.resolve(d.images)
        return self.loaded.resolve(next(s.images for s in d.subsets if (s.name or s.images.name) == subset))

    def image_path(self, item: dict) -> Path:
        """The file of a caption-table item."""
        return self.image_root(item.get("subset")) / item["path"]

    @cached_property
    def prediction_type(self) -> str:
        from core.errors import ConfigError

        p, auto = self.config.model.prediction_type, self.model.auto_prediction_type
        if p != "auto" and (p == "flow") != (auto == "flow"):
            raise ConfigError(
                f'model.prediction_type = "{p}" does not fit {self.model.path}, a {self.family.name} model that '
                f'predicts {auto}. Use "auto".'
            )
        return auto if p == "auto" else p


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
    tracker: Any = None  # stages/tracking.py Tracker: TensorBoard / W&B figures of this run (runtime.log_with)
    node: str = ""  # the workflow's name for this stage (`lora1.red-circle`): what its progress bars say

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
    # upstream roles a workflow may leave out (the stage then does that work itself)
    optional_upstream: ClassVar[tuple[str, ...]] = ()
    # The upstream stages whose contract this one inherits (None: all); its own fields must agree with them.
    contract_from: ClassVar[tuple[str, ...] | None] = None
    # A phase-2 stage: `--only` refuses upstream artifacts made under another contract than the config's.
    enforce_contract: ClassVar[bool] = False
    # Run by every process of a multi-process run (each takes its share); other stages run on rank 0 alone
    sharded: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def params(self, env: PlanEnv) -> BaseModel:
        raise NotImplementedError

    def inputs(self, env: PlanEnv) -> dict[str, Any]:
        """Digests of external inputs (images, model components). Files only, no torch."""
        return {}

    def contract(self, env: PlanEnv, params: BaseModel) -> dict[str, Any]:
        """This stage's cross-phase contract fields (merged with its upstream contracts)."""
        return {}

    def notes(self, env: PlanEnv, params: BaseModel) -> list[str]:
        """What a plan should say about how this stage will run (shown by --dry-run)."""
        return []

    def artifact_notes(self, manifest: Manifest) -> list[str]:
        """What a committed artifact should tell its user (`pipeline status`), e.g. the files it left out."""
        return []

    # a training stage's config section (dotted), whose output_name and save_precision name and convert its files
    trained_section: str | None = None

    def export_settings(self, env: PlanEnv):
        """A training stage's ExportSettings (stages/training/outputs.py); None: its files are exported as the store
        holds them."""
        from stages.training.outputs import export_settings

        return export_settings(env.config, self.name, self.trained_section) if self.trained_section else None

    def preflight(self, env: PlanEnv, params: BaseModel) -> None:
        """Checks that need the machine (devices, optional packages), run before any stage of a run starts."""

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        """(done, total) of an interrupted run of this key, or None when nothing is in progress."""
        return None

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError
