"""The params every LoRA-training stage hashes into its key (lora1, student, lora2 add their own on top)."""

from __future__ import annotations

from pydantic import BaseModel


class LoraTrainParams(BaseModel):
    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    lr: float
    optimizer: str
    weight_decay: float
    lr_scheduler: str
    warmup_steps: int
    steps: int
    batch_size: int
    grad_accum: int
    max_grad_norm: float
    mixed_precision: str
    seed: int
    prediction_type: str
    timesteps: dict  # the resolved noise process: sampler, shift, scheduler values (noise.resolve_timesteps)
    loss_weighting: str


def train_params(family, layout, cfg, latent_shape: tuple[int, ...], section: str = "lora1") -> LoraTrainParams:
    """A training section's params outside a pipeline (benchmarks, tests): its fields plus the family's default
    targets, prediction type and resolved noise process, as the lora1 stage would hash them."""
    from stages.families.noise import check_weighting, resolve_timesteps

    timesteps = resolve_timesteps(
        family.noise_schedule_contract(layout), cfg, family.image_seq_len(latent_shape), section
    )
    return LoraTrainParams(
        **cfg.model_dump(
            include=set(LoraTrainParams.model_fields) - {"targets", "timesteps", "prediction_type", "loss_weighting"}
        ),
        targets=cfg.targets or family.default_targets,
        prediction_type=family.prediction_type(layout),
        timesteps=timesteps,
        loss_weighting=check_weighting(timesteps, cfg.loss_weighting, section),
    )
