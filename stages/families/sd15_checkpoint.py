"""Write a Stable Diffusion 1.x or SDXL pipeline as an original (LDM/SGM-layout) single-file .safetensors checkpoint.

The inverse of diffusers' single-file loader, for any number of blocks, so tiny models can be saved in
the real single-file format and loaded back through `from_single_file`. Key layout facts follow the
original `ldm` module tree: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`;
SDXL's (sgm) names its text encoders `conditioner.embedders.0.transformer.*` (CLIP-L, transformers' names) and
`conditioner.embedders.1.model.*` (OpenCLIP bigG in open_clip's names: fused in_proj, text_projection as x @ P).
"""

from __future__ import annotations

from pathlib import Path


def _unet_prefix_map(config) -> list[tuple[str, str]]:
    """(diffusers prefix, ldm prefix) pairs for a UNet2DConditionModel config."""
    n = len(config.block_out_channels)
    per = config.layers_per_block
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),  # SDXL's size and pooled-text embedding
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i, kind in enumerate(config.down_block_types):
        for j in range(per):
            ldm = (per + 1) * i + j + 1
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{ldm}.0."))
            if kind.startswith("CrossAttn"):
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{ldm}.1."))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op."))
    for i, kind in enumerate(config.up_block_types):
        has_attn = kind.startswith("CrossAttn")
        for j in range(per + 1):
            ldm = (per + 1) * i + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{ldm}.0."))
            if has_attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{ldm}.1."))
        if i < n - 1:
            pairs.append(
                (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{2 if has_attn else 1}.")
            )
    return pairs


_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
]


def unet_to_ldm(state_dict: dict, config) -> dict:
    pairs = sorted(_unet_prefix_map(config), key=lambda p: -len(p[0]))
    out = {}
    for key, value in state_dict.items():
        for hf, ldm in pairs:
            if key.startswith(hf):
                rest = key[len(hf) :]
                if ".resnets." in hf:
                    for a, b in _RESNET:
                        if rest.startswith(a):
                            rest = b + rest[len(a) :]
                            break
                key = ldm + rest
                break
        else:
            raise KeyError(f"no LDM name for UNet weight {key}")
        out["model.diffusion_model." + key] = value
    return out


def vae_to_ldm(state_dict: dict, config) -> dict:
    n = len(config.block_out_channels)
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.mid_block.resnets.{i}.", f"{side}.mid.block_{i + 1}.") for i in range(2)]
        pairs.append((f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1."))
    for i in range(n):
        pairs.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        pairs.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    pairs.sort(key=lambda p: -len(p[0]))
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for key, value in state_dict.items():
        for hf, ldm in pairs:
            if key.startswith(hf):
                rest = key[len(hf) :]
                if hf.endswith("mid_block.attentions.0."):
                    for a, b in attn.items():
                        if rest.startswith(a):
                            rest = b + rest[len(a) :]
                            break
                    if rest.endswith("weight") and value.ndim == 2:
                        value = value.reshape(*value.shape, 1, 1)  # LDM uses 1x1 convs for attention
                key = ldm + rest.replace("conv_shortcut.", "nin_shortcut.")
                break
        out["first_stage_model." + key] = value
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict:
    # Real checkpoints name CLIP weights `...transformer.text_model.*`; transformers >= 5.6 flattened the
    # module tree (no `text_model.`), older versions did not.
    out = {}
    for k, v in text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out[prefix + k] = v
    return out


def open_clip_to_ldm(text_encoder, prefix: str = "conditioner.embedders.1.model.") -> dict:
    """A CLIPTextModelWithProjection in open_clip's names (what diffusers' convert_open_clip_checkpoint reads):
    resblocks with one in_proj for q, k and v, ln_1/ln_2, mlp.c_fc/c_proj, and the projection transposed."""
    import torch

    top = {"embeddings.position_embedding.weight": "positional_embedding",
           "embeddings.token_embedding.weight": "token_embedding.weight",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    inner = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
             "self_attn.out_proj.": "attn.out_proj."}  # fmt: skip
    out, qkv = {}, {}
    for k, v in text_encoder.state_dict().items():
        if k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
            continue
        k = k.removeprefix("text_model.")
        if k in top:
            out[prefix + top[k]] = v
        elif k.startswith("encoder.layers."):
            n, rest = k.removeprefix("encoder.layers.").split(".", 1)
            block = f"{prefix}transformer.resblocks.{n}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                kind = rest.split(".")[-1]  # weight | bias
                qkv.setdefault(f"{block}attn.in_proj_{kind}", {})[rest.split(".")[1]] = v
                continue
            for a, b in inner.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            out[block + rest] = v
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def save_single_file(unet, vae, text_encoder, path: Path, text_encoder_2=None) -> None:
    """An SD 1.x checkpoint; with text_encoder_2, SDXL's (sgm conditioner names for the two text encoders)."""
    from safetensors.torch import save_file

    sd = {}
    sd.update(unet_to_ldm(unet.state_dict(), unet.config))
    sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    if text_encoder_2 is None:
        sd.update(clip_to_ldm(text_encoder, "cond_stage_model.transformer."))
    else:
        sd.update(clip_to_ldm(text_encoder, "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(text_encoder_2))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
