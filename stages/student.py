"""Stage `student`: train a LoRA on the student model so that it adds the teacher's delta (design.md §5).

target = S(x_t, t, c) + g·Δc   (cond mode)      target = S + (1−g)·Δu + g·Δc   (cfg mode)

on exactly the schedule's rows, with S read from the prior artifact (or computed per step). g, the
learning rate, optimizer, rank, init and step count are student settings: changing them re-runs only
this stage. Fidelity, how well the learned delta S_L − S matches g·Δ on held-out rows, is measured at the
start, every runtime.fidelity_every steps and at the end.
"""

from __future__ import annotations

import math
import sys

from cache.store import Manifest
from core import dist
from core.errors import ConfigError
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.training.params import LoraTrainParams, section_fields


class StudentParams(LoraTrainParams):
    guidance: float
    init: str
    guidance_embed: float | None = None


def student_guidance(env: PlanEnv) -> float | None:
    """student.guidance_embed, else schedule.guidance_embed, for a student with a guidance embedding."""
    from stages.base import guidance_embed_for

    s = env.config.student
    if s.guidance_embed is not None:
        return guidance_embed_for(env.student, s.guidance_embed, "student.guidance_embed")
    if not env.student.family.has_guidance_embed(env.student.layout):
        return None
    return guidance_embed_for(env.student, env.config.schedule.guidance_embed, "schedule.guidance_embed")


