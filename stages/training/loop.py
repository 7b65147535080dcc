"""The LoRA training loop: deterministic steps, resumable checkpoints, previews, a progress bar.

It never branches on a model family: the family supplies loading, the noise process and the model call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core import dist
from core.errors import ConfigError, PipelineError
from core.faults import fault_point
from stages.devices import use_attention
from stages.families.base import Conditioning, TokenIds
from stages.families.noise import make_process, training_noise
from stages.training.checkpoints import restore_checkpoint, save_checkpoint
from stages.training.lora_files import add_lora
from stages.training.losses import training_loss
from stages.training.optim import (
    FusedOptimizer,
    LoraEMA,
    LrSchedule,
    build_optimizer,
    param_groups,
    text_encoder_groups,
)
from stages.training.precision import (  # check_precision: looked up here, where make_accelerator calls it
    check_precision,
    compute_dtype,
    store_base_in,
    store_base_in_fp8,
    widen_for,
)
from stages.training.sampling import BatchOrder, derive_seed, generator
from stages.training.zero import ThroughEngine, engine_grad_norm


class TrainingDiverged(PipelineError):
    pass


@dataclass
class TrainData:
    latents: object  # (N, C, h, w) float32: a tensor, or PooledLatents (indexed by a batch's items)
    cond: object  # Conditioning of U rows: the unique captions' embeddings and masks; (U, L) token ids when the
    # text encoder is trained (TrainJob.text_encoder encodes them in every step)
    cond_index: object  # (N,) long tensor: item -> row of cond
    masks: object = None  # per view, (1, h, w) float32 loss masks indexed like latents (data.alpha_mask), or None
    # drawn captions (data.shuffle_caption, ...): the row of cond of every slot, in micro-step order, instead of
    # the item's own caption (stages/pools.py draw_training_captions)
    slot_cond: object = None
    views: int = 1  # latents holds `views` rows per item (random crops, flips), item i's at i*views .. i*views+views-1
    groups: tuple | None = None  # the items of each aspect-ratio bucket: a batch holds one bucket's
    repeats: tuple | None = None  # per item, its subset's num_repeats (None: once each)
    weights: object = None  # (N,) float32 loss weight per item (data.prior_loss_weight), or None: all 1
    size_ids: object = None  # (N * views, 6) float32 size conditioning per latent row (SDXL; stages/pools.py)

    @property
    def n_items(self) -> int:
        return len(self.cond_index)


class DiffusionBatches:
    """Plain denoising batches (lora1): items, timesteps and noise drawn from (seed, micro-step) alone."""

    def __init__(self, data: TrainData, seed: int, batch_size: int, stream: str = ""):
        # stream "" is lora1's; another name draws other timesteps and noise from the same seed, and two runs
        # with the same (stream, seed, batch size) see the same timesteps and noise at every step.
        self.data, self.seed, self.batch_size, self.stream = data, seed, batch_size, stream
        self.order = BatchOrder(seed, batch_size, data.n_items, data.groups, data.repeats)

    def rows(self, k: int, items: list[int]) -> list[int]:
        """The latent rows of micro-step k's items: each at the view its slot draws (stages/buckets.py)."""
        from stages.buckets import slot_view

        v = self.data.views
        return [i * v + slot_view(self.stream, self.seed, k, s, v) for s, i in enumerate(items)]

    def sample_weights(self, k: int):
        """The loss weight of each sample of micro-step k (regularization images), or None when all weigh 1."""
        import torch

        if self.data.weights is None:
            return None
        return self.data.weights[torch.tensor(self.order.batch(k))]

    def micro_batch(self, k: int, denoiser, process):
        """-> (x_t, t, cond, target) on the CPU for micro-step k, and the loss mask when the data has masks."""
        import torch

        data = self.data
        items = self.order.batch(k)
        idx = torch.tensor(self.rows(k, items))
        x0 = data.latents[idx]
        if hasattr(data.latents, "prefetch"):  # latents read from the pool: the next micro-batch's, in the background
            data.latents.prefetch(self.rows(k + 1, self.order.batch(k + 1)))
        if data.slot_cond is None:
            cond = data.cond[data.cond_index[torch.tensor(items)]]
        else:
            cond = data.cond[data.slot_cond[k * self.batch_size : (k + 1) * self.batch_size].tolist()]
        if data.size_ids is not None:  # each image's own size conditioning (SDXL)
            sizes = data.size_ids[idx]
            cond = cond.with_sizes(sizes) if isinstance(cond, Conditioning) else TokenIds(cond, sizes)
        g = generator("noise", self.seed, k) if not self.stream else generator("noise", self.stream, self.seed, k)
        noise = torch.randn(x0.shape, generator=g)
        t = process.sample_timesteps(x0.shape[0], g)
        noise, noise_in = training_noise(getattr(process, "noise_options", {}), x0, noise, g)
        batch = process.noisy_input(x0, noise_in, t), t, cond, process.target(x0, noise, t)
        return batch if data.masks is None else (*batch, data.masks[idx])


