"""The WD14 tagger: stage `tag` stores every tag's score per image (a tiny ONNX model of a WD v3 tagger's inputs and
outputs, run by onnxruntime), and the caption stage turns scores into captions under the [tag] rules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_TAGS, Project, actions, make_tiny_tagger, run_cli, tiny_tag_scores

from stages.tagging import TagRules, prepare

SIDE = 64  # the tiny tagger's input side in the project tests (the real models take 448, tested below)
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "cyan": (0, 255, 255)}


def rules(**over) -> TagRules:
    base = dict(
        mode="replace", general_threshold=0.35, character_threshold=0.85, rating="off", character_tags_first=False,
        character_tag_expand=False, always_first_tags=[], replace_tags={}, remove_underscore=True, undesired_tags=[],
        separator=",",
    )  # fmt: skip
    return TagRules(**{**base, **over})


TAGS = [(name, cat) for name, cat, *_ in TINY_TAGS]


def caption_of(scores, **over) -> str:
    r = rules(**over)
    return r.merge("", r.tags_of(np.asarray(scores), TAGS, r.names(TAGS)))


def test_rules_turn_scores_into_tags_as_documented():
    #         general sens quest expl | red  green blue ^_^  white | miku
    scores = [0.2, 0.1, 0.1, 0.6, 0.9, 0.3, 0.35, 0.5, 0.1, 0.9]
    assert caption_of(scores) == "red theme, blue theme, ^_^, hatsune miku (vocaloid)"  # 0.35 is kept; ^_^ stays
    assert caption_of(scores, remove_underscore=False) == "red_theme, blue_theme, ^_^, hatsune_miku_(vocaloid)"
    assert caption_of(scores, character_threshold=0.95) == "red theme, blue theme, ^_^"
    assert caption_of(scores, general_threshold=0.6) == "red theme, hatsune miku (vocaloid)"
    assert caption_of(scores, character_tags_first=True, character_tag_expand=True).startswith(
        "hatsune miku, vocaloid, red theme"
    )
    assert caption_of(scores, rating="first").startswith("explicit, red theme")
    assert caption_of(scores, rating="last").endswith("(vocaloid), explicit")
    renamed = caption_of(scores, replace_tags={"red theme": "crimson", "^_^": "smile"}, undesired_tags=["blue theme"])
    assert renamed == "crimson, smile, hatsune miku (vocaloid)"
    # always_first_tags in the order listed (kohya's loop puts the last listed first)
    assert caption_of(scores, always_first_tags=["^_^", "blue theme", "absent"]) == (
        "^_^, blue theme, red theme, hatsune miku (vocaloid)"
    )


def test_modes_merge_tags_with_the_sidecar_caption():
    tags = ["red theme", "^_^"]
    assert rules(mode="fill-missing").merge("a photo", tags) == "a photo"
    assert rules(mode="fill-missing").merge("", tags) == "red theme, ^_^"
    assert rules(mode="replace").merge("a photo", tags) == "red theme, ^_^"
    assert rules(mode="append").merge("^_^,a photo", tags) == "^_^, a photo, red theme"  # no tag twice
    assert rules(mode="append", separator=";").merge("x; y", tags) == "x; y; red theme; ^_^"


def test_prepare_pads_white_centred_resizes_and_gives_bgr_0_255():
    from PIL import Image

    wide = Image.new("RGB", (100, 50), (255, 0, 0))
    x = prepare(wide, 448)
    assert x.shape == (448, 448, 3) and x.dtype == np.float32
    assert x[0, 224].tolist() == [255, 255, 255] and x[447, 224].tolist() == [255, 255, 255]  # padded rows
    assert x[224, 224].tolist() == [0, 0, 255]  # red, in BGR order
    assert x[:100].mean() > 250 and abs(x[112:336, :, 2].mean() - 255) < 1e-3  # the image in the middle half
    small = prepare(Image.new("RGB", (20, 20), (0, 0, 255)), 448)
    assert small[0, 0].tolist() == [255, 0, 0]  # enlarged (Lanczos) without padding: blue is B in BGR


@pytest.fixture
def tagged(tmp_path, tiny_model) -> Project:
    """Solid-colour images without captions (one with a sidecar), a tiny tagger, tag.model set."""
    from PIL import Image

    shutil.copytree(tiny_model / "model", tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (48, 48), rgb).save(images / f"{name}.png")
    Image.new("RGB", (48, 24), COLOURS["red"]).save(images / "wide_red.png")  # padded with white before tagging
    (images / "green.txt").write_text("a green square")
    make_tiny_tagger(tmp_path / "tagger", side=SIDE)
    from conftest import SMALL_SETTINGS

    settings = json.loads(json.dumps(SMALL_SETTINGS))
    settings["tag"] = {"model": "tagger"}
    return Project(tmp_path, settings)


def expected_caption(name: str, **over) -> str:
    """The caption the tiny tagger's formula gives an image of the tagged fixture (its padded BGR means)."""
    from PIL import Image

    with Image.open(name) as im:
        means = prepare(im.convert("RGB"), SIDE).mean(axis=(0, 1)) / 255.0
    return caption_of(tiny_tag_scores(means), **over)


