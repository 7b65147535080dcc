"""Planning: every stage's key, its state (FRESH / STALE / MISSING / PARTIAL) and why.

Planning reads files and manifests only; it never imports torch or loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cache.keys import build_preimage, stage_key
from cache.store import Manifest
from stages.base import PlanEnv, Stage


@dataclass
class StagePlan:
    stage: Stage
    params: object
    preimage: dict
    key: str
    contract: dict
    state: str  # fresh | stale | missing | partial
    causes: list[str] = field(default_factory=list)
    progress: tuple[int, int] | None = None
    manifest: Manifest | None = None

    @property
    def name(self) -> str:
        return self.stage.name


def plan_stage(env: PlanEnv, stage: Stage, upstream: dict[str, StagePlan | Manifest], ref: dict[str, str]) -> StagePlan:
    """Plan one stage given the plans (or the manifests, for --only) of its upstream stages."""
    params = stage.params(env)
    upstream_keys = {u: p.key for u, p in upstream.items()}
    preimage = build_preimage(
        stage.name, stage.IMPL_VERSION, params.model_dump(mode="json"), upstream_keys, stage.inputs(env)
    )
    key = stage_key(preimage)
    contract: dict = {}
    for up in upstream.values():
        contract.update(up.contract)
    contract.update(stage.contract(env, params))
    manifest = env.store.load_manifest(stage.name, key)
    damage = damaged(env, manifest) if manifest else []
    if damage:
        manifest = None  # re-made by this run; what is intact (pool items) is reused
    previous = None
    if ref.get(stage.name) and ref[stage.name] != key:
        previous = env.store.load_manifest(stage.name, ref[stage.name])
    causes = damage + (diff_preimages(previous.preimage, preimage) if previous else [])
    plan = StagePlan(stage, params, preimage, key, contract, "fresh", causes, manifest=manifest)
    if manifest is None:
        up_manifests = {u: (p.manifest if isinstance(p, StagePlan) else p) for u, p in upstream.items()}
        plan.progress = stage.progress(env, key, up_manifests)
        plan.state = "partial" if plan.progress else ("stale" if previous or damage else "missing")
        if not causes:
            plan.causes = ["never run with these settings"] if plan.state != "partial" else ["interrupted"]
    return plan


def damaged(env: PlanEnv, manifest: Manifest) -> list[str]:
    """Causes for a committed artifact whose files were deleted from the store by hand (cheap: stat and log)."""
    causes = [
        f"store: output {name} is missing"
        for name, obj in manifest.outputs.items()
        if not env.store.object_path(obj["digest"]).exists()
    ]
    for pool_id, names in manifest.pools.items():
        pool = env.store.pool(pool_id)
        lost = sum(1 for n in names if not pool.has(n))
        if lost:
            causes.append(f"store: {lost} array{'s' if lost > 1 else ''} of {pool_id} missing")
    return causes


def plan_workflow(env: PlanEnv, stages: list[Stage], ref: dict[str, str]) -> list[StagePlan]:
    plans: dict[str, StagePlan] = {}
    for stage in stages:
        plans[stage.name] = plan_stage(env, stage, {u: plans[u] for u in stage.upstream}, ref)
    return list(plans.values())


# -- causes -----------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value
    return out


def diff_preimages(old: dict, new: dict) -> list[str]:
    """Human causes, e.g. `params lora1.lr 0.0001 → 5e-05`, `input: 3 images added`, `model vae changed`."""
    stage = new["stage"]
    causes = []
    if old.get("schema") != new["schema"]:
        causes.append(f"key schema {old.get('schema')} → {new['schema']}")
    if old.get("impl") != new["impl"]:
        causes.append(f"code: {stage} implementation v{old.get('impl')} → v{new['impl']}")
    a, b = _flatten(stage, old.get("params", {}), {}), _flatten(stage, new["params"], {})
    for k in sorted(a.keys() | b.keys()):
        if a.get(k) != b.get(k):
            causes.append(f"params {k} {_fmt(a.get(k, 'unset'))} → {_fmt(b.get(k, 'unset'))}")
    for up in sorted(new["upstream"].keys() | old.get("upstream", {}).keys()):
        if old.get("upstream", {}).get(up) != new["upstream"].get(up):
            causes.append(f"upstream {up} changed")
    causes += _diff_inputs(old.get("inputs", {}), new["inputs"])
    return causes


def _diff_inputs(old: dict, new: dict) -> list[str]:
    causes = []
    for group, noun in (("images", "image"), ("captions", "caption file")):
        a, b = old.get(group, {}), new.get(group, {})
        added, removed = len(b.keys() - a.keys()), len(a.keys() - b.keys())
        changed = sum(1 for k in a.keys() & b.keys() if a[k] != b[k])
        for n, verb in ((added, "added"), (removed, "removed"), (changed, "changed")):
            if n:
                causes.append(f"input: {n} {noun}{'s' if n > 1 else ''} {verb}")
    a, b = old.get("model", {}), new.get("model", {})
    for comp in sorted(a.keys() | b.keys()):
        if a.get(comp) != b.get(comp):
            causes.append(f"model {comp} changed")
    return causes
