"""`pipeline inspect`: look inside cached artifacts — the teacher's deltas, the schedule, the latents.

Each report is a plain dict (printed as tables, or as JSON with --json). Picture sheets decode latents
with the model's VAE, so they load models; the tables read only the store.
"""

from __future__ import annotations

from pathlib import Path

from cache.store import Manifest
from core.errors import PlanError
from stages.base import PlanEnv
from stages.teacher import TIMESTEP_BINS, timestep_bins
from stages.teacher import row_timestep as _t


def find_artifact(env: PlanEnv, workflow: str, stage: str) -> Manifest:
    """The artifact the current config resolves to, else the one the workflow's last run used."""
    from pipeline.planner import plan_workflow
    from pipeline.workflows import WORKFLOWS, get_workflow

    ref = env.store.read_ref(workflow)
    if not ref:  # before planning, which would name whatever setting the workflow lacks
        others = [w for w in WORKFLOWS if w != workflow and stage in env.store.read_ref(w)]
        hint = f"; the last {others[0]} run made one: add --workflow {others[0]}" if others else ""
        needs = " (set transfer.student_model to the Turbo / distilled model first)" if workflow == "transfer" else ""
        raise PlanError(
            f"there is no {workflow} run in this store yet, so no {stage} artifact to inspect. "
            f"`pipeline run {workflow}` makes one{needs}{hint}."
        )
    stages = get_workflow(workflow, env)
    if stage not in {s.name for s in stages}:
        names = ", ".join(s.name for s in stages)
        raise PlanError(f"workflow {workflow!r} has no stage {stage!r}; its stages are {names}.")
    plan = next(p for p in plan_workflow(env, stages, ref) if p.name == stage)
    if plan.manifest is not None:
        return plan.manifest
    last = env.store.load_manifest(stage, ref[stage]) if stage in ref else None
    if last is None:
        raise PlanError(f"there is no {stage} artifact yet. Make it with `pipeline run {workflow}`.")
    print(f"note: showing the last run's {stage} artifact; the current config would make a new one.")
    return last


def teacher_report(env: PlanEnv, teacher: Manifest, schedule: Manifest) -> dict:
    """Per array kind: count, shape, dtype, bytes on disk, non-finite values; |Δc| per timestep bin."""
    import numpy as np

    from stages.training.schedule import read_schedule

    doc, spec = read_schedule(env.store, schedule)
    pool = env.store.pool(teacher.record["pool"])
    kinds: dict[str, dict] = {}
    names_of: dict[str, list[str]] = {}
    for name in teacher.record["arrays"]:
        kind = {"c": "delta_cond", "u": "delta_uncond", "inputs": "input_digest"}[name.split(".")[1]]
        arr = pool.get(name)
        k = kinds.setdefault(
            kind, {"arrays": 0, "shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": 0, "nonfinite": 0}
        )
        k["arrays"] += 1
        names_of.setdefault(kind, []).append(name)
        if arr.dtype.kind == "f":
            k["nonfinite"] += int((~np.isfinite(arr)).sum())
    for kind, names in names_of.items():
        kinds[kind]["bytes"] = pool.stored_bytes(names)
    samples = spec.steps * spec.rows_per_step
    stored = sum(k["bytes"] for k in kinds.values())
    return {
        "stage": "teacher",
        "key": teacher.key,
        "steps": spec.steps,
        "rows_per_step": spec.rows_per_step,
        "delta_mode": teacher.contract["delta"]["mode"],
        "weights_dtype": teacher.record.get("weights_dtype", "fp32"),  # the teacher model's (transfer.weights_dtype)
        "arrays": kinds,
        "bytes_per_sample_step": stored / max(1, samples + spec.heldout),
        "bins": timestep_bins(teacher.record["stats"]["rows"], spec.num_timesteps),
    }


