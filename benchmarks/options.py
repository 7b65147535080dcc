"""The cost of each training option per step against plain lora1, on the small UNet, and the peak memory of the
fused backward pass and gradient checkpointing.

Every option runs the real lora1 loop (`train_lora`) on the same model, data, batch and rank; runs alternate
(plain, option, plain, option, ...) so drift on a shared machine hits both, and each ratio is against the plain
runs of the same round. Peak memory is each configuration's own process's peak RSS (CPU), in a fresh process per
configuration, with the bytes of the LoRA gradients beside it (what the fused pass can free at most).

    .venv/bin/python benchmarks/options.py [--steps 30] [--repeats 2] [--only noise_offset,ema]
    .venv/bin/python benchmarks/options.py --memory [--size 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.overhead import MODELS, build_model, make_data, stage_loop  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402

BASE = {"rank": 4, "alpha": 4.0, "lr": 1e-4, "batch_size": 2}
OPTIONS = {
    "loss=huber (snr schedule)": {"loss": "huber"},
    "min_snr_gamma=5": {"min_snr_gamma": 5.0},
    "debiased_estimation": {"debiased_estimation": True},
    "noise_offset=0.05 + adaptive": {"noise_offset": 0.05, "adaptive_noise_scale": 0.01},
    "pyramid noise (6 levels)": {"multires_noise_iterations": 6},
    "ip_noise_gamma=0.1": {"ip_noise_gamma": 0.1},
    "zero_terminal_snr": {"zero_terminal_snr": True},
    "dropout=0.1": {"dropout": 0.1},
    "adamw, not fused (foreach)": {"optimizer_args": {"fused": False}},
    "adafactor": {"optimizer": "adafactor", "lr": 1e-3},
    "lion": {"optimizer": "lion"},
    "prodigy": {"optimizer": "prodigy", "lr": 1.0},
    "loraplus_lr_ratio=16": {"loraplus_lr_ratio": 16.0},
    "block_lr (3 blocks)": {"block_lr": {"down_blocks.0": 0.5, "down_blocks.1": 2.0, "mid_block": 0}},
    "cosine_with_restarts + warmup": {"lr_scheduler": "cosine_with_restarts", "warmup_steps": "10%"},
    "ema_decay=0.999": {"ema_decay": 0.999},
    "fused_backward (no clipping)": {"fused_backward": True, "max_grad_norm": 0.0},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "network=dora": {"network": "dora"},
    "network=loha": {"network": "loha"},
    "network=lokr": {"network": "lokr"},
    "lora_init=pissa": {"lora_init": "pissa"},
}
# the same settings without the clipping that the fused pass cannot do: its fair baseline
FUSED_BASELINE = {"max_grad_norm": 0.0}
# train_text_encoder needs a text encoder as wide as the UNet's cross-attention (768): CLIP-L's layer shape with
# TEXT_LAYERS of its 12 layers. One layer is 7.9 M parameters beside the small UNet's 13.7 M, a far larger share
# than SD 1.5's 123 M / 860 M, so the ratio overstates what the encoder costs at real size.
TEXT_OPTION = "train_text_encoder (768-wide CLIP)"
TEXT_LAYERS = 1


def with_text_encoder(model: Path, root: Path) -> Path:
    """A copy of the small model whose text encoder has CLIP-L's width and TEXT_LAYERS layers (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from stages.families.tiny import build_tokenizer

    shutil.copytree(model, root)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    shutil.rmtree(root / "text_encoder")
    CLIPTextModel(config).save_pretrained(root / "text_encoder", safe_serialization=True)
    return root


