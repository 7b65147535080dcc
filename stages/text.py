"""Stage `text`: embeddings of the caption strings from the frozen text encoder, into a zarr pool.

Keyed by (text encoder digest, final caption string): two stages or two runs that need the same string
share its embedding, and only new strings are encoded.
"""

from __future__ import annotations

from pydantic import BaseModel

from cache.keys import sha256_text
from cache.store import Manifest
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.pools import fill_pool, pool_id, pool_progress


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
        return pool_id("text", self.IMPL_VERSION, params.model_dump(), "text", env.component_digests["text"])

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        caption = upstream.get("caption")
        if caption is None:
            return None
        names = {sha256_text(i["caption"]) for i in caption.record["items"]}
        return pool_progress(env.store, self.name, key, self.pool_id(env, self.params(env)), names)

    def run(self, ctx: StageContext) -> StageResult:
        from stages.devices import resolve_device

        env = ctx.env
        pid = self.pool_id(env, ctx.params)
        pool = env.store.pool(pid)
        strings = sorted({i["caption"] for i in ctx.upstream["caption"].record["items"]})
        names = {s: sha256_text(s) for s in strings}
        todo = [s for s in strings if not pool.has(names[s])]
        if todo:
            encoder = env.family.load_text_encoder(env.layout, resolve_device(ctx.runtime.device))

            def encode(chunk: list[str]):
                return encoder.encode(chunk).float().cpu().numpy()

            fill_pool(
                pool, todo, names.__getitem__, encode, ctx.runtime.encode_batch_size, "text", "caption", ctx.progress
            )
        committed = pool.committed()
        record = {
            "pool": pid,
            "strings": {s: {"array": names[s], "digest": committed[names[s]]["digest"]} for s in strings},
        }
        return StageResult(
            pools={pid: sorted(names.values())},
            record=record,
            summary=f"{len(todo)} encoded, {len(strings) - len(todo)} reused",
        )
