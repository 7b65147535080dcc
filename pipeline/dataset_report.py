"""`pipeline inspect dataset`: what the data folder holds, before any model is loaded or any stage runs.

Reads image headers (size, mode, frames) and the sidecar captions only, so it is quick on tens of thousands of
files; the contact sheets (--out) decode thumbnails.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from stages.base import PlanEnv

SHEET_CELL = 128  # pixels per thumbnail
SHEET_COLUMNS = 8
SHEET_ROWS = 8
LABEL = 12
# aspect-ratio groups (width / height) for the table and the sheets when latents.buckets is off
RATIOS = [("tall (< 3:4)", 0.0, 0.74), ("3:4 .. 1:1", 0.74, 0.99), ("square", 0.99, 1.01), ("1:1 .. 4:3", 1.01, 1.34)]
RATIOS += [("wide (> 4:3)", 1.34, float("inf"))]


def _ratio_group(w: int, h: int) -> str:
    r = w / h
    return next(name for name, lo, hi in RATIOS if lo <= r < hi)


def dataset_report(env: PlanEnv) -> dict:
    """Counts, sizes, formats, aspect ratios (or, with latents.buckets on, the bucket of every image), the images
    the crop will enlarge, captions (missing, length in tags, the most frequent tags), and duplicates by content."""
    from PIL import Image

    from stages.buckets import ViewSpec, bucket_spec
    from stages.dataset import image_suffixes

    image_suffixes()  # registers the plugin formats this installation reads
    data = env.config.data
    resolution = env.config.latents.resolution
    entries = env.images
    rows, unreadable = [], []
    for e in entries:
        try:
            with Image.open(e.path) as im:
                turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF: shown a quarter turn round
                rows.append(
                    {
                        "path": e.key,
                        "file": e.path,
                        "size": im.size[::-1] if turned else im.size,  # as viewers (and training) show it
                        "format": im.format or "?",
                        "mode": im.mode,
                        "frames": int(getattr(im, "n_frames", 1)),
                    }
                )
        except Exception as err:  # Pillow raises many types for broken files
            unreadable.append({"path": e.key, "reason": f"{type(err).__name__}: {err}"[:200]})
    from stages.caption import CaptionStage

    settings = CaptionStage().params(env).settings  # data's caption settings, or the image's subset's
    captions = {}
    missing = []
    for e in entries:
        prefix, suffix, default, _ = settings(e.subset)
        text = ""
        if e.caption_path is not None:
            try:
                text = e.caption_path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                text = ""
        if not text:
            missing.append(e.key)
            text = default or ""
        captions[e.key] = f"{prefix}{text}{suffix}" if text else ""
    tag_lists = [[t.strip() for t in c.split(data.caption_separator) if t.strip()] for c in captions.values() if c]
    tags = Counter(t.lower() for tl in tag_lists for t in set(tl))
    by_digest: dict[str, list[str]] = {}
    for e in entries:
        by_digest.setdefault(e.digest, []).append(e.key)
    areas = sorted(rows, key=lambda r: (r["size"][0] * r["size"][1], r["path"]))
    buckets = bucket_spec(env.config.latents)
    views = ViewSpec(resolution, buckets)
    for r in rows:
        if buckets is not None:
            placement = views.target(*r["size"])
            r["bucket"] = f"{placement.size[0]}x{placement.size[1]}"
            r["factor"] = placement.resized[0] / r["size"][0]
        else:
            r["factor"] = resolution / min(r["size"])
    small = [r for r in rows if r["factor"] > 1]
    over = [r for r in rows if r["size"][0] * r["size"][1] > env.config.runtime.max_image_pixels]
    groups = Counter(_ratio_group(*r["size"]) for r in rows)
    lengths = [len(t) for t in tag_lists]
    report = {
        "stage": "dataset",
        "folder": ", ".join(str(env.image_root(s)) for s in dict.fromkeys(e.subset for e in entries)),
        "images": len(entries),
        "unreadable": unreadable,
        "formats": dict(Counter(f"{r['format']} {r['mode']}" for r in rows).most_common()),
        "multi_frame": [r["path"] for r in rows if r["frames"] > 1],
        "smallest": _size_row(areas[0]) if areas else None,
        "largest": _size_row(areas[-1]) if areas else None,
        "aspect_ratios": [{"group": name, "images": groups.get(name, 0)} for name, _, _ in RATIOS],
        "resolution": resolution,
        "enlarged": [_size_row(r) for r in sorted(small, key=lambda r: (-r["factor"], r["path"]))],
        "over_max_pixels": [_size_row(r) for r in over],
        "captions": {
            "missing": missing,
            "default_caption": data.default_caption,
            "tag_mode": env.config.tag.mode if env.config.tag.model is not None else None,
            "tags_min": min(lengths) if lengths else 0,
            "tags_median": statistics.median(lengths) if lengths else 0,
            "tags_max": max(lengths) if lengths else 0,
            "distinct": len(set(captions.values())),
        },
        "top_tags": [{"tag": t, "images": n} for t, n in tags.most_common(20)],
        "duplicates": [sorted(paths) for paths in by_digest.values() if len(paths) > 1],
        "_rows": rows,
    }
    if buckets is not None:
        report["buckets"] = _bucket_table(rows)
    return report


def _bucket_table(rows: list[dict]) -> list[dict]:
    """Per bucket, most images first: its images, how many the crop enlarges, its smallest and largest image."""
    table = []
    for bucket in sorted({r["bucket"] for r in rows}):
        members = sorted((r for r in rows if r["bucket"] == bucket), key=lambda r: r["size"][0] * r["size"][1])
        table.append(
            {
                "bucket": bucket,
                "images": len(members),
                "enlarged": sum(r["factor"] > 1 for r in members),
                "smallest": _size_row(members[0])["size"],
                "largest": _size_row(members[-1])["size"],
            }
        )
    return sorted(table, key=lambda b: (-b["images"], b["bucket"]))


def _size_row(r: dict) -> dict:
    row = {"path": r["path"], "size": f"{r['size'][0]}x{r['size'][1]}"}
    return {**row, "bucket": r["bucket"]} if "bucket" in r else row


def dataset_sheets(env: PlanEnv, report: dict, out: Path) -> list[str]:
    """Contact sheets per bucket (with latents.buckets) or aspect-ratio group: up to 64 thumbnails each (as the crop
    would show them is the latents sheet's job; these are the whole images, letterboxed), labelled with their file
    names."""
    from PIL import Image, ImageDraw

    from core.errors import DataError
    from stages.dataset import load_image

    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "buckets" in report:
        groups = [(b["bucket"], [r for r in report["_rows"] if r["bucket"] == b["bucket"]]) for b in report["buckets"]]
    else:
        groups = [(name, [r for r in report["_rows"] if _ratio_group(*r["size"]) == name]) for name, _, _ in RATIOS]
    for name, members in groups:
        for page in range(0, len(members), SHEET_COLUMNS * SHEET_ROWS):
            chunk = members[page : page + SHEET_COLUMNS * SHEET_ROWS]
            cols = min(SHEET_COLUMNS, len(chunk))
            lines = -(-len(chunk) // cols)
            sheet = Image.new("RGB", (cols * SHEET_CELL, lines * (SHEET_CELL + LABEL)), "white")
            draw = ImageDraw.Draw(sheet)
            for i, r in enumerate(chunk):
                x, y = (i % cols) * SHEET_CELL, (i // cols) * (SHEET_CELL + LABEL)
                try:
                    im = load_image(r["file"], env.config.runtime.max_image_pixels)
                except DataError:
                    draw.text((x + 2, y + LABEL + 2), "unreadable", fill="red")
                    continue
                im.thumbnail((SHEET_CELL, SHEET_CELL))
                sheet.paste(im, (x + (SHEET_CELL - im.width) // 2, y + LABEL + (SHEET_CELL - im.height) // 2))
                draw.text((x + 2, y), Path(r["path"]).name[:20], fill="black")
            slug = name.split(" ")[0].replace(":", "x").replace(".", "")  # "wide", "1x1", "512x768"
            path = out / f"dataset-{slug}-{page // (SHEET_COLUMNS * SHEET_ROWS) + 1}.png"
            sheet.save(path)
            written.append(str(path))
    return written
