"""Stage `latents`: VAE-encode every image at one resolution with a centre crop, into a zarr pool.

Latents are keyed by image content within a pool keyed by the encoding settings and the VAE, so adding
3 images encodes 3, and an interrupted run resumes with the items it had committed.
"""

from __future__ import annotations

from pydantic import BaseModel

from cache.keys import canonical_json, sha256_text
from cache.store import Manifest
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.dataset import center_crop_pixels, load_image


class LatentsParams(BaseModel):
    resolution: int
    crop: str = "center"
    resample: str = "bicubic"


class LatentsStage(Stage):
    name = "latents"
    IMPL_VERSION = 1
    upstream = ("caption",)
    description = "VAE latents per image"

    def params(self, env: PlanEnv) -> LatentsParams:
        return LatentsParams(resolution=env.config.latents.resolution)

    def inputs(self, env: PlanEnv) -> dict:
        return {"model": {"vae": env.component_digests["vae"]}}

    def contract(self, env: PlanEnv, params: LatentsParams) -> dict:
        return {"resolution": params.resolution, "crop": params.crop, "latent_space": env.latent_space}

    def pool_id(self, env: PlanEnv, params: LatentsParams) -> str:
        spec = {"impl": self.IMPL_VERSION, "params": params.model_dump(), "vae": env.component_digests["vae"]}
        return f"latents/{sha256_text(canonical_json(spec))[:32]}"

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        caption = upstream.get("caption")
        if caption is None or not env.store.has_work(self.name, key):
            return None
        pool = env.store.pool(self.pool_id(env, self.params(env)))
        digests = {i["digest"] for i in caption.record["items"]}
        return sum(pool.has(d) for d in digests), len(digests)

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np
        import torch
        from tqdm import tqdm

        from stages.devices import resolve_device

        env, p = ctx.env, ctx.params
        pool = env.store.pool(self.pool_id(env, p))
        items = ctx.upstream["caption"].record["items"]
        by_digest = {i["digest"]: i for i in items}  # identical images share one latent
        todo = [d for d in by_digest if not pool.has(d)]
        if len(todo) < len(by_digest):
            ctx.log(f"latents: {len(by_digest) - len(todo)}/{len(by_digest)} images already encoded, {len(todo)} to go")
        if todo:
            device = resolve_device(ctx.runtime.device)
            vae = env.family.load_vae(env.layout, device)
            root = env.loaded.resolve(env.config.data.images)
            bs = ctx.runtime.encode_batch_size
            with tqdm(total=len(todo), desc="latents", unit="img", disable=not ctx.progress) as bar:
                for start in range(0, len(todo), bs):
                    chunk = todo[start : start + bs]
                    pixels = np.stack(
                        [center_crop_pixels(load_image(root / by_digest[d]["path"]), p.resolution) for d in chunk]
                    )
                    with torch.no_grad():
                        latents = env.family.encode_images(vae, torch.from_numpy(pixels)).float().cpu().numpy()
                    for d, z in zip(chunk, latents, strict=True):
                        pool.put(d, z)
                        bar.update(1)
        entries = {d: pool.committed()[d] for d in by_digest}
        record = {
            "pool": self.pool_id(env, p),
            "items": {i["id"]: {"array": i["digest"], "digest": entries[i["digest"]]["digest"]} for i in items},
            "shape": entries[items[0]["digest"]]["shape"],
        }
        return StageResult(
            pools={self.pool_id(env, p): sorted(by_digest)},
            record=record,
            summary=f"{len(todo)} encoded, {len(by_digest) - len(todo)} reused",
        )
