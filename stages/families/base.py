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


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def weights_variant(folder: Path) -> str | None:
    """The variant a component folder holds its weights in when it holds them in no other: "fp16" for a folder of
    diffusion_pytorch_model.fp16.safetensors (what a download of a repository's fp16 files leaves, as SD 1.5's and
    SDXL's offer them), which diffusers and transformers load only when told the variant; None for plain names."""
    import re

    names = [p.name.removesuffix(".safetensors") for p in folder.glob("*.safetensors")]
    plain = re.compile(r"(diffusion_pytorch_model|model)(-\d+-of-\d+)?")
    variant = re.compile(r"(?:diffusion_pytorch_model|model)\.(\w+?)(?:-\d+-of-\d+)?")
    if any(plain.fullmatch(n) for n in names):
        return None
    found = {m.group(1) for m in map(variant.fullmatch, names) if m}
    return found.pop() if len(found) == 1 else None


def check_diffusers_folder(path: Path, components, weighted, field: str, pretty: str) -> None:
    """A diffusers folder has every component folder, and each weighted one a config.json and .safetensors
    weights (pickle files are never loaded); ModelError naming the config field and what is missing."""
    from core.errors import ModelError

    missing = [c for c in components if not (path / c).is_dir()]
    if missing:
        raise ModelError(
            f"{field}: {path} is missing {', '.join(c + '/' for c in missing)}. A diffusers {pretty} folder "
            f"has {', '.join(c + '/' for c in components)} (as written by save_pretrained)."
        )
    for comp in weighted:
        folder = path / comp
        if not (folder / "config.json").is_file():
            raise ModelError(f"{field}: {folder}/config.json is missing; the {comp} component is incomplete.")
        if not list(folder.glob("*.safetensors")):
            found = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            hint = f" (found {', '.join(found)}: pickle files are not loaded, for safety)" if found else ""
            raise ModelError(
                f"{field}: {folder}/ has no .safetensors weights{hint}. Re-save the model with "
                f"save_pretrained(..., safe_serialization=True)."
            )


def pipeline_renderer(pipe, **call_kwargs):
    """render(spec) -> one PIL image through a diffusers pipeline: the spec's prompt (and negative prompt, where
    the pipeline takes one), seed, steps, guidance and size (None: the pipeline's default, the model's native
    resolution). stages/training/previews.py PreviewSpec."""
    import inspect

    takes_negative = "negative_prompt" in inspect.signature(pipe.__call__).parameters

    def render(spec):
        import torch

        negative = {"negative_prompt": spec.negative_prompt} if takes_negative and spec.negative_prompt else {}
        out = pipe(
            prompt=spec.prompt,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            height=spec.height,
            width=spec.width,
            generator=torch.Generator("cpu").manual_seed(spec.seed),
            output_type="pil",
            **call_kwargs,
            **negative,
        )
        return out.images[0]

    return render


@dataclass
class Conditioning:
    """A batch of text conditionings: token embeddings (B, L, D) and their attention mask (B, L).

    The text pool stores one (L_i, D) array per caption string: the tokens the family's transformer attends
    to. SD and FLUX.2 store the whole padded sequence (their pipelines pass it unmasked); Z-Image stores
    only the tokens its pipeline keeps (`embeds[mask]`), so a batch pads to its longest and masks the rest.
    """

    embeds: object
    mask: object
    # (B, 6) per-row size conditioning of the images (SDXL's add_time_ids: original h, w, crop top, left, target
    # h, w), attached per batch from the latents record (with_sizes); None: the family's default
    size_ids: object = None

    @classmethod
    def stack(cls, arrays: list) -> Conditioning:
        """Pad (L_i, D) arrays to the longest; the mask marks the real tokens."""
        import numpy as np
        import torch

        longest = max(a.shape[0] for a in arrays)
        embeds = np.zeros((len(arrays), longest, arrays[0].shape[1]), dtype=np.float32)
        mask = np.zeros((len(arrays), longest), dtype=bool)
        for i, a in enumerate(arrays):
            embeds[i, : a.shape[0]] = a
            mask[i, : a.shape[0]] = True
        return cls(torch.from_numpy(embeds), torch.from_numpy(mask))

    def __getitem__(self, index) -> Conditioning:
        return Conditioning(self.embeds[index], self.mask[index])

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def to(self, device) -> Conditioning:
        sizes = None if self.size_ids is None else self.size_ids.to(device)
        return Conditioning(self.embeds.to(device), self.mask.to(device), sizes)

    def with_sizes(self, size_ids) -> Conditioning:
        return Conditioning(self.embeds, self.mask, size_ids)

    def doubled(self) -> Conditioning:
        """The batch twice over (for one forward of base and adapter rows)."""
        import torch

        sizes = None if self.size_ids is None else torch.cat([self.size_ids, self.size_ids])
        return Conditioning(torch.cat([self.embeds, self.embeds]), torch.cat([self.mask, self.mask]), sizes)

    def rows(self) -> list:
        """Each row's real tokens, (L_i, D) (what a masked transformer like Z-Image's takes)."""
        return [e[m] for e, m in zip(self.embeds, self.mask, strict=True)]


