"""Unit tests of the edge's pure parts: DIMSE configuration, status mapping, boundary re-framing."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from ledger.client import GatewayError
from ledger.dimse import (
    CANNOT_UNDERSTAND,
    DUPLICATE_SOP_INSTANCE,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
    load_config,
    parse_config,
    status_from_error,
    status_from_stow,
)
from ledger.edge import EdgeConfig, create_edge_app, normalize_multipart_boundary, parse_listen
from ledger.errors import InvalidInput
from ledger.multipart import build_multipart_related, parse_content_type, parse_multipart_related_bytes


def test_toml_and_json_configs_resolve_keys_relative_to_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "dimse.toml"
    toml.write_text(
        'ae_title = "PACSGW"\nport = 11113\n'
        '[callers.CT1]\nkey_file = "keys/a.key"\nhosts = ["127.0.0.1"]\n'
        "[callers.MR1]\n"
    )
    cfg = load_config(toml)
    assert cfg.ae_title == "PACSGW" and cfg.port == 11113
    assert cfg.callers["CT1"].key_file == (tmp_path / "keys" / "a.key").resolve()
    assert cfg.callers["CT1"].hosts == ("127.0.0.1",)
    assert cfg.callers["MR1"].key_file is None  # the edge's own key
    js = tmp_path / "dimse.json"
    js.write_text(json.dumps({"callers": {"US1": "/abs/u.key"}}))
    cfg = load_config(js)
    assert cfg.ae_title == "MEDLEDGER" and cfg.callers["US1"].key_file == Path("/abs/u.key")


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"callers": {}},
        {"callers": {"THIS-AE-TITLE-IS-TOO-LONG": {}}},
        {"callers": {"CT\n1": {}}},
        {"callers": {"CT1": {"key": "x"}}},
        {"callers": {"CT1": {"hosts": "127.0.0.1"}}},
        {"callers": {"CT1": {}}, "port": 70000},
        {"callers": {"CT1": {}}, "colour": "blue"},
        {"callers": {"CT1": {}}, "ae_title": ""},
    ],
)
def test_bad_configs_are_refused_with_a_clear_error(data: dict, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        parse_config(data, tmp_path)


def test_unparsable_config_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "dimse.toml"
    bad.write_text("callers = [")
    with pytest.raises(InvalidInput, match=r"dimse\.toml"):
        load_config(bad)


def _failed(reason: int) -> dict:
    return {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [reason]}}]}}


def test_stow_answers_map_to_c_store_statuses() -> None:
    stored = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]}}]}}
    assert status_from_stow(200, stored) == SUCCESS
    assert status_from_stow(409, _failed(0x0111)) == DUPLICATE_SOP_INSTANCE
    assert status_from_stow(409, _failed(0xA700)) == OUT_OF_RESOURCES
    assert status_from_stow(409, _failed(0x0124)) == NOT_AUTHORIZED
    assert status_from_stow(409, _failed(0xC000)) == CANNOT_UNDERSTAND
    assert status_from_stow(409, _failed(0xC122)) == 0xC122  # transfer syntax not supported
    assert status_from_stow(409, _failed(0x0110)) == PROCESSING_FAILURE
    assert status_from_stow(409, _failed(0x1234)) == CANNOT_UNDERSTAND  # not a failure status
    assert status_from_stow(409, _failed(0x0000)) == CANNOT_UNDERSTAND
    assert status_from_stow(200, {}) == PROCESSING_FAILURE  # 200 that stored nothing


def test_gateway_errors_map_to_c_store_statuses() -> None:
    assert status_from_error(GatewayError(403, "not_a_member", "x")) == NOT_AUTHORIZED
    assert status_from_error(GatewayError(401, "bad_signature", "x")) == NOT_AUTHORIZED
    assert status_from_error(GatewayError(413, "payload_too_large", "x")) == OUT_OF_RESOURCES
    assert status_from_error(GatewayError(503, "store_unavailable", "x")) == OUT_OF_RESOURCES
    assert status_from_error(GatewayError(415, "unsupported_media_type", "x")) == CANNOT_UNDERSTAND
    assert status_from_error(GatewayError(500, "error", "x")) == PROCESSING_FAILURE
    assert status_from_error(httpx.ConnectError("refused")) == OUT_OF_RESOURCES


def test_over_long_boundary_is_reframed_losslessly() -> None:
    # Orthanc 1.10's DICOMweb plugin: a 73-character boundary and a CRLF before the first one
    long = "a726d953-47c0-40de-a6c3-977e4a6a5980-a726d953-47c0-40de-a6c3-977e4a6a5980"
    parts = [b"DICM first --a726d953 part", b"\r\n--second\r\n part"]
    body = b"\r\n" + b"".join(
        b"--" + long.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts
    )
    body += b"--" + long.encode() + b"--\r\n"
    ctype = f'multipart/related; type="application/dicom"; boundary={long}'
    new_type, new_body = normalize_multipart_boundary(ctype, body)
    mime, params = parse_content_type(new_type)
    assert mime == "multipart/related" and params["type"] == "application/dicom"
    assert len(params["boundary"]) <= 70
    assert [p.data for p in parse_multipart_related_bytes(new_body, params["boundary"])] == parts


def test_legal_boundaries_and_other_bodies_pass_unchanged() -> None:
    body, ctype = build_multipart_related([({}, b"x")], "application/dicom")
    assert normalize_multipart_boundary(ctype, body) == (ctype, body)
    assert normalize_multipart_boundary("application/json", b"{}") == ("application/json", b"{}")


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8042") == ("127.0.0.1", 8042)
    assert parse_listen(":0") == ("127.0.0.1", 0)
    assert parse_listen("9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    with pytest.raises(InvalidInput):
        parse_listen("127.0.0.1:http")


def test_edge_refuses_break_glass_or_unknown_default_purposes() -> None:
    key = bytes(range(1, 33))
    with pytest.raises(InvalidInput):
        create_edge_app(EdgeConfig("http://127.0.0.1:1", key, purpose="ETREAT"), separator=b"\x00" * 32)
    with pytest.raises(InvalidInput):
        create_edge_app(EdgeConfig("http://127.0.0.1:1", key, purpose="LUNCH"), separator=b"\x00" * 32)
