"""Running a denoiser with and without one of its peft adapters, for the teacher, the prior and fidelity.

With peft's mixed-adapter batches one forward serves both: rows tagged `__base__` skip every LoRA, rows
tagged with the adapter's name use it. It needs eval mode (so LoRA dropout is off) and no merged weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

BASE = "__base__"


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


@contextmanager
def mixed_adapter_batch(denoiser, adapter_names: list[str]):
    """Within this block every LoRA layer of `denoiser` routes row i of its input through adapter_names[i]."""
    from peft.tuners.lora import LoraLayer

    hook = partial(_inject_adapter_names, adapter_names=adapter_names)
    layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def adapters_disabled(denoiser):
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


def predict_both(family, denoiser, adapter: str, x_t, t, cond, batching: str = "mixed", guidance=None):
    """(prediction without the adapter, prediction with it), in fp32, without gradients.

    mixed: one forward on the doubled batch; two_pass: two forwards. The caller puts the model in eval mode."""
    import torch

    with torch.no_grad():
        if batching == "mixed":
            n = x_t.shape[0]
            with mixed_adapter_batch(denoiser, [BASE] * n + [adapter] * n):
                both = family.predict(
                    denoiser, torch.cat([x_t, x_t]), torch.cat([t, t]), cond.doubled(), guidance=guidance
                )
            both = both.float()
            return both[:n], both[n:]
        with adapters_disabled(denoiser):
            base = family.predict(denoiser, x_t, t, cond, guidance=guidance).float()
        return base, family.predict(denoiser, x_t, t, cond, guidance=guidance).float()


def predict_base(family, denoiser, x_t, t, cond, guidance=None):
    """The model's own prediction with every adapter off, in fp32, without gradients."""
    import torch

    with torch.no_grad(), adapters_disabled(denoiser):
        return family.predict(denoiser, x_t, t, cond, guidance=guidance).float()
