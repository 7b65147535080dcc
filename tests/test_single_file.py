"""Single-file .safetensors checkpoints (original LDM layout) load and train like the diffusers folder."""

from __future__ import annotations

import shutil

import pytest

from core.errors import ModelError
from stages.families.sd15 import SD15Family


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_single_file_loads_the_same_weights_as_the_folder(tiny_model, component):
    family = SD15Family()
    folder = family.layout(tiny_model / "model", None)
    single = family.layout(tiny_model / "model.safetensors", tiny_model / "model")
    (a,), (b,) = family._load(folder, component), family._load(single, component)
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


def test_lora_workflow_on_a_single_file_checkpoint(project, tiny_model):
    shutil.copy(tiny_model / "model.safetensors", project.root / "sd.safetensors")
    project.write_config(model={"path": "sd.safetensors", "single_file_config": "model"})
    project.write_config(**{"runtime.preview": {"every": 6, "steps": 2}})
    report = project.run_json()
    assert {s["action"] for s in report["stages"]} == {"ran"}
    assert (project.root / "output/lora/lora1/previews/step000006.png").exists()


def test_a_lora_file_is_not_a_checkpoint(project, tiny_model):
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(project.root / "lora.safetensors"))
    with pytest.raises(ModelError, match="not a Stable Diffusion single-file checkpoint"):
        SD15Family().layout(project.root / "lora.safetensors", None)


def test_truncated_checkpoint_is_reported(project, tiny_model):
    path = project.root / "sd.safetensors"
    path.write_bytes((tiny_model / "model.safetensors").read_bytes()[:4])
    with pytest.raises(ModelError, match="is the download complete"):
        SD15Family().layout(path, None)
