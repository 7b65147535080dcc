"""Stage `eval` (differential LoRA): does each LoRA do its job, measured on held-out noise.

Per pair, the mean denoising loss on held-out (noise, timestep) draws:
  on A: base vs base+LoRA-1 (LoRA-1 must reproduce A: its loss is far lower);
  on B: base+LoRA-1 vs base+LoRA-1+LoRA-2 (LoRA-2 must take it from A to B);
and, for LoRA-2 alone on the bare base (each pair's, and the average), how far it moves the base model's
one-step x0 prediction from a noisy A towards B: the cosine between that move and z_B − z_A (1 = straight
towards B, 0 = unrelated); and the same for LoRA-2 added over LoRA-1, the setting it was trained in.
"""

from __future__ import annotations

import contextlib

from stages.base import PlanEnv, Stage, StageContext, StageResult, guidance_embed_for
from stages.training.params import KeyedParams


class EvalParams(KeyedParams):
    UNKEYED_WHEN_NONE = ("guidance_embed", "weights_dtype")

    samples: int
    seed: int = 1234
    prediction_type: str
    timesteps: dict
    guidance_embed: float | None = None  # LoRA-2's, for a model with a guidance embedding
    weights_dtype: str | None = None  # differential.eval_weights_dtype when not fp32 (stored narrower, fp32 compute)


def pair_names(upstream) -> list[str]:
    return sorted(role.split(".", 1)[1] for role in upstream if role.startswith("lora2."))


class EvalStage(Stage):
    name = "eval"
    IMPL_VERSION = 2  # v2: adapters applied by forward hooks (any network), not peft adapters
    upstream = ()  # per pair: caption/latents/text of both sides, lora1, lora2; and `average`
    contract_from = ()
    description = "differential eval table"

    def params(self, env: PlanEnv) -> EvalParams:
        d = env.config.differential
        return EvalParams(
            samples=d.eval_samples,
            prediction_type=env.prediction_type,
            timesteps=env.model.timesteps(d.lora1, "differential.lora1", env.config.latents.resolution),
            guidance_embed=guidance_embed_for(env.model, d.lora2.guidance_embed, "differential.lora2.guidance_embed"),
            weights_dtype=None if d.eval_weights_dtype == "fp32" else d.eval_weights_dtype,
        )

    def inputs(self, env: PlanEnv) -> dict:
        d, denoiser = env.component_digests, env.family.lora_component
        return {"model": {denoiser: d[denoiser], "scheduler": d["scheduler"]}}

    def run(self, ctx: StageContext) -> StageResult:
        from stages.devices import load_frozen, resolve_device
        from stages.families.noise import make_process
        from stages.pools import load_training_data
        from stages.training.adapters import FixedLora
        from stages.training.lora_files import match_modules, read_lora_file
        from stages.training.outputs import trained_file

        env, p, store, up = ctx.env, ctx.params, ctx.store, ctx.upstream
        family = env.family
        device = resolve_device(ctx.runtime.device)
        unet = load_frozen(family, env.layout, device, p.weights_dtype or "fp32", ctx.runtime.attention)
        process = make_process(p.timesteps, p.prediction_type)

        adapters = {}

        def attach(manifest, adapter):
            obj = trained_file(manifest.outputs)
            lora = read_lora_file(
                store.read_object(obj["digest"], adapter), family.kohya_prefix, family.lora_component, family.name
            )
            adapters[adapter] = FixedLora(unet, match_modules(lora, unet, family.kohya_prefix), device)

        pairs = pair_names(up)
        for i, name in enumerate(pairs):  # adapter names may not contain dots: numbered
            attach(up[f"lora1.{name}"], f"l1_{i}")
            attach(up[f"lora2.{name}"], f"l2_{i}")
        attach(up["average"], "avg")
        probe = Probe(family, unet, process, p, device, adapters)
        table = {}
        for i, name in enumerate(pairs):
            l1, l2 = f"l1_{i}", f"l2_{i}"
            side = {
                s: load_training_data(store, {r: up[f"{r}.{name}.{s}"] for r in ("caption", "latents", "text")})[0]
                for s in ("a", "b")
            }
            table[name] = {
                "loss_a_base": probe.loss(side["a"], []),
                "loss_a_lora1": probe.loss(side["a"], [l1]),
                "loss_b_lora1": probe.loss(side["b"], [l1]),
                "loss_b_lora1_lora2": probe.loss(side["b"], [l1, l2]),
                "direction_lora2": probe.direction(side["a"], side["b"], [l2]),
                "direction_lora2_over_lora1": probe.direction(side["a"], side["b"], [l1, l2], [l1]),
                "direction_average": probe.direction(side["a"], side["b"], ["avg"]),
            }
        mean_dir = sum(r["direction_average"] for r in table.values()) / len(table)
        if ctx.tracker is not None:
            ctx.tracker.scalars(0, {f"eval/{pair}/{k}": v for pair, row in table.items() for k, v in row.items()})
        record = {
            "pairs": table,
            "samples": p.samples,
            "direction_average_mean": mean_dir,
            "weights_dtype": p.weights_dtype or "fp32",
        }
        return StageResult(record=record, summary=f"{len(pairs)} pairs, LoRA-2 average direction cos {mean_dir:.3f}")


