"""Training checkpoints: the resume state of a training stage (its LoRA, optimizer, schedule, EMA, previews and
per-step figures, plus each process's piece of DeepSpeed's optimizer state), written to a temp folder and renamed
into place so a kill leaves the last one intact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from core import dist
from stages.training.lora_files import trainable_state


def _checkpoints(work_dir: Path) -> list[Path]:
    return sorted(p for p in work_dir.glob("ckpt-*") if p.is_dir())


def save_checkpoint(
    work_dir: Path,
    step: int,
    denoiser,
    optimizer,
    scheduler,
    losses: list[float],
    evals: list[dict] = (),
    previews: dict[str, Path] | None = None,
    ema=None,
    history: dict | None = None,
    engine=None,
    zero=None,
) -> None:
    """Write the resume state to a temp folder and rename it into place: a kill leaves the old one intact.
    history: per-step figures to carry over a resume (lrs, grad_norms). engine: DeepSpeed's, whose processes all
    call this and write their pieces of the optimizer state into the folder; rank 0 writes the rest."""
    import torch
    from safetensors.torch import save_file

    from stages.training import zero as deepspeed_zero

    final = work_dir / f"ckpt-{step:07d}"
    tmp = work_dir / f".tmp-ckpt-{step:07d}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    extra = {}
    if engine is not None:
        dist.barrier()  # the folder exists
        deepspeed_zero.save_state(engine, tmp)
        dist.barrier()  # every piece is written
        if not dist.is_main():
            return
        extra = {"zero": deepspeed_zero.checkpoint_record(zero)}
    save_file({k: v.contiguous() for k, v in trainable_state(denoiser).items()}, str(tmp / "lora.safetensors"))
    state = {"scheduler": scheduler.state_dict()}
    if engine is None:
        state["optimizer"] = optimizer.state_dict()
    if ema is not None:
        state["ema"] = ema.state_dict()
    torch.save(state, tmp / "state.pt")
    (tmp / "previews").mkdir()
    for path in (previews or {}).values():
        shutil.copyfile(path, tmp / "previews" / path.name)
    names = {name: path.name for name, path in (previews or {}).items()}
    progress = {"step": step, "losses": losses, "evals": list(evals), "previews": names, **(history or {}), **extra}
    (tmp / "progress.json").write_text(json.dumps(progress))
    for f in [f for f in tmp.rglob("*") if f.is_file()]:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)
    for old in _checkpoints(work_dir):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(work_dir: Path) -> int:
    ckpts = _checkpoints(work_dir) if work_dir.is_dir() else []
    return int(ckpts[-1].name.split("-")[1]) if ckpts else 0


def restore_checkpoint(
    work_dir: Path, denoiser, optimizer, scheduler, ema=None, engine=None, zero=None, stage: str = "lora1"
) -> tuple[int, list[float], list[dict], dict[str, Path], dict]:
    """(step, losses, evals, previews, history) of the last checkpoint, its weights and optimizer state loaded
    (engine: into DeepSpeed's, from every process's piece; zero: its settings, which must be the checkpoint's)."""
    import torch
    from safetensors.torch import load_file

    from stages.training import zero as deepspeed_zero

    ckpts = _checkpoints(work_dir)
    if not ckpts:
        return 0, [], [], {}, {}
    ckpt = ckpts[-1]
    progress = json.loads((ckpt / "progress.json").read_text())
    deepspeed_zero.check_checkpoint(progress.get("zero"), zero if engine is not None else None, ckpt, stage)
    if engine is not None:
        deepspeed_zero.load_state(engine, ckpt)
    weights = load_file(str(ckpt / "lora.safetensors"))
    expected = set(trainable_state(denoiser))
    if set(weights) != expected:
        raise RuntimeError(f"checkpoint {ckpt} does not fit this LoRA; delete it to start over")
    denoiser.load_state_dict(weights, strict=False)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    if engine is None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    previews = {}
    for name, filename in progress.get("previews", {}).items():
        shutil.copyfile(ckpt / "previews" / filename, work_dir / filename)
        previews[name] = work_dir / filename
    history = {k: progress[k] for k in ("lrs", "grad_norms") if k in progress}
    return progress["step"], progress["losses"], progress.get("evals", []), previews, history
