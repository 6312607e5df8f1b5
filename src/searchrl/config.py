"""Configuration machinery: nested dataclasses <-> YAML, dotted command-line overrides, validation.

Every config class is a dataclass whose fields carry ``metadata={"help": ...}``; its
``__post_init__`` checks values and raises :class:`~searchrl.errors.ConfigError` naming the field.
This module knows nothing about training itself: the training config classes live in
:mod:`searchrl.training.config` and use these helpers.

>>> from dataclasses import dataclass, field
>>> @dataclass
... class Opt:
...     lr: float = field(default=1e-6, metadata={"help": "learning rate"})
...     name: str = "x"
>>> apply_overrides(from_dict(Opt, {"lr": 0.5}), ["lr=2e-5", "name=run"])
Opt(lr=2e-05, name='run')
>>> from_dict(Opt, {"lrr": 1})
Traceback (most recent call last):
...
searchrl.errors.ConfigError: lrr: unknown field (valid: lr, name)
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from searchrl.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: must be one of {list(args)}, got {value!r}")
        return value
    return _coerce_scalar(value, tp, name)


def _coerce_scalar(value: Any, tp: Any, name: str) -> Any:
    """The bool / int / float / str cases of :func:`_coerce` (other types pass through)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(value) if isinstance(value, int) else int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML reads a bare off/on (and no/yes) as a boolean
            return "on" if value else "off"
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (nested) mapping; unknown keys and bad types raise ConfigError."""
    if data is None:
        data = {}
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown field (valid: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}{e}") from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe mapping of a config dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, (tuple, list)):
            v = list(v)  # a copy: editing the mapping must not edit the config
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) and re-validate the whole config."""
    data = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.steps=10")
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown section in override {item!r}")
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
        if parts[-1] not in node:  # pragma: no cover - assignment above always adds it
            raise ConfigError(f"{key}: unknown field")
    return from_dict(type(cfg), data)


def load_yaml_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Defaults, then the YAML file (if any), then dotted overrides; validated at every stage.

    An error in the file names the file and the line of the offending key (``cfg.yaml:4: ...``).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_bytes().decode("utf-8")
            data = yaml.safe_load(text) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        try:
            cfg = from_dict(cls, _merged(to_dict(cls()), data))
        except ConfigError as e:
            line = _yaml_line(text, str(e).split(":", 1)[0])
            raise ConfigError(f"{p}:{line}: {e}" if line else f"{p}: {e}") from None
    else:
        cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides or [])


def _merged(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over ``defaults``, section by section: a file that sets two fields of a section keeps
    the defaults' other fields (which may differ from the section class's own: the embedded CPU
    rollout budgets), instead of rebuilding the section from its class."""
    out = dict(defaults)
    for key, value in data.items():
        if not isinstance(out.get(key), dict):
            out[key] = value
        elif isinstance(value, dict):
            out[key] = _merged(out[key], value)
        elif value is not None:  # (an empty `section:` changes nothing)
            out[key] = value
    return out


def _yaml_line(text: str, dotted: str) -> int | None:
    """1-based line of the key ``a.b[2].c`` in a YAML document (its deepest found part), or None.

    >>> _yaml_line("a: 1\\nb:\\n  c: [x, y]\\n", "b.c[1]")
    3
    """
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in re.findall(r"[^.\[\]]+", dotted):
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def save_yaml_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted name, default, help) for every leaf field: used for ``--help-config``."""
    rows = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))
    return rows


def check(cond: bool, field_name: str, message: str) -> None:
    """Raise ConfigError('field: message') unless ``cond``; for use in ``__post_init__``."""
    if not cond:
        raise ConfigError(f"{field_name}: {message}")
