"""What a trained adapter is, beyond plain LoRA: DoRA, LoHa, LoKr (all through peft), and PiSSA/OLoRA init.

ΔW of each, on a layer weight W of shape (out, in[, kh, kw]), with s = alpha / r:
- lora:  s · B·A
- dora:  m ⊙ (W + s·B·A) / ‖W + s·B·A‖ − W, the norm per output row (peft's magnitude m has one value per output
  channel; LyCORIS calls it wd_on_out and writes it as `dora_scale` of shape (out, 1[, 1, 1])).
- loha:  s · (w1a·w1b) ⊙ (w2a·w2b)  (Hadamard product of two rank-r products)
- lokr:  s · kron(w1, w2), w1 and w2 each full or a rank-r product.
The single-file writers fold s into the first LoHa/LoKr factor and write no alpha: ComfyUI and A1111 then apply
scale 1 whatever the factor shapes (with full LoKr factors they ignore alpha; peft still scales by alpha/r).

PiSSA/OLoRA start A, B from the weight's principal (or QR) directions and subtract s·B0·A0 from W. The trained
update on the *original* W is then s·(B·A − B0·A0): the files hold it as a plain LoRA of rank 2r,
down = [A; A0], up = [s·B, −s·B0] with alpha = 2r (peft's own "convert to LoRA" does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError

NETWORKS = ("lora", "dora", "loha", "lokr")

# peft's state-dict part names, per module
LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
PARTS = LORA_PARTS + LOHA_PARTS + LOKR_PARTS
# LyCORIS parts this tool does not compute (Tucker-decomposed conv factors)
TUCKER_PARTS = ("hada_t1", "hada_t2", "lokr_t2", "lora_mid.weight")


def split_key(key: str) -> tuple[str, str]:
    """`<module>.<part>` -> (module, part) for peft's LoRA, DoRA, LoHa and LoKr parts."""
    for part in PARTS:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    raise KeyError(f"{key} is no LoRA, DoRA, LoHa or LoKr weight")


def adapter_config(
    network: str, rank: int, alpha: float, dropout: float, targets: list[str], rslora: bool, init: str, lokr_factor: int
):
    """The peft config of one network."""
    if network in ("lora", "dora"):
        from peft import LoraConfig

        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(targets),
            init_lora_weights=init,
            use_rslora=rslora,
            use_dora=network == "dora",
        )
    if network == "loha":
        from peft import LoHaConfig

        return LoHaConfig(r=rank, alpha=alpha, target_modules=list(targets), init_weights=True)
    if network == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(
            r=rank, alpha=alpha, target_modules=list(targets), init_weights=True, decompose_factor=lokr_factor
        )
    raise ConfigError(f"network = {network!r}: choose one of {', '.join(NETWORKS)}.")


# Training sections whose stage runs the model with its adapter off (the student's prior and fidelity), or
# trains over another adapter on the same layers (LoRA-2 over LoRA-1)
OVER_BASE = {"student": "compares the model with and without its adapter", "differential.lora2": "trains over LoRA-1"}


def check_network(section, name: str, family=None) -> None:
    """Refuse, at planning time, combinations a network cannot do, each with its reason."""
    network = getattr(section, "network", "lora")
    init = getattr(section, "lora_init", "gaussian")
    if name == "differential.lora2" and network != "lora":
        raise ConfigError(
            f'differential.lora2.network = "{network}": the pairs\' LoRA-2s are averaged in ΔW space as low-rank '
            f"factors (up·down), which a {network.upper()} is not, so the average would not be exact. LoRA-2 is a "
            f'plain LoRA (network = "lora"); LoRA-1 may be any network.'
        )
    if family is not None and network not in getattr(family, "networks", NETWORKS):
        raise ConfigError(
            f'{name}.network = "{network}": the {family.name} family writes its LoRA files with fused q/k/v modules '
            f"(the layout ComfyUI and diffusers load), which only a plain LoRA can express exactly. Use "
            f'network = "lora" for {family.name}.'
        )
    if network in ("loha", "lokr"):
        if section.dropout > 0:
            raise ConfigError(
                f"{name}.dropout = {section.dropout:g}: peft's {network.upper()} has no input dropout; set it to 0."
            )
        if section.rslora:
            raise ConfigError(f"{name}.rslora: rank-stabilized scaling is a LoRA/DoRA option, not {network}'s.")
        if section.loraplus_lr_ratio is not None:
            raise ConfigError(
                f"{name}.loraplus_lr_ratio: LoRA+ speeds up the B (up) matrices of a LoRA; {network} has none. "
                f'Remove it, or use network = "lora" or "dora".'
            )
    if init != "gaussian":
        if network != "lora":
            raise ConfigError(f'{name}.lora_init = "{init}" initialises a plain LoRA; use it with network = "lora".')
        if name in OVER_BASE:
            raise ConfigError(
                f'{name}.lora_init = "{init}": this stage {OVER_BASE[name]}, and {init} moves the weight\'s '
                f"principal directions from the base weights into the adapter, so the weights under it are no longer "
                f'the base model\'s. Use lora_init = "gaussian" here (lora1 and differential.lora1 take {init}).'
            )


