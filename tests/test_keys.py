"""Stage keys: every semantic setting changes the keys of the stages that use it; runtime settings change none."""

from __future__ import annotations

import pytest

from cache.keys import canonical_json
from cache.store import Store
from core.errors import ConfigError
from pipeline.config_loading import load_config
from pipeline.planner import plan_workflow
from pipeline.workflows import get_workflow
from stages.base import PlanEnv


@pytest.fixture
def project(transfer_project):
    """Keys are checked on the transfer workflow, whose stages are a superset of the lora workflow's."""
    return transfer_project


def keys(project, *overrides: str, workflow: str = "transfer") -> dict[str, str]:
    loaded = load_config(project.config, list(overrides))
    env = PlanEnv(loaded, Store(loaded.store_dir))
    return {p.name: p.key for p in plan_workflow(env, get_workflow(workflow, env), {})}


# (override, the first stage whose key must change; every stage downstream of it changes too)
SEMANTIC = [
    ("data.caption_prefix='sks, '", "caption"),
    ("data.caption_suffix=', photo'", "caption"),
    ("data.default_caption='a shape'", "caption"),
    ('data.caption_extensions=[".caption", ".txt"]', "caption"),
    ("latents.resolution=40", "latents"),
    ("data.alpha_mask=true", "latents"),  # the masks are stored with the latents
    ("latents.buckets=[[32, 32], [48, 16]]", "latents"),
    ("latents.crop='random'", "latents"),
    ("latents.flip_aug=true", "latents"),
    *[
        (f"lora1.{k}={v}", "lora1")
        for k, v in [
            ("rank", 8),
            ("alpha", 4.0),
            ("dropout", 0.1),
            ("targets", '["to_q"]'),
            ("lr", 5e-4),
            ("optimizer", "'prodigy'"),
            ("weight_decay", 0.0),
            ("lr_scheduler", "'cosine'"),
            ("warmup_steps", 3),
            ("steps", 7),
            ("batch_size", 1),
            ("grad_accum", 2),
            ("max_grad_norm", 0.5),
            ("mixed_precision", "'bf16'"),
            ("seed", 7),
            ("save_every_steps", 2),
        ]
    ],
    *[
        (f"schedule.{k}={v}", "schedule")
        for k, v in [("steps", 7), ("batch_size", 1), ("grad_accum", 2), ("seed", 7), ("caption_dropout", 0.1)]
    ],
    ("schedule.heldout=2", "schedule"),
    ("schedule.heldout_images=1", "schedule"),
    ("transfer.delta_mode='cfg'", "teacher"),
    ("transfer.delta_dtype='fp32'", "teacher"),
    ("transfer.uncond_caption='blank'", "none"),  # only read in cfg mode, so in cond mode it re-runs nothing
    ("student.prior='on_the_fly'", "prior"),
    *[
        (f"student.{k}={v}", "student")
        for k, v in [
            ("rank", 8),
            ("alpha", 4.0),
            ("dropout", 0.1),
            ("targets", '["to_q"]'),
            ("lr", 5e-4),
            ("optimizer", "'prodigy'"),
            ("weight_decay", 0.0),
            ("lr_scheduler", "'cosine'"),
            ("warmup_steps", 3),
            ("steps", 3),
            ("max_grad_norm", 0.5),
            ("mixed_precision", "'bf16'"),
            ("seed", 7),
            ("guidance", 2.5),
            ("init", "'teacher'"),
            ("save_every_steps", 2),
        ]
    ],
]
TRANSFER = ("caption", "latents", "text", "lora1", "schedule", "teacher", "prior", "student")
DOWNSTREAM = {
    "caption": set(TRANSFER),
    "latents": {"latents", "lora1", "schedule", "teacher", "prior", "student"},
    "lora1": {"lora1", "teacher", "student"},
    "schedule": {"schedule", "teacher", "prior", "student"},
    "teacher": {"teacher", "student"},
    "prior": {"prior", "student"},
    "student": {"student"},
    "none": set(),
}

