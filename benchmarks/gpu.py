"""Real-size models on a GPU: lora1, student and teacher step time and peak memory, SDPA vs xformers, with the peer
baseline (the core loop of diffusers' LoRA training examples) on the same model, batch, LoRA and attention, side by
side in one run.

The family's tiny demo pipeline with its denoiser replaced by one of the real size and layout, random weights saved
in bf16 (an SDXL UNet of 2.6 B parameters, Z-Image's transformer of 6.2 B, FLUX.2 [klein] 4B's of 3.9 B), and text
encoders as wide as the real ones but with the tiny ones' few layers: the denoiser's inputs have their real shapes
and all of its work is there; the text stage stays cheap. `pipeline run transfer` runs once at --resolution (1024:
128 x 128 latents, 4096 image tokens for the transformers), batch 1, LoRA rank 16, mixed_precision bf16 (the frozen
base stored in bf16), then each step is timed on the artifacts it made, as benchmarks/transfer.py does on the CPU:

- lora1: a lora1 step; peer: diffusers' example loop (model cast to bf16, LoRA in fp32, bf16 autocast, AdamW);
- student: a student step with the materialized prior (the delta added to the student's own prediction);
- teacher: a teacher step (the fp32 Base model's predictions with and without the LoRA, their delta, its digest and
  cast), and one batched double forward of the same rows without peft as its baseline (timed after the teacher's
  model is freed: two real-size fp32 models do not fit at once).

Peak memory is torch.cuda.max_memory_allocated over each measurement, the model's load included. Repeats are
interleaved (ours and the peer's alternate). On the CPU (--device cpu: the family's "small" tiny model in fp32,
unless --size real / --precision bf16) the same code runs as a check of the script itself.

    .venv/bin/python benchmarks/gpu.py --family zimage [--attention sdpa xformers] [--checkpointing off on] [--steps 12]
    .venv/bin/python benchmarks/gpu.py --family sdxl --device cpu --resolution 256   # the script's check, any machine
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transfer import artifacts, bare_step, env_for, lora1_step, quiet, student_step, teacher_step  # noqa: E402

from pipeline.runner import run_workflow  # noqa: E402

# diffusers' SDXL UNet config (stabilityai/stable-diffusion-xl-base-1.0)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256, norm_num_groups=32,
    sample_size=128, in_channels=4, out_channels=4, cross_attention_dim=2048,
    projection_class_embeddings_input_dim=6 * 256 + 1280,  # six size values, and the pooled text of OpenCLIP-bigG
)  # fmt: skip


def real_denoiser(family: str):
    """family's real-size denoiser on the meta device (no memory allocated)."""
    import diffusers
    from accelerate import init_empty_weights
    from memory import real_transformer

    if family != "sdxl":
        return real_transformer(family)
    with init_empty_weights():
        return diffusers.UNet2DConditionModel(**SDXL_UNET)


