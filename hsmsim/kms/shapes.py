"""The KMS API model: botocore's KMS `service-2.json`, trimmed and shipped as package data
(`api_model.json`, written by `make kms-shapes`, checked current by
tests/kms/test_shapes_fresh.py), loaded once at import. The wire edge validates requests against
it and builds the handlers' typed inputs (`hsmsim.kms.inputs`) from it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hsmsim import awsmodel

MODEL = awsmodel.load(Path(__file__).with_name("api_model.json"))
API_VERSION: str = MODEL.api_version
OPERATIONS: Mapping[str, Mapping[str, Any]] = MODEL.operations
SHAPES: Mapping[str, Mapping[str, Any]] = MODEL.shapes
