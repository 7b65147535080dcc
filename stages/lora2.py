"""Stage `lora2` (differential LoRA, design.md §6): train LoRA-2 on B with LoRA-1 (trained on A) applied.

LoRA-1 is a frozen runtime adapter under LoRA-2 (differential.lora1_mode = "adapter"), or merged into the
base weights in fp32 ("merged"). Only LoRA-2 is written. With differential.paired_noise, LoRA-2 draws the
same timesteps and noise as LoRA-1 did at every step, so A and B are learned on identical noise.
"""

from __future__ import annotations

from cache.store import Manifest
from core import dist
from core.errors import ConfigError
from stages.base import PlanEnv, Stage, StageContext, StageResult, guidance_embed_for
from stages.training.captions import CaptionDraw, caption_draw, subset_caption_draws
from stages.training.params import LoraTrainParams, processes, section_fields


class Lora2Params(LoraTrainParams):
    UNKEYED_WHEN_NONE = (
        *LoraTrainParams.UNKEYED_WHEN_NONE,
        "captions",
        "subset_captions",
        "guidance_embed",
        "processes",
    )

    lora1_mode: str
    noise_stream: str  # "" replays lora1's draws (paired noise); "lora2" draws its own
    noise_seed: int
    captions: CaptionDraw | None = None  # the caption tricks, None when off
    subset_captions: dict[str, CaptionDraw | None] | None = None  # [[data.subsets]] with tricks of their own


class Lora2Stage(Stage):
    name = "lora2"
    # v2: the kohya file names the trained SD version (ss_v2, ss_base_model_version); v3: training settings, dataset
    # and tag frequencies in the files (ss_*), and ss_output_name
    IMPL_VERSION = 4  # v4: under mixed precision the frozen base is stored in bf16/fp16
    upstream = ("caption", "latents", "text", "lora1")
    trained_section = "differential.lora2"
    contract_from = ("caption", "latents")
    description = "LoRA-2 on B, over LoRA-1"
    sharded = True

    def params(self, env: PlanEnv) -> Lora2Params:
        d = env.config.differential
        l1, l2 = d.lora1, d.lora2
        steps = env.section_steps(l2, "differential.lora2")
        if d.paired_noise and l1.batch_size != l2.batch_size:
            raise ConfigError(
                f"differential.paired_noise replays LoRA-1's noise step by step, so it needs the same batch size: "
                f"differential.lora1.batch_size = {l1.batch_size}, differential.lora2.batch_size = {l2.batch_size}."
            )
        return Lora2Params(
            **{**section_fields(l2, Lora2Params), "steps": steps},
            # paired noise replays LoRA-1's draws, so LoRA-1's sampler and shift
            **env.train_fields(l2, "differential.lora2", timestep_settings=l1 if d.paired_noise else l2, steps=steps),
            prediction_type=env.prediction_type,
            lora1_mode=d.lora1_mode,
            noise_stream="" if d.paired_noise else "lora2",
            noise_seed=l1.seed if d.paired_noise else l2.seed,
            captions=caption_draw(env.config.data, steps),
            subset_captions=subset_caption_draws(env.config.data, steps),
            guidance_embed=guidance_embed_for(env.model, l2.guidance_embed, "differential.lora2.guidance_embed"),
            processes=processes(),
        )

    def inputs(self, env: PlanEnv) -> dict:
        d, denoiser = env.component_digests, env.family.lora_component
        return {"model": {denoiser: d[denoiser], "scheduler": d["scheduler"]}}

    def preflight(self, env: PlanEnv, params: Lora2Params) -> None:
        from stages.devices import resolve_device
        from stages.training.precision import check_precision

        check_precision(
            params.mixed_precision, resolve_device(env.config.runtime.device), params.fp8_base, "differential.lora2"
        )

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        from stages.training.checkpoints import checkpoint_step

        if not env.store.has_work(self.name, key):
            return None
        steps = env.section_steps(env.config.differential.lora2, "differential.lora2")
        return checkpoint_step(env.store.work_dir(self.name, key, create=False)), steps

    def run(self, ctx: StageContext) -> StageResult:
        from stages.devices import resolve_device
        from stages.lora1 import lora_metadata
        from stages.pools import draw_training_captions, load_training_data
        from stages.training.loop import DiffusionBatches, TrainJob, train_lora
        from stages.training.lora_files import read_lora_file
        from stages.training.outputs import snapshot_writer, trained_file, write_lora_outputs
        from stages.training.previews import preview_specs

        env, p = ctx.env, ctx.params
        metadata = lora_metadata(ctx, p)
        data, captions = load_training_data(ctx.store, ctx.upstream)
        batches = DiffusionBatches(data, p.noise_seed, p.batch_size, p.noise_stream)
        with dist.main_first():  # rank 0 encodes drawn captions into the store; the others then read them
            drawn = draw_training_captions(ctx, data, captions, p, batches, None)
        lora1_file = trained_file(ctx.upstream["lora1"].outputs)
        lora1 = ctx.store.read_object(lora1_file["digest"], "the LoRA-1 file")
        preset = read_lora_file(lora1, env.family.kohya_prefix, env.family.lora_component, env.family.name)
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
            preview_prompts=preview_specs(preview, captions[:1]),
            progress=ctx.progress and dist.is_main(),
            processes=p.processes or 1,
            gradient_checkpointing=ctx.runtime.gradient_checkpointing,
            attention=ctx.runtime.attention,
            log=ctx.log,
            tracker=ctx.tracker,
            label=ctx.node,
            stage="lora2",
            preset_lora=preset,
            preset_mode=p.lora1_mode,
            snapshot=snapshot_writer(env.family, p, ctx.work_dir, "lora2", metadata),
        )
        outcome = train_lora(job, batches)
        if not dist.is_main():  # rank 0 writes the files; the runner commits them after every rank finished
            return StageResult()
        files = write_lora_outputs(env.family, outcome, p, ctx.work_dir, "lora2", metadata)
        pools = {}
        if drawn is not None:
            files["captions.json"], pools = drawn.path, drawn.pools
        tail = outcome.losses[-min(10, len(outcome.losses)) :]
        record = {
            "first_loss": outcome.losses[0] if outcome.losses else None,
            "final_loss": sum(tail) / len(tail),
            "resumed_from_step": outcome.resumed_from,
            "rank": p.rank,
        }
        record.update(outcome.sharding or {})  # FSDP or DeepSpeed ZeRO: how the base model was split
        if drawn is not None:
            record["captions"] = drawn.record
        return StageResult(files=files, pools=pools, record=record, summary=f"loss {record['final_loss']:.4f}")
