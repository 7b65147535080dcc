"""Optimizers, learning-rate schedules, parameter groups (LoRA+, block-wise and negative learning rates), the
EMA of the LoRA weights and the fused backward pass, for every training stage.

`resolve_optim` turns a training section into the values its stage key holds and refuses, at planning time,
what cannot work (a missing package, an optimizer argument its constructor does not take, per-group learning
rates with Prodigy, gradient ascent with an optimizer that has no such mode). The `build_*` functions and the
classes below make the torch objects from those values inside the training loop. Formulas: docs/training.md.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from contextlib import contextmanager

from core.errors import ConfigError

# optimizer -> (module, class, the extra that installs it, or None when a dependency already does)
OPTIMIZERS = {
    "adamw": ("torch.optim", "AdamW", None),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bnb"),
    "prodigy": ("prodigyopt", "Prodigy", None),
    "adafactor": ("transformers.optimization", "Adafactor", None),
    "lion": ("lion_pytorch", "Lion", "lion"),
}
# constructor arguments that have fields of their own
OWN_ARGS = {"params": "", "lr": "lr", "weight_decay": "weight_decay", "maximize": "lr (a negative lr ascends)"}
# what adafactor means here unless optimizer_args say otherwise: transformers' Adafactor with a fixed lr
ADAFACTOR_DEFAULTS = {"relative_step": False, "scale_parameter": False, "warmup_init": False}


def optimizer_class(name: str, section: str):
    module, attr, extra = OPTIMIZERS[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # an optional package may fail on import for reasons of its own (no GPU, a build)
        install = f"pip install 'lora-pipeline[{extra}]'" if extra else "reinstall with `make setup`"
        raise ConfigError(
            f"{section}.optimizer = {name!r} needs {module.split('.')[0]}, which cannot be imported here ({e}). "
            f"Install it ({install}), or pick another optimizer."
        ) from None


def check_constructor(section, args: dict, name: str) -> None:
    import torch

    cls = optimizer_class(section.optimizer, name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    for key in args:
        if key in OWN_ARGS:
            raise ConfigError(
                f"{name}.optimizer_args.{key}: set it with {name}.{OWN_ARGS[key]}, not in optimizer_args."
                if OWN_ARGS[key]
                else f"{name}.optimizer_args.{key}: the parameters are the LoRA's; this cannot be set."
            )
        if key not in accepted:
            hint = ", ".join(a for a in accepted if a not in OWN_ARGS)
            raise ConfigError(f"{name}.optimizer_args.{key}: {cls.__name__} takes no `{key}`. It takes: {hint}.")
    try:  # built once on a dummy parameter: a value it refuses is reported by its own message, at planning time
        cls([torch.nn.Parameter(torch.zeros(2, 2))], **constructor_args(section.optimizer, args, 1e-4, 0.0))
    except Exception as e:
        raise ConfigError(
            f"{name}.optimizer_args = {section.optimizer_args}: {cls.__name__} refused them ({e})."
        ) from None


def constructor_args(name: str, args: dict, lr: float | None, weight_decay: float) -> dict:
    """The keyword arguments the optimizer is built with (lists become tuples: betas, eps)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    if name == "adafactor" and kwargs.get("relative_step"):
        lr = None  # the relative step replaces the learning rate
    return {"lr": lr, "weight_decay": weight_decay, **kwargs}


def resolve_optimizer(section, name: str) -> dict:
    """optimizer_args checked against the optimizer's constructor: every name it takes, every value it accepts.
    Without optimizer_args nothing is imported (a run whose stages are all reused never loads torch); a missing
    package is still found, through its import spec."""
    import importlib.util

    module = OPTIMIZERS[section.optimizer][0]
    try:
        found = importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        optimizer_class(section.optimizer, name)  # raises the error that names the package and the extra
    args = dict(section.optimizer_args)
    if section.optimizer == "adafactor":
        args = {**ADAFACTOR_DEFAULTS, **args}
    if section.optimizer_args:
        check_constructor(section, args, name)
    multipliers = {section.lr * m for m in section.block_lr.values() if m != 0} | {section.lr}
    if section.loraplus_lr_ratio is not None:
        multipliers |= {r * section.loraplus_lr_ratio for r in multipliers}
    multipliers |= {g["lr"] * (-1 if g.get("maximize") else 1) for g in text_encoder_rates(section)}
    if section.optimizer == "prodigy" and len(multipliers) > 1:
        raise ConfigError(
            f"{name}: Prodigy estimates one step size for all parameters together, so per-group learning rates "
            f"(loraplus_lr_ratio, block_lr multipliers other than 0 and 1, a text_encoder_lr or "
            f"loraplus_text_encoder_lr_ratio of their own) would scale an estimate that assumes they are equal. Use "
            f"adamw for them, or leave them unset with prodigy."
        )
    if any(m < 0 for m in multipliers) and section.optimizer != "adamw":
        what = f"{name}.lr = {section.lr:g}" if section.lr < 0 else f"a negative multiplier in {name}.block_lr"
        raise ConfigError(
            f"{what} trains by gradient ascent (un-learning), which runs torch's AdamW with maximize=True; "
            f"{section.optimizer} has no such mode. Use {name}.optimizer = 'adamw', or a positive rate."
        )
    if section.optimizer == "adafactor" and args.get("relative_step") and len(multipliers) > 1:
        raise ConfigError(
            f"{name}: Adafactor's relative_step sets its own step size for every parameter, so per-group learning "
            f"rates (loraplus_lr_ratio, block_lr multipliers other than 0 and 1) cannot apply. Use a fixed lr "
            f"(relative_step = false) for them."
        )
    return args


