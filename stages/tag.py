"""Stage `tag`: a WD14 tagger's score for every tag of every image (tag.model), in a zarr pool.

The stage stores scores, not tags: thresholds, renames and the way tags meet sidecar captions are the caption
stage's settings (stages/tagging.py), so changing them runs no model. Scores are keyed by image content within a
pool keyed by the tagger's weights; an interrupted run resumes with the images it had committed. Images are
batched at fixed places in the data set's order, so a resumed run stores the bytes of an uninterrupted one; in a
run of several processes each rank tags every world-size-th of the batches left, into its own rows of the pool.
"""

from __future__ import annotations

from cache.store import Manifest
from core.errors import ConfigError, DataError, ModelError
from core.faults import fault_point
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.pools import finish_shared_pool, pool_id, pool_progress, shared_pool
from stages.tagging import DEFAULT_SIZE, prepare, read_tags, tagger_files
from stages.training.params import KeyedParams


class TagParams(KeyedParams):
    batch_size: int


def import_onnxruntime():
    """onnxruntime, or a ConfigError naming the extra that installs it."""
    try:
        import onnxruntime
    except Exception as e:  # not installed, or a broken build
        raise ConfigError(
            f"tag.model needs onnxruntime, which cannot be imported here ({e}). Install it with "
            f"`pip install 'lora-pipeline[tagger]'` (or onnxruntime-gpu for a GPU), or unset tag.model."
        ) from None
    return onnxruntime


def load_session(model_path):
    """An onnxruntime session on the best provider here (CUDA when onnxruntime-gpu sees a GPU, else the CPU)."""
    ort = import_onnxruntime()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as e:
        raise ModelError(
            f"tag.model: onnxruntime cannot load {model_path} ({str(e).splitlines()[0][:300]}). Download it again: "
            f"the file may be truncated or not an ONNX model."
        ) from None


def input_side(session) -> int:
    """The square side the model takes: NHWC with 3 channels (a WD v3 tagger), else a ModelError."""
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or shape[3] != 3:
        raise ModelError(
            f"tag.model: the model's input has shape {shape}; a WD14 tagger takes NHWC images (batch, side, side, 3)."
        )
    return shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIZE


class TagStage(Stage):
    name = "tag"
    IMPL_VERSION = 1
    description = "WD14 tag scores per image"
    sharded = True  # several processes split the batches (stages/pools.py shared_pool)

    def params(self, env: PlanEnv) -> TagParams:
        return TagParams(batch_size=env.config.tag.batch_size)

    def model_files(self, env: PlanEnv):
        return tagger_files(env.loaded.resolve(env.config.tag.model))

    def inputs(self, env: PlanEnv) -> dict:
        model, tags = self.model_files(env)
        return {
            "images": {e.key: e.digest for e in env.images},
            "tagger": {"model": env.store.memo.digest(model), "tags": env.store.memo.digest(tags)},
        }

    def preflight(self, env: PlanEnv, params: TagParams) -> None:
        import_onnxruntime()

    def pool_id(self, env: PlanEnv, params: TagParams) -> str:
        model, _ = self.model_files(env)
        return pool_id("tags", self.IMPL_VERSION, params.model_dump(), "tagger", env.store.memo.digest(model))

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        digests = {e.digest for e in env.images}
        return pool_progress(env.store, self.name, key, self.pool_id(env, self.params(env)), digests)

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np

        from core import dist
        from core.progress import bar as progress_bar
        from stages.dataset import load_image

        env, p = ctx.env, ctx.params
        model, tags_csv = self.model_files(env)
        tags = read_tags(tags_csv)
        pid = self.pool_id(env, p)
        pool = shared_pool(env.store, pid, True)
        paths = {}
        for e in env.images:  # identical images share one row
            paths.setdefault(e.digest, e.path)
        order = list(paths)
        batches = [order[i : i + p.batch_size] for i in range(0, len(order), p.batch_size)]
        todo = [b for b in batches if not all(pool.has(d) for d in b)]
        done = len(order) - sum(len(b) for b in todo)
        if done:
            ctx.log(f"tag: {done}/{len(order)} images already tagged")
        if dist.size() > 1:
            dist.barrier()  # every rank has read what is done before any writes
            todo = todo[dist.rank() :: dist.size()]
        if todo:
            session = load_session(model)
            side, input_name = input_side(session), session.get_inputs()[0].name
            total = sum(len(b) for b in todo)
            with progress_bar(total=total, desc="tag", unit="img", enabled=ctx.progress and dist.is_main()) as bar:
                for n, batch in enumerate(todo):
                    pixels, kept = [], []
                    for d in batch:
                        try:
                            image = load_image(paths[d], ctx.runtime.max_image_pixels)
                        except DataError:
                            continue  # the caption stage reports it, or skips it
                        pixels.append(prepare(image, side))
                        kept.append(d)
                    if kept:
                        scores = session.run(None, {input_name: np.stack(pixels)})[0]
                        self.check_outputs(scores, len(kept), len(tags), model, tags_csv)
                        rows = [(d, s.astype(np.float32)) for d, s in zip(kept, scores, strict=True)]
                        new = [r for r in rows if not pool.has(r[0])]  # a batch is re-run whole on resume
                        if new:
                            pool.put_many(new, p.batch_size)
                    bar.update(len(batch))
                    fault_point("tag.batch", n + 1)  # this process's n-th batch, committed
        if not finish_shared_pool(env.store, pid, True):
            return StageResult()  # a rank > 0 of several: rank 0 commits
        committed = env.store.pool(pid).committed()
        items = {d: {"array": d, "digest": committed[d]["digest"]} for d in order if d in committed}
        record = {
            "pool": pid,
            "items": items,
            "tags": [name for name, _ in tags],
            "categories": "".join(c if len(c) == 1 else "?" for _, c in tags),
        }
        unreadable = len(order) - len(items)  # images no rank could read
        if unreadable:
            record["unreadable"] = unreadable
        return StageResult(
            pools={pid: sorted(items)},
            record=record,
            summary=f"{len(order) - done - unreadable} tagged, {done} reused",
        )

    @staticmethod
    def check_outputs(scores, n: int, n_tags: int, model, tags_csv) -> None:
        import numpy as np

        if scores.ndim != 2 or scores.shape != (n, n_tags):
            raise ModelError(
                f"tag.model: {model.name} gives scores of shape {list(scores.shape)} for {n} image(s), but "
                f"{tags_csv.name} lists {n_tags} tags: the two files come from different taggers. Download both "
                f"from the same model page."
            )
        if not np.isfinite(scores).all():
            raise ModelError(f"tag.model: {model} gave non-finite scores. Download it again.")
