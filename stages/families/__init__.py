"""Model families behind one interface, so the training loop never branches on a family name."""

from __future__ import annotations

from stages.families.base import ModelFamily, ModelLayout


def get_family(name: str) -> ModelFamily:
    if name == "sd15":
        from stages.families.sd15 import SD15Family

        return SD15Family()
    raise KeyError(name)  # the config schema only admits known families


__all__ = ["ModelFamily", "ModelLayout", "get_family"]
