"""The config schema: the strict pydantic models a `pipeline.toml` is read into (pipeline/config_loading.py reads
it, applies --set overrides and turns validation errors into messages).

Semantic settings (they change what a stage produces, so they are hashed into stage keys) live in the
data/model/stage sections; runtime settings (where things go, which device, how often to preview) live
in `[runtime]` and never enter a key. Every field's description is its documentation: it feeds
`docs/config.md`, `pipeline init` and `--help`. The data side ([data], [[data.subsets]], [latents]) is in
pipeline/config_data.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from pipeline.config_data import (  # noqa: F401 -- re-exported
    DataConfig,
    LatentsConfig,
    Section,
    SubsetConfig,
    TagConfig,
)


class ModelConfig(Section):
    """The base model that is trained and that encodes latents and text."""

    family: Literal["auto", "sd15", "sdxl", "flux1", "zimage", "flux2", "qwenimage"] = Field(
        "auto",
        description="Model family: sd15 (Stable Diffusion 1.x/2.x), sdxl (Stable Diffusion XL, SDXL-Turbo; "
        "diffusers folders), flux1 (FLUX.1 [dev] and [schnell]), zimage (Z-Image, Z-Image Turbo), flux2 "
        "(FLUX.2 [klein] Base and distilled, [dev]), qwenimage (Qwen-Image, Lightning-style siblings). auto: "
        "detected from the model folder (model_index.json) or the single file's keys. An explicit family that does "
        "not fit the model is an error naming both.",
    )
    path: Path = Field(
        Path("models/sd15"),
        description="A diffusers model folder (with model_index.json) or a single-file .safetensors checkpoint.",
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction", "flow"] = Field(
        "auto",
        description="What the denoiser predicts. auto: read it from the model's scheduler config (flow-matching "
        "families always predict the flow velocity, flow).",
    )
    single_file_config: Path | None = Field(
        None,
        description="For a single-file checkpoint: a diffusers folder whose component configs describe it "
        "(needed offline; online, diffusers fetches them).",
    )


class LoraSettings(Section):
    """What every LoRA-training stage shares: the adapter, the optimizer and its schedule, precision, seed."""

    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    rslora: bool = Field(
        False,
        description="Rank-stabilized LoRA: the update is scaled by alpha/sqrt(rank) instead of alpha/rank. The files "
        "store alpha*sqrt(rank) as their alpha, so every program that loads them applies the same scale.",
    )
    network: Literal["lora", "dora", "loha", "lokr"] = Field(
        "lora",
        description="What is trained on each target (through peft): lora; dora (LoRA plus a learned magnitude per "
        "output channel); loha (Hadamard product of two rank-r products); lokr (Kronecker product). LoHa and LoKr "
        "files load in ComfyUI and A1111/Forge, not in diffusers; see docs/training.md.",
    )
    lora_init: Literal["gaussian", "pissa", "olora"] = Field(
        "gaussian",
        description="How a plain LoRA starts: gaussian (A random, B zero: no change at step 0); pissa (the weight's "
        "top-r singular directions) or olora (its QR directions), moved from the weight into the adapter. The files "
        "hold the learned change as a plain LoRA of rank 2r. lora1 and differential.lora1 only.",
    )
    lokr_factor: int = Field(
        -1,
        ge=-1,
        description="LoKr: the factor that splits each dimension into the Kronecker factors (-1: as balanced as "
        "possible, LyCORIS' default).",
    )
    targets: list[str] | None = Field(
        None,
        description="Module names (suffixes) in the denoiser that get a LoRA. Unset: the family's attention "
        "projections (sd15 and zimage: to_q, to_k, to_v, to_out.0; flux2 adds the text-stream and fused "
        "single-block projections; flux1 the attention and MLP layers of every block). See docs/families.md.",
    )
    lr: float = Field(
        1e-4,
        description="Learning rate (with prodigy: its multiplier, usually 1.0). Negative: gradient ascent, which "
        "un-learns the data (adamw only).",
    )
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion"] = Field(
        "adamw",
        description="Optimizer: adamw (torch; fused kernel where the device has one), adamw8bit (bitsandbytes, the "
        "`bnb` extra), prodigy (prodigyopt), adafactor (transformers' Adafactor: fixed lr, or relative_step = true "
        "in optimizer_args), lion (lion-pytorch, the `lion` extra).",
    )
    optimizer_args: dict[str, bool | int | float | str | list[float]] = Field(
        {},
        description="More constructor arguments of the optimizer, checked against its signature, e.g. {betas = "
        "[0.9, 0.99], eps = 1e-6}. lr and weight_decay are set by their own fields.",
    )
    weight_decay: float = Field(1e-2, ge=0, description="Decoupled weight decay.")
    lr_scheduler: Literal[
        "constant",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "cosine_with_min_lr",
        "inverse_sqrt",
        "warmup_stable_decay",
    ] = Field(
        "constant",
        description="Learning-rate schedule after warmup; the formulas are in docs/training.md.",
    )
    warmup_steps: int | str = Field(
        0,
        description='Linear warmup over this many optimizer steps, or a fraction of the steps as "10%".',
    )
    decay_steps: int | str = Field(
        "20%",
        description='warmup_stable_decay: the final steps over which the lr decays (steps, or "20%" of them).',
    )
    lr_scheduler_num_cycles: int = Field(1, ge=1, description="cosine_with_restarts: the number of cosine cycles.")
    lr_scheduler_power: float = Field(1.0, gt=0, description="polynomial: the power of the decay (1: linear).")
    lr_scheduler_min_lr_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="The lr at the end of the decay, as a fraction of lr (polynomial, cosine_with_min_lr, "
        "warmup_stable_decay).",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the up (B) matrices learn at lr*ratio (the paper suggests 16). Not with prodigy.",
    )
    block_lr: dict[str, float] = Field(
        {},
        description='Learning-rate multipliers by block of the denoiser, e.g. {"down_blocks.0-1" = 0.5, '
        '"mid_block" = 0, "transformer_blocks.10-19" = 2}: a top-level module, with an index or a range for a '
        "block list. 0: that block's LoRA is not trained; negative: it un-learns (adamw only). Blocks not named "
        "keep 1. See docs/training.md for each family's block names.",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the LoRA weights with this decay (e.g. 0.999) and save "
        "it as <name>-ema.safetensors beside the raw LoRA. Unset: off.",
    )
    ema_warmup: bool = Field(
        True, description="EMA warmup: the decay of update n is min(ema_decay, (1+n)/(10+n)), as in diffusers."
    )
    ema_every: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")
    fused_backward: bool = Field(
        False,
        description="Step the optimizer inside the backward pass, each group as soon as its gradients are ready, "
        "and free them: less gradient memory. Needs grad_accum = 1 and max_grad_norm = 0 (the global norm is not "
        "known before the steps).",
    )
    optimizer_groups: int = Field(
        0,
        ge=0,
        description="With fused_backward: split the LoRA parameters into this many optimizers (kohya's "
        "fused_optimizer_groups); 0: one per parameter.",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this value; 0 disables clipping.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no",
        description="Autocast precision of the forward pass; the frozen base model is stored in it too (half of "
        "fp32's memory; the LoRA stays fp32; FSDP/ZeRO shard an fp32 base). fp16 needs a CUDA GPU; on a CPU bf16 is "
        "slower than no.",
    )
    fp8_base: bool = Field(
        False,
        description="Store the frozen base weights in float8 (e4m3, scaled per output channel) and cast them to the "
        "compute precision at each use: about half the weight memory of bf16. CUDA only; the LoRA stays fp32.",
    )
    seed: int = Field(42, description="Seed of the LoRA init, data order, timesteps and noise.")

    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none",
        description="Per-sample loss weight over the noise level (flow-matching models only): none, sigma_sqrt "
        "(1/sigma^2) or cosmap, as in SD3's training scripts.",
    )
    loss: Literal["l2", "l1", "huber", "smooth_l1"] = Field(
        "l2",
        description="Loss between prediction and target: l2 (MSE), l1, huber (2c(sqrt(d^2+c^2)-c)) or smooth_l1 "
        "(2(sqrt(d^2+c^2)-c)), with c from huber_schedule. See docs/training.md.",
    )
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "snr",
        description="How huber/smooth_l1's c moves with the noise level: constant (huber_c*huber_scale), exponential "
        "(huber_scale*huber_c^(t/T); flow: ^sigma) or snr (((1-huber_c)/(1+sqrt(1/SNR))^2+huber_c)*huber_scale).",
    )
    huber_c: float = Field(0.1, gt=0, le=1, description="The huber/smooth_l1 parameter c (kohya's huber_c).")
    huber_scale: float = Field(1.0, gt=0, description="Scale of c in every huber_schedule (kohya's huber_scale).")
    min_snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR weighting (DDPM models): per-sample weight min(SNR, gamma)/SNR for epsilon, "
        "min(SNR, gamma)/(SNR+1) for v-prediction; 5 is the paper's value. Unset: off.",
    )
    debiased_estimation: bool = Field(
        False,
        description="Debiased estimation (DDPM models): per-sample weight 1/sqrt(SNR) for epsilon, 1/(SNR+1) for "
        "v-prediction, SNR capped at 1000.",
    )

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if v == 0:
            raise ValueError("must not be 0: a learning rate of 0 trains nothing")
        return v

    @field_validator("lokr_factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (balanced) or a positive factor")
        return v

    @field_validator("warmup_steps", "decay_steps")
    @classmethod
    def _steps_or_fraction(cls, v: int | str) -> int | str:
        if isinstance(v, int):
            if v < 0:
                raise ValueError("must be 0 or more steps")
            return v
        if not re.fullmatch(r"\d+(\.\d+)?%", v) or float(v[:-1]) > 100:
            raise ValueError('must be a number of steps or a percentage of the steps such as "10%"')
        return v

    @field_validator("block_lr")
    @classmethod
    def _blocks(cls, v: dict[str, float]) -> dict[str, float]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z_]\w*(\.\d+(-\d+)?)?", name):
                raise ValueError(
                    f"{name!r} is not a block: write a module name, with an index or range for a block list, as "
                    f'"mid_block", "down_blocks.1" or "transformer_blocks.0-9"'
                )
        return v

    # What the stage's LoRA files are called and kept as: output settings, in no key (a change re-exports only)
    output_name: str | None = Field(
        None,
        pattern=r"^[^/\\:*?\"<>|]+$",
        description="The LoRA file's name in the output folder, without .safetensors (kohya's output_name), also "
        "written as its ss_output_name. Unset: the stage's name (lora1, student, lora2). Changing it re-exports the "
        "files; nothing trains again.",
    )
    save_precision: Literal["fp32", "float", "fp16", "bf16"] = Field(
        "fp32",
        description="The precision of the exported LoRA files (kohya's save_precision; float = fp32). The store keeps "
        "the trained fp32 weights, so changing it re-exports the files; nothing trains again.",
    )
    save_every_steps: int | None = Field(
        None,
        ge=1,
        description="Also keep the LoRA as it is every N optimizer steps (kohya's save_every_n_steps), in steps/ "
        "beside the final file and listed by `pipeline history`; `pipeline export <stage> --step N` writes one. "
        "Unset: the final LoRA only.",
    )


class TimestepSettings(Section):
    """How training draws noise levels. Flow-matching models only, except `uniform` (every family's default)."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = Field(
        "uniform",
        description="How the noise level is drawn: uniform; logit_normal (sigmoid of a normal, see logit_mean and "
        "logit_std); mode (SD3's mode sampling, see mode_scale). DDPM models (sd15) take uniform only.",
    )
    logit_mean: float = Field(0.0, description="Mean of the logit-normal sampler.")
    logit_std: float = Field(1.0, gt=0, description="Standard deviation of the logit-normal sampler.")
    mode_scale: float = Field(1.29, description="Scale of the mode sampler.")
    timestep_shift: Literal["auto", "none", "static", "resolution"] = Field(
        "auto",
        description="Shift of the sampled noise level (flow matching): static (sigma' = s*sigma/(1+(s-1)*sigma), s "
        "= shift or the scheduler's), resolution (mu from the image token count, as the diffusers pipelines do), "
        "none. auto: what the model's scheduler config says (use_dynamic_shifting, shift).",
    )
    shift: float | None = Field(
        None, gt=0, description="The static shift s; unset: the model scheduler config's `shift`."
    )


