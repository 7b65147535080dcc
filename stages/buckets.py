"""Aspect-ratio buckets, crops and flips: where each stored view of an image comes from (docs/concepts.md#buckets).

An image becomes one or more *views*: resized to cover a target size (the square, or its bucket), cropped to it
(centred, or at positions drawn from the image's digest), and with flip_aug also mirrored. Each view is its own
latent in the pool; view 0 of a centre-cropped image is named by the image digest alone, as before views existed,
so turning buckets and flips off again finds every latent it had.

Buckets follow kohya's sd-scripts: the auto sizes are its make_bucket_resolutions, an image goes to the size of
nearest aspect ratio, is resized (rounding half up) so that it covers the size and is cropped to it;
bucket_no_upscale gives each image a size of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from stages.training.sampling import derive_seed


class BucketSpec(BaseModel):
    """The bucket settings that decide every image's size (part of the latents params when buckets are on)."""

    model_config = ConfigDict(frozen=True)

    sizes: tuple[tuple[int, int], ...] = ()  # [width, height]; empty with no_upscale
    no_upscale: bool = False
    step: int = 64  # no_upscale: sides are cut down to multiples of it
    max_area: int = 0  # no_upscale: larger images are shrunk to this many pixels first


def auto_sizes(resolution: int, min_size: int, max_size: int, step: int) -> tuple[tuple[int, int], ...]:
    """kohya's make_bucket_resolutions((resolution, resolution), min_size, max_size, step): the square, and for
    every width from min_size to max_size in steps the tallest height within resolution² pixels (and its
    transpose), sorted."""
    area = resolution * resolution
    sizes = {(int(math.sqrt(area) // step) * step,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // step) * step)
        if height >= min_size:
            sizes |= {(width, height), (height, width)}
        width += step
    return tuple(sorted(sizes))


def bucket_spec(latents) -> BucketSpec | None:
    """The BucketSpec of a [latents] config section; None when buckets are off."""
    from core.errors import ConfigError

    c = latents
    if c.buckets == "off":
        return None
    if isinstance(c.buckets, list):
        return BucketSpec(sizes=tuple(sorted((int(w), int(h)) for w, h in c.buckets)))
    if not c.min_bucket_reso <= c.resolution <= c.max_bucket_reso:
        raise ConfigError(
            f'latents.buckets = "auto": latents.resolution = {c.resolution} must lie between min_bucket_reso = '
            f"{c.min_bucket_reso} and max_bucket_reso = {c.max_bucket_reso} (the square bucket is resolution wide). "
            f"Lower min_bucket_reso or raise max_bucket_reso."
        )
    if c.bucket_no_upscale:
        return BucketSpec(no_upscale=True, step=c.bucket_reso_steps, max_area=c.resolution**2)
    return BucketSpec(sizes=auto_sizes(c.resolution, c.min_bucket_reso, c.max_bucket_reso, c.bucket_reso_steps))


def check_multiple(spec: BucketSpec | None, resolution: int, multiple: int, family: str) -> None:
    """Every side a family cannot take (its VAE factor times its patch size) is a ConfigError naming the setting."""
    from core.errors import ConfigError

    bad = [s for s in (spec.sizes if spec else ()) if s[0] % multiple or s[1] % multiple]
    if bad:
        raise ConfigError(
            f"latents.buckets: the {family} family needs image sides that are multiples of {multiple} px, but "
            f"{', '.join(f'{w}x{h}' for w, h in bad[:5])} are not. Use sizes (or bucket_reso_steps) in multiples "
            f"of {multiple}."
        )
    if spec and spec.no_upscale and spec.step % multiple:
        raise ConfigError(
            f"latents.bucket_reso_steps = {spec.step}: the {family} family needs multiples of {multiple} px."
        )
    if resolution % multiple:
        raise ConfigError(
            f"latents.resolution = {resolution}: the {family} family needs a multiple of {multiple} px (its VAE "
            f"downsamples and its transformer packs 2x2 latent patches)."
        )


def _round_to_step(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def select_bucket(width: int, height: int, spec: BucketSpec) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket [w, h], the size the image is resized to before the crop) as kohya's BucketManager.select_bucket."""
    ar = width / height
    if not spec.no_upscale:
        bucket = (width, height)
        if bucket not in spec.sizes:
            bucket = min(spec.sizes, key=lambda s: abs(s[0] / s[1] - ar))  # the first of equals, sizes sorted
        scale = bucket[1] / height if ar > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return bucket, (max(resized[0], bucket[0]), max(resized[1], bucket[1]))
    resized = (width, height)
    if width * height > spec.max_area:  # shrink to the area; of the two roundings, the one nearer the aspect
        w = math.sqrt(spec.max_area * ar)
        h = spec.max_area / w
        w_r = _round_to_step(w, spec.step)
        h_of_w = _round_to_step(w_r / ar, spec.step)
        h_r = _round_to_step(h, spec.step)
        w_of_h = _round_to_step(h_r * ar, spec.step)
        if h_of_w and w_of_h and abs(w_r / h_of_w - ar) < abs(w_of_h / h_r - ar):
            resized = (w_r, int(w_r / ar + 0.5))
        else:
            resized = (int(h_r * ar + 0.5), h_r)
    return (resized[0] - resized[0] % spec.step, resized[1] - resized[1] % spec.step), resized


@dataclass(frozen=True)
class Placement:
    """One view of an image: resized to `resized`, cropped to `size` at (left, top), mirrored when flip."""

    size: tuple[int, int]  # [width, height] of the view: the square or the bucket
    resized: tuple[int, int]
    left: int
    top: int
    flip: bool = False

    def apply(self, image):
        """The view of an upright image (any mode: RGB pixels, or an 'L' alpha channel)."""
        from PIL import Image, ImageOps

        if image.size != self.resized:
            image = image.resize(self.resized, Image.Resampling.BICUBIC)
        image = image.crop((self.left, self.top, self.left + self.size[0], self.top + self.size[1]))
        return ImageOps.mirror(image) if self.flip else image

    def conditioning(self, original: tuple[int, int]) -> dict:
        """SDXL's size conditioning of this view, each as [height, width] / [top, left] as diffusers takes them:
        the image's original size, the crop's top-left in the resized image (mirrored views count from the right,
        as the mirrored picture shows it), and the size trained at."""
        left = self.resized[0] - self.left - self.size[0] if self.flip else self.left
        return {
            "original_size": [original[1], original[0]],
            "crop_top_left": [self.top, left],
            "target_size": [self.size[1], self.size[0]],
        }


def square_placement(width: int, height: int, resolution: int) -> Placement:
    """The centre crop of buckets = off: short side to the resolution (at least it), the middle square."""
    scale = resolution / min(width, height)
    nw, nh = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    return Placement((resolution, resolution), (nw, nh), (nw - resolution) // 2, (nh - resolution) // 2)


@dataclass(frozen=True)
class ViewSpec:
    """What makes the views of every image: the buckets (None: the square), crop, crops per image, flips."""

    resolution: int
    buckets: BucketSpec | None = None
    crop: str = "center"
    crop_variants: int = 1
    flip: bool = False

    @property
    def count(self) -> int:
        return (self.crop_variants if self.crop == "random" else 1) * (2 if self.flip else 1)

    def target(self, width: int, height: int) -> Placement:
        """The centre-cropped placement of an image of this upright size."""
        if self.buckets is None:
            return square_placement(width, height, self.resolution)
        size, resized = select_bucket(width, height, self.buckets)
        return Placement(size, resized, (resized[0] - size[0]) // 2, (resized[1] - size[1]) // 2)

    def placements(self, width: int, height: int, digest: str) -> list[Placement]:
        """Every view of an image: per crop (random crops at positions drawn from the digest and the crop's
        number), the view and, with flips, its mirror."""
        base = self.target(width, height)
        out = []
        for c in range(self.crop_variants if self.crop == "random" else 1):
            p = base
            if self.crop == "random":
                s = derive_seed("crop", digest, c)
                room_x, room_y = base.resized[0] - base.size[0], base.resized[1] - base.size[1]
                p = Placement(base.size, base.resized, s % (room_x + 1), (s >> 24) % (room_y + 1))
            out.append(p)
            if self.flip:
                out.append(Placement(p.size, p.resized, p.left, p.top, True))
        return out


def view_name(digest: str, view: int, spec: ViewSpec) -> str:
    """The pool name of a view: the image digest for view 0, `<digest>.<crop>` / `<digest>.<crop>f` after it."""
    if view == 0:
        return digest
    crop, flipped = divmod(view, 2) if spec.flip else (view, 0)
    return f"{digest}.{crop}{'f' if flipped else ''}"


def slot_view(stream: str, seed: int, k: int, slot: int, views: int) -> int:
    """Which view of its item a training slot takes: drawn from the slot alone (0 when an item has one)."""
    return derive_seed("view", stream, seed, k, slot) % views if views > 1 else 0