class Probe:
    """Predictions of the base model with a chosen set of adapters, on fixed held-out draws."""

    def __init__(self, family, unet, process, params: EvalParams, device, adapters: dict):
        self.family, self.unet, self.process, self.p, self.device = family, unet, process, params, device
        self.adapters = adapters  # name -> FixedLora on unet

    def _draws(self, n_items: int):
        import torch

        from stages.training.sampling import generator

        g = generator("eval", self.p.seed)
        k = self.p.samples
        idx = torch.arange(n_items).repeat_interleave(k)
        return idx, self.process.sample_timesteps(len(idx), g), g

    def _predict(self, adapters: list[str], x_t, t, cond):
        import torch

        n = x_t.shape[0]
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for name in adapters:  # each adds its own ΔW·x to the layers' outputs: the adapters' sum
                stack.enter_context(self.adapters[name].rows_from(0, n))
            return self.family.predict(self.unet, x_t, t, cond, guidance=self.p.guidance_embed).float()

    def loss(self, data, adapters: list[str]) -> float:
        import torch

        idx, t, g = self._draws(data.latents.shape[0])
        x0 = data.latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        x_t = self.process.noisy_input(x0, noise, t)
        cond = sized(data, data.cond[data.cond_index[idx]], idx)
        pred = self._predict(adapters, x_t.to(self.device), t.to(self.device), cond.to(self.device)).cpu()
        return float(torch.nn.functional.mse_loss(pred, self.process.target(x0, noise, t)))

    def direction(self, a, b, adapters: list[str], reference: list[str] = ()) -> float:
        """Mean cosine between the move of the x0 prediction (from noisy A) made by switching from the `reference`
        adapters (none: the bare base) to `adapters`, and z_B − z_A."""
        import torch

        idx, t, g = self._draws(a.latents.shape[0])
        x0 = a.latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        x_t = self.process.noisy_input(x0, noise, t)
        cond = sized(a, a.cond[a.cond_index[idx]], idx).to(self.device)
        xd, td = x_t.to(self.device), t.to(self.device)
        base = self.process.predict_x0(x_t, self._predict(list(reference), xd, td, cond).cpu(), t)
        moved = self.process.predict_x0(x_t, self._predict(adapters, xd, td, cond).cpu(), t)
        want = (b.latents[idx % b.latents.shape[0]] - x0).flatten(1)
        got = (moved - base).flatten(1)
        return float(torch.nn.functional.cosine_similarity(got, want, dim=1).mean())


def sized(data, cond, rows):
    """cond with the size conditioning of these latent rows attached (SDXL: TrainData.size_ids), or as it is."""
    return cond if data.size_ids is None else cond.with_sizes(data.size_ids[rows])
