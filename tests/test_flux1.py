"""FLUX.1: detection, text encoding and the transformer call as FluxPipeline does them, the original (single-file)
layout against diffusers' own converter, the workflows on a tiny [dev] with its [schnell]-like sibling, and LoRA
files in sd-scripts' FLUX.1 naming that diffusers and ComfyUI load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import (
    Project,
    assert_a_bf16_checkpoint_loads_as_stored,
    assert_a_sharded_release_loads_and_is_digested,
    assert_narrow_weights_predict_like_fp32,
    bf16_layout,
    make_images,
    make_pairs,
    pair_project,
    stage_manifest,
    train_params,
)

from stages.families import detect_family, detect_lora_family, get_family
from stages.families.base import Conditioning


@pytest.fixture(scope="module")
def tiny_flux1(tmp_path_factory):
    from stages.families.tiny_flow import build_tiny_flux1, build_tiny_flux1_schnell

    root = tmp_path_factory.mktemp("tiny-flux1")
    build_tiny_flux1(root / "dev", seed=0, single_file=root / "dev.safetensors")
    build_tiny_flux1_schnell(root / "dev", root / "schnell")
    return root


def flux1_project(tmp_path, tiny_flux1, **sections) -> Project:
    return pair_project(tmp_path, tiny_flux1 / "dev", tiny_flux1 / "schnell", **sections)


def record(project, report: dict, stage: str) -> dict:
    return stage_manifest(project, report, stage)


def test_flux1_is_detected_from_folders_single_files_and_lora_files(tiny_flux1, tmp_path):
    from safetensors.torch import save_file

    assert detect_family(tiny_flux1 / "dev") == ("flux1", "model_index.json names FluxPipeline")
    assert detect_family(tiny_flux1 / "schnell")[0] == "flux1"
    assert detect_family(tiny_flux1 / "dev.safetensors")[0] == "flux1"
    bare = tmp_path / "bare"
    shutil.copytree(tiny_flux1 / "dev", bare)
    (bare / "model_index.json").unlink()
    assert detect_family(bare) == ("flux1", "transformer/config.json names FluxTransformer2DModel")
    fam = get_family("flux1")
    assert fam.has_guidance_embed(fam.layout(tiny_flux1 / "dev", None))
    assert not fam.has_guidance_embed(fam.layout(tiny_flux1 / "schnell", None))
    # LoRA files from other trainers, without metadata: sd-scripts' names, and diffusers' (ai-toolkit's)
    one = torch.zeros(4, 8)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": one}, str(tmp_path / "sds.safetensors"))
    save_file(
        {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": one}, str(tmp_path / "ait.safetensors")
    )
    assert detect_lora_family(tmp_path / "sds.safetensors") == "flux1"
    assert detect_lora_family(tmp_path / "ait.safetensors") == "flux1"


def test_captions_and_the_transformer_call_are_the_pipeline_s(tiny_flux1):
    """Stored per caption: FluxPipeline.encode_prompt's T5 prompt_embeds (512 rows) and its pooled CLIP output (a
    last row, zero-padded); predict() equals the pipeline's own transformer call on packed latents, unpacked."""
    from diffusers import FluxPipeline

    fam = get_family("flux1")
    layout = fam.layout(tiny_flux1 / "dev", None)
    captions = ["a red circle", "a big blue square on a green field", ""]
    ours = fam.load_text_encoder(layout, "cpu").encode(captions)
    pipe = FluxPipeline(**fam.load_components(layout))
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(captions, prompt_2=None, device="cpu")
    for mine, e, p in zip(ours, embeds, pooled, strict=True):
        assert mine.shape == (513, 48)
        assert torch.equal(torch.from_numpy(mine[:-1]), e.float())
        assert torch.equal(torch.from_numpy(mine[-1, :32]), p.float()) and not mine[-1, 32:].any()
    x = torch.randn(2, *fam.latent_shape(layout, 48)[:1], 6, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.25, 0.8])
    model = pipe.transformer
    with torch.no_grad():
        got = fam.predict(model, x, t, Conditioning.stack(ours[:2]), guidance=3.5)
        b, c, h, w = x.shape
        want = model(
            hidden_states=FluxPipeline._pack_latents(x, b, c, h, w),
            timestep=t,
            guidance=torch.full((b,), 3.5),
            pooled_projections=pooled[:2],
            encoder_hidden_states=embeds[:2],
            txt_ids=text_ids,
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
            return_dict=False,
        )[0]
        want = FluxPipeline._unpack_latents(want, h * 8, w * 8, 8)
    assert torch.equal(got, want)


