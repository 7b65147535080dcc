"""`pipeline import kohya dataset.toml`: a kohya sd-scripts dataset config as our pipeline.toml settings.

kohya reads each option from the subset, then its dataset, then `[general]` (the first that sets it). Ours are
one data set: per-subset folders, repeats and caption text go to `[[data.subsets]]`; the caption tricks and
alpha_mask go to `[data]` when every subset has the same, else to each subset; everything else must be the same for
every subset (it is one setting here) and goes to `[data]`, `[latents]` or `[lora1]`. Every key of the file is
reported: where it went, or why it did not.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

from core.errors import ConfigError

# kohya option -> (our section, our key); a value of this kind is the same for every subset here
SHARED = {
    "resolution": ("latents", "resolution"),
    "batch_size": ("lora1", "batch_size"),
    "enable_bucket": ("latents", "buckets"),
    "min_bucket_reso": ("latents", "min_bucket_reso"),
    "max_bucket_reso": ("latents", "max_bucket_reso"),
    "bucket_reso_steps": ("latents", "bucket_reso_steps"),
    "bucket_no_upscale": ("latents", "bucket_no_upscale"),
    "caption_extension": ("data", "caption_extensions"),
    "shuffle_caption": ("data", "shuffle_caption"),
    "keep_tokens": ("data", "keep_tokens"),
    "keep_tokens_separator": ("data", "keep_tokens_separator"),
    "caption_separator": ("data", "caption_separator"),
    "secondary_separator": ("data", "secondary_separator"),
    "enable_wildcard": ("data", "enable_wildcard"),
    "caption_dropout_rate": ("data", "caption_dropout_rate"),
    "caption_dropout_every_n_epochs": ("data", "caption_dropout_every_n_epochs"),
    "caption_tag_dropout_rate": ("data", "caption_tag_dropout_rate"),
    "token_warmup_min": ("data", "token_warmup_min"),
    "token_warmup_step": ("data", "token_warmup_step"),
    "flip_aug": ("latents", "flip_aug"),
    "random_crop": ("latents", "crop"),
    "alpha_mask": ("data", "alpha_mask"),
}
# kohya's value of a SHARED option a subset leaves unset (its dataset classes' defaults)
KOHYA_DEFAULTS = {
    "batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
    "bucket_no_upscale": False, "caption_extension": ".caption", "shuffle_caption": False, "keep_tokens": 0,
    "keep_tokens_separator": "", "caption_separator": ",", "secondary_separator": None, "enable_wildcard": False,
    "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0,
    "token_warmup_min": 1, "token_warmup_step": 0, "flip_aug": False, "random_crop": False, "alpha_mask": False,
}  # fmt: skip
# SHARED options that a [[data.subsets]] entry may also set for itself: where kohya's subsets differ, each gets its own
SUBSET_MAY_SET = {
    "shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_separator", "secondary_separator",
    "enable_wildcard", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
    "token_warmup_min", "token_warmup_step", "alpha_mask",
}  # fmt: skip
# kohya option -> our [[data.subsets]] key
PER_SUBSET = {
    "image_dir": "images",
    "num_repeats": "num_repeats",
    "class_tokens": "default_caption",
    "caption_prefix": "caption_prefix",
    "caption_suffix": "caption_suffix",
    "name": "name",
    "is_reg": "is_reg",
}
NOT_YET = {
    "color_aug": "colour augmentation changes pixels on every load, which cached latents cannot hold",
    "face_crop_aug_range": "face crops are not supported",
    "metadata_file": "fine-tuning metadata (JSON captions) is not read; use sidecar caption files",
    "conditioning_data_dir": "ControlNet data sets are not supported",
    "cache_info": "our latents and text caches are always on and keyed by content",
    "validation_seed": "validation splits are not supported; see schedule.heldout_images for transfer",
    "validation_split": "validation splits are not supported; see schedule.heldout_images for transfer",
    "debug_dataset": "a kohya debugging switch",
    "resize_interpolation": "images are resized bicubic",
}


def import_kohya(path: Path) -> dict:
    """-> {"settings": {section: {key: value}, "data.subsets": [...]}, "mapped": [...], "unmapped": [...]}: each
    mapped entry names the kohya key (with where it sat) and ours, each unmapped one its reason."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file. Give the dataset config you pass kohya as --dataset_config."
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a TOML file ({e}).") from None
    general = doc.get("general", {})
    datasets = doc.get("datasets", [])
    if not datasets or not any(d.get("subsets") for d in datasets):
        raise ConfigError(f"{path}: no [[datasets.subsets]] entry, so there are no images to import.")
    mapped, unmapped = [], []
    for key in doc:
        if key not in ("general", "datasets"):
            unmapped.append({"kohya": key, "why": "not a section of kohya's dataset config"})
    shared: dict[str, dict] = {}  # our "section.key" -> {value: [where...]}
    own: dict[str, dict] = {}  # our "section.key" -> {subset number: (value, where)}, for SUBSET_MAY_SET options
    subsets, seen = [], []  # seen: per imported subset, (where, the SHARED options it sets)
    for d_i, dataset in enumerate(datasets, 1):
        for s_i, subset in enumerate(dataset.get("subsets", []), 1):
            where = f"datasets[{d_i}].subsets[{s_i}]"
            merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}, **subset}
            source = {k: "general" for k in general} | {k: f"datasets[{d_i}]" for k in dataset if k != "subsets"}
            source |= {k: where for k in subset}
            if "image_dir" not in merged:
                unmapped.append({"kohya": where, "why": "no image_dir (a fine-tuning subset): left out"})
                continue
            ours = {}
            seen.append((where, {k for k in merged if k in SHARED}))
            for key, value in merged.items():
                at = f"{source[key]}.{key}"
                if key in PER_SUBSET:
                    ours[PER_SUBSET[key]] = str(value) if key == "image_dir" else value
                    mapped.append({"kohya": at, "ours": f"data.subsets[{len(subsets) + 1}].{PER_SUBSET[key]}"})
                elif key in SHARED:
                    section, name = SHARED[key]
                    ours_value = _convert(key, value, at)
                    shared.setdefault(f"{section}.{name}", {}).setdefault(ours_value, []).append(at)
                    if key in SUBSET_MAY_SET:
                        own.setdefault(f"{section}.{name}", {})[len(subsets)] = (ours_value, at)
                else:
                    why = NOT_YET.get(key, "not a kohya dataset option we know; check its spelling")
                    unmapped.append({"kohya": at, "why": why})
            subsets.append(ours)
    for key in {k for _, keys in seen for k in keys}:  # set by some subsets: the others have kohya's default
        for where, keys in seen:
            if key not in keys and KOHYA_DEFAULTS.get(key) is not None:
                at = f"{where}.{key} (unset: kohya's default)"
                shared[".".join(SHARED[key])].setdefault(_convert(key, KOHYA_DEFAULTS[key], at), []).append(at)
    settings: dict[str, dict] = {}
    for dotted, values in shared.items():
        section, name = dotted.split(".")
        sources = sorted({w for ws in values.values() for w in ws})
        if len(values) > 1 and dotted in own:  # each subset its own (an unset one keeps data's: kohya's default)
            for n, (value, at) in sorted(own[dotted].items()):
                subsets[n][name] = value
                mapped.append({"kohya": at, "ours": f"data.subsets[{n + 1}].{name}"})
            continue
        if len(values) > 1:
            listed = "; ".join(f"{_show(v)} at {', '.join(ws)}" for v, ws in values.items())
            unmapped.append(
                {"kohya": ", ".join(sources), "why": f"one setting here ({dotted}) but the subsets differ: {listed}"}
            )
            continue
        value = next(iter(values))
        settings.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
        mapped += [{"kohya": w, "ours": dotted} for w in sources if "kohya's default" not in w]
    if not subsets:
        raise ConfigError(f"{path}: every subset was left out: " + "; ".join(u["why"] for u in unmapped))
    names = [s.get("name") or Path(s["images"]).name for s in subsets]
    for n, subset in enumerate(subsets):  # two folders of one name (a/img, b/img) need names of their own
        if names.count(names[n]) > 1 and "name" not in subset:
            subset["name"] = f"{names[n]}-{n + 1}"
    settings["data.subsets"] = subsets
    return {"settings": settings, "mapped": _unique(mapped), "unmapped": _unique(unmapped)}


