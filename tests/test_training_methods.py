"""The loss and noise options of docs/training.md, checked against numbers worked out by hand (kohya's formulas,
with its quirks fixed where docs/training.md says so), and their refusals by name."""

from __future__ import annotations

import math

import pytest
import torch

from core.errors import ConfigError
from stages.families.noise import make_process, resolve_timesteps, training_noise
from stages.training.losses import elementwise, huber_c, resolve_loss, snr, snr_weights, training_loss

DDPM_BASE = {
    "process": "ddpm",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
}
FLOW_BASE = {"process": "flow", "num_train_timesteps": 1000, "scheduler": {"shift": 1.0}}


class Settings:
    """A section's fields, as the config holds them."""

    timestep_sampling, logit_mean, logit_std, mode_scale, timestep_shift, shift = (
        "uniform",
        0.0,
        1.0,
        1.29,
        "auto",
        None,
    )
    loss, huber_schedule, huber_c, huber_scale, min_snr_gamma, debiased_estimation = "l2", "snr", 0.1, 1.0, None, False

    def __init__(self, **kw):
        self.__dict__.update(kw)


def process(base, prediction_type="epsilon", **settings):
    return make_process(resolve_timesteps(base, Settings(**settings), 256, "lora1"), prediction_type)


def test_losses_by_hand():
    pred, target = torch.tensor([[0.3, -0.4]]), torch.zeros(1, 2)
    c = torch.tensor([0.1])
    assert elementwise(pred, target, {"type": "l2"})[0].tolist() == pytest.approx([0.09, 0.16])
    assert elementwise(pred, target, {"type": "l1"})[0].tolist() == pytest.approx([0.3, 0.4])
    # huber: 2c(sqrt(d^2 + c^2) - c); smooth_l1: 2(sqrt(d^2 + c^2) - c)
    h = [2 * 0.1 * (math.sqrt(0.09 + 0.01) - 0.1), 2 * 0.1 * (math.sqrt(0.16 + 0.01) - 0.1)]
    assert elementwise(pred, target, {"type": "huber"}, c)[0].tolist() == pytest.approx(h, rel=1e-6)
    assert elementwise(pred, target, {"type": "smooth_l1"}, c)[0].tolist() == pytest.approx([v / 0.1 for v in h])


def test_huber_schedules_by_hand():
    ddpm = process(DDPM_BASE)
    t = torch.tensor([0, 500, 999])
    ab = ddpm.scheduler.alphas_cumprod[t].double()
    h = {"type": "huber", "huber": {"schedule": "constant", "c": 0.1, "scale": 2.0}}
    assert huber_c(h, ddpm, t).tolist() == pytest.approx([0.2, 0.2, 0.2])
    h["huber"]["schedule"] = "exponential"  # scale * c^(t/T)
    assert huber_c(h, ddpm, t).tolist() == pytest.approx([2.0, 2 * 0.1**0.5, 2 * 0.1**0.999], rel=1e-6)
    h["huber"]["schedule"] = "snr"  # ((1-c)/(1+sqrt((1-ab)/ab))^2 + c) * scale: kohya's, with the scale applied
    want = (((1 - 0.1) / (1 + ((1 - ab) / ab).sqrt()) ** 2 + 0.1) * 2).tolist()
    assert huber_c(h, ddpm, t).tolist() == pytest.approx(want, rel=1e-5)
    flow = process(FLOW_BASE)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    h["huber"]["schedule"] = "exponential"  # scale * c^sigma
    assert huber_c(h, flow, sigma).tolist() == pytest.approx([2.0, 2 * 0.1**0.25, 0.2], rel=1e-6)
    h["huber"]["schedule"] = "snr"  # 1/sqrt(SNR) = sigma/(1-sigma): ((1-c)(1-sigma)^2 + c) * scale
    assert huber_c(h, flow, sigma).tolist() == pytest.approx([2.0, (0.9 * 0.5625 + 0.1) * 2, 0.2], rel=1e-6)


