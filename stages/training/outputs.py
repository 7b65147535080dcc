"""What a training stage writes: its LoRA in the single-file format (kohya or ComfyUI naming) and the diffusers
format, with a trained text encoder's LoRA beside the denoiser's, and the per-step loss log."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from stages.training.lora_files import (
    file_alpha,
    lora_state_dict,
    network_metadata,
    save_diffusers,
    save_kohya,
    save_single_file_lora,
    text_encoder_names,
    to_kohya,
)


@dataclass
class FilePart:
    """One trained component as its files hold it: peft-named state (and EMA state), rank, alpha, adapter config."""

    state: dict
    ema_state: dict | None
    rank: int
    alpha: float
    adapter_config: object


def file_part(state: dict, ema_state, adapter_config, init_state, p) -> FilePart:
    """A trained adapter as it is written: rsLoRA's alpha as alpha*sqrt(r) (what every loader applies), PiSSA/OLoRA
    as the plain LoRA of rank 2r it amounts to on the original weights (networks.pissa_to_lora)."""
    from stages.training.networks import pissa_to_lora

    rslora = getattr(p, "rslora", False)
    rank, alpha = p.rank, file_alpha(p.rank, p.alpha, rslora)
    if rslora:  # the same scale as a plain LoRA with alpha*sqrt(r)
        adapter_config = dataclasses.replace(adapter_config, lora_alpha=alpha, use_rslora=False)
    if init_state is not None:
        scale, rank = alpha / p.rank, 2 * p.rank
        alpha = float(rank)
        state = pissa_to_lora(state, init_state, scale)
        ema_state = pissa_to_lora(ema_state, init_state, scale) if ema_state is not None else None
        adapter_config = dataclasses.replace(adapter_config, r=rank, lora_alpha=alpha, init_lora_weights=True)
    return FilePart(state, ema_state, rank, alpha, adapter_config)


OPTIMIZER_CLASSES = {  # how kohya's ss_optimizer names each optimizer: the class's module path
    "adamw": "torch.optim.adamw.AdamW",
    "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "prodigy": "prodigyopt.prodigy.Prodigy",
    "adafactor": "transformers.optimization.Adafactor",
    "lion": "lion_pytorch.lion_pytorch.Lion",
}


def training_metadata(p, resolution: int, model_name: str, items: list[dict] | None = None, data_name: str = "images"):
    """The training settings in the `ss_*` fields kohya's sd-scripts write and A1111/Forge, ComfyUI-Manager and civitai
    show: lr, steps, optimizer, lr schedule, resolution, batch, seed, precision, and with the caption table (items:
    the caption stage's, with subset/repeats/reg) the dataset size, its folders and the tag frequencies (tags: the
    caption split at commas, per folder). Nothing that varies between runs of one key (no dates): the file of a
    resumed run is the file of an uninterrupted one."""
    import json

    args = {**(p.optimizer_args or {}), "weight_decay": p.weight_decay}
    optimizer = f"{OPTIMIZER_CLASSES.get(p.optimizer, p.optimizer)}({','.join(f'{k}={v}' for k, v in args.items())})"
    processes = getattr(p, "processes", None) or 1
    meta = {
        "ss_learning_rate": str(p.lr),
        "ss_unet_lr": str(p.lr),
        "ss_max_train_steps": str(p.steps),
        "ss_steps": str(p.steps),
        "ss_optimizer": optimizer,
        "ss_lr_scheduler": str(p.lr_schedule.get("type", "constant")),
        "ss_lr_warmup_steps": str(p.lr_schedule.get("warmup", 0)),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_batch_size_per_device": str(p.batch_size),
        "ss_gradient_accumulation_steps": str(p.grad_accum),
        "ss_total_batch_size": str(p.batch_size * p.grad_accum * processes),
        "ss_seed": str(p.seed),
        "ss_mixed_precision": p.mixed_precision,
        "ss_max_grad_norm": str(p.max_grad_norm),
        "ss_network_dropout": str(p.dropout),
        "ss_noise_offset": str(p.timesteps.get("noise", {}).get("offset", 0.0)),
        "ss_sd_model_name": model_name,
    }
    if items is not None:
        dirs: dict[str, dict] = {}
        tags: dict[str, dict[str, int]] = {}
        for item in items:
            folder = item.get("subset") or data_name
            entry = dirs.setdefault(folder, {"n_repeats": int(item.get("repeats", 1)), "img_count": 0})
            entry["img_count"] += 1
            counts = tags.setdefault(folder, {})
            for tag in (t.strip() for t in item["caption"].split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        train = sum(int(i.get("repeats", 1)) for i in items if not i.get("reg"))
        meta.update(
            ss_num_train_images=str(train),
            ss_num_reg_images=str(sum(1 for i in items if i.get("reg"))),
            ss_dataset_dirs=json.dumps(dirs, sort_keys=True),
            ss_tag_frequency=json.dumps(tags, sort_keys=True, ensure_ascii=False),
        )
    return meta


def file_parts(outcome, p) -> tuple[FilePart, dict[str, FilePart]]:
    """The denoiser's adapter and, with a trained text encoder, each text component's, as the files hold them."""
    o, t = outcome, outcome.text
    unet = file_part(lora_state_dict(o.denoiser), o.ema_state, o.adapter_config, o.init_state, p)
    text: dict[str, FilePart] = {}  # per text encoder component (SDXL: text_encoder, text_encoder_2)
    if t is not None:
        parts = t.encoder.parts

        def split(state):  # one LoRA over the encoders -> each component's, under the names every loader uses
            if state is None:
                return dict.fromkeys(parts)
            return {c: text_encoder_names(s, parts[c]) for c, s in t.encoder.component_states(state).items()}

        states, emas, inits = split(lora_state_dict(t.model)), split(t.ema_state), split(t.init_state)
        text = {c: file_part(states[c], emas[c], t.adapter_config, inits[c], p) for c in parts}
    return unet, text


def file_metadata(outcome, p, name: str, base_metadata: dict[str, str], text: bool) -> dict[str, str]:
    network = getattr(p, "network", "lora")
    metadata = {
        **base_metadata,
        **network_metadata(network),
        "lora_pipeline.network": network,
        "ss_output_name": name,
    }
    if outcome.init_state is not None:
        metadata["lora_pipeline.lora_init"] = p.lora_init
    if text:
        metadata["ss_network_train_unet_only"] = "False"  # kohya's flag; its absence reads as "unknown"
        metadata["ss_text_encoder_lr"] = str(p.text_encoder_lr if p.text_encoder_lr is not None else p.lr)
    return metadata


def save_single_file(family, denoiser, unet: FilePart, text: dict[str, FilePart], path: Path, meta, ema=False):
    """The single-file LoRA (kohya or ComfyUI naming) of the parts: their EMA weights with ema."""
    state = unet.ema_state if ema else unet.state
    if not text:
        save_single_file_lora(family, state, unet.rank, unet.alpha, path, meta, family.kohya_rename(denoiser))
        return
    extra = {}
    for comp, part in text.items():
        prefix = family.kohya_text_prefixes[comp]
        extra.update(to_kohya(part.ema_state if ema else part.state, part.alpha, prefix, part.rank))
    rename = family.kohya_rename(denoiser)
    save_kohya(state, unet.rank, unet.alpha, path, family.kohya_prefix, meta, extra=extra, rename=rename)


def write_snapshot(family, outcome, p, path: Path, name: str, base_metadata: dict[str, str], step: int) -> Path:
    """save_every_steps: the LoRA as it is after `step` optimizer steps, as the single file of the final one (its
    ss_steps says which step)."""
    unet, text = file_parts(outcome, p)
    meta = {**file_metadata(outcome, p, name, base_metadata, bool(text)), "ss_steps": str(step)}
    save_single_file(family, outcome.denoiser, unet, text, path, meta)
    return path


def snapshot_writer(family, p, work_dir: Path, name: str, base_metadata: dict[str, str]):
    """The TrainJob.snapshot of a section with save_every_steps (None without): the LoRA after a step, kept in the
    artifact as steps/<name>-step<N>.safetensors."""
    if not getattr(p, "save_every_steps", None):
        return None

    def write(outcome, step: int) -> tuple[str, Path]:
        filename = f"{name}-step{step:06d}.safetensors"
        return f"steps/{filename}", write_snapshot(family, outcome, p, work_dir / filename, name, base_metadata, step)

    return write


def write_lora_outputs(family, outcome, p, work_dir, name: str, base_metadata: dict[str, str]) -> dict:
    """The trained adapter in the single-file format (kohya or ComfyUI naming) and, for LoRA and DoRA, the
    diffusers format; the loss log, previews and save_every_steps files. base_metadata identifies the trained model
    (family.lora_metadata(layout, prediction_type)) and its training (training_metadata). With a trained text
    encoder (outcome.text), both files carry its LoRA too: kohya's `lora_te_` modules (SDXL: `lora_te1_`,
    `lora_te2_`), diffusers' `text_encoder.` ones (`text_encoder_2.`)."""
    network = getattr(p, "network", "lora")
    o = outcome
    unet, text = file_parts(outcome, p)
    metadata = file_metadata(outcome, p, name, base_metadata, bool(text))

    def single_file(path: Path, ema: bool, meta: dict) -> None:
        save_single_file(family, o.denoiser, unet, text, path, meta, ema)

    kohya = work_dir / f"{name}.safetensors"
    single_file(kohya, False, metadata)
    files = {f"{name}.safetensors": kohya}
    if network in ("lora", "dora"):  # diffusers loads no LoHa/LoKr (docs/training.md, `pipeline lora info`)
        diffusers_file = work_dir / "pytorch_lora_weights.safetensors"
        extra = {comp: (part.state, part.adapter_config) for comp, part in text.items()} or None
        save_diffusers(
            unet.state,
            unet.adapter_config,
            diffusers_file,
            family.pipeline_class,
            family.lora_component,
            extra,
            metadata,
        )
        files["diffusers/pytorch_lora_weights.safetensors"] = diffusers_file
    loss_csv = work_dir / "loss.csv"
    write_loss_csv(loss_csv, outcome)
    files.update({"loss.csv": loss_csv, **outcome.previews})
    if outcome.ema_state is not None:  # the EMA of the weights, in the same single-file format as the raw LoRA
        ema = work_dir / f"{name}-ema.safetensors"
        single_file(ema, True, {**metadata, "lora_pipeline.ema_decay": str(p.ema["decay"])})
        files[f"{name}-ema.safetensors"] = ema
    return files


