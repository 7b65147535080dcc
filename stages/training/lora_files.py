"""LoRA adapters on a denoiser through peft, and the two file formats people load.

kohya: `lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha`, ΔW = alpha/r · up · down,
with `ss_*` and modelspec metadata: loads in ComfyUI, A1111 and diffusers.
diffusers: `unet.<module>.lora_A/B` as written by `save_lora_weights`, with the peft adapter config in
the metadata, so alpha ≠ rank survives a reload (diffusers would otherwise assume alpha = rank).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError, PipelineError
from stages.training.networks import LycoModule


def peft_too_old(transformers_version: str, needed: str, installed: str) -> str | None:
    """The message for a peft older than transformers' adapter code needs (None when it is new enough)."""
    from packaging.version import Version

    if Version(installed) >= Version(needed):
        return None
    return (
        f"transformers {transformers_version} puts adapters on text encoders only with peft >= {needed}, and peft "
        f"{installed} is installed. Install versions that work together: pip install 'transformers<5.24' (what "
        f"lora-pipeline pins), or pip install -U 'peft>={needed}'."
    )


def _add_adapter(model, config, adapter_name: str = "default") -> None:
    """model.add_adapter, with transformers' refusal of an older peft said as a fix rather than a traceback."""
    try:
        model.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:
        if "version of PEFT" not in str(e):
            raise
        from importlib.metadata import version

        from transformers.integrations.peft import MIN_PEFT_VERSION

        message = peft_too_old(version("transformers"), MIN_PEFT_VERSION, version("peft"))
        raise PipelineError(message or f"peft refused the adapter: {e}") from None


