"""FLUX.2 (Black Forest Labs): [klein] Base and distilled, and [dev]. An MMDiT with double- and single-stream
blocks over a 32-channel VAE, flow matching; [klein] is conditioned by Qwen3, [dev] by Mistral Small 3.1.

Facts read from diffusers' Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel and AutoencoderKLFlux2:
- text ([klein]): the Qwen3 chat template with enable_thinking=False, padded to 512 tokens, the hidden states of
  layers (9, 18, 27) of the 36-layer encoder concatenated per token; the whole padded sequence is passed,
  unmasked. For another depth d we take (d/4, d/2, 3d/4), which is (9, 18, 27) at d = 36;
- text ([dev], Flux2Pipeline): Mistral3ForConditionalGeneration's language model behind its chat template with
  the pipeline's system message, padded to 512 tokens, layers (10, 20, 30) of 40 — (d/4, d/2, 3d/4) again —
  stacked the same way. We call the pipeline's own `_get_mistral_3_small_prompt_embeds`;
- latents: the VAE posterior's mode, 2×2-patchified to 128 channels and normalized by the VAE's batch-norm
  running statistics; the transformer sees them packed as (B, h·w, 128) tokens with (t, h, w, l) position ids;
- the transformer takes t = σ and predicts v = ε − x0; [klein] has no guidance embedding (guidance=None),
  [dev] has one (`guidance_embeds`, the pipeline's default guidance 4.0) and takes the guidance value;
- single blocks fuse q, k, v and the MLP input in one projection (attn.to_qkv_mlp_proj).
"""

from __future__ import annotations

from stages.families.base import Conditioning, ModelLayout
from stages.families.flow import FlowFamily, QwenText, read_model_index

DOUBLE = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
SINGLE = ["to_qkv_mlp_proj"]

