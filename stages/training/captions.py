"""Caption tricks (data.shuffle_caption and the rest, kohya's semantics): the string each training slot sees.

A drawn caption is a different string from the written one, so it is drawn before training, per slot, from
(seed, stream, micro-step, slot) alone, and the stage that draws (lora1, lora2, the transfer schedule) stores
every drawn string and encodes each distinct one once through the text pool, which is keyed by the string. Kohya
caches the raw caption instead, which silently turns shuffling off when text-encoder outputs are cached; here a
resumed run and the two phases of delta transfer see the same strings, and cached embeddings stay correct.
"""

from __future__ import annotations

import math
import random
import re

from pydantic import BaseModel

from stages.training.sampling import BatchOrder, derive_seed


class CaptionDraw(BaseModel):
    """The caption settings a drawing stage hashes into its key (None when no setting changes a caption)."""

    shuffle: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    separator: str = ","
    secondary_separator: str = ""
    wildcards: bool = False
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    warmup_min: int = 1
    warmup_steps: int = 0  # resolved against the drawing stage's optimizer steps

    @property
    def splits_tags(self) -> bool:
        return self.shuffle or self.warmup_steps > 0 or self.tag_dropout_rate > 0


def caption_draw(data, steps: int, subset=None) -> CaptionDraw | None:
    """The data section's caption tricks (a subset's own where it sets them) for a stage of `steps` optimizer
    steps; None when none is on, so that a stage without them keeps its key. Settings only read with another one
    (keep_tokens without a shuffle, dropout or warmup) are left out until that one is on."""
    from pipeline.config_data import CAPTION_TRICKS
    from stages.training.optim import steps_of

    s = {k: getattr(data, k) for k in CAPTION_TRICKS}
    if subset is not None:
        s |= {k: getattr(subset, k) for k in CAPTION_TRICKS if getattr(subset, k) is not None}
    warmup = steps_of(s["token_warmup_step"], steps)
    draw = CaptionDraw(
        shuffle=s["shuffle_caption"],
        separator=s["caption_separator"],
        secondary_separator=s["secondary_separator"],
        wildcards=s["enable_wildcard"],
        dropout_rate=s["caption_dropout_rate"],
        tag_dropout_rate=s["caption_tag_dropout_rate"],
        dropout_every_n_epochs=s["caption_dropout_every_n_epochs"],
        warmup_steps=warmup,
    )
    if draw.splits_tags:
        draw.keep_tokens, draw.keep_tokens_separator = s["keep_tokens"], s["keep_tokens_separator"]
        if warmup:
            draw.warmup_min = s["token_warmup_min"]
    elif not (draw.secondary_separator or draw.wildcards or draw.dropout_rate or draw.dropout_every_n_epochs):
        return None
    if not draw.splits_tags:
        draw.separator = draw.separator if draw.secondary_separator else ","  # read only to replace the secondary one
    return draw


def subset_caption_draws(data, steps: int) -> dict[str, CaptionDraw | None] | None:
    """{subset name: its caption tricks} for the [[data.subsets]] that set any of their own (data's merged under
    them; None: that subset's captions are used as written); None when no subset does, so keys stay as they were."""
    from pipeline.config_data import CAPTION_TRICKS

    own = {
        s.name or s.images.name: caption_draw(data, steps, s)
        for s in data.subsets
        if any(getattr(s, k) is not None for k in CAPTION_TRICKS)
    }
    return own or None


class CaptionTricks:
    """Which caption tricks each item's slots draw with: its subset's own (subset_caption_draws), or data's."""

    def __init__(self, default: CaptionDraw | None, subsets: dict[str, CaptionDraw | None] | None = None):
        self.default, self.subsets = default, subsets or {}

    def of(self, item: dict) -> CaptionDraw | None:
        subset = item.get("subset")
        return self.subsets[subset] if subset in self.subsets else self.default

    def all(self) -> list[CaptionDraw]:
        return [d for d in (self.default, *self.subsets.values()) if d is not None]


def caption_tricks(params) -> CaptionTricks | None:
    """A drawing stage's tricks from its params (captions, subset_captions); None when no caption changes."""
    tricks = CaptionTricks(params.captions, params.subset_captions)
    return tricks if tricks.all() else None