def add_lora(
    denoiser,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    seed: int,
    section: str = "lora1",
    rslora: bool = False,
    network: str = "lora",
    init: str = "gaussian",
    lokr_factor: int = -1,
):
    """Add the trained adapter (a LoRA, DoRA, LoHa or LoKr; networks.py) as peft's adapter `default`."""
    import torch

    from stages.training.networks import adapter_config

    config = adapter_config(network, rank, alpha, dropout, targets, rslora, init, lokr_factor)
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # differential LoRA-2 trains over a LoRA-1 adapter on purpose
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for model in _peft_models(denoiser):  # in order, from the one seed
                _add_adapter(model, config)
    except ValueError as e:
        if "Unknown initialization" in str(e) and init != "gaussian":
            convs = sorted(
                {n.rsplit(".", 1)[-1] for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Conv2d)}
                & {t.rsplit(".", 1)[-1] for t in targets}
            )
            raise ConfigError(
                f'{section}.lora_init = "{init}": peft starts only Linear layers this way, and {section}.targets '
                f"include conv layers ({', '.join(convs) or 'a Conv2d'}). Leave them out of the targets, or use "
                f'lora_init = "gaussian".'
            ) from None
        if "matched no module" not in str(e) and "not found in the base model" not in str(e):
            raise ConfigError(f"{section}.network = {network!r} (lora_init = {init!r}): peft refused it: {e}") from None
        names = sorted({n.rsplit(".", 1)[-1] for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"{section}.targets = {list(targets)} matched no module of the model ({e}). "
            f"Linear layer names in this model include: {', '.join(names[:12])}."
        ) from None
    return config


def _peft_models(model) -> list:
    """The models that carry an adapter: the model, or each of a ModuleList of them (SDXL's two text encoders)."""
    import torch

    if isinstance(model, torch.nn.ModuleList) and not hasattr(model, "add_adapter"):
        return list(model)
    return [model]


def trainable_state(denoiser) -> dict:
    return {n: p.detach() for n, p in denoiser.named_parameters() if p.requires_grad}


def lora_state_dict(denoiser) -> dict:
    """The adapter's weights in peft naming: `<module>.lora_A.weight`, `<module>.lora_B.weight`."""
    from peft.utils import get_peft_model_state_dict

    models = _peft_models(denoiser)
    if len(models) > 1 or models[0] is not denoiser:  # a ModuleList: its models' states under `<index>.`
        return {f"{i}.{k}": v for i, m in enumerate(models) for k, v in lora_state_dict(m).items()}
    state = get_peft_model_state_dict(denoiser, save_embedding_layers=False)  # (no vocabulary check: none trained)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def to_kohya(state: dict, alpha: float | dict[str, float], prefix: str, rank: int | None = None) -> dict:
    """peft-named state -> kohya names (`<prefix><module with _>.lora_down.weight`, LyCORIS' names for DoRA,
    LoHa and LoKr parts); alpha is one value or a per-module {module: alpha}; rank: LoHa/LoKr's r."""
    from stages.training.networks import file_tensors

    return {
        f"{prefix}{module.replace('.', '_')}.{suffix}": value
        for module, parts in file_tensors(state, alpha, rank, "kohya").items()
        for suffix, value in parts.items()
    }


def canonicalize_safetensors(path: Path, metadata: dict[str, str] | None = None) -> None:
    """Rewrite a .safetensors header with sorted keys (and these metadata fields added). safetensors serializes its
    metadata from a hash map whose order changes per process, so equal tensors would otherwise give files with
    different digests."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if metadata:
        header["__metadata__"] = {**(header.get("__metadata__") or {}), **metadata}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned; its offsets are relative to it
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    tmp.replace(path)


def save_kohya(
    state: dict,
    rank: int,
    alpha: float | dict[str, float],
    path: Path,
    prefix: str,
    metadata: dict[str, str],
    extra: dict | None = None,
    rename: dict | None = None,
) -> None:
    """state: peft-named denoiser LoRA; extra: tensors already in kohya naming (text-encoder modules); rename:
    {module with underscores: kohya's name for it} (SDXL's SGM names)."""
    from collections import Counter

    from safetensors.torch import save_file

    common_alpha = Counter(alpha.values()).most_common(1)[0][0] if isinstance(alpha, dict) else alpha
    meta = {  # network_metadata() in `metadata` overrides the module for DoRA, LoHa and LoKr
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(common_alpha),
        "modelspec.title": path.stem,
        **metadata,
    }
    tensors = to_kohya(state, alpha, prefix, rank)
    if rename:
        renamed = {}
        for key, value in tensors.items():
            base, _, suffix = key.partition(".")
            module = base[len(prefix) :]
            renamed[f"{prefix}{rename.get(module, module)}.{suffix}"] = value
        tensors = renamed
    save_file({**tensors, **(extra or {})}, str(path), metadata=meta)
    canonicalize_safetensors(path)


COMFY_PREFIX = "diffusion_model."


def save_comfy(
    state: dict, alpha: float | dict[str, float] | None, path: Path, metadata: dict[str, str], rank: int | None = None
) -> None:
    """The single-file format shared for the transformer families (ComfyUI, ai-toolkit, musubi-tuner's converted
    files): `diffusion_model.<module>.lora_A/lora_B.weight` and `.alpha` (alpha None: no alpha keys, the scale is
    already in lora_B), with LyCORIS' part names for DoRA, LoHa and LoKr. ComfyUI's key map (comfy/lora.py:
    model_lora_keys_unet) accepts these names, and diffusers' load_lora_weights converts the LoRA ones
    (lora_conversion_utils)."""
    from safetensors.torch import save_file

    from stages.training.networks import file_tensors

    out = {
        f"{COMFY_PREFIX}{module}.{suffix}": value
        for module, parts in file_tensors(state, alpha, rank, "peft").items()
        for suffix, value in parts.items()
    }
    save_file(out, str(path), metadata=metadata)
    canonicalize_safetensors(path)


def save_single_file_lora(
    family, state: dict, rank: int, alpha, path: Path, metadata: dict[str, str], rename: dict | None = None
) -> None:
    """The single-file format users share for `family`: kohya for SD, the ComfyUI format for transformers.
    rename: family.kohya_rename(denoiser), kohya's module names where they are not diffusers' (SDXL)."""
    if getattr(family, "single_file_lora", "kohya") == "comfy":
        save_comfy(*family.comfy_lora(state, alpha), path, metadata, rank)
    else:
        state, alpha = family.kohya_lora(state, alpha)
        save_kohya(state, rank, alpha, path, family.kohya_prefix, metadata, rename=rename)


def save_diffusers(
    state: dict,
    adapter_config,
    path: Path,
    pipeline_class: str,
    component: str,
    extra: dict | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the diffusers format with adapter metadata via the pipeline class's own save_lora_weights; metadata:
    fields added beside diffusers' own (the family's ss_base_model_version, so tools tell SDXL files from SD's).
    extra: more components' LoRAs, {component: (peft-named state, adapter config)} (the text encoders)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    def meta(config) -> dict:
        # sets -> sorted lists; no base_model_name_or_path (transformers fills in the folder it was loaded from: a
        # path on this machine, which would make the bytes depend on where the project is)
        return json.loads(json.dumps({**config.to_dict(), "base_model_name_or_path": None}, default=sorted))

    kwargs = {}
    for comp, (comp_state, config) in {component: (state, adapter_config), **(extra or {})}.items():
        # The denoiser's LoRA keeps peft's names (`unet.<module>.lora_A.weight`), which load_lora_weights reads as
        # they are. The older diffusers naming (`.lora.down.weight`, convert_state_dict_to_diffusers) loses other
        # modules' weights on reload once proj_in/proj_out are targets (tests/test_lora_files.py, LoCon targets).
        if comp not in ("transformer", "unet"):
            # A text encoder loads through transformers' load_adapter, whose renaming puts the adapter name after
            # `lora_magnitude_vector` and so finds a DoRA magnitude only as `lora_magnitude_vector.weight`
            # (peft's own name drops the `.weight`; tests/test_text_encoder_lora.py loads both networks).
            comp_state = {
                (k + ".weight" if k.endswith(".lora_magnitude_vector") else k): v
                for k, v in convert_state_dict_to_diffusers(comp_state).items()
            }
        kwargs[f"{comp}_lora_layers"] = comp_state
        kwargs[f"{comp}_lora_adapter_metadata"] = meta(config)
    getattr(diffusers, pipeline_class).save_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    canonicalize_safetensors(path, metadata)


def file_alpha(rank: int, alpha: float, rslora: bool) -> float:
    """The alpha a file stores: loaders scale by alpha/rank, so rsLoRA's alpha/sqrt(rank) is alpha*sqrt(rank)."""
    return alpha * math.sqrt(rank) if rslora else alpha


def network_metadata(network: str) -> dict[str, str]:
    """How kohya-style metadata names a network: sd-scripts' own LoRA, or LyCORIS' module with its algorithm."""
    if network == "lora":
        return {}
    args = {"algo": "lora", "dora_wd": "True", "wd_on_out": "True"} if network == "dora" else {"algo": network}
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args, sort_keys=True)}