@dataclass
class TrainJob:
    family: object
    layout: object
    prediction_type: str
    params: object  # TrainConfig-like: rank, alpha, dropout, targets, lr, optimizer, ..., seed
    device: object
    work_dir: Path
    checkpoint_every: int = 0
    preview: object | None = None  # PreviewConfig
    preview_prompts: list = field(default_factory=list)  # PreviewSpec (stages/training/previews.py) per preview
    progress: bool = True
    log: Callable[[str], None] = print
    stage: str = "lora1"  # names the progress bar, messages and the config section in errors
    init_lora: object | None = None  # a LoraFile: start from its weights instead of a zero update
    preset_lora: object | None = None  # a LoraFile applied, frozen, under the trained LoRA (differential LoRA-2)
    preset_mode: str = "adapter"  # adapter: a frozen runtime adapter; merged: added to the weights in fp32
    evaluate: Callable | None = None  # (denoiser) -> dict of metrics, run at step 0, every eval_every and at the end
    eval_every: int = 0
    gradient_checkpointing: bool = False  # runtime.gradient_checkpointing: same LoRA, less activation memory
    attention: str = "sdpa"  # runtime.attention: the denoiser's attention kernels (stages/devices.py)
    # train_text_encoder: the family's text encoder (with .model, .conditioning(ids)), which gets a LoRA of its own
    # and encodes each micro-batch's token ids
    text_encoder: object | None = None
    tracker: object | None = None  # stages/tracking.py Tracker: per-step figures for TensorBoard / W&B
    # processes sharing the training (core/dist.py): this rank takes every processes-th micro-step and the
    # gradients are averaged over the ranks; rank 0 alone writes checkpoints, previews and logs
    processes: int = 1
    # the global accumulation is fixed (the student replays the schedule's grad_accum micro-steps): each rank runs
    # grad_accum / processes of them instead of grad_accum
    split_accum: bool = False
    label: str = ""  # what the progress bar says: the workflow's name for the stage (`lora1.red-circle`)
    # save_every_steps: (outcome so far, step) -> (output name, path) of the LoRA file as it is after that step
    snapshot: Callable | None = None


@dataclass
class TextOutcome:
    """The trained text encoder LoRA (train_text_encoder): the model with its adapter, as TrainOutcome's fields."""

    model: object
    adapter_config: object
    init_state: dict | None = None
    ema_state: dict | None = None
    encoder: object | None = None  # the family's text object (.parts, .component_states: the files' components)


@dataclass
class TrainOutcome:
    denoiser: object
    adapter_config: object
    losses: list[float]
    previews: dict[str, Path]
    resumed_from: int
    step_times: list[float]  # perf_counter() at the end of each step (benchmarks/overhead.py reads these)
    evals: list[dict] = field(default_factory=list)  # {"step": n, **metrics}
    ema_state: dict | None = None  # the EMA of the LoRA in peft naming (lora_state_dict), when ema_decay is set
    lrs: list[dict[str, float]] = field(default_factory=list)  # per step: {group name: lr it stepped with}
    init_state: dict | None = None  # PiSSA/OLoRA: the adapter's starting factors (networks.pissa_to_lora)
    text: TextOutcome | None = None  # the text encoder's LoRA, when it was trained
    grad_norms: list[float | None] = field(default_factory=list)  # per step: the LoRA's gradient norm before clipping
    # how the base model was split over the processes, under the record's key: {"fsdp": ...} (stages/training/fsdp.py
    # Sharding.record) or {"deepspeed": ...} (stages/training/zero.py ZeroRecord.record)
    sharding: dict | None = None


