"""Figures of a stage run for TensorBoard and Weights & Biases ([runtime] log_with), while it goes.

One run per stage run, named <stage>-<key prefix> (`lora1-1f3c4055`, `lora1.red-circle-9a0b11c2`), so the curves
of runs with different settings sit side by side. Each backend is an extra (`pip install lora-pipeline[tensorboard]`
or `[wandb]`); W&B runs offline unless runtime.wandb_mode = "online" (`wandb sync <folder>` uploads an offline run).
Nothing here changes what a stage computes or writes to the store.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from cache.keys import flatten
from core.errors import ConfigError

EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # backend -> (module, extra)


def check_backends(backends: list[str]) -> None:
    """Refuse a backend whose package is missing, by name, before anything runs."""
    for name in backends:
        module, extra = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f'runtime.log_with includes "{name}", which needs the {extra} extra: pip install '
                f'"lora-pipeline[{extra}]" (or pip install {module}), or remove "{name}" from runtime.log_with.'
            ) from None


class Tracker:
    """Scalars and images of one stage run, fanned out to the configured backends; does nothing with none."""

    def __init__(
        self,
        backends: list[str] = (),
        run_name: str = "",
        folder: Path | None = None,
        config: dict | None = None,
        wandb_project: str = "lora-pipeline",
        wandb_mode: str = "offline",
    ):
        self.run_name, self._tb, self._wandb = run_name, None, None
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(folder) / "tensorboard" / run_name))
            if config:
                self._tb.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in sorted(flatten(config).items())))
        if "wandb" in backends:
            import wandb

            (Path(folder) / "wandb").mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=wandb_project,
                name=run_name,
                dir=str(Path(folder) / "wandb"),
                mode=wandb_mode,
                config=config or {},
                reinit="create_new",
            )

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def image(self, step: int, tag: str, path: Path) -> None:
        if not self.active:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        if self._tb is not None:
            self._tb.add_image(tag, pixels, step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def open_tracker(runtime, folder: Path, node: str, key: str, config: dict) -> Tracker:
    """The tracker of one stage run (node: the workflow's name for it, e.g. `lora1.red-circle`)."""
    if not runtime.log_with:
        return Tracker()
    name = f"{node}-{key[:8]}"
    return Tracker(list(runtime.log_with), name, folder, config, runtime.wandb_project, runtime.wandb_mode)
