"""Typed dataclass configs from YAML files and ``key=value`` overrides, with help drawn from field docstrings.

Every stage's options are one dataclass whose fields carry their own documentation (a string literal right
after the field, the convention Sphinx and jsonargparse read). ``llama2 <command> --config FILE.yaml key=value
...`` fills it: defaults, then the YAML file, then the overrides, left to right, each value checked against the
field's type. Errors name the file (or the override) and the field.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["field_docs", "load_config", "apply_overrides", "coerce", "describe", "ConfigError"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file or override; the message names where and which field."""


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} from the string literals that follow each field in the class body (base
    classes first, so a subclass can override a field's doc)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolved forward references
        return {f.name: f.type for f in dataclasses.fields(cls)}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot read {value!r} as {tp}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [coerce(v, inner, where) if inner is not Any and inner is not Ellipsis else v for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                if isinstance(value, str):
                    f = float(value)
                    if not f.is_integer():
                        raise ValueError
                    return int(f)
                return int(value)
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def _set(cfg: Any, key: str, value: Any, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if key not in fields:
        raise ConfigError(f"{where}: unknown field {key!r}; known fields: {', '.join(fields)}")
    hints = _type_hints(type(cfg))
    return dataclasses.replace(cfg, **{key: coerce(value, hints.get(key, Any), f"{where}: field {key!r}")})


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, **base: Any) -> T:
    """Defaults of ``cls`` (updated by ``base``), then the YAML file, then ``key=value`` overrides."""
    cfg = cls(**base)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
        for k, v in data.items():
            cfg = _set(cfg, str(k), v, str(path))
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        cfg = _set(cfg, k.strip().lstrip("-").replace("-", "_"), v, f"override {item!r}")
    return cfg


def describe(cls: type) -> str:
    """Every field with its type, default and meaning: the body of a command's --help."""
    docs = field_docs(cls)
    hints = _type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        tp = hints.get(f.name, f.type)
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        lines.append(f"  {f.name}={default!r}  [{tname}]")
        if docs.get(f.name):
            lines.extend("      " + ln for ln in textwrap.wrap(docs[f.name], 88))
    return "\n".join(lines)