def make_accelerator(mixed_precision: str, device, fp8_base: bool = False, section: str = "lora1"):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    check_precision(mixed_precision, device, fp8_base, section)
    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision; each
    # training stage is its own run, so it starts from a clean state (as accelerate's own test-suite does).
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


def train_lora(job: TrainJob, batches) -> TrainOutcome:
    """Train a LoRA on job.family's denoiser against batches.micro_batch(k, denoiser, process) targets."""
    import torch

    from core import progress
    from stages.training.lora_files import load_lora_into, lora_state_dict, match_modules
    from stages.training.previews import preview_every

    cfg = job.params
    main = dist.is_main() or job.processes == 1
    if job.processes > 1 and cfg.fused_backward:
        raise ConfigError(
            f"{job.stage}.fused_backward steps each parameter group inside the backward pass, before the other "
            f"processes' gradients are known; set it to false to train on {job.processes} processes."
        )
    fsdp = dist.fsdp() if job.processes > 1 and dist.size() > 1 else None  # an accelerate FSDP config
    zero = dist.zero() if job.processes > 1 and dist.size() > 1 else None  # ... or DeepSpeed ZeRO config
    if zero is not None:
        from stages.training.zero import check_section

        check_section(zero, cfg, job.stage, job.text_encoder is not None)
    if fsdp is not None and getattr(cfg, "fp8_base", False):
        raise ConfigError(
            f"{job.stage}.fp8_base and FSDP do not go together (FSDP gathers the weights as they are stored); set "
            f"{job.stage}.fp8_base = false, or launch without the FSDP config."
        )
    accelerator = make_accelerator(cfg.mixed_precision, job.device, getattr(cfg, "fp8_base", False), job.stage)
    compute = compute_dtype(cfg.mixed_precision)
    # Under mixed precision the frozen base is stored as it is computed (bf16/fp16, or fp8 with fp8_base), as kohya
    # and diffusers' examples store it: it is loaded, given its adapters and narrowed on the CPU, so the accelerator
    # never holds the fp32 model. FSDP and ZeRO shard the fp32 model from the CPU instead.
    narrow_base = (compute is not None or getattr(cfg, "fp8_base", False)) and fsdp is None and zero is None
    mesh = None
    if fsdp is not None:
        from stages.training.fsdp import device_mesh, shard_denoiser

        mesh = device_mesh(fsdp, accelerator.device)
    # fsdp_cpu_ram_efficient_loading: a node's processes load, prepare and shard the model in turn, so its CPU
    # memory holds one whole model at a time, not one per process
    in_turn = fsdp is not None and fsdp.ram_efficient_loading
    if in_turn and main:  # said before the others' turns, which rank 0 waits through
        job.log(
            f"{job.label or job.stage}: the {dist.local_size()} processes of this node load the model one after another"
        )
    with dist.in_turn(in_turn):
        # under FSDP the model is sharded from the CPU: no process ever holds all of it on its GPU
        on_cpu = fsdp is not None or narrow_base
        # a checkpoint stored in bf16/fp16 is loaded as stored when it is narrowed anyway: no fp32 copy of the model
        # in CPU memory; the layers adapters start from are widened back to fp32 first (exactly: see widen_for)
        stored = job.family.stored_dtype(job.layout) if narrow_base else None
        denoiser = job.family.load_denoiser(job.layout, torch.device("cpu") if on_cpu else accelerator.device, stored)
        targets = cfg.targets if cfg.targets is not None else job.family.default_targets
        init = getattr(cfg, "lora_init", "gaussian")
        if stored is not None:
            fp8 = getattr(cfg, "fp8_base", False)  # which keeps all but the Linear/Conv2d weights in fp32
            widen_for(denoiser, cfg, targets, init, job.preset_lora, job.family.kohya_prefix, everything_else=fp8)
        use_attention(denoiser, job.attention, accelerator.device)
        preset_adapter = job.preset_lora is not None and apply_preset(
            denoiser, job.preset_lora, job.preset_mode, job.family.kohya_prefix
        )

        def adapter_on(model, targets, seed_name: str):
            """The section's network on `targets` of `model` -> (peft config, PiSSA/OLoRA starting factors or None)."""
            config = add_lora(
                model,
                cfg.rank,
                cfg.alpha,
                cfg.dropout,
                targets,
                derive_seed(seed_name, cfg.seed),
                job.stage,
                getattr(cfg, "rslora", False),
                getattr(cfg, "network", "lora"),
                init,
                -1 if getattr(cfg, "lokr_factor", None) is None else cfg.lokr_factor,
            )
            # PiSSA/OLoRA: the start, whose product was taken out of the base weights (written files add it back)
            return config, None if init == "gaussian" else {k: v.clone() for k, v in lora_state_dict(model).items()}

        adapter_config, init_state = adapter_on(denoiser, targets, "lora-init")
        text = job.text_encoder
        if text is not None:  # the same network on the text encoder's projections, from a seed of its own
            text_config, text_init = adapter_on(text.model, list(job.family.text_encoder_targets), "text-lora-init")
        if preset_adapter:
            freeze_preset(denoiser)
        if job.init_lora is not None:
            load_lora_into(denoiser, match_modules(job.init_lora, denoiser, job.family.kohya_prefix))
        sharding = None
        if fsdp is not None:  # after every change to the base weights (PiSSA, a merged LoRA-1), before the optimizer
            sharding = shard_denoiser(denoiser, fsdp, accelerator.device, mesh)
    if sharding is not None and main:
        job.log(sharding.line(job.label or job.stage))
    per_rank = cfg.grad_accum // job.processes if job.split_accum else cfg.grad_accum  # micro-steps per step
    if getattr(cfg, "fp8_base", False):  # after PiSSA took its start from the fp32 weights
        store_base_in_fp8(denoiser, compute or torch.float32)
    elif narrow_base:  # ... and after a merged LoRA-1 was added in fp32
        store_base_in(denoiser, compute)
    if narrow_base:
        denoiser.to(accelerator.device)
    groups = param_groups(denoiser, cfg, job.stage)
    if text is not None:
        groups += text_encoder_groups(text.model, cfg)
    lora_params = [p for g in groups for p in g["params"]]
    if cfg.fused_backward:
        optimizer = FusedOptimizer(groups, cfg, accelerator.device, cfg.fused_backward["groups"])
    else:
        optimizer = build_optimizer(groups, cfg, accelerator.device)
    scheduler = LrSchedule(optimizer, cfg.lr_schedule, cfg.steps)
    if job.gradient_checkpointing or (fsdp is not None and fsdp.activation_checkpointing):
        enable_gradient_checkpointing(denoiser)
    engine = None
    if zero is not None:  # the optimizer steps inside DeepSpeed's engine, which the lr schedule still sets
        from stages.training.zero import start_engine

        engine, sharding = start_engine(denoiser, optimizer, zero, cfg, per_rank, accelerator.device)
        if main:
            job.log(sharding.line(job.label or job.stage))
    process = make_process(cfg.timesteps, job.prediction_type)
    if cfg.fused_backward:  # accelerate's optimizer wrapper steps in step(); the fused one steps in backward
        denoiser = accelerator.prepare(denoiser)
    elif engine is not None:  # DeepSpeed averages the gradients and steps the optimizer
        pass
    elif job.processes > 1 or dist.size() > 1:  # no DDP wrapper: train_step averages the LoRA's gradients itself
        optimizer = accelerator.prepare(optimizer)
    else:
        denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    # what the checkpoint and the EMA hold: the denoiser's LoRA, and the text encoder's under `text_encoder.`
    unwrapped = accelerator.unwrap_model(denoiser)
    trained = unwrapped if text is None else torch.nn.ModuleDict({"denoiser": unwrapped, "text_encoder": text.model})
    ema = LoraEMA(trained, cfg.ema) if cfg.ema else None
    start, losses, evals, previews, history = restore_checkpoint(
        job.work_dir, trained, optimizer, scheduler, ema, engine, zero, job.stage
    )
    if start and main:
        job.log(f"{job.stage}: resuming from the checkpoint at step {start}/{cfg.steps}")
    if not main:  # the other ranks train, and leave the files and the figures to rank 0 ...
        # (under ZeRO every process writes its piece of the optimizer state into rank 0's checkpoints)
        every = job.checkpoint_every if engine is not None else 0
        job = dataclasses.replace(job, checkpoint_every=every, tracker=None, progress=False, snapshot=None)
        if fsdp is None and (zero is None or zero.stage < 3):  # ... and, with the base model sharded, run the
            job = dataclasses.replace(job, preview=None, evaluate=None)  # previews' and measurements' forwards too
    render = PreviewRenderer(job, unwrapped, ema, write=main, autocast=accelerator.autocast)
    every = preview_every(job.preview, cfg.steps) if job.preview_prompts else 0
    evaluate = Evaluator(job, unwrapped, evals, accelerator.autocast)
    if start == 0:
        evaluate(0)
    trained.train()
    bar = progress.bar(total=cfg.steps, initial=start, desc=job.label or job.stage, unit="step", enabled=job.progress)
    smoothed = None
    step_times = [time.perf_counter()]
    lrs, grad_norms = history.get("lrs", []), history.get("grad_norms", [])  # per step, kept across resumes
    for step in range(start, cfg.steps):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        loss, grad_norm = train_step(step, job, batches, accelerator, denoiser, process, optimizer, lora_params, engine)
        grad_norms.append(grad_norm)
        if not math.isfinite(loss):
            bar.close()
            raise TrainingDiverged(
                f"{job.stage}: the loss became {loss} at step {step + 1}. Lower {job.stage}.lr (now {cfg.lr:g}), "
                f"or set {job.stage}.max_grad_norm if it is 0; the last checkpoint stays for a re-run."
            )
        scheduler.step()
        if ema is not None:
            ema.update(step + 1)
        losses.append(loss)
        smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
        bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        bar.update(1)
        step_times.append(time.perf_counter())
        done = step + 1
        if job.tracker is not None and job.tracker.active:
            lr_figures = {f"lr/{name}": value for name, value in lrs[-1].items()}
            step_seconds = step_times[-1] - step_times[-2]
            figures = {"loss": loss, "loss_smoothed": smoothed, "grad_norm": grad_norm, "step_seconds": step_seconds}
            job.tracker.scalars(done, {**figures, **lr_figures})
        fault_point(f"{job.stage}.step", done)
        if job.eval_every and done % job.eval_every == 0 and done < cfg.steps:
            evaluate(done)
        # The preview of a step comes before its checkpoint, which carries every preview so far: a resumed
        # run ends with the same previews as an uninterrupted one.
        if every and (done % every == 0 or done == cfg.steps):
            previews[f"previews/step{done:06d}.png"] = render(done)
            if job.tracker is not None:
                job.tracker.image(done, "preview", previews[f"previews/step{done:06d}.png"])
            trained.train()
        save_every = getattr(cfg, "save_every_steps", None)
        if job.snapshot and save_every and done % save_every == 0 and done < cfg.steps:  # kept like a preview
            text_so_far = None if text is None else TextOutcome(text.model, text_config, text_init, None, text)
            so_far = TrainOutcome(
                unwrapped, adapter_config, losses, {}, start, [], init_state=init_state, text=text_so_far
            )
            name, path = job.snapshot(so_far, done)
            previews[name] = path
        if job.checkpoint_every and done % job.checkpoint_every == 0 and done < cfg.steps:
            history = {"lrs": lrs, "grad_norms": grad_norms}
            save_checkpoint(
                job.work_dir, done, trained, optimizer, scheduler, losses, evals, previews, ema, history, engine, zero
            )
            fault_point(f"{job.stage}.checkpoint", done)
    bar.close()
    evaluate(cfg.steps)
    if dist.size() == 1:  # accelerate's end_training would leave the process group the run still needs
        accelerator.end_training()
    unwrapped = accelerator.unwrap_model(denoiser)
    if isinstance(optimizer, FusedOptimizer):
        optimizer.remove_hooks()
    ema_state = text_ema = None
    if ema is not None:
        with ema.applied():
            ema_state = {k: v.clone() for k, v in lora_state_dict(unwrapped).items()}  # not views of the raw weights
            text_ema = {k: v.clone() for k, v in lora_state_dict(text.model).items()} if text is not None else None
    text_outcome = None if text is None else TextOutcome(text.model.eval(), text_config, text_init, text_ema, text)
    return TrainOutcome(
        unwrapped,
        adapter_config,
        losses,
        previews,
        start,
        step_times,
        evals,
        ema_state,
        lrs,
        init_state,
        text_outcome,
        grad_norms,
        None if sharding is None else sharding.record(),
    )


