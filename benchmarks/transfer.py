"""Delta transfer costs, each against a baseline measured in the same run:

1. a student step with the materialized prior vs a plain lora1 step on the same model (target <= 1.05x), and
   vs a student step that computes the prior on the fly;
2. teacher time per step (both predictions, fp32 delta, digest, cast) vs one batched double forward
   (target <= 1.1x), for mixed-adapter batches and for two passes;
3. a student-only re-run (new learning rate): the upstream stages' work (must be zero) and the wall time;
4. teacher storage per sample-step, fp16 and fp32.

It builds a project on the "small" UNet of benchmarks/overhead.py (cross-attention 32; latents 32x32), or with
--family on the family's "small" tiny model: a Z-Image, FLUX.2, FLUX.1 or Qwen-Image-shaped transformer (~6-7M
parameters, 256 image tokens) or an SDXL-shaped UNet (three levels, 32x32 latents), with its sibling (FLUX.1:
the [schnell]-like one), runs `pipeline run transfer` once, then times the loops on the artifacts that run made.
For every family but sd15 (benchmarks/overhead.py has its own) it also times 5. a lora1 step vs a bare PyTorch
loop (diffusers model + peft LoRA + AdamW, the family's noise process).

    .venv/bin/python benchmarks/transfer.py [--family sd15|sdxl|zimage|flux2|flux1|qwenimage] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from overhead import MODELS, build_model, median_step  # noqa: E402

# overhead.py's small UNet, with cross-attention as wide as the tiny text encoder (32): the whole pipeline
# runs, text encoding included, so the UNet must accept that encoder's embeddings.
SMALL = {**MODELS["small"][0], "cross_attention_dim": 32}

from cache.store import Manifest, Store  # noqa: E402
from pipeline.config_loading import load_config  # noqa: E402
from pipeline.runner import run_workflow  # noqa: E402
from stages.base import PlanEnv  # noqa: E402
from stages.families.noise import make_process  # noqa: E402
from stages.families.tiny import build_tiny_turbo  # noqa: E402
from stages.training.loop import DiffusionBatches, TrainData, TrainJob, train_lora  # noqa: E402


def make_project(root: Path, steps: int, family: str = "sd15") -> Path:
    from pipeline.demo import write_images
    from tests.conftest import toml_config

    if family == "sd15":
        build_model(root / "model", SMALL)
        build_tiny_turbo(root / "model", root / "student")
    elif family == "sdxl":
        from stages.families.tiny import build_tiny_sdxl

        build_tiny_sdxl(root / "model", size="small")
        build_tiny_turbo(root / "model", root / "student")
    else:
        from stages.families import tiny_flow

        builders = {"zimage": tiny_flow.build_tiny_zimage, "flux2": tiny_flow.build_tiny_flux2,
                    "flux1": tiny_flow.build_tiny_flux1, "qwenimage": tiny_flow.build_tiny_qwenimage}  # fmt: skip
        builders[family](root / "model", size="small")
        if family == "flux1":
            tiny_flow.build_tiny_flux1_schnell(root / "model", root / "student")
        else:
            tiny_flow.build_tiny_flow_turbo(root / "model", root / "student")
    write_images(root / "images", count=8, size=256)
    settings = {
        "model": {"path": "model"},
        "latents": {"resolution": 256},
        "lora1": {"rank": 4, "alpha": 4.0, "steps": 10, "batch_size": 2},
        "schedule": {"steps": steps, "batch_size": 2, "heldout": 0, "heldout_images": 0},
        "transfer": {"student_model": "student"},
        "student": {"rank": 4, "alpha": 4.0, "lr": 1e-4},
        "runtime": {"checkpoint_every": 0},
    }
    (root / "pipeline.toml").write_text(toml_config(settings))
    return root / "pipeline.toml"


def env_for(config: Path, *overrides: str) -> PlanEnv:
    loaded = load_config(config, list(overrides))
    return PlanEnv(loaded, Store(loaded.store_dir))


def quiet(fn, *args):
    with open(os.devnull, "w") as devnull:
        stderr, sys.stderr = sys.stderr, devnull
        try:
            return fn(*args)
        finally:
            sys.stderr = stderr


def artifacts(env: PlanEnv, runs) -> dict[str, Manifest]:
    return {r.name: env.store.load_manifest(r.name, r.key) for r in runs}


def student_step(env: PlanEnv, m: dict[str, Manifest], work: Path, prior: str, device="cpu", **job) -> float:
    """job: TrainJob's runtime fields (attention, gradient_checkpointing)."""
    from stages.pools import load_latent_table, load_text_table
    from stages.student import TransferBatches
    from stages.training.schedule import read_schedule

    doc, spec = read_schedule(env.store, m["schedule"])
    cond, row_of = load_text_table(env.store, m["prior"].record["text"])
    latents = load_latent_table(env.store, m["latents"].record, {r["latent"] for r in doc["rows"]})
    prior_m = m["prior"] if prior == "materialized" else Manifest("prior", "", {}, record={"mode": "on_the_fly"})
    batches = TransferBatches(env.family, doc, spec, latents, cond, row_of, env.store, m["teacher"], prior_m, 1.0)
    cfg = m["student"].preimage["params"]
    pt = cfg["prediction_type"]
    job = TrainJob(env.family, env.student.layout, pt, SimpleNamespace(**cfg), torch.device(device), work, **job)
    return median_step(quiet(train_lora, job, batches).step_times)


