"""Delta transfer end to end on tiny models: reuse, the contract, determinism across phases, the identity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import actions


def run(project, *args: str) -> dict:
    return project.run_json(*args, workflow="transfer")


def manifest(project, stage: str, key: str) -> dict:
    return json.loads((project.store / "stages" / stage / key / "manifest.json").read_text())


def keys_of(report: dict) -> dict[str, str]:
    return {s["name"]: s["key"] for s in report["stages"]}


def test_transfer_runs_then_student_settings_rerun_only_the_student(transfer_project):
    first = run(transfer_project)
    assert set(actions(first).values()) == {"ran"}
    student = manifest(transfer_project, "student", keys_of(first)["student"])
    assert {"student.safetensors", "diffusers/pytorch_lora_weights.safetensors", "loss.csv", "fidelity.csv"} <= set(
        student["outputs"]
    )
    # Every manifest carries the contract; the student's is the teacher's plus its own model's side.
    for stage in ("schedule", "teacher", "prior", "student"):
        c = manifest(transfer_project, stage, keys_of(first)[stage])["contract"]
        assert c["steps"] == 6 and c["batch_size"] == 2 and c["prediction_type"] == "epsilon"
        assert c["latent_space"]["scaling_factor"] == 5.0 and "dataset" in c  # TINY_VAE_SCALING
    for override in ("student.lr=5e-4", "student.guidance=2.0", "student.steps=3", "student.rank=2"):
        again = run(transfer_project, "--set", override)
        ran = {s for s, a in actions(again).items() if a == "ran"}
        assert ran == {"student"}, override
    assert set(actions(run(transfer_project)).values()) == {"reused"}


def test_schedule_change_reruns_the_teacher_and_says_why(transfer_project):
    run(transfer_project)
    status = transfer_project.cli("status", "transfer", "--set", "schedule.seed=7", "--json")
    assert status.exit_code == 0, status.output
    why = {s["name"]: s["causes"] for s in json.loads(status.stdout)["stages"]}
    assert why["schedule"] == ["params schedule.seed 42 → 7"]
    assert "params schedule.seed 42 → 7" in why["teacher"][0]  # upstream schedule changed (params ...)
    report = run(transfer_project, "--set", "schedule.seed=7")
    assert {s for s, a in actions(report).items() if a == "ran"} == {"schedule", "teacher", "prior", "student"}


def test_only_student_against_a_teacher_of_another_contract_fails_with_a_diff(transfer_project):
    run(transfer_project)
    before = sorted(p.parent.name for p in transfer_project.manifests("student"))
    result = transfer_project.cli(
        "run", "transfer", "--only", "student", "--set", "schedule.steps=4", "--set", "schedule.batch_size=1"
    )
    assert result.exit_code == 2, result.output
    out = result.output
    assert "--only student: the upstream artifacts" in out
    assert "steps: config 4, artifact 6" in out and "batch_size: config 1, artifact 2" in out
    assert "Two ways out" in out and "pipeline run transfer" in out
    assert "Traceback" not in out
    assert sorted(p.parent.name for p in transfer_project.manifests("student")) == before  # nothing written
    # A student-only setting is free to change under --only.
    report = run(transfer_project, "--only", "student", "--set", "student.lr=3e-4")
    assert actions(report) == {"student": "ran"}


def test_student_replays_bit_identical_inputs_for_every_step(transfer_project):
    """The teacher stores a digest of the x_t, t and captions of every step; the student rebuilds them from the
    schedule alone (another process, the same CPU noise seeds) and matches all of them, or training stops."""
    from cache.store import Manifest, Store
    from stages.families import get_family
    from stages.families.noise import make_process
    from stages.pools import load_latent_table, load_text_table
    from stages.student import TransferBatches
    from stages.training.schedule import ScheduleMismatch, read_schedule

    transfer_project.write_config(schedule={"steps": 5, "batch_size": 2, "grad_accum": 2, "caption_dropout": 0.3})
    keys = keys_of(run(transfer_project))
    store = Store(transfer_project.store)
    m = {s: Manifest.from_json(manifest(transfer_project, s, k)) for s, k in keys.items()}
    doc, spec = read_schedule(store, m["schedule"])
    assert len(doc["rows"]) == 5 * 2 * 2 and any(r["caption"] == "" for r in doc["rows"])  # dropout materialized
    family = get_family("sd15")
    process = make_process(m["schedule"].contract["timesteps"], "epsilon")
    cond, row_of = load_text_table(store, m["prior"].record["text"])
    latents = load_latent_table(store, m["latents"].record, {r["latent"] for r in doc["rows"]})
    batches = TransferBatches(family, doc, spec, latents, cond, row_of, store, m["teacher"], m["prior"], 1.0)
    for k in range(spec.micro_steps):
        x_t, t, _, captions = batches.inputs(k, process)
        batches.verify(k, x_t, t, captions)  # raises at the end of a step whose digest differs
    # The conditioning: the same strings give the same embeddings on both sides (one text encoder here).
    t_cond, t_row = load_text_table(store, m["teacher"].record["text"])
    for caption, row in row_of.items():
        assert np.array_equal(cond[row].embeds.numpy(), t_cond[t_row[caption]].embeds.numpy())
    # A changed schedule row is caught: one timestep moved by one.
    doc["rows"][5]["t"] += 1
    with pytest.raises(ScheduleMismatch, match="step 2"):
        for k in range(4):
            x_t, t, _, captions = batches.inputs(k, process)
            batches.verify(k, x_t, t, captions)


def test_noise_is_checked_against_its_digest():
    from stages.training.schedule import ScheduleMismatch, noise_digest, rebuild_inputs, slot_noise

    class Identity:
        def noisy_input(self, x0, noise, t):
            return x0 + noise

        def as_tensor(self, values):
            return torch.tensor(values)

    row = {"k": 0, "slot": 0, "latent": "a", "t": 5, "noise_seed": 123, "noise_digest": ""}
    row["noise_digest"] = noise_digest(slot_noise(123, (4, 2, 2)))
    latents = {"a": np.zeros((4, 2, 2), np.float32)}
    x_t, t, noise = rebuild_inputs([row], latents, Identity())
    assert np.array_equal(x_t[0].numpy(), slot_noise(123, (4, 2, 2)).numpy())
    with pytest.raises(ScheduleMismatch, match="k=0 slot=0"):
        rebuild_inputs([{**row, "noise_seed": 124}], latents, Identity())


def test_identity_teacher_equals_student_with_teacher_init_starts_at_zero_loss(transfer_project):
    """teacher = student, g = 1, student LoRA = L: target = S + (T_L − T) = T_L = S_L, so the first loss is 0 up to
    fp32 rounding (~1e-7 relative on predictions of size ~1, squared: ~1e-14); and fidelity starts perfect."""
    transfer_project.write_config(
        transfer={"student_model": "model", "delta_dtype": "fp32"}, student={"init": "teacher", "guidance": 1.0}
    )
    keys = keys_of(run(transfer_project))
    rec = manifest(transfer_project, "student", keys["student"])["record"]
    assert rec["first_loss"] < 1e-10
    start = rec["fidelity"]["curve"][0]
    assert start["step"] == 0 and start["cosine"] > 0.9999 and start["rel_error"] < 1e-4
    # The control: from a zero LoRA the first loss is the mean squared delta, far from 0.
    keys = keys_of(run(transfer_project, "--set", "student.init='zero'"))
    rec = manifest(transfer_project, "student", keys["student"])["record"]
    assert rec["first_loss"] > 1e-8 and rec["fidelity"]["curve"][0]["cosine"] == 0.0


def test_on_the_fly_prior_trains_the_same_student_as_the_materialized_one(transfer_project):
    a = keys_of(run(transfer_project))
    b = keys_of(run(transfer_project, "--set", "student.prior='on_the_fly'"))
    assert a["teacher"] == b["teacher"] and a["prior"] != b["prior"]
    la = manifest(transfer_project, "student", a["student"])["record"]
    lb = manifest(transfer_project, "student", b["student"])["record"]
    assert lb["first_loss"] == pytest.approx(la["first_loss"], rel=1e-5)
    assert lb["final_loss"] == pytest.approx(la["final_loss"], rel=1e-3)


def test_bf16_runs_store_the_base_in_bf16_with_previews_fidelity_and_the_on_the_fly_prior(transfer_project):
    """mixed_precision = bf16 keeps the frozen base in bf16: the previews, the student's fidelity and its on-the-fly
    prior (the base model's own prediction) run under the training's autocast, as its steps do."""
    transfer_project.write_config(**{"runtime.preview": {"every": 3, "width": 32, "height": 32, "steps": 2}})
    keys = keys_of(
        run(transfer_project, "--set", "lora1.mixed_precision='bf16'", "--set", "student.mixed_precision='bf16'",
            "--set", "student.prior='on_the_fly'")
    )  # fmt: skip
    for stage in ("lora1", "student"):
        assert list((transfer_project.root / "output/transfer" / stage / "previews").glob("step*.png")), stage
    record = manifest(transfer_project, "student", keys["student"])["record"]
    assert math.isfinite(record["final_loss"]) and record["fidelity"]["curve"]
    assert all(math.isfinite(c["cosine"]) for c in record["fidelity"]["curve"])


def test_narrow_teacher_and_prior_weights_are_their_own_artifacts_close_to_fp32(transfer_project):
    """transfer.weights_dtype keeps the teacher's and the stored prior's weights in fp16/bf16/fp8 and computes in
    fp32: new keys for both (and so the student), fp32 again reusing the first run's artifacts, and values near the
    fp32 ones (fp16 nearest, fp8 farthest) but not equal to them."""
    from cache.store import Store

    fp32 = keys_of(run(transfer_project))
    store = Store(transfer_project.store)

    def arrays(keys):
        out = []
        for stage, name in (("teacher", "0000000.c"), ("teacher", "heldout.c"), ("prior", "0000000")):
            record = manifest(transfer_project, stage, keys[stage])["record"]
            out.append(store.pool(record["pool"]).get(name).astype(np.float32))
        return out

    exact = arrays(fp32)
    errors = {}
    narrowest = "transfer.weights_dtype='fp8'"
    for dtype in ("fp16", "bf16", "fp8"):
        report = run(transfer_project, "--set", f"transfer.weights_dtype='{dtype}'")
        assert {s for s, a in actions(report).items() if a == "ran"} == {"teacher", "prior", "student"}, dtype
        keys = keys_of(report)
        assert manifest(transfer_project, "teacher", keys["teacher"])["record"]["weights_dtype"] == dtype
        assert math.isfinite(manifest(transfer_project, "student", keys["student"])["record"]["final_loss"])
        errors[dtype] = []
        for want, got in zip(exact, arrays(keys), strict=True):
            assert np.isfinite(got).all() and not np.array_equal(want, got), dtype
            errors[dtype].append(float(np.abs(got - want).mean() / np.abs(want).mean()))
    # the stored deltas are fp16 (transfer.delta_dtype): their own rounding, ~0.05%, is under every error here
    assert max(errors["fp16"]) < 0.005 and max(errors["bf16"]) < 0.03 and max(errors["fp8"]) < 0.3, errors
    assert all(f < b < e for f, b, e in zip(errors["fp16"], errors["bf16"], errors["fp8"], strict=True)), errors
    assert set(actions(run(transfer_project)).values()) == {"reused"}  # fp32 again: the first run's artifacts
    shown = transfer_project.cli("inspect", "teacher", "-c", str(transfer_project.config), "--set", narrowest)
    assert shown.exit_code == 0 and "teacher weights fp8 (computed in fp32)" in shown.output, shown.output


def test_cfg_mode_stores_unconditional_deltas_and_trains(transfer_project):
    from cache.store import Store

    keys = keys_of(run(transfer_project, "--set", "transfer.delta_mode='cfg'", "--set", "student.guidance=2.0"))
    teacher = manifest(transfer_project, "teacher", keys["teacher"])
    assert "0000000.u" in teacher["record"]["arrays"] and "heldout.u" in teacher["record"]["arrays"]
    pool = Store(transfer_project.store).pool(teacher["record"]["pool"])
    c, u = pool.get("0000000.c").astype(np.float32), pool.get("0000000.u").astype(np.float32)
    assert np.abs(u).mean() > 0 and not np.allclose(c, u)  # the empty caption moves the teacher differently
    assert "" in teacher["record"]["text"]["strings"]  # the unconditional caption was encoded
    student = manifest(transfer_project, "student", keys["student"])["record"]
    assert np.isfinite(student["final_loss"])


@pytest.mark.parametrize(
    "edit, field",
    [
        (
            ("vae/config.json", "scaling_factor", 0.13025),
            "latent_space.scaling_factor: upstream 5, this stage 0.13025",
        ),
        (("scheduler/scheduler_config.json", "prediction_type", "v_prediction"), "prediction_type: upstream 'epsilon'"),
        (("scheduler/scheduler_config.json", "num_train_timesteps", 500), "timesteps.num_train_timesteps"),
    ],
)
def test_a_student_outside_the_teachers_space_is_refused_before_any_work(transfer_project, edit, field):
    path, key, value = edit
    cfg_path = transfer_project.root / "student" / path
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    result = transfer_project.cli("run", "transfer")
    assert result.exit_code == 2, result.output
    assert field in result.output and "transfer.student_model" in result.output
    assert not transfer_project.store.exists() or not transfer_project.manifests("caption")  # nothing ran


def test_student_steps_beyond_the_schedule_is_a_config_error(transfer_project):
    result = transfer_project.cli("run", "transfer", "--set", "student.steps=9")
    assert result.exit_code == 2
    assert "student.steps = 9 is more than the schedule's 6 steps" in result.output


def test_teacher_init_with_another_rank_is_refused_before_any_work(transfer_project):
    result = transfer_project.cli("run", "transfer", "--set", "student.init='teacher'", "--set", "student.rank=2")
    assert result.exit_code == 2
    assert "Set student.rank = 4 and student.alpha = 8" in result.output
    assert not transfer_project.manifests("caption")


def test_an_existing_lora_file_is_imported_and_gives_the_same_deltas(transfer_project):
    """transfer.teacher_lora = the kohya file lora1 wrote: the teacher's deltas equal those of the trained lora1."""
    from cache.store import Store

    trained = keys_of(run(transfer_project))
    lora_file = transfer_project.root / "output" / "transfer" / "lora1" / "lora1.safetensors"
    imported = keys_of(run(transfer_project, "--set", f"transfer.teacher_lora='{lora_file}'"))
    assert imported["lora1"] != trained["lora1"]
    rec = manifest(transfer_project, "lora1", imported["lora1"])["record"]
    assert rec["format"] == "kohya" and rec["rank"] == 4
    store = Store(transfer_project.store)
    pa = store.pool(manifest(transfer_project, "teacher", trained["teacher"])["record"]["pool"])
    pb = store.pool(manifest(transfer_project, "teacher", imported["teacher"])["record"]["pool"])
    for name in ("0000000.c", "0000005.c", "heldout.c"):
        np.testing.assert_allclose(pa.get(name).astype(np.float32), pb.get(name).astype(np.float32), atol=1e-3)


def test_a_lora_for_another_architecture_is_refused_with_the_file_named(transfer_project, tmp_path):
    from stages.families.tiny import tiny_unet
    from stages.training.lora_files import add_lora, lora_state_dict, save_kohya

    unet = tiny_unet(block_out_channels=(16, 32))  # the same module names, other widths
    add_lora(unet, 4, 4.0, 0.0, ["to_q", "to_k"], 0)
    bad = tmp_path / "other.safetensors"
    save_kohya(lora_state_dict(unet), 4, 4.0, bad, "lora_unet_", {})
    result = transfer_project.cli("run", "transfer", "--set", f"transfer.teacher_lora='{bad}'")
    assert result.exit_code == 2, result.output
    assert str(bad.name) in result.output and "another architecture" in result.output
    assert "Traceback" not in result.output
    missing = transfer_project.cli("run", "transfer", "--set", "transfer.teacher_lora='nope.safetensors'")
    assert missing.exit_code == 2 and "transfer.teacher_lora" in missing.output and "does not exist" in missing.output


def test_mixed_adapter_batch_gives_the_two_pass_predictions():
    """One forward on [x; x] with rows routed to __base__ and to the adapter equals two separate forwards."""
    import torch

    from stages.families import get_family
    from stages.families.base import Conditioning
    from stages.families.tiny import tiny_unet
    from stages.training.adapters import predict_both
    from stages.training.lora_files import add_lora

    unet = tiny_unet()
    add_lora(unet, 4, 8.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], 0)
    with torch.no_grad():  # a non-zero LoRA: B starts at zero
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    cond = Conditioning(torch.randn(3, 77, 32, generator=g), torch.ones(3, 77, dtype=torch.bool))
    t = torch.tensor([10, 500, 990])
    family = get_family("sd15")
    base_m, lora_m = predict_both(family, unet, "default", x, t, cond, "mixed")
    base_t, lora_t = predict_both(family, unet, "default", x, t, cond, "two_pass")
    torch.testing.assert_close(base_m, base_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_m, lora_t, atol=1e-5, rtol=1e-5)
    assert (lora_m - base_m).abs().mean() > 1e-3  # the adapter really moved the prediction


