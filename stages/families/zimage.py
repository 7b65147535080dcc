"""Z-Image and Z-Image Turbo (Tongyi-MAI): a single-stream DiT over a 16-channel VAE, Qwen3 text conditioning
and flow matching.

Facts read from diffusers' ZImagePipeline and ZImageTransformer2DModel:
- text: the Qwen3 chat template with enable_thinking=True, max 512 tokens, the second-to-last hidden state,
  and only the tokens the attention mask keeps (`prompt_embeds[i][mask[i]]`);
- latents: (z − shift_factor) · scaling_factor of the VAE's posterior, 2×2 patches inside the transformer;
- the transformer takes a list of (C, 1, H, W) latents, t = 1 − σ, and returns −v (the pipeline negates it).
"""

from __future__ import annotations

from stages.families.base import Conditioning, ModelLayout
from stages.families.flow import FlowFamily, QwenText

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


class ZImageFamily(FlowFamily):
    name = "zimage"
    pretty = "Z-Image"
    pipeline_class = "ZImagePipeline"
    transformer_class = "ZImageTransformer2DModel"
    vae_class = "AutoencoderKL"
    default_targets = ATTENTION

    def is_single_file(self, header: dict) -> bool:
        return any(k.removeprefix("model.diffusion_model.") == "layers.0.adaLN_modulation.0.weight" for k in header)

    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        return (latent_shape[1] // 2) * (latent_shape[2] // 2)

    def load_text_encoder(self, layout: ModelLayout, device):
        model, tokenizer = self._text_parts(layout, device)
        return QwenText(tokenizer, model, device, self.max_text_tokens, (-2,), thinking=True, masked=True)

    def predict(self, denoiser, x_t, t, cond: Conditioning, guidance=None):
        import torch

        latents = list(x_t.unsqueeze(2).unbind(0))
        embeds = [e.to(x_t.dtype) for e in cond.rows()]
        out = denoiser(latents, 1 - t.to(x_t.dtype), embeds, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def to_single_file(self, state: dict) -> dict:
        """diffusers -> the original Z-Image layout (fused attention.qkv, attention.out, q_norm/k_norm, x_embedder,
        final_layer): the inverse of convert_z_image_transformer_checkpoint_to_diffusers."""
        import torch

        renames = {
            "all_final_layer.2-1.": "final_layer.",
            "all_x_embedder.2-1.": "x_embedder.",
            ".attention.to_out.0.": ".attention.out.",
            ".attention.norm_k.": ".attention.k_norm.",
            ".attention.norm_q.": ".attention.q_norm.",
        }
        out = {}
        for key, value in state.items():
            if ".attention.to_k." in key or ".attention.to_v." in key:
                continue
            if ".attention.to_q." in key:
                parts = [state[key.replace(".to_q.", f".to_{x}.")] for x in "qkv"]
                out[key.replace(".to_q.", ".qkv.")] = torch.cat(parts, dim=0)
                continue
            for a, b in renames.items():
                key = key.replace(a, b)
            out[key] = value
        return out
