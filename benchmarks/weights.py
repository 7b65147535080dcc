"""transfer.weights_dtype: what storing the teacher's weights narrower costs in accuracy, memory and time.

On the tiny models of each family (random weights) with a random LoRA on the attention projections (rank 4, its
delta a few percent of the prediction, as a trained LoRA's is): the teacher's delta T_L − T, computed as the
teacher stage computes it (stages/devices.load_frozen, then FixedLora's mixed batch), with the weights stored in
fp32, fp16, bf16 and fp8 (every Linear/Conv2d weight; computed in fp32). For each: the mean error of the delta
against fp32's, relative to the mean |delta|; the bytes of the loaded parameters; the median time of a teacher
forward, interleaved with fp32's, as a ratio. One more row computes in bf16 (the model stored in bf16 and run
under bf16 autocast, as mixed_precision training runs): what the option does not offer, and why. With --device cuda
every row computes with TF32 off, and two more compute the fp32 model with PyTorch's GPU default (TF32
convolutions: SD/SDXL's teacher as it runs now) and with TF32 matmuls too, against full fp32.

Then the weight memory of the real-size teachers at each dtype, from the parameter counts of benchmarks/memory.py
(real configs on the meta device; Linear/Conv2d weights are narrowed, the rest stays fp32).

With --loading: the CPU memory a load takes, for a mid-size Z-Image-shaped transformer (~0.4 B parameters) saved in
bf16 as the real ones are released. Each way in a fresh process (peak RSS minus the RSS before the load): the
teacher's load_frozen(bf16) loading the checkpoint as stored, against the same with the fp32 load narrowed
afterwards (the way before session 22); and the same two for a training stage's load under mixed_precision bf16
(load, widen the targets, narrow).

    .venv/bin/python benchmarks/weights.py [--repeats 20] [--loading] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DTYPES = ("fp32", "fp16", "bf16", "fp8")
GiB = 1024**3


def tiny_models(root: Path) -> dict[str, Path]:
    from stages.families.tiny import build_tiny_sd15
    from stages.families.tiny_flow import build_tiny_flux2, build_tiny_zimage

    build_tiny_sd15(root / "sd15", seed=0)
    build_tiny_zimage(root / "zimage", seed=0)
    build_tiny_flux2(root / "flux2", seed=0)
    return {name: root / name for name in ("sd15", "zimage", "flux2")}


def random_lora(denoiser, seed: int = 1) -> dict:
    import torch

    from stages.training.lora_files import LoraModule

    g, modules = torch.Generator().manual_seed(seed), {}
    for name, m in denoiser.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            down = torch.randn(4, m.in_features, generator=g) * 0.05
            modules[name] = LoraModule(down, torch.randn(m.out_features, 4, generator=g) * 0.05, 4.0)
    return modules


def tf32(convolutions: bool, matmuls: bool) -> None:
    """Let cuDNN's fp32 convolutions and cuBLAS's fp32 matmuls round their inputs to TF32 (10-bit mantissa) on the
    tensor cores, or not. PyTorch's default: convolutions yes, matmuls no."""
    import torch

    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = convolutions, matmuls


def measure(family_name: str, folder: Path, repeats: int, device: str = "cpu") -> list[dict]:
    """On a GPU every row but the TF32 ones computes with TF32 off (full fp32); those two compute the fp32 model
    as PyTorch does by default (TF32 convolutions) and with TF32 matmuls as well."""
    import torch

    from stages.devices import load_frozen
    from stages.families import get_family
    from stages.families.base import Conditioning
    from stages.training.adapters import FixedLora
    from stages.training.precision import store_base_in

    family = get_family(family_name)
    layout = family.layout(folder, None)
    dev = torch.device(device)
    cond = Conditioning.stack(family.load_text_encoder(layout, "cpu").encode(["a red circle", "a blue square"]))
    x = torch.randn(2, *family.latent_shape(layout, 64), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 800]) if family_name == "sd15" else torch.tensor([0.5, 0.8])
    cond, x, t = cond.to(dev), x.to(dev), t.to(dev)
    models = {d: load_frozen(family, layout, dev, d, "sdpa") for d in DTYPES}
    lora = random_lora(models["fp32"])
    autocast = copy.deepcopy(models["fp32"])
    store_base_in(autocast, torch.bfloat16)
    models["bf16 compute"] = autocast
    teachers = {d: FixedLora(m, lora, dev) for d, m in models.items()}
    flags = {name: (False, False) for name in models}
    if dev.type == "cuda":  # the fp32 teacher itself, computed with TF32
        for name, both in (("fp32, TF32 conv", (True, False)), ("TF32 everywhere", (True, True))):
            models[name], teachers[name], flags[name] = models["fp32"], teachers["fp32"], both

    def delta(name):
        tf32(*flags[name])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=name == "bf16 compute"):
            base, with_lora = teachers[name].predict_both(family, x, t, cond)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return base, with_lora - base

    base32, exact = delta("fp32")
    times: dict[str, list[float]] = {d: [] for d in models}
    for _ in range(repeats):  # interleaved: fp32 and each dtype side by side in every repeat
        for name in models:
            start = time.perf_counter()
            delta(name)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, model in models.items():
        base, d = delta(name)
        rows.append(
            {
                "family": family_name,
                "weights": name,
                "delta_error": float((d - exact).abs().mean() / exact.abs().mean()),
                "pred_error": float((base - base32).abs().mean() / base32.abs().mean()),
                "delta_share": float(exact.abs().mean() / base32.abs().mean()),
                "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "time_ratio": statistics.median(times[name]) / statistics.median(times["fp32"]),
            }
        )
    tf32(True, False)  # PyTorch's default again
    return rows


