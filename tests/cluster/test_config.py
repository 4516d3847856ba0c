"""The [cluster] config section: defaults, file, environment, flags, and precise errors."""

from __future__ import annotations

import pytest

from hsmsim.cluster.config import load_cluster_config
from hsmsim.errors import ConfigError


def test_defaults_follow_cloudhsm_sdk5() -> None:
    c = load_cluster_config({}, {})
    assert c.default_retry_mode == "standard" and c.retries == 3
    assert c.disable_key_availability_check is False


def test_layers() -> None:
    c = load_cluster_config({"cluster": {"max_retries": 5}},
                            {"HSMSIM_CLUSTER_DEFAULT_RETRY_MODE": "off"},
                            {"disable_key_availability_check": "true"})
    assert c.max_retries == 5 and c.retries == 0 and c.disable_key_availability_check


@pytest.mark.parametrize("file, message", [
    ({"cluster": {"default_retry_mode": "adaptive"}}, "default_retry_mode"),
    ({"cluster": {"max_retries": 99}}, "max_retries"),
    ({"cluster": {"request_timeout_s": 0}}, "request_timeout_s"),
    ({"cluster": {"log_level": "LOUD"}}, "log_level"),
    ({"cluster": {"bogus": 1}}, "bogus"),
    ({"cluster": {"max_retries": "three"}}, "must be a number"),
])
def test_bad_settings_are_named(file: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_cluster_config(file, {})