def write_loss_csv(path: Path, outcome) -> None:
    """Per step: the loss, the gradient norm before clipping (empty when the fused backward pass left none) and the
    learning rate of each parameter group (lr: the first group's; lr:<group> for each when there are several)."""
    import csv

    groups = list(outcome.lrs[0]) if outcome.lrs else []
    header = ["step", "loss", "grad_norm", "lr"] + ([f"lr:{g}" for g in groups] if len(groups) > 1 else [])
    norms = outcome.grad_norms or [None] * len(outcome.losses)
    with open(path, "w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(header)
        for i, loss in enumerate(outcome.losses):
            lrs = outcome.lrs[i] if i < len(outcome.lrs) else {}
            rates = [lrs.get(g) for g in groups]
            norm = norms[i] if i < len(norms) else None
            row = [i + 1, f"{loss:.6g}", "" if norm is None else f"{norm:.6g}", _num(rates[0] if rates else None)]
            out.writerow(row + ([_num(r) for r in rates] if len(groups) > 1 else []))


def _num(value) -> str:
    return "" if value is None else f"{value:.6g}"


def trained_file(outputs: dict) -> dict:
    """The output entry of a training stage's adapter to read back: the diffusers file (exact module names) where
    one was written, else the single file (LoHa, LoKr)."""
    if "diffusers/pytorch_lora_weights.safetensors" in outputs:
        return outputs["diffusers/pytorch_lora_weights.safetensors"]
    singles = [k for k in sorted(outputs) if k.endswith(".safetensors") and "/" not in k and "-ema" not in k]
    return outputs[singles[0]]


# -- exports: the names and precision a section asks for (output_name, save_precision) ----------------------------

SAVE_DTYPES = {"fp32": "float32", "float": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ExportSettings:
    """What a training section's exported LoRA files are called and stored as: output settings, in no key, applied
    when the store's files are copied out (the output folder, `pipeline export`)."""

    stage: str  # the stage's own file name (lora1, student, lora2)
    output_name: str | None = None
    save_precision: str = "fp32"

    @property
    def name(self) -> str:
        return self.output_name or self.stage

    def file_name(self, output: str) -> str:
        """An artifact file's exported name: the stage's LoRA files (and their steps/ copies) take output_name."""
        folder, _, base = output.rpartition("/")
        if self.output_name and folder in ("", "steps") and base.startswith(self.stage):
            rest = base[len(self.stage) :]
            if rest == ".safetensors" or rest.startswith(("-ema.", "-step")):
                base = self.output_name + rest
        return f"{folder}/{base}" if folder else base

    def rewrites(self, output: str) -> bool:
        """Whether the file is rewritten on its way out (not copied byte for byte)."""
        lora = output.endswith(".safetensors") and output.rpartition("/")[0] in ("", "steps", "diffusers")
        return lora and (SAVE_DTYPES[self.save_precision] != "float32" or self.output_name is not None)


def export_settings(config, stage: str, section: str) -> ExportSettings:
    """The ExportSettings of a training stage whose settings are the config section `section` (dotted)."""
    for part in section.split("."):
        config = getattr(config, part)
    return ExportSettings(stage, config.output_name, config.save_precision)


def export_lora_file(source: Path, dest: Path, settings: ExportSettings) -> None:
    """A LoRA file of the store as the section exports it: every floating tensor in save_precision (as kohya's
    save_precision converts every tensor), ss_output_name the section's output_name; the rest as it is."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from stages.training.lora_files import canonicalize_safetensors

    dtype = getattr(torch, SAVE_DTYPES[settings.save_precision])
    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    if "ss_output_name" in metadata or settings.output_name:
        metadata["ss_output_name"] = settings.name
    save_file(tensors, str(dest), metadata=metadata)
    canonicalize_safetensors(dest)
