"""Stage `prior`: the student's own prediction S(x_t, t, c), LoRA off, on every schedule row (design.md §5).

It does not depend on the student LoRA, so it is computed once per (student model, schedule) and every
student run becomes plain regression: one forward and backward per step. It also holds the student's
text embeddings of the schedule's caption strings (shared with the teacher's when the encoders are equal).
With student.prior = "on_the_fly" only the embeddings are made here and the student computes S each step.
"""

from __future__ import annotations

from cache.store import Manifest
from core import dist
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.training.params import KeyedParams


class PriorParams(KeyedParams):
    UNKEYED_WHEN_NONE = ("weights_dtype",)

    mode: str
    prediction_type: str
    compute_dtype: str = "fp32"
    guidance_embed: float | None = None  # the student's, for a student with a guidance embedding
    weights_dtype: str | None = None  # transfer.weights_dtype when not fp32 and the prior is stored


class PriorStage(Stage):
    name = "prior"
    IMPL_VERSION = 1
    upstream = ("latents", "schedule")
    contract_from = ("schedule",)
    description = "student prior S(x_t, t, c) per schedule step"
    sharded = True  # several processes split the steps, as the teacher does

    def params(self, env: PlanEnv) -> PriorParams:
        from stages.student import student_guidance

        weights = env.config.transfer.weights_dtype
        return PriorParams(
            mode=env.config.student.prior,
            prediction_type=env.student.auto_prediction_type,
            guidance_embed=student_guidance(env),
            # on the fly the student computes the prior with its own (training) model
            weights_dtype=None if weights == "fp32" or env.config.student.prior != "materialized" else weights,
        )

    def inputs(self, env: PlanEnv) -> dict:
        d, denoiser = env.student.component_digests, env.student.family.lora_component
        return {
            "model": {
                f"student {denoiser}": d[denoiser],
                "student scheduler": d["scheduler"],
                "student text": d["text"],
            }
        }

    def contract(self, env: PlanEnv, params: PriorParams) -> dict:
        # The student's side of the contract: it must equal the teacher's (schedule) values, or planning stops.
        return {
            "latent_space": env.student.latent_space,
            "prediction_type": params.prediction_type,
            "timesteps": env.student.timesteps(
                env.config.schedule, "schedule", env.config.latents.resolution, schedule_of=env.model
            ),
        }

    @staticmethod
    def pool_id(key: str) -> str:
        return f"prior/{key[:32]}"

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        if not env.store.has_work(self.name, key) or env.config.student.prior != "materialized":
            return None
        pool = env.store.pool(self.pool_id(key))
        steps = env.schedule_steps()
        return sum(pool.has(f"{s:07d}") for s in range(steps)), steps

    def run(self, ctx: StageContext) -> StageResult:
        import torch

        from core.faults import fault_point
        from core.progress import bar
        from stages.devices import load_frozen_in_turn, resolve_device
        from stages.families.noise import make_process
        from stages.pools import (
            ensure_text_embeddings,
            finish_shared_pool,
            load_latent_table,
            load_text_table,
            shared_pool,
        )
        from stages.training.schedule import pack_rows, read_schedule, rebuild_inputs, row_chunks, step_rows

        env, p, store = ctx.env, ctx.params, ctx.store
        student = env.student
        doc, spec = read_schedule(store, ctx.upstream["schedule"])
        strings = {r["caption"] for r in doc["rows"] + doc["heldout"] + doc.get("fit", [])}
        text_model = student.component_digests["text"]
        with dist.main_first():  # rank 0 encodes the captions into the store; the others then read them
            text = ensure_text_embeddings(
                store, student.family, student.layout, text_model, strings, ctx.runtime, ctx.progress
            )
        record = {"mode": p.mode, "text": {"pool": text["pool"], "strings": text["strings"]}}
        pools = {text["pool"]: sorted(v["array"] for v in text["strings"].values())}
        if p.mode != "materialized":
            return StageResult(pools=pools, record=record, summary="computed by the student on the fly")
        pid = self.pool_id(ctx.key)
        world, rank = dist.size(), dist.rank()
        pool = shared_pool(store, pid, True)  # several processes: each its own rows and log
        names = [f"{s:07d}" for s in range(spec.steps)]
        todo = [s for s in range(spec.steps) if not pool.has(names[s])]
        dist.barrier()  # every rank has read what is done before any writes
        computed = len(todo)
        if 0 < len(todo) < spec.steps and dist.is_main():
            ctx.log(f"prior: resuming, {len(todo)} of {spec.steps} steps to go")
        todo = todo[rank::world]
        device = resolve_device(ctx.runtime.device)
        unet = load_frozen_in_turn(ctx, student.family, student.layout, device, p.weights_dtype, bool(todo), "prior")
        if todo:
            process = make_process(ctx.upstream["schedule"].contract["timesteps"], p.prediction_type)
            cond, row_of = load_text_table(store, text)
            latents = load_latent_table(store, ctx.upstream["latents"].record, {r["latent"] for r in doc["rows"]})
            for n, s in enumerate(bar(todo, desc="prior", unit="step", enabled=ctx.progress and dist.is_main())):
                rows = step_rows(doc, spec, s)
                following = step_rows(doc, spec, todo[n + 1]) if n + 1 < len(todo) else []
                latents.need((r["latent"] for r in rows), then=(r["latent"] for r in following))
                outs = []
                for chunk in row_chunks(rows, spec.batch_size, latents):
                    x_t, t, _ = rebuild_inputs(chunk, latents, process)
                    c = latents.sized(cond[[row_of[r["caption"]] for r in chunk]], chunk)
                    with torch.no_grad():
                        pred = student.family.predict(
                            unet, x_t.to(device), t.to(device), c.to(device), guidance=p.guidance_embed
                        ).float()
                    outs.append(pred.cpu())
                pool.put(names[s], pack_rows(outs))
                fault_point("prior.step", n + 1)
        if not finish_shared_pool(store, pid, True):
            return StageResult()  # a rank > 0 of several: rank 0 records and commits
        record["pool"] = pid
        pools[pid] = names
        return StageResult(pools=pools, record=record, summary=f"{computed} steps computed")
