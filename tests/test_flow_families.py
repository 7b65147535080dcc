"""Z-Image and FLUX.2 ([klein], and [dev] where it differs): detection, text encoding, single-file loading, the
workflows, the transfer identity, the cross-family refusals, guidance embeddings and the LoRA files other programs
load."""

from __future__ import annotations

import io
import json
import logging
import shutil
import warnings

import pytest
import torch
from conftest import (
    Project,
    as_variant,
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

from stages.families import Conditioning, detect_family, get_family

FAMILIES = ("zimage", "flux2")
MODELS = ("zimage", "flux2", "flux2-dev")  # the tiny model folders: FLUX.2 [dev] is the flux2 family too


def family_of(folder: str) -> str:
    return folder.split("-")[0]


def flow_project(tmp_path, models, family: str, **sections) -> Project:
    """A project on the tiny model folder `family` (zimage, flux2, flux2-dev) with its distilled sibling."""
    sections = {"runtime": {"checkpoint_every": 2}, **sections}
    return pair_project(tmp_path, models / family, models / f"{family}-turbo", **sections)


def run(project, *args: str, workflow: str = "transfer") -> dict:
    return project.run_json(*args, workflow=workflow)


def record(project, report: dict, stage: str) -> dict:
    return stage_manifest(project, report, stage)


def test_the_family_is_detected_from_folders_and_single_files(tiny_flow_models, tiny_model):
    assert detect_family(tiny_flow_models / "zimage")[0] == "zimage"
    assert detect_family(tiny_flow_models / "flux2")[0] == "flux2"
    assert detect_family(tiny_flow_models / "flux2-dev") == ("flux2", "model_index.json names Flux2Pipeline")
    assert detect_family(tiny_flow_models / "zimage.safetensors")[0] == "zimage"
    assert detect_family(tiny_flow_models / "flux2.safetensors")[0] == "flux2"
    assert detect_family(tiny_model / "model")[0] == "sd15"
    assert detect_family(tiny_model / "model.safetensors")[0] == "sd15"


def test_an_explicit_family_that_does_not_fit_is_named(tmp_path, tiny_flow_models):
    project = flow_project(tmp_path, tiny_flow_models, "zimage", model={"family": "flux2"})
    result = project.cli("run", "lora", "--dry-run")
    assert result.exit_code == 2
    assert "model.family = 'flux2'" in result.output and "is a zimage model" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("folder", MODELS)
def test_captions_are_encoded_exactly_as_the_family_pipeline_encodes_them(tiny_flow_models, folder):
    """The text stage's embeddings equal the model's own diffusers pipeline's encode_prompt (chat template, system
    message, hidden-state layers, masking, padding): ZImagePipeline, Flux2KleinPipeline, Flux2Pipeline."""
    import diffusers

    fam = get_family(family_of(folder))
    layout = fam.layout(tiny_flow_models / folder, None)
    captions = ["a red circle", "a big blue square on a green field", ""]
    ours = fam.load_text_encoder(layout, "cpu").encode(captions)
    parts = fam.load_components(layout)
    pipeline = fam.model_pipeline_class(type(parts["text_encoder"]).__name__)
    assert pipeline == {"zimage": "ZImagePipeline", "flux2": "Flux2KleinPipeline", "flux2-dev": "Flux2Pipeline"}[folder]
    pipe = getattr(diffusers, pipeline)(**parts)
    with torch.no_grad():
        if fam.name == "zimage":
            theirs, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
        else:
            layers = fam.text_layers(parts["text_encoder"])
            theirs, _ = pipe.encode_prompt(captions, device="cpu", text_encoder_out_layers=layers)
    assert len(ours) == len(theirs) == 3
    for mine, want in zip(ours, theirs, strict=True):
        assert torch.equal(torch.from_numpy(mine), want.float())
    assert ours[0].shape != ours[1].shape if fam.name == "zimage" else ours[0].shape == (512, 3 * 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_transformer_loads_like_the_folder(tiny_flow_models, family):
    """The transformer as users download it (original key layout), read by diffusers' own from_single_file with the
    diffusers folder for the rest, predicts exactly what the folder's transformer predicts."""
    from core.errors import ModelError

    fam = get_family(family)
    folder = fam.layout(tiny_flow_models / family, None)
    single = fam.layout(tiny_flow_models / f"{family}.safetensors", tiny_flow_models / family)
    x = torch.randn(2, *fam.latent_shape(folder, 32), generator=torch.Generator().manual_seed(0))
    cond = Conditioning.stack(fam.load_text_encoder(folder, "cpu").encode(["a red circle", "a blue square"]))
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        a = fam.predict(fam.load_denoiser(folder, "cpu"), x, t, cond)
        b = fam.predict(fam.load_denoiser(single, "cpu"), x, t, cond)
    assert torch.equal(a, b)
    with pytest.raises(ModelError, match="model.single_file_config"):
        fam.layout(tiny_flow_models / f"{family}.safetensors", None)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["cond", "cfg"])
def test_transfer_runs_on_the_flow_families(tmp_path, tiny_flow_models, family, mode):
    project = flow_project(tmp_path, tiny_flow_models, family, transfer={"delta_mode": mode})
    report = run(project)
    assert {s["action"] for s in report["stages"]} == {"ran"}
    schedule = record(project, report, "schedule")
    assert schedule["contract"]["timesteps"]["process"] == "flow"
    assert schedule["contract"]["prediction_type"] == "flow"
    teacher = record(project, report, "teacher")
    assert teacher["record"]["stats"]["nonfinite"] == 0
    student = record(project, report, "student")["record"]
    assert student["fidelity"]["final"]["cosine"] > 0
    # σ is stored per row, as the float32 value both phases use
    from cache.store import Manifest, Store
    from stages.training.schedule import read_schedule

    doc, _ = read_schedule(Store(project.store), Manifest.from_json(schedule))
    sigmas = [r["t"] for r in doc["rows"]]
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in sigmas)
    assert all(float(torch.tensor(s, dtype=torch.float32)) == s for s in sigmas)
    again = run(project, "--set", "student.lr=2e-3")
    assert [s["name"] for s in again["stages"] if s["action"] == "ran"] == ["student"]


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_teacher_equals_student_starts_at_zero_loss(tmp_path, tiny_flow_models, family):
    """teacher = student, g = 1, student LoRA = L: target = S + (T_L − T) = S_L, so the first loss is 0 up to fp32
    rounding and fidelity starts perfect; from a zero LoRA the first loss is the mean squared delta."""
    project = flow_project(
        tmp_path,
        tiny_flow_models,
        family,
        transfer={"student_model": "model", "delta_dtype": "fp32"},
        student={"init": "teacher", "guidance": 1.0},
    )
    rec = record(project, run(project), "student")["record"]
    assert rec["first_loss"] < 1e-10
    start = rec["fidelity"]["curve"][0]
    assert start["step"] == 0 and start["cosine"] > 0.9999 and start["rel_error"] < 1e-3
    rec = record(project, run(project, "--set", "student.init='zero'"), "student")["record"]
    assert rec["first_loss"] > 1e-8 and rec["fidelity"]["curve"][0]["cosine"] == 0.0


