"""`pipeline history` and `pipeline export`: every artifact a stage committed is kept in the store until `pipeline
gc`, so earlier results stay findable: each run of a stage with its key, time, changed settings, final loss and the
LoRA files it kept (save_every_steps), and any of them copied out under the section's output_name and
save_precision.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from cache.store import Manifest
from core.errors import PlanError
from stages.base import PlanEnv

TRAINING = ("lora1", "student", "lora2")  # the stages whose artifacts hold LoRA files


def stage_kind(env: PlanEnv, name: str) -> str:
    """The stage a name means: a stage (`lora1`) or a workflow's node (`lora1.red-circle`); PlanError otherwise."""
    kinds = {node: kind for doc in env.store.refs().values() for node, kind in doc.get("kinds", {}).items()}
    kind = kinds.get(name, name)
    if (env.store.root / "stages" / kind).is_dir():
        return kind
    if kind in TRAINING:
        raise PlanError(f"no {kind} artifact in the store {env.store.root} yet: `pipeline run` makes one.")
    known = sorted(p.name for p in (env.store.root / "stages").glob("*") if p.is_dir())
    raise PlanError(
        f"unknown stage {name!r}. Stages in this store: {', '.join(known) or 'none yet (run a workflow first)'}."
    )


def _manifests(env: PlanEnv, kind: str) -> list[Manifest]:
    """Every committed manifest of a stage, oldest first (by when its manifest was written: the commit)."""
    found = []
    for folder in (env.store.root / "stages" / kind).glob("*"):
        manifest = env.store.load_manifest(kind, folder.name)
        if manifest is not None:
            found.append(((folder / "manifest.json").stat().st_mtime_ns, manifest.key, manifest))
    return [m for _, _, m in sorted(found, key=lambda f: f[:2])]


def _current(env: PlanEnv, kind: str) -> dict[str, list[str]]:
    """key -> the `workflow: node` of every workflow whose last run uses it."""
    users: dict[str, list[str]] = {}
    for workflow, doc in env.store.refs().items():
        kinds = doc.get("kinds", {})
        for node, key in doc["stages"].items():
            if kinds.get(node, node) == kind:
                users.setdefault(key, []).append(f"{workflow}: {node}")
    return users


def history(env: PlanEnv, name: str) -> dict:
    """Every run of a stage kept in the store, oldest first: key, when, seconds, steps, final loss, what changed
    since the run before it, the LoRA files kept at steps (save_every_steps) and which workflows use it now."""
    from pipeline.planner import diff_preimages

    kind = stage_kind(env, name)
    current = _current(env, kind)
    runs, previous = [], None
    for m in _manifests(env, kind):
        params = m.preimage.get("params", {})
        runs.append(
            {
                "key": m.key,
                "committed": m.provenance.get("committed"),
                "seconds": m.provenance.get("seconds"),
                "steps": params.get("steps"),
                "final_loss": m.record.get("final_loss"),
                "changes": diff_preimages(previous.preimage, m.preimage) if previous is not None else [],
                "files": sorted(n for n in m.outputs if "/" not in n),
                "saved_steps": sorted(int(n.rsplit("-step", 1)[1][:6]) for n in m.outputs if n.startswith("steps/")),
                "current": current.get(m.key, []),
            }
        )
        previous = m
    return {"stage": kind, "name": name, "store": str(env.store.root), "runs": runs}


