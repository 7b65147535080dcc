"""Tiny Z-Image, FLUX.2 [klein] and [dev], FLUX.1 and Qwen-Image models with random weights, in the real formats.

The architectures are the real diffusers classes in miniature (a few hundred thousand parameters), with a
tiny Qwen3 text encoder (FLUX.2 [dev]: a tiny Mistral3ForConditionalGeneration; FLUX.1: tiny CLIP and T5 encoders)
and an offline byte-level BPE tokenizer that carries the model's chat template (T5: a Unigram one), so every
code path — chat template, hidden-state selection, masking, packing, position ids — is the real one.
A "Turbo"/distilled sibling is the same folder with every transformer weight moved by seeded noise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stages.families.tiny import CORPUS_WORDS, perturb

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template, reduced to what captions need: user turns and the generation prompt, with the empty
# thinking block that enable_thinking=False adds.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


# Mistral Small 3.1's special tokens and chat format ("<s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]"), reduced
# to what FLUX.2 [dev]'s pipeline sends: a system message and a user turn, each a list of text parts.
MISTRAL_SPECIAL = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
]
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{%- for part in message['content'] %}{{- part['text'] }}{%- endfor %}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' %}[INST]"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- else %}[IMG]"
    "{%- endif %}{%- endfor %}[/INST]"
    "{%- endif %}{%- endfor %}"
)


def _byte_level_bpe(first: list[str]):
    """A byte-level BPE model over CORPUS_WORDS, its vocabulary starting with `first`, built without training
    (the tokenizers trainer orders ties by hash, so it would not be reproducible)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for t in first + alphabet:
        vocab.setdefault(t, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(CORPUS_WORDS.split())):
        for form in (word, "Ġ" + word):
            pieces = list(form)
            while len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                if pair not in merges:
                    merges.append(pair)
                    vocab.setdefault(pair[0] + pair[1], len(vocab))
                pieces = [pair[0] + pair[1], *pieces[2:]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def build_qwen_tokenizer(max_length: int = 512):
    """A Qwen2-style byte-level BPE tokenizer over a small fixed vocabulary."""
    from transformers import Qwen2TokenizerFast

    tok = _byte_level_bpe([])
    tok.add_special_tokens(SPECIAL)
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=max_length,
        chat_template=CHAT_TEMPLATE,
    )


def build_mistral_tokenizer(max_length: int = 512):
    """A Mistral-style byte-level BPE tokenizer with Mistral Small 3.1's special tokens and chat format. The real
    FLUX.2 [dev] folder holds a PixtralProcessor there; its tokenizer files load the same way (AutoTokenizer)."""
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(MISTRAL_SPECIAL)
    tok.add_special_tokens(MISTRAL_SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
        chat_template=MISTRAL_TEMPLATE,
    )


def tiny_mistral3(vocab_size: int, image_token: int, seed: int, layers: int = 4, hidden: int = 32):
    """Mistral3ForConditionalGeneration in miniature: a tiny Pixtral vision tower (unused for text) and a
    Mistral language model whose hidden states FLUX.2 [dev] stacks."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            image_size=64,
            patch_size=16,
        ),
        text_config=MistralConfig(**_tiny_decoder(vocab_size, hidden, layers)),
        image_token_index=image_token,
        spatial_merge_size=1,
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
    )
    return Mistral3ForConditionalGeneration(config)


def tiny_qwen3(vocab_size: int, seed: int, layers: int, causal_lm: bool, hidden: int = 32):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(**_tiny_decoder(vocab_size, hidden, layers), tie_word_embeddings=causal_lm)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def _tiny_decoder(vocab_size: int, hidden: int, layers: int) -> dict:
    """The shape of the tiny decoder-only language models (Qwen3, Mistral): 4 heads over 2 KV heads."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=1024,
    )


def _vae_kwargs(latent_channels: int) -> dict:
    from stages.families.tiny import tiny_vae_kwargs

    return tiny_vae_kwargs(latent_channels)


