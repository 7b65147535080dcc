"""The training images: a recursive scan of the data folder, and image decoding with clear errors.

An image is known by its content digest plus its path relative to the data root, never by its base
name alone; downstream stages read the caption stage's manifest, never a folder listing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache.hashing import StatMemo
from pipeline.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageEntry:
    relpath: str
    path: Path
    digest: str
    caption_path: Path | None
    caption_digest: str | None

    @property
    def item_id(self) -> str:
        return f"{self.relpath}@{self.digest[:12]}"


def scan_images(root: Path, caption_extensions: list[str], memo: StatMemo) -> list[ImageEntry]:
    """Every image under root (sorted by relative path) with its digest and sidecar caption file."""
    if not root.exists():
        raise DataError(
            f"data.images: the folder {root} does not exist. Create it and put the training images in it, "
            f"or point data.images in the config at the right folder."
        )
    if not root.is_dir():
        raise DataError(f"data.images: {root} is a file, not a folder of images.")
    caption_suffixes = {e.lower() for e in caption_extensions}
    entries, strangers = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in caption_suffixes:
            continue
        if suffix not in IMAGE_SUFFIXES:
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
    if strangers:
        listed = ", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else "")
        raise DataError(
            f"data.images: {root} holds files that are neither images ({', '.join(IMAGE_SUFFIXES)}) nor captions "
            f"({', '.join(caption_extensions)}): {listed}. Move them out of the folder."
        )
    if not entries:
        raise DataError(f"data.images: {root} contains no images ({', '.join(IMAGE_SUFFIXES)}). Add training images.")
    return entries


def load_image(path: Path):
    """Decode an image fully (so truncation is caught here), as RGB. Raises DataError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode this image ({e}). Replace or remove the file.") from None


def center_crop_pixels(image, resolution: int):
    """Resize the short side to `resolution` (bicubic), centre-crop to a square, map to [-1, 1] CHW float32."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1)