def test_min_snr_and_debiased_weights_by_hand():
    t = torch.tensor([10, 500, 999])
    for prediction_type in ("epsilon", "v_prediction"):
        p = process(DDPM_BASE, prediction_type)
        ab = p.scheduler.alphas_cumprod[t].double()
        s = ab / (1 - ab)
        assert snr(p, t).double().tolist() == pytest.approx(s.tolist(), rel=1e-5)
        v = prediction_type == "v_prediction"
        clipped = s.clamp(max=5.0)
        want = clipped / (s + 1) if v else clipped / s
        assert snr_weights({"min_snr_gamma": 5.0}, p, t).tolist() == pytest.approx(want.tolist(), rel=1e-5)
        capped = s.clamp(max=1000.0)
        want = 1 / (capped + 1) if v else capped.rsqrt()
        assert snr_weights({"debiased_estimation": True}, p, t).tolist() == pytest.approx(want.tolist(), rel=1e-5)
    # SNR is computed after the zero-terminal rescale: 0 at the last step; min-SNR's epsilon weight there is its
    # limit 1 (kohya divides 0 by 0), v-prediction's is 0
    zero = process(DDPM_BASE, "epsilon", zero_terminal_snr=True)
    assert float(snr(zero, torch.tensor([999]))) == 0.0
    assert snr_weights({"min_snr_gamma": 5.0}, zero, torch.tensor([999])).tolist() == [1.0]
    zero_v = process(DDPM_BASE, "v_prediction", zero_terminal_snr=True)
    assert snr_weights({"min_snr_gamma": 5.0}, zero_v, torch.tensor([999])).tolist() == [0.0]


def test_training_loss_combines_per_sample_losses_and_weights():
    p = process(DDPM_BASE, "epsilon")
    g = torch.Generator().manual_seed(0)
    pred, target, t = (
        torch.randn(3, 4, 2, 2, generator=g),
        torch.randn(3, 4, 2, 2, generator=g),
        torch.tensor([5, 400, 900]),
    )
    plain = training_loss(pred, target, t, p, {"type": "l2"}, "none")
    assert torch.equal(plain, torch.nn.functional.mse_loss(pred, target))  # the bytes of every earlier run
    loss = {"type": "l1", "min_snr_gamma": 5.0}
    per_sample = (pred - target).abs().flatten(1).mean(1)
    want = (per_sample * snr_weights(loss, p, t)).mean()  # unnormalized, as in the Min-SNR paper and kohya
    assert float(training_loss(pred, target, t, p, loss, "none")) == pytest.approx(float(want), rel=1e-6)


def test_noise_options_by_hand():
    x0 = torch.full((2, 3, 8, 8), 0.5)
    x0[1] = -2.0
    base = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    same, same_in = training_noise({}, x0, base, g)
    assert same is base and same_in is base and torch.equal(g.get_state(), state)  # off: no draws at all
    # offset: one N(0,1) per sample and channel, times offset (+ adaptive * |latent mean|)
    noise, noise_in = training_noise({"offset": 0.1, "adaptive_scale": 0.2}, x0, base, torch.Generator().manual_seed(7))
    z = torch.randn((2, 3, 1, 1), generator=torch.Generator().manual_seed(7))
    factor = torch.tensor([0.1 + 0.2 * 0.5, 0.1 + 0.2 * 2.0]).view(2, 1, 1, 1)
    torch.testing.assert_close(noise - base, (factor * z).expand(2, 3, 8, 8), rtol=0, atol=1e-6)
    assert noise_in is noise
    # pyramid noise: unit std per sample, and not the base noise
    pyr, _ = training_noise(
        {"multires": {"iterations": 4, "discount": 0.3}}, x0, base, torch.Generator().manual_seed(7)
    )
    assert pyr.flatten(1).std(dim=1).tolist() == pytest.approx([1.0, 1.0], rel=1e-5)
    assert not torch.allclose(pyr, base / base.flatten(1).std(dim=1).view(2, 1, 1, 1))
    # input perturbation: the target keeps the noise, x_t gets noise + gamma * N(0,1)
    kept, perturbed = training_noise({"ip_gamma": 0.1}, x0, base, torch.Generator().manual_seed(7))
    xi = torch.randn(base.shape, generator=torch.Generator().manual_seed(7))
    assert kept is base
    torch.testing.assert_close(perturbed, base + 0.1 * xi)


