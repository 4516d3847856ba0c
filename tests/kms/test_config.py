"""The [kms] configuration section: defaults, layering, and precise errors."""

from __future__ import annotations

import pytest

from hsmsim.errors import ConfigError
from hsmsim.kms.config import DEFAULT_PORT, KmsConfig, resolve


def test_defaults_and_layers() -> None:
    cfg = resolve({}, {})
    assert (cfg.host, cfg.port, cfg.region, cfg.account_id) == ("127.0.0.1", DEFAULT_PORT, "us-east-1", "111122223333")
    assert cfg.strict_sigv4 is False and cfg.enforce_policies is True and cfg.quotas is False
    cfg = resolve({"kms": {"port": 5000, "region": "eu-west-2"}}, {"HSMSIM_KMS_PORT": "5001"}, {"strict_sigv4": True})
    assert cfg.port == 5001 and cfg.region == "eu-west-2" and cfg.strict_sigv4 is True
    assert cfg.endpoint_url == "http://127.0.0.1:5001" and cfg.root_arn == "arn:aws:iam::111122223333:root"


def test_principals_table_keeps_secrets_with_equals_signs() -> None:
    cfg = KmsConfig(principals=("AKID1=arn:aws:iam::111122223333:user/a=c2VjcmV0==", "AKID2=arn:aws:iam::111122223333:user/b"))
    assert cfg.principal_table() == {"AKID1": ("arn:aws:iam::111122223333:user/a", "c2VjcmV0=="),
                                     "AKID2": ("arn:aws:iam::111122223333:user/b", None)}


@pytest.mark.parametrize("kw,needle", [
    ({"account_id": "123"}, "kms.account_id"),
    ({"port": 70000}, "kms.port"),
    ({"max_request_bytes": 10}, "kms.max_request_bytes"),
    ({"rotation_check_seconds": 0}, "kms.rotation_check_seconds"),
    ({"principals": ("nope",)}, "kms.principals"),
    ({"region": "eu-west-1", "regions": ("us-east-1",)}, "kms.region"),
    ({"regions": ("us-east-1", "Bad Region")}, "kms.regions"),
    ({"region": "mars-north-1"}, "kms.region"),
])
def test_bad_values(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        KmsConfig(**kw)  # type: ignore[arg-type]
    assert needle in str(exc.value)


def test_unknown_setting_named() -> None:
    with pytest.raises(ConfigError) as exc:
        resolve({"kms": {"prot": 1}}, {})
    assert "prot" in str(exc.value)


def test_regions_default_to_the_commercial_regions() -> None:
    from hsmsim.kms.config import COMMERCIAL_REGIONS
    cfg = resolve({"kms": {"region": "eu-west-2"}}, {})
    assert cfg.allowed_regions == COMMERCIAL_REGIONS and "eu-west-2" in cfg.allowed_regions
    assert "cn-north-1" not in cfg.allowed_regions and "us-gov-west-1" not in cfg.allowed_regions
    cfg = resolve({"kms": {"region": "local-1", "regions": ["local-1", "local-2"]}}, {})
    assert cfg.allowed_regions == ("local-1", "local-2")
