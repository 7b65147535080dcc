"""Preview prompts and the picture they make: each prompt with its own settings (kohya's sample-prompt options or a
table), rendered from its own seed, laid out as labelled cells of at least 256 px."""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.errors import ConfigError

MIN_CELL = 256  # the least height a preview is shown at (small ones are scaled up, pixel for pixel)
KOHYA_FLAGS = {"n": "negative_prompt", "w": "width", "h": "height", "s": "steps", "l": "guidance_scale", "d": "seed"}


@dataclass(frozen=True)
class PreviewSpec:
    prompt: str
    negative_prompt: str
    seed: int
    width: int | None  # None: the model's native resolution
    height: int | None
    steps: int
    guidance_scale: float

    def label(self, size: tuple[int, int]) -> str:
        """What the picture says under the image: the prompt, its negative, seed, steps, guidance and size."""
        neg = f" | not: {self.negative_prompt}" if self.negative_prompt else ""
        settings = f"seed {self.seed} · {self.steps} steps · cfg {self.guidance_scale:g} · {size[0]}x{size[1]}"
        return f"{self.prompt}{neg}\n{settings}"


def parse_kohya_prompt(line: str) -> dict:
    """A kohya sample-prompt line (`a cat --n blurry --w 512 --h 768 --s 28 --l 5.5 --d 42`) -> its fields."""
    head, *parts = line.split(" --")
    fields: dict = {"prompt": head.strip()}
    for part in parts:
        flag, _, value = part.partition(" ")
        name = KOHYA_FLAGS.get(flag.strip())
        if name is None:
            raise ConfigError(
                f"runtime.preview.prompts: {line!r} has the option --{flag.strip()}, which is not one of kohya's "
                f"sample-prompt options here: --n (negative), --w, --h, --s (steps), --l (guidance), --d (seed)."
            )
        value = value.strip()
        try:
            fields[name] = (
                value if name == "negative_prompt" else (float(value) if name == "guidance_scale" else int(value))
            )
        except ValueError:
            raise ConfigError(
                f"runtime.preview.prompts: --{flag.strip()} {value!r} in {line!r} is not a number."
            ) from None
        if name in ("width", "height") and (fields[name] < 16 or fields[name] % 16):
            raise ConfigError(f"runtime.preview.prompts: --{flag.strip()} {value} in {line!r}: use a multiple of 16.")
    return fields


def preview_specs(preview, fallback: list[str]) -> list[PreviewSpec]:
    """runtime.preview's prompts (or the fallback captions) with every unset setting taken from runtime.preview."""
    specs = []
    for entry in preview.prompts or fallback:
        own = parse_kohya_prompt(entry) if isinstance(entry, str) else entry.model_dump(exclude_none=True)
        specs.append(
            PreviewSpec(
                prompt=own["prompt"],
                negative_prompt=own.get("negative_prompt", preview.negative_prompt),
                seed=own.get("seed", preview.seed),
                width=own.get("width", preview.width),
                height=own.get("height", preview.height),
                steps=own.get("steps", preview.steps),
                guidance_scale=own.get("guidance_scale", preview.guidance_scale),
            )
        )
    return specs


def preview_every(preview, steps: int) -> int:
    """How often a stage of `steps` steps renders: runtime.preview.every, or a quarter of the steps when unset."""
    if preview is None:
        return 0
    return preview.every if preview.every is not None else max(1, math.ceil(steps / 4))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: one small bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines[:6]


