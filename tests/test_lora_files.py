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
from tests.conftest import train_params


def _train(tiny_model, tmp_path, rank=4, alpha=8.0):
    family = SD15Family()
    layout = family.layout(tiny_model / "model", None)
    params = train_params(
        family, layout, TrainConfig(rank=rank, alpha=alpha, lr=5e-3, steps=5, batch_size=2), (4, 4, 4)
    )
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(2, 77, 32, generator=g), torch.ones(2, 77, dtype=torch.bool))
    data = TrainData(torch.randn(4, 4, 4, 4, generator=g), cond, torch.tensor([0, 1, 0, 1]))
    job = TrainJob(family, layout, "epsilon", params, torch.device("cpu"), tmp_path, progress=False)
    return family, train_lora(job, DiffusionBatches(data, job.params.seed, job.params.batch_size))


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
        torch.testing.assert_close(_unet_out(pipe.unet), trained, rtol=1e-5, atol=1e-5)
