"""DeepSpeed ZeRO for the training stages: an accelerate config with distributed_type DEEPSPEED.

The denoiser and the section's optimizer go into a DeepSpeed engine (core/dist.py ZeroSettings: stage 1, 2 or 3):
ZeRO-1/2 split the optimizer state (and ZeRO-2 the gradients) over the processes; ZeRO-3 also keeps 1/W of the
frozen base weights per process and gathers a layer's weights only while it runs. The LoRA itself stays whole on
every process (ZeRO-3 keeps parameters no larger than its largest matrix persistent), so the files, the EMA,
previews and the stage's outputs read it as without DeepSpeed. DeepSpeed averages the gradients over the processes,
accumulates the micro-steps and clips; the section's lr schedule steps the optimizer's groups as usual.

What ZeRO changes, and is refused where it would change the result or cannot apply: the optimizer steps on flat
pieces of the parameters, so only element-wise optimizers (adamw, adamw8bit, lion) are allowed; the text encoder's
LoRA is not in the engine (train it under FSDP or plain processes); fp16 and fp8_base keep their own loss scale and
storage, which DeepSpeed would replace. A checkpoint holds each process's piece of the optimizer state (DeepSpeed's
own files, beside the whole LoRA), so it resumes under the same ZeRO stage and number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from dataclasses import dataclass

from core import dist
from core.errors import ConfigError, PipelineError

ELEMENTWISE = ("adamw", "adamw8bit", "lion")  # an update of each number from its own gradient and state


@dataclass
class ZeroRecord:
    """What start_engine did, for the log and the stage's record."""

    stage: int
    processes: int
    base_bytes: int  # the base model's weights, whole
    local_bytes: int  # what of them this process keeps (ZeRO-3: its shards and the persistent small weights)
    notes: list[str]

    def record(self) -> dict:
        return {"deepspeed": dataclasses.asdict(self)}

    def line(self, stage: str) -> str:
        gb = 1024**3
        split = "optimizer state" if self.stage == 1 else "optimizer state and gradients"
        return (
            f"{stage}: DeepSpeed ZeRO-{self.stage} over {self.processes} processes: each process keeps "
            f"{self.local_bytes / gb:.3g} GB of the base model's {self.base_bytes / gb:.3g} GB and 1/{self.processes} "
            f"of the LoRA's {split}; the LoRA stays whole on every process"
            + "".join(f"; {note}" for note in self.notes)
        )


def check_section(settings, cfg, stage: str, text_encoder: bool) -> None:
    """Refuse, by name, what a section asks for that ZeRO would change or cannot run, and a missing deepspeed,
    before the model loads."""
    where = f"{settings.source} asks for DeepSpeed ZeRO-{settings.stage}"
    if cfg.optimizer not in ELEMENTWISE:
        raise ConfigError(
            f"{stage}.optimizer = {cfg.optimizer!r}: {where}, which steps the optimizer on pieces of the parameters, "
            f"and {cfg.optimizer} takes its step from all of them at once (each process would step differently). "
            f"Use {', '.join(ELEMENTWISE)}, or an accelerate config with distributed_type FSDP, which keeps the "
            f"optimizer whole."
        )
    if text_encoder:
        raise ConfigError(
            f"{stage}.train_text_encoder = true: {where}, whose engine holds the denoiser alone. Set it to false, "
            f"or use an accelerate config with distributed_type FSDP (or none) to train the text encoder too."
        )
    if cfg.mixed_precision == "fp16":
        raise ConfigError(
            f'{stage}.mixed_precision = "fp16": {where}, which would replace its loss scaling; use "bf16" (or "no").'
        )
    if getattr(cfg, "fp8_base", False):
        raise ConfigError(
            f"{stage}.fp8_base and DeepSpeed ZeRO-{settings.stage} do not go together; set {stage}.fp8_base = "
            f"false, or launch without the DeepSpeed config."
        )
    import_deepspeed(settings)


def import_deepspeed(settings):
    """deepspeed, quiet; a clear error where it is not installed."""
    try:
        import deepspeed  # noqa: F401 (its accelerator is chosen on import)
    except ImportError as e:
        raise PipelineError(
            f"{settings.source} asks for DeepSpeed ZeRO-{settings.stage}, and deepspeed cannot be imported ({e}). "
            f"Install it: pip install 'lora-pipeline[deepspeed]'."
        ) from None
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return deepspeed


