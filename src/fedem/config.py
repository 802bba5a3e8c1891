"""YAML configs with dotted overrides, validated by pydantic (torchtune/LitGPT style).

A run's config flows one way: YAML file → `key.sub=value` overrides from the command line → a frozen
pydantic model with `extra="forbid"` → a library function. Validation errors name the exact key, so
a typo in a config file is one clear line, not a traceback.
"""

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fedem.errors import UserError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`; anything else is a user error."""
    if not path.is_file():
        raise UserError(f"no such config file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a YAML mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`3`, `1e-3`, `true`, `[hi, ta]`)."""
    result = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key.sub=value")
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw)
    return result


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {key: _deep_copy(value) if isinstance(value, dict) else value for key, value in data.items()}


def validate(model: type[ConfigT], data: dict[str, Any], source: str = "config") -> ConfigT:
    """Build `model` from `data`; the first validation error becomes one line naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise UserError(f"{source}: {where}: {message}") from None


def to_plain(config: BaseModel) -> dict[str, Any]:
    """The config as JSON-able data, for writing beside an output."""
    plain: dict[str, Any] = config.model_dump(mode="json")
    return plain