def has_text_model_level(model) -> bool:
    """Whether a CLIP text encoder's modules sit under `text_model.` (transformers 4) or at its top (5)."""
    return any(name == "text_model" for name, _ in model.named_modules())


def text_encoder_names(state: dict, model) -> dict:
    """A text encoder LoRA's peft state under the module names every loader uses (`text_model.encoder...`):
    transformers 5 dropped CLIP's `text_model` level from the module tree (see text_encoder_tree)."""
    return state if has_text_model_level(model) else {f"text_model.{k}": v for k, v in state.items()}


def text_encoder_tree(model):
    """The text encoder with its modules under their canonical names (`text_model.encoder.layers.0...`), which
    kohya, A1111, ComfyUI and diffusers files use; transformers 5 dropped the `text_model` level from CLIP's
    module tree. The weights are the model's own, so changing them changes the model."""
    import torch

    return model if has_text_model_level(model) else torch.nn.ModuleDict({"text_model": model})


# -- reading LoRA files ---------------------------------------------------------------------------------------


@dataclass
class LoraModule:
    down: object  # (r, in) or (r, in, kh, kw) tensor: kohya lora_down, peft lora_A
    up: object  # (out, r) or (out, r, 1, 1) tensor: kohya lora_up, peft lora_B
    alpha: float
    dora_scale: object = None  # DoRA's magnitude: (out, 1[, 1, 1]) per output channel, or (1, in[, 1, 1]) per input

    @property
    def kind(self) -> str:
        return "lora" if self.dora_scale is None else "dora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    """A LoRA file read into one shape whatever its format: module name -> (down, up, alpha).

    Names are the model's dotted module paths for diffusers/peft files; for kohya files they stay in the
    underscored form (`down_blocks_0_..._to_q`) until `match_modules` maps them onto a model. `modules` are the
    denoiser's; `text_modules` holds the text encoders' (component -> modules), which only some tools apply."""

    path: Path
    format: str  # kohya | diffusers | peft
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    text_modules: dict[str, dict[str, LoraModule]] = field(default_factory=dict)

    @property
    def network(self) -> str:
        """lora, dora, loha or lokr (the first that is not plain LoRA, if the file mixes them)."""
        kinds = {m.kind for m in self.modules.values()}
        return next((k for k in ("lokr", "loha", "dora") if k in kinds), "lora")

    def require_plain(self, what: str) -> None:
        """ConfigError unless every module is a plain (down, up) LoRA, which `what` combines as low-rank factors."""
        if self.network != "lora":
            raise ConfigError(
                f"{self.path}: it is a {self.network.upper()} adapter; {what} works on plain LoRA factors "
                f"(ΔW = up·down), which a {self.network.upper()} is not, so the result would not be exact. Apply it "
                f"where it is loaded (ComfyUI, A1111/Forge) instead."
            )

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    @property
    def alphas(self) -> set[float]:
        return {m.alpha for m in self.modules.values() if m.alpha is not None} or {1.0}

    def refuse_text_modules(self, why: str) -> None:
        """ModelError naming the text-encoder modules, for users of the file that apply only the denoiser's."""
        from core.errors import ModelError

        if self.text_modules:
            comp, mods = next(iter(self.text_modules.items()))
            n = sum(len(m) for m in self.text_modules.values())
            raise ModelError(
                f"{self.path}: {n} of its LoRA modules are for the text encoder ({comp}, e.g. {next(iter(mods))}); "
                f"{why}. Write a copy without them with `pipeline lora convert {self.path.name} --to kohya "
                f"--unet-only --out FILE`."
            )


