"""The CloudHSMv2 API model: botocore's `cloudhsmv2` `service-2.json`, trimmed and shipped as
package data (`api_model.json`, written by `make cloudhsm-shapes`, checked current by
tests/cloudhsm/test_shapes_fresh.py), loaded once at import. The wire edge validates requests
against it; `hsmsim.cloudhsm.inputs` holds the typed inputs generated from the same model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hsmsim import awsmodel

MODEL = awsmodel.load(Path(__file__).with_name("api_model.json"))
API_VERSION: str = MODEL.api_version
OPERATIONS: Mapping[str, Mapping[str, Any]] = MODEL.operations
SHAPES: Mapping[str, Mapping[str, Any]] = MODEL.shapes
# The model's `targetPrefix` (the X-Amz-Target prefix and the RPC v2 service name); the trimmed
# model keeps only apiVersion, so the freshness test checks this against botocore's metadata.
TARGET_PREFIX = "BaldrApiService"