def enable_gradient_checkpointing(denoiser) -> None:
    try:
        denoiser.enable_gradient_checkpointing()
    except ValueError:
        raise ConfigError(
            f"runtime.gradient_checkpointing: {type(denoiser).__name__} has no gradient checkpointing in diffusers; "
            f"set it to false for this model."
        ) from None


def apply_preset(denoiser, lora, mode: str, kohya_prefix: str) -> bool:
    """LoRA-1 under LoRA-2: merged into the weights in fp32 (a bf16 merge would erase most of a small ΔW), or
    attached as the adapter `preset`, which freeze_preset keeps active and frozen. A DoRA, LoHa or LoKr LoRA-1
    in adapter mode is a frozen forward hook adding its dense W' − W (fp32) to each layer's output instead.
    True when the preset is a peft adapter (which freeze_preset must keep frozen)."""
    import torch

    from stages.training.lora_files import attach_lora_file, match_modules
    from stages.training.networks import effective_delta

    modules = match_modules(lora, denoiser, kohya_prefix)
    layers = dict(denoiser.named_modules())
    if mode == "adapter" and lora.network == "lora":
        attach_lora_file(denoiser, modules, "preset")
        return True
    with torch.no_grad():
        for name, mod in modules.items():
            layer = layers[name]
            delta = effective_delta(mod, layer.weight)
            if mode == "adapter":
                layer.register_forward_hook(_dense_hook(delta.to(layer.weight.device), layer))
            else:
                w = layer.weight
                w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
    return False


