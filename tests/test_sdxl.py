"""SDXL: detection, text encoding and size conditioning as StableDiffusionXLPipeline does them, the workflows on a
tiny SDXL with its Turbo-style sibling, and LoRA files in sd-scripts' SDXL naming that diffusers loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import (
    Project,
    assert_a_bf16_checkpoint_loads_as_stored,
    assert_narrow_weights_predict_like_fp32,
    bf16_layout,
    pair_project,
    stage_manifest,
)

from stages.families import detect_family, detect_lora_family, get_family
from stages.families.base import Conditioning, ModelLayout


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from stages.families.tiny import build_tiny_sdxl, build_tiny_turbo

    root = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl(root / "model", seed=0, single_file=root / "sdxl.safetensors")
    build_tiny_turbo(root / "model", root / "student")
    return root


def sdxl_project(tmp_path, tiny_sdxl, **sections) -> Project:
    own = {"lora1": {"alpha": 4.0, "lr": 5e-3}, "student": {"alpha": 4.0}}
    for name, values in sections.items():
        own[name] = {**own.get(name, {}), **values}
    return pair_project(tmp_path, tiny_sdxl / "model", tiny_sdxl / "student", **own)


def test_sdxl_is_detected_from_its_folder_and_its_unet(tiny_sdxl, tmp_path):
    assert detect_family(tiny_sdxl / "model")[0] == "sdxl"
    bare = tmp_path / "bare"
    shutil.copytree(tiny_sdxl / "model", bare)
    (bare / "model_index.json").unlink()  # no pipeline class: the UNet's text_time conditioning says it
    family, why = detect_family(bare)
    assert family == "sdxl" and "text_time" in why
    family, why = detect_family(tiny_sdxl / "sdxl.safetensors")
    assert family == "sdxl" and "conditioner.embedders" in why


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "text_encoder_2"])
def test_a_single_file_checkpoint_loads_the_folder_s_weights(tiny_sdxl, component):
    """The SGM single file (OpenCLIP bigG in open_clip's names, fused in_proj) through diffusers' from_single_file
    with the folder's configs: every tensor equal."""
    family = get_family("sdxl")
    folder = family.layout(tiny_sdxl / "model", None)
    single = family.layout(tiny_sdxl / "sdxl.safetensors", tiny_sdxl / "model")
    (a,), (b,) = family._load(folder, component), family._load(single, component)
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_workflow_merge_and_the_wrong_checkpoint(tiny_sdxl, tiny_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from core.errors import ModelError

    project = sdxl_project(tmp_path, tiny_sdxl)
    shutil.copy(tiny_sdxl / "sdxl.safetensors", tmp_path / "sdxl.safetensors")
    project.write_config(model={"path": "sdxl.safetensors", "single_file_config": "model"})
    report = project.run_json(workflow="lora")
    assert {s["action"] for s in report["stages"]} == {"ran"}
    lora = tmp_path / "output" / "lora" / "lora1" / "lora1.safetensors"
    merged = tmp_path / "merged.safetensors"
    model, config = str(tmp_path / "sdxl.safetensors"), str(tmp_path / "model")
    result = project.cli(
        "lora", "merge", str(lora), "--model", model, "--single-file-config", config, "--out", str(merged)
    )
    assert result.exit_code == 0, result.output
    assert detect_family(merged)[0] == "sdxl"
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(merged), config=str(tmp_path / "model"), local_files_only=True
    )
    reference = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "model"))
    reference.load_lora_weights(str(lora))
    reference.fuse_lora()
    x, emb = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 80)
    added = {"text_embeds": torch.randn(1, 48), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        a = pipe.unet(x, 500, encoder_hidden_states=emb, added_cond_kwargs=added).sample
        b = reference.unet(x, 500, encoder_hidden_states=emb, added_cond_kwargs=added).sample
    assert (a - b).abs().max() < 1e-5
    with pytest.raises(ModelError, match="not an SDXL one"):
        get_family("sdxl").layout(tiny_model / "model.safetensors", tiny_sdxl / "model")


def with_each_lora(model, out, call) -> list:
    """call(pipeline) of StableDiffusionXLPipeline on the model: without a LoRA, with the kohya file, with the
    diffusers file (both loaded through load_lora_weights)."""
    from diffusers import StableDiffusionXLPipeline

    outs = []
    for source in (None, out / "lora1.safetensors", out / "diffusers" / "pytorch_lora_weights.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
        if source is not None:
            pipe.load_lora_weights(str(source))
        with torch.no_grad():
            outs.append(call(pipe))
    return outs


def test_identity_teacher_equals_student_starts_at_zero_loss(tiny_sdxl, tmp_path):
    project = sdxl_project(
        tmp_path,
        tiny_sdxl,
        transfer={"student_model": "model", "delta_dtype": "fp32"},
        student={"init": "teacher", "guidance": 1.0},
    )
    report = project.run_json(workflow="transfer")
    rec = stage_manifest(project, report, "student")["record"]
    assert rec["first_loss"] < 1e-10
    assert rec["fidelity"]["curve"][0]["cosine"] > 0.9999


def test_a_v_prediction_sdxl_trains_on_the_velocity_and_says_so_in_its_files(tiny_sdxl, tmp_path):
    """SDXL v-prediction checkpoints (the scheduler's prediction_type) train with the velocity target, record it in
    the contract and write sd-scripts' ss_v_parameterization, which A1111/Forge read to pick the sampler's target."""
    from safetensors import safe_open

    project = sdxl_project(tmp_path, tiny_sdxl)
    cfg_path = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "prediction_type": "v_prediction"}))
    report = project.run_json(workflow="lora")
    manifest = stage_manifest(project, report, "lora1")
    assert manifest["contract"]["prediction_type"] == "v_prediction"
    assert manifest["preimage"]["params"]["prediction_type"] == "v_prediction"
    with safe_open(tmp_path / "output" / "lora" / "lora1" / "lora1.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ss_v_parameterization"] == "True" and meta["ss_base_model_version"] == "sdxl_base_v1-0"


