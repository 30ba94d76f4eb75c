"""Default method configs: measured per-model values where we have them, a depth heuristic otherwise."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

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


def heuristic_layers(n_layers: int) -> tuple[int, ...]:
    """Up to five consecutive layers ending a quarter of the way up (GPT2-XL 13-17 of 48, Llama3-8B 4-8
    of 32 both sit in the lower third): where MLPs store factual associations."""
    count = min(5, max(1, n_layers // 4))
    last = max(count - 1, round(0.25 * n_layers))
    return tuple(range(last - count + 1, last + 1))


def default_config(model, method_cls: type[EditMethod], overrides: dict[str, Any] | None = None) -> MethodConfig:
    values: dict[str, Any] = {}
    name = known_model(model)
    if name is not None:
        entry = _table()[name]
        values.update(entry.get("common", {}))
        values.update(entry.get(method_cls.name, {}))
    else:
        n_layers = getattr(model.config, "num_hidden_layers", None) or model.config.n_layer
        values["layers"] = heuristic_layers(n_layers)
    fields = set(method_cls.config_class.__dataclass_fields__)
    values = {k: v for k, v in values.items() if k in fields}
    values.update(overrides or {})
    return method_cls.config_class.from_dict(values)


def read_overrides(path: str | Path) -> dict[str, Any]:
    """Config overrides from a YAML or JSON file (a flat mapping of option names to values)."""
    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of option names to values")
    return data
