"""The sd15 family: prediction types read from the model, and the training targets they imply."""

from __future__ import annotations

import json
import shutil

import torch
from diffusers import DDPMScheduler

from stages.families.noise import DDPMProcess
from stages.families.sd15 import SD15Family

DDPM = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def test_v_prediction_target_is_the_velocity():
    sched = DDPMScheduler(**DDPM)
    process = DDPMProcess(DDPM, "v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    # x_t = sqrt(ab) x0 + sqrt(1-ab) eps, and v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022)
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(process.noisy_input(x0, noise, t), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    torch.testing.assert_close(process.target(x0, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    assert torch.equal(DDPMProcess(DDPM, "epsilon").target(x0, noise, t), noise)


def test_prediction_type_is_read_from_the_scheduler_config(tiny_model, tmp_path):
    family = SD15Family()
    assert family.prediction_type(family.layout(tiny_model / "model", None)) == "epsilon"
    shutil.copytree(tiny_model / "model", tmp_path / "v")
    cfg_path = tmp_path / "v" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    assert family.prediction_type(family.layout(tmp_path / "v", None)) == "v_prediction"


def test_lora_workflow_on_a_v_prediction_model(project):
    cfg_path = project.root / "model" / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "prediction_type": "v_prediction"}))
    status = json.loads(project.cli("status", "lora", "--json").stdout)
    lora1 = next(s for s in status["stages"] if s["name"] == "lora1")
    assert lora1["state"] == "missing"
    report = project.run_json()
    manifest = json.loads(project.manifests("lora1")[0].read_text())
    assert manifest["preimage"]["params"]["prediction_type"] == "v_prediction"
    assert manifest["contract"]["prediction_type"] == "v_prediction"
    assert report["stages"][-1]["action"] == "ran"


def test_a_folder_of_fp16_variant_files_loads_and_trains(project, tiny_model):
    """SD 1.5's and SDXL's repositories offer their weights as fp16 variants too; a download of those files alone
    (diffusion_pytorch_model.fp16.safetensors, model.fp16.safetensors) is a folder diffusers and transformers load
    only when told the variant. It loads, with the fp16 values, and a LoRA trains on it."""
    from conftest import as_variant

    from stages.families.base import weights_variant

    folder = project.root / "model"
    as_variant(folder, ("unet", "vae", "text_encoder"), torch.float16, "fp16")
    assert all(weights_variant(folder / c) == "fp16" for c in ("unet", "vae", "text_encoder"))
    assert weights_variant(tiny_model / "model" / "unet") is None
    family = SD15Family()
    layout = family.layout(folder, None)
    assert family.stored_dtype(layout) == torch.float16
    cpu = torch.device("cpu")
    loaded = family.load_denoiser(layout, cpu).state_dict()
    reference = family.load_denoiser(family.layout(tiny_model / "model", None), cpu).state_dict()
    assert all(torch.equal(loaded[k], v.half().float()) for k, v in reference.items())
    assert family.load_text_encoder(layout, "cpu").encode(["a red circle"])
    assert project.run_json()["stages"][-1]["action"] == "ran"
    assert project.manifests("lora1")
