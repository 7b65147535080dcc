"""Stage `teacher`: the teacher's prediction deltas on every schedule row (design.md §5).

Δc = T_L(x_t, t, c) − T(x_t, t, c), computed in fp32 with LoRA dropout off (transfer.weights_dtype may store the
weights narrower), both predictions from one batched forward (peft mixed-adapter batches) unless
runtime.teacher_batching = "two_pass". In cfg mode also Δu, the same with the unconditional caption. Stored per
optimizer step as one zarr array (one chunk), so an interrupted run resumes at the first step it had not
committed, and the student reads one chunk per step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cache.store import Manifest
from core import dist
from core.errors import PipelineError
from core.faults import fault_point
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.training.params import KeyedParams


class TeacherParams(KeyedParams):
    UNKEYED_WHEN_NONE = ("weights_dtype",)

    delta_mode: str
    delta_dtype: str
    uncond_caption: str | None  # only in cfg mode
    prediction_type: str
    compute_dtype: str = "fp32"
    lora_dropout: float = 0.0
    weights_dtype: str | None = None  # transfer.weights_dtype when not fp32 (stored narrower, computed in fp32)


class TeacherError(PipelineError):
    pass


EXTRA_PARTS = ("heldout", "fit")  # the rows fidelity is measured on: held-out images, and new draws on training ones


def array_names(steps: int, mode: str, heldout: int, fit: bool = False) -> list[str]:
    """Per step (and for the held-out and fit sets): `inputs` (a digest of the x_t, t and conditioning the teacher
    saw), `c` (Δc) and, in cfg mode, `u` (Δu). `inputs` is written first and the deltas last, so a step counts as
    done when its last array is committed."""
    kinds = ("inputs", "c", "u") if mode == "cfg" else ("inputs", "c")
    names = [f"{s:07d}.{k}" for s in range(steps) for k in kinds]
    names += [f"heldout.{k}" for k in kinds] if heldout else []
    return names + ([f"fit.{k}" for k in kinds] if heldout and fit else [])


class TeacherStage(Stage):
    name = "teacher"
    IMPL_VERSION = 1
    upstream = ("latents", "lora1", "schedule")
    contract_from = ("schedule",)
    description = "teacher deltas T_L - T on every schedule row"
    sharded = True  # several processes split the steps: each writes its own rows of the pool (cache/arrays.py)

    def params(self, env: PlanEnv) -> TeacherParams:
        t = env.config.transfer
        return TeacherParams(
            delta_mode=t.delta_mode,
            delta_dtype=t.delta_dtype,
            uncond_caption=t.uncond_caption if t.delta_mode == "cfg" else None,
            prediction_type=env.prediction_type,
            weights_dtype=None if t.weights_dtype == "fp32" else t.weights_dtype,
        )

    def inputs(self, env: PlanEnv) -> dict:
        d, denoiser = env.component_digests, env.family.lora_component
        return {"model": {denoiser: d[denoiser], "scheduler": d["scheduler"], "text": d["text"]}}

    def contract(self, env: PlanEnv, params: TeacherParams) -> dict:
        return {"delta": {"mode": params.delta_mode, "dtype": params.delta_dtype}}

    @staticmethod
    def pool_id(key: str) -> str:
        return f"teacher/{key[:32]}"

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        if not env.store.has_work(self.name, key):
            return None
        s = env.config.schedule
        names = array_names(env.schedule_steps(), env.config.transfer.delta_mode, s.heldout, s.heldout_images > 0)
        pool = env.store.pool(self.pool_id(key))
        return sum(pool.has(n) for n in names), len(names)

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np

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
        from stages.training.adapters import FixedLora
        from stages.training.lora_files import match_modules, read_lora_file
        from stages.training.outputs import trained_file
        from stages.training.schedule import read_schedule, step_rows

        env, p, store = ctx.env, ctx.params, ctx.store
        doc, spec = read_schedule(store, ctx.upstream["schedule"])
        strings = {r["caption"] for r in doc["rows"] + doc["heldout"] + doc.get("fit", [])}
        if p.delta_mode == "cfg":
            strings.add(p.uncond_caption)
        with dist.main_first():  # rank 0 encodes the captions into the store; the others then read them
            text = ensure_text_embeddings(
                store, env.family, env.layout, env.component_digests["text"], strings, ctx.runtime, ctx.progress
            )
        pid = self.pool_id(ctx.key)
        world, rank = dist.size(), dist.rank()
        pool = shared_pool(store, pid, True)  # several processes: each its own rows and log
        names = array_names(spec.steps, p.delta_mode, spec.heldout, bool(doc.get("fit")))
        todo = sorted({n.split(".")[0] for n in names if not pool.has(n)})
        dist.barrier()  # every rank has read what is done before any writes: all split the same list
        steps_left = sum(1 for part in todo if part not in EXTRA_PARTS)
        if todo and steps_left < spec.steps and dist.is_main():
            held = " and the held-out sets" if set(EXTRA_PARTS) & set(todo) else ""
            ctx.log(f"teacher: resuming, {steps_left} of {spec.steps} steps{held} to go")
        todo = todo[rank::world]  # this rank's share, whatever the world size of an earlier, killed run
        outputs = ctx.upstream["lora1"].outputs  # the diffusers file when trained here: exact module names and ranks
        lora_obj = trained_file(outputs)
        lora = read_lora_file(
            store.read_object(lora_obj["digest"], "the teacher LoRA"),
            env.family.kohya_prefix,
            env.family.lora_component,
            env.family.name,
        )
        # Errors name the file the user gave (transfer.teacher_lora), not its copy in the store.
        lora.path = Path(
            ctx.upstream["lora1"].record.get("imported_from") or f"the lora1 artifact {lora.path.name[:12]}"
        )
        device = resolve_device(ctx.runtime.device)
        denoiser = load_frozen_in_turn(ctx, env.family, env.layout, device, p.weights_dtype, bool(todo), "teacher")
        if todo:
            teacher = FixedLora(denoiser, match_modules(lora, denoiser, env.family.kohya_prefix), device)
            cond, row_of = load_text_table(store, text)
            rows = doc["rows"] + doc["heldout"] + doc.get("fit", [])
            latents = load_latent_table(store, ctx.upstream["latents"].record, {r["latent"] for r in rows})
            delta = DeltaComputer(
                env.family,
                teacher,
                make_process(ctx.upstream["schedule"].contract["timesteps"], p.prediction_type),
                latents,
                cond,
                row_of,
                spec,
                p,
                ctx.runtime.teacher_batching,
                device,
                ctx.upstream["schedule"].contract.get("guidance_embed"),
            )
            part_rows = lambda part: doc[part] if part in EXTRA_PARTS else step_rows(doc, spec, int(part))  # noqa: E731
            for n, part in enumerate(bar(todo, desc="teacher", unit="step", enabled=ctx.progress and dist.is_main())):
                chunk = part_rows(part)
                following = part_rows(todo[n + 1]) if n + 1 < len(todo) else []
                latents.need((r["latent"] for r in chunk), then=(r["latent"] for r in following))
                for kind, arr in delta(chunk, part).items():
                    pool.put(f"{part}.{kind}", arr)
                fault_point("teacher.step", n + 1)
        if not finish_shared_pool(store, pid, True):
            return StageResult()  # a rank > 0 of several: rank 0 records and commits
        pool = store.pool(pid)
        stats = delta_stats(pool, names, doc, spec, latent_shapes(ctx.upstream["latents"].record, spec))
        record = {
            "pool": pid,
            "arrays": names,
            "dtype": p.delta_dtype,
            "weights_dtype": p.weights_dtype or "fp32",
            "lora": {"digest": lora_obj["digest"], "format": lora.format, "modules": len(lora.modules)},
            "text": {"pool": text["pool"], "strings": text["strings"]},
            "stats": stats,
        }
        mean = float(np.mean([r["mean_abs"] for r in stats["rows"]])) if stats["rows"] else 0.0
        if ctx.tracker is not None and ctx.tracker.active:  # |Δc| against the timestep: the bin's first t as x
            for b in timestep_bins(stats["rows"], spec.num_timesteps):
                start = int(b["t"].split("-")[0])
                ctx.tracker.scalars(
                    start, {"teacher/mean_abs_delta": b["mean_abs"], "teacher/max_abs_delta": b["max_abs"]}
                )
        return StageResult(
            pools={pid: names},
            record=record,
            summary=f"{spec.steps} steps, mean |delta| {mean:.3g}, {stats['nonfinite']} non-finite",
        )


class DeltaComputer:
    """Δc (and Δu) of a list of schedule rows, one micro-batch at a time, in fp32; cast for storage."""

    def __init__(self, family, lora, process, latents, cond, row_of, spec, params, batching, device, guidance=None):
        self.family, self.lora, self.process, self.guidance = family, lora, process, guidance
        self.latents, self.cond, self.row_of = latents, cond, row_of
        self.spec, self.p, self.batching, self.device = spec, params, batching, device

    def __call__(self, rows: list[dict], where: str) -> dict:
        import numpy as np

        from stages.training.schedule import inputs_digest, pack_rows, rebuild_inputs, row_chunks

        kinds = ("c", "u") if self.p.delta_mode == "cfg" else ("c",)
        out: dict[str, list] = {k: [] for k in kinds}
        seen = hashlib.sha256()
        for chunk in row_chunks(rows, self.spec.batch_size, self.latents):
            x_t, t, _ = rebuild_inputs(chunk, self.latents, self.process)
            for kind in kinds:
                captions = [r["caption"] for r in chunk] if kind == "c" else [self.p.uncond_caption] * len(chunk)
                if kind == "c":
                    seen.update(inputs_digest(x_t, t, captions))
                cond = self.latents.sized(self.cond[[self.row_of[c] for c in captions]], chunk).to(self.device)
                x, tt = x_t.to(self.device), t.to(self.device)
                base, with_lora = self.lora.predict_both(self.family, x, tt, cond, self.batching, self.guidance)
                out[kind].append((with_lora - base).cpu())
        dtype = np.float16 if self.p.delta_dtype == "fp16" else np.float32
        arrays = {"inputs": np.frombuffer(seen.digest(), dtype=np.uint8).copy()}
        for kind, parts in out.items():
            d32 = pack_rows(parts)  # (rows, C, h, w); with buckets of several sizes, the rows flattened end to end
            if not np.isfinite(d32).all():
                raise TeacherError(
                    f"teacher: the prediction at {where} (timesteps {[r['t'] for r in rows]}) is NaN or Inf in "
                    f"fp32. The teacher model or LoRA file is broken; check it with `pipeline run lora` previews."
                )
            stored = d32.astype(dtype)
            if not np.isfinite(stored).all():
                raise TeacherError(
                    f"teacher: a delta at {where} is larger than fp16 can hold (max |delta| "
                    f'{np.abs(d32).max():.3g}). Set transfer.delta_dtype = "fp32".'
                )
            arrays[kind] = stored
        return arrays


def latent_shapes(latents_record: dict, spec) -> dict:
    """{latent name: (C, h, w)} of every stored view (all spec.latent_shape without buckets)."""
    shapes = {}
    for item in latents_record["items"].values():
        shape = tuple(item.get("shape") or spec.latent_shape)
        for view in item.get("views") or [item]:
            shapes[view["array"]] = shape
    return shapes


def delta_stats(pool, names: list[str], doc: dict, spec, shapes: dict) -> dict:
    """Per row: timestep, mean and max |Δc|; and the count of non-finite values in every array. shapes:
    {latent name: its shape} of the schedule's rows."""
    import numpy as np

    from stages.training.schedule import unpack_rows

    rows, nonfinite = [], 0
    for name in names:
        if name.endswith(".inputs"):
            continue
        arr = pool.get(name).astype(np.float32)
        nonfinite += int((~np.isfinite(arr)).sum())
        part, kind = name.split(".")
        if kind != "c" or part in EXTRA_PARTS:
            continue
        step_rows = doc["rows"][int(part) * spec.rows_per_step : (int(part) + 1) * spec.rows_per_step]
        per_row = unpack_rows(arr, [shapes[r["latent"]] for r in step_rows])
        for row, values in zip(step_rows, per_row, strict=True):
            values = np.abs(values)
            rows.append({"t": row["t"], "mean_abs": float(values.mean()), "max_abs": float(values.max())})
    return {"rows": rows, "nonfinite": nonfinite}


TIMESTEP_BINS = 10


def row_timestep(row: dict, num_timesteps: int) -> float:
    """A row's timestep on the 0..T scale: DDPM rows hold the integer t, flow-matching rows σ in [0, 1] (σ·T)."""
    return row["t"] * num_timesteps if isinstance(row["t"], float) else row["t"]


def timestep_bins(rows: list[dict], num_timesteps: int) -> list[dict]:
    """Rows (t, mean_abs, max_abs) in TIMESTEP_BINS equal bins of the 0..T scale: count, mean and max |Δc|."""
    width = num_timesteps / TIMESTEP_BINS
    out = []
    for b in range(TIMESTEP_BINS):
        lo, hi = round(b * width), round((b + 1) * width)
        inside = [
            r
            for r in rows
            if lo <= row_timestep(r, num_timesteps) < hi
            or (b == TIMESTEP_BINS - 1 and row_timestep(r, num_timesteps) >= hi)
        ]
        out.append(
            {
                "t": f"{lo}-{hi - 1}",
                "rows": len(inside),
                "mean_abs": sum(r["mean_abs"] for r in inside) / len(inside) if inside else None,
                "max_abs": max((r["max_abs"] for r in inside), default=None),
            }
        )
    return out
