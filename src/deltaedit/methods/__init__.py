"""Editing methods by name. Add a method by writing its module and one line here."""

from __future__ import annotations

from .alphaedit import AlphaEdit, AlphaEditConfig
from .base import Decision, EditMethod, LayerUpdate, MethodConfig
from .deltaedit import DeltaEdit, DeltaEditConfig

METHODS: dict[str, type[EditMethod]] = {
    AlphaEdit.name: AlphaEdit,
    DeltaEdit.name: DeltaEdit,
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
    "MethodConfig",
    "Decision",
    "LayerUpdate",
    "AlphaEdit",
    "AlphaEditConfig",
    "DeltaEdit",
    "DeltaEditConfig",
]
