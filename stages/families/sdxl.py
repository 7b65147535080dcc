"""Stable Diffusion XL: SD's UNet and DDPM process with two CLIP text encoders and size conditioning.

What the text pool stores per caption (StableDiffusionXLPipeline.encode_prompt, clip_skip None): the penultimate
hidden states of CLIP-L and of OpenCLIP bigG, concatenated (77, 768 + 1280), and one more row holding the pooled
output of the second encoder (its text_embeds, 1280 values, zero-padded to the row): (78, 2048) per string, so
that one array per caption keeps the text pool's layout. predict() splits them again.

Size conditioning (`add_time_ids`: original size, crop top-left, target size, each (height, width)) is each image's
own, as sd-scripts trains it: the latents stage records it per view (the image's size before resizing, the crop's
top-left in the resized image, the view's size; stages/buckets.py Placement.conditioning) and every batch attaches
its rows' values to the Conditioning (size_ids), in lora1 as in the teacher, prior and student phases. A
Conditioning without them (sampling, tools) gets the pipeline's default: the latent's size, uncropped.

Single-file checkpoints (what users download: `model.diffusion_model.*`, `first_stage_model.*`, the text encoders
as `conditioner.embedders.0.transformer.*` and `conditioner.embedders.1.model.*`) load through diffusers'
`StableDiffusionXLPipeline.from_single_file` with model.single_file_config (a diffusers SDXL folder; its configs
are read, its weights are not), as SD 1.x's do.

LoRA files in kohya's format name the UNet's modules as the original (SGM) UNet does, as sd-scripts'
`sdxl_train_network.py` writes them and A1111 and ComfyUI read them: `lora_unet_input_blocks_4_1_transformer_blocks_0_
attn1_to_q` (ldm_name below); files with diffusers' names (`lora_unet_down_blocks_...`) are read too.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import ModelError
from stages.families.base import Conditioning, ModelLayout, pipeline_renderer
from stages.families.sd15 import SD15Family, read_safetensors_header

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")


class SDXLFamily(SD15Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    components, weighted = COMPONENTS, WEIGHTED
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    pretty = "Stable Diffusion XL"
    # Text-encoder LoRA covers both encoders (sd-scripts' lora_te1_ / lora_te2_ modules; one text_encoder_lr for both)
    kohya_text_prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

    _single_file_kwargs: dict = {}
    size_conditioned = True

    def latent_space(self, layout: ModelLayout) -> dict:
        # each view's own original size and crop condition the UNet (predict): part of what both phases must share
        return {**super().latent_space(layout), "size_conditioning": "original_crop_target"}

    default_vae_scaling = 0.13025

    def layout(self, path: Path, single_file_config: Path | None) -> ModelLayout:
        layout = super().layout(path, single_file_config)
        if layout.single_file and not any(
            k.startswith("conditioner.embedders.1.") for k in read_safetensors_header(path)
        ):
            raise ModelError(
                f"model.path: {path} is a Stable Diffusion 1.x/2.x checkpoint (its text encoder is "
                f'cond_stage_model.*), not an SDXL one (conditioner.embedders.0/1.*). Set model.family = "sd15".'
            )
        return layout

    def _single_file_pipeline(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def is_v2(self, layout: ModelLayout) -> bool:
        return False

    def _more_classes(self) -> dict:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return {"text_encoder_2": CLIPTextModelWithProjection, "tokenizer_2": CLIPTokenizer}

    def load_text_encoder(self, layout: ModelLayout, device):
        te, te2, tok, tok2 = self._load(layout, "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        for m in (te, te2):
            m.to(device).eval().requires_grad_(False)
        return SDXLText((tok, tok2), (te, te2), device)

    def predict(self, denoiser, x_t, t, cond, guidance=None):
        import torch

        embeds = cond.embeds.to(x_t.dtype)
        pooled_dim = denoiser.config.projection_class_embeddings_input_dim - 6 * denoiser.config.addition_time_embed_dim
        if cond.size_ids is not None:  # each image's (latents stage records them per view)
            time_ids = cond.size_ids.to(x_t.dtype)
        else:  # the pipeline's default: the latent's size, uncropped
            h, w = x_t.shape[-2] * 8, x_t.shape[-1] * 8
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0], 6)
        added = {"text_embeds": embeds[:, -1, :pooled_dim], "time_ids": time_ids}
        return denoiser(x_t, t, encoder_hidden_states=embeds[:, :-1], added_cond_kwargs=added, return_dict=False)[0]

    def preview_pipeline(self, layout: ModelLayout, denoiser, device, prediction_type: str, text_encoder=None):
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        if text_encoder is None:
            te, te2, tok, tok2, vae, scheduler = self._load(
                layout, "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"
            )
        else:  # the encoders in training, with their LoRA
            (te, te2), (tok, tok2) = text_encoder.model, text_encoder.tokenizers
            vae, scheduler = self._load(layout, "vae", "scheduler")
        pipe = StableDiffusionXLPipeline(
            vae=vae.to(device).eval(),
            text_encoder=te.to(device),
            text_encoder_2=te2.to(device),
            tokenizer=tok,
            tokenizer_2=tok2,
            unet=denoiser,
            scheduler=EulerDiscreteScheduler.from_config(scheduler.config, prediction_type=prediction_type),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipeline_renderer(pipe)

    def save_model(self, components: dict, out: Path) -> None:
        """A diffusers folder, or a single .safetensors checkpoint (SGM layout) when out ends in .safetensors."""
        from diffusers import StableDiffusionXLPipeline

        if out.suffix == ".safetensors":
            from stages.families.sd15_checkpoint import save_single_file

            c = components
            save_single_file(c["unet"], c["vae"], c["text_encoder"], out, text_encoder_2=c["text_encoder_2"])
            return
        StableDiffusionXLPipeline(**components).save_pretrained(str(out), safe_serialization=True)

    def kohya_rename(self, denoiser) -> dict[str, str] | None:
        return kohya_renames(denoiser)

    def kohya_rename_names(self, names) -> dict[str, str]:
        """SGM names of diffusers-named modules by SDXL's layout (2 layers per block; what sets the SGM numbering;
        a tiny model with that layout gets the same names)."""
        return {n.replace(".", "_"): ldm_name(n, SDXL_LAYOUT).replace(".", "_") for n in names if "." in n}

    def lora_metadata(self, layout: ModelLayout | None = None, prediction_type: str | None = None) -> dict[str, str]:
        """sd-scripts' SDXL identification (sdxl_model_util: ss_base_model_version sdxl_base_v1-0, for v-prediction
        models too, which say so in ss_v_parameterization; sai_model_spec stable-diffusion-xl-v1-base), which A1111
        reads to show the LoRA with SDXL checkpoints."""
        v = (prediction_type or (self.prediction_type(layout) if layout else "epsilon")) == "v_prediction"
        return {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
            "ss_v_parameterization": str(v),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.prediction_type": "v" if v else "epsilon",
            "modelspec.implementation": "https://github.com/huggingface/diffusers",
        }


class SDXLText:
    """CLIP-L and OpenCLIP bigG: per caption the two penultimate hidden states concatenated, and a last row with
    the second encoder's pooled output (see the module docstring). .model holds both (one LoRA covers both when
    the text encoders train; component_states() splits it into text_encoder / text_encoder_2)."""

    def __init__(self, tokenizers, models, device):
        import torch

        self.tokenizers, self.device = tokenizers, device
        self.model = torch.nn.ModuleList(models)  # one module, so that release() drops both

    @property
    def parts(self) -> dict:
        return {"text_encoder": self.model[0], "text_encoder_2": self.model[1]}

    def component_states(self, state: dict) -> dict[str, dict]:
        return {
            comp: {k[2:]: v for k, v in state.items() if k.startswith(f"{i}.")} for i, comp in enumerate(self.parts)
        }

    def token_ids(self, captions: list[str]):
        """(B, 2, 77): each tokenizer's ids, padded and truncated as the pipeline does."""
        import torch

        ids = [
            tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
            .input_ids for tok in self.tokenizers
        ]  # fmt: skip
        if ids[0].shape != ids[1].shape:
            raise ModelError(f"SDXL tokenizers pad to {ids[0].shape[1]} and {ids[1].shape[1]} tokens; they must agree.")
        return torch.stack(ids, dim=1)

    def _embeds(self, ids):
        import torch

        hidden, pooled = [], None
        for n, model in enumerate(self.model):
            out = model(ids[:, n].to(self.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds, the pooled output
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)
        if pooled.shape[-1] > embeds.shape[-1]:
            raise ModelError(f"SDXL text encoders: a pooled output of {pooled.shape[-1]} values is wider than "
                             f"the hidden states ({embeds.shape[-1]}); this is not an SDXL model.")  # fmt: skip
        pad = embeds.new_zeros(embeds.shape[0], 1, embeds.shape[-1] - pooled.shape[-1])
        return torch.cat([embeds, torch.cat([pooled[:, None], pad], dim=-1)], dim=1)

    def encode(self, captions: list[str]):
        import torch

        with torch.no_grad():
            return list(self._embeds(self.token_ids(captions)).float().cpu().numpy())

    def conditioning(self, ids) -> Conditioning:
        """The conditioning of token ids, with gradients (the text encoders in training): what encode() caches."""
        import torch

        embeds = self._embeds(ids)
        return Conditioning(embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device))


