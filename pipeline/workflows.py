"""Workflows are DAGs of stages, listed in a valid run order."""

from __future__ import annotations

from pipeline.errors import PlanError
from stages.base import Stage
from stages.caption import CaptionStage
from stages.latents import LatentsStage
from stages.lora1 import Lora1Stage
from stages.text import TextStage

STAGES: dict[str, Stage] = {s.name: s for s in (CaptionStage(), LatentsStage(), TextStage(), Lora1Stage())}

WORKFLOWS: dict[str, tuple[str, ...]] = {
    "lora": ("caption", "latents", "text", "lora1"),
}


def get_workflow(name: str) -> list[Stage]:
    if name not in WORKFLOWS:
        raise PlanError(f"unknown workflow {name!r}. Known workflows: {', '.join(WORKFLOWS)}.")
    stages = [STAGES[s] for s in WORKFLOWS[name]]
    seen: set[str] = set()
    for stage in stages:  # the listed order must respect every stage's upstream
        missing = [u for u in stage.upstream if u not in seen]
        assert not missing, f"workflow {name}: {stage.name} listed before {missing}"
        seen.add(stage.name)
    return stages
