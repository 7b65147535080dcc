"""Memory per stage: what each stage of `transfer` holds, measured on the tiny models and computed at real size.

1. Peak RSS of each stage run alone (`pipeline run transfer --only STAGE`, one process per stage, in order) on
   the tiny demo models of a family: the text encoder lives only in the text stage's process.
2. Real-size parameter counts of each component, from the real configs instantiated on the meta device (no
   weights are allocated), and the bytes each stage holds at bf16: the text stage holds the text encoder, the
   latents stage the VAE, the training stages the transformer; an all-in-one trainer holds both.

    .venv/bin/python benchmarks/memory.py [--family zimage|flux2|sd15]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STAGES = ("caption", "latents", "text", "lora1", "schedule", "teacher", "prior", "student")

# Real configs: Z-Image's transformer is diffusers' ZImageTransformer2DModel defaults (dim 3840, 30 layers);
# FLUX.2 [klein] 4B: 5 double and 20 single blocks of 24 x 128 heads, Qwen3-4B text (3 x 2560 wide);
# both text encoders are Qwen3-4B (36 layers, 2560 wide); VAEs: 16 (Z-Image) and 32 (FLUX.2) latent channels.
# FLUX.2 [dev]: diffusers' Flux2Transformer2DModel defaults (8 double + 48 single blocks of 48 x 128 heads, guidance
# embedding) and transformers' Mistral3Config defaults (Mistral Small 3.1 24B: 40 layers, 5120 wide, Pixtral tower).
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
)  # fmt: skip


def real_transformer(family: str):
    """The real-size transformer of family (zimage, flux2 = [klein] 4B, flux2-dev) on the meta device."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        if family == "zimage":
            return diffusers.ZImageTransformer2DModel()
        if family == "flux2-dev":
            return diffusers.Flux2Transformer2DModel()
        return diffusers.Flux2Transformer2DModel(
            num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=3 * 2560, guidance_embeds=False,
        )  # fmt: skip


def real_counts(family: str) -> dict[str, int]:
    """family: zimage, flux2 ([klein] 4B) or flux2-dev."""
    import diffusers
    from accelerate import init_empty_weights
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3Model

    def count(model) -> int:
        return sum(p.numel() for p in model.parameters())

    vae_kwargs = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    transformer = real_transformer(family)
    with init_empty_weights():
        if family == "zimage":
            vae = diffusers.AutoencoderKL(
                latent_channels=16,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                **vae_kwargs,
            )
        else:
            vae = diffusers.AutoencoderKLFlux2()
        if family == "flux2-dev":
            text = Mistral3ForConditionalGeneration(Mistral3Config())
        else:
            text = Qwen3Model(Qwen3Config(**QWEN3_4B))
    return {"transformer": count(transformer), "text encoder": count(text), "vae": count(vae)}


def stage_peaks(family: str) -> dict[str, float]:
    """MiB of peak RSS of each stage's own process (os.wait4 gives each child's rusage)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    with tempfile.TemporaryDirectory(prefix="lp-mem-") as tmp:
        base = [sys.executable, str(REPO / "cli.py"), "run", "transfer", "--demo", "--no-progress"]
        if family != "sd15":
            base += ["--family", family]
        subprocess.run([*base, "--dry-run"], cwd=tmp, env=env, check=True, capture_output=True)  # builds the demo
        peaks = {}
        for stage in STAGES:
            proc = subprocess.Popen(
                [*base, "--only", stage], cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                raise SystemExit(f"stage {stage} failed: {proc.stderr.read().decode()[-2000:]}")
            peaks[stage] = usage.ru_maxrss / 1024  # KiB on Linux
        return peaks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="zimage", choices=["sd15", "zimage", "flux2"])
    args = ap.parse_args()
    peaks = stage_peaks(args.family)
    print(f"peak RSS per stage, tiny {args.family} demo models, one process per stage (MiB):")
    print("  " + ", ".join(f"{s} {v:.0f}" for s, v in peaks.items()))
    if args.family == "sd15":
        return
    for model in [args.family] + (["flux2-dev"] if args.family == "flux2" else []):
        counts = real_counts(model)
        gib = {k: v * 2 / 2**30 for k, v in counts.items()}  # bf16
        print(f"real size ({model}), parameters and bf16 weights:")
        for k, v in counts.items():
            print(f"  {k}: {v / 1e9:.2f} B parameters, {gib[k]:.1f} GiB")
        print(
            f"  weights a stage holds: text {gib['text encoder']:.1f} GiB; latents {gib['vae']:.2f} GiB; "
            f"lora1/teacher/prior/student {gib['transformer']:.1f} GiB; an all-in-one trainer (text encoder + "
            f"transformer resident) {gib['text encoder'] + gib['transformer']:.1f} GiB"
        )


if __name__ == "__main__":
    main()
