"""Stage `latents`: VAE-encode every view of every image into a zarr pool: the square centre crop, or with
latents.buckets each image at its aspect-ratio bucket, and with random crops and flip_aug several views each
(stages/buckets.py).

Latents are keyed by image content (and view) within a pool keyed by the encoding settings and the VAE, so
adding 3 images encodes 3, and an interrupted run resumes with the items it had committed.
"""

from __future__ import annotations

from cache.store import Manifest
from core import dist
from core.errors import DataError
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.buckets import BucketSpec, ViewSpec, bucket_spec, check_multiple, view_name
from stages.dataset import load_image, upright_size, view_pixels
from stages.pools import fill_pool, finish_shared_pool, pool_id, pool_progress, shared_pool
from stages.training.params import KeyedParams


class LatentsParams(KeyedParams):
    """Without buckets, random crops or flips the params (and so the key) are what they were before those
    existed."""

    UNKEYED_WHEN_NONE = ("buckets", "crop_variants", "flip_aug", "mask_subsets")

    resolution: int
    crop: str = "center"
    resample: str = "bicubic"
    alpha_mask: bool = False  # also store each image's alpha channel at latent size (the loss mask)
    buckets: BucketSpec | None = None
    crop_variants: int | None = None  # crop = "random" only
    flip_aug: bool | None = None  # None when off
    # the subsets whose images are masked when [[data.subsets]] alpha_mask leaves some out (None: every image)
    mask_subsets: list[str] | None = None

    @property
    def views(self) -> ViewSpec:
        return ViewSpec(self.resolution, self.buckets, self.crop, self.crop_variants or 1, bool(self.flip_aug))


MASK_POOL_IMPL = 1


def mask_pool_id(params: LatentsParams, latent_hw: tuple[int, int] | None) -> str:
    """Masks depend on the placement and the latent size only, not on the VAE's weights (latent_hw None: each
    view at its bucket's)."""
    spec = {"resolution": params.resolution, "crop": params.crop, "resample": params.resample}
    if params.buckets is not None:
        spec["buckets"] = params.buckets.model_dump()
    hw = "bucket" if latent_hw is None else f"{latent_hw[0]}x{latent_hw[1]}"
    return pool_id("masks", MASK_POOL_IMPL, spec, "latent_hw", hw)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _shown(item: dict) -> str:
    """A caption-table item as messages name it: its path, under its subset's name."""
    return f"{item['subset']}/{item['path']}" if item.get("subset") else item["path"]


def latent_views(item: dict) -> list[dict]:
    """The stored views of a latents record's item ({"array", "digest", ...} each), view 0 first."""
    return item.get("views") or [{"array": item["array"], "digest": item["digest"]}]


def mask_settings(data) -> dict:
    """alpha_mask (any image masked) and mask_subsets (which subsets', when not all) from data.alpha_mask and each
    subset's own alpha_mask."""
    if not data.subsets:
        return {"alpha_mask": data.alpha_mask}
    flags = {s.name or s.images.name: data.alpha_mask if s.alpha_mask is None else s.alpha_mask for s in data.subsets}
    masked = sorted(n for n, on in flags.items() if on)
    return {"alpha_mask": bool(masked), "mask_subsets": masked if masked and len(masked) < len(flags) else None}