# What ldm_name() reads of an SDXL UNet's config, as SDXL 1.0 base has it
SDXL_LAYOUT = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


def is_sdxl_unet(denoiser) -> bool:
    """Whether a denoiser is an SDXL-style UNet (text_time added conditioning): its kohya names are SGM names."""
    config = getattr(denoiser, "config", None)
    # a diffusers config is a dict (FrozenDict); a text encoder's (transformers) is not
    return isinstance(config, dict) and config.get("addition_embed_type") == "text_time"


def kohya_renames(denoiser) -> dict[str, str]:
    """{module name with underscores: its SGM name with underscores} of every Linear and Conv2d of an SDXL UNet."""
    import torch

    names = {  # a layer carrying an adapter is found through its peft wrapper's base_layer
        n.removesuffix(".base_layer")
        for n, m in denoiser.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in n
    }
    return {n.replace(".", "_"): ldm_name(n, denoiser.config).replace(".", "_") for n in names}


def ldm_name(name: str, config) -> str:
    """A diffusers SDXL UNet module name as the original (SGM/LDM) UNet names it, e.g. down_blocks.1.attentions.0
    .transformer_blocks.0.attn1.to_q -> input_blocks.4.1.transformer_blocks.0.attn1.to_q. The layout follows the
    config (layers_per_block, which blocks have attention), as diffusers' SGM conversion does."""
    lpb = config["layers_per_block"]
    up_types = config["up_block_types"]
    parts = name.split(".")
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip

    def inner(kind: str, rest: list[str]) -> str:
        if kind == "resnets" and rest and rest[0] in resnet:
            rest = [resnet[rest[0]], *rest[1:]]
        return ".".join(rest)

    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    for k, v in top.items():
        if name == k or name.startswith(k + "."):
            return v + name[len(k) :]
    if parts[0] == "down_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":  # downsamplers.0.conv -> input_blocks.N.0.op
            return ".".join([f"input_blocks.{(lpb + 1) * (i + 1)}.0.op", *rest[1:]])
        slot = 0 if kind == "resnets" else 1
        return ".".join(filter(None, [f"input_blocks.{(lpb + 1) * i + j + 1}.{slot}", inner(kind, rest)]))
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        block = f"middle_block.{2 * j if kind == 'resnets' else 1}"
        return ".".join(filter(None, [block, inner(kind, rest)]))
    if parts[0] == "up_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":  # upsamplers.0.conv -> output_blocks.N.(1|2).conv
            slot = 2 if up_types[i].startswith("CrossAttn") else 1
            return ".".join([f"output_blocks.{(lpb + 1) * i + lpb}.{slot}", *rest])
        slot = 0 if kind == "resnets" else 1
        return ".".join(filter(None, [f"output_blocks.{(lpb + 1) * i + j}.{slot}", inner(kind, rest)]))
    return name