def timed_text_encoder(model: Path, n: int, steps: int, work: Path) -> float:
    """lora1 with train_text_encoder: n captions' token ids encoded by the encoder in training at every step."""
    import os

    from benchmarks.overhead import median_step
    from stages.families.sd15 import SD15Family
    from stages.lora1 import Lora1Params
    from stages.training.loop import DiffusionBatches, TrainData, TrainJob, train_lora
    from stages.training.params import train_params

    family = SD15Family()
    layout = family.layout(model, None)
    size = MODELS["small"][1]
    cfg = TrainConfig(**{**BASE, "steps": steps, "train_text_encoder": True})
    params = Lora1Params(
        **train_params(family, layout, cfg, (4, size, size)).model_dump(),
        train_text_encoder=True,
        text_encoder_targets=list(family.text_encoder_targets),
    )
    text = family.load_text_encoder(layout, "cpu")
    words = "red green blue yellow circle square triangle stripes dots cat dog car tree house sky sea".split()
    captions = [f"a {words[i % 16]} {words[(3 * i + 1) % 16]} on {words[(5 * i + 2) % 16]}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    data = TrainData(torch.randn(n, 4, size, size, generator=g), text.token_ids(captions), torch.arange(n))
    job = TrainJob(family, layout, "epsilon", params, torch.device("cpu"), work, text_encoder=text)
    with open(os.devnull, "w") as devnull:
        stderr, sys.stderr = sys.stderr, devnull
        try:
            return median_step(train_lora(job, DiffusionBatches(data, params.seed, params.batch_size)).step_times)
        finally:
            sys.stderr = stderr


def timed(model: Path, data, settings: dict, steps: int, work: Path) -> float:
    settings = dict(settings)
    checkpointing = settings.pop("gradient_checkpointing", False)
    cfg = TrainConfig(**{**BASE, "steps": steps, **settings})
    return stage_loop(model, data, cfg, work, gradient_checkpointing=checkpointing)


def step_costs(args) -> None:
    unet_kwargs, size, width = MODELS["small"]
    tmp = Path(tempfile.mkdtemp(prefix="lp-options-"))
    try:
        model = build_model(tmp / "small", unet_kwargs)
        data = make_data(size, width)
        names = [n for n in [*OPTIONS, TEXT_OPTION] if not args.only or any(o in n for o in args.only.split(","))]
        if TEXT_OPTION in names:  # both sides of its ratio run on the model with the wide text encoder
            text_model = with_text_encoder(model, tmp / "small-text")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, small UNet, latents {size}x{size}, "
              f"batch 2, rank 4, fp32, CPU; {args.steps} steps, median of {args.repeats} rounds")  # fmt: skip
        print(f"{'option':34} {'ms/step':>8} {'plain':>8} {'ratio':>6}")
        for name in names:
            base = FUSED_BASELINE if "fused_backward" in name else {}
            ratios, times, plains = [], [], []
            for r in range(args.repeats):
                if name == TEXT_OPTION:
                    plain = timed(text_model, data, base, args.steps, tmp / f"p-{r}")
                    option = timed_text_encoder(text_model, data.latents.shape[0], args.steps, tmp / f"o-{r}")
                else:
                    plain = timed(model, data, base, args.steps, tmp / f"p-{r}")
                    option = timed(model, data, OPTIONS[name], args.steps, tmp / f"o-{r}")
                ratios.append(option / plain)
                times.append(option)
                plains.append(plain)
                shutil.rmtree(tmp / f"p-{r}", ignore_errors=True)
                shutil.rmtree(tmp / f"o-{r}", ignore_errors=True)
            print(f"{name:34} {statistics.median(times) * 1e3:8.1f} {statistics.median(plains) * 1e3:8.1f} "
                  f"{statistics.median(ratios):6.3f}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def peak_child(model: Path, size: int, settings: dict, steps: int) -> dict:
    """One configuration in a fresh process: its peak RSS and the bytes of its LoRA gradients."""
    code = f"""
import json, resource, sys, tempfile
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from benchmarks.options import timed, make_data
from benchmarks.overhead import MODELS
settings = json.loads({json.dumps(json.dumps(settings))})
data = make_data({size}, MODELS["small"][2], n=4)
timed(Path({str(model)!r}), data, settings, {steps}, Path(tempfile.mkdtemp()))
print(json.dumps({{"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(args) -> None:
    from benchmarks.overhead import MODELS as M
    from stages.families.sd15 import SD15Family
    from stages.training.lora_files import add_lora

    unet_kwargs, _, _ = M["small"]
    tmp = Path(tempfile.mkdtemp(prefix="lp-memory-"))
    try:
        model = build_model(tmp / "small", unet_kwargs)
        fam = SD15Family()
        unet = fam.load_denoiser(fam.layout(model, None), "cpu")
        add_lora(unet, BASE["rank"], BASE["alpha"], 0.0, fam.default_targets, 0)
        grad_bytes = sum(p.numel() * 4 for p in unet.parameters() if p.requires_grad)
        print(
            f"small UNet, latents {args.size}x{args.size}, batch 2, rank 4, fp32, CPU; LoRA gradients "
            f"{grad_bytes / 2**20:.2f} MiB; peak RSS of a fresh process per configuration, median of {args.repeats}"
        )
        configs = {
            "plain (no clipping)": {"max_grad_norm": 0.0},
            "fused_backward": {"fused_backward": True, "max_grad_norm": 0.0},
            "gradient_checkpointing": {"max_grad_norm": 0.0, "gradient_checkpointing": True},
            "both": {"fused_backward": True, "max_grad_norm": 0.0, "gradient_checkpointing": True},
        }
        base = None
        for name, settings in configs.items():
            peak = statistics.median(peak_child(model, args.size, settings, 8)["peak_rss"] for _ in range(args.repeats))
            base = base or peak
            print(f"{name:24} peak RSS {peak / 2**20:8.1f} MiB  ratio {peak / base:.3f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    memory(args) if args.memory else step_costs(args)


if __name__ == "__main__":
    main()
