"""Overhead of the lora1 stage's training loop against a bare PyTorch loop, and of an all-fresh `pipeline run`.

Both loops train the same UNet with the same peft LoRA, AdamW, batch and in-memory data; the bare loop has
no accelerate, no progress bar, no per-step seed derivation. Runs alternate (stage, bare, stage, bare, ...)
so drift on a shared machine hits both; the per-step time is the median over steps after a warmup.

    .venv/bin/python benchmarks/overhead.py [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from stages.families import Conditioning  # noqa: E402
from stages.families.sd15 import SD15Family  # noqa: E402
from stages.families.tiny import build_tiny_sd15, tiny_unet  # noqa: E402
from stages.training.loop import DiffusionBatches, TrainData, TrainJob, train_lora  # noqa: E402
from stages.training.params import train_params  # noqa: E402

WARMUP = 5
MODELS = {
    # name: (UNet kwargs, latent size, cross-attention width)
    "tiny": ({}, 8, 32),
    "small": (
        {"block_out_channels": (64, 128, 256), "cross_attention_dim": 768, "sample_size": 32, "norm_num_groups": 32},
        32,
        768,
    ),
}


def build_model(root: Path, unet_kwargs: dict) -> Path:
    build_tiny_sd15(root, seed=0)
    if unet_kwargs:
        shutil.rmtree(root / "unet")
        tiny_unet(seed=0, **unet_kwargs).save_pretrained(root / "unet", safe_serialization=True)
    return root


def make_data(size: int, width: int, n: int = 16) -> TrainData:
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(n, 77, width, generator=g), torch.ones(n, 77, dtype=torch.bool))
    return TrainData(torch.randn(n, 4, size, size, generator=g), cond, torch.arange(n))


def median_step(times: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(times[WARMUP:-1], times[WARMUP + 1 :], strict=True))


def stage_loop(model: Path, data: TrainData, cfg: TrainConfig, work: Path, gradient_checkpointing=False) -> float:
    family = SD15Family()
    layout = family.layout(model, None)
    params = train_params(family, layout, cfg, tuple(data.latents.shape[1:]))
    job = TrainJob(
        family, layout, "epsilon", params, torch.device("cpu"), work, gradient_checkpointing=gradient_checkpointing
    )
    with open(os.devnull, "w") as devnull:  # keep the real progress bar's cost, not its output
        stderr, sys.stderr = sys.stderr, devnull
        try:
            return median_step(
                train_lora(job, DiffusionBatches(data, job.params.seed, job.params.batch_size)).step_times
            )
        finally:
            sys.stderr = stderr


def bare_loop(model: Path, data: TrainData, cfg: TrainConfig) -> float:
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            target_modules=cfg.targets or SD15Family.default_targets,
            init_lora_weights="gaussian",
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    g = torch.Generator().manual_seed(0)
    n = data.latents.shape[0]
    unet.train()
    times = [time.perf_counter()]
    for _ in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        x0, cond = data.latents[idx], data.cond[data.cond_index[idx]].embeds
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return median_step(times)


def fresh_run_seconds(tmp: Path) -> tuple[float, float, float]:
    """Wall time of an all-fresh `pipeline run lora` vs `import cli` and `pipeline --help`, medians of 5."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    project = tmp / "fresh"
    subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "run", "lora", "--demo", "--no-progress"],
        cwd=project.parent,
        env=env,
        check=True,
        capture_output=True,
    )
    cmd_run = [sys.executable, str(REPO / "cli.py"), "run", "lora", "--demo", "--no-progress"]
    cmd_import = [sys.executable, "-c", "import cli"]
    cmd_help = [sys.executable, str(REPO / "cli.py"), "--help"]

    def timed(cmd):
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            subprocess.run(cmd, cwd=project.parent, env=env, check=True, capture_output=True)
            runs.append(time.perf_counter() - t)
        return statistics.median(runs)

    return timed(cmd_run), timed(cmd_import), timed(cmd_help)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny,small")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 2, rank 4, fp32, CPU")
    tmp = Path(tempfile.mkdtemp(prefix="lp-bench-"))
    try:
        for name in filter(None, args.models.split(",")):
            unet_kwargs, size, width = MODELS[name]
            model = build_model(tmp / name, unet_kwargs)
            n_params = sum(
                p.numel() for p in SD15Family().load_denoiser(SD15Family().layout(model, None), "cpu").parameters()
            )
            data = make_data(size, width)
            cfg = TrainConfig(rank=4, alpha=4.0, lr=1e-4, steps=args.steps, batch_size=2)
            stage, bare = [], []
            for r in range(args.repeats):
                stage.append(stage_loop(model, data, cfg, tmp / f"work-{name}-{r}"))
                bare.append(bare_loop(model, data, cfg))
            s, b = statistics.median(stage), statistics.median(bare)
            print(
                f"{name:6} UNet {n_params / 1e6:5.1f}M params, latents {size}x{size}: "
                f"lora1 stage {s * 1e3:7.2f} ms/step, bare loop {b * 1e3:7.2f} ms/step, ratio {s / b:.3f}"
            )
        (tmp / "fresh").mkdir()
        run_s, import_s, help_s = fresh_run_seconds(tmp / "fresh")
        print(
            f"all-fresh `pipeline run lora --demo`: {run_s:.2f} s; `python -c 'import cli'`: {import_s:.2f} s "
            f"(ratio {run_s / import_s:.2f}); `pipeline --help`: {help_s:.2f} s (ratio {run_s / help_s:.2f})"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