RUNTIME = [
    "runtime.store='elsewhere'",
    "runtime.output_dir='out2'",
    "runtime.device='cpu'",
    "runtime.log_level='debug'",
    "runtime.checkpoint_every=5",
    "runtime.encode_batch_size=3",
    "runtime.progress_every=2.5",
    "runtime.log_with=['tensorboard']",
    "runtime.log_dir='logs2'",
    "runtime.wandb_project='p'",
    "runtime.wandb_mode='online'",
    "runtime.max_image_pixels=123456789",
    "runtime.preview.every=2",
    "runtime.preview.prompts=['x']",
    "runtime.preview.seed=3",
    "runtime.preview.steps=4",
    "runtime.preview.guidance_scale=1.0",
    "runtime.teacher_batching='two_pass'",
    "runtime.fidelity_every=2",
    "runtime.gradient_checkpointing=true",
    "runtime.attention='xformers'",  # (refused on a CPU when a run starts; planning keys it nowhere)
    "runtime.preview.ema=true",
    "runtime.preview.negative_prompt='blurry'",
    "runtime.preview.width=64",
    "runtime.preview.height=48",
    # what the exported files are called and their precision: the store keeps the trained fp32 files
    "lora1.output_name='my-lora'",
    "lora1.save_precision='fp16'",
    "student.output_name='my-turbo-lora'",
    "student.save_precision='bf16'",
]


TRAIN_FIELDS = [
    ("rank", 8), ("alpha", 2.0), ("dropout", 0.1), ("targets", '["to_q"]'), ("lr", 5e-4), ("optimizer", "'prodigy'"),
    ("weight_decay", 0.1), ("lr_scheduler", "'cosine'"), ("warmup_steps", 3), ("steps", 3), ("batch_size", 2),
    ("grad_accum", 2), ("max_grad_norm", 0.5), ("mixed_precision", "'bf16'"), ("seed", 7),
]  # fmt: skip
PAIRS = ("red-circle", "yellow-square")

# The training-method options (docs/training.md) on the DDPM project. Each changes its stages' keys; an option only
# read with another one (huber_* with a huber loss, the discount with pyramid noise, the adaptive scale with an
# offset) changes nothing alone and its stages' keys once that one is on. (override, stages, what it needs)
NOISE_FIELDS = [
    ("noise_offset", 0.05), ("multires_noise_iterations", 3), ("ip_noise_gamma", 0.1), ("min_timestep", 100),
    ("max_timestep", 900), ("zero_terminal_snr", "true"),
]  # fmt: skip
LOSS_FIELDS = [("loss", "'l1'"), ("min_snr_gamma", 5.0), ("debiased_estimation", "true")]
# the optimizer side (docs/training.md): warmup as a fraction (50% of 6 steps is 3), optimizer arguments, LoRA+,
# block-wise rates, EMA, the fused backward pass
OPTIM_FIELDS = [
    ("optimizer_args", "{eps = 1e-6}"), ("warmup_steps", "'50%'"), ("loraplus_lr_ratio", 4.0),
    ("block_lr", '{"mid_block" = 2.0}'), ("ema_decay", 0.99), ("optimizer", "'lion'"), ("optimizer", "'adafactor'"),
    ("rslora", "true"), ("fp8_base", "true"),
]  # fmt: skip
# the networks (tests/test_networks.py): LoRA-2 is a plain LoRA and PiSSA/OLoRA start only lora1-like stages
NETWORK_FIELDS = [("network", "'dora'"), ("network", "'loha'"), ("network", "'lokr'")]
INIT_FIELDS = [("lora_init", "'pissa'"), ("lora_init", "'olora'")]
NEEDS = {
    "lokr_factor": ("network='lokr'", 2),
    "adaptive_noise_scale": ("noise_offset=0.05", 0.01),
    "multires_noise_discount": ("multires_noise_iterations=3", 0.5),
    "huber_schedule": ("loss='huber'", "'constant'"),
    "huber_c": ("loss='huber'", 0.2),
    "huber_scale": ("loss='huber'", 2.0),
    "decay_steps": ("lr_scheduler='warmup_stable_decay'", "'50%'"),
    "lr_scheduler_num_cycles": ("lr_scheduler='cosine_with_restarts'", 3),
    "lr_scheduler_power": ("lr_scheduler='polynomial'", 2.0),
    "lr_scheduler_min_lr_ratio": ("lr_scheduler='cosine_with_min_lr'", 0.1),
    "ema_warmup": ("ema_decay=0.99", "false"),
    "ema_every": ("ema_decay=0.99", 2),
    "fused_backward": ("max_grad_norm=0.0", "true"),
}