def teacher_sheet(
    env: PlanEnv, teacher: Manifest, schedule: Manifest, latents: Manifest, steps, out: Path
) -> list[str]:
    """PNG per chosen step: per row (slot), the clean image, the teacher's x0 prediction without and with its
    LoRA (T and T + Δc, one denoising step), and a heatmap of |Δc| over the latent (brighter = larger, scaled to
    the step's maximum, with a colour scale under the sheet); rows labelled with their timestep and caption, each
    cell at least 256 px high."""
    import numpy as np
    import torch

    from stages.devices import load_frozen, resolve_device
    from stages.families.noise import make_process
    from stages.pools import load_latent_table, load_text_table
    from stages.training.previews import heatmap, labelled_grid, with_colour_scale
    from stages.training.schedule import read_schedule, rebuild_inputs, row_chunks, step_rows, unpack_rows

    doc, spec = read_schedule(env.store, schedule)
    bad = [s for s in steps if not 0 <= s < spec.steps]
    if bad:
        raise PlanError(f"--step {bad[0]}: the schedule has steps 0 to {spec.steps - 1}.")
    device = resolve_device(env.config.runtime.device)
    family, layout = env.family, env.layout
    # the model as the teacher held it (transfer.weights_dtype), so the sheet shows the deltas it computed
    unet = load_frozen(
        family, layout, device, teacher.record.get("weights_dtype", "fp32"), env.config.runtime.attention
    )
    vae = family.load_vae(layout, device)
    process = make_process(schedule.contract["timesteps"], schedule.contract["prediction_type"])
    guidance = schedule.contract.get("guidance_embed")
    cond, row_of = load_text_table(env.store, teacher.record["text"])
    pool = env.store.pool(teacher.record["pool"])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for step in steps:
        rows = step_rows(doc, spec, step)
        lat = load_latent_table(env.store, latents.record, {r["latent"] for r in rows})
        deltas = unpack_rows(pool.get(f"{step:07d}.c").astype(np.float32), [lat[r["latent"]].shape for r in rows])
        cells = []  # per row: clean, teacher, +LoRA (PIL images) and the |Δc| map
        for chunk in row_chunks(rows, spec.batch_size, lat):  # one latent size per forward (buckets)
            x_t, t, _ = rebuild_inputs(chunk, lat, process)
            c = lat.sized(cond[[row_of[r["caption"]] for r in chunk]], chunk)
            delta = torch.from_numpy(np.stack(deltas[len(cells) : len(cells) + len(chunk)]))
            with torch.no_grad():
                base = family.predict(unet, x_t.to(device), t.to(device), c.to(device), guidance=guidance).float().cpu()
                x0 = torch.stack([torch.as_tensor(lat[r["latent"]]) for r in chunk])
                columns = [x0, process.predict_x0(x_t, base, t), process.predict_x0(x_t, base + delta, t)]
                pictures = [_to_images(family.decode_latents(vae, z).cpu()) for z in columns]
            cells += [([pics[i] for pics in pictures], delta[i].abs().mean(0)) for i in range(len(chunk))]
        top = max(float(h.max()) for _, h in cells)
        grid_rows = [[*pics, heatmap((heat / max(top, 1e-12)).numpy(), pics[0].size)] for pics, heat in cells]
        row_labels = [f"slot {i} · t = {row['t']}\n{row['caption'][:80]}" for i, row in enumerate(rows)]
        columns = [
            "clean image",
            "teacher x0 (no LoRA)",
            "teacher x0 + LoRA (T + delta c)",
            "|delta c|, mean over channels",
        ]
        title = f"teacher, schedule step {step}: one denoising step per row"
        sheet = with_colour_scale(labelled_grid(grid_rows, row_labels, columns, title)[0], top, "|delta c|")
        path = out / f"teacher-step{step:06d}.png"
        sheet.save(path)
        written.append(str(path))
    return written


def _to_images(pixels) -> list:
    from PIL import Image

    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def schedule_report(env: PlanEnv, schedule: Manifest, steps: list[int]) -> dict:
    """Counts, the timestep histogram, how often each item is drawn, and the rows of chosen steps."""
    from collections import Counter

    from stages.training.schedule import read_schedule, step_rows

    doc, spec = read_schedule(env.store, schedule)
    rows = doc["rows"]
    width = spec.num_timesteps / TIMESTEP_BINS
    hist = Counter(min(TIMESTEP_BINS - 1, int(_t(r, spec.num_timesteps) // width)) for r in rows)
    shown = {}
    for s in steps:
        if not 0 <= s < spec.steps:
            raise PlanError(f"--step {s}: the schedule has steps 0 to {spec.steps - 1}.")
        shown[s] = [
            {k: r[k] for k in ("k", "slot", "item", "caption", "t", "noise_seed", "noise_digest")}
            for r in step_rows(doc, spec, s)
        ]
    return {
        "stage": "schedule",
        "key": schedule.key,
        "spec": {k: v for k, v in doc["spec"].items()},
        "rows": len(rows),
        "heldout": len(doc["heldout"]),
        "dropped_captions": sum(1 for r in rows if r["caption"] == ""),
        "timesteps": [
            {"t": f"{round(b * width)}-{round((b + 1) * width) - 1}", "rows": hist.get(b, 0)}
            for b in range(TIMESTEP_BINS)
        ],
        "items": dict(sorted(Counter(r["item"] for r in rows).items())),
        "torch": doc.get("torch"),
        "steps": shown,
    }


def latents_report(env: PlanEnv, latents: Manifest) -> dict:
    """Count, shape, dtype, bytes, and per-channel mean and std of the cached latents."""
    import numpy as np

    pool = env.store.pool(latents.record["pool"])
    items = latents.record["items"]
    arrays = {v["array"]: v["digest"] for v in items.values()}
    names = sorted(arrays)
    stack = np.stack(list(pool.get_many(names, [arrays[a] for a in names]).values())).astype(np.float64)
    return {
        "stage": "latents",
        "key": latents.key,
        "items": len(items),
        "unique": len(arrays),
        "shape": list(stack.shape[1:]),
        "dtype": str(pool.get(next(iter(arrays))).dtype),
        "bytes": pool.stored_bytes(arrays),
        "nonfinite": int((~np.isfinite(stack)).sum()),
        "channels": [
            {"channel": c, "mean": float(stack[:, c].mean()), "std": float(stack[:, c].std())}
            for c in range(stack.shape[1])
        ],
        "latent_space": latents.contract.get("latent_space", {}).get("scaling_factor"),
    }


def latents_sheet(env: PlanEnv, latents: Manifest, out: Path, limit: int = 16) -> list[str]:
    """The first `limit` latents decoded by the VAE, side by side and named: what training actually sees."""
    import torch

    from stages.devices import resolve_device
    from stages.training.previews import labelled_row

    pool = env.store.pool(latents.record["pool"])
    items = sorted(latents.record["items"].items())[:limit]
    vae = env.family.load_vae(env.layout, resolve_device(env.config.runtime.device))
    z = torch.stack([torch.from_numpy(pool.get(v["array"], v["digest"])) for _, v in items])
    with torch.no_grad():
        images = _to_images(env.family.decode_latents(vae, z).cpu())
    sheet, _ = labelled_row(images, [name for name, _ in items], "latents, decoded by the VAE")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "latents.png"
    sheet.save(path)
    return [str(path)]
