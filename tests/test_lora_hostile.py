"""Hostile and foreign LoRA files: every one gets a named error or a correct result, never a traceback; text
encoder modules are carried or refused by name, never dropped; metadata names the model that was trained."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import grid_cell
from safetensors.torch import load_file, save_file

from core.errors import PipelineError
from stages.families import get_family
from stages.training.lora_files import read_lora_file
from stages.training.lora_ops import delta_weight

FAMILY = get_family("sd15")


def kohya_tensors(seed: int = 0, rank: int = 2, text: bool = True) -> dict[str, torch.Tensor]:
    """A small valid kohya LoRA: two UNet modules and (optionally) one text-encoder module."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    names = ["lora_unet_a_to_q", "lora_unet_a_to_k"] + (["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] * text)
    for name in names:
        out[f"{name}.lora_down.weight"] = torch.randn(rank, 8, generator=g)
        out[f"{name}.lora_up.weight"] = torch.randn(6, rank, generator=g)
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def cli(*args):
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, list(args))


# -- named errors for each hostile shape ------------------------------------------------------------------------

CASES = {
    "ranks disagree": (
        lambda t: t.update({"lora_unet_a_to_q.lora_up.weight": torch.randn(6, 3)}),
        "do not fit together",
    ),
    "1-D factor": (lambda t: t.update({"lora_unet_a_to_q.lora_down.weight": torch.randn(8)}), "1-D down factor"),
    "rank-0 tensor": (lambda t: t.update({"lora_unet_a_to_q.lora_down.weight": torch.tensor(1.0)}), "0-D down"),
    "NaN weight": (lambda t: t["lora_unet_a_to_k.lora_up.weight"].__setitem__((0, 0), float("nan")), "NaN or inf"),
    "inf alpha": (lambda t: t.update({"lora_unet_a_to_q.alpha": torch.tensor(float("inf"))}), "NaN or inf"),
    "multi-element alpha": (lambda t: t.update({"lora_unet_a_to_q.alpha": torch.ones(2)}), "not one number"),
    "integer factor": (
        lambda t: t.update({"lora_unet_a_to_q.lora_down.weight": torch.ones(2, 8, dtype=torch.int32)}),
        "not floating point",
    ),
    "up without down": (lambda t: t.pop("lora_unet_a_to_q.lora_down.weight"), "has no matching"),
    "unknown component": (
        lambda t: t.update(
            {"lora_te3_x.lora_down.weight": torch.ones(2, 8), "lora_te3_x.lora_up.weight": torch.ones(6, 2)}
        ),
        "for no part",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["info", "mix", "convert", "merge"])
def test_a_hostile_lora_file_is_a_named_error_in_every_tool(tmp_path, monkeypatch, case, command):
    mutate, message = CASES[case]
    tensors = kohya_tensors(text=False)
    mutate(tensors)
    path = write(tmp_path / "bad.safetensors", tensors)
    monkeypatch.chdir(tmp_path)
    args = {
        "info": ["lora", "info", "bad.safetensors"],
        "mix": ["lora", "mix", "bad.safetensors:0.5", "--out", "o.safetensors"],
        "convert": ["lora", "convert", "bad.safetensors", "--to", "kohya", "--out", "o.safetensors"],
        "merge": ["lora", "merge", "bad.safetensors", "--model", "nowhere", "--out", "merged"],
    }[command]
    result = cli(*args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    if command != "merge":  # merge may first say the model is missing; the reader's message is checked elsewhere
        assert str(path.name) in result.output and message in result.output
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"lora_adapter_metadata": "{"}, "not a valid adapter config"),
        ({"lora_adapter_metadata": '{"unet.lora_alpha": "abc"}'}, "not a valid adapter config"),
        ({"lora_adapter_metadata": '{"unet.alpha_pattern": [1, 2]}'}, "not a valid adapter config"),
        ({"lora_adapter_metadata": "[1]"}, "not a valid adapter config"),
    ],
)
def test_wrongly_typed_metadata_is_a_named_error(tmp_path, metadata, message):
    from stages.training.lora_files import _SUFFIXES  # noqa: F401  (the peft names below are what diffusers writes)

    g = torch.Generator().manual_seed(0)
    tensors = {
        "unet.a.to_q.lora_A.weight": torch.randn(2, 8, generator=g),
        "unet.a.to_q.lora_B.weight": torch.randn(6, 2, generator=g),
    }
    path = write(tmp_path / "meta.safetensors", tensors, metadata)
    with pytest.raises(PipelineError, match=message):
        read_lora_file(path)