_SUFFIXES = {
    "kohya": (".lora_down.weight", ".lora_up.weight"),
    "diffusers": (".lora.down.weight", ".lora.up.weight"),
    "peft": (".lora_A.weight", ".lora_B.weight"),
}
# Where kohya, A1111 and ComfyUI put text-encoder LoRAs: SD 1.x/2.x `lora_te_`, SDXL `lora_te1_`/`lora_te2_`.
KOHYA_TEXT_PREFIXES = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def read_lora_file(
    path: Path, kohya_prefix: str = "lora_unet_", component: str = "unet", family: str | None = None
) -> LoraFile:
    """Read a kohya, diffusers or peft-named LoRA .safetensors file, checking every module (shapes agree,
    values finite, one alpha); raise ModelError naming the file, the module and what is wrong. family: the model
    family it is read for, which says how a file over the original FLUX layouts maps to diffusers' modules (without
    one: FLUX.1 for sd-scripts' names or FLUX.1 metadata, else FLUX.2)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from core.errors import ModelError

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"LoRA file {path} does not exist.")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise ModelError(f"{path}: LoRA files are read only in the .safetensors format (pickle files can run code).")
    if family is not None:
        from stages.families import lora_family_conflict

        conflict = lora_family_conflict(path, family)
        if conflict:
            raise ModelError(f"{conflict}: a LoRA only fits the model family it was trained on. Use a {family} LoRA.")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        raise ModelError(f"{path} is not a readable .safetensors file ({str(e)[:200]}).") from None
    fmt = next((f for f, (down, _) in _SUFFIXES.items() if any(k.endswith(down) for k in tensors)), None)
    lyco = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((".hada_w1_a", ".lokr_w1", ".lokr_w1_a"))}
    if fmt is None and lyco:
        fmt = "kohya" if any(k.startswith(("lora_unet_", "lora_te")) for k in tensors) else "peft"
    if fmt is None:
        raise ModelError(
            f"{path} holds no LoRA weights this tool reads (looked for *.lora_down/lora_up, *.lora.down/up and "
            f"*.lora_A/lora_B tensors, and LyCORIS' LoHa/LoKr *.hada_w1_a / *.lokr_w1 ones). Is it a full model or "
            f"another adapter type?"
        )
    down_sfx, up_sfx = _SUFFIXES[fmt]
    orphans = [k for k in tensors if k.endswith(up_sfx) and k[: -len(up_sfx)] + down_sfx not in tensors]
    if orphans:
        raise ModelError(f"{path}: {orphans[0]} has no matching {down_sfx.lstrip('.')} tensor; the file is incomplete.")
    alphas = _metadata_alphas(path, metadata)
    if fmt == "kohya":
        groups = {kohya_prefix: component, **KOHYA_TEXT_PREFIXES}
    else:
        groups = {f"{c}.": c for c in (component, *TEXT_COMPONENTS)}
        if component == "transformer":
            groups[COMFY_PREFIX] = component  # the ComfyUI/ai-toolkit single-file naming
    bases = {k[: -len(down_sfx)] for k in tensors if k.endswith(down_sfx)} | lyco
    parsed: dict[str, dict[str, LoraModule]] = {}
    other = []
    for base in sorted(bases):
        prefix = next((p for p in groups if base.startswith(p)), None)
        if prefix is None:
            other.append(base)
            continue
        comp, name = groups[prefix], base[len(prefix) :]
        if base in lyco:
            from stages.training.networks import lyco_module

            parsed.setdefault(comp, {})[name] = lyco_module(path, base, tensors)
            continue
        config_alpha, rank_alpha = alphas.get(comp, (None, {}))
        default_alpha = rank_alpha.get(name, config_alpha)
        parsed.setdefault(comp, {})[name] = _module(path, base, tensors, down_sfx, up_sfx, default_alpha)
    if other and parsed.get(component):
        raise ModelError(
            f"{path}: {len(other)} LoRA modules are for no part of a {component} model this tool knows "
            f"(e.g. {other[0]}); leaving them out would change what the file does. Is it a LoRA for another family?"
        )
    if not parsed.get(component):
        raise ModelError(
            f"{path}: no LoRA weights for the {component} (expected keys starting with "
            f"{kohya_prefix if fmt == 'kohya' else component + '.'!r}; found e.g. {(other or sorted(tensors))[:1]}). "
            f"Is it a LoRA for another model family?"
        )
    modules = parsed.pop(component)
    if fmt == "peft" and any(k.startswith(COMFY_PREFIX) for k in tensors):
        fmt = "comfy"
    if component == "transformer":
        from stages.families.fused import original_layout_modules  # FLUX files over the original (BFL) modules

        modules = original_layout_modules(modules, fmt, family, metadata)
    return LoraFile(path, fmt, modules, metadata, parsed)


def _module(path: Path, base: str, tensors: dict, down_sfx: str, up_sfx: str, default_alpha) -> LoraModule:
    """One module's factors and alpha, checked: floating point, 2-D or 4-D, ranks that agree, finite values."""
    import torch

    from core.errors import ModelError

    down, up = tensors[base + down_sfx], tensors.get(base + up_sfx)
    if up is None:
        raise ModelError(f"{path}: {base + down_sfx} has no matching {base + up_sfx}; the file is incomplete.")

    def bad(what: str) -> ModelError:
        return ModelError(
            f"{path}: the LoRA module {base} {what}. The file is damaged or not a LoRA this tool "
            f"understands; re-export it, or leave it out."
        )

    for t, which in ((down, "down"), (up, "up")):
        if not t.is_floating_point():
            raise bad(f"has a {which} factor of dtype {t.dtype}, not floating point")
        if t.ndim not in (2, 4):
            raise bad(f"has a {t.ndim}-D {which} factor {tuple(t.shape)} (a LoRA factor is 2-D, or 4-D for a conv)")
    if (
        down.ndim != up.ndim
        or down.shape[0] != up.shape[1]
        or down.shape[0] == 0
        or (up.ndim == 4 and up.shape[2:] != (1, 1))
    ):
        raise bad(
            f"has factors that do not fit together: down {tuple(down.shape)}, up {tuple(up.shape)} "
            f"(down is (rank, in…), up is (out, rank…) with the same rank)"
        )
    alpha_t = tensors.get(base + ".alpha")
    if alpha_t is not None:
        if alpha_t.numel() != 1 or not (alpha_t.is_floating_point() or alpha_t.dtype in (torch.int32, torch.int64)):
            raise bad(f"has an alpha of shape {tuple(alpha_t.shape)} and dtype {alpha_t.dtype}, not one number")
        alpha = float(alpha_t.reshape(()))
    else:
        alpha = float(default_alpha) if default_alpha is not None else float(down.shape[0])
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()) or alpha != alpha or abs(alpha) == float("inf"):
        raise bad("holds NaN or infinite values")
    peft_key = next(
        (base + s for s in (".lora_magnitude_vector", ".lora_magnitude_vector.weight") if base + s in tensors), None
    )
    scale = tensors.get(peft_key or base + ".dora_scale")
    if scale is not None:
        if not scale.is_floating_point() or not torch.isfinite(scale).all():
            raise bad("has a DoRA magnitude (dora_scale) that is not finite floating point")
        # peft's magnitude is per output channel ((out,), or (1, out, 1, 1) on a conv); LyCORIS' dora_scale is per
        # output channel when its first dimension is the output's ((out, 1[, 1, 1])), else per input (1, in[, 1, 1])
        wanted = up.shape[0] if peft_key else None
        if scale.numel() not in (up.shape[0], down.shape[1]) or (wanted and scale.numel() != wanted):
            raise bad(
                f"has a DoRA magnitude of shape {tuple(scale.shape)}, which fits neither its {up.shape[0]} outputs "
                f"nor its {down.shape[1]} inputs"
            )
        if peft_key or scale.ndim == 1:
            scale = scale.reshape(up.shape[0], *[1] * (down.ndim - 1))
        scale = scale.float()
    return LoraModule(down.float(), up.float(), alpha, scale)