def test_lora_and_differential_run_on_both_families(tmp_path, tiny_flow_models):
    for family in FAMILIES:
        root = tmp_path / family
        project = flow_project(root, tiny_flow_models, family)
        make_pairs(root / "pairs", size=32)
        project.write_config(
            differential={"eval_samples": 2},
            **{
                "differential.lora1": {"rank": 4, "alpha": 4.0, "lr": 5e-3, "steps": 3, "batch_size": 1},
                "differential.lora2": {"rank": 4, "alpha": 4.0, "lr": 5e-3, "steps": 3, "batch_size": 1},
            },
        )
        assert {s["action"] for s in run(project, workflow="lora")["stages"]} == {"ran"}
        report = run(project, workflow="differential")
        assert "average" in {s["name"] for s in report["stages"]}


@pytest.mark.parametrize(
    "teacher, student",
    [("zimage", "flux2"), ("flux2", "zimage"), ("sd15", "zimage")],
)
def test_a_student_of_another_family_is_refused_at_planning(tmp_path, tiny_flow_models, tiny_model, teacher, student):
    models = {"zimage": tiny_flow_models / "zimage", "flux2": tiny_flow_models / "flux2", "sd15": tiny_model / "model"}
    shutil.copytree(models[teacher], tmp_path / "model")
    shutil.copytree(models[student], tmp_path / "student")
    make_images(tmp_path / "images", 4)
    project = Project(
        tmp_path, {"model": {"path": "model"}, "latents": {"resolution": 32}, "transfer": {"student_model": "student"}}
    )
    result = project.cli("run", "transfer", "--dry-run")
    assert result.exit_code == 2, result.output
    assert "latent_space" in result.output and f"'{teacher}'" in result.output and f"'{student}'" in result.output
    assert not (tmp_path / ".pipeline" / "stages").exists() or not any((tmp_path / ".pipeline" / "stages").iterdir())


