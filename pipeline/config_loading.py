"""Reading a `pipeline.toml`: TOML, `--set` overrides, validation against the schema (pipeline/config.py), and
messages for what is wrong: every problem at once, the key that was meant for a typo or a kohya name, and why a
setting does not exist where it was written.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel, ValidationError

from core.errors import ConfigError
from pipeline.config import NoiseSettings, PipelineConfig


class LoadedConfig:
    """A validated config plus the folder its relative paths are resolved against."""

    def __init__(self, config: PipelineConfig, path: Path):
        self.config = config
        self.path = path
        self.base_dir = path.parent

    def resolve(self, p: Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def store_dir(self) -> Path:
        return self.resolve(self.config.runtime.store)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`lora1.lr=5e-5` -> (["lora1", "lr"], 5e-05). Values are TOML; a bare word is a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set lora1.lr=5e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"--set {text!r}: {key!r} is not a dotted key like lora1.lr")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as --set model.path=/models/sd15
    return key.split("."), value


def apply_override(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


# Names people bring from kohya sd-scripts, diffusers' scripts and OneTrainer, for "did you mean" hints only:
# an alias is never accepted silently.
ALIASES = {
    "learning_rate": "lr",
    "unet_lr": "lr",
    "network_dim": "rank",
    "network_alpha": "alpha",
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "network_dropout": "dropout",
    "max_train_steps": "steps",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "optimizer_type": "optimizer",
    "lr_warmup_steps": "warmup_steps",
    "max_grad_norm": "max_grad_norm",
    "train_data_dir": "images",
    "caption_extension": "caption_extensions",
    "pretrained_model_name_or_path": "path",
    "output_dir": "output_dir",
    "resolution": "resolution",
    "transfer_guidance": "guidance",
    "lora_base_model": "teacher_lora",
    "loss_type": "loss",
    "debiased_estimation_loss": "debiased_estimation",
    "lr_warmup": "warmup_steps",
    "lr_decay_steps": "decay_steps",
    "fused_backward_pass": "fused_backward",
    "fused_optimizer_groups": "optimizer_groups",
    "loraplus_unet_lr_ratio": "loraplus_lr_ratio",
}


# The same names written at the top of a file, as a kohya / OneTrainer / diffusers config has them (no sections),
# and kohya's section names: where each lives here, or why it has no place yet. Hints only, as ALIASES.
TOP_LEVEL = {
    "learning_rate": "lora1.lr", "unet_lr": "lora1.lr", "lr": "lora1.lr", "text_encoder_lr": "lora1.text_encoder_lr",
    "network_dim": "lora1.rank", "network_alpha": "lora1.alpha", "lora_rank": "lora1.rank",
    "lora_alpha": "lora1.alpha", "rank": "lora1.rank", "alpha": "lora1.alpha", "network_dropout": "lora1.dropout",
    "network_module": "lora1.network", "max_train_steps": "lora1.steps", "steps": "lora1.steps",
    "train_batch_size": "lora1.batch_size", "batch_size": "lora1.batch_size",
    "gradient_accumulation_steps": "lora1.grad_accum", "optimizer_type": "lora1.optimizer",
    "optimizer": "lora1.optimizer", "lr_scheduler": "lora1.lr_scheduler", "lr_warmup_steps": "lora1.warmup_steps",
    "max_grad_norm": "lora1.max_grad_norm", "mixed_precision": "lora1.mixed_precision", "seed": "lora1.seed",
    "noise_offset": "lora1.noise_offset", "min_snr_gamma": "lora1.min_snr_gamma",
    "train_data_dir": "data.images", "caption_extension": "data.caption_extensions",
    "shuffle_caption": "data.shuffle_caption", "keep_tokens": "data.keep_tokens",
    "caption_dropout_rate": "data.caption_dropout_rate", "resolution": "latents.resolution",
    "enable_bucket": "latents.buckets", "pretrained_model_name_or_path": "model.path",
    "base_model_name": "model.path", "output_dir": "runtime.output_dir",
    "gradient_checkpointing": "runtime.gradient_checkpointing", "save_every_n_steps": "lora1.save_every_steps",
    "max_train_epochs": "lora1.epochs", "epochs": "lora1.epochs", "num_epochs": "lora1.epochs",
    "save_every_n_epochs": None, "output_name": "lora1.output_name", "save_precision": "lora1.save_precision",
    "save_model_as": None, "sample_prompts": "runtime.preview.prompts",
    "sample_every_n_steps": "runtime.preview.every", "xformers": "runtime.attention", "sdpa": "runtime.attention",
    "mem_eff_attn": "runtime.attention",
    # kohya's config-file sections and a few generic ones
    "model_arguments": "model", "dataset_arguments": "data", "training_arguments": "lora1",
    "optimizer_arguments": "lora1", "additional_network_arguments": "lora1", "saving_arguments": "runtime",
    "sample_prompt_arguments": "runtime.preview", "train": "lora1", "training": "lora1", "network": "lora1",
    "dataset": "data", "datasets": "data", "general": "data",
}  # fmt: skip
NOT_YET = (
    "not supported: LoRA files are kept every N optimizer steps (lora1.save_every_steps; lora1.epochs sets the "
    "length in epochs) and always saved as .safetensors, in kohya's and the diffusers format"
)


def _foreign(loc: tuple) -> str | None:
    """The hint for a key or section written the way another trainer writes it, at the top of the file."""
    if len(loc) != 1 or loc[0] not in TOP_LEVEL:
        return None
    target = TOP_LEVEL[loc[0]]
    if target is None:
        return NOT_YET
    if ("." not in target and target in PipelineConfig.model_fields) or target == "runtime.preview":
        return (
            f"`[{loc[0]}]` is another trainer's section; its settings go under `[{target}]` here (for a kohya "
            f"config, `pipeline import kohya FILE` translates it)"
        )
    return f"did you mean `{target}`? (settings live in sections here: `[{target.rsplit('.', 1)[0]}]`)"


def _closest(model: type[BaseModel], loc: tuple) -> str | None:
    """The closest valid dotted key to an unknown one, walking the schema along loc."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an entry of a list of tables ([[data.subsets]]): cls is already its schema
            continue
        field = cls.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        cls = annotation
    names = list(cls.model_fields)
    aliases = {a: t for a, t in ALIASES.items() if t in names}
    match = difflib.get_close_matches(str(loc[-1]), names + list(aliases), n=1, cutoff=0.6)
    if not match:
        return None
    return _dotted((*loc[:-1], aliases.get(match[0], match[0])))


