"""The materialized schedule of delta transfer: for every micro-step and batch slot, what the teacher and the
student both see.

A row says which item (latent) and caption string a slot uses, its flip and crop, its timestep (an integer
for DDPM, σ as a float32 value for flow matching, so both phases see the same σ bit for bit), and the
seed that regenerates its noise on the CPU, with the digest of that noise. Any phase rebuilds x_t, t and
the conditioning from a row alone and checks the noise against the digest, so the two phases cannot
drift apart silently (a torch upgrade that changed randn would be caught, not trained on).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from core.errors import PipelineError
from stages.families.noise import training_noise
from stages.training.sampling import derive_seed, generator


class ScheduleMismatch(PipelineError):
    pass


@dataclass(frozen=True)
class ScheduleSpec:
    steps: int
    batch_size: int
    grad_accum: int
    seed: int
    caption_dropout: float
    heldout: int
    num_timesteps: int
    latent_shape: tuple[int, ...]  # of one item, (C, h, w)
    heldout_images: int = 0

    @property
    def micro_steps(self) -> int:
        return self.steps * self.grad_accum

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum


def noise_digest(noise) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(noise.numpy(), dtype="<f4").tobytes()).hexdigest()[:32]


def slot_noise(seed: int, shape: tuple[int, ...]):
    import torch

    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed))


def _row(spec: ScheduleSpec, stream: str, k: int, slot: int, item: dict, process, view: dict | None = None) -> dict:
    """One slot's row; `view` (bucketed or augmented latents) names the stored view it takes and its shape."""
    import torch

    g = generator(stream, "slot", spec.seed, k, slot)
    drawn = process.sample_timesteps(1, g)
    t = float(drawn[0]) if drawn.is_floating_point() else int(drawn[0])
    dropped = spec.caption_dropout > 0 and float(torch.rand(1, generator=g)) < spec.caption_dropout
    seed = derive_seed(stream, "noise", spec.seed, k, slot)
    row = {
        "k": k,
        "slot": slot,
        "item": item["id"],
        "latent": item["digest"] if view is None else view["array"],
        "flip": False if view is None else view["flip"],
        "crop": "center" if view is None or view.get("crop") is None else view["crop"],
        "caption": "" if dropped else item["caption"],
        "t": t,
        "noise_seed": seed,
        "noise_digest": noise_digest(slot_noise(seed, spec.latent_shape if view is None else view["shape"])),
    }
    if view is not None and view.get("bucket"):
        row["bucket"] = view["bucket"]
    return row


def item_views(latents_record: dict, items: list[dict]) -> dict[str, list[dict]] | None:
    """{item id: its stored views as schedule rows name them (array, flip, crop, shape, bucket)} of a latents
    record with buckets, random crops or flips; None for plain centre-cropped latents (rows as before views)."""
    record_items = latents_record["items"]
    if not any("views" in record_items[i["id"]] for i in items):
        return None
    bucketed, random_crop = "buckets" in latents_record, latents_record.get("crop") == "random"
    out = {}
    for i in items:
        entry = record_items[i["id"]]
        out[i["id"]] = [
            {
                "array": v["array"],
                "flip": v["flip"],
                "crop": v["crop_top_left"] if random_crop else None,
                "shape": tuple(entry["shape"]),
                "bucket": entry["bucket"] if bucketed else None,
            }
            for v in entry["views"]
        ]
    return out


