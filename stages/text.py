"""Stage `text`: embeddings of the caption strings from the frozen text encoder, into a zarr pool.

Keyed by (text encoder digest, final caption string): two stages or two runs that need the same string
share its embedding, and only new strings are encoded.
"""

from __future__ import annotations

from pydantic import BaseModel

from cache.keys import sha256_text
from cache.store import Manifest
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.pools import ensure_text_embeddings, pool_progress, text_pool_id


class TextParams(BaseModel):
    output: str = "last_hidden_state"


class TextStage(Stage):
    name = "text"
    IMPL_VERSION = 1
    upstream = ("caption",)
    description = "text-encoder embeddings per caption string"
    sharded = True  # several processes split the strings (stages/pools.py shared_pool)

    def params(self, env: PlanEnv) -> TextParams:
        return TextParams()

    def inputs(self, env: PlanEnv) -> dict:
        return {"model": {"text": env.component_digests["text"]}}

    def pool_id(self, env: PlanEnv, params: TextParams) -> str:
        return text_pool_id(env.component_digests["text"], env.family.name)

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        caption = upstream.get("caption")
        if caption is None:
            return None
        names = {sha256_text(i["caption"]) for i in caption.record["items"]}
        return pool_progress(env.store, self.name, key, self.pool_id(env, self.params(env)), names)

    def run(self, ctx: StageContext) -> StageResult:
        env = ctx.env
        strings = {i["caption"] for i in ctx.upstream["caption"].record["items"]}
        table = ensure_text_embeddings(
            env.store, env.family, env.layout, env.component_digests["text"], strings, ctx.runtime, ctx.progress, True
        )
        if table is None:  # a rank > 0 of several: rank 0 commits
            return StageResult()
        record = {"pool": table["pool"], "strings": table["strings"]}
        names = sorted(v["array"] for v in table["strings"].values())
        return StageResult(
            pools={table["pool"]: names},
            record=record,
            summary=f"{table['encoded']} encoded, {len(strings) - table['encoded']} reused",
        )
