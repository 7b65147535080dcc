"""Stage `lora1`: train a LoRA on the base model from cached latents and text embeddings.

Writes the LoRA in the kohya format and in the diffusers format (with adapter metadata), the loss log,
and preview images. Resumes from its last checkpoint after an interruption.
"""

from __future__ import annotations

from pydantic import BaseModel

from cache.store import Manifest
from core import dist
from stages.base import PlanEnv, Stage, StageContext, StageResult, guidance_embed_for
from stages.training.captions import CaptionDraw, caption_draw, subset_caption_draws
from stages.training.params import LoraTrainParams, noise_contract, processes, section_fields


class Lora1Params(LoraTrainParams):
    """The shared training params, the text encoder's LoRA (train_text_encoder; its rates None without it), and
    the caption tricks (None when off: the key of a run without them is the key it had before they existed)."""

    UNKEYED_WHEN_NONE = (
        *LoraTrainParams.UNKEYED_WHEN_NONE,
        *("captions", "subset_captions", "prior_loss_weight", "guidance_embed", "processes"),
    )

    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    text_encoder_targets: list[str] | None = None  # the family's, when the text encoder is trained
    captions: CaptionDraw | None = None
    subset_captions: dict[str, CaptionDraw | None] | None = None  # [[data.subsets]] with tricks of their own
    prior_loss_weight: float | None = None  # data.prior_loss_weight, when a subset has is_reg


def prior_loss_weight(data) -> float | None:
    """data.prior_loss_weight when regularization images exist (it weighs nothing else)."""
    return data.prior_loss_weight if any(s.is_reg for s in data.subsets) else None


class Lora1Stage(Stage):
    name = "lora1"
    # v2: the kohya file names the trained SD version (ss_v2, ss_base_model_version); v3: the files carry the
    # training settings, dataset and tag frequencies (ss_*), and ss_output_name
    IMPL_VERSION = 4  # v4: under mixed precision the frozen base is stored in bf16/fp16 (loop.py store_base_in)
    upstream = ("caption", "latents", "text")
    trained_section = "lora1"
    # train_text_encoder: the captions are encoded in every step by the text encoder in training, so the `lora`
    # workflow leaves the text stage out (pipeline/workflows.py)
    optional_upstream = ("text",)
    description = "LoRA training on the base model"
    sharded = True  # several processes (torchrun / accelerate launch) share its micro-steps

    def params(self, env: PlanEnv) -> Lora1Params:
        c = env.config.lora1
        steps = env.section_steps(c, "lora1")
        if c.train_text_encoder:
            text = {"text_encoder_targets": list(text_encoder_targets(env, "lora1"))}
        else:  # its rates are read only with a trained text encoder
            text = {"text_encoder_lr": None, "loraplus_text_encoder_lr_ratio": None}
        return Lora1Params(
            **{**section_fields(c, Lora1Params), **text, "steps": steps},
            **env.train_fields(c, "lora1", steps=steps),
            prediction_type=env.prediction_type,
            captions=caption_draw(env.config.data, steps),
            subset_captions=subset_caption_draws(env.config.data, steps),
            prior_loss_weight=prior_loss_weight(env.config.data),
            guidance_embed=guidance_embed_for(env.model, c.guidance_embed, "lora1.guidance_embed"),
            processes=processes(),
        )

    def inputs(self, env: PlanEnv) -> dict:
        d, denoiser = env.component_digests, env.family.lora_component
        model = {denoiser: d[denoiser], "scheduler": d["scheduler"]}
        if env.config.lora1.train_text_encoder:
            model["text"] = d["text"]  # trained here, not read through the text stage's embeddings
        return {"model": model}

    def notes(self, env: PlanEnv, params: Lora1Params) -> list[str]:
        if not params.train_text_encoder:
            return []
        return [
            "lora1.train_text_encoder: the text encoder trains too, so cached text embeddings cannot be used; lora1 "
            "encodes its captions in every step (no text stage)"
        ]

    def contract(self, env: PlanEnv, params: Lora1Params) -> dict:
        return {
            "batch_size": params.batch_size,
            "grad_accum": params.grad_accum,
            "steps": params.steps,
            "seed": params.seed,
            "timesteps": params.timesteps,
            "noise": noise_contract(params.timesteps),
            "prediction_type": params.prediction_type,
        }

    def preflight(self, env: PlanEnv, params: Lora1Params) -> None:
        from stages.devices import resolve_device
        from stages.training.precision import check_precision

        check_precision(params.mixed_precision, resolve_device(env.config.runtime.device), params.fp8_base, "lora1")

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        from stages.training.checkpoints import checkpoint_step

        if not env.store.has_work(self.name, key):
            return None
        steps = env.section_steps(env.config.lora1, "lora1")
        return checkpoint_step(env.store.work_dir(self.name, key, create=False)), steps

    def run(self, ctx: StageContext) -> StageResult:
        from stages.devices import resolve_device
        from stages.pools import draw_training_captions, load_training_data
        from stages.training.loop import DiffusionBatches, TrainJob, train_lora
        from stages.training.outputs import snapshot_writer, write_lora_outputs
        from stages.training.previews import preview_specs

        env, p = ctx.env, ctx.params
        metadata = lora_metadata(ctx, p)
        device = resolve_device(ctx.runtime.device)
        text_encoder = env.family.load_text_encoder(env.layout, device) if p.train_text_encoder else None
        data, captions = load_training_data(ctx.store, ctx.upstream, text_encoder, p.prior_loss_weight)
        batches = DiffusionBatches(data, p.seed, p.batch_size)
        with dist.main_first():  # rank 0 encodes drawn captions into the store; the others then read them
            drawn = draw_training_captions(ctx, data, captions, p, batches, text_encoder)
        preview = ctx.runtime.preview
        job = TrainJob(
            family=env.family,
            layout=env.layout,
            prediction_type=p.prediction_type,
            params=p,
            device=device,
            work_dir=ctx.work_dir,
            checkpoint_every=ctx.runtime.checkpoint_every,
            preview=preview,
            preview_prompts=preview_specs(preview, captions[:1]),
            progress=ctx.progress and dist.is_main(),
            processes=p.processes or 1,
            gradient_checkpointing=ctx.runtime.gradient_checkpointing,
            attention=ctx.runtime.attention,
            log=ctx.log,
            tracker=ctx.tracker,
            label=ctx.node,
            text_encoder=text_encoder,
            snapshot=snapshot_writer(env.family, p, ctx.work_dir, "lora1", metadata),
        )
        outcome = train_lora(job, batches)
        if not dist.is_main():  # rank 0 writes the files; the runner commits them after every rank finished
            return StageResult()
        files = write_lora_outputs(env.family, outcome, p, ctx.work_dir, "lora1", metadata)
        pools = {}
        if drawn is not None:
            files["captions.json"], pools = drawn.path, drawn.pools
        tail = outcome.losses[-min(10, len(outcome.losses)) :]
        record = {
            "final_loss": sum(tail) / len(tail),
            "resumed_from_step": outcome.resumed_from,
            "rank": p.rank,
            "alpha": p.alpha,
            "text_encoder_trained": p.train_text_encoder,
        }
        record.update(outcome.sharding or {})  # FSDP or DeepSpeed ZeRO: how the base model was split
        if drawn is not None:
            record["captions"] = drawn.record
        return StageResult(files=files, pools=pools, record=record, summary=f"loss {record['final_loss']:.4f}")