def _mutations(rng: random.Random, tensors: dict) -> tuple[dict, dict, bytes | None]:
    """One random malformation of a valid file: tensors, metadata, or raw bytes."""
    tensors = {k: v.clone() for k, v in tensors.items()}
    meta: dict = {}
    keys = sorted(tensors)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["shape", "value", "drop", "dtype", "alpha", "meta", "rename", "bytes"])
        k = rng.choice(keys)
        if kind == "shape" and k in tensors:
            tensors[k] = torch.randn(tuple(rng.randint(0, 4) for _ in range(rng.choice([0, 1, 2, 3, 4]))))
        elif kind == "value" and k in tensors and tensors[k].numel():
            tensors[k].view(-1)[0] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30])
        elif kind == "drop":
            tensors.pop(k, None)
        elif kind == "dtype" and k in tensors:
            tensors[k] = tensors[k].to(rng.choice([torch.int64, torch.float16, torch.bfloat16, torch.uint8]))
        elif kind == "alpha":
            tensors[k.rsplit(".", 2)[0] + ".alpha"] = torch.randn(rng.randint(0, 3))
        elif kind == "meta":
            meta["lora_adapter_metadata"] = rng.choice(
                ['{"unet.lora_alpha": "x"}', "nope", '{"unet.lora_alpha": 1e999}']
            )
        elif kind == "rename" and k in tensors:
            tensors[k.replace("lora_unet_", rng.choice(["lora_te_", "lora_te2_", "lora_xx_", ""]))] = tensors.pop(k)
        elif kind == "bytes":
            return tensors, meta, bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    return tensors, meta, None


