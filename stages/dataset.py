"""The training images: a recursive scan of the data folder, and image decoding with clear errors.

An image is known by its content digest plus its path relative to the data root, never by its base
name alone; downstream stages read the caption stage's manifest, never a folder listing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache.hashing import StatMemo
from core.errors import DataError

# What Pillow reads without plugins; AVIF, HEIF and JPEG XL when the installed Pillow (or a plugin) registers them.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
PLUGIN_SUFFIXES = {
    ".avif": "Pillow 11.3+ built with libavif, or `pip install pillow-avif-plugin`",
    ".heic": "`pip install pillow-heif`",
    ".heif": "`pip install pillow-heif`",
    ".jxl": "`pip install pillow-jxl-plugin`",
}


def image_suffixes() -> tuple[str, ...]:
    """The image suffixes this installation decodes: IMAGE_SUFFIXES and the plugin formats Pillow registers."""
    from PIL import Image

    try:  # pillow-heif registers its opener only when asked
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:
        pass
    Image.init()
    registered = Image.registered_extensions()
    return IMAGE_SUFFIXES + tuple(s for s in PLUGIN_SUFFIXES if s in registered)


@dataclass(frozen=True)
class ImageEntry:
    relpath: str
    path: Path
    digest: str
    caption_path: Path | None
    caption_digest: str | None
    subset: str | None = None  # its [[data.subsets]] entry's name; relpath is relative to that folder

    @property
    def key(self) -> str:
        """The image's place in the data set: its relative path, under its subset's name."""
        return self.relpath if self.subset is None else f"{self.subset}/{self.relpath}"

    @property
    def item_id(self) -> str:
        return f"{self.key}@{self.digest[:12]}"


def scan_images(root: Path, caption_extensions: list[str], memo: StatMemo, where: str = "") -> list[ImageEntry]:
    """Every image under root (sorted by relative path) with its digest and sidecar caption file. `where` names
    a subset in the messages."""
    field = f"data.subsets ({where}): images" if where else "data.images"
    if not root.exists():
        raise DataError(
            f"{field}: the folder {root} does not exist. Create it and put the training images in it, "
            f"or point {'its images' if where else 'data.images'} in the config at the right folder."
        )
    if not root.is_dir():
        raise DataError(f"{field}: {root} is a file, not a folder of images.")
    caption_suffixes = {e.lower() for e in caption_extensions}
    readable = image_suffixes()
    entries, strangers, needs_plugin = [], [], {}
    for path in _walk(root):
        rel = path.relative_to(root)
        suffix = path.suffix.lower()
        if suffix in caption_suffixes:
            continue
        if suffix not in readable:
            if suffix in PLUGIN_SUFFIXES:
                needs_plugin.setdefault(suffix, []).append(rel.as_posix())
            else:
                strangers.append(rel.as_posix())
            continue
        caption_path = next((c for c in (path.with_suffix(e) for e in caption_extensions) if c.is_file()), None)
        entries.append(
            ImageEntry(
                relpath=rel.as_posix(),
                path=path,
                digest=memo.digest(path),
                caption_path=caption_path,
                caption_digest=memo.digest(caption_path) if caption_path else None,
            )
        )
    for suffix, files in needs_plugin.items():
        raise DataError(
            f"{field}: {_listed(files)} are {suffix[1:].upper()} images, which this installation's Pillow cannot "
            f"read. Install {PLUGIN_SUFFIXES[suffix]}, or convert them to PNG."
        )
    if strangers:
        raise DataError(
            f"{field}: {root} holds files that are neither images ({', '.join(readable)}) nor captions "
            f"({', '.join(caption_extensions)}): {_listed(strangers)}. Move them out of the folder."
        )
    if not entries:
        raise DataError(f"{field}: {root} contains no images ({', '.join(readable)}). Add training images.")
    return entries


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


DEFAULT_MAX_PIXELS = 100_000_000


def _walk(root: Path) -> list[Path]:
    """Every non-hidden file under root, sorted by relative path, following symlinked sub-folders (so a data set
    assembled from links trains on all of it); a link back into a folder already being walked is an error."""
    import os

    files = []
    for top, dirs, names in os.walk(root, followlinks=True):
        top_path = Path(top)
        real = top_path.resolve()
        if real in [p.resolve() for p in top_path.parents if p == root or root in p.parents]:
            raise DataError(
                f"data.images: {top_path} links back to {real}, a folder that contains it, so the folder never "
                f"ends. Remove or fix that link."
            )
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [top_path / n for n in names if not n.startswith(".") and (top_path / n).is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode an image fully (so truncation is caught here), upright (its EXIF orientation applied, as every
    viewer shows it), as 8-bit RGB: grayscale, palette, CMYK and 16-bit images converted (16-bit scaled, not
    clipped), a transparent image composited on white, a multi-frame file's first frame. Raises DataError naming
    the file; an image over max_pixels is refused from its header, before anything is decompressed.

    Transparency goes to white with data.alpha_mask on too (kohya encodes the hidden colours): the mask gives
    those pixels no weight, an editor's hidden colours never reach the VAE, and an image's latent does not depend
    on the mask setting, so turning it on or off re-uses every latent."""
    return to_rgb(_load_upright(path, max_pixels)[0])


