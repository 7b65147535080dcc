"""The built-in demo: a tiny model, its "Turbo" sibling and a small generated, captioned image set.

`pipeline run transfer --demo` (or `lora`, `differential`) builds ./pipeline-demo/ once (deterministically, so
its digests never change and a second run reuses every stage), then runs the workflow on its pipeline.toml.
`--family sdxl|flux1|zimage|flux2|qwenimage` do the same with tiny SDXL and SDXL-Turbo-like, FLUX.1 [dev] and
[schnell]-like, Z-Image and Z-Image Turbo-like, FLUX.2 [klein] Base and distilled-like, Qwen-Image and
Lightning-like pairs in ./pipeline-demo-<family>/.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pipeline.schema_docs import example_config_toml

DEMO_DIR = Path("pipeline-demo")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 190),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")

DEMO_SETTINGS = {
    "model": {"path": "models/tiny-sd15"},
    "latents": {"resolution": 64},
    "lora1": {
        "rank": 4,
        "alpha": 8.0,
        "lr": 1e-3,
        "steps": 120,
        "batch_size": 2,
        "lr_scheduler": "cosine",
        "warmup_steps": 10,
    },
    "schedule": {"steps": 80, "batch_size": 2, "heldout": 8},
    "transfer": {"student_model": "models/tiny-turbo"},
    "student": {"rank": 4, "alpha": 8.0, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 5},
    "differential": {"pairs_dir": "pairs"},
    "differential.lora1": {"rank": 8, "alpha": 8.0, "lr": 5e-3, "steps": 150, "batch_size": 1},
    "differential.lora2": {"rank": 8, "alpha": 8.0, "lr": 5e-3, "steps": 150, "batch_size": 1, "seed": 43},
    "runtime": {"checkpoint_every": 40, "fidelity_every": 20},
    "runtime.preview": {  # at the demo's 64 px: the tiny models' "native" size is the real models' (up to 1024 px)
        "every": 60,
        "steps": 10,
        "width": 64,
        "height": 64,
        "prompts": ["a red circle on a blue background", "a yellow square on a black background"],
    },
}


def draw_scene(shape: str, fg: str, bg: str, size: int, jitter: tuple[int, int, int]):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), COLORS[bg])
    draw = ImageDraw.Draw(image)
    dx, dy, dr = jitter
    c, r = size // 2, size // 3 + dr
    box = (c - r + dx, c - r + dy, c + r + dx, c + r + dy)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[fg])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[fg])
    else:
        draw.polygon([(c + dx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLORS[fg])
    return image


def write_images(folder: Path, count: int = 12, size: int = 96, seed: int = 0) -> None:
    """Shapes on plain backgrounds, each with a sidecar caption that describes it."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(count):
        shape, fg = SHAPES[i % 3], names[i % len(names)]
        bg = rng.choice([n for n in names if n != fg])
        jitter = (rng.randint(-6, 6), rng.randint(-6, 6), rng.randint(-4, 4))
        draw_scene(shape, fg, bg, size, jitter).save(folder / f"{i:03d}_{fg}_{shape}.png")
        (folder / f"{i:03d}_{fg}_{shape}.txt").write_text(f"a {fg} {shape} on a {bg} background\n")


PAIRS = (("red", "circle", "blue"), ("yellow", "square", "purple"), ("white", "triangle", "green"))


def write_pairs(folder: Path, size: int = 64) -> None:
    """One folder per pair: the same scene, blurred in a/ and sharp in b/, with the same caption."""
    from PIL import ImageFilter

    for fg, shape, bg in PAIRS:
        scene = draw_scene(shape, fg, bg, size, (0, 0, 0))
        caption = f"a {fg} {shape} on a {bg} background\n"
        for side, image in (("a", scene.filter(ImageFilter.GaussianBlur(4))), ("b", scene)):
            out = folder / f"{fg}-{shape}" / side
            out.mkdir(parents=True, exist_ok=True)
            image.save(out / "scene.png")
            (out / "scene.txt").write_text(caption)


