"""What every per-item caching stage shares: a pool named by its encoding settings, resume counts, and the
batched encode-and-commit loop. Items already committed in the pool are never encoded again."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cache.arrays import ArrayPool
from cache.keys import canonical_json, sha256_text
from cache.store import Store
from core.faults import fault_point


def pool_id(kind: str, impl: int, params: dict, component: str, digest: str) -> str:
    """Pools are keyed by what decides an item's array (code, params, model component), not by the data set."""
    spec = {"impl": impl, "params": params, component: digest}
    return f"{kind}/{sha256_text(canonical_json(spec))[:32]}"


def pool_progress(store: Store, stage: str, key: str, pid: str, names: set[str]) -> tuple[int, int] | None:
    """(done, total) of an interrupted run of (stage, key), or None when none was started."""
    if not store.has_work(stage, key):
        return None
    pool = store.pool(pid)
    return sum(pool.has(n) for n in names), len(names)


def fill_pool(
    pool: ArrayPool,
    todo: Sequence,
    name_of: Callable[[object], str],
    encode_batch: Callable[[list], object],
    batch_size: int,
    desc: str,
    unit: str,
    progress: bool,
    group: Callable[[object], object] | None = None,
    shard: bool = False,
    label: str = "",
) -> None:
    """Encode `todo` in batches (encode_batch -> array of len(batch) rows) and commit each row to the pool.
    With `group`, a batch holds items of one group only (one image size): todo comes sorted by it. With shard, in a
    run of several processes, this rank encodes every world-size-th batch of the ones one process would make (into
    its writer's rows: shared_pool)."""
    from core import dist
    from core.progress import bar as progress_bar

    batches: list[list] = []
    for item in todo:
        if not batches or len(batches[-1]) == batch_size or (group and group(batches[-1][0]) != group(item)):
            batches.append([])
        batches[-1].append(item)
    if shard:
        batches = batches[dist.rank() :: dist.size()]
        progress = progress and dist.is_main()
    with progress_bar(total=sum(map(len, batches)), desc=label or desc, unit=unit, enabled=progress) as bar:
        for n, chunk in enumerate(batches):
            rows = encode_batch(chunk)
            pool.put_many([(name_of(item), row) for item, row in zip(chunk, rows, strict=True)], batch_size)
            bar.update(len(chunk))
            fault_point(f"{desc}.batch", n + 1)  # this process's n-th batch, committed


TEXT_POOL_IMPL = 1  # bump when the text embedding code changes what it stores
# What each family's text encoder stores per caption (the family's pipeline's choice of hidden states).
TEXT_POOL_PARAMS = {
    "sd15": {"output": "last_hidden_state"},
    "sdxl": {"output": "hidden_states[-2] of both, concatenated; a last row with the pooled text_embeds"},
    "qwenimage": {
        "output": "hidden_states[-1]",
        "template": "QwenImagePipeline's, 34 tokens dropped",
        "tokens": "masked",
    },
    "flux1": {"output": "T5 last_hidden_state, 512 tokens; a last row with CLIP's pooler_output"},
    "zimage": {"output": "hidden_states[-2]", "chat_template": "thinking", "tokens": "masked", "max_length": 512},
    "flux2": {"output": "stacked hidden states", "chat_template": "no thinking", "tokens": "all", "max_length": 512},
}


def text_pool_id(text_digest: str, family: str = "sd15") -> str:
    """The pool of caption-string embeddings of one text encoder: every stage that needs a string shares it."""
    return pool_id("text", TEXT_POOL_IMPL, TEXT_POOL_PARAMS[family], "text", text_digest)


RELEASE_COLLECT_BYTES = 256 * 2**20  # a text encoder this large is collected at once when released


def release(encoder) -> None:
    """Drop a text encoder's weights now (not when the garbage collector gets to it) and the CUDA cache. A full
    collection costs ~0.2 s with diffusers and transformers imported, so a small encoder (a tiny test model, CLIP-L
    at 250 MB is just under) is left to reference counting."""
    import gc

    import torch

    model, encoder.model = encoder.model, None
    size = sum(t.numel() * t.element_size() for t in model.parameters()) if model is not None else 0
    del model
    if size >= RELEASE_COLLECT_BYTES or torch.cuda.is_available():
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shared_pool(store: Store, pid: str, shard: bool):
    """The pool a stage writes: with shard, in a run of several processes, this rank's writer of it (its own rows
    and log: cache/arrays.py), else the pool itself."""
    from core import dist

    return store.pool(pid, f"r{dist.rank()}" if shard and dist.size() > 1 else "")


