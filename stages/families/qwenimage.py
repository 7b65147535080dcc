"""Qwen-Image (Alibaba Qwen): an MMDiT of 60 dual-stream blocks over a 16-channel causal video VAE, flow matching,
conditioned on the last hidden state of Qwen2.5-VL.

Facts read from diffusers' QwenImagePipeline, QwenImageTransformer2DModel and AutoencoderKLQwenImage:
- text: each caption in the pipeline's prompt template (a system message describing the image, then the user
  turn), tokenized up to 1024 + 34 tokens, the last hidden state of Qwen2.5-VL, only the tokens the attention mask
  keeps, less the template's first 34; the transformer takes them with their mask. We call the pipeline's own
  encode_prompt, so template, drop index and masking are its;
- latents: the VAE's posterior mode of a one-frame video, normalized per channel ((z − latents_mean) /
  latents_std, from the VAE config); the transformer sees them packed 2×2 as (B, h/2·w/2, 64) tokens with
  img_shapes [(1, h/2, w/2)];
- the transformer takes t = σ and predicts v = ε − x0; Qwen-Image has no guidance embedding (true CFG in the
  pipeline); the shift is resolution-dependent (exponential time shift in its scheduler config).

Module names in ComfyUI's Qwen-Image model (comfy/ldm/qwen_image/model.py) and in its single-file transformers are
diffusers' own (`transformer_blocks.N.attn.to_q`, `img_mlp.net.0.proj`, `img_mod.1`), so the single-file LoRA is
the generic `diffusion_model.<module>.lora_A/lora_B` + `.alpha` format that ComfyUI maps and diffusers converts
(musubi-tuner's `lora_unet_<module with _>` files are read too), and a single-file transformer is its state dict.
"""

from __future__ import annotations

from stages.families.base import Conditioning, ModelLayout
from stages.families.flow import FlowFamily

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' train_dreambooth_lora_qwen_image.py


class QwenImageFamily(FlowFamily):
    name = "qwenimage"
    pretty = "Qwen-Image"
    pipeline_class = "QwenImagePipeline"
    transformer_class = "QwenImageTransformer2DModel"
    vae_class = "AutoencoderKLQwenImage"
    default_targets = ATTENTION
    text_encoder_classes = ("Qwen2_5_VLForConditionalGeneration",)
    converts_single_file = True  # its single files hold diffusers' names: from_single_file is the identity
    max_text_tokens = 1024

    def is_single_file(self, header: dict) -> bool:
        keys = {k.removeprefix("model.diffusion_model.") for k in header}
        return "txt_norm.weight" in keys and "transformer_blocks.0.img_mod.1.weight" in keys

    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        return (latent_shape[1] // 2) * (latent_shape[2] // 2)

    def latent_space(self, layout: ModelLayout) -> dict:
        space = super().latent_space(layout)
        space["latent_channels"] = self.vae_config(layout).get("z_dim", 16)
        space["layout"] = "per-channel (z - latents_mean) / latents_std; packed 2x2 in the transformer"
        return space

    def has_guidance_embed(self, layout: ModelLayout) -> bool:
        return bool(self.transformer_config(layout).get("guidance_embeds", False))

    def _text_parts(self, layout: ModelLayout, device):
        import transformers

        self.text_encoder_class(layout)
        model = self._from_pretrained(layout, "text_encoder", transformers.Qwen2_5_VLForConditionalGeneration)
        model.to(device).eval().requires_grad_(False)
        return model, self._from_pretrained(layout, "tokenizer", transformers.AutoTokenizer)

    def load_text_encoder(self, layout: ModelLayout, device):
        model, tokenizer = self._text_parts(layout, device)
        return QwenImageText(tokenizer, model, device)

    def _stats(self, vae, like):
        import torch

        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def encode_images(self, vae, pixels):
        z = vae.encode(pixels.to(vae.device, vae.dtype)[:, :, None]).latent_dist.mode()[:, :, 0]
        mean, std = self._stats(vae, z)
        return (z - mean) / std

    def decode_latents(self, vae, latents):
        z = latents.to(vae.device, vae.dtype)
        mean, std = self._stats(vae, z)
        return vae.decode((z * std + mean)[:, :, None]).sample[:, :, 0]

    def predict(self, denoiser, x_t, t, cond: Conditioning, guidance=None):
        import torch
        from diffusers import QwenImagePipeline

        b, c, h, w = x_t.shape
        g = None if guidance is None else torch.full((b,), float(guidance), device=x_t.device, dtype=x_t.dtype)
        out = denoiser(
            hidden_states=QwenImagePipeline._pack_latents(x_t, b, c, h, w),
            timestep=t.to(x_t.dtype),
            guidance=g,
            encoder_hidden_states=cond.embeds.to(x_t.dtype),
            encoder_hidden_states_mask=cond.mask.to(x_t.device).long(),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)  # the inverse of _pack_latents
        return out.reshape(b, c, h, w)

    def preview_pipeline(self, layout: ModelLayout, denoiser, device, prediction_type: str, text_encoder=None):
        """The pipeline's true CFG (true_cfg_scale with an empty negative prompt) at the preview's guidance scale; 1
        or less: no CFG, as for a Lightning-style distilled sibling."""
        import torch
        from diffusers import QwenImagePipeline

        assert text_encoder is None, "text_encoder_targets is empty: Qwen-Image's text encoder is not trained"
        model, tokenizer = self._text_parts(layout, device)
        pipe = QwenImagePipeline(
            transformer=denoiser,
            vae=self.load_vae(layout, device),
            text_encoder=model,
            tokenizer=tokenizer,
            scheduler=self.load_scheduler(layout),
        )
        pipe.set_progress_bar_config(disable=True)

        def render(spec):
            negative = spec.negative_prompt or " "
            cfg = (
                {"true_cfg_scale": spec.guidance_scale, "negative_prompt": negative} if spec.guidance_scale > 1 else {}
            )
            out = pipe(
                prompt=spec.prompt,
                num_inference_steps=spec.steps,
                height=spec.height,
                width=spec.width,
                output_type="pil",
                generator=torch.Generator("cpu").manual_seed(spec.seed),
                **cfg,
            )
            return out.images[0]

        return render

    def to_single_file(self, state: dict) -> dict:
        return dict(state)  # ComfyUI's single-file transformers use diffusers' names

    def from_single_file(self, state: dict) -> dict:
        return state

    def lora_metadata(self, layout: ModelLayout | None = None, prediction_type: str | None = None) -> dict[str, str]:
        return {
            "ss_base_model_version": "qwen_image",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "qwen-image/lora",
            "modelspec.prediction_type": "flow",
            "modelspec.implementation": "https://github.com/huggingface/diffusers",
        }


class QwenImageText:
    """Qwen2.5-VL through QwenImagePipeline's own encode_prompt (a pipeline holding only the text parts). encode()
    -> one float32 (L_i, D) array per caption: the tokens the mask keeps, after the template's first 34."""

    def __init__(self, tokenizer, model, device):
        from diffusers import QwenImagePipeline

        self.model, self.device = model, device
        self.pipe = QwenImagePipeline(
            scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer, transformer=None
        )

    def encode(self, captions: list[str]):
        import torch

        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(list(captions), device=self.device)
        if mask is None:  # every caption as long as the longest: the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool)
        return [e[m.bool()].float().cpu().numpy() for e, m in zip(embeds, mask.cpu(), strict=True)]
