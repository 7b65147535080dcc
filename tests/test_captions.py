"""Caption tricks (data.shuffle_caption and the rest): kohya's semantics string by string, each slot's string drawn
from its own seed and stored by the stage that draws it, every distinct string encoded once through the text pool,
and training fed those strings (not the written captions)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from pipeline.config import DataConfig
from stages.training.captions import CaptionDraw, caption_draw, draw_caption, draw_slots

TAGS = "sks, 1girl, red hair, smile, outdoors, tree"


def _draw(caption: str, seed: int = 0, epoch: int = 1, step: int = 0, **spec) -> str:
    return draw_caption(caption, CaptionDraw(**spec), random.Random(seed), epoch, step)


def test_shuffle_keeps_the_first_tags_and_every_tag():
    drawn = {_draw(TAGS, seed, shuffle=True, keep_tokens=1) for seed in range(40)}
    assert len(drawn) > 10  # 5! orders of the flexible tags
    for text in drawn:
        tags = text.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(TAGS.split(", "))


def test_keep_tokens_separator_fixes_a_head_and_a_tail():
    caption = "sks, 1girl ||| red hair, smile, tree ||| masterpiece"
    for seed in range(10):
        tags = _draw(caption, seed, shuffle=True, keep_tokens=3, keep_tokens_separator="|||").split(", ")
        # the separator wins over keep_tokens where the caption holds it
        assert tags[:2] == ["sks", "1girl"] and tags[-1] == "masterpiece"
        assert sorted(tags[2:-1]) == ["red hair", "smile", "tree"]


def test_tag_dropout_spares_the_kept_tags_and_caption_dropout_empties():
    assert _draw(TAGS, tag_dropout_rate=1.0, keep_tokens=2) == "sks, 1girl"
    assert _draw(TAGS, dropout_rate=1.0) == ""
    counts = Counter(len(_draw(TAGS, s, tag_dropout_rate=0.5).split(", ")) for s in range(200))
    assert 2.2 < sum(n * c for n, c in counts.items()) / 200 < 3.8  # about half of 6 tags


def test_every_nth_epoch_is_unconditional_counting_from_one():
    assert [_draw(TAGS, epoch=e, dropout_every_n_epochs=2) == "" for e in (1, 2, 3, 4)] == [False, True, False, True]


def test_wildcards_pick_one_option_and_braces_stay_literal():
    drawn = {_draw("a {red|blue|green} car, {{logo}}", s, wildcards=True) for s in range(30)}
    assert drawn == {f"a {c} car, {{logo}}" for c in ("red", "blue", "green")}
    lines = {_draw("first line\nsecond line", s, wildcards=True) for s in range(20)}
    assert lines == {"first line", "second line"}


def test_token_warmup_adds_tags_over_the_steps():
    spec = {"warmup_steps": 10, "warmup_min": 1, "keep_tokens": 1}
    # kohya: floor(step * (flex - min) / warmup) + min flexible tags, the kept ones always
    assert _draw(TAGS, step=0, **spec) == "sks, 1girl"
    assert _draw(TAGS, step=5, **spec) == "sks, 1girl, red hair, smile"
    assert _draw(TAGS, step=10, **spec) == TAGS


def test_secondary_separator_joins_words_into_one_tag():
    caption = "sks, red;;;hair, smile"
    for seed in range(10):
        text = _draw(caption, seed, shuffle=True, secondary_separator=";;;")
        assert "red,hair" in text and sorted(text.replace("red,hair", "X").split(", ")) == ["X", "sks", "smile"]


def test_caption_draw_is_none_until_a_setting_changes_a_caption():
    assert caption_draw(DataConfig(), 100) is None
    # read only with a shuffle, tag dropout or warmup: alone they change nothing
    assert caption_draw(DataConfig(keep_tokens=2, keep_tokens_separator="|||", token_warmup_min=3), 100) is None
    assert caption_draw(DataConfig(caption_separator=";"), 100) is None
    on = caption_draw(DataConfig(shuffle_caption=True, keep_tokens=2), 100)
    assert on.shuffle and on.keep_tokens == 2
    # token_warmup_step as steps, "10%" or kohya's fraction below 1, of the drawing stage's steps
    assert caption_draw(DataConfig(token_warmup_step="10%"), 200).warmup_steps == 20
    assert caption_draw(DataConfig(token_warmup_step=0.25), 200).warmup_steps == 50
    assert caption_draw(DataConfig(token_warmup_step=7), 200).warmup_steps == 7


def test_a_subset_s_own_tricks_merge_over_data_s():
    from pipeline.config import SubsetConfig
    from stages.training.captions import CaptionTricks, subset_caption_draws

    subsets = [
        {"images": "a"},  # none of its own: data's
        {"images": "b", "shuffle_caption": True},  # data's keep_tokens and tag dropout still apply
        {"images": "c", "name": "plain", "caption_tag_dropout_rate": 0.0},  # its only trick turned off
    ]
    data = DataConfig(subsets=subsets, keep_tokens=1, caption_tag_dropout_rate=0.5)
    default = caption_draw(data, 10)
    assert default == CaptionDraw(tag_dropout_rate=0.5, keep_tokens=1)
    own = subset_caption_draws(data, 10)
    assert own == {"b": CaptionDraw(shuffle=True, tag_dropout_rate=0.5, keep_tokens=1), "plain": None}
    tricks = CaptionTricks(default, own)
    assert [tricks.of(i) for i in ({"subset": "a"}, {"subset": "plain"}, {})] == [default, None, default]
    # no subset sets a trick of its own: nothing to key
    assert subset_caption_draws(DataConfig(subsets=[{"images": "a"}], shuffle_caption=True), 10) is None
    assert SubsetConfig(images="a", token_warmup_step=0.25).token_warmup_step == "25%"
    assert caption_draw(data, 200, SubsetConfig(images="a", token_warmup_step="10%")).warmup_steps == 20


def test_items_without_tricks_keep_their_written_caption_in_every_slot():
    captions = [TAGS, "x, y, z"]
    drawn = draw_slots([CaptionDraw(shuffle=True), None], captions, seed=1, stream="", batch_size=2, grad_accum=1,
                       steps=20)  # fmt: skip
    assert "x, y, z" in drawn.strings and not any(sorted(s.split(", ")) == ["x", "y", "z"] and s != "x, y, z"
                                                  for s in drawn.strings)  # fmt: skip
    assert len(drawn.strings) > 5  # the first item's shuffles


WARMUP_ERRORS = [(1.5, "fraction below 1"), (-1, "0 or more"), ("abc", "percentage"), ("120%", "%")]


@pytest.mark.parametrize("bad,why", WARMUP_ERRORS)
def test_token_warmup_step_refuses_what_it_cannot_read(bad, why):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=why):
        DataConfig(token_warmup_step=bad)


def test_slots_are_drawn_from_their_own_seed():
    spec = CaptionDraw(shuffle=True)
    captions = [TAGS, "a, b, c, d"]
    first = draw_slots(spec, captions, seed=3, stream="", batch_size=2, grad_accum=2, steps=5)
    again = draw_slots(spec, captions, seed=3, stream="", batch_size=2, grad_accum=2, steps=5)
    assert first.strings == again.strings and first.slots == again.slots
    assert len(first.slots) == 20 and len(first.strings) > 2
    other = draw_slots(spec, captions, seed=3, stream="lora2", batch_size=2, grad_accum=2, steps=5)
    assert other.slots != first.slots or other.strings != first.strings


def test_a_batch_takes_each_slot_s_drawn_string():
    from stages.families.base import Conditioning
    from stages.training.loop import DiffusionBatches, TrainData
    from tests.test_training_methods import FLOW_BASE, process

    cond = Conditioning(torch.arange(5.0).reshape(5, 1, 1), torch.ones(5, 1, dtype=torch.bool))
    data = TrainData(torch.zeros(3, 4, 4, 4), cond, torch.zeros(3, dtype=torch.long))
    data.slot_cond = torch.tensor([4, 2, 1, 0, 3, 3])
    batches = DiffusionBatches(data, seed=0, batch_size=2)
    got = [batches.micro_batch(k, None, process(FLOW_BASE))[2].embeds.flatten().tolist() for k in range(3)]
    assert got == [[4.0, 2.0], [1.0, 0.0], [3.0, 3.0]]


def _tagged(project, prefix: str = "sks, photo, ") -> None:
    """Captions of several tags: the images' own caption after a prefix of two tags."""
    project.write_config(data={"caption_prefix": prefix})


