"""A peer side by side: diffusers' own LoRA training example against `pipeline run lora`, on the same tiny SD model,
images, resolution, batch, rank, lr and steps, interleaved (peer, ours, peer, ours, ...; who goes first alternates),
each a fresh process from a cold start with an empty store.

pip does not install diffusers' examples, so `peer_main` reproduces the training loop of
examples/text_to_image/train_text_to_image_lora.py (diffusers 0.3x, "Train!" section): the data set transform
(resize, centre crop, to [-1, 1]) and tokenize_captions; in every step `vae.encode(pixels).latent_dist.sample() *
scaling_factor`, `torch.randn_like` noise, `torch.randint` timesteps, `noise_scheduler.add_noise`,
`text_encoder(input_ids)[0]`, the UNet's epsilon prediction, `F.mse_loss(...float())`, `accelerator.backward`,
`clip_grad_norm_(max_grad_norm=1.0)`, `optimizer.step()`, `lr_scheduler.step()`, `optimizer.zero_grad()`; the LoRA
as its peft setup makes it (`LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=[to_k, to_q,
to_v, to_out.0])`, trainable params cast to fp32, AdamW over them). Left out: validation images, trackers and the hub.
Ours runs the whole `lora` workflow (caption, latents, text, lora1) with default checkpoints and files.

Printed per repeat: seconds per step (median after a warmup), total wall of the process, peak RSS; then the ratios
ours / peer.

With --buckets, a third of the images are landscape (2:1) and a third portrait (1:2); the example can only
centre-crop them to the square (its transform), ours trains them in aspect-ratio buckets (latents.buckets = "auto",
32 to 128 px in steps of 16: 80x48, 48x80 and 64x64, about the square's pixels), so both see one resolution's area.

    .venv/bin/python benchmarks/peer.py [--steps 40] [--repeats 3] [--images 16] [--buckets]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARMUP = 5
SETTINGS = {"resolution": 64, "batch_size": 2, "rank": 4, "lr": 1e-4}


def peer_main(root: Path, steps: int) -> dict:
    """The diffusers example's training loop (see the module docstring), on root/model and root/images."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    model, res, bs, rank = root / "model", SETTINGS["resolution"], SETTINGS["batch_size"], SETTINGS["rank"]
    accelerator = Accelerator()
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_layers:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(lora_layers, lr=SETTINGS["lr"])

    def transform(path: Path):  # transforms.Resize(res, BILINEAR), CenterCrop(res), ToTensor(), Normalize([.5], [.5])
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = res / min(w, h)
            im = im.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
            left, top = (im.width - res) // 2, (im.height - res) // 2
            arr = np.asarray(im.crop((left, top, left + res, top + res)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1

    images = sorted(p for p in (root / "images").iterdir() if p.suffix == ".png")
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    examples = [(transform(p), ids[i]) for i, p in enumerate(images)]

    def collate(batch):
        return {
            "pixel_values": torch.stack([b[0] for b in batch]).float(),
            "input_ids": torch.stack([b[1] for b in batch]),
        }

    loader = torch.utils.data.DataLoader(examples, shuffle=True, collate_fn=collate, batch_size=bs, num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    times, step = [], 0
    while step < steps:
        unet.train()
        for batch in loader:
            t0 = time.perf_counter()
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"])[0]
                pred = unet(noisy, timesteps, encoder_hidden_states).sample
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                loss.item()  # the example logs it every step
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            times.append(time.perf_counter() - t0)
            step += 1
            if step >= steps:
                break
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = root / "peer-out"
    out.mkdir(exist_ok=True)
    state = get_peft_model_state_dict(accelerator.unwrap_model(unet))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "pytorch_lora_weights.safetensors"))
    return {"step_times": times}


def ours_main(root: Path, steps: int) -> dict:
    """`pipeline run lora` in this process, with train_step timed (the loop's own code, wrapped to read a clock)."""
    sys.path.insert(0, str(REPO))
    import stages.training.loop as loop

    times = []
    real = loop.train_step

    def timed(*args, **kw):
        t0 = time.perf_counter()
        out = real(*args, **kw)
        times.append(time.perf_counter() - t0)
        return out

    loop.train_step = timed
    from cli import app

    try:
        app(["run", "lora", "-c", str(root / "pipeline.toml"), "--no-progress", "--json"], standalone_mode=False)
    finally:
        loop.train_step = real
    return {"step_times": times}


def child(kind: str, root: Path, steps: int) -> None:
    start = time.perf_counter()
    result = (peer_main if kind == "peer" else ours_main)(root, steps)
    result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["inner_s"] = time.perf_counter() - start
    print("PEER-RESULT " + json.dumps(result), flush=True)


BUCKETS = 'buckets = "auto"\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16\n'


def setup(root: Path, n_images: int, steps: int, buckets: bool = False) -> None:
    sys.path.insert(0, str(REPO))
    from PIL import Image

    from pipeline.demo import write_images
    from stages.families.tiny import build_tiny_sd15

    build_tiny_sd15(root / "model", seed=0)
    write_images(root / "images", count=n_images, size=96)
    for n, path in enumerate(sorted((root / "images").glob("*.png")) if buckets else []):
        size = [None, (128, 64), (64, 128)][n % 3]
        if size:
            with Image.open(path) as im:
                im.resize(size, Image.Resampling.BICUBIC).save(path)
    (root / "pipeline.toml").write_text(
        f'[model]\npath = "model"\n[data]\nimages = "images"\n[latents]\nresolution = {SETTINGS["resolution"]}\n'
        + (BUCKETS if buckets else "")
        + f"[lora1]\nrank = {SETTINGS['rank']}\nalpha = {float(SETTINGS['rank'])}\nlr = {SETTINGS['lr']}\n"
        f'steps = {steps}\nbatch_size = {SETTINGS["batch_size"]}\noptimizer = "adamw"\nmax_grad_norm = 1.0\n'
        f'targets = ["to_k", "to_q", "to_v", "to_out.0"]\n[runtime.preview]\nevery = 0\n'
    )


def run(kind: str, root: Path, steps: int) -> dict:
    """One cold run in a fresh process (an empty store for ours): its step times, wall, peak RSS."""
    import shutil

    shutil.rmtree(root / ".pipeline", ignore_errors=True)
    shutil.rmtree(root / "output", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--root", str(root), "--steps", str(steps)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    wall = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PEER-RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{kind} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(line.removeprefix("PEER-RESULT "))
    times = result["step_times"]
    assert len(times) == steps, (kind, len(times))
    return {"step_s": statistics.median(times[WARMUP:]), "wall_s": wall, "rss_mib": result["rss_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--buckets", action="store_true", help="mixed aspect ratios; ours in buckets")
    ap.add_argument("--child", choices=["peer", "ours"])
    ap.add_argument("--root", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.root, args.steps)
        return
    import torch

    print(
        f"tiny SD 1.x, {args.images} images at {SETTINGS['resolution']} px, batch {SETTINGS['batch_size']}, rank "
        f"{SETTINGS['rank']}, {args.steps} steps, {args.repeats} repeats, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads" + (", mixed aspect ratios (ours bucketed)" if args.buckets else "")
    )
    results: dict[str, list[dict]] = {"peer": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup(root, args.images, args.steps, args.buckets)
        for r in range(args.repeats):
            for kind in ("peer", "ours") if r % 2 == 0 else ("ours", "peer"):
                res = run(kind, root, args.steps)
                results[kind].append(res)
                print(
                    f"repeat {r + 1} {kind:4s}: {res['step_s'] * 1000:7.1f} ms/step, {res['wall_s']:6.2f} s total, "
                    f"{res['rss_mib']:6.0f} MiB peak RSS",
                    flush=True,
                )
    for what, unit in (("step_s", "s/step"), ("wall_s", "total s"), ("rss_mib", "peak RSS MiB")):
        peer = statistics.median(x[what] for x in results["peer"])
        ours = statistics.median(x[what] for x in results["ours"])
        print(f"{unit:13s} peer {peer:9.4g}  ours {ours:9.4g}  ours/peer {ours / peer:5.2f}x")


if __name__ == "__main__":
    main()
