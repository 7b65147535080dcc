"""What a kohya user's first hour tripped over (issue 15): help that reads right, --json on every command, --resume,
and an inspect that names the missing run instead of a setting."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

import cli


def commands(group=None, path=()):
    """(path, click command) of every command of the CLI."""
    group = group or typer.main.get_command(cli.app)
    for name, sub in group.commands.items():
        if hasattr(sub, "commands"):
            yield from commands(sub, (*path, name))
        else:
            yield (*path, name), sub


def test_every_command_takes_json():
    missing = [" ".join(p) for p, c in commands() if "--json" not in {o for prm in c.params for o in prm.opts}]
    assert missing == []


def test_help_shows_no_type_after_a_flag():
    for args in ([], ["run"], ["lora", "convert"], ["report"]):
        out = CliRunner().invoke(cli.app, [*args, "--help"]).output
        assert "<bool>" not in out, args
    out = CliRunner().invoke(cli.app, ["run", "--help"]).output
    assert "KEY=VALUE" in out and "--resume" not in out  # hidden: it is only there to explain itself


def test_resume_is_explained_and_the_run_goes_on(project):
    result = project.cli("run", "lora", "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert "--resume is not needed" in result.stderr and json.loads(result.stdout)["workflow"] == "lora"


def test_init_and_config_print_json(tmp_path, project):
    path = tmp_path / "new.toml"
    out = CliRunner().invoke(cli.app, ["init", str(path), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["written"] == str(path) and path.is_file()
    resolved = CliRunner().invoke(cli.app, ["config", "-c", str(project.config), "--set", "lora1.lr=0.002", "--json"])
    assert json.loads(resolved.stdout)["lora1"]["lr"] == 0.002
    keys = json.loads(CliRunner().invoke(cli.app, ["config", "--keys", "--json"]).stdout)
    assert {"key": "lora1.rank", "type": "int"}.items() <= next(k for k in keys if k["key"] == "lora1.rank").items()


def test_inspect_without_a_transfer_run_names_the_run_not_a_setting(project):
    project.run_json()  # a lora run only
    result = project.cli("inspect", "teacher", "-c", str(project.config))
    assert result.exit_code == 2
    assert "there is no transfer run in this store yet" in result.output and "`pipeline run transfer`" in result.output
    result = project.cli("inspect", "latents", "-c", str(project.config))
    assert "add --workflow lora" in result.output
    assert project.cli("inspect", "latents", "-c", str(project.config), "--workflow", "lora").exit_code == 0


def test_run_tables_show_short_keys_and_where_to_look(project):
    import re

    result = project.cli("run", "lora")
    assert result.exit_code == 0, result.output
    assert not re.search(r"[0-9a-f]{64}", result.stdout)  # no store path of a full key to wrap the table
    assert "store: caption " in result.stdout and "output/lora/lora1/" in result.stdout


def test_progress_of_a_per_pair_stage_names_the_pair(differential_project):
    result = differential_project.cli("run", "differential", "--json")
    assert result.exit_code == 0, result.output
    tasks = {json.loads(line)["task"] for line in result.stderr.splitlines() if line.startswith("{")}
    assert {"lora1.red-circle", "lora2.yellow-square"} <= tasks


def test_a_run_that_trained_ends_with_its_files_loss_and_next_commands(project):
    result = project.cli("run", "lora")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    final = json.loads((project.manifests("lora1")[0]).read_text())["record"]["final_loss"]
    assert f"lora1 trained: final loss {final:.4f}" in lines
    assert any("output/lora/lora1/lora1.safetensors  (kohya format: ComfyUI" in line for line in lines)
    assert any("diffusers/pytorch_lora_weights.safetensors  (diffusers format" in line for line in lines)
    assert any(line.startswith("Next: pipeline report lora") for line in lines)
    again = project.cli("run", "lora")  # nothing trained: the table alone
    assert "Next:" not in again.stdout


def test_keys_written_as_other_trainers_write_them_name_ours(project):
    """A config in kohya's or OneTrainer's spelling: every such key or section is named with its place here, or
    said to be not supported yet; nothing is accepted silently."""
    cases = {
        "learning_rate = 1e-4": "did you mean `lora1.lr`?",
        "network_dim = 16": "did you mean `lora1.rank`?",
        "train_data_dir = 'x'": "did you mean `data.images`?",
        "max_train_epochs = 10": "not supported yet",
        "[train]\nlr = 1e-4": "its settings go under `[lora1]`",
        "[training_arguments]\nlearning_rate = 1e-4": "`pipeline import kohya FILE`",
    }
    text = project.config.read_text()
    for line, hint in cases.items():
        project.config.write_text(line + "\n" + text if not line.startswith("[") else text + "\n" + line + "\n")
        result = project.cli("config", "-c", str(project.config))
        assert result.exit_code == 2 and hint in result.output, (line, result.output)
    project.config.write_text(text)
    project.write_config(data={"images": "images", "shuffle_caption": True})  # a kohya name that is ours too
    assert project.cli("config", "-c", str(project.config)).exit_code == 0