def real_size() -> list[tuple[str, dict[str, float]]]:
    """GiB of each real-size teacher's weights per dtype: Linear/Conv2d weights narrowed, the rest fp32."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory import real_transformer  # the same real configs as the memory benchmark

    out = []
    per_byte = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
    for label, family in (("Z-Image", "zimage"), ("FLUX.2 [klein] 4B", "flux2"), ("FLUX.2 [dev]", "flux2-dev")):
        model = real_transformer(family)
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        narrowed = sum(m.weight.numel() for m in layers)
        total = sum(p.numel() for p in model.parameters())
        out.append((label, {d: (narrowed * b + (total - narrowed) * 4) / GiB for d, b in per_byte.items()}))
    return out


LOAD_CHILD = """
import resource, sys, torch
sys.path.insert(0, {repo!r})
from stages.families import get_family
from stages.devices import load_frozen
from stages.training.precision import store_base_in, widen_for
from pipeline.config import TrainConfig
family = get_family("zimage")
from pathlib import Path
layout = family.layout(Path({folder!r}), None)
if {fp32_first!r}:
    type(family).stored_dtype = lambda self, layout: None
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
before = rss()
if {what!r} == "teacher":
    model = load_frozen(family, layout, torch.device("cpu"), "bf16", "sdpa")
else:
    cfg = TrainConfig(rank=16, mixed_precision="bf16")
    model = family.load_denoiser(layout, torch.device("cpu"), family.stored_dtype(layout))
    if family.stored_dtype(layout) is not None:
        widen_for(model, cfg, family.default_targets, "gaussian", None, family.kohya_prefix)
    store_base_in(model, torch.bfloat16)
params = sum(p.numel() for p in model.parameters())
print(params, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def loading(root: Path) -> None:
    import subprocess

    import torch
    from diffusers import ZImageTransformer2DModel

    from stages.families.tiny_flow import build_tiny_zimage

    folder = build_tiny_zimage(root / "zimage-mid", seed=0)
    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, n_refiner_layers=1, cap_feat_dim=32,
        axes_lens=[64, 64, 64], dim=1536, n_layers=12, n_heads=12, n_kv_heads=12, axes_dims=[32, 48, 48],
    )  # fmt: skip
    model.to(torch.bfloat16).save_pretrained(folder / "transformer", safe_serialization=True)
    del model
    print("\nloading a 0.4 B-parameter transformer stored in bf16 (peak RSS over the RSS before the load):")
    for what in ("teacher", "training"):
        for fp32_first in (True, False):
            code = LOAD_CHILD.format(repo=str(REPO), folder=str(folder), fp32_first=fp32_first, what=what)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            params, before, peak = (int(v) for v in out.stdout.split()[-3:])
            way = "fp32 load, narrowed after" if fp32_first else "loaded as stored (bf16)"
            print(
                f"  {what:8} {way:27} {(peak - before) / 2**20:5.2f} GiB "
                f"(fp32 weights {params * 4 / 2**30:.2f} GiB, bf16 {params * 2 / 2**30:.2f} GiB)"
            )


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--loading", action="store_true", help="only the CPU memory of loading, each way")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: adds the TF32 rows")
    args = ap.parse_args()
    if args.loading:
        with tempfile.TemporaryDirectory() as tmp:
            loading(Path(tmp))
        return
    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, latents of 64 px, batch 2 "
        f"(a doubled forward)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folders = tiny_models(Path(tmp))
        print(
            f"{'family':8} {'weights':13} {'|Δ|/|pred|':>10} {'Δ error':>9} {'pred error':>10} {'MiB':>7} {'time':>6}"
        )
        for name, folder in folders.items():
            for r in measure(name, folder, args.repeats, args.device):
                print(
                    f"{r['family']:8} {r['weights']:13} {r['delta_share']:10.3f} {r['delta_error']:9.4f} "
                    f"{r['pred_error']:10.4f} {r['bytes'] / 2**20:7.2f} {r['time_ratio']:6.2f}"
                )
    print("\nreal-size teacher weights (GiB):")
    for label, sizes in real_size():
        print(f"  {label:18} " + "  ".join(f"{d} {v:6.1f}" for d, v in sizes.items()))


if __name__ == "__main__":
    main()