_WILDCARD = re.compile(r"\{([^}]+)\}")


def draw_caption(caption: str, spec: CaptionDraw | None, rng: random.Random, epoch: int, step: int) -> str:
    """One slot's caption: kohya's process_caption (dropout, wildcards, keep/warmup/shuffle/tag dropout,
    secondary separator) with its randomness from `rng`. epoch counts from 1; step is the optimizer step. No spec
    (a subset whose tricks are off): the caption as written."""
    if spec is None:
        return caption
    if spec.dropout_rate > 0 and rng.random() < spec.dropout_rate:
        return ""
    if spec.dropout_every_n_epochs and epoch % spec.dropout_every_n_epochs == 0:
        return ""
    if spec.wildcards:
        lines = caption.split("\n")
        caption = rng.choice(lines) if len(lines) > 1 else caption
        left, right = "\x00L", "\x00R"  # {{ and }} are literal braces
        caption = caption.replace("{{", left).replace("}}", right)
        caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
        caption = caption.replace(left, "{").replace(right, "}")
    if spec.splits_tags:
        caption = _draw_tags(caption, spec, rng, step)
    if spec.secondary_separator:
        caption = caption.replace(spec.secondary_separator, spec.separator)
    return caption


def _draw_tags(caption: str, spec: CaptionDraw, rng: random.Random, step: int) -> str:
    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(spec.separator) if t.strip()]

    marker, suffix = spec.keep_tokens_separator, []
    if marker and marker in caption:
        head, flex_part = caption.split(marker, 1)
        if marker in flex_part:
            flex_part, tail = flex_part.split(marker, 1)
            suffix = tags(tail)
        fixed, flex = tags(head), tags(flex_part)
    else:
        flex = tags(caption)
        fixed, flex = flex[: spec.keep_tokens], flex[spec.keep_tokens :]
    if spec.warmup_steps and step < spec.warmup_steps:
        n = math.floor(step * (len(flex) - spec.warmup_min) / spec.warmup_steps) + spec.warmup_min
        flex = flex[: max(n, 0)]
    if spec.shuffle:
        rng.shuffle(flex)
    if spec.tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= spec.tag_dropout_rate]
    joiner = ", " if spec.separator == "," else f"{spec.separator} "
    return joiner.join(fixed + flex + suffix)


def slot_rng(stream: str, seed: int, k: int, slot: int) -> random.Random:
    """The caption randomness of one slot: its own, so drawing captions changes no item, timestep or noise."""
    return random.Random(derive_seed("caption", stream, seed, k, slot))


class DrawnCaptions:
    """The captions of every training slot, in micro-step order: the distinct strings and each slot's row."""

    def __init__(self, strings: list[str], slots: list[int], batch_size: int):
        self.strings, self.slots, self.batch_size = strings, slots, batch_size

    def to_json(self) -> dict:
        b = self.batch_size
        return {"strings": self.strings, "micro_steps": [self.slots[i : i + b] for i in range(0, len(self.slots), b)]}


def draw_slots(
    spec: CaptionDraw | list[CaptionDraw | None],
    captions: list[str],
    seed: int,
    stream: str,
    batch_size: int,
    grad_accum: int,
    steps: int,
    order: BatchOrder | None = None,
) -> DrawnCaptions:
    """The caption of every slot of a DiffusionBatches run (items from its BatchOrder: by default the plain one of
    (seed, batch size)); captions are the items' written captions in item order. Epochs count passes over the
    items, from 1. spec: one for every item, or each item's own (CaptionTricks.of)."""
    specs = spec if isinstance(spec, list) else [spec] * len(captions)
    order = order or BatchOrder(seed, batch_size, len(captions))
    rows: dict[str, int] = {}
    slots = []
    for k in range(steps * grad_accum):
        for slot, i in enumerate(order.batch(k)):
            rng = slot_rng(stream, seed, k, slot)
            text = draw_caption(captions[i], specs[i], rng, order.epoch(k, slot), k // grad_accum)
            slots.append(rows.setdefault(text, len(rows)))
    return DrawnCaptions(list(rows), slots, batch_size)