def _convert(key: str, value, at: str):
    """A kohya value as ours (hashable, for comparing subsets)."""
    if key == "resolution":
        if isinstance(value, list):
            if len(value) != 2 or value[0] != value[1]:
                raise ConfigError(
                    f"{at} = {value}: a non-square resolution. Ours is a square's side (the buckets' area is its "
                    f"square); use one number, e.g. the larger side, and latents.buckets."
                )
            value = value[0]
        return int(value)
    if key == "enable_bucket":
        return "auto" if value else "off"
    if key == "random_crop":
        return "random" if value else "center"
    if key == "caption_extension":
        return (value if str(value).startswith(".") else f".{value}",)
    return value


def _show(value) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _unique(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        key = tuple(sorted(r.items()))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def settings_toml(report: dict, source: Path) -> str:
    """The imported settings as pipeline.toml text (sections, then a [[data.subsets]] table per subset), headed by
    comments naming every kohya key and where it went or why not; checked against our schema."""
    import tomllib
    from pydantic import ValidationError

    from pipeline.config import PipelineConfig
    from pipeline.schema_docs import toml_value

    settings = report["settings"]
    lines = [f"# imported from {source} by `pipeline import kohya`; set [model] path, then `pipeline run lora`"]
    lines += [f"#   {m['kohya']} -> {m['ours']}" for m in report["mapped"]]
    lines += [f"#   {u['kohya']}: not imported: {u['why']}" for u in report["unmapped"]]
    lines.append("")
    for section, values in settings.items():
        if section == "data.subsets":
            continue
        lines += [f"[{section}]", *(f"{k} = {toml_value(v)}" for k, v in values.items()), ""]
    for subset in settings["data.subsets"]:
        lines += ["[[data.subsets]]", *(f"{k} = {toml_value(v)}" for k, v in subset.items()), ""]
    text = "\n".join(lines)
    try:
        PipelineConfig.model_validate(tomllib.loads(text))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: the imported {where} is not valid here: {first['msg']}.") from None
    return text