class StudentStage(Stage):
    name = "student"
    # v2: the kohya file names the trained SD version (ss_v2, ss_base_model_version); v3: the training settings in
    # the files (ss_*), and ss_output_name
    IMPL_VERSION = 4  # v4: under mixed precision the frozen base is stored in bf16/fp16
    upstream = ("latents", "schedule", "teacher", "prior")
    trained_section = "student"
    contract_from = ("teacher", "prior")
    enforce_contract = True
    description = "student LoRA trained on prior + g * teacher delta"
    sharded = True  # several processes split each step's micro-steps (schedule.grad_accum)

    def params(self, env: PlanEnv) -> StudentParams:
        s, sched, total = env.config.student, env.config.schedule, env.schedule_steps()
        steps = s.steps or total
        if steps > total:
            raise ConfigError(
                f"student.steps = {steps} is more than the schedule's {total} steps: the teacher records deltas "
                f"for {total} steps. Lower student.steps, or raise schedule.steps (which re-runs the teacher)."
            )
        fields = section_fields(s, StudentParams, exclude={"steps", "guidance_embed"})
        return StudentParams(
            **fields,
            **env.train_fields(
                s,
                "student",
                model=env.student,
                timestep_settings=sched,
                steps=steps,
                grad_accum=sched.grad_accum,
                grad_accum_field="schedule.grad_accum",
            ),
            steps=steps,
            batch_size=sched.batch_size,
            grad_accum=sched.grad_accum,
            prediction_type=env.student.auto_prediction_type,
            guidance_embed=student_guidance(env),
        )

    def inputs(self, env: PlanEnv) -> dict:
        d, denoiser = env.student.component_digests, env.student.family.lora_component
        return {"model": {f"student {denoiser}": d[denoiser], "student scheduler": d["scheduler"]}}

    def preflight(self, env: PlanEnv, params: StudentParams) -> None:
        from stages.devices import resolve_device
        from stages.training.precision import check_precision

        check_precision(params.mixed_precision, resolve_device(env.config.runtime.device), params.fp8_base, "student")
        if params.init == "teacher":
            check_teacher_init(env, params)
        world = dist.size()
        if world > 1 and params.grad_accum % world and dist.is_main():  # said before the teacher runs, not after
            alone = " and hold the whole model (no FSDP or ZeRO)" if dist.fsdp() or dist.zero() else ""
            print(
                f"warning: student: schedule.grad_accum = {params.grad_accum} is not a multiple of the {world} "
                f"processes, so the student will train on process 0 alone{alone}. To split it, set "
                f"schedule.grad_accum to a multiple of {world}: it is part of the schedule, so changing it re-runs "
                f"the schedule, teacher and prior (stop now if they are about to run).",
                file=sys.stderr,
                flush=True,
            )

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        from stages.training.checkpoints import checkpoint_step

        if not env.store.has_work(self.name, key):
            return None
        return checkpoint_step(env.store.work_dir(self.name, key, create=False)), self.params(env).steps

    def run(self, ctx: StageContext) -> StageResult:
        from stages.devices import resolve_device
        from stages.pools import load_latent_table, load_mask_table, load_text_table
        from stages.training.loop import TrainJob, train_lora
        from stages.training.lora_files import read_lora_file
        from stages.training.outputs import snapshot_writer, training_metadata, write_lora_outputs
        from stages.training.precision import compute_dtype
        from stages.training.previews import preview_specs
        from stages.training.schedule import read_schedule

        env, p, store = ctx.env, ctx.params, ctx.store
        student = env.student
        model_name = env.loaded.resolve(env.config.transfer.student_model).name
        metadata = {
            **student.family.lora_metadata(student.layout, p.prediction_type),
            **training_metadata(p, env.config.latents.resolution, model_name),
        }
        doc, spec = read_schedule(store, ctx.upstream["schedule"])
        teacher, prior = ctx.upstream["teacher"], ctx.upstream["prior"]
        cond, row_of = load_text_table(store, prior.record["text"])
        latents = load_latent_table(store, ctx.upstream["latents"].record, {r["latent"] for r in doc["rows"]})
        sets = {"heldout": doc["heldout"], "fit": doc.get("fit", [])}
        heldout_latents = load_latent_table(
            store, ctx.upstream["latents"].record, {r["latent"] for rows in sets.values() for r in rows}
        )
        world = dist.size()
        if world > 1 and spec.grad_accum % world:  # a step's micro-steps cannot be split evenly: rank 0 trains
            if not dist.is_main():
                return StageResult()
            alone = " and holds the whole model (no FSDP or ZeRO)" if dist.fsdp() or dist.zero() else ""
            ctx.log(
                f"student: schedule.grad_accum = {spec.grad_accum} is not a multiple of the {world} processes, so "
                f"the student trains on process 0 alone{alone}; set schedule.grad_accum to a multiple of {world} to "
                f"split it"
            )
            world = 1
        device = resolve_device(ctx.runtime.device)
        batches = TransferBatches(
            student.family, doc, spec, latents, cond, row_of, store, teacher, prior, p.guidance, p.guidance_embed
        )
        batches.shard = (dist.rank() if world > 1 else 0, world)
        batches.compute_dtype = compute_dtype(p.mixed_precision)
        if "masks" in ctx.upstream["latents"].record:  # data.alpha_mask: the student's loss is masked as lora1's
            batches.masks = load_mask_table(store, ctx.upstream["latents"].record, latents)
        fidelity = Fidelity(
            student.family,
            student,
            p,
            sets,
            heldout_latents,
            cond,
            row_of,
            store,
            teacher,
            spec,
            device,
            ctx.runtime.teacher_batching,
        )
        init = None
        if p.init == "teacher":
            obj = ctx.upstream["teacher"].record["lora"]["digest"]
            init = read_lora_file(
                store.read_object(obj, "the teacher LoRA"),
                student.family.kohya_prefix,
                student.family.lora_component,
                student.family.name,
            )
        preview = ctx.runtime.preview
        job = TrainJob(
            family=student.family,
            layout=student.layout,
            prediction_type=p.prediction_type,
            params=p,
            device=device,
            work_dir=ctx.work_dir,
            checkpoint_every=ctx.runtime.checkpoint_every,
            preview=preview,
            preview_prompts=preview_specs(preview, [r["caption"] for r in doc["rows"][:1]]),
            progress=ctx.progress and dist.is_main(),
            processes=world,
            split_accum=True,
            gradient_checkpointing=ctx.runtime.gradient_checkpointing,
            attention=ctx.runtime.attention,
            log=ctx.log,
            tracker=ctx.tracker,
            label=ctx.node,
            stage="student",
            init_lora=init,
            evaluate=fidelity if fidelity.rows else None,
            eval_every=ctx.runtime.fidelity_every,
            snapshot=snapshot_writer(student.family, p, ctx.work_dir, "student", metadata),
        )
        outcome = train_lora(job, batches)
        if not dist.is_main():  # rank 0 writes the files; the runner commits them after every rank finished
            return StageResult()
        files = write_lora_outputs(student.family, outcome, p, ctx.work_dir, "student", metadata)
        fid_csv = ctx.work_dir / "fidelity.csv"
        columns = ["cosine", "rel_error"] + (["fit_cosine", "fit_rel_error"] if sets["fit"] else [])
        lines = [",".join([str(e["step"])] + [f"{e[c]:.6g}" for c in columns]) + "\n" for e in outcome.evals]
        fid_csv.write_text(",".join(["step", *columns]) + "\n" + "".join(lines))
        files["fidelity.csv"] = fid_csv
        tail = outcome.losses[-min(10, len(outcome.losses)) :]
        final = outcome.evals[-1] if outcome.evals else None
        record = {
            "first_loss": outcome.losses[0] if outcome.losses else None,
            "final_loss": sum(tail) / len(tail),
            "resumed_from_step": outcome.resumed_from,
            "guidance": p.guidance,
            "init": p.init,
            "steps": p.steps,
            "fidelity": {
                "final": final,
                "curve": outcome.evals,
                "heldout": len(fidelity.rows),
                "heldout_images": doc.get("heldout_items", []),
            },
        }
        record.update(outcome.sharding or {})  # FSDP or DeepSpeed ZeRO: how the base model was split
        summary = f"loss {record['final_loss']:.4g}"
        if final and "fit_cosine" in final:
            summary += (
                f", fit on training images cos {final['fit_cosine']:.3f} rel.err {final['fit_rel_error']:.3f}"
                f", fidelity on held-out images cos {final['cosine']:.3f} rel.err {final['rel_error']:.3f}"
            )
        elif final:
            summary += f", fidelity cos {final['cosine']:.3f} rel.err {final['rel_error']:.3f}"
        where = f"{len(doc.get('heldout_items', []))} held-out images" if sets["fit"] else "the training images"
        ctx.log(f"student: {summary} ({len(fidelity.rows)} samples on {where}; fidelity.csv has the curve)")
        return StageResult(files=files, record=record, summary=summary)