# The transformer families: their own models, a lower learning rate for attention-only LoRAs on a DiT, the
# transfer guidance the seed recommends (2.5 FLUX.2, 3.0 Z-Image Turbo), and flow-matching previews (Turbo: no
# CFG). Images must be a multiple of 16 pixels (8x VAE, 2x2 patches).
SMALL = {"width": 64, "height": 64}  # previews at the demo's resolution
FAMILY_SETTINGS = {
    "sdxl": {  # SD's settings; an SDXL pair whose student UNet is perturbed, like SD's Turbo
        "model": {"path": "models/tiny-sdxl", "family": "sdxl"},
        "transfer": {"student_model": "models/tiny-sdxl-turbo"},
    },
    "flux1": {  # [dev] teaches a [schnell]-like student: no guidance embedding, its own scheduler, no CFG
        "model": {"path": "models/tiny-flux1-dev", "family": "flux1"},
        "transfer": {"student_model": "models/tiny-flux1-schnell"},
        "student": {"rank": 4, "alpha": 8.0, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 5, "guidance": 1.0},
        "runtime.preview": {"every": 60, "steps": 4, "guidance_scale": 3.5, "prompts": ["a red circle"], **SMALL},
    },
    "zimage": {
        "model": {"path": "models/tiny-zimage", "family": "zimage"},
        "transfer": {"student_model": "models/tiny-zimage-turbo"},
        "student": {"rank": 4, "alpha": 8.0, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 5, "guidance": 3.0},
        "runtime.preview": {"every": 60, "steps": 4, "guidance_scale": 0.0, "prompts": ["a red circle"], **SMALL},
    },
    "flux2": {
        "model": {"path": "models/tiny-flux2", "family": "flux2"},
        "transfer": {"student_model": "models/tiny-flux2-distilled"},
        "student": {"rank": 4, "alpha": 8.0, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 5, "guidance": 2.5},
        "runtime.preview": {"every": 60, "steps": 4, "guidance_scale": 1.0, "prompts": ["a red circle"], **SMALL},
    },
    "qwenimage": {  # a Lightning-style (CFG- and step-distilled) student: no CFG in its previews
        "model": {"path": "models/tiny-qwenimage", "family": "qwenimage"},
        "transfer": {"student_model": "models/tiny-qwenimage-lightning"},
        "student": {"rank": 4, "alpha": 8.0, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 5, "guidance": 3.0},
        "runtime.preview": {"every": 60, "steps": 4, "guidance_scale": 1.0, "prompts": ["a red circle"], **SMALL},
    },
}


def demo_dir(family: str = "sd15") -> Path:
    return DEMO_DIR if family == "sd15" else Path(f"pipeline-demo-{family}")


def demo_config_text(family: str = "sd15") -> str:
    return example_config_toml({**DEMO_SETTINGS, **FAMILY_SETTINGS.get(family, {})})


def _build(target: Path, what: str, make) -> None:
    """Build a model folder under a temporary name and rename it into place (a kill leaves no half model)."""
    if (target / "model_index.json").exists():
        return
    print(f"demo: building {what} in {target} (random weights) ...", file=sys.stderr)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    make(tmp)
    tmp.rename(target)


def ensure_demo(root: Path | None = None, family: str = "sd15") -> Path:
    """Build the demo folder of a family if it is not there yet; return its config path."""
    root = root or demo_dir(family)
    if family != "sd15":
        return _ensure_family_demo(root, family)
    config = root / "pipeline.toml"
    model = root / "models" / "tiny-sd15"
    if not (model / "model_index.json").exists():
        print(f"demo: building a tiny SD 1.5-style model in {model} (random weights) ...", file=sys.stderr)
        from stages.families.tiny import build_tiny_sd15

        tmp = model.with_name(".tiny-sd15.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_sd15(tmp, seed=0)
        tmp.rename(model)
    turbo = root / "models" / "tiny-turbo"
    if not (turbo / "model_index.json").exists():
        print(f"demo: building its 'Turbo' sibling in {turbo} (the same VAE and text encoder) ...", file=sys.stderr)
        from stages.families.tiny import build_tiny_turbo

        tmp = turbo.with_name(".tiny-turbo.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_turbo(model, tmp)
        tmp.rename(turbo)
    _ensure_data(root)
    if not config.exists() or "[differential]" not in config.read_text():  # absent, or from an older demo
        config.write_text(demo_config_text())
    return config


def _ensure_data(root: Path) -> None:
    if not (root / "images").exists():
        print(f"demo: drawing a captioned image set in {root / 'images'} ...", file=sys.stderr)
        write_images(root / "images")
    if not (root / "pairs").exists():
        print(f"demo: drawing blurred (A) / sharp (B) pairs in {root / 'pairs'} ...", file=sys.stderr)
        write_pairs(root / "pairs")


def _ensure_family_demo(root: Path, family: str) -> Path:
    from stages.families import tiny_flow

    base = root / FAMILY_SETTINGS[family]["model"]["path"]
    turbo = root / FAMILY_SETTINGS[family]["transfer"]["student_model"]
    from stages.families import tiny

    builders = {
        "sdxl": tiny.build_tiny_sdxl,
        "flux1": tiny_flow.build_tiny_flux1,
        "zimage": tiny_flow.build_tiny_zimage,
        "flux2": tiny_flow.build_tiny_flux2,
        "qwenimage": tiny_flow.build_tiny_qwenimage,
    }
    pretty = {
        "sdxl": "a tiny SDXL model",
        "flux1": "a tiny FLUX.1 [dev] model",
        "zimage": "a tiny Z-Image model",
        "flux2": "a tiny FLUX.2 [klein] Base model",
        "qwenimage": "a tiny Qwen-Image model",
    }
    sibling = {"sdxl": tiny.build_tiny_turbo, "flux1": tiny_flow.build_tiny_flux1_schnell}.get(
        family, tiny_flow.build_tiny_flow_turbo
    )
    _build(base, pretty[family], lambda tmp: builders[family](tmp, seed=0))
    _build(turbo, "its distilled ('Turbo') sibling", lambda tmp: sibling(base, tmp))
    _ensure_data(root)
    config = root / "pipeline.toml"
    if not config.exists():
        config.write_text(demo_config_text(family))
    return config
