"""The orchestrator's API: what the command line (or a notebook) calls. It opens projects, runs and plans
workflows, reports status, collects garbage and verifies the store; callers never reach into `cache/` or
`stages/` themselves, so a new family or stage is added below this line and nothing above it changes.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import PipelineError
from pipeline.runner import StageRun, run_workflow
from stages.base import PlanEnv

__all__ = [
    "StageRun",
    "collect_garbage",
    "export_lora",
    "family",
    "open_project",
    "report",
    "run_workflow",
    "stage_history",
    "status",
    "verify",
    "workflow_names",
]


def open_project(config: Path, overrides: list[str] = ()) -> PlanEnv:
    """The project a config file describes: its validated config (with --set overrides) and its store."""
    from cache.store import Store
    from pipeline.config_loading import load_config

    loaded = load_config(config, overrides)
    return PlanEnv(loaded, Store(loaded.store_dir))


def report(env: PlanEnv, workflow: str | None, out: Path | None = None, pictures: bool = True) -> dict:
    """Write the HTML report of a workflow's last run (default: the workflow that ran last) -> {path, bytes, ...}."""
    from pipeline import html_report
    from pipeline.workflows import WORKFLOWS

    if workflow is None:
        docs = {w: env.store.ref_doc(w) for w in WORKFLOWS}
        ran = sorted((d.get("updated", ""), w) for w, d in docs.items() if d.get("stages"))
        if not ran:
            raise PipelineError("no workflow has run in this store yet: `pipeline run lora` (or transfer, "
                                "differential) makes one, then `pipeline report` shows it.")  # fmt: skip
        workflow = ran[-1][1]
    elif workflow not in WORKFLOWS:
        raise PipelineError(f"unknown workflow {workflow!r}. Known workflows: {', '.join(WORKFLOWS)}.")
    if out is None:
        out = env.loaded.resolve(env.config.runtime.output_dir) / workflow / "report.html"
    return html_report.write(env, workflow, out, pictures)


def workflow_names() -> list[str]:
    from pipeline.workflows import WORKFLOWS

    return list(WORKFLOWS)


def family(name: str, model: Path | None = None, loras: list[Path] = ()):
    """A model family by its config name (`sd15`), for the LoRA tools; "auto": detected from the model, else from
    the first LoRA file that says (its metadata or module names), else sd15."""
    from stages.families import detect_family, detect_lora_family, get_family

    if name != "auto":
        return get_family(name)
    if model is not None:
        found, why = detect_family(Path(model))
        if found is None:
            raise PipelineError(f"--model {model}: could not tell its model family ({why}); pass --family.")
        return get_family(found)
    for path in loras:
        found = detect_lora_family(Path(path))
        if found:
            return get_family(found)
    # Nothing says otherwise: SD, the family whose kohya files carry no identification. A file that is not a LoRA
    # at all, or one for another family, is then named by the reader (its keys do not fit).
    return get_family("sd15")


def status(env: PlanEnv, workflow: str | None = None) -> list[dict]:
    """Per workflow (the one named, else every one with a run, else lora): each stage's state, key, causes,
    progress and output files. A stage another process is running right now is RUNNING."""
    from pipeline.planner import plan_workflow
    from pipeline.workflows import get_workflow

    names = [workflow] if workflow else [w for w in workflow_names() if env.store.read_ref(w)] or ["lora"]
    holder = env.store.lock.held()
    report = []
    for name in names:
        plans = plan_workflow(env, get_workflow(name, env), env.store.read_ref(name))
        if holder is not None and holder.get("what", f"pipeline run {name}") == f"pipeline run {name}":
            _mark_running(plans, holder)
        stages = []
        for p in plans:
            outputs = p.manifest.outputs if p.manifest else {}
            stages.append(
                {
                    "name": p.name,
                    "state": p.state,
                    "key": p.key,
                    "causes": p.causes,
                    "progress": list(p.progress) if p.progress else None,
                    "notes": p.stage.artifact_notes(p.manifest) if p.manifest else [],
                    "outputs": {k: str(env.store.object_path(v["digest"])) for k, v in outputs.items()},
                }
            )
        report.append({"workflow": name, "stages": stages})
    env.store.memo.save()
    return report


def _mark_running(plans, holder: dict) -> None:
    """Another process runs this workflow: its first unfinished stage is RUNNING, not `PARTIAL … interrupted`."""
    from cache.locks import describe_holder

    who = describe_holder(holder)
    for plan in plans:
        if plan.state != "fresh":
            plan.state, plan.causes = "running", [f"{who} is running it"]
            return


def stage_history(env: PlanEnv, stage: str) -> dict:
    """`pipeline history`: every artifact of a stage the store keeps (pipeline/history.py)."""
    from pipeline.history import history

    return history(env, stage)


def export_lora(env: PlanEnv, stage: str, key=None, out=None, step=None, fmt="kohya", precision=None) -> dict:
    """`pipeline export`: one LoRA file of a kept artifact, copied out (pipeline/history.py)."""
    from pipeline.history import export

    return export(env, stage, key, out, step, fmt, precision)


def collect_garbage(config: Path, dry_run: bool) -> dict:
    """`pipeline gc`: remove what no workflow's last run reaches (refuses on refs it cannot read)."""
    from cache.store import Store
    from pipeline.config_loading import load_config

    store = Store(load_config(config).store_dir)
    store.lock_for("pipeline gc", wait=False)
    try:
        return store.gc(dry_run=dry_run)
    finally:
        store.lock.release()


def verify(env: PlanEnv, progress: bool = True) -> dict:
    """`pipeline verify`: re-hash inputs and the store under the store lock; see pipeline/verify.py."""
    from pipeline.verify import verify as run_verify

    env.store.lock_for("pipeline verify", wait=False)
    try:
        return run_verify(env, progress=progress)
    finally:
        env.store.lock.release()