class NoiseSettings(Section):
    """How training noise is drawn. In `transfer` the noise is materialized by the schedule, so these are
    `[schedule]` settings there (part of the contract), not the student's."""

    noise_offset: float = Field(
        0.0, ge=0, description="Add offset*N(0,1) per sample and channel to the noise (kohya's noise_offset); 0: off."
    )
    adaptive_noise_scale: float | None = Field(
        None,
        description="With noise_offset: the offset becomes max(0, noise_offset + this*|mean of the latent|) per "
        "sample and channel. Unset: off.",
    )
    multires_noise_iterations: int = Field(
        0, ge=0, description="Pyramid (multi-resolution) noise: levels added to the noise; 0: off. About 6 to 10."
    )
    multires_noise_discount: float = Field(
        0.3, gt=0, le=1, description="Weight of pyramid level i is discount^i; the sum is renormalized per sample."
    )
    ip_noise_gamma: float = Field(
        0.0,
        ge=0,
        description="Input perturbation: x_t is built from noise + gamma*N(0,1), the target from the noise; 0: off.",
    )
    min_timestep: int | None = Field(
        None, ge=0, description="Lowest training timestep (of the scheduler's T, usually 1000); flow: sigma >= this/T."
    )
    max_timestep: int | None = Field(
        None, ge=1, description="Highest training timestep, exclusive (DDPM); flow: sigma <= this/T. Unset: T."
    )
    zero_terminal_snr: bool = Field(
        False,
        description="Rescale the DDPM betas to zero terminal SNR (use with v-prediction). DDPM models only.",
    )


