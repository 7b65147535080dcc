"""LoRA adapters on a denoiser through peft, and the two file formats people load.

kohya: `lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha`, ΔW = alpha/r · up · down,
with `ss_*` and modelspec metadata: loads in ComfyUI, A1111 and diffusers.
diffusers: `unet.<module>.lora_A/B` as written by `save_lora_weights`, with the peft adapter config in
the metadata, so alpha ≠ rank survives a reload (diffusers would otherwise assume alpha = rank).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError


def add_lora(denoiser, rank: int, alpha: float, dropout: float, targets: list[str], seed: int, section: str = "lora1"):
    import torch
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), init_lora_weights="gaussian"
    )
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # differential LoRA-2 trains over a LoRA-1 adapter on purpose
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            denoiser.add_adapter(config)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"{section}.targets = {list(targets)} matched no module of the model ({e}). "
            f"Linear layer names in this model include: {', '.join(names[:12])}."
        ) from None
    return config


def trainable_state(denoiser) -> dict:
    return {n: p.detach() for n, p in denoiser.named_parameters() if p.requires_grad}


def lora_state_dict(denoiser) -> dict:
    """The adapter's weights in peft naming: `<module>.lora_A.weight`, `<module>.lora_B.weight`."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}


def to_kohya(state: dict, alpha: float | dict[str, float], prefix: str) -> dict:
    """peft-named state -> kohya names; alpha is one value or a per-module {module: alpha}."""
    import torch

    out = {}
    for key, value in state.items():
        module, which = key.rsplit(".lora_", 1)
        name = prefix + module.replace(".", "_")
        out[f"{name}.{'lora_down' if which.startswith('A') else 'lora_up'}.weight"] = value
        a = alpha[module] if isinstance(alpha, dict) else alpha
        out[f"{name}.alpha"] = torch.tensor(float(a))
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


def save_kohya(
    state: dict, rank: int, alpha: float | dict[str, float], path: Path, prefix: str, metadata: dict[str, str]
) -> None:
    from collections import Counter

    from safetensors.torch import save_file

    common_alpha = Counter(alpha.values()).most_common(1)[0][0] if isinstance(alpha, dict) else alpha
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(common_alpha),
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


def write_lora_outputs(family, outcome, p, work_dir, name: str) -> dict:
    """The trained LoRA in the kohya and diffusers formats, and the loss log."""
    state = lora_state_dict(outcome.denoiser)
    kohya = work_dir / f"{name}.safetensors"
    save_kohya(state, p.rank, p.alpha, kohya, family.kohya_prefix, family.lora_metadata())
    diffusers_file = work_dir / "pytorch_lora_weights.safetensors"
    save_diffusers(state, outcome.adapter_config, diffusers_file, family.pipeline_class, family.lora_component)
    loss_csv = work_dir / "loss.csv"
    loss_csv.write_text("step,loss\n" + "".join(f"{i + 1},{v:.6g}\n" for i, v in enumerate(outcome.losses)))
    return {
        f"{name}.safetensors": kohya,
        "diffusers/pytorch_lora_weights.safetensors": diffusers_file,
        "loss.csv": loss_csv,
        **outcome.previews,
    }


# -- reading LoRA files ---------------------------------------------------------------------------------------


@dataclass
class LoraModule:
    down: object  # (r, in) or (r, in, kh, kw) tensor: kohya lora_down, peft lora_A
    up: object  # (out, r) or (out, r, 1, 1) tensor: kohya lora_up, peft lora_B
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    """A LoRA file read into one shape whatever its format: module name -> (down, up, alpha).

    Names are the model's dotted module paths for diffusers/peft files; for kohya files they stay in the
    underscored form (`down_blocks_0_..._to_q`) until `match_modules` maps them onto a model."""

    path: Path
    format: str  # kohya | diffusers | peft
    modules: dict[str, LoraModule]
    metadata: dict[str, str]

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    @property
    def alphas(self) -> set[float]:
        return {m.alpha for m in self.modules.values()}


_SUFFIXES = {
    "kohya": (".lora_down.weight", ".lora_up.weight"),
    "diffusers": (".lora.down.weight", ".lora.up.weight"),
    "peft": (".lora_A.weight", ".lora_B.weight"),
}


