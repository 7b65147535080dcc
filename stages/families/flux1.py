"""FLUX.1 (Black Forest Labs): [dev] and [schnell]. An MMDiT with 19 double- and 38 single-stream blocks over a
16-channel VAE, flow matching, conditioned on T5-XXL hidden states and CLIP-L's pooled output.

Facts read from diffusers' FluxPipeline, FluxTransformer2DModel and its single-file conversion:
- text: CLIP-L's pooler_output (77 tokens) as `pooled_projections`; T5's last hidden state over 512 tokens padded to
  max_length, passed whole and unmasked, as `encoder_hidden_states`; text position ids are zeros. The text pool
  stores per caption the 512 T5 rows and one more row holding the pooled CLIP vector, zero-padded to the T5 width
  (as SDXL's pooled row), so one array per caption keeps the pool's layout; predict() splits them again;
- latents: (z − shift_factor)·scaling_factor of the VAE posterior's mode, (16, H/8, W/8); the transformer sees
  them packed 2×2 as (B, h/2·w/2, 64) tokens with (0, row, col) position ids (FluxPipeline._pack_latents);
- the transformer takes t = σ and predicts v = ε − x0; [dev] has a guidance embedding (`guidance_embeds`; the
  pipeline's default guidance 3.5), [schnell] none; the shift is resolution-dependent (use_dynamic_shifting);
- the original (BFL) layout fuses q, k, v of each stream of a double block (img_attn.qkv, txt_attn.qkv) and q, k, v
  and the MLP input of a single block (linear1, 3·H + 4·H rows), and stores the final adaLN as (shift, scale).

LoRA files: the single file is sd-scripts' FLUX.1 format (networks/lora_flux.py), `lora_unet_<original module with
_>.lora_down/lora_up/alpha` over the original layout, fused projections as one LoRA with a block-diagonal up
(fused.py); ComfyUI maps it through its generic `lora_unet_` rule onto `diffusion_model.<original weight>` and
diffusers' FluxPipeline converts it (_convert_kohya_flux_lora_to_diffusers). The diffusers file uses diffusers'
module names.
"""

from __future__ import annotations

import re
from pathlib import Path

from core.errors import ModelError
from stages.families.base import Conditioning, ModelLayout, pipeline_renderer
from stages.families.flow import FlowFamily

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
WEIGHTED = ("transformer", "vae", "text_encoder", "text_encoder_2")
# diffusers' train_dreambooth_lora_flux.py targets, and the single blocks' MLP input, so that a single block's
# fused linear1 (q, k, v, MLP) is covered whole
DEFAULT_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
]  # fmt: skip

# diffusers module inside transformer_blocks.N. -> original module inside double_blocks.N., 1:1
DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
# fused original module -> its diffusers parts, in the order of its output rows
DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # (scale, shift) in diffusers, (shift, scale) originally
}
SWAPPED = "norm_out.linear"
MLP_RATIO = 4  # FluxSingleTransformerBlock's; linear1 has 3·H + 4·H rows


def original_name(module: str) -> tuple[str, int | None]:
    """(original module, index of this part in its fused module or None) of a diffusers module; KeyError if none."""
    block, _, rest = module.partition(".")
    if block in ("transformer_blocks", "single_transformer_blocks"):
        n, _, inner = rest.partition(".")
        ones, norms, fused, prefix = (
            (DOUBLE, DOUBLE_NORMS, DOUBLE_FUSED, "double_blocks")
            if block == "transformer_blocks"
            else (SINGLE, SINGLE_NORMS, SINGLE_FUSED, "single_blocks")
        )
        if inner in ones or inner in norms:
            return f"{prefix}.{n}.{ones.get(inner) or norms[inner]}", None
        for target, parts in fused.items():
            if inner in parts:
                return f"{prefix}.{n}.{target}", parts.index(inner)
        raise KeyError(module)
    return TOP[module], None


def diffusers_parts(original: str) -> tuple[str, ...] | None:
    """The diffusers modules of a fused original module (in row order), None for a 1:1 one."""
    parts = original.split(".")
    if parts[0] in ("double_blocks", "single_blocks") and len(parts) > 2:
        fused = DOUBLE_FUSED if parts[0] == "double_blocks" else SINGLE_FUSED
        inner = ".".join(parts[2:])
        if inner in fused:
            block = "transformer_blocks" if parts[0] == "double_blocks" else "single_transformer_blocks"
            return tuple(f"{block}.{parts[1]}.{p}" for p in fused[inner])
    return None