OPTIM_NEEDS = [k for k in NEEDS if k not in ("adaptive_noise_scale", "multires_noise_discount", "lokr_factor")]
# The caption tricks (tests/test_captions.py): they change the strings the drawing stages see, lora1 and the schedule
# (and lora2 in differential), never the caption table; keep_tokens and the rest are read only with a tag operation.
CAPTION_FIELDS = [
    ("shuffle_caption", "true"), ("caption_dropout_rate", 0.1), ("caption_tag_dropout_rate", 0.1),
    ("caption_dropout_every_n_epochs", 2), ("enable_wildcard", "true"), ("secondary_separator", "';;;'"),
    ("token_warmup_step", "'50%'"),
]  # fmt: skip
CAPTION_NEEDS = {
    "keep_tokens": ("shuffle_caption=true", 1),
    "keep_tokens_separator": ("shuffle_caption=true", "'|||'"),
    "caption_separator": ("shuffle_caption=true", "';'"),
    "token_warmup_min": ("token_warmup_step=3", 2),
}
DRAWN = DOWNSTREAM["lora1"] | DOWNSTREAM["schedule"]
# the auto buckets' settings are read only with buckets = "auto" (tests/test_buckets.py); the crops' count only with
# random crops
AUTO_BUCKETS = "latents.buckets='auto';latents.min_bucket_reso=8;latents.max_bucket_reso=64;latents.bucket_reso_steps=8"
OPTIONS = [
    *[
        (f"latents.{k}={v}", DOWNSTREAM["latents"], AUTO_BUCKETS)
        for k, v in [("min_bucket_reso", 16), ("max_bucket_reso", 128), ("bucket_reso_steps", 16)]
    ],
    ("latents.bucket_no_upscale=true", DOWNSTREAM["latents"], AUTO_BUCKETS),
    ("latents.crop_variants=2", DOWNSTREAM["latents"], "latents.crop='random'"),
    *[(f"data.{k}={v}", DRAWN, None) for k, v in CAPTION_FIELDS],
    *[(f"data.{k}={v}", DRAWN, f"data.{base}") for k, (base, v) in CAPTION_NEEDS.items()],
    *[
        (f"lora1.{k}={v}", DOWNSTREAM["lora1"], None)
        for k, v in NOISE_FIELDS + LOSS_FIELDS + OPTIM_FIELDS + NETWORK_FIELDS + INIT_FIELDS
    ],
    *[(f"schedule.{k}={v}", DOWNSTREAM["schedule"], None) for k, v in NOISE_FIELDS],
    *[(f"student.{k}={v}", {"student"}, None) for k, v in LOSS_FIELDS + OPTIM_FIELDS + NETWORK_FIELDS],
    # optimizer_groups splits the fused backward pass's optimizer: refused without it (tests/test_optim.py)
    *[(f"transfer.weights_dtype='{d}'", {"teacher", "prior", "student"}, None) for d in ("fp16", "bf16", "fp8")],
    ("lora1.optimizer_groups=2", DOWNSTREAM["lora1"], "lora1.max_grad_norm=0.0;lora1.fused_backward=true"),
    ("student.optimizer_groups=2", {"student"}, "student.max_grad_norm=0.0;student.fused_backward=true"),
    *[
        (f"{section}.{k}={v}", stages, f"{section}.{base}")
        for section, stages, names in [
            ("lora1", DOWNSTREAM["lora1"], NEEDS),
            ("schedule", DOWNSTREAM["schedule"], ["adaptive_noise_scale", "multires_noise_discount"]),
            ("student", {"student"}, ["huber_schedule", "huber_c", "huber_scale", *OPTIM_NEEDS, "lokr_factor"]),
        ]
        for k in names
        for base, v in [NEEDS[k]]
    ],
]


def per_pair(*stages: str) -> set[str]:
    return {f"{s}.{p}" for s in stages for p in PAIRS}


