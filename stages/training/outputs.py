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


def write_lora_outputs(family, outcome, p, work_dir, name: str, base_metadata: dict[str, str]) -> dict:
    """The trained adapter in the single-file format (kohya or ComfyUI naming) and, for LoRA and DoRA, the
    diffusers format; the loss log and previews. base_metadata identifies the trained model
    (family.lora_metadata(layout, prediction_type)). With a trained text encoder (outcome.text), both files carry
    its LoRA too: kohya's `lora_te_` modules (SDXL: `lora_te1_`, `lora_te2_`), diffusers' `text_encoder.` ones
    (`text_encoder_2.`)."""
    network = getattr(p, "network", "lora")
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
    metadata = {**base_metadata, **network_metadata(network), "lora_pipeline.network": network}
    if outcome.init_state is not None:
        metadata["lora_pipeline.lora_init"] = p.lora_init
    if text:
        metadata["ss_network_train_unet_only"] = "False"  # kohya's flag; its absence reads as "unknown"
        metadata["ss_text_encoder_lr"] = str(p.text_encoder_lr if p.text_encoder_lr is not None else p.lr)

    def single_file(path: Path, ema: bool, meta: dict) -> None:
        state = unet.ema_state if ema else unet.state
        if not text:
            save_single_file_lora(family, state, unet.rank, unet.alpha, path, meta, family.kohya_rename(o.denoiser))
            return
        extra = {}
        for comp, part in text.items():
            prefix = family.kohya_text_prefixes[comp]
            extra.update(to_kohya(part.ema_state if ema else part.state, part.alpha, prefix, part.rank))
        rename = family.kohya_rename(o.denoiser)
        save_kohya(state, unet.rank, unet.alpha, path, family.kohya_prefix, meta, extra=extra, rename=rename)

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