def _find(env: PlanEnv, kind: str, key: str | None, node: str) -> Manifest:
    """The artifact a (prefix of a) key names; without one, the one the workflows' last runs use for the node (a
    stage's name: any of its nodes)."""
    manifests = _manifests(env, kind)
    if key:
        hits = [m for m in manifests if m.key.startswith(key.lower())]
        if len(hits) == 1:
            return hits[0]
        if hits:
            fits = ", ".join(m.key[:12] for m in hits)
            raise PlanError(f"--key {key} fits {len(hits)} {kind} artifacts; give more of it: {fits}.")
        keys = ", ".join(m.key[:12] for m in manifests) or "none"
        raise PlanError(
            f"no {kind} artifact with key {key} in the store (it has: {keys}). `pipeline history {kind}` lists "
            f"them; `pipeline gc` removes those no workflow's last run uses."
        )
    users = _current(env, kind)
    mine = {k for k, nodes in users.items() if node == kind or any(n.endswith(f": {node}") for n in nodes)}
    current = [m for m in manifests if m.key in mine]
    if len(current) == 1:
        return current[0]
    if not manifests:
        raise PlanError(f"no {kind} artifact in the store {env.store.root} yet: `pipeline run` makes one.")
    raise PlanError(
        f"several {kind} artifacts are in the store: pass --key (`pipeline history {kind}` lists them with their keys)."
    )


def export(
    env: PlanEnv,
    name: str,
    key: str | None = None,
    out: Path | None = None,
    step: int | None = None,
    fmt: str = "kohya",
    precision: str | None = None,
) -> dict:
    """Copy one LoRA file of a stage's artifact out of the store: the final one (kohya/ComfyUI single file, or the
    diffusers file) or the one kept at `step`, named and stored as the section's output_name and save_precision
    ask (precision overrides it). Never overwrites a file: an existing one with other bytes is refused."""
    from cache.hashing import sha256_file
    from stages.training.outputs import export_lora_file, export_settings

    kind = stage_kind(env, name)
    if kind not in TRAINING:
        raise PlanError(
            f"`pipeline export` copies LoRA files out of the store; {kind} artifacts hold none (the LoRA stages are "
            f"{', '.join(TRAINING)}). `pipeline inspect` reads the teacher's and the schedule's data."
        )
    manifest = _find(env, kind, key, name)
    from stages.lora1 import Lora1Stage
    from stages.lora2 import Lora2Stage
    from stages.student import StudentStage

    section = {s.name: s.trained_section for s in (Lora1Stage, Lora2Stage, StudentStage)}[kind]
    section = "differential.lora1" if kind == "lora1" and name != kind else section  # a pair's LoRA-1
    settings = export_settings(env.config, kind, section)
    settings = dataclasses.replace(settings, save_precision=precision or settings.save_precision)
    if step is not None:
        output = f"steps/{kind}-step{step:06d}.safetensors"
        if output not in manifest.outputs:
            kept = sorted(int(n.rsplit("-step", 1)[1][:6]) for n in manifest.outputs if n.startswith("steps/"))
            where = f"the steps kept are {', '.join(map(str, kept))}" if kept else "it kept none (save_every_steps)"
            raise PlanError(
                f"--step {step}: the {kind} artifact {manifest.key[:12]} kept no LoRA at that step; {where}."
            )
    elif fmt == "diffusers":
        output = "diffusers/pytorch_lora_weights.safetensors"
        if output not in manifest.outputs:
            raise PlanError(f"the {kind} artifact {manifest.key[:12]} has no diffusers file (LoHa and LoKr have none).")
    else:
        output = f"{kind}.safetensors"
    if out is None:
        suffix = f"-step{step}" if step is not None else ("-diffusers" if fmt == "diffusers" else "")
        out = Path(f"{settings.name}-{manifest.key[:8]}{suffix}.safetensors")
    out = out.resolve()
    if out.is_dir():
        raise PlanError(f"--out {out} is a folder; give a file name, e.g. {out / (settings.name + '.safetensors')}.")
    if not out.parent.is_dir():
        raise PlanError(f"--out {out}: the folder {out.parent} does not exist.")
    source = env.store.read_object(manifest.outputs[output]["digest"], f"{kind} output {output}")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        if settings.rewrites(output):
            export_lora_file(source, tmp, settings)
        else:
            shutil.copyfile(source, tmp)
        if out.exists():
            if out.is_file() and sha256_file(out) == sha256_file(tmp):
                return {"stage": kind, "key": manifest.key, "file": str(out), "written": False, "from": output}
            raise PlanError(f"--out {out} exists; it is not overwritten. Choose another name, or move it away.")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"stage": kind, "key": manifest.key, "file": str(out), "written": True, "from": output}
