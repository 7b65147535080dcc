"""Stage `caption`: the caption table, one final caption string per image item.

Reads sidecar files (`.txt`, `.caption`), with tag.model merges in the tag stage's tags (thresholds and the other
[tag] rules are applied here, stages/tagging.py), falls back to data.default_caption, adds prefix and suffix, and
checks that every image decodes, so a corrupt file is reported before any model is loaded.
"""

from __future__ import annotations

from cache.store import Manifest
from core.errors import DataError
from stages.base import PlanEnv, Stage, StageContext, StageResult
from stages.dataset import check_image
from stages.tagging import TagRules
from stages.training.params import KeyedParams

TAG_ROWS_PER_READ = 256  # scores are 40 KiB an image for a real tagger: read them in bounded batches


class CaptionParams(KeyedParams):
    """Without [[data.subsets]] the params (and the key) are what they were before subsets existed."""

    UNKEYED_WHEN_NONE = ("subsets", "tagging")

    caption_extensions: list[str]
    default_caption: str | None
    caption_prefix: str
    caption_suffix: str
    # per subset, by name: num_repeats and its caption settings (None: data's). Its folder enters as content.
    subsets: dict[str, dict] | None = None
    tagging: TagRules | None = None  # with tag.model: how the tag stage's scores become tags

    def settings(self, subset: str | None) -> tuple[str, str, str | None, int]:
        """(prefix, suffix, default caption, repeats) of an image of this subset."""
        own = (self.subsets or {}).get(subset, {})

        def pick(name: str):
            return own[name] if own.get(name) is not None else getattr(self, name)

        return pick("caption_prefix"), pick("caption_suffix"), pick("default_caption"), own.get("num_repeats", 1)


class SkippingCaptionParams(CaptionParams):
    """data.on_unreadable = "skip": keyed, because its table can lack images that "error" would stop on (a table
    made under "error" holds every image, so that setting needs no key of its own)."""

    on_unreadable: str = "skip"


