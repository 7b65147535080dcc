"""`pipeline lora info|convert|mix`: LoRA files in, LoRA files out, on this project's files and on kohya and
diffusers files from elsewhere. The arithmetic is in stages/training/lora_ops.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from core.errors import ConfigError, ModelError

FORMATS = ("kohya", "comfy", "diffusers")  # kohya and comfy: the family's single-file format (kohya for SD)
# Which programs load each format (checked against their loaders: kohya's networks/lora.py, ComfyUI's
# comfy/lora.py, A1111's extensions-builtin/Lora, diffusers' load_lora_weights).
CONSUMERS = {
    "kohya": "ComfyUI, A1111/Forge, kohya's sd-scripts and diffusers' load_lora_weights",
    "diffusers": "diffusers' load_lora_weights only (ComfyUI and A1111 apply none of its keys)",
    "peft": "peft and diffusers (ComfyUI and A1111 apply none of its keys)",
    "comfy": "ComfyUI and diffusers' load_lora_weights (the naming of ai-toolkit files and musubi-tuner's ComfyUI "
    "exports)",
}


def parse_weighted(spec: str) -> tuple[Path, float]:
    """`A.safetensors:0.5` -> (A.safetensors, 0.5); no `:weight` means 1.0."""
    path, sep, weight = spec.rpartition(":")
    if not sep or "/" in weight or weight.endswith(".safetensors"):
        return Path(spec), 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ConfigError(
            f"{spec!r}: the weight {weight!r} is not a number; write FILE:WEIGHT, e.g. a.safetensors:0.5"
        ) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{spec!r}: the weight must be a finite number")
    return Path(path), value


def read(path: Path, family, model: Path | None = None, single_file_config: Path | None = None):
    """Read a LoRA file; with a model, map its modules onto the model's (dotted) names and check every shape."""
    from stages.training.lora_files import LoraFile, match_modules, read_lora_file

    lora = read_lora_file(path, family.kohya_prefix, family.lora_component, family.name)
    if model is None:
        return lora
    layout = family.layout(model, single_file_config)
    if lora.text_modules:
        components = family.load_components(layout)
        unet = components[family.lora_component]
        text = {comp: match_text_modules(lora, comp, components) for comp in lora.text_modules}
    else:
        unet, text = family.load_denoiser(layout, "cpu"), {}
    modules = match_modules(lora, unet, family.kohya_prefix)
    return LoraFile(lora.path, lora.format, modules, lora.metadata, text)


def match_text_modules(lora, comp: str, components: dict) -> dict:
    """The file's modules for text encoder `comp`, mapped onto its module names with every shape checked."""
    from stages.training.lora_files import LoraFile, match_modules, text_encoder_tree

    if components.get(comp) is None:
        raise ModelError(
            f"{lora.path}: it has LoRA modules for a {comp}, which this model does not have. Was it trained for "
            f"another model family (SDXL has two text encoders)?"
        )
    part = LoraFile(lora.path, lora.format, lora.text_modules[comp], lora.metadata)
    return match_modules(part, text_encoder_tree(components[comp]), kohya_prefix="")


def identity(loras) -> dict[str, str]:
    """The base-model fields (ss_v2, ss_base_model_version, ...) the inputs agree on: an output keeps them."""
    from stages.training.lora_ops import IDENTITY_KEYS

    out = {}
    for key in IDENTITY_KEYS:
        values = {lora.metadata.get(key) for lora in loras}
        if len(values) == 1 and None not in values:
            out[key] = values.pop()
    return out


KNOWN_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "time_emb_proj", "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out",
)  # fmt: skip


def target_of(name: str, fmt: str) -> str:
    """The layer name a module's LoRA targets (`to_q`, `to_out.0`), from a dotted or a kohya (underscored) name."""
    if fmt == "kohya":
        return next((t for t in KNOWN_TARGETS if name.endswith("_" + t.replace(".", "_"))), name.rsplit("_", 1)[-1])
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


