"""Planning: every stage's key, its state (FRESH / STALE / MISSING / PARTIAL) and why.

Planning reads files and manifests only; it never imports torch or loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cache.keys import build_preimage, flatten, stage_key
from cache.store import Manifest
from core.errors import PlanError
from stages.base import PlanEnv, Stage


@dataclass
class Node:
    """A stage in a workflow: its name there (the stage's name, or e.g. `lora1.car` for a pair), the env it
    plans in (a pair's side sees its own images), and which node fills each of the stage's upstream roles."""

    name: str
    stage: Stage
    upstream: dict[str, str]  # role (what the stage calls it) -> node name
    env: PlanEnv | None = None  # None: the workflow's env
    export: bool = True  # copy its files to runtime.output_dir (differential keeps LoRA-1s in the store only)


@dataclass
class StagePlan:
    stage: Stage
    params: object
    preimage: dict
    key: str
    contract: dict
    state: str  # fresh | stale | missing | partial
    causes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # Stage.notes(): how it will run, for --dry-run
    progress: tuple[int, int] | None = None
    manifest: Manifest | None = None
    node: str = ""  # the name in the workflow (= stage.name outside per-pair workflows)
    env: PlanEnv | None = None
    upstream_nodes: dict[str, str] = field(default_factory=dict)
    export: bool = True

    @property
    def name(self) -> str:
        return self.node or self.stage.name


def plan_stage(env: PlanEnv, node: Node, upstream: dict[str, StagePlan | Manifest], ref: dict[str, str]) -> StagePlan:
    """Plan one node given the plans (or the manifests, for --only) of its upstream roles."""
    stage = node.stage
    params = stage.params(env)
    upstream_keys = {u: p.key for u, p in upstream.items()}
    preimage = build_preimage(
        stage.name, stage.IMPL_VERSION, params.model_dump(mode="json"), upstream_keys, stage.inputs(env)
    )
    key = stage_key(preimage)
    contract = inherited_contract(stage, upstream)
    own = stage.contract(env, params)
    conflicts = contract_diff(contract, own)
    if conflicts:
        raise PlanError(
            f"{stage.name}: its settings break the contract of its upstream stages "
            f"({', '.join(stage.contract_from or upstream)}):\n"
            + "\n".join(f"  {c}" for c in conflicts)
            + f"\n{CONFLICT_HINTS.get(stage.name, 'Make the two sides agree in the config.')}"
        )
    contract.update(own)
    manifest = env.store.load_manifest(stage.name, key)
    damage = damaged(env, manifest) if manifest else []
    if manifest is None and env.store.manifest_damage(stage.name, key):
        damage = [f"store: the manifest is damaged ({env.store.manifest_damage(stage.name, key)})"]
    if damage:
        manifest = None  # re-made by this run; what is intact (pool items) is reused
    previous = None
    if ref.get(node.name) and ref[node.name] != key:
        previous = env.store.load_manifest(stage.name, ref[node.name])
    causes = damage + (diff_preimages(previous.preimage, preimage) if previous else [])
    causes = [_explain_upstream(c, upstream) for c in causes]
    plan = StagePlan(
        stage,
        params,
        preimage,
        key,
        contract,
        "fresh",
        causes,
        stage.notes(env, params),
        manifest=manifest,
        node=node.name,
        env=env,
        upstream_nodes=dict(node.upstream),
        export=node.export,
    )
    if manifest is None:
        up_manifests = {u: (p.manifest if isinstance(p, StagePlan) else p) for u, p in upstream.items()}
        plan.progress = stage.progress(env, key, up_manifests)
        plan.state = "partial" if plan.progress else ("stale" if previous or damage else "missing")
        if not causes:
            plan.causes = ["never run with these settings"] if plan.state != "partial" else ["interrupted"]
    return plan


CONFLICT_HINTS = {
    "prior": "The student (transfer.student_model) must share the teacher's (model.path) latent space, prediction "
    "type and noise schedule: delta transfer adds the teacher's deltas to the student's predictions in one space.",
}


def inherited_contract(stage: Stage, upstream: dict[str, StagePlan | Manifest]) -> dict:
    contract: dict = {}
    for name in stage.contract_from if stage.contract_from is not None else list(upstream):
        contract.update(upstream[name].contract)
    return contract


def contract_diff(expected: dict, actual: dict, labels: tuple[str, str] = ("upstream", "this stage")) -> list[str]:
    """`field: <label a> a, <label b> b` for every differing field under a top-level key both sides define."""
    if not expected or not actual:
        return []
    a, b = flatten(expected), flatten(actual)
    shared_roots = {k.split(".")[0] for k in a} & {k.split(".")[0] for k in b}
    out = []
    for k in sorted(a.keys() | b.keys()):
        if k.split(".")[0] not in shared_roots or a.get(k) == b.get(k):
            continue
        out.append(f"{k}: {labels[0]} {_fmt(a.get(k, 'unset'))}, {labels[1]} {_fmt(b.get(k, 'unset'))}")
    return out


def _explain_upstream(cause: str, upstream: dict[str, StagePlan | Manifest]) -> str:
    """`upstream schedule changed` -> `upstream schedule changed (params schedule.steps 40 → 60)`."""
    if not cause.startswith("upstream ") or not cause.endswith(" changed"):
        return cause
    plan = upstream.get(cause.split()[1])
    why = [c for c in getattr(plan, "causes", []) if c != "never run with these settings"]
    return f"{cause} ({'; '.join(why[:2])}{'; ...' if len(why) > 2 else ''})" if why else cause


def damaged(env: PlanEnv, manifest: Manifest) -> list[str]:
    """Causes for a committed artifact whose files were deleted or changed in the store by hand (stat memo,
    commit logs: cheap when nothing changed)."""
    causes = []
    for name, obj in manifest.outputs.items():
        if not env.store.object_path(obj["digest"]).exists():
            causes.append(f"store: output {name} is missing")
        elif not env.store.object_intact(obj["digest"], memo=True):
            causes.append(f"store: output {name} is damaged (its bytes do not match its digest)")
    for pool_id, names in manifest.pools.items():
        pool = env.store.pool(pool_id)
        lost = sum(1 for n in names if not pool.has(n))
        if lost:
            causes.append(f"store: {lost} array{'s' if lost > 1 else ''} of {pool_id} missing")
    return causes


def plan_workflow(env: PlanEnv, nodes: list[Node], ref: dict[str, str]) -> list[StagePlan]:
    plans: dict[str, StagePlan] = {}
    for node in nodes:
        upstream = {role: plans[n] for role, n in node.upstream.items()}
        plans[node.name] = plan_stage(node.env or env, node, upstream, ref)
    return list(plans.values())


# -- causes -----------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def diff_preimages(old: dict, new: dict) -> list[str]:
    """Human causes, e.g. `params lora1.lr 0.0001 → 5e-05`, `input: 3 images added`, `model vae changed`."""
    stage = new["stage"]
    causes = []
    if old.get("schema") != new["schema"]:
        causes.append(f"key schema {old.get('schema')} → {new['schema']}")
    if old.get("impl") != new["impl"]:
        causes.append(f"code: {stage} implementation v{old.get('impl')} → v{new['impl']}")
    a, b = flatten(old.get("params", {}), stage), flatten(new["params"], stage)
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