def resolve_fused(section, grad_accum: int, name: str, grad_accum_field: str | None = None) -> dict | None:
    if not section.fused_backward:
        if section.optimizer_groups:
            raise ConfigError(f"{name}.optimizer_groups splits the optimizer of the fused backward pass: set "
                              f"{name}.fused_backward = true, or leave optimizer_groups at 0.")  # fmt: skip
        return None
    why = {
        "grad_accum": (grad_accum > 1, "the steps run in every backward pass, so gradients "
                       "cannot accumulate over micro-batches; set grad_accum = 1"),
        "max_grad_norm": (section.max_grad_norm > 0, "each group steps before the global gradient norm is known, so "
                          "it cannot be clipped; set max_grad_norm = 0"),
        "optimizer": (section.optimizer == "prodigy", "Prodigy estimates its step size from all parameters at once; "
                      "use adamw, adafactor or lion"),
        "mixed_precision": (section.mixed_precision == "fp16", "fp16's loss scaling unscales the gradients in one "
                            "optimizer step; use bf16"),
    }  # fmt: skip
    for field, (bad, reason) in why.items():
        if bad:
            value = grad_accum if field == "grad_accum" else getattr(section, field)
            dotted = grad_accum_field if field == "grad_accum" and grad_accum_field else f"{name}.{field}"
            raise ConfigError(f"{name}.fused_backward cannot go with {dotted} = {value!r}: {reason}.")
    return {"groups": section.optimizer_groups}


def steps_of(value: int | str, steps: int) -> int:
    """A step count given as steps or as a percentage of `steps` (rounded down, as kohya does)."""
    if isinstance(value, int):
        return value
    return math.floor(steps * float(value[:-1]) / 100)


def resolve_lr_schedule(section, steps: int, name: str) -> dict:
    """The schedule's type, its warmup in steps and the settings that type reads (only those, so a setting of
    another schedule changes no key)."""
    kind = section.lr_scheduler
    out: dict = {"type": kind, "warmup": steps_of(section.warmup_steps, steps)}
    if kind == "cosine_with_restarts":
        out["num_cycles"] = section.lr_scheduler_num_cycles
    if kind == "polynomial":
        out["power"] = section.lr_scheduler_power
    if kind in ("polynomial", "cosine_with_min_lr", "warmup_stable_decay"):
        out["min_lr_ratio"] = section.lr_scheduler_min_lr_ratio
    if kind == "warmup_stable_decay":
        out["decay"] = steps_of(section.decay_steps, steps)
        if out["warmup"] + out["decay"] > steps:
            raise ConfigError(
                f"{name}: warmup_steps ({out['warmup']}) + decay_steps ({out['decay']}) is more than the "
                f"{steps} steps of warmup_stable_decay; lower one of them."
            )
    adafactor_relative = section.optimizer == "adafactor" and section.optimizer_args.get("relative_step")
    if adafactor_relative and (kind != "constant" or out["warmup"]):
        raise ConfigError(
            f"{name}: Adafactor with relative_step computes its own step size (with warmup_init for a warmup), so "
            f"{name}.lr_scheduler must be 'constant' and warmup_steps 0."
        )
    return out


def lr_factor(schedule: dict, steps: int, step: int) -> float:
    """The lr multiplier of optimizer step `step` (0-based) of `steps`: warmup (s+1)/(w+1), then the schedule."""
    w, kind = schedule["warmup"], schedule["type"]
    if step < w:
        return (step + 1) / (w + 1)
    p = min(1.0, (step - w) / max(1, steps - w))
    r = schedule.get("min_lr_ratio", 0.0)
    if kind == "linear":
        return 1.0 - p
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if kind == "cosine_with_restarts":
        return 0.0 if p >= 1 else 0.5 * (1 + math.cos(math.pi * ((schedule["num_cycles"] * p) % 1.0)))
    if kind == "polynomial":
        return r + (1 - r) * (1 - p) ** schedule["power"]
    if kind == "cosine_with_min_lr":
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))
    if kind == "inverse_sqrt":
        tau = w or 10_000
        return 1.0 / math.sqrt((step - w + tau) / tau)
    if kind == "warmup_stable_decay":
        d = schedule["decay"]
        if step < steps - d:
            return 1.0
        q = (step - (steps - d)) / max(1, d)
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * q))
    return 1.0