def test_captions_and_size_conditioning_are_the_pipeline_s(tiny_sdxl):
    """Stored per caption: the pipeline's prompt_embeds (77 rows) and its pooled_prompt_embeds (a last row); the
    UNet call of predict() equals the pipeline's with _get_add_time_ids at the latent's size."""
    from diffusers import StableDiffusionXLPipeline

    family = get_family("sdxl")
    layout = ModelLayout(tiny_sdxl / "model", single_file=False)
    captions = ["a red circle", "a blue square on a dark background"]
    rows = family.load_text_encoder(layout, torch.device("cpu")).encode(captions)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl / "model"))
    embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    for n, row in enumerate(rows):
        assert row.shape == (78, 80)
        assert torch.allclose(torch.from_numpy(row[:77]), embeds[n], atol=1e-6)
        assert torch.allclose(torch.from_numpy(row[77, :48]), pooled[n], atol=1e-6) and not row[77, 48:].any()
    cond = Conditioning.stack(rows)
    x_t, t = torch.randn(2, 4, 6, 4), torch.tensor([10, 700])  # a 48x32 bucket
    ours = family.predict(pipe.unet, x_t, t, cond)
    time_ids = pipe._get_add_time_ids((48, 32), (0, 0), (48, 32), torch.float32, 48).repeat(2, 1)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    theirs = pipe.unet(x_t, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_lora_files_use_sd_scripts_sdxl_names_and_load_in_the_diffusers_pipeline(tiny_sdxl, tmp_path):
    """The kohya file names the SGM UNet's blocks (what sd-scripts' SDXL LoRAs, A1111 and ComfyUI use); diffusers'
    own SGM-to-diffusers mapping loads it to the same UNet as the diffusers file, and our reader maps it back."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    from stages.training.lora_files import match_modules, read_lora_file

    project = sdxl_project(tmp_path, tiny_sdxl)
    report = project.run_json(workflow="lora")
    assert {s["action"] for s in report["stages"]} == {"ran"}
    out = tmp_path / "output" / "lora" / "lora1"
    with safe_open(out / "lora1.safetensors", "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    modules = {k.split(".")[0] for k in keys}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_out_0" in modules
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in modules
    assert not any("down_blocks" in m or "up_blocks" in m or "mid_block" in m for m in modules)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert detect_lora_family(out / "lora1.safetensors") == "sdxl"
    assert detect_lora_family(out / "diffusers" / "pytorch_lora_weights.safetensors") == "sdxl"

    torch.manual_seed(0)
    x, emb = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 80)
    added = {"text_embeds": torch.randn(1, 48), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    outs = with_each_lora(
        tmp_path / "model",
        out,
        lambda pipe: pipe.unet(x, 500, encoder_hidden_states=emb, added_cond_kwargs=added).sample,
    )
    assert (outs[1] - outs[2]).abs().max() < 1e-5
    assert (outs[2] - outs[0]).abs().max() > 1e-3  # the LoRA does something

    # `lora convert` from the diffusers file writes the SGM names training writes, tensor for tensor
    converted = tmp_path / "converted.safetensors"
    diffusers_file = out / "diffusers" / "pytorch_lora_weights.safetensors"
    result = project.cli("lora", "convert", str(diffusers_file), "--to", "kohya", "--out", str(converted))
    assert result.exit_code == 0, result.output
    trained, again = load_file(out / "lora1.safetensors"), load_file(converted)
    assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)

    unet = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "model")).unet
    matched = match_modules(read_lora_file(out / "lora1.safetensors"), unet)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in matched and len(matched) == len(modules)


def test_transfer_and_differential_run_on_sdxl_and_a_sd15_pair_is_refused(tiny_sdxl, tiny_model, tmp_path):
    from conftest import make_pairs

    project = sdxl_project(tmp_path / "xl", tiny_sdxl)
    report = project.run_json(workflow="transfer")
    ran = [s["name"] for s in report["stages"] if s["action"] == "ran"]
    assert ran[-3:] == ["teacher", "prior", "student"]
    key = next(s["key"] for s in report["stages"] if s["name"] == "student")
    rec = json.loads((project.store / "stages" / "student" / key / "manifest.json").read_text())["record"]
    assert rec["fidelity"]["curve"][-1]["cosine"] > 0.5
    make_pairs(tmp_path / "xl" / "pairs", size=32)
    project.write_config(
        differential={"eval_samples": 2},
        **{
            "differential.lora1": {"rank": 4, "alpha": 4.0, "lr": 5e-3, "steps": 3, "batch_size": 1},
            "differential.lora2": {"rank": 4, "alpha": 4.0, "lr": 5e-3, "steps": 3, "batch_size": 1},
        },
    )
    assert "average" in {s["name"] for s in project.run_json(workflow="differential")["stages"]}

    shutil.rmtree(tmp_path / "xl" / "student")
    shutil.copytree(tiny_model / "model", tmp_path / "xl" / "student")  # an SD 1.x "sibling"
    refused = project.cli("run", "transfer", "--dry-run")
    assert refused.exit_code == 2 and "'sdxl'" in refused.output and "'sd15'" in refused.output


# ComfyUI's key map for SDXL's CLIP LoRAs (comfy/lora.py: model_lora_keys_clip, read from its code): kohya's
# `lora_te1_text_model_encoder_layers_{b}_{part}` for CLIP-L and `lora_te2_...` for OpenCLIP bigG (clip_g).
COMFY_CLIP_PARTS = (
    "mlp_fc1",
    "mlp_fc2",
    "self_attn_k_proj",
    "self_attn_q_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
)


def test_text_encoder_lora_writes_lora_te1_and_lora_te2_that_diffusers_loads(tiny_sdxl, tmp_path):
    """lora1.train_text_encoder on SDXL: both encoders get the LoRA; the kohya file names them lora_te1_ / lora_te2_
    as sd-scripts does and ComfyUI's key map reads, and StableDiffusionXLPipeline.load_lora_weights gives the same
    text encoders (and UNet) from the kohya file as from the diffusers file; `pipeline sample` applies both."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from stages.training.lora_files import read_lora_file

    project = sdxl_project(tmp_path, tiny_sdxl, lora1={"train_text_encoder": True, "text_encoder_lr": 2e-2})
    report = project.run_json(workflow="lora")
    assert "text" not in {s["name"] for s in report["stages"]}  # the encoders train: nothing cached
    out = tmp_path / "output" / "lora" / "lora1"
    with safe_open(out / "lora1.safetensors", "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        meta = f.metadata()
    assert meta["ss_network_train_unet_only"] == "False"
    comfy = {
        f"lora_te{n}_text_model_encoder_layers_{b}_{part}"
        for n in (1, 2)
        for b in range(3)
        for part in COMFY_CLIP_PARTS
    }
    text = {m for m in modules if m.startswith("lora_te")}
    assert text == comfy  # every key ComfyUI maps, for every layer of both encoders
    lora = read_lora_file(out / "lora1.safetensors", "lora_unet_", "unet", "sdxl")
    assert set(lora.text_modules) == {"text_encoder", "text_encoder_2"}

    base = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "model"))
    ids = [tok(["a red circle"], padding="max_length", return_tensors="pt").input_ids for tok in (base.tokenizer,) * 2]
    outs = with_each_lora(
        tmp_path / "model", out, lambda pipe: [pipe.text_encoder(ids[0])[0], pipe.text_encoder_2(ids[1])[0]]
    )
    for n in range(2):
        assert (outs[1][n] - outs[2][n]).abs().max() < 1e-5
        assert (outs[2][n] - outs[0][n]).abs().max() > 1e-4  # each encoder's LoRA trained
    grid = tmp_path / "grid.png"
    lora_arg = f"{out / 'lora1.safetensors'}:1"
    sample = ["sample", "--model", str(tmp_path / "model"), "--lora", lora_arg, "--prompt", "a red circle"]
    result = project.cli(*sample, "--size", "32", "--steps", "2", "--out", str(grid))
    assert result.exit_code == 0, result.output
    assert grid.exists()


