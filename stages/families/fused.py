"""LoRAs on the fused projections of an original (BFL) transformer layout, to and from LoRAs on diffusers' split ones.

The original FLUX checkpoints compute q, k and v (and in FLUX.1's single blocks also the MLP input) with one
Linear whose output rows are the parts' rows stacked; diffusers splits it into one Linear per part. A LoRA per
part (rank r_i, scale s_i) is exactly one LoRA on the fused layer: down = the parts' downs stacked, up =
block-diagonal with each part's up times its scale (rank Σ r_i), which is what sd-scripts writes with split_qkv and
what ai-toolkit writes. The reverse split is exact too: a block-diagonal up splits into the parts' own LoRAs; any
other up splits by rows, every part sharing the whole down factor.
"""

from __future__ import annotations


def fuse_parts(parts: list, dims: list[int]):
    """parts: one (down (r_i, in), up·scale (d_i, r_i)) per part, or None for a part without a LoRA (its rows stay
    zero); dims: each part's output rows. -> (down (Σr_i, in), up (Σd_i, Σr_i)), ΔW = up @ down, exactly."""
    import torch

    present = [p for p in parts if p is not None]
    rank = sum(p[0].shape[0] for p in present)
    down = torch.cat([p[0] for p in present], dim=0)
    up = torch.zeros(sum(dims), rank, dtype=present[0][1].dtype)
    row = col = 0
    for part, d in zip(parts, dims, strict=True):
        if part is not None:
            r = part[0].shape[0]
            up[row : row + d, col : col + r] = part[1]
            col += r
        row += d
    return down, up


def split_fused(down, up, alpha: float, dims: list[int]) -> list:
    """The inverse of fuse_parts on a LoRA (down, up, alpha) of a fused layer: one (down, up, alpha) per part with
    the same ΔW, or None for a part whose rows of up are zero. When the parts' ups use disjoint columns (a block-
    diagonal up) each part keeps its own columns and alpha·(its rank)/rank, so alpha/rank is unchanged; otherwise
    every part shares the whole down factor at the full rank."""
    rank = down.shape[0]
    bounds = [sum(dims[:i]) for i in range(len(dims) + 1)]
    rows = [up[bounds[i] : bounds[i + 1]] for i in range(len(dims))]
    support = [set(r.abs().sum(dim=0).nonzero().flatten().tolist()) for r in rows]
    used = [s for s in support if s]
    if used and sum(len(s) for s in used) == len(set().union(*used)):
        out = []
        for r, cols in zip(rows, support, strict=True):
            if not cols:
                out.append(None)
                continue
            keep = sorted(cols)
            out.append((down[keep].clone(), r[:, keep].clone(), alpha * len(keep) / rank))
        return out
    return [(down.clone(), r.clone(), alpha) for r in rows]


def original_layout_modules(modules: dict, fmt: str, family: str | None, metadata: dict) -> dict:
    """A transformer LoRA over the original FLUX layouts (fused qkv) -> diffusers' module names: sd-scripts' FLUX.1
    names (`double_blocks_0_img_attn_qkv`), or dotted original names of FLUX.1 or FLUX.2."""
    from stages.families.flux1 import Flux1Family, unflatten

    if fmt == "kohya":
        flat = {name: unflatten(name) for name in modules}
        if not any(flat.values()):
            return modules
        modules = {flat[name] or name: mod for name, mod in modules.items()}
        return Flux1Family().split_file_modules(modules)
    if not any(n.startswith(("double_blocks.", "single_blocks.")) for n in modules):
        return modules
    if family == "flux1" or (family is None and metadata.get("ss_base_model_version") == "flux1"):
        return Flux1Family().split_file_modules(modules)
    from stages.families.flux2 import split_original_modules  # FLUX.2's original names, fused qkv

    return split_original_modules(modules)
