"""The config schema: strictness, overrides, generated docs and every shipped example."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from pipeline.config import PipelineConfig
from pipeline.config_loading import load_config, parse_override
from pipeline.schema_docs import config_reference_markdown, example_config_toml

REPO = Path(__file__).resolve().parent.parent


def test_docs_config_md_is_up_to_date():
    assert (REPO / "docs" / "config.md").read_text() == config_reference_markdown(), "run `make docs`"


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_validate(path):
    load_config(path)


def test_init_template_and_demo_config_validate(tmp_path):
    from pipeline.demo import demo_config_text

    for text in (example_config_toml(), demo_config_text()):
        (tmp_path / "c.toml").write_text(text)
        assert load_config(tmp_path / "c.toml").config == PipelineConfig.model_validate(
            __import__("tomllib").loads(text)
        )


def test_init_writes_the_template_and_refuses_to_overwrite(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    target = tmp_path / "pipeline.toml"
    assert CliRunner().invoke(app, ["init", str(target)]).exit_code == 0
    assert load_config(target).config == PipelineConfig()
    again = CliRunner().invoke(app, ["init", str(target)])
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.parametrize(
    "text, parts, value",
    [
        ("lora1.lr=5e-5", ["lora1", "lr"], 5e-5),
        ("lora1.steps=200", ["lora1", "steps"], 200),
        ("model.path=/models/sd15", ["model", "path"], "/models/sd15"),
        ('lora1.targets=["to_q", "to_v"]', ["lora1", "targets"], ["to_q", "to_v"]),
        ("runtime.preview.every=50", ["runtime", "preview", "every"], 50),
        ("data.caption_prefix='sks, '", ["data", "caption_prefix"], "sks, "),
    ],
)
def test_parse_override(text, parts, value):
    assert parse_override(text) == (parts, value)


def test_overrides_apply_and_are_validated(tmp_path):
    (tmp_path / "c.toml").write_text("[lora1]\nlr = 1e-4\n")
    loaded = load_config(tmp_path / "c.toml", ["lora1.lr=5e-5", "runtime.preview.every=10"])
    assert loaded.config.lora1.lr == 5e-5 and loaded.config.runtime.preview.every == 10
    with pytest.raises(ConfigError, match="`lora1.steps`.*greater than or equal to 1"):
        load_config(tmp_path / "c.toml", ["lora1.steps=0"])


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.toml").write_text('[data]\nimages = "imgs"\n')
    loaded = load_config(tmp_path / "sub" / "c.toml")
    assert loaded.resolve(loaded.config.data.images) == (tmp_path / "sub" / "imgs").resolve()


def test_invalid_toml_names_the_file(tmp_path):
    (tmp_path / "c.toml").write_text("[lora1\nlr = 1")
    with pytest.raises(ConfigError, match="c.toml is not valid TOML"):
        load_config(tmp_path / "c.toml")


def test_config_command_prints_the_resolved_config_and_the_key_reference(tmp_path):
    import tomllib
    from typer.testing import CliRunner

    from cli import app

    (tmp_path / "c.toml").write_text("[lora1]\nlr = 1e-4\n")
    result = CliRunner().invoke(app, ["config", "-c", str(tmp_path / "c.toml"), "--set", "lora1.rank=8"])
    assert result.exit_code == 0, result.output
    resolved = tomllib.loads(result.stdout)
    assert resolved["lora1"]["rank"] == 8 and resolved["lora1"]["lr"] == 1e-4
    assert "every" not in resolved["runtime"]["preview"]  # unset: previews every quarter of a stage's steps
    keys = CliRunner().invoke(app, ["config", "--keys"])
    assert "| `lr` | float |" in keys.stdout


@pytest.mark.parametrize(
    "kohya_key, ours",
    [
        ("network_dim", "rank"),
        ("network_alpha", "alpha"),
        ("learning_rate", "lr"),
        ("max_train_steps", "steps"),
        ("gradient_accumulation_steps", "grad_accum"),
        ("train_batch_size", "batch_size"),
    ],
)
def test_kohya_spellings_point_to_our_keys(tmp_path, kohya_key, ours):
    (tmp_path / "c.toml").write_text(f"[lora1]\n{kohya_key} = 1\n")
    with pytest.raises(ConfigError, match=f"unknown key `lora1.{kohya_key}`.*did you mean `lora1.{ours}`"):
        load_config(tmp_path / "c.toml")


def test_version():
    from typer.testing import CliRunner

    from cli import app
    from pipeline import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"lora-pipeline {__version__}"


def test_the_init_template_takes_subset_and_pair_tables_added_at_its_end(tmp_path):
    """`pipeline init` leaves the lists of tables commented out: [[data.subsets]] added as its comment says is no
    TOML error (a `subsets = []` line beside them was: the key set twice)."""
    images = tmp_path / "imgs"
    images.mkdir()
    target = tmp_path / "pipeline.toml"
    tables = '\n[[data.subsets]]\nimages = "imgs"\nnum_repeats = 3\n\n[[differential.pairs]]\nname = "p"\n'
    target.write_text(example_config_toml({"data": {"images": None}}) + tables + 'a = "a.png"\nb = "b.png"\n')
    config = load_config(target).config
    assert config.data.subsets[0].num_repeats == 3 and config.differential.pairs[0].name == "p"


def test_a_list_set_twice_names_the_key_and_the_line_to_delete(tmp_path):
    target = tmp_path / "pipeline.toml"
    target.write_text('[data]\nsubsets = []\n\n[[data.subsets]]\nimages = "imgs"\n')
    with pytest.raises(ConfigError) as e:
        load_config(target)
    assert "`data.subsets` is set twice" in str(e.value) and "delete the `subsets = []` line" in str(e.value)