def has_alpha(im) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)


def to_rgb(im):
    """An image of any Pillow mode as 8-bit RGB (load_image's conversions)."""
    import numpy as np
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's convert("RGB") clips these at 255: 16-bit data (PNG/TIFF) is scaled by 255/65535 instead, a
        # float image is taken as 0..1 when its values lie there, else clipped as 8-bit values.
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and 0.0 <= a.min() and a.max() <= 1.0 else a
        else:
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if has_alpha(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def check_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Decode the image as load_image does (raising its DataError) -> how many frames the file holds (GIF, APNG,
    multi-page TIFF, WebP animations: training uses the first)."""
    image, frames = _load_upright(path, max_pixels)
    to_rgb(image)
    return frames


def _load_upright(path: Path, max_pixels: int):
    """load_image's decode and checks, in the file's own mode (its alpha channel kept), frame 0 of a multi-frame
    file. -> (image, the file's frame count)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    image_suffixes()  # registers the plugin formats (HEIF) this installation has
    Image.MAX_IMAGE_PIXELS = None  # the limit is ours (runtime.max_image_pixels), checked below with the file's name
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise DataError(
                    f"{path}: the image is {w}x{h} = {w * h:,} pixels, over runtime.max_image_pixels = "
                    f"{max_pixels:,} (a guard against decompression bombs). Shrink the image, remove it, or raise "
                    f"runtime.max_image_pixels if it is genuine."
                )
            frames = int(getattr(im, "n_frames", 1))
            im.seek(0)
            im.load()
            return ImageOps.exif_transpose(im), frames
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode this image ({e}). Replace or remove the file.") from None


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as viewers show it (its EXIF orientation applied), from its header alone."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # transposed or rotated a quarter turn
        except Exception:  # a damaged EXIF block: load_image's exif_transpose ignores it too
            turned = False
    return (h, w) if turned else (w, h)


def _resize_crop(image, resolution: int):
    """Resize the short side to `resolution` (bicubic) and centre-crop to a square."""
    from stages.buckets import square_placement

    return square_placement(*image.size, resolution).apply(image)


def center_crop_pixels(image, resolution: int):
    """Resize the short side to `resolution` (bicubic), centre-crop to a square, map to [-1, 1] CHW float32."""
    return view_pixels(_resize_crop(image, resolution))


def view_pixels(image):
    """An RGB view (already resized and cropped) as [-1, 1] CHW float32."""
    import numpy as np

    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    # contiguous CHW: a transposed view would hand the VAE a channels-last batch, whose convolutions round
    # differently (up to 4e-3 in the latents of the tiny model)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_alpha(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The image's alpha channel as an 'L' image (upright, like load_image), or None when it has none (an RGB
    photo, a palette image without a transparent colour)."""
    im, _ = _load_upright(path, max_pixels)  # the same checks and errors as the pixels
    return im.convert("RGBA").getchannel("A") if has_alpha(im) else None


def alpha_mask(path: Path, placement, latent_hw: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS):
    """The loss mask of an image at latent size: its alpha channel resized and cropped as the pixels are (a
    buckets.Placement, or the resolution of the square centre crop), then area-averaged down to latent_hw, in
    [0, 1] as a (1, h, w) float32 array. No alpha channel: all ones."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    alpha = load_alpha(path, max_pixels)
    if alpha is None:
        return np.ones((1, *latent_hw), dtype=np.float32)
    view = _resize_crop(alpha, placement) if isinstance(placement, int) else placement.apply(alpha)
    full = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0)
    mask = F.adaptive_avg_pool2d(full[None, None], latent_hw)[0].numpy()
    if float(mask.max()) <= 0:
        raise DataError(
            f"{path}: its alpha channel is 0 everywhere in the crop, so data.alpha_mask would train "
            f"nothing of it. Remove the image, fix its transparency, or turn data.alpha_mask off."
        )
    return mask