def finish_shared_pool(store: Store, pid: str, shard: bool) -> bool:
    """After a fill: with shard, wait for every rank; then rank 0 folds the writers' logs (also those a killed
    multi-process run left for this one-process run). -> whether this rank goes on (rank 0, or every rank of an
    unsharded fill)."""
    from core import dist

    if shard and dist.size() > 1:
        dist.barrier()
    if dist.is_main():
        store.pool(pid).merge_writers()
    return dist.is_main() or not shard


def ensure_text_embeddings(
    store: Store, family, layout, text_digest: str, strings, runtime, progress: bool, shard: bool = False
) -> dict | None:
    """Encode the strings missing from the text encoder's pool. -> {"pool", "strings": {s: {"array", "digest"}}}.
    With shard (the text stage in a run of several processes) every rank encodes its share; None on ranks > 0."""
    from core import dist
    from stages.devices import resolve_device

    pid = text_pool_id(text_digest, family.name)
    pool = shared_pool(store, pid, shard)
    strings = sorted(set(strings))
    names = {s: sha256_text(s) for s in strings}
    todo = [s for s in strings if not pool.has(names[s])]
    if shard:
        dist.barrier()  # every rank has read what is done before any writes
    if todo:
        encoder = family.load_text_encoder(layout, resolve_device(runtime.device))

        def encode(chunk: list[str]):
            return encoder.encode(chunk)

        batch = runtime.encode_batch_size
        fill_pool(pool, todo, names.__getitem__, encode, batch, "text", "caption", progress, shard=shard)
        release(encoder)  # a Qwen3 encoder is 4-8B parameters at real size: gone before any transformer loads
        del encode, encoder
    if not finish_shared_pool(store, pid, shard):
        return None
    committed = store.pool(pid).committed()
    return {
        "pool": pid,
        "strings": {s: {"array": names[s], "digest": committed[names[s]]["digest"]} for s in strings},
        "encoded": len(todo),
    }


def load_text_table(store: Store, table: dict):
    """The embeddings of an ensure_text_embeddings() table, read from the pool as batches ask for them:
    (PooledConditioning of U rows, {string: row})."""
    strings = sorted(table["strings"])
    return PooledConditioning(store, table, strings), {s: i for i, s in enumerate(strings)}


def read_rows(pool, entries: list[dict]) -> list:
    """The arrays of {"array", "digest"} entries, in order, each chunk read once."""
    got = pool.get_many([e["array"] for e in entries], [e["digest"] for e in entries])
    return [got[e["array"]] for e in entries]


def latent_arrays(latents_record: dict) -> dict[str, str]:
    """{array name: array digest} of every view a latents record holds (an image digest names its view 0)."""
    from stages.latents import latent_views

    return {v["array"]: v["digest"] for item in latents_record["items"].values() for v in latent_views(item)}


def load_latent_table(store: Store, latents_record: dict, names) -> LatentTable:
    """{array name: latent array} for the given views (schedule rows' "latent"; an image digest is its view 0),
    read through the latents manifest's record as they are asked for (LatentTable)."""
    table = LatentTable(store.pool(latents_record["pool"]), latent_arrays(latents_record), names)
    table.size_ids = size_ids_of(latents_record)
    return table


def size_ids_of(latents_record: dict) -> dict[str, list[int]]:
    """{view array name: [original h, w, crop top, left, target h, w]} for the views whose record holds SDXL's size
    conditioning (every view of a size-conditioned family's latents; stages/buckets.py Placement.conditioning)."""
    out = {}
    for item in latents_record["items"].values():
        for v in item.get("views") or [{"array": item["array"], **item.get("size", {})}]:
            if "original_size" in v:
                out[v["array"]] = [*v["original_size"], *v["crop_top_left"], *v["target_size"]]
    return out