def test_a_teacher_lora_of_another_family_is_refused(tmp_path, tiny_flow_models, tiny_model):
    """An SD LoRA given as the Z-Image teacher LoRA fails on its module names, before any teacher work."""
    (tmp_path / "sd").mkdir()
    shutil.copytree(tiny_model / "model", tmp_path / "sd" / "model")
    make_images(tmp_path / "sd" / "images", 4)
    sd = Project(
        tmp_path / "sd",
        {"model": {"path": "model"}, "latents": {"resolution": 32}, "lora1": {"steps": 2, "rank": 4}},
    )
    run(sd, workflow="lora")
    shutil.copyfile(tmp_path / "sd/output/lora/lora1/lora1.safetensors", tmp_path / "sd_lora.safetensors")
    project = flow_project(
        tmp_path / "z", tiny_flow_models, "zimage", transfer={"teacher_lora": "../sd_lora.safetensors"}
    )
    result = project.cli("run", "transfer")
    assert result.exit_code == 2, result.output
    assert "sd_lora.safetensors" in result.output and "Traceback" not in result.output
    assert "teacher" not in {p.parent.name for p in (project.store / "stages").glob("*/*/manifest.json")}


def test_guidance_embed_is_the_schedule_s_and_refused_for_models_without_one(tmp_path, tiny_flow_models):
    """FLUX.2 [dev] (Flux2Pipeline: Mistral3 text encoder, guidance embedding): the guidance value is a contract
    field with the pipeline's default, the student's may differ, and the whole transfer chain runs on it."""
    project = flow_project(tmp_path / "g", tiny_flow_models, "flux2-dev")
    from cache.store import Store
    from pipeline.config_loading import load_config
    from pipeline.planner import plan_workflow
    from pipeline.workflows import get_workflow
    from stages.base import PlanEnv

    def plans(*overrides):
        loaded = load_config(project.config, list(overrides))
        env = PlanEnv(loaded, Store(loaded.store_dir))
        return {p.name: p for p in plan_workflow(env, get_workflow("transfer", env), {})}

    base = plans()
    assert base["schedule"].contract["guidance_embed"] == 4.0 and base["student"].params.guidance_embed == 4.0
    changed = plans("student.guidance_embed=2.5")
    assert {n for n in base if base[n].key != changed[n].key} == {"prior", "student"}
    assert changed["student"].params.guidance_embed == 2.5
    teacher_side = plans("schedule.guidance_embed=3.5")
    assert teacher_side["schedule"].contract["guidance_embed"] == 3.5
    # the guidance value reaches the transformer
    fam = get_family("flux2")
    layout = fam.layout(project.root / "model", None)
    x = torch.randn(1, *fam.latent_shape(layout, 32))
    cond = Conditioning.stack(fam.load_text_encoder(layout, "cpu").encode(["a red circle"]))
    model = fam.load_denoiser(layout, "cpu")
    with torch.no_grad():
        a, b = (fam.predict(model, x, torch.tensor([0.5]), cond, guidance=g) for g in (1.0, 4.0))
    assert (a - b).abs().max() > 1e-4
    report = run(project, "--set", "student.guidance_embed=2.5")
    assert {s["action"] for s in report["stages"]} == {"ran"}
    assert record(project, report, "teacher")["contract"]["guidance_embed"] == 4.0
    assert record(project, report, "text")["record"]["strings"]  # encoded by the Mistral3 encoder
    # A model without a guidance embedding refuses the setting by name.
    plain = flow_project(tmp_path / "p", tiny_flow_models, "zimage", schedule={"guidance_embed": 3.0})
    result = plain.cli("run", "transfer", "--dry-run")
    assert (
        result.exit_code == 2
        and "schedule.guidance_embed" in result.output
        and "no guidance embedding" in result.output
    )