class TrainConfig(LoraSettings, TimestepSettings, NoiseSettings):
    """LoRA training on the base model (stage `lora1`; in `transfer`, the teacher LoRA)."""

    guidance_embed: float | None = Field(
        None,
        description="For a model with a guidance embedding (FLUX.1 [dev], FLUX.2 [dev]): the guidance value every "
        "training forward passes (kohya's guidance_scale). Unset: the pipeline's default (FLUX.1 3.5, FLUX.2 4.0). "
        "Refused for models without one.",
    )

    steps: int = Field(1000, ge=1, description="Number of optimizer steps.")
    epochs: int | None = Field(
        None,
        ge=1,
        description="Train this many epochs instead of a number of steps (kohya's max_train_epochs): an epoch shows "
        "every image its num_repeats times (and as many regularization images), so it is ceil(ceil(images x repeats "
        "/ batch_size) / (grad_accum x processes)) optimizer steps. Set steps or epochs, not both.",
    )
    batch_size: int = Field(1, ge=1, description="Images per micro-batch.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimizer step (effective batch = batch_size x grad_accum)."
    )
    train_text_encoder: bool = Field(
        False,
        description="Train a LoRA on the text encoder too (sd15's CLIP; SDXL's CLIP-L and bigG, one rate for both; "
        "same network, rank and alpha as the denoiser's, on its attention and MLP projections). The captions are "
        "then encoded in every step, not read from the text stage's cache. The `lora` workflow only; see "
        "docs/training.md.",
    )
    text_encoder_lr: float | None = Field(
        None,
        gt=0,
        description="With train_text_encoder: the text encoder LoRA's learning rate (kohya's text_encoder_lr). "
        "Unset: lr.",
    )
    loraplus_text_encoder_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="With train_text_encoder: LoRA+ ratio of the text encoder's up (B) matrices. Unset: "
        "loraplus_lr_ratio, as in kohya.",
    )