def engine_config(settings, cfg, per_rank: int, trained: list, device, model_size: int = 0) -> dict:
    """The DeepSpeed config of a section: its batch, accumulation and clipping, and the ZeRO settings. The buckets
    of gradients are sized to the LoRA (DeepSpeed's defaults, 500M numbers, are for training whole models), and
    ZeRO-3 keeps at most a tenth of the model's `model_size` weights gathered at a time (DeepSpeed's default, 1e9
    numbers live, would keep a model under 1B parameters whole on every process: benchmarks/distributed.py --zero);
    a deepspeed_config_file's own zero_optimization settings come first."""
    import json

    lora = sum(p.numel() for p in trained)
    zero: dict = {"reduce_bucket_size": lora, "allgather_bucket_size": lora}
    if settings.stage == 3 and model_size:
        live = max(min(10**9, model_size // 10), 10**6)
        zero.update(
            stage3_max_live_parameters=live,
            stage3_max_reuse_distance=live,
            stage3_prefetch_bucket_size=min(5 * 10**7, live),  # (DeepSpeed's default, within what may be live)
        )
    zero.update(json.loads(settings.tuning))
    zero["stage"] = settings.stage
    if device.type == "cuda" and settings.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    if device.type == "cuda" and settings.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu"}
    if settings.stage == 3:  # the LoRA's matrices stay whole on every process
        persist = max(p.numel() for p in trained) + 1
        zero["stage3_param_persistence_threshold"] = max(persist, zero.get("stage3_param_persistence_threshold", 0))
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": per_rank,
        "gradient_clipping": float(cfg.max_grad_norm),  # 0: none (DeepSpeed's own default clips at 1)
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # check_section allows element-wise optimizers only
        "zero_force_ds_cpu_optimizer": False,  # offloaded, the section's own optimizer steps on the CPU
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def start_engine(denoiser, optimizer, settings, cfg, per_rank: int, device):
    """The denoiser and optimizer in a DeepSpeed engine -> (engine, ZeroRecord). Every process calls it at once."""
    deepspeed = import_deepspeed(settings)
    trained = [p for p in denoiser.parameters() if p.requires_grad]
    frozen = [p for p in denoiser.parameters() if not p.requires_grad]
    base = sum(p.numel() * p.element_size() for p in frozen)
    size = sum(p.numel() for p in denoiser.parameters())
    config = engine_config(settings, cfg, per_rank, trained, device, size)
    with contextlib.redirect_stdout(sys.stderr):  # (on the CPU it prints that it built its shared-memory op)
        engine, *_ = deepspeed.initialize(model=denoiser, optimizer=optimizer, config=config)
    local, notes = base, []
    if settings.stage == 3:  # a partitioned weight's own data is empty: its shard is ds_tensor
        small = sum(p.ds_numel * p.element_size() for p in frozen if p.ds_persist)
        local = small + sum(p.ds_tensor.numel() * p.element_size() for p in frozen if not p.ds_persist)
        notes.append(f"base weights no larger than the LoRA's largest matrix ({small / 1024**2:.3g} MB) stay whole")
    if "cpu" in (settings.offload_optimizer, settings.offload_param):
        notes.append("offloaded to CPU memory" if device.type == "cuda" else "nothing to offload on the CPU")
    if settings.stage == 3:  # persistent parameters are gathered at their first use: now, so the LoRA is whole
        trained[0].all_gather(param_list=trained)
        dist.release_freed_memory()  # the whole weights DeepSpeed replaced with this process's shards
        split = [p for p in trained if not getattr(p, "ds_persist", False) or p.data.numel() != p.ds_numel]
        if split:  # (the persistence threshold covers every trained parameter: this would be a DeepSpeed change)
            raise PipelineError(f"DeepSpeed ZeRO-3 split {len(split)} LoRA parameters over the processes; report this.")
    return engine, ZeroRecord(settings.stage, dist.size(), base, local, notes)


class ThroughEngine:
    """The denoiser as the family's predict() sees it, its forward run through the engine (which counts the
    micro-steps of an accumulation) and its attributes (config, dtype) the model's own."""

    def __init__(self, engine):
        self._engine = engine

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine.module, name)


def engine_grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def checkpoint_record(settings) -> dict:
    return {"stage": settings.stage, "processes": dist.size()}


def save_state(engine, folder) -> None:
    """Every process's piece of the optimizer state into folder/zero (the frozen weights left out)."""
    engine.save_checkpoint(str(folder / "zero"), tag="state", save_latest=False, exclude_frozen_parameters=True)


def load_state(engine, folder) -> None:
    engine.load_checkpoint(
        str(folder / "zero"),
        tag="state",
        load_module_strict=False,  # the frozen weights were left out: they come from the model
        load_optimizer_states=True,
        load_lr_scheduler_states=False,  # the section's schedule is in state.pt
    )


def check_checkpoint(saved: dict | None, settings, folder, stage: str) -> None:
    """A checkpoint resumes under the ZeRO stage and number of processes that wrote it (each process's piece of the
    optimizer state is its own file), and one written without ZeRO resumes without it."""
    now = checkpoint_record(settings) if settings is not None else None
    if saved == now:
        return

    def said(record):
        if record is None:
            return "without DeepSpeed"
        return f"under DeepSpeed ZeRO-{record['stage']} on {record['processes']} processes"

    raise PipelineError(
        f"{stage}: the checkpoint {folder} was written {said(saved)}, and this run is {said(now)}: its optimizer "
        f"state is kept {'in pieces' if saved else 'whole'}. Resume it as it was written (the same accelerate config "
        f"and number of processes), or move the checkpoint folder away to train {stage} from the start."
    )