def load_training_data(store: Store, upstream: dict, text_encoder=None, prior_loss_weight: float | None = None):
    """The items' latents (every view of each, read from the pool a micro-batch at a time, PooledLatents) and the
    unique captions' text embeddings, read through the upstream manifests. With a text_encoder (one being
    trained) the captions' token ids instead, which it encodes in every step. Bucketed latents give the data its
    groups (the items of each bucket), so that batches are drawn within one. Regularization items weigh
    prior_loss_weight in the loss (when it is not 1)."""
    import torch

    from stages.latents import latent_views
    from stages.training.loop import TrainData

    items = upstream["caption"].record["items"]
    lat = upstream["latents"].record
    views = [latent_views(lat["items"][i["id"]]) for i in items]
    n_views = len(views[0])
    latents = PooledLatents(store.pool(lat["pool"]), [v for per_item in views for v in per_item])
    strings = sorted({i["caption"] for i in items})
    row = {s: n for n, s in enumerate(strings)}
    if text_encoder is not None:
        cond = text_encoder.token_ids(strings)
    else:
        cond = PooledConditioning(store, upstream["text"].record, strings)
    index = [row[i["caption"]] for i in items]
    data = TrainData(latents, cond, torch.tensor(index, dtype=torch.long), views=n_views)
    if any(i.get("repeats", 1) != 1 for i in items):
        data.repeats = tuple(i.get("repeats", 1) for i in items)
    if prior_loss_weight not in (None, 1.0) and any(i.get("reg") for i in items):
        weights = [prior_loss_weight if i.get("reg") else 1.0 for i in items]
        data.weights = torch.tensor(weights, dtype=torch.float32)
    if "buckets" in lat:
        groups: dict[tuple, list[int]] = {}
        for n, i in enumerate(items):
            groups.setdefault(tuple(lat["items"][i["id"]]["bucket"]), []).append(n)
        data.groups = tuple(tuple(groups[b]) for b in sorted(groups))
    sizes = size_ids_of(lat)
    if sizes:  # each view's size conditioning (SDXL), per latent row
        rows = [sizes[v["array"]] for per_item in views for v in per_item]
        data.size_ids = torch.tensor(rows, dtype=torch.float32)
    if "masks" in lat:  # data.alpha_mask
        names = [v["array"] for per_item in views for v in per_item]
        masks = load_mask_table(store, lat, names)
        shapes = [lat["items"][i["id"]].get("shape", lat["shape"]) for i in items for _ in range(n_views)]
        data.masks = MaskRows([mask_or_ones(masks, n, s) for n, s in zip(names, shapes, strict=True)])
    return data, [i["caption"] for i in items]


class MaskRows:
    """The loss masks of every view (data.alpha_mask), stacked per batch (bucketed views differ in size)."""

    def __init__(self, masks: list):
        import torch

        self.masks = [torch.from_numpy(m) for m in masks]

    def __getitem__(self, idx):
        import torch

        return torch.stack([self.masks[int(i)] for i in idx])


def mask_or_ones(masks: dict, name: str, latent_shape):
    """A view's loss mask, or ones (train everywhere) for a view of an unmasked subset's image."""
    import numpy as np

    return masks[name] if name in masks else np.ones((1, *latent_shape[-2:]), dtype=np.float32)


def load_mask_table(store: Store, latents_record: dict, names) -> dict:
    """{view array name: (1, h, w) loss mask} of a latents artifact made with data.alpha_mask (the masked views of
    `names`: with [[data.subsets]] alpha_mask some have none)."""
    masks = latents_record["masks"]
    names = sorted(set(names) & set(masks["items"]))
    return store.pool(masks["pool"]).get_many(names, [masks["items"][d] for d in names])


TEXT_CACHE_BYTES = 256 * 2**20  # embeddings kept after their first read


