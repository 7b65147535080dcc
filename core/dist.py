"""Several processes of one run (`torchrun` or `accelerate launch`): which one this is, and what they share.

A launcher sets WORLD_SIZE, RANK and LOCAL_RANK (and the rendezvous address); one process is the whole world
otherwise, and every function here is then a no-op. Rank 0 alone holds the store lock, plans, commits manifests
and writes refs, exports and logs; the other ranks run the stages that shard their work (the training stages) and
wait at a barrier while rank 0 runs the rest. A rank that fails exits, and the launcher stops the others: rank 0
commits a stage only after a barrier that every rank reached, so nothing of a failed stage is committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from pathlib import Path

from core.errors import PipelineError

WAIT_HOURS = 24


def size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_size() -> int:
    """The processes on this node (the launcher's LOCAL_WORLD_SIZE; all of them when it does not say)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(size())))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


@dataclasses.dataclass(frozen=True)
class FsdpSettings:
    """What an accelerate FSDP config asks of the training stages (accelerate launch puts it in the environment:
    ACCELERATE_USE_FSDP, FSDP_*). lora-pipeline applies it itself with torch's fully_shard (stages/training/fsdp.py)."""

    strategy: str  # FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or HYBRID_SHARD_ZERO2 (NO_SHARD: no FSDP at all)
    wrap: str = "TRANSFORMER_BASED_WRAP"  # or SIZE_BASED_WRAP, NO_WRAP
    classes: tuple[str, ...] = ()  # the transformer classes to wrap; () = the model's own (_no_split_modules)
    min_params: int = 100_000_000  # SIZE_BASED_WRAP: a module of at least this many parameters is one unit
    offload: bool = False  # the sharded weights kept in CPU memory between uses (GPU runs)
    activation_checkpointing: bool = False
    ignored_modules: str = ""  # a regular expression: modules whose weights every process keeps whole
    ram_efficient_loading: bool = False  # the processes of a node load the model one after another

    @property
    def reshard_after_forward(self) -> bool:
        """FULL_SHARD (ZeRO-3) frees the gathered weights after each unit's forward; SHARD_GRAD_OP (ZeRO-2) keeps
        them to the backward."""
        return self.strategy in ("FULL_SHARD", "HYBRID_SHARD")

    @property
    def hybrid(self) -> bool:
        return self.strategy.startswith("HYBRID_SHARD")


_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")  # accelerate's 1..5
_WRAPS = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
_fsdp: FsdpSettings | None = None
_zero = None  # ZeroSettings


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def read_fsdp() -> FsdpSettings | None:
    """The FSDP settings of the environment accelerate launch made from its config, None when it asks for none
    (or for NO_SHARD). A value this project cannot apply is a ConfigError that names the config key."""
    from core.errors import ConfigError

    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    if os.environ.get("FSDP_VERSION", "1").strip() == "2":  # FSDP2 configs say only whether to reshard
        strategy = "FULL_SHARD" if _flag("FSDP_RESHARD_AFTER_FORWARD", "true") else "SHARD_GRAD_OP"
    else:
        raw = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
        strategy = _STRATEGIES[int(raw) - 1] if raw.isdigit() and 1 <= int(raw) <= 5 else raw
        if strategy not in _STRATEGIES:
            raise ConfigError(
                f"the accelerate config's fsdp_sharding_strategy is {raw!r} (FSDP_SHARDING_STRATEGY); use one of "
                f"{', '.join(_STRATEGIES)}."
            )
    if strategy == "NO_SHARD":  # DDP by another name: what the stages do without FSDP
        return None
    wrap = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper() or _WRAPS[0]
    if wrap not in _WRAPS:
        raise ConfigError(
            f"the accelerate config's fsdp_auto_wrap_policy is {wrap!r} (FSDP_AUTO_WRAP_POLICY); use one of "
            f"{', '.join(_WRAPS)}."
        )
    classes = tuple(c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    raw_min = os.environ.get("FSDP_MIN_NUM_PARAMS", "100000000").strip()
    if not raw_min.isdigit():
        raise ConfigError(
            f"the accelerate config's fsdp_min_num_params is {raw_min!r} (FSDP_MIN_NUM_PARAMS); it is a whole "
            f"number of parameters."
        )
    return FsdpSettings(
        strategy=strategy,
        wrap=wrap,
        classes=classes,
        min_params=int(raw_min),
        offload=_flag("FSDP_OFFLOAD_PARAMS"),
        activation_checkpointing=_flag("FSDP_ACTIVATION_CHECKPOINTING"),
        ignored_modules=os.environ.get("FSDP_IGNORED_MODULES", "").strip(),
        ram_efficient_loading=_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"),
    )


def fsdp() -> FsdpSettings | None:
    """The run's FSDP settings (read by init()), None without FSDP."""
    return _fsdp


@dataclasses.dataclass(frozen=True)
class ZeroSettings:
    """What an accelerate DeepSpeed config asks of the training stages (accelerate launch puts it in the environment:
    ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_*, or a deepspeed_config_file). stages/training/zero.py runs it."""

    stage: int  # 1, 2 or 3 (0 is plain data parallelism: no ZeRO at all)
    offload_optimizer: str = "none"  # none or cpu: the optimizer state and its step in CPU memory (GPU runs)
    offload_param: str = "none"  # none or cpu: ZeRO-3's shards of the weights in CPU memory between uses
    source: str = "the accelerate config"  # where the settings came from, for messages
    # the deepspeed_config_file's other zero_optimization settings (bucket sizes, stage3_max_live_parameters, ...),
    # as JSON: passed to DeepSpeed as they are
    tuning: str = "{}"


def _zero_value(config: dict, path: tuple[str, ...], default):
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return default
        config = config[key]
    return config


def read_deepspeed() -> ZeroSettings | None:
    """The ZeRO settings of the environment accelerate launch made from its config (its zero_stage and offload
    lines, or the deepspeed_config_file it names), None when it asks for no DeepSpeed or for stage 0. A value this
    project cannot apply is a ConfigError that names the key and where it was read."""
    import json

    from core.errors import ConfigError

    if not _flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if file and file.lower() != "none":
        try:
            config = json.loads(Path(file).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(
                f"the accelerate config's deepspeed_config_file {file} cannot be read ({e.strerror}); give the path "
                f"of a DeepSpeed JSON file that exists."
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"the DeepSpeed config {file} is not JSON ({e}); fix the file.") from None
        source = f"the DeepSpeed config {file}"
        stage = _zero_value(config, ("zero_optimization", "stage"), 0)
        optimizer = _zero_value(config, ("zero_optimization", "offload_optimizer", "device"), "none")
        param = _zero_value(config, ("zero_optimization", "offload_param", "device"), "none")
        keys = ("zero_optimization.stage", "zero_optimization.offload_optimizer.device",
                "zero_optimization.offload_param.device")  # fmt: skip
        section = config.get("zero_optimization") if isinstance(config, dict) else None
        own = ("stage", "offload_optimizer", "offload_param")
        # ("auto": a value accelerate or transformers would fill in; here the defaults of engine_config stand)
        tuning = {k: v for k, v in (section or {}).items() if k not in own and v != "auto"}
    else:
        source = "the accelerate config"
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2").strip()  # accelerate's default
        optimizer = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
        param = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
        keys = ("zero_stage", "offload_optimizer_device", "offload_param_device")
        tuning = {}
    if str(stage).strip() not in ("0", "1", "2", "3"):
        raise ConfigError(f"{source}'s {keys[0]} is {stage!r}; use 0, 1, 2 or 3.")
    devices = []
    for key, value in zip(keys[1:], (optimizer, param), strict=True):
        value = str(value).strip().lower()
        if value not in ("none", "cpu"):
            why = " (NVMe offload is not supported: it needs DeepSpeed's async I/O build)" if value == "nvme" else ""
            raise ConfigError(f"{source}'s {key} is {value!r}{why}; use none or cpu.")
        devices.append(value)
    if int(stage) == 0:  # plain data parallelism: what the stages do without DeepSpeed
        return None
    if devices[1] != "none" and int(stage) != 3:
        raise ConfigError(f"{source}'s {keys[2]} is {devices[1]}, which only ZeRO stage 3 has; set it to none.")
    return ZeroSettings(int(stage), devices[0], devices[1], source, json.dumps(tuning, sort_keys=True))


def zero() -> ZeroSettings | None:
    """The run's DeepSpeed ZeRO settings (read by init()), None without DeepSpeed."""
    return _zero


def check_launcher() -> None:
    """Read what the launcher's accelerate config asks for. FSDP and DeepSpeed ZeRO are applied by the training
    stages themselves, so accelerate's own set-up of them is switched off (their flags leave the environment)."""
    global _fsdp, _zero
    _fsdp, _zero = read_fsdp(), read_deepspeed()
    os.environ.pop("ACCELERATE_USE_FSDP", None)  # accelerate's Accelerator would otherwise set up FSDP of its own
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # ... or DeepSpeed


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


def _peer_failed(what: str, e: BaseException) -> PeerFailed:
    return PeerFailed(
        f"process {rank()} of {size()}: another process of this run stopped during {what} (it says why, or "
        f"the launcher says how it stopped); nothing of the running stage was committed. Fix that and run the "
        f"same command again: the stages already committed are reused. ({str(e).splitlines()[0][:200]})"
    )


@contextlib.contextmanager
def _collective(what: str):
    try:
        yield
    except RuntimeError as e:  # gloo / NCCL: a peer that exited closes its connections
        raise _peer_failed(what, e) from None


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def peer_failure(e: BaseException) -> PeerFailed | None:
    """The PeerFailed of an error a collective raised inside a library (FSDP's gathers, DeepSpeed's reductions)
    because another process exited, None for any other error."""
    if size() > 1 and isinstance(e, RuntimeError) and any(mark in str(e) for mark in _PEER_GONE):
        return _peer_failed("a training step", e)
    return None


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


class in_turn:
    """A block the processes of each node run one after another (local rank 0 first, the others waiting at
    barriers; the nodes side by side), and that every process leaves when the last turn has ended: for loading a
    model that fits in a node's memory once but not once per process. `active` False runs it on every process at
    once. The block must not itself wait on other processes."""

    def __init__(self, active: bool = True):
        self.active = active and size() > 1
        self.turns = self.mine = 0

    def __enter__(self):
        if not self.active:
            return self
        import torch
        import torch.distributed as td

        self.mine = int(os.environ.get("LOCAL_RANK", str(rank())))
        turns = torch.tensor([local_size()])
        with _collective("the start of loading in turn"):
            td.all_reduce(turns, op=td.ReduceOp.MAX)  # every process waits at as many barriers
        self.turns = int(turns.item())
        for _ in range(self.mine):
            barrier()
        return self

    def __exit__(self, kind, value, tb):
        if self.active and kind is None:  # (a failure exits; the others' barrier says so)
            release_freed_memory()  # what this turn freed, for the next process's
            for _ in range(self.turns - self.mine):  # the others' turns, and the end of the last one
                barrier()
        return False


def release_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the system: glibc keeps a freed heap for the process that
    freed it (malloc_trim; nothing elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator decides
        pass


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


def launch(processes: int, args: list[str]) -> int:
    """`python -m cli <args>` in `processes` processes on this machine, as `torchrun --standalone --nproc_per_node`
    starts them (torch's elastic launcher, no restarts) -> the exit code. Each process prints its own messages; a
    process that died without one (a signal: out of memory, kill -9) is named here, and no launcher traceback is
    printed."""
    import logging
    import signal
    import sys
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if size() > 1:
        raise PipelineError(
            "--processes starts processes of its own, but this command already runs under a launcher (WORLD_SIZE "
            "is set): leave --processes out, or run the command without torchrun / accelerate launch."
        )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: the processes share the cores
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its summary of a failure
    # The launcher keeps its processes' error files in a folder that, left to itself, it makes in the temp folder
    # and never removes (a torchelastic_* per run); this one is ours and goes when the launch is over.
    with tempfile.TemporaryDirectory(prefix="pipeline-launch-") as logs:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=processes,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            max_restarts=0,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, sys.executable)("-m", "cli", *args)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            if failure.exitcode >= 0:  # it printed its own message above
                return failure.exitcode or 1
            try:
                name = signal.Signals(-failure.exitcode).name
            except ValueError:
                name = f"signal {-failure.exitcode}"
            why = " (the system's out-of-memory killer, or kill -9)" if name == "SIGKILL" else ""
            print(
                f"error: process {rank} of {processes} was stopped by {name}{why} and could not say why; nothing "
                f"of the running stage was committed. Run the same command again: it resumes from the last "
                f"checkpoint.",
                file=sys.stderr,
            )
            return 1
    return 0
