"""Every LoRA format the project writes reloads in diffusers and reproduces the trained model's output."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from pipeline.config import TrainConfig
from stages.families import Conditioning
from stages.families.sd15 import SD15Family
from stages.training.loop import DiffusionBatches, TrainData, TrainJob, train_lora
from stages.training.lora_files import lora_state_dict, save_diffusers, save_kohya
from tests.conftest import train_params, train_tiny_sd15


def _train(tiny_model, tmp_path, rank=4, alpha=8.0):
    family, _, _, outcome = train_tiny_sd15(tiny_model, tmp_path, rank=rank, alpha=alpha, lr=5e-3, steps=5)
    return family, outcome


def _unet_out(unet):
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=cond).sample


def test_kohya_and_diffusers_files_reproduce_the_trained_unet(tiny_model, tmp_path):
    family, outcome = _train(tiny_model, tmp_path, rank=4, alpha=8.0)  # alpha != rank on purpose
    outcome.denoiser.eval()
    trained = _unet_out(outcome.denoiser)
    base = _unet_out(StableDiffusionPipeline.from_pretrained(tiny_model / "model").unet)
    assert (trained - base).abs().max() > 1e-4, "the LoRA must have moved the model for this test to mean anything"

    state = lora_state_dict(outcome.denoiser)
    kohya = tmp_path / "out" / "lora.safetensors"
    kohya.parent.mkdir()
    save_kohya(state, 4, 8.0, kohya, family.kohya_prefix, family.lora_metadata())
    diffusers_file = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    save_diffusers(state, outcome.adapter_config, diffusers_file, family.pipeline_class, family.lora_component)

    with safe_open(str(kohya), "pt") as f:
        meta, names = f.metadata(), list(f.keys())
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
        assert f.get_tensor(next(n for n in names if n.endswith(".alpha"))).item() == 8.0
    assert all(n.startswith("lora_unet_") for n in names)

    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model / "model")
        pipe.load_lora_weights(str(tmp_path / "out"), weight_name=name)
        torch.testing.assert_close(_unet_out(pipe.unet), trained, rtol=1e-5, atol=1e-5, msg=name)


def test_rslora_files_carry_its_scale_for_every_loader(tiny_model, tmp_path):
    """rsLoRA scales by alpha/sqrt(r); the files store alpha*sqrt(r), which loaders divide by r: the same model."""
    import math

    from stages.training.lora_files import read_lora_file
    from stages.training.outputs import write_lora_outputs

    family = SD15Family()
    layout = family.layout(tiny_model / "model", None)
    params = train_params(
        family, layout, TrainConfig(rank=4, alpha=2.0, rslora=True, lr=5e-3, steps=5, batch_size=2), (4, 4, 4)
    )
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(2, 77, 32, generator=g), torch.ones(2, 77, dtype=torch.bool))
    data = TrainData(torch.randn(4, 4, 4, 4, generator=g), cond, torch.tensor([0, 1, 0, 1]))
    job = TrainJob(family, layout, "epsilon", params, torch.device("cpu"), tmp_path, progress=False)
    outcome = train_lora(job, DiffusionBatches(data, params.seed, params.batch_size))
    layer = next(m for m in outcome.denoiser.modules() if hasattr(m, "scaling") and "default" in m.scaling)
    assert layer.scaling["default"] == 2.0 / math.sqrt(4)  # peft's rsLoRA scale, not alpha/r = 0.5
    outcome.denoiser.eval()
    trained = _unet_out(outcome.denoiser)
    files = write_lora_outputs(family, outcome, params, tmp_path, "lora1", family.lora_metadata())
    assert read_lora_file(files["lora1.safetensors"], family.kohya_prefix, "unet").alphas == {4.0}  # 2 * sqrt(4)
    for name in ("lora1.safetensors", "diffusers/pytorch_lora_weights.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model / "model")
        pipe.load_lora_weights(str(files[name].parent), weight_name=files[name].name)
        torch.testing.assert_close(_unet_out(pipe.unet), trained, rtol=1e-5, atol=1e-5, msg=name)


def test_conv_targets_locon_style_reproduce_the_trained_unet(tiny_model, tmp_path):
    """LoCon-style targets: the ResNet convolutions (3x3) and the 1x1 projections beside the attention LoRA; the
    kohya file holds 4-D lora_down/lora_up weights, which diffusers (and kohya/ComfyUI) load as conv LoRAs."""
    from stages.training.outputs import write_lora_outputs

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"]
    family, _, params, outcome = train_tiny_sd15(
        tiny_model, tmp_path, rank=4, alpha=8.0, lr=5e-3, steps=4, targets=targets
    )
    outcome.denoiser.eval()
    trained = _unet_out(outcome.denoiser)
    files = write_lora_outputs(family, outcome, params, tmp_path, "lora1", family.lora_metadata())
    with safe_open(str(files["lora1.safetensors"]), "pt") as f:
        conv = [n for n in f.keys() if "resnets_0_conv1.lora_down" in n]
        assert conv and f.get_tensor(conv[0]).ndim == 4 and f.get_tensor(conv[0]).shape[-2:] == (3, 3)
    for name in ("lora1.safetensors", "diffusers/pytorch_lora_weights.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model / "model")
        pipe.load_lora_weights(str(files[name].parent), weight_name=files[name].name)
        torch.testing.assert_close(_unet_out(pipe.unet), trained, rtol=1e-5, atol=1e-5, msg=name)
