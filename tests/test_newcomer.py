"""What a kohya user's first hour tripped over (issue 15): help that reads right, --json on every command, --resume,
and an inspect that names the missing run instead of a setting."""

from __future__ import annotations

import json

import pytest
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
    said to be not supported; nothing is accepted silently."""
    cases = {
        "learning_rate = 1e-4": "did you mean `lora1.lr`?",
        "network_dim = 16": "did you mean `lora1.rank`?",
        "train_data_dir = 'x'": "did you mean `data.images`?",
        "max_train_epochs = 10": "did you mean `lora1.epochs`?",
        "output_name = 'x'": "did you mean `lora1.output_name`?",
        "save_every_n_epochs = 1": "lora1.save_every_steps",
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


# -- results a user can find and keep ----------------------------------------------------------------------------


def tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def cli_in(project, *args):
    return project.cli(*args, "-c", str(project.config))


def test_history_lists_earlier_runs_and_export_brings_one_back(project, tmp_path):
    project.run_json()
    out = project.root / "output" / "lora" / "lora1"
    first = (out / "lora1.safetensors").read_bytes()
    rerun = project.cli("run", "lora", "-c", str(project.config), "--set", "lora1.lr=0.0005", "--no-progress")
    assert rerun.exit_code == 0, rerun.output
    old_key = json.loads((project.store / "refs" / "lora.json").read_text())["run"]["stages"][3]["replaced"]
    assert f"pipeline export lora1 --key {old_key[:8]}" in rerun.stdout  # the run says how to get the old one back
    assert (out / "lora1.safetensors").read_bytes() != first  # the output folder holds the last run's LoRA

    report = json.loads(cli_in(project, "history", "lora1", "--json").stdout)
    runs = report["runs"]
    assert len(runs) == 2 and runs[0]["changes"] == []
    assert "params lora1.lr 0.001 → 0.0005" in runs[1]["changes"]
    assert runs[0]["current"] == [] and runs[1]["current"] == ["lora: lora1"]
    assert runs[0]["steps"] == 6 and isinstance(runs[0]["final_loss"], float)
    text = cli_in(project, "history", "lora1").stdout
    assert "params lora1.lr 0.001 → 0.0005" in text and f"pipeline export lora1 --key {runs[0]['key'][:8]}" in text

    back = tmp_path / "first.safetensors"
    done = cli_in(project, "export", "lora1", "--key", runs[0]["key"][:8], "--out", str(back))
    assert done.exit_code == 0, done.output
    assert back.read_bytes() == first  # the first run's file, byte for byte
    again = cli_in(project, "export", "lora1", "--key", runs[0]["key"][:8], "--out", str(back))
    assert again.exit_code == 0 and "already there" in again.stdout
    other = cli_in(project, "export", "lora1", "--key", runs[1]["key"][:8], "--out", str(back))
    assert other.exit_code == 2 and "not overwritten" in other.output and back.read_bytes() == first
    diffusers = tmp_path / "d.safetensors"
    assert cli_in(project, "export", "lora1", "--format", "diffusers", "--out", str(diffusers)).exit_code == 0
    assert diffusers.read_bytes() == (out / "diffusers" / "pytorch_lora_weights.safetensors").read_bytes()

    missing = cli_in(project, "export", "lora1", "--key", "ffffffff", "--out", str(tmp_path / "x.safetensors"))
    assert missing.exit_code == 2 and "pipeline history lora1" in missing.output
    unknown = cli_in(project, "history", "lora9")
    assert unknown.exit_code == 2 and "unknown stage 'lora9'" in unknown.output and "lora1" in unknown.output
    dry = cli_in(project, "gc", "--dry-run")
    assert "pipeline export" in dry.stdout  # gc says how to keep an earlier LoRA before it goes


def test_output_name_and_save_precision_re_export_without_training(project):
    import torch

    project.run_json()
    out = project.root / "output" / "lora" / "lora1"
    fp32 = tensors(out / "lora1.safetensors")
    assert metadata(out / "lora1.safetensors")["ss_output_name"] == "lora1"
    report = project.run_json("--set", "lora1.output_name='my-char'", "--set", "lora1.save_precision='fp16'")
    assert {s["action"] for s in report["stages"]} == {"reused"}  # nothing trains again
    assert not (out / "lora1.safetensors").exists()  # the old export was ours: replaced by the new name
    half = tensors(out / "my-char.safetensors")
    assert half.keys() == fp32.keys() and all(v.dtype == torch.float16 for v in half.values())
    assert all(torch.equal(half[k], fp32[k].half()) for k in fp32)
    assert metadata(out / "my-char.safetensors")["ss_output_name"] == "my-char"
    diffusers = tensors(out / "diffusers" / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float16 for v in diffusers.values())
    bf16 = project.root / "bf16.safetensors"
    named = ("--set", "lora1.output_name='my-char'")  # export reads the config: --set works there too
    assert cli_in(project, "export", "lora1", "--precision", "bf16", "--out", str(bf16), *named).exit_code == 0
    assert all(v.dtype == torch.bfloat16 for v in tensors(bf16).values())
    assert metadata(bf16)["ss_output_name"] == "my-char"


def test_a_converted_export_is_not_rewritten_by_every_run(project, monkeypatch):
    from stages.training import outputs

    converted = []
    real = outputs.export_lora_file
    monkeypatch.setattr(outputs, "export_lora_file", lambda *a: converted.append(a[1].name) or real(*a))
    named = ("--set", "lora1.output_name='my-char'", "--set", "lora1.save_precision='bf16'")
    project.run_json(*named)
    assert sorted(converted) == [".my-char.safetensors.tmp", ".pytorch_lora_weights.safetensors.tmp"]
    converted.clear()
    project.run_json(*named)  # everything reused: the converted files of the same objects are not made again
    assert converted == []
    project.run_json("--set", "lora1.output_name='my-char'", "--set", "lora1.save_precision='fp16'")
    assert len(converted) == 2  # other settings: converted again


def test_the_lora_files_carry_the_training_settings_and_tag_frequencies(project):
    project.run_json()
    meta = metadata(project.root / "output" / "lora" / "lora1" / "lora1.safetensors")
    assert meta["ss_learning_rate"] == "0.001" and meta["ss_max_train_steps"] == "6"
    assert meta["ss_optimizer"].startswith("torch.optim.adamw.AdamW(") and meta["ss_lr_scheduler"] == "constant"
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_num_train_images"] == "6"
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_sd_model_name"] == "model"
    captions = [p.read_text() for p in sorted((project.root / "images").glob("*.txt"))]
    expected: dict[str, int] = {}
    for caption in captions:
        for tag in (t.strip() for t in caption.split(",")):
            expected[tag] = expected.get(tag, 0) + 1
    assert json.loads(meta["ss_tag_frequency"]) == {"images": expected}
    assert json.loads(meta["ss_dataset_dirs"]) == {"images": {"n_repeats": 1, "img_count": 6}}
    info = json.loads(
        project.cli("lora", "info", str(project.root / "output/lora/lora1/lora1.safetensors"), "--json").stdout
    )
    assert info["family"] == "sd15" and info["metadata"]["ss_output_name"] == "lora1"


def test_save_every_steps_keeps_the_lora_of_those_steps(project, tmp_path):
    import torch

    project.write_config(lora1={"save_every_steps": 2})
    project.run_json()
    steps = project.root / "output" / "lora" / "lora1" / "steps"
    assert sorted(p.name for p in steps.iterdir()) == ["lora1-step000002.safetensors", "lora1-step000004.safetensors"]
    assert metadata(steps / "lora1-step000002.safetensors")["ss_steps"] == "2"
    runs = json.loads(cli_in(project, "history", "lora1", "--json").stdout)["runs"]
    assert runs[-1]["saved_steps"] == [2, 4]
    kept = tmp_path / "s2.safetensors"
    assert cli_in(project, "export", "lora1", "--step", "2", "--out", str(kept)).exit_code == 0
    nope = cli_in(project, "export", "lora1", "--step", "3", "--out", str(tmp_path / "s3.safetensors"))
    assert nope.exit_code == 2 and "the steps kept are 2, 4" in nope.output
    # with a constant lr, the LoRA kept at step 2 is the LoRA of a 2-step run
    project.settings["lora1"].pop("save_every_steps")
    project.write_config(lora1={"steps": 2})
    project.run_json()
    two = tensors(project.root / "output" / "lora" / "lora1" / "lora1.safetensors")
    assert all(torch.equal(v, two[k]) for k, v in tensors(kept).items()) and kept.exists()


def test_epochs_count_images_times_repeats_per_batch(project):
    import math

    def lora1_steps(*sets):
        report = project.run_json("--dry-run", *sets)
        return next(s for s in report["stages"] if s["name"] == "lora1")

    del project.settings["lora1"]["steps"]
    project.write_config(lora1={"epochs": 2})  # 6 images, batch 2: 3 steps an epoch
    by_epochs = lora1_steps()
    project.settings["lora1"].pop("epochs")
    project.write_config(lora1={"steps": 2 * math.ceil(6 / 2)})
    assert lora1_steps()["key"] == by_epochs["key"]  # 2 epochs are those 6 steps, in the key
    both = project.cli("run", "lora", "--set", "lora1.epochs=2")
    assert both.exit_code == 2 and "lora1.steps and lora1.epochs are both set" in both.output


def test_the_transfer_schedule_takes_epochs_too(transfer_project):
    def keys():
        report = transfer_project.run_json("--dry-run", workflow="transfer")
        return {s["name"]: s["key"] for s in report["stages"]}

    by_steps = keys()  # schedule.steps = 6; 6 images, 2 held out (the default): 4 train, in batches of 2
    del transfer_project.settings["schedule"]["steps"]
    transfer_project.write_config(schedule={"epochs": 3})  # 2 steps an epoch
    assert keys() == by_steps
    transfer_project.write_config(schedule={"epochs": 2, "heldout_images": 0})  # all 6 train: 3 steps an epoch
    every_image = keys()
    transfer_project.settings["schedule"].pop("epochs")
    transfer_project.write_config(schedule={"steps": 6})
    assert keys() == every_image


# -- previews ----------------------------------------------------------------------------------------------------


def test_previews_are_on_by_default_four_a_run_in_labelled_cells(project):
    from PIL import Image

    project.write_config(**{"runtime.preview": {}})  # the defaults (tests otherwise leave previews off: conftest)
    project.run_json()
    previews = sorted((project.root / "output" / "lora" / "lora1" / "previews").glob("*.png"))
    assert [p.name for p in previews] == ["step000002.png", "step000004.png", "step000006.png"]  # 6 steps / 4
    with Image.open(previews[0]) as im:
        # one cell (the model's native 64 px, shown at 256) with the title above it and the label under it
        assert im.width >= 256 and im.height >= 256 + 2 * 18
    init = project.cli("init", str(project.root / "fresh.toml"))
    assert init.exit_code == 0 and "[runtime.preview]" in (project.root / "fresh.toml").read_text()


def test_each_preview_prompt_takes_its_own_settings():
    from pipeline.config import PreviewConfig
    from stages.training.previews import preview_specs

    pv = PreviewConfig(
        prompts=["a cat --n blurry, dark --w 512 --h 768 --s 28 --l 5.5 --d 42", {"prompt": "a dog", "seed": 7}],
        negative_prompt="lowres",
        steps=10,
    )
    cat, dog = preview_specs(pv, ["unused"])
    assert (cat.prompt, cat.negative_prompt, cat.width, cat.height) == ("a cat", "blurry, dark", 512, 768)
    assert (cat.steps, cat.guidance_scale, cat.seed) == (28, 5.5, 42)
    assert (dog.prompt, dog.negative_prompt, dog.seed, dog.steps, dog.width) == ("a dog", "lowres", 7, 10, None)
    assert [s.prompt for s in preview_specs(PreviewConfig(), ["the first caption"])] == ["the first caption"]
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="--x"):
        preview_specs(PreviewConfig(prompts=["a cat --x 3"]), [])
    with pytest.raises(ConfigError, match="multiple of 16"):
        preview_specs(PreviewConfig(prompts=["a cat --w 500"]), [])


def test_previews_render_each_prompt_at_its_size_seed_and_negative(project):
    from PIL import Image

    prompts = ["a red circle --w 32 --h 48 --s 2 --d 3 --n blue", {"prompt": "a square", "steps": 1, "seed": 5}]
    project.write_config(**{"runtime.preview": {"every": 6, "steps": 2, "prompts": prompts}})
    project.run_json()
    (preview,) = (project.root / "output" / "lora" / "lora1" / "previews").glob("*.png")
    with Image.open(preview) as im:
        assert im.width >= 2 * 192 and im.height >= 288  # 32x48 shown at 192x288 beside the native 64 px one


@pytest.mark.slow
def test_history_and_export_know_the_pairs_of_a_differential_run(differential_project, tmp_path):
    project = differential_project
    assert project.cli("run", "differential", "--no-progress").exit_code == 0
    runs = json.loads(cli_in(project, "history", "lora2", "--json").stdout)["runs"]
    assert sorted(u for r in runs for u in r["current"]) == [
        "differential: lora2.red-circle",
        "differential: lora2.yellow-square",
    ]
    ambiguous = cli_in(project, "export", "lora2", "--out", str(tmp_path / "x.safetensors"))
    assert ambiguous.exit_code == 2 and "several lora2 artifacts" in ambiguous.output
    out = tmp_path / "pair.safetensors"
    assert cli_in(project, "export", "lora1.red-circle", "--out", str(out)).exit_code == 0
    from cache.store import Store

    store = Store(project.store)
    key = store.read_ref("differential")["lora1.red-circle"]  # LoRA-1s are not exported: only the store has them
    digest = store.load_manifest("lora1", key).outputs["lora1.safetensors"]["digest"]
    assert out.read_bytes() == store.object_path(digest).read_bytes()


def test_export_names_what_is_wrong_with_its_arguments(project, tmp_path):
    none_yet = cli_in(project, "history", "lora1")
    assert none_yet.exit_code == 2 and "no lora1 artifact in the store" in none_yet.output
    project.run_json()
    cases = {
        ("--format", "onnx"): "--format onnx: use kohya or diffusers",
        ("--precision", "fp8"): "--precision fp8: use fp32, fp16 or bf16",
        ("--out", str(tmp_path / "missing" / "x.safetensors")): "does not exist",
        ("--out", str(tmp_path)): "is a folder; give a file name",
    }
    for args, message in cases.items():
        result = cli_in(project, "export", "lora1", *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    latents = cli_in(project, "export", "latents", "--out", str(tmp_path / "l.safetensors"))
    assert latents.exit_code == 2 and "latents artifacts hold none" in latents.output