def test_the_teachers_hooked_lora_equals_the_peft_adapter():
    """FixedLora (the teacher's peft-free mixed batch) gives peft's predictions, for linear and conv LoRAs and
    both batchings: base rows untouched, adapted rows with up(down(x))·alpha/rank."""
    import torch

    from stages.families import get_family
    from stages.families.base import Conditioning
    from stages.families.tiny import tiny_unet
    from stages.training.adapters import FixedLora, predict_both
    from stages.training.lora_files import LoraModule, attach_lora_file

    g = torch.Generator().manual_seed(3)
    plain = tiny_unet().eval()
    layers = dict(plain.named_modules())
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1", "conv_in"]
    names += ["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"]
    modules = {}
    for i, name in enumerate(names):
        w = layers[name].weight
        r = 2 + i  # ranks and alphas differ per module
        down = torch.randn(r, *w.shape[1:], generator=g) * 0.3
        up = torch.randn(w.shape[0], r, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.3
        modules[name] = LoraModule(down, up, float(r + 1))
    adapted = tiny_unet().eval()
    attach_lora_file(adapted, modules, "teacher")
    hooked = FixedLora(plain, modules, "cpu")
    x = torch.randn(3, 4, 8, 8, generator=g)
    cond = Conditioning(torch.randn(3, 77, 32, generator=g), torch.ones(3, 77, dtype=torch.bool))
    t = torch.tensor([10, 500, 990])
    family = get_family("sd15")
    want_base, want_lora = predict_both(family, adapted, "teacher", x, t, cond, "two_pass")
    for batching in ("mixed", "two_pass"):
        base, with_lora = hooked.predict_both(family, x, t, cond, batching)
        torch.testing.assert_close(base, want_base, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(with_lora, want_lora, atol=1e-5, rtol=1e-5)
    assert (want_lora - want_base).abs().mean() > 1e-3
    assert not plain._forward_hooks and all(not m._forward_hooks for m in plain.modules())  # hooks removed


def test_a_missing_student_model_names_its_config_key(transfer_project):
    result = transfer_project.cli("run", "transfer", "--set", "transfer.student_model='turbo'")
    assert result.exit_code == 2
    assert "transfer.student_model:" in result.output and "turbo does not exist" in result.output
    assert transfer_project.cli("run", "lora").exit_code == 0  # the lora workflow never looks at the student


def test_held_out_images_never_enter_the_schedule_and_fidelity_reports_both(transfer_project):
    """schedule.heldout_images leaves images out of every training row; fidelity is measured on them and, as the
    fit, on new draws of the training images; both are in the record and fidelity.csv."""
    from cache.store import Manifest, Store
    from stages.training.schedule import read_schedule

    transfer_project.write_config(schedule={"heldout_images": 2, "heldout": 4})
    keys = keys_of(run(transfer_project))
    store = Store(transfer_project.store)
    doc, _ = read_schedule(store, Manifest.from_json(manifest(transfer_project, "schedule", keys["schedule"])))
    held = set(doc["heldout_items"])
    assert len(held) == 2
    assert not held & {r["item"] for r in doc["rows"]}
    assert {r["item"] for r in doc["heldout"]} <= held and not held & {r["item"] for r in doc["fit"]}
    rec = manifest(transfer_project, "student", keys["student"])
    final = rec["record"]["fidelity"]["final"]
    assert {"cosine", "rel_error", "fit_cosine", "fit_rel_error"} <= set(final)
    assert sorted(rec["record"]["fidelity"]["heldout_images"]) == sorted(held)
    # The split depends on the images' content and the seed: the same again, another with another seed.
    again, _ = read_schedule(store, Manifest.from_json(manifest(transfer_project, "schedule", keys["schedule"])))
    assert again["heldout_items"] == doc["heldout_items"]
    result = transfer_project.cli("run", "transfer", "--dry-run", "--set", "schedule.heldout_images=6")
    assert result.exit_code == 2 and "schedule.heldout_images = 6" in result.output and "6 images" in result.output