def build_tiny_zimage(out_dir: Path, seed: int = 0, single_file: Path | None = None, size: str = "tiny") -> Path:
    """A tiny ZImagePipeline folder (and optionally the transformer as an original-layout single file)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    from stages.families.base import quiet_libraries
    from stages.families.tiny import TINY_VAE_SCALING

    quiet_libraries()
    tokenizer = build_qwen_tokenizer()
    text_encoder = tiny_qwen3(len(tokenizer), seed, layers=2, causal_lm=False)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**_vae_kwargs(16), scaling_factor=TINY_VAE_SCALING, shift_factor=0.05)
    torch.manual_seed(seed + 2)
    shape = {
        "tiny": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [4, 6, 6]},
        # benchmarks/transfer.py: the largest that trains in a fraction of a second a step on 2 cores
        "small": {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24]},
    }[size]
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        n_refiner_layers=1,
        cap_feat_dim=32,
        axes_lens=[64, 64, 64],
        **shape,
    )
    _scale_up(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    if single_file is not None:
        _save_single_file("zimage", transformer, Path(single_file))
    return out_dir


def build_tiny_flux2(
    out_dir: Path,
    seed: int = 0,
    single_file: Path | None = None,
    guidance_embeds: bool | None = None,
    size: str = "tiny",
    variant: str = "klein",
):
    """A tiny Flux2KleinPipeline folder, or with variant="dev" a Flux2Pipeline one (FLUX.2 [dev]: the same
    transformer class with a guidance embedding, a Mistral3 text encoder). guidance_embeds overrides the
    variant's (klein: none)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    from stages.families.base import quiet_libraries

    quiet_libraries()
    if variant == "dev":
        tokenizer = build_mistral_tokenizer()
        text_encoder = tiny_mistral3(len(tokenizer), tokenizer.convert_tokens_to_ids("[IMG]"), seed)
    else:
        tokenizer = build_qwen_tokenizer()
        text_encoder = tiny_qwen3(len(tokenizer), seed, layers=4, causal_lm=True)
    if guidance_embeds is None:
        guidance_embeds = variant == "dev"
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(**_vae_kwargs(32))
    # The batch-norm statistics the latents are normalized with: a random encoder's latents have std ~0.2, so
    # without them the tiny latents would drown in unit noise.
    g = torch.Generator("cpu").manual_seed(seed + 3)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.02)
    vae.bn.running_var.fill_(0.04)
    torch.manual_seed(seed + 2)
    shape = {
        "tiny": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2},
        "small": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 64, "num_attention_heads": 4},
    }[size]
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        joint_attention_dim=3 * 32,
        timestep_guidance_channels=64,
        mlp_ratio=2.0,
        axes_dims_rope=(shape["attention_head_dim"] // 4,) * 4,
        guidance_embeds=guidance_embeds,
        **shape,
    )
    _scale_up(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    if variant == "dev":
        pipe = diffusers.Flux2Pipeline(**parts)
    else:
        pipe = diffusers.Flux2KleinPipeline(**parts, is_distilled=False)
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    if single_file is not None:
        _save_single_file("flux2", transformer, Path(single_file))
    return out_dir


def build_t5_tokenizer(max_length: int = 512):
    """A T5-style SentencePiece-Unigram tokenizer over the corpus words (▁word pieces, </s> appended, <pad> 0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = sorted(set(CORPUS_WORDS.split()))
    chars = sorted(set("".join(words)) | set("0123456789.,!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
        model_max_length=max_length,
    )  # fmt: skip


def build_tiny_flux1(out_dir: Path, seed: int = 0, single_file: Path | None = None, size: str = "tiny") -> Path:
    """A tiny FluxPipeline folder of FLUX.1 [dev]: CLIP-L- and T5-style encoders, the 16-channel tiny VAE with a
    shift and scale, a transformer with a guidance embedding and dynamic shifting, as the real [dev] has."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from stages.families.base import quiet_libraries
    from stages.families.tiny import TINY_VAE_SCALING, build_tokenizer, tiny_clip_config

    quiet_libraries()
    clip_tok, t5_tok = build_tokenizer(), build_t5_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(tiny_clip_config(clip_tok, 32, 2))
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok), d_model=48, d_kv=12, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        )
    )  # fmt: skip
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**_vae_kwargs(16), scaling_factor=TINY_VAE_SCALING, shift_factor=0.05)
    torch.manual_seed(seed + 2)
    shape = {
        "tiny": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2},
        "small": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 64, "num_attention_heads": 4},
    }[size]
    head = shape["attention_head_dim"]
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        joint_attention_dim=48,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(head // 4, 3 * head // 8, 3 * head // 8),
        **shape,
    )
    _scale_up(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        transformer=transformer,
    )  # fmt: skip
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    if single_file is not None:
        _save_single_file("flux1", transformer, Path(single_file))
    return out_dir