def _dense_hook(delta, layer):
    """delta: fp32, where the model was when LoRA-1 was applied (the CPU when the base is narrowed there); kept on the
    input's device and in its dtype from the first forward on, not copied over in every one."""
    import torch.nn.functional as F

    moved = {}

    def hook(module, args, out):
        x = args[0]
        d = moved.get((x.device, x.dtype))
        if d is None:
            moved.clear()
            d = moved[(x.device, x.dtype)] = delta.to(device=x.device, dtype=x.dtype)
        if d.dim() == 4:
            return out + F.conv2d(x, d, None, layer.stride, layer.padding, layer.dilation)
        return out + F.linear(x, d)

    return hook


def freeze_preset(denoiser) -> None:
    denoiser.set_adapter(["preset", "default"])  # both active; peft marks both trainable ...
    for name, param in denoiser.named_parameters():
        if ".preset." in name:
            param.requires_grad_(False)  # ... so the preset is frozen again by hand


def train_step(
    step, job, batches, accelerator, denoiser, process, optimizer, lora_params, engine=None
) -> tuple[float, float | None]:
    """One optimizer step over grad_accum micro-batches (this rank's share of them) -> (loss, gradient norm before
    clipping, None with the fused backward pass); every draw derives from (seed, micro-step). engine: DeepSpeed's
    (stages/training/zero.py), which runs the forwards, accumulates, averages, clips and steps."""
    import torch

    cfg = job.params
    device = accelerator.device
    total = torch.zeros((), device=device)
    rank = dist.rank() if job.processes > 1 else 0
    per_rank = cfg.grad_accum // job.processes if job.split_accum else cfg.grad_accum
    for micro in range(per_rank):
        if job.split_accum:  # this rank's micro-steps of the step: rank, rank + W, ...
            k = step * cfg.grad_accum + micro * job.processes + rank
        else:  # every rank runs grad_accum micro-steps: the global batch grows with the processes
            k = (step * cfg.grad_accum + micro) * job.processes + rank
        x_t, t, cond, target, *mask = (v.to(device) for v in batches.micro_batch(k, denoiser, process))
        if cfg.dropout > 0:
            torch.manual_seed(derive_seed("dropout", cfg.seed, k))
        with accelerator.autocast():
            if isinstance(cond, TokenIds):  # token ids -> embeddings, through the text encoder's LoRA
                cond = cond.encoded(job.text_encoder)
            elif job.text_encoder is not None:
                cond = job.text_encoder.conditioning(cond)
            model = denoiser if engine is None else ThroughEngine(engine)
            pred = job.family.predict(model, x_t, t, cond, guidance=getattr(cfg, "guidance_embed", None))
        loss = training_loss(
            pred,
            target,
            t,
            process,
            getattr(cfg, "loss", None),
            getattr(cfg, "loss_weighting", "none"),
            mask[0] if mask else None,
            batches.sample_weights(k) if hasattr(batches, "sample_weights") else None,
        )
        if engine is not None:
            engine.backward(loss)  # (divided by the micro-steps, as below)
            engine.step()  # a step at the last micro-step; until then, the gradients add up
        else:
            accelerator.backward(loss / per_rank)
        total += loss.detach()
    if engine is not None:
        dist.mean_([total])
        return total.item() / per_rank, engine_grad_norm(engine)
    if job.processes > 1:  # what DDP does: every rank steps with the mean gradient, and logs the mean loss
        dist.mean_([p.grad for p in lora_params if p.grad is not None] + [total])
    if cfg.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(lora_params, cfg.max_grad_norm)
    elif cfg.fused_backward:  # each group stepped in its backward hook: no gradients are left to measure
        norm = None
    else:
        accelerator.unscale_gradients()  # fp16's loss scale out (the optimizer step would do it anyway)
        norm = torch.nn.utils.get_total_norm([p.grad for p in lora_params if p.grad is not None])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if norm is None:
        return total.item() / per_rank, None  # one device sync per step
    loss_sum, grad_norm = torch.stack([total, norm.to(total)]).tolist()
    return loss_sum / per_rank, grad_norm


