"""Layered configuration: built-in defaults -> config file (TOML) -> HSMSIM_* environment ->
CLI flags, resolved once into frozen dataclasses that are passed down.

Each component declares its own section as a frozen dataclass of plain fields (str, int, float,
bool, tuple[str, ...]) with defaults; `resolve_section` fills one from the layers:

    file:  [kms]\nport = 4599              (hsmsim.toml in the state directory, or --config)
    env:   HSMSIM_KMS_PORT=4599
    flags: overrides={"port": 4599}

Nothing below the CLI and daemon entry points reads os.environ."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from hsmsim import files
from hsmsim.errors import ConfigError

T = TypeVar("T")

CONFIG_FILE = "hsmsim.toml"
# The sections a config file may have: one per component that declares a config dataclass.
SECTIONS = ("cluster", "node", "gateway", "kms", "cloudhsm")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def state_dir(flag: str | None, environ: Mapping[str, str]) -> Path:
    """The state directory: --state, else $HSMSIM_HOME, else ./.hsmsim."""
    return Path(flag or environ.get("HSMSIM_HOME") or ".hsmsim").absolute()


def load_file(path: Path | None) -> dict[str, Any]:
    """The parsed TOML config file, or {} when there is none. A section that no component
    declares (a misspelled `[gatway]`) is an error naming it, as an unknown key is."""
    if path is None or not path.exists():
        return {}
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown section(s) {', '.join(unknown)}; "
                          f"the sections are {', '.join(SECTIONS)}")
    return data


def _convert(name: str, raw: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"{name} must be true or false, not {raw!r}")
    if typ is int or typ is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{name} must be a number, not {raw!r}")
        try:
            return typ(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if typ is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{name} must be a string, not {raw!r}")
        return raw
    if origin is tuple:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{name} must be a list, not {raw!r}")
        (inner, *_rest) = typing.get_args(typ)
        return tuple(_convert(name, i.strip() if isinstance(i, str) else i, inner) for i in items)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw is None or raw == "":
            return None
        return _convert(name, raw, args[0])
    return raw


def resolve_section(
    cls: type[T],
    section: str,
    file_data: Mapping[str, Any],
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """One frozen config section from defaults, file, environment and flags, in that order.
    Unknown keys in the file section are an error naming them."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    file_section = file_data.get(section, {})
    if not isinstance(file_section, dict):
        raise ConfigError(f"config section [{section}] must be a table")
    unknown = sorted(set(file_section) - fields)
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{section}]: {', '.join(unknown)}")
    for name in fields:
        key = f"{section}.{name}"
        if name in file_section:
            values[name] = _convert(key, file_section[name], hints[name])
        env_name = f"HSMSIM_{section}_{name}".upper()
        if env_name in environ:
            values[name] = _convert(env_name, environ[env_name], hints[name])
        if overrides and overrides.get(name) is not None:
            values[name] = _convert(f"--{name.replace('_', '-')}", overrides[name], hints[name])
    return cls(**values)


def environ() -> dict[str, str]:
    """A snapshot of the process environment, taken once at an entry point."""
    return dict(os.environ)


def _toml_literal(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name} must be a finite number")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_literal(name, v) for v in value) + "]"
    raise ConfigError(f"{name} cannot be written to the config file")


def set_in_file(path: Path, cls: type[Any], section: str, name: str, raw: str) -> Any:
    """Write `name = raw` into `[section]` of the TOML file at `path` (created 0600 if missing),
    checked as `resolve_section` checks it. Only that line changes: the rest of the file, its
    comments included, is kept. The result is parsed and resolved before it replaces the file,
    so a bad value or a file this cannot edit is an error and the file stays as it was.
    Returns the value as the daemon will read it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ConfigError(f"[{section}] has no setting {name!r}; it has {', '.join(sorted(fields))}")
    hint = typing.get_type_hints(cls)[name]
    value = _convert(f"{section}.{name}", raw, hint)
    line = f"{name} = {_toml_literal(f'{section}.{name}', value)}"
    lines = path.read_text().splitlines() if path.exists() else []
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
    start = next((i for i, text in enumerate(lines)
                  if (m := header.match(text)) and m.group(1) == section), None)
    if start is None:
        lines += ([""] if lines and lines[-1].strip() else []) + [f"[{section}]", line]
    else:
        end = next((i for i in range(start + 1, len(lines)) if header.match(lines[i])
                    or lines[i].lstrip().startswith("[")), len(lines))
        key = re.compile(rf"^\s*{re.escape(name)}\s*=")
        at = next((i for i in range(start + 1, end) if key.match(lines[i])), None)
        if at is not None:
            lines[at] = line
        else:
            last = max([i for i in range(start, end) if lines[i].strip()], default=start)
            lines.insert(last + 1, line)
    text = "\n".join(lines) + "\n"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: cannot set {section}.{name} in it ({exc})") from None
    resolve_section(cls, section, data, {})
    files.atomic_write(path, text.encode())
    return value
