"""Stage `schedule`: the materialized training plan of delta transfer (design.md §4).

For every optimizer step, micro-batch and slot: item, flip/crop, final caption string, timestep, and the
noise as a CPU seed plus its digest; and a set of held-out rows on which student fidelity is measured.
The teacher records its deltas on exactly these rows and the student replays them.
"""

from __future__ import annotations

import json

from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.training.captions import CaptionDraw, caption_draw, caption_tricks, subset_caption_draws
from stages.training.params import KeyedParams, noise_contract


class ScheduleParams(KeyedParams):
    UNKEYED_WHEN_NONE = ("captions", "subset_captions")

    steps: int
    batch_size: int
    grad_accum: int
    seed: int
    caption_dropout: float
    heldout: int
    heldout_images: int
    timesteps: dict
    prediction_type: str
    guidance_embed: float | None = None
    captions: CaptionDraw | None = None  # data's caption tricks, drawn into the training rows; None when off
    subset_captions: dict[str, CaptionDraw | None] | None = None  # [[data.subsets]] with tricks of their own


class ScheduleStage(Stage):
    name = "schedule"
    IMPL_VERSION = 2  # v2: timesteps drawn by the noise process (σ per row for flow matching)
    upstream = ("caption", "latents")
    description = "materialized schedule: item, caption, timestep and noise per step and slot"

    def params(self, env: PlanEnv) -> ScheduleParams:
        from core.errors import ConfigError
        from stages.base import guidance_embed_for

        s = env.config.schedule
        if s.heldout_images and s.heldout_images >= len(env.images):
            raise ConfigError(
                f"schedule.heldout_images = {s.heldout_images}, but the data set has {len(env.images)} images: at "
                f"least one must stay for training. Lower it (0: measure fidelity on the training images only)."
            )
        steps = env.schedule_steps()
        captions = caption_draw(env.config.data, steps)
        subsets = subset_caption_draws(env.config.data, steps)
        draws = {"data": captions} | {f"data.subsets ({n})": d for n, d in (subsets or {}).items()}
        dropping = [(where, d.dropout_rate) for where, d in draws.items() if d is not None and d.dropout_rate]
        if dropping and s.caption_dropout:
            where, rate = dropping[0]
            raise ConfigError(
                f"schedule.caption_dropout = {s.caption_dropout:g} and {where}.caption_dropout_rate = {rate:g} both "
                f"drop captions of the schedule's rows; set one of them to 0."
            )
        return ScheduleParams(
            **s.model_dump(
                include=set(ScheduleParams.model_fields)
                - {"timesteps", "guidance_embed", "captions", "subset_captions", "steps"}
            ),
            steps=steps,
            captions=captions,
            subset_captions=subsets,
            timesteps=env.model.timesteps(s, "schedule", env.config.latents.resolution),
            prediction_type=env.prediction_type,
            guidance_embed=guidance_embed_for(env.model, s.guidance_embed, "schedule.guidance_embed"),
        )

    def contract(self, env: PlanEnv, params: ScheduleParams) -> dict:
        return {
            "batch_size": params.batch_size,
            "grad_accum": params.grad_accum,
            "steps": params.steps,
            "seed": params.seed,
            "caption_dropout": params.caption_dropout,
            "heldout": params.heldout,
            "heldout_images": params.heldout_images,
            "timesteps": params.timesteps,
            "noise": {**noise_contract(params.timesteps), "storage": "cpu-seed+sha256"},
            "prediction_type": params.prediction_type,
            "guidance_embed": params.guidance_embed,  # the teacher's; None for models without a guidance embedding
        }

    def run(self, ctx: StageContext) -> StageResult:
        import torch

        from stages.families.noise import make_process
        from stages.training.schedule import ScheduleSpec, build_schedule, item_views

        p: ScheduleParams = ctx.params
        items = ctx.upstream["caption"].record["items"]
        spec = ScheduleSpec(
            steps=p.steps,
            batch_size=p.batch_size,
            grad_accum=p.grad_accum,
            seed=p.seed,
            caption_dropout=p.caption_dropout,
            heldout=p.heldout,
            heldout_images=p.heldout_images,
            num_timesteps=p.timesteps["num_train_timesteps"],
            latent_shape=tuple(ctx.upstream["latents"].record["shape"]),
        )
        views = item_views(ctx.upstream["latents"].record, items)
        tricks = caption_tricks(p)
        schedule = build_schedule(spec, items, make_process(p.timesteps, p.prediction_type), tricks, views)
        path = ctx.work_dir / "schedule.json"
        doc = {"spec": spec.__dict__, "torch": torch.__version__, **schedule}
        path.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True))
        strings = sorted({r["caption"] for r in schedule["rows"] + schedule["heldout"] + schedule["fit"]})
        record = {"spec": spec.__dict__, "rows": len(schedule["rows"]), "strings": strings, "torch": torch.__version__}
        if tricks is not None:
            drawn = {r["caption"] for r in schedule["rows"]}
            record["captions"] = {"slots": len(schedule["rows"]), "distinct": len(drawn)}
            ctx.log(f"schedule: {len(schedule['rows'])} training rows drew {len(drawn)} distinct caption strings")
        return StageResult(
            files={"schedule.json": path},
            record=record,
            summary=f"{p.steps} steps x {p.grad_accum * p.batch_size} slots, {p.heldout} held-out samples"
            + (f" on {len(schedule['heldout_items'])} held-out images" if schedule["heldout_items"] else ""),
        )
