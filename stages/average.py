"""Stage `average` (differential LoRA): the mean ΔW of every pair's LoRA-2, exact or SVD-compressed.

Exact: the factors are concatenated along the rank with a 1/N scale (rank N·r), so the result's ΔW is the
mean ΔW to float precision. differential.average_rank = k compresses it to rank k and records the relative
Frobenius error per module. Averaging the A and B factors separately is never done: each pair's LoRA-2
starts from a different random init, and mean(B)·mean(A) is not the mean of the products.
"""

from __future__ import annotations

from pydantic import BaseModel

from stages.base import PlanEnv, Stage, StageContext, StageResult


class AverageParams(BaseModel):
    rank: int  # 0: exact


class AverageStage(Stage):
    name = "average"
    IMPL_VERSION = 1
    upstream = ()  # one role per pair, `lora2.<pair>`, given by the workflow
    description = "mean ΔW of the pairs' LoRA-2s"

    def params(self, env: PlanEnv) -> AverageParams:
        return AverageParams(rank=env.config.differential.average_rank)

    def run(self, ctx: StageContext) -> StageResult:
        from stages.training.lora_files import read_lora_file
        from stages.training.lora_ops import average, save_modules

        env, p = ctx.env, ctx.params
        family = env.family
        loras = []
        for role in sorted(ctx.upstream):
            obj = ctx.upstream[role].outputs["diffusers/pytorch_lora_weights.safetensors"]
            path = ctx.store.read_object(obj["digest"], f"the {role} LoRA")
            lora = read_lora_file(path, family.kohya_prefix, family.lora_component, family.name)
            lora.path = ctx.store.object_path(obj["digest"]).with_name(f"{role}.safetensors")  # names in errors
            loras.append(lora)
        result = average(loras, p.rank or None)
        kohya = ctx.work_dir / "lora2_average.safetensors"
        meta = {"lora_pipeline.average_of": ", ".join(sorted(ctx.upstream))}
        save_modules(result.modules, "kohya", kohya, family, meta)
        diffusers_file = ctx.work_dir / "pytorch_lora_weights.safetensors"
        save_modules(result.modules, "diffusers", diffusers_file, family, meta)
        rank = max(m.rank for m in result.modules.values())
        record = {"pairs": sorted(ctx.upstream), "rank": rank, "exact": not p.rank, "rel_error": result.rel_error}
        error = result.total_rel_error
        summary = f"{len(loras)} LoRA-2s, rank {rank}" + (f", max rel. error {error:.3g}" if p.rank else " (exact)")
        return StageResult(
            files={"lora2_average.safetensors": kohya, "diffusers/pytorch_lora_weights.safetensors": diffusers_file},
            record=record,
            summary=summary,
        )
