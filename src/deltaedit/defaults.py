"""Default method configs: measured per-model values where we have them, a depth heuristic otherwise."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .methods import method_class
from .methods.base import EditMethod, MethodConfig


def _table() -> dict[str, Any]:
    text = resources.files("deltaedit").joinpath("resources/defaults.yaml").read_text()
    return yaml.safe_load(text)


def known_model(model) -> str | None:
    """The defaults entry whose ``match`` fields all equal the model's config, if any."""
    config = model.config
    for name, entry in _table().items():
        if all(getattr(config, key, None) == value for key, value in entry["match"].items()):
            return name
    return None


def preset_values(method_cls: type[EditMethod], preset: str | None) -> dict[str, Any]:
    """The option values of ``method_cls``'s preset ``preset`` (None or "default": none); ValueError naming the
    available ones for anything else."""
    if preset in (None, "default"):
        return {}
    if preset not in method_cls.presets:
        names = ", ".join(["default", *method_cls.presets])
        raise ValueError(f"preset: {method_cls.name} has no preset {preset!r}; available: {names}")
    return dict(method_cls.presets[preset])


def default_config(
    model, method_cls: type[EditMethod], overrides: dict[str, Any] | None = None, preset: str | None = None
) -> MethodConfig:
    """The config for ``model``: its measured defaults (or the depth heuristic; a block's ``preset`` first, then
    the block's own values), then ``preset``, then ``overrides``."""
    values: dict[str, Any] = {}
    name = known_model(model)
    if name is not None:
        entry = _table()[name]
        for klass in reversed(method_cls.__mro__):  # most general first: locate, memit, alphaedit, deltaedit
            block = klass.__dict__.get("name")
            if isinstance(block, str):
                options = dict(entry.get(block, {}))
                values.update(preset_values(klass, options.pop("preset", None)))  # a block may name its preset
                values.update(options)
    else:
        n_layers = getattr(model.config, "num_hidden_layers", None) or model.config.n_layer
        values["layers"] = method_cls.default_layers(n_layers)
    fields = set(method_cls.config_class.__dataclass_fields__)
    values = {k: v for k, v in values.items() if k in fields}
    values.update(preset_values(method_cls, preset))
    values.update(coerce_overrides(overrides or {}, method_cls.config_class))
    return method_cls.config_class.from_dict(values)


def read_overrides(path: str | Path, method: str = "deltaedit") -> dict[str, Any]:
    """Config overrides from a YAML or JSON file (a flat mapping of option names to values), each value
    converted to the type of ``method``'s option of that name (see :func:`coerce_overrides`)."""
    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of option names to values")
    return coerce_overrides(data, method_class(method).config_class, where=f" in config file {path}")


def coerce_overrides(values: Mapping[str, Any], config_class: type[MethodConfig], where: str = "") -> dict[str, Any]:
    """``values`` with each option converted to its config field's type.

    Why: PyYAML follows YAML 1.1, which reads ``1e-3`` or ``1e9`` (no dot, or no sign in the exponent) as
    strings, and a string ``lr`` would only fail deep inside the optimizer. Numbers written as text become
    numbers, an integral float becomes an int for an int option, ints stay ints for float options (so the
    config fingerprint of an existing run does not change); anything else that does not fit raises
    ``ValueError`` naming the option. Names that are not options pass through (``from_dict`` names them).
    """
    hints = typing.get_type_hints(config_class)
    out = dict(values)
    for option in dataclasses.fields(config_class):
        if option.name in out:
            out[option.name] = _coerce(option.name, out[option.name], hints[option.name], where)
    return out


def _coerce(name: str, value: Any, hint: Any, where: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]  # the config's unions are all "X | None"
        args = typing.get_args(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"{name}: expected true or false, got {value!r}{where}")
    if hint is int:
        number = _number(name, value, "an integer", "25", where)
        if isinstance(number, float):
            if not (math.isfinite(number) and number.is_integer()):
                raise ValueError(f"{name}: expected an integer, got {value!r}{where}")
            number = int(number)
        return number
    if hint is float:
        return _number(name, value, "a number", "0.001 or 1e-3", where)
    if typing.get_origin(hint) is tuple and args[:1] == (int,):  # layers: a list of ints (or one, or "4,5,6")
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, int | float) and not isinstance(items, bool):
            items = [items]
        if not isinstance(items, list | tuple):
            raise ValueError(f"{name}: expected a list of integers such as [4, 5, 6], got {value!r}{where}")
        return [_coerce(name, item, int, where) for item in items]
    return value


def _number(name: str, value: Any, kind: str, example: str, where: str) -> int | float:
    """An int or float from a number or its text; bools and other types are refused."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                pass
    raise ValueError(f"{name}: expected {kind}, got {value!r}{where}; write a plain number, e.g. {name}: {example}")