def test_lora1_stores_and_encodes_the_drawn_strings(project):
    from cache.keys import sha256_text
    from cache.store import Store

    _tagged(project)
    project.write_config(data={"shuffle_caption": True, "keep_tokens": 1, "caption_tag_dropout_rate": 0.2})
    report = project.run_json()
    lora1 = json.loads(project.manifests("lora1")[0].read_text())
    drawn = json.loads((project.root / "output" / "lora" / "lora1" / "captions.json").read_text())
    rows = [r for step in drawn["micro_steps"] for r in step]
    assert len(drawn["micro_steps"]) == 6 and all(len(s) == 2 for s in drawn["micro_steps"])  # steps x batch 2
    assert lora1["record"]["captions"]["slots"] == len(rows) == 12
    assert lora1["record"]["captions"]["distinct"] == len(set(drawn["strings"])) == len(drawn["strings"]) > 1
    for s in drawn["strings"]:
        assert s.startswith("sks, ") or s == "sks"  # keep_tokens = 1
    # every distinct string is in the text pool and referenced by the artifact (gc keeps it)
    store = Store(project.store)
    pool_name = next(p for p in lora1["pools"] if p.startswith("text/"))
    pool = store.pool(pool_name)
    assert all(pool.has(sha256_text(s)) for s in drawn["strings"])
    assert sorted(lora1["pools"][pool_name]) == sorted(sha256_text(s) for s in drawn["strings"])
    assert report["stages"][-1]["name"] == "lora1"