def labelled_row(images, labels: list[str], title: str = ""):
    """Images side by side, each shown at least MIN_CELL px high (scaled up pixel for pixel when smaller), with its
    label written under it and an optional title above the row. -> (sheet, per image its [x, y, scale])."""
    from PIL import Image, ImageDraw

    cells = [_scaled(im) for im in images]
    font, pad = _font(14), 8
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, label, font, cell.width - 2 * pad) for cell, label in zip(cells, labels, strict=True)]
    line_h = 18
    label_h = pad * 2 + line_h * max(len(w) for w in wrapped)
    title_h = (line_h + 2 * pad) if title else 0
    width = sum(c.width for c in cells) + pad * (len(cells) + 1)
    height = title_h + max(c.height for c in cells) + label_h + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    x, under = pad, title_h + max(c.height for c in cells) + pad  # every label on one line under the tallest
    boxes = []
    for cell, im, lines in zip(cells, images, wrapped, strict=True):
        sheet.paste(cell, (x, title_h))
        boxes.append([x, title_h, cell.height // im.height])
        for i, line in enumerate(lines):
            draw.text((x + pad // 2, under + i * line_h), line, fill="black", font=font)
        x += cell.width + pad
    return sheet, boxes


def _scaled(im):
    from PIL import Image

    scale = max(1, math.ceil(MIN_CELL / im.height))
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def labelled_grid(rows: list[list], row_labels: list[str], column_labels: list[str], title: str = ""):
    """A grid of images (rows x columns), each cell at least MIN_CELL px high, with a label left of every row and
    above every column (and a title above all). -> (sheet, per row and column the image's [x, y, scale]: it lies at
    (x, y), each of its pixels shown as scale x scale)."""
    from PIL import Image, ImageDraw

    cells = [[_scaled(im) for im in row] for row in rows]
    cell_w = max(c.width for row in cells for c in row)
    cell_h = max(c.height for row in cells for c in row)
    font, pad, line_h = _font(14), 8, 18
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 200 if any(row_labels) else 0
    wrapped_rows = [_wrap(probe, label, font, left - 2 * pad) if left else [] for label in row_labels]
    wrapped_cols = [_wrap(probe, label, font, cell_w - 2 * pad) for label in column_labels]
    head = pad * 2 + line_h * max((len(w) for w in wrapped_cols), default=0)
    title_h = (line_h + 2 * pad) if title else 0
    width = left + len(column_labels) * (cell_w + pad) + pad
    height = title_h + head + len(rows) * (cell_h + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for j, lines in enumerate(wrapped_cols):
        for k, line in enumerate(lines):
            draw.text((left + pad + j * (cell_w + pad), title_h + pad + k * line_h), line, fill="black", font=font)
    boxes = []
    for i, row in enumerate(cells):
        y = title_h + head + i * (cell_h + pad)
        for k, line in enumerate(wrapped_rows[i] if left else []):
            draw.text((pad, y + k * line_h), line, fill="black", font=font)
        boxes.append([])
        for j, cell in enumerate(row):
            x = left + pad + j * (cell_w + pad)
            sheet.paste(cell, (x, y))
            boxes[-1].append([x, y, cell.height // rows[i][j].height])
    return sheet, boxes


def heat_colours(values):
    """A black-red-yellow-white ramp of values in [0, 1] -> uint8 RGB array."""
    import numpy as np

    v = np.clip(values, 0, 1)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def heatmap(values, size: tuple[int, int]):
    """values in [0, 1] as heat_colours, scaled up pixel for pixel to size (width, height)."""
    from PIL import Image

    return Image.fromarray(heat_colours(values)).resize(size, Image.NEAREST)


def with_colour_scale(sheet, top: float, what: str):
    """The sheet with a colour scale under it: the heatmaps' ramp from 0 to `top` (the value shown as white)."""
    import numpy as np
    from PIL import Image, ImageDraw

    font, pad, bar_h = _font(14), 8, 16
    bar_w = min(sheet.width - 2 * pad, 512)
    out = Image.new("RGB", (sheet.width, sheet.height + bar_h + 3 * pad + 18), "white")
    out.paste(sheet, (0, 0))
    ramp = heat_colours(np.linspace(0, 1, bar_w)[None, :].repeat(bar_h, axis=0))
    y = sheet.height + pad
    out.paste(Image.fromarray(ramp), (pad, y))
    draw = ImageDraw.Draw(out)
    draw.rectangle((pad - 1, y - 1, pad + bar_w, y + bar_h), outline="black")
    text_y = y + bar_h + 4
    draw.text((pad, text_y), "0", fill="black", font=font)
    right = f"{top:.3g}"
    draw.text((pad + bar_w - draw.textlength(right, font=font), text_y), right, fill="black", font=font)
    middle = f"{what} (black -> red -> yellow -> white)"
    draw.text((pad + (bar_w - draw.textlength(middle, font=font)) / 2, text_y), middle, fill="black", font=font)
    return out
