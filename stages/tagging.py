"""WD14 taggers (SmilingWolf's WD v3 ONNX models): the model folder, an image as the model takes it, and one image's
scores turned into tags under the [tag] settings.

The `tag` stage runs the model and stores every tag's score; the caption stage applies `TagRules`, so a new
threshold or rename runs no model. What the v3 models take (read from kohya's tag_images_by_wd14_tagger.py and
SmilingWolf's model cards): NHWC float32 batches of a square image, BGR, values 0-255, padded white to a square
before resizing. selected_tags.csv lists the outputs in order: tag_id,name,category,count with category 9 for the
four ratings, 0 for general tags and 4 for characters.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from core.errors import ModelError

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
RATING, CHARACTER = "9", "4"  # every other category is thresholded as a general tag
DEFAULT_SIZE = 448  # the v3 models' input side; a model with a fixed other side says so in its input shape
DOWNLOAD = (
    "Download model.onnx and selected_tags.csv of a WD v3 tagger (e.g. huggingface.co/SmilingWolf/wd-vit-tagger-v3 "
    "or wd-swinv2-tagger-v3) into one folder and set tag.model to it"
)


def tagger_files(folder: Path) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) of a tagger folder, or a ModelError naming what is missing and the fix."""
    if not folder.is_dir():
        raise ModelError(f"tag.model: {folder} is not a folder. {DOWNLOAD}.")
    files = folder / MODEL_FILE, folder / TAGS_FILE
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"tag.model: {folder} has no {' or '.join(missing)}. {DOWNLOAD}.")
    return files


def read_tags(path: Path) -> list[tuple[str, str]]:
    """(name, category) of every model output, in output order."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"tag.model: cannot read {path}: {e}. {DOWNLOAD}.") from None
    if not rows or [h.strip() for h in rows[0][:3]] != ["tag_id", "name", "category"]:
        got = ",".join(rows[0][:4]) if rows else "an empty file"
        raise ModelError(
            f"tag.model: {path} starts with {got!r}, not the header tag_id,name,category,count of a WD tagger's "
            f"selected_tags.csv. {DOWNLOAD}."
        )
    tags = [(r[1], r[2].strip()) for r in rows[1:] if len(r) >= 3]
    if not tags:
        raise ModelError(f"tag.model: {path} lists no tags. {DOWNLOAD}.")
    return tags


def prepare(image, size: int):
    """An RGB PIL image as the tagger takes it: padded white to a square (centred), resized to size x size (area
    averaging when shrinking, Lanczos when enlarging, as kohya's script does), BGR float32 0-255, HWC."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BOX if side > size else Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(square, dtype=np.float32)[:, :, ::-1])


class TagRules(BaseModel):
    """The [tag] settings the caption stage applies to the stored scores (everything but the model and batch)."""

    mode: Literal["fill-missing", "append", "replace"]
    general_threshold: float
    character_threshold: float
    rating: Literal["off", "first", "last"]
    character_tags_first: bool
    character_tag_expand: bool
    always_first_tags: list[str]
    replace_tags: dict[str, str]
    remove_underscore: bool
    undesired_tags: list[str]
    separator: str  # data.caption_separator: how a sidecar caption's tags are told apart (mode append)

    def names(self, tags: list[tuple[str, str]]) -> list[list[str]]:
        """The tag(s) each output writes: a character name_(series) expanded to two, underscores to spaces (not in
        names of 3 characters or fewer, such as ^_^), then the renames."""
        out = []
        for name, category in tags:
            parts = [name]
            if self.character_tag_expand and category == CHARACTER and name.endswith(")") and "(" in name:
                head, _, series = name.rpartition("(")
                parts = [head.removesuffix("_"), series[:-1]]
            if self.remove_underscore:
                parts = [p.replace("_", " ") if len(p) > 3 else p for p in parts]
            out.append([self.replace_tags.get(p, p) for p in parts])
        return out

    def tags_of(self, scores, tags: list[tuple[str, str]], names: list[list[str]]) -> list[str]:
        """One image's tags, in output order (characters first with character_tags_first), the rating first or
        last, always_first_tags in front in their listed order; no tag twice, none undesired."""
        general, characters, rating = [], [], None
        for i, (_, category) in enumerate(tags):
            s = float(scores[i])
            if category == RATING:
                if rating is None or s > float(scores[rating]):
                    rating = i
            elif category == CHARACTER:
                if s >= self.character_threshold:
                    characters.append(i)
            elif s >= self.general_threshold:
                general.append(i)
        order = characters + general if self.character_tags_first else sorted(characters + general)
        found = [n for i in order for n in names[i]]
        if self.rating != "off" and rating is not None:
            found = names[rating] + found if self.rating == "first" else found + names[rating]
        undesired = set(self.undesired_tags)
        found = list(dict.fromkeys(t for t in found if t not in undesired))
        first = [t for t in self.always_first_tags if t in found]
        return first + [t for t in found if t not in first]

    def merge(self, sidecar: str, tags: list[str]) -> str:
        """A caption from the sidecar text and the tagger's tags under tag.mode; tags are joined as captions.py
        joins them (", " for the comma separator)."""
        joiner = ", " if self.separator == "," else f"{self.separator} "
        if self.mode == "replace" or (self.mode == "fill-missing" and not sidecar):
            return joiner.join(tags)
        if self.mode == "fill-missing":
            return sidecar
        existing = [t.strip() for t in sidecar.split(self.separator) if t.strip()]
        return joiner.join(existing + [t for t in tags if t not in existing])
