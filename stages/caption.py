"""Stage `caption`: the caption table, one final caption string per image item.

Reads sidecar files (`.txt`, `.caption`), falls back to data.default_caption, adds prefix and suffix,
and checks that every image decodes, so a corrupt file is reported before any model is loaded.
"""

from __future__ import annotations

from pydantic import BaseModel

from core.errors import DataError
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.dataset import load_image


class CaptionParams(BaseModel):
    caption_extensions: list[str]
    default_caption: str | None
    caption_prefix: str
    caption_suffix: str


class CaptionStage(Stage):
    name = "caption"
    IMPL_VERSION = 1
    description = "caption table from sidecar files"

    def params(self, env: PlanEnv) -> CaptionParams:
        d = env.config.data
        return CaptionParams(
            caption_extensions=d.caption_extensions,
            default_caption=d.default_caption,
            caption_prefix=d.caption_prefix,
            caption_suffix=d.caption_suffix,
        )

    def inputs(self, env: PlanEnv) -> dict:
        return {
            "images": {e.relpath: e.digest for e in env.images},
            "captions": {e.relpath: e.caption_digest for e in env.images if e.caption_digest},
        }

    def contract(self, env: PlanEnv, params: CaptionParams) -> dict:
        from cache.keys import canonical_json, sha256_text

        return {"dataset": sha256_text(canonical_json(self.inputs(env))), "captions": params.model_dump()}

    def run(self, ctx: StageContext) -> StageResult:
        p: CaptionParams = ctx.params
        items, problems = [], []
        for entry in ctx.env.images:
            try:
                load_image(entry.path, ctx.runtime.max_image_pixels)
            except DataError as e:
                problems.append(str(e))
                continue
            text = ""
            if entry.caption_path is not None:
                try:
                    text = entry.caption_path.read_text(encoding="utf-8").strip()
                except UnicodeDecodeError:
                    problems.append(f"{entry.caption_path}: not UTF-8 text. Re-save it as UTF-8.")
                    continue
            if not text:
                if p.default_caption is None:
                    where = f"{entry.caption_path} is empty" if entry.caption_path else "has no caption file"
                    problems.append(
                        f"{entry.path}: {where}. Write a caption next to it ({entry.path.stem}.txt) "
                        f"or set data.default_caption."
                    )
                    continue
                text = p.default_caption
            caption = f"{p.caption_prefix}{text}{p.caption_suffix}"
            items.append({"id": entry.item_id, "path": entry.relpath, "digest": entry.digest, "caption": caption})
        if problems:
            more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DataError(f"{len(problems)} problem(s) in the data set:\n" + "\n".join(problems[:10]) + more)
        return StageResult(record={"items": items}, summary=f"{len(items)} captions")