def test_dropping_every_caption_trains_as_the_empty_caption(project, tmp_path):
    """The drawn-caption path (pool rows per slot) gives the LoRA of the plain path on the same strings: with every
    caption dropped, lora1 equals a run whose captions are all empty, tensor for tensor."""
    import shutil

    from safetensors.torch import load_file

    other = tmp_path / "plain"
    shutil.copytree(project.root, other, ignore=shutil.ignore_patterns(".pipeline", "output"))
    for txt in (other / "images").glob("*.txt"):
        txt.unlink()
    project.write_config(data={"caption_dropout_rate": 1.0})
    project.run_json()
    from tests.conftest import Project

    plain = Project(other, json.loads(json.dumps(project.settings)))
    plain.write_config(data={"caption_dropout_rate": 0.0, "default_caption": ""})
    plain.run_json()
    a = load_file(project.root / "output" / "lora" / "lora1" / "lora1.safetensors")
    b = load_file(other / "output" / "lora" / "lora1" / "lora1.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_transfer_schedule_rows_carry_the_drawn_strings(transfer_project):
    _tagged(transfer_project)
    transfer_project.write_config(data={"shuffle_caption": True})
    transfer_project.run_json(workflow="transfer")  # the student checks its inputs against the teacher's, caption too
    from cache.store import Store
    from stages.training.schedule import read_schedule

    store = Store(transfer_project.store)

    def manifest(stage: str):
        return store.load_manifest(stage, json.loads(transfer_project.manifests(stage)[0].read_text())["key"])

    schedule = manifest("schedule")
    doc, _ = read_schedule(store, schedule)
    written = {i["caption"] for i in manifest("caption").record["items"]}
    trained = [r["caption"] for r in doc["rows"]]
    assert any(c not in written for c in trained)  # shuffled
    for c in trained:
        assert any(sorted(c.split(", ")) == sorted(w.split(", ")) for w in written)
    assert all(r["caption"] in written for r in doc["heldout"])  # held-out rows keep the written captions
    assert schedule.record["captions"]["distinct"] == len(set(trained))


def test_transfer_refuses_two_caption_dropouts(transfer_project):
    transfer_project.write_config(data={"caption_dropout_rate": 0.1}, schedule={"caption_dropout": 0.1})
    result = transfer_project.cli("run", "transfer", "--dry-run")
    assert result.exit_code != 0
    assert "schedule.caption_dropout" in result.output and "data.caption_dropout_rate" in result.output