def captions(project) -> dict[str, str]:
    manifest = max(project.manifests("caption"), key=lambda p: p.stat().st_mtime_ns)
    return {i["path"]: i["caption"] for i in json.loads(manifest.read_text())["record"]["items"]}


def test_tagger_captions_images_and_a_new_threshold_runs_no_model(tagged):
    out = tagged.run_json()
    assert actions(out)["tag"] == "ran" and actions(out)["lora1"] == "ran"
    got = captions(tagged)
    assert got["green.png"] == "a green square"  # fill-missing keeps a sidecar caption
    for name in ("red", "blue", "cyan", "wide_red"):
        assert got[f"{name}.png"] == expected_caption(tagged.root / "images" / f"{name}.png"), name
    assert got["red.png"] == "red theme, ^_^" and got["cyan.png"].endswith(
        "^_^, white background, hatsune miku (vocaloid)"
    )
    assert "white background" in got["wide_red.png"]  # the white padding shows
    record = json.loads(tagged.manifests("caption")[-1].read_text())["record"]["tagging"]
    assert record["from_tags"] == 4 and record["kept"] == 1 and record["top_tags"]["^_^"] == 4

    # New rules: the tag stage is reused (no model runs), the caption table changes, no latent is encoded again.
    tagged.write_config(tag={"model": "tagger", "general_threshold": 0.45, "mode": "append", "rating": "first"})
    out = tagged.run_json()
    acts = {s["name"]: (s["action"], s.get("summary", "")) for s in out["stages"]}
    assert acts["tag"][0] == "reused" and acts["caption"][0] == "ran"
    assert acts["latents"][1].startswith("0 encoded")
    got = captions(tagged)
    assert got["red.png"] == "explicit, red theme, ^_^"
    green = expected_caption(tagged.root / "images" / "green.png", general_threshold=0.45, rating="first")
    assert green.startswith("general, green theme") and got["green.png"] == "a green square, " + green
    assert got["wide_red.png"] == expected_caption(
        tagged.root / "images" / "wide_red.png", general_threshold=0.45, rating="first"
    )


def test_replace_mode_ignores_sidecars_and_empty_tags_fall_back_to_default_caption(tagged):
    tagged.write_config(tag={"model": "tagger", "mode": "replace", "general_threshold": 1, "character_threshold": 1})
    text = tagged.cli("inspect", "dataset", "-c", str(tagged.config)).output
    assert "4 image(s) without a caption (tag.mode = replace: the tagger's tags, else an error)" in text
    result = tagged.cli("run", "lora", "--dry-run")
    assert result.exit_code == 0, result.output
    result = tagged.cli("run", "lora")
    assert result.exit_code == 2
    no_tags = "has no caption file and the tagger gave it no tag above tag.general_threshold / character_threshold"
    assert no_tags in result.output
    assert "green.txt is ignored (tag.mode = replace) and the tagger gave it no tag" in result.output
    assert "data.default_caption" in result.output and "Traceback" not in result.output
    tagged.write_config(data={"default_caption": "a colour"})
    tagged.run_json()
    got = captions(tagged)
    assert got["green.png"] == "a colour" and got["red.png"] == "a colour"


def test_tagger_errors_name_the_file_and_the_fix(tagged):
    (tagged.root / "tagger" / "selected_tags.csv").unlink()
    result = tagged.cli("run", "lora")
    assert result.exit_code == 2 and "has no selected_tags.csv" in result.output
    assert "SmilingWolf/wd-vit-tagger-v3" in result.output and "Traceback" not in result.output

    make_tiny_tagger(tagged.root / "tagger", side=SIDE, tags=TINY_TAGS[:-1])  # 9 tags listed, the model gives 10
    shutil.copy(tagged.root / "tagger" / "selected_tags.csv", tagged.root / "short.csv")
    make_tiny_tagger(tagged.root / "tagger", side=SIDE)
    shutil.copy(tagged.root / "short.csv", tagged.root / "tagger" / "selected_tags.csv")
    result = tagged.cli("run", "lora")
    assert result.exit_code == 2 and "selected_tags.csv lists 9 tags" in result.output, result.output
    assert "different taggers" in result.output

    (tagged.root / "tagger" / "selected_tags.csv").write_text("id,tag\n1,x\n")
    result = tagged.cli("run", "lora")
    assert result.exit_code == 2 and "not the header tag_id,name,category,count" in result.output

    (tagged.root / "tagger" / "model.onnx").write_bytes(b"not a model")
    make_tiny_tagger(tagged.root / "other", side=SIDE)
    shutil.copy(tagged.root / "other" / "selected_tags.csv", tagged.root / "tagger" / "selected_tags.csv")
    result = tagged.cli("run", "lora")
    assert result.exit_code == 2 and "onnxruntime cannot load" in result.output and "Download it again" in result.output