class LrSchedule:
    """Sets every parameter group's lr to its base lr times lr_factor; its state is the step it is at."""

    def __init__(self, optimizer, schedule: dict, steps: int):
        self.optimizer, self.schedule, self.steps = optimizer, schedule, steps
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        f = lr_factor(self.schedule, self.steps, self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            if base is not None:  # Adafactor's relative step has no lr
                group["lr"] = base * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] or 0.0 for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self._apply()


# -- parameter groups -------------------------------------------------------------------------------------------


def block_prefixes(block: str) -> list[str]:
    """'down_blocks.0-1' -> ['down_blocks.0.', 'down_blocks.1.']; 'mid_block' -> ['mid_block.']."""
    m = re.fullmatch(r"(\w+?)(?:\.(\d+)(?:-(\d+))?)?", block)
    name, lo, hi = m.group(1), m.group(2), m.group(3)
    if lo is None:
        return [f"{name}."]
    return [f"{name}.{i}." for i in range(int(lo), int(hi or lo) + 1)]


def top_level_blocks(names: list[str]) -> str:
    """'down_blocks.0-3, mid_block, up_blocks.0-3' from the LoRA parameter names: what block_lr can name."""
    lists: dict[str, set[int]] = {}
    for n in names:
        parts = n.split(".")
        lists.setdefault(parts[0], set())
        if len(parts) > 1 and parts[1].isdigit():
            lists[parts[0]].add(int(parts[1]))

    def span(v: set[int]) -> str:
        if len(v) == max(v) - min(v) + 1:  # contiguous
            return str(min(v)) if len(v) == 1 else f"{min(v)}-{max(v)}"
        return ",".join(map(str, sorted(v)))

    return ", ".join(f"{k}.{span(v)}" if v else k for k, v in lists.items())


def param_groups(denoiser, section, name: str) -> list[dict]:
    """The trainable LoRA parameters in groups by learning rate: lr x block multiplier (x loraplus_lr_ratio for
    the up/B matrices). A 0 multiplier freezes its parameters; a negative lr becomes |lr| with maximize=True."""
    named = [(n, p) for n, p in denoiser.named_parameters() if p.requires_grad]
    matchers = {block: block_prefixes(block) for block in section.block_lr}
    used = set()
    groups: dict[tuple[float, str], dict] = {}
    for n, p in named:
        hits = [b for b, prefixes in matchers.items() if any(n.startswith(x) for x in prefixes)]
        if len(hits) > 1:
            module = n.rsplit(".lora", 1)[0]
            raise ConfigError(
                f"{name}.block_lr: {hits[0]!r} and {hits[1]!r} both name the LoRA of {module}; give each block one "
                f"multiplier."
            )
        used.update(hits)
        mult = section.block_lr[hits[0]] if hits else 1.0
        label = hits[0] if hits else "rest"
        if section.loraplus_lr_ratio is not None and ".lora_B." in n:
            mult *= section.loraplus_lr_ratio
            label += " (lora_B)"
        if mult == 0:
            p.requires_grad_(False)
            continue
        lr = section.lr * mult
        group = groups.setdefault((lr, label), {"params": [], "lr": abs(lr), "name": label})
        if lr < 0:
            group["maximize"] = True
        group["params"].append(p)
    unused = [b for b in section.block_lr if b not in used]
    if unused:
        raise ConfigError(
            f"{name}.block_lr: {unused[0]!r} names no block with a LoRA in this model. Its blocks with LoRA "
            f"modules: {top_level_blocks([n for n, _ in named])}."
        )
    if not groups:
        raise ConfigError(f"{name}.block_lr: every multiplier is 0, so nothing would be trained.")
    return list(groups.values())


def text_encoder_rates(section) -> list[dict]:
    """The text encoder LoRA's groups without parameters: {name, lr[, maximize]} for its A (and DoRA magnitude)
    parameters and its B matrices. text_encoder_lr defaults to lr, its LoRA+ ratio to loraplus_lr_ratio (kohya's
    rules). Empty when the section trains no text encoder."""
    if not getattr(section, "train_text_encoder", False):
        return []
    lr = section.text_encoder_lr if section.text_encoder_lr is not None else section.lr
    ratio = section.loraplus_text_encoder_lr_ratio or section.loraplus_lr_ratio
    rates = [("text_encoder", lr)] + ([("text_encoder (lora_B)", lr * ratio)] if ratio is not None else [])
    return [{"name": n, "lr": abs(r), **({"maximize": True} if r < 0 else {})} for n, r in rates]


