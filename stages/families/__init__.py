"""Model families behind one interface, so the training loop never branches on a family name."""

from __future__ import annotations

from pathlib import Path

from stages.families.base import Conditioning, ModelFamily, ModelLayout

FAMILIES = ("sd15", "sdxl", "flux1", "zimage", "flux2", "qwenimage")
# model_index.json `_class_name` -> family
PIPELINES = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux1",
    "ZImagePipeline": "zimage",
    "Flux2KleinPipeline": "flux2",
    "Flux2Pipeline": "flux2",
    "QwenImagePipeline": "qwenimage",
}
# transformer/ or unet/ config `_class_name` -> family (folders without a model_index.json)
DENOISERS = {
    "UNet2DConditionModel": "sd15",
    "FluxTransformer2DModel": "flux1",
    "ZImageTransformer2DModel": "zimage",
    "Flux2Transformer2DModel": "flux2",
    "QwenImageTransformer2DModel": "qwenimage",
}


def get_family(name: str) -> ModelFamily:
    if name == "sd15":
        from stages.families.sd15 import SD15Family

        return SD15Family()
    if name == "sdxl":
        from stages.families.sdxl import SDXLFamily

        return SDXLFamily()
    if name == "flux1":
        from stages.families.flux1 import Flux1Family

        return Flux1Family()
    if name == "zimage":
        from stages.families.zimage import ZImageFamily

        return ZImageFamily()
    if name == "flux2":
        from stages.families.flux2 import Flux2Family

        return Flux2Family()
    if name == "qwenimage":
        from stages.families.qwenimage import QwenImageFamily

        return QwenImageFamily()
    raise KeyError(name)  # the config schema only admits known families


def detect_family(path: Path) -> tuple[str | None, str]:
    """(family, what it was read from) for a model folder or single file; (None, why) when nothing fits.

    Files and JSON only: model_index.json's pipeline class, a denoiser config's class, or the tensor names of
    a single .safetensors file."""
    from core.errors import ModelError
    from stages.families.sd15 import read_safetensors_header

    def class_of(p: Path) -> str | None:
        return _json_get(p, "_class_name")

    if path.is_dir():
        cls = class_of(path / "model_index.json")
        if cls in PIPELINES:
            return PIPELINES[cls], f"model_index.json names {cls}"
        for sub in ("transformer", "unet"):
            sub_cls = class_of(path / sub / "config.json")
            if sub_cls == "UNet2DConditionModel" and _json_get(path / sub / "config.json", "addition_embed_type") == (
                "text_time"
            ):
                return "sdxl", f"{sub}/config.json names an SDXL UNet (addition_embed_type text_time)"
            if sub_cls in DENOISERS:
                return DENOISERS[sub_cls], f"{sub}/config.json names {sub_cls}"
        return None, f"model_index.json names {cls or 'nothing'}" if (path / "model_index.json").exists() else (
            "it has no model_index.json"
        )
    if path.is_file() and path.suffix == ".safetensors":
        try:
            keys = {k.removeprefix("model.diffusion_model.") for k in read_safetensors_header(path)}
        except ModelError:
            return None, "it is not a readable .safetensors file"
        if any(k.startswith("conditioner.embedders.1.") for k in keys) and any(
            k.startswith("input_blocks.") for k in keys
        ):
            return "sdxl", "its tensors are an SDXL checkpoint's (model.diffusion_model.*, conditioner.embedders.*)"
        if any(k.startswith("input_blocks.") for k in keys):
            return "sd15", "its tensors are a Stable Diffusion UNet's (model.diffusion_model.input_blocks.*)"
        if "txt_norm.weight" in keys and "transformer_blocks.0.img_mod.1.weight" in keys:
            return "qwenimage", "its tensors are a Qwen-Image transformer's (txt_norm, transformer_blocks.*.img_mod)"
        if "double_blocks.0.img_mod.lin.weight" in keys:
            return "flux1", "its tensors are a FLUX.1 transformer's (double_blocks.*.img_mod, single_blocks.*)"
        if "layers.0.adaLN_modulation.0.weight" in keys:
            return "zimage", "its tensors are a Z-Image transformer's (layers.*.adaLN_modulation)"
        if "single_stream_modulation.lin.weight" in keys or any(k.startswith("double_blocks.") for k in keys):
            return "flux2", "its tensors are a FLUX.2 transformer's (double_blocks.*, single_stream_modulation)"
        return None, "its tensor names match no supported family"
    return None, "it is not a folder or a .safetensors file"