def split_items(items: list[dict], n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training items, held-out items): the held-out ones are the first n by a seeded hash of each item's digest,
    so the split depends on the images, not on their order or names; the rest keep their order."""
    if n_heldout <= 0:
        return items, []
    ranked = sorted(items, key=lambda it: derive_seed("heldout-image", seed, it["digest"]))
    held = {id(it) for it in ranked[:n_heldout]}
    return [it for it in items if id(it) not in held], [it for it in items if id(it) in held]


def build_schedule(spec: ScheduleSpec, items: list[dict], process, captions=None, views=None) -> dict:
    """Rows for every (micro-step, slot) in order over the training items; `heldout` rows on the held-out images
    (or, with none held out, new draws on the training items); `fit` rows, new draws on the training items.

    captions (CaptionTricks: data.shuffle_caption, ..., or the row's subset's own) draws the caption of every
    training row from the row's own randomness; the held-out and fit rows keep the written captions, the ones a
    user prompts with. views (item_views: buckets, random crops, flips) puts each micro-batch in one bucket and
    gives each training row the view its slot draws; the held-out and fit rows take view 0 (the first crop,
    unflipped)."""
    from stages.buckets import slot_view
    from stages.training.captions import draw_caption, slot_rng
    from stages.training.sampling import BatchOrder

    train, held = split_items(items, spec.heldout_images, spec.seed)
    groups = None
    if views is not None and views[train[0]["id"]][0]["bucket"] is not None:
        by_bucket: dict[tuple, list[int]] = {}
        for n, it in enumerate(train):
            by_bucket.setdefault(tuple(views[it["id"]][0]["bucket"]), []).append(n)
        groups = tuple(tuple(by_bucket[b]) for b in sorted(by_bucket))
    order = BatchOrder(spec.seed, spec.batch_size, len(train), groups, tuple(it.get("repeats", 1) for it in train))
    rows = []
    for k in range(spec.micro_steps):
        for slot, i in enumerate(order.batch(k)):
            view = None
            if views is not None:
                choices = views[train[i]["id"]]
                view = choices[slot_view("schedule", spec.seed, k, slot, len(choices))]
            row = _row(spec, "schedule", k, slot, train[i], process, view)
            if captions is not None and row["caption"]:
                rng = slot_rng("schedule", spec.seed, k, slot)
                draw = captions.of(train[i])
                row["caption"] = draw_caption(row["caption"], draw, rng, order.epoch(k, slot), k // spec.grad_accum)
            rows.append(row)

    def extra(stream: str, pool: list[dict]) -> list[dict]:
        out = []
        for j in range(spec.heldout):
            item = pool[int(derive_seed(stream, "item", spec.seed, j) % len(pool))]
            out.append(_row(spec, stream, j, 0, item, process, None if views is None else views[item["id"]][0]))
        return out

    return {
        "rows": rows,
        "heldout": extra("heldout", held or train),
        "fit": extra("fit", train) if held else [],
        "heldout_items": [it["id"] for it in held],
    }


def step_rows(schedule: dict, spec: ScheduleSpec, step: int) -> list[dict]:
    """The rows of one optimizer step: grad_accum micro-batches of batch_size slots, in order."""
    n = spec.rows_per_step
    return schedule["rows"][step * n : (step + 1) * n]


def row_chunks(rows: list[dict], batch_size: int, latents: dict) -> list[list[dict]]:
    """Consecutive rows in forwards of at most batch_size rows of one latent shape: a training step's micro-batches
    exactly (each holds one bucket), and the held-out rows of mixed buckets split where the shape changes."""
    chunks: list[list[dict]] = []
    for row in rows:
        shape = latents[row["latent"]].shape
        if not chunks or len(chunks[-1]) == batch_size or latents[chunks[-1][0]["latent"]].shape != shape:
            chunks.append([])
        chunks[-1].append(row)
    return chunks


def pack_rows(parts: list):
    """A step's per-row arrays (micro-batches, as tensors) for one pool array: stacked when they share a shape,
    else (buckets) every row flattened into one vector; unpack_rows reads either."""
    import torch

    if len({tuple(p.shape[1:]) for p in parts}) == 1:
        return torch.cat(parts).numpy()
    return torch.cat([p.flatten() for p in parts]).numpy()


def unpack_rows(array, shapes: list[tuple[int, ...]]) -> list:
    """The per-row arrays of a pack_rows array, given each row's shape."""
    import math

    if array.ndim > 1:
        return list(array)
    out, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(array[at : at + n].reshape(shape))
        at += n
    return out


def rebuild_inputs(rows: list[dict], latents: dict, process):
    """(x_t, t, noise) of these rows (of one latent shape), regenerated on the CPU; raises ScheduleMismatch if a
    noise digest differs."""
    import torch

    noises = []
    for row in rows:
        noise = slot_noise(row["noise_seed"], latents[row["latent"]].shape)
        if noise_digest(noise) != row["noise_digest"]:
            raise ScheduleMismatch(
                f"the noise of schedule row k={row['k']} slot={row['slot']} regenerates differently on this machine "
                f"(torch {torch.__version__}); the teacher's deltas do not match this student. Re-run the teacher "
                f"on this machine: `pipeline run transfer --only schedule`, then the rest."
            )
        noises.append(noise)
    x0 = torch.stack([torch.as_tensor(latents[row["latent"]]) for row in rows])
    noise = torch.stack(noises)
    t = process.as_tensor([row["t"] for row in rows])
    noise_in, options = noise, getattr(process, "noise_options", {})
    if options:  # the schedule's noise options, per row from the row's own seed: both phases agree
        pairs = [
            training_noise(options, x0[i : i + 1], noise[i : i + 1], generator("noise-options", row["noise_seed"]))
            for i, row in enumerate(rows)
        ]
        noise, noise_in = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    return process.noisy_input(x0, noise_in, t), t, noise


def inputs_digest(x_t, t, captions: list[str]) -> bytes:
    """sha256 of what one forward saw: x_t as float32 bytes, t as int64 (σ as float32), the captions as UTF-8.

    The teacher stores one per step (over its micro-batches in order); the student recomputes and compares."""
    import numpy as np

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x_t.detach().cpu().numpy(), dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(t.detach().cpu().numpy(), dtype="<f4" if t.is_floating_point() else "<i8").tobytes())
    h.update("\x00".join(captions).encode())
    return h.digest()


def read_schedule(store, manifest) -> tuple[dict, object]:
    """(the schedule document, its ScheduleSpec) from a schedule manifest."""
    doc = json.loads(store.read_object(manifest.outputs["schedule.json"]["digest"], "schedule.json").read_text())
    spec = doc["spec"]
    return doc, ScheduleSpec(**{**spec, "latent_shape": tuple(spec["latent_shape"])})