def text_encoder_groups(text_model, section) -> list[dict]:
    """The text encoder's trainable LoRA parameters in the groups of text_encoder_rates()."""
    rates = {g["name"]: g for g in text_encoder_rates(section)}
    groups: dict[str, dict] = {}
    for n, p in text_model.named_parameters():
        if not p.requires_grad:
            continue
        label = "text_encoder (lora_B)" if ".lora_B." in n and "text_encoder (lora_B)" in rates else "text_encoder"
        groups.setdefault(label, {**rates[label], "params": []})["params"].append(p)
    return list(groups.values())


def build_optimizer(groups: list[dict], cfg, device):
    """The optimizer of cfg.optimizer over `groups`, with cfg.optimizer_args; adamw uses torch's fused kernel
    where the device has one (CUDA, CPU) unless optimizer_args.fused says otherwise."""
    import torch

    cls = optimizer_class(cfg.optimizer, "optimizer")
    # the groups carry their own lr (and maximize for a negative one); this is only the default
    kwargs = constructor_args(cfg.optimizer, cfg.optimizer_args, abs(cfg.lr), cfg.weight_decay)
    if cfg.optimizer == "adamw" and "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = device.type in ("cuda", "cpu") and all(
            p.dtype in (torch.float32, torch.float16, torch.bfloat16) for g in groups for p in g["params"]
        )
    if kwargs["lr"] is None:
        groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
    return cls(groups, **kwargs)


class FusedOptimizer:
    """Optimizers stepped inside the backward pass: each chunk of parameters steps, and frees its gradients, as
    soon as the last of them is accumulated (torch's "fuse the optimizer into backward" recipe; kohya's
    fused_backward_pass / fused_optimizer_groups). To the loop it looks like one optimizer whose step() is done."""

    def __init__(self, groups: list[dict], cfg, device, n_chunks: int):
        flat = [(g, p) for g in groups for p in g["params"]]
        n = len(flat) if n_chunks <= 0 else min(n_chunks, len(flat))
        bounds = [round(i * len(flat) / n) for i in range(n + 1)]
        self.optimizers, self.pending, self.handles = [], [], []
        for i in range(n):
            chunk = flat[bounds[i] : bounds[i + 1]]
            by_group: dict[int, dict] = {}
            for g, p in chunk:
                by_group.setdefault(id(g), {**g, "params": []})["params"].append(p)
            self.optimizers.append(build_optimizer(list(by_group.values()), cfg, device))
            self.pending.append(len(chunk))
            for _, p in chunk:
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook(i, len(chunk))))

    def _hook(self, i: int, size: int):
        def ready(_param) -> None:
            self.pending[i] -= 1
            if self.pending[i] == 0:
                self.optimizers[i].step()
                self.optimizers[i].zero_grad(set_to_none=True)
                self.pending[i] = size

        return ready

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:  # every chunk stepped during backward
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return {"fused": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, s in zip(self.optimizers, state["fused"], strict=True):
            opt.load_state_dict(s)

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()


# -- EMA ----------------------------------------------------------------------------------------------------------


def resolve_ema(section) -> dict | None:
    if section.ema_decay is None:
        return None
    return {"decay": section.ema_decay, "warmup": section.ema_warmup, "every": section.ema_every}


class LoraEMA:
    """An fp32 exponential moving average of the trained LoRA parameters, updated every `every` optimizer steps
    with decay min(decay, (1+n)/(10+n)) at its n-th update (warmup) or `decay`."""

    def __init__(self, denoiser, ema: dict):
        self.decay, self.warmup, self.every = ema["decay"], ema["warmup"], ema["every"]
        self.params = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.updates = 0

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def update(self, step_done: int) -> None:
        import torch

        if step_done % self.every:
            return
        d = self.current_decay()
        with torch.no_grad():
            for n, p in self.params.items():
                self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.updates += 1

    @contextmanager
    def applied(self):
        """The EMA weights in the model for the duration (previews, saving), the raw ones restored after."""
        import torch

        raw = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(raw[n])

    def state_dict(self) -> dict:
        import torch

        return {"updates": torch.tensor(self.updates), **{f"shadow.{n}": v for n, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for n in self.shadow:
            self.shadow[n] = state[f"shadow.{n}"].float().clone()


def resolve_optim(section, steps: int, grad_accum: int, name: str, grad_accum_field: str | None = None) -> dict:
    """The optimizer-side fields of a training stage's key (grad_accum_field: where grad_accum is set, when that is
    not the section itself, as schedule.grad_accum for the student)."""
    return {
        "optimizer_args": resolve_optimizer(section, name),
        "lr_schedule": resolve_lr_schedule(section, steps, name),
        "ema": resolve_ema(section),
        "fused_backward": resolve_fused(section, grad_accum, name, grad_accum_field),
    }
