"""The tiny-model factory is deterministic: the demo's model, and so its digests and keys, never drift."""

from __future__ import annotations

from cache.hashing import sha256_file
from stages.families.tiny import build_tiny_sd15, build_tokenizer


def test_two_builds_are_byte_identical(tmp_path):
    for name in ("a", "b"):
        build_tiny_sd15(tmp_path / name, seed=0)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all(sha256_file(tmp_path / "a" / f) == sha256_file(tmp_path / "b" / f) for f in files)


def test_tokenizer_covers_captions_without_unknown_tokens():
    tok = build_tokenizer()
    ids = tok("a red circle on a green background, sharp! 3").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