def read_lora_file(path: Path, kohya_prefix: str = "lora_unet_", component: str = "unet") -> LoraFile:
    """Read a kohya, diffusers or peft-named LoRA .safetensors file; raise ModelError naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pipeline.errors import ModelError

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"LoRA file {path} does not exist.")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise ModelError(f"{path}: LoRA files are read only in the .safetensors format (pickle files can run code).")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path} is not a readable .safetensors file ({e}).") from None
    fmt = next((f for f, (down, _) in _SUFFIXES.items() if any(k.endswith(down) for k in tensors)), None)
    if fmt is None:
        raise ModelError(
            f"{path} holds no LoRA weights this tool reads (looked for *.lora_down/lora_up, *.lora.down/up and "
            f"*.lora_A/lora_B tensors). Is it a full model or another adapter type?"
        )
    down_sfx, up_sfx = _SUFFIXES[fmt]
    config_alpha, rank_alpha = _metadata_alphas(metadata, component)
    prefix = kohya_prefix if fmt == "kohya" else f"{component}."
    modules: dict[str, LoraModule] = {}
    other = []
    for key, down in tensors.items():
        if not key.endswith(down_sfx):
            continue
        base = key[: -len(down_sfx)]
        name = base[len(prefix) :] if base.startswith(prefix) else None
        if name is None:
            other.append(key)
            continue
        up = tensors.get(base + up_sfx)
        if up is None:
            raise ModelError(f"{path}: {key} has no matching {base + up_sfx}; the file is incomplete.")
        alpha_t = tensors.get(base + ".alpha")
        if alpha_t is not None:
            alpha = float(alpha_t)
        else:
            alpha = rank_alpha.get(name, config_alpha if config_alpha is not None else float(down.shape[0]))
        modules[name] = LoraModule(down.float(), up.float(), alpha)
    if not modules:
        raise ModelError(
            f"{path}: no LoRA weights for the {component} (expected keys starting with {prefix!r}; "
            f"found e.g. {other[:1]}). Is it a LoRA for another model family?"
        )
    return LoraFile(path, fmt, modules, metadata)


def _metadata_alphas(metadata: dict[str, str], component: str) -> tuple[float | None, dict[str, float]]:
    """lora_alpha and alpha_pattern from the adapter config that diffusers writes into the metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None, {}
    alpha = cfg.get(f"{component}.lora_alpha")
    pattern = cfg.get(f"{component}.alpha_pattern") or {}
    return (float(alpha) if alpha is not None else None), {k: float(v) for k, v in pattern.items()}


def match_modules(lora: LoraFile, denoiser, kohya_prefix: str = "lora_unet_") -> dict[str, LoraModule]:
    """Map the file's modules onto the model's module names and check every shape; ModelError if one does not fit."""
    import torch

    from pipeline.errors import ModelError

    layers = {  # a layer that already carries an adapter is found through its peft wrapper's base_layer
        n.removesuffix(".base_layer"): m
        for n, m in denoiser.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
    if lora.format == "kohya":
        by_flat = {n.replace(".", "_"): n for n in layers}
        names = {k: by_flat.get(k) for k in lora.modules}
    else:
        names = {k: (k if k in layers else None) for k in lora.modules}
    missing = sorted(k for k, v in names.items() if v is None)
    if missing:
        raise ModelError(
            f"{lora.path}: {len(missing)} of {len(names)} LoRA modules are not in this model "
            f"(e.g. {missing[0]}). Was it trained for another model family or architecture?"
        )
    out: dict[str, LoraModule] = {}
    for key, name in names.items():
        mod, layer = lora.modules[key], layers[name]
        w = layer.weight
        fits = mod.down.shape[1] == w.shape[1] and mod.up.shape[0] == w.shape[0] and mod.up.shape[1] == mod.rank
        if not fits:
            raise ModelError(
                f"{lora.path}: the LoRA for {name} has shapes down {tuple(mod.down.shape)} / up {tuple(mod.up.shape)}, "
                f"but the model's layer weight is {tuple(w.shape)}. The LoRA was trained for another architecture."
            )
        out[name] = mod
    return out


def load_lora_into(denoiser, modules: dict[str, LoraModule], adapter_name: str = "default") -> None:
    """Copy matched LoRA weights into an existing peft adapter of the same modules and ranks."""
    import torch

    from pipeline.errors import ConfigError as _ConfigError

    layers = dict(denoiser.named_modules())
    with torch.no_grad():
        for name, mod in modules.items():
            layer = layers[name]
            a = layer.lora_A[adapter_name] if adapter_name in getattr(layer, "lora_A", {}) else None
            if a is None or a.weight.shape != mod.down.shape:
                raise _ConfigError(f"the adapter {adapter_name!r} has no LoRA of rank {mod.rank} on {name}")
            a.weight.copy_(mod.down.reshape(a.weight.shape))
            b = layer.lora_B[adapter_name]
            b.weight.copy_(mod.up.reshape(b.weight.shape))
            r = mod.rank
            layer.scaling[adapter_name] = mod.alpha / r


def attach_lora_file(denoiser, modules: dict[str, LoraModule], adapter_name: str) -> None:
    """Add a new adapter with exactly the file's modules, ranks and alphas (dropout 0), and load its weights."""
    from collections import Counter

    from peft import LoraConfig

    ranks = Counter(m.rank for m in modules.values())
    alphas = Counter(m.alpha for m in modules.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=sorted(modules),
        rank_pattern={n: m.rank for n, m in modules.items() if m.rank != r},
        alpha_pattern={n: m.alpha for n, m in modules.items() if m.alpha != alpha},
        init_lora_weights=False,
    )
    with warnings.catch_warnings():  # a second adapter is the point here, not a mistake
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        denoiser.add_adapter(config, adapter_name=adapter_name)
    load_lora_into(denoiser, modules, adapter_name)