def tiny_qwen25_vl(vocab_size: int, seed: int, hidden: int = 32):
    """Qwen2_5_VLForConditionalGeneration in miniature: a one-block vision tower (unused for text) and a two-layer
    language model with multimodal RoPE whose last hidden state Qwen-Image reads."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {**_tiny_decoder(vocab_size + 4, hidden, 2), "bos_token_id": None, "eos_token_id": None}
    text.pop("head_dim")
    head = hidden // text["num_attention_heads"]
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0])  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [head // 4, head // 8, head // 8]}},
        vision_config=vision,
        image_token_id=vocab_size,
        video_token_id=vocab_size + 1,
        vision_start_token_id=vocab_size + 2,
        vision_end_token_id=vocab_size + 3,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwenimage(out_dir: Path, seed: int = 0, single_file: Path | None = None, size: str = "tiny") -> Path:
    """A tiny QwenImagePipeline folder: a Qwen2.5-VL-style text encoder, the causal video VAE in miniature (its
    per-channel latents_mean / latents_std), a two-block transformer, and Qwen-Image's scheduler settings
    (exponential resolution-dependent shift)."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from stages.families.base import quiet_libraries

    quiet_libraries()
    tokenizer = build_qwen_tokenizer(1024)
    text_encoder = tiny_qwen25_vl(len(tokenizer), seed)
    torch.manual_seed(seed + 1)
    g = torch.Generator("cpu").manual_seed(seed + 3)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        # a random encoder's latents are small: statistics of that size, so the tiny latents are not drowned in noise
        latents_mean=[round(float(v), 4) for v in torch.randn(16, generator=g) * 0.02],
        latents_std=[0.2] * 16,
    )
    torch.manual_seed(seed + 2)
    shape = {
        "tiny": {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "axes_dims_rope": (4, 6, 6)},
        "small": {"num_layers": 4, "attention_head_dim": 64, "num_attention_heads": 4, "axes_dims_rope": (16, 24, 24)},
    }[size]
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, joint_attention_dim=32, **shape
    )
    _scale_up(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    if single_file is not None:
        _save_single_file("qwenimage", transformer, Path(single_file))
    return out_dir


def build_tiny_flux1_schnell(base_dir: Path, out_dir: Path, seed: int = 1, scale: float = 0.05) -> Path:
    """The [schnell]-like sibling of a tiny FLUX.1 [dev]: the same encoders and VAE, a timestep-distilled
    transformer without a guidance embedding (the [dev] weights less guidance_in, moved by seeded noise as
    build_tiny_flow_turbo does) and [schnell]'s scheduler (shift 1, no dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from stages.families.base import quiet_libraries

    quiet_libraries()
    shutil.copytree(base_dir, out_dir)
    dev = FluxTransformer2DModel.from_pretrained(str(base_dir), subfolder="transformer", use_safetensors=True)
    config = {k: v for k, v in dev.config.items() if not k.startswith("_")}
    schnell = FluxTransformer2DModel.from_config({**config, "guidance_embeds": False})
    state = {k: v for k, v in dev.state_dict().items() if "guidance_embedder" not in k}
    schnell.load_state_dict(state, strict=True)
    perturb(schnell, seed, scale)
    shutil.rmtree(out_dir / "transformer")
    schnell.save_pretrained(str(out_dir / "transformer"), safe_serialization=True)
    shutil.rmtree(out_dir / "scheduler")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False).save_pretrained(
        str(out_dir / "scheduler")
    )
    return out_dir


def _scale_up(model) -> None:
    """diffusers zero-initializes the output layers and modulations of these DiTs, so a fresh model predicts 0
    whatever its input: a LoRA would have nothing to change. Random weights everywhere make it a function."""
    import torch

    g = torch.Generator("cpu").manual_seed(1234)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim >= 1 and float(param.abs().max()) == 0.0:
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)


def _save_single_file(family_name: str, transformer, path: Path) -> None:
    from safetensors.torch import save_file

    from stages.families import get_family

    state = get_family(family_name).to_single_file(transformer.state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def build_tiny_flow_turbo(base_dir: Path, out_dir: Path, seed: int = 1, scale: float = 0.05) -> Path:
    """The distilled sibling of a tiny flow model: the same folder, every transformer weight moved by
    scale x (its tensor's std) of seeded Gaussian noise; FLUX.2 [klein]'s model_index says is_distilled."""
    import json

    import diffusers

    from stages.families.base import quiet_libraries

    quiet_libraries()
    shutil.copytree(base_dir, out_dir)
    cls_name = json.loads((Path(base_dir) / "transformer" / "config.json").read_text())["_class_name"]
    model = getattr(diffusers, cls_name).from_pretrained(str(base_dir), subfolder="transformer", use_safetensors=True)
    perturb(model, seed, scale)
    shutil.rmtree(out_dir / "transformer")
    model.save_pretrained(str(out_dir / "transformer"), safe_serialization=True)
    index = out_dir / "model_index.json"
    data = json.loads(index.read_text())
    if "is_distilled" in data:
        data["is_distilled"] = True
        index.write_text(json.dumps(data, indent=2, sort_keys=True))
    return out_dir
