"""The data side of the config schema: the training images and captions ([data], [[data.subsets]]) and how they
are encoded ([latents]), with the Section base every section shares. pipeline/config.py holds the rest and
re-exports these."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    # NaN and infinities are refused in every number field: they cannot be hashed into a key, and no setting
    # means them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SubsetConfig(Section):
    """One folder of training images with settings of its own ([[data.subsets]], kohya's subsets)."""

    images: Path = Field(description="Folder of this subset's images (searched recursively), relative to the config.")
    name: str | None = Field(
        None, description="The subset's name in item ids and messages. Unset: the folder's name.", pattern=r"^[^/@]+$"
    )
    num_repeats: int = Field(
        1, ge=1, le=10_000, description="How many times each image counts in an epoch (kohya's num_repeats)."
    )
    caption_prefix: str | None = Field(None, description="This subset's data.caption_prefix. Unset: data's.")
    caption_suffix: str | None = Field(None, description="This subset's data.caption_suffix. Unset: data's.")
    default_caption: str | None = Field(
        None,
        description="This subset's data.default_caption (kohya's class_tokens: the caption of images without one). "
        "Unset: data's.",
    )
    alpha_mask: bool | None = Field(
        None, description="This subset's data.alpha_mask: weight its images' loss by their alpha. Unset: data's."
    )
    is_reg: bool = Field(
        False,
        description="Regularization (class) images for prior preservation: repeated or cut, as kohya does, so an "
        "epoch holds as many of them as of training images; their loss is weighted by data.prior_loss_weight.",
    )

    # This subset's caption tricks (kohya's subset options): each unset one is data's
    shuffle_caption: bool | None = Field(None, description="This subset's data.shuffle_caption. Unset: data's.")
    keep_tokens: int | None = Field(None, ge=0, description="This subset's data.keep_tokens. Unset: data's.")
    keep_tokens_separator: str | None = Field(
        None, description="This subset's data.keep_tokens_separator. Unset: data's."
    )
    caption_separator: str | None = Field(
        None, min_length=1, description="This subset's data.caption_separator. Unset: data's."
    )
    secondary_separator: str | None = Field(None, description="This subset's data.secondary_separator. Unset: data's.")
    enable_wildcard: bool | None = Field(None, description="This subset's data.enable_wildcard. Unset: data's.")
    caption_dropout_rate: float | None = Field(
        None, ge=0, le=1, description="This subset's data.caption_dropout_rate. Unset: data's."
    )
    caption_tag_dropout_rate: float | None = Field(
        None, ge=0, le=1, description="This subset's data.caption_tag_dropout_rate. Unset: data's."
    )
    caption_dropout_every_n_epochs: int | None = Field(
        None, ge=0, description="This subset's data.caption_dropout_every_n_epochs. Unset: data's."
    )
    token_warmup_min: int | None = Field(None, ge=0, description="This subset's data.token_warmup_min. Unset: data's.")
    token_warmup_step: int | float | str | None = Field(
        None, description="This subset's data.token_warmup_step. Unset: data's."
    )

    @field_validator("token_warmup_step")
    @classmethod
    def _warmup(cls, v: int | float | str | None) -> int | str | None:
        return None if v is None else read_warmup(v)


# The caption tricks: [data]'s settings that a subset may set for itself (stages/training/captions.py draws them)
CAPTION_TRICKS = (
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "caption_separator",
    "secondary_separator",
    "enable_wildcard",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "caption_dropout_every_n_epochs",
    "token_warmup_min",
    "token_warmup_step",
)


def read_warmup(v: int | float | str) -> int | str:
    """token_warmup_step as steps (int) or a percentage (str); kohya's fraction below 1 becomes a percentage."""
    if isinstance(v, float):  # kohya: a value below 1 is a fraction of the training steps
        if not 0 <= v < 1:
            raise ValueError('must be a number of steps, a percentage such as "10%", or a fraction below 1')
        return f"{v * 100:g}%" if v else 0
    if isinstance(v, int):
        if v < 0:
            raise ValueError("must be 0 or more steps")
        return v
    if not re.fullmatch(r"\d+(\.\d+)?%", v) or float(v[:-1]) > 100:
        raise ValueError('must be a number of steps, a percentage such as "10%", or a fraction below 1')
    return v


class DataConfig(Section):
    """The training images and their captions (stage `caption`)."""

    images: Path = Field(
        Path("images"), description="Folder of training images (searched recursively), relative to the config file."
    )
    caption_extensions: list[str] = Field(
        [".txt", ".caption"], description="Sidecar caption files next to each image, tried in this order."
    )
    default_caption: str | None = Field(
        None, description="Caption for images with no (or an empty) sidecar file. Unset: such images are an error."
    )
    subsets: list[SubsetConfig] = Field(
        [],
        description="Folders with settings of their own ([[data.subsets]]: images, name, num_repeats, caption_prefix, "
        "caption_suffix, default_caption, alpha_mask, is_reg and the caption tricks), used instead of data.images. "
        "See docs/concepts.md#subsets-and-repeats.",
    )
    prior_loss_weight: float = Field(
        1.0,
        ge=0,
        description="The loss weight of regularization images (subsets with is_reg) in lora1, as kohya's "
        "prior_loss_weight; training images weigh 1. Read only when a subset has is_reg.",
    )
    caption_prefix: str = Field("", description="Text put before every caption, e.g. a trigger word and ', '.")
    caption_suffix: str = Field("", description="Text put after every caption.")
    on_unreadable: Literal["error", "skip"] = Field(
        "error",
        description="An image that cannot be decoded: error (the caption stage stops, listing every such file "
        "and why) or skip (it is left out, and listed in the caption artifact and in `pipeline status`).",
    )
    alpha_mask: bool = Field(
        False,
        description="Weight the training loss by each image's alpha channel (area-averaged to latent size; the "
        "loss is the mean over the mask). Images without alpha train everywhere. See docs/training.md.",
    )

    # Caption tricks (kohya's names and semantics; docs/training.md#captions). They change the string each training
    # slot sees: the stage that draws the slots (lora1, lora2, the transfer schedule) stores every drawn string.
    shuffle_caption: bool = Field(
        False, description="Shuffle the tags (the caption split at caption_separator) for every training slot."
    )
    keep_tokens: int = Field(
        0, ge=0, description="The first N tags stay in place (shuffle, tag dropout and warmup leave them alone)."
    )
    keep_tokens_separator: str = Field(
        "",
        description='A marker such as "|||": the tags before it stay first, those after a second one stay last, '
        "the ones between are shuffled. Where a caption holds it, it replaces keep_tokens.",
    )
    caption_separator: str = Field(",", min_length=1, description="What separates the tags of a caption.")
    secondary_separator: str = Field(
        "",
        description='A separator such as ";;;" that joins words into one tag for shuffling and dropout, then '
        "becomes caption_separator in the drawn caption.",
    )
    enable_wildcard: bool = Field(
        False,
        description="Each slot picks one option of every {a|b|c} in the caption ({{ and }} are literal braces) and "
        "one line of a multi-line caption file. Off: a multi-line caption uses its first line.",
    )
    caption_dropout_rate: float = Field(
        0.0, ge=0, le=1, description="Probability that a slot trains on the empty caption (the unconditional)."
    )
    caption_tag_dropout_rate: float = Field(
        0.0, ge=0, le=1, description="Probability that each tag (not the kept ones) is dropped from a slot's caption."
    )
    caption_dropout_every_n_epochs: int = Field(
        0, ge=0, description="Train every Nth epoch (counting from 1, as kohya does) on empty captions; 0: never."
    )
    token_warmup_min: int = Field(
        1, ge=0, description="Token warmup: the tags a caption starts with (with token_warmup_step)."
    )
    token_warmup_step: int | float | str = Field(
        0,
        description='Token warmup: tags are added one by one over this many optimizer steps (or "10%" of them; a '
        "fraction below 1 as kohya writes it), from token_warmup_min to all. 0: off.",
    )

    @field_validator("caption_extensions")
    @classmethod
    def _dotted(cls, v: list[str]) -> list[str]:
        if not v or any(not e.startswith(".") for e in v):
            raise ValueError('give at least one extension, each starting with a dot, e.g. [".txt"]')
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if self.subsets and "images" in self.model_fields_set:
            raise ValueError(
                "data.images and [[data.subsets]] both name training images: move data.images into a subset "
                "([[data.subsets]] images = ...), or remove the subsets"
            )
        if self.subsets and all(s.is_reg for s in self.subsets):
            raise ValueError(
                "[[data.subsets]]: every subset has is_reg = true; regularization images go with training images. "
                "Add a subset of training images (is_reg = false)"
            )
        names = [s.name or s.images.name for s in self.subsets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"[[data.subsets]]: the name {twice[0]!r} is used twice; give each subset its own name")
        return self

    @field_validator("token_warmup_step")
    @classmethod
    def _warmup(cls, v: int | float | str) -> int | str:
        return read_warmup(v)


class LatentsConfig(Section):
    """VAE encoding of the images (stage `latents`)."""

    resolution: int = Field(
        512,
        description="Images are resized (short side) and centre-cropped to this square size, in pixels. With "
        "buckets: the square whose area is every bucket's largest.",
    )
    buckets: Literal["off", "auto"] | list[tuple[int, int]] = Field(
        "off",
        description="Aspect-ratio buckets (docs/concepts.md#buckets). off: one square. auto: sizes of at most "
        "resolution² pixels, each side from min_bucket_reso to max_bucket_reso in steps of bucket_reso_steps, as "
        "kohya makes them. A list such as [[512, 768], [768, 512]]: exactly those [width, height] sizes. Each "
        "image goes to the size of nearest aspect ratio, is resized to cover it and cropped; a batch holds one size.",
    )
    min_bucket_reso: int = Field(256, ge=8, description='buckets = "auto": the shortest side of a bucket, pixels.')
    max_bucket_reso: int = Field(1024, ge=8, description='buckets = "auto": the longest side of a bucket, pixels.')
    bucket_reso_steps: int = Field(
        64, ge=8, description='buckets = "auto": bucket sides are multiples of this (64 suits every UNet).'
    )
    bucket_no_upscale: bool = Field(
        False,
        description='buckets = "auto": never enlarge an image; each gets a bucket of its own size (shrunk to '
        "resolution² pixels when larger), its sides cut down to multiples of bucket_reso_steps.",
    )
    crop: Literal["center", "random"] = Field(
        "center",
        description="Where the crop to the square or bucket lies. random: crop_variants crops per image, each at "
        "a position drawn from the image's digest and its number, are encoded once; every training slot picks "
        "one from its own seed (kohya re-crops on every load, which cannot be cached).",
    )
    crop_variants: int = Field(4, ge=1, le=64, description='crop = "random": crops encoded per image.')
    flip_aug: bool = Field(
        False,
        description="Also encode each image (each crop) mirrored left to right; every training slot takes one of "
        "the two at random (kohya's flip_aug). Do not use it when left and right matter (text, asymmetric logos).",
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v < 8 or v % 8:
            raise ValueError("must be a positive multiple of 8 (the VAE downsamples by 8)")
        return v

    @field_validator("buckets")
    @classmethod
    def _bucket_list(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError('give at least one [width, height] size, or "auto", or "off"')
            for w, h in v:
                if w < 8 or h < 8 or w % 8 or h % 8:
                    raise ValueError(f"[{w}, {h}]: each side must be a positive multiple of 8 (the VAE's factor)")
            if len(set(v)) < len(v):
                raise ValueError("a size is listed twice")
        return v


class TagConfig(Section):
    """Booru tags from a WD14 tagger (stage `tag`, SmilingWolf's WD v3 ONNX models; docs/concepts.md#tagging).

    The tag stage stores every tag's score per image; the thresholds and the rest below are applied by the caption
    stage, so changing them runs no model."""

    model: Path | None = Field(
        None,
        description="Folder of a WD14 tagger: model.onnx and selected_tags.csv, as in SmilingWolf/wd-*-tagger-v3 on "
        "Hugging Face (downloaded by you; nothing is fetched at run time). Unset: no tagging. Needs onnxruntime "
        "(the `tagger` extra).",
    )
    mode: Literal["fill-missing", "append", "replace"] = Field(
        "fill-missing",
        description="How tags meet sidecar captions: fill-missing (tags only for images without a caption), append "
        "(the caption's tags, then the new tags it lacks), replace (tags only; sidecar files are ignored).",
    )
    general_threshold: float = Field(0.35, gt=0, le=1, description="Score from which a general tag is kept.")
    character_threshold: float = Field(0.85, gt=0, le=1, description="Score from which a character tag is kept.")
    rating: Literal["off", "first", "last"] = Field(
        "off", description="Add the most likely rating tag (general, sensitive, ...) first or last."
    )
    character_tags_first: bool = Field(False, description="Character tags before the general ones.")
    character_tag_expand: bool = Field(
        False, description="A character tag name_(series) becomes two tags: name, series (kohya's option)."
    )
    always_first_tags: list[str] = Field(
        [], description='Tags moved to the front when present, in this order, e.g. ["1girl", "1boy"].'
    )
    replace_tags: dict[str, str] = Field(
        {},
        description='Tag renames applied to the tagger\'s names, e.g. {"1girl" = "woman"} (kohya\'s tag_replacement).',
    )
    remove_underscore: bool = Field(
        True,
        description="Underscores become spaces (long_hair -> long hair); tags of 3 characters or fewer (^_^) stay.",
    )
    undesired_tags: list[str] = Field([], description="Tags never written (as they read after the renames above).")
    batch_size: int = Field(8, ge=1, le=256, description="Images per tagger call.")