def test_a_missing_onnxruntime_is_named_with_the_extra_before_anything_runs(tagged, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    result = tagged.cli("run", "lora")
    assert result.exit_code == 2, result.output
    assert "tag.model needs onnxruntime" in result.output and "lora-pipeline[tagger]" in result.output
    assert not tagged.manifests("caption")  # refused before any stage ran


def test_tag_settings_change_exactly_the_caption_table_and_downstream(tagged):
    from test_keys import keys

    base = keys(tagged, workflow="lora")
    assert set(base) == {"tag", "caption", "latents", "text", "lora1"}
    rule_overrides = [
        "tag.mode='append'", "tag.general_threshold=0.5", "tag.character_threshold=0.5", "tag.rating='last'",
        "tag.character_tags_first=true", "tag.character_tag_expand=true", "tag.always_first_tags=['x']",
        "tag.replace_tags={a='b'}", "tag.remove_underscore=false", "tag.undesired_tags=['x']",
    ]  # fmt: skip
    for override in rule_overrides:
        new = keys(tagged, override, workflow="lora")
        assert {s for s in base if base[s] != new[s]} == {"caption", "latents", "text", "lora1"}, override
    new = keys(tagged, "tag.batch_size=2", workflow="lora")
    assert {s for s in base if base[s] != new[s]} == set(base)
    tagged.settings.pop("tag")
    tagged.write_config()
    plain = keys(tagged, workflow="lora")
    assert "tag" not in plain and plain["caption"] != base["caption"]
    # without tag.model the [tag] rules are not read: the caption table keeps its key
    assert keys(tagged, "tag.general_threshold=0.5", workflow="lora") == plain


def test_transfer_and_differential_tag_their_images(tagged, tiny_model):
    from test_keys import keys

    shutil.copytree(tiny_model / "student", tagged.root / "student")
    tagged.write_config(schedule={"steps": 2, "batch_size": 2, "heldout": 2}, transfer={"student_model": "student"})
    assert list(keys(tagged))[:2] == ["tag", "caption"]
    from conftest import make_pairs

    make_pairs(tagged.root / "pairs")
    diff = keys(tagged, "differential.pairs_dir='pairs'", workflow="differential")
    assert {"tag.red-circle.a", "tag.red-circle.b", "caption.red-circle.a"} <= set(diff)


@pytest.mark.slow
def test_a_killed_tag_run_resumes_to_the_bytes_of_an_uninterrupted_one(tagged, tmp_path):
    tagged.write_config(tag={"model": "tagger", "batch_size": 2})
    twin = twin_of(tagged, tmp_path / "twin")
    killed = tagged.subprocess("run", "lora", "--only", "tag", env={"LORA_PIPELINE_FAULT": "pool.put:3"})
    assert killed.returncode == -9, killed.stderr  # batch 1 committed, batch 2 written in part
    assert not tagged.manifests("tag")
    resumed = tagged.subprocess("run", "lora", "--only", "tag")
    assert resumed.returncode == 0, resumed.stderr
    assert "2/5 images already tagged" in resumed.stderr
    whole = run_cli(["run", "lora", "--only", "tag"], twin.root)
    assert whole.returncode == 0, whole.stderr
    assert tag_scores(tagged) == tag_scores(twin)


def tag_scores(project) -> dict[str, bytes]:
    from cache.store import Store

    record = json.loads(project.manifests("tag")[0].read_text())["record"]
    pool = Store(project.store).pool(record["pool"])
    got = pool.get_many(sorted(record["items"]), [record["items"][n]["digest"] for n in sorted(record["items"])])
    return {name: a.tobytes() for name, a in got.items()}


def twin_of(project: Project, where) -> Project:
    where.mkdir()
    twin = Project(where, project.settings)
    for folder in ("model", "images", "tagger"):
        shutil.copytree(project.root / folder, twin.root / folder)
    return twin


@pytest.mark.slow
def test_two_processes_split_the_tagging_and_a_killed_rank_s_rows_are_redone_by_one(tagged, tmp_path):
    from test_distributed import torchrun

    tagged.write_config(tag={"model": "tagger", "batch_size": 1})  # 5 batches: 3 on rank 0, 2 on rank 1
    one, two = twin_of(tagged, tmp_path / "one"), twin_of(tagged, tmp_path / "two")
    assert run_cli(["run", "lora", "--only", "tag"], one.root).returncode == 0
    both = torchrun(two, "--only", "tag")
    assert both.returncode == 0, both.stderr
    assert len(tag_scores(two)) == 5 and tag_scores(two) == tag_scores(one)
    pool = json.loads(two.manifests("tag")[0].read_text())["record"]["pool"]
    logs = sorted(p.name for p in (two.store / "pools" / pool).glob("committed*.jsonl"))
    assert logs == ["committed.jsonl"], logs  # rank 0 folded rank 1's log into the pool's

    killed = torchrun(tagged, "--only", "tag", env={"LORA_PIPELINE_FAULT": "tag.batch:1@1"})  # rank 1's 1st batch
    assert killed.returncode != 0 and not tagged.manifests("tag")
    resumed = tagged.subprocess("run", "lora", "--only", "tag")
    assert resumed.returncode == 0, resumed.stderr
    assert "images already tagged" in resumed.stderr
    assert tag_scores(tagged) == tag_scores(one)
