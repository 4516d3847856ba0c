"""Every setting of every config section as rows (section, setting, value, default, source,
env variable), resolved from a config file's data and an environment. The daemon reports the
rows it runs with; `hsmsim config` shows them beside the file's."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from hsmsim.cloudhsm.config import CloudHsmConfig
from hsmsim.cluster.config import ClusterConfig
from hsmsim.config import SECTIONS, resolve_section
from hsmsim.gateway.config import GatewayConfig
from hsmsim.kms.config import KmsConfig
from hsmsim.node.config import NodeConfig

_CLASSES: dict[str, type[Any]] = {
    "cluster": ClusterConfig, "node": NodeConfig, "gateway": GatewayConfig, "kms": KmsConfig,
    "cloudhsm": CloudHsmConfig}
SECTION_CLASSES: tuple[tuple[str, type[Any]], ...] = tuple((s, _CLASSES[s]) for s in SECTIONS)


def config_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The HSMSIM_<SECTION>_<NAME> variables of an environment (no passwords or other
    variables)."""
    prefixes = tuple(f"HSMSIM_{s.upper()}_" for s in SECTIONS)
    return {k: v for k, v in environ.items() if k.startswith(prefixes)}


def settings(file_data: Mapping[str, Any], env: Mapping[str, str],
             flags: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per setting: section, setting, value, default, source, env. `flags` are the
    command-line overrides per section (`up --disable-key-availability-check`)."""
    rows = []
    for section, cls in SECTION_CLASSES:
        given = dict((flags or {}).get(section, {}))
        effective = resolve_section(cls, section, dict(file_data), env, given)
        defaults = cls()
        for field in dataclasses.fields(cls):
            env_name = f"HSMSIM_{section}_{field.name}".upper()
            source = ("flag" if field.name in given else
                      "environment" if env_name in env else
                      "file" if field.name in file_data.get(section, {}) else "default")
            rows.append({"section": section, "setting": field.name,
                         "value": _show(getattr(effective, field.name)),
                         "default": _show(getattr(defaults, field.name)),
                         "source": source, "env": env_name})
    return rows


def _show(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
