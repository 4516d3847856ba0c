"""The CloudHSMv2 wire edge without a daemon: requests botocore serializes (Smithy RPC v2 CBOR
and JSON 1.1) decode to the same validated input; responses and errors the endpoint encodes
parse with botocore's own parsers; the model's constraints give AWS's validation messages;
no byte string makes the CBOR reader raise anything but its own error."""

from __future__ import annotations

import datetime
from typing import Any

import botocore.session
import pytest
from botocore import parsers, serialize
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmsim.cloudhsm import cbor, wire
from hsmsim.cloudhsm import errors as e
from hsmsim.cloudhsm.ops import HANDLERS
from hsmsim.cloudhsm.shapes import OPERATIONS

MODEL = botocore.session.get_session().get_service_model("cloudhsmv2")
PROTOCOLS = ["smithy-rpc-v2-cbor", "json"]
CREATE = {"HsmType": "hsm2m.medium", "SubnetIds": ["subnet-0a1b2c3d4e5f60001"], "Mode": "NON_FIPS",
          "BackupRetentionPolicy": {"Type": "DAYS", "Value": "30"},
          "TagList": [{"Key": "名前", "Value": "値 1"}]}


def test_every_operation_of_the_model_has_a_handler() -> None:
    assert set(HANDLERS) == set(OPERATIONS) == set(MODEL.operation_names)
    assert len(HANDLERS) == 18


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_botocore_request_decodes_to_its_parameters(protocol: str) -> None:
    op = MODEL.operation_model("CreateCluster")
    req = serialize.create_serializer(protocol).serialize_to_request(CREATE, op)
    if protocol == "json":
        assert req["headers"]["X-Amz-Target"] == "BaldrApiService.CreateCluster"
        assert wire.operation_from_target(req["headers"]["X-Amz-Target"]) == "CreateCluster"
    else:
        assert wire.operation_from_path(req["url_path"]) == "CreateCluster"
    raw = wire.parse_body(req["body"], protocol != "json")
    assert wire.decode_request("CreateCluster", raw) == CREATE


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_responses_and_errors_parse_with_botocore(protocol: str) -> None:
    op = MODEL.operation_model("DescribeBackups")
    when = datetime.datetime(2026, 12, 7, 5, 0, 1, 500000, tzinfo=datetime.timezone.utc)
    out = {"Backups": [{"BackupId": "backup-abcdefghijk", "BackupState": "READY", "CreateTimestamp": when,
                        "NeverExpires": False, "TagList": [{"Key": "k", "Value": "v"}]}],
           "NextToken": None}
    body = wire.encode(out, protocol != "json")
    parser = parsers.create_parser(protocol)
    got = parser.parse({"body": body, "headers": {"x-amzn-requestid": "r"}, "status_code": 200},
                       op.output_shape)
    b = got["Backups"][0]
    assert b["BackupId"] == "backup-abcdefghijk" and b["NeverExpires"] is False
    assert b["CreateTimestamp"] == when and "NextToken" not in got
    err = wire.to_wire(e.NotFound("Backup backup-abcdefghijk not found."))
    assert (err.code, err.status) == ("CloudHsmResourceNotFoundException", 400)
    got = parser.parse({"body": wire.encode(err.fields(), protocol != "json"), "headers": {},
                        "status_code": 400}, op.output_shape)
    assert got["Error"] == {"Code": "CloudHsmResourceNotFoundException",
                            "Message": "Backup backup-abcdefghijk not found."}


def test_the_models_constraints_give_aws_messages() -> None:
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("CreateHsm", {"ClusterId": "bad", "AvailabilityZone": "us-east-1a"})
    assert exc.value.message == (
        "1 validation error detected: Value 'bad' at 'clusterId' failed to satisfy constraint: "
        "Member must satisfy regular expression pattern: cluster-[2-7a-zA-Z]{11,16}")
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("CreateHsm", {})
    assert exc.value.message.startswith("2 validation errors detected: Value null at 'clusterId' "
                                        "failed to satisfy constraint: Member must not be null")
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("CreateCluster", {"HsmType": "hsm2m.medium", "SubnetIds": []})
    assert "Member must have length greater than or equal to 1" in exc.value.message
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("TagResource", {"ResourceId": "cluster-abcdefghijk",
                                            "TagList": [{"Key": "a!b", "Value": "x"}]})
    assert "at 'tagList.1.member.key'" in exc.value.message
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("DescribeClusters", {"MaxResults": 26})
    assert "Member must have value less than or equal to 25" in exc.value.message
    with pytest.raises(e.Malformed):
        wire.decode_request("DescribeClusters", {"Filters": ["clusterIds"]})
    with pytest.raises(e.Malformed):
        wire.decode_request("ModifyBackupAttributes", {"BackupId": "backup-abcdefghijk", "NeverExpires": "yes"})
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("DescribeBackups", {"Filters": {f"f{i}": ["x"] for i in range(31)}})
    assert "Member must have length less than or equal to 30" in exc.value.message
    # a certificate's value is never echoed
    with pytest.raises(e.Invalid) as exc:
        wire.decode_request("InitializeCluster", {"ClusterId": "cluster-abcdefghijk",
                                                  "SignedCert": "secret!cert", "TrustAnchor": "x"})
    assert "secret" not in exc.value.message and "at 'signedCert'" in exc.value.message


@pytest.mark.parametrize("body", [b"\xa1", b"\x9f" * 40 + b"\xff" * 40, b"\x7f\x61", b"\xbf\x01\x02\xff",
                                  b"\xa1\x61a\x01\x00", b"\x5b" + b"\xff" * 8])
def test_bad_cbor_is_a_serialization_error(body: bytes) -> None:
    with pytest.raises(e.Malformed):
        wire.parse_body(body, True)
    assert wire.to_wire(e.Malformed("x")).code == "SerializationException"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_give_a_value_or_a_cbor_error(data: bytes) -> None:
    try:
        cbor.loads(data)
    except cbor.CborError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20)
                    | st.floats(allow_nan=False, allow_infinity=False),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20))
def test_cbor_round_trip(value: Any) -> None:
    def strip(v: Any) -> Any:  # None members of a map are left out by the encoder
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    assert cbor.loads(cbor.dumps(value)) == strip(value)


def test_every_pattern_of_the_model_is_checkable() -> None:
    import re
    from hsmsim.cloudhsm.shapes import SHAPES
    for name, shape in SHAPES.items():
        pattern = shape.get("pattern")
        if pattern is None:
            continue
        if "\\p{" in pattern:
            assert wire._matcher(pattern)("Ab 1_.:/=+-@") and not wire._matcher(pattern)("a!b"), name
        else:
            re.compile(pattern)