def _dotted(loc: tuple) -> str:
    """A schema location as the user writes it: data.subsets[1].keep_tokens (list entries counted from 1)."""
    out = ""
    for part in loc:
        out += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


TEXT_ENCODER_FIELDS = ("train_text_encoder", "text_encoder_lr", "loraplus_text_encoder_lr_ratio")


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = _dotted(loc)
        if e["type"] == "extra_forbidden":
            if loc[0] == "student" and len(loc) == 2 and loc[1] in TEXT_ENCODER_FIELDS:
                lines.append(
                    f"`{dotted}` in {source}: the student of `transfer` learns the teacher's deltas, which the "
                    f"teacher computed from the cached text embeddings; a student text-encoder LoRA would learn "
                    f"against other conditioning than its targets. Remove it (the student trains its denoiser only)."
                )
                continue
            if loc[0] == "student" and len(loc) == 2 and loc[1] in NoiseSettings.model_fields:
                lines.append(
                    f"`{dotted}` in {source}: the student of `transfer` trains on the noise the schedule materialized, "
                    f"so that both phases see the same x_t; set `schedule.{loc[1]}` instead (it re-runs the teacher)."
                )
                continue
            foreign, hint = _foreign(loc), _closest(PipelineConfig, loc)
            fix = foreign or (
                f"did you mean `{hint}`?" if hint else "see `pipeline init` or docs/config.md for the valid keys"
            )
            lines.append(f"unknown key `{dotted}` in {source}: {fix}")
        else:
            got = e.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"`{dotted}` in {source}: {e['msg']}{got_text}")
    return "\n".join(lines)


def _toml_hint(message: str) -> str:
    """What a TOML error of a key set twice means here: most often a `pipeline init` line `key = [...]` beside
    [[section.key]] tables of the same list."""
    import re

    found = re.search(r"(?:immutable namespace|Cannot declare|Cannot overwrite a value) \(([^)]*)\)", message)
    if not found:
        return ""
    key = ".".join(part.strip().strip("'\"") for part in found.group(1).split(",") if part.strip())
    return (
        f". `{key}` is set twice, as `{key.rsplit('.', 1)[-1]} = ...` and as [[{key}]] tables (or two [{key}] "
        f"sections): keep one of them, e.g. delete the `{key.rsplit('.', 1)[-1]} = []` line."
    )


def load_config(path: Path, overrides: list[str] = ()) -> LoadedConfig:
    """Read, override and validate a config file. Raises ConfigError with every problem found."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"no config file at {path}: write one with `pipeline init`, or pass --config PATH")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}{_toml_hint(str(e))}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file") from None
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(raw, parts, value)
    source = path.name if not overrides else f"{path.name} (with --set)"
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    return LoadedConfig(config, path)