# diffusers module (inside transformer_blocks.N.) -> original module (inside double_blocks.N.), 1:1
DOUBLE_RENAMES = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
# fused projections of the original layout: (diffusers q, k, v module) -> original module
FUSED = {
    ("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn.qkv",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn.qkv",
}
SINGLE_RENAMES = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
TOP_RENAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


def original_module(name: str) -> str | None:
    """The original (BFL) module of a diffusers module that maps 1:1, or None (fused q/k/v parts, unknown)."""
    parts = name.split(".")
    if parts[0] == "transformer_blocks":
        inner = ".".join(parts[2:])
        new = DOUBLE_RENAMES.get(inner) or DOUBLE_NORMS.get(inner)
        return f"double_blocks.{parts[1]}.{new}" if new else None
    if parts[0] == "single_transformer_blocks":
        inner = ".".join(parts[2:])
        new = SINGLE_RENAMES.get(inner) or SINGLE_NORMS.get(inner)
        return f"single_blocks.{parts[1]}.{new}" if new else None
    return TOP_RENAMES.get(name)


def fused_parts(name: str) -> tuple[str, int, str] | None:
    """(original fused module, index 0/1/2, diffusers block prefix) for a q/k/v projection of a double block."""
    parts = name.split(".")
    if parts[0] != "transformer_blocks":
        return None
    inner = ".".join(parts[2:])
    for trio, fused in FUSED.items():
        if inner in trio:
            return f"double_blocks.{parts[1]}.{fused}", trio.index(inner), f"transformer_blocks.{parts[1]}."
    return None


MISTRAL = "Mistral3ForConditionalGeneration"  # FLUX.2 [dev]'s text encoder


class Flux2Family(FlowFamily):
    name = "flux2"
    pretty = "FLUX.2"
    pipeline_class = "Flux2KleinPipeline"  # writes the LoRA files; Flux2Pipeline's loader is the same mixin
    transformer_class = "Flux2Transformer2DModel"
    vae_class = "AutoencoderKLFlux2"
    default_targets = DOUBLE + SINGLE
    networks = ("lora",)  # its files fuse q/k/v (comfy_lora), which only a plain LoRA can express
    text_encoder_classes = (*FlowFamily.text_encoder_classes, MISTRAL)

    def model_pipeline_class(self, text_encoder_class: str) -> str:
        return "Flux2Pipeline" if text_encoder_class == MISTRAL else "Flux2KleinPipeline"

    def is_single_file(self, header: dict) -> bool:
        keys = {k.removeprefix("model.diffusion_model.") for k in header}
        return "single_stream_modulation.lin.weight" in keys or any(k.startswith("double_blocks.") for k in keys)

    def latent_space(self, layout: ModelLayout) -> dict:
        space = super().latent_space(layout)
        space["latent_channels"] = 4 * space["latent_channels"]  # 2x2-patchified, batch-norm normalized
        space["layout"] = "patchified 2x2, batch-norm normalized"
        return space

    def latent_shape(self, layout: ModelLayout, resolution: int) -> tuple[int, ...]:
        return (self.latent_space(layout)["latent_channels"], resolution // 16, resolution // 16)

    def has_guidance_embed(self, layout: ModelLayout) -> bool:
        return bool(self.transformer_config(layout).get("guidance_embeds", False))

    def pipeline_extra(self, layout: ModelLayout) -> dict:
        if self.text_encoder_class(layout) == MISTRAL:
            return {}  # Flux2Pipeline has no is_distilled
        return {"is_distilled": bool(read_model_index(self._root(layout)).get("is_distilled", False))}

    @staticmethod
    def text_layers(text_encoder) -> tuple[int, int, int]:
        config = getattr(text_encoder.config, "text_config", None) or text_encoder.config  # Mistral3: text_config
        d = config.num_hidden_layers
        return (d // 4, d // 2, 3 * d // 4)

    def call_extra(self, text_encoder) -> dict:
        return {"text_encoder_out_layers": self.text_layers(text_encoder)}

    def _bn(self, vae, like):
        import torch

        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode_images(self, vae, pixels):
        from diffusers import Flux2KleinPipeline

        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        z = Flux2KleinPipeline._patchify_latents(z)
        mean, std = self._bn(vae, z)
        return (z - mean) / std

    def decode_latents(self, vae, latents):
        from diffusers import Flux2KleinPipeline

        z = latents.to(vae.device, vae.dtype)
        mean, std = self._bn(vae, z)
        return vae.decode(Flux2KleinPipeline._unpatchify_latents(z * std + mean)).sample

    def load_text_encoder(self, layout: ModelLayout, device):
        model, tokenizer = self._text_parts(layout, device)
        layers = self.text_layers(model)
        if type(model).__name__ == MISTRAL:
            return MistralText(tokenizer, model, device, self.max_text_tokens, layers)
        return QwenText(tokenizer, model, device, self.max_text_tokens, layers, thinking=False, masked=False)

    def predict(self, denoiser, x_t, t, cond: Conditioning, guidance=None):
        import torch
        from diffusers import Flux2KleinPipeline

        b, c, h, w = x_t.shape
        tokens = x_t.reshape(b, c, h * w).permute(0, 2, 1)
        embeds = cond.embeds.to(x_t.dtype)
        img_ids = Flux2KleinPipeline._prepare_latent_ids(x_t).to(x_t.device)
        txt_ids = Flux2KleinPipeline._prepare_text_ids(embeds).to(x_t.device)
        g = None if guidance is None else torch.full((b,), float(guidance), device=x_t.device, dtype=x_t.dtype)
        out = denoiser(
            hidden_states=tokens,
            encoder_hidden_states=embeds,
            timestep=t.to(x_t.dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            return_dict=False,
        )[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w)

    def to_single_file(self, state: dict) -> dict:
        """diffusers -> the original FLUX.2 layout: the inverse of convert_flux2_transformer_checkpoint_to_diffusers
        (fused qkv in double blocks, `.scale` norms, the final adaLN's (scale, shift) halves back to (shift, scale))."""
        import torch

        out = {}
        for key, value in state.items():
            module, param = key.rsplit(".", 1)
            fused = fused_parts(module)
            if fused is not None:
                target, index, prefix = fused
                if index == 0:
                    trio = next(t for t in FUSED if module.endswith(t[0]))
                    out[f"{target}.{param}"] = torch.cat([state[f"{prefix}{m}.{param}"] for m in trio], dim=0)
                continue
            new = original_module(module)
            if new is None:
                raise KeyError(f"no original FLUX.2 name for {key}")
            if ".norm." in new or new.endswith("_norm"):
                param = "scale"
            if module == "norm_out.linear":
                scale, shift = value.chunk(2, dim=0)
                value = torch.cat([shift, scale], dim=0)
            out[f"{new}.{param}"] = value
        return out

    def comfy_lora(self, state: dict, alpha) -> tuple[dict, None]:
        """The trained LoRA in the original module names that ComfyUI maps for FLUX.2 (`diffusion_model.<original
        module>`, comfy/lora.py's generic key map) and diffusers converts (_convert_non_diffusers_flux2_lora_to_
        diffusers, which takes no alpha keys: the alpha/rank scale is baked into lora_B, as ai-toolkit files have
        it; ComfyUI reads a missing alpha as alpha = rank, the same thing). A q/k/v trio of a double block becomes
        one LoRA on the fused qkv: down = [A_q; A_k; A_v], up = blockdiag(s_q B_q, s_k B_k, s_v B_v) (rank 3r,
        the same ΔW exactly)."""
        import torch

        modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        scale = {
            m: float(alpha[m] if isinstance(alpha, dict) else alpha) / state[f"{m}.lora_A.weight"].shape[0]
            for m in modules
        }
        out, trios = {}, {}
        for m in modules:
            fused = fused_parts(m)
            if fused is not None:
                trios.setdefault(fused[0], {})[fused[1]] = m
                continue
            new = original_module(m)
            if new is None:
                raise KeyError(f"no original FLUX.2 name for the LoRA module {m}")
            out[f"{new}.lora_A.weight"] = state[f"{m}.lora_A.weight"]
            out[f"{new}.lora_B.weight"] = state[f"{m}.lora_B.weight"] * scale[m]
        for target, parts in trios.items():
            some = next(iter(parts.values()))
            down, up = state[f"{some}.lora_A.weight"], state[f"{some}.lora_B.weight"]
            r, d_in, d_out = down.shape[0], down.shape[1], up.shape[0]
            fused_down = torch.zeros(3 * r, d_in)
            fused_up = torch.zeros(3 * d_out, 3 * r)
            for i, m in parts.items():
                fused_down[i * r : (i + 1) * r] = state[f"{m}.lora_A.weight"]
                fused_up[i * d_out : (i + 1) * d_out, i * r : (i + 1) * r] = state[f"{m}.lora_B.weight"] * scale[m]
            out[f"{target}.lora_A.weight"], out[f"{target}.lora_B.weight"] = fused_down, fused_up
        return out, None


class MistralText:
    """FLUX.2 [dev]'s frozen Mistral3 text encoder, run by Flux2Pipeline's own prompt-embedding function (its
    system message and chat format, 512 tokens, the stacked layers). encode() -> one float32 (512, 3·D) array per
    caption: the whole padded sequence, as the pipeline passes it."""

    def __init__(self, tokenizer, model, device, max_length: int, layers):
        self.tokenizer, self.model, self.device = tokenizer, model, device
        self.max_length, self.layers = max_length, tuple(layers)

    def encode(self, captions: list[str]):
        import torch
        from diffusers import Flux2Pipeline

        with torch.no_grad():
            embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
                self.model,
                self.tokenizer,
                list(captions),
                dtype=torch.float32,
                device=self.device,
                max_sequence_length=self.max_length,
                hidden_states_layers=self.layers,
            )
        return [row.cpu().numpy() for row in embeds]


def split_original_modules(modules: dict) -> dict:
    """LoraModules named in the original FLUX.2 layout -> diffusers module names; a fused qkv LoRA becomes three
    LoRAs of the same rank that share its down factor, each with its rows of the up factor (exact)."""
    from stages.training.lora_files import LoraModule

    inverse = {}
    for diffusers_name, original in {**DOUBLE_RENAMES, **SINGLE_RENAMES}.items():
        inverse[original] = diffusers_name
    top = {v: k for k, v in TOP_RENAMES.items()}
    fused_inv = {v: k for k, v in FUSED.items()}
    out = {}
    for name, mod in modules.items():
        parts = name.split(".")
        if parts[0] in ("double_blocks", "single_blocks"):
            block = "transformer_blocks" if parts[0] == "double_blocks" else "single_transformer_blocks"
            inner = ".".join(parts[2:])
            if parts[0] == "double_blocks" and inner in fused_inv:
                n, r = mod.up.shape[0] // 3, mod.rank
                # A block-diagonal up factor (how this tool and ai-toolkit fuse q, k, v) splits back into three
                # LoRAs of a third of the rank; any other splits exactly at the full rank, sharing the down factor.
                k = r // 3 if r % 3 == 0 else 0
                diagonal = k and all(
                    not mod.up[i * n : (i + 1) * n, j * k : (j + 1) * k].any()
                    for i in range(3)
                    for j in range(3)
                    if i != j
                )
                for i, sub in enumerate(fused_inv[inner]):
                    rows = mod.up[i * n : (i + 1) * n]
                    if diagonal:
                        scale = k / r  # keep alpha/rank: the same ΔW at a third of the rank
                        part = LoraModule(
                            mod.down[i * k : (i + 1) * k].clone(),
                            rows[:, i * k : (i + 1) * k].clone(),
                            mod.alpha * scale,
                        )
                    else:
                        part = LoraModule(mod.down.clone(), rows.clone(), mod.alpha)
                    out[f"{block}.{parts[1]}.{sub}"] = part
                continue
            if inner in inverse:
                out[f"{block}.{parts[1]}.{inverse[inner]}"] = mod
                continue
        if name in top:
            out[top[name]] = mod
            continue
        out[name] = mod  # already a diffusers name (or unknown: match_modules names it)
    return out