def check_teacher_init(env: PlanEnv, p: StudentParams) -> None:
    """student.init = "teacher" copies LoRA-1 into the student LoRA: same rank, alpha and targets, or say which."""
    from stages.training.lora_files import file_alpha

    t = env.config.transfer
    plain = 'copies plain LoRA factors (A, B) from the teacher LoRA into the student LoRA; use student.init = "zero"'
    if p.network != "lora":
        raise ConfigError(f'student.init = "teacher" {plain} with student.network = "{p.network}".')
    if t.teacher_lora is not None:
        from stages.training.lora_files import read_lora_file

        lora = read_lora_file(
            env.loaded.resolve(t.teacher_lora), env.family.kohya_prefix, env.family.lora_component, env.family.name
        )
        if lora.network != "lora":
            raise ConfigError(f'student.init = "teacher" {plain}: {t.teacher_lora} is a {lora.network.upper()}.')
        rank, alpha, source = max(lora.ranks), max(lora.alphas), "the teacher LoRA file"
        if len(lora.ranks) > 1:
            raise ConfigError(f'student.init = "teacher": {t.teacher_lora} has mixed ranks {sorted(lora.ranks)}.')
    else:
        l1 = env.config.lora1
        if l1.network != "lora" or l1.lora_init != "gaussian":
            what = l1.network.upper() if l1.network != "lora" else f"{l1.lora_init} LoRA (written as rank 2r)"
            raise ConfigError(f'student.init = "teacher" {plain}: lora1 trains a {what}.')
        rank, alpha, source = l1.rank, file_alpha(l1.rank, l1.alpha, l1.rslora), "lora1"
        if sorted(env.targets(l1.targets)) != sorted(p.targets):
            raise ConfigError(
                f'student.init = "teacher" needs the teacher LoRA\'s targets: student.targets = {p.targets} but '
                f'lora1.targets = {env.targets(l1.targets)}. Set them equal, or use student.init = "zero".'
            )
    if rank != p.rank or not math.isclose(alpha, file_alpha(p.rank, p.alpha, p.rslora), rel_tol=1e-6):
        want = alpha / math.sqrt(rank) if p.rslora else alpha  # the student alpha with the teacher's scale
        raise ConfigError(
            f'student.init = "teacher" copies {source} (rank {rank}, scale {alpha / rank:g}) into the student LoRA, '
            f"but student.rank = {p.rank}, student.alpha = {p.alpha:g}"
            + (" with rslora" if p.rslora else "")
            + f'. Set student.rank = {rank} and student.alpha = {want:g}, or use student.init = "zero".'
        )


