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
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from hsmsim.errors import ConfigError

T = TypeVar("T")

CONFIG_FILE = "hsmsim.toml"
# The sections a config file may have: one per component that declares a config dataclass.
SECTIONS = ("cluster", "node", "gateway", "kms")
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
