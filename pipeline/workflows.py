"""Workflows are DAGs of stages, listed in a valid run order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import DataError, PlanError
from pipeline.planner import Node
from stages.average import AverageStage
from stages.base import PlanEnv, Stage
from stages.caption import CaptionStage
from stages.evaluate import EvalStage
from stages.latents import LatentsStage
from stages.lora1 import ImportLoraStage, Lora1Stage
from stages.lora2 import Lora2Stage
from stages.prior import PriorStage
from stages.schedule import ScheduleStage
from stages.student import StudentStage
from stages.tag import TagStage
from stages.teacher import TeacherStage
from stages.text import TextStage

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        TagStage(),
        CaptionStage(),
        LatentsStage(),
        TextStage(),
        Lora1Stage(),
        ScheduleStage(),
        TeacherStage(),
        PriorStage(),
        StudentStage(),
        Lora2Stage(),
        AverageStage(),
        EvalStage(),
    )
}


def chain_nodes(env: PlanEnv, names: tuple[str, ...]) -> list[Node]:
    """A workflow where every stage appears once under its own name, its upstream roles filled by the stages
    of the same names (an optional role left out of `names` stays empty); `transfer.teacher_lora` swaps lora1
    training for an import of that file."""
    stages = [STAGES[n] for n in names]
    if "lora1" in names and env.config.transfer.teacher_lora is not None and "teacher" in names:
        stages = [ImportLoraStage() if s.name == "lora1" else s for s in stages]
    return [Node(s.name, s, {u: u for u in s.upstream if u in names or u not in s.optional_upstream}) for s in stages]


def lora_nodes(env: PlanEnv) -> list[Node]:
    """caption, latents, text, lora1; without the text stage when lora1 trains the text encoder (it encodes its
    captions itself, in every step)."""
    text = () if env.config.lora1.train_text_encoder else ("text",)
    return chain_nodes(env, (*tag_stage(env), "caption", "latents", *text, "lora1"))


def tag_stage(env: PlanEnv) -> tuple[str, ...]:
    """("tag",) when tag.model names a tagger: the caption stage then merges its tags."""
    return ("tag",) if env.config.tag.model is not None else ()


def transfer_nodes(env: PlanEnv) -> list[Node]:
    if env.config.lora1.train_text_encoder and env.config.transfer.teacher_lora is None:
        raise PlanError(
            "lora1.train_text_encoder = true: in `transfer` lora1 is the teacher's LoRA, and the teacher applies it to "
            "the denoiser over the cached text embeddings that the student trains on too; a text-encoder LoRA would "
            "be left out of every delta. Set lora1.train_text_encoder = false for transfer (train it with "
            "`pipeline run lora` for use elsewhere)."
        )
    stages = ("caption", "latents", "text", "lora1", "schedule", "teacher", "prior", "student")
    return chain_nodes(env, (*tag_stage(env), *stages))


# Every workflow is a DAG of nodes (a stage bound to a name, an env and its upstream nodes), built from the
# env because some depend on the data on disk (differential: one set of nodes per pair).
WORKFLOWS: dict[str, Callable[[PlanEnv], list[Node]]] = {
    "lora": lora_nodes,
    "transfer": transfer_nodes,
    # per pair p: caption/latents/text of p.a and p.b, lora1.p (on A), lora2.p (on B over lora1.p); then
    # average and eval
    "differential": lambda env: differential_nodes(env),
}


def get_workflow(name: str, env: PlanEnv) -> list[Node]:
    """The nodes of a workflow in a valid run order (checked: every node comes after its upstream nodes)."""
    if name not in WORKFLOWS:
        raise PlanError(f"unknown workflow {name!r}. Known workflows: {', '.join(WORKFLOWS)}.")
    nodes = WORKFLOWS[name](env)
    seen: set[str] = set()
    for node in nodes:
        missing = [u for u in node.upstream.values() if u not in seen]
        assert not missing, f"workflow {name}: {node.name} listed before {missing}"
        seen.add(node.name)
    return nodes


# -- differential LoRA: pairs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    name: str
    a: Path
    b: Path


def discover_pairs(env: PlanEnv) -> list[Pair]:
    """differential.pairs if declared, else <pairs_dir>/<name>/{a,b}/; every side checked (files only)."""
    d = env.config.differential
    if d.pairs:
        pairs = [Pair(p.name, env.loaded.resolve(p.a), env.loaded.resolve(p.b)) for p in d.pairs]
    else:
        root = env.loaded.resolve(d.pairs_dir)
        if not root.is_dir():
            raise DataError(
                f"differential.pairs_dir: {root} does not exist. Make one folder per pair with a/ and b/ inside "
                f"({root}/<name>/a/, {root}/<name>/b/), or declare [[differential.pairs]] in the config."
            )
        pairs = [Pair(p.name, p / "a", p / "b") for p in sorted(root.iterdir()) if p.is_dir()]
        if not pairs:
            raise DataError(f"differential.pairs_dir: {root} has no pair folders (<name>/a/ and <name>/b/).")
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        raise DataError(f"differential.pairs: pair names must be unique, got {names}")
    for pair in pairs:
        check_pair(env, pair)
    return pairs


def check_pair(env: PlanEnv, pair: Pair) -> None:
    from PIL import Image, UnidentifiedImageError

    from stages.dataset import scan_images

    sizes = {}
    for side, folder in (("a", pair.a), ("b", pair.b)):
        if not folder.is_dir():
            raise DataError(f"pair {pair.name!r}: side {side.upper()} folder {folder} does not exist.")
        try:
            entries = scan_images(folder, env.config.data.caption_extensions, env.store.memo)
        except DataError:
            entries = []
        if not entries:
            raise DataError(
                f"pair {pair.name!r}: side {side.upper()} ({folder}) has no images. Put A's image(s) in "
                f"a/ and B's in b/."
            )
        for e in entries:
            try:
                with Image.open(e.path) as im:
                    sizes[e.path] = im.size
            except (UnidentifiedImageError, OSError):
                pass  # the caption stage reports unreadable images with the fix
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p.parent.name}/{p.name} {w}x{h}" for p, (w, h) in sorted(sizes.items()))
        raise DataError(
            f"pair {pair.name!r}: A and B must be images of one size, so that they differ only in content; got "
            f"{listed}."
        )


def differential_nodes(env: PlanEnv) -> list[Node]:
    d = env.config.differential
    for side in ("lora1", "lora2"):
        if getattr(d, side).train_text_encoder:
            raise PlanError(
                f"differential.{side}.train_text_encoder = true: differential LoRA applies LoRA-1 under LoRA-2 and "
                f"averages the LoRA-2s in the denoiser's weight space, on the cached text embeddings of each side; a "
                f"text-encoder LoRA would be left out of both. Set it to false."
            )
    lat = env.config.latents
    used = [
        name
        for name, on in (
            (f"latents.buckets = {lat.buckets!r}", lat.buckets != "off"),
            ('latents.crop = "random"', lat.crop == "random"),
            ("latents.flip_aug = true", lat.flip_aug),
        )
        if on
    ]
    if used:
        raise PlanError(
            f"{', '.join(used)}: differential LoRA compares the latents of A and B position by position (its "
            f"evaluation measures the move from A towards B), so both sides train the same centred square. Set "
            f'latents.buckets = "off", latents.crop = "center" and latents.flip_aug = false for this workflow.'
        )
    nodes: list[Node] = []
    average_up, eval_up = {}, {}
    for pair in discover_pairs(env):
        side_env = {}
        for side, folder in (("a", pair.a), ("b", pair.b)):
            data = env.config.data.model_copy(update={"images": folder})
            side_env[side] = env.scoped(data=data, lora1=d.lora1)
            names = {r: f"{r}.{pair.name}.{side}" for r in ("caption", "latents", "text")}
            tag = {}
            if tag_stage(env):
                tag = {"tag": f"tag.{pair.name}.{side}"}
                nodes.append(Node(tag["tag"], STAGES["tag"], {}, side_env[side]))
            nodes.append(Node(names["caption"], STAGES["caption"], tag, side_env[side]))
            nodes.append(Node(names["latents"], STAGES["latents"], {"caption": names["caption"]}, side_env[side]))
            nodes.append(Node(names["text"], STAGES["text"], {"caption": names["caption"]}, side_env[side]))
            eval_up.update({n: n for n in names.values()})
        a = {r: f"{r}.{pair.name}.a" for r in ("caption", "latents", "text")}
        b = {r: f"{r}.{pair.name}.b" for r in ("caption", "latents", "text")}
        nodes.append(Node(f"lora1.{pair.name}", STAGES["lora1"], a, side_env["a"], export=False))  # LoRA-2s only
        nodes.append(Node(f"lora2.{pair.name}", STAGES["lora2"], {**b, "lora1": f"lora1.{pair.name}"}, side_env["b"]))
        average_up[f"lora2.{pair.name}"] = f"lora2.{pair.name}"
        eval_up.update({f"lora1.{pair.name}": f"lora1.{pair.name}", f"lora2.{pair.name}": f"lora2.{pair.name}"})
    nodes.append(Node("average", STAGES["average"], average_up))
    nodes.append(Node("eval", STAGES["eval"], {**eval_up, "average": "average"}))
    return nodes
