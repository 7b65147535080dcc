"""Text-encoder LoRA (lora1.train_text_encoder): its learning rates by hand, the captions encoded in every step by
the encoder in training, files that diffusers and ComfyUI load with the text encoder's modules, the `lora` workflow
without a text stage, and the workflows that refuse it with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import grid_cell
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from core.errors import ConfigError, PlanError
from pipeline.config import TrainConfig
from stages.training.optim import text_encoder_rates

# -- packages ------------------------------------------------------------------------------------------------


def test_the_installed_transformers_and_peft_put_adapters_on_text_encoders():
    """transformers 5.24 refuses every text-encoder adapter under peft 0.21 (its MIN_PEFT_VERSION): the versions
    installed must agree, and a user whose do not gets the versions and the fix instead of 'peft refused it'."""
    from importlib.metadata import version

    from transformers.integrations.peft import MIN_PEFT_VERSION

    from stages.training.lora_files import peft_too_old

    assert peft_too_old(version("transformers"), MIN_PEFT_VERSION, version("peft")) is None
    message = peft_too_old("5.24.0", "0.22.0", "0.21.2")
    assert "transformers 5.24.0" in message and "peft 0.21.2" in message
    assert "pip install 'transformers<5.24'" in message and "'peft>=0.22.0'" in message
    assert peft_too_old("5.24.0", "0.22.0", "0.22.1") is None


# -- learning rates ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, rates",
    [
        ({}, {"text_encoder": 1e-4}),  # text_encoder_lr unset: lr
        ({"text_encoder_lr": 5e-5}, {"text_encoder": 5e-5}),
        ({"loraplus_lr_ratio": 4.0}, {"text_encoder": 1e-4, "text_encoder (lora_B)": 4e-4}),  # kohya's fallback
        (
            {"text_encoder_lr": 5e-5, "loraplus_lr_ratio": 4.0, "loraplus_text_encoder_lr_ratio": 2.0},
            {"text_encoder": 5e-5, "text_encoder (lora_B)": 1e-4},
        ),
    ],
)
def test_text_encoder_rates_by_hand(settings, rates):
    cfg = TrainConfig(lr=1e-4, train_text_encoder=True, **settings)
    got = {g["name"]: g["lr"] for g in text_encoder_rates(cfg)}
    assert got.keys() == rates.keys()
    for name, lr in rates.items():
        assert got[name] == pytest.approx(lr, rel=1e-12)
    assert text_encoder_rates(TrainConfig(lr=1e-4, text_encoder_lr=5e-5)) == []  # not trained: no groups


def test_a_negative_lr_un_learns_the_text_encoder_too():
    (group,) = text_encoder_rates(TrainConfig(lr=-1e-4, train_text_encoder=True))
    assert group == {"name": "text_encoder", "lr": 1e-4, "maximize": True}


def test_prodigy_refuses_a_text_encoder_rate_of_its_own():
    from stages.training.optim import resolve_optimizer

    resolve_optimizer(TrainConfig(optimizer="prodigy", lr=1.0, train_text_encoder=True), "lora1")  # one rate: fine
    with pytest.raises(ConfigError, match=r"Prodigy.*text_encoder_lr"):
        resolve_optimizer(
            TrainConfig(optimizer="prodigy", lr=1.0, train_text_encoder=True, text_encoder_lr=0.5), "lora1"
        )


# -- training and files --------------------------------------------------------------------------------------

CAPTIONS = ["a red circle", "a blue square"]


def _train(tiny_model, work, preview=None, **settings):
    """The real lora1 loop with the text encoder in training, on random latents and two captions' token ids;
    preview: a PreviewConfig (its strip renders CAPTIONS[0])."""
    from stages.families.sd15 import SD15Family
    from stages.lora1 import Lora1Params
    from stages.training.loop import DiffusionBatches, TrainData, TrainJob, train_lora
    from stages.training.outputs import write_lora_outputs
    from stages.training.params import train_params

    settings = {"rank": 4, "alpha": 8.0, "lr": 2e-2, "steps": 4, "batch_size": 2, **settings}
    family = SD15Family()
    layout = family.layout(tiny_model / "model", None)
    cfg = TrainConfig(**settings, train_text_encoder=True)
    text_fields = {k: getattr(cfg, k) for k in ("train_text_encoder", "text_encoder_lr")}
    params = Lora1Params(
        **train_params(family, layout, cfg, (4, 4, 4)).model_dump(),
        **text_fields,
        text_encoder_targets=list(family.text_encoder_targets),
    )
    text = family.load_text_encoder(layout, "cpu")
    g = torch.Generator().manual_seed(0)
    data = TrainData(torch.randn(4, 4, 4, 4, generator=g), text.token_ids(CAPTIONS), torch.tensor([0, 1, 0, 1]))
    job = TrainJob(family, layout, "epsilon", params, torch.device("cpu"), work, progress=False, text_encoder=text)
    if preview is not None:
        from stages.training.previews import preview_specs

        job.preview, job.preview_prompts = preview, preview_specs(preview, CAPTIONS[:1])
    outcome = train_lora(job, DiffusionBatches(data, params.seed, params.batch_size))
    files = write_lora_outputs(family, outcome, params, work, "lora1", family.lora_metadata(layout))
    return text, outcome, files


def test_the_encoder_in_training_starts_from_the_cached_embeddings(tiny_model):
    """With its LoRA at zero, the conditioning computed in a step is what the text stage caches for the string."""
    from stages.families.sd15 import SD15Family
    from stages.training.lora_files import add_lora

    family = SD15Family()
    text = family.load_text_encoder(family.layout(tiny_model / "model", None), "cpu")
    cached = torch.stack([torch.from_numpy(a) for a in text.encode(CAPTIONS)])
    add_lora(text.model, 4, 8.0, 0.0, list(family.text_encoder_targets), 0)
    cond = text.conditioning(text.token_ids(CAPTIONS))
    assert cond.embeds.requires_grad and cond.mask.all()
    torch.testing.assert_close(cond.embeds.detach(), cached, rtol=0, atol=0)


# ComfyUI's key map for CLIP LoRAs (comfy/lora.py: model_lora_keys_clip, LORA_CLIP_MAP), written from its code: kohya's
# `lora_te_text_model_encoder_layers_{b}_{part}` for these parts of each layer (SD 1.x: `lora_te_`).
COMFY_CLIP_PARTS = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


@pytest.mark.parametrize("network", ["lora", "dora", "loha", "pissa"])
def test_files_load_to_the_trained_text_encoder_and_unet(tiny_model, tmp_path, network):
    """ComfyUI's arithmetic on the kohya file's `lora_te_` modules, and diffusers' load_lora_weights (its files, and
    the kohya file of a plain LoRA: diffusers drops a kohya DoRA's dora_scale and loads no LoHa), give the trained
    text encoder, and with its conditioning the trained UNet."""
    from stages.training.lora_files import text_encoder_tree
    from tests.test_networks import comfy_weight

    settings = {"lora_init": "pissa"} if network == "pissa" else {"network": network}  # PiSSA: a LoRA of rank 2r
    text, outcome, files = _train(tiny_model, tmp_path, text_encoder_lr=1e-2, **settings)
    trained = outcome.text.model
    ids = text.token_ids(CAPTIONS)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, generator=g)

    def outputs(text_model, unet):
        with torch.no_grad():
            cond = text_model(ids)[0]
            return cond, unet(x, torch.tensor([10, 700]), encoder_hidden_states=cond).sample

    want_text, want_unet = outputs(trained, outcome.denoiser)
    base = StableDiffusionPipeline.from_pretrained(str(tiny_model / "model"), safety_checker=None)
    assert (outputs(base.text_encoder, base.unet)[0] - want_text).abs().max() > 1e-3, "the text LoRA must have trained"

    comfy = StableDiffusionPipeline.from_pretrained(str(tiny_model / "model"), safety_checker=None)
    tensors = load_file(str(files["lora1.safetensors"]))
    trees = {"lora_te_": text_encoder_tree(comfy.text_encoder), "lora_unet_": comfy.unet}
    names = {f"{p}{n.replace('.', '_')}": (tree, n) for p, tree in trees.items() for n, _ in tree.named_modules()}
    modules = {k.split(".", 1)[0] for k in tensors}
    assert modules <= names.keys(), sorted(modules - names.keys())
    with torch.no_grad():
        for key in modules:
            tree, name = names[key]
            layer = tree.get_submodule(name)
            layer.weight.copy_(comfy_weight(tensors, key, layer.weight))
    got_text, got_unet = outputs(comfy.text_encoder, comfy.unet)
    torch.testing.assert_close(got_text, want_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_unet, want_unet, atol=1e-5, rtol=1e-5)

    both = ["lora1.safetensors", "diffusers/pytorch_lora_weights.safetensors"]
    loadable = {"lora": both, "pissa": both, "dora": both[1:], "loha": []}[network]
    for name in loadable:
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model / "model"), safety_checker=None)
        pipe.load_lora_weights(str(files[name].parent), weight_name=files[name].name)
        got_text, got_unet = outputs(pipe.text_encoder, pipe.unet)
        torch.testing.assert_close(got_text, want_text, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(got_unet, want_unet, atol=1e-5, rtol=1e-5, msg=name)


def test_previews_render_with_the_text_encoder_in_training(tiny_model, tmp_path):
    """The last preview is what diffusers renders with the trained files loaded, and not what the base encoder gives."""
    import numpy as np
    from diffusers import DDIMScheduler
    from PIL import Image

    from pipeline.config import PreviewConfig
    from stages.training.previews import labelled_row

    preview = PreviewConfig(every=4, steps=3, seed=2, width=32, height=32)
    _, outcome, files = _train(tiny_model, tmp_path, preview=preview, text_encoder_lr=5e-2)
    strip = np.asarray(Image.open(outcome.previews["previews/step000004.png"]).convert("RGB")).astype(int)
    _, (box,) = labelled_row([Image.new("RGB", (32, 32))], [""], "title")  # where the strip's one image lies
    strip = grid_cell(strip, box, 32)
    images = []
    for text_lora in (True, False):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model / "model"), safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
        f = files["diffusers/pytorch_lora_weights.safetensors"]
        pipe.load_lora_weights(str(f.parent), weight_name=f.name)
        if not text_lora:
            pipe.text_encoder.disable_adapters()
        image = pipe(CAPTIONS[0], num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
                     generator=torch.Generator("cpu").manual_seed(2)).images[0]  # fmt: skip
        images.append(np.asarray(image).astype(int))
    assert np.abs(strip - images[0]).max() <= 1
    assert np.abs(images[0] - images[1]).max() > 10, "the text encoder's LoRA must show in the picture"


def test_the_kohya_file_names_every_text_module_as_comfyui_and_a1111_map_it(tiny_model, tmp_path):
    _, outcome, files = _train(tiny_model, tmp_path, steps=1)
    tensors = load_file(str(files["lora1.safetensors"]))
    te_modules = {k.split(".")[0] for k in tensors if k.startswith("lora_te_")}
    layers = outcome.text.model.config.num_hidden_layers
    parts = COMFY_CLIP_PARTS.values()
    comfy = {f"lora_te_text_model_encoder_layers_{b}_{part}" for b in range(layers) for part in parts}
    assert te_modules == comfy
    for module in te_modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= tensors.keys()
    unet_modules = {k.split(".")[0] for k in tensors if k.startswith("lora_unet_")}
    assert len(unet_modules) + len(te_modules) == len({k.split(".")[0] for k in tensors})
    from safetensors import safe_open

    with safe_open(str(files["lora1.safetensors"]), "pt") as f:
        assert f.metadata()["ss_network_train_unet_only"] == "False"
    with safe_open(str(files["diffusers/pytorch_lora_weights.safetensors"]), "pt") as f:
        # the adapter configs name no folder of this machine (the bytes must not depend on where the project is)
        assert str(tiny_model) not in json.dumps(f.metadata())


def test_the_ema_file_holds_the_text_encoder_ema_too(tiny_model, tmp_path):
    _, outcome, files = _train(tiny_model, tmp_path, ema_decay=0.5, ema_warmup=False)
    raw, ema = load_file(str(files["lora1.safetensors"])), load_file(str(files["lora1-ema.safetensors"]))
    assert raw.keys() == ema.keys()
    te_up = [k for k in raw if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te_up and any(not torch.equal(raw[k], ema[k]) for k in te_up)
    assert outcome.text.ema_state is not None


# -- the lora workflow ---------------------------------------------------------------------------------------


def test_lora_workflow_trains_the_text_encoder_without_a_text_stage(project):
    project.write_config(lora1={"train_text_encoder": True, "steps": 2})
    dry = {s["name"]: s for s in project.run_json("--dry-run")["stages"]}
    assert list(dry) == ["caption", "latents", "lora1"]
    assert any("cached text embeddings cannot be used" in c for c in dry["lora1"]["causes"])
    report = project.run_json()
    assert [s["name"] for s in report["stages"]] == ["caption", "latents", "lora1"]
    files = [f for s in report["stages"] for f in s["outputs"]]
    kohya = next(f for f in files if f.endswith("lora1.safetensors"))
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in load_file(kohya))
    info = project.cli("lora", "info", kohya, "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["text_encoder_modules"]["text_encoder"] > 0
    assert not (project.store / "stages" / "text").exists()  # nothing was encoded ahead


def test_text_encoder_settings_change_lora1_only_when_it_is_trained(project):
    from tests.test_keys import keys

    base = keys(project, workflow="lora")
    assert keys(project, "lora1.text_encoder_lr=1e-5", workflow="lora") == base  # read only when it trains
    assert keys(project, "lora1.loraplus_text_encoder_lr_ratio=2.0", workflow="lora") == base
    on = keys(project, "lora1.train_text_encoder=true", workflow="lora")
    assert "text" not in on and on["lora1"] != base["lora1"]
    assert {s: k for s, k in on.items() if s != "lora1"} == {s: base[s] for s in ("caption", "latents")}
    for override in ("lora1.text_encoder_lr=1e-5", "lora1.loraplus_text_encoder_lr_ratio=2.0"):
        other = keys(project, "lora1.train_text_encoder=true", override, workflow="lora")
        assert {s for s in on if on[s] != other[s]} == {"lora1"}, override


# -- refused with the reason ---------------------------------------------------------------------------------


def test_transfer_refuses_a_text_encoder_lora_for_its_teacher(transfer_project):
    transfer_project.write_config(lora1={"train_text_encoder": True})
    result = transfer_project.cli("run", "transfer", "--dry-run")
    assert result.exit_code != 0
    assert "lora1.train_text_encoder = true" in result.output and "teacher" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("side", ["lora1", "lora2"])
def test_differential_refuses_a_text_encoder_lora_on_either_side(differential_project, side):
    from tests.test_keys import keys

    with pytest.raises(PlanError, match=rf"differential\.{side}\.train_text_encoder = true"):
        keys(differential_project, f"differential.{side}.train_text_encoder=true", workflow="differential")


def test_the_student_field_says_why_it_does_not_exist(transfer_project):
    transfer_project.write_config(student={"train_text_encoder": True})
    result = transfer_project.cli("run", "transfer", "--dry-run")
    assert result.exit_code != 0
    assert "student.train_text_encoder" in result.output and "teacher's deltas" in result.output


def test_families_with_a_language_model_encoder_refuse_it(tmp_path, tiny_flow_models):
    import shutil

    from tests.conftest import SMALL_SETTINGS, Project, make_images
    from tests.test_keys import keys

    shutil.copytree(tiny_flow_models / "zimage", tmp_path / "model")
    make_images(tmp_path / "images", 2)
    project = Project(tmp_path, json.loads(json.dumps(SMALL_SETTINGS)))
    with pytest.raises(ConfigError, match=r"zimage family's text encoder is not trained"):
        keys(project, "lora1.train_text_encoder=true", workflow="lora")
