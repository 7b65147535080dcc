"""Running a denoiser with and without a LoRA: the student's peft adapter (prior, fidelity) and the teacher's
fixed LoRA file (FixedLora).

With peft's mixed-adapter batches one forward serves both: rows tagged `__base__` skip every LoRA, rows
tagged with the adapter's name use it. It needs eval mode (so LoRA dropout is off) and no merged weights.
FixedLora does the same for a LoRA file on a plain model, with forward hooks and no peft.
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


def mixable(denoiser) -> bool:
    """Whether peft can route rows of one batch to different adapters: plain LoRA layers only (peft refuses
    DoRA there, and LoHa/LoKr layers take no adapter_names)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    return all(isinstance(m, LoraLayer) and not getattr(m, "lora_variant", None) for m in layers)


def predict_both(family, denoiser, adapter: str, x_t, t, cond, batching: str = "mixed", guidance=None):
    """(prediction without the adapter, prediction with it), in fp32, without gradients.

    mixed: one forward on the doubled batch (plain LoRA only; other networks take two); two_pass: two forwards.
    The caller puts the model in eval mode."""
    import torch

    with torch.no_grad():
        if batching == "mixed" and mixable(denoiser):
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


class FixedLora:
    """A LoRA file applied to a plain (peft-free) denoiser through forward hooks, for the teacher: one forward on
    [x; x] gives the base prediction on the first half of the rows and the LoRA-adapted one on the second.

    It computes what peft's mixed-adapter batch computes (base(x) + up(down(x))·alpha/rank on the adapted rows),
    but on contiguous row slices and without peft's wrapper around every layer, which on small transformers costs
    more than the LoRA itself. No gradients: the hooks add to the layer's output in place. A DoRA, LoHa or LoKr
    module is applied as its dense W' − W (networks.effective_delta), computed once: exact, at the memory of one
    weight copy per adapted layer."""

    def __init__(self, denoiser, modules: dict, device):
        import torch

        from stages.training.networks import effective_delta

        layers = dict(denoiser.named_modules())
        self.denoiser, self.parts = denoiser, []
        for name, mod in sorted(modules.items()):
            layer = layers[name]
            w = layer.weight
            if mod.kind != "lora":
                dense = effective_delta(mod, w).to(device=w.device, dtype=w.dtype)
                self.parts.append((name, layer, dense, None, 1.0))
                continue
            down = mod.down.to(device=w.device, dtype=w.dtype)
            up = mod.up.to(device=w.device, dtype=w.dtype)
            if isinstance(layer, torch.nn.Conv2d):
                down = down.reshape(down.shape[0], layer.in_channels, *layer.kernel_size)
                up = up.reshape(up.shape[0], up.shape[1], 1, 1)
            else:
                down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
            self.parts.append((name, layer, down, up, mod.alpha / mod.rank))

    def _hook(self, name, layer, down, up, scale, first: int, total: int):
        import torch.nn.functional as F

        def hook(module, args, out):
            if out.shape[0] != total:
                from core.errors import ModelError

                raise ModelError(
                    f"{name}: expected the batch ({total} rows) in the first dimension of its output, got "
                    f"{tuple(out.shape)}; this model cannot run a mixed batch (set runtime.teacher_batching = "
                    f'"two_pass")'
                )
            x = args[0][first:]
            if down.dim() == 4:
                h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)
                out[first:] += h if up is None else F.conv2d(h, up) * scale
            else:
                h = F.linear(x, down)
                out[first:] += h if up is None else F.linear(h, up) * scale
            return out

        return hook

    @contextmanager
    def rows_from(self, first: int, total: int):
        """Within this block the LoRA applies to rows first..total-1 of every batch."""
        handles = [
            layer.register_forward_hook(self._hook(name, layer, down, up, scale, first, total))
            for name, layer, down, up, scale in self.parts
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def predict_both(self, family, x_t, t, cond, batching: str = "mixed", guidance=None):
        """(prediction without the LoRA, prediction with it), in fp32, without gradients; as predict_both."""
        import torch

        n = x_t.shape[0]
        with torch.no_grad():
            if batching == "mixed":
                with self.rows_from(n, 2 * n):
                    both = family.predict(
                        self.denoiser, torch.cat([x_t, x_t]), torch.cat([t, t]), cond.doubled(), guidance=guidance
                    ).float()
                return both[:n], both[n:]
            base = family.predict(self.denoiser, x_t, t, cond, guidance=guidance).float()
            with self.rows_from(0, n):
                return base, family.predict(self.denoiser, x_t, t, cond, guidance=guidance).float()