class LatentsStage(Stage):
    name = "latents"
    # v2: EXIF orientation applied (a portrait phone photo was encoded sideways). v3: a contiguous batch to the VAE
    # (a channels-last one rounded differently), transparency composited on white, 16-bit images scaled
    IMPL_VERSION = 3
    upstream = ("caption",)
    description = "VAE latents per image"
    sharded = True  # several processes split the views (stages/pools.py shared_pool)

    def params(self, env: PlanEnv) -> LatentsParams:
        c = env.config.latents
        buckets = bucket_spec(c)
        check_multiple(buckets, c.resolution, env.family.pixel_multiple, env.family.name)
        return LatentsParams(
            resolution=c.resolution,
            **mask_settings(env.config.data),
            buckets=buckets,
            crop=c.crop,
            crop_variants=c.crop_variants if c.crop == "random" else None,
            flip_aug=True if c.flip_aug else None,
        )

    def inputs(self, env: PlanEnv) -> dict:
        return {"model": {"vae": env.component_digests["vae"]}}

    def contract(self, env: PlanEnv, params: LatentsParams) -> dict:
        contract = {
            "resolution": params.resolution,
            "crop": params.crop,
            "vae": env.component_digests["vae"],
            "latent_space": env.model.latent_space,
        }
        if params.buckets is not None:
            contract["buckets"] = params.buckets.model_dump(mode="json")
        return contract

    def pool_id(self, env: PlanEnv, params: LatentsParams) -> str:
        # what decides a view's array: not alpha_mask (turning it on re-uses every latent), not the number of random
        # crops (crop c lies where it lay with fewer), not flip_aug (the unflipped views are the same arrays)
        latent_params = params.model_dump(exclude={"alpha_mask", "mask_subsets", "crop_variants", "flip_aug"})
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
        pool = shared_pool(env.store, pid, True)  # several processes: each its own rows of the pool
        items = ctx.upstream["caption"].record["items"]
        by_digest = {i["digest"]: i for i in items}  # identical images share one latent
        spec = p.views
        sizes = {d: upright_size(env.image_path(by_digest[d])) for d in by_digest}
        placements = {d: spec.placements(*sizes[d], d) for d in by_digest}
        self.refuse_empty(placements, by_digest, p)
        views = [(d, v) for d in by_digest for v in range(len(placements[d]))]
        name = {dv: view_name(dv[0], dv[1], spec) for dv in views}
        by_size = lambda dv: (placements[dv[0]][dv[1]].size, dv)  # noqa: E731 -- a batch to the VAE holds one size
        todo = sorted((dv for dv in views if not pool.has(name[dv])), key=by_size)
        dist.barrier()  # every rank has read what is done before any writes (several processes)
        if len(todo) < len(views) and dist.is_main():
            what = "views" if len(views) > len(by_digest) else "images"
            ctx.log(f"latents: {len(views) - len(todo)}/{len(views)} {what} already encoded, {len(todo)} to go")
        if todo:
            device = resolve_device(ctx.runtime.device)
            vae = env.family.load_vae(env.layout, device)

            def encode(batch: list[tuple[str, int]]):
                images = {d: load_image(env.image_path(by_digest[d]), ctx.runtime.max_image_pixels) for d, _ in batch}
                pixels = np.stack([view_pixels(placements[d][v].apply(images[d])) for d, v in batch])
                with torch.no_grad():
                    return env.family.encode_images(vae, torch.from_numpy(pixels)).float().cpu().numpy()

            fill_pool(
                pool,
                todo,
                name.__getitem__,
                encode,
                ctx.runtime.encode_batch_size,
                "latents",
                "view" if len(views) > len(by_digest) else "img",
                ctx.progress,
                group=lambda dv: placements[dv[0]][dv[1]].size,
                shard=True,
                label=ctx.node,
            )
        if not finish_shared_pool(env.store, pid, True):
            return StageResult()  # a rank > 0 of several: rank 0 records and commits
        committed = env.store.pool(pid).committed()
        plain = p.buckets is None and spec.count == 1
        record = {"pool": pid, "items": {}, "shape": committed[items[0]["digest"]]["shape"]}
        if not plain:
            record["crop"] = p.crop
        for i in items:
            d = i["digest"]
            record["items"][i["id"]] = {"array": d, "digest": committed[d]["digest"]}
            if plain and env.family.size_conditioned:  # the centre crop's size conditioning (SDXL)
                record["items"][i["id"]]["size"] = placements[d][0].conditioning(sizes[d])
            if not plain:
                record["items"][i["id"]].update(
                    bucket=list(placements[d][0].size),
                    shape=committed[d]["shape"],
                    views=[
                        {
                            "array": name[(d, v)],
                            "digest": committed[name[(d, v)]]["digest"],
                            "flip": pl.flip,
                            **pl.conditioning(sizes[d]),
                        }
                        for v, pl in enumerate(placements[d])
                    ],
                )
        if p.buckets is not None:
            counts: dict[str, int] = {}
            for i in items:
                w, h = placements[i["digest"]][0].size
                counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + 1
            record["buckets"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            shown = self.bucket_line(record["buckets"])
            ctx.log(f"latents: {len(items)} images in {_count(len(counts), 'bucket')}: {shown}")
        upscaled = self.upscaled(items, sizes, placements, p)
        if upscaled:
            record["upscaled"] = upscaled
            for note in self.notes_of(record, p.resolution):
                ctx.log(f"latents: {note}")
        pools = {pid: sorted(name.values())}
        if p.alpha_mask:
            masked = {i["digest"] for i in items if p.mask_subsets is None or i.get("subset") in p.mask_subsets}
            names = {dv: n for dv, n in name.items() if dv[0] in masked}
            record["masks"] = self.fill_masks(ctx, by_digest, placements, names, committed)
            pools[record["masks"]["pool"]] = sorted(record["masks"]["items"])
        return StageResult(
            pools=pools,
            record=record,
            summary=f"{len(todo)} encoded, {len(views) - len(todo)} reused"
            + (f", {_count(len(record['buckets']), 'bucket')}" if "buckets" in record else ""),
        )

    @staticmethod
    def bucket_line(counts: dict[str, int], limit: int = 8) -> str:
        shown = ", ".join(f"{size} ({n})" for size, n in list(counts.items())[:limit])
        return shown + (f" and {len(counts) - limit} more" if len(counts) > limit else "")

    @staticmethod
    def refuse_empty(placements: dict, by_digest: dict, p: LatentsParams) -> None:
        """bucket_no_upscale: an image narrower than one bucket step has no bucket; say which, and the ways out."""
        tiny = [_shown(by_digest[d]) for d, views in placements.items() if 0 in views[0].size]
        if tiny:
            listed = ", ".join(sorted(tiny)[:5]) + (f" and {len(tiny) - 5} more" if len(tiny) > 5 else "")
            raise DataError(
                f"latents.bucket_no_upscale: {listed} have a side shorter than bucket_reso_steps = "
                f"{p.buckets.step} px, so no bucket fits them without enlarging. Remove them, lower "
                f"latents.bucket_reso_steps, or set latents.bucket_no_upscale = false."
            )

    @staticmethod
    def upscaled(items: list[dict], sizes: dict, placements: dict, p: LatentsParams) -> list[dict]:
        """The images the crop enlarges (which blurs them): without buckets, those whose short side is below the
        resolution; with buckets, those resized up to cover their bucket. Most enlarged first."""
        small = {}
        for item in items:
            w, h = sizes[item["digest"]]
            if p.buckets is None:
                factor = p.resolution / min(w, h)
            else:
                factor = placements[item["digest"]][0].resized[0] / w
            if factor > 1:
                entry = {"path": _shown(item), "size": [w, h], "factor": round(factor, 2)}
                if p.buckets is not None:
                    entry["bucket"] = list(placements[item["digest"]][0].size)
                small[entry["path"]] = entry
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
        if "bucket" in up[0]:
            return [
                f"{len(up)} image(s) are smaller than their bucket and were enlarged to cover it, which blurs "
                f"them: {listed}{more}. Use larger images, a lower latents.resolution, or latents.bucket_no_upscale."
            ]
        return [
            f"{len(up)} image(s) are smaller than latents.resolution = {resolution} px and were enlarged to it, which "
            f"blurs them: {listed}{more}. Use larger images, or a lower latents.resolution."
        ]

    def fill_masks(self, ctx: StageContext, by_digest: dict, placements: dict, name: dict, committed: dict) -> dict:
        """data.alpha_mask: each view's alpha at its latent's size in a pool of its own; the record maps the views'
        array names to it (the masked ones: a view without a mask trains everywhere)."""
        import numpy as np

        from stages.dataset import alpha_mask

        env, p = ctx.env, ctx.params
        first = next(iter(by_digest))
        mpid = mask_pool_id(p, None if p.buckets is not None else tuple(committed[first]["shape"][-2:]))
        pool = env.store.pool(mpid)
        views = sorted(name, key=lambda dv: (placements[dv[0]][dv[1]].size, dv))
        todo = [dv for dv in views if not pool.has(name[dv])]

        def masks(batch: list[tuple[str, int]]):
            return np.stack(
                [
                    alpha_mask(
                        env.image_path(by_digest[d]),
                        placements[d][v],
                        tuple(committed[name[(d, v)]]["shape"][-2:]),
                        ctx.runtime.max_image_pixels,
                    )
                    for d, v in batch
                ]
            )

        fill_pool(
            pool,
            todo,
            name.__getitem__,
            masks,
            ctx.runtime.encode_batch_size,
            "masks",
            "img",
            ctx.progress,
            group=lambda dv: placements[dv[0]][dv[1]].size,
        )
        masks_committed = pool.committed()
        return {"pool": mpid, "items": {name[dv]: masks_committed[name[dv]]["digest"] for dv in sorted(views)}}
