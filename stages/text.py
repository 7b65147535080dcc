"""Stage `text`: embeddings of the caption strings from the frozen text encoder, into a zarr pool.

Keyed by (text encoder digest, final caption string): two stages or two runs that need the same string
share its embedding, and only new strings are encoded.
"""

from __future__ import annotations

from pydantic import BaseModel

from cache.keys import canonical_json, sha256_text
from cache.store import Manifest
from stages.base import PlanEnv, Stage, StageContext, StageResult


class TextParams(BaseModel):
    output: str = "last_hidden_state"


class TextStage(Stage):
    name = "text"
    IMPL_VERSION = 1
    upstream = ("caption",)
    description = "text-encoder embeddings per caption string"

    def params(self, env: PlanEnv) -> TextParams:
        return TextParams()

    def inputs(self, env: PlanEnv) -> dict:
        return {"model": {"text": env.component_digests["text"]}}

    def pool_id(self, env: PlanEnv, params: TextParams) -> str:
        spec = {"impl": self.IMPL_VERSION, "params": params.model_dump(), "text": env.component_digests["text"]}
        return f"text/{sha256_text(canonical_json(spec))[:32]}"

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        caption = upstream.get("caption")
        if caption is None or not env.store.has_work(self.name, key):
            return None
        pool = env.store.pool(self.pool_id(env, self.params(env)))
        names = {sha256_text(i["caption"]) for i in caption.record["items"]}
        return sum(pool.has(n) for n in names), len(names)

    def run(self, ctx: StageContext) -> StageResult:
        from tqdm import tqdm

        from stages.devices import resolve_device

        env = ctx.env
        pool = env.store.pool(self.pool_id(env, ctx.params))
        strings = sorted({i["caption"] for i in ctx.upstream["caption"].record["items"]})
        names = {s: sha256_text(s) for s in strings}
        todo = [s for s in strings if not pool.has(names[s])]
        if todo:
            encoder = env.family.load_text_encoder(env.layout, resolve_device(ctx.runtime.device))
            bs = ctx.runtime.encode_batch_size
            with tqdm(total=len(todo), desc="text", unit="caption", disable=not ctx.progress) as bar:
                for start in range(0, len(todo), bs):
                    chunk = todo[start : start + bs]
                    embeddings = encoder.encode(chunk).float().cpu().numpy()
                    for s, e in zip(chunk, embeddings, strict=True):
                        pool.put(names[s], e)
                        bar.update(1)
        committed = pool.committed()
        record = {
            "pool": self.pool_id(env, ctx.params),
            "strings": {s: {"array": names[s], "digest": committed[names[s]]["digest"]} for s in strings},
        }
        return StageResult(
            pools={self.pool_id(env, ctx.params): sorted(names.values())},
            record=record,
            summary=f"{len(todo)} encoded, {len(strings) - len(todo)} reused",
        )