@dataclass
class TokenIds:
    """A batch's token ids (a text encoder in training encodes them in the step) with its rows' size_ids."""

    ids: object
    size_ids: object

    def to(self, device) -> TokenIds:
        return TokenIds(self.ids.to(device), self.size_ids.to(device))

    def encoded(self, text_encoder) -> Conditioning:
        return text_encoder.conditioning(self.ids).with_sizes(self.size_ids)


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
    networks: tuple[str, ...] = ("lora", "dora", "loha", "lokr")  # what its single-file LoRA format can hold
    # The text encoder's modules a text-encoder LoRA targets (kohya's CLIPAttention/CLIPMLP projections); empty:
    # the family's text encoder is not trained (train_text_encoder is refused with the reason).
    text_encoder_targets: tuple[str, ...] = ()
    # Image sides (pixels) must be multiples of this: the VAE's downsampling, times the denoiser's patch size
    pixel_multiple: int = 8

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
        """The training noise process from config files: the base that resolve_timesteps() completes."""

    def latent_shape(self, layout: ModelLayout, resolution: int) -> tuple[int, ...]:
        """(C, h, w) of one cached latent of a square image of this many pixels."""
        return (self.latent_space(layout)["latent_channels"], resolution // 8, resolution // 8)

    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        """Tokens of one image in the denoiser (the resolution-dependent shift reads it)."""
        return latent_shape[1] * latent_shape[2]

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
        """-> an object with .encode(list[str]) -> one float32 (L_i, D) array per caption."""

    @abstractmethod
    def load_denoiser(self, layout: ModelLayout, device, dtype=None):
        """The denoiser, frozen, on device; in fp32, or with dtype (stored_dtype's: the checkpoint's own) every
        parameter as the file stores it, without the fp32 copy in CPU memory."""

    def stored_dtype(self, layout: ModelLayout):
        """torch.bfloat16 or torch.float16 when every floating weight of the denoiser's safetensors files is stored
        in that one dtype (read from their headers, nothing loaded), else None. Loading in it gives the values an
        fp32 load gives, each exactly representable, for half the CPU memory."""
        import torch

        from stages.families.sd15 import read_safetensors_header

        dtypes = set()
        files = [layout.path] if layout.single_file else self.component_files(layout)[self.lora_component]
        for path in files:  # (a single file's config folder may hold weights too: they are not loaded)
            if path.suffix != ".safetensors":
                continue
            header = {k: v for k, v in read_safetensors_header(path).items() if k != "__metadata__"}
            own = {k: v for k, v in header.items() if k.startswith("model.diffusion_model.")}
            for entry in (own if layout.single_file and own else header).values():
                dtypes.add(entry.get("dtype"))
        found = {"BF16": torch.bfloat16, "F16": torch.float16}
        floats = {d for d in dtypes if d not in ("I64", "I32", "I16", "I8", "U8", "BOOL")}
        return found[floats.pop()] if len(floats) == 1 and next(iter(floats)) in found else None

    # Whether the denoiser takes each image's size conditioning (SDXL): the latents stage records it per view and
    # batches attach it to their Conditioning (size_ids)
    size_conditioned = False

    default_guidance_embed = 4.0  # the guidance value of its pipeline, for a model with a guidance embedding

    def has_guidance_embed(self, layout: ModelLayout) -> bool:
        """Whether the denoiser takes a guidance value (FLUX.2 variants with guidance_embeds)."""
        return False

    @abstractmethod
    def predict(self, denoiser, x_t, t, cond: Conditioning, guidance: float | None = None):
        """The denoiser's prediction in the process's convention (ε/v for DDPM; v = ε − x0 for flow), with t
        in the process's units (integer timesteps; σ) and cond a Conditioning batch."""

    @abstractmethod
    def preview_pipeline(self, layout: ModelLayout, denoiser, device, prediction_type: str, text_encoder=None):
        """-> render(PreviewSpec) -> one PIL image (pipeline_renderer). text_encoder: the one being trained
        (train_text_encoder), used in place of the model's own."""

    def kohya_rename(self, denoiser) -> dict[str, str] | None:
        """{diffusers module name with underscores: the name kohya's files use} where they differ (SDXL's SGM
        block names); None: kohya's files use the diffusers names."""
        return None

    def kohya_rename_names(self, names) -> dict[str, str] | None:
        """kohya_rename() without the model, for dotted diffusers module names (LoRA tools re-saving a file)."""
        return None

    def kohya_lora(self, state: dict, alpha) -> tuple[dict, object]:
        """(peft-named state, alpha) over the modules kohya's single file names (FLUX.1: the original layout's fused
        projections); the trained modules themselves by default."""
        return state, alpha

    @abstractmethod
    def lora_metadata(self, layout: ModelLayout | None = None, prediction_type: str | None = None) -> dict[str, str]:
        """kohya `ss_*` and modelspec fields identifying the base model that was trained (family defaults without
        a layout)."""