# (override, the differential nodes whose keys change)
DIFFERENTIAL = [
    *[(f"differential.lora1.{k}={v}", per_pair("lora1", "lora2") | {"average", "eval"}) for k, v in TRAIN_FIELDS],
    *[(f"differential.lora2.{k}={v}", per_pair("lora2") | {"average", "eval"}) for k, v in TRAIN_FIELDS],
    ("differential.lora1_mode='merged'", per_pair("lora2") | {"average", "eval"}),
    ("differential.paired_noise=true", per_pair("lora2") | {"average", "eval"}),
    ("differential.average_rank=2", {"average", "eval"}),
    ("differential.eval_samples=3", {"eval"}),
    ("differential.eval_weights_dtype='bf16'", {"eval"}),
    *[
        (f"differential.{side}.{k}={v}", per_pair(*stages) | {"average", "eval"})
        for side, stages in [("lora1", ("lora1", "lora2")), ("lora2", ("lora2",))]
        for k, v in NOISE_FIELDS + LOSS_FIELDS + OPTIM_FIELDS + (NETWORK_FIELDS + INIT_FIELDS) * (side == "lora1")
    ],
    # read only with another option on (NEEDS): alone they change nothing (the adaptive scale and the fused backward
    # pass alone are refused; tested above)
    *[
        (f"differential.{side}.{k}={v}", set())
        for side in ("lora1", "lora2")
        for k, (_, v) in NEEDS.items()
        if k not in ("adaptive_noise_scale", "fused_backward")
    ],
    *[(f"data.{k}={v}", per_pair("lora1", "lora2") | {"average", "eval"}) for k, v in CAPTION_FIELDS],
    ("lora1.lr=1e-2", set()),  # the lora workflow's [lora1] is not differential's LoRA-1
    # read only with a trained text encoder, which differential refuses (tests/test_text_encoder_lora.py)
    *[
        (f"differential.{side}.{k}", set())
        for side in ("lora1", "lora2")
        for k in ("text_encoder_lr=1e-5", "loraplus_text_encoder_lr_ratio=2.0")
    ],
]


# The flow-matching settings, on a Z-Image transfer project whose samplers are logit-normal (so their mean and std
# are read). (override, the stages whose keys change)
FLOW_BASE = ("lora1.timestep_sampling='logit_normal'", "schedule.timestep_sampling='logit_normal'")
FLOW_FIELDS = [
    ("timestep_sampling", "'mode'"), ("logit_mean", 0.3), ("logit_std", 0.7), ("timestep_shift", "'none'"),
    ("shift", 2.0), ("loss_weighting", "'cosmap'"),
]  # fmt: skip
FLOW = [
    *[(f"lora1.{k}={v}", DOWNSTREAM["lora1"]) for k, v in FLOW_FIELDS],
    ("lora1.mode_scale=1.5", set()),  # read by the mode sampler only
    *[(f"schedule.{k}={v}", DOWNSTREAM["schedule"]) for k, v in FLOW_FIELDS if k != "loss_weighting"],
    ("schedule.mode_scale=1.5", set()),
    ("student.loss_weighting='sigma_sqrt'", {"student"}),
]
FLOW_DIFFERENTIAL = [
    *[(f"differential.lora1.{k}={v}", per_pair("lora1", "lora2") | {"average", "eval"}) for k, v in FLOW_FIELDS],
    ("differential.lora1.mode_scale=1.5", set()),
    *[(f"differential.lora2.{k}={v}", per_pair("lora2") | {"average", "eval"}) for k, v in FLOW_FIELDS],
    ("differential.lora2.mode_scale=1.5", set()),
]


@pytest.fixture
def zimage_project(tmp_path, tiny_flow_models):
    import json
    import shutil

    from conftest import TRANSFER_SETTINGS, Project, make_images, make_pairs

    shutil.copytree(tiny_flow_models / "zimage", tmp_path / "model")
    shutil.copytree(tiny_flow_models / "zimage-turbo", tmp_path / "student")
    make_images(tmp_path / "images", 4)
    make_pairs(tmp_path / "pairs")
    settings = json.loads(json.dumps(TRANSFER_SETTINGS))
    for section in ("lora1", "schedule", "differential.lora1", "differential.lora2"):
        settings.setdefault(section, {})["timestep_sampling"] = "logit_normal"
    return Project(tmp_path, settings)


@pytest.mark.parametrize("override, changed", FLOW, ids=[o for o, _ in FLOW])
def test_flow_setting_changes_exactly_its_stages(zimage_project, override, changed):
    base, new = keys(zimage_project), keys(zimage_project, override)
    assert {s for s in base if base[s] != new[s]} == changed


@pytest.mark.parametrize("override, changed", FLOW_DIFFERENTIAL, ids=[o for o, _ in FLOW_DIFFERENTIAL])
def test_flow_differential_setting_changes_exactly_its_nodes(zimage_project, override, changed):
    base = keys(zimage_project, workflow="differential")
    new = keys(zimage_project, override, workflow="differential")
    assert {n for n in base if base[n] != new[n]} == changed