# -- files ------------------------------------------------------------------------------------------------


def module_parts(state: dict) -> dict[str, dict[str, object]]:
    """peft-named state -> {module: {part: tensor}}."""
    out: dict[str, dict[str, object]] = {}
    for key, value in state.items():
        module, part = split_key(key)
        out.setdefault(module, {})[part] = value
    return out


def network_of(parts: dict) -> str:
    if "hada_w1_a" in parts:
        return "loha"
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    return "dora" if "lora_magnitude_vector" in parts else "lora"


def file_tensors(state: dict, alpha, rank: int | None, naming: str) -> dict[str, dict[str, object]]:
    """peft-named state -> {module: {suffix: tensor}} for a single file. naming: "kohya" (lora_down/lora_up) or
    "peft" (lora_A/lora_B). LoRA and DoRA keep their alpha (DoRA's magnitude becomes `dora_scale`, (out, 1[, 1,
    1])); LoHa and LoKr get the scale alpha/rank folded into their first factor and no alpha (see the module doc).
    alpha: one value, {module: value}, or None (no alpha keys: the scale is already in the up factors)."""
    import torch

    down, up = ("lora_down.weight", "lora_up.weight") if naming == "kohya" else ("lora_A.weight", "lora_B.weight")
    out: dict[str, dict[str, object]] = {}
    for module, parts in module_parts(state).items():
        a = None if alpha is None else float(alpha[module] if isinstance(alpha, dict) else alpha)
        kind, t = network_of(parts), out.setdefault(module, {})
        if kind in ("lora", "dora"):
            t[down] = parts["lora_A.weight"].contiguous()
            t[up] = parts["lora_B.weight"].contiguous()
            if a is not None:
                t["alpha"] = torch.tensor(a)
            if kind == "dora":
                ndim, out_ch = parts["lora_A.weight"].ndim, parts["lora_B.weight"].shape[0]
                m = parts["lora_magnitude_vector"]  # peft: (out,) for a Linear, (1, out, 1, 1) for a Conv2d
                t["dora_scale"] = m.reshape(out_ch, *[1] * (ndim - 1)).contiguous()
            continue
        if a is None or not rank:
            raise ValueError(f"{module}: a {kind} module needs its alpha and rank to be written")
        first = "hada_w1_a" if kind == "loha" else ("lokr_w1" if "lokr_w1" in parts else "lokr_w1_a")
        for part, value in parts.items():
            t[part] = (value * (a / rank) if part == first else value).contiguous()
    return out


def pissa_to_lora(state: dict, init_state: dict, scale: float) -> dict:
    """A PiSSA/OLoRA adapter (state, started from init_state, scale s) as a plain LoRA of rank 2r on the original
    weights, with the scale in its up factors: use it with alpha = rank (2r)."""
    import torch

    out = {}
    for module, parts in module_parts(state).items():
        a0, b0 = init_state[f"{module}.lora_A.weight"], init_state[f"{module}.lora_B.weight"]
        out[f"{module}.lora_A.weight"] = torch.cat([parts["lora_A.weight"], a0]).contiguous()
        out[f"{module}.lora_B.weight"] = torch.cat([parts["lora_B.weight"] * scale, -b0 * scale], dim=1).contiguous()
    return out


# -- reading: modules that are not a plain (down, up) pair ---------------------------------------------------