def _metadata_alphas(path: Path, metadata: dict[str, str]) -> dict[str, tuple[float | None, dict[str, float]]]:
    """component -> (lora_alpha, alpha_pattern) from the adapter config that diffusers writes into the metadata."""
    import math

    from core.errors import ModelError

    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
        out = {}
        for comp in {k.split(".", 1)[0] for k in cfg if "." in k}:
            alpha = cfg.get(f"{comp}.lora_alpha")
            pattern = cfg.get(f"{comp}.alpha_pattern") or {}
            if not isinstance(pattern, dict):
                raise ValueError(f"{comp}.alpha_pattern is not a table")
            values = {k: float(v) for k, v in pattern.items()}
            value = float(alpha) if alpha is not None else None
            if not all(math.isfinite(v) for v in [*values.values(), *([value] if value is not None else [])]):
                raise ValueError("non-finite alpha")
            out[comp] = (value, values)
        return out
    except (ValueError, TypeError) as e:
        raise ModelError(
            f"{path}: its metadata `lora_adapter_metadata` is not a valid adapter config ({e}); the alphas cannot "
            f"be read. Re-export the file, or remove that metadata entry to use alpha = rank."
        ) from None


def match_modules(lora: LoraFile, denoiser, kohya_prefix: str = "lora_unet_") -> dict[str, LoraModule]:
    """Map the file's modules onto the model's module names and check every shape; ModelError if one does not fit."""
    import torch

    from core.errors import ModelError

    layers = {  # a layer that already carries an adapter is found through its peft wrapper's base_layer
        n.removesuffix(".base_layer"): m
        for n, m in denoiser.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
    if lora.format == "kohya":
        by_flat = {n.replace(".", "_"): n for n in layers}
        from stages.families.sdxl import is_sdxl_unet, kohya_renames

        if is_sdxl_unet(denoiser):  # sd-scripts' SDXL files name the SGM UNet's blocks (input_blocks_4_1_...)
            by_flat |= {sgm: by_flat[flat] for flat, sgm in kohya_renames(denoiser).items()}
        # (a file over FLUX.1's original modules was read into diffusers' dotted names: read_lora_file)
        names = {k: k if k in layers else by_flat.get(k) for k in lora.modules}
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
        if isinstance(mod, LycoModule):
            try:
                fits = mod.out_features() == w.shape[0] and mod.delta(w.shape) is not None
            except RuntimeError:
                fits = False
            if not fits:
                shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(mod.factors.items()))
                raise ModelError(
                    f"{lora.path}: the {mod.kind.upper()} for {name} has factors {shapes}, which do not make the "
                    f"model's layer weight {tuple(w.shape)}. It was trained for another architecture."
                )
            out[name] = mod
            continue
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

    from core.errors import ConfigError as _ConfigError

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
        _add_adapter(denoiser, config, adapter_name)
    load_lora_into(denoiser, modules, adapter_name)
