"""What every per-item caching stage shares: a pool named by its encoding settings, resume counts, and the
batched encode-and-commit loop. Items already committed in the pool are never encoded again."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cache.arrays import ArrayPool
from cache.keys import canonical_json, sha256_text
from cache.store import Store


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
) -> None:
    """Encode `todo` in batches (encode_batch -> array of len(batch) rows) and commit each row to the pool."""
    from tqdm import tqdm

    with tqdm(total=len(todo), desc=desc, unit=unit, disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = list(todo[start : start + batch_size])
            for item, row in zip(chunk, encode_batch(chunk), strict=True):
                pool.put(name_of(item), row)
                bar.update(1)