NETWORK_CONSUMERS = {  # docs/training.md, Networks
    "loha": "ComfyUI and A1111/Forge (LyCORIS keys); diffusers' load_lora_weights loads no LoHa",
    "lokr": "ComfyUI and A1111/Forge (LyCORIS keys); diffusers' load_lora_weights loads no LoKr",
    "dora": "diffusers' load_lora_weights and A1111/Forge (dora_scale per output channel, as LyCORIS writes it); "
    "ComfyUI loads it but divides by the base weight's norm there (an open bug, Comfy-Org/ComfyUI#15458), so its "
    "result differs slightly until that fix lands",
}


def _numel(module) -> int:
    if module.kind in ("loha", "lokr"):
        return sum(t.numel() for t in module.factors.values())
    return module.down.numel() + module.up.numel() + (0 if module.dora_scale is None else module.dora_scale.numel())


def info(path: Path, family) -> dict:
    lora = read(path, family)
    suffixes = Counter(target_of(name, lora.format) for name in lora.modules)
    meta = lora.metadata
    base = meta.get("ss_base_model_version") or meta.get("modelspec.architecture")
    mods = [*lora.modules.values(), *(m for t in lora.text_modules.values() for m in t.values())]
    params = sum(_numel(m) for m in mods)
    return {
        "file": str(path),
        "format": lora.format,
        "network": lora.network,
        "loads_in": (
            NETWORK_CONSUMERS[lora.network]
            if lora.network in ("loha", "lokr") or (lora.network == "dora" and lora.format == "kohya")
            else CONSUMERS[lora.format]
        ),
        "family": family.name,  # the same name for every format of one LoRA (its keys, or --family)
        "base_model": base or "not recorded in the file",
        "modules": len(lora.modules),
        "text_encoder_modules": {comp: len(mods) for comp, mods in lora.text_modules.items()},
        "rank": sorted(lora.ranks),
        "alpha": sorted(lora.alphas),
        "targets": dict(sorted(suffixes.items())),
        "parameters": params,
        "bytes": path.stat().st_size,
        "metadata": {k: (v if len(v) <= 200 else v[:200] + "...") for k, v in sorted(meta.items())},
    }


def written_format(fmt: str, family) -> str:
    """The format `--to fmt` writes for a family: kohya and comfy both mean its single-file format."""
    if fmt == "diffusers":
        return fmt
    return getattr(family, "single_file_lora", "kohya")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"--to {fmt!r}: choose kohya, comfy or diffusers")
    return fmt


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it, or choose another --out")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: LoRA files are written as .safetensors")


def convert(path: Path, fmt: str, out: Path, family, model: Path | None, unet_only: bool = False) -> dict:
    from stages.training.lora_ops import save_modules

    lora = read(path, family, model)
    lora.require_plain("`pipeline lora convert`")
    if lora.format == "kohya" and fmt == "diffusers" and model is None:
        raise ModelError(
            f"{path} is a kohya file: its module names lost their dots, so converting it to the diffusers format "
            f"needs the model it was trained for. Pass --model DIR_OR_FILE."
        )
    text = _text_modules([lora], unet_only)
    meta = {**identity([lora]), "lora_pipeline.converted_from": path.name}
    save_modules(lora.modules, fmt, out, family, meta, text)
    return {
        "from": str(path),
        "from_format": lora.format,
        "to": str(out),
        "to_format": written_format(fmt, family),
        "loads_in": CONSUMERS[written_format(fmt, family)],
        "modules": len(lora.modules) + sum(len(m) for m in text.values()),
        "text_encoder_modules": {c: len(m) for c, m in text.items()},
    }


def _text_modules(loras, unet_only: bool, weights: list[float] | None = None) -> dict:
    """The text-encoder modules to write: carried through (a mix combines them exactly like the UNet's), or
    none with --unet-only. Never dropped without being asked."""
    from stages.training.lora_files import LoraFile
    from stages.training.lora_ops import combine

    if unet_only or not any(lora.text_modules for lora in loras):
        return {}
    comps = [set(lora.text_modules) for lora in loras]
    if any(c != comps[0] for c in comps):
        raise ConfigError(
            "only some of these LoRA files have text-encoder modules: mix files of the same kind, or pass --unet-only."
        )
    if weights is None:  # a conversion copies them exactly
        return dict(loras[0].text_modules)
    return {
        comp: combine([LoraFile(x.path, x.format, x.text_modules[comp], x.metadata) for x in loras], weights)
        for comp in sorted(comps[0])
    }