def lora1_step(env: PlanEnv, m: dict[str, Manifest], work: Path, device="cpu", **job) -> float:
    """The same model, batch, LoRA and optimizer as the student, trained as lora1 trains."""
    import numpy as np

    from stages.pools import load_latent_table, load_text_table

    names = [v["array"] for v in m["latents"].record["items"].values()]
    lat = load_latent_table(env.store, m["latents"].record, names)
    cond, _ = load_text_table(env.store, m["prior"].record["text"])
    latents = torch.from_numpy(np.stack([lat[n] for n in names]))
    data = TrainData(latents, cond, torch.arange(latents.shape[0]) % len(cond))
    cfg = m["student"].preimage["params"]
    pt = cfg["prediction_type"]
    job = TrainJob(env.family, env.student.layout, pt, SimpleNamespace(**cfg), torch.device(device), work, **job)
    return median_step(quiet(train_lora, job, DiffusionBatches(data, cfg["seed"], cfg["batch_size"])).step_times)


def bare_step(env: PlanEnv, m: dict[str, Manifest], steps: int, device="cpu", attention="sdpa", checkpointing=False):
    """A bare PyTorch loop on the same model, LoRA, batch and optimizer: diffusers' class + peft + AdamW, the
    family's noise (flow matching at uniform sigma; DDPM's add_noise at a uniform timestep, ε target) and model
    call; no accelerate, progress bar or seeds per step. With the section's mixed_precision "bf16" it does what
    diffusers' LoRA training examples do: the frozen model cast to bf16, the LoRA kept in fp32
    (cast_training_params), the forward under bf16 autocast; the loss is read every step, as they log it."""
    import contextlib

    import diffusers
    import numpy as np
    import torch.nn.functional as F
    from peft import LoraConfig

    from stages.devices import use_attention
    from stages.pools import load_latent_table, load_text_table

    fam, cfg, device = env.family, m["student"].preimage["params"], torch.device(device)
    bf16 = cfg.get("mixed_precision") == "bf16"
    names = [v["array"] for v in m["latents"].record["items"].values()]
    lat = load_latent_table(env.store, m["latents"].record, names)
    cond, _ = load_text_table(env.store, m["prior"].record["text"])
    latents = torch.from_numpy(np.stack([lat[n] for n in names]))
    flow = hasattr(fam, "transformer_class")
    cls, sub = (fam.transformer_class, "transformer") if flow else ("UNet2DConditionModel", "unet")
    model = getattr(diffusers, cls).from_pretrained(str(env.student.path), subfolder=sub, use_safetensors=True)
    ddpm = None if flow else diffusers.DDPMScheduler.from_pretrained(str(env.student.path), subfolder="scheduler")
    model.requires_grad_(False)
    model.to(device, dtype=torch.bfloat16) if bf16 else model.to(device)
    if checkpointing:
        model.enable_gradient_checkpointing()
    use_attention(model, attention, device)  # diffusers' own switches (set_attention_backend / enable_xformers_...)
    model.add_adapter(
        LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], target_modules=cfg["targets"], init_lora_weights="gaussian")
    )
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    model.train()
    times = [time.perf_counter()]
    for _ in range(steps):
        idx = torch.randint(0, latents.shape[0], (cfg["batch_size"],), generator=g)
        x0, c = latents[idx], cond[idx % len(cond)]
        noise = torch.randn(x0.shape, generator=g)
        if flow:
            sigma = torch.rand(x0.shape[0], generator=g)
            s = sigma.view(-1, 1, 1, 1)
            x_t, t, target = (1 - s) * x0 + s * noise, sigma, noise - x0
        else:
            t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
            x_t, target = ddpm.add_noise(x0, noise, t), noise
        with autocast:
            pred = fam.predict(model, x_t.to(device), t.to(device), c.to(device))
        loss = F.mse_loss(pred.float(), target.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter())
    return median_step(times)