class ScheduleConfig(TimestepSettings, NoiseSettings):
    """The materialized training plan that the teacher and the student of `transfer` share (stage `schedule`).

    Every field here is part of the cross-phase contract: changing one re-runs the teacher."""

    steps: int = Field(500, ge=1, description="Optimizer steps in the schedule (the student may stop earlier).")
    epochs: int | None = Field(
        None,
        ge=1,
        description="The schedule's length in epochs instead of steps: every training image (not the held-out ones) "
        "its num_repeats times per epoch, batch_size x grad_accum rows a step. Set steps or epochs, not both.",
    )
    batch_size: int = Field(1, ge=1, description="Samples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seed: int = Field(42, description="Seed of the item order, timesteps, noise and caption dropout.")
    caption_dropout: float = Field(
        0.0, ge=0, le=1, description="Probability that a slot's caption is replaced by the empty caption."
    )
    heldout: int = Field(
        16,
        ge=0,
        description="Samples (x_t, t, c) not in the schedule on which student fidelity is measured: this many on "
        "the held-out images, and as many new draws on the training images (the fit).",
    )
    heldout_images: int = Field(
        2,
        ge=0,
        description="Images (with their captions) left out of the schedule, chosen by a seeded hash of their "
        "content: the student never trains on them, so its fidelity there measures transfer, not fit. 0: "
        "fidelity on training images only.",
    )
    guidance_embed: float | None = Field(
        None,
        description="For a model with a guidance embedding (FLUX.1 [dev], FLUX.2 [dev]: guidance_embeds): the value "
        "the teacher passes in every forward. Unset: the pipeline's default where the model has one (FLUX.2 4.0, "
        "FLUX.1 [dev] 3.5). Refused for models without one (FLUX.1 [schnell], FLUX.2 [klein]).",
    )


class TransferConfig(Section):
    """Delta transfer (workflow `transfer`): the teacher is `model` with LoRA-1, the student another model."""

    student_model: Path = Field(
        Path("models/student"),
        description="The student (e.g. the Turbo/distilled sibling): a diffusers folder or a single-file .safetensors. "
        "It must share the teacher's latent space and prediction type.",
    )
    student_single_file_config: Path | None = Field(
        None, description="For a single-file student: a diffusers folder with its component configs."
    )
    teacher_lora: Path | None = Field(
        None,
        description="An existing LoRA file (.safetensors, kohya or diffusers format) to transfer. "
        "Unset: stage lora1 trains it on `model` with the [lora1] settings.",
    )
    delta_mode: Literal["cond", "cfg"] = Field(
        "cond",
        description="cond: store the conditional delta. cfg: also the unconditional one (two more teacher passes), "
        "for the exact CFG target (1-g)*du + g*dc.",
    )
    delta_dtype: Literal["fp16", "fp32"] = Field(
        "fp16", description="Storage dtype of the teacher deltas (they are always computed in fp32)."
    )
    weights_dtype: Literal["fp32", "fp16", "bf16", "fp8"] = Field(
        "fp32",
        description="The dtype the teacher's and the stored prior's model weights are kept in: fp16/bf16 halve their "
        "memory (a FLUX.2 [dev] teacher: 60 instead of 120 GiB), fp8 (e4m3, scaled per channel) quarters it. They "
        "still compute in fp32, each weight cast at its use, so a delta stays the difference of two fp32 "
        "predictions of one slightly rounded model: off by about 0.1% (fp16), 0.6% (bf16; nothing for a model "
        "released in bf16, as FLUX.2, Z-Image and Qwen-Image are) or 10% (fp8) (docs/transfer.md).",
    )
    uncond_caption: str = Field("", description="The caption of the unconditional passes (delta_mode = cfg).")


class StudentConfig(LoraSettings):
    """LoRA training on the student model against the teacher's deltas (stage `student` of `transfer`)."""

    steps: int | None = Field(
        None, ge=1, description="Optimizer steps; unset: the whole schedule. At most schedule.steps."
    )
    guidance: float = Field(
        1.0,
        description="Transfer guidance g: target = prior + g*delta. About 2.5 for Flux.2, 3 for Z-Image Turbo, 1 when "
        "the student is not CFG-distilled.",
    )
    init: Literal["zero", "teacher"] = Field(
        "zero",
        description="zero: the student LoRA starts as a zero update. teacher: it starts from the teacher LoRA "
        "(same architecture; rank, alpha and targets must then match it).",
    )
    guidance_embed: float | None = Field(
        None,
        description="For a student with a guidance embedding: the value it is trained with. Unset: the schedule's "
        "(schedule.guidance_embed). Refused for models without one.",
    )
    prior: Literal["materialized", "on_the_fly"] = Field(
        "materialized",
        description="materialized: the student's own prediction (LoRA off) is computed once per schedule and stored, "
        "so every student run is one forward and backward per step. on_the_fly: computed every step instead.",
    )


class PairConfig(Section):
    """One (A, B) pair of differential LoRA, declared in the config instead of by the folder convention."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$", description="The pair's name (letters, digits, - and _).")
    a: Path = Field(..., description="Folder of the A side (what LoRA-1 overfits), relative to the config file.")
    b: Path = Field(..., description="Folder of the B side (what LoRA-2 learns on top of LoRA-1).")


def _overfit(**kw) -> TrainConfig:
    return TrainConfig(**{"rank": 16, "alpha": 16.0, "lr": 5e-4, "steps": 300, "batch_size": 1, **kw})


class DifferentialConfig(Section):
    """Differential LoRA (workflow `differential`): LoRA-1 overfits A, LoRA-2 learns B on top of it, and the
    LoRA-2s of all pairs are averaged in ΔW space."""

    pairs_dir: Path = Field(
        Path("pairs"), description="Folder of pairs by convention: <pairs_dir>/<name>/a/ and <name>/b/ (with captions)."
    )
    pairs: list[PairConfig] = Field(
        [], description="Pairs declared explicitly ([[differential.pairs]] name, a, b); when set, pairs_dir is unused."
    )
    lora1_mode: Literal["adapter", "merged"] = Field(
        "adapter",
        description="How LoRA-1 is applied while LoRA-2 trains: adapter (a frozen runtime adapter) or merged "
        "(added to the base weights in fp32).",
    )
    paired_noise: bool = Field(
        False,
        description="LoRA-2 replays LoRA-1's timesteps and noise step by step (needs equal batch sizes), so A and B "
        "are compared on identical noise.",
    )
    average_rank: int = Field(
        0,
        ge=0,
        description="Rank of the averaged LoRA-2: 0 keeps the exact average (rank = pairs x rank); "
        "k compresses it by SVD and reports the relative error.",
    )
    eval_samples: int = Field(8, ge=1, description="Held-out (noise, timestep) draws per image for the eval table.")
    eval_weights_dtype: Literal["fp32", "fp16", "bf16", "fp8"] = Field(
        "fp32",
        description="The dtype the eval keeps the model's weights in, computing in fp32 as the teacher does "
        "(transfer.weights_dtype): bf16 halves the memory and loses nothing for a model released in bf16.",
    )
    lora1: TrainConfig = Field(
        default_factory=_overfit, description="LoRA-1 on A: settings that overfit one image by default."
    )
    lora2: TrainConfig = Field(
        default_factory=lambda: _overfit(seed=43), description="LoRA-2 on B, with LoRA-1 applied."
    )


class PreviewPrompt(Section):
    """One preview with settings of its own ([[runtime.preview.prompts]]); each unset one is runtime.preview's."""

    prompt: str = Field(..., min_length=1, description="The prompt.")
    negative_prompt: str | None = Field(None, description="Its negative prompt (kohya's --n).")
    seed: int | None = Field(None, description="Its noise seed (kohya's --d).")
    width: int | None = Field(None, ge=16, multiple_of=16, description="Its width in pixels (kohya's --w).")
    height: int | None = Field(None, ge=16, multiple_of=16, description="Its height in pixels (kohya's --h).")
    steps: int | None = Field(None, ge=1, description="Its sampling steps (kohya's --s).")
    guidance_scale: float | None = Field(None, description="Its guidance scale (kohya's --l).")


class PreviewConfig(Section):
    """Preview images rendered during training (in previews/ of the stage's output, and in `pipeline report`)."""

    every: int | None = Field(
        None,
        ge=0,
        description="Render previews every N optimizer steps and at the end. Unset: a quarter of the stage's steps "
        "(four previews a run); 0: none.",
    )
    prompts: list[str | PreviewPrompt] = Field(
        [],
        description="What to render: prompts, each a string (kohya's sample-prompt options work in it: --n negative "
        "--w width --h height --s steps --l guidance --d seed) or a table (prompt, negative_prompt, seed, width, "
        "height, steps, guidance_scale). Empty: the first caption of the data set.",
    )
    negative_prompt: str = Field("", description="The negative prompt of every preview without its own.")
    seed: int = Field(0, description="Seed of each preview's initial noise (the same for every preview).")
    width: int | None = Field(
        None, ge=16, multiple_of=16, description="Preview width in pixels. Unset: the model's native resolution."
    )
    height: int | None = Field(
        None, ge=16, multiple_of=16, description="Preview height in pixels. Unset: the model's native resolution."
    )
    steps: int = Field(20, ge=1, description="Sampling steps per preview.")
    guidance_scale: float = Field(7.5, description="Classifier-free guidance scale of previews.")
    ema: bool = Field(
        False, description="Render previews with the EMA of the LoRA weights (needs the section's ema_decay)."
    )


class RuntimeConfig(Section):
    """Where and how to run. Never part of a stage key: changing these re-runs nothing."""

    store: Path = Field(Path(".pipeline"), description="The artifact store folder, relative to the config file.")
    output_dir: Path = Field(
        Path("output"), description="Where finished LoRA files and previews are exported, relative to the config file."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    log_level: Literal["debug", "info", "warning"] = Field("info", description="Verbosity of messages on stderr.")
    checkpoint_every: int = Field(100, ge=0, description="Save resumable training state every N steps; 0 disables.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the denoiser's activations in the backward pass instead of keeping them: less memory, "
        "about a third more compute per step. The trained LoRA is the same.",
    )
    attention: Literal["sdpa", "xformers"] = Field(
        "sdpa",
        description="The denoiser's attention kernels in the training, teacher, prior and evaluation stages: sdpa "
        "(PyTorch's scaled_dot_product_attention, which picks flash or memory-efficient kernels on a GPU; every "
        'device) or xformers (CUDA GPUs only; pip install "lora-pipeline[xformers]"). Same LoRA up to float '
        "rounding; kohya's --sdpa / --xformers.",
    )
    encode_batch_size: int = Field(8, ge=1, description="Images per VAE / text-encoder forward when caching.")
    progress_every: float = Field(
        10.0,
        gt=0,
        description="Where stderr is not a terminal (CI, nohup, a pipe) and for --json runs (JSON lines on stderr), "
        "seconds between two progress lines of a long stage; on a terminal progress is a redrawn bar.",
    )
    max_image_pixels: int = Field(
        100_000_000,
        ge=1,
        description="The largest image (width x height) that is decoded; a bigger one is refused by name before it "
        "is decompressed (decompression bombs). Raise it for huge scans.",
    )
    teacher_batching: Literal["mixed", "two_pass"] = Field(
        "mixed",
        description="mixed: the teacher's predictions with and without its LoRA (and the student's, for "
        "fidelity) come from one batched forward, the LoRA applied to half of the rows; two_pass: two forwards. "
        "Same numbers up to float rounding.",
    )
    fidelity_every: int = Field(
        0,
        ge=0,
        description="Measure the student's fidelity on held-out samples every N steps (and at the end); 0: "
        "at the start and the end only.",
    )
    preview: PreviewConfig = Field(default_factory=PreviewConfig)
    log_with: list[Literal["tensorboard", "wandb"]] = Field(
        [],
        description="Log each stage run's figures while it goes (loss raw and smoothed, lr per group, grad norm, step "
        "time, fidelity, teacher |delta| per timestep, the differential eval, previews) to TensorBoard and/or W&B; "
        "each needs its extra (pip install 'lora-pipeline[tensorboard]' / '[wandb]'). One run per stage run, named "
        "<stage>-<key prefix>.",
    )
    log_dir: Path = Field(
        Path("logs"),
        description="Where log_with writes: <log_dir>/tensorboard/<run> (tensorboard --logdir <log_dir>/tensorboard) "
        "and <log_dir>/wandb; relative to the config file.",
    )
    wandb_project: str = Field("lora-pipeline", description="The W&B project of log_with = ['wandb'].")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: W&B runs are written under log_dir with no network (`wandb sync` uploads one); "
        "online: streamed to your W&B account (after `wandb login`).",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v


class PipelineConfig(Section):
    """A pipeline.toml."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    latents: LatentsConfig = Field(default_factory=LatentsConfig)
    tag: TagConfig = Field(default_factory=TagConfig)
    lora1: TrainConfig = Field(default_factory=TrainConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    differential: DifferentialConfig = Field(default_factory=DifferentialConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