class PooledConditioning:
    """Text rows read from the pool when a batch asks for them: thousands of captions (drawn ones: a string per
    slot) are GBs of embeddings, so they stay on disk; at most TEXT_CACHE_BYTES of them stay in memory after their
    first read. A batch is padded to its own longest row (the families that store unpadded rows, Z-Image, take
    each row's real tokens), so it is the same batch as one taken from the whole table."""

    def __init__(self, store: Store, table: dict, strings: list[str], cache_bytes: int = TEXT_CACHE_BYTES):
        self.pool = store.pool(table["pool"])
        self.entries = [table["strings"][s] for s in strings]
        self.cache = BoundedCache(cache_bytes)

    def __getitem__(self, rows):
        from stages.families.base import Conditioning

        if isinstance(rows, int):  # one row, as Conditioning[i] gives it
            return self[[rows]][0]
        rows = [int(r) for r in (rows.tolist() if hasattr(rows, "tolist") else rows)]
        got = {r: self.cache.get(r) for r in set(rows)}
        missing = sorted(r for r, arr in got.items() if arr is None)
        for r, arr in zip(missing, read_rows(self.pool, [self.entries[r] for r in missing]), strict=True):
            got[r] = arr
            self.cache.put(r, arr)
        return Conditioning.stack([got[r] for r in rows])

    def __len__(self) -> int:
        return len(self.entries)


class BoundedCache:
    """An LRU dict of arrays holding at most `budget` bytes (always the newest one), safe across threads."""

    def __init__(self, budget: int):
        import threading
        from collections import OrderedDict

        self.items, self.budget, self.bytes, self.lock = OrderedDict(), budget, 0, threading.Lock()

    def __contains__(self, key) -> bool:
        return key in self.items

    def get(self, key):
        """The array, or None when it was evicted meanwhile."""
        with self.lock:
            arr = self.items.get(key)
            if arr is not None:
                self.items.move_to_end(key)
            return arr

    def put(self, key, arr) -> None:
        with self.lock:
            if key in self.items:
                return
            self.items[key] = arr
            self.bytes += arr.nbytes
            while self.bytes > self.budget and len(self.items) > 1:
                _, old = self.items.popitem(last=False)
                self.bytes -= old.nbytes


class LatentTable:
    """{view array name: latent} for the views a stage needs, read from the pool as they are asked for, never the
    whole pool: need(names) reads a step's rows in one pass over their chunks, prefetch(names) does so for the next
    step on a background thread, and at most LATENT_CACHE_BYTES stay in memory (a small data set is read once).
    The values are the pool's bytes either way."""

    def __init__(self, pool, digests: dict[str, str], names, cache_bytes: int | None = None):
        self.pool = pool
        self.digests = {n: digests[n] for n in sorted(set(names))}
        self.cache = BoundedCache(LATENT_CACHE_BYTES if cache_bytes is None else cache_bytes)
        self.size_ids: dict[str, list[int]] = {}  # per view, when the family is size-conditioned (size_ids_of)
        self._executor = None
        self._pending = None

    def need(self, names, then=()) -> None:
        """Read `names` now (one pass over their chunks) and start reading `then` (the next step's) on a thread."""
        missing = [n for n in dict.fromkeys(names) if n not in self.cache]
        if missing:
            got = self.pool.get_many(missing, [self.digests[n] for n in missing])
            for n in missing:
                self.cache.put(n, got[n])
        then = list(then)
        if then:
            self.prefetch(then)

    def prefetch(self, names) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="latents-prefetch")
        self._wait()
        self._pending = self._executor.submit(self.need, list(names))

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a read error surfaces here, in the stage's thread

    def sized(self, cond, rows: list[dict]):
        """cond with the size conditioning of these schedule rows' views attached (SDXL), or cond as it is."""
        import torch

        if not self.size_ids:
            return cond
        return cond.with_sizes(torch.tensor([self.size_ids[r["latent"]] for r in rows], dtype=torch.float32))

    def __getitem__(self, name: str):
        arr = self.cache.get(name)
        if arr is None:
            self._wait()
            arr = self.cache.get(name)
        if arr is None:
            if name not in self.digests:
                raise KeyError(name)
            arr = self.pool.get_many([name], [self.digests[name]])[name]
            self.cache.put(name, arr)
        return arr

    def __contains__(self, name) -> bool:
        return name in self.digests

    def __iter__(self):
        return iter(self.digests)

    def __len__(self) -> int:
        return len(self.digests)


