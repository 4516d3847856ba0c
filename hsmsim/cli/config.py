"""`hsmsim config`: every setting of every section with its effective value and where that value
came from (default, config file or HSMSIM_* environment), as a table or JSON."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from hsmsim.cli.output import add_json_flag, emit
from hsmsim.cluster.config import ClusterConfig
from hsmsim.config import CONFIG_FILE, SECTIONS as SECTION_NAMES
from hsmsim.config import environ, load_file, resolve_section, state_dir
from hsmsim.gateway.config import GatewayConfig
from hsmsim.kms.config import KmsConfig
from hsmsim.node.config import NodeConfig

_CLASSES: dict[str, type[Any]] = {
    "cluster": ClusterConfig, "node": NodeConfig, "gateway": GatewayConfig, "kms": KmsConfig}
SECTIONS: tuple[tuple[str, type[Any]], ...] = tuple((name, _CLASSES[name]) for name in SECTION_NAMES)


def settings(config_file: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """One row per setting: section, name, value, default, source, env variable."""
    file_data = load_file(config_file)
    rows = []
    for section, cls in SECTIONS:
        effective = resolve_section(cls, section, file_data, env)
        defaults = cls()
        for field in dataclasses.fields(cls):
            env_name = f"HSMSIM_{section}_{field.name}".upper()
            source = ("environment" if env_name in env else
                      "file" if field.name in file_data.get(section, {}) else "default")
            rows.append({"section": section, "setting": field.name,
                         "value": _show(getattr(effective, field.name)),
                         "default": _show(getattr(defaults, field.name)),
                         "source": source, "env": env_name})
    return rows


def _show(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _run(args: argparse.Namespace) -> int:
    env = environ()
    path = Path(args.config) if args.config else state_dir(args.state, env) / CONFIG_FILE
    rows = settings(path, env)
    emit(rows, args.json, columns=("section", "setting", "value", "source", "env"))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="show every setting, its value and where it came from",
                       description="Settings are resolved from built-in defaults, then the config "
                       "file (STATE/hsmsim.toml or --config), then HSMSIM_<SECTION>_<NAME> "
                       "environment variables, then command-line flags.")
    p.add_argument("--state", metavar="DIR",
                   help="the cluster's state directory (default: $HSMSIM_HOME or ./.hsmsim)")
    p.add_argument("--config", metavar="FILE", help="config file (default: STATE/hsmsim.toml)")
    add_json_flag(p)
    p.set_defaults(func=_run)
