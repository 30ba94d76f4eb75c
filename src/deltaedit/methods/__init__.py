"""Editing methods by name. Add a method by writing its module and one line here."""

from __future__ import annotations

from .alphaedit import AlphaEdit, AlphaEditConfig
from .base import Computed, Decision, EditContext, EditMethod, MethodConfig
from .deltaedit import DeltaEdit, DeltaEditConfig
from .ft import FT, FTConfig
from .locate import LocateConfig, LocateThenEdit
from .memit import MEMIT, MEMITConfig
from .prune import PRUNE, PRUNEConfig
from .rect import RECT, RECTConfig
from .rome import ROME, ROMEConfig

METHODS: dict[str, type[EditMethod]] = {
    cls.name: cls
    for cls in (
        FT,
        ROME,
        MEMIT,
        PRUNE,
        RECT,
        AlphaEdit,
        DeltaEdit,
    )
}


def method_class(name: str) -> type[EditMethod]:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"method: unknown {name!r}; available: {sorted(METHODS)}") from None


__all__ = [
    "METHODS",
    "method_class",
    "EditMethod",
    "EditContext",
    "Computed",
    "MethodConfig",
    "LocateConfig",
    "LocateThenEdit",
    "Decision",
    "FT",
    "FTConfig",
    "ROME",
    "ROMEConfig",
    "PRUNE",
    "PRUNEConfig",
    "RECT",
    "RECTConfig",
    "MEMIT",
    "MEMITConfig",
    "AlphaEdit",
    "AlphaEditConfig",
    "DeltaEdit",
    "DeltaEditConfig",
]
