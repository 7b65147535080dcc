"""Qwen-Image: detection, text encoding and the transformer call as QwenImagePipeline does them, single-file
transformers, the workflows on a tiny Qwen-Image with its Lightning-style sibling, and LoRA files that
QwenImagePipeline and ComfyUI load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    Project,
    assert_a_bf16_checkpoint_loads_as_stored,
    assert_a_sharded_release_loads_and_is_digested,
    assert_narrow_weights_predict_like_fp32,
    bf16_layout,
    make_pairs,
    pair_project,
    stage_manifest,
    train_params,
)

from stages.families import detect_family, detect_lora_family, get_family
from stages.families.base import Conditioning


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from stages.families.tiny_flow import build_tiny_flow_turbo, build_tiny_qwenimage

    root = tmp_path_factory.mktemp("tiny-qwenimage")
    build_tiny_qwenimage(root / "base", seed=0, single_file=root / "base.safetensors")
    build_tiny_flow_turbo(root / "base", root / "lightning")
    return root


def qwen_project(tmp_path, tiny_qwen, **sections) -> Project:
    return pair_project(tmp_path, tiny_qwen / "base", tiny_qwen / "lightning", **sections)


def record(project, report: dict, stage: str) -> dict:
    return stage_manifest(project, report, stage)


def test_qwenimage_is_detected_from_folders_single_files_and_lora_files(tiny_qwen, tmp_path):
    from safetensors.torch import save_file

    assert detect_family(tiny_qwen / "base") == ("qwenimage", "model_index.json names QwenImagePipeline")
    assert detect_family(tiny_qwen / "base.safetensors")[0] == "qwenimage"
    one = torch.zeros(4, 8)
    musubi, comfy = tmp_path / "musubi.safetensors", tmp_path / "comfy.safetensors"
    save_file({"lora_unet_transformer_blocks_0_img_mlp_net_0_proj.lora_down.weight": one}, str(musubi))
    save_file({"diffusion_model.transformer_blocks.0.img_mod.1.lora_A.weight": one}, str(comfy))
    assert detect_lora_family(musubi) == detect_lora_family(comfy) == "qwenimage"


def test_captions_and_the_transformer_call_are_the_pipeline_s(tiny_qwen):
    """Stored per caption: the tokens QwenImagePipeline.encode_prompt keeps (its template, the first 34 dropped, the
    mask's tokens only); predict() equals the pipeline's own transformer call on packed latents, unpacked."""
    from diffusers import QwenImagePipeline

    fam = get_family("qwenimage")
    layout = fam.layout(tiny_qwen / "base", None)
    captions = ["a red circle", "a big blue square on a green field", ""]
    ours = fam.load_text_encoder(layout, "cpu").encode(captions)
    pipe = QwenImagePipeline(**fam.load_components(layout))
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(captions, device="cpu")
    assert len({o.shape[0] for o in ours}) == 3  # masked: each caption its own length
    for mine, e, m in zip(ours, embeds, mask, strict=True):
        assert torch.equal(torch.from_numpy(mine), e[m.bool()].float())
    x = torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.25, 0.8])
    with torch.no_grad():
        got = fam.predict(pipe.transformer, x, t, Conditioning.stack(ours[:2]))
        b, c, h, w = x.shape
        want = pipe.transformer(
            hidden_states=QwenImagePipeline._pack_latents(x, b, c, h, w),
            timestep=t,
            encoder_hidden_states=embeds[:2],
            encoder_hidden_states_mask=mask[:2],
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        want = QwenImagePipeline._unpack_latents(want, h * 8, w * 8, 8)[:, :, 0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    vae = fam.load_vae(layout, "cpu")  # the latents are normalized per channel by the VAE config's statistics
    z = fam.encode_images(vae, torch.rand(1, 3, 32, 32) * 2 - 1)
    raw = vae.encode((torch.rand(1, 3, 32, 32) * 2 - 1)[:, :, None]).latent_dist.mode()
    assert z.shape == (1, 16, 4, 4) and raw.shape == (1, 16, 1, 4, 4)
    assert fam.decode_latents(vae, z).shape == (1, 3, 32, 32)


def test_single_file_transformer_loads_like_the_folder(tiny_qwen):
    from core.errors import ModelError

    fam = get_family("qwenimage")
    folder = fam.layout(tiny_qwen / "base", None)
    single = fam.layout(tiny_qwen / "base.safetensors", tiny_qwen / "base")
    x = torch.randn(2, *fam.latent_shape(folder, 32), generator=torch.Generator().manual_seed(0))
    cond = Conditioning.stack(fam.load_text_encoder(folder, "cpu").encode(["a red circle", "a blue square"]))
    with torch.no_grad():
        a = fam.predict(fam.load_denoiser(folder, "cpu"), x, torch.tensor([0.2, 0.9]), cond)
        b = fam.predict(fam.load_denoiser(single, "cpu"), x, torch.tensor([0.2, 0.9]), cond)
    assert torch.equal(a, b)
    with pytest.raises(ModelError, match="model.single_file_config"):
        fam.layout(tiny_qwen / "base.safetensors", None)


def test_transfer_to_a_lightning_style_sibling(tmp_path, tiny_qwen):
    project = qwen_project(tmp_path, tiny_qwen)
    report = project.run_json(workflow="transfer")
    assert {s["action"] for s in report["stages"]} == {"ran"}
    schedule = record(project, report, "schedule")
    assert schedule["contract"]["timesteps"]["shift"]["kind"] == "resolution"
    assert record(project, report, "student")["record"]["fidelity"]["final"]["cosine"] > 0
    from safetensors import safe_open

    with safe_open(str(project.root / "output/transfer/student/student.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "qwen_image"
        assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight" in list(f.keys())
    again = project.run_json("--set", "student.lr=2e-3", workflow="transfer")
    assert [s["name"] for s in again["stages"] if s["action"] == "ran"] == ["student"]


def test_identity_teacher_equals_student_starts_at_zero_loss(tmp_path, tiny_qwen):
    project = qwen_project(
        tmp_path,
        tiny_qwen,
        transfer={"student_model": "model", "delta_dtype": "fp32"},
        student={"init": "teacher", "guidance": 1.0},
    )
    rec = record(project, project.run_json(workflow="transfer"), "student")["record"]
    assert rec["first_loss"] < 1e-10
    assert rec["fidelity"]["curve"][0]["cosine"] > 0.9999


def test_lora_and_differential_run_on_qwenimage(tmp_path, tiny_qwen):
    project = qwen_project(tmp_path, tiny_qwen)
    make_pairs(tmp_path / "pairs", size=32)
    project.write_config(
        differential={"eval_samples": 2},
        **{
            "differential.lora1": {"rank": 4, "alpha": 4.0, "lr": 5e-3, "steps": 3, "batch_size": 1},
            "differential.lora2": {"rank": 4, "alpha": 4.0, "lr": 5e-3, "steps": 3, "batch_size": 1},
        },
    )
    assert {s["action"] for s in project.run_json(workflow="lora")["stages"]} == {"ran"}
    assert "average" in {s["name"] for s in project.run_json(workflow="differential")["stages"]}


def _train(tiny_qwen, tmp_path):
    from pipeline.config import TrainConfig
    from stages.training.loop import DiffusionBatches, TrainData, TrainJob, train_lora
    from stages.training.outputs import write_lora_outputs

    fam = get_family("qwenimage")
    layout = fam.layout(tiny_qwen / "base", None)
    shape = fam.latent_shape(layout, 32)
    cond = Conditioning.stack(fam.load_text_encoder(layout, "cpu").encode(["a red circle", "a blue square"]))
    data = TrainData(
        torch.randn(4, *shape, generator=torch.Generator().manual_seed(0)), cond, torch.tensor([0, 1, 0, 1])
    )
    cfg = TrainConfig(rank=4, alpha=8.0, lr=2e-2, steps=4, batch_size=2, targets=["to_q", "to_k", "img_mlp.net.2"])
    params = train_params(fam, layout, cfg, shape)
    job = TrainJob(fam, layout, "flow", params, torch.device("cpu"), tmp_path, progress=False)
    outcome = train_lora(job, DiffusionBatches(data, params.seed, params.batch_size))
    outcome.denoiser.eval()
    files = write_lora_outputs(fam, outcome, params, tmp_path, "lora1", fam.lora_metadata(layout))
    probe = (torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 0.8]), cond)
    with torch.no_grad():
        want = fam.predict(outcome.denoiser, *probe)
        base = fam.predict(fam.load_denoiser(layout, "cpu"), *probe)
    assert (want - base).abs().max() > 1e-3  # the LoRA does something
    return fam, layout, files, probe, want


def test_lora_files_load_in_the_pipeline_and_map_through_comfyui_s_rule(tiny_qwen, tmp_path):
    """Both files go through QwenImagePipeline.load_lora_weights to the trained transformer (1e-5); every module of
    the single file is `diffusion_model.<a weight of ComfyUI's Qwen-Image model>` (whose names are diffusers'), so
    its generic key map takes it; a musubi-tuner style copy (`lora_unet_<module with _>`) reads to the same LoRA."""
    from diffusers import QwenImagePipeline
    from safetensors.torch import load_file, save_file

    from stages.training.lora_files import read_lora_file

    fam, layout, files, probe, want = _train(tiny_qwen, tmp_path)
    for name in ("diffusers/pytorch_lora_weights.safetensors", "lora1.safetensors"):
        pipe = QwenImagePipeline.from_pretrained(str(tiny_qwen / "base"))
        pipe.load_lora_weights(str(files[name]))
        with torch.no_grad():
            torch.testing.assert_close(fam.predict(pipe.transformer, *probe), want, atol=1e-5, rtol=0)
    tensors = load_file(str(files["lora1.safetensors"]))
    weights = {f"diffusion_model.{k}" for k in fam.load_denoiser(layout, "cpu").state_dict()}
    modules = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in tensors}
    assert modules and all(f"{m}.weight" in weights for m in modules), sorted(modules)
    musubi = {}
    renames = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight", ".alpha": ".alpha"}
    for key, value in tensors.items():
        old = next(sfx for sfx in renames if key.endswith(sfx))
        module = key.removeprefix("diffusion_model.").removesuffix(old)
        musubi[f"lora_unet_{module.replace('.', '_')}{renames[old]}"] = value
    save_file(musubi, str(tmp_path / "musubi.safetensors"))
    a = read_lora_file(files["lora1.safetensors"], "lora_unet_", "transformer", "qwenimage")
    b = read_lora_file(tmp_path / "musubi.safetensors", "lora_unet_", "transformer", "qwenimage")
    from stages.training.lora_files import match_modules

    model = fam.load_denoiser(layout, "cpu")
    ma, mb = match_modules(a, model), match_modules(b, model)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k].up, mb[k].up) and ma[k].alpha == mb[k].alpha


def test_lora_tools_work_on_qwenimage(tiny_qwen, tmp_path):
    from core.errors import ModelError
    from pipeline.api import family as tool_family
    from pipeline.lora_tools import convert, info, merge, sample

    fam, layout, files, _, _ = _train(tiny_qwen, tmp_path)
    single = files["lora1.safetensors"]
    assert tool_family("auto", None, [single]).name == "qwenimage"
    report = info(single, fam)
    assert report["format"] == "comfy" and report["family"] == "qwenimage" and report["base_model"] == "qwen_image"
    assert convert(single, "diffusers", tmp_path / "d.safetensors", fam, tiny_qwen / "base")["to_format"] == "diffusers"
    assert merge(tiny_qwen / "base", [str(single)], tmp_path / "merged", fam, None, False)["modules_changed"] > 0
    assert json.loads((tmp_path / "merged" / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    assert sample(tiny_qwen / "base", [str(single)], ["a red circle"], 0, tmp_path / "g.png", 2, 4.0, 32, [0, 1], fam)
    assert (tmp_path / "g.png").exists()
    with pytest.raises(ModelError, match="is a qwenimage LoRA .* and the model is zimage"):
        info(single, get_family("zimage"))


def test_narrow_teacher_weights_predict_like_fp32(tiny_qwen):
    family = get_family("qwenimage")
    layout = family.layout(tiny_qwen / "base", None)
    assert_narrow_weights_predict_like_fp32(family, layout, torch.tensor([0.5, 0.8]))


@pytest.mark.parametrize("form", ["folder", "single file"])
def test_a_bf16_checkpoint_loads_as_stored(tiny_qwen, tmp_path, form):
    family = get_family("qwenimage")
    layout = bf16_layout(family, tmp_path, form, tiny_qwen / "base", tiny_qwen / "base.safetensors")
    assert_a_bf16_checkpoint_loads_as_stored(family, layout)


def test_a_sharded_release_loads_as_stored_and_every_shard_is_in_the_model_s_digest(tiny_qwen, tmp_path):
    """Qwen-Image is released with its transformer and Qwen2.5-VL text encoder in several bf16 shards."""
    assert_a_sharded_release_loads_and_is_digested("qwenimage", tiny_qwen / "base", tmp_path)