def teacher_step(env: PlanEnv, m: dict[str, Manifest], batching: str, device="cpu", attention="sdpa", apart=False):
    """(median seconds of a teacher step, of one batched double forward of the same rows on the teacher's model
    without peft, the peak GPU bytes of the teacher's steps or None) -> the steps alternate, or with apart the
    teacher's run first and its model is freed before the plain one is loaded (two real-size models at once do
    not fit a GPU)."""
    import gc

    from stages.devices import load_frozen
    from stages.pools import load_latent_table, load_text_table
    from stages.teacher import DeltaComputer
    from stages.training.adapters import FixedLora
    from stages.training.lora_files import match_modules, read_lora_file
    from stages.training.schedule import read_schedule, rebuild_inputs, step_rows

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    doc, spec = read_schedule(env.store, m["schedule"])
    lora = read_lora_file(
        env.store.object_path(m["teacher"].record["lora"]["digest"]),
        env.family.kohya_prefix,
        env.family.lora_component,
        env.family.name,
    )
    unet = load_frozen(env.family, env.layout, device, "fp32", attention)
    teacher = FixedLora(unet, match_modules(lora, unet, env.family.kohya_prefix), device)
    process = make_process(m["schedule"].contract["timesteps"], m["schedule"].contract["prediction_type"])
    cond, row_of = load_text_table(env.store, m["teacher"].record["text"])
    latents = load_latent_table(env.store, m["latents"].record, {r["latent"] for r in doc["rows"]})
    params = SimpleNamespace(**m["teacher"].preimage["params"])
    guidance = m["schedule"].contract.get("guidance_embed")
    delta = DeltaComputer(
        env.family, teacher, process, latents, cond, row_of, spec, params, batching, device, guidance=guidance
    )

    def ours(s: int) -> float:
        t0 = time.perf_counter()
        delta(step_rows(doc, spec, s), f"step {s}")  # (its deltas come back to the CPU: synchronized)
        return time.perf_counter() - t0

    def bare(s: int) -> float:
        rows = step_rows(doc, spec, s)
        x_t, t, _ = rebuild_inputs(rows, latents, process)
        c = cond[[row_of[r["caption"]] for r in rows]]
        x_t, t, c = torch.cat([x_t, x_t]).to(device), torch.cat([t, t]).to(device), c.doubled().to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            env.family.predict(plain, x_t, t, c, guidance).cpu()
        return time.perf_counter() - t0

    mine, theirs, peak = [], [], None
    if apart:
        mine = [ours(s) for s in range(spec.steps)]
        peak = torch.cuda.max_memory_allocated() if cuda else None
        del delta, teacher, unet
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    plain = load_frozen(env.family, env.layout, device, "fp32", attention)  # the baseline: no peft at all
    for s in range(spec.steps):
        if not apart:
            mine.append(ours(s))
        theirs.append(bare(s))
    return statistics.median(mine[3:]), statistics.median(theirs[3:]), peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl", "zimage", "flux2", "flux1", "qwenimage"])
    args = ap.parse_args()
    what = f"small {args.family} " + ("UNet" if args.family in ("sd15", "sdxl") else "transformer")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {what}, batch 2, rank 4, fp32, CPU")
    tmp = Path(tempfile.mkdtemp(prefix="lp-bench-transfer-"))
    try:
        config = make_project(tmp, args.steps, args.family)
        env = env_for(config)
        t = time.perf_counter()
        runs = quiet(run_workflow, env, "transfer", None, False, False)
        print(f"first `pipeline run transfer` ({args.steps} steps): {time.perf_counter() - t:.1f} s")
        m = artifacts(env, runs)

        student, fly, plain, bare = [], [], [], []
        for r in range(args.repeats):  # interleaved, so drift on a shared machine hits all of them
            student.append(student_step(env, m, tmp / f"s{r}", "materialized"))
            plain.append(lora1_step(env, m, tmp / f"l{r}"))
            fly.append(student_step(env, m, tmp / f"f{r}", "on_the_fly"))
            if args.family != "sd15":
                bare.append(bare_step(env, m, args.steps))
        if bare:
            p, b = statistics.median(plain), statistics.median(bare)
            print(f"lora1 step: {p * 1e3:.1f} ms; bare PyTorch LoRA loop: {b * 1e3:.1f} ms (ratio {p / b:.3f})")
        s, p, f = statistics.median(student), statistics.median(plain), statistics.median(fly)
        print(
            f"student step, materialized prior: {s * 1e3:.1f} ms; plain lora1 step: {p * 1e3:.1f} ms "
            f"(ratio {s / p:.3f}); on-the-fly prior: {f * 1e3:.1f} ms (materialized/on-the-fly {s / f:.3f})"
        )
        timings: dict[str, list[tuple[float, float]]] = {"mixed": [], "two_pass": []}
        for _ in range(args.repeats):  # interleaved repeats; each is a per-step median, ours and bare alternating
            for batching in timings:
                timings[batching].append(teacher_step(env, m, batching)[:2])
        for batching, runs in timings.items():
            ours = statistics.median(o for o, _ in runs)
            bare = statistics.median(b for _, b in runs)
            ratios = ", ".join(f"{o / b:.3f}" for o, b in runs)
            print(
                f"teacher step ({batching}): {ours * 1e3:.1f} ms ({ours / 2 * 1e3:.1f} ms per sample); one batched "
                f"double forward: {bare * 1e3:.1f} ms; ratio {ours / bare:.3f} (repeats: {ratios})"
            )

        env2 = env_for(config, "student.lr=5e-5")
        t = time.perf_counter()
        reruns = quiet(run_workflow, env2, "transfer", None, False, False)
        wall = time.perf_counter() - t
        upstream = [r for r in reruns if r.name != "student"]
        ran = [r.name for r in upstream if r.action == "ran"]
        print(
            f"student-only re-run (student.lr=5e-5): {wall:.1f} s wall, student {reruns[-1].seconds:.1f} s; "
            f"upstream stages run: {ran or 'none'}, upstream seconds {sum(r.seconds for r in upstream):.2f}"
        )

        from pipeline.inspect import teacher_report

        for dtype in ("fp16", "fp32"):
            e = env_for(config, f"transfer.delta_dtype='{dtype}'")
            rs = quiet(run_workflow, e, "transfer", None, False, False)
            a = artifacts(e, rs)
            rep = teacher_report(e, a["teacher"], a["schedule"])
            shape = m["latents"].record["shape"]
            raw = int(torch.tensor(shape).prod()) * (2 if dtype == "fp16" else 4)
            print(
                f"teacher storage, {dtype}: {rep['bytes_per_sample_step']:,.0f} bytes per sample-step "
                f"(raw array {raw:,} bytes; delta + input digest, zarr-compressed)"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
