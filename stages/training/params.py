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
