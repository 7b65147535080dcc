"""Device selection from runtime.device."""

from __future__ import annotations

from core.errors import ConfigError


def resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f'runtime.device = {name!r}, but torch sees no CUDA GPU here; use "auto" or "cpu".')
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError('runtime.device = "mps", but MPS is not available here; use "auto" or "cpu".')
    return torch.device(name)