class TeacherDeltas:
    """The teacher's stored deltas, one optimizer step's array at a time (one zarr chunk per step)."""

    def __init__(self, store, teacher: Manifest):
        self.pool = store.pool(teacher.record["pool"])
        self.mode = teacher.contract["delta"]["mode"]
        self._cache: dict[str, object] = {}

    def get(self, part: str, kind: str):
        import torch

        name = f"{part}.{kind}"
        if name not in self._cache:
            self._cache = {name: torch.from_numpy(self.pool.get(name).astype("float32"))}
        return self._cache[name]

    def target_delta(self, part: str, rows: slice, g: float, shapes: list[tuple[int, ...]]):
        """g·Δc, or (1−g)·Δu + g·Δc in cfg mode, of the rows `rows` of a part whose rows have these shapes."""
        delta = g * step_slice(self.get(part, "c"), shapes, rows)
        if self.mode == "cfg":
            delta = delta + (1 - g) * step_slice(self.get(part, "u"), shapes, rows)
        return delta


def step_slice(array, shapes: list[tuple[int, ...]], rows: slice):
    """Rows of a per-step array as the teacher and prior store them (stages/training/schedule.py pack_rows)."""
    import torch

    from stages.training.schedule import unpack_rows

    if array.ndim > 1:
        return array[rows]
    return torch.stack(unpack_rows(array, shapes)[rows])


class TransferBatches:
    """Student micro-batches replayed from the schedule: x_t, t and conditioning rebuilt bit-identically."""

    def __init__(
        self, family, doc, spec, latents, cond, row_of, store, teacher: Manifest, prior: Manifest, g, guidance=None
    ):
        self.family, self.doc, self.spec, self.guidance = family, doc, spec, guidance
        self.latents, self.cond, self.row_of, self.g = latents, cond, row_of, g
        self.deltas = TeacherDeltas(store, teacher)
        self.prior_pool = store.pool(prior.record["pool"]) if prior.record["mode"] == "materialized" else None
        self._prior: tuple[int, object] | None = None
        self.masks: dict | None = None  # {latent digest: (1, h, w) loss mask} with data.alpha_mask
        self.shard = (0, 1)  # (rank, world) when several processes split each step's micro-steps
        # the on-the-fly prior's autocast dtype: the training's mixed precision (its base is stored in it), else None
        self.compute_dtype = None

    def inputs(self, k: int, process):
        """(x_t, t, cond, captions) of micro-step k, rebuilt from the schedule alone."""
        from stages.training.schedule import rebuild_inputs

        b = self.spec.batch_size
        rows = self.doc["rows"][k * b : (k + 1) * b]
        captions = [r["caption"] for r in rows]
        following = self.doc["rows"][(k + 1) * b : (k + 2) * b]
        self.latents.need((r["latent"] for r in rows), then=(r["latent"] for r in following))
        x_t, t, _ = rebuild_inputs(rows, self.latents, process)
        return x_t, t, self.latents.sized(self.cond[[self.row_of[c] for c in captions]], rows), captions

    def verify(self, k: int, x_t, t, captions: list[str], process=None) -> None:
        """Hash micro-step k into its step's digest; at the step's last micro-step, compare with the teacher's. A
        rank of several (self.shard = (rank, world)) sees every world-th micro-step only: at its first one of a step
        it rebuilds the step's others to hash them all in order."""
        import hashlib

        import numpy as np

        from stages.training.schedule import ScheduleMismatch, inputs_digest

        step, micro = divmod(k, self.spec.grad_accum)
        rank, world = self.shard
        if world > 1:
            if micro != rank:
                return
            self._seen = hashlib.sha256()
            for m in range(self.spec.grad_accum):
                mine = (x_t, t, None, captions)
                other = mine if m == micro else self.inputs(step * self.spec.grad_accum + m, process)
                self._seen.update(inputs_digest(other[0], other[1], other[3]))
            micro = self.spec.grad_accum - 1
        else:
            if micro == 0:
                self._seen = hashlib.sha256()
            self._seen.update(inputs_digest(x_t, t, captions))
        if micro == self.spec.grad_accum - 1:
            want = bytes(np.asarray(self.deltas.pool.get(f"{step:07d}.inputs"), dtype=np.uint8))
            if self._seen.digest() != want:
                raise ScheduleMismatch(
                    f"student: step {step + 1} rebuilt x_t, t or captions that differ from what the teacher saw. "
                    f"The latents or the schedule changed under the teacher artifact; run `pipeline run transfer`."
                )

    def micro_batch(self, k: int, denoiser, process):
        import torch

        from stages.training.adapters import predict_base

        step, micro = divmod(k, self.spec.grad_accum)
        b = self.spec.batch_size
        x_t, t, cond, captions = self.inputs(k, process)
        self.verify(k, x_t, t, captions, process)
        rows = slice(micro * b, (micro + 1) * b)
        n = self.spec.rows_per_step
        shapes = [tuple(self.latents[r["latent"]].shape) for r in self.doc["rows"][step * n : (step + 1) * n]]
        if self.prior_pool is not None:
            if self._prior is None or self._prior[0] != step:
                self._prior = (step, torch.from_numpy(self.prior_pool.get(f"{step:07d}")))
            prior = step_slice(self._prior[1], shapes, rows)
        else:
            model = getattr(denoiser, "module", denoiser)
            device = next(model.parameters()).device
            with torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.compute_dtype is not None):
                prior = predict_base(self.family, model, x_t.to(device), t.to(device), cond.to(device), self.guidance)
            prior = prior.float().cpu()
        target = prior + self.deltas.target_delta(f"{step:07d}", rows, self.g, shapes)
        if self.masks is None:
            return x_t, t, cond, target
        chunk = self.doc["rows"][k * b : (k + 1) * b]
        from stages.pools import mask_or_ones

        masks = [mask_or_ones(self.masks, r["latent"], self.latents[r["latent"]].shape) for r in chunk]
        return x_t, t, cond, target, torch.stack([torch.as_tensor(m) for m in masks])