def mix(
    specs: list[str], out: Path, fmt: str, family, model: Path | None, rank: int | None, unet_only: bool = False
) -> dict:
    from stages.training.lora_ops import combine, compress, save_modules

    pairs = [parse_weighted(s) for s in specs]
    if len(pairs) < 1:
        raise ConfigError("give at least one FILE:WEIGHT")
    loras = [read(p, family, model) for p, _ in pairs]
    for lora in loras:
        lora.require_plain("`pipeline lora mix`")
    if model is None and fmt == "diffusers" and any(lora.format == "kohya" for lora in loras):
        raise ModelError("mixing kohya files into the diffusers format needs --model (see `pipeline lora convert`).")
    weights = [w for _, w in pairs]
    modules = combine(loras, weights)
    text = _text_modules(loras, unet_only, weights)
    report = {"inputs": [{"file": str(p), "weight": w} for p, w in pairs], "to": str(out), "to_format": fmt}
    if rank is not None:
        compressed = compress(modules, rank)
        modules = compressed.modules
        errors = [compressed.total_rel_error]
        for comp, mods in text.items():
            c = compress(mods, rank)
            text[comp] = c.modules
            errors.append(c.total_rel_error)
        report["rank"] = rank
        report["max_rel_error"] = max(errors)
    else:
        report["rank"] = max(m.rank for m in modules.values())
        report["max_rel_error"] = 0.0
    report["loads_in"] = CONSUMERS[written_format(fmt, family)]
    report["text_encoder_modules"] = {c: len(m) for c, m in text.items()}
    save_modules(modules, fmt, out, family, {**identity(loras), "lora_pipeline.mix": ", ".join(specs)}, text)
    return report


def _model_layout(family, model: Path, single_file_config: Path | None):
    return family.layout(Path(model).resolve(), single_file_config)


def apply_weighted(unet, family, specs: list[str], text_encoder: Callable[[], object]):
    """Attach each FILE:WEIGHT as its own adapter (lora0, lora1, ...) on the UNet, and its text-encoder modules
    under the same name on text_encoder() (the family's, loaded on first use). -> [(adapter name, weight, file)]."""
    from stages.training.lora_files import attach_lora_file, has_text_model_level, match_modules, read_lora_file

    attached = []
    for i, spec in enumerate(specs):
        path, weight = parse_weighted(spec)
        lora = read_lora_file(path, family.kohya_prefix, family.lora_component, family.name)
        lora.require_plain("`pipeline sample` (which weights LoRA adapters in peft)")
        if lora.text_modules and not family.text_encoder_targets:
            lora.refuse_text_modules(f"`pipeline sample` has no LoRA-able text encoder in the {family.name} family")
        for comp in lora.text_modules:
            parts = text_encoder().parts
            matched = match_text_modules(lora, comp, parts)  # names the component it lacks
            model = parts[comp]
            # matched names are canonical (`text_model.encoder...`); transformers 5's CLIP has no `text_model` level
            level = has_text_model_level(model)
            modules = {n if level else n.removeprefix("text_model."): m for n, m in matched.items()}
            attach_lora_file(model, modules, f"lora{i}")
        attach_lora_file(unet, match_modules(lora, unet, family.kohya_prefix), f"lora{i}")
        attached.append((f"lora{i}", weight, path))
    return attached


def set_adapter_weights(unet, weights: dict[str, float]) -> None:
    """Activate these adapters together, each scaled by its weight (what diffusers' set_adapters does)."""
    from peft.tuners.lora import LoraLayer

    unet.set_adapter(list(weights))
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            for name, w in weights.items():
                if name in module.lora_A:
                    module.set_scale(name, w)


