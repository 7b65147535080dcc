"""The model-family interface (design.md §7).

The cheap half (layout checks, component digests, prediction type) reads only files and JSON, so
planning a run never imports torch. The heavy half loads modules and does the math.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' own per-file progress bars; ours say what is going on."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@dataclass(frozen=True)
class ModelLayout:
    """Where a model's components live: a diffusers folder, or a single file plus a config folder."""

    path: Path
    single_file: bool
    config_dir: Path | None = None


class ModelFamily(ABC):
    name: str
    default_targets: list[str]
    kohya_prefix: str = "lora_unet_"
    kohya_text_prefixes: dict[str, str] = {"text_encoder": "lora_te_"}  # component -> kohya prefix of its modules
    pipeline_class: str  # the diffusers pipeline that loads this family's LoRA files
    lora_component: str  # the pipeline attribute that carries the LoRA ("unet", "transformer")

    # -- cheap: files only -----------------------------------------------------------------------------
    @abstractmethod
    def layout(self, path: Path, single_file_config: Path | None) -> ModelLayout:
        """Check the model path and its components; raise ModelError naming what is missing."""

    @abstractmethod
    def component_files(self, layout: ModelLayout) -> dict[str, list[Path]]:
        """Files whose bytes define each component: {"unet": [...], "vae": [...], "text": [...], ...}."""

    @abstractmethod
    def prediction_type(self, layout: ModelLayout) -> str: ...

    @abstractmethod
    def latent_space(self, layout: ModelLayout) -> dict[str, Any]:
        """VAE scaling/shift, channel count and architecture: part of every contract that touches latents."""

    @abstractmethod
    def noise_schedule_contract(self, layout: ModelLayout) -> dict[str, Any]:
        """The training noise process and timestep range, from config files (the schedule's `timesteps`)."""

    # -- heavy: torch ----------------------------------------------------------------------------------
    @abstractmethod
    def load_vae(self, layout: ModelLayout, device): ...

    @abstractmethod
    def encode_images(self, vae, pixels):
        """pixels in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, H/8, W/8)."""

    @abstractmethod
    def decode_latents(self, vae, latents):
        """Scaled latents -> pixels in [-1, 1] (for `pipeline inspect`)."""

    @abstractmethod
    def load_text_encoder(self, layout: ModelLayout, device):
        """-> an object with .encode(list[str]) -> tensor (B, L, D)."""

    @abstractmethod
    def load_denoiser(self, layout: ModelLayout, device): ...

    @abstractmethod
    def load_noise_schedule(self, layout: ModelLayout, prediction_type: str):
        """-> an object with sample_timesteps(n, generator), noisy_input(x0, noise, t), target(x0, noise, t),
        predict_x0(x_t, prediction, t)."""

    @abstractmethod
    def predict(self, denoiser, x_t, t, cond): ...

    @abstractmethod
    def preview_pipeline(self, layout: ModelLayout, denoiser, device, prediction_type: str):
        """-> callable(prompts, seed, steps, guidance_scale, size) -> list of PIL images."""

    @abstractmethod
    def lora_metadata(self, layout: ModelLayout | None = None, prediction_type: str | None = None) -> dict[str, str]:
        """kohya `ss_*` and modelspec fields identifying the base model that was trained (family defaults without
        a layout)."""
