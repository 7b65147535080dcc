"""Stage `latents`: VAE-encode every image at one resolution with a centre crop, into a zarr pool.

Latents are keyed by image content within a pool keyed by the encoding settings and the VAE, so adding
3 images encodes 3, and an interrupted run resumes with the items it had committed.
"""

from __future__ import annotations

from pydantic import BaseModel

from cache.store import Manifest
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.dataset import center_crop_pixels, load_image
from stages.pools import fill_pool, pool_id, pool_progress


class LatentsParams(BaseModel):
    resolution: int
    crop: str = "center"
    resample: str = "bicubic"
    alpha_mask: bool = False  # also store each image's alpha channel at latent size (the loss mask)


MASK_POOL_IMPL = 1


def mask_pool_id(params: LatentsParams, latent_hw: tuple[int, int]) -> str:
    """Masks depend on the crop and the latent size only, not on the VAE's weights."""
    spec = {"resolution": params.resolution, "crop": params.crop, "resample": params.resample}
    return pool_id("masks", MASK_POOL_IMPL, spec, "latent_hw", f"{latent_hw[0]}x{latent_hw[1]}")


class LatentsStage(Stage):
    name = "latents"
    # v2: EXIF orientation applied (a portrait phone photo was encoded sideways). v3: a contiguous batch to the VAE
    # (a channels-last one rounded differently), transparency composited on white, 16-bit images scaled
    IMPL_VERSION = 3
    upstream = ("caption",)
    description = "VAE latents per image"

    def params(self, env: PlanEnv) -> LatentsParams:
        return LatentsParams(resolution=env.config.latents.resolution, alpha_mask=env.config.data.alpha_mask)

    def inputs(self, env: PlanEnv) -> dict:
        return {"model": {"vae": env.component_digests["vae"]}}

    def contract(self, env: PlanEnv, params: LatentsParams) -> dict:
        return {
            "resolution": params.resolution,
            "crop": params.crop,
            "vae": env.component_digests["vae"],
            "latent_space": env.model.latent_space,
        }

    def pool_id(self, env: PlanEnv, params: LatentsParams) -> str:
        # the latent arrays do not depend on alpha_mask: turning it on re-uses every encoded latent
        latent_params = params.model_dump(exclude={"alpha_mask"})
        return pool_id("latents", self.IMPL_VERSION, latent_params, "vae", env.component_digests["vae"])

    def progress(self, env: PlanEnv, key: str, upstream: dict[str, Manifest | None]) -> tuple[int, int] | None:
        caption = upstream.get("caption")
        if caption is None:
            return None
        digests = {i["digest"] for i in caption.record["items"]}
        return pool_progress(env.store, self.name, key, self.pool_id(env, self.params(env)), digests)

    def run(self, ctx: StageContext) -> StageResult:
        import numpy as np
        import torch

        from stages.devices import resolve_device

        env, p = ctx.env, ctx.params
        pid = self.pool_id(env, p)
        pool = env.store.pool(pid)
        items = ctx.upstream["caption"].record["items"]
        by_digest = {i["digest"]: i for i in items}  # identical images share one latent
        todo = [d for d in by_digest if not pool.has(d)]
        if len(todo) < len(by_digest):
            ctx.log(f"latents: {len(by_digest) - len(todo)}/{len(by_digest)} images already encoded, {len(todo)} to go")
        if todo:
            device = resolve_device(ctx.runtime.device)
            vae = env.family.load_vae(env.layout, device)
            root = env.loaded.resolve(env.config.data.images)

            def encode(digests: list[str]):
                pixels = np.stack(
                    [
                        center_crop_pixels(
                            load_image(root / by_digest[d]["path"], ctx.runtime.max_image_pixels), p.resolution
                        )
                        for d in digests
                    ]
                )
                with torch.no_grad():
                    return env.family.encode_images(vae, torch.from_numpy(pixels)).float().cpu().numpy()

            fill_pool(pool, todo, str, encode, ctx.runtime.encode_batch_size, "latents", "img", ctx.progress)
        entries = {d: pool.committed()[d] for d in by_digest}
        record = {
            "pool": pid,
            "items": {i["id"]: {"array": i["digest"], "digest": entries[i["digest"]]["digest"]} for i in items},
            "shape": entries[items[0]["digest"]]["shape"],
        }
        upscaled = self.upscaled(env.loaded.resolve(env.config.data.images), items, p.resolution)
        if upscaled:
            record["upscaled"] = upscaled
            for note in self.notes_of(record, p.resolution):
                ctx.log(f"latents: {note}")
        pools = {pid: sorted(by_digest)}
        if p.alpha_mask:
            record["masks"] = self.fill_masks(ctx, by_digest, tuple(record["shape"][-2:]))
            pools[record["masks"]["pool"]] = sorted(by_digest)
        return StageResult(
            pools=pools,
            record=record,
            summary=f"{len(todo)} encoded, {len(by_digest) - len(todo)} reused",
        )

    @staticmethod
    def upscaled(root, items: list[dict], resolution: int) -> list[dict]:
        """The images whose short side is below the resolution (read from their headers): the centre crop
        enlarges them, which blurs them. Smallest first."""
        from PIL import Image

        small = {}
        for item in items:
            with Image.open(root / item["path"]) as im:
                w, h = im.size
            if min(w, h) < resolution:
                small[item["path"]] = {"path": item["path"], "size": [w, h], "factor": round(resolution / min(w, h), 2)}
        return sorted(small.values(), key=lambda u: (-u["factor"], u["path"]))

    def artifact_notes(self, manifest: Manifest) -> list[str]:
        return self.notes_of(manifest.record, manifest.preimage["params"]["resolution"])

    @staticmethod
    def notes_of(record: dict, resolution: int) -> list[str]:
        up = record.get("upscaled")
        if not up:
            return []
        listed = ", ".join(f"{u['path']} {u['size'][0]}x{u['size'][1]} ({u['factor']:g}x)" for u in up[:5])
        more = f" and {len(up) - 5} more" if len(up) > 5 else ""
        return [
            f"{len(up)} image(s) are smaller than latents.resolution = {resolution} px and were enlarged to it, which "
            f"blurs them: {listed}{more}. Use larger images, or a lower latents.resolution."
        ]

    def fill_masks(self, ctx: StageContext, by_digest: dict, latent_hw: tuple[int, int]) -> dict:
        """data.alpha_mask: each image's alpha at latent size in a pool of its own; the record maps digests to it."""
        import numpy as np

        from stages.dataset import alpha_mask

        env, p = ctx.env, ctx.params
        mpid = mask_pool_id(p, latent_hw)
        pool = env.store.pool(mpid)
        root = env.loaded.resolve(env.config.data.images)
        todo = [d for d in by_digest if not pool.has(d)]

        def masks(digests: list[str]):
            paths = [root / by_digest[d]["path"] for d in digests]
            return np.stack([alpha_mask(f, p.resolution, latent_hw, ctx.runtime.max_image_pixels) for f in paths])

        fill_pool(pool, todo, str, masks, ctx.runtime.encode_batch_size, "masks", "img", ctx.progress)
        committed = pool.committed()
        return {"pool": mpid, "items": {d: committed[d]["digest"] for d in sorted(by_digest)}}