@dataclass
class LycoModule:
    """A LoHa or LoKr module read from a file: its LyCORIS factors and alpha (None: scale 1)."""

    kind: str  # loha | lokr
    factors: dict  # part name (hada_w1_a, lokr_w1, ...) -> tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        f = self.factors
        if self.kind == "loha":
            return int(f["hada_w1_b"].shape[0])
        for part in ("lokr_w2_b", "lokr_w1_b"):
            if part in f:
                return int(f[part].shape[0])
        return 0  # both factors full: no rank

    @property
    def scale(self) -> float:
        # ComfyUI's and A1111's rule: alpha / rank when both are there, else 1
        return self.alpha / self.rank if self.alpha is not None and self.rank else 1.0

    def out_features(self) -> int:
        f = self.factors
        if self.kind == "loha":
            return int(f["hada_w1_a"].shape[0])
        w1 = f.get("lokr_w1", f.get("lokr_w1_a"))
        w2 = f.get("lokr_w2", f.get("lokr_w2_a"))
        return int(w1.shape[0] * w2.shape[0])

    def delta(self, shape) -> object:
        """ΔW as a dense fp32 tensor of the layer weight's shape."""
        import torch

        f = {k: v.float() for k, v in self.factors.items()}
        if self.kind == "loha":
            d = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        else:
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            d = torch.kron(w1, w2)
        return (self.scale * d).reshape(shape)


def lyco_module(path, base: str, tensors: dict) -> LycoModule:
    """One LoHa/LoKr module's factors from a file, checked (floating point, finite, shapes that multiply)."""
    import torch

    from core.errors import ModelError

    def bad(what: str) -> ModelError:
        return ModelError(
            f"{path}: the module {base} {what}. The file is damaged or not an adapter this tool understands; "
            f"re-export it, or leave it out."
        )

    tucker = [p for p in TUCKER_PARTS if f"{base}.{p}" in tensors]
    if tucker:
        raise bad(f"uses a Tucker-decomposed conv factor ({tucker[0]}), which this tool does not compute")
    kind = "loha" if f"{base}.hada_w1_a" in tensors else "lokr"
    names = LOHA_PARTS if kind == "loha" else LOKR_PARTS
    factors = {p: tensors[f"{base}.{p}"] for p in names if f"{base}.{p}" in tensors}
    if kind == "loha" and len(factors) != 4:
        raise bad(f"lacks {sorted(set(LOHA_PARTS) - set(factors))[0]}; the file is incomplete")
    if kind == "lokr":
        for side in ("lokr_w1", "lokr_w2"):
            if side not in factors and not (f"{side}_a" in factors and f"{side}_b" in factors):
                raise bad(f"has neither {side} nor {side}_a/{side}_b; the file is incomplete")
    for part, t in factors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise bad(f"has a {part} that is not finite floating point")
    for a, b in (
        ("hada_w1_a", "hada_w1_b"),
        ("hada_w2_a", "hada_w2_b"),
        ("lokr_w1_a", "lokr_w1_b"),
        ("lokr_w2_a", "lokr_w2_b"),
    ):
        if a in factors and (
            factors[a].ndim != 2 or factors[b].ndim != 2 or factors[a].shape[1] != factors[b].shape[0]
        ):
            raise bad(
                f"has factors that do not fit together: {a} {tuple(factors[a].shape)}, {b} {tuple(factors[b].shape)}"
            )
    if kind == "loha" and (factors["hada_w1_a"].shape[0], factors["hada_w1_b"].shape[1]) != (
        factors["hada_w2_a"].shape[0],
        factors["hada_w2_b"].shape[1],
    ):
        raise bad("has two Hadamard factors of different shapes")
    alpha_t = tensors.get(f"{base}.alpha")
    alpha = float(alpha_t.reshape(())) if alpha_t is not None and alpha_t.numel() == 1 else None
    return LycoModule(kind, {k: v.float() for k, v in factors.items()}, alpha)


def effective_delta(module, weight):
    """W' − W in fp32 for any module read from a file (LoraModule, with or without dora_scale, or LycoModule)."""
    w = weight.detach().float()
    if isinstance(module, LycoModule):
        return module.delta(w.shape)
    from stages.training.lora_ops import delta_weight

    d = delta_weight(module).to(w.device).reshape(w.shape)
    if module.dora_scale is None:
        return d
    wc = w + d
    m = module.dora_scale.float().to(w.device)
    if m.numel() == w.shape[0] and m.shape[0] == w.shape[0]:  # per output channel (peft, LyCORIS wd_on_out)
        norm = wc.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:  # per input channel (LyCORIS' older default): dora_scale (1, in[, 1, 1])
        norm = wc.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2))
    return wc * (m.reshape(norm.shape) / norm) - w
