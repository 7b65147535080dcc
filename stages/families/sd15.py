"""Stable Diffusion 1.x / 2.x: a UNet with CLIP text conditioning and a DDPM (epsilon or v) process."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from core.errors import ModelError
from stages.families.base import (
    PICKLE_SUFFIXES,
    Conditioning,
    ModelFamily,
    ModelLayout,
    check_diffusers_folder,
    pipeline_renderer,
    quiet_libraries,
    weights_variant,
)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file, read without loading any tensor."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            return json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not a readable .safetensors file ({e}); is the download complete?") from None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON ({e})") from None


class SD15Family(ModelFamily):
    name = "sd15"
    default_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipeline_class = "StableDiffusionPipeline"
    lora_component = "unet"
    text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    components, weighted = COMPONENTS, WEIGHTED  # a diffusers folder's component folders; those with weights
    text_components = ("text_encoder", "tokenizer")  # the folders whose files key the text embeddings
    pretty = "Stable Diffusion"

    # -- cheap -------------------------------------------------------------------------------------------
    def layout(self, path: Path, single_file_config: Path | None) -> ModelLayout:
        if not path.exists():
            raise ModelError(
                f"model.path: {path} does not exist. Point it at a diffusers Stable Diffusion folder "
                f"(with model_index.json) or a single-file .safetensors checkpoint."
            )
        if path.is_file():
            return self._single_file_layout(path, single_file_config)
        check_diffusers_folder(path, self.components, self.weighted, "model.path", self.pretty)
        return ModelLayout(path=path, single_file=False)

    def _single_file_layout(self, path: Path, config_dir: Path | None) -> ModelLayout:
        if path.suffix in PICKLE_SUFFIXES:
            raise ModelError(
                f"model.path: {path} is a pickle checkpoint, which can run code when loaded. Convert it to "
                f".safetensors first (or use the diffusers folder of the model)."
            )
        if path.suffix != ".safetensors":
            raise ModelError(f"model.path: {path} is neither a model folder nor a .safetensors checkpoint.")
        header = read_safetensors_header(path)
        if not any(k.startswith("model.diffusion_model.") for k in header):
            raise ModelError(
                f"model.path: {path} has no `model.diffusion_model.*` tensors, so it is not a Stable Diffusion "
                f"single-file checkpoint (a LoRA file, perhaps?)."
            )
        if config_dir is not None:
            missing = [c for c in self.components if not (config_dir / c).is_dir()]
            if missing:
                raise ModelError(
                    f"model.single_file_config: {config_dir} is missing {', '.join(c + '/' for c in missing)}; "
                    f"it must be a diffusers folder of the same architecture (configs suffice, weights are not read)."
                )
        return ModelLayout(path=path, single_file=True, config_dir=config_dir)

    def component_files(self, layout: ModelLayout) -> dict[str, list[Path]]:
        def files(folder: Path) -> list[Path]:
            # Only what diffusers reads: configs, tokenizer files and safetensors weights.
            return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in PICKLE_SUFFIXES)

        if layout.single_file:
            configs = {c: files(layout.config_dir / c) if layout.config_dir else [] for c in self.components}
            return {
                "unet": [layout.path, *configs["unet"]],
                "vae": [layout.path, *configs["vae"]],
                "text": [layout.path, *(f for c in self.text_components for f in configs[c])],
                "scheduler": configs["scheduler"],
            }
        p = layout.path
        return {
            "unet": files(p / "unet"),
            "vae": files(p / "vae"),
            "text": [f for c in self.text_components for f in files(p / c)],
            "scheduler": files(p / "scheduler"),
        }

    def _config_root(self, layout: ModelLayout) -> Path | None:
        return layout.config_dir if layout.single_file else layout.path

    def prediction_type(self, layout: ModelLayout) -> str:
        root = self._config_root(layout)
        if root is None:
            return "epsilon"  # SD 1.x default; a v-prediction single file needs model.prediction_type
        return _json(root / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")

    def latent_space(self, layout: ModelLayout) -> dict[str, Any]:
        root = self._config_root(layout)
        cfg = _json(root / "vae" / "config.json") if root else {}
        return {
            "scaling_factor": cfg.get("scaling_factor", self.default_vae_scaling),
            "shift_factor": cfg.get("shift_factor") or 0.0,
            "family": self.name,
            "latent_channels": cfg.get("latent_channels", 4),
            # The architecture, without the bookkeeping keys that differ between two saves of one VAE.
            "vae_config": {k: v for k, v in sorted(cfg.items()) if not k.startswith("_")},
        }

    def noise_schedule_contract(self, layout: ModelLayout) -> dict[str, Any]:
        root = self._config_root(layout)
        cfg = _json(root / "scheduler" / "scheduler_config.json") if root else {}
        extra = {"rescale_betas_zero_snr": True} if cfg.get("rescale_betas_zero_snr") else {}
        return {
            "process": "ddpm",
            "sampler": "uniform",
            **extra,
            "num_train_timesteps": cfg.get("num_train_timesteps", 1000),
            "beta_schedule": cfg.get("beta_schedule", "scaled_linear"),
            "beta_start": cfg.get("beta_start", 0.00085),
            "beta_end": cfg.get("beta_end", 0.012),
        }

    # -- heavy -------------------------------------------------------------------------------------------
    def _load(self, layout: ModelLayout, *components: str, dtype=None) -> tuple:
        """The named components, from one load: a single file is read once however many are asked for. dtype: the
        weights as stored (stored_dtype), not converted to fp32."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        quiet_libraries()
        try:
            if layout.single_file and not (components == ("scheduler",) and layout.config_dir):
                pipe = self._single_file_pipeline().from_single_file(
                    str(layout.path),
                    config=str(layout.config_dir) if layout.config_dir else None,
                    local_files_only=layout.config_dir is not None,
                    **self._single_file_kwargs,
                    **({} if dtype is None else {"torch_dtype": dtype}),
                )
                return tuple(getattr(pipe, c) for c in components)
            # A diffusers folder, or a single file's scheduler: a config with no weights in the checkpoint.
            root = layout.config_dir if layout.single_file else layout.path
            classes = {
                "unet": UNet2DConditionModel,
                "vae": AutoencoderKL,
                "text_encoder": CLIPTextModel,
                "tokenizer": CLIPTokenizer,
                "scheduler": DDPMScheduler,
                **self._more_classes(),
            }
            return tuple(
                classes[c].from_pretrained(
                    str(root),
                    subfolder=c,
                    **({"use_safetensors": True, "variant": weights_variant(root / c)} if c in self.weighted else {}),
                    **({"torch_dtype": dtype} if dtype is not None and c in self.weighted else {}),
                )
                for c in components
            )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"could not load {', '.join(components)} of {layout.path}: {e}") from None

    _single_file_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    default_vae_scaling = 0.18215  # the VAE's scaling_factor when no config says it (a single file alone)

    def _single_file_pipeline(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def _more_classes(self) -> dict:
        """Classes of the components a subclass adds to SD's (SDXL's second text encoder)."""
        return {}

    def load_vae(self, layout: ModelLayout, device):
        (vae,) = self._load(layout, "vae")
        vae = vae.to(device).eval()
        vae.requires_grad_(False)
        return vae

    def encode_images(self, vae, pixels):
        # The posterior mean: caching a single random sample would freeze one draw of the VAE noise forever.
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = vae.config.shift_factor or 0.0
        return (z - shift) * vae.config.scaling_factor

    def decode_latents(self, vae, latents):
        """Scaled latents -> pixels in [-1, 1] (the inverse of encode_images)."""
        shift = vae.config.shift_factor or 0.0
        return vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample

    def load_text_encoder(self, layout: ModelLayout, device):
        model, tokenizer = self._load(layout, "text_encoder", "tokenizer")
        return self._clip_text(model, tokenizer, device)

    @staticmethod
    def _clip_text(model, tokenizer, device) -> ClipText:
        model = model.to(device).eval()
        model.requires_grad_(False)
        return ClipText(tokenizer, model, device)

    def load_denoiser(self, layout: ModelLayout, device, dtype=None):
        (unet,) = self._load(layout, "unet", dtype=dtype)
        unet = unet.to(device)
        unet.requires_grad_(False)
        return unet

    def predict(self, denoiser, x_t, t, cond, guidance=None):
        return denoiser(x_t, t, encoder_hidden_states=cond.embeds.to(x_t.dtype), return_dict=False)[0]

    def preview_pipeline(self, layout: ModelLayout, denoiser, device, prediction_type: str, text_encoder=None):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if text_encoder is None:
            model, tokenizer, vae, scheduler = self._load(layout, "text_encoder", "tokenizer", "vae", "scheduler")
            text = self._clip_text(model, tokenizer, device)
        else:
            vae, scheduler = self._load(layout, "vae", "scheduler")
            text = text_encoder
        vae = vae.to(device).eval()
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text.model,
            tokenizer=text.tokenizer,
            unet=denoiser,
            scheduler=DDIMScheduler.from_config(scheduler.config, prediction_type=prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)

        return pipeline_renderer(pipe)

    def load_components(self, layout: ModelLayout) -> dict:
        """Every component, for tools that rewrite a whole model (`pipeline lora merge`)."""
        return dict(zip(self.components, self._load(layout, *self.components), strict=True))

    def save_model(self, components: dict, out: Path) -> None:
        """A diffusers folder, or a single .safetensors checkpoint (LDM layout) when out ends in .safetensors."""
        from diffusers import StableDiffusionPipeline

        if out.suffix == ".safetensors":
            from stages.families.sd15_checkpoint import save_single_file

            save_single_file(components["unet"], components["vae"], components["text_encoder"], out)
            return
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        pipe.save_pretrained(str(out), safe_serialization=True)

    def lora_metadata(self, layout: ModelLayout | None = None, prediction_type: str | None = None) -> dict[str, str]:
        """kohya's identification of the base model (train_network.py: ss_v2, ss_base_model_version = sd_v1 |
        sd_v2 [+ _v]; sai_model_spec: stable-diffusion-v1 | -v2-512 | -v2-768-v). A1111 hides a LoRA whose
        ss_base_model_version does not fit the loaded checkpoint, so it must be the trained model's."""
        v2 = layout is not None and self.is_v2(layout)
        v = (prediction_type or (self.prediction_type(layout) if layout else "epsilon")) == "v_prediction"
        arch = "stable-diffusion-v1" if not v2 else ("stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512")
        return {
            "ss_base_model_version": f"sd_{'v2' if v2 else 'v1'}{'_v' if v else ''}",
            "ss_v2": str(v2),
            "ss_v_parameterization": str(v),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{arch}/lora",
            "modelspec.prediction_type": "v" if v else "epsilon",
            "modelspec.implementation": "https://github.com/huggingface/diffusers",
        }

    def is_v2(self, layout: ModelLayout) -> bool:
        """SD 2.x: linear attention projections and a 1024-wide OpenCLIP text encoder (configs, or the file's keys)."""
        root = self._config_root(layout)
        if root is not None:
            cfg = _json(root / "unet" / "config.json")
            return bool(cfg.get("use_linear_projection")) or cfg.get("cross_attention_dim") == 1024
        return any(k.startswith("cond_stage_model.model.") for k in read_safetensors_header(layout.path))


class ClipText:
    """Frozen CLIP text encoder: captions -> last hidden states, padded to the tokenizer's max length."""

    def __init__(self, tokenizer, model, device):
        self.tokenizer, self.model, self.device = tokenizer, model, device

    def token_ids(self, captions: list[str]):
        """(B, max length) token ids, padded and truncated as the pipeline does."""
        return self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode(self, captions: list[str]):
        import torch

        with torch.no_grad():
            return list(self.model(self.token_ids(captions).to(self.device))[0].float().cpu().numpy())

    @property
    def parts(self) -> dict:
        """{pipeline component: text encoder model} (a LoRA on .model covers each)."""
        return {"text_encoder": self.model}

    def component_states(self, state: dict) -> dict[str, dict]:
        """A peft state of .model's LoRA, split per component of .parts (one here)."""
        return {"text_encoder": state}

    def conditioning(self, ids) -> Conditioning:
        """The conditioning of token ids, with gradients (a text encoder in training): what encode() caches."""
        import torch

        embeds = self.model(ids.to(self.device))[0]
        return Conditioning(embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device))
