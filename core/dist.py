"""Several processes of one run (`torchrun` or `accelerate launch`): which one this is, and what they share.

A launcher sets WORLD_SIZE, RANK and LOCAL_RANK (and the rendezvous address); one process is the whole world
otherwise, and every function here is then a no-op. Rank 0 alone holds the store lock, plans, commits manifests
and writes refs, exports and logs; the other ranks run the stages that shard their work (the training stages) and
wait at a barrier while rank 0 runs the rest. A rank that fails exits, and the launcher stops the others: rank 0
commits a stage only after a barrier that every rank reached, so nothing of a failed stage is committed.
"""

from __future__ import annotations

import contextlib
import datetime
import os

from core.errors import PipelineError

WAIT_HOURS = 24


def size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def check_launcher() -> None:
    """Refuse what an accelerate config asks for that the stages do not do: DeepSpeed ZeRO and FSDP shard the
    model and the optimizer inside accelerate's wrappers, which the training stages do not use."""
    from core.errors import ConfigError

    for flag, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed ZeRO"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(flag, "").lower() in ("1", "true", "yes"):
            import torch

            where = "CUDA GPUs; this run has none" if not torch.cuda.is_available() else "support lora-pipeline lacks"
            raise ConfigError(
                f"the accelerate config asks for {name} ({flag}), which needs {where}. lora-pipeline shards its "
                f"training stages itself (docs/distributed.md): launch with torchrun, or an accelerate config "
                f"without {name} (distributed_type MULTI_GPU)."
            )


def init() -> None:
    """Join the launcher's process group (gloo for the CPU, NCCL beside it for CUDA tensors)."""
    check_launcher()
    if size() == 1:
        return
    import torch
    import torch.distributed as td

    if td.is_initialized():
        return
    # the other ranks wait at a barrier while rank 0 runs a stage of its own (a student of hours): no time-out
    # short of a day stops them
    wait = datetime.timedelta(hours=WAIT_HOURS)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend="cpu:gloo,cuda:nccl", timeout=wait)
    else:
        td.init_process_group(backend="gloo", timeout=wait)


class PeerFailed(PipelineError):
    """Another process of the run failed (its own message is above); this one stops too."""


@contextlib.contextmanager
def _collective(what: str):
    try:
        yield
    except RuntimeError as e:  # gloo / NCCL: a peer that exited closes its connections
        raise PeerFailed(
            f"process {rank()} of {size()}: another process of this run stopped during {what} (its message is "
            f"above); nothing of the running stage was committed. Fix that and run the same command again: the "
            f"stages already committed are reused. ({str(e).splitlines()[0][:200]})"
        ) from None


def barrier() -> None:
    if size() > 1:
        import torch.distributed as td

        with _collective("a barrier"):
            td.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if size() == 1:
        return obj
    import torch.distributed as td

    box = [obj]
    with _collective("the plan's broadcast"):
        td.broadcast_object_list(box, src=0)
    return box[0]


def mean_(tensors: list) -> None:
    """Average tensors over the ranks in place, in one all-reduce of their flattened concatenation."""
    if size() == 1 or not tensors:
        return
    import torch
    import torch.distributed as td

    flat = torch.cat([t.reshape(-1) for t in tensors])
    with _collective("a training step"):
        td.all_reduce(flat)
    flat /= size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


class main_first:
    """A block rank 0 runs before the others (which wait at a barrier, then run it and find its writes done):
    for work that fills the store, such as encoding drawn captions."""

    def __enter__(self):
        if size() > 1 and not is_main():
            barrier()

    def __exit__(self, kind, value, tb):
        if size() > 1 and is_main() and kind is None:
            barrier()
        return False