def test_flow_settings_are_refused_by_name_on_a_ddpm_model(project):
    from core.errors import ConfigError

    for override, field in [
        ("lora1.timestep_sampling='logit_normal'", "lora1.timestep_sampling"),
        ("schedule.timestep_shift='static'", "schedule.timestep_shift"),
        ("lora1.loss_weighting='cosmap'", "lora1.loss_weighting"),
        ("student.loss_weighting='sigma_sqrt'", "student.loss_weighting"),
    ]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            keys(project, override)


@pytest.mark.parametrize("override, changed", DIFFERENTIAL, ids=[o for o, _ in DIFFERENTIAL])
def test_differential_setting_changes_exactly_its_nodes(differential_project, override, changed):
    if override == "differential.paired_noise=true":
        differential_project.write_config(**{"differential.lora2": {"seed": 42}})  # then only the stream differs
    base = keys(differential_project, workflow="differential")
    new = keys(differential_project, override, workflow="differential")
    assert {n for n in base if base[n] != new[n]} == changed


@pytest.mark.parametrize("override, changed, needs", OPTIONS, ids=[o for o, _, _ in OPTIONS])
def test_training_option_changes_exactly_its_stages(project, override, changed, needs):
    if needs is None:
        base, new = keys(project), keys(project, override)
    else:
        needs = needs.split(";")
        if "adaptive_noise_scale" in override:  # scales the offset: refused without one
            with pytest.raises(ConfigError, match=r"adaptive_noise_scale.*noise_offset"):
                keys(project, override)
        elif "fused_backward" in override or "optimizer_groups" in override:  # refused with clipping / alone
            with pytest.raises(ConfigError, match=r"fused_backward"):
                keys(project, override)
        else:
            assert keys(project, override) == keys(project)  # not read without `needs`
        base, new = keys(project, *needs), keys(project, *needs, override)
    assert {s for s in base if base[s] != new[s]} == changed


@pytest.mark.parametrize("side", ["lora1", "lora2"])
@pytest.mark.parametrize(
    "needs, override",
    [
        (["noise_offset=0.05"], "adaptive_noise_scale=0.01"),
        (["max_grad_norm=0.0"], "fused_backward=true"),
        (["max_grad_norm=0.0", "fused_backward=true"], "optimizer_groups=2"),
    ],
)
def test_differential_options_refused_alone_change_their_side(differential_project, side, needs, override):
    stages = per_pair("lora1", "lora2") if side == "lora1" else per_pair("lora2")
    needs = [f"differential.{side}.{n}" for n in needs]
    base = keys(differential_project, *needs, workflow="differential")
    new = keys(differential_project, *needs, f"differential.{side}.{override}", workflow="differential")
    assert {n for n in base if base[n] != new[n]} == stages | {"average", "eval"}