class Evaluator:
    """Runs job.evaluate in eval mode once per step number and keeps the results (they survive a resume)."""

    def __init__(self, job: TrainJob, denoiser, evals: list[dict], autocast=contextlib.nullcontext):
        """autocast: the training's (a base stored in bf16 or fp8 needs it to take fp32 inputs)."""
        self.job, self.denoiser, self.evals, self.autocast = job, denoiser, evals, autocast

    def __call__(self, step: int) -> None:
        if self.job.evaluate is None or any(e["step"] == step for e in self.evals):
            return
        was_training = self.denoiser.training
        self.denoiser.eval()
        with self.autocast():
            self.evals.append({"step": step, **self.job.evaluate(self.denoiser)})
        if self.job.tracker is not None:
            group = "fidelity" if self.job.stage == "student" else "eval"
            self.job.tracker.scalars(step, {f"{group}/{k}": v for k, v in self.evals[-1].items() if k != "step"})
        self.denoiser.train(was_training)


# -- previews ---------------------------------------------------------------------------------------------


class PreviewRenderer:
    """Renders the preview prompts at fixed seeds into one PNG strip; builds its pipeline on first use."""

    def __init__(self, job: TrainJob, denoiser, ema=None, write: bool = True, autocast=contextlib.nullcontext):
        self.job, self.denoiser, self._render, self.write, self.autocast = job, denoiser, None, write, autocast
        self.ema = ema if job.preview is not None and job.preview.ema else None

    def __call__(self, step: int) -> Path | None:
        """The strip's file; None on a process that renders only to keep FSDP's gathers in step (write=False)."""
        from stages.training.previews import labelled_row

        job = self.job
        if self._render is None:
            text = {"text_encoder": job.text_encoder} if job.text_encoder is not None else {}
            self._render = job.family.preview_pipeline(
                job.layout, self.denoiser, self.denoiser.device, job.prediction_type, **text
            )
        self.denoiser.eval()
        if job.text_encoder is not None:
            job.text_encoder.model.eval()
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext(), self.autocast():
            images = [self._render(spec) for spec in job.preview_prompts]
        if not self.write:
            return None
        strip = labelled_row(
            images,
            [s.label(im.size) for s, im in zip(job.preview_prompts, images, strict=True)],
            f"{job.label or job.stage}, step {step}",
        )[0]
        path = job.work_dir / f"preview-step{step:06d}.png"
        strip.save(path)
        return path