class CaptionStage(Stage):
    name = "caption"
    IMPL_VERSION = 1
    upstream = ("tag",)
    optional_upstream = ("tag",)  # present with tag.model
    description = "caption table from sidecar files"

    def params(self, env: PlanEnv) -> CaptionParams:
        d = env.config.data
        subsets = None
        if d.subsets:
            fields = ("num_repeats", "caption_prefix", "caption_suffix", "default_caption")
            subsets = {s.name or s.images.name: s.model_dump(include=set(fields)) for s in d.subsets}
            for s in d.subsets:
                if s.is_reg:  # keyed only when set: the tables of subsets made before is_reg existed keep their key
                    subsets[s.name or s.images.name]["is_reg"] = True
        t = env.config.tag
        tagging = None
        if t.model is not None:
            tagging = TagRules(
                **t.model_dump(include=set(TagRules.model_fields) - {"separator"}), separator=d.caption_separator
            )
        return (SkippingCaptionParams if d.on_unreadable == "skip" else CaptionParams)(
            caption_extensions=d.caption_extensions,
            default_caption=d.default_caption,
            caption_prefix=d.caption_prefix,
            caption_suffix=d.caption_suffix,
            subsets=subsets,
            tagging=tagging,
        )

    def inputs(self, env: PlanEnv) -> dict:
        return {
            "images": {e.key: e.digest for e in env.images},
            "captions": {e.key: e.caption_digest for e in env.images if e.caption_digest},
        }

    def contract(self, env: PlanEnv, params: CaptionParams) -> dict:
        from cache.keys import canonical_json, sha256_text

        return {"dataset": sha256_text(canonical_json(self.inputs(env))), "captions": params.model_dump()}

    def run(self, ctx: StageContext) -> StageResult:
        p: CaptionParams = ctx.params
        skip = isinstance(p, SkippingCaptionParams)
        items, problems, skipped, multi_frame = [], [], [], []
        tagged = TaggedCaptions(ctx, p.tagging) if p.tagging is not None else None
        for entry in ctx.env.images:
            try:
                frames = check_image(entry.path, ctx.runtime.max_image_pixels)
            except DataError as e:
                if skip:
                    skipped.append({"path": entry.key, "reason": str(e).removeprefix(f"{entry.path}: ")})
                else:
                    problems.append(str(e))
                continue
            if frames > 1:
                multi_frame.append({"path": entry.key, "frames": frames})
            text = ""
            if entry.caption_path is not None:
                try:
                    text = entry.caption_path.read_text(encoding="utf-8").strip()
                except UnicodeDecodeError:
                    problems.append(f"{entry.caption_path}: not UTF-8 text. Re-save it as UTF-8.")
                    continue
            prefix, suffix, default, repeats = p.settings(entry.subset)
            if tagged is not None:
                text = tagged.caption(entry.digest, text)
            if not text:
                if default is None:
                    where = f"{entry.caption_path} is empty" if entry.caption_path else "has no caption file"
                    if entry.caption_path and tagged is not None and p.tagging.mode == "replace":
                        where = f"{entry.caption_path} is ignored (tag.mode = replace)"
                    if tagged is not None:
                        where += " and the tagger gave it no tag above tag.general_threshold / character_threshold"
                    setting = "data.default_caption" + (" (or its subset's default_caption)" if entry.subset else "")
                    problems.append(
                        f"{entry.path}: {where}. Write a caption next to it ({entry.path.stem}.txt) or set {setting}."
                    )
                    continue
                text = default
            caption = prefix + text + suffix
            item = {"id": entry.item_id, "path": entry.relpath, "digest": entry.digest, "caption": caption}
            if entry.subset is not None:
                item.update(subset=entry.subset, repeats=repeats)
                if (p.subsets or {}).get(entry.subset, {}).get("is_reg"):
                    item["reg"] = True
            items.append(item)
        if problems:
            more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
            fix = '\nOr set data.on_unreadable = "skip" to train without the unreadable images.'
            unreadable = any("cannot decode" in m or "max_image_pixels" in m for m in problems)
            raise DataError(
                f"{len(problems)} problem(s) in the data set:\n" + "\n".join(problems[:10]) + more + fix * unreadable
            )
        if not items:
            raise DataError(f"data.images: none of the {len(skipped)} images could be read: " + _reasons(skipped))
        regularization = None
        if any(i.get("reg") for i in items):
            items, regularization = balance_regularization(items)
        record = {"items": items}
        if regularization is not None:
            record["regularization"] = regularization
            ctx.log(f"caption: {self.regularization_line(record['regularization'])}")
        if tagged is not None:
            record["tagging"] = tagged.summary()
            ctx.log(f"caption: {self.tagging_line(record['tagging'])}")
        if skipped:
            record["skipped"] = skipped
        if multi_frame:
            record["multi_frame"] = multi_frame
        for note in self.notes_of(record):
            ctx.log(f"caption: {note}")
        summary = f"{len(items)} captions" + (f", {len(skipped)} unreadable skipped" if skipped else "")
        return StageResult(record=record, summary=summary)

    def artifact_notes(self, manifest: Manifest) -> list[str]:
        return self.notes_of(manifest.record)

    @staticmethod
    def regularization_line(r: dict) -> str:
        line = (
            f"{r['images']} regularization images, {r['copies']} copies an epoch against {r['training_copies']} "
            f"copies of training images"
        )
        if r["unused"]:
            listed = ", ".join(r["unused"][:5]) + (f" and {len(r['unused']) - 5} more" if len(r["unused"]) > 5 else "")
            line += f"; {len(r['unused'])} not used (more than the training images need, as kohya does): {listed}"
        return line

    @staticmethod
    def tagging_line(t: dict) -> str:
        parts = {"from_tags": "{} captions from tags", "extended": "{} extended with tags", "kept": "{} kept"}
        top = ", ".join(f"{tag} ({n})" for tag, n in list(t["top_tags"].items())[:10])
        done = "; ".join(text.format(t[k]) for k, text in parts.items() if t[k])
        return done + (f". Most frequent tags: {top}" if top else "")

    @staticmethod
    def notes_of(record: dict) -> list[str]:
        notes = []
        if record.get("skipped"):
            notes.append(f"{len(record['skipped'])} unreadable image(s) skipped: " + _reasons(record["skipped"]))
        if record.get("multi_frame"):
            files = ", ".join(f"{m['path']} ({m['frames']} frames)" for m in record["multi_frame"][:5])
            notes.append(f"multi-frame files train on their first frame: {files}")
        return notes