def real_width_text(family: str, folder: Path) -> None:
    """The tiny pipeline's text encoders replaced by ones as wide as the real ones (CLIP-L 768 and OpenCLIP-bigG
    1280 for SDXL, Qwen3-4B 2560 for Z-Image and FLUX.2 [klein]), with the tiny ones' few layers and vocabulary:
    the denoiser's text inputs have their real widths, the text stage stays cheap."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from stages.families.tiny import tiny_clip_config
    from stages.families.tiny_flow import tiny_qwen3

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    if family == "sdxl":
        parts = {
            "text_encoder": CLIPTextModel(tiny_clip_config(tokenizer, 768, 3)),
            "text_encoder_2": CLIPTextModelWithProjection(tiny_clip_config(tokenizer, 1280, 3)),
        }
    else:  # as the tiny builders make them: Z-Image's a bare 2-layer Qwen3, FLUX.2 [klein]'s a 4-layer causal LM
        flux2 = family == "flux2"
        parts = {"text_encoder": tiny_qwen3(len(tokenizer), 0, layers=4 if flux2 else 2, causal_lm=flux2, hidden=2560)}
    for name, model in parts.items():
        shutil.rmtree(folder / name)
        model.save_pretrained(str(folder / name), safe_serialization=True)


def materialize(model, device: torch.device) -> None:
    """Random bf16 weights on device for every parameter of a meta-device model: weights N(0, 1/fan_in) (the
    activations keep their scale through the depth), norm scales 1, biases 0. Buffers stay as built."""
    from accelerate.utils import set_module_tensor_to_device

    g = torch.Generator(device).manual_seed(0)
    for name, param in list(model.named_parameters()):
        if param.ndim >= 2:
            value = torch.randn(param.shape, generator=g, device=device) / math.sqrt(param.shape[1:].numel())
        elif "norm" in name:
            value = torch.ones(param.shape, device=device)
        else:
            value = torch.zeros(param.shape, device=device)
        set_module_tensor_to_device(model, name, device, value=value.to(torch.bfloat16))
    model.to(device)


def make_project(root: Path, family: str, size: str, resolution: int, steps: int, device: str, precision: str) -> Path:
    """The tiny pipeline of family, its denoiser real-size (size "real") or the benchmarks' "small" one; a
    `transfer` project on it whose student is the same model (timing needs no distilled sibling)."""
    from pipeline.demo import write_images
    from stages.families import tiny, tiny_flow
    from tests.conftest import toml_config

    builders = {
        "sdxl": tiny.build_tiny_sdxl,
        "zimage": tiny_flow.build_tiny_zimage,
        "flux2": tiny_flow.build_tiny_flux2,
    }
    folder = builders[family](root / "model", size="tiny" if size == "real" else "small")
    if size == "real":
        real_width_text(family, folder)
        sub = folder / ("unet" if family == "sdxl" else "transformer")
        model = real_denoiser(family)
        materialize(model, torch.device(device))
        billions = sum(p.numel() for p in model.parameters()) / 1e9
        print(f"{family}: the real-size {type(model).__name__} ({billions:.2f} B parameters), random bf16 weights")
        shutil.rmtree(sub)
        model.to("cpu").save_pretrained(str(sub), safe_serialization=True)
        del model
        gc.collect()
    write_images(root / "images", count=4, size=resolution)
    lora = {"rank": 16, "alpha": 16.0, "mixed_precision": precision}
    settings = {
        "model": {"path": "model"},
        "latents": {"resolution": resolution},
        "lora1": {**lora, "steps": 2, "batch_size": 1},  # the teacher's LoRA (its steps are timed as the student's)
        "schedule": {"steps": steps, "batch_size": 1, "heldout": 0, "heldout_images": 0},
        "transfer": {"student_model": "model"},
        "student": {**lora, "lr": 1e-4},  # its steps and batch are the schedule's
        "runtime": {"checkpoint_every": 0, "device": device},
    }
    (root / "pipeline.toml").write_text(toml_config(settings))
    return root / "pipeline.toml"


def measured(fn, *args, **kwargs):
    """(fn's result, the peak GPU bytes while it ran, or None on the CPU); the memory it left is freed."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = fn(*args, **kwargs)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result, peak


def median(runs: list) -> tuple:
    """[(seconds or a tuple of them, peak bytes or None), ...] over repeats -> (median seconds, the highest peak
    in GiB as text, "-" on the CPU)."""
    times = [t for t, _ in runs]
    mid = (
        tuple(map(statistics.median, zip(*times, strict=True)))
        if isinstance(times[0], tuple)
        else statistics.median(times)
    )
    peaks = [p for _, p in runs if p is not None]
    return mid, f"{max(peaks) / 2**30:.1f}" if peaks else "-"


def teacher_cells(teacher: tuple) -> str:
    """median()'s ((teacher step, double forward), peak) as the table's last three columns."""
    (ours, double), peak = teacher
    return f"{ours * 1e3:10.0f}  {peak:4s}  {double * 1e3:13.0f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="zimage", choices=["sdxl", "zimage", "flux2"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention", nargs="+", default=["sdpa", "xformers"], choices=["sdpa", "xformers"])
    ap.add_argument(
        "--steps", type=int, default=12, help="steps per measurement (training: the first 5 are warm-up; teacher: 3)"
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument(
        "--checkpointing", nargs="+", default=["off"], choices=["off", "on"], help="gradient checkpointing, each way"
    )
    ap.add_argument("--precision", choices=["bf16", "no"], help="mixed_precision (default: bf16 on a GPU, no else)")
    ap.add_argument("--size", choices=["real", "small"], help="the denoiser's (default: real on a GPU, small else)")
    ap.add_argument("--work", type=Path, default=None, help="where the model and store go (default: a temp folder)")
    args = ap.parse_args()
    if args.steps < 7:
        ap.error("--steps: at least 7 (5 warm-up steps, then two to time)")
    device = torch.device(args.device)
    size = args.size or ("real" if device.type == "cuda" else "small")
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, through a pipe too
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # (the peer's cast to bf16, as diffusers' examples do, is warned about)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"{args.device}: the script's check on the {size} {args.family} model")
    tmp = Path(tempfile.mkdtemp(prefix="lp-bench-gpu-", dir=args.work))
    try:
        config = make_project(tmp, args.family, size, args.resolution, args.steps, args.device, precision)
        env = env_for(config)
        t = time.perf_counter()
        runs = quiet(run_workflow, env, "transfer", None, False, False)
        print(
            f"first `pipeline run transfer` ({args.steps} steps, {args.resolution} px): "
            f"{time.perf_counter() - t:.0f} s; " + ", ".join(f"{r.name} {r.seconds:.0f} s" for r in runs)
        )
        m = artifacts(env, runs)
        print(
            f"\nbatch 1, rank 16, {args.resolution} px, mixed_precision {precision}; ms per step (median over the "
            f"steps after warm-up and over {args.repeats} repeat(s)), peak GiB; ckpt: gradient checkpointing in ours "
            f"and the peer's training loops (the teacher has no backward pass: measured once per kernel)"
        )
        print(
            "attention  ckpt  lora1 ms  GiB   peer ms  GiB   lora1/peer  student ms  GiB   teacher ms  GiB   "
            "double fwd ms"
        )
        for attention in args.attention:  # a row as soon as it is measured: a run cut short keeps what it has
            for n, ckpt in enumerate(args.checkpointing):
                checkpointing = ckpt == "on"
                job = {"attention": attention, "gradient_checkpointing": checkpointing}
                got: dict[str, list] = {"lora1": [], "peer": [], "student": [], "teacher": []}
                for r in range(args.repeats):  # ours and the peer's alternate; who goes first alternates
                    for who in ("lora1", "peer") if r % 2 == 0 else ("peer", "lora1"):
                        if who == "lora1":
                            work = tmp / f"l{attention}{ckpt}{r}"
                            got[who].append(measured(lora1_step, env, m, work, args.device, **job))
                        else:
                            peer = (env, m, args.steps, args.device, attention, checkpointing)
                            got[who].append(measured(bare_step, *peer))
                    work = tmp / f"s{attention}{ckpt}{r}"
                    got["student"].append(measured(student_step, env, m, work, "materialized", args.device, **job))
                    if n == 0:
                        ours, double, peak = teacher_step(env, m, "mixed", args.device, attention, apart=True)
                        got["teacher"].append(((ours, double), peak))
                lora1, peer, student = (median(got[k]) for k in ("lora1", "peer", "student"))
                teacher = f"{'(above)':>10s}" if n else teacher_cells(median(got["teacher"]))
                print(
                    f"{attention:9s}  {ckpt:4s}  {lora1[0] * 1e3:8.0f}  {lora1[1]:4s}  {peer[0] * 1e3:7.0f}  "
                    f"{peer[1]:4s}  {lora1[0] / peer[0]:10.2f}  {student[0] * 1e3:10.0f}  {student[1]:4s}  {teacher}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
