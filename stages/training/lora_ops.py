"""Exact arithmetic on LoRA files, in ΔW space (design.md §6, §8).

A LoRA module is ΔW = (alpha / r) · up @ down. Linear combinations of LoRAs are exact when the factors are
concatenated along the rank: down = [down_1; down_2], up = [s_1·up_1, s_2·up_2] with s_i = w_i·alpha_i/r_i
and alpha = r_1 + r_2 (scale 1), so up @ down = Σ w_i·ΔW_i. Averaging the factors instead, mean(up) @ mean(down),
is not the mean of the products, and is never done here. A combination can then be compressed to a lower
rank by a truncated SVD of ΔW, computed through QR of the factors (rank ≤ N·r) so the out×in matrix is
never decomposed, with the relative Frobenius error of what was dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from stages.training.lora_files import LoraFile, LoraModule


def delta_weight(module: LoraModule):
    """ΔW of one module as a dense (out, in[, kh, kw]) fp32 tensor."""
    up, down = module.up.float(), module.down.float()
    flat = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    shape = (up.shape[0], *down.shape[1:])
    return (module.alpha / module.rank) * flat.reshape(shape)


def _check_same_targets(loras: list[LoraFile]) -> None:
    first = set(loras[0].modules)
    for lora in loras[1:]:
        if set(lora.modules) != first:
            only_a, only_b = sorted(first - set(lora.modules)), sorted(set(lora.modules) - first)
            example = (only_a or only_b)[0]
            raise ConfigError(
                f"{loras[0].path.name} and {lora.path.name} do not have the same LoRA modules "
                f"({len(only_a)} only in the first, {len(only_b)} only in the second, e.g. {example}). "
                f"Mix LoRAs trained with the same targets, or convert them to one family first."
            )
        for name, mod in lora.modules.items():
            ref = loras[0].modules[name]
            if mod.down.shape[1:] != ref.down.shape[1:] or mod.up.shape[0] != ref.up.shape[0]:
                raise ConfigError(
                    f"{lora.path.name}: module {name} has shapes {tuple(mod.up.shape)} @ {tuple(mod.down.shape)}, "
                    f"but {loras[0].path.name} has {tuple(ref.up.shape)} @ {tuple(ref.down.shape)}: they were "
                    f"trained for different models."
                )


def combine(loras: list[LoraFile], weights: list[float]) -> dict[str, LoraModule]:
    """The exact Σ w_i·ΔW_i of LoRAs with the same modules, as one LoRA of rank Σ r_i per module."""
    import torch

    if len(loras) != len(weights) or not loras:
        raise ConfigError("give one weight per LoRA file")
    if len({lora.format == "kohya" for lora in loras}) > 1:
        raise ConfigError(
            "mixing a kohya-format file with a diffusers-format file: convert one of them first "
            "(`pipeline lora convert FILE --to kohya`)."
        )
    _check_same_targets(loras)
    out = {}
    for name in loras[0].modules:
        mods = [lora.modules[name] for lora in loras]
        down = torch.cat([m.down.float() for m in mods])
        up = torch.cat([w * (m.alpha / m.rank) * m.up.float() for m, w in zip(mods, weights, strict=True)], dim=1)
        out[name] = LoraModule(down, up, float(down.shape[0]))
    return out


@dataclass
class Compressed:
    modules: dict[str, LoraModule]
    rel_error: dict[str, float]  # per module: ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F

    @property
    def total_rel_error(self) -> float:
        return max(self.rel_error.values(), default=0.0)


def compress(modules: dict[str, LoraModule], rank: int) -> Compressed:
    """Each module's ΔW truncated to `rank` singular values (exactly, if its rank is already ≤ rank)."""
    import torch

    out, errors = {}, {}
    for name, m in modules.items():
        up = (m.alpha / m.rank) * m.up.double().reshape(m.up.shape[0], -1)  # (out, R)
        down = m.down.double().reshape(m.down.shape[0], -1)  # (R, in)
        try:
            qb, rb = torch.linalg.qr(up)  # up = qb rb
            qa, ra = torch.linalg.qr(down.T)  # down.T = qa ra
            u, s, vh = torch.linalg.svd(rb @ ra.T)  # ΔW = qb (rb ra^T) qa^T
        except torch.linalg.LinAlgError as e:
            raise ConfigError(
                f"module {name}: the SVD to rank {rank} did not converge ({e}); its weights are degenerate. "
                f"Mix without --rank (exact), or leave that file out."
            ) from None
        k = min(rank, s.shape[0])
        total = float((s**2).sum())
        errors[name] = (float((s[k:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
        new_up = (qb @ u[:, :k]) * s[:k]  # (out, k)
        new_down = vh[:k] @ qa.T  # (k, in)
        out[name] = LoraModule(
            new_down.float().reshape(k, *m.down.shape[1:]),
            new_up.float().reshape(m.up.shape[0], k, *m.up.shape[2:]),
            float(k),
        )
    return Compressed(out, errors)


def average(loras: list[LoraFile], rank: int | None = None) -> Compressed:
    """The mean ΔW of N LoRAs: exact (rank N·r) or compressed to `rank` with its error."""
    exact = combine(loras, [1.0 / len(loras)] * len(loras))
    if rank is None:
        return Compressed(exact, {n: 0.0 for n in exact})
    return compress(exact, rank)


IDENTITY_KEYS = (
    "ss_base_model_version", "ss_v2", "ss_v_parameterization", "modelspec.architecture", "modelspec.prediction_type",
)  # fmt: skip


def save_modules(
    modules: dict[str, LoraModule],
    fmt: str,
    path,
    family,
    metadata: dict[str, str] | None = None,
    text_modules: dict[str, dict[str, LoraModule]] | None = None,
) -> None:
    """Write modules as a kohya or diffusers file for `family`. Diffusers needs dotted module names.
    text_modules (component -> modules, kohya names) are written under the family's kohya text prefixes."""
    from collections import Counter
    from pathlib import Path

    from stages.training.lora_files import save_diffusers, save_kohya, to_kohya

    path = Path(path)
    state = _peft_state(modules)
    alphas = {name: m.alpha for name, m in modules.items()}
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**family.lora_metadata(), **(metadata or {})}
    if fmt == "comfy" and getattr(family, "single_file_lora", "kohya") == "kohya":
        fmt = "kohya"  # SD's single-file format, the one ComfyUI loads for it
    if fmt in ("kohya", "comfy") and getattr(family, "single_file_lora", "kohya") == "comfy":
        if text_modules:
            raise ConfigError(f"the {family.name} family's LoRA files carry no text-encoder modules.")
        if any("." not in name for name in modules):
            raise ConfigError("this LoRA came from a kohya file; pass --model so its module names can be matched.")
        from stages.training.lora_files import save_single_file_lora

        save_single_file_lora(family, state, rank, alphas, path, meta)
        return
    if fmt == "kohya":
        extra = {}
        for comp, mods in (text_modules or {}).items():
            prefix = family.kohya_text_prefixes.get(comp)
            if prefix is None:
                raise ConfigError(f"the {family.name} family has no {comp}; its LoRA modules cannot be written.")
            extra.update(to_kohya(_peft_state(mods), {n: m.alpha for n, m in mods.items()}, prefix))
        rename = family.kohya_rename_names(modules)  # SDXL: the SGM block names sd-scripts writes
        save_kohya(state, rank, alphas, path, family.kohya_prefix, meta, extra=extra, rename=rename)
        return
    if any("." not in name for mods in [modules, *(text_modules or {}).values()] for name in mods):
        raise ConfigError(
            "this LoRA came from a kohya file, whose module names lost their dots; pass --model (the model it was "
            "trained for) so they can be matched to the model's modules."
        )
    # The text encoders' adapter configs name modules without `text_model.`: peft matches target names as
    # suffixes, so they fit CLIP with that level (transformers 4) and without it (5), where diffusers strips it
    # from the weights' names but not from the config.
    extra = {
        comp: (_peft_state(mods), _adapter_config({n.removeprefix("text_model."): m for n, m in mods.items()}))
        for comp, mods in (text_modules or {}).items()
    }
    save_diffusers(state, _adapter_config(modules), path, family.pipeline_class, family.lora_component, extra, meta)


def _adapter_config(modules: dict[str, LoraModule]):
    """The peft config that reloads these modules exactly: the common rank and alpha, and patterns for the rest."""
    from collections import Counter

    from peft import LoraConfig

    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern={n: m.rank for n, m in modules.items() if m.rank != rank},
        alpha_pattern={n: m.alpha for n, m in modules.items() if m.alpha != alpha},
    )


def _peft_state(modules: dict[str, LoraModule]) -> dict:
    state = {}
    for name, m in modules.items():
        state[f"{name}.lora_A.weight"] = m.down.contiguous()
        state[f"{name}.lora_B.weight"] = m.up.contiguous()
    return state