def test_fuzzed_lora_files_give_a_named_error_or_a_correct_result(tmp_path, monkeypatch):
    """200 seeded malformations through info, mix and convert: exit 2 with a message, or exit 0 with an output
    whose ΔW is exactly the input's (mix with weight 1 of one file is the file)."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(1234)
    base = kohya_tensors()
    outcomes = {"error": 0, "ok": 0}
    for i in range(200):
        tensors, meta, raw = _mutations(rng, base)
        path = tmp_path / f"f{i}.safetensors"
        if raw is not None:
            path.write_bytes(raw)
        else:
            write(path, tensors, meta or None)
        for args in (
            ["lora", "info", path.name],
            ["lora", "mix", f"{path.name}:1", "--out", f"mix{i}.safetensors"],
            ["lora", "convert", path.name, "--to", "kohya", "--out", f"conv{i}.safetensors"],
        ):
            result = cli(*args)
            assert result.exit_code in (0, 2), (args, result.output, result.exception)
            assert "Traceback" not in result.output
            outcomes["ok" if result.exit_code == 0 else "error"] += 1
        mixed = tmp_path / f"mix{i}.safetensors"
        if mixed.exists():
            src, out = read_lora_file(path), read_lora_file(mixed)
            for name, mod in src.modules.items():
                torch.testing.assert_close(delta_weight(out.modules[name]), delta_weight(mod), atol=1e-4, rtol=1e-4)
    assert outcomes["error"] > 100 and outcomes["ok"] > 0, outcomes  # the generator exercises both sides


# -- text-encoder modules -------------------------------------------------------------------------------------


def test_text_encoder_modules_are_listed_and_carried_through_kohya_mix_and_convert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.safetensors", kohya_tensors(0))
    write(tmp_path / "b.safetensors", kohya_tensors(1, rank=3))
    info = json.loads(cli("lora", "info", "a.safetensors", "--json").stdout)
    assert info["text_encoder_modules"] == {"text_encoder": 1} and info["modules"] == 2
    assert "ComfyUI" in info["loads_in"]

    result = cli("lora", "mix", "a.safetensors:0.5", "b.safetensors:-1", "--out", "m.safetensors")
    assert result.exit_code == 0, result.output
    assert "1 text_encoder modules" in result.output
    a, b, m = (read_lora_file(tmp_path / f) for f in ("a.safetensors", "b.safetensors", "m.safetensors"))
    name = "text_model_encoder_layers_0_self_attn_q_proj"
    want = 0.5 * delta_weight(a.text_modules["text_encoder"][name]) - delta_weight(b.text_modules["text_encoder"][name])
    torch.testing.assert_close(delta_weight(m.text_modules["text_encoder"][name]), want, atol=1e-5, rtol=1e-5)
    assert any(k.startswith("lora_te_") for k in load_file(str(tmp_path / "m.safetensors")))

    assert cli("lora", "convert", "a.safetensors", "--to", "kohya", "--out", "c.safetensors").exit_code == 0
    assert load_file(str(tmp_path / "c.safetensors")).keys() == load_file(str(tmp_path / "a.safetensors")).keys()

    result = cli("lora", "convert", "a.safetensors", "--to", "kohya", "--unet-only", "--out", "u.safetensors")
    assert result.exit_code == 0, result.output
    assert not any(k.startswith("lora_te_") for k in load_file(str(tmp_path / "u.safetensors")))


@pytest.fixture
def lora_with_text_encoder(project, tmp_path) -> Path:
    """A kohya LoRA for the tiny model on the UNet's to_q and the text encoder's attention, with factors
    large enough that both show in the outputs."""
    from diffusers import UNet2DConditionModel

    from stages.training.lora_files import add_lora, lora_state_dict, save_kohya, to_kohya

    unet = UNet2DConditionModel.from_pretrained(str(project.root / "model"), subfolder="unet")
    add_lora(unet, 2, 2.0, 0.0, ["to_q"], 0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    te = {}
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):  # what kohya trains (diffusers needs out_proj)
            base = f"text_model.encoder.layers.{layer}.self_attn.{proj}"
            te[f"{base}.lora_A.weight"] = torch.randn(2, 32, generator=g) * 0.5
            te[f"{base}.lora_B.weight"] = torch.randn(32, 2, generator=g) * 0.5
    path = tmp_path / "with_te.safetensors"
    save_kohya(lora_state_dict(unet), 2, 2.0, path, "lora_unet_", {}, extra=to_kohya(te, 2.0, "lora_te_"))
    return path


def _text_and_unet_outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0], pipe.unet(x, torch.tensor([500]), encoder_hidden_states=c).sample


def test_merge_bakes_text_encoder_modules_like_diffusers_applies_them(project, lora_with_text_encoder, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged"
    result = cli(
        "lora", "merge", str(lora_with_text_encoder), "--model", str(project.root / "model"), "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert "8 text-encoder layers" in result.output
    merged = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    ref = StableDiffusionPipeline.from_pretrained(str(project.root / "model"), safety_checker=None)
    base_text, _ = _text_and_unet_outputs(ref)
    ref.load_lora_weights(str(lora_with_text_encoder.parent), weight_name=lora_with_text_encoder.name)
    want_text, want_unet = _text_and_unet_outputs(ref)
    got_text, got_unet = _text_and_unet_outputs(merged)
    assert (want_text - base_text).abs().max() > 1e-2, "the LoRA must change the text encoder for this to test it"
    torch.testing.assert_close(got_text, want_text, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_unet, want_unet, atol=1e-4, rtol=1e-4)


def test_converting_text_encoder_modules_to_diffusers_keeps_them(project, lora_with_text_encoder, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "d.safetensors"
    args = ["--to", "diffusers", "--out", str(out)]
    result = cli("lora", "convert", str(lora_with_text_encoder), *args)
    assert result.exit_code == 2 and "Pass --model" in result.output, "kohya names need the model to get their dots"
    result = cli("lora", "convert", str(lora_with_text_encoder), *args, "--model", str(project.root / "model"))
    assert result.exit_code == 0, result.output
    assert any(k.startswith("text_encoder.") for k in load_file(str(out)))
    outs = []
    for lora in (lora_with_text_encoder, out):
        pipe = StableDiffusionPipeline.from_pretrained(str(project.root / "model"), safety_checker=None)
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        outs.append(_text_and_unet_outputs(pipe))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)


def test_sample_applies_text_encoder_modules_as_diffusers_does(project, lora_with_text_encoder, tmp_path):
    """The grid's column at scale s is diffusers' load_lora_weights + set_adapters([s]), text encoder included."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    model, grid_path = project.root / "model", tmp_path / "grid.png"
    result = cli("sample", "--model", str(model), "--lora", f"{lora_with_text_encoder}:0.5", "--prompt", "a red circle",
                 "--scales", "0,1", "--seed", "3", "--steps", "3", "--size", "32", "--out", str(grid_path),
                 "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    boxes = json.loads(result.stdout)["cells"]
    grid = np.asarray(Image.open(grid_path).convert("RGB")).astype(int)
    cells = []
    for unet_only in (False, True):
        pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
        pipe.load_lora_weights(str(lora_with_text_encoder.parent), weight_name=lora_with_text_encoder.name,
                               adapter_name="x")  # fmt: skip
        pipe.set_adapters(["x"], [0.5])
        if unet_only:
            pipe.text_encoder.disable_adapters()
        image = pipe("a red circle", num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
                     generator=torch.Generator().manual_seed(3)).images[0]  # fmt: skip
        cells.append(np.asarray(image).astype(int))
    assert np.abs(grid_cell(grid, boxes[0][1], 32) - cells[0]).max() <= 1
    assert np.abs(cells[0] - cells[1]).max() > 10, "the text encoder's modules must change the picture"


def test_stages_that_apply_only_the_unet_refuse_text_encoder_modules_by_name(project, lora_with_text_encoder):
    name = "text_model_encoder_layers_0_self_attn_"
    project.write_config(transfer={"student_model": "model", "teacher_lora": str(lora_with_text_encoder)})
    result = project.cli("run", "transfer")
    assert result.exit_code == 2, result.output
    assert "the teacher applies LoRAs to the UNet only" in result.output and name in result.output


# -- metadata and file modes ------------------------------------------------------------------------------------


def test_trained_lora_metadata_names_the_prediction_type_it_was_trained_for(project):
    result = project.cli("run", "lora", "--set", "model.prediction_type='v_prediction'", "--no-progress")
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(str(project.root / "output" / "lora" / "lora1" / "lora1.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1_v" and meta["ss_v_parameterization"] == "True"
    assert meta["ss_v2"] == "False" and meta["modelspec.prediction_type"] == "v"


@pytest.mark.parametrize(
    "unet_config, prediction, version, arch",
    [
        ({}, "epsilon", "sd_v1", "stable-diffusion-v1/lora"),
        (
            {"use_linear_projection": True, "cross_attention_dim": 1024},
            "epsilon",
            "sd_v2",
            "stable-diffusion-v2-512/lora",
        ),
        ({"use_linear_projection": True}, "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
    ],
)
def test_sd2_models_are_labelled_sd2(tiny_model, tmp_path, unet_config, prediction, version, arch):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model / "model", model)
    cfg_path = model / "unet" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **unet_config}))
    sched = model / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": prediction}))
    meta = FAMILY.lora_metadata(FAMILY.layout(model, None))
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == (version, arch)
    assert meta["ss_v2"] == str(version.startswith("sd_v2"))


def test_lora_merge_writes_with_the_user_umask(project, tmp_path):
    """safetensors creates files owner-only (0600); a merged model is shared like every other output."""
    assert project.cli("run", "lora", "--no-progress").exit_code == 0
    lora = project.root / "output" / "lora" / "lora1" / "lora1.safetensors"
    out = tmp_path / "merged"
    old = os.umask(0o022)
    try:
        result = cli("lora", "merge", str(lora), "--model", str(project.root / "model"), "--out", str(out))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    weights = list(out.rglob("*.safetensors"))
    assert weights and {p.stat().st_mode & 0o777 for p in weights} == {0o644}
