"""Running a workflow: reuse fresh artifacts, run the rest in order, commit manifests, update the ref."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cache.hashing import sha256_file
from cache.locks import describe_holder
from cache.store import Manifest, write_json_atomic
from core import dist
from core.errors import PlanError
from pipeline import __version__
from pipeline.planner import (
    StagePlan,
    contract_diff,
    inherited_contract,
    plan_stage,
    plan_workflow,
)
from pipeline.workflows import get_workflow
from stages.base import PlanEnv, StageContext
from stages.devices import check_attention, resolve_device
from stages.tracking import check_backends, open_tracker

EXPORT_MARKER = ".lora-pipeline-export"


@dataclass
class StageRun:
    name: str
    action: str  # ran | reused | would run | would reuse
    key: str
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    location: str = ""  # where to look: the export folder, or the artifact's store folder for stages without files
    summary: str = ""
    causes: list[str] = field(default_factory=list)
    replaced: str | None = None  # the key the workflow's last run had for this stage, when this run made another


def _git_describe() -> str | None:
    try:
        here = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_workflow(
    env: PlanEnv, workflow: str, only: str | None = None, dry_run: bool = False, progress: bool = True
) -> list[StageRun]:
    stages = get_workflow(workflow, env)
    if only is not None and only not in {s.name for s in stages}:
        names = ", ".join(s.name for s in stages)
        raise PlanError(f"--only {only}: workflow {workflow!r} has no stage {only!r}; its stages are {names}.")
    if dry_run:
        return [_dry(p) for p in _plans(env, workflow, stages, only)]
    check_backends(env.config.runtime.log_with)
    if env.config.runtime.attention != "sdpa":  # before the first stage, not at the first that loads the denoiser
        check_attention(env.config.runtime.attention, resolve_device(env.config.runtime.device))

    def waiting(holder):
        print(f"waiting for the store lock held by {describe_holder(holder)} ...", file=sys.stderr, flush=True)

    main = dist.is_main()
    if main:  # several processes (core/dist.py): rank 0 alone locks, plans first, commits and writes refs
        env.store.lock_for(f"pipeline run {workflow}", on_wait=waiting)
    try:
        plans = _plans(env, workflow, stages, only) if main else None
        plan_of_rank0 = dist.broadcast([(p.name, p.key, p.state) for p in plans] if main else None)
        if not main:
            plans = _plans(env, workflow, stages, only)
            _same_plan(plans, plan_of_rank0)
        dist.barrier()  # nothing runs before every rank has planned
        for plan in plans:
            if plan.state != "fresh":
                plan.stage.preflight(plan.env or env, plan.params)
        runs = []
        for plan in plans:
            if plan.state == "fresh":
                runs.append(StageRun(plan.name, "reused", plan.key))
            else:
                if main or plan.stage.sharded:
                    upstream = {role: _upstream_manifest(env, plans, plan, role) for role in plan.upstream_nodes}
                    runs.append(_run_stage(plan.env or env, plan, upstream, progress))
                else:  # rank 0 runs this stage alone
                    runs.append(StageRun(plan.name, "ran", plan.key, causes=plan.causes))
                dist.barrier()  # rank 0 has committed
                plan.manifest = env.store.load_manifest(plan.stage.name, plan.key)
                plan.state = "fresh"
        if not main:
            return runs
        ref = env.store.read_ref(workflow)
        last_run = {  # what this run did, for `pipeline report`: the key each stage had before it re-ran
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stages": [
                {"name": r.name, "stage": p.stage.name, "action": r.action, "key": r.key,
                 "seconds": round(r.seconds, 3), "causes": r.causes,
                 "replaced": ref.get(p.name) if r.action == "ran" and ref.get(p.name) != r.key else None}
                for r, p in zip(runs, plans, strict=True)
            ],
        }  # fmt: skip
        for run, entry in zip(runs, last_run["stages"], strict=True):
            run.replaced = entry["replaced"]
        ref.update({p.name: p.key for p in plans})
        kinds = {p.name: p.stage.name for p in plans if p.name != p.stage.name}
        env.store.write_ref(workflow, ref, config=env.config.model_dump(mode="json"), kinds=kinds, run=last_run)
        output_root = env.loaded.resolve(env.config.runtime.output_dir) / workflow
        for run, plan in zip(runs, plans, strict=True):
            settings = plan.stage.export_settings(plan.env or env) if plan.export else None
            run.outputs = export_outputs(env, plan.manifest, output_root / plan.name, settings) if plan.export else []
            stage_dir = env.store.stage_dir(plan.stage.name, plan.key)
            run.location = str((output_root / plan.name) if run.outputs else stage_dir) + "/"
        return runs
    finally:
        if main:
            env.store.memo.save()
            env.store.lock.release()


def _same_plan(plans: list[StagePlan], rank0: list) -> None:
    """Every rank must plan what rank 0 planned: the same config, inputs and store (a shared filesystem)."""
    mine = [(p.name, p.key, p.state) for p in plans]
    if mine != rank0:
        pairs = zip(mine + [None] * len(rank0), rank0 + [None] * len(mine), strict=True)
        diff = next((a, b) for a, b in pairs if a != b)
        raise PlanError(
            f"process {dist.rank()} planned {diff[0]} where process 0 planned {diff[1]}: every process must see the "
            f"same pipeline.toml, inputs and store. Put the store and the data on a filesystem every node mounts "
            f"at the same path."
        )


def _plans(env: PlanEnv, workflow: str, stages, only: str | None) -> list[StagePlan]:
    ref = env.store.read_ref(workflow)
    plans = {p.name: p for p in plan_workflow(env, stages, ref)}
    if only is None:
        return list(plans.values())
    target = plans[only]
    upstream = {role: _existing_upstream(env, plans[n], ref, workflow) for role, n in target.upstream_nodes.items()}
    if target.stage.enforce_contract:
        check_contract(target, upstream, workflow)
    node = next(n for n in stages if n.name == only)
    return [plan_stage(target.env or env, node, upstream, ref)]


def check_contract(plan: StagePlan, upstream: dict[str, Manifest], workflow: str) -> None:
    """--only on a phase-2 stage: the upstream artifacts must carry the contract the config resolves to."""
    diff = contract_diff(plan.contract, inherited_contract(plan.stage, upstream), labels=("config", "artifact"))
    if not diff:
        return
    sources = plan.stage.contract_from or list(upstream)
    names = ", ".join(f"{u} {upstream[u].key[:12]}" for u in sources)
    raise PlanError(
        f"--only {plan.name}: the upstream artifacts ({names}) were made under another contract than this "
        f"config's; {plan.name} would train on data that does not match its settings:\n"
        + "\n".join(f"  {d}" for d in diff)
        + "\nTwo ways out: change the config back to the artifact's values, or let the upstream stages re-run "
        f"with `pipeline run {workflow}` (only the stages whose inputs changed run again)."
    )


def _existing_upstream(env: PlanEnv, plan: StagePlan, ref: dict, workflow: str) -> Manifest:
    """The upstream artifact for --only: the current config's if it exists, else the last run's."""
    if plan.manifest is not None:
        return plan.manifest
    last = env.store.load_manifest(plan.stage.name, ref[plan.name]) if plan.name in ref else None
    if last is None:
        raise PlanError(
            f"--only needs the {plan.name} artifact, and there is none for this config. Make it with "
            f"`pipeline run {workflow} --only {plan.name}` or run the whole workflow with `pipeline run {workflow}`."
        )
    print(
        f"note: using the last run's {plan.name} artifact; the current config would make a new one "
        f"({'; '.join(plan.causes)})",
        file=sys.stderr,
    )
    return last


def _upstream_manifest(env: PlanEnv, plans: list[StagePlan], plan: StagePlan, role: str) -> Manifest:
    node = plan.upstream_nodes[role]
    for p in plans:
        if p.name == node and p.manifest is not None:
            return p.manifest
    # With --only, upstream manifests are pinned in the preimage (role -> key); the stage kind is the role's.
    key = plan.preimage["upstream"][role]
    kind = next((p.stage.name for p in plans if p.name == node), role)
    return env.store.load_manifest(kind, key)


def _dry(plan: StagePlan) -> StageRun:
    if plan.state == "fresh":
        return StageRun(plan.name, "would reuse", plan.key, causes=list(plan.notes))
    causes = list(plan.causes)
    if plan.progress:
        causes.append(f"resumes at {plan.progress[0]}/{plan.progress[1]}")
    return StageRun(plan.name, "would run", plan.key, causes=causes + plan.notes)


def _run_stage(env: PlanEnv, plan: StagePlan, upstream: dict[str, Manifest], progress: bool) -> StageRun:
    store = env.store
    started = time.perf_counter()
    work = store.work_dir(plan.stage.name, plan.key)
    main = dist.is_main()
    if main:
        print(f"{plan.name}: running ({'; '.join(plan.causes)})", file=sys.stderr, flush=True)
    runtime = env.config.runtime
    figures = {"stage": plan.stage.name, "key": plan.key, "params": plan.params.model_dump(mode="json")}
    folder = env.loaded.resolve(runtime.log_dir)
    logged = runtime if main else runtime.model_copy(update={"log_with": []})  # rank 0 alone logs
    tracker = open_tracker(logged, folder, plan.name, plan.key, figures)
    ctx = StageContext(env, plan.key, plan.params, upstream, work, progress, tracker, plan.name)
    try:
        result = plan.stage.run(ctx)
    finally:
        tracker.close()
    if plan.stage.sharded:
        dist.barrier()  # every rank finished: a rank that failed exited, and nothing of this stage is committed
    if not main:
        return StageRun(plan.name, "ran", plan.key, time.perf_counter() - started, causes=plan.causes)
    outputs = {name: store.put_object(path) for name, path in result.files.items()}
    seconds = time.perf_counter() - started
    manifest = Manifest(
        stage=plan.stage.name,
        key=plan.key,
        preimage=plan.preimage,
        contract=plan.contract,
        outputs=outputs,
        pools=result.pools,
        record=result.record,
        provenance={
            "version": __version__,
            "git": _git_describe(),
            "seconds": round(seconds, 3),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - seconds)),
            "host": os.uname().nodename,
            "argv": sys.argv[1:],
        },
    )
    store.commit(manifest)
    return StageRun(plan.name, "ran", plan.key, seconds, summary=result.summary, causes=plan.causes)


def export_outputs(env: PlanEnv, manifest: Manifest | None, dest: Path, settings=None) -> list[str]:
    """Copy a manifest's files to the output folder, named and stored as the stage's ExportSettings ask
    (output_name, save_precision; None: as they are). The folder's record (EXPORT_MARKER: relative path -> digest
    of every file this tool wrote there) decides what may be replaced or removed: a file the pipeline did not
    write, or one changed since, is never touched, only reported."""
    if manifest is None or not manifest.outputs:
        return []
    marker = dest / EXPORT_MARKER
    if dest.exists() and not marker.exists():
        raise PlanError(f"{dest} exists and was not written by lora-pipeline; move it or change runtime.output_dir.")
    sources = {(settings.file_name(n) if settings else n): n for n in manifest.outputs}  # exported name -> output
    record = _read_export_record(marker)
    if record is None:  # a marker from before the record: it claimed the stage's own file names
        record = {n: env.store.memo.digest(dest / n) for n in sources if (dest / n).is_file()}
    kept = []
    for name, digest in sorted(record.items()):  # an earlier export's files that this artifact does not have
        path = dest / name
        if name not in sources and path.is_file():
            if env.store.memo.digest(path) == digest:
                path.unlink()
        if name not in sources:
            record.pop(name)
    dest.mkdir(parents=True, exist_ok=True)
    made_from = _read_export_sources(marker)  # a rewritten file -> the object and settings it was made from
    for name, output in sources.items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = manifest.outputs[output]["digest"]
        rewrite = settings is not None and settings.rewrites(output)
        origin = f"{digest} {settings.save_precision} {settings.name}" if rewrite else None
        current = env.store.memo.digest(path) if path.is_file() else None
        if rewrite and current is not None and current == record.get(name) and made_from.get(name) == origin:
            continue  # this export of this object, with these settings, is there already: not rewritten each run
        made_from.pop(name, None)
        what = f"{manifest.stage} output {output}"
        tmp = path.with_name(f".{path.name}.tmp")
        if rewrite:
            from stages.training.outputs import export_lora_file

            export_lora_file(env.store.read_object(digest, what), tmp, settings)
            digest = sha256_file(tmp)
        if current is not None and (current == digest or record.get(name) != current):
            tmp.unlink(missing_ok=True)
            if current == digest:
                record[name] = digest
            else:  # not the file this tool wrote there (or changed since): leave it
                kept.append(name)
                record.pop(name, None)
                continue
        else:
            if not rewrite:
                shutil.copyfile(env.store.read_object(digest, what), tmp)
            os.replace(tmp, path)
            record[name] = digest
        if rewrite:
            made_from[name] = origin
    made_from = {n: o for n, o in made_from.items() if n in record}
    write_json_atomic(marker, {"exported": dict(sorted(record.items())), "from": dict(sorted(made_from.items()))})
    foreign = sorted(
        p.relative_to(dest).as_posix()
        for p in dest.rglob("*")
        if p.is_file() and p != marker and p.relative_to(dest).as_posix() not in record and not p.name.startswith(".")
    )
    if foreign:
        print(
            f"note: {dest} holds files lora-pipeline did not write or that changed since it wrote them; they are "
            f"left as they are: {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}",
            file=sys.stderr,
        )
    return [str(dest / n) for n in sources if n not in kept]


def _read_export_sources(marker: Path) -> dict[str, str]:
    """The export record's `from`: each rewritten file's object digest and settings (output_name, save_precision)."""
    try:
        doc = json.loads(marker.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    made = doc.get("from") if isinstance(doc, dict) else None
    return {k: v for k, v in made.items() if isinstance(v, str)} if isinstance(made, dict) else {}


def _read_export_record(marker: Path) -> dict[str, str] | None:
    """The export record; None for the empty marker of versions before the record."""
    try:
        text = marker.read_text()
        if not text.strip():
            return None
        doc = json.loads(text)
    except (FileNotFoundError, ValueError):
        return {}
    files = doc.get("exported") if isinstance(doc, dict) else None
    return {k: v for k, v in files.items() if isinstance(v, str)} if isinstance(files, dict) else {}
