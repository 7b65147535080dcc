"""FSDP for the training stages: the frozen base model sharded over the processes, the LoRA kept whole.

An accelerate FSDP config (core/dist.py FsdpSettings) is applied here with torch's fully_shard: every wrap unit
(the model's transformer blocks by default) and the model itself keep 1/W of their base weights per process and
gather a unit's weights only while it runs. The trained parameters (the LoRA, DoRA's magnitudes) are left out of
the shards: they are a fraction of a percent of the model, so every process keeps them and the optimizer whole,
the gradients are averaged as without FSDP (train_step), and the checkpoints, the optimizer, gradient clipping and
the files take the form they have without FSDP (a checkpoint resumes with or without FSDP).

Every process must run every forward of the sharded model in step (each gathers its units' weights from all), so
under FSDP the previews and the student's fidelity measurements run on every process; rank 0 alone writes them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from core import dist
from core.errors import ConfigError


@dataclass
class Sharding:
    """What shard_denoiser did, for the log and the stage's record."""

    strategy: str
    processes: int
    units: int  # fully_shard calls, the model itself included
    classes: list[str]  # the classes of the wrapped units
    base_bytes: int  # the model's sharded weights, whole
    local_bytes: int  # this process's share of them
    notes: list[str]  # what else the config turned on (activation checkpointing, offloading), or ignored

    def record(self) -> dict:
        return {"fsdp": dataclasses.asdict(self)}

    def line(self, stage: str) -> str:
        gb = 1024**3
        return (
            f"{stage}: FSDP {self.strategy} over {self.processes} processes, {self.units} units "
            f"({', '.join(self.classes) or 'the whole model'}): each process keeps {self.local_bytes / gb:.3g} GB of "
            f"the base model's {self.base_bytes / gb:.3g} GB; the LoRA stays whole on every process"
            + "".join(f"; {note}" for note in self.notes)
        )


def wrap_units(denoiser, settings) -> list:
    """The modules that become FSDP units besides the model, children before the modules that hold them."""
    if settings.wrap == "NO_WRAP":
        return []
    modules = [m for _, m in denoiser.named_modules() if m is not denoiser]
    if settings.wrap == "SIZE_BASED_WRAP":
        units, covered = [], set()
        for module in reversed(modules):  # children first: a module counts the weights no unit inside it took
            own = [p for p in module.parameters() if id(p) not in covered]
            if sum(p.numel() for p in own) >= settings.min_params:
                units.append(module)
                covered.update(id(p) for p in own)
        return units
    names = settings.classes or tuple(getattr(denoiser, "_no_split_modules", None) or ())
    if not names:
        raise ConfigError(
            f"FSDP: {type(denoiser).__name__} names no transformer blocks to wrap; set fsdp_transformer_layer_cls_to_"
            f"wrap in the accelerate config (FSDP_TRANSFORMER_CLS_TO_WRAP), or fsdp_auto_wrap_policy SIZE_BASED_WRAP."
        )
    units = [m for m in reversed(modules) if type(m).__name__ in names]
    found = {type(m).__name__ for m in units}
    missing = [n for n in names if n not in found]
    if settings.classes and missing:
        present = sorted({type(m).__name__ for m in modules if any(True for _ in m.children())})
        raise ConfigError(
            f"FSDP: the accelerate config's fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which "
            f"{type(denoiser).__name__} does not have. Its blocks: {', '.join(present)} (or leave the setting out "
            f"to wrap the blocks diffusers names: {', '.join(getattr(denoiser, '_no_split_modules', None) or [])})."
        )
    return units


def device_mesh(settings, device):
    """The processes' mesh (every process makes it at once): one dimension, or replicas x shards for HYBRID."""

    from torch.distributed.device_mesh import init_device_mesh

    world = dist.size()
    if settings.hybrid:  # shards within a node, replicas across nodes
        local = dist.local_size()
        if local < 1 or world % local:
            raise ConfigError(
                f"FSDP {settings.strategy}: {world} processes do not make whole nodes of {local}; launch the same "
                f"number of processes on every node, or use FULL_SHARD."
            )
        return init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world,))


def shard_denoiser(denoiser, settings, device, mesh) -> Sharding:
    """Shard the denoiser's frozen weights over the mesh's processes and put its trained parameters on `device`.
    The denoiser may sit on the CPU: fully_shard moves each process's share to the device, so a model larger than
    one GPU never lands whole on one. Nothing here waits on the other processes (loading in turn relies on it)."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    world = dist.size()
    ignored = {id(p): p for p in denoiser.parameters() if p.requires_grad}
    if settings.ignored_modules:
        try:
            pattern = re.compile(settings.ignored_modules)
        except re.error as e:
            raise ConfigError(
                f"the accelerate config's fsdp_ignored_modules {settings.ignored_modules!r} is not a regular "
                f"expression ({e})."
            ) from None
        kept = [m for name, m in denoiser.named_modules() if name and pattern.search(name)]
        trained = len(ignored)
        for module in kept:
            ignored.update({id(p): p for p in module.parameters()})
    units = wrap_units(denoiser, settings)
    classes = sorted({type(u).__name__ for u in units})  # before fully_shard renames them (FSDP<class>)
    notes = ["activation checkpointing"] if settings.activation_checkpointing else []
    if settings.ignored_modules:
        notes.append(f"fsdp_ignored_modules keeps whole: {len(kept)} modules, {len(ignored) - trained} weights")
    if settings.ram_efficient_loading:
        notes.append("the processes of a node loaded the model one after another (fsdp_cpu_ram_efficient_loading)")
    if settings.offload:
        notes.append("shards offloaded to CPU memory" if device.type == "cuda" else "nothing to offload on the CPU")
    offload = CPUOffloadPolicy() if settings.offload and device.type == "cuda" else OffloadPolicy()
    for unit in [*units, denoiser]:
        fully_shard(
            unit,
            mesh=mesh,
            reshard_after_forward=settings.reshard_after_forward,
            offload_policy=offload,
            ignored_params=set(ignored.values()),
        )
    with torch.no_grad():
        for p in ignored.values():  # fully_shard moved what it shards (and the buffers); these go here
            p.data = p.data.to(device)
    base = local = 0
    for p in denoiser.parameters():
        if id(p) in ignored:
            continue
        size = p.element_size()
        base += p.numel() * size
        local += (p.to_local().numel() if hasattr(p, "to_local") else p.numel()) * size
    return Sharding(settings.strategy, world, len(units) + 1, classes, base, local, notes)
