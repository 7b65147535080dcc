"""Tiny Stable Diffusion models with random weights, built from configs and saved in the real formats.

Tests and the demo use them: a few MB, tens of milliseconds per training step on a CPU, nothing
downloaded. The architecture is SD 1.5's in miniature (CrossAttn down/up blocks, a VAE that downsamples
by 8, a CLIP text encoder) so every code path is the one a real checkpoint takes.
"""

from __future__ import annotations

import string
from pathlib import Path

TINY_VAE_SCALING = 5.0

CORPUS_WORDS = (
    "a an the photo drawing painting picture of red green blue yellow purple orange white black circle square "
    "triangle stripe stripes dot dots on in with background small large big bright dark cat dog car tree house "
    "sky sea mountain person style sharp blurry detailed simple pattern shape shapes"
)


def _bpe_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary built deterministically (the tokenizers trainer orders ties by hash).

    Every character, alone and word-final (`x</w>`), then for each word the merges that build it left to right.
    """
    special = ["<|startoftext|>", "<|endoftext|>"]
    chars = sorted({c for w in words for c in w} | set(string.digits + string.punctuation))
    tokens = special + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
            pieces = [pair[0] + pair[1], *pieces[2:]]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_tokenizer(max_length: int = 77):
    """A CLIP-style BPE tokenizer over a small fixed vocabulary (transformers 5 needs tokenizer_object)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTokenizerFast

    vocab, merges = _bpe_vocab(CORPUS_WORDS.split())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)]
    )
    return CLIPTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )


def tiny_vae_kwargs(latent_channels: int) -> dict:
    """The tiny VAE of every family: downsamples by 8, a few thousand parameters."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_clip_config(tokenizer, hidden: int, layers: int):
    """A CLIP text config of the tiny tokenizer's vocabulary (projection_dim = hidden)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_unet(
    seed: int = 0,
    block_out_channels=(32, 64),
    cross_attention_dim: int = 32,
    sample_size: int = 8,
    norm_num_groups: int = 8,
):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=norm_num_groups,
    )


def build_tiny_sd15(
    out_dir: Path, seed: int = 0, prediction_type: str = "epsilon", single_file: Path | None = None
) -> Path:
    """Save a tiny SD 1.5-style pipeline as a diffusers folder (and optionally as a single file too)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from stages.families.base import quiet_libraries

    quiet_libraries()
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, 32, 2))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        **tiny_vae_kwargs(4),
        # A random encoder's latents have std ~0.2; SD's VAE is scaled so that its latents have std ~1 against
        # unit noise. With 0.18215 the tiny latents would be ~0.03: noise would swamp any content to learn.
        scaling_factor=TINY_VAE_SCALING,
    )
    unet = tiny_unet(seed + 2)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    if single_file is not None:
        from stages.families.sd15_checkpoint import save_single_file

        save_single_file(unet, vae, text_encoder, Path(single_file))
    return out_dir


def perturb(model, seed: int, scale: float) -> None:
    """Move every weight tensor of a model by scale x (its std) of seeded Gaussian noise, in name order."""
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.numel() > 1:
                param.add_(torch.randn(param.shape, generator=g) * param.std() * scale)


def build_tiny_turbo(base_dir: Path, out_dir: Path, seed: int = 1, scale: float = 0.05) -> Path:
    """A "Turbo" sibling of a tiny model: the same VAE, text encoder and scheduler files, and a UNet whose
    every weight is moved by scale x (its tensor's std) of seeded Gaussian noise. Delta transfer needs just
    this: another denoiser in the same latent space."""
    import shutil

    from diffusers import UNet2DConditionModel

    from stages.families.base import quiet_libraries

    quiet_libraries()
    shutil.copytree(base_dir, out_dir)
    unet = UNet2DConditionModel.from_pretrained(str(base_dir), subfolder="unet", use_safetensors=True)
    perturb(unet, seed, scale)
    shutil.rmtree(out_dir / "unet")
    unet.save_pretrained(str(out_dir / "unet"), safe_serialization=True)
    return out_dir


def build_tiny_sdxl(
    out_dir: Path, seed: int = 0, prediction_type: str = "epsilon", size: str = "tiny", single_file: Path | None = None
) -> Path:
    """A tiny SDXL-style pipeline as a diffusers folder: a UNet with SDXL's layout in miniature (a first block
    without attention, layers_per_block 2, two transformer layers in the attention block, text_time added
    conditioning), CLIP-L and OpenCLIP-bigG-style text encoders (the second with a projection: the pooled
    output), and the tiny VAE. size "small": the benchmarks' wider UNet (64/128/256 channels, SDXL's three
    levels with 1, 2 and 2 transformer layers)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from stages.families.base import quiet_libraries

    quiet_libraries()
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, 32, 3))  # the pipeline reads the penultimate layer
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer, 48, 3))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**tiny_vae_kwargs(4), scaling_factor=TINY_VAE_SCALING)
    torch.manual_seed(seed + 2)
    shape = {
        "tiny": dict(block_out_channels=(32, 64), transformer_layers_per_block=(1, 2), attention_head_dim=(4, 8),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
        "small": dict(block_out_channels=(64, 128, 256), transformer_layers_per_block=(1, 1, 2),
                      attention_head_dim=(4, 4, 8),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    }[size]  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        **shape,
        layers_per_block=2,
        cross_attention_dim=32 + 48,  # the two encoders' hidden states, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 48,  # six size values, and the pooled text
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    if single_file is not None:
        from stages.families.sd15_checkpoint import save_single_file

        save_single_file(unet, vae, text_encoder, Path(single_file), text_encoder_2=text_encoder_2)
    return out_dir
