"""runtime.attention: sdpa (the default, every device) or xformers (CUDA GPUs with the xformers extra), refused
by name before anything runs where it cannot."""

from __future__ import annotations

import importlib.util

import pytest

from core.errors import ConfigError
from pipeline.config_loading import load_config


def test_xformers_on_a_cpu_is_refused_before_the_first_stage(transfer_project):
    result = transfer_project.cli("run", "transfer", "--set", "runtime.attention=xformers")
    assert result.exit_code != 0 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert 'runtime.attention = "xformers" runs on CUDA GPUs only, and this run is on cpu. Use "sdpa"' in text
    assert not transfer_project.manifests("caption") and not transfer_project.manifests("latents")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_without_the_package_names_the_extra():
    """On a CUDA device without xformers (a torch.device needs no GPU to exist): the install line, by name."""
    import torch

    from stages.devices import check_attention

    with pytest.raises(ConfigError, match=r'xformers is not installed here: pip install "lora-pipeline\[xformers\]"'):
        check_attention("xformers", torch.device("cuda"))
    check_attention("sdpa", torch.device("cuda"))  # nothing to check


def test_sdpa_keeps_the_attention_as_loaded(tiny_model):
    """The default changes nothing: diffusers' processors are PyTorch's SDPA already."""
    import torch

    from stages.devices import use_attention
    from stages.families import get_family

    family = get_family("sd15")
    unet = family.load_denoiser(family.layout(tiny_model / "model", None), torch.device("cpu"))
    before = {name: type(m.processor).__name__ for name, m in unet.named_modules() if hasattr(m, "processor")}
    use_attention(unet, "sdpa", torch.device("cpu"))
    after = {name: type(m.processor).__name__ for name, m in unet.named_modules() if hasattr(m, "processor")}
    assert before == after and set(after.values()) == {"AttnProcessor2_0"}


def test_attention_values_and_other_trainers_spellings(tmp_path):
    (tmp_path / "a.toml").write_text('[runtime]\nattention = "flash"\n')
    with pytest.raises(ConfigError, match=r"runtime\.attention.*'sdpa' or 'xformers'"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text("xformers = true\n")
    with pytest.raises(ConfigError, match=r"unknown key `xformers`.*did you mean `runtime.attention`"):
        load_config(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text('[runtime]\nattention = "xformers"\n')
    assert load_config(tmp_path / "c.toml").config.runtime.attention == "xformers"  # refused at run time, on a CPU