def diffusers_name(original: str) -> str | None:
    """The diffusers module of a 1:1 original module (None: a fused one, or unknown)."""
    parts = original.split(".")
    if parts[0] in ("double_blocks", "single_blocks") and len(parts) > 2:
        table = {**DOUBLE, **DOUBLE_NORMS} if parts[0] == "double_blocks" else {**SINGLE, **SINGLE_NORMS}
        inverse = {v: k for k, v in table.items()}
        inner = ".".join(parts[2:])
        block = "transformer_blocks" if parts[0] == "double_blocks" else "single_transformer_blocks"
        return f"{block}.{parts[1]}.{inverse[inner]}" if inner in inverse else None
    return {v: k for k, v in TOP.items()}.get(original)


# sd-scripts' flattened names (`double_blocks_0_img_attn_qkv`) -> the original module names
_FLAT = [
    (re.compile(r"^double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)$"),
     lambda m: f"double_blocks.{m[1]}.{m[2]}_{m[3].replace('_', '.')}"),
    (re.compile(r"^single_blocks_(\d+)_(linear1|linear2|modulation_lin)$"),
     lambda m: f"single_blocks.{m[1]}.{m[2].replace('_lin', '.lin')}"),
]  # fmt: skip
_FLAT_TOP = {v.replace(".", "_"): v for v in TOP.values()}


def unflatten(name: str) -> str | None:
    """An sd-scripts module name (dots as underscores) -> the original module name, None if it is not one."""
    for pattern, make in _FLAT:
        m = pattern.match(name)
        if m:
            return make(m)
    return _FLAT_TOP.get(name)


def swap_halves(t):
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


