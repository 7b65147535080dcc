"""Stage keys: the sha256 of a canonical JSON preimage.

The preimage holds everything that determines a stage's output: the key schema version, the stage name,
the stage's manual IMPL_VERSION, its typed params, the keys of its upstream artifacts and the digests of
its external inputs (image bytes, model weights). Runtime settings never enter it.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

KEY_SCHEMA = 1


def _normalize(value: Any) -> Any:
    # Floats must hash the same whatever way they were spelled in the config (1e-4 == 0.0001); NaN and
    # infinities have no canonical JSON form, so they are refused rather than silently stringified.
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot hash non-finite float {value!r}")
        return float(repr(value))
    if isinstance(value, dict):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(_normalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_preimage(
    stage: str, impl_version: int, params: dict, upstream: dict[str, str], inputs: dict[str, Any]
) -> dict:
    return {
        "schema": KEY_SCHEMA,
        "stage": stage,
        "impl": impl_version,
        "params": params,
        "upstream": dict(sorted(upstream.items())),
        "inputs": inputs,
    }


def stage_key(preimage: dict) -> str:
    return sha256_text(canonical_json(preimage))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: leaf}: {"lora1": {"lr": 1e-4}} -> {"lora1.lr": 1e-4}; an empty dict is a leaf."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}