def lora_metadata(ctx: StageContext, p) -> dict[str, str]:
    """What the LoRA files of a stage trained on the data set say about the model and the training (ss_*)."""
    from stages.training.outputs import training_metadata

    env = ctx.env
    items = ctx.upstream["caption"].record["items"]
    model = env.loaded.resolve(env.config.model.path).name
    training = training_metadata(p, env.config.latents.resolution, model, items, env.config.data.images.name)
    return {**env.family.lora_metadata(env.layout, p.prediction_type), **training}


def text_encoder_targets(env: PlanEnv, section: str) -> tuple[str, ...]:
    """The family's text-encoder LoRA targets; ConfigError when its text encoder is not trained."""
    from core.errors import ConfigError

    targets = env.family.text_encoder_targets
    if not targets:
        raise ConfigError(
            f"{section}.train_text_encoder = true: the {env.family.name} family's text encoder is not trained here "
            f"(a large language model, not a CLIP-style encoder; kohya's and musubi-tuner's trainers leave it frozen "
            f"too). Set {section}.train_text_encoder = false."
        )
    return targets


class ImportLoraParams(BaseModel):
    source: str = "file"


class ImportLoraStage(Stage):
    """`lora1` when transfer.teacher_lora names an existing file: the file becomes an artifact keyed by its digest."""

    name = "lora1"
    IMPL_VERSION = 1
    upstream = ()
    description = "the teacher LoRA, imported from transfer.teacher_lora"

    def path(self, env: PlanEnv):
        return env.loaded.resolve(env.config.transfer.teacher_lora)

    def params(self, env: PlanEnv) -> ImportLoraParams:
        return ImportLoraParams()

    def inputs(self, env: PlanEnv) -> dict:
        from core.errors import ConfigError

        path = self.path(env)
        if not path.is_file():
            raise ConfigError(
                f"transfer.teacher_lora: {path} does not exist. Point it at a LoRA .safetensors file, "
                f"or remove the key to train the teacher LoRA (stage lora1) on model.path."
            )
        return {"lora_file": env.store.memo.digest(path)}

    def run(self, ctx: StageContext) -> StageResult:
        import shutil

        from stages.training.lora_files import read_lora_file

        env = ctx.env
        source = self.path(env)
        lora = read_lora_file(source, env.family.kohya_prefix, env.family.lora_component, env.family.name)
        lora.refuse_text_modules("the teacher applies LoRAs to the UNet only, so its deltas would not be the LoRA's")
        copy = ctx.work_dir / "lora1.safetensors"
        shutil.copyfile(source, copy)
        record = {
            "imported_from": str(source),
            "format": lora.format,
            "modules": len(lora.modules),
            "rank": sorted(lora.ranks)[-1],
            "alpha": sorted(lora.alphas)[-1],
        }
        return StageResult(
            files={"lora1.safetensors": copy},
            record=record,
            summary=f"imported {lora.format} LoRA, {len(lora.modules)} modules, rank {record['rank']}",
        )
