"""The machinery of typed configuration: fields with help and checks, and building dataclasses from plain data
(YAML) with errors that name the key and what was expected."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


class UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: explicit keys may override those
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # refused by the safe loader itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key].line + 1}, again on line "
                    f"{key_node.start_mark.line + 1}; only one would be used)", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def safe_load(text: str):
    """yaml.safe_load, refusing duplicate keys."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def read_yaml_file(path: Path, what: str, error: type[Exception] = ConfigError):
    """`path` parsed with the safe loader; `error` naming the file when it is missing, not UTF-8, not YAML or has a
    key twice in one mapping."""
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    try:
        return safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise error(f"{path}: malformed YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise error(f"{path}: {e}") from None


def config_field(default=dataclasses.MISSING, *, help: str, factory=None, **checks):
    """A dataclass field with a help string and optional checks (ge, gt, le, lt, choices)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        inner = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {plural[inner] if inner in plural else _type_name(inner)}"
    if origin is dict:
        item = typing.get_args(tp)[1]
        return "a mapping" if item is typing.Any else f"a mapping of language code to {_type_name(item)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}[tp]


def _got(value, section: bool = False) -> str:
    """A refused value as the errors show it: its type and value, and YAML's null (a key with nothing after its
    colon, or whose children are all commented out) by that name."""
    if value is None:
        return "null (an empty section?)" if section else "null (an empty value?)"
    return f"{type(value).__name__} {value!r}"


EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value, tp, key: str):
    if tp is typing.Any:  # free-form (a study's grid and overrides): checked by their own reader
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_got(value, section=True)}")
        return build_dataclass(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                if len(args) == 2 and type(None) in args:
                    raise
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_got(value) if value is None else repr(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
        key_tp, item_tp = typing.get_args(tp)
        for k in value:
            if not isinstance(k, key_tp):
                raise ConfigError(f"{key}: key {k!r}: expected {_type_name(key_tp)}, got {type(k).__name__}")
        return {k: _convert(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)  # PyYAML reads 3e-4 (no dot) as a string
    ok = (
        isinstance(value, bool) if tp is bool
        else isinstance(value, int) and not isinstance(value, bool) if tp is int
        else isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float
        else isinstance(value, tp)
    )
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value) if tp is float else value


def _why(meta: dict) -> str:
    return f" ({meta['help']})" if meta.get("help") else ""


def _check(value, meta: dict, key: str) -> None:
    if value is None:
        return
    if meta.get("auto") and isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"{key}: expected an integer >= {meta['ge']} or auto, got {value!r}")
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: expected one of {', '.join(meta['choices'])}, got {value!r}")
    if "ge" in meta and value < meta["ge"]:
        raise ConfigError(f"{key}: expected a value >= {meta['ge']}, got {value!r}{_why(meta)}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{key}: expected a value > {meta['gt']}, got {value!r}{_why(meta)}")
    if "lt" in meta and value >= meta["lt"]:
        raise ConfigError(f"{key}: expected a value < {meta['lt']}, got {value!r}{_why(meta)}")
    if "le" in meta and value > meta["le"]:
        raise ConfigError(f"{key}: expected a value <= {meta['le']}, got {value!r}{_why(meta)}")


def build_dataclass(cls, data: dict, prefix: str = "", within: str = "the recipe"):
    """`cls` from plain data; ConfigError names the key. `within` names the top level in unknown-key errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = prefix.rstrip(".") or within
        expected = ", ".join(fields) if fields else "no keys yet (this section is filled by a later release)"
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key{' in ' + where if where else ''} (expected one of: "
                          f"{expected})")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        kwargs[name] = _convert(value, hints[name], key)
        _check(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def set_override(data: dict, override: str, root) -> None:
    """Apply one `key.sub=value` override (the value read as YAML) to the plain data of dataclass `root`."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise ConfigError(f"override {key}: {e}") from None
    parts = key.split(".")
    node, cls = data, root
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)} if cls else set()
        if cls is not None and part not in names:
            where = ".".join(parts[:i]) or "the recipe"
            raise ConfigError(f"override {key}: unknown key {part!r} in {where} (expected one of: "
                              f"{', '.join(sorted(names)) or 'none'})")
        if i == len(parts) - 1:
            hint = typing.get_type_hints(cls)[part] if cls else None
            if isinstance(value, dict) and hint in (str, str | None):  # `hf:name` reads as a mapping in YAML
                value = raw.strip()
            node[part] = value
            return
        hint = typing.get_type_hints(cls)[part]
        if i == len(parts) - 2 and dict in {typing.get_origin(a) for a in (hint, *typing.get_args(hint))}:
            if not isinstance(node.get(part), dict):  # a mapping key: section.key.<lang>=value
                node[part] = {}
            node[part][parts[-1]] = value
            return
        sub = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)] or [hint]
        cls = sub[0] if dataclasses.is_dataclass(sub[0]) else None
        if cls is None:
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def describe_fields(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for `rayalign config --help`-style listings."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        sub = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
        if sub and dataclasses.fields(sub[0]):
            rows.extend(describe_fields(sub[0], prefix + f.name + "."))
        elif not sub:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