class Flux1Family(FlowFamily):
    name = "flux1"
    pretty = "FLUX.1"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    vae_class = "AutoencoderKL"
    default_targets = DEFAULT_TARGETS
    networks = ("lora",)  # its single file fuses q/k/v (fused.py), which only a plain LoRA can express
    single_file_lora = "kohya"
    components, weighted = COMPONENTS, WEIGHTED
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    text_encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    default_guidance_embed = 3.5  # FluxPipeline's guidance_scale
    # diffusers' own single-file conversion assumes FLUX.1's full width (3072) when it splits linear1; ours reads
    # every width from the tensors, and is checked against it (tests/test_flux1.py)
    converts_single_file = True

    def is_single_file(self, header: dict) -> bool:
        return any(k.removeprefix("model.diffusion_model.") == "double_blocks.0.img_mod.lin.weight" for k in header)

    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        return (latent_shape[1] // 2) * (latent_shape[2] // 2)

    def has_guidance_embed(self, layout: ModelLayout) -> bool:
        return bool(self.transformer_config(layout).get("guidance_embeds", False))

    def latent_space(self, layout: ModelLayout) -> dict:
        space = super().latent_space(layout)
        space["layout"] = "(z - shift) * scale; packed 2x2 in the transformer"
        return space

    def text_encoder_class(self, layout: ModelLayout) -> str:
        from stages.families.sd15 import _json

        root = self._root(layout)
        for comp, want in zip(("text_encoder", "text_encoder_2"), self.text_encoder_classes, strict=True):
            arch = (_json(root / comp / "config.json").get("architectures") or ["?"])[0]
            if arch != want:
                raise ModelError(f"{root}/{comp} is a {arch}; the FLUX.1 family expects a {want} there.")
        return self.text_encoder_classes[0]

    def _text_parts(self, layout: ModelLayout, device):
        import transformers

        self.text_encoder_class(layout)
        clip = self._from_pretrained(layout, "text_encoder", transformers.CLIPTextModel)
        t5 = self._from_pretrained(layout, "text_encoder_2", transformers.T5EncoderModel)
        for model in (clip, t5):
            model.to(device).eval().requires_grad_(False)
        clip_tok = self._from_pretrained(layout, "tokenizer", transformers.AutoTokenizer)
        t5_tok = self._from_pretrained(layout, "tokenizer_2", transformers.AutoTokenizer)
        return clip, t5, clip_tok, t5_tok

    def load_components(self, layout: ModelLayout) -> dict:
        clip, t5, clip_tok, t5_tok = self._text_parts(layout, "cpu")
        return {
            "transformer": self.load_denoiser(layout, "cpu"),
            "vae": self.load_vae(layout, "cpu"),
            "text_encoder": clip,
            "tokenizer": clip_tok,
            "text_encoder_2": t5,
            "tokenizer_2": t5_tok,
            "scheduler": self.load_scheduler(layout),
        }

    def load_text_encoder(self, layout: ModelLayout, device):
        clip, t5, clip_tok, t5_tok = self._text_parts(layout, device)
        return FluxText((clip_tok, t5_tok), (clip, t5), device, self.max_text_tokens)

    def predict(self, denoiser, x_t, t, cond: Conditioning, guidance=None):
        import torch
        from diffusers import FluxPipeline

        b, c, h, w = x_t.shape
        embeds = cond.embeds.to(x_t.dtype)
        pooled = embeds[:, -1, : denoiser.config.pooled_projection_dim]
        tokens = FluxPipeline._pack_latents(x_t, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        txt_ids = torch.zeros(embeds.shape[1] - 1, 3, device=x_t.device, dtype=x_t.dtype)
        g = None if guidance is None else torch.full((b,), float(guidance), device=x_t.device, dtype=x_t.dtype)
        out = denoiser(
            hidden_states=tokens,
            timestep=t.to(x_t.dtype),
            guidance=g,
            pooled_projections=pooled,
            encoder_hidden_states=embeds[:, :-1],
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        # unpack: (B, h/2·w/2, C·4) -> (B, C, h, w), the inverse of _pack_latents
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)

    def preview_pipeline(self, layout: ModelLayout, denoiser, device, prediction_type: str, text_encoder=None):
        from diffusers import FluxPipeline

        assert text_encoder is None, "text_encoder_targets is empty: FLUX.1's text encoders are not trained"
        clip, t5, clip_tok, t5_tok = self._text_parts(layout, device)
        pipe = FluxPipeline(
            transformer=denoiser,
            vae=self.load_vae(layout, device),
            text_encoder=clip,
            tokenizer=clip_tok,
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
            scheduler=self.load_scheduler(layout),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipeline_renderer(pipe)

    def save_model(self, components: dict, out: Path) -> None:
        from diffusers import FluxPipeline

        if out.suffix == ".safetensors":
            return super().save_model(components, out)
        FluxPipeline(**components).save_pretrained(str(out), safe_serialization=True)

    # -- the original layout ------------------------------------------------------------------------------
    def to_single_file(self, state: dict) -> dict:
        """diffusers -> the original FLUX.1 layout (the inverse of convert_flux_transformer_checkpoint_to_diffusers):
        fused qkv and linear1, `.scale` norms, the final adaLN's halves as (shift, scale)."""
        import torch

        out, fused = {}, {}
        for key, value in state.items():
            module, param = key.rsplit(".", 1)
            target, index = original_name(module)
            if index is not None:
                fused.setdefault(f"{target}.{param}", {})[index] = value
                continue
            if ".norm." in target or target.endswith("_norm"):
                param = "scale"
            out[f"{target}.{param}"] = swap_halves(value) if module == SWAPPED else value
        for key, parts in fused.items():
            out[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
        return out

    def from_single_file(self, state: dict) -> dict:
        """The original FLUX.1 layout -> diffusers names, reading every width from the tensors."""
        import torch

        out = {}
        for key, value in state.items():
            module, param = key.rsplit(".", 1)
            parts = diffusers_parts(module)
            if parts is not None:
                for name, piece in zip(parts, torch.split(value, self._dims(module, value.shape[0])), strict=True):
                    out[f"{name}.{param}"] = piece
                continue
            name = diffusers_name(module)
            if name is None:
                raise KeyError(f"{key} is not a FLUX.1 transformer weight")
            if param == "scale":
                param = "weight"
            out[f"{name}.{param}"] = swap_halves(value) if name == SWAPPED else value
        return out

    @staticmethod
    def _dims(module: str, rows: int) -> list[int]:
        if module.endswith("linear1"):  # q, k, v and the MLP input: 3·H + 4·H rows
            h = rows // (3 + MLP_RATIO)
            return [h, h, h, rows - 3 * h]
        return [rows // 3] * 3

    def kohya_lora(self, state: dict, alpha) -> tuple[dict, dict]:
        """The trained LoRA (peft names, diffusers modules) in sd-scripts' FLUX.1 modules: -> (peft-named state over
        original modules, {module: alpha}). The parts of a fused module become one LoRA (fused.fuse_parts) whose
        alpha keeps the first part's alpha/rank, the others' scales baked into their rows; the final layer's
        modules have their scale baked in and alpha = rank (diffusers' converter reads no alpha for them), and
        the adaLN's up rows swapped to (shift, scale)."""
        from stages.families.fused import fuse_parts

        modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        out, alphas, groups = {}, {}, {}
        for m in modules:
            down, up = state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]
            a = float(alpha[m] if isinstance(alpha, dict) else alpha)
            try:
                target, index = original_name(m)
            except KeyError:
                raise KeyError(f"no original FLUX.1 name for the LoRA module {m}") from None
            if index is not None:
                groups.setdefault(target, {})[index] = (down, up, a / down.shape[0])
                continue
            if target.startswith("final_layer."):
                up, a = up * (a / down.shape[0]), float(down.shape[0])
                up = swap_halves(up) if m == SWAPPED else up
            out[f"{target}.lora_A.weight"], out[f"{target}.lora_B.weight"], alphas[target] = down, up, a
        for target, parts in groups.items():
            first = parts[min(parts)][2]
            n = len(DOUBLE_FUSED["img_attn.qkv"] if "_attn.qkv" in target else SINGLE_FUSED["linear1"])
            rows = [None] * n
            for i, part in parts.items():
                rows[i] = part[1].shape[0]
            dims = self._fill_dims(target, rows)
            fused = [None if i not in parts else (parts[i][0], parts[i][1] * (parts[i][2] / first)) for i in range(n)]
            down, up = fuse_parts(fused, dims)
            out[f"{target}.lora_A.weight"], out[f"{target}.lora_B.weight"] = down, up
            alphas[target] = first * down.shape[0]
        return out, alphas

    @staticmethod
    def _fill_dims(target: str, rows: list) -> list[int]:
        """Each part's output rows, for parts without a LoRA too (q, k, v have H rows; linear1's MLP part 4·H)."""
        h = next(r for i, r in enumerate(rows) if r is not None and i < 3) if any(rows[:3]) else rows[3] // MLP_RATIO
        return [h, h, h, MLP_RATIO * h][: len(rows)]

    def split_file_modules(self, modules: dict) -> dict:
        """LoraModules named by original modules (sd-scripts' files, dotted) -> diffusers module names; a fused
        module splits exactly (fused.split_fused), the final adaLN's up rows go back to (scale, shift)."""
        from stages.families.fused import split_fused
        from stages.training.lora_files import LoraModule

        out = {}
        for name, mod in modules.items():
            parts = diffusers_parts(name)
            if parts is not None and isinstance(mod, LoraModule):
                pieces = split_fused(mod.down, mod.up, mod.alpha, self._dims(name, mod.up.shape[0]))
                for part, piece in zip(parts, pieces, strict=True):
                    if piece is not None:
                        out[part] = LoraModule(*piece)
                continue
            new = diffusers_name(name)
            if new == SWAPPED and isinstance(mod, LoraModule):
                mod = LoraModule(mod.down, swap_halves(mod.up), mod.alpha)
            out[new or name] = mod  # unknown names stay: match_modules names them
        return out

    def lora_metadata(self, layout: ModelLayout | None = None, prediction_type: str | None = None) -> dict[str, str]:
        """sd-scripts' FLUX.1 identification (ss_base_model_version flux1; modelspec flux-1-dev or flux-1-schnell,
        by the guidance embedding [dev] has)."""
        variant = "dev" if layout is None or self.has_guidance_embed(layout) else "schnell"
        return {
            "ss_base_model_version": "flux1",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"flux-1-{variant}/lora",
            "modelspec.prediction_type": "flow",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        }


class FluxText:
    """CLIP-L and T5 as FluxPipeline.encode_prompt runs them: per caption T5's last hidden state over 512 padded
    tokens, and a last row with CLIP's pooler_output (see the module docstring)."""

    def __init__(self, tokenizers, models, device, max_length: int):
        import torch

        self.tokenizers, self.device, self.max_length = tokenizers, device, max_length
        self.model = torch.nn.ModuleList(models)  # one module, so that release() drops both

    def encode(self, captions: list[str]):
        import torch

        clip_tok, t5_tok = self.tokenizers
        clip, t5 = self.model
        captions = list(captions)
        with torch.no_grad():
            ids = clip_tok(
                captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids  # fmt: skip
            pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output
            ids = t5_tok(
                captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            ).input_ids
            embeds = t5(ids.to(self.device), output_hidden_states=False)[0]
        if pooled.shape[-1] > embeds.shape[-1]:
            raise ModelError(
                f"FLUX.1 text encoders: CLIP's pooled output ({pooled.shape[-1]} values) is wider than T5's hidden "
                f"states ({embeds.shape[-1]}); this is not a FLUX.1 model."
            )
        row = torch.zeros(embeds.shape[0], 1, embeds.shape[-1], dtype=embeds.dtype, device=embeds.device)
        row[:, 0, : pooled.shape[-1]] = pooled.to(embeds.dtype)
        return list(torch.cat([embeds, row], dim=1).float().cpu().numpy())
