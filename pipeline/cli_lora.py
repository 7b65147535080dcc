"""`pipeline lora info|convert|mix|merge`: LoRA files on their own (docs/lora-tools.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.cli_common import JsonOpt, user_errors

lora_app = typer.Typer(
    help="Inspect, convert and combine LoRA files (kohya and diffusers formats).", no_args_is_help=True
)
FamilyOpt = typer.Option(
    "auto",
    "--family",
    help="Model family: sd15, sdxl, flux1, zimage, flux2 or qwenimage; auto: from --model, else from the LoRA file.",
)
ModelOpt = typer.Option(None, "--model", help="The model the LoRA was trained for (maps kohya names exactly).")
UnetOnlyOpt = typer.Option(False, "--unet-only", help="Leave out the text-encoder modules (lora_te_*) on purpose.")


def family_for(name: str, model: Path | None = None, files=()):
    from pipeline.api import family

    return family(
        name, model, [Path(str(f).rsplit(":", 1)[0]) if not Path(str(f)).exists() else Path(f) for f in files]
    )


@lora_app.command("info")
@user_errors
def lora_info(
    file: Path = typer.Argument(..., help="A LoRA .safetensors file."), family: str = FamilyOpt, as_json: bool = JsonOpt
):
    """Format, family, rank, alpha, targets and metadata of a LoRA file."""
    from pipeline.lora_tools import info

    report = info(file, family_for(family, None, [file]))
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    names = ("file", "format", "network", "loads_in", "family", "base_model", "modules", "rank", "alpha", "parameters")
    for key in (*names, "bytes"):
        typer.echo(f"{key.replace('_', ' '):11} {report[key]}")
    typer.echo(f"{'targets':11} " + ", ".join(f"{k} ×{v}" for k, v in report["targets"].items()))
    for comp, n in report["text_encoder_modules"].items():
        typer.echo(f"{'text enc.':11} {n} modules for the {comp} (applied by ComfyUI, A1111 and `lora merge`)")
    for k, v in report["metadata"].items():
        typer.echo(f"  {k} = {v}")


@lora_app.command("convert")
@user_errors
def lora_convert(
    file: Path = typer.Argument(..., help="A LoRA .safetensors file."),
    to: str = typer.Option(..., "--to", help="kohya or diffusers."),
    out: Path = typer.Option(..., "--out", help="The file to write."),
    model: Path = ModelOpt,
    family: str = FamilyOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    unet_only: bool = UnetOnlyOpt,
    as_json: bool = JsonOpt,
):
    """Rewrite a LoRA in the kohya format (for ComfyUI, A1111/Forge, kohya, diffusers) or the diffusers format
    (for diffusers only); the weights are copied exactly."""
    from pipeline.lora_tools import check_format, check_out, convert

    check_format(to)
    check_out(out, force)
    report = convert(file, to, out, family_for(family, model, [file]), model, unet_only)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    typer.echo(
        f"wrote {out} ({report['to_format']} format, {report['modules']} modules): loads in {report['loads_in']}"
    )


@lora_app.command("mix")
@user_errors
def lora_mix(
    files: list[str] = typer.Argument(..., help="FILE:WEIGHT ... (weight 1 when left out)."),
    out: Path = typer.Option(..., "--out", help="The file to write."),
    to: str = typer.Option("kohya", "--to", help="Output format: kohya or diffusers."),
    rank: int = typer.Option(None, "--rank", min=1, help="Compress the mix to this rank by SVD (reports the error)."),
    model: Path = ModelOpt,
    family: str = FamilyOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    unet_only: bool = UnetOnlyOpt,
    as_json: bool = JsonOpt,
):
    """The exact weighted sum of LoRAs in ΔW space (ranks concatenated), optionally compressed by SVD."""
    from pipeline.lora_tools import check_format, check_out, mix

    check_format(to)
    check_out(out, force)
    report = mix(files, out, to, family_for(family, model, files), model, rank, unet_only)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    err = f", max relative Frobenius error {report['max_rel_error']:.3g}" if rank else " (exact)"
    text = "".join(f", {n} {c} modules" for c, n in report["text_encoder_modules"].items())
    typer.echo(f"wrote {out}: rank {report['rank']}{err}{text}; loads in {report['loads_in']}")


@lora_app.command("merge")
@user_errors
def lora_merge(
    files: list[str] = typer.Argument(..., help="FILE:WEIGHT ... (weight 1 when left out)."),
    model: Path = typer.Option(..., "--model", help="The model: a diffusers folder or a single .safetensors file."),
    out: Path = typer.Option(..., "--out", help="A new diffusers folder, or a .safetensors file for a single file."),
    single_file_config: Path = typer.Option(None, "--single-file-config", help="Configs for a single-file model."),
    family: str = FamilyOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    as_json: bool = JsonOpt,
):
    """Bake LoRAs into a copy of a model (W += w·ΔW in fp32)."""
    from pipeline.lora_tools import merge

    report = merge(model, files, out, family_for(family, model, files), single_file_config, force)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    text = report["text_encoder_modules_changed"]
    typer.echo(
        f"wrote {out} ({report['modules_changed']} {report.get('denoiser', 'UNet')} layers"
        + (f", {text} text-encoder layers" * bool(text))
        + " changed)"
    )
