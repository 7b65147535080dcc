"""LoRA adapters on a denoiser through peft, and the two file formats people load.

kohya: `lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha`, ΔW = alpha/r · up · down,
with `ss_*` and modelspec metadata: loads in ComfyUI, A1111 and diffusers.
diffusers: `unet.<module>.lora_A/B` as written by `save_lora_weights`, with the peft adapter config in
the metadata, so alpha ≠ rank survives a reload (diffusers would otherwise assume alpha = rank).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import ConfigError


def add_lora(denoiser, rank: int, alpha: float, dropout: float, targets: list[str], seed: int):
    import torch
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), init_lora_weights="gaussian"
    )
    torch.manual_seed(seed)
    try:
        denoiser.add_adapter(config)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"lora1.targets = {list(targets)} matched no module of the model ({e}). "
            f"Linear layer names in this model include: {', '.join(names[:12])}."
        ) from None
    return config


def trainable_state(denoiser) -> dict:
    return {n: p.detach() for n, p in denoiser.named_parameters() if p.requires_grad}


def lora_state_dict(denoiser) -> dict:
    """The adapter's weights in peft naming: `<module>.lora_A.weight`, `<module>.lora_B.weight`."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}


def to_kohya(state: dict, alpha: float, prefix: str) -> dict:
    import torch

    out = {}
    for key, value in state.items():
        module, which = key.rsplit(".lora_", 1)
        name = prefix + module.replace(".", "_")
        out[f"{name}.{'lora_down' if which.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def canonicalize_safetensors(path: Path) -> None:
    """Rewrite a .safetensors header with sorted keys. safetensors serializes its metadata from a hash map
    whose order changes per process, so equal tensors would otherwise give files with different digests."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned; its offsets are relative to it
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    tmp.replace(path)


def save_kohya(state: dict, rank: int, alpha: float, path: Path, prefix: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "modelspec.title": path.stem,
        **metadata,
    }
    save_file(to_kohya(state, alpha, prefix), str(path), metadata=meta)
    canonicalize_safetensors(path)


def save_diffusers(state: dict, adapter_config, path: Path, pipeline_class: str, component: str) -> None:
    """Write the diffusers format with adapter metadata via the pipeline class's own save_lora_weights."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    meta = json.loads(json.dumps(adapter_config.to_dict(), default=sorted))  # sets -> sorted lists
    getattr(diffusers, pipeline_class).save_lora_weights(
        str(path.parent),
        weight_name=path.name,
        **{
            f"{component}_lora_layers": convert_state_dict_to_diffusers(state),
            f"{component}_lora_adapter_metadata": meta,
        },
    )
    canonicalize_safetensors(path)