# -- LoRA files for other programs --------------------------------------------------------------------------


def _train(tiny_flow_models, tmp_path, folder: str, **settings):
    from pipeline.config import TrainConfig
    from stages.training.loop import DiffusionBatches, TrainData, TrainJob, train_lora

    fam = get_family(family_of(folder))
    layout = fam.layout(tiny_flow_models / folder, None)
    shape = fam.latent_shape(layout, 32)
    cond = Conditioning.stack(fam.load_text_encoder(layout, "cpu").encode(["a red circle", "a blue square"]))
    data = TrainData(
        torch.randn(4, *shape, generator=torch.Generator().manual_seed(0)), cond, torch.tensor([0, 1, 0, 1])
    )
    cfg = TrainConfig(rank=4, alpha=8.0, lr=2e-2, steps=4, batch_size=2, **settings)
    params = train_params(fam, layout, cfg, shape)
    job = TrainJob(fam, layout, "flow", params, torch.device("cpu"), tmp_path, progress=False)
    return fam, layout, params, train_lora(job, DiffusionBatches(data, params.seed, params.batch_size)), (shape, cond)


@pytest.mark.parametrize("folder", MODELS)
def test_lora_files_load_in_the_diffusers_pipeline_and_reproduce_the_trained_transformer(
    tiny_flow_models, tmp_path, folder
):
    """Both files, the diffusers format and the single-file (ComfyUI) one, go through the model's own pipeline's
    load_lora_weights (ZImagePipeline, Flux2KleinPipeline, Flux2Pipeline) without a warning and give the trained
    transformer's predictions to 1e-5."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    from stages.training.outputs import write_lora_outputs

    fam, layout, params, outcome, (shape, cond) = _train(tiny_flow_models, tmp_path, folder)
    pipeline = fam.model_pipeline_class(fam.text_encoder_class(layout))
    files = write_lora_outputs(fam, outcome, params, tmp_path, "lora1", fam.lora_metadata(layout))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.8])
    outcome.denoiser.eval()
    with torch.no_grad():
        want = fam.predict(outcome.denoiser, x, t, cond)
        base = fam.predict(fam.load_denoiser(layout, "cpu"), x, t, cond)
    assert (want - base).abs().max() > 1e-3  # the LoRA does something
    for name in ("diffusers/pytorch_lora_weights.safetensors", "lora1.safetensors"):
        pipe = getattr(diffusers, pipeline).from_pretrained(str(tiny_flow_models / folder))
        logs = io.StringIO()
        handler = logging.StreamHandler(logs)
        diffusers_logging.get_logger("diffusers").addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pipe.load_lora_weights(str(files[name]))
        finally:
            diffusers_logging.get_logger("diffusers").removeHandler(handler)
        assert not [w for w in caught if "peft" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
        assert "unexpected" not in logs.getvalue().lower() and "not loaded" not in logs.getvalue().lower()
        with torch.no_grad():
            got = fam.predict(pipe.transformer, x, t, cond)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _comfy_zimage_key_map(config: dict) -> dict[str, tuple[str, int]]:
    """ComfyUI's rule for Z-Image LoRA keys (comfy/lora.py, Lumina2 branch): key_map["diffusion_model.<diffusers
    module>"] for every module of comfy/utils.py z_image_to_diffusers, which maps q/k/v onto slices of the fused
    attention.qkv and the rest 1:1 (context_refiner blocks have no adaLN). -> module: (comfy weight, out rows)."""
    dim, out = config["dim"], {}

    def block(prefix: str, adaln: bool):
        for part in ("to_q", "to_k", "to_v"):
            out[f"{prefix}.attention.{part}"] = (f"{prefix}.attention.qkv.weight", dim)
        for module in ("attention.to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            out[f"{prefix}.{module}"] = (f"{prefix}.{module}.weight", None)
        if adaln:
            out[f"{prefix}.adaLN_modulation.0"] = (f"{prefix}.adaLN_modulation.0.weight", None)

    for i in range(config["n_layers"]):
        block(f"layers.{i}", True)
    for i in range(config["n_refiner_layers"]):
        block(f"context_refiner.{i}", False)
        block(f"noise_refiner.{i}", True)
    return {f"diffusion_model.{k}": v for k, v in out.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_key_of_the_single_file_lora_maps_through_comfyui_s_rule(tiny_flow_models, tmp_path, family):
    from safetensors.torch import load_file

    from stages.training.outputs import write_lora_outputs

    fam, layout, params, outcome, _ = _train(tiny_flow_models, tmp_path, family)
    files = write_lora_outputs(fam, outcome, params, tmp_path, "lora1", fam.lora_metadata(layout))
    tensors = load_file(str(files["lora1.safetensors"]))
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    assert all(k.startswith("diffusion_model.") for k in tensors)
    if family == "zimage":
        rule = _comfy_zimage_key_map(fam.transformer_config(layout))
        assert modules <= set(rule), sorted(modules - set(rule))
        for m in modules:
            assert f"{m}.alpha" in tensors
            rows = rule[m][1]
            if rows is not None:  # a slice of the fused qkv: its LoRA's output is one third of the fused weight
                assert tensors[f"{m}.lora_B.weight"].shape[0] == rows
    else:
        # ComfyUI's FLUX.2 model holds the original (BFL) names; comfy/lora.py maps "diffusion_model.<name>" for
        # every one of its weights. The original names are what diffusers' own single-file converter reads back
        # (test_single_file_transformer_loads_like_the_folder), so they are the real ones.
        original = fam.to_single_file(fam.load_denoiser(layout, "cpu").state_dict())
        weights = {
            f"diffusion_model.{k.removesuffix('.weight')}": v for k, v in original.items() if k.endswith(".weight")
        }
        assert modules <= set(weights), sorted(modules - set(weights))
        for m in modules:
            down, up = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
            assert (up.shape[0], down.shape[1]) == tuple(weights[m].shape)
            assert f"{m}.alpha" not in tensors  # the scale is in lora_B (diffusers' FLUX.2 converter takes no alpha)


@pytest.mark.parametrize("folder", MODELS)
def test_lora_tools_work_on_both_families(tiny_flow_models, tmp_path, folder):
    from pipeline.api import family as tool_family
    from pipeline.lora_tools import convert, info, merge, mix, sample
    from stages.training.outputs import write_lora_outputs

    family = family_of(folder)
    fam, layout, params, outcome, _ = _train(tiny_flow_models, tmp_path, folder)
    files = write_lora_outputs(fam, outcome, params, tmp_path, "lora1", fam.lora_metadata(layout))
    single = files["lora1.safetensors"]
    assert tool_family("auto", None, [single]).name == family
    report = info(single, fam)
    assert report["format"] == "comfy" and report["family"] == family
    back = convert(single, "diffusers", tmp_path / "d.safetensors", fam, tiny_flow_models / folder)
    assert back["to_format"] == "diffusers"
    assert (
        mix(
            [f"{single}:0.5", f"{files['diffusers/pytorch_lora_weights.safetensors']}:0.5"],
            tmp_path / "m.safetensors",
            "comfy",
            fam,
            None,
            None,
        )["rank"]
        == 8
    )
    merged = merge(tiny_flow_models / folder, [str(single)], tmp_path / "merged", fam, None, False)
    assert merged["modules_changed"] == len(outcome.adapter_config.target_modules) or merged["modules_changed"] > 0
    index = json.loads((tmp_path / "merged" / "model_index.json").read_text())
    assert (
        index["_class_name"] == json.loads((tiny_flow_models / folder / "model_index.json").read_text())["_class_name"]
    )
    if folder == "flux2":  # a merge into the distilled [klein] stays distilled (the pipeline's is_distilled)
        merge(tiny_flow_models / "flux2-turbo", [str(single)], tmp_path / "merged-turbo", fam, None, False)
        assert json.loads((tmp_path / "merged-turbo" / "model_index.json").read_text())["is_distilled"] is True
    grid = sample(
        tiny_flow_models / folder, [str(single)], ["a red circle"], 0, tmp_path / "g.png", 2, 0.0, 32, [0, 1], fam, None
    )
    assert (tmp_path / "g.png").exists() and grid


def test_bad_family_and_eval_arguments_are_named(tmp_path, monkeypatch):
    """--family outside the demo, an unknown demo family, and an unknown eval workflow: exit 2, no traceback,
    and nothing built."""
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    cases = [
        (
            ["run", "lora", "--demo", "--family", "flux3"],
            "--family 'flux3': the demo has sd15, sdxl, flux1, zimage, flux2 and qwenimage",
        ),
        (["run", "lora", "--family", "zimage"], "it goes with --demo (set model.family in a config)"),
        (["eval", "nonsense", "-c", "pipeline.toml"], "eval 'nonsense': choose differential or transfer"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("folder", MODELS)
def test_narrow_teacher_weights_predict_like_fp32(tiny_flow_models, folder):
    family = get_family(family_of(folder))
    layout = family.layout(tiny_flow_models / folder, None)
    assert_narrow_weights_predict_like_fp32(family, layout, torch.tensor([0.5, 0.8]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", ["folder", "single file"])
def test_a_bf16_checkpoint_loads_as_stored(tiny_flow_models, tmp_path, family, form):
    fam = get_family(family)
    folder, single = tiny_flow_models / family, tiny_flow_models / f"{family}.safetensors"
    assert_a_bf16_checkpoint_loads_as_stored(fam, bf16_layout(fam, tmp_path, form, folder, single))
    assert fam.stored_dtype(fam.layout(folder, None)) is None  # fp32: loaded as before


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sharded_release_loads_as_stored_and_every_shard_is_in_the_model_s_digest(tiny_flow_models, tmp_path, family):
    """Z-Image and FLUX.2 are released with their transformer and text encoder in several bf16 shards."""
    assert_a_sharded_release_loads_and_is_digested(family, tiny_flow_models / family, tmp_path)


def test_a_folder_of_variant_files_loads(tiny_flow_models, tmp_path):
    """Weights saved under a variant name alone (diffusion_pytorch_model.bf16.safetensors, model.bf16.safetensors)
    load, as diffusers and transformers load them when told the variant."""
    fam = get_family("zimage")
    folder = tmp_path / "zimage"
    shutil.copytree(tiny_flow_models / "zimage", folder)
    as_variant(folder, ("transformer", "vae", "text_encoder"), torch.bfloat16, "bf16")
    layout = fam.layout(folder, None)
    assert_a_bf16_checkpoint_loads_as_stored(fam, layout)
    assert fam.load_text_encoder(layout, "cpu").encode(["a red circle"])
    assert fam.load_vae(layout, "cpu") is not None