@dataclass
class DrawnForTraining:
    record: dict  # the stage record's "captions" entry: slots, distinct strings, newly encoded
    pools: dict  # the text-pool arrays the drawn strings use (the artifact references them)
    path: Path  # captions.json: the distinct strings and each micro-step's rows into them


def draw_training_captions(ctx, data, captions: list[str], params, batches, text_encoder) -> DrawnForTraining | None:
    """Caption tricks (params.captions, and params.subset_captions for the items of subsets with their own) for a
    DiffusionBatches run of params.steps x params.grad_accum micro-steps: draw every slot's caption, encode each
    distinct string once (through the shared text pool, or as token ids for a text encoder in training), and point
    the data's slots at them. None when no trick is on (the items' captions are trained as written)."""
    import json

    import torch

    from stages.training.captions import caption_tricks, draw_slots

    env = ctx.env
    p = params
    tricks = caption_tricks(p)
    if tricks is None:
        return None
    specs = [tricks.of(i) for i in ctx.upstream["caption"].record["items"]]
    drawn = draw_slots(
        specs, captions, batches.seed, batches.stream, batches.batch_size, p.grad_accum, p.steps, batches.order
    )
    record = {"slots": len(drawn.slots), "distinct": len(drawn.strings)}
    pools = {}
    if text_encoder is not None:
        data.cond = text_encoder.token_ids(drawn.strings)
    else:
        table = ensure_text_embeddings(
            env.store, env.family, env.layout, env.component_digests["text"], drawn.strings, ctx.runtime, ctx.progress
        )
        data.cond = PooledConditioning(env.store, table, drawn.strings)
        pools[table["pool"]] = sorted(v["array"] for v in table["strings"].values())
        record["encoded"] = table["encoded"]
    data.slot_cond = torch.tensor(drawn.slots, dtype=torch.long)
    ctx.log(
        f"captions: {record['slots']} training slots drew {record['distinct']} distinct caption strings"
        + (f", {record['encoded']} newly encoded" if "encoded" in record else "")
    )
    path = ctx.work_dir / "captions.json"
    path.write_text(json.dumps(drawn.to_json(), ensure_ascii=False, separators=(",", ":")))
    return DrawnForTraining(record, pools, path)


LATENT_CACHE_BYTES = 512 * 2**20  # rows kept after their first read; beyond it, every batch reads the pool


class PooledLatents:
    """The (N, C, h, w) latents of N items, read from the pool when a batch asks for them: at most
    LATENT_CACHE_BYTES of rows stay in memory after their first read (a small data set trains from memory after its
    first epoch; 5,000 SD latents at 1024 px, 640 MiB, do not all stay). prefetch(idx) starts reading the next
    batch on a background thread; the rows are the pool's bytes either way, so training is the same bit for bit."""

    def __init__(self, pool, entries: list[dict], cache_bytes: int = LATENT_CACHE_BYTES):
        self.pool, self.entries = pool, entries
        first = read_rows(pool, entries[:1])[0]
        self.shape = (len(entries), *first.shape)
        self._executor = None
        self._pending: tuple[tuple[int, ...], object] | None = None
        self._rows: dict[int, object] = {}
        self._room = cache_bytes // max(1, first.nbytes)

    def _read(self, idx: tuple[int, ...]):
        import numpy as np
        import torch

        todo = sorted({i for i in idx if i not in self._rows})
        fresh = dict(zip(todo, read_rows(self.pool, [self.entries[i] for i in todo]), strict=True))
        for i in todo[: max(0, self._room - len(self._rows))]:
            self._rows[i] = fresh[i]
        return torch.from_numpy(np.stack([self._rows[i] if i in self._rows else fresh[i] for i in idx]))

    def __getitem__(self, idx):
        idx = tuple(int(i) for i in (idx.tolist() if hasattr(idx, "tolist") else idx))
        if self._pending is not None and self._pending[0] == idx:
            future, self._pending = self._pending[1], None
            return future.result()
        return self._read(idx)

    def prefetch(self, idx) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="latents-prefetch")
        idx = tuple(int(i) for i in idx)
        self._pending = (idx, self._executor.submit(self._read, idx))

    def __len__(self) -> int:
        return self.shape[0]