def _json_get(path: Path, key: str):
    import json

    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def lora_family_conflict(path: Path, family: str) -> str | None:
    """Why a LoRA file is not for `family` (its metadata names another family, or its module names belong to
    another kind of model), or None. Module names alone do not tell SD from SDXL, or FLUX.1 from FLUX.2, in every
    file, so within those pairs only the metadata is trusted."""
    found, source = detect_lora_family(path, with_source=True)
    if found is None or found == family:
        return None
    kind = {"sd15": "unet", "sdxl": "unet", "flux1": "mmdit", "flux2": "mmdit", "qwenimage": "mmdit"}
    if source == "names" and kind.get(found, found) == kind.get(family, family):
        return None
    said = "its metadata (ss_base_model_version)" if source == "metadata" else "its module names"
    return f"{path} is a {found} LoRA ({said} say so), and the model is {family}"


def detect_lora_family(path: Path, with_source: bool = False):
    """The family a LoRA file is for, from its metadata (ss_base_model_version) or its module names; None when
    the file does not say. with_source: (family, "metadata" | "names" | None)."""
    found = _lora_family(path)
    return found if with_source else found[0]


def _lora_family(path: Path) -> tuple[str | None, str | None]:
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n < 100_000_000 else {}
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return None, None
    meta = header.pop("__metadata__", {}) or {}
    base = str(meta.get("ss_base_model_version", ""))
    if base in ("zimage", "flux2", "flux1"):
        return base, "metadata"
    if base in ("qwen_image", "qwenimage"):
        return "qwenimage", "metadata"
    if base.startswith("sd_"):
        return "sd15", "metadata"
    if base.startswith("sdxl_"):
        return "sdxl", "metadata"
    found = _family_of_names(header)
    return found, "names" if found else None


def _family_of_names(header: dict) -> str | None:
    names = [k.removeprefix("diffusion_model.").removeprefix("transformer.") for k in header]
    if any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block", "lora_te1_",
                         "lora_te2_")) for k in names):  # fmt: skip
        return "sdxl"  # sd-scripts' SDXL names (SD 1.x files from it use diffusers' block names)
    unet_blocks = tuple(f"{p}{b}" for p in ("unet.", "lora_unet_") for b in ("down_blocks", "up_blocks", "mid_block"))
    if any(k.startswith(unet_blocks) and ("transformer_blocks.1." in k or "transformer_blocks_1_" in k) for k in names):
        return "sdxl"  # a second transformer layer in an attention block: SD 1.x/2.x have one
    if any(
        k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block", "unet.", "lora_te"))
        for k in names
    ):
        return "sd15"
    qwen = (".img_mlp.net.", ".txt_mlp.net.", ".img_mod.1", ".txt_mod.1", "_img_mlp_net_", "_img_mod_1")
    if any(k.startswith(("transformer_blocks.", "lora_unet_transformer_blocks_")) and any(m in k for m in qwen)
           for k in names):  # fmt: skip
        return "qwenimage"  # diffusers' (and ComfyUI's) Qwen-Image modules, or musubi-tuner's flattened ones
    flux1 = (".img_mod.", ".txt_mod.", ".modulation.lin", ".proj_mlp.", ".ff.net.0.proj.", "_img_mod_lin")
    if any(k.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks")) for k in names) or any(
        k.startswith(("double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks."))
        and any(m in k for m in flux1)
        for k in names
    ):
        return "flux1"  # sd-scripts' FLUX.1 names, or modules FLUX.2 does not have (per-block modulation, GELU MLP)
    if any(
        k.startswith(("noise_refiner.", "context_refiner.", "lora_unet_layers_", "lora_unet_noise_refiner"))
        or (k.startswith("layers.") and ".attention." in k)
        for k in names
    ):
        return "zimage"
    if any(
        k.startswith(("double_blocks.", "single_blocks.", "single_transformer_blocks."))
        or (k.startswith("transformer_blocks.") and ".attn." in k)
        for k in names
    ):
        return "flux2"
    return None


__all__ = [
    "detect_lora_family",
    "lora_family_conflict",
    "FAMILIES",
    "Conditioning",
    "ModelFamily",
    "ModelLayout",
    "detect_family",
    "get_family",
]
