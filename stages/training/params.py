"""The params every LoRA-training stage hashes into its key (lora1, student, lora2 add their own on top)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, model_serializer


class KeyedParams(BaseModel):
    """Params whose newer options enter the key only when set: a field in UNKEYED_WHEN_NONE is left out of the
    dump while it is None, so adding an option keeps the key of every artifact made without it."""

    UNKEYED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler):
        data = handler(self)
        for name in self.UNKEYED_WHEN_NONE:
            if name in data and data[name] is None:
                del data[name]
        return data


class LoraTrainParams(KeyedParams):
    UNKEYED_WHEN_NONE = ("save_every_steps",)

    rank: int
    alpha: float
    dropout: float
    rslora: bool = False
    network: str = "lora"
    lora_init: str = "gaussian"
    lokr_factor: int | None = None  # LoKr only
    targets: list[str]
    lr: float
    optimizer: str
    optimizer_args: dict  # checked against the optimizer's constructor, with adafactor's defaults filled in
    weight_decay: float
    lr_schedule: dict  # type, warmup in steps, and what that type reads (optim.resolve_lr_schedule)
    loraplus_lr_ratio: float | None = None
    block_lr: dict = {}
    ema: dict | None = None  # decay, warmup, every
    fused_backward: dict | None = None  # {"groups": n} when on
    steps: int
    batch_size: int
    grad_accum: int
    max_grad_norm: float
    mixed_precision: str
    fp8_base: bool = False
    seed: int
    save_every_steps: int | None = None  # the LoRA is also kept every N steps (steps/ in the artifact)
    # the processes training shares (torchrun / accelerate launch): each takes every processes-th micro-step, so the
    # global batch is batch_size x grad_accum x processes; None for one (only the sharded stages set it)
    processes: int | None = None
    prediction_type: str
    timesteps: dict  # the resolved noise process: sampler, shift, scheduler values, noise options
    guidance_embed: float | None = None  # the guidance value of a model with a guidance embedding (FLUX [dev])
    loss_weighting: str
    loss: dict  # the resolved loss: type, huber schedule, SNR weightings (losses.resolve_loss)


def processes() -> int | None:
    """The processes a sharded training stage runs on (torchrun / accelerate launch); None for one, which leaves
    the field out of the key."""
    from core import dist

    return dist.size() if dist.size() > 1 else None


def train_params(family, layout, cfg, latent_shape: tuple[int, ...], section: str = "lora1") -> LoraTrainParams:
    """A training section's params outside a pipeline (benchmarks, tests): its fields plus the family's default
    targets, prediction type and resolved noise process, as the lora1 stage would hash them."""
    from stages.families.noise import check_weighting, resolve_timesteps
    from stages.training.losses import resolve_loss
    from stages.training.optim import resolve_optim

    timesteps = resolve_timesteps(
        family.noise_schedule_contract(layout), cfg, family.image_seq_len(latent_shape), section
    )
    prediction_type = family.prediction_type(layout)
    return LoraTrainParams(
        **cfg.model_dump(include=set(LoraTrainParams.model_fields) - set(RESOLVED)),
        targets=cfg.targets or family.default_targets,
        prediction_type=prediction_type,
        timesteps=timesteps,
        loss_weighting=check_weighting(timesteps, cfg.loss_weighting, section),
        loss=resolve_loss(cfg, timesteps, prediction_type, section),
        **resolve_optim(cfg, cfg.steps, cfg.grad_accum, section),
        lokr_factor=cfg.lokr_factor if cfg.network == "lokr" else None,
        guidance_embed=(
            (cfg.guidance_embed or family.default_guidance_embed) if family.has_guidance_embed(layout) else None
        ),
    )


# LoraTrainParams fields that are resolved (against the model), not copied from the section
RESOLVED = (
    "targets",
    "timesteps",
    "prediction_type",
    "loss_weighting",
    "loss",
    "optimizer_args",
    "lr_schedule",
    "ema",
    "fused_backward",
    "lokr_factor",
    "guidance_embed",
)


def section_fields(section, params_cls, exclude: set[str] = frozenset()) -> dict:
    """The fields a params class copies from its config section as they are (not the resolved ones)."""
    names = set(params_cls.model_fields) - set(RESOLVED) - set(exclude)
    return section.model_dump(include=names & set(type(section).model_fields))


def noise_contract(timesteps: dict) -> dict:
    """The contract's summary of the noise options (the options themselves are in `timesteps`)."""
    options = timesteps.get("noise", {})
    return {"offset": options.get("offset", 0.0), "pyramid": "multires" in options}
