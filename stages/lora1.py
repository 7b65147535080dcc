"""Stage `lora1`: train a LoRA on the base model from cached latents and text embeddings.

Writes the LoRA in the kohya format and in the diffusers format (with adapter metadata), the loss log,
and preview images. Resumes from its last checkpoint after an interruption.
"""

from __future__ import annotations

from pydantic import BaseModel

from cache.store import Manifest
from stages.base import PlanEnv, Stage, StageContext, StageResult


class Lora1Params(BaseModel):
    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    lr: float
    optimizer: str
    weight_decay: float
    lr_scheduler: str
    warmup_steps: int
    steps: int
    batch_size: int
    grad_accum: int
    max_grad_norm: float
    mixed_precision: str
    seed: int
    prediction_type: str


class Lora1Stage(Stage):
    name = "lora1"
    IMPL_VERSION = 1
    upstream = ("caption", "latents", "text")
    description = "LoRA training on the base model"

    def params(self, env: PlanEnv) -> Lora1Params:
        return Lora1Params(**env.config.lora1.model_dump(), prediction_type=env.prediction_type)

    def inputs(self, env: PlanEnv) -> dict:
        d = env.component_digests
        return {"model": {"unet": d["unet"], "scheduler": d["scheduler"]}}

    def contract(self, env: PlanEnv, params: Lora1Params) -> dict:
        return {
            "batch_size": params.batch_size,
            "grad_accum": params.grad_accum,
            "steps": params.steps,
            "seed": params.seed,
            "timesteps": {"sampler": "uniform", "process": "ddpm"},
            "noise": {"offset": 0.0, "pyramid": False},
            "prediction_type": params.prediction_type,
        }

    def preflight(self, env: PlanEnv, params: Lora1Params) -> None:
        from stages.devices import resolve_device
        from stages.training.loop import check_precision

        check_precision(params.mixed_precision, resolve_device(env.config.runtime.device))

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        from stages.training.loop import checkpoint_step

        if not env.store.has_work(self.name, key):
            return None
        return checkpoint_step(env.store.work_dir(self.name, key, create=False)), env.config.lora1.steps

    def run(self, ctx: StageContext) -> StageResult:
        from stages.devices import resolve_device
        from stages.training.loop import TrainJob, train_lora
        from stages.training.lora_files import lora_state_dict, save_diffusers, save_kohya

        env, p = ctx.env, ctx.params
        data, captions = load_training_data(ctx)
        preview = ctx.runtime.preview
        job = TrainJob(
            family=env.family,
            layout=env.layout,
            prediction_type=p.prediction_type,
            params=p,
            device=resolve_device(ctx.runtime.device),
            work_dir=ctx.work_dir,
            checkpoint_every=ctx.runtime.checkpoint_every,
            preview=preview,
            preview_prompts=preview.prompts or captions[:1],
            preview_size=env.config.latents.resolution,
            progress=ctx.progress,
            log=ctx.log,
        )
        outcome = train_lora(job, data)
        state = lora_state_dict(outcome.denoiser)
        kohya = ctx.work_dir / "lora1.safetensors"
        save_kohya(state, p.rank, p.alpha, kohya, env.family.kohya_prefix, env.family.lora_metadata())
        diffusers_file = ctx.work_dir / "pytorch_lora_weights.safetensors"
        save_diffusers(
            state, outcome.adapter_config, diffusers_file, env.family.pipeline_class, env.family.lora_component
        )
        loss_csv = ctx.work_dir / "loss.csv"
        loss_csv.write_text("step,loss\n" + "".join(f"{i + 1},{v:.6g}\n" for i, v in enumerate(outcome.losses)))
        files = {
            "lora1.safetensors": kohya,
            "diffusers/pytorch_lora_weights.safetensors": diffusers_file,
            "loss.csv": loss_csv,
            **outcome.previews,
        }
        tail = outcome.losses[-min(10, len(outcome.losses)) :]
        record = {
            "final_loss": sum(tail) / len(tail),
            "resumed_from_step": outcome.resumed_from,
            "rank": p.rank,
            "alpha": p.alpha,
        }
        return StageResult(files=files, record=record, summary=f"loss {record['final_loss']:.4f}")


def load_training_data(ctx: StageContext):
    """All latents and unique text embeddings in memory, read through the upstream manifests."""
    import numpy as np
    import torch

    from stages.training.loop import TrainData

    store = ctx.store
    items = ctx.upstream["caption"].record["items"]
    lat = ctx.upstream["latents"].record
    txt = ctx.upstream["text"].record
    lat_pool, txt_pool = store.pool(lat["pool"]), store.pool(txt["pool"])
    latents = np.stack([lat_pool.get(lat["items"][i["id"]]["array"], lat["items"][i["id"]]["digest"]) for i in items])
    strings = sorted({i["caption"] for i in items})
    row = {s: n for n, s in enumerate(strings)}
    cond = np.stack([txt_pool.get(txt["strings"][s]["array"], txt["strings"][s]["digest"]) for s in strings])
    index = [row[i["caption"]] for i in items]
    data = TrainData(torch.from_numpy(latents), torch.from_numpy(cond), torch.tensor(index, dtype=torch.long))
    return data, [i["caption"] for i in items]
