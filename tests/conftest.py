"""Shared fixtures: a tiny SD 1.5-style model saved in the real formats, and throwaway projects around it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.training.params import train_params  # noqa: F401  (tests import it from here)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parent.parent
# A guard against a hung subprocess, not a speed budget: tests wait for events (a line, a file, an exit), and
# this only stops one that never comes. Generous on purpose, so a machine under heavy load still passes.
SUBPROCESS_TIMEOUT = 3600


def run_cli(args: list[str], cwd: Path, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in a subprocess; a hang fails the test with a message that says it was a time-out."""
    cmd = [sys.executable, str(REPO / "cli.py"), *args]
    try:
        return subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, env=env or os.environ, timeout=SUBPROCESS_TIMEOUT, **kw
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"time-out: `pipeline {' '.join(args)}` ran for over {SUBPROCESS_TIMEOUT} s (a hang?)")


def assert_narrow_weights_predict_like_fp32(family, layout, timesteps) -> None:
    """transfer.weights_dtype's loading (stages/devices.load_frozen) on a family's tiny denoiser: with bf16 weights
    every Linear and Conv2d weight is stored in bf16 and the prediction, computed in fp32, stays within bf16's
    rounding of the fp32 model's (and is not equal to it)."""
    import torch

    from stages.devices import load_frozen
    from stages.families.base import Conditioning

    cpu = torch.device("cpu")
    exact = load_frozen(family, layout, cpu, "fp32", "sdpa")
    narrow = load_frozen(family, layout, cpu, "bf16", "sdpa")
    layers = [m for m in exact.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    stored = [m.parametrizations.weight.original for m in narrow.modules() if hasattr(m, "parametrizations")]
    assert len(stored) == len(layers) > 0 and {w.dtype for w in stored} == {torch.bfloat16}
    cond = Conditioning.stack(family.load_text_encoder(layout, "cpu").encode(["a red circle", "a blue square"]))
    x = torch.randn(2, *family.latent_shape(layout, 32), generator=torch.Generator().manual_seed(0))
    guidance = family.default_guidance_embed if family.has_guidance_embed(layout) else None
    with torch.no_grad():
        want = family.predict(exact, x, timesteps, cond, guidance=guidance)
        got = family.predict(narrow, x, timesteps, cond, guidance=guidance)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    error = ((got - want).abs().mean() / want.abs().mean()).item()
    assert 0 < error < 0.02, error


def bf16_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a model folder or single file with every floating tensor of its .safetensors files in bf16, as
    FLUX.2, Z-Image, Qwen-Image and FLUX.1 are released."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def convert(path: Path, out: Path) -> None:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        save_file(state, str(out), metadata=metadata)

    if src.is_file():
        convert(src, dst)
    else:
        shutil.copytree(src, dst)
        for path in dst.rglob("*.safetensors"):
            convert(path, path)
    return dst


def sharded_bf16_folder(src: Path, dst: Path, parts: tuple[str, ...]) -> Path:
    """A copy of a diffusers folder as the big models are released: its parts (the denoiser, text encoders) in bf16,
    each in several safetensors shards with the index diffusers' and transformers' save_pretrained write beside
    them."""
    import diffusers
    import torch
    import transformers

    shutil.copytree(src, dst)
    for name in parts:
        folder = dst / name
        config = json.loads((folder / "config.json").read_text())
        if "_class_name" in config:  # a diffusers model
            model = getattr(diffusers, config["_class_name"]).from_pretrained(str(folder), use_safetensors=True)
        else:
            model = getattr(transformers, config["architectures"][0]).from_pretrained(str(folder))
        shutil.rmtree(folder)
        model.to(torch.bfloat16).save_pretrained(str(folder), max_shard_size="20KB", safe_serialization=True)
    return dst


def as_variant(folder: Path, components: tuple[str, ...], dtype, variant: str) -> None:
    """Rewrite the components' weights in dtype under the variant's names alone (diffusion_pytorch_model.<variant>.
    safetensors, model.<variant>.safetensors), as a download of a repository's variant files leaves them."""
    from safetensors.torch import load_file, save_file

    for component in components:
        for path in list((folder / component).glob("*.safetensors")):
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
            save_file(state, str(path.with_name(path.name.replace(".safetensors", f".{variant}.safetensors"))))
            path.unlink()


def assert_a_sharded_release_loads_and_is_digested(
    family_name: str, src: Path, tmp_path: Path, text: str = "text_encoder", denoiser: str = "transformer"
) -> None:
    """Real releases are diffusers folders whose denoiser and (large) text encoder are several bf16 safetensors
    shards with an index: every shard's header is read (stored_dtype), the shards load as stored and encode text,
    and a one-bit change to any shard changes the model's digest, so the stages re-run."""
    import numpy as np
    import torch

    from cache.store import Store
    from stages.base import ModelRef
    from stages.families import get_family

    family = get_family(family_name)
    folder = sharded_bf16_folder(src, tmp_path / "sharded", (denoiser, text))
    shards = sorted((folder / denoiser).glob("*.safetensors"))
    assert len(shards) > 2 and (folder / denoiser / "diffusion_pytorch_model.safetensors.index.json").is_file()
    text_shards = sorted((folder / text).glob("model-*-of-*.safetensors"))
    assert len(text_shards) > 1
    layout = family.layout(folder, None)
    assert_a_bf16_checkpoint_loads_as_stored(family, layout)

    def arrays(encoded) -> list:
        if isinstance(encoded, dict):
            return [a for k in sorted(encoded) for a in arrays(encoded[k])]
        if isinstance(encoded, list | tuple):
            return [a for e in encoded for a in arrays(e)]
        return [np.asarray(torch.as_tensor(encoded).float())]

    captions = ["a red circle"]
    reference = arrays(family.load_text_encoder(family.layout(src, None), "cpu").encode(captions))
    encoded = arrays(family.load_text_encoder(layout, "cpu").encode(captions))
    assert len(encoded) == len(reference)
    assert all(np.allclose(a, b, rtol=0.05, atol=0.05) for a, b in zip(encoded, reference, strict=True))

    def digests() -> dict:
        return ModelRef(family_name, folder, None, Store(tmp_path / "store"), "model.path").component_digests

    before = digests()
    for shard in (shards[-1], text_shards[-1]):
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1  # one bit of the last tensor's last value
        shard.write_bytes(bytes(data))
    after = digests()
    assert after[family.lora_component] != before[family.lora_component] and after["text"] != before["text"]
    assert after["vae"] == before["vae"]


def bf16_layout(family, tmp_path: Path, form: str, folder: Path, single: Path):
    """The layout of a bf16 copy (bf16_checkpoint) of a tiny model: its diffusers folder, or (form "single file")
    its single file with the fp32 folder as the config."""
    if form == "folder":
        return family.layout(bf16_checkpoint(folder, tmp_path / folder.name), None)
    return family.layout(bf16_checkpoint(single, tmp_path / single.name), folder)


def assert_a_bf16_checkpoint_loads_as_stored(family, layout) -> None:
    """stored_dtype reads bf16 from the headers, and load_frozen, which then loads the weights as stored (no fp32
    copy), gives the model an fp32 load narrowed afterwards gives, tensor for tensor (bf16 and fp8 weights)."""
    import torch

    from stages.devices import load_frozen
    from stages.training.precision import store_weights_in

    assert family.stored_dtype(layout) == torch.bfloat16
    cpu = torch.device("cpu")
    for weights in ("bf16", "fp8"):
        direct = load_frozen(family, layout, cpu, weights, "sdpa").state_dict()
        reference = family.load_denoiser(layout, cpu)
        store_weights_in(reference, weights, torch.float32)
        reference = reference.state_dict()
        assert direct.keys() == reference.keys()
        for key, value in reference.items():
            assert direct[key].dtype == value.dtype and torch.equal(direct[key], value), (weights, key)


SMALL_SETTINGS = {
    "model": {"path": "model"},
    "latents": {"resolution": 32},
    "lora1": {"rank": 4, "alpha": 8.0, "lr": 1e-3, "steps": 6, "batch_size": 2},
    "runtime": {"checkpoint_every": 2},
}


TRANSFER_SETTINGS = {
    **SMALL_SETTINGS,
    "schedule": {"steps": 6, "batch_size": 2, "heldout": 4},
    "transfer": {"student_model": "student"},
    "student": {"rank": 4, "alpha": 8.0, "lr": 1e-3},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny model as a diffusers folder, with the same weights as a single file beside it (model.safetensors),
    and its "Turbo" sibling (student/: the same VAE and text encoder, a perturbed UNet)."""
    from stages.families.tiny import build_tiny_sd15, build_tiny_turbo

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_sd15(root / "model", seed=0, single_file=root / "model.safetensors")
    build_tiny_turbo(root / "model", root / "student")
    return root


@pytest.fixture(scope="session")
def tiny_flow_models(tmp_path_factory) -> Path:
    """Tiny Z-Image and FLUX.2 [klein] models: <family>/ (diffusers folder), <family>.safetensors (the transformer
    as the single file users download), <family>-turbo/ (the distilled sibling); and flux2-dev/ with its sibling
    flux2-dev-turbo/ (FLUX.2 [dev]: Flux2Pipeline, a Mistral3 text encoder, a guidance embedding)."""
    from stages.families.tiny_flow import build_tiny_flow_turbo, build_tiny_flux2, build_tiny_zimage

    root = tmp_path_factory.mktemp("tiny-flow")
    build_tiny_zimage(root / "zimage", seed=0, single_file=root / "zimage.safetensors")
    build_tiny_flow_turbo(root / "zimage", root / "zimage-turbo")
    build_tiny_flux2(root / "flux2", seed=0, single_file=root / "flux2.safetensors")
    build_tiny_flow_turbo(root / "flux2", root / "flux2-turbo")
    build_tiny_flux2(root / "flux2-dev", seed=5, variant="dev")
    build_tiny_flow_turbo(root / "flux2-dev", root / "flux2-dev-turbo")
    return root


def toml_config(settings: dict) -> str:
    from pipeline.schema_docs import toml_value

    if "runtime.preview" not in settings and "preview" not in settings.get("runtime", {}):
        # Previews are on by default (every quarter of a stage's steps); rendering them in every test run would cost
        # a minute of the suite, so a config leaves them off unless it has a [runtime.preview] of its own (the tests
        # of previews, and test_newcomer's of the defaults, set one).
        settings = {**settings, "runtime.preview": {"every": 0}}
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


class Project:
    """A folder with images, captions, a model and a pipeline.toml; runs the CLI in-process or as a subprocess."""

    def __init__(self, root: Path, settings: dict):
        self.root = root
        self.settings = settings
        self.write_config()

    @property
    def config(self) -> Path:
        return self.root / "pipeline.toml"

    @property
    def store(self) -> Path:
        return self.root / ".pipeline"

    def write_config(self, **sections) -> None:
        for name, values in sections.items():
            self.settings.setdefault(name, {}).update(values)
        self.config.write_text(toml_config(self.settings))

    def cli(self, *args: str):
        from cli import app

        return CliRunner().invoke(
            app, [*args[:2], "-c", str(self.config), *args[2:]] if args[0] in ("run", "status") else [*args]
        )

    def run(self, workflow: str, *args: str):
        """`pipeline run WORKFLOW --json ARGS` in this process; the test fails with its output unless it succeeds."""
        result = self.cli("run", workflow, "--json", *args)
        assert result.exit_code == 0, result.output
        return result

    def run_json(self, *args: str, workflow: str = "lora") -> dict:
        return json.loads(self.run(workflow, *args).stdout)

    def subprocess(self, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return run_cli(list(args), self.root, env={**os.environ, **(env or {})}, **kw)

    def manifests(self, stage: str) -> list[Path]:
        return sorted((self.store / "stages" / stage).glob("*/manifest.json"))


def make_images(folder: Path, count: int, start: int = 0, size: int = 48) -> None:
    from pipeline.demo import write_images

    tmp = folder.parent / f".gen{start}"
    write_images(tmp, count=count + start, size=size, seed=start)
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(tmp.iterdir())[2 * start :]:
        shutil.move(str(path), folder / path.name)
    shutil.rmtree(tmp)


def make_mixed_images(folder: Path, count: int = 6) -> None:
    """make_images, then a third of them stretched to 72x24 (landscape, aspect 3) and a third to 24x72 (portrait):
    with the auto buckets of resolution 32 in steps of 16 they go to 32x32, 48x16 and 16x48."""
    from PIL import Image

    make_images(folder, count)
    for n, path in enumerate(sorted(folder.glob("*.png"))):
        size = [None, (72, 24), (24, 72)][n % 3]
        if size:
            with Image.open(path) as im:
                im.resize(size, Image.Resampling.BICUBIC).save(path)


# latents.buckets = "auto" at the tiny models' resolution: sizes 32x32, 48x16, 16x48, 64x16 and 16x64
TINY_BUCKETS = {"buckets": "auto", "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 16}


@pytest.fixture
def project(tmp_path, tiny_model) -> Project:
    shutil.copytree(tiny_model / "model", tmp_path / "model")
    make_images(tmp_path / "images", 6)
    return Project(tmp_path, json.loads(json.dumps(SMALL_SETTINGS)))


@pytest.fixture
def transfer_project(tmp_path, tiny_model) -> Project:
    """A project with a teacher (model/) and a student (student/) model, set up for `pipeline run transfer`."""
    shutil.copytree(tiny_model / "model", tmp_path / "model")
    shutil.copytree(tiny_model / "student", tmp_path / "student")
    make_images(tmp_path / "images", 6)
    return Project(tmp_path, json.loads(json.dumps(TRANSFER_SETTINGS)))


DIFFERENTIAL_SETTINGS = {
    "model": {"path": "model"},
    "latents": {"resolution": 32},
    "differential": {"eval_samples": 2},
    "differential.lora1": {"rank": 4, "alpha": 4.0, "lr": 5e-3, "steps": 4, "batch_size": 1},
    "differential.lora2": {"rank": 4, "alpha": 4.0, "lr": 5e-3, "steps": 4, "batch_size": 1, "seed": 43},
    "runtime": {"checkpoint_every": 2},
}


def make_pairs(folder: Path, names=("red-circle", "yellow-square"), size: int = 32) -> None:
    from pipeline.demo import PAIRS, write_pairs

    tmp = folder.parent / ".pairs-gen"
    write_pairs(tmp, size=size)
    wanted = {f"{fg}-{shape}" for fg, shape, _ in PAIRS} & set(names)
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(wanted):
        shutil.move(str(tmp / name), folder / name)
    shutil.rmtree(tmp)


@pytest.fixture
def differential_project(tmp_path, tiny_model) -> Project:
    """Two (blurred A, sharp B) pairs under pairs/, set up for `pipeline run differential`."""
    shutil.copytree(tiny_model / "model", tmp_path / "model")
    make_pairs(tmp_path / "pairs")
    return Project(tmp_path, json.loads(json.dumps(DIFFERENTIAL_SETTINGS)))


def pair_project(tmp_path: Path, base_dir: Path, sibling_dir: Path, **sections) -> Project:
    """A transfer-ready project on a model folder and its distilled sibling (copied to model/ and student/), six
    images at 32 px and small lora1 / schedule / student settings; `sections` update them."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base_dir, tmp_path / "model")
    shutil.copytree(sibling_dir, tmp_path / "student")
    make_images(tmp_path / "images", 6)
    settings = {
        "model": {"path": "model"},
        "latents": {"resolution": 32},
        "lora1": {"rank": 4, "alpha": 8.0, "lr": 1e-3, "steps": 4, "batch_size": 2},
        "schedule": {"steps": 4, "batch_size": 2, "heldout": 4},
        "transfer": {"student_model": "student"},
        "student": {"rank": 4, "alpha": 8.0, "lr": 1e-3},
    }
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    return Project(tmp_path, settings)


def stage_manifest(project: Project, report: dict, stage: str) -> dict:
    """The manifest of the stage a `run --json` report names."""
    key = next(s["key"] for s in report["stages"] if s["name"] == stage)
    return json.loads((project.store / "stages" / stage / key / "manifest.json").read_text())


def actions(report: dict) -> dict[str, str]:
    return {s["name"]: s["action"] for s in report["stages"]}


def train_tiny_sd15(tiny_model: Path, work: Path, **settings):
    """The real lora1 loop for a few steps on the tiny SD model and random latents (2 captions, 4 items).
    settings: TrainConfig fields. -> (family, layout, params, outcome)."""
    import torch

    from pipeline.config import TrainConfig
    from stages.families import Conditioning
    from stages.families.sd15 import SD15Family
    from stages.training.loop import DiffusionBatches, TrainData, TrainJob, train_lora

    family = SD15Family()
    layout = family.layout(tiny_model / "model", None)
    params = train_params(family, layout, TrainConfig(**{"batch_size": 2, **settings}), (4, 4, 4))
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(2, 77, 32, generator=g), torch.ones(2, 77, dtype=torch.bool))
    data = TrainData(torch.randn(4, 4, 4, 4, generator=g), cond, torch.tensor([0, 1, 0, 1]))
    job = TrainJob(family, layout, "epsilon", params, torch.device("cpu"), work, progress=False)
    return family, layout, params, train_lora(job, DiffusionBatches(data, params.seed, params.batch_size))


# The tiny WD14 tagger's outputs (selected_tags.csv rows: name, category) and its weights on the BGR channel means
# (0..1) of the padded image: score = sigmoid(w_b * b + w_g * g + w_r * r + bias).
TINY_TAGS = [
    ("general", "9", (0, 0, 0), 1.0),
    ("sensitive", "9", (0, 0, 0), -1.0),
    ("questionable", "9", (0, 0, 0), -1.0),
    ("explicit", "9", (0, 0, 4), -2.0),  # red images rate explicit (sigmoid 2 > sigmoid 1)
    ("red_theme", "0", (-5, -5, 10), -3.0),
    ("green_theme", "0", (-5, 10, -5), -3.0),
    ("blue_theme", "0", (10, -5, -5), -3.0),
    ("^_^", "0", (0, 0, 0), 0.0),  # 0.5 on every image
    ("white_background", "0", (3, 3, 3), -6.0),
    ("hatsune_miku_(vocaloid)", "4", (6, 6, -6), -4.0),  # cyan images
]


def tiny_tag_scores(bgr_means) -> list[float]:
    """What the tiny tagger gives an image whose padded, resized BGR channel means (0..1) are bgr_means."""
    import math

    logits = [sum(w * m for w, m in zip(ws, bgr_means, strict=True)) + b for _, _, ws, b in TINY_TAGS]
    return [1 / (1 + math.exp(-z)) for z in logits]


def make_tiny_tagger(folder: Path, side: int = 448, tags=TINY_TAGS) -> Path:
    """A WD14-tagger folder as SmilingWolf publishes it (model.onnx, selected_tags.csv) with a tiny model of the same
    input and output: NHWC float32 BGR 0-255 images of side x side, one sigmoid score per tag."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([ws for _, _, ws, _ in tags], dtype=np.float32).T / 255.0  # [3, T] on 0-255 means
    bias = np.array([b for *_, b in tags], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["means"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["means", "weights"], ["logits0"]),
            helper.make_node("Add", ["logits0", "bias"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["output"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", side, side, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(tags)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    lines = ["tag_id,name,category,count"] + [f"{i},{name},{cat},{100 - i}" for i, (name, cat, *_) in enumerate(tags)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def grid_cell(grid, box, size: int):
    """The image at box ([x, y, scale]: `pipeline sample --json` cells) of a grid, at its own size x size pixels."""
    x, y, scale = box
    return grid[y : y + size * scale : scale, x : x + size * scale : scale]
