"""Reading a config: a YAML file, typed `section.key` values and `section.key=value` overrides on top,
validated once at start-up against `prorank.settings.config.ProRankConfig`. Every error names the file and key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from prorank.settings.config import ProRankConfig


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value); the value is read as YAML (numbers, null, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str], values: dict[str, Any] | None = None):
    """Set `values` ({"a.b": value}, from typed CLI flags) and then the `a.b=value` strings into `raw`."""
    pairs = [(k, k.split("."), v) for k, v in (values or {}).items()]
    pairs += [(item, *parse_override(item)) for item in overrides]
    for item, keys, value in pairs:
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> ProRankConfig:
    """Read YAML at `path` (optional), set `values` ({"section.key": value}) and the `section.key=value`
    overrides on top, and validate everything once."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
        raw = loaded or {}
    if overrides or values:
        source += " + command line"
        raw = apply_overrides(raw, overrides or [], values)
    try:
        return ProRankConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from err