def _reasons(skipped: list[dict]) -> str:
    listed = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:5])
    return listed + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")


def balance_regularization(items: list[dict]) -> tuple[list[dict], dict]:
    """kohya's rule for regularization images: an epoch holds as many copies of them as of training images (N, the
    training images' repeats summed). In their order, each reg image first counts its own num_repeats; while fewer
    than N, each in turn gets one more; the images past N in the first round are not used. Each image keeps its own
    subset's settings (kohya's older code gave every reg image the last subset's). -> (items, summary)."""
    n_train = sum(i.get("repeats", 1) for i in items if not i.get("reg"))
    reg = [i for i in items if i.get("reg")]
    repeats: dict[str, int] = {}
    n, first = 0, True
    while n < n_train:
        for item in reg:
            if first:
                repeats[item["id"]] = item.get("repeats", 1)
                n += repeats[item["id"]]
            else:
                repeats[item["id"]] += 1
                n += 1
            if n >= n_train:
                break
        first = False
    kept = []
    for item in items:
        if item.get("reg"):
            if item["id"] not in repeats:
                continue
            item = {**item, "repeats": repeats[item["id"]]}
        kept.append(item)
    unused = [f"{i['subset']}/{i['path']}" for i in reg if i["id"] not in repeats]
    summary = {"images": len(reg), "copies": n, "training_copies": n_train, "unused": unused}
    return kept, summary


class TaggedCaptions:
    """The tag stage's scores as captions under the [tag] rules, read TAG_ROWS_PER_READ images at a time."""

    def __init__(self, ctx: StageContext, rules: TagRules):
        record = ctx.upstream["tag"].record
        self.rules, self.store, self.record = rules, ctx.store, record
        self.tags = list(zip(record["tags"], record["categories"], strict=True))
        self.names = rules.names(self.tags)
        self.order = [e.digest for e in ctx.env.images]
        self.cache: dict[str, list[str]] = {}
        self.counts = {"from_tags": 0, "extended": 0, "kept": 0}
        self.freq: dict[str, int] = {}

    def tags_of(self, digest: str) -> list[str]:
        if digest not in self.cache:
            from stages.pools import read_rows

            self.cache.clear()
            start = self.order.index(digest)
            batch = [d for d in dict.fromkeys(self.order[start:]) if d in self.record["items"]][:TAG_ROWS_PER_READ]
            rows = read_rows(self.store.pool(self.record["pool"]), [self.record["items"][d] for d in batch])
            self.cache = {d: self.rules.tags_of(r, self.tags, self.names) for d, r in zip(batch, rows, strict=True)}
        return self.cache.get(digest, [])

    def caption(self, digest: str, sidecar: str) -> str:
        if self.rules.mode == "fill-missing" and sidecar:
            self.counts["kept"] += 1
            return sidecar
        tags = self.tags_of(digest) if digest in self.record["items"] else []
        for t in tags:
            self.freq[t] = self.freq.get(t, 0) + 1
        self.counts["extended" if sidecar and self.rules.mode == "append" else "from_tags"] += 1
        return self.rules.merge(sidecar, tags)

    def summary(self) -> dict:
        top = sorted(self.freq.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
        return {**self.counts, "top_tags": dict(top)}
