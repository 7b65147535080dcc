"""The artifact store: content-addressed objects, per-(stage, key) manifests, refs, locks and array pools."""

from cache.keys import KEY_SCHEMA, canonical_json, stage_key
from cache.store import Manifest, Store

__all__ = ["KEY_SCHEMA", "Manifest", "Store", "canonical_json", "stage_key"]