def merge(model: Path, specs: list[str], out: Path, family, single_file_config: Path | None, force: bool) -> dict:
    """Bake weighted LoRAs into a copy of the model: W += Σ w_i·ΔW_i in fp32, cast back to W's dtype. Any
    network: ΔW_i is the file's W' − W on the weights as they are when it is applied, in the order given."""
    import shutil

    import torch

    from stages.training.lora_files import match_modules, read_lora_file, text_encoder_tree
    from stages.training.networks import effective_delta

    if not specs:
        raise ConfigError("give at least one FILE:WEIGHT to merge")
    model, out = Path(model).resolve(), Path(out).resolve()
    if out == model:
        raise ConfigError(f"--out {out} is the model itself; write the merged model somewhere else.")
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it, or choose another --out")
    parsed = [parse_weighted(s) for s in specs]
    components = family.load_components(_model_layout(family, model, single_file_config))
    unet = components[family.lora_component]
    changed, text_changed = 0, 0
    with torch.no_grad():
        for path, weight in parsed:
            lora = read_lora_file(path, family.kohya_prefix, family.lora_component, family.name)
            matched = {family.lora_component: match_modules(lora, unet, family.kohya_prefix)}
            matched.update({comp: match_text_modules(lora, comp, components) for comp in lora.text_modules})
            for comp, modules in matched.items():
                tree = unet if comp == family.lora_component else text_encoder_tree(components[comp])
                layers = dict(tree.named_modules())
                for name, mod in modules.items():
                    w = layers[name].weight
                    # W' − W of any network (a DoRA's depends on W itself), scaled as ComfyUI's strength scales it
                    w.copy_((w.float() + weight * effective_delta(mod, w)).to(w.dtype))
                    changed += comp == family.lora_component
                    text_changed += comp != family.lora_component
    tmp = out.with_name(f".tmp-{out.name}")  # keeps the suffix, which decides folder vs single file
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    family.save_model(components, tmp)
    _apply_umask(tmp)  # safetensors creates files owner-only; every other output follows the user's umask
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    tmp.rename(out)
    return {
        "model": str(model),
        "loras": [{"file": str(p), "weight": w} for p, w in parsed],
        "out": str(out),
        "modules_changed": changed,
        "denoiser": "UNet" if family.lora_component == "unet" else "transformer",
        "text_encoder_modules_changed": text_changed,
    }


def _apply_umask(path: Path) -> None:
    import os

    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def sample(
    model: Path,
    specs: list[str],
    prompts: list[str],
    seed: int,
    out: Path,
    steps: int,
    guidance: float,
    size: int,
    scales: list[float],
    family,
    single_file_config: Path | None = None,
) -> dict:
    """A PNG grid: one row per prompt, one column per scale s (every LoRA at s x its weight), same seed everywhere."""
    from stages.devices import resolve_device
    from stages.training.previews import PreviewSpec, labelled_grid

    if not prompts:
        raise ConfigError("give at least one --prompt")
    layout = _model_layout(family, model, single_file_config)
    device = resolve_device("auto")
    unet = family.load_denoiser(layout, device).eval()
    loaded = []  # the text encoder, loaded when a file has modules for it

    def text_encoder():
        if not loaded:
            loaded.append(family.load_text_encoder(layout, device))
        return loaded[0]

    attached = apply_weighted(unet, family, specs, text_encoder)
    text = loaded[0] if loaded else None
    render = family.preview_pipeline(
        layout, unet, device, family.prediction_type(layout), **({"text_encoder": text} if text else {})
    )
    columns = []
    for s in scales:
        if attached:
            scaled = {name: s * w for name, w, _ in attached}
            set_adapter_weights(unet, scaled)
            for part in text.parts.values() if text is not None else ():
                config = getattr(part, "peft_config", {})  # an encoder no file had modules for has no adapter
                if any(n in config for n in scaled):
                    set_adapter_weights(part, {n: w for n, w in scaled.items() if n in config})
        columns.append([render(PreviewSpec(p, "", seed, size, size, steps, guidance)) for p in prompts])
    rows = [[column[i] for column in columns] for i in range(len(prompts))]
    title = f"seed {seed} · {steps} steps · cfg {guidance:g} · {size}x{size}"
    grid, cells = labelled_grid(rows, prompts, [f"scale {s:g}" for s in scales], title)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return {
        "out": str(out),
        "prompts": prompts,
        "scales": scales,
        "cells": cells,  # per prompt and scale: [x, y, scale] of its image in the grid
        "seed": seed,
        "loras": [{"file": str(p), "weight": w} for _, w, p in attached],
    }