class Fidelity:
    """How well the student's learned delta S_L − S matches the teacher's g·Δ: on the held-out rows (cosine,
    rel_error; on held-out images when the schedule holds some out) and on the fit rows, new draws on the
    training images (fit_cosine, fit_rel_error)."""

    def __init__(self, family, student, p, sets, latents, cond, row_of, store, teacher, spec, device, batching):
        self.family, self.sets, self.latents, self.cond, self.row_of = family, sets, latents, cond, row_of
        self.rows = sets["heldout"]
        self.g, self.spec, self.device, self.batching = p.guidance, spec, device, batching
        self.deltas = TeacherDeltas(store, teacher) if self.rows else None
        from stages.families.noise import make_process

        self.process = make_process(p.timesteps, p.prediction_type) if self.rows else None
        self.guidance = p.guidance_embed

    def __call__(self, denoiser) -> dict:
        out = self.measure(denoiser, "heldout")
        if self.sets.get("fit"):
            out.update({f"fit_{k}": v for k, v in self.measure(denoiser, "fit").items()})
        return out

    def measure(self, denoiser, part: str) -> dict:
        import torch

        from stages.training.adapters import predict_both
        from stages.training.schedule import rebuild_inputs, row_chunks

        learned, wanted = [], []
        rows = self.sets[part]
        shapes = [tuple(self.latents[r["latent"]].shape) for r in rows]
        start = 0
        for chunk in row_chunks(rows, self.spec.batch_size, self.latents):
            x_t, t, _ = rebuild_inputs(chunk, self.latents, self.process)
            cond = self.latents.sized(self.cond[[self.row_of[r["caption"]] for r in chunk]], chunk)
            x_t, t, cond = x_t.to(self.device), t.to(self.device), cond.to(self.device)
            base, with_lora = predict_both(self.family, denoiser, "default", x_t, t, cond, self.batching, self.guidance)
            learned.append((with_lora - base).cpu().flatten(1))
            wanted.append(self.deltas.target_delta(part, slice(start, start + len(chunk)), self.g, shapes).flatten(1))
            start += len(chunk)
        learned = [row.double() for part_rows in learned for row in part_rows]
        wanted = [row.double() for part_rows in wanted for row in part_rows]
        if len({r.numel() for r in learned}) == 1:
            learned, wanted = torch.stack(learned), torch.stack(wanted)
            norms = learned.norm(dim=1) * wanted.norm(dim=1)
            cos = torch.where(norms > 0, (learned * wanted).sum(1) / norms.clamp_min(1e-300), torch.zeros_like(norms))
        else:  # rows of several buckets differ in length: a cosine per row, the relative error over all values
            cos = torch.stack([cosine(a, b) for a, b in zip(learned, wanted, strict=True)])
            learned, wanted = torch.cat(learned), torch.cat(wanted)
        rel = (learned - wanted).norm() / wanted.norm().clamp_min(1e-300)
        return {"cosine": float(cos.mean()), "rel_error": float(rel)}


def cosine(a, b):
    """The cosine of two vectors, 0 when either is zero."""
    import torch

    norms = a.norm() * b.norm()
    return (a * b).sum() / norms.clamp_min(1e-300) if norms > 0 else torch.zeros((), dtype=a.dtype)
