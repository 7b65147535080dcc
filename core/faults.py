"""Fault injection for the crash tests: `LORA_PIPELINE_FAULT=<point>:<n>` SIGKILLs the process at the
n-th pass of a named point. It is how the tests place a real `kill -9` at the worst moment (an array
written but not committed, a step done but not checkpointed) instead of racing a timer."""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("LORA_PIPELINE_FAULT", "")


def fault_point(name: str, count: int) -> None:
    """`<point>:<n>` kills every process that passes there; `<point>:<n>@<rank>` only that rank of a multi-process
    run (core/dist.py)."""
    if not _SPEC:
        return
    spec, _, rank = _SPEC.partition("@")
    if spec == f"{name}:{count}" and (not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