def test_timestep_ranges():
    g = torch.Generator().manual_seed(0)
    ddpm = process(DDPM_BASE, min_timestep=100, max_timestep=300)
    t = ddpm.sample_timesteps(2000, g)
    assert int(t.min()) >= 100 and int(t.max()) < 300 and int(t.max()) > 290
    flow = process(FLOW_BASE, min_timestep=200, max_timestep=600)
    sigma = flow.sample_timesteps(2000, g)
    assert float(sigma.min()) >= 0.2 and float(sigma.max()) <= 0.6
    with pytest.raises(ConfigError, match=r"lora1.min_timestep / max_timestep = 500 / 400"):
        process(DDPM_BASE, min_timestep=500, max_timestep=400)


def test_options_that_mean_nothing_for_the_noise_process_are_refused_naming_both():
    flow = resolve_timesteps(FLOW_BASE, Settings(), 256, "lora1")
    for field in ("min_snr_gamma", "debiased_estimation"):
        with pytest.raises(ConfigError, match=rf"lora1\.{field}.*flow matching.*loss_weighting"):
            resolve_loss(Settings(**{field: 5.0 if field == "min_snr_gamma" else True}), flow, "flow", "lora1")
    with pytest.raises(ConfigError, match=r"lora1\.zero_terminal_snr.*DDPM.*flow matching"):
        resolve_timesteps(FLOW_BASE, Settings(zero_terminal_snr=True), 256, "lora1")
    zero = resolve_timesteps(DDPM_BASE, Settings(zero_terminal_snr=True), 256, "lora1")
    with pytest.raises(ConfigError, match=r"debiased_estimation.*infinite.*zero terminal SNR"):
        resolve_loss(Settings(debiased_estimation=True), zero, "epsilon", "lora1")
    assert resolve_loss(Settings(debiased_estimation=True), zero, "v_prediction", "lora1")["debiased_estimation"]


def test_a_student_noise_option_is_refused_with_the_reason(transfer_project):
    result = transfer_project.cli("run", "transfer", "--dry-run", "--set", "student.noise_offset=0.1")
    assert result.exit_code == 2, result.output
    assert "student.noise_offset" in result.output and "schedule.noise_offset" in result.output
    assert "materialized" in result.output and "Traceback" not in result.output


def test_schedule_noise_options_rebuild_the_same_inputs_in_both_phases(transfer_project):
    """The schedule's noise options are applied per row from the row's seed: the teacher and the student rebuild the
    same x_t, and it is not the x_t without them."""
    from stages.training.schedule import rebuild_inputs

    rows = [{"k": 0, "slot": i, "latent": "a", "t": t, "noise_seed": 11 + i} for i, t in enumerate([100, 700])]
    from stages.training.schedule import noise_digest, slot_noise

    for row in rows:
        row["noise_digest"] = noise_digest(slot_noise(row["noise_seed"], (4, 4, 4)))
    latents = {"a": torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(2))}
    plain = process(DDPM_BASE)
    opts = process(DDPM_BASE, noise_offset=0.1, multires_noise_iterations=2, ip_noise_gamma=0.1)
    teacher = rebuild_inputs(rows, latents, opts)
    student = rebuild_inputs(rows, latents, opts)
    assert all(torch.equal(a, b) for a, b in zip(teacher, student, strict=True))
    assert not torch.equal(teacher[0], rebuild_inputs(rows, latents, plain)[0])