def test_each_image_s_size_and_crop_condition_the_unet_in_every_phase(tiny_sdxl, tmp_path, monkeypatch):
    """The latents record holds each image's original size, crop and target size (the centre crop's; each bucket
    view's); every UNet call of lora1, teacher, prior and student gets exactly its rows' values as add_time_ids."""
    from conftest import TINY_BUCKETS, make_mixed_images

    from stages.families.sdxl import SDXLFamily

    project = sdxl_project(tmp_path, tiny_sdxl)
    shutil.rmtree(tmp_path / "images")
    make_mixed_images(tmp_path / "images")  # 48x48 squares, 72x24 landscapes and 24x72 portraits
    seen = []
    real = SDXLFamily.predict

    def recording(self, denoiser, x_t, t, cond, guidance=None):  # the real method; records what it is given
        seen.append((tuple(x_t.shape), None if cond.size_ids is None else cond.size_ids.tolist()))
        return real(self, denoiser, x_t, t, cond, guidance)

    monkeypatch.setattr(SDXLFamily, "predict", recording)
    report = project.run_json(workflow="transfer")
    items = stage_manifest(project, report, "latents")["record"]["items"].values()
    landscape = next(i["size"] for i in items if i["size"]["original_size"] == [24, 72])
    # 72x24 -> 96x32 (short side to 32), the middle 32x32 square: 32 px in from the left
    assert landscape == {"original_size": [24, 72], "crop_top_left": [0, 32], "target_size": [32, 32]}
    assert {tuple(i["size"]["original_size"]) for i in items} == {(48, 48), (24, 72), (72, 24)}
    allowed = {tuple(i["size"]["original_size"] + i["size"]["crop_top_left"] + i["size"]["target_size"]) for i in items}
    assert seen and all(ids is not None for _, ids in seen)  # no UNet call fell back to the default
    assert all(tuple(int(v) for v in row) in allowed for _, ids in seen for row in ids)

    seen.clear()  # buckets with flips: each view's target is its bucket, and lora1 passes them through
    project.write_config(latents={**TINY_BUCKETS, "flip_aug": True})
    project.run_json(workflow="lora")
    assert seen and all(ids is not None for _, ids in seen)
    assert all(row[4:] == [shape[2] * 8, shape[3] * 8] for shape, ids in seen for row in ids)
    assert {tuple(row[4:]) for _, ids in seen for row in ids} != {(32.0, 32.0)}  # not all square


def test_narrow_teacher_weights_predict_like_fp32(tiny_sdxl):
    family = get_family("sdxl")
    layout = family.layout(tiny_sdxl / "model", None)
    assert_narrow_weights_predict_like_fp32(family, layout, torch.tensor([500, 800]))


@pytest.mark.parametrize("form", ["folder", "single file"])
def test_a_bf16_checkpoint_loads_as_stored(tiny_sdxl, tmp_path, form):
    family = get_family("sdxl")
    layout = bf16_layout(family, tmp_path, form, tiny_sdxl / "model", tiny_sdxl / "sdxl.safetensors")
    assert_a_bf16_checkpoint_loads_as_stored(family, layout)
