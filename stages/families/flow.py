"""What the flow-matching transformer families share (FLUX.1, Z-Image, FLUX.2, Qwen-Image): a diffusers folder
with transformer/, vae/, text_encoder/ (Qwen3), tokenizer/ and scheduler/ (FlowMatchEulerDiscreteScheduler), or a
single-file transformer checkpoint as users download it plus that folder for the rest.

Subclasses say which classes load each part, how text becomes conditioning, how latents are laid out, and
how the transformer is called.
"""

from __future__ import annotations

import json
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
from stages.families.sd15 import _json, read_safetensors_header

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("transformer", "vae", "text_encoder")
SCHEDULER_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


class FlowFamily(ModelFamily):
    lora_component = "transformer"
    kohya_prefix = "lora_unet_"
    kohya_text_prefixes: dict[str, str] = {}  # text-encoder LoRAs are not trained or written for these families
    single_file_lora = "comfy"  # the single-file LoRA format users share for this family (see lora_files)
    transformer_class: str
    vae_class: str
    pretty: str  # the family as people write it, for messages
    max_text_tokens = 512  # the pipelines' max_sequence_length
    pixel_multiple = 16  # 2x2 latent patches (Z-Image's patchify, FLUX.2's packed latents)
    text_encoder_classes: tuple[str, ...] = ("Qwen3Model", "Qwen3ForCausalLM")
    components, weighted = COMPONENTS, WEIGHTED  # the diffusers folder's component folders, and those with weights
    text_components: tuple[str, ...] = ("text_encoder", "tokenizer")
    converts_single_file = False  # True: the single file is read through from_single_file() below, not diffusers'

    # -- cheap -------------------------------------------------------------------------------------------
    def is_single_file(self, header: dict) -> bool:
        """Whether a .safetensors header is this family's transformer in the original (single-file) layout."""
        raise NotImplementedError

    def layout(self, path: Path, single_file_config: Path | None) -> ModelLayout:
        if not path.exists():
            raise ModelError(
                f"model.path: {path} does not exist. Point it at a diffusers {self.pretty} folder (with "
                f"model_index.json) or a single-file transformer .safetensors (with model.single_file_config)."
            )
        if path.is_file():
            return self._single_file_layout(path, single_file_config)
        self._check_folder(path, "model.path")
        return ModelLayout(path=path, single_file=False)

    def _check_folder(self, path: Path, field: str) -> None:
        check_diffusers_folder(path, self.components, self.weighted, field, self.pretty)

    def _single_file_layout(self, path: Path, config_dir: Path | None) -> ModelLayout:
        if path.suffix in PICKLE_SUFFIXES:
            raise ModelError(f"model.path: {path} is a pickle checkpoint; convert it to .safetensors first.")
        if path.suffix != ".safetensors":
            raise ModelError(f"model.path: {path} is neither a model folder nor a .safetensors checkpoint.")
        if not self.is_single_file(read_safetensors_header(path)):
            raise ModelError(
                f"model.path: {path} is not a {self.pretty} transformer checkpoint (its tensor names do not match)."
            )
        if config_dir is None:
            raise ModelError(
                f"model.single_file_config: {path} holds only the {self.pretty} transformer. Set single_file_config "
                f"to the diffusers folder of the same model: its text encoder, VAE, scheduler and configs are used."
            )
        self._check_folder(config_dir, "model.single_file_config")
        return ModelLayout(path=path, single_file=True, config_dir=config_dir)

    def _root(self, layout: ModelLayout) -> Path:
        return layout.config_dir if layout.single_file else layout.path

    def component_files(self, layout: ModelLayout) -> dict[str, list[Path]]:
        def files(folder: Path) -> list[Path]:
            return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in PICKLE_SUFFIXES)

        root = self._root(layout)
        transformer = (
            [layout.path, root / "transformer" / "config.json"] if layout.single_file else files(root / "transformer")
        )
        return {
            "transformer": transformer,
            "vae": files(root / "vae"),
            "text": [f for c in self.text_components for f in files(root / c)],
            "scheduler": files(root / "scheduler"),
        }

    def prediction_type(self, layout: ModelLayout) -> str:
        return "flow"

    def vae_config(self, layout: ModelLayout) -> dict:
        return _json(self._root(layout) / "vae" / "config.json")

    def latent_space(self, layout: ModelLayout) -> dict[str, Any]:
        cfg = self.vae_config(layout)
        return {
            "family": self.name,
            "latent_channels": cfg.get("latent_channels", 16),
            "scaling_factor": cfg.get("scaling_factor", 1.0),
            "shift_factor": cfg.get("shift_factor") or 0.0,
            "vae_config": {k: v for k, v in sorted(cfg.items()) if not k.startswith("_")},
        }

    def noise_schedule_contract(self, layout: ModelLayout) -> dict[str, Any]:
        cfg = _json(self._root(layout) / "scheduler" / "scheduler_config.json")
        return {
            "process": "flow",
            "num_train_timesteps": cfg.get("num_train_timesteps", 1000),
            "scheduler": {k: cfg[k] for k in SCHEDULER_KEYS if k in cfg},
        }

    def transformer_config(self, layout: ModelLayout) -> dict:
        return _json(self._root(layout) / "transformer" / "config.json")

    def has_guidance_embed(self, layout: ModelLayout) -> bool:
        return False

    # -- heavy -------------------------------------------------------------------------------------------
    def _from_pretrained(self, layout: ModelLayout, comp: str, cls, dtype=None):
        quiet_libraries()
        root = self._root(layout)
        kwargs = {"use_safetensors": True, "variant": weights_variant(root / comp)} if comp in self.weighted else {}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        try:
            return cls.from_pretrained(str(root), subfolder=comp, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"could not load the {comp} of {root}: {e}") from None

    def load_vae(self, layout: ModelLayout, device):
        import diffusers

        vae = self._from_pretrained(layout, "vae", getattr(diffusers, self.vae_class)).to(device).eval()
        vae.requires_grad_(False)
        return vae

    def encode_images(self, vae, pixels):
        """(z − shift_factor)·scaling_factor of the posterior's mode (FLUX.1, Z-Image; FLUX.2 and Qwen-Image differ)."""
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def decode_latents(self, vae, latents):
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(z).sample

    def load_denoiser(self, layout: ModelLayout, device, dtype=None):
        import diffusers

        cls = getattr(diffusers, self.transformer_class)
        if layout.single_file and self.converts_single_file:
            from accelerate import init_empty_weights
            from safetensors.torch import load_file

            quiet_libraries()
            try:
                config = cls.load_config(str(layout.config_dir), subfolder="transformer")
                state = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(layout.path)).items()}
                if dtype is None:
                    model = cls.from_config(config)
                    model.load_state_dict(self.from_single_file(state), strict=True)
                else:  # the file's tensors become the parameters: no fp32 model is ever allocated
                    with init_empty_weights():
                        model = cls.from_config(config)
                    model.load_state_dict(self.from_single_file(state), strict=True, assign=True)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise ModelError(f"could not load the transformer from {layout.path}: {str(e)[:300]}") from None
        elif layout.single_file:
            quiet_libraries()
            kwargs = {} if dtype is None else {"torch_dtype": dtype}
            try:
                model = cls.from_single_file(
                    str(layout.path),
                    config=str(layout.config_dir),
                    subfolder="transformer",
                    local_files_only=True,
                    **kwargs,
                )
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise ModelError(f"could not load the transformer from {layout.path}: {e}") from None
        else:
            model = self._from_pretrained(layout, "transformer", cls, dtype)
        model = model.to(device)
        model.requires_grad_(False)
        return model

    def load_scheduler(self, layout: ModelLayout):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return self._from_pretrained(layout, "scheduler", FlowMatchEulerDiscreteScheduler)

    def text_encoder_class(self, layout: ModelLayout) -> str:
        """The text encoder's class (config.json `architectures`); ModelError for one this family cannot use."""
        root = self._root(layout)
        arch = (_json(root / "text_encoder" / "config.json").get("architectures") or ["?"])[0]
        if arch not in self.text_encoder_classes:
            raise ModelError(
                f"{root}/text_encoder is a {arch}; the {self.pretty} family expects "
                f"{' or '.join(self.text_encoder_classes)}."
            )
        return arch

    def model_pipeline_class(self, text_encoder_class: str) -> str:
        """The diffusers pipeline of a model of this family with that text encoder (previews, merged models)."""
        return self.pipeline_class

    def _text_parts(self, layout: ModelLayout, device):
        import transformers

        arch = self.text_encoder_class(layout)
        model = self._from_pretrained(layout, "text_encoder", getattr(transformers, arch)).to(device).eval()
        model.requires_grad_(False)
        tokenizer = self._from_pretrained(layout, "tokenizer", transformers.AutoTokenizer)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ModelError(
                f"{self._root(layout)}/tokenizer has no chat template (chat_template.jinja or tokenizer_config.json); "
                f"the {self.pretty} pipeline formats every caption with it. Re-download the tokenizer folder."
            )
        return model, tokenizer

    def load_components(self, layout: ModelLayout) -> dict:
        """Every component and the pipeline's own settings, as the model's diffusers pipeline takes them."""
        model, tokenizer = self._text_parts(layout, "cpu")
        return {
            "transformer": self.load_denoiser(layout, "cpu"),
            "vae": self.load_vae(layout, "cpu"),
            "text_encoder": model,
            "tokenizer": tokenizer,
            "scheduler": self.load_scheduler(layout),
            **self.pipeline_extra(layout),
        }

    def save_model(self, components: dict, out: Path) -> None:
        import diffusers

        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            state = self.to_single_file(components["transformer"].state_dict())
            save_file({k: v.contiguous() for k, v in state.items()}, str(out))
            return
        pipeline = self.model_pipeline_class(type(components["text_encoder"]).__name__)
        getattr(diffusers, pipeline)(**components).save_pretrained(str(out), safe_serialization=True)

    def to_single_file(self, state: dict) -> dict:
        """The diffusers transformer state dict in the original single-file layout (the inverse of diffusers'
        convert_*_checkpoint_to_diffusers)."""
        raise NotImplementedError

    def from_single_file(self, state: dict) -> dict:
        """The single file's state dict (prefix removed) in diffusers' names, for converts_single_file families."""
        raise NotImplementedError

    def preview_pipeline(self, layout: ModelLayout, denoiser, device, prediction_type: str, text_encoder=None):
        import diffusers

        assert text_encoder is None, "text_encoder_targets is empty: these families' text encoders are not trained"
        model, tokenizer = self._text_parts(layout, device)
        pipe = getattr(diffusers, self.model_pipeline_class(type(model).__name__))(
            transformer=denoiser,
            vae=self.load_vae(layout, device),
            text_encoder=model,
            tokenizer=tokenizer,
            scheduler=self.load_scheduler(layout),
            **self.pipeline_extra(layout),
        )
        pipe.set_progress_bar_config(disable=True)

        return pipeline_renderer(pipe, **self.call_extra(model))

    def pipeline_extra(self, layout: ModelLayout) -> dict:
        return {}

    def call_extra(self, text_encoder) -> dict:
        return {}

    def comfy_lora(self, state: dict, alpha) -> tuple[dict, object]:
        """(peft-named state, alphas) in the module names the single-file format uses (diffusers' by default)."""
        return state, alpha

    def lora_metadata(self, layout: ModelLayout | None = None, prediction_type: str | None = None) -> dict[str, str]:
        return {
            "ss_base_model_version": self.name,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{self.name}/lora",
            "modelspec.prediction_type": "flow",
            "modelspec.implementation": "https://github.com/huggingface/diffusers",
        }


class QwenText:
    """Frozen Qwen3 text encoder behind the chat template, as the family's diffusers pipeline runs it.

    encode() returns one float32 (L_i, D) array per caption: the whole padded sequence, or only the tokens the
    attention mask keeps (`masked=True`, Z-Image)."""

    def __init__(self, tokenizer, model, device, max_length: int, layers, thinking: bool, masked: bool):
        self.tokenizer, self.model, self.device = tokenizer, model, device
        self.max_length, self.layers, self.thinking, self.masked = max_length, tuple(layers), thinking, masked

    def encode(self, captions: list[str]):
        import torch

        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": c}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=self.thinking,
            )
            for c in captions
        ]
        tok = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        states = torch.cat([hidden[i] for i in self.layers], dim=-1).float().cpu()
        keep = mask.bool().cpu()
        return [(s[k] if self.masked else s).numpy() for s, k in zip(states, keep, strict=True)]


def read_model_index(path: Path) -> dict:
    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


__all__ = ["Conditioning", "FlowFamily", "QwenText", "read_model_index"]