def test_the_original_layout_is_diffusers_own_and_the_single_file_loads_like_the_folder(tiny_flux1):
    """to_single_file() is the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers. That converter
    splits linear1 at FLUX.1's full width (3072), so each single block's linear1 is laid out at that width for it
    (each part's rows at its offset); every other tensor goes through as it is. Then the single file, read by our
    width-agnostic converter, predicts exactly what the folder predicts."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    fam = get_family("flux1")
    layout = fam.layout(tiny_flux1 / "dev", None)
    model = fam.load_denoiser(layout, "cpu")
    state = model.state_dict()
    original = fam.to_single_file(state)
    assert "double_blocks.0.img_attn.qkv.weight" in original and "single_blocks.0.linear1.weight" in original
    assert fam.from_single_file(dict(original)).keys() == state.keys()
    wide = dict(original)
    h = model.inner_dim
    for key in [k for k in original if ".linear1." in k]:
        value, full = original[key], 3072
        out = torch.zeros(3 * full + 4 * full, *value.shape[1:])
        for i, (start, rows) in enumerate([(0, h), (h, h), (2 * h, h), (3 * h, 4 * h)]):
            out[i * full : i * full + rows] = value[start : start + rows]
        wide[key] = out
    converted = convert_flux_transformer_checkpoint_to_diffusers(wide)
    assert converted.keys() == state.keys()
    for key, value in state.items():
        theirs = converted[key]
        if theirs.shape != value.shape:  # a linear1 part, at the full width
            theirs = theirs[: value.shape[0]]
        assert torch.equal(theirs, value), key
    single = fam.layout(tiny_flux1 / "dev.safetensors", tiny_flux1 / "dev")
    x = torch.randn(2, *fam.latent_shape(layout, 32), generator=torch.Generator().manual_seed(0))
    cond = Conditioning.stack(fam.load_text_encoder(layout, "cpu").encode(["a red circle", "a blue square"]))
    with torch.no_grad():
        a = fam.predict(model, x, torch.tensor([0.2, 0.9]), cond, guidance=3.5)
        b = fam.predict(fam.load_denoiser(single, "cpu"), x, torch.tensor([0.2, 0.9]), cond, guidance=3.5)
    assert torch.equal(a, b)


def test_fused_loras_split_back_exactly():
    """A LoRA on a fused projection (sd-scripts' files) splits into LoRAs on diffusers' parts with the same ΔW: a
    block-diagonal one into each part's own columns, any other sharing the down factor."""
    from stages.families.fused import fuse_parts, split_fused

    g = torch.Generator().manual_seed(0)
    dims = [6, 6, 6, 24]
    parts = [(torch.randn(2, 5, generator=g), torch.randn(d, 2, generator=g)) for d in dims[:3]] + [None]
    down, up = fuse_parts(parts, dims)
    assert down.shape == (6, 5) and up.shape == (42, 6) and not up[18:].any()
    pieces = split_fused(down, up, alpha=6.0, dims=dims)
    assert pieces[3] is None
    for (d, u), (d2, u2, a) in zip(parts[:3], pieces[:3], strict=True):
        assert torch.equal(u2 @ d2, u @ d) and a == 2.0  # alpha/rank kept: 6/6 = 2/2
    dense = (torch.randn(3, 5, generator=g), torch.randn(42, 3, generator=g))
    pieces = split_fused(*dense, alpha=3.0, dims=dims)
    rebuilt = torch.cat([u @ d for d, u, _ in pieces])
    assert torch.allclose(rebuilt, dense[1] @ dense[0]) and all(a == 3.0 for _, _, a in pieces)


def test_dev_teaches_a_schnell_like_student(tmp_path, tiny_flux1):
    """[dev] (guidance embedding, dynamic shift) teaches a [schnell]-like student (no guidance embedding, shift 1):
    the teacher's forwards get the guidance value, the student's none, and the student trains at the noise levels
    the teacher's schedule drew (its own scheduler is for sampling)."""
    project = flux1_project(tmp_path, tiny_flux1)
    report = project.run_json(workflow="transfer")
    assert {s["action"] for s in report["stages"]} == {"ran"}
    schedule = record(project, report, "schedule")
    assert schedule["contract"]["guidance_embed"] == 3.5
    assert schedule["contract"]["timesteps"]["shift"]["kind"] == "resolution"
    student = record(project, report, "student")
    assert student["preimage"]["params"]["guidance_embed"] is None
    assert record(project, report, "lora1")["preimage"]["params"]["guidance_embed"] == 3.5
    assert student["record"]["fidelity"]["final"]["cosine"] > 0
    from safetensors import safe_open

    with safe_open(str(project.root / "output/transfer/student/student.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-schnell/lora"
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in keys
    again = project.run_json("--set", "student.lr=2e-3", workflow="transfer")
    assert [s["name"] for s in again["stages"] if s["action"] == "ran"] == ["student"]
    # a guidance value for the student that has no guidance embedding is refused by name
    result = project.cli("run", "transfer", "--set", "student.guidance_embed=2.0", "--dry-run")
    assert (
        result.exit_code == 2 and "student.guidance_embed" in result.output and "no guidance embedding" in result.output
    )


def test_the_training_sections_guidance_value_is_keyed_and_refused_without_an_embedding(tmp_path, tiny_flux1):
    """lora1 and differential.lora1/lora2 pass <section>.guidance_embed to [dev] (default 3.5, FluxPipeline's); a
    new value re-keys that stage and what depends on it; a model without an embedding refuses it by name."""
    from cache.store import Store
    from pipeline.config_loading import load_config
    from pipeline.planner import plan_workflow
    from pipeline.workflows import get_workflow
    from stages.base import PlanEnv

    project = flux1_project(tmp_path, tiny_flux1)
    make_pairs(tmp_path / "pairs", size=32)

    def plans(workflow, *overrides):
        loaded = load_config(project.config, list(overrides))
        env = PlanEnv(loaded, Store(loaded.store_dir))
        return {p.name: p for p in plan_workflow(env, get_workflow(workflow, env), {})}

    base = plans("transfer")
    assert base["lora1"].params.guidance_embed == 3.5
    changed = plans("transfer", "lora1.guidance_embed=1.0")
    assert changed["lora1"].params.guidance_embed == 1.0
    assert {n for n in base if base[n].key != changed[n].key} == {"lora1", "teacher", "student"}
    diff = plans("differential")
    for section, stages in (("lora1", {"lora1"}), ("lora2", {"lora2", "eval"})):
        other = plans("differential", f"differential.{section}.guidance_embed=2.0")
        moved = {n.split(".")[0] for n in diff if diff[n].key != other[n].key}
        assert stages <= moved <= stages | {"lora2", "average", "eval"}, moved
    schnell = flux1_project(tmp_path / "s", tiny_flux1, model={"path": "student"}, lora1={"guidance_embed": 2.0})
    result = schnell.cli("run", "lora", "--dry-run")
    assert (
        result.exit_code == 2 and "lora1.guidance_embed" in result.output and "no guidance embedding" in result.output
    )


def test_identity_teacher_equals_student_starts_at_zero_loss(tmp_path, tiny_flux1):
    project = flux1_project(
        tmp_path,
        tiny_flux1,
        transfer={"student_model": "model", "delta_dtype": "fp32"},
        student={"init": "teacher", "guidance": 1.0},
    )
    rec = record(project, project.run_json(workflow="transfer"), "student")["record"]
    assert rec["first_loss"] < 1e-10
    assert rec["fidelity"]["curve"][0]["cosine"] > 0.9999


def test_lora_and_differential_run_on_flux1(tmp_path, tiny_flux1):
    project = flux1_project(tmp_path, tiny_flux1)
    make_pairs(tmp_path / "pairs", size=32)
    project.write_config(
        differential={"eval_samples": 2},
        **{
            "differential.lora1": {"rank": 4, "alpha": 4.0, "lr": 5e-3, "steps": 3, "batch_size": 1},
            "differential.lora2": {"rank": 4, "alpha": 4.0, "lr": 5e-3, "steps": 3, "batch_size": 1},
        },
    )
    assert {s["action"] for s in project.run_json(workflow="lora")["stages"]} == {"ran"}
    report = project.run_json(workflow="differential")
    assert "average" in {s["name"] for s in report["stages"]}


# -- LoRA files for other programs --------------------------------------------------------------------------


def _train(tiny_flux1, tmp_path, **settings):
    from pipeline.config import TrainConfig
    from stages.training.loop import DiffusionBatches, TrainData, TrainJob, train_lora

    tmp_path.mkdir(parents=True, exist_ok=True)
    fam = get_family("flux1")
    layout = fam.layout(tiny_flux1 / "dev", None)
    shape = fam.latent_shape(layout, 32)
    cond = Conditioning.stack(fam.load_text_encoder(layout, "cpu").encode(["a red circle", "a blue square"]))
    data = TrainData(
        torch.randn(4, *shape, generator=torch.Generator().manual_seed(0)), cond, torch.tensor([0, 1, 0, 1])
    )
    cfg = TrainConfig(rank=4, alpha=8.0, lr=2e-2, steps=4, batch_size=2, **settings)
    params = train_params(fam, layout, cfg, shape)
    job = TrainJob(fam, layout, "flow", params, torch.device("cpu"), tmp_path, progress=False)
    outcome = train_lora(job, DiffusionBatches(data, params.seed, params.batch_size))
    outcome.denoiser.eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    probe = (x, torch.tensor([0.3, 0.8]), cond)
    with torch.no_grad():
        want = fam.predict(outcome.denoiser, *probe, guidance=3.5)
        base = fam.predict(fam.load_denoiser(layout, "cpu"), *probe, guidance=3.5)
    assert (want - base).abs().max() > 1e-3  # the LoRA does something
    return fam, layout, params, outcome, probe, want


def _load_in_pipeline(model_dir, path):
    import io
    import logging
    import warnings

    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging

    pipe = FluxPipeline.from_pretrained(str(model_dir))
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert not [w for w in caught if "unexpected" in str(w.message).lower()]
    # FluxPipeline always says that the file has no CLIP text-encoder LoRA (there is none); nothing else
    said = [
        line for line in logs.getvalue().lower().splitlines() if "no lora keys associated to cliptextmodel" not in line
    ]
    assert not [line for line in said if "unexpected" in line or "not loaded" in line], said
    return pipe.transformer


def test_lora_files_load_in_flux_pipeline_and_reproduce_the_trained_transformer(tiny_flux1, tmp_path):
    """The diffusers file, and the sd-scripts file (without linear1: diffusers' converter splits a single block's
    linear1 at FLUX.1's full width only, so the tiny model's is checked through ComfyUI's rule below), go through
    FluxPipeline.load_lora_weights and give the trained predictions to 1e-5."""
    from stages.training.outputs import write_lora_outputs

    # Every kind of block module but linear1: the single blocks' q/k/v share their names with the double block's,
    # the block's path keeps them out. (diffusers' converter also drops the top-level modules of sd-scripts files,
    # img_in to final_layer: it names them without the `transformer.` prefix its loader then filters by.)
    double = [f"transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
              "ff_context.net.2", "norm1.linear", "norm1_context.linear")] + [
              "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.norm.linear"]  # fmt: skip
    for name, targets in (("all", None), ("double", double)):
        fam, layout, params, outcome, probe, want = _train(tiny_flux1, tmp_path / name, targets=targets)
        files = write_lora_outputs(fam, outcome, params, tmp_path / name, "lora1", fam.lora_metadata(layout))
        candidates = ["diffusers/pytorch_lora_weights.safetensors"] + (["lora1.safetensors"] if targets else [])
        for file in candidates:
            transformer = _load_in_pipeline(tiny_flux1 / "dev", files[file])
            with torch.no_grad():
                got = fam.predict(transformer, *probe, guidance=3.5)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_every_key_of_the_sd_scripts_file_maps_through_comfyui_s_rule_to_the_trained_model(tiny_flux1, tmp_path):
    """ComfyUI's FLUX.1 model holds the original weights; comfy/lora.py maps `lora_unet_<weight name with _>` onto
    `diffusion_model.<weight name>` and adds alpha/rank · up @ down to it. Every key of the file maps, every shape
    fits, and the weights patched that way (converted back) predict what the trained model predicts. Our own reader
    splits the file back to the same ΔW per diffusers module."""
    from safetensors.torch import load_file

    from stages.training.lora_files import match_modules, read_lora_file
    from stages.training.outputs import write_lora_outputs

    fam, layout, params, outcome, probe, want = _train(tiny_flux1, tmp_path, targets=fam_all_targets())
    files = write_lora_outputs(fam, outcome, params, tmp_path, "lora1", fam.lora_metadata(layout))
    tensors = load_file(str(files["lora1.safetensors"]))
    base = fam.load_denoiser(layout, "cpu")
    original = fam.to_single_file(base.state_dict())
    rule = {f"lora_unet_{k.removesuffix('.weight').replace('.', '_')}": k for k in original if k.endswith(".weight")}
    modules = {k.split(".", 1)[0] for k in tensors}
    assert modules <= set(rule), sorted(modules - set(rule))
    assert any("single_blocks_0_linear1" in m for m in modules) and any("img_attn_qkv" in m for m in modules)
    patched = dict(original)
    for m in modules:
        down, up = tensors[f"{m}.lora_down.weight"], tensors[f"{m}.lora_up.weight"]
        alpha = float(tensors[f"{m}.alpha"])
        assert (up.shape[0], down.shape[1]) == tuple(original[rule[m]].shape)
        patched[rule[m]] = original[rule[m]] + (alpha / down.shape[0]) * (up @ down)
    comfy = fam.load_denoiser(layout, "cpu")
    comfy.load_state_dict(fam.from_single_file(patched))
    with torch.no_grad():
        torch.testing.assert_close(fam.predict(comfy, *probe, guidance=3.5), want, atol=1e-5, rtol=0)
    lora = read_lora_file(files["lora1.safetensors"], "lora_unet_", "transformer", "flux1")
    matched = match_modules(lora, base)
    trained = read_lora_file(files["diffusers/pytorch_lora_weights.safetensors"], "lora_unet_", "transformer")
    assert matched.keys() == trained.modules.keys()

    def delta(m):
        return (m.alpha / m.rank) * (m.up @ m.down)

    for name, mod in matched.items():
        torch.testing.assert_close(delta(mod), delta(trained.modules[name]), atol=1e-6, rtol=0)


def fam_all_targets() -> list[str]:
    """Every kind of module the sd-scripts file names: fused double and single projections, 1:1 ones, the
    modulations, the embedders and the final layer (swapped halves)."""
    from stages.families.flux1 import DEFAULT_TARGETS

    return [*DEFAULT_TARGETS, "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear",
            "x_embedder", "context_embedder", "linear_1", "linear_2"]  # fmt: skip


def test_lora_tools_and_cross_family_refusal_on_flux1(tiny_flux1, tmp_path):
    from core.errors import ModelError
    from pipeline.api import family as tool_family
    from pipeline.lora_tools import convert, info, merge, sample
    from stages.training.outputs import write_lora_outputs

    fam, layout, params, outcome, _, _ = _train(tiny_flux1, tmp_path)
    files = write_lora_outputs(fam, outcome, params, tmp_path, "lora1", fam.lora_metadata(layout))
    single = files["lora1.safetensors"]
    assert tool_family("auto", None, [single]).name == "flux1"
    report = info(single, fam)
    assert report["format"] == "kohya" and report["family"] == "flux1"
    assert convert(single, "diffusers", tmp_path / "d.safetensors", fam, tiny_flux1 / "dev")["to_format"] == "diffusers"
    merged = merge(tiny_flux1 / "dev", [str(single)], tmp_path / "merged", fam, None, False)
    assert merged["modules_changed"] > 0
    assert json.loads((tmp_path / "merged" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    grid = sample(
        tiny_flux1 / "dev", [str(single)], ["a red circle"], 0, tmp_path / "g.png", 2, 3.5, 32, [0, 1], fam, None
    )
    assert (tmp_path / "g.png").exists() and grid
    for other in ("flux2", "zimage", "sdxl"):  # a FLUX.1 LoRA read for another family: both named
        with pytest.raises(ModelError) as e:
            info(single, get_family(other))
        assert "is a flux1 LoRA" in str(e.value) and f"the model is {other}" in str(e.value)


def test_a_flux1_teacher_lora_with_an_sd_model_is_refused(tmp_path, tiny_flux1, tiny_model):
    """A FLUX.1 LoRA given as the teacher LoRA of an SD transfer names the file, before any teacher work."""
    fam, layout, params, outcome, _, _ = _train(tiny_flux1, tmp_path / "train")
    from stages.training.outputs import write_lora_outputs

    files = write_lora_outputs(fam, outcome, params, tmp_path / "train", "lora1", fam.lora_metadata(layout))
    shutil.copyfile(files["lora1.safetensors"], tmp_path / "flux.safetensors")
    root = tmp_path / "sd"
    root.mkdir()
    shutil.copytree(tiny_model / "model", root / "model")
    shutil.copytree(tiny_model / "student", root / "student")
    make_images(root / "images", 4)
    project = Project(
        root,
        {
            "model": {"path": "model"},
            "latents": {"resolution": 32},
            "transfer": {"student_model": "student", "teacher_lora": "../flux.safetensors"},
            "schedule": {"steps": 2, "batch_size": 2},
        },
    )
    result = project.cli("run", "transfer")
    assert result.exit_code == 2, result.output
    assert "flux.safetensors" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("folder", ["dev", "schnell"])
def test_narrow_teacher_weights_predict_like_fp32(tiny_flux1, folder):
    family = get_family("flux1")
    layout = family.layout(tiny_flux1 / folder, None)
    assert_narrow_weights_predict_like_fp32(family, layout, torch.tensor([0.5, 0.8]))


@pytest.mark.parametrize("form", ["folder", "single file"])
def test_a_bf16_checkpoint_loads_as_stored(tiny_flux1, tmp_path, form):
    """The single file is read by our own converter (the original FLUX.1 layout): its tensors become the model's."""
    family = get_family("flux1")
    layout = bf16_layout(family, tmp_path, form, tiny_flux1 / "dev", tiny_flux1 / "dev.safetensors")
    assert_a_bf16_checkpoint_loads_as_stored(family, layout)


def test_a_sharded_release_loads_as_stored_and_every_shard_is_in_the_model_s_digest(tiny_flux1, tmp_path):
    """FLUX.1 [dev] is released with its transformer and T5 (text_encoder_2) in several bf16 shards."""
    assert_a_sharded_release_loads_and_is_digested("flux1", tiny_flux1 / "dev", tmp_path, text="text_encoder_2")