def test_every_config_field_is_covered_by_this_table():
    from pipeline.config import PipelineConfig, TagConfig

    tables = SEMANTIC + DIFFERENTIAL + FLOW + FLOW_DIFFERENTIAL + [(o, c) for o, c, _ in OPTIONS]
    tables += [
        (f"differential.{side}.{k}", None)
        for side in ("lora1", "lora2")
        for k in ("adaptive_noise_scale", "fused_backward", "optimizer_groups")
    ]  # tested above
    # refused in these sections (tests/test_networks.py)
    tables += [(k, None) for k in ("student.lora_init", "differential.lora2.lora_init", "differential.lora2.network")]
    # the text encoder's LoRA: the lora workflow's keys, and its refusals elsewhere (tests/test_text_encoder_lora.py)
    tables += [
        ("lora1.train_text_encoder", None),
        ("lora1.text_encoder_lr", None),
        ("lora1.loraplus_text_encoder_lr_ratio", None),
        ("differential.lora1.train_text_encoder", None),
        ("differential.lora2.train_text_encoder", None),
        ("data.on_unreadable", None),  # "skip" keys the caption table, "error" needs no key (tests/test_messy_data.py)
        ("data.subsets", None),  # tests/test_subsets.py
        ("data.prior_loss_weight", None),  # read only with is_reg subsets: tests/test_subsets.py
        # a project with a tagger: tests/test_tagger.py::test_tag_settings_change_exactly_the_caption_table_and_...
        *[(f"tag.{k}", None) for k in TagConfig.model_fields],
        # epochs instead of steps, and the output settings of the differential sections (tests/test_newcomer.py)
        ("lora1.epochs", None),
        ("schedule.epochs", None),
        *[(f"differential.{s}.epochs", None) for s in ("lora1", "lora2")],
        *[(f"differential.{s}.{k}", None) for s in ("lora1", "lora2") for k in ("output_name", "save_precision")],
        *[(f"differential.{s}.save_every_steps", None) for s in ("lora1", "lora2")],
    ]
    covered = {o.split("=")[0] for o, _ in tables} | {o.split("=")[0] for o in RUNTIME}
    fields = set()
    for section, model in PipelineConfig.model_fields.items():
        for name, field in model.annotation.model_fields.items():
            sub = getattr(field.annotation, "model_fields", None)
            fields |= {f"{section}.{name}.{s}" for s in sub} if sub else {f"{section}.{name}"}
    # data.images and the model paths enter keys as content digests, tested below; model.prediction_type and
    # transfer.teacher_lora have tests of their own.
    assert fields - covered == {
        "data.images",
        "model.family",
        "model.path",
        "model.single_file_config",
        "model.prediction_type",
        "transfer.student_model",
        "transfer.student_single_file_config",
        "transfer.teacher_lora",
        "differential.pairs_dir",  # the pairs are data: tests/test_differential.py adds one
        "differential.pairs",
        # a model with a guidance embedding: tests/test_flow_families.py::test_guidance_embed_is_the_schedule_s_...
        "schedule.guidance_embed",
        "student.guidance_embed",
        # tests/test_flux1.py::test_the_training_sections_guidance_value_is_keyed_and_refused_without_an_embedding
        "lora1.guidance_embed",
        "differential.lora1.guidance_embed",
        "differential.lora2.guidance_embed",
    }


def test_prediction_type_override_changes_lora1_and_breaks_the_transfer_contract(project):
    from core.errors import PlanError

    base, changed = (
        keys(project, workflow="lora"),
        keys(project, "model.prediction_type='v_prediction'", workflow="lora"),
    )
    assert {s for s in base if base[s] != changed[s]} == {"lora1"}
    # The teacher would then predict v while the (auto, epsilon) student predicts noise: refused at planning time.
    with pytest.raises(PlanError, match=r"prediction_type: upstream 'v_prediction', this stage 'epsilon'"):
        keys(project, "model.prediction_type='v_prediction'")


@pytest.mark.parametrize("override, first", SEMANTIC, ids=[o for o, _ in SEMANTIC])
def test_semantic_setting_changes_exactly_the_downstream_keys(project, override, first):
    base, changed = keys(project), keys(project, override)
    assert {s for s in base if base[s] != changed[s]} == DOWNSTREAM[first]


def test_weights_dtype_enters_the_priors_key_only_when_the_prior_is_stored(project):
    """With student.prior = on_the_fly the student computes the prior with its own training model."""
    on_the_fly = "student.prior='on_the_fly'"
    base, new = keys(project, on_the_fly), keys(project, on_the_fly, "transfer.weights_dtype='fp16'")
    assert {s for s in base if base[s] != new[s]} == {"teacher", "student"}


@pytest.mark.parametrize("override", RUNTIME)
def test_runtime_setting_changes_no_key(project, override):
    assert keys(project, override) == keys(project)


def test_keys_depend_on_content_not_on_paths(project, tmp_path):
    import shutil

    base = keys(project)
    shutil.move(project.root / "images", project.root / "renamed")  # same bytes, same relative paths
    assert keys(project, "data.images='renamed'") == base
    img = next((project.root / "renamed").glob("*.png"))
    img.write_bytes(img.read_bytes() + b"\0")  # one changed byte
    assert keys(project, "data.images='renamed'")["caption"] != base["caption"]


def test_model_weights_enter_the_keys_of_the_stages_that_use_them(project):
    from safetensors.torch import load_file, save_file

    base = keys(project)
    path = project.root / "model" / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    name = next(iter(sd))
    sd[name] = sd[name] + 1
    save_file(sd, str(path))
    changed = keys(project)
    # The student shares nothing with model/ on disk, but it trains on latents from this VAE.
    assert {s for s in base if base[s] != changed[s]} == DOWNSTREAM["latents"]


def test_canonical_json_is_spelling_independent():
    assert canonical_json({"b": 1e-4, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 0.0001})
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
