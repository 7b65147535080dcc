"""Workflows are DAGs of stages, listed in a valid run order."""

from __future__ import annotations

from pipeline.errors import PlanError
from stages.base import Stage
from stages.caption import CaptionStage
from stages.latents import LatentsStage
from stages.lora1 import ImportLoraStage, Lora1Stage
from stages.prior import PriorStage
from stages.schedule import ScheduleStage
from stages.student import StudentStage
from stages.teacher import TeacherStage
from stages.text import TextStage

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        CaptionStage(),
        LatentsStage(),
        TextStage(),
        Lora1Stage(),
        ScheduleStage(),
        TeacherStage(),
        PriorStage(),
        StudentStage(),
    )
}

WORKFLOWS: dict[str, tuple[str, ...]] = {
    "lora": ("caption", "latents", "text", "lora1"),
    "transfer": ("caption", "latents", "text", "lora1", "schedule", "teacher", "prior", "student"),
}


def get_workflow(name: str, config=None) -> list[Stage]:
    """The stages of a workflow; with a config, `transfer.teacher_lora` swaps lora1 training for an import."""
    if name not in WORKFLOWS:
        raise PlanError(f"unknown workflow {name!r}. Known workflows: {', '.join(WORKFLOWS)}.")
    stages = [STAGES[s] for s in WORKFLOWS[name]]
    if name == "transfer" and config is not None and config.transfer.teacher_lora is not None:
        stages = [ImportLoraStage() if s.name == "lora1" else s for s in stages]
    seen: set[str] = set()
    for stage in stages:  # the listed order must respect every stage's upstream
        missing = [u for u in stage.upstream if u not in seen]
        assert not missing, f"workflow {name}: {stage.name} listed before {missing}"
        seen.add(stage.name)
    return stages
